"""realm_jax.qa.answers against hand-written cases (SQuAD's normalization edge cases included)."""

import numpy as np
import pytest

from realm_jax.qa import answers


@pytest.mark.parametrize("text,expected", [
    ("The Beatles", "beatles"),
    ("  A   cat  ", "cat"),
    ("an apple, the pear!", "apple pear"),
    ("U.S.A.", "usa"),
    ("Hello,world", "helloworld"),  # punctuation is deleted, not turned into a space
    ("theater", "theater"),  # articles only as whole words
    ("Anne of the Island", "anne of island"),
    ("the-the", "thethe"),  # punctuation goes before articles: no longer a word "the"
    ("A", ""),
    ("1,988", "1988"),
    ("\tNew\nYork ", "new york"),
    ("na\u00efve", "nai\u0308ve"),  # NFD: "i" + combining diaeresis (not ASCII punctuation)
    ("“quoted”", "“quoted”"),  # curly quotes are not in string.punctuation (as in SQuAD)
])
def test_normalize_answer(text, expected):
  assert answers.normalize_answer(text) == expected


def test_exact_match_is_best_over_gold_answers():
  assert answers.exact_match("na\u00efve", ["nai\u0308ve"])  # composed == decomposed
  assert answers.exact_match("the Beatles.", ["Rolling Stones", "Beatles"])
  assert not answers.exact_match("Beatles band", ["Beatles"])
  assert answers.exact_match("", ["the"])  # both normalize to ""
  assert not answers.exact_match("Paris", [])


def test_regex_match_is_a_case_insensitive_prefix_match():
  patterns = ["Sept?(ember)?|Feb(ruary)?"]
  assert answers.regex_match("september", patterns)
  assert answers.regex_match("FEB", patterns)
  assert answers.regex_match("Sept 2010", patterns)  # re.match: a prefix is enough
  assert not answers.regex_match("in September", patterns)
  assert answers.regex_match("Saudi Arabia", ["nope", "saudi arabia"])


def test_bad_pattern_counts_as_wrong():
  assert not answers.pattern_compiles("Sievert \\(Sv\\)\\")
  assert not answers.regex_match("Sievert (Sv)", ["Sievert \\(Sv\\)\\"])
  assert answers.regex_match("radiation", ["Sievert \\(Sv\\)\\", "radiation"])


def test_is_correct_dispatches_on_kind():
  assert answers.is_correct("The cat", ["cat"], "exact")
  assert not answers.is_correct("The cat", ["cat"], "regex")  # "the" is not stripped for regex
  with pytest.raises(ValueError, match="answer_kind"):
    answers.is_correct("x", ["x"], "fuzzy")


_VOCAB = {"the": 1, "beatles": 2, "salzburg": 3, ",": 4, "austria": 5, "sept": 6, "##ember": 7,
          "in": 8}


def _tokenize(text):
  return [_VOCAB[w] for w in text.lower().replace(",", " , ").split()]


def test_answer_token_variants_raw_and_normalized():
  variants = answers.answer_token_variants(["The Beatles", "Salzburg, Austria", "the"],
                                           _tokenize)
  # "the" normalizes to "" (dropped); "the" raw stays; duplicates none.
  assert variants == ((1, 2), (2,), (3, 4, 5), (3, 5), (1,))


def test_find_answer_spans_inclusive_sorted_and_width_limited():
  block = np.array([8, 1, 2, 9, 2, 3, 4, 5])  # in the beatles x beatles salzburg , austria
  variants = [(1, 2), (2,), (3, 4, 5)]
  spans = answers.find_answer_spans(block, variants)
  np.testing.assert_array_equal(spans, [[1, 2], [2, 2], [4, 4], [5, 7]])
  np.testing.assert_array_equal(answers.find_answer_spans(block, variants, max_span_width=2),
                                [[1, 2], [2, 2], [4, 4]])
  assert answers.find_answer_spans(block, [(7, 7)]).shape == (0, 2)
  assert answers.find_answer_spans(block[:2], [(1, 2, 3)]).shape == (0, 2)


def test_find_answer_spans_respects_word_pieces():
  block = np.array([8, 6, 7, 6])  # in sept ##ember sept
  cont = np.array([False, False, True, False])
  np.testing.assert_array_equal(answers.find_answer_spans(block, [(6,)], is_continuation=cont),
                                [[3, 3]])
  np.testing.assert_array_equal(
      answers.find_answer_spans(block, [(6, 7)], is_continuation=cont), [[1, 2]])
  np.testing.assert_array_equal(answers.find_answer_spans(block, [(6,)]), [[1, 1], [3, 3]])


def test_block_has_answer_ignores_the_span_width_limit():
  block = np.arange(30)
  long_answer = tuple(range(5, 20))  # 15 wordpieces: no reader span, still "contains"
  assert answers.block_has_answer(block, [long_answer])
  assert answers.find_answer_spans(block, [long_answer]).shape == (0, 2)
  assert not answers.block_has_answer(block, [(3, 2)])


def test_find_regex_spans_full_match_on_word_boundaries():
  text = "It was in September, not Sept."
  words = ["It", "was", "in", "Sept", "ember", ",", "not", "Sept", "."]
  offsets, pos = [], 0
  for w in words:
    begin = text.index(w, pos)
    offsets.append((begin, begin + len(w)))
    pos = begin + len(w)
  spans = answers.find_regex_spans(text, np.array(offsets), ["Sept?(ember)?", "bad(("])
  # "Sept" alone inside "September" is not a word; "Sept"+"ember" and the last "Sept" are.
  np.testing.assert_array_equal(spans, [[3, 4], [7, 7]])
  assert answers.block_text_has_regex_answer(text, ["sept"])
  assert not answers.block_text_has_regex_answer(text, ["october", "bad(("])


def test_spans_to_mask_uses_the_start_major_layout():
  mask = answers.spans_to_mask(np.array([[0, 0], [2, 4], [5, 5], [1, 12], [7, 7]]),
                               block_len=6, max_span_width=3)
  assert mask.shape == (18,)
  # [2, 4] -> 2*3+2 = 8; [5, 5] -> 15; [1, 12] too wide and [7, 7] outside: dropped.
  assert np.flatnonzero(mask).tolist() == [0, 8, 15]


def test_cache_computes_each_pair_once():
  calls = []

  def compute(key, block_id):
    calls.append((key, block_id))
    return np.array([[block_id, block_id]])

  cache = answers.AnswerSpanCache(compute)
  for _ in range(3):
    for block_id in (4, 9):
      np.testing.assert_array_equal(cache.get("q1", block_id), [[block_id, block_id]])
  assert calls == [("q1", 4), ("q1", 9)]
  assert cache.hits == 4 and cache.misses == 2 and len(cache) == 2
  bounded = answers.AnswerSpanCache(compute, max_entries=1)
  bounded.get("q", 1), bounded.get("q", 2)
  assert len(bounded) == 1
