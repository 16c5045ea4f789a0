"""MIPS on the accelerators: the index table sharded row-wise over the mesh, searched in jit.

`retrieval.searcher="device"`. The index version's embeddings [N, D] (float32 or bfloat16,
`retrieval.device.dtype`) are padded to a multiple of the `data` axis size S and placed as
[S * R, D] with rows split over `data` (R = ceil(N / S) rows per device). One jitted
`shard_map` searches a batch of queries:

  1. the batch-sharded queries [B, D] are all-gathered (every device needs every query);
  2. each device scores its R rows: [B, R] float32 (bf16 tables: bf16 inputs, f32 accumulate),
     padding rows (global row >= N) set to -inf so they can never be returned;
  3. local top-k' per device, k' = min(k, R): `jax.lax.approx_max_k` with
     `retrieval.device.recall_target` and `reduction_input_size_override = S * R` (the recall
     target then holds for the whole table, not per shard) on TPU, exact `jax.lax.top_k`
     elsewhere (`top_k="auto"`; "approx"/"exact" force one; XLA lowers approx_max_k to an
     exact sort-based top-k on CPU and GPU, so "approx" there is exact too);
  4. an all_to_all hands each device the S * k' candidates (scores and global row numbers)
     of its own B / S queries from every shard, merged exactly with `jax.lax.top_k`, so the
     result [B, k] is batch-sharded like the queries.

Only the [B, k] row numbers leave the devices; they map to doc ids on the host
(`doc_ids[rows]`), where `candidates.assemble_candidates` drops the source document and puts
the null document in slot 0, exactly as for the host searchers (`retrieve_on_device`).

Ties: `jax.lax.top_k` puts the lower index first among equal scores, and the merge sees the
shards in order, so equal scores come back in ascending row order (numpy's argpartition in
`searcher.top_k` makes no such promise; the tests use continuous random data, where exact
ties do not occur).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from realm_jax.retrieval import candidates as candidates_lib
from realm_jax.train import partitioning

DTYPES = ("float32", "bfloat16")
TOP_K_MODES = ("auto", "exact", "approx")
OPTION_KEYS = ("dtype", "top_k", "recall_target")


def use_approx(mode: str, platform: str) -> bool:
  """Whether the local top-k is `approx_max_k`: "auto" means on TPU only."""
  if mode not in TOP_K_MODES:
    raise ValueError(f"retrieval.device.top_k={mode!r}; expected one of {TOP_K_MODES}")
  return mode == "approx" or (mode == "auto" and platform == "tpu")


def local_top_k(scores: jax.Array, k: int, approx: bool, recall_target: float,
                total_rows: int) -> tuple[jax.Array, jax.Array]:
  """[B, R] scores of one shard -> (values [B, k], local column [B, k] int32), best first."""
  if approx:
    return jax.lax.approx_max_k(scores, k, recall_target=recall_target,
                                reduction_input_size_override=total_rows,
                                aggregate_to_topk=True)
  return jax.lax.top_k(scores, k)


def _exchange_candidates(values, rows, axis: str, shards: int, me, use_all_to_all: bool):
  """[B, k'] candidates of this shard -> the S * k' candidates of this device's B/S queries
  from every shard, [B/S, S*k'] each, in shard order.

  approx_max_k (TPU): an all_to_all (each device receives B*k' entries). Exact top_k: an
  all_gather of every shard's [B, k'] then this device's rows (S times the bytes, B*k'*S
  entries, tiny next to the table): XLA CPU splits an all_to_all into per-peer row slices
  [B/S, k'] and merges them with top_k's [0:B, 0:k'] slice of the sorted scores; the sort's
  users then no longer match XLA's TopkRewriter and the local top-k of [B, R] stays a full
  stable sort (8.7x slower at 20k rows on 8 devices: BENCHMARKS.md).
  """
  if use_all_to_all:
    exchange = lambda x: jax.lax.all_to_all(x, axis, split_axis=0, concat_axis=1, tiled=True)
    return exchange(values), exchange(rows)
  per_device = values.shape[0] // shards

  def gather(x):  # [B, k'] -> all shards' [S, B, k'] -> own rows [B/S, S*k']
    mine = jax.lax.dynamic_slice_in_dim(jax.lax.all_gather(x, axis), me * per_device,
                                        per_device, axis=1)  # [S, B/S, k']
    return jnp.transpose(mine, (1, 0, 2)).reshape(per_device, -1)
  return gather(values), gather(rows)


def _search_shard(queries, table, *, k: int, num_rows: int, approx: bool,
                  recall_target: float):
  """Body of the shard_map: queries [B/S, D], table [R, D] -> rows, scores [B/S, k]."""
  axis = partitioning.DATA_AXIS
  shards = jax.lax.axis_size(axis)
  me = jax.lax.axis_index(axis)
  rows_per_shard = table.shape[0]
  all_queries = jax.lax.all_gather(queries, axis, tiled=True)  # [B, D]
  scores = jax.lax.dot_general(all_queries.astype(table.dtype), table,
                               (((1,), (1,)), ((), ())),
                               precision=jax.lax.Precision.HIGHEST,
                               preferred_element_type=jnp.float32)  # [B, R]
  rows = me * rows_per_shard + jnp.arange(rows_per_shard, dtype=jnp.int32)  # [R] global
  scores = jnp.where(rows[None, :] < num_rows, scores, -jnp.inf)  # padding never wins
  k_local = min(k, rows_per_shard)
  values, cols = local_top_k(scores, k_local, approx, recall_target,
                             rows_per_shard * shards)  # [B, k']
  global_rows = cols.astype(jnp.int32) + me * rows_per_shard
  all_values, all_rows = _exchange_candidates(values, global_rows, axis, shards, me,
                                              use_all_to_all=approx)  # [B/S, S*k']
  best, pos = jax.lax.top_k(all_values, k)
  return jnp.take_along_axis(all_rows, pos, axis=1), best


@functools.lru_cache(maxsize=64)
def _compiled_search(mesh: Mesh, k: int, num_rows: int, approx: bool, recall_target: float):
  """The jitted search for one (mesh, k, table size, mode): queries, table -> rows, scores."""
  body = functools.partial(_search_shard, k=k, num_rows=num_rows, approx=approx,
                           recall_target=recall_target)
  spec = P(partitioning.DATA_AXIS)
  mapped = jax.shard_map(body, mesh=mesh, in_specs=(spec, P(partitioning.DATA_AXIS, None)),
                         out_specs=(spec, spec), check_vma=False)
  sharding = NamedSharding(mesh, spec)
  return jax.jit(mapped, out_shardings=(sharding, sharding))


class DeviceSearcher:
  """Exact (or approx_max_k) MIPS over a table held on the mesh's devices.

  Args:
    embeddings: [N, D] document embeddings (host array; float32 on disk).
    doc_ids: [N] global ids of the rows (default 0..N-1).
    mesh: the trainer's mesh; rows are split over its `data` axis.
    dtype: "float32" or "bfloat16" table (queries are cast to it; scores accumulate in f32).
    top_k: "auto" (approx_max_k on TPU, exact top_k elsewhere), "exact" or "approx".
    recall_target: approx_max_k's recall target (ignored by exact top_k).
  """

  def __init__(self, embeddings: np.ndarray, doc_ids: np.ndarray | None = None,
               mesh: Mesh | None = None, dtype: str = "float32", top_k: str = "auto",
               recall_target: float = 0.95):
    embeddings = np.asarray(embeddings)
    if embeddings.ndim != 2 or embeddings.shape[0] == 0:
      raise ValueError(f"embeddings must be [N, D] with N > 0, got shape {embeddings.shape}")
    if dtype not in DTYPES:
      raise ValueError(f"retrieval.device.dtype={dtype!r}; expected one of {DTYPES}")
    if not 0.0 < recall_target <= 1.0:
      raise ValueError(f"retrieval.device.recall_target={recall_target} not in (0, 1]")
    self.mesh = mesh if mesh is not None else partitioning.make_mesh([("data", -1)])
    self.num_docs, self.dim = embeddings.shape
    self.doc_ids = (np.arange(self.num_docs, dtype=np.int64) if doc_ids is None
                    else np.asarray(doc_ids, dtype=np.int64))  # [N]
    if self.doc_ids.shape != (self.num_docs,):
      raise ValueError(f"doc_ids shape {self.doc_ids.shape} does not match {self.num_docs} "
                       "embeddings")
    self.dtype, self.recall_target = dtype, float(recall_target)
    self.approx = use_approx(top_k, self.mesh.devices.flat[0].platform)
    self.params = dict(dtype=dtype, top_k=top_k, approx=self.approx,
                       recall_target=self.recall_target)
    self.shards = partitioning.data_parallel_size(self.mesh)
    self.rows_per_shard = -(-self.num_docs // self.shards)
    self.table = place_table(embeddings, self.mesh, self.rows_per_shard * self.shards,
                             jnp.dtype(dtype))  # [S * R, D] on the devices

  @property
  def table_bytes_per_device(self) -> int:
    return self.rows_per_shard * self.dim * jnp.dtype(self.dtype).itemsize

  def block_until_ready(self) -> "DeviceSearcher":
    """Waits for the table's transfer (call off the training thread before a swap)."""
    self.table.block_until_ready()
    return self

  def search_device(self, query_emb: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """Batch-sharded queries [B, D] on the mesh -> (rows [B, k'] int32, scores [B, k'] f32)
    on the devices, batch-sharded; k' = min(k, N). Rows index `doc_ids`. Asynchronous."""
    if query_emb.ndim != 2 or query_emb.shape[1] != self.dim:
      raise ValueError(f"query_emb must be [B, {self.dim}], got {query_emb.shape}")
    k = min(int(k), self.num_docs)
    if k < 1:
      raise ValueError(f"k must be >= 1, got {k}")
    fn = _compiled_search(self.mesh, k, self.num_docs, self.approx, self.recall_target)
    return fn(query_emb, self.table)

  def search(self, query_emb: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The host protocol of `searcher.Searcher`: [B, D] -> (doc ids, scores) [B, min(k, N)].

    Pads B to a multiple of the `data` size with zero queries (cut off again after)."""
    query_emb = np.asarray(query_emb, dtype=np.float32)
    if query_emb.ndim != 2 or query_emb.shape[1] != self.dim:
      raise ValueError(f"query_emb must be [B, {self.dim}], got {query_emb.shape}")
    batch = len(query_emb)
    padded = -(-max(batch, 1) // self.shards) * self.shards
    queries = np.zeros((padded, self.dim), np.float32)
    queries[:batch] = query_emb
    device_queries = partitioning.shard_batch_global({"q": queries}, self.mesh)["q"]
    rows, scores = self.search_device(device_queries, k)
    rows = partitioning.to_host(rows)[:batch]
    return self.doc_ids[rows], partitioning.to_host(scores)[:batch]


def place_table(embeddings: np.ndarray, mesh: Mesh, padded_rows: int,
                dtype: Any) -> jax.Array:
  """[N, D] host rows -> [padded_rows, D] on the mesh, rows split over `data`; zero padding.

  Each device's block is built from the host array on its own (multi-host safe: every process
  holds the whole version, as `index_format.load_index` gives it)."""
  num_docs, dim = embeddings.shape
  sharding = NamedSharding(mesh, P(partitioning.DATA_AXIS, None))

  def block(index):
    rows = index[0]
    start, stop = rows.start or 0, padded_rows if rows.stop is None else rows.stop
    out = np.zeros((stop - start, dim), dtype)
    real = max(0, min(stop, num_docs) - start)
    out[:real] = embeddings[start:start + real]
    return out

  return jax.make_array_from_callback((padded_rows, dim), sharding, block)


def options_from_config(retrieval_config) -> dict[str, Any]:
  """`retrieval.device` as DeviceSearcher keyword arguments (absent: the defaults)."""
  device = retrieval_config.get("device", None) if retrieval_config is not None else None
  if not device:
    return {}
  device = dict(device)
  unknown = sorted(set(device) - set(OPTION_KEYS))
  if unknown:
    raise ValueError(f"unknown retrieval.device fields {unknown}; known: {list(OPTION_KEYS)}")
  return device


def from_searcher(searcher, mesh: Mesh, **options) -> DeviceSearcher:
  """A DeviceSearcher over what `index_format.load_index` gave (exact shards, whose rows and
  global ids it concatenates): the watcher's and the resume path's conversion."""
  if isinstance(searcher, DeviceSearcher):
    return searcher
  shards = getattr(searcher, "shards", [searcher])
  missing = [type(s).__name__ for s in shards if not hasattr(s, "embeddings")]
  if missing:
    raise ValueError(f"searcher=device needs the version's embeddings; shards {missing} have "
                     "none (publish the version with the exact searcher)")
  embeddings = np.concatenate([s.embeddings for s in shards], axis=0)
  doc_ids = np.concatenate([s.doc_ids for s in shards], axis=0)
  return DeviceSearcher(embeddings, doc_ids, mesh=mesh, **options)


@dataclasses.dataclass(frozen=True)
class PendingSearch:
  """A device search in flight: the searcher that ran it and its rows [B, R] on the mesh."""

  searcher: DeviceSearcher
  rows: jax.Array


def start_retrieval(searcher: DeviceSearcher, query_emb: jax.Array, k: int,
                    margin: int) -> PendingSearch:
  """Dispatches the search for k - 1 + margin ids of batch-sharded queries (no host sync)."""
  return PendingSearch(searcher, searcher.search_device(query_emb, k - 1 + margin)[0])


def finish_retrieval(pending: PendingSearch, source_ids: np.ndarray, k: int,
                     null_id: int) -> tuple[np.ndarray, np.ndarray]:
  """This process's [B_local, R] ids to the host, then the usual assembly: ids, mask [B, k]."""
  rows = partitioning.local_rows(pending.rows)
  return candidates_lib.assemble_candidates(pending.searcher.doc_ids[rows], source_ids, k,
                                            null_id)


def prepare_for_swap(searcher, mesh: Mesh, **options) -> DeviceSearcher:
  """The watcher's `prepare` hook: the loaded version's table placed on the devices and
  waited for, all on the watcher's thread, so the swap between two steps is a reference."""
  return from_searcher(searcher, mesh, **options).block_until_ready()
