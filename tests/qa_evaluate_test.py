"""realm_jax.qa.evaluate: argmax over (block, span), decoding, EM, recall@k, the JSONL file."""

import json

import numpy as np
import pytest

from realm_jax.models import reader
from realm_jax.qa import data
from realm_jax.qa import evaluate

WORDS = {5: "the", 6: "beatles", 7: "paris", 8: "france", 9: "sept"}


def _decode(ids):
  return " ".join(WORDS[i] for i in ids)


def test_best_spans_adds_the_retrieval_score():
  spans = reader.span_table(3, 2)  # S = 6
  span_logits = np.full((2, 2, 6), reader.NEG_INF, np.float32)
  span_logits[0, 0, 1] = 2.0  # block 0, span [0, 1]
  span_logits[0, 1, 4] = 1.5  # block 1, span [2, 2]
  retrieval = np.array([[0.0, 1.0, 9.0], [0.0, 0.0, 0.0]], np.float32)  # K = 3 > R = 2
  rank, span, score = evaluate.best_spans(retrieval, span_logits, spans)
  assert rank.tolist() == [1, -1]  # 1.5 + 1.0 beats 2.0 + 0.0; question 1 has no span
  np.testing.assert_array_equal(span[0], [2, 2])
  assert score[0] == pytest.approx(2.5)


def test_predictions_em_and_file(tmp_path):
  examples = [data.QAExample("who", ("Beatles",)), data.QAExample("where", ("Paris",)),
              data.QAExample("when", ("Sept(ember)?", "bad(("), "regex"),
              data.QAExample("nothing", ("x",))]
  tokens = np.array([[[5, 6, 3, 0]], [[7, 8, 3, 0]], [[9, 3, 0, 0]], [[3, 0, 0, 0]]])
  block_ids = np.array([[11, 12], [21, 22], [31, 32], [41, 42]])
  rank = np.array([0, 0, 0, -1])
  span = np.array([[0, 1], [1, 1], [0, 0], [0, 0]])
  preds = evaluate.make_predictions(examples, block_ids, tokens, rank, span,
                                    np.array([1.0, 2.0, 3.0, -1e9]), _decode,
                                    title_of=lambda i: f"doc {i}")
  assert [p.prediction for p in preds] == ["the beatles", "france", "sept", ""]
  assert [p.correct for p in preds] == [True, False, True, False]
  assert preds[1].block_title == "doc 21" and preds[3].block_id == -1
  metrics = evaluate.exact_match_metrics(preds, examples)
  assert metrics == dict(exact_match=0.5, num_correct=2.0, num_examples=4.0,
                         num_no_prediction=1.0, num_bad_patterns=1.0)
  with pytest.raises(ValueError, match="0 questions"):
    evaluate.exact_match_metrics([], [])
  path = tmp_path / "predictions.jsonl"
  evaluate.write_predictions(path, preds)
  rows = [json.loads(line) for line in path.read_text().splitlines()]
  assert rows[0] == dict(question="who", prediction="the beatles", score=1.0, block_id=11,
                         block_title="doc 11", correct=True)
  assert len(rows) == 4 and not (tmp_path / "predictions.jsonl.tmp").exists()


def test_recall_at_k_and_oracle():
  has_answer = np.zeros((4, 6), bool)
  has_answer[0, 0] = has_answer[1, 3] = has_answer[2, 5] = True
  assert evaluate.recall_at_k(has_answer, ks=(1, 5, 20)) == {"recall@1": 0.25,
                                                            "recall@5": 0.5}
  correct = np.zeros((4, 2, 3), bool)
  correct[1, 1, 2] = True
  assert evaluate.reader_oracle_em(correct) == 0.25


def test_prediction_is_the_whole_word_not_a_wordpiece_fragment(tmp_path):
  """The reader's best raw span is "##ember" of "sept ##ember" (then "sept"): decoded alone
  that is a fragment, never an answer. With the whole-word mask the host computes from the
  vocabulary ('##' pieces), the argmax is the whole word "september"."""
  from realm_jax.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  from realm_jax.qa import batches  # pylint: disable=g-import-not-at-top
  vocab = tmp_path / "vocab.txt"
  vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "rain", "in",
                              "sept", "##ember"]) + "\n")
  tok = tokenizer_lib.load_tokenizer(vocab)
  body = tok.encode("rain in september", add_special_tokens=False).ids
  assert [tok.id_to_token(i) for i in body] == ["rain", "in", "sept", "##ember"]
  block_len, width = 6, 3
  blocks = np.zeros((1, 1, block_len), np.int32)
  blocks[0, 0, :5] = [*body, 3]  # `block [SEP]`
  spans = reader.span_table(block_len, width)
  index = {tuple(s): j for j, s in enumerate(spans.tolist())}
  span_logits = np.full((1, 1, len(spans)), 0.0, np.float32)
  span_logits[0, 0, index[(3, 3)]] = 5.0  # "##ember"
  span_logits[0, 0, index[(2, 2)]] = 4.0  # "sept"
  span_logits[0, 0, index[(2, 3)]] = 3.0  # "september"
  in_block = spans[:, 1] < 4
  span_logits[0, 0, ~in_block] = reader.NEG_INF
  example = [data.QAExample("when does it rain", ("September",))]
  decode = lambda ids: tok.decode(list(ids))

  def predict(logits):
    rank, span, score = evaluate.best_spans(np.zeros((1, 1), np.float32), logits, spans)
    return evaluate.make_predictions(example, np.array([[7]]), blocks, rank, span, score,
                                     decode)[0]

  unmasked = predict(span_logits)
  assert unmasked.prediction != "september" and not unmasked.correct  # the bug
  continuation = batches.continuation_table(tok)[blocks]
  whole = np.asarray(reader.whole_word_span_mask(continuation, spans))
  fixed = predict(np.where(whole, span_logits, reader.NEG_INF))
  assert fixed.prediction == "september" and fixed.correct
