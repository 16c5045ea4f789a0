"""Everything about device layout in one place (t5x-style): mesh, shardings, batch assembly.

Data parallelism is `jax.jit` over a `Mesh` with the batch sharded on `data` and parameters
replicated: what `pmap` did, in its current form. The mesh axes use `AxisType.Auto`, so XLA
inserts the collectives (gradient all-reduce, ICT's all-gather of in-batch negatives).
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(mesh_axes: Sequence[tuple[str, int]], devices=None) -> Mesh:
  """Builds a mesh from config, e.g. `[("data", -1)]`; one -1 takes the remaining devices."""
  devices = list(jax.devices() if devices is None else devices)
  names = [str(name) for name, _ in mesh_axes]
  sizes = [int(size) for _, size in mesh_axes]
  if DATA_AXIS not in names:
    raise ValueError(f"config.mesh={list(mesh_axes)} needs a {DATA_AXIS!r} axis")
  if sizes.count(-1) > 1:
    raise ValueError(f"config.mesh={list(mesh_axes)}: at most one axis may be -1")
  known = math.prod(s for s in sizes if s != -1)
  if known <= 0 or len(devices) % known:
    raise ValueError(f"config.mesh={list(mesh_axes)} does not fit {len(devices)} devices")
  sizes = [len(devices) // known if s == -1 else s for s in sizes]
  total = math.prod(sizes)
  if total > len(devices):
    raise ValueError(
        f"config.mesh={list(mesh_axes)} needs {total} devices, only {len(devices)} exist")
  return jax.make_mesh(sizes, names, axis_types=(jax.sharding.AxisType.Auto,) * len(names),
                       devices=devices[:total])


def data_parallel_size(mesh: Mesh) -> int:
  return mesh.shape[DATA_AXIS]


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over `data`, the rest replicated."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicate(tree, mesh: Mesh):
  """Places a pytree (parameters, optimizer state) on every device of the mesh."""
  return jax.device_put(tree, replicated(mesh))


def shard_batch(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles global arrays from this process's slice of the batch (multi-host safe)."""
  sharding = batch_sharded(mesh)
  return {name: jax.make_array_from_process_local_data(sharding, np.asarray(value))
          for name, value in batch.items()}


def describe(mesh: Mesh) -> str:
  """One line for the start-up log: hosts, devices and the mesh."""
  return (f"{jax.process_count()} process(es), {jax.device_count()} device(s) "
          f"[{jax.devices()[0].platform}], this process {jax.process_index()} with "
          f"{jax.local_device_count()} local; mesh {dict(mesh.shape)}")


def shard_batch_global(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Like `shard_batch`, for arrays every process holds in full (e.g. corpus rows)."""
  sharding = batch_sharded(mesh)
  return {name: jax.make_array_from_callback(value.shape, sharding,
                                             lambda index, v=value: v[index])
          for name, value in batch.items()}


def to_host(x: jax.Array) -> np.ndarray:
  """The whole (global) array on this host, gathering from other processes if needed."""
  if x.is_fully_addressable:
    return np.asarray(x)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def local_rows(x: jax.Array) -> np.ndarray:
  """This process's rows of a batch-sharded array, in order (the inverse of `shard_batch`)."""
  if x.is_fully_addressable:
    return np.asarray(x)
  shards = {s.index[0].start or 0: s.data for s in x.addressable_shards}
  return np.concatenate([np.asarray(shards[start]) for start in sorted(shards)], axis=0)
