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


# ---- Open-QA fine-tuning (ORQA/REALM, DESIGN.md §1) ----------------------------------------------
#
# Shapes: B questions, R reader blocks (reader_k, 5), S spans per block (the reader's span table),
# K retriever blocks (retriever_k, 5000 at paper scale); the R reader blocks are the first R of K.


class QAOutputs(NamedTuple):
  """Loss and metrics of one Open-QA batch (scalars, float32)."""

  loss: jax.Array  # reader_loss + retriever_loss
  reader_loss: jax.Array  # mean over questions with an answer span among the reader blocks
  retriever_loss: jax.Array  # mean over questions with an answer block among the K
  reader_answerable: jax.Array  # fraction of questions with an answer span in the R blocks
  retriever_answerable: jax.Array  # fraction with an answer-bearing block among the K
  span_accuracy: jax.Array  # the argmax (block, span) matches an answer, over all questions
  num_questions: jax.Array


def marginal_log_loss(logits, is_correct, valid):
  """-log of the softmax mass on the correct entries; 0 where no valid entry is correct.

  logits, is_correct, valid: [B, N]. The softmax runs over the valid entries only. Returns
  (loss [B] float32, has_correct [B] bool). Finite values and gradients throughout: masked
  entries are NEG_INF, not -inf, and a question without a correct entry gets zero gradient.
  """
  valid = valid.astype(bool)
  correct = is_correct.astype(bool) & valid
  logits = jnp.where(valid, logits.astype(jnp.float32), NEG_INF)
  has_correct = jnp.any(correct, axis=-1)
  log_denominator = jax.nn.logsumexp(logits, axis=-1)
  log_numerator = jax.nn.logsumexp(jnp.where(correct, logits, NEG_INF), axis=-1)
  return jnp.where(has_correct, log_denominator - log_numerator, 0.0), has_correct


def reader_marginal_loss(span_logits, span_mask, retrieval_logits, block_mask, span_is_correct):
  """The reader loss: one softmax over all (block, span) pairs of a question.

  Each pair's logit is the span's reader score plus the block's retrieval score
  f(x, z) = Embed(x) . Embed(z), so the loss also trains the query tower (ORQA eq. 4);
  loss = -log sum over answer-matching pairs of the joint softmax.

  Args:
    span_logits: [B, R, S] reader span scores.
    span_mask: [B, R, S] bool, True for real spans (inside the block, width <= max).
    retrieval_logits: [B, R] retrieval scores of the reader blocks.
    block_mask: [B, R] bool, False for padding blocks.
    span_is_correct: [B, R, S] bool, the span's wordpieces are an answer.

  Returns:
    (loss [B], has_correct [B]): loss 0 where no valid span matches.
  """
  batch = span_logits.shape[0]
  joint = span_logits.astype(jnp.float32) + retrieval_logits.astype(jnp.float32)[..., None]
  valid = span_mask.astype(bool) & block_mask.astype(bool)[..., None]
  return marginal_log_loss(joint.reshape(batch, -1), span_is_correct.reshape(batch, -1),
                           valid.reshape(batch, -1))


def retriever_marginal_loss(retrieval_logits, candidate_mask, has_answer):
  """The retriever's weak supervision: -log sum_{z contains an answer} p(z|x) over the top K.

  retrieval_logits, candidate_mask, has_answer: [B, K]. Returns (loss [B], has_answer_any [B]),
  loss 0 where no candidate contains an answer.
  """
  return marginal_log_loss(retrieval_logits, has_answer, candidate_mask)


def qa_loss(span_logits, span_mask, reader_retrieval_logits, reader_block_mask, span_is_correct,
            retrieval_logits, candidate_mask, has_answer) -> QAOutputs:
  """ORQA/REALM fine-tuning loss: reader loss + retriever loss, each averaged over the questions
  for which it is defined (an answer span among the reader blocks; an answer block among the K).

  Shapes as in `reader_marginal_loss` ([B, R, S], [B, R]) and `retriever_marginal_loss`
  ([B, K]). Questions with neither contribute nothing (as in ORQA, where their loss is 0).
  """
  reader, reader_has = reader_marginal_loss(span_logits, span_mask, reader_retrieval_logits,
                                            reader_block_mask, span_is_correct)
  retriever, retriever_has = retriever_marginal_loss(retrieval_logits, candidate_mask,
                                                     has_answer)
  reader_n = jnp.sum(reader_has)
  retriever_n = jnp.sum(retriever_has)
  reader_mean = jnp.sum(reader) / jnp.maximum(reader_n, 1)
  retriever_mean = jnp.sum(retriever) / jnp.maximum(retriever_n, 1)

  batch = span_logits.shape[0]
  valid = (span_mask.astype(bool) & reader_block_mask.astype(bool)[..., None]).reshape(batch, -1)
  joint = jnp.where(valid, (span_logits + reader_retrieval_logits[..., None]).reshape(batch, -1),
                    NEG_INF)
  best = jnp.argmax(joint, axis=-1)
  best_correct = jnp.take_along_axis(span_is_correct.reshape(batch, -1).astype(bool),
                                     best[:, None], axis=-1)[:, 0]
  best_correct &= jnp.take_along_axis(valid, best[:, None], axis=-1)[:, 0]
  num = jnp.float32(batch)
  return QAOutputs(
      loss=reader_mean + retriever_mean,
      reader_loss=reader_mean,
      retriever_loss=retriever_mean,
      reader_answerable=reader_n / num,
      retriever_answerable=retriever_n / num,
      span_accuracy=jnp.sum(best_correct) / num,
      num_questions=num,
  )
