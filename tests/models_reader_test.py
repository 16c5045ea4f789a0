"""realm_jax.models.reader: span table, masking, and the projection math against numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from realm_jax.models import bert
from realm_jax.models import reader
from realm_jax.qa import answers

PAD, CLS, SEP = 0, 2, 3
W = 4  # max span width in this test


def _config():
  b = bert.BertConfig(vocab_size=40, hidden_size=32, num_layers=1, num_heads=2,
                      intermediate_size=64, max_position_embeddings=64, dropout_rate=0.0)
  return reader.ReaderConfig(b, span_hidden_size=16, max_span_width=W)


def _inputs():
  # Questions of lengths 4 and 6; blocks of 5 and 2 real tokens (+ [SEP]) out of Lb = 8.
  questions = np.array([[CLS, 10, 11, SEP, PAD, PAD], [CLS, 12, 13, 14, 15, SEP]], np.int32)
  blocks = np.zeros((2, 2, 8), np.int32)
  blocks[0, 0, :6] = [20, 21, 22, 23, 24, SEP]
  blocks[0, 1, :3] = [25, 26, SEP]
  blocks[1, 0, :8] = [20, 21, 22, 23, 24, 25, 26, SEP]
  blocks[1, 1, :1] = [SEP]  # an empty block: no span at all
  return questions, blocks


@pytest.fixture(scope="module")
def model_and_params():
  model = reader.SpanReader(_config())
  questions, blocks = _inputs()
  params = model.init(jax.random.key(0), questions, blocks)["params"]
  # Non-trivial LayerNorm and bias values, so the check is not blind to them.
  rng = np.random.default_rng(0)
  qa = jax.tree_util.tree_map(lambda x: x + 0.1 * rng.normal(size=x.shape).astype(np.float32),
                              params["qa_outputs"])
  return model, dict(params, qa_outputs=qa)


def test_span_table_is_start_major_and_matches_answers_layout():
  table = reader.span_table(5, 3)
  assert table.shape == (15, 2)
  np.testing.assert_array_equal(table[:4], [[0, 0], [0, 1], [0, 2], [1, 1]])
  idx = answers.span_index(table[:, 0], table[:, 1], 3)
  np.testing.assert_array_equal(idx, np.arange(15))


def test_shapes_and_mask(model_and_params):
  model, params = model_and_params
  questions, blocks = _inputs()
  out = model.apply({"params": params}, questions, blocks)
  assert out.span_logits.shape == (2, 2, 8 * W) and out.span_mask.shape == (2, 2, 8 * W)
  assert out.span_logits.dtype == jnp.float32
  block_lengths = np.array([[5, 2], [7, 0]])
  for b in range(2):
    for z in range(2):
      expected = out.spans[:, 1] < block_lengths[b, z]  # inside the block, not on [SEP]
      np.testing.assert_array_equal(np.asarray(out.span_mask[b, z]), expected)
      logits = np.asarray(out.span_logits[b, z])
      assert np.all(logits[~expected] == reader.NEG_INF)
      assert np.all(np.abs(logits[expected]) < 1e3)
  # A span ending on the block's last real token is in; one reaching its [SEP] is out.
  assert bool(out.span_mask[0, 0, 4 * W + 0]) and not bool(out.span_mask[0, 0, 4 * W + 1])
  assert not np.any(np.asarray(out.span_mask[1, 1]))


def _layer_norm(x, scale, bias, eps):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * scale + bias


def _reference_logits(hidden, q_len, params, eps):
  """Every span's score from BERT's hidden states [T, H], written out in float64."""
  qa = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), params["qa_outputs"])
  p = qa["dense_intermediate"]
  proj = hidden.astype(np.float64) @ p["kernel"] + p["bias"]  # [T, 2P]
  half = proj.shape[-1] // 2
  table = reader.span_table(8, W)
  scores = []
  for start, end in table:
    s = q_len + start
    e = min(q_len + end, len(hidden) - 1)
    x = np.maximum(proj[s, :half] + proj[e, half:], 0.0)
    ln = qa["layer_normalization"]
    x = _layer_norm(x, ln["scale"], ln["bias"], eps)
    scores.append(float(x @ qa["dense_output"]["kernel"][:, 0] + qa["dense_output"]["bias"][0]))
  return np.array(scores)


def test_span_logits_match_numpy_projection(model_and_params):
  model, params = model_and_params
  questions, blocks = _inputs()
  out = model.apply({"params": params}, questions, blocks)
  hidden, q_lens, _ = model.apply({"params": params}, questions, blocks, method=model.encode)
  for b, z in [(0, 0), (1, 0)]:
    mask = np.asarray(out.span_mask[b, z])
    ref = _reference_logits(np.asarray(hidden[b, z]), int(q_lens[b]), params, eps=1e-3)
    # float32 matmuls of width <= 64 against float64: 2e-5 covers the rounding.
    np.testing.assert_allclose(np.asarray(out.span_logits[b, z])[mask], ref[mask],
                               rtol=2e-5, atol=2e-5)
    # The reader's LayerNorm epsilon is 1e-3 (HF), and it shows at this scale.
    ref_bert_eps = _reference_logits(np.asarray(hidden[b, z]), int(q_lens[b]), params,
                                     eps=1e-12)
    assert np.max(np.abs(ref_bert_eps[mask] - ref[mask])) > 1e-3


def test_open_qa_model_scores_fixed_doc_embeddings():
  config = reader.OpenQAModelConfig(_config(), embed_dim=8)
  model = reader.OpenQAModel(config)
  questions, blocks = _inputs()
  doc_emb = np.random.default_rng(1).normal(size=(2, 5, 8)).astype(np.float32)
  params = model.init(jax.random.key(1), questions, doc_emb, blocks)["params"]
  assert set(params) == {"query_embedder", "reader"}
  assert set(params["reader"]) == {"bert", "qa_outputs"}
  out = model.apply({"params": params}, questions, doc_emb, blocks)
  q_emb = model.apply({"params": params}, questions, method=model.embed_questions)
  np.testing.assert_allclose(np.asarray(out.retrieval_logits),
                             np.einsum("bd,bkd->bk", np.asarray(q_emb), doc_emb),
                             rtol=1e-5, atol=1e-5)
  assert out.span_logits.shape == (2, 2, 8 * W)


def test_whole_word_span_mask_matches_a_brute_force_reference():
  """A span may start only on a word start and end only before a word start (or the end)."""
  rng = np.random.default_rng(3)
  cont = rng.random((3, 2, 9)) < 0.4
  spans = reader.span_table(9, W)
  got = np.asarray(reader.whole_word_span_mask(cont, spans))
  assert got.shape == (3, 2, 9 * W)
  for idx in np.ndindex(3, 2):
    c = cont[idx]
    for j, (start, end) in enumerate(spans):
      ends_word = end + 1 >= len(c) or not c[end + 1]
      assert got[idx + (j,)] == (not c[start] and ends_word), (idx, start, end)


def test_reader_masks_spans_inside_words_and_the_argmax_moves(model_and_params):
  """The unmasked best span is made to start on a '##' piece (the flags do not change the
  tokens, so the scores stay the same): with the flags given it is masked, every surviving
  span is whole-word, and the rest of the scores are unchanged."""
  model, params = model_and_params
  questions, blocks = _inputs()
  plain = model.apply({"params": params}, questions, blocks)
  spans = reader.span_table(blocks.shape[-1], W)
  best = int(np.argmax(np.asarray(plain.span_logits[0, 0])))
  start, end = spans[best]
  cont = np.zeros(blocks.shape, bool)
  cont[0, 0, start] = True  # the best span now starts inside a word
  out = model.apply({"params": params}, questions, blocks, block_is_continuation=cont)
  mask = np.asarray(out.span_mask)
  assert np.asarray(plain.span_mask)[0, 0, best] and not mask[0, 0, best]
  assert int(np.argmax(np.asarray(out.span_logits[0, 0]))) != best
  expected = np.asarray(plain.span_mask) & np.asarray(reader.whole_word_span_mask(cont, spans))
  np.testing.assert_array_equal(mask, expected)
  np.testing.assert_array_equal(np.asarray(out.span_logits)[mask],
                                np.asarray(plain.span_logits)[mask])
  assert np.all(np.asarray(out.span_logits)[~mask] == reader.NEG_INF)
