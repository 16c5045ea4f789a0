"""model.remat: the same loss and gradients as without it, and less XLA temp memory.

The memory check compiles (no run) the gradient of a small BERT encoder on one device and
compares `compiled.memory_analysis().temp_size_in_bytes`: with remat (a scan over
checkpointed layers, models/bert.py) the layers' activations are not all kept for the
backward pass. The old per-layer `nn.remat` gave the same temp bytes as no remat on CPU; this
test would have failed on it.
"""

import os

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from realm_jax import compile_cache
from realm_jax.models import bert

# Numerics, not speed: XLA's backend optimizations off compile these gradients much faster.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def _model(remat, policy="nothing", dropout=0.1, layers=4):
  return bert.BertModel(bert.BertConfig(vocab_size=64, hidden_size=32, num_layers=layers,
                                        num_heads=2, intermediate_size=128,
                                        max_position_embeddings=128, dropout_rate=dropout,
                                        remat=remat, remat_policy=policy))


def _inputs(batch=8, length=128, seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(1, 64, size=(batch, length)).astype(np.int32)
  tokens[:, -7:] = 0  # some padding, masked out of attention
  return jnp.asarray(tokens), jnp.zeros_like(tokens), jnp.asarray(tokens != 0)


def _loss_fn(model, inputs):
  """A loss that every hidden unit moves (a squared norm after LayerNorm would be ~H always)."""
  tokens = inputs[0]
  target = jax.random.normal(jax.random.key(42), tokens.shape + (32,))  # [B, T, H]

  def loss(params, key):
    hidden = model.apply({"params": params}, *inputs, deterministic=False,
                         rngs={"dropout": key})  # [B, T, H]
    return jnp.mean(jnp.sum(jnp.tanh(hidden.astype(jnp.float32)) * target, axis=-1))
  return loss


@pytest.mark.parametrize("policy", ["nothing", "dots"])
def test_remat_gives_the_same_loss_and_grads_with_dropout(policy):
  inputs = _inputs(batch=2, length=24)
  plain, remat = _model(False), _model(True, policy)
  params = plain.init(jax.random.key(0), *inputs)["params"]
  key = jax.random.key(5)
  (loss_a, grads_a), (loss_b, grads_b) = [
      jax.jit(jax.value_and_grad(_loss_fn(m, inputs)), compiler_options=FAST_COMPILE)(
          params, key) for m in (plain, remat)]
  np.testing.assert_allclose(loss_b, loss_a, rtol=1e-5)
  flat_a = flax.traverse_util.flatten_dict(grads_a, sep="/")
  flat_b = flax.traverse_util.flatten_dict(grads_b, sep="/")
  assert flat_a.keys() == flat_b.keys()
  assert "encoder/layer/3/output/dense/kernel" in flat_a  # HF names kept
  # f32 summation order differs (scan vs unrolled loop): tolerance relative to the largest
  # gradient entry (some leaves, e.g. the embedding LayerNorm bias, are ~1e-8: rounding noise).
  scale = max(float(np.abs(g).max()) for g in flat_a.values())
  for path in flat_a:
    np.testing.assert_allclose(flat_b[path], flat_a[path], rtol=1e-4, atol=1e-5 * scale,
                               err_msg=path)
  # Dropout is live (another key changes the loss), and each layer draws its own mask.
  other = jax.jit(_loss_fn(remat, inputs))(params, jax.random.key(6))
  assert abs(float(other) - float(loss_a)) > 1e-4


def test_remat_cuts_xla_temp_memory():
  inputs = _inputs()
  params = _model(False).init(jax.random.key(0), *inputs)["params"]
  temp = {}
  for remat in (False, True):
    grad = jax.jit(jax.grad(_loss_fn(_model(remat), inputs)))
    compiled = grad.lower(params, jax.random.key(1)).compile()
    temp[remat] = compiled.memory_analysis().temp_size_in_bytes
  # 4 layers of [8, 128, 128] GELU inputs and [8, 2, 128, 128] attention probabilities each:
  # without remat all are alive at the backward pass; with it about one layer's.
  assert temp[True] < 0.6 * temp[False], temp


def test_compilation_cache_dir_resolution(monkeypatch, tmp_path):
  monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
  assert compile_cache.resolve("") == os.path.join(str(tmp_path), "realm_jax",
                                                   "jax_compilation_cache")
  assert compile_cache.resolve("none") is None
  assert compile_cache.resolve("/x/y") == "/x/y"
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", "/from/env")
  assert compile_cache.resolve("none") == "/from/env"
