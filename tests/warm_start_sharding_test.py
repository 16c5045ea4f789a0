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


def test_encoder_from_embedder_copies_the_doc_tower_bert_into_the_encoders_layout():
  """Non-shared towers: the document embedder's BERT is the source; the copy takes the
  encoder leaf's sharding, is a separate buffer, and skips the embedder's pooler; the MLM head
  and the embedders are untouched."""
  mesh = jax.make_mesh((2, 4), ("data", "fsdp"))
  fsdp = NamedSharding(mesh, PartitionSpec("fsdp"))
  rng = np.random.default_rng(0)
  doc_kernel = jax.device_put(rng.normal(size=(8, 4)).astype(np.float32), NamedSharding(
      mesh, PartitionSpec()))
  params = {
      "query_embedder": {"bert": {"layer": {"kernel": jax.numpy.ones((8, 4))}}},
      "doc_embedder": {"bert": {"layer": {"kernel": doc_kernel},
                                "norm": {"scale": jax.numpy.full(4, 2.0)},
                                "pooler": {"kernel": jax.numpy.ones((4, 4))}}},
      "encoder": {"bert": {"layer": {"kernel": jax.device_put(np.zeros((8, 4), np.float32),
                                                              fsdp)},
                           "norm": {"scale": jax.numpy.ones(4)}},
                  "cls": {"bias": jax.numpy.zeros(3)}},
  }
  out, source = state_lib.encoder_from_embedder(params)
  assert source == "doc_embedder"
  copied = out["encoder"]["bert"]["layer"]["kernel"]
  np.testing.assert_array_equal(np.asarray(copied), np.asarray(doc_kernel))
  assert copied.sharding == fsdp
  same = out["encoder"]["bert"]["norm"]["scale"]  # same layout as its source: still a copy
  assert same.sharding == params["doc_embedder"]["bert"]["norm"]["scale"].sharding
  pointer = lambda x: x.addressable_shards[0].data.unsafe_buffer_pointer()
  assert pointer(same) != pointer(params["doc_embedder"]["bert"]["norm"]["scale"])
  assert set(out["encoder"]["bert"]) == {"layer", "norm"}  # no pooler
  assert out["encoder"]["cls"] is params["encoder"]["cls"]
  assert out["query_embedder"] is params["query_embedder"]
  params["encoder"]["bert"]["layer"]["kernel"] = np.zeros((8, 5), np.float32)  # other shape
  try:
    state_lib.encoder_from_embedder(params)
    raise AssertionError("a shape mismatch must be an error")
  except ValueError as e:
    assert "layer/kernel" in str(e) and "doc_embedder" in str(e)
