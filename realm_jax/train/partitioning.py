"""Everything about device layout in one place (t5x-style): mesh, shardings, batch assembly.

Data parallelism is `jax.jit` over a `Mesh` with the batch sharded on `data` and parameters
replicated: what `pmap` did, in its current form. The mesh axes use `AxisType.Auto`, so XLA
inserts the collectives (gradient all-reduce, ICT's all-gather of in-batch negatives).

Fully sharded data parallelism (FSDP, ZeRO-3): a mesh with an `fsdp` axis, e.g.
`config.mesh = [("data", 2), ("fsdp", 4)]`, splits the batch over `data` x `fsdp` together
(8 batch shards here, as with `[("data", 8)]`) and shards each large parameter, and its Adam
moments, over `fsdp` (`state_shardings`); XLA all-gathers a weight where it is used and
reduce-scatters its gradient. The rules are `config.partitioning.rules`: (regex, strategy)
pairs, the first whose regex `re.search`es the leaf's path in the train state wins:
  "fsdp":      split the leaf's largest dimension divisible by the fsdp size over `fsdp`, if
               it has >= `config.partitioning.fsdp_min_size` elements (else replicated);
  "replicate": a copy on every device.
Paths read like `params/encoder/bert/embeddings/word_embeddings/embedding` and
`opt_state/1/inner_states/lr_x1.0/inner_state/0/mu/encoder/...`, so an unanchored rule written
for a parameter also places its optimizer moments. A leaf no rule matches is replicated.
Without an `fsdp` axis (or with fsdp size 1) everything is replicated: the default
`[("data", -1)]` is plain data parallelism, unchanged.
"""

from __future__ import annotations

import math
import re
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
MESH_AXES = (DATA_AXIS, FSDP_AXIS)  # the axis names a config.mesh may use
BATCH_AXES = (DATA_AXIS, FSDP_AXIS)  # the batch dimension is split over these together

FSDP, REPLICATE = "fsdp", "replicate"
STRATEGIES = (FSDP, REPLICATE)
DEFAULT_RULES = ((".*", FSDP),)
# Below this many elements a leaf stays replicated under "fsdp": gathering a LayerNorm scale or
# a bias costs a collective's latency and saves almost nothing.
DEFAULT_FSDP_MIN_SIZE = 4096


def make_mesh(mesh_axes: Sequence[tuple[str, int]], devices=None) -> Mesh:
  """Builds a mesh from config, e.g. `[("data", -1)]`; one -1 takes the remaining devices."""
  devices = list(jax.devices() if devices is None else devices)
  names = [str(name) for name, _ in mesh_axes]
  sizes = [int(size) for _, size in mesh_axes]
  if DATA_AXIS not in names:
    raise ValueError(f"config.mesh={list(mesh_axes)} needs a {DATA_AXIS!r} axis")
  unknown = [name for name in names if name not in MESH_AXES]
  if unknown:
    raise ValueError(f"config.mesh={list(mesh_axes)}: unknown axis name(s) {unknown}; the "
                     f"axes are {list(MESH_AXES)}")
  if len(set(names)) != len(names):
    raise ValueError(f"config.mesh={list(mesh_axes)} names an axis twice")
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


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
  """The mesh axes the batch dimension is split over, in mesh order (`data`, with `fsdp`)."""
  return tuple(name for name in mesh.axis_names if name in BATCH_AXES)


def data_parallel_size(mesh: Mesh) -> int:
  """How many shards a batch is split into: the product of the `data` and `fsdp` sizes (the
  number every batch size must be divisible by)."""
  return math.prod(mesh.shape[name] for name in batch_axes(mesh))


def fsdp_size(mesh: Mesh) -> int:
  """How many ways `fsdp` parameters are split (1 without an `fsdp` axis)."""
  return mesh.shape.get(FSDP_AXIS, 1)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over `data` (x `fsdp`), the rest replicated."""
  axes = batch_axes(mesh)
  return NamedSharding(mesh, P(axes[0] if len(axes) == 1 else axes))


def replicate(tree, mesh: Mesh):
  """Places a pytree (parameters, optimizer state) on every device of the mesh."""
  return jax.device_put(tree, replicated(mesh))


# ---- Parameter and optimizer-state layout ------------------------------------------------

def parse_rules(rules, field: str = "partitioning.rules") -> tuple[tuple[re.Pattern, str], ...]:
  """Checks config rules [(regex, strategy)] -> compiled; ValueError naming `field`."""
  parsed = []
  for rule in rules:
    if isinstance(rule, str) or len(rule) != 2:
      raise ValueError(f"{field}: {rule!r} is not a (regex, strategy) pair")
    pattern, strategy = rule
    if strategy not in STRATEGIES:
      raise ValueError(f"{field}: strategy {strategy!r} of {pattern!r} is not one of "
                       f"{list(STRATEGIES)}")
    try:
      parsed.append((re.compile(pattern if isinstance(pattern, re.Pattern) else str(pattern)),
                     strategy))
    except re.error as e:
      raise ValueError(f"{field}: {pattern!r} is not a regular expression ({e})") from e
  return tuple(parsed)


def rules_from_config(config) -> tuple[tuple[tuple[re.Pattern, str], ...], int]:
  """(parsed rules, fsdp_min_size) of `config.partitioning`, defaults where absent."""
  section = config.get("partitioning") or {}
  min_size = section.get("fsdp_min_size", DEFAULT_FSDP_MIN_SIZE)
  if isinstance(min_size, bool) or not isinstance(min_size, int) or min_size < 0:
    raise ValueError(f"partitioning.fsdp_min_size={min_size!r} must be an integer >= 0")
  return parse_rules(section.get("rules", DEFAULT_RULES)), min_size


def leaf_spec(path: str, shape: Sequence[int], num_shards: int, rules, min_size: int) -> P:
  """The PartitionSpec of one state leaf under `rules` (see the module docstring)."""
  strategy = next((s for pattern, s in rules if pattern.search(path)), REPLICATE)
  if strategy == REPLICATE or num_shards <= 1 or math.prod(shape) < max(min_size, 1):
    return P()
  divisible = [d for d, size in enumerate(shape) if size % num_shards == 0]
  if not divisible:
    return P()
  dim = max(divisible, key=lambda d: (shape[d], -d))  # the largest; the first on a tie
  return P(*[FSDP_AXIS if d == dim else None for d in range(len(shape))])


def path_name(key_path) -> str:
  """`params/encoder/...`: the name rules match against."""
  return jax.tree_util.keystr(key_path, simple=True, separator="/")


def state_shardings(abstract_state: Any, mesh: Mesh, rules=DEFAULT_RULES,
                    min_size: int = DEFAULT_FSDP_MIN_SIZE) -> Any:
  """The NamedSharding of every leaf of `abstract_state` (arrays or ShapeDtypeStructs), as
  a pytree of the same structure: `fsdp`-sharded or replicated by `rules`."""
  rules, n = parse_rules(rules), fsdp_size(mesh)
  return jax.tree_util.tree_map_with_path(
      lambda path, leaf: NamedSharding(mesh, leaf_spec(path_name(path), np.shape(leaf), n,
                                                       rules, min_size)), abstract_state)


def state_shardings_from_config(abstract_state: Any, mesh: Mesh, config) -> Any:
  """`state_shardings` with `config.partitioning`'s rules."""
  rules, min_size = rules_from_config(config)
  return state_shardings(abstract_state, mesh, rules, min_size)


def layout_key(shardings: Any) -> tuple:
  """A hashable summary of a sharding pytree (structure and each leaf's spec), for caches of
  jitted functions built for one layout."""
  leaves, treedef = jax.tree_util.tree_flatten(shardings)
  return (treedef, tuple(s.spec for s in leaves))


def with_shardings(abstract_state: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs carrying `shardings` (orbax restore targets, AOT compiles)."""
  return jax.tree_util.tree_map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state,
      shardings)


def bytes_per_device(abstract_state: Any, shardings: Any) -> int:
  """The bytes of `abstract_state` one device holds under `shardings` (the largest shard of
  each leaf; shards of a NamedSharding are equal or replicas)."""
  sizes = jax.tree_util.tree_map(
      lambda a, s: math.prod(s.shard_shape(a.shape)) * np.dtype(a.dtype).itemsize,
      abstract_state, shardings)
  return int(sum(jax.tree_util.tree_leaves(sizes)))


def describe_state_layout(abstract_state: Any, shardings: Any, mesh: Mesh) -> str:
  """One line for the start-up log: per-device parameter + optimizer-state bytes under this
  layout, and what a replicated layout would hold."""
  ours = bytes_per_device(abstract_state, shardings)
  full = bytes_per_device(abstract_state, jax.tree_util.tree_map(
      lambda _: replicated(mesh), abstract_state))
  sharded = sum(1 for s in jax.tree_util.tree_leaves(shardings) if not s.is_fully_replicated)
  return (f"{ours / 2**20:.2f} MiB of parameters + optimizer state per device (fsdp="
          f"{fsdp_size(mesh)}, {sharded} of {len(jax.tree_util.tree_leaves(shardings))} "
          f"leaves sharded; replicated: {full / 2**20:.2f} MiB)")


# ---- Batches -----------------------------------------------------------------------------

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
