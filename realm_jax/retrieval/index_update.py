"""Incremental index versions: a new corpus version on the parameters of the index in use.

When the corpus gains a version (`data/corpus_versions.py`) but no newer checkpoint is due, the
index builder embeds only the added blocks, with the parameters the current index was built
with, and publishes version `<step>+<corpus version>` (`index_format.VersionKey`):

- exact shards: removed doc ids are masked out (their rows dropped) and the added rows
  appended (`ExactSearcher.updated`);
- ScaNN shards: the stored, trained searcher is loaded and changed in place with ScaNN's own
  `delete` and `upsert` (no retraining: added points go to the nearest existing leaf and are
  quantized with the existing codebooks); `rebalance=True` retrains it from the points it holds.
  Added blocks are dealt round-robin over the shards, so they stay balanced.

The version goes through the usual publish protocol (`start_version` / `write_shard` /
`finish_version`: tmp folder, manifest last, rename, LATEST), announced `single_writer` (the
leader writes every shard; followers leave it alone), so a builder killed mid-update publishes
nothing. Its manifest carries `corpus_version`, `corpus_num_docs` (the id space), `param_step`
and `incremental` (the parent version, added/removed/embedded counts, seconds).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

import numpy as np
from etils import epath

from realm_jax.data import corpus_versions
from realm_jax.retrieval import index_format
from realm_jax.retrieval import scann_searcher
from realm_jax.retrieval import searcher as searcher_lib


def update_index(index_root: epath.PathLike, parent_key: int,
                 old: corpus_versions.CorpusVersion, new: corpus_versions.CorpusVersion,
                 embed_rows: Callable[[np.ndarray], np.ndarray], *, rebalance: bool = False,
                 extra: dict[str, Any] | None = None,
                 before_publish: Callable[[], None] | None = None) -> epath.Path:
  """Publishes `<parent step>+<new.version>`: version `parent_key` changed from corpus `old`
  to `new`. embed_rows(doc ids [A]) -> [A, D] embeds with the parent's parameters."""
  start = time.time()
  root = epath.Path(index_root)
  manifest, shards = index_format.load_shards(root, parent_key)
  if manifest.get("corpus_version", 0) != old.version:
    raise index_format.IndexVersionError(
        f"version {parent_key} was built for corpus version {manifest.get('corpus_version', 0)}"
        f", not {old.version}")
  if new.version <= old.version:
    raise ValueError(f"corpus version {new.version} is not newer than {old.version}")
  added, removed = corpus_versions.changes(old, new)
  key = index_format.VersionKey(int(parent_key), new.version)
  embed_start = time.time()
  added_embeddings = (embed_rows(added) if len(added) else
                      np.zeros((0, manifest["dim"]), np.float32))
  embed_seconds = time.time() - embed_start
  if added_embeddings.shape != (len(added), manifest["dim"]):
    raise ValueError(f"embed_rows gave {added_embeddings.shape} for {len(added)} blocks")
  num_shards = len(shards)
  updated = []
  for i, (embeddings, doc_ids, searcher) in enumerate(shards):
    add_ids, add_embeddings = added[i::num_shards], added_embeddings[i::num_shards]
    gone = removed[np.isin(removed, doc_ids)]
    if manifest["searcher"] == "scann" and searcher is not None:
      searcher.delete(gone)
      searcher.upsert(add_embeddings, add_ids)
      if rebalance:
        searcher.rebalance()
      ids = searcher.doc_ids
      rows = None  # the searcher holds the only copy of the vectors
    elif embeddings is None:
      raise index_format.IndexVersionError(f"shard {i} of {parent_key} has no vectors to update")
    else:
      exact = searcher_lib.ExactSearcher(embeddings, doc_ids).updated(add_embeddings, add_ids,
                                                                      gone)
      ids, rows = exact.doc_ids, exact.embeddings
      searcher = None  # write_shard trains ScaNN for old-format scann shards
    if not len(ids):
      raise index_format.IndexVersionError(f"shard {i} would be empty after the update")
    updated.append((rows, ids, searcher))
  build = index_format.start_version(root, key, num_shards, manifest["searcher"],
                                     manifest.get("searcher_options") or {},
                                     single_writer=True,
                                     info=dict(corpus_version=new.version))
  try:
    for i, (rows, ids, searcher) in enumerate(updated):
      index_format.write_shard(root, build, i, rows, ids, searcher=searcher)
    info = dict(
        source="index_update", corpus_version=new.version,
        corpus_num_docs=new.corpus.num_docs, param_step=int(parent_key),
        **index_format.corpus_record(new.corpus),
        incremental=dict(parent=str(parent_key), parent_corpus_version=old.version,
                         added=int(len(added)), removed=int(len(removed)),
                         embedded=int(len(added)), rebalanced=bool(rebalance),
                         embed_seconds=round(embed_seconds, 3),
                         seconds=round(time.time() - start, 3)),
        **(extra or {}))
    path = index_format.finish_version(root, build, expected_num_docs=len(new.live_ids),
                                       extra=info, before_publish=before_publish)
  except BaseException:
    current = index_format.read_build(root, key)
    if current is not None and current["attempt"] == build["attempt"]:
      index_format.tmp_dir(root, key).rmtree()
    raise
  logging.info("index: published incremental version %s (from %s): +%d embedded, -%d removed, "
               "%d docs, %.1fs", key, parent_key, len(added), len(removed),
               len(new.live_ids), time.time() - start)
  return path


def make_full_shards(new: corpus_versions.CorpusVersion, embeddings: np.ndarray,
                     kind: str, options: dict[str, Any], num_shards: int = 1
                     ) -> list[tuple[np.ndarray, np.ndarray, Any]]:
  """A full rebuild's shards over the live blocks (reference for tests and benchmarks):
  embeddings [L, D] of new.live_ids, split contiguously."""
  ids = new.live_ids
  out = []
  for part_ids, part in zip(np.array_split(ids, num_shards),
                            np.array_split(embeddings, num_shards)):
    out.append((part, part_ids, scann_searcher.make_searcher(kind, part, part_ids, **options)))
  return out


def apply_update(searcher, added_embeddings: np.ndarray, added_ids: np.ndarray,
                 removed_ids: np.ndarray):
  """An in-memory searcher changed by a corpus update: removed_ids [R] dropped, added rows
  [A, D] / ids [A] added (dealt round-robin over a ShardedSearcher's shards). -> the searcher
  to use from now on (ScaNN shards change in place; exact ones are replaced)."""
  removed_ids = np.asarray(removed_ids, np.int64)
  added_ids = np.asarray(added_ids, np.int64)
  if isinstance(searcher, searcher_lib.ShardedSearcher):
    n = len(searcher.shards)
    return searcher_lib.ShardedSearcher([
        apply_update(shard, added_embeddings[i::n], added_ids[i::n],
                     removed_ids[np.isin(removed_ids, shard.doc_ids)])
        for i, shard in enumerate(searcher.shards)])
  if isinstance(searcher, scann_searcher.ScannSearcher):
    searcher.delete(removed_ids[np.isin(removed_ids, searcher.doc_ids)])
    searcher.upsert(added_embeddings, added_ids)
    return searcher
  if isinstance(searcher, searcher_lib.ExactSearcher):
    return searcher.updated(added_embeddings, added_ids, removed_ids)
  raise TypeError(f"cannot update a {type(searcher).__name__} in place (rebuild it from an "
                  "exact searcher)")


def follow_version(searcher, old: corpus_versions.CorpusVersion,
                   new: corpus_versions.CorpusVersion,
                   embed_rows: Callable[[np.ndarray], np.ndarray]):
  """An in-memory searcher over corpus version `old` brought to `new`: the blocks added since
  are embedded (`embed_rows(doc ids [A]) -> [A, D]`, the caller's document tower) and added,
  the removed ones dropped (`apply_update`). What the trainer's own index and Open-QA's frozen
  index both do when a corpus version is published.

  -> (the searcher to use from now on, added ids [A], removed ids [R], added embeddings [A, D])
  """
  added, removed = corpus_versions.changes(old, new)
  added_embeddings = (np.asarray(embed_rows(added), np.float32) if len(added) else
                      np.zeros((0, searcher.dim), np.float32))
  if added_embeddings.shape != (len(added), searcher.dim):
    raise ValueError(f"embed_rows gave {added_embeddings.shape} for {len(added)} blocks of "
                     f"dim {searcher.dim}")
  return (apply_update(searcher, added_embeddings, added, removed), added, removed,
          added_embeddings)


def shards_to_publish(searcher) -> tuple[list[tuple[np.ndarray | None, np.ndarray]], list]:
  """([(embeddings [n, D] or None for ScaNN, doc ids [n]), ...], [searcher per shard]) of an
  in-memory searcher, as `index_format.publish_index` takes them."""
  shards = getattr(searcher, "shards", [searcher])
  return ([(getattr(s, "embeddings", None), np.asarray(s.doc_ids)) for s in shards],
          list(shards))
