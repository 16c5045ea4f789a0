"""Host-side Open-QA batches: questions encoded once, answer spans matched once per
(question, block) and cached, the retrieved blocks' frozen embeddings gathered from the index.

Builds the arrays `realm_jax.qa.steps` reads (`steps.QA_KEYS`). Answer matching is wordpiece
matching (`answers.find_answer_spans`) against the corpus's reader rows (`body [SEP]`), so it
covers the exact-match datasets (NQ, WebQuestions, facts questions). CuratedTREC's regex
answers need block text with token offsets (`answers.find_regex_spans`), which `BlockCorpus`
does not store yet: `AnswerMatcher` refuses them with a clear error.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import tokenizers

from realm_jax.data import corpus as corpus_lib
from realm_jax.data import tokenizer as tokenizer_lib
from realm_jax.qa import answers as answers_lib
from realm_jax.qa import data as data_lib


def encode_questions(examples: Sequence[data_lib.QAExample], tokenizer: tokenizers.Tokenizer,
                     query_len: int, pad_id: int) -> np.ndarray:
  """[N, query_len] int32 `[CLS] question [SEP]`, cut to fit and right-padded."""
  encodings = tokenizer.encode_batch([e.question for e in examples], add_special_tokens=False)
  special = tokenizer_lib.special_ids(tokenizer)
  out = np.full((len(examples), query_len), pad_id, np.int32)
  for i, encoding in enumerate(encodings):
    ids = [special.cls, *encoding.ids[:query_len - 2], special.sep]
    out[i, :len(ids)] = ids
  return out


def continuation_table(tokenizer: tokenizers.Tokenizer) -> np.ndarray:
  """[vocab] bool: True for '##' continuation wordpieces."""
  vocab = tokenizer.get_vocab()
  table = np.zeros(max(vocab.values()) + 1, bool)
  for token, i in vocab.items():
    table[i] = token.startswith("##")
  return table


class AnswerMatcher:
  """Answer spans of (example, block) pairs against a `BlockCorpus`, each computed once.

  The cache holds all occurrences of any width: `has_answer` (retriever supervision) is
  "any occurrence", the reader's mask keeps those of width <= max_span_width.
  """

  def __init__(self, examples: Sequence[data_lib.QAExample], tokenizer: tokenizers.Tokenizer,
               corpus: corpus_lib.BlockCorpus, max_span_width: int = answers_lib.MAX_SPAN_WIDTH,
               max_cache_entries: int = 0):
    regex = [e for e in examples if e.answer_kind == "regex"]
    if regex:
      raise ValueError(
          f"{len(regex)} examples have regular-expression answers (CuratedTREC); matching "
          "them in blocks needs block text with token offsets, not supported yet")
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False).ids
    self.variants = [answers_lib.answer_token_variants(e.answers, encode) for e in examples]
    self.corpus = corpus
    self.max_span_width = max_span_width
    self._continuation = continuation_table(tokenizer)
    self.cache = answers_lib.AnswerSpanCache(self._compute, max_cache_entries)

  def _compute(self, example_index: int, block_id: int) -> np.ndarray:
    length = max(int(self.corpus.reader_lengths[block_id]) - 1, 0)  # drop the final [SEP]
    tokens = np.asarray(self.corpus.reader_tokens[block_id, :length])
    cont = self._continuation[np.clip(tokens, 0, len(self._continuation) - 1)]
    return answers_lib.find_answer_spans(tokens, self.variants[example_index],
                                         max_span_width=max(length, 1), is_continuation=cont)

  def spans(self, example_index: int, block_id: int) -> np.ndarray:
    return self.cache.get(example_index, block_id)


def build_qa_batch(example_indices: np.ndarray, question_tokens: np.ndarray,
                   ids: np.ndarray, doc_embeddings: np.ndarray, matcher: AnswerMatcher,
                   reader_k: int, cand_mask: np.ndarray | None = None) -> dict[str, np.ndarray]:
  """One batch for `steps.make_qa_train_step`.

  Args:
    example_indices: [B] rows of the matcher's examples.
    question_tokens: [N, Lq] all encoded questions (`encode_questions`).
    ids: [B, K] retrieved block ids, best first (the index's search result).
    doc_embeddings: [num_blocks, D] the frozen index embeddings (row = block id).
    matcher: answer spans per (example, block).
    reader_k: the reader reads the first reader_k of the K blocks.
    cand_mask: [B, K] bool, False for padding candidates (default all True).
  """
  ids = np.asarray(ids)
  batch, k = ids.shape
  if not 0 < reader_k <= k:
    raise ValueError(f"qa.reader_k={reader_k} must be in [1, retriever_k={k}]")
  cand_mask = np.ones((batch, k), bool) if cand_mask is None else np.asarray(cand_mask, bool)
  corpus = matcher.corpus
  body_len = corpus.body_len
  width = matcher.max_span_width
  has_answer = np.zeros((batch, k), bool)
  span_is_correct = np.zeros((batch, reader_k, body_len * width), bool)
  for b, example in enumerate(np.asarray(example_indices)):
    for j in range(k):
      if not cand_mask[b, j]:
        continue
      spans = matcher.spans(int(example), int(ids[b, j]))
      has_answer[b, j] = len(spans) > 0
      if j < reader_k:
        span_is_correct[b, j] = answers_lib.spans_to_mask(spans, body_len, width)
  return dict(
      question_tokens=np.asarray(question_tokens[np.asarray(example_indices)], np.int32),
      cand_doc_emb=np.asarray(doc_embeddings[ids], np.float32),
      cand_mask=cand_mask,
      cand_has_answer=has_answer,
      reader_block_tokens=np.asarray(corpus.reader_tokens[ids[:, :reader_k]], np.int32),
      span_is_correct=span_is_correct,
  )
