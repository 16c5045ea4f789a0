"""REALM, ICT and metric math as pure functions of logits (no models, no state).

Shapes: B queries, k candidates (slot 0 is the null document), M masked positions per query,
V vocabulary, D embedding size.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

NEG_INF = -1e9  # large finite value: keeps softmax and its gradients NaN-free


class RealmOutputs(NamedTuple):
  """Loss and metrics of one REALM batch (scalars, float32)."""

  loss: jax.Array  # -(mean marginal log-likelihood) per real masked token
  retrieval_utility: jax.Array  # marginal log-lik minus null-document log-lik, per token
  token_accuracy: jax.Array  # argmax of the marginal p(y|x) equals the label
  span_accuracy: jax.Array  # all masked tokens of a query right
  null_doc_prob: jax.Array  # mean p(z = null | x) over queries with masked tokens
  num_tokens: jax.Array  # number of real masked tokens (the loss's denominator)
  num_queries: jax.Array  # queries with at least one masked token


def retrieval_log_probs(retrieval_logits, candidate_mask):
  """log p(z|x): log-softmax over the k candidates; masked-out candidates get ~0 mass.

  retrieval_logits, candidate_mask: [B, k] -> [B, k] float32.
  """
  logits = jnp.where(candidate_mask, retrieval_logits.astype(jnp.float32), NEG_INF)
  return jax.nn.log_softmax(logits, axis=-1)


def label_log_probs(log_probs, labels):
  """log p(y_j | z, x) of the gold labels: log-probs [B, k, M, V], labels [B, M] -> [B, k, M]."""
  gold = jnp.broadcast_to(labels[:, None, :, None], log_probs.shape[:3] + (1,))
  return jnp.take_along_axis(log_probs, gold, axis=-1)[..., 0]


def marginal_log_likelihood(log_p_z, log_p_y, weights, marginalization: str = "token"):
  """Per-query log-likelihood of the masked tokens, marginalized over the candidates.

  Args:
    log_p_z: [B, k] log p(z|x).
    log_p_y: [B, k, M] log p(y_j|z, x) of the gold tokens.
    weights: [B, M] 1.0 for real masked tokens, 0.0 for padding.
    marginalization: "token" (original code: log sum_z p(z|x) p(y_j|z,x) for each token j)
      or "span" (paper: log sum_z p(z|x) prod_j p(y_j|z,x) over the whole span).

  Returns:
    [B] summed log-likelihood of each query's masked tokens.
  """
  if marginalization == "token":
    per_token = jax.nn.logsumexp(log_p_z[:, :, None] + log_p_y, axis=1)  # [B, M]
    return jnp.sum(per_token * weights, axis=-1)
  if marginalization == "span":
    span_log_p_y = jnp.sum(log_p_y * weights[:, None, :], axis=-1)  # [B, k]
    return jax.nn.logsumexp(log_p_z + span_log_p_y, axis=1)
  raise ValueError(f"loss.marginalization must be 'token' or 'span', got {marginalization!r}")


def realm_loss(retrieval_logits, candidate_mask, mlm_logits, labels, weights,
               marginalization: str = "token") -> RealmOutputs:
  """REALM's marginal likelihood loss and its metrics (DESIGN.md §1).

  Args:
    retrieval_logits: [B, k] re-embedded scores Embed(x) . Embed(z); slot 0 = null document.
    candidate_mask: [B, k] bool, False for padding candidates.
    mlm_logits: [B, k, M, V] reader logits at the masked positions.
    labels: [B, M] int32 gold token ids.
    weights: [B, M] float32, 1.0 for real masked tokens.
    marginalization: "token" or "span" (see `marginal_log_likelihood`).
  """
  weights = weights.astype(jnp.float32)
  log_p_z = retrieval_log_probs(retrieval_logits, candidate_mask)
  log_probs = jax.nn.log_softmax(mlm_logits.astype(jnp.float32), axis=-1)  # [B, k, M, V]
  log_p_y = label_log_probs(log_probs, labels)
  num_tokens = jnp.sum(weights)
  denominator = jnp.maximum(num_tokens, 1.0)
  marginal = marginal_log_likelihood(log_p_z, log_p_y, weights, marginalization)  # [B]
  null_only = jnp.sum(log_p_y[:, 0] * weights, axis=-1)  # [B] log-lik given the null doc
  loss = -jnp.sum(marginal) / denominator

  # The marginal predictive distribution over the vocabulary, for accuracy.
  marginal_vocab = jax.nn.logsumexp(log_p_z[:, :, None, None] + log_probs, axis=1)  # [B, M, V]
  correct = (jnp.argmax(marginal_vocab, axis=-1) == labels).astype(jnp.float32)  # [B, M]
  has_tokens = jnp.sum(weights, axis=-1) > 0  # [B]
  num_queries = jnp.sum(has_tokens)
  span_correct = jnp.all((correct > 0) | (weights == 0), axis=-1) & has_tokens
  return RealmOutputs(
      loss=loss,
      retrieval_utility=jnp.sum(marginal - null_only) / denominator,
      token_accuracy=jnp.sum(correct * weights) / denominator,
      span_accuracy=jnp.sum(span_correct) / jnp.maximum(num_queries, 1),
      null_doc_prob=jnp.sum(jnp.exp(log_p_z[:, 0]) * has_tokens) / jnp.maximum(num_queries, 1),
      num_tokens=num_tokens,
      num_queries=num_queries.astype(jnp.float32),
  )


def gold_doc_prob(retrieval_logits, candidate_mask, is_gold):
  """Mean p(z = gold | x) over queries whose gold document is among their candidates.

  retrieval_logits, candidate_mask, is_gold: [B, k]. A diagnostic: REALM should raise it.
  """
  p_z = jnp.exp(retrieval_log_probs(retrieval_logits, candidate_mask))
  has_gold = jnp.any(is_gold & candidate_mask, axis=-1)
  mass = jnp.sum(jnp.where(is_gold & candidate_mask, p_z, 0.0), axis=-1)
  return jnp.sum(mass * has_gold) / jnp.maximum(jnp.sum(has_gold), 1)


def ict_loss(query_emb, doc_emb):
  """Inverse Cloze Task loss with in-batch negatives.

  query_emb, doc_emb: [B, D], row i of each is a positive pair; every other block of the
  batch is a negative. Under `jax.jit` on a batch sharded over devices this is the *global*
  batch: the [B, B] score matrix spans all devices. Returns (loss, accuracy), float32 scalars.
  """
  scores = jnp.einsum("qd,bd->qb", query_emb.astype(jnp.float32),
                      doc_emb.astype(jnp.float32))  # [B, B]
  log_probs = jax.nn.log_softmax(scores, axis=-1)
  labels = jnp.arange(scores.shape[0])
  loss = -jnp.mean(jnp.take_along_axis(log_probs, labels[:, None], axis=-1))
  accuracy = jnp.mean((jnp.argmax(scores, axis=-1) == labels).astype(jnp.float32))
  return loss, accuracy


def recall_at_k(retrieved_ids, gold_ids) -> float:
  """Host-side: fraction of queries whose gold doc is among the retrieved ids.

  retrieved_ids: [B, k]; gold_ids: [B] (-1 = unknown, ignored).
  """
  retrieved_ids, gold_ids = np.asarray(retrieved_ids), np.asarray(gold_ids)
  known = gold_ids >= 0
  hit = (retrieved_ids == gold_ids[:, None]).any(axis=-1) & known
  return float(hit.sum() / max(int(known.sum()), 1))
