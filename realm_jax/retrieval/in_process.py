"""The trainer-held index: re-embed the corpus every `refresh_every` steps (in-process).

For small corpora (and the demo) the trainer refreshes its own index synchronously, like Atlas
does. Every refresh is published in the shared index format under `<workdir>/index/<step>/`,
so a resumed run reloads the very index it was using; `retrieval.index_source=builder` swaps
this class for versions from the separate index-builder job (`watcher.WatchedIndex`).
"""

from __future__ import annotations

import logging
import time
from typing import Callable

import numpy as np
from etils import epath
from jax.sharding import Mesh

from realm_jax import progress as progress_lib
from realm_jax import storage
from realm_jax.data import corpus as corpus_lib
from realm_jax.retrieval import candidates as candidates_lib
from realm_jax.retrieval import device_searcher
from realm_jax.retrieval import index_format
from realm_jax.retrieval import scann_searcher
from realm_jax.retrieval import searcher as searcher_lib
from realm_jax.train import partitioning


def embed_corpus(params, corpus: corpus_lib.BlockCorpus, embed_docs: Callable, mesh: Mesh,
                 batch_size: int, progress_name: str = "embed corpus",
                 progress_seconds: float = 30.0) -> np.ndarray:
  """Embeds every real document (not the null row): -> [num_docs, D] float32 on the host.

  Logs progress (blocks, rate, ETA; `realm_jax.progress`) every `progress_seconds` and once
  at the end.
  """
  shards = partitioning.data_parallel_size(mesh)
  batch_size = max(shards, batch_size // shards * shards)
  outputs = []
  progress = progress_lib.Progress(progress_name, corpus.num_docs, unit="blocks",
                                   every_seconds=progress_seconds)
  for start in range(0, corpus.num_docs, batch_size):
    stop = min(start + batch_size, corpus.num_docs)
    rows = np.arange(start, start + batch_size)
    rows = np.where(rows < stop, rows, corpus.null_id)  # pad the last batch with the null row
    tokens = np.asarray(corpus.retriever_tokens[rows])
    segments = np.asarray(corpus.retriever_segments[rows])
    # Every process embeds the same rows here; the builder job will slice by process.
    device = partitioning.shard_batch_global({"t": tokens, "s": segments}, mesh)
    emb = partitioning.to_host(embed_docs(params, device["t"], device["s"]))
    outputs.append(emb[:stop - start])
    progress.update(stop - start)
  progress.close()
  return np.concatenate(outputs, axis=0)


class InProcessIndex:
  """Holds the current searcher and which train step its embeddings come from."""

  def __init__(self, corpus: corpus_lib.BlockCorpus, embed_docs: Callable, mesh: Mesh,
               index_root: epath.PathLike, embed_batch_size: int, keep_versions: int,
               write: bool, searcher_kind: str = "exact",
               searcher_options: dict | None = None):
    self.corpus, self._embed_docs, self._mesh = corpus, embed_docs, mesh
    self.root = epath.Path(index_root)
    self._embed_batch_size, self._keep, self._write = embed_batch_size, keep_versions, write
    self._searcher_kind = searcher_kind
    self._searcher_options = dict(searcher_options or {})  # ScaNN overrides
    self.searcher: searcher_lib.Searcher | None = None
    self.step: int | None = None  # train step whose parameters embedded the corpus
    self.last_refresh_seconds = 0.0

  def refresh(self, params, step: int) -> None:
    start = time.time()
    embeddings = embed_corpus(params, self.corpus, self._embed_docs, self._mesh,
                              self._embed_batch_size, progress_name=f"index refresh @{step}")
    device = self._searcher_kind == "device"  # table on the mesh; published as exact
    self.searcher = (device_searcher.DeviceSearcher(embeddings, mesh=self._mesh,
                                                    **self._searcher_options) if device else
                     scann_searcher.make_searcher(self._searcher_kind, embeddings,
                                                  **self._searcher_options))
    self.step = step
    if self._write:
      if (self.root / str(step) / index_format.MANIFEST).exists():
        storage.remove_folder(self.root / str(step), index_format.MANIFEST)  # a re-run of this step after a resume replaces it
      index_format.publish_index(self.root, step, [(embeddings, np.arange(len(embeddings)))],
                                 searcher=searcher_lib.published_kind(self._searcher_kind),
                                 extra=dict(source="in_process",
                                            **index_format.corpus_record(self.corpus)),
                                 searcher_options=None if device else self._searcher_options,
                                 searchers=None if device else [self.searcher])
      index_format.prune_versions(self.root, self._keep)
    self.last_refresh_seconds = time.time() - start
    logging.info("index: re-embedded %d documents at step %d in %.1fs (%.0f docs/s, %s "
                 "searcher%s)", len(embeddings), step, self.last_refresh_seconds,
                 len(embeddings) / max(self.last_refresh_seconds, 1e-9), self._searcher_kind,
                 ", published" if self._write else "")

  def load_or_refresh(self, params, step: int, refresh_every: int) -> None:
    """On resume: reuse the version the interrupted run was using, else re-embed now."""
    expected = step // refresh_every * refresh_every
    if expected in index_format.list_versions(self.root):
      try:
        _, self.searcher = index_format.load_index(
            self.root, expected, expected_num_docs=self.corpus.num_docs,
            expected_fingerprint=index_format.fingerprint_of(self.corpus))
        if self._searcher_kind == "device":
          self.searcher = device_searcher.from_searcher(self.searcher, self._mesh,
                                                        **self._searcher_options)
        self.step = expected
        logging.info("index: resumed with version %d", expected)
        return
      except index_format.IndexVersionError as e:
        logging.warning("index: version %d unusable (%s); re-embedding", expected, e)
    self.refresh(params, step)

  def retrieve(self, query_emb: np.ndarray, source_ids: np.ndarray, k: int, margin: int
               ) -> tuple[np.ndarray, np.ndarray]:
    """Top k - 1 real documents (source dropped) behind the null slot: ids, mask [B, k]."""
    return candidates_lib.retrieve(self.searcher, query_emb, source_ids, k, margin, self.corpus.null_id)
