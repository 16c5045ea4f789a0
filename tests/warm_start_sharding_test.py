"""Warm starts place the source parameters directly in the target's fsdp layout."""

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from realm_jax.train import state as state_lib


def test_warm_start_keeps_fsdp_shardings_and_copies_values():
  mesh = jax.make_mesh((2, 4), ("data", "fsdp"))
  fsdp = NamedSharding(mesh, PartitionSpec("fsdp"))
  replicated = NamedSharding(mesh, PartitionSpec())
  rng = np.random.default_rng(0)
  target = {"query": {"kernel": jax.device_put(np.zeros((8, 6), np.float32), fsdp),
                      "bias": jax.device_put(np.zeros(6, np.float32), replicated)},
            "encoder": {"kernel": jax.device_put(np.ones((4, 4), np.float32), fsdp)}}
  source = {"query": {"kernel": rng.normal(size=(8, 6)).astype(np.float32),
                      "bias": rng.normal(size=6).astype(np.float32)}}
  params, copied = state_lib.warm_start(target, source, ("query", "doc"), "test")
  assert copied == ["query"]
  assert params["query"]["kernel"].sharding == fsdp
  assert params["query"]["bias"].sharding == replicated
  assert len(params["query"]["kernel"].addressable_shards) == 8
  assert params["query"]["kernel"].addressable_shards[0].data.shape == (2, 6)
  np.testing.assert_array_equal(np.asarray(params["query"]["kernel"]), source["query"]["kernel"])
  np.testing.assert_array_equal(np.asarray(params["query"]["bias"]), source["query"]["bias"])
  assert params["encoder"]["kernel"] is target["encoder"]["kernel"]
