"""Maximum inner product search behind one interface: `search(query_emb [B, D], k)`.

`ExactSearcher` (matmul + top-k) is the reference and the choice for small corpora and tests;
the ScaNN searcher of the index-builder job implements the same protocol. Shards are searched
independently and merged exactly by score (`merge_top_k`).

`retrieval.searcher` names one of `KINDS`: "exact" and "scann" search on the host
(`scann_searcher.make_searcher`); "device" (`device_searcher.DeviceSearcher`) holds the table
on the accelerators and is built by the trainer from a version's embeddings, so such versions
are published as "exact" (`published_kind`).
"""

from __future__ import annotations

from typing import Protocol, Sequence

import numpy as np


class Searcher(Protocol):
  """What the trainer needs from an index shard (or a merged set of shards)."""

  num_docs: int
  dim: int

  def search(self, query_emb: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """[B, D] float32 -> (doc ids [B, k] int64, scores [B, k] float32), best first."""


def top_k(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
  """Column indices and values of the k largest scores per row, best first: [B, N] -> [B, k]."""
  k = min(k, scores.shape[1])
  part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
  part_scores = np.take_along_axis(scores, part, axis=1)
  order = np.argsort(-part_scores, axis=1, kind="stable")
  return np.take_along_axis(part, order, axis=1), np.take_along_axis(part_scores, order, axis=1)


class ExactSearcher:
  """Brute-force MIPS over an in-memory shard of document embeddings."""

  def __init__(self, embeddings: np.ndarray, doc_ids: np.ndarray | None = None):
    self.embeddings = np.asarray(embeddings, dtype=np.float32)  # [N, D]
    if self.embeddings.ndim != 2:
      raise ValueError(f"embeddings must be [N, D], got shape {self.embeddings.shape}")
    self.doc_ids = (np.arange(len(self.embeddings), dtype=np.int64) if doc_ids is None
                    else np.asarray(doc_ids, dtype=np.int64))  # [N] global ids of the rows
    if self.doc_ids.shape != (len(self.embeddings),):
      raise ValueError(f"doc_ids shape {self.doc_ids.shape} does not match "
                       f"{len(self.embeddings)} embeddings")
    self.num_docs, self.dim = self.embeddings.shape

  def updated(self, embeddings: np.ndarray, doc_ids: np.ndarray, remove_ids: np.ndarray
              ) -> "ExactSearcher":
    """A new searcher: these rows masked out (dropped), then [m, D] embeddings appended."""
    keep = ~np.isin(self.doc_ids, np.asarray(remove_ids, np.int64))
    return ExactSearcher(np.concatenate([self.embeddings[keep],
                                         np.asarray(embeddings, np.float32)]),
                         np.concatenate([self.doc_ids[keep], np.asarray(doc_ids, np.int64)]))

  def search(self, query_emb: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    query_emb = np.asarray(query_emb, dtype=np.float32)
    if query_emb.ndim != 2 or query_emb.shape[1] != self.dim:
      raise ValueError(f"query_emb must be [B, {self.dim}], got {query_emb.shape}")
    rows, scores = top_k(query_emb @ self.embeddings.T, k)
    return self.doc_ids[rows], scores


def merge_top_k(results: Sequence[tuple[np.ndarray, np.ndarray]], k: int
                ) -> tuple[np.ndarray, np.ndarray]:
  """Exact merge of per-shard results [(ids [B, k_i], scores [B, k_i]), ...] -> top k."""
  ids = np.concatenate([r[0] for r in results], axis=1)
  scores = np.concatenate([r[1] for r in results], axis=1)
  cols, best = top_k(scores, k)
  return np.take_along_axis(ids, cols, axis=1), best


class ShardedSearcher:
  """Searches every shard and merges exactly; looks like one searcher to the trainer."""

  def __init__(self, shards: Sequence[Searcher]):
    if not shards:
      raise ValueError("a sharded index needs at least one shard")
    dims = {s.dim for s in shards}
    if len(dims) != 1:
      raise ValueError(f"shards disagree on the embedding dim: {sorted(dims)}")
    self.shards = list(shards)
    self.dim = dims.pop()
    self.num_docs = sum(s.num_docs for s in shards)

  def search(self, query_emb: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    return merge_top_k([s.search(query_emb, k) for s in self.shards], k)


KINDS = ("exact", "scann", "device")


def published_kind(kind: str) -> str:
  """The searcher kind written into index versions for trainers using `kind`: the device
  searcher reads the stored embeddings, which is what an "exact" version is."""
  return "exact" if kind == "device" else kind


def options_for(kind: str, retrieval_config) -> dict:
  """The searcher's options from `retrieval.scann` / `retrieval.device` ({} for exact)."""
  if kind == "scann":
    from realm_jax.retrieval import scann_searcher  # pylint: disable=import-outside-toplevel
    return scann_searcher.options_from_config(retrieval_config)
  if kind == "device":
    from realm_jax.retrieval import device_searcher  # pylint: disable=import-outside-toplevel
    return device_searcher.options_from_config(retrieval_config)
  return {}
