"""The analytic FLOPs of realm_jax.train.flops against hand arithmetic and XLA's own count."""

import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import pytest

from realm_jax.models import bert
from realm_jax.models import realm
from realm_jax.train import flops

# Hand-computable: H=2, L=1, I=4, V=10, D=3, so layer(t) = 8t·4 + 4t·2·4 + 4t²·2 = 64t + 8t².
HAND = flops.ModelDims(hidden=2, layers=1, heads=1, intermediate=4, vocab=10, embed_dim=3)


def _xla_flops(fn, *args) -> float:
  cost = jax.jit(fn).lower(*args).compile().cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  return float(cost["flops"])


def test_realm_by_hand():
  # B=1, k=2, Lq=3, Ld=4 (Lb=2, reader T=5), M=1.
  parts = flops.realm_step_flops(HAND, batch_size=1, k=2, query_len=3, doc_len=4,
                                 max_masked=1).parts
  assert parts == {
      "query_embedder": (64 * 3 + 8 * 9) + 2 * 2 * 3,  # 264 + projection 12 = 276
      "doc_embedder": 2 * (64 * 4 + 8 * 16) + 2 * 2 * 2 * 3,  # 768 + 24 = 792
      "retrieval_scores": 2 * 1 * 2 * 3,  # 12
      "reader_encoder": 2 * (64 * 5 + 8 * 25),  # 1040
      "mlm_head": 2 * 2 * 2 * 2 + 2 * 2 * 2 * 10,  # 16 + 80 = 96
  }
  step = flops.realm_step_flops(HAND, 1, 2, 3, 4, 1)
  assert step.forward == 2216
  assert step.train_step == 3 * 2216
  assert flops.realm_train_step_flops(HAND, 1, 2, 3, 4, 1) == 6648


def test_ict_by_hand():
  # B=2, Lq=3, Ld=4.
  step = flops.ict_step_flops(HAND, batch_size=2, query_len=3, doc_len=4)
  assert step.parts == {"query_embedder": 2 * 264 + 2 * 2 * 2 * 3,  # 552
                        "doc_embedder": 2 * 384 + 2 * 2 * 2 * 3,  # 792
                        "retrieval_scores": 2 * 2 * 2 * 3}  # 24
  assert step.forward == 1368 and step.train_step == 4104
  assert flops.ict_train_step_flops(HAND, 2, 3, 4) == 4104


def test_attention_matmuls_match_xla_exactly():
  b, t, heads, head_dim = 3, 16, 4, 8
  q = jnp.ones((b, t, heads, head_dim))

  def attention_matmuls(q, k, v):
    scores = jnp.einsum("bqnd,bknd->bnqk", q, k)
    return jnp.einsum("bnqk,bknd->bqnd", scores, v)

  assert _xla_flops(attention_matmuls, q, q, q) == flops.attention_flops(b, t, heads * head_dim)


def test_from_config_matches_explicit():
  path = pathlib.Path(__file__).parent.parent / "experiments" / "realm_facts.py"
  spec = importlib.util.spec_from_file_location("realm_facts", path)
  realm_facts = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(realm_facts)
  config = realm_facts.get_config("size=tiny")
  dims = flops.ModelDims.from_config(config)
  assert dims == flops.ModelDims(128, 2, 2, 512, 2000, 128)
  d = config.data
  assert (flops.step_flops_from_config(config, "realm", 16, 8).train_step ==
          flops.realm_train_step_flops(dims, 16, 8, d.query_len, d.doc_len, d.max_masked))
  assert (flops.step_flops_from_config(config, "ict", 32, 8).train_step ==
          flops.ict_train_step_flops(dims, 32, d.query_len, d.doc_len))
  with pytest.raises(ValueError, match="objective"):
    flops.step_flops_from_config(config, "qa", 1, 1)


# Sizes where matmuls dominate; XLA also counts elementwise ops (bias, LayerNorm, GELU,
# softmax), so its number is a little above the analytic matmul count, never below it.
DIMS = flops.ModelDims(hidden=256, layers=2, heads=4, intermediate=1024, vocab=2000,
                       embed_dim=128)


def _bert_config():
  return bert.BertConfig(vocab_size=DIMS.vocab, hidden_size=DIMS.hidden,
                         num_layers=DIMS.layers, num_heads=DIMS.heads,
                         intermediate_size=DIMS.intermediate, dropout_rate=0.0)


def _assert_close(xla: float, analytic: int, tolerance: float = 0.15):
  ratio = xla / analytic
  assert 1.0 <= ratio < 1.0 + tolerance, (xla, analytic, ratio)


def test_bert_forward_matches_xla():
  model = bert.BertModel(_bert_config())
  n, t = 4, 128
  tokens = jnp.ones((n, t), jnp.int32)
  mask = jnp.ones((n, t), bool)
  params = jax.eval_shape(model.init, jax.random.key(0), tokens, tokens, mask)
  xla = _xla_flops(lambda p, x: model.apply(p, x, x, mask), params, tokens)
  _assert_close(xla, flops.bert_flops(n, t, DIMS))


REALM_SHAPE = dict(b=2, k=4, lq=32, ld=64, m=10)


def _realm_model_and_args():
  """A RealmModel of DIMS, inputs of REALM_SHAPE, and the parameters' shapes."""
  model = realm.RealmModel(realm.RealmModelConfig(bert=_bert_config(),
                                                  embed_dim=DIMS.embed_dim))
  b, k, lq, ld, m = REALM_SHAPE.values()
  args = (jnp.ones((b, lq), jnp.int32), jnp.zeros((b, m), jnp.int32),
          jnp.ones((b, k, ld), jnp.int32), jnp.zeros((b, k, ld), jnp.int32),
          jnp.ones((b, k, ld - 2), jnp.int32))
  return model, args, jax.eval_shape(model.init, jax.random.key(0), *args)


def test_realm_forward_matches_xla():
  model, args, params = _realm_model_and_args()
  b, k, lq, ld, m = REALM_SHAPE.values()
  xla = _xla_flops(lambda p, *a: model.apply(p, *a), params, *args)
  _assert_close(xla, flops.realm_step_flops(DIMS, b, k, lq, ld, m).forward)


def test_ict_forward_matches_xla():
  model = realm.RealmModel(realm.RealmModelConfig(bert=_bert_config(),
                                                  embed_dim=DIMS.embed_dim))
  b, lq, ld = 8, 32, 64
  queries, docs = jnp.ones((b, lq), jnp.int32), jnp.ones((b, ld), jnp.int32)
  params = jax.eval_shape(model.init, jax.random.key(0), queries, jnp.zeros((b, 1), jnp.int32),
                          docs[:, None], docs[:, None], docs[:, None, 2:])

  def forward(p, queries, docs):
    q = model.apply(p, queries, method=model.embed_queries)
    d = model.apply(p, docs, jnp.zeros_like(docs), method=model.embed_docs)
    return q @ d.T

  xla = _xla_flops(forward, params, queries, docs)
  _assert_close(xla, flops.ict_step_flops(DIMS, b, lq, ld).forward)


def test_realm_gradient_is_about_three_forwards():
  """The train-step convention (backward = 2 x forward) against XLA's count of a gradient."""
  model, args, params = _realm_model_and_args()
  b, k, lq, ld, m = REALM_SHAPE.values()

  def loss(p, *a):
    retrieval_logits, mlm_logits = model.apply(p, *a)
    return jnp.sum(retrieval_logits) + jnp.sum(mlm_logits)

  xla = _xla_flops(jax.grad(loss), params, *args)
  _assert_close(xla, flops.realm_step_flops(DIMS, b, k, lq, ld, m).train_step)
