"""`model.init_from_hf`: a run starts its BERT towers from a Hugging Face safetensors checkpoint."""

import numpy as np
import pytest
from safetensors import numpy as safetensors_numpy

from realm_jax import config_lib
from realm_jax.data import prepare
from realm_jax.train import checkpointing
from realm_jax.train import loop
from tiny_configs import tiny_config  # pylint: disable=g-bad-import-order


def hf_checkpoint(directory, config, vocab_size, seed=0):
  """Random BERT tensors in HF PyTorch names and layout with the config's model shape."""
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
