"""Open-QA evaluation on the host: best (block, span) per question, exact match, recall@k.

ORQA/REALM predict the argmax of the *joint* score (span score + the block's retrieval score)
over the reader's top blocks and all their spans; the prediction is the span's wordpieces
decoded to text, then judged by `answers.is_correct` (SQuAD-normalized EM, or CuratedTREC's
regex match).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable, Sequence

import numpy as np
from etils import epath

from realm_jax import storage

from realm_jax.qa import answers as answers_lib
from realm_jax.qa import data as data_lib

_LOG = logging.getLogger(__name__)

RECALL_KS = (1, 5, 20, 100)
_NO_SPAN = -1e8  # a joint score below this means no real span (all were masked, NEG_INF)


@dataclasses.dataclass(frozen=True)
class Prediction:
  """One question's answer, as written to predictions.jsonl."""

  question: str
  prediction: str
  score: float
  block_id: int  # corpus id of the block the span came from (-1: no span)
  block_title: str
  correct: bool = False

  def to_json(self) -> dict:
    return dict(question=self.question, prediction=self.prediction, score=self.score,
                block_id=self.block_id, block_title=self.block_title, correct=self.correct)


def best_spans(retrieval_logits: np.ndarray, span_logits: np.ndarray, spans: np.ndarray):
  """Argmax of span score + retrieval score over (reader block, span).

  Args:
    retrieval_logits: [B, K] (the reader blocks are the first R).
    span_logits: [B, R, S], NEG_INF at invalid spans (`models.reader.SpanReader`).
    spans: [S, 2] the reader's span table.

  Returns:
    (block_rank [B] in 0..R-1 or -1 where no span is valid, span [B, 2] inclusive block-local,
    score [B] the joint logit).
  """
  retrieval_logits = np.asarray(retrieval_logits, np.float32)
  span_logits = np.asarray(span_logits, np.float32)
  batch, r, s = span_logits.shape
  joint = (span_logits + retrieval_logits[:, :r, None]).reshape(batch, r * s)
  best = joint.argmax(axis=-1)
  score = joint[np.arange(batch), best]
  valid = span_logits.reshape(batch, -1)[np.arange(batch), best] > _NO_SPAN
  block_rank = np.where(valid, best // s, -1)
  return block_rank, np.asarray(spans)[best % s], score


def make_predictions(examples: Sequence[data_lib.QAExample], block_ids: np.ndarray,
                     reader_block_tokens: np.ndarray, block_rank: np.ndarray, span: np.ndarray,
                     score: np.ndarray, decode: Callable[[Sequence[int]], str],
                     title_of: Callable[[int], str] = lambda _: "") -> list[Prediction]:
  """Decodes each best span and judges it. block_ids [B, K] corpus ids of the retrieved
  blocks; reader_block_tokens [B, R, Lb]; the rest from `best_spans`."""
  predictions = []
  for i, example in enumerate(examples):
    rank = int(block_rank[i])
    if rank < 0:
      predictions.append(Prediction(example.question, "", float(score[i]), -1, ""))
      continue
    start, end = int(span[i, 0]), int(span[i, 1])
    text = decode([int(t) for t in reader_block_tokens[i, rank, start:end + 1]])
    block_id = int(block_ids[i, rank])
    predictions.append(Prediction(
        example.question, text, float(score[i]), block_id, title_of(block_id),
        answers_lib.is_correct(text, example.answers, example.answer_kind)))
  return predictions


def exact_match_metrics(predictions: Sequence[Prediction],
                        examples: Sequence[data_lib.QAExample]) -> dict[str, float]:
  """EM over all examples (a question without a prediction counts as wrong), with counts."""
  if len(predictions) != len(examples):
    raise ValueError(f"{len(predictions)} predictions for {len(examples)} examples")
  if not examples:
    raise ValueError("No examples to evaluate: exact match over 0 questions is undefined")
  correct = [answers_lib.is_correct(p.prediction, e.answers, e.answer_kind)
             for p, e in zip(predictions, examples)]
  bad_patterns = sum(not answers_lib.pattern_compiles(a) for e in examples
                     if e.answer_kind == "regex" for a in e.answers)
  return dict(exact_match=float(np.mean(correct)), num_correct=float(sum(correct)),
              num_examples=float(len(examples)),
              num_no_prediction=float(sum(p.block_id < 0 for p in predictions)),
              num_bad_patterns=float(bad_patterns))


def recall_at_k(has_answer: np.ndarray, ks: Sequence[int] = RECALL_KS) -> dict[str, float]:
  """Fraction of questions with an answer-bearing block among their top k, for each k that
  the retrieved depth allows. has_answer: [N, K] bool, ranked."""
  has_answer = np.asarray(has_answer, bool)
  if has_answer.shape[0] == 0:
    raise ValueError("No questions for recall@k")
  cumulative = np.cumsum(has_answer, axis=-1) > 0
  return {f"recall@{k}": float(cumulative[:, k - 1].mean()) for k in ks
          if k <= has_answer.shape[1]}


def reader_oracle_em(span_is_correct: np.ndarray) -> float:
  """Upper bound of the reader: some valid span of its R blocks is an answer. [N, R, S]."""
  span_is_correct = np.asarray(span_is_correct, bool)
  return float(span_is_correct.reshape(len(span_is_correct), -1).any(-1).mean())


def write_predictions(path: str | epath.PathLike, predictions: Sequence[Prediction]) -> None:
  """predictions.jsonl, one `{"question", "prediction", "score", "block_id", "block_title",
  "correct"}` per line; written to a temporary name and renamed, so never half-written."""
  path = epath.Path(path)
  storage.write_text(path, "".join(json.dumps(p.to_json(), ensure_ascii=False) + "\n"
                                   for p in predictions))
