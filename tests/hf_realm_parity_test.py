"""Parity with HF transformers' REALM classes on tiny random weights, without torch.

The fixtures (tests/fixtures/hf_realm/, written by tests/fixtures/make_hf_realm_fixtures.py
with torch 2.13.0 + transformers 4.57.6) hold RealmEmbedder, RealmKnowledgeAugEncoder and
RealmReader checkpoints (safetensors and pytorch_model.bin), a RealmForOpenQA .bin, and HF's
outputs on fixed inputs. We load the checkpoints with `hf_weights` into our modules and compare.

Tolerance: float32 on both sides; relative error = max |ours - HF| / max |HF| over the
compared array, at most 1e-5 (measured: ~1e-7). The same tests show that a missing pooler or
the other GELU variant exceeds it by orders of magnitude, so the bound means something.

Convention differences between HF REALM and this project (none changes a number compared
here once inputs are laid out alike):
- Segment ids: queries are one segment (0); documents `[CLS] title [SEP] body [SEP]` have the
  title (with its `[CLS]` and `[SEP]`) as 0 and the body as 1; the encoder's and reader's
  `[CLS] query [SEP] body [SEP]` have the query as 0 and the body as 1; padding is 0 (HF's
  tokenizers pad token types with 0). `reader_inputs.concat_query_and_bodies` reproduces the
  fixture's layout exactly (checked below).
- Null document: the project puts `[CLS] [SEP] [SEP]` in slot 0 of every query's candidates
  (empty title, empty body); HF has no null document (its retriever returns real blocks only).
  The fixtures include it in slot 0, and HF scores it like any document.
- Attention mask: ours is `token_ids != pad_id`; HF takes `attention_mask` from the tokenizer.
  HF RealmConfig's `pad_token_id` defaults to 1, but BERT's vocabulary (and REALM's) pads with
  0 ([PAD]); the fixtures use pad 0 on both sides.
- MLM loss: HF takes labels over all positions (-100 ignored) and, with `mlm_mask=None`,
  divides the summed marginal log-likelihood by every position of the batch (ignored ones
  count as 0), which dilutes the loss; with `mlm_mask` = the masked positions it is the mean
  over masked tokens, as `objectives.realm_loss` (token marginalization). Our logits are only
  formed at the masked positions (DESIGN.md section 6); HF forms [B*k, T, V].
- Reader: span-head LayerNorm epsilon is `reader_layer_norm_eps` = 1e-3 (BERT's is 1e-12).
  HF enumerates spans width-major over the whole `[CLS] q [SEP] block [SEP]` sequence and
  masks those outside the block with finfo.min; ours are block-local and start-major
  (`reader.span_table`), masked with -1e9. HF adds the retrieval score to the span logits
  inside RealmReader; ours adds it in `objectives.reader_marginal_loss`. HF's gold spans are
  [R, num_answers] sequence positions with -1 for none.
- Embedder: HF's RealmEmbedder carries an untied, unused MLM head (`cls.predictions`), skipped;
  HF's projection LayerNorm uses `layer_norm_eps` (1e-12), ORQA's original Keras default 1e-3.
- Activation: HF REALM's config says `hidden_act="gelu_new"` (tanh GELU, as original BERT);
  HF BERT's "gelu" is the exact erf form. Read from config.json, never assumed.
"""

import pathlib

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from realm_jax import objectives
from realm_jax.models import bert
from realm_jax.models import embedder as embedder_lib
from realm_jax.models import hf_weights
from realm_jax.models import reader as reader_lib
from realm_jax.models import reader_inputs
from realm_jax.models import realm

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "hf_realm"
RTOL = 1e-5
PAD = 0


def rel_err(ours, theirs) -> float:
  ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
  assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
  return float(np.abs(ours - theirs).max() / np.abs(theirs).max())


@pytest.fixture(scope="module")
def hf():
  return dict(np.load(FIXTURES / "outputs.npz"))


@pytest.fixture(scope="module")
def config():
  return hf_weights.bert_config_from_hf(FIXTURES / "embedder", dropout_rate=0.0)


def _embed(config, params, tokens, segments, pooler=True):
  model = embedder_lib.Embedder(config, embed_dim=8, pad_id=PAD, pooler=pooler)
  return np.asarray(jax.jit(model.apply)({"params": params}, tokens, segments))


def test_config_json_is_read(config):
  assert config.hidden_act == "gelu_new" and config.layer_norm_eps == 1e-12
  assert (config.hidden_size, config.num_layers, config.vocab_size) == (16, 2, 40)
  assert config.attention_dropout == 0.1  # HF attention_probs_dropout_prob


@pytest.mark.parametrize("folder", ["embedder", "embedder_bin"])
def test_embedder_matches_hf_projected_score(hf, config, folder):
  checkpoint = hf_weights.load_hf_checkpoint(FIXTURES / folder)
  assert checkpoint.kind == "realm_embedder" and set(checkpoint.towers) == {"embedder"}
  assert "cls.predictions.transform.dense.weight" in checkpoint.skipped
  params = checkpoint.towers["embedder"]
  query = _embed(config, params, hf["query"], np.zeros_like(hf["query"]))
  doc = hf["doc"].reshape(-1, hf["doc"].shape[-1])
  docs = _embed(config, params, doc, hf["doc_segments"].reshape(doc.shape))
  err_q, err_d = rel_err(query, hf["query_emb"]), rel_err(docs.reshape(hf["doc_emb"].shape),
                                                            hf["doc_emb"])
  print(f"embedder relative error: queries {err_q:.1e}, documents {err_d:.1e}")
  assert err_q < RTOL and err_d < RTOL
  # The bound is meaningful: the raw [CLS] state (no pooler) or exact GELU miss it by far.
  no_pool = {**params, "bert": {k: v for k, v in params["bert"].items() if k != "pooler"}}
  assert rel_err(_embed(config, no_pool, hf["query"], np.zeros_like(hf["query"]),
                        pooler=False), hf["query_emb"]) > 100 * RTOL
  exact = bert.BertConfig(**{**config.__dict__, "hidden_act": "gelu"})
  assert rel_err(_embed(exact, params, hf["query"], np.zeros_like(hf["query"])),
                 hf["query_emb"]) > 10 * RTOL


def _realm_model(config):
  return realm.RealmModel(realm.RealmModelConfig(bert=config, embed_dim=8, pad_id=PAD))


def _realm_inputs(hf):
  return (hf["query"].astype(np.int32), hf["masked_positions"].astype(np.int32),
          hf["doc"].astype(np.int32), hf["doc_segments"].astype(np.int32),
          hf["body"].astype(np.int32))


@pytest.fixture(scope="module")
def realm_params(hf, config):
  model = _realm_model(config)
  shapes = jax.eval_shape(model.init, jax.random.key(0), *_realm_inputs(hf))["params"]
  params = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), shapes)
  for folder in ("embedder", "encoder"):
    params = hf_weights.apply_hf_checkpoint(params, FIXTURES / folder, model_config=config,
                                            vocab_size=40)
  return params


def test_encoder_input_layout_is_hf_tokenizer_layout(hf):
  tokens, segments = reader_inputs.concat_query_and_bodies(
      hf["query"].astype(np.int32), hf["body"].astype(np.int32), PAD)
  np.testing.assert_array_equal(tokens, hf["joint"])
  np.testing.assert_array_equal(segments, hf["joint_segments"])


def test_relevance_scores_mlm_logits_and_marginal_loss_match_hf(hf, config, realm_params):
  model = _realm_model(config)
  retrieval_logits, mlm_logits = jax.jit(model.apply)({"params": realm_params},
                                                      *_realm_inputs(hf))
  err_scores = rel_err(retrieval_logits, hf["relevance_score"])
  err_logits = rel_err(mlm_logits, hf["mlm_logits"])
  out = objectives.realm_loss(retrieval_logits, np.ones(retrieval_logits.shape, bool),
                              mlm_logits, hf["labels"].astype(np.int32), hf["mask_weights"])
  err_loss = rel_err(out.loss, hf["mlm_loss"])
  print(f"relevance {err_scores:.1e}, MLM logits {err_logits:.1e}, loss {err_loss:.1e}")
  assert err_scores < RTOL and err_logits < RTOL and err_loss < RTOL
  # HF's default (mlm_mask=None) divides by every position instead: a different number.
  positions = hf["joint"].shape[0] * hf["joint"].shape[-1]
  np.testing.assert_allclose(hf["mlm_loss_default_mask"] * positions,
                             hf["mlm_loss"] * hf["mask_weights"].sum(), rtol=1e-5)


def test_reader_span_logits_and_losses_match_hf(hf):
  checkpoint = hf_weights.load_hf_checkpoint(FIXTURES / "reader")  # a pytorch_model.bin
  assert checkpoint.kind == "realm_reader"
  hf_config = checkpoint.config
  reader_config = reader_lib.ReaderConfig(
      bert=hf_weights.bert_config_from_hf(FIXTURES / "reader", dropout_rate=0.0),
      span_hidden_size=hf_config["span_hidden_size"], max_span_width=hf_config["max_span_width"],
      layer_norm_eps=hf_config["reader_layer_norm_eps"], pad_id=PAD)
  assert reader_config.layer_norm_eps == 1e-3
  model = reader_lib.SpanReader(reader_config)
  question, blocks = hf["question"].astype(np.int32), hf["blocks"].astype(np.int32)
  out = jax.jit(model.apply)({"params": checkpoint.towers["reader"]}, question, blocks)
  logits, span_mask = np.asarray(out.span_logits), np.asarray(out.span_mask)
  starts, ends = hf["span_starts"], hf["span_ends"]
  hf_index = {(int(s), int(e)): i for i, (s, e) in enumerate(zip(starts, ends))}
  batch, r, _ = logits.shape
  ours, theirs = [], []
  for b in range(batch):
    qlen = int((question[b] != PAD).sum())
    hf_valid = hf["reader_block_mask_" + str(b)][:, starts] & \
        hf["reader_block_mask_" + str(b)][:, ends]  # [R, S_hf]
    assert span_mask[b].sum() == hf_valid.sum(), "the same spans are real on both sides"
    for k in range(r):
      for j in np.flatnonzero(span_mask[b, k]):
        s, e = out.spans[j]
        i = hf_index[(qlen + int(s), qlen + int(e))]
        assert hf_valid[k, i]
        ours.append(logits[b, k, j])
        theirs.append(hf["reader_logits"][b, k, i])
  err = rel_err(np.array(ours), np.array(theirs))
  # Losses: HF's marginal log losses vs objectives' (gold span = block tokens 1..2).
  is_correct = np.zeros(logits.shape, bool)
  for b in range(batch):
    for k in range(r):
      if hf["has_answers"][b, k]:
        j = [n for n, (s, e) in enumerate(out.spans) if (s, e) == (1, 2)][0]
        is_correct[b, k, j] = True
  relevance = hf["reader_relevance"]
  reader_loss, _ = objectives.reader_marginal_loss(logits, span_mask, relevance,
                                                   np.ones((batch, r), bool), is_correct)
  retriever_loss, _ = objectives.retriever_marginal_loss(relevance, np.ones((batch, r), bool),
                                                         hf["has_answers"])
  err_reader = rel_err(reader_loss, hf["reader_loss"])
  err_retriever = rel_err(retriever_loss, hf["retriever_loss"])
  print(f"reader: span logits {err:.1e} over {len(ours)} spans, reader loss {err_reader:.1e}, "
        f"retriever loss {err_retriever:.1e}")
  assert err < RTOL and err_reader < RTOL and err_retriever < RTOL
  # The span head's epsilon matters: BERT's 1e-12 there misses the bound.
  wrong = reader_lib.SpanReader(reader_lib.ReaderConfig(
      bert=reader_config.bert, span_hidden_size=8, max_span_width=3, layer_norm_eps=1e-12))
  wrong_logits = np.asarray(jax.jit(wrong.apply)({"params": checkpoint.towers["reader"]},
                                                 question, blocks).span_logits)
  assert np.abs(wrong_logits - logits)[span_mask].max() > RTOL * np.abs(theirs).max()


def test_openqa_bin_fills_the_query_tower_and_reader(hf):
  checkpoint = hf_weights.load_hf_checkpoint(FIXTURES / "openqa_bin")
  assert checkpoint.kind == "realm_openqa" and "block_emb" in checkpoint.skipped
  bert_config = hf_weights.bert_config_from_hf(FIXTURES / "openqa_bin", dropout_rate=0.0)
  model = reader_lib.OpenQAModel(reader_lib.OpenQAModelConfig(
      reader=reader_lib.ReaderConfig(bert=bert_config, span_hidden_size=8, max_span_width=3),
      embed_dim=8))
  question, blocks = hf["question"].astype(np.int32), hf["blocks"].astype(np.int32)
  cand = np.zeros((2, 3, 8), np.float32)
  shapes = jax.eval_shape(model.init, jax.random.key(0), question, cand, blocks)["params"]
  params = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), shapes)
  params = hf_weights.apply_hf_checkpoint(params, checkpoint, model_config=bert_config)
  embedder = hf_weights.load_hf_checkpoint(FIXTURES / "embedder").towers["embedder"]
  reader = hf_weights.load_hf_checkpoint(FIXTURES / "reader").towers["reader"]
  jax.tree_util.tree_map(np.testing.assert_array_equal, params["query_embedder"], embedder)
  jax.tree_util.tree_map(np.testing.assert_array_equal, params["reader"], reader)


# ---- errors that name the real cause ------------------------------------------------------


def test_realm_checkpoint_through_the_bert_loader_says_what_it_is():
  with pytest.raises(ValueError, match=r"HF REALM checkpoint \(realm_embedder.*"
                                       r"load_hf_checkpoint"):
    hf_weights.load_hf_bert_params(FIXTURES / "embedder")


def test_config_mismatches_name_each_field(config, realm_params):
  hf_config = hf_weights.read_hf_config(FIXTURES / "embedder")
  assert hf_weights.hf_config_mismatches(hf_config, config) == []
  exact = bert.BertConfig(**{**config.__dict__, "hidden_act": "gelu", "layer_norm_eps": 1e-5,
                             "num_layers": 3})
  problems = hf_weights.hf_config_mismatches(hf_config, exact, vocab_size=41)
  assert any("model.hidden_act='gelu'" in p and "hidden_act='gelu_new'" in p for p in problems)
  assert any("model.layer_norm_eps=1e-05" in p for p in problems)
  assert any("model.num_layers=3" in p for p in problems)
  assert any("vocab_size=40" in p for p in problems)
  assert len(problems) == 4, problems
  # config.model style (ml_collections: .get), with the retriever size of REALM checkpoints.
  model_config = {"hidden_size": 16, "num_layers": 2, "num_heads": 2, "intermediate_size": 32,
                  "max_position_embeddings": 64, "embed_dim": 128}
  problems = hf_weights.hf_config_mismatches(hf_config, model_config)
  assert any("model.hidden_act='gelu'" in p for p in problems), "default gelu != gelu_new"
  assert any("max_position_embeddings=64 exceeds" in p for p in problems)
  assert any("model.embed_dim=128" in p and "retriever_proj_size=8" in p for p in problems)
  with pytest.raises(ValueError, match="does not fit the model config: .*model.hidden_act=.gelu."):
    hf_weights.apply_hf_checkpoint(realm_params, FIXTURES / "embedder", model_config=exact)


def test_checkpoint_towers_the_model_lacks_or_pooler_off(hf, config, realm_params):
  with pytest.raises(ValueError, match="reader.*has no place in the model"):
    hf_weights.apply_hf_checkpoint(realm_params, FIXTURES / "reader")
  model = realm.RealmModel(realm.RealmModelConfig(bert=config, embed_dim=8, pad_id=PAD,
                                                  embedder_pooler=False))
  shapes = jax.eval_shape(model.init, jax.random.key(0), *_realm_inputs(hf))["params"]
  assert "pooler" not in shapes["embedder"]["bert"]
  with pytest.raises(ValueError, match="pooler.*model.embedder_pooler=False"):
    hf_weights.apply_hf_checkpoint(shapes, FIXTURES / "embedder")


def test_encoder_checkpoint_with_untied_decoder_names_it(tmp_path):
  from safetensors import numpy as safetensors_numpy  # pylint: disable=g-import-not-at-top
  tensors = {n: load() for n, load in
             hf_weights.read_hf_tensor_loaders(FIXTURES / "encoder").items()}
  tensors["cls.predictions.decoder.weight"] = tensors["realm.embeddings.word_embeddings.weight"] + 1
  safetensors_numpy.save_file(tensors, str(tmp_path / "model.safetensors"))
  with pytest.raises(ValueError, match="decoder.weight differs from the word embeddings"):
    hf_weights.load_hf_checkpoint(tmp_path)
  del tensors["cls.predictions.decoder.weight"]
  del tensors["realm.encoder.layer.1.output.dense.bias"]
  tensors["realm.encoder.layer.1.attention.self.rotary.weight"] = np.zeros((2, 2), np.float32)
  safetensors_numpy.save_file(tensors, str(tmp_path / "model.safetensors"))
  with pytest.raises(ValueError, match=r"no place in our BERT: encoder\.layer\.1\.attention"):
    hf_weights.load_hf_checkpoint(tmp_path)


def test_torch_bin_reader_refuses_code(tmp_path):
  import pickle  # pylint: disable=g-import-not-at-top
  import zipfile  # pylint: disable=g-import-not-at-top

  class Evil:
    def __reduce__(self):
      return (print, ("pwned",))

  with zipfile.ZipFile(tmp_path / "pytorch_model.bin", "w") as archive:
    archive.writestr("archive/data.pkl", pickle.dumps({"x": Evil()}))
  with pytest.raises(pickle.UnpicklingError, match="builtins.print is not part of"):
    hf_weights.read_hf_tensor_loaders(tmp_path)


def test_flat_names_of_loaded_trees_are_our_module_names(config, realm_params):
  flat = flax.traverse_util.flatten_dict(realm_params, sep="/")
  assert "embedder/bert/pooler/dense/kernel" in flat
  assert not any(k.startswith("encoder/bert/pooler") for k in flat)
  assert all(v.dtype == jnp.float32 for v in flat.values())


# ---- several checkpoint folders (model.init_from_hf="embedder,encoder") ---------------------


def test_several_folders_fill_the_model_like_one_at_a_time(hf, config, realm_params):
  """HF ships REALM's embedder and encoder as two checkpoints: one comma-separated value (or a
  list) loads both, exactly as two sequential loads do."""
  model = _realm_model(config)
  shapes = jax.eval_shape(model.init, jax.random.key(0), *_realm_inputs(hf))["params"]
  zeros = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), shapes)
  both = f"{FIXTURES / 'embedder'},{FIXTURES / 'encoder'}"
  for value in (both, [FIXTURES / "embedder", FIXTURES / "encoder"]):
    params = hf_weights.apply_hf_checkpoint(zeros, value, model_config=config, vocab_size=40)
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, realm_params)
  assert np.any(realm_params["encoder"]["cls"]["predictions"]["bias"])  # both towers loaded


def _openqa_zeros(hf):
  bert_config = hf_weights.bert_config_from_hf(FIXTURES / "embedder", dropout_rate=0.0)
  model = reader_lib.OpenQAModel(reader_lib.OpenQAModelConfig(
      reader=reader_lib.ReaderConfig(bert=bert_config, span_hidden_size=8, max_span_width=3),
      embed_dim=8))
  question, blocks = hf["question"].astype(np.int32), hf["blocks"].astype(np.int32)
  shapes = jax.eval_shape(model.init, jax.random.key(0), question,
                          np.zeros((2, 3, 8), np.float32), blocks)["params"]
  return bert_config, jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), shapes)


def test_embedder_and_encoder_folders_start_the_qa_towers(hf):
  """In the fine-tuning model the REALM encoder's BERT starts the reader (its MLM head has no
  place; the span head stays as it was), the embedder the query tower."""
  bert_config, zeros = _openqa_zeros(hf)
  params = hf_weights.apply_hf_checkpoint(
      zeros, f"{FIXTURES / 'embedder'},{FIXTURES / 'encoder'}", model_config=bert_config,
      towers=("query_embedder", "reader"))
  embedder = hf_weights.load_hf_checkpoint(FIXTURES / "embedder").towers["embedder"]
  encoder = hf_weights.load_hf_checkpoint(FIXTURES / "encoder").towers["encoder"]
  jax.tree_util.tree_map(np.testing.assert_array_equal, params["query_embedder"], embedder)
  jax.tree_util.tree_map(np.testing.assert_array_equal, params["reader"]["bert"],
                         encoder["bert"])
  jax.tree_util.tree_map(lambda x: np.testing.assert_array_equal(x, 0),
                         params["reader"]["qa_outputs"])


def test_two_folders_giving_the_same_parameter_is_an_error(hf, config, realm_params):
  with pytest.raises(ValueError, match=r"embedder/.*embedder_bin/.* both provide .*"
                                       r"embedder/bert/embeddings"):
    hf_weights.apply_hf_checkpoint(realm_params,
                                   f"{FIXTURES / 'embedder'},{FIXTURES / 'embedder_bin'}")
  _, zeros = _openqa_zeros(hf)
  with pytest.raises(ValueError, match=r"openqa_bin/.*encoder/.* both provide .*reader/bert/"):
    hf_weights.apply_hf_checkpoint(zeros, [FIXTURES / "openqa_bin", FIXTURES / "encoder"],
                                   towers=("query_embedder", "reader"))
  with pytest.raises(ValueError, match="an empty checkpoint path"):
    hf_weights.apply_hf_checkpoint(zeros, f"{FIXTURES / 'embedder'},")
