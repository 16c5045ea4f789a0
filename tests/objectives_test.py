"""REALM and ICT objectives against a written-out numpy reference (float64)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from realm_jax import objectives

# float32 logsumexp/softmax against a float64 reference: 1e-5 relative is ~100 ulps.
RTOL, ATOL = 1e-5, 1e-5


def _log_softmax(x, axis):
  x = x - x.max(axis=axis, keepdims=True)
  return x - np.log(np.exp(x).sum(axis=axis, keepdims=True))


def _reference_realm(retrieval_logits, mask, mlm_logits, labels, weights, marginalization):
  """The formulas of DESIGN.md §1 written out with loops, float64."""
  batch, k, m, _ = mlm_logits.shape
  total_ll, total_null, total_tokens, correct, span_correct, queries = 0., 0., 0., 0., 0., 0.
  for b in range(batch):
    scores = np.where(mask[b], retrieval_logits[b], -np.inf)
    p_z = np.exp(scores - scores.max())
    p_z /= p_z.sum()
    p_y = np.exp(_log_softmax(mlm_logits[b], axis=-1))  # [k, M, V]
    real = [j for j in range(m) if weights[b, j] > 0]
    total_tokens += len(real)
    if marginalization == "token":
      total_ll += sum(np.log(sum(p_z[z] * p_y[z, j, labels[b, j]] for z in range(k)))
                      for j in real)
    else:
      total_ll += np.log(sum(p_z[z] * np.prod([p_y[z, j, labels[b, j]] for j in real])
                             for z in range(k)))
    total_null += sum(np.log(p_y[0, j, labels[b, j]]) for j in real)
    marginal = np.einsum("z,zmv->mv", p_z, p_y)
    hits = [marginal[j].argmax() == labels[b, j] for j in real]
    correct += sum(hits)
    if real:
      queries += 1
      span_correct += all(hits)
  return dict(loss=-total_ll / total_tokens,
              retrieval_utility=(total_ll - total_null) / total_tokens,
              token_accuracy=correct / total_tokens,
              span_accuracy=span_correct / queries)


def _random_inputs(seed, batch=4, k=5, m=3, vocab=11):
  rng = np.random.default_rng(seed)
  retrieval_logits = rng.normal(size=(batch, k)) * 3
  mask = np.ones((batch, k), bool)
  mask[1, -2:] = False  # padding candidates
  mlm_logits = rng.normal(size=(batch, k, m, vocab)) * 2
  labels = rng.integers(0, vocab, size=(batch, m))
  weights = np.ones((batch, m))
  weights[0, 2] = 0.0
  weights[2, 1:] = 0.0
  return retrieval_logits, mask, mlm_logits, labels, weights


@pytest.mark.parametrize("marginalization", ["token", "span"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_realm_loss_matches_numpy_reference(marginalization, seed):
  inputs = _random_inputs(seed)
  expected = _reference_realm(*inputs, marginalization)
  out = objectives.realm_loss(*[jnp.asarray(x) for x in inputs], marginalization=marginalization)
  for name, value in expected.items():
    np.testing.assert_allclose(float(getattr(out, name)), value, rtol=RTOL, atol=ATOL,
                               err_msg=name)
  assert float(out.num_tokens) == inputs[4].sum()


def test_token_and_span_agree_for_single_token_spans():
  retrieval_logits, mask, mlm_logits, labels, _ = _random_inputs(3)
  weights = np.zeros(labels.shape)
  weights[:, 0] = 1.0
  token = objectives.realm_loss(retrieval_logits, mask, mlm_logits, labels, weights, "token")
  span = objectives.realm_loss(retrieval_logits, mask, mlm_logits, labels, weights, "span")
  np.testing.assert_allclose(token.loss, span.loss, rtol=1e-6)


def test_masked_candidates_get_no_probability():
  retrieval_logits, mask, mlm_logits, labels, weights = _random_inputs(4)
  out = objectives.realm_loss(retrieval_logits, mask, mlm_logits, labels, weights)
  # Changing what sits in masked-out slots must not change anything.
  logits2, mlm2 = retrieval_logits.copy(), mlm_logits.copy()
  logits2[1, -2:] += 50.0
  mlm2[1, -2:] *= -3.0
  out2 = objectives.realm_loss(logits2, mask, mlm2, labels, weights)
  np.testing.assert_allclose(out.loss, out2.loss, rtol=1e-6)


def test_retrieval_utility_positive_when_a_document_helps():
  # Candidate 1 predicts the labels well, the null document (0) does not.
  batch, k, m, vocab = 2, 3, 2, 7
  labels = np.array([[1, 2], [3, 4]])
  mlm_logits = np.zeros((batch, k, m, vocab))
  for b in range(batch):
    for j in range(m):
      mlm_logits[b, 1, j, labels[b, j]] = 10.0
  retrieval_logits = np.array([[0.0, 5.0, 0.0], [0.0, 5.0, 0.0]])
  out = objectives.realm_loss(retrieval_logits, np.ones((batch, k), bool), mlm_logits, labels,
                              np.ones((batch, m)))
  assert float(out.retrieval_utility) > 1.0
  assert float(out.token_accuracy) == 1.0 and float(out.span_accuracy) == 1.0


def _reference_ict(q, d):
  scores = q @ d.T
  log_probs = _log_softmax(scores, axis=-1)
  return -np.mean(np.diag(log_probs)), np.mean(scores.argmax(-1) == np.arange(len(q)))


def test_ict_loss_matches_numpy_reference():
  rng = np.random.default_rng(0)
  q, d = rng.normal(size=(16, 8)), rng.normal(size=(16, 8))
  loss, acc = objectives.ict_loss(jnp.asarray(q), jnp.asarray(d))
  ref_loss, ref_acc = _reference_ict(q, d)
  np.testing.assert_allclose(float(loss), ref_loss, rtol=RTOL)
  assert float(acc) == pytest.approx(ref_acc)


def test_ict_loss_uses_the_global_batch_when_sharded():
  """On 8 devices with the batch sharded, negatives still come from every device."""
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top
  assert jax.device_count() == 8, "tests/conftest.py sets 8 fake CPU devices"
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  rng = np.random.default_rng(1)
  q, d = rng.normal(size=(16, 8)), rng.normal(size=(16, 8))
  sharding = NamedSharding(mesh, P("data"))
  loss, _ = jax.jit(objectives.ict_loss)(jax.device_put(q.astype(np.float32), sharding),
                                         jax.device_put(d.astype(np.float32), sharding))
  np.testing.assert_allclose(float(loss), _reference_ict(q, d)[0], rtol=RTOL)
  # A per-device loss (2 rows, 1 negative each) would differ from the global one.
  local = np.mean([_reference_ict(q[i:i + 2], d[i:i + 2])[0] for i in range(0, 16, 2)])
  assert abs(local - float(loss)) > 1e-3


def test_recall_at_k_ignores_unknown_gold():
  retrieved = np.array([[1, 2], [3, 4], [5, 6]])
  assert objectives.recall_at_k(retrieved, np.array([2, 7, -1])) == 0.5
