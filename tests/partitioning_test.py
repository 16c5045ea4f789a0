"""Mesh construction from config and batch assembly/disassembly (8 fake CPU devices)."""

import jax
import numpy as np
import pytest

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
  mesh = partitioning.make_mesh([("data", -1), ("model", 2)])
  assert dict(mesh.shape) == {"data": 4, "model": 2}
  mesh = partitioning.make_mesh([("data", 2), ("model", 2)])
  assert mesh.devices.size == 4


@pytest.mark.parametrize("axes", [
    [("model", -1)],                 # no data axis
    [("data", -1), ("model", -1)],   # two -1
    [("data", 3)],                   # does not divide 8
    [("data", 16)],                  # more than exist
    [("data", 0)],
    [("data", -2)],
    [("data", -1), ("model", 3)],
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
