"""The trainer-held index: re-embed the corpus every `refresh_every` steps (in-process).

For small corpora (and the demo) the trainer refreshes its own index synchronously, like Atlas
does. Every refresh is published in the shared index format under `<workdir>/index/<step>/`,
so a resumed run reloads the very index it was using; `retrieval.index_source=builder` swaps
this class for versions from the separate index-builder job (`watcher.WatchedIndex`).

Corpus versions (`data/corpus_versions.py`, `--mode=update_corpus`): every refresh embeds the
live blocks of the newest published corpus version and names the index version
`VersionKey(step, corpus version)` (`<step>+<c>`, as the index builder does). Between refreshes
the loop calls `follow_corpus`, which every `retrieval.corpus_check_every` steps looks at
CORPUS_LATEST and applies a newer version at once: removed blocks leave the searcher, added ones
are embedded and become one new shard (`index_update.delta_update`; published as a delta
version that shares the unchanged shards, `index_update.publish_delta`; after
`retrieval.index_update_max_delta_shards` of them, or with `index_update_mode="rewrite"`, the
update shards' rows and the added ones are folded into the base shard(s) and every shard is
written anew, `index_update.rewrite_in_memory`, as the builder's rewrite does), and the candidates'
tokens and the null id come from that version (`self.corpus`). Added blocks are embedded with the *current*
parameters (those of the index's own step are not kept), so until the next refresh re-embeds
everything they are up to refresh_every steps newer than the rest. The result is published as
`<index step>+<c>`, so a resumed run reloads it (`load_or_refresh`). Every process follows the
same version at the same step: process 0 reads CORPUS_LATEST and broadcasts it, since the
embedding of the added blocks is collective.

The loop makes training queries whose source document is removed in the indexed version
inert (`corpus_versions.live_queries` with `removed`).
"""

from __future__ import annotations

import logging
import time
from typing import Callable

import jax
import numpy as np
from etils import epath
from jax.sharding import Mesh

from realm_jax import progress as progress_lib
from realm_jax import storage
from realm_jax.data import corpus as corpus_lib
from realm_jax.data import corpus_versions
from realm_jax.retrieval import candidates as candidates_lib
from realm_jax.retrieval import device_searcher
from realm_jax.retrieval import index_format
from realm_jax.retrieval import index_update
from realm_jax.retrieval import scann_searcher
from realm_jax.retrieval import searcher as searcher_lib
from realm_jax.train import multihost
from realm_jax.train import partitioning



def embed_corpus(params, corpus: corpus_lib.BlockCorpus, embed_docs: Callable, mesh: Mesh,
                 batch_size: int, progress_name: str = "embed corpus",
                 progress_seconds: float = 30.0, rows: np.ndarray | None = None) -> np.ndarray:
  """Embeds the corpus rows `rows` [n] (default: every real document, not the null row):
  -> [n, D] float32 on the host.

  Logs progress (blocks, rate, ETA; `realm_jax.progress`) every `progress_seconds` and once
  at the end.
  """
  shards = partitioning.data_parallel_size(mesh)
  batch_size = max(shards, batch_size // shards * shards)
  rows = np.arange(corpus.num_docs) if rows is None else np.asarray(rows, np.int64)
  outputs = []
  progress = progress_lib.Progress(progress_name, len(rows), unit="blocks",
                                   every_seconds=progress_seconds)
  for start in range(0, len(rows), batch_size):
    stop = min(start + batch_size, len(rows))
    batch_rows = np.full(batch_size, corpus.null_id, np.int64)  # pad the last batch: null row
    batch_rows[:stop - start] = rows[start:stop]
    tokens = np.asarray(corpus.retriever_tokens[batch_rows])
    segments = np.asarray(corpus.retriever_segments[batch_rows])
    # Every process embeds the same rows here; the builder job will slice by process.
    device = partitioning.shard_batch_global({"t": tokens, "s": segments}, mesh)
    emb = partitioning.to_host(embed_docs(params, device["t"], device["s"]))
    outputs.append(emb[:stop - start])
    progress.update(stop - start)
  progress.close()
  if not outputs:
    raise ValueError("embed_corpus: no rows to embed")
  return np.concatenate(outputs, axis=0)


def agreed_corpus_version(corpus_dir: epath.PathLike | None, current: int,
                          logged: set[str]) -> int:
  """Process 0's newest published corpus version (CORPUS_LATEST), on every process: whoever
  follows it embeds the added blocks collectively, so all must move at the same step.

  A CORPUS_LATEST that cannot be read keeps `current` (each problem logged once: `logged`
  holds those already logged), on every process alike. Shared by the trainer's own index and
  Open-QA fine-tuning (`qa/finetune.py`)."""
  latest = current
  if corpus_dir is not None and jax.process_index() == 0:
    try:
      latest = corpus_versions.latest_version(corpus_dir)
    except (corpus_versions.CorpusVersionError, OSError) as e:
      if str(e) not in logged:
        logged.add(str(e))
        logging.warning("index: keeping corpus version %d: %s", current, e)
  return multihost.broadcast_int(latest)


class InProcessIndex:
  """Holds the current searcher, which train step its embeddings come from, and the corpus
  version it indexes (`self.corpus`: where candidates' tokens come from)."""

  def __init__(self, corpus: corpus_lib.BlockCorpus, embed_docs: Callable, mesh: Mesh,
               index_root: epath.PathLike, embed_batch_size: int, keep_versions: int,
               write: bool, searcher_kind: str = "exact",
               searcher_options: dict | None = None,
               corpus_dir: epath.PathLike | None = None,
               corpus_check_every: int = 10, update_mode: str = "delta",
               max_delta_shards: int = index_update.MAX_DELTA_SHARDS):
    self.corpus, self._embed_docs, self._mesh = corpus, embed_docs, mesh
    self.root = epath.Path(index_root)
    self._embed_batch_size, self._keep, self._write = embed_batch_size, keep_versions, write
    self._searcher_kind = searcher_kind
    self._searcher_options = dict(searcher_options or {})  # ScaNN overrides
    self.searcher: searcher_lib.Searcher | None = None
    self._host: searcher_lib.Searcher | None = None  # what is updated and published
    self.step: int | None = None  # the version key: train step whose parameters embedded it
    self.last_refresh_seconds = 0.0
    self.corpus_dir = None if corpus_dir is None else epath.Path(corpus_dir)
    self._corpus_check_every = max(1, int(corpus_check_every))
    # The corpus version indexed now; `corpus` (the run's, loaded from the build) is version 0.
    self.corpus_version = corpus_versions.build_version(corpus, self.corpus_dir)
    self._bad_latest: set[str] = set()  # CORPUS_LATEST problems already logged
    if update_mode not in index_update.MODES:
      raise ValueError(f"update_mode {update_mode!r} not in {index_update.MODES}")
    self._update_mode, self._max_delta_shards = update_mode, int(max_delta_shards)
    # What the published version's files hold (`index_update.rewrite_reason`'s inputs): update
    # shards since the last full write, rows stored, rows deleted from them since.
    self._delta_shards = self._stored_rows = self._deleted_rows = 0
    # The update shards' live rows, as embedded (ids [U], vectors [U, D]): what a rewrite
    # folds into the base shards (ScaNN keeps no float copy of them to read back).
    self._update_rows = (np.zeros(0, np.int64), np.zeros((0, 0), np.float32))

  # ---- corpus versions --------------------------------------------------------------------

  @property
  def removed(self) -> np.ndarray:
    """[num_docs] bool: the tombstones of the corpus version indexed now."""
    return self.corpus_version.removed

  def _agreed_corpus_version(self) -> int:
    """The newest published corpus version, agreed by every process (`agreed_corpus_version`)."""
    return agreed_corpus_version(self.corpus_dir, self.corpus_version.version, self._bad_latest)

  def _corpus_at(self, version: int) -> corpus_versions.CorpusVersion:
    if version == self.corpus_version.version:
      return self.corpus_version
    return corpus_versions.load_version(self.corpus_dir, version)

  def _use_corpus(self, version: corpus_versions.CorpusVersion):
    self.corpus_version, self.corpus = version, version.corpus

  def _set_searcher(self, host: searcher_lib.Searcher):
    """`host` (exact or ScaNN, on the host) becomes the searcher (device: a table copy)."""
    self._host = host
    self.searcher = (device_searcher.from_searcher(host, self._mesh, **self._searcher_options)
                     if self._searcher_kind == "device" else host)

  def _publish(self, key: index_format.VersionKey, extra: dict):
    if (self.root / str(key) / index_format.MANIFEST).exists():
      # a re-run of this step after a resume replaces it (marker first on object storage)
      storage.remove_folder(self.root / str(key), index_format.MANIFEST)
    shards, searchers = index_update.shards_to_publish(self._host)
    device = self._searcher_kind == "device"  # table on the mesh; published as exact
    info = dict(source="in_process", corpus_version=self.corpus_version.version,
                corpus_num_docs=self.corpus.num_docs, param_step=int(key),
                **index_format.corpus_record(self.corpus), **extra)
    index_format.publish_index(self.root, key, shards,
                               searcher=searcher_lib.published_kind(self._searcher_kind),
                               extra=info,
                               searcher_options=None if device else self._searcher_options,
                               searchers=searchers)
    index_format.prune_versions(self.root, self._keep)

  def corpus_check_due(self, step: int) -> bool:
    """Whether `follow_corpus(params, step)` would look for a newer corpus version."""
    return (self.corpus_dir is not None and self.searcher is not None and
            step % self._corpus_check_every == 0)

  def follow_corpus(self, params, step: int) -> bool:
    """At every `corpus_check_every`-th step: a newer published corpus version is applied to
    the index now (removed blocks dropped, added ones embedded with `params` and added) and
    published as `<index step>+<corpus version>`. True when the index changed."""
    if not self.corpus_check_due(step):
      return False
    latest = self._agreed_corpus_version()
    if latest <= self.corpus_version.version:
      return False
    start = time.time()
    old, new = self.corpus_version, self._corpus_at(latest)
    embed_rows = lambda rows: embed_corpus(params, new.corpus, self._embed_docs, self._mesh,
                                           self._embed_batch_size,
                                           progress_name=f"corpus update {latest}", rows=rows)
    added, removed = corpus_versions.changes(old, new)
    why_rewrite = ("asked" if self._update_mode == "rewrite" else index_update.rewrite_reason(
        self._delta_shards, self._stored_rows, self._deleted_rows + len(removed), len(added),
        self._max_delta_shards))
    parent = self.step
    self.step = index_format.VersionKey(int(self.step), new.version)
    info = dict(incremental=dict(
        parent_corpus_version=old.version, added=int(len(added)), removed=int(len(removed)),
        embedded=int(len(added)), added_param_step=int(step),
        mode="rewrite" if why_rewrite else "delta", rewrite_reason=why_rewrite))
    if why_rewrite:  # the update shards folded into the base shards, every shard written anew
      embeddings = (np.asarray(embed_rows(added), np.float32) if len(added) else
                    np.zeros((0, self._host.dim), np.float32))
      host = index_update.rewrite_in_memory(self._host, *self._update_rows, embeddings, added,
                                            removed)
      self._use_corpus(new)
      self._set_searcher(host)
      if self._write:
        self._publish(self.step, info)
      self._reset_delta_counts()
    else:  # the shards kept (minus the removed ids) and one new shard: a delta version
      embeddings = (np.asarray(embed_rows(added), np.float32) if len(added) else
                    np.zeros((0, self._host.dim), np.float32))
      kind = searcher_lib.published_kind(self._searcher_kind)
      new_shard = index_update.delta_shard(
          kind, embeddings, added, self._searcher_options if kind == "scann" else {})
      host = index_update.delta_update(self._host, new_shard, removed)
      self._use_corpus(new)
      self._set_searcher(host.shards[0] if len(host.shards) == 1 else host)
      if self._write:
        self._publish_delta(parent, added, new_shard, removed, info)
      ids, rows = self._update_rows
      keep = ~np.isin(ids, removed)
      self._update_rows = (np.concatenate([ids[keep], added]),
                           np.concatenate([rows[keep].reshape(-1, host.dim), embeddings]))
      # (an update shard left empty by the removals is dropped, as publish_delta drops it)
      self._delta_shards = sum(bool(np.isin(shard.doc_ids, self._update_rows[0]).any())
                               for shard in host.shards)
      self._stored_rows += len(added)
      self._deleted_rows += len(removed)
    self.last_refresh_seconds = time.time() - start
    logging.info("index: corpus version %d at step %d: +%d blocks embedded, -%d removed, %d "
                 "live, in %.1fs (index version %s, %s%s)", new.version, step, len(added),
                 len(removed), len(new.live_ids), self.last_refresh_seconds, self.step,
                 f"rewrite: {why_rewrite}" if why_rewrite else "delta",
                 ", published" if self._write else "")
    return True

  def _publish_delta(self, parent, added, new_shard, removed, info):
    """Publishes self.step as a delta of `parent` (the version this process published last);
    a parent that cannot be read (removed by hand) gets a full write instead."""
    if (self.root / str(self.step) / index_format.MANIFEST).exists():
      storage.remove_folder(self.root / str(self.step), index_format.MANIFEST)
    try:
      index_update.publish_delta(self.root, parent, self.step, self.corpus_version, added,
                                 new_shard, removed, extra=dict(
                                     source="in_process", param_step=int(self.step), **info))
    except index_format.IndexVersionError as e:
      logging.warning("index: cannot publish %s as a delta of %s (%s): writing it whole",
                      self.step, parent, e)
      self._publish(self.step, info)
      return
    index_format.prune_versions(self.root, self._keep)

  def _reset_delta_counts(self):
    """After a full write: no update shards, every stored row live."""
    self._delta_shards, self._deleted_rows = 0, 0
    self._update_rows = (np.zeros(0, np.int64), np.zeros((0, self._host.dim), np.float32))
    self._stored_rows = len(self.corpus_version.live_ids)

  # ---- refreshes --------------------------------------------------------------------------

  def refresh(self, params, step: int) -> None:
    """Re-embeds the live blocks of the newest corpus version with `params` (of `step`)."""
    start = time.time()
    latest = self._agreed_corpus_version()
    if latest != self.corpus_version.version:
      self._use_corpus(self._corpus_at(latest))
    live = self.corpus_version.live_ids  # [L] every block but the tombstoned ones
    embeddings = embed_corpus(params, self.corpus, self._embed_docs, self._mesh,
                              self._embed_batch_size, progress_name=f"index refresh @{step}",
                              rows=live)
    kind = "exact" if self._searcher_kind == "device" else self._searcher_kind
    self._set_searcher(scann_searcher.make_searcher(
        kind, embeddings, live, **({} if kind == "exact" else self._searcher_options)))
    self.step = index_format.VersionKey(step, self.corpus_version.version)
    if self._write:
      self._publish(self.step, {})
    self._reset_delta_counts()
    self.last_refresh_seconds = time.time() - start
    logging.info("index: re-embedded %d documents at step %d in %.1fs (%.0f docs/s, %s "
                 "searcher, corpus version %d%s)", len(embeddings), step,
                 self.last_refresh_seconds,
                 len(embeddings) / max(self.last_refresh_seconds, 1e-9), self._searcher_kind,
                 self.corpus_version.version, ", published" if self._write else "")

  def load_or_refresh(self, params, step: int, refresh_every: int) -> None:
    """On resume: reuse the version the interrupted run was using (the newest one of the
    refresh step before `step`, incremental corpus versions included), else re-embed now.

    A corpus version the interrupted run followed after its last checkpoint is taken too (the
    corpus has moved on; replaying those steps on the older version would retrieve removed
    documents), so such a replay is not bit-identical to the interrupted run."""
    expected = step // refresh_every * refresh_every
    candidates = [v for v in index_format.list_versions(self.root) if int(v) == expected]
    if candidates:
      key = candidates[-1]
      try:
        manifest = index_format.read_manifest(self.root, key)
        version = self._corpus_at(int(manifest.get("corpus_version", 0)))
        _, host = index_format.load_index(
            self.root, key, expected_num_docs=version.corpus.num_docs,
            removed=version.removed if version.version else None,
            expected_fingerprint=index_format.fingerprint_of(version.corpus))
        self._use_corpus(version)
        self._set_searcher(host.shards[0] if len(host.shards) == 1 else host)
        self.step = key
        self._delta_shards = int(manifest.get("delta_shards", 0))
        update_rows = [index_format.shard_rows(self.root / str(key), entry)
                       for entry in manifest["shards"][len(manifest["shards"]) -
                                                       self._delta_shards:]]
        self._update_rows = (
            np.concatenate([ids for _, ids in update_rows] + [np.zeros(0, np.int64)]),
            np.concatenate([rows for rows, _ in update_rows] +
                           [np.zeros((0, host.dim), np.float32)]))
        self._stored_rows = sum(index_format.stored_num_docs(e) for e in manifest["shards"])
        self._deleted_rows = self._stored_rows - manifest["num_docs"]
        logging.info("index: resumed with version %s", self.step)
        return
      except (index_format.IndexVersionError, corpus_versions.CorpusVersionError) as e:
        logging.warning("index: version %s unusable (%s); re-embedding", key, e)
    self.refresh(params, step)

  def retrieve(self, query_emb: np.ndarray, source_ids: np.ndarray, k: int, margin: int
               ) -> tuple[np.ndarray, np.ndarray]:
    """Top k - 1 real documents (source dropped) behind the null slot: ids, mask [B, k]."""
    return candidates_lib.retrieve(self.searcher, query_emb, source_ids, k, margin,
                                   self.corpus.null_id)
