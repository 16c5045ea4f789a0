"""Host-side Open-QA batches: questions encoded once, answer spans matched once per
(question, block) and cached, the retrieved blocks' frozen embeddings gathered from the index.

Builds the arrays `realm_jax.qa.steps` reads (`steps.QA_KEYS`). Exact-match answers (NQ,
WebQuestions, facts questions) are wordpiece matches (`answers.find_answer_spans`) against the
corpus's reader rows (`body [SEP]`). CuratedTREC's regular expressions are matched on text: a
candidate span (whole words, width <= max_span_width) is an answer when a pattern
`re.fullmatch`es its detokenized text (the reader's own decoding of those wordpieces, case
folded), and a block has an answer when a pattern is found anywhere in its detokenized body
(`answers.regex_spans_in_texts`, `answers.block_text_has_regex_answer`).
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Sequence

import numpy as np
import tokenizers

from realm_jax.data import corpus as corpus_lib
from realm_jax.data import tokenizer as tokenizer_lib
from realm_jax.qa import answers as answers_lib
from realm_jax.qa import data as data_lib

_LOG = logging.getLogger(__name__)


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


def candidate_spans(tokens: np.ndarray, is_continuation: np.ndarray, max_span_width: int
                    ) -> np.ndarray:
  """[M, 2] int32 inclusive (start, end) of every whole-word span of <= max_span_width
  wordpieces in a block's tokens [L] (no span starts on, or ends before, a '##' piece)."""
  length = len(tokens)
  cont = np.asarray(is_continuation, bool)[:length]
  may_start, may_end = ~cont, np.ones(length, bool)
  may_end[:-1] = ~cont[1:]
  starts = np.repeat(np.arange(length), max_span_width)
  ends = starts + np.tile(np.arange(max_span_width), length)
  keep = (ends < length)
  starts, ends = starts[keep], ends[keep]
  keep = may_start[starts] & may_end[ends]
  return np.stack([starts[keep], ends[keep]], axis=-1).astype(np.int32).reshape(-1, 2)


class AnswerMatcher:
  """Answer spans and answer labels of (example, block) pairs against a `BlockCorpus`, each
  computed once on the host and cached.

  Exact answers: the cache holds all occurrences of any width; `has_answer` (retriever
  supervision, recall@k) is "any occurrence", the reader's mask keeps those of width <=
  max_span_width. Regex answers: `spans` are the candidate spans whose detokenized text a
  pattern fully matches (width <= max_span_width), `has_answer` is a pattern search over the
  block's detokenized body (any width, as ORQA's weak label). A pattern that does not compile
  never matches and is counted in `bad_patterns` (not a crash).
  """

  def __init__(self, examples: Sequence[data_lib.QAExample], tokenizer: tokenizers.Tokenizer,
               corpus: corpus_lib.BlockCorpus, max_span_width: int = answers_lib.MAX_SPAN_WIDTH,
               max_cache_entries: int = 0, max_block_text_entries: int = 512):
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False).ids
    self.kinds = [e.answer_kind for e in examples]
    self.variants = [answers_lib.answer_token_variants(e.answers, encode)
                     if e.answer_kind == "exact" else () for e in examples]
    self.patterns: list[tuple[str, ...]] = []
    self.bad_patterns = 0  # (example, pattern) pairs whose pattern does not compile
    for e in examples:
      if e.answer_kind == "regex":
        good = tuple(p for p in e.answers if answers_lib.pattern_compiles(p))
        self.bad_patterns += len(e.answers) - len(good)
        self.patterns.append(good)
      else:
        self.patterns.append(())
    if self.bad_patterns:
      _LOG.warning("%d answer patterns do not compile: they never match (counted in "
                   "AnswerMatcher.bad_patterns)", self.bad_patterns)
    self.tokenizer = tokenizer
    self.corpus = corpus
    self.max_span_width = max_span_width
    self._continuation = continuation_table(tokenizer)
    self.cache = answers_lib.AnswerSpanCache(self._compute, max_cache_entries)
    self.label_cache = answers_lib.AnswerSpanCache(self._compute_label, max_cache_entries)
    self._body_texts: collections.OrderedDict[int, str] = collections.OrderedDict()
    self._span_texts: collections.OrderedDict[int, tuple] = collections.OrderedDict()
    self._max_block_text_entries = max_block_text_entries

  def use_corpus(self, corpus: corpus_lib.BlockCorpus) -> None:
    """Matches against `corpus` (a newer corpus version) from now on. The caches stay valid: a
    version never changes a row it keeps (ids only grow; removed rows read as the null block, never
    retrieved again), so a cached (question, block) answer is still that block's."""
    self.corpus = corpus

  def is_continuation(self, tokens: np.ndarray) -> np.ndarray:
    """Same-shape bool: True for '##' wordpieces (the vocabulary's continuations), False for
    word starts, special tokens and padding. The reader masks spans that start or end inside
    a word with it (`models.reader.whole_word_span_mask`)."""
    table = self._continuation
    return table[np.clip(np.asarray(tokens), 0, len(table) - 1)]

  def _block(self, block_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(tokens [L], is_continuation [L]) of a block's body (its final [SEP] dropped)."""
    length = max(int(self.corpus.reader_lengths[block_id]) - 1, 0)
    tokens = np.asarray(self.corpus.reader_tokens[block_id, :length])
    return tokens, self.is_continuation(tokens)

  def body_text(self, block_id: int) -> str:
    """The detokenized body of a block (the regex weak label searches it)."""
    entry = self._body_texts.get(block_id)
    if entry is None:
      entry = self.tokenizer.decode(self._block(block_id)[0].tolist())
      self._body_texts[block_id] = entry
      if len(self._body_texts) > self._max_block_text_entries:
        self._body_texts.popitem(last=False)
    else:
      self._body_texts.move_to_end(block_id)
    return entry

  def span_texts(self, block_id: int) -> tuple[np.ndarray, list[str]]:
    """(candidate spans [M, 2], their detokenized texts [M]) of a block, kept for the last
    `max_block_text_entries` blocks (shared by every question); only reader blocks need them."""
    entry = self._span_texts.get(block_id)
    if entry is not None:
      self._span_texts.move_to_end(block_id)
      return entry
    tokens, cont = self._block(block_id)
    spans = candidate_spans(tokens, cont, self.max_span_width)
    entry = (spans, self.tokenizer.decode_batch([tokens[a:b + 1].tolist() for a, b in spans]))
    self._span_texts[block_id] = entry
    if len(self._span_texts) > self._max_block_text_entries:
      self._span_texts.popitem(last=False)
    return entry

  def _compute(self, example_index: int, block_id: int) -> np.ndarray:
    if self.kinds[example_index] == "regex":
      spans, texts = self.span_texts(block_id)
      return answers_lib.regex_spans_in_texts(spans, texts, self.patterns[example_index])
    tokens, cont = self._block(block_id)
    return answers_lib.find_answer_spans(tokens, self.variants[example_index],
                                         max_span_width=max(len(tokens), 1),
                                         is_continuation=cont)

  def _compute_label(self, example_index: int, block_id: int) -> bool:
    return answers_lib.block_text_has_regex_answer(self.body_text(block_id),
                                                   self.patterns[example_index])

  def spans(self, example_index: int, block_id: int) -> np.ndarray:
    """[N, 2] int32 answer spans of the block (block-local, inclusive)."""
    return self.cache.get(example_index, block_id)

  def has_answer(self, example_index: int, block_id: int) -> bool:
    """The block contains an answer (the retriever's weak label; recall@k)."""
    if self.kinds[example_index] == "regex":
      return bool(self.label_cache.get(example_index, block_id))
    return len(self.spans(example_index, block_id)) > 0

  def match(self, example_index: int, block_id: int, want_spans: bool
            ) -> tuple[bool, np.ndarray | None]:
    """(has_answer, spans or None): one cache look-up per pair for exact answers."""
    if self.kinds[example_index] == "regex":
      return (self.has_answer(example_index, block_id),
              self.spans(example_index, block_id) if want_spans else None)
    spans = self.spans(example_index, block_id)
    return len(spans) > 0, spans


def build_qa_batch(example_indices: np.ndarray, question_tokens: np.ndarray,
                   ids: np.ndarray, doc_embeddings: np.ndarray | None, matcher: AnswerMatcher,
                   reader_k: int, cand_mask: np.ndarray | None = None,
                   gold_ids: np.ndarray | None = None) -> dict[str, np.ndarray]:
  """One batch for `steps.make_qa_train_step`.

  Args:
    example_indices: [B] rows of the matcher's examples.
    question_tokens: [N, Lq] all encoded questions (`encode_questions`).
    ids: [B, K] retrieved block ids, best first (the index's search result).
    doc_embeddings: [num_blocks, D] the frozen index embeddings (row = block id); None for
      a retriever without embeddings (BM25): the batch then has no `cand_doc_emb`.
    matcher: answer spans per (example, block).
    reader_k: the reader reads the first reader_k of the K blocks.
    cand_mask: [B, K] bool, False for padding candidates (default all True).
    gold_ids: [B] each question's known gold block, -1 where unknown (`qa.supervision=
      "gold"`): a known gold block is the only positive, for the retriever's label and the
      reader's spans alike, so a block that merely contains the answer string (another
      person's profile that names the same instrument) teaches nothing; questions without
      one keep answer matching.
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
  reader_tokens = np.asarray(corpus.reader_tokens[ids[:, :reader_k]], np.int32)
  for b, example in enumerate(np.asarray(example_indices)):
    for j in range(k):
      if not cand_mask[b, j]:
        continue
      has_answer[b, j], spans = matcher.match(int(example), int(ids[b, j]), j < reader_k)
      if j < reader_k:
        span_is_correct[b, j] = answers_lib.spans_to_mask(spans, body_len, width)
  if gold_ids is not None:
    gold_ids = np.asarray(gold_ids)
    is_gold = ids == gold_ids[:, None]  # [B, K]
    known = (gold_ids >= 0)[:, None]
    has_answer &= ~known | is_gold
    span_is_correct &= (~known | is_gold[:, :reader_k])[:, :, None]
  out = dict(
      question_tokens=np.asarray(question_tokens[np.asarray(example_indices)], np.int32),
      cand_mask=cand_mask,
      cand_has_answer=has_answer,
      reader_block_tokens=reader_tokens,
      reader_block_continuation=matcher.is_continuation(reader_tokens),
      span_is_correct=span_is_correct,
  )
  if doc_embeddings is not None:
    out["cand_doc_emb"] = np.asarray(doc_embeddings[ids], np.float32)
  return out
