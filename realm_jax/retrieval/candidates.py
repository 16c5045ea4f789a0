"""Turns raw search results into REALM's k candidates per query (DESIGN.md §1).

Slot 0 is always the null document; the query's own source document is dropped (no trivial
retrieval), duplicates (e.g. from overlapping shards) are removed, and if too few documents
remain the empty slots hold the null id with `mask = False`.
"""

from __future__ import annotations

import numpy as np


def assemble_candidates(retrieved_ids: np.ndarray, source_ids: np.ndarray, k: int,
                        null_id: int) -> tuple[np.ndarray, np.ndarray]:
  """Builds candidates from over-retrieved ids.

  Args:
    retrieved_ids: [B, R] doc ids, best first; R should exceed k - 1 by a small margin.
    source_ids: [B] the document each query came from (-1 = none).
    k: number of candidates including the null document.
    null_id: the corpus row of the null document.

  Returns:
    ids [B, k] int32 with ids[:, 0] == null_id, and mask [B, k] bool (False = padding).
  """
  retrieved_ids = np.asarray(retrieved_ids)
  batch, width = retrieved_ids.shape
  keep = (retrieved_ids != np.asarray(source_ids)[:, None]) & (retrieved_ids != null_id)
  keep &= retrieved_ids >= 0
  for j in range(1, width):  # drop later copies of an id already seen in the row
    keep[:, j] &= ~(retrieved_ids[:, :j] == retrieved_ids[:, j:j + 1]).any(axis=1)
  order = np.argsort(~keep, axis=1, kind="stable")[:, :k - 1]  # kept ids first, in rank order
  chosen = np.take_along_axis(retrieved_ids, order, axis=1)
  chosen_ok = np.take_along_axis(keep, order, axis=1)
  if chosen.shape[1] < k - 1:  # fewer results than slots: pad
    pad = k - 1 - chosen.shape[1]
    chosen = np.pad(chosen, ((0, 0), (0, pad)), constant_values=null_id)
    chosen_ok = np.pad(chosen_ok, ((0, 0), (0, pad)), constant_values=False)
  ids = np.concatenate([np.full((batch, 1), null_id), np.where(chosen_ok, chosen, null_id)], 1)
  mask = np.concatenate([np.ones((batch, 1), bool), chosen_ok], axis=1)
  return ids.astype(np.int32), mask


def null_only_candidates(batch: int, null_id: int) -> tuple[np.ndarray, np.ndarray]:
  """The no-retrieval baseline: the null document alone ([B, 1])."""
  return np.full((batch, 1), null_id, np.int32), np.ones((batch, 1), bool)


def retrieve(searcher, query_emb: np.ndarray, source_ids: np.ndarray, k: int, margin: int,
             null_id: int) -> tuple[np.ndarray, np.ndarray]:
  """Search k - 1 + margin ids, then assemble: ids, mask [B, k] with the null doc in slot 0."""
  ids, _ = searcher.search(query_emb, k - 1 + margin)
  return assemble_candidates(ids, source_ids, k, null_id)
