"""Models: BERT against a numpy reference, HF parameter names, reader inputs, bf16, remat, and
gradients that reach the retriever through p(z|x)."""

import math

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from realm_jax import objectives
from realm_jax.models import bert
from realm_jax.models import embedder as embedder_lib
from realm_jax.models import reader_inputs
from realm_jax.models import realm
from realm_jax.train import state as state_lib
from tiny_configs import tiny_config  # pylint: disable=g-bad-import-order

VOCAB = 53
# Gradient graphs compile ~2x faster on CPU without LLVM's backend optimizations.
FAST_COMPILE = {"xla_backend_optimization_level": 0}
PAD = 0




def bert_config(**overrides) -> bert.BertConfig:
  m = tiny_config().model
  kwargs = dict(vocab_size=VOCAB, hidden_size=m.hidden_size, num_layers=m.num_layers,
                num_heads=m.num_heads, intermediate_size=m.intermediate_size,
                max_position_embeddings=64, dropout_rate=0.0)
  kwargs.update(overrides)
  return bert.BertConfig(**kwargs)


def realm_model(share_embedders=True, embed_dim=16, **overrides) -> realm.RealmModel:
  return realm.RealmModel(realm.RealmModelConfig(
      bert=bert_config(**overrides), embed_dim=embed_dim, share_embedders=share_embedders,
      pad_id=PAD))


def right_padded(rng, lengths, width, low=1, high=VOCAB):
  """[len(lengths), width] int32 rows of random non-pad ids followed by PAD."""
  out = np.full((len(lengths), width), PAD, np.int32)
  for i, n in enumerate(lengths):
    out[i, :n] = rng.integers(low, high, size=n)
  return out


# ---- numpy reference BERT -----------------------------------------------------------------


def _np_layer_norm(x, p, eps):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def _np_dense(x, p):
  return x @ p["kernel"] + p["bias"]


_erf = np.vectorize(math.erf)


def _np_gelu(x):
  return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))


def _np_gelu_tanh(x):
  """HF `gelu_new` (original BERT's tanh approximation)."""
  return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


NP_ACTIVATIONS = {"gelu": _np_gelu, "gelu_new": _np_gelu_tanh}


def _np_softmax(x):
  x = x - x.max(-1, keepdims=True)
  e = np.exp(x)
  return e / e.sum(-1, keepdims=True)


def np_bert(params, token_ids, segment_ids, mask, config: bert.BertConfig):
  """BERT forward in float64 numpy from the Flax parameter tree (HF names)."""
  p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
  emb = p["embeddings"]
  seq = token_ids.shape[1]
  x = (emb["word_embeddings"]["embedding"][token_ids] +
       emb["position_embeddings"]["embedding"][np.arange(seq)][None] +
       emb["token_type_embeddings"]["embedding"][segment_ids])
  eps = config.layer_norm_eps
  x = _np_layer_norm(x, emb["LayerNorm"], eps)
  heads, head_dim = config.num_heads, config.hidden_size // config.num_heads
  bias = np.where(mask, 0.0, -np.inf)[:, None, None, :]  # [B, 1, 1, S]
  for i in range(config.num_layers):
    layer = p["encoder"]["layer"][str(i)]
    att = layer["attention"]
    split = lambda t: t.reshape(t.shape[0], seq, heads, head_dim).transpose(0, 2, 1, 3)
    q = split(_np_dense(x, att["self"]["query"]))
    k = split(_np_dense(x, att["self"]["key"]))
    v = split(_np_dense(x, att["self"]["value"]))
    scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(head_dim) + bias  # [B, N, T, S]
    ctx = (_np_softmax(scores) @ v).transpose(0, 2, 1, 3).reshape(x.shape)
    x = _np_layer_norm(_np_dense(ctx, att["output"]["dense"]) + x, att["output"]["LayerNorm"], eps)
    h = NP_ACTIVATIONS[config.hidden_act](_np_dense(x, layer["intermediate"]["dense"]))
    x = _np_layer_norm(_np_dense(h, layer["output"]["dense"]) + x, layer["output"]["LayerNorm"],
                       eps)
  return x


def _bert_inputs(seed=0):
  rng = np.random.default_rng(seed)
  lengths = [11, 4, 7]  # padded positions in rows 1 and 2
  tokens = right_padded(rng, lengths, 11)
  mask = tokens != PAD
  segments = np.zeros_like(tokens)
  for i, n in enumerate(lengths):
    segments[i, n // 2:n] = 1
  return tokens, segments, mask


@pytest.mark.parametrize("overrides", [
    {}, {"hidden_act": "gelu_new", "layer_norm_eps": 1e-5},
    # A vanishing attention-dropout rate takes the written-out softmax path (training only),
    # which must compute the same attention as the fused one.
    {"attention_dropout_rate": 1e-7, "train": True}], ids=["default", "gelu_new", "att_path"])
def test_bert_matches_numpy_reference(overrides):
  overrides = dict(overrides)
  train = overrides.pop("train", False)
  config = bert_config(**overrides)
  model = bert.BertModel(config)
  tokens, segments, mask = _bert_inputs()
  params = jax.jit(model.init)(jax.random.key(1), tokens, segments, mask)["params"]
  # Non-trivial LayerNorm parameters and biases, so their placement is checked too.
  rng = np.random.default_rng(2)
  params = jax.tree_util.tree_map(
      lambda a: a + 0.1 * rng.standard_normal(a.shape).astype(np.float32), params)
  out = np.asarray(jax.jit(lambda p, t, s, m: model.apply(
      {"params": p}, t, s, m, deterministic=not train, rngs={"dropout": jax.random.key(0)}))(
          params, tokens, segments, mask))
  assert out.dtype == np.float32 and out.shape == tokens.shape + (config.hidden_size,)
  expected = np_bert(params, tokens, segments, mask, config)
  np.testing.assert_allclose(out, expected, atol=1e-4, rtol=0)


def test_activation_and_eps_matter():
  """gelu vs gelu_new and eps 1e-12 vs 1e-5 change the output (so the config must be read)."""
  tokens, segments, mask = _bert_inputs()
  base = bert.BertModel(bert_config())
  params = jax.jit(base.init)(jax.random.key(1), tokens, segments, mask)["params"]
  rng = np.random.default_rng(2)  # pre-activations of order 1, where the GELUs differ
  params = jax.tree_util.tree_map(
      lambda a: a + 0.3 * rng.standard_normal(a.shape).astype(np.float32), params)
  outs = {}
  for name, over in {"gelu": {}, "gelu_new": {"hidden_act": "gelu_new"},
                     "eps": {"layer_norm_eps": 1e-5}}.items():
    model = bert.BertModel(bert_config(**over))
    outs[name] = np.asarray(jax.jit(model.apply)({"params": params}, tokens, segments, mask))
  assert np.abs(outs["gelu_new"] - outs["gelu"]).max() > 1e-4
  assert np.abs(outs["eps"] - outs["gelu"]).max() > 1e-6
  with pytest.raises(ValueError, match="hidden_act='tanh'"):
    bert_config(hidden_act="tanh")


def test_attention_dropout_trains_only_and_respects_padding():
  config = bert_config(attention_dropout_rate=0.5)  # hidden dropout stays 0.0
  assert config.attention_dropout == 0.5 and bert_config().attention_dropout == 0.0
  assert bert_config(dropout_rate=0.1).attention_dropout == 0.1, "defaults to dropout_rate"
  model = bert.BertModel(config)
  tokens, segments, mask = _bert_inputs()
  params = jax.jit(model.init)(jax.random.key(1), tokens, segments, mask)["params"]
  run = jax.jit(lambda t, s, key, det: model.apply(
      {"params": params}, t, s, mask, deterministic=det, rngs={"dropout": key}),
      static_argnums=3)
  evaluation = np.asarray(run(tokens, segments, jax.random.key(0), True))
  reference = np_bert(params, tokens, segments, mask, config)
  np.testing.assert_allclose(evaluation, reference, atol=1e-4, rtol=0)  # eval: no dropout
  train_a = np.asarray(run(tokens, segments, jax.random.key(0), False))
  train_b = np.asarray(run(tokens, segments, jax.random.key(1), False))
  assert np.abs(train_a - evaluation)[mask].max() > 1e-2, "dropout on probabilities applied"
  assert np.abs(train_a - train_b)[mask].max() > 1e-2, "masks depend on the rng"
  # Dropped probabilities still never reach padded keys.
  changed = np.where(mask, tokens, 7).astype(np.int32)
  train_changed = np.asarray(run(changed, segments, jax.random.key(0), False))
  np.testing.assert_allclose(train_changed[mask], train_a[mask], atol=1e-5, rtol=0)


def test_bert_padded_keys_do_not_affect_real_positions():
  config = bert_config()
  model = bert.BertModel(config)
  tokens, segments, mask = _bert_inputs()
  params = jax.jit(model.init)(jax.random.key(1), tokens, segments, mask)["params"]
  apply = jax.jit(lambda t, s: model.apply({"params": params}, t, s, mask))
  out = np.asarray(apply(tokens, segments))
  changed = np.where(mask, tokens, np.random.default_rng(3).integers(1, VOCAB, tokens.shape))
  changed_segments = np.where(mask, segments, 1)
  assert (changed != tokens).any()
  out2 = np.asarray(apply(changed.astype(np.int32), changed_segments.astype(np.int32)))
  np.testing.assert_allclose(out2[mask], out[mask], atol=1e-6, rtol=0)
  # ...while the padded positions themselves did change (the edit was not a no-op).
  assert np.abs(out2[~mask] - out[~mask]).max() > 1e-3


def test_embedder_matches_numpy_and_ignores_trailing_padding():
  config = bert_config()
  model = embedder_lib.Embedder(config, embed_dim=8, pad_id=PAD)
  tokens, segments, _ = _bert_inputs()
  params = jax.jit(model.init)(jax.random.key(4), tokens, segments)["params"]
  apply = jax.jit(model.apply)
  out = np.asarray(apply({"params": params}, tokens, segments))
  assert out.dtype == np.float32 and out.shape == (3, 8)
  p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
  hidden = np_bert(params["bert"], tokens, segments, tokens != PAD, config)
  pooled = np.tanh(_np_dense(hidden[:, 0], p["bert"]["pooler"]["dense"]))  # BERT's pooler
  expected = _np_layer_norm(_np_dense(pooled, p["projection"]), p["LayerNorm"],
                            config.layer_norm_eps)
  np.testing.assert_allclose(out, expected, atol=1e-4, rtol=0)
  # pooler=False is the raw [CLS] state (this project's embedder before the pooler).
  no_pool = embedder_lib.Embedder(config, embed_dim=8, pad_id=PAD, pooler=False)
  old = {k: v for k, v in params.items()}
  old["bert"] = {k: v for k, v in params["bert"].items() if k != "pooler"}
  out_old = np.asarray(jax.jit(no_pool.apply)({"params": old}, tokens, segments))
  expected_old = _np_layer_norm(_np_dense(hidden[:, 0], p["projection"]), p["LayerNorm"],
                                config.layer_norm_eps)
  np.testing.assert_allclose(out_old, expected_old, atol=1e-4, rtol=0)
  # More padding at the end changes nothing.
  longer = np.pad(tokens, ((0, 0), (0, 5)), constant_values=PAD)
  longer_segments = np.pad(segments, ((0, 0), (0, 5)))
  out_longer = np.asarray(apply({"params": params}, longer, longer_segments))
  np.testing.assert_allclose(out_longer, out, atol=1e-5, rtol=0)


@pytest.mark.parametrize("hidden_act", ["gelu", "gelu_new"])
def test_mlm_logits_match_numpy_with_tied_embeddings(hidden_act):
  config = bert_config(hidden_act=hidden_act)
  model = realm.KnowledgeAugmentedEncoder(config, pad_id=PAD)
  tokens, segments, _ = _bert_inputs()
  positions = np.array([[1, 3], [0, 2], [5, 6]], np.int32)
  params = jax.jit(model.init)(jax.random.key(5), tokens, segments, positions)["params"]
  rng = np.random.default_rng(6)
  params = jax.tree_util.tree_map(
      lambda a: a + 0.1 * rng.standard_normal(a.shape).astype(np.float32), params)
  logits = np.asarray(jax.jit(model.apply)({"params": params}, tokens, segments, positions))
  assert logits.shape == (3, 2, VOCAB) and logits.dtype == np.float32
  p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
  hidden = np_bert(params["bert"], tokens, segments, tokens != PAD, config)
  gathered = np.take_along_axis(hidden, positions[..., None], axis=1)
  head = p["cls"]["predictions"]
  h = _np_layer_norm(NP_ACTIVATIONS[config.hidden_act](
      _np_dense(gathered, head["transform"]["dense"])),
                     head["transform"]["LayerNorm"], config.layer_norm_eps)
  expected = h @ p["bert"]["embeddings"]["word_embeddings"]["embedding"].T + head["bias"]
  np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=0)


# ---- parameter names --------------------------------------------------------------------


def _init_realm(model, batch=2, k=3, query_len=8, doc_len=10, seed=0):
  rng = np.random.default_rng(seed)
  query = right_padded(rng, rng.integers(3, query_len + 1, batch), query_len)
  positions = np.stack([rng.choice(np.arange(1, 3), 2, replace=False) for _ in range(batch)])
  doc = right_padded(rng, rng.integers(3, doc_len + 1, batch * k), doc_len).reshape(
      batch, k, doc_len)
  doc_segments = (rng.random(doc.shape) < 0.5).astype(np.int32) * (doc != PAD)
  body = right_padded(rng, rng.integers(1, doc_len - 1, batch * k), doc_len - 2).reshape(
      batch, k, doc_len - 2)
  inputs = (query, positions.astype(np.int32), doc, doc_segments.astype(np.int32), body)
  params = jax.jit(model.init)(jax.random.key(seed), *inputs)["params"]
  return params, inputs


def test_realm_parameter_paths_are_hf_names():
  model = realm_model()
  params, _ = _init_realm(model)
  paths = {"/".join(path): v.shape
           for path, v in flax.traverse_util.flatten_dict(params).items()}
  h, i, e = 32, 64, 16
  expected = {
      "embedder/bert/embeddings/word_embeddings/embedding": (VOCAB, h),
      "embedder/bert/embeddings/position_embeddings/embedding": (64, h),
      "embedder/bert/embeddings/token_type_embeddings/embedding": (2, h),
      "embedder/bert/embeddings/LayerNorm/scale": (h,),
      "embedder/bert/pooler/dense/kernel": (h, h),  # HF realm.pooler.dense
      "embedder/bert/pooler/dense/bias": (h,),
      "embedder/bert/encoder/layer/0/attention/self/query/kernel": (h, h),
      "embedder/bert/encoder/layer/0/attention/self/key/bias": (h,),
      "embedder/bert/encoder/layer/0/attention/self/value/kernel": (h, h),
      "embedder/bert/encoder/layer/1/attention/output/dense/kernel": (h, h),
      "embedder/bert/encoder/layer/1/attention/output/LayerNorm/scale": (h,),
      "embedder/bert/encoder/layer/1/intermediate/dense/kernel": (h, i),
      "embedder/bert/encoder/layer/1/output/dense/kernel": (i, h),
      "embedder/bert/encoder/layer/1/output/LayerNorm/bias": (h,),
      "embedder/projection/kernel": (h, e),
      "embedder/LayerNorm/scale": (e,),
      "encoder/bert/embeddings/word_embeddings/embedding": (VOCAB, h),
      "encoder/bert/encoder/layer/1/output/LayerNorm/scale": (h,),
      "encoder/cls/predictions/bias": (VOCAB,),
      "encoder/cls/predictions/transform/dense/kernel": (h, h),
      "encoder/cls/predictions/transform/LayerNorm/scale": (h,),
  }
  for path, shape in expected.items():
    assert path in paths, f"missing {path}; have e.g. {sorted(paths)[:5]}"
    assert paths[path] == shape, path
  assert set(params) == {"embedder", "encoder"}
  assert not any("decoder" in p for p in paths), "the MLM decoder is tied to word_embeddings"
  assert not any(p.startswith("encoder/bert/pooler") for p in paths), "the MLM encoder has none"
  assert not any("layer/2/" in p for p in paths)  # exactly num_layers=2
  assert all(v.dtype == jnp.float32 for v in jax.tree_util.tree_leaves(params))


def test_unshared_embedders_have_their_own_trees():
  model = realm_model(share_embedders=False)
  params, inputs = _init_realm(model)
  assert set(params) == {"query_embedder", "doc_embedder", "encoder"}
  flat = flax.traverse_util.flatten_dict(params, sep="/")
  assert "query_embedder/bert/encoder/layer/0/attention/self/query/kernel" in flat
  assert "doc_embedder/projection/kernel" in flat
  # Independently initialized, and each used for its own side.
  assert not np.allclose(params["query_embedder"]["projection"]["kernel"],
                         params["doc_embedder"]["projection"]["kernel"])
  query, _, doc, doc_segments, _ = inputs
  embedder = embedder_lib.Embedder(model.config.bert, 16, PAD)
  q = jax.jit(lambda p, t: model.apply({"params": p}, t, method=model.embed_queries))(
      params, query)
  direct = jax.jit(embedder.apply)({"params": params["query_embedder"]}, query,
                                   np.zeros_like(query))
  np.testing.assert_allclose(q, direct, atol=1e-6)
  d = jax.jit(lambda p, t, s: model.apply({"params": p}, t, s, method=model.embed_docs))(
      params, doc[:, 0], doc_segments[:, 0])
  direct = jax.jit(embedder.apply)({"params": params["doc_embedder"]}, doc[:, 0],
                                   doc_segments[:, 0])
  np.testing.assert_allclose(d, direct, atol=1e-6)


# ---- reader inputs ----------------------------------------------------------------------


def _concat_reference(query, bodies, pad):
  batch, query_len = query.shape
  _, k, body_len = bodies.shape
  total = query_len + body_len
  tokens = np.full((batch, k, total), pad, np.int64)
  segments = np.zeros((batch, k, total), np.int64)
  for b in range(batch):
    q = [t for t in query[b] if t != pad]
    for j in range(k):
      body = [t for t in bodies[b, j] if t != pad]
      row = q + body
      tokens[b, j, :len(row)] = row
      segments[b, j, len(q):len(row)] = 1
  return tokens, segments


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_concat_query_and_bodies_matches_python_loop(seed):
  rng = np.random.default_rng(seed)
  batch, k, query_len, body_len = 5, 3, 9, 7
  pad = 0 if seed < 2 else 3  # a non-zero pad id too
  query = np.full((batch, query_len), pad, np.int32)
  bodies = np.full((batch, k, body_len), pad, np.int32)
  qlens = rng.integers(1, query_len + 1, batch)
  qlens[0] = query_len  # a full query
  for b in range(batch):
    query[b, :qlens[b]] = rng.choice([t for t in range(1, 40) if t != pad], qlens[b])
    for j in range(k):
      n = rng.integers(0, body_len + 1) if (b, j) != (0, 0) else body_len  # incl. empty/full
      bodies[b, j, :n] = rng.choice([t for t in range(1, 40) if t != pad], n)
  tokens, segments = jax.jit(reader_inputs.concat_query_and_bodies, static_argnums=2)(
      query, bodies, pad)
  tokens, segments = np.asarray(tokens), np.asarray(segments)
  assert tokens.dtype == np.int32 and tokens.shape == (batch, k, query_len + body_len)
  ref_tokens, ref_segments = _concat_reference(query, bodies, pad)
  np.testing.assert_array_equal(tokens, ref_tokens)
  np.testing.assert_array_equal(segments, ref_segments)
  # Padding only at the end of each row.
  real = tokens != pad
  n_real = real.sum(-1)
  np.testing.assert_array_equal(real, np.arange(tokens.shape[-1]) < n_real[..., None])


# ---- numerics: bf16, remat, gradients through retrieval ---------------------------------


def test_bfloat16_embedder_is_float32_and_close():
  rng = np.random.default_rng(7)
  tokens = right_padded(rng, [20, 13, 5, 20], 20)
  segments = (np.arange(20) >= 8).astype(np.int32)[None].repeat(4, 0) * (tokens != PAD)
  f32 = embedder_lib.Embedder(bert_config(), embed_dim=16, pad_id=PAD)
  bf16 = embedder_lib.Embedder(bert_config(dtype=jnp.bfloat16), embed_dim=16, pad_id=PAD)
  params = jax.jit(f32.init)(jax.random.key(0), tokens, segments)["params"]
  bf16_params = jax.jit(bf16.init)(jax.random.key(0), tokens, segments)["params"]
  assert all(a.dtype == jnp.float32 for a in jax.tree_util.tree_leaves(bf16_params)), \
      "parameters stay float32 under bf16 compute"
  a = np.asarray(jax.jit(f32.apply)({"params": params}, tokens, segments))
  b = jax.jit(bf16.apply)({"params": params}, tokens, segments)
  assert b.dtype == jnp.float32
  b = np.asarray(b)
  assert not np.array_equal(a, b), "bf16 compute should differ at least slightly"
  cosine = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
  assert cosine.min() > 0.99, cosine


def _realm_loss_fn(model, inputs, labels, weights, deterministic=True):
  """loss(params, rng, cand_mask): REALM's loss for fixed inputs (one compile per model)."""
  query, positions, doc, doc_segments, body = inputs

  def loss_fn(params, rng, cand_mask):
    retrieval_logits, mlm_logits = model.apply(
        {"params": params}, query, positions, doc, doc_segments, body,
        deterministic=deterministic, rngs=None if deterministic else {"dropout": rng})
    return objectives.realm_loss(retrieval_logits, cand_mask, mlm_logits, labels, weights).loss

  return loss_fn


def _labels(rng, batch, m=2):
  labels = rng.integers(1, VOCAB, (batch, m)).astype(np.int32)
  weights = np.ones((batch, m), np.float32)
  weights[-1, -1] = 0.0
  return labels, weights


def test_remat_gives_the_same_loss_and_grads():
  # With dropout on: remat must replay the very same dropout masks in the backward pass.
  plain = realm_model(dropout_rate=0.1, num_layers=1)
  remat = realm_model(dropout_rate=0.1, num_layers=1, remat=True)
  params, inputs = _init_realm(plain, batch=2, k=3)
  rng = np.random.default_rng(8)
  labels, weights = _labels(rng, 2)
  cand_mask = np.ones((2, 3), bool)
  key = jax.random.key(9)
  (loss_a, grads_a), (loss_b, grads_b) = [
      jax.jit(jax.value_and_grad(_realm_loss_fn(m, inputs, labels, weights,
                                                deterministic=False)),
              compiler_options=FAST_COMPILE)(params, key, cand_mask)
      for m in (plain, remat)]
  np.testing.assert_allclose(loss_b, loss_a, rtol=1e-5, atol=1e-5)
  flat_a = flax.traverse_util.flatten_dict(grads_a, sep="/")
  flat_b = flax.traverse_util.flatten_dict(grads_b, sep="/")
  assert flat_a.keys() == flat_b.keys()
  for path in flat_a:
    np.testing.assert_allclose(flat_b[path], flat_a[path], atol=1e-5, rtol=1e-5, err_msg=path)
  layer0 = flat_a["encoder/bert/encoder/layer/0/intermediate/dense/kernel"]
  assert float(jnp.abs(layer0).max()) > 0
  # remat=True really rematerializes (a checkpoint primitive in the traced gradient).
  jaxprs = [str(jax.make_jaxpr(jax.grad(_realm_loss_fn(m, inputs, labels, weights)))(
      params, key, cand_mask)) for m in (plain, remat)]
  assert "checkpoint" not in jaxprs[0] and "remat" not in jaxprs[0]
  assert "checkpoint" in jaxprs[1] or "remat" in jaxprs[1]


@pytest.mark.parametrize("share_embedders", [True, False])
def test_retrieval_gradients_reach_embedders_and_vanish_with_one_candidate(share_embedders):
  model = realm_model(share_embedders=share_embedders, num_layers=1)
  batch, k = 3, 4
  params, inputs = _init_realm(model, batch=batch, k=k, seed=3)
  rng = np.random.default_rng(10)
  labels, weights = _labels(rng, batch)
  embedder_keys = ["embedder"] if share_embedders else ["query_embedder", "doc_embedder"]
  grad_fn = jax.jit(jax.grad(_realm_loss_fn(model, inputs, labels, weights)),
                    compiler_options=FAST_COMPILE)
  key = jax.random.key(0)

  def max_abs(tree):
    return max(float(jnp.abs(g).max()) for g in jax.tree_util.tree_leaves(tree))

  all_on = np.ones((batch, k), bool)
  all_on[1, -1] = False  # one padding candidate does not stop the others
  grads = grad_fn(params, key, all_on)
  for name in embedder_keys:
    assert max_abs(grads[name]) > 1e-6, f"no retrieval gradient reaches {name}"
  # Only the null slot: p(z|x) = 1, so the retriever gets exactly no gradient...
  only_null = np.zeros((batch, k), bool)
  only_null[:, 0] = True
  grads = grad_fn(params, key, only_null)
  for name in embedder_keys:
    assert max_abs(grads[name]) == 0.0, f"{name} got a gradient with a single candidate"
  # ...while the reader still learns.
  assert max_abs(grads["encoder"]) > 0
  # The same with a single *real* candidate in slot 2.
  only_one = np.zeros((batch, k), bool)
  only_one[:, 2] = True
  grads = grad_fn(params, key, only_one)
  assert all(max_abs(grads[name]) == 0.0 for name in embedder_keys)


def test_build_model_from_experiment_config():
  config = tiny_config()
  model = state_lib.build_model(config, vocab_size=VOCAB, pad_id=PAD)
  assert model.config.bert.hidden_size == 32 and model.config.bert.num_heads == 2
  assert model.config.bert.intermediate_size == 64
  assert model.config.share_embedders and model.config.embed_dim == config.model.embed_dim
  config.model.dtype = "bfloat16"
  assert state_lib.build_model(config, VOCAB, PAD).config.bert.dtype == jnp.bfloat16
