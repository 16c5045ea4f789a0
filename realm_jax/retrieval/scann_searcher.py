"""ScaNN maximum inner product search behind the `Searcher` protocol of `searcher.py`.

`ScannSearcher` indexes one shard with ScaNN's tree (k-means partitioning) + asymmetric
hashing (anisotropic product quantization, 4-bit LUT16 codes) + exact float32 re-ordering of
the best candidates, with dot-product similarity. It returns global doc ids (ScaNN row indices
mapped through `doc_ids`), best first, like `ExactSearcher`, so shards of either kind can be
merged exactly by `ShardedSearcher`. Tiny shards (fewer than `BRUTE_FORCE_BELOW` rows), where
a tree and quantization buy nothing, are searched brute force inside ScaNN.

`make_searcher(kind, embeddings, doc_ids, **options)` builds either kind from the
`retrieval.searcher` config value ("exact" or "scann"); `options_from_config` reads the
optional `retrieval.scann` overrides. The defaults scale with the shard's size (~sqrt(N)
leaves, 10% of them searched), so each shard of a sharded index gets its own.

Mutable (incremental index versions): the searcher is built with ScaNN docids (the global doc
ids as strings, which ScaNN's `upsert`/`delete` require), so `upsert(embeddings, doc_ids)` and
`delete(doc_ids)` change a trained searcher in place without retraining its tree or codebooks
(new points are assigned to the nearest existing leaf and quantized with the existing
codebooks), and `rebalance()` retrains it from the points it holds (ScaNN: a full retrain with
the initial config). ScaNN's `delete` moves the last row into the freed slot, so `doc_ids` is
always read back from ScaNN's own docid list, in its row order.

`save`/`load` serialize a trained searcher (ScaNN's assets with relative paths, so the folder
can be moved or renamed): the index builder stores them in each shard of a version, and
trainers load them instead of re-training the tree (`index_format.py`).
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import numpy as np

from realm_jax.retrieval import searcher as searcher_lib

# Below this many rows a shard is searched brute force (still inside ScaNN): a tree over a few
# hundred points has leaves of a handful of points, and the matmul is already ~microseconds.
BRUTE_FORCE_BELOW = 2000
# Recommended ScaNN setting for MIPS: quantization error parallel to the datapoint is
# penalised more than orthogonal error, since only the parallel part changes inner products.
ANISOTROPIC_THRESHOLD = 0.2
_META = "realm_scann_searcher.json"
_DOC_IDS = "doc_ids.npy"
_ASSETS_DIR = "assets"  # ScaNN's own files (scann_assets.pbtxt, ...)


def default_num_leaves(num_docs: int) -> int:
  """~sqrt(N) partitions (ScaNN's rule of thumb: balances centroid scoring against leaf
  scanning), clipped to [1, 2000] and to >= ~50 points per leaf (ScaNN's min partition)."""
  return int(max(1, min(2000, round(math.sqrt(num_docs)), num_docs // 50)))


def default_num_leaves_to_search(num_leaves: int) -> int:
  """Search ~10% of the leaves: on clustered data (what trained embeddings look like) the true
  neighbours sit in few leaves, and 10% keeps recall@10 >= 0.95 in tests/benchmarks while
  scanning ~10x fewer codes than brute force. Override for a different speed/recall point."""
  return max(num_leaves // 10, 1)


def default_reorder(k: int) -> int:
  """Candidates re-scored exactly in float32 after AH: 10x k, at least 100. AH ranks are
  noisy only near the cut-off, so a 10x margin recovers nearly all true top-k."""
  return max(10 * k, 100)


class ScannSearcher:
  """ScaNN (tree + asymmetric hashing + exact re-ordering) MIPS over one in-memory shard.

  Args:
    embeddings: [N, D] float32 document embeddings of this shard.
    doc_ids: [N] int64 global ids of the rows (default: 0..N-1).
    num_leaves: tree partitions (default `default_num_leaves(N)`).
    num_leaves_to_search: partitions probed per query (default
      `default_num_leaves_to_search(num_leaves)`).
    reorder: candidates re-scored exactly per query (default `default_reorder(k)` at search
      time; a fixed value here overrides it for every k, raised to k if smaller).
    dims_per_block: dimensions per AH sub-space (2 -> D/2 4-bit codes per vector).
    training_sample_size: points used to train the tree and the codebooks (default
      min(N, 100_000)).
    reorder_dtype: how ScaNN stores the vectors it re-scores with (the shard's only copy of
      the embeddings): "float32" (exact re-scoring), "bfloat16" (half the bytes) or "int8"
      (a quarter; per-dimension fixed point). Recall cost: BENCHMARKS.md.
  """

  def __init__(self, embeddings: np.ndarray, doc_ids: np.ndarray | None = None,
               num_leaves: int | None = None, num_leaves_to_search: int | None = None,
               reorder: int | None = None, dims_per_block: int = 2,
               training_sample_size: int | None = None, reorder_dtype: str = "float32"):
    import scann  # pylint: disable=import-outside-toplevel  (optional heavy dependency)

    embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
    if embeddings.ndim != 2 or embeddings.shape[0] == 0:
      raise ValueError(f"embeddings must be [N, D] with N > 0, got shape {embeddings.shape}")
    self.num_docs, self.dim = embeddings.shape
    self.doc_ids = _check_doc_ids(doc_ids, self.num_docs)
    self.brute_force = self.num_docs < BRUTE_FORCE_BELOW
    self.reorder = reorder
    if reorder_dtype not in REORDER_DTYPES:
      raise ValueError(f"reorder_dtype {reorder_dtype!r} not in {REORDER_DTYPES}")
    from scann.scann_ops.py import scann_builder  # pylint: disable=import-outside-toplevel
    quantize = dict(float32=scann_builder.ReorderType.FLOAT32,
                    bfloat16=scann_builder.ReorderType.BFLOAT16,
                    int8=scann_builder.ReorderType.INT8)[reorder_dtype]
    builder = scann.scann_ops_pybind.builder(embeddings, 10, "dot_product")
    if self.brute_force:
      self.num_leaves = self.num_leaves_to_search = 0
      builder = builder.score_brute_force(quantize=quantize)
    else:
      self.num_leaves = int(num_leaves or default_num_leaves(self.num_docs))
      self.num_leaves_to_search = int(num_leaves_to_search
                                      or default_num_leaves_to_search(self.num_leaves))
      sample = int(min(self.num_docs, training_sample_size or 100_000))
      builder = (builder
                 .tree(num_leaves=self.num_leaves,
                       num_leaves_to_search=self.num_leaves_to_search,
                       training_sample_size=sample)
                 .score_ah(dims_per_block,
                           anisotropic_quantization_threshold=ANISOTROPIC_THRESHOLD,
                           training_sample_size=sample)
                 .reorder(reorder or default_reorder(10), quantize=quantize))
    self.params = dict(num_leaves=self.num_leaves,
                       num_leaves_to_search=self.num_leaves_to_search, reorder=reorder,
                       dims_per_block=dims_per_block, brute_force=self.brute_force,
                       reorder_dtype=reorder_dtype)
    self._scann = builder.build(docids=[str(i) for i in self.doc_ids.tolist()])

  def _sync(self):
    """num_docs and doc_ids from ScaNN's own docid list (its row order after mutations)."""
    if self._scann.docids is not None:
      self.doc_ids = np.asarray(self._scann.docids, dtype=np.int64).reshape(-1)
    self.num_docs = int(self._scann.size())

  def upsert(self, embeddings: np.ndarray, doc_ids: np.ndarray) -> None:
    """Adds (or replaces) the points of doc_ids [m] with embeddings [m, D], in place."""
    embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
    doc_ids = np.asarray(doc_ids, np.int64).reshape(-1)
    if embeddings.shape != (len(doc_ids), self.dim):
      raise ValueError(f"upsert: embeddings {embeddings.shape} for {len(doc_ids)} ids of dim "
                       f"{self.dim}")
    if self._scann.docids is None:
      raise ValueError("this ScaNN searcher was saved without docids (an older version): it "
                       "cannot be updated, rebuild it")
    if len(doc_ids):
      self._scann.upsert([str(i) for i in doc_ids.tolist()], embeddings,
                         batch_size=min(len(doc_ids), 1024))
    self._sync()

  def delete(self, doc_ids: np.ndarray) -> None:
    """Removes the points of doc_ids [m] (each must be in the searcher), in place."""
    doc_ids = np.asarray(doc_ids, np.int64).reshape(-1)
    if self._scann.docids is None:
      raise ValueError("this ScaNN searcher was saved without docids: it cannot be updated")
    missing = doc_ids[~np.isin(doc_ids, self.doc_ids)]  # (setdiff1d: ~1 s at 1M rows)
    if missing.size:
      raise KeyError(f"delete: doc ids not in this shard: {missing[:5].tolist()}")
    if len(doc_ids):
      self._scann.delete([str(i) for i in doc_ids.tolist()])
    self._sync()

  def rebalance(self) -> None:
    """Retrains the partitioning from the points held now (after many updates)."""
    if not self.brute_force:
      self._scann.rebalance()
    self._sync()

  def search(self, query_emb: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """[B, D] -> (global doc ids [B, min(k, N)] int64, scores [B, min(k, N)] float32)."""
    query_emb = np.ascontiguousarray(query_emb, dtype=np.float32)
    if query_emb.ndim != 2 or query_emb.shape[1] != self.dim:
      raise ValueError(f"query_emb must be [B, {self.dim}], got {query_emb.shape}")
    k = min(int(k), self.num_docs)  # ScaNN pads with NaN beyond N; ExactSearcher clips
    if k < 1:
      raise ValueError(f"k must be >= 1, got {k}")
    if self.brute_force:
      rows, scores = self._scann.search_batched_parallel(query_emb, final_num_neighbors=k)
    else:
      rows, scores = self._scann.search_batched_parallel(
          query_emb, final_num_neighbors=k,
          pre_reorder_num_neighbors=max(k, self.reorder or default_reorder(k)),
          leaves_to_search=self.num_leaves_to_search)
    if self._scann.docids is not None:  # ScaNN returned the docids (strings)
      ids = np.asarray(rows).astype(np.int64).reshape(len(query_emb), -1)
    else:
      ids = self.doc_ids[np.asarray(rows, dtype=np.int64)]
    return ids, np.asarray(scores, dtype=np.float32)

  def save(self, directory: str | os.PathLike[str]) -> None:
    """Writes ScaNN's assets (`serialize`, relative paths) + doc ids + params to `directory`.

    Local paths only (ScaNN reads and writes through the local filesystem): copy the folder
    to/from `gs://` around this call (`index_format` does). With relative paths in
    `assets/scann_assets.pbtxt` the folder loads from wherever it is moved to.
    """
    directory = os.fspath(directory)
    scann_dir = os.path.join(directory, _ASSETS_DIR)
    os.makedirs(scann_dir, exist_ok=True)
    self._scann.serialize(scann_dir, relative_path=True)
    np.save(os.path.join(directory, _DOC_IDS), self.doc_ids)
    meta = dict(self.params, num_docs=self.num_docs, dim=self.dim)
    with open(os.path.join(directory, _META), "w") as f:
      json.dump(meta, f, indent=2)

  @classmethod
  def load(cls, directory: str | os.PathLike[str]) -> "ScannSearcher":
    """Reads what `save` wrote (local paths only) without retraining."""
    import scann  # pylint: disable=import-outside-toplevel

    directory = os.fspath(directory)
    with open(os.path.join(directory, _META)) as f:
      meta: dict[str, Any] = json.load(f)
    self = cls.__new__(cls)
    self.num_docs, self.dim = int(meta["num_docs"]), int(meta["dim"])
    self.doc_ids = _check_doc_ids(np.load(os.path.join(directory, _DOC_IDS)), self.num_docs)
    self.brute_force = bool(meta["brute_force"])
    self.num_leaves = int(meta["num_leaves"])
    self.num_leaves_to_search = int(meta["num_leaves_to_search"])
    self.reorder = meta["reorder"]
    self.params = {key: meta[key] for key in ("num_leaves", "num_leaves_to_search", "reorder",
                                              "dims_per_block", "brute_force")}
    self.params["reorder_dtype"] = meta.get("reorder_dtype", "float32")
    self._scann = scann.scann_ops_pybind.load_searcher(os.path.join(directory, _ASSETS_DIR))
    if self._scann.docids is not None and not np.array_equal(
        np.asarray(self._scann.docids, np.int64), self.doc_ids):
      raise ValueError(f"{directory}: ScaNN's docids differ from {_DOC_IDS}")
    return self


def _check_doc_ids(doc_ids: np.ndarray | None, num_docs: int) -> np.ndarray:
  doc_ids = (np.arange(num_docs, dtype=np.int64) if doc_ids is None
             else np.asarray(doc_ids, dtype=np.int64))
  if doc_ids.shape != (num_docs,):
    raise ValueError(f"doc_ids shape {doc_ids.shape} does not match {num_docs} embeddings")
  return doc_ids


SEARCHER_KINDS = ("exact", "scann")
REORDER_DTYPES = ("float32", "bfloat16", "int8")
# `ScannSearcher` arguments that `retrieval.scann` may override (unset/0: scaled to the shard).
OPTION_KEYS = ("num_leaves", "num_leaves_to_search", "reorder", "dims_per_block",
               "training_sample_size", "reorder_dtype")


def options_from_config(retrieval_config) -> dict[str, int]:
  """The set ScaNN overrides of `retrieval.scann` (a dict or ConfigDict; absent: {}).

  Unset (None/0) fields are left out, so `ScannSearcher` scales them to each shard's size.
  """
  scann_config = retrieval_config.get("scann", None) if retrieval_config is not None else None
  if not scann_config:
    return {}
  scann_config = dict(scann_config)
  unknown = sorted(set(scann_config) - set(OPTION_KEYS))
  if unknown:
    raise ValueError(f"unknown retrieval.scann fields {unknown}; known: {list(OPTION_KEYS)}")
  return {key: (str(value) if key == "reorder_dtype" else int(value))
          for key, value in scann_config.items()
          if value and not (key == "reorder_dtype" and value == "float32")}


# The file of a serialized ScaNN searcher holding the vectors it re-scores with, per
# reorder_dtype (what `index_format` checks for finiteness: the shard's only copy).
REORDER_FILES = dict(float32="dataset.npy", bfloat16="bfloat16_dataset.npy",
                     int8="int8_dataset.npy")


def make_searcher(kind: str, embeddings: np.ndarray, doc_ids: np.ndarray | None = None,
                  **options: Any) -> searcher_lib.Searcher:
  """Builds the searcher named by `retrieval.searcher` ("exact" or "scann") over one shard.

  `options` go to `ScannSearcher` (num_leaves, num_leaves_to_search, reorder, ...); the exact
  searcher takes none.
  """
  if kind == "exact":
    if options:
      raise ValueError(f"the exact searcher takes no options, got {sorted(options)}")
    return searcher_lib.ExactSearcher(embeddings, doc_ids)
  if kind == "scann":
    return ScannSearcher(embeddings, doc_ids, **options)
  raise ValueError(f"unknown retrieval.searcher {kind!r}; expected one of {SEARCHER_KINDS}")
