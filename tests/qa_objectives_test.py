"""Open-QA losses in realm_jax.objectives against a written-out numpy reference (float64)."""

import jax
import jax.numpy as jnp
import numpy as np

from realm_jax import objectives

# float32 logsumexp over <= 60 entries against float64: 1e-5 relative is ~100 ulps.
RTOL, ATOL = 1e-5, 1e-5


def _neg_log_mass(logits, valid, correct):
  """-log sum_{correct & valid} softmax_{valid}(logits), written with explicit loops."""
  entries = [(l, c) for l, v, c in zip(logits, valid, correct) if v]
  if not any(c for _, c in entries):
    return 0.0, False
  top = max(l for l, _ in entries)
  total = sum(np.exp(l - top) for l, _ in entries)
  good = sum(np.exp(l - top) for l, c in entries if c)
  return -np.log(good / total), True


def _reference_reader(span_logits, span_mask, retrieval_logits, block_mask, correct):
  batch, r, s = span_logits.shape
  losses, has = [], []
  for b in range(batch):
    logits, valid, corr = [], [], []
    for z in range(r):
      for j in range(s):
        logits.append(span_logits[b, z, j] + retrieval_logits[b, z])
        valid.append(bool(span_mask[b, z, j] and block_mask[b, z]))
        corr.append(bool(correct[b, z, j]))
    loss, h = _neg_log_mass(logits, valid, corr)
    losses.append(loss)
    has.append(h)
  return np.array(losses), np.array(has)


def _inputs(seed, batch=4, r=3, s=6, k=7):
  rng = np.random.default_rng(seed)
  span_logits = rng.normal(size=(batch, r, s)) * 3
  span_mask = rng.random((batch, r, s)) > 0.3
  retrieval_logits = rng.normal(size=(batch, k)) * 2
  block_mask = np.ones((batch, r), bool)
  block_mask[1, -1] = False  # a padding reader block
  correct = rng.random((batch, r, s)) > 0.8
  correct[2] = False  # no answer span at all: loss 0
  correct[3] = False
  correct[3, 0, 0] = True
  span_mask[3, 0, 0] = False  # its only "answer" span is invalid: still no answer
  correct[1, -1, :] = False
  correct[1, -1, 0] = True  # an "answer" in a padding block must not count
  correct[1, 0, np.flatnonzero(span_mask[1, 0])[0]] = True
  cand_mask = np.ones((batch, k), bool)
  cand_mask[0, -2:] = False
  has_answer = rng.random((batch, k)) > 0.6
  has_answer[2] = False
  has_answer[0, :] = False
  has_answer[0, -1] = True  # only a padding candidate has it: no answer
  has_answer[1, 0] = True
  return span_logits, span_mask, retrieval_logits, block_mask, correct, cand_mask, has_answer


def test_reader_loss_matches_reference_with_masking_and_no_answer():
  span_logits, span_mask, retrieval_logits, block_mask, correct, _, _ = _inputs(0)
  r = span_logits.shape[1]
  loss, has = objectives.reader_marginal_loss(
      jnp.float32(span_logits), span_mask, jnp.float32(retrieval_logits[:, :r]), block_mask,
      correct)
  ref_loss, ref_has = _reference_reader(span_logits, span_mask, retrieval_logits[:, :r],
                                        block_mask, correct)
  np.testing.assert_array_equal(np.asarray(has), ref_has)
  assert ref_has.tolist() == [True, True, False, False]
  np.testing.assert_allclose(np.asarray(loss), ref_loss, rtol=RTOL, atol=ATOL)
  assert float(loss[2]) == 0.0 and float(loss[3]) == 0.0


def test_retriever_loss_matches_reference():
  _, _, retrieval_logits, _, _, cand_mask, has_answer = _inputs(1)
  loss, has = objectives.retriever_marginal_loss(jnp.float32(retrieval_logits), cand_mask,
                                                 has_answer)
  for b in range(retrieval_logits.shape[0]):
    ref, ref_has = _neg_log_mass(retrieval_logits[b], cand_mask[b], has_answer[b])
    assert bool(has[b]) == ref_has
    np.testing.assert_allclose(float(loss[b]), ref, rtol=RTOL, atol=ATOL)
  assert not bool(has[0]) and not bool(has[2])


def test_qa_loss_means_over_answerable_questions_and_grads_are_finite():
  span_logits, span_mask, retrieval_logits, block_mask, correct, cand_mask, has_answer = (
      _inputs(2))
  r = span_logits.shape[1]

  def total(span_logits, retrieval_logits):
    return objectives.qa_loss(span_logits, span_mask, retrieval_logits[:, :r], block_mask,
                              correct, retrieval_logits, cand_mask, has_answer)

  out = total(jnp.float32(span_logits), jnp.float32(retrieval_logits))
  ref_reader, ref_rhas = _reference_reader(span_logits, span_mask, retrieval_logits[:, :r],
                                           block_mask, correct)
  ref_retr = [_neg_log_mass(retrieval_logits[b], cand_mask[b], has_answer[b])
              for b in range(len(has_answer))]
  ref_reader_mean = ref_reader.sum() / ref_rhas.sum()
  ref_retr_mean = sum(l for l, _ in ref_retr) / sum(h for _, h in ref_retr)
  np.testing.assert_allclose(float(out.reader_loss), ref_reader_mean, rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(float(out.retriever_loss), ref_retr_mean, rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(float(out.loss), ref_reader_mean + ref_retr_mean, rtol=RTOL,
                             atol=ATOL)
  assert float(out.reader_answerable) == ref_rhas.mean()
  assert float(out.retriever_answerable) == np.mean([h for _, h in ref_retr])

  # span_accuracy: the argmax over valid (block, span) pairs is an answer.
  joint = np.where(span_mask & block_mask[..., None],
                   span_logits + retrieval_logits[:, :r, None], -np.inf).reshape(4, -1)
  best = joint.argmax(-1)
  np.testing.assert_allclose(float(out.span_accuracy),
                             np.mean(correct.reshape(4, -1)[np.arange(4), best]))

  grads = jax.grad(lambda a, b: total(a, b).loss, argnums=(0, 1))(
      jnp.float32(span_logits), jnp.float32(retrieval_logits))
  for g in grads:
    assert np.all(np.isfinite(np.asarray(g)))
  # No gradient reaches invalid spans, padding blocks or questions with no answer span.
  g_span = np.asarray(grads[0])
  assert np.all(g_span[~span_mask] == 0)
  assert np.all(g_span[1, -1] == 0)
  assert np.all(g_span[2] == 0) and np.all(g_span[3] == 0)


def test_all_invalid_or_no_answer_gives_zero_loss_and_zero_grad():
  span_logits = jnp.zeros((2, 2, 3))
  mask = np.zeros((2, 2, 3), bool)
  correct = np.ones((2, 2, 3), bool)
  loss, has = objectives.reader_marginal_loss(span_logits, mask, jnp.zeros((2, 2)),
                                              np.ones((2, 2), bool), correct)
  assert not np.any(np.asarray(has)) and np.all(np.asarray(loss) == 0)
  out = objectives.qa_loss(span_logits, mask, jnp.zeros((2, 2)), np.ones((2, 2), bool),
                           correct, jnp.zeros((2, 4)), np.ones((2, 4), bool),
                           np.zeros((2, 4), bool))
  assert float(out.loss) == 0.0 and float(out.span_accuracy) == 0.0
