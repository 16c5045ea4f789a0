"""Mesh construction from config and batch assembly/disassembly (8 fake CPU devices)."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from realm_jax.train import partitioning


def test_conftest_gives_eight_devices():
  assert jax.device_count() == 8


def test_data_minus_one_uses_all_devices():
  mesh = partitioning.make_mesh([("data", -1)])
  assert dict(mesh.shape) == {"data": 8}
  assert partitioning.data_parallel_size(mesh) == 8
  assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in jax.devices())


def test_fixed_data_size_uses_that_many_devices():
  mesh = partitioning.make_mesh([("data", 2)])
  assert dict(mesh.shape) == {"data": 2}
  assert mesh.devices.size == 2
  assert partitioning.data_parallel_size(mesh) == 2


def test_explicit_device_list_and_two_axes():
  mesh = partitioning.make_mesh([("data", -1)], jax.devices()[:1])
  assert dict(mesh.shape) == {"data": 1} and list(mesh.devices.flat) == [jax.devices()[0]]
  mesh = partitioning.make_mesh([("data", -1), ("fsdp", 2)])
  assert dict(mesh.shape) == {"data": 4, "fsdp": 2}
  mesh = partitioning.make_mesh([("data", 2), ("fsdp", 2)])
  assert mesh.devices.size == 4


@pytest.mark.parametrize("axes", [
    [("fsdp", -1)],                  # no data axis
    [("data", -1), ("fsdp", -1)],    # two -1
    [("data", 3)],                   # does not divide 8
    [("data", 16)],                  # more than exist
    [("data", 0)],
    [("data", -2)],
    [("data", -1), ("fsdp", 3)],
    [("data", 2), ("model", 4)],     # unknown axis name
    [("data", 2), ("data", 4)],      # an axis twice
])
def test_bad_meshes_raise_naming_config_mesh(axes):
  with pytest.raises(ValueError, match=r"config\.mesh"):
    partitioning.make_mesh(axes)


def _batch(rows):
  rng = np.random.default_rng(0)
  return {"tokens": rng.integers(0, 100, (rows, 5)).astype(np.int32),
          "mask": rng.random((rows, 3, 2)) < 0.5,
          "weights": rng.random(rows).astype(np.float32)}


@pytest.mark.parametrize("size", [-1, 2])
def test_shard_batch_and_local_rows_round_trip(size):
  mesh = partitioning.make_mesh([("data", size)])
  n = partitioning.data_parallel_size(mesh)
  batch = _batch(16)
  sharded = partitioning.shard_batch(batch, mesh)
  assert set(sharded) == set(batch)
  for name, value in batch.items():
    x = sharded[name]
    assert x.shape == value.shape and x.dtype == value.dtype
    assert x.sharding.is_equivalent_to(partitioning.batch_sharded(mesh), x.ndim)
    # Each device holds its contiguous block of rows, the rest of the dims whole.
    per_device = 16 // n
    assert len(x.addressable_shards) == n
    for shard in x.addressable_shards:
      start = shard.index[0].start or 0
      assert shard.data.shape == (per_device,) + value.shape[1:]
      np.testing.assert_array_equal(np.asarray(shard.data), value[start:start + per_device])
    np.testing.assert_array_equal(partitioning.local_rows(x), value)


def test_shard_batch_rejects_rows_not_divisible_by_devices():
  mesh = partitioning.make_mesh([("data", -1)])
  with pytest.raises(Exception):
    partitioning.shard_batch({"t": np.zeros((12, 2), np.int32)}, mesh)


@pytest.mark.parametrize("size", [-1, 2])
def test_shard_batch_global_and_to_host_round_trip(size):
  mesh = partitioning.make_mesh([("data", size)])
  batch = _batch(24)
  sharded = partitioning.shard_batch_global(batch, mesh)
  for name, value in batch.items():
    x = sharded[name]
    assert x.shape == value.shape and x.dtype == value.dtype
    assert x.sharding.is_equivalent_to(partitioning.batch_sharded(mesh), x.ndim)
    np.testing.assert_array_equal(partitioning.to_host(x), value)
    np.testing.assert_array_equal(partitioning.local_rows(x), value)


def test_replicate_puts_a_copy_on_every_device():
  mesh = partitioning.make_mesh([("data", -1)])
  tree = {"w": np.arange(6.0).reshape(2, 3), "b": np.ones(3)}
  out = partitioning.replicate(tree, mesh)
  for name, value in tree.items():
    assert len(out[name].addressable_shards) == 8
    for shard in out[name].addressable_shards:
      np.testing.assert_array_equal(np.asarray(shard.data), value)


def test_unknown_axis_name_is_named():
  with pytest.raises(ValueError, match=r"config\.mesh.*unknown axis name\(s\) \['tensor'\]"):
    partitioning.make_mesh([("data", 2), ("tensor", 4)])


# ---- FSDP: batch over data x fsdp, state sharded by rules --------------------------------

def test_fsdp_mesh_splits_the_batch_over_data_and_fsdp():
  mesh = partitioning.make_mesh([("data", 2), ("fsdp", 4)])
  assert partitioning.batch_axes(mesh) == ("data", "fsdp")
  assert partitioning.data_parallel_size(mesh) == 8 and partitioning.fsdp_size(mesh) == 4
  batch = _batch(16)
  sharded = partitioning.shard_batch(batch, mesh)
  for name, value in batch.items():
    x = sharded[name]
    starts = sorted(s.index[0].start or 0 for s in x.addressable_shards)
    assert starts == list(range(0, 16, 2)), name  # 8 distinct row blocks of 2, no replicas
    np.testing.assert_array_equal(partitioning.local_rows(x), value)
  # Pure data parallelism keeps its old spec.
  assert partitioning.batch_sharded(partitioning.make_mesh([("data", -1)])).spec == P("data")


def _specs(tree, mesh, **kwargs):
  shardings = partitioning.state_shardings(tree, mesh, **kwargs)
  return {partitioning.path_name(path): s.spec
          for path, s in jax.tree_util.tree_flatten_with_path(shardings)[0]}


TREE = {"params": {"emb": jax.ShapeDtypeStruct((1000, 64), np.float32),   # 64000 elements
                   "kernel": jax.ShapeDtypeStruct((64, 96), np.float32),  # 6144
                   "odd": jax.ShapeDtypeStruct((999, 63), np.float32),    # none divisible by 4
                   "bias": jax.ShapeDtypeStruct((64,), np.float32),
                   "small": jax.ShapeDtypeStruct((8, 8), np.float32)},
        "step": jax.ShapeDtypeStruct((), np.int32)}


def test_default_rule_shards_the_largest_divisible_dimension():
  mesh = partitioning.make_mesh([("data", 2), ("fsdp", 4)])
  specs = _specs(TREE, mesh)
  assert specs == {"params/emb": P("fsdp", None), "params/kernel": P(None, "fsdp"),
                   "params/odd": P(), "params/bias": P(), "params/small": P(), "step": P()}
  # min_size 0: every leaf with a divisible dimension is sharded, scalars never.
  specs = _specs(TREE, mesh, min_size=0)
  assert specs["params/bias"] == P("fsdp") and specs["params/small"] == P("fsdp", None)
  assert specs["params/odd"] == P() and specs["step"] == P()


def test_rules_first_match_wins_and_unmatched_is_replicated():
  mesh = partitioning.make_mesh([("data", 2), ("fsdp", 4)])
  specs = _specs(TREE, mesh, rules=[("emb$", "replicate"), ("params/", "fsdp")])
  assert specs["params/emb"] == P() and specs["params/kernel"] == P(None, "fsdp")
  specs = _specs(TREE, mesh, rules=[("kernel", "fsdp")])
  assert specs["params/emb"] == P() and specs["params/kernel"] == P(None, "fsdp")


def test_without_fsdp_axis_everything_is_replicated():
  for axes in ([("data", -1)], [("data", 8), ("fsdp", 1)]):
    specs = _specs(TREE, partitioning.make_mesh(axes), min_size=0)
    assert set(specs.values()) == {P()}, axes


@pytest.mark.parametrize("rules, match", [
    ([(".*", "shard")], r"partitioning\.rules: strategy 'shard'"),
    ([("(", "fsdp")], r"partitioning\.rules: '\(' is not a regular expression"),
    (["fsdp"], r"partitioning\.rules: 'fsdp' is not a \(regex, strategy\) pair"),
])
def test_bad_rules_raise_naming_the_field(rules, match):
  with pytest.raises(ValueError, match=match):
    partitioning.parse_rules(rules)


def test_bytes_per_device_under_fsdp():
  mesh = partitioning.make_mesh([("data", 2), ("fsdp", 4)])
  shardings = partitioning.state_shardings(TREE, mesh)
  full = 4 * (64000 + 6144 + 999 * 63 + 64 + 64 + 1)
  # emb and kernel are split 4 ways, the rest replicated.
  expected = full - 4 * (64000 + 6144) * 3 // 4
  assert partitioning.bytes_per_device(TREE, shardings) == expected
  assert f"replicated: {full / 2**20:.2f} MiB" in partitioning.describe_state_layout(
      TREE, shardings, mesh)


def test_state_sharding_places_real_arrays():
  """device_put with the rules' shardings: each device holds a quarter of a sharded weight,
  and the values survive the round trip."""
  mesh = partitioning.make_mesh([("data", 2), ("fsdp", 4)])
  tree = {"emb": np.arange(1000 * 64, dtype=np.float32).reshape(1000, 64),
          "bias": np.ones(64, np.float32)}
  placed = jax.device_put(tree, partitioning.state_shardings(tree, mesh))
  assert {s.data.shape for s in placed["emb"].addressable_shards} == {(250, 64)}
  assert {s.data.shape for s in placed["bias"].addressable_shards} == {(64,)}
  np.testing.assert_array_equal(np.asarray(placed["emb"]), tree["emb"])
