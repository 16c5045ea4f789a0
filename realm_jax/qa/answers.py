"""Answer matching: exact match for evaluation, and answer spans in blocks for training.

Evaluation (host, strings): `exact_match` compares SQuAD-normalized strings, best over the gold
answers; `regex_match` is CuratedTREC's `re.match(pattern, prediction, IGNORECASE)` (DrQA/ORQA
add UNICODE and MULTILINE; a pattern that does not compile counts as wrong, and is counted).

Training supervision (host, token ids): which wordpiece spans of a block are an answer
(`find_answer_spans`, the reader's targets) and whether a block contains one at all
(`block_has_answer`, the retriever's weak supervision). Both are numpy over one block's tokens
and depend only on (example, block), so `AnswerSpanCache` computes each pair once for the whole
run instead of once per step (HF's port re-tokenizes and re-matches 5000 blocks every step).
"""

from __future__ import annotations

import functools
import logging
import re
import string
import unicodedata
from collections.abc import Callable, Hashable, Iterable, Sequence

import numpy as np

_LOG = logging.getLogger(__name__)

MAX_SPAN_WIDTH = 10  # wordpieces (ORQA/REALM)

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
  """SQuAD's normalization: lowercase, drop ASCII punctuation, drop the articles a/an/the,
  collapse whitespace. ORQA first applies Unicode NFD, as here (a no-op on ASCII)."""
  text = unicodedata.normalize("NFD", text).lower()
  text = "".join(ch for ch in text if ch not in _PUNCTUATION)
  text = _ARTICLES.sub(" ", text)
  return " ".join(text.split())


def exact_match(prediction: str, answers: Iterable[str]) -> bool:
  """True when the normalized prediction equals any normalized gold answer."""
  normalized = normalize_answer(prediction)
  return any(normalized == normalize_answer(answer) for answer in answers)


@functools.lru_cache(maxsize=65536)
def _compile(pattern: str) -> re.Pattern | None:
  try:
    return re.compile(pattern, flags=re.IGNORECASE | re.UNICODE | re.MULTILINE)
  except (re.error, RecursionError, OverflowError):
    _LOG.warning("Answer pattern does not compile, counted as wrong: %r", pattern)
    return None


def pattern_compiles(pattern: str) -> bool:
  return _compile(pattern) is not None


def regex_match(prediction: str, patterns: Iterable[str]) -> bool:
  """CuratedTREC: True when any pattern matches at the start of the prediction (`re.match`,
  case-insensitive). A pattern that does not compile never matches."""
  for pattern in patterns:
    compiled = _compile(pattern)
    if compiled is not None and compiled.match(prediction) is not None:
      return True
  return False


def is_correct(prediction: str, answers: Sequence[str], answer_kind: str) -> bool:
  """The metric of one prediction: `exact_match` ("exact") or `regex_match` ("regex")."""
  if answer_kind == "exact":
    return exact_match(prediction, answers)
  if answer_kind == "regex":
    return regex_match(prediction, answers)
  raise ValueError(f"answer_kind must be 'exact' or 'regex', got {answer_kind!r}")


# ---- wordpiece spans -------------------------------------------------------------------------


def answer_token_variants(answers: Iterable[str], tokenize: Callable[[str], Sequence[int]]
                          ) -> tuple[tuple[int, ...], ...]:
  """The token-id sequences to look for in blocks: each answer as written and normalized.

  `tokenize` maps text to wordpiece ids without special tokens (the corpus's tokenizer, so a
  lowercasing vocab already folds case). The normalized form drops articles and punctuation
  ("The Beatles" -> "beatles"), the raw one keeps "salzburg , austria" findable. Duplicates
  and empty tokenizations are dropped; the order is stable.
  """
  variants: dict[tuple[int, ...], None] = {}
  for answer in answers:
    for text in (answer, normalize_answer(answer)):
      ids = tuple(int(i) for i in tokenize(text))
      if ids:
        variants.setdefault(ids, None)
  return tuple(variants)


def _word_boundaries(num_tokens: int, is_continuation: np.ndarray | None):
  """(may_start [L], may_end [L]): a span may not start on or end before a '##' piece."""
  if is_continuation is None:
    ones = np.ones(num_tokens, bool)
    return ones, ones
  cont = np.asarray(is_continuation, bool)[:num_tokens]
  may_end = np.ones(num_tokens, bool)
  may_end[:-1] = ~cont[1:]
  return ~cont, may_end


def find_answer_spans(block_tokens: np.ndarray, answer_variants: Sequence[Sequence[int]],
                      max_span_width: int = MAX_SPAN_WIDTH,
                      is_continuation: np.ndarray | None = None) -> np.ndarray:
  """Every [start, end] (inclusive, block-local) where an answer's wordpieces occur.

  Args:
    block_tokens: [L] int, the block's own tokens only (no [SEP], no padding).
    answer_variants: token-id sequences (`answer_token_variants`).
    max_span_width: spans longer than this are not the reader's candidates and are skipped.
    is_continuation: optional [L] bool, True for '##' pieces; a match must then cover whole
      words ("sept" does not match the first piece of "sept ##ember").

  Returns:
    [N, 2] int32 spans sorted by (start, end), without duplicates.
  """
  block = np.asarray(block_tokens)
  may_start, may_end = _word_boundaries(len(block), is_continuation)
  found = set()
  for answer in answer_variants:
    width = len(answer)
    if not 0 < width <= min(max_span_width, len(block)):
      continue
    windows = np.lib.stride_tricks.sliding_window_view(block, width)  # [L - width + 1, width]
    starts = np.nonzero(np.all(windows == np.asarray(answer)[None, :], axis=-1))[0]
    for start in starts:
      end = start + width - 1
      if may_start[start] and may_end[end]:
        found.add((int(start), int(end)))
  if not found:
    return np.zeros((0, 2), np.int32)
  return np.asarray(sorted(found), np.int32)


def block_has_answer(block_tokens: np.ndarray, answer_variants: Sequence[Sequence[int]],
                     is_continuation: np.ndarray | None = None) -> bool:
  """The retriever's weak label: the block contains an answer (of any width)."""
  return len(find_answer_spans(block_tokens, answer_variants, max_span_width=len(block_tokens),
                               is_continuation=is_continuation)) > 0


def find_regex_spans(block_text: str, token_offsets: np.ndarray, patterns: Iterable[str],
                     max_span_width: int = MAX_SPAN_WIDTH) -> np.ndarray:
  """CuratedTREC spans: token spans whose original text *fully* matches a pattern.

  Args:
    block_text: the block's text that `token_offsets` index into.
    token_offsets: [L, 2] character [begin, end) of each block token (HF tokenizers'
      `Encoding.offsets`, special tokens removed).
    patterns: regular expressions (bad ones are skipped).
    max_span_width: widest span in tokens.

  `fullmatch` rather than evaluation's prefix `match`: as a training target, "Saudi Arabia is"
  must not count as the answer "Saudi Arabia". Spans must start and end on word boundaries of
  the text. Returns [N, 2] int32 inclusive spans, sorted.
  """
  compiled = [c for c in (_compile(p) for p in patterns) if c is not None]
  offsets = np.asarray(token_offsets)
  found = []
  for start in range(len(offsets)):
    begin = int(offsets[start, 0])
    if begin > 0 and block_text[begin - 1].isalnum() and block_text[begin].isalnum():
      continue
    for end in range(start, min(start + max_span_width, len(offsets))):
      stop = int(offsets[end, 1])
      if stop < len(block_text) and block_text[stop].isalnum() and block_text[stop - 1].isalnum():
        continue
      text = block_text[begin:stop]
      if any(c.fullmatch(text) for c in compiled):
        found.append((start, end))
  return np.asarray(found, np.int32).reshape(-1, 2)


def regex_spans_in_texts(spans: np.ndarray, span_texts: Sequence[str],
                         patterns: Iterable[str]) -> np.ndarray:
  """The candidate spans [M, 2] whose text some pattern `fullmatch`es (case-insensitive).

  CuratedTREC training targets over detokenized candidate spans (`qa.batches.candidate_spans`):
  `fullmatch` rather than evaluation's prefix `match`, so "Saudi Arabia is" is not the
  answer "Saudi Arabia". Patterns that do not compile never match. Returns [N, 2] int32.
  """
  compiled = [c for c in (_compile(p) for p in patterns) if c is not None]
  spans = np.asarray(spans, np.int32).reshape(-1, 2)
  if not compiled:
    return np.zeros((0, 2), np.int32)
  keep = [i for i, text in enumerate(span_texts) if any(c.fullmatch(text) for c in compiled)]
  return spans[keep].reshape(-1, 2)


def block_text_has_regex_answer(block_text: str, patterns: Iterable[str]) -> bool:
  """CuratedTREC's weak label: some pattern matches anywhere in the block's text."""
  return any(c.search(block_text) is not None
             for c in (_compile(p) for p in patterns) if c is not None)


def span_index(start, end, max_span_width: int = MAX_SPAN_WIDTH):
  """Index of block-local span [start, end] in the reader's span table (start-major):
  `start * max_span_width + (end - start)` (see `models.reader.span_table`)."""
  return np.asarray(start) * max_span_width + (np.asarray(end) - np.asarray(start))


def spans_to_mask(spans: np.ndarray, block_len: int, max_span_width: int = MAX_SPAN_WIDTH
                  ) -> np.ndarray:
  """[N, 2] inclusive spans -> [block_len * max_span_width] bool over the reader's span table.

  Spans that do not fit (start >= block_len, wider than max_span_width) are dropped.
  """
  mask = np.zeros(block_len * max_span_width, bool)
  spans = np.asarray(spans).reshape(-1, 2)
  width = spans[:, 1] - spans[:, 0]
  fits = (spans[:, 0] >= 0) & (spans[:, 0] < block_len) & (width >= 0) & (
      width < max_span_width) & (spans[:, 1] < block_len)
  mask[span_index(spans[fits, 0], spans[fits, 1], max_span_width)] = True
  return mask


class AnswerSpanCache:
  """Answer spans per (example key, block id), computed once for the run.

  `compute(key)` is called on a miss only; blocks and answers do not change during
  fine-tuning (the index is frozen), so the spans of a pair never go stale. `hits` and
  `misses` say how much matching the cache saved.
  """

  def __init__(self, compute: Callable[[Hashable, int], np.ndarray], max_entries: int = 0):
    self._compute = compute
    self._max_entries = max_entries  # 0: unbounded
    self._store: dict[tuple[Hashable, int], np.ndarray] = {}
    self.hits = 0
    self.misses = 0

  def get(self, example_key: Hashable, block_id: int) -> np.ndarray:
    key = (example_key, int(block_id))
    spans = self._store.get(key)
    if spans is not None:
      self.hits += 1
      return spans
    self.misses += 1
    spans = self._compute(example_key, int(block_id))
    if self._max_entries and len(self._store) >= self._max_entries:
      self._store.pop(next(iter(self._store)))  # oldest first
    self._store[key] = spans
    return spans

  def __len__(self) -> int:
    return len(self._store)
