"""Tests of realm_jax.data.salient_spans: date regexes, taggers, merging, wordpiece alignment."""

import os
import sys

import pytest

from realm_jax.data import salient_spans
from realm_jax.data import tokenizer as tokenizer_lib

WIKIGOLD = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "ner",
                        "wikigold.conll.txt")

DATE_CASES = [
    ("He was born on 12 May 1999 in Paris.", ["12 May 1999"]),
    ("On May 12, 1999, it rained.", ["May 12, 1999"]),
    ("It opened in May 1999.", ["May 1999"]),
    ("It opened in 1999.", ["1999"]),
    ("It was popular in the 1990s.", ["1990s"]),
    ("The tower was built in the 12th century.", ["12th century"]),
    ("Released 2001-05-12 worldwide.", ["2001-05-12"]),
    ("Vesuvius erupted in AD 79.", ["AD 79"]),
    ("Rome was at war in 79 BC and 500 B.C. too.", ["79 BC", "500 B.C."]),
    ("Declared on the 4th of July 1776.", ["4th of July 1776"]),
    ("Attacked on Sept. 11, 2001.", ["Sept. 11, 2001"]),
    ("On 3 Jan 2020 and Dec 25 we met.", ["3 Jan 2020", "Dec 25"]),
    ("It dates from the fifth century BC.", ["fifth century BC"]),
    ("The war (1939–1945) ended.", ["1939–1945"]),
    ("From 1939 to 1945.", ["1939", "1945"]),
    ("The years 1000 and 2099 bound the range.", ["1000", "2099"]),
    ("In 1999 elections were held; the 1990 elections too.", ["1999", "1990"]),
    ("Signed 12/05/2001.", ["12/05/2001"]),
    # Not dates.
    ("1234 people attended.", []),
    ("They shipped version 3000.", []),
    ("May I help you?", []),
    ("He may 12 times ask.", []),
    ("In 999 and 2100 and 12345 cases.", []),
    ("It weighs 2000 kg and costs $1999 or 1,999 euros, 1999.5 on average.", []),
    ("See page 1999.", []),
]


def _texts(text, spans):
  return [text[start:end] for start, end in spans]


def _assert_well_formed(text, spans):
  """Sorted, non-overlapping, non-empty, in bounds, no surrounding whitespace."""
  assert all(isinstance(s, tuple) and len(s) == 2 for s in spans)
  for start, end in spans:
    assert 0 <= start < end <= len(text)
    assert not text[start].isspace() and not text[end - 1].isspace()
    assert text[start] not in ",;:!?()\"" and text[end - 1] not in ",;:!?()\""
  for (_, end), (start, _) in zip(spans, spans[1:]):
    assert end <= start


@pytest.mark.parametrize("text, expected", DATE_CASES)
def test_find_dates(text, expected):
  spans = salient_spans.find_dates(text)
  assert _texts(text, spans) == expected
  _assert_well_formed(text, spans)


def test_find_dates_offsets():
  assert salient_spans.find_dates("On 12 May 1999, in 2001-05-12.") == [(3, 14), (19, 29)]


def test_merge_spans():
  merged = salient_spans.merge_spans([(5, 8), (0, 3), (2, 4), (8, 9), (6, 6), (7, 12)])
  assert merged == [(0, 4), (5, 12)]
  assert salient_spans.merge_spans([(3, 4), (4, 6)]) == [(3, 4), (4, 6)]  # touching stay apart
  assert salient_spans.merge_spans([]) == []


def test_builtin_finds_multiword_names_and_skips_sentence_initial_the():
  tagger = salient_spans.BuiltinTagger()
  text = "The Bank of America moved to New York City in 2001. The Beatles met Leonardo da Vinci."
  spans = tagger(text)
  assert _texts(text, spans) == [
      "Bank of America", "New York City", "2001", "Beatles", "Leonardo da Vinci"]
  _assert_well_formed(text, spans)


@pytest.mark.parametrize("text, expected", [
    ("In Paris, he said that I met Mary. He left.", ["Paris", "Mary"]),
    ("They met. John Smith came from the Congress of the people.", ["John Smith", "Congress"]),
    ("Colonel Jesse Auton saw World War I in St. Louis with John F. Kennedy.",
     ["Jesse Auton", "World War I", "St. Louis", "John F. Kennedy"]),
    ("Angola and Mozambique, (Kenya) \"Ghana\"", ["Angola", "Mozambique", "Kenya", "Ghana"]),
    ("However, the opponents spoke. Opponents of the plan left.", []),
    ("Apparently Hitzig wrote America's history.", ["Hitzig", "America"]),
    ("He was Professor of Physics with Dr. Nner.", ["Physics", "Nner"]),
])
def test_builtin_phrases(text, expected):
  spans = salient_spans.BuiltinTagger()(text)
  assert _texts(text, spans) == expected
  _assert_well_formed(text, spans)


def test_builtin_options():
  text = "Angola and Mozambique grew 5 km and $3 million in May 2001."
  assert _texts(text, salient_spans.BuiltinTagger(join_and=True)(text)) == [
      "Angola and Mozambique", "May 2001"]
  assert _texts(text, salient_spans.BuiltinTagger(dates=False)(text)) == [
      "Angola", "Mozambique", "May"]
  assert _texts(text, salient_spans.BuiltinTagger(numbers=True)(text)) == [
      "Angola", "Mozambique", "5 km", "$3 million", "May 2001"]


def test_taggers_return_well_formed_spans():
  texts = [text for text, _ in DATE_CASES] + [
      " (The U.S. Army) , \"Bank of America\" ... 12 May 1999;  and   New  York. ", "", "...",
      "Washington D.C. The city of 1999", "Procter & Gamble, Jr. and Smith Jr."]
  for name in ("dates", "builtin"):
    tagger = salient_spans.make_tagger(name)
    for text, spans in zip(texts, salient_spans.tag_batch(tagger, texts)):
      _assert_well_formed(text, spans)
      assert spans == tagger(text)


def test_make_tagger_and_tag_batch():
  assert salient_spans.make_tagger("dates") is salient_spans.find_dates
  assert isinstance(salient_spans.make_tagger("builtin"), salient_spans.BuiltinTagger)
  with pytest.raises(ValueError, match="dates.*builtin.*spacy"):
    salient_spans.make_tagger("bert")

  class Batched:
    def __call__(self, text):
      raise AssertionError("tag_batch should be used")

    def tag_batch(self, texts):
      return [[(0, len(text))] for text in texts]

  assert salient_spans.tag_batch(Batched(), ["ab", "c"]) == [[(0, 2)], [(0, 1)]]


def test_spacy_tagger_missing_spacy_raises_import_error_with_hint(monkeypatch):
  monkeypatch.setitem(sys.modules, "spacy", None)  # makes `import spacy` fail
  with pytest.raises(ImportError, match="pip install 'spacy"):
    salient_spans.SpacyTagger()


# ------------------------------------------------------------------------------------------------
# Wordpiece alignment.

_TOKENIZER_TEXTS = [
    "the bank of america opened in new york city",
    "an unbelievable story about the bank",
    "new york is a city of banks and stories",
] * 3


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  return tokenizer_lib.train_wordpiece(_TOKENIZER_TEXTS, 60, tmp_path_factory.mktemp("vocab"))


def _decode(tokenizer, ids):
  return tokenizer.decode(ids).removeprefix("##").replace(" ##", "")


def test_align_to_wordpieces_recovers_span_text(tokenizer):
  text = "An unbelievable story: the Bank of America opened in New York City."
  encoding = tokenizer.encode(text)
  assert len(encoding.ids) > len(text.split())  # some words are split into several pieces
  for span_text in ("Bank of America", "New York City", "unbelievable", "story"):
    start = text.index(span_text)
    a, b = salient_spans.align_to_wordpieces(encoding.offsets, (start, start + len(span_text)))
    assert _decode(tokenizer, encoding.ids[a:b]) == span_text.lower()


def test_align_to_wordpieces_span_starting_mid_word(tokenizer):
  text = "An unbelievable story about the bank."
  encoding = tokenizer.encode(text)
  start = text.index("believable")
  span = (start, text.index(" story"))
  a, b = salient_spans.align_to_wordpieces(encoding.offsets, span)
  offsets = encoding.offsets
  # The pieces cover the span and no piece more: the first and last overlap it.
  assert offsets[a][0] <= span[0] < offsets[a][1]
  assert offsets[b - 1][0] < span[1] <= offsets[b - 1][1]
  assert offsets[a][0] > text.index("unbelievable")  # starts inside the word, not at "un..."
  decoded = _decode(tokenizer, encoding.ids[a:b])
  assert "believable" in decoded and decoded in "unbelievable"


def test_align_to_wordpieces_no_overlap_and_special_tokens(tokenizer):
  text = "the bank  of america"
  offsets = tokenizer.encode(text).offsets
  assert salient_spans.align_to_wordpieces(offsets, (8, 9)) is None  # between the two spaces
  assert salient_spans.align_to_wordpieces(offsets, (len(text), len(text) + 5)) is None
  assert salient_spans.align_to_wordpieces(offsets, (4, 4)) is None  # empty span
  assert salient_spans.align_to_wordpieces([], (0, 3)) is None
  # [CLS] ... [SEP] have zero-width offsets and never overlap.
  with_specials = [(0, 0), *offsets, (0, 0)]
  a, b = salient_spans.align_to_wordpieces(offsets, (4, 8))
  assert salient_spans.align_to_wordpieces(with_specials, (0, len(text))) == (1, len(offsets) + 1)
  assert salient_spans.align_to_wordpieces(with_specials, (4, 8)) == (a + 1, b + 1)


# ------------------------------------------------------------------------------------------------
# WikiGold.

def _read_wikigold(path):
  """(text, gold spans) per sentence: tokens joined by spaces, runs of one non-O tag."""
  sentences, tokens = [], []
  with open(path, encoding="utf-8") as f:
    lines = [line.split() for line in f] + [[]]
  for parts in lines:
    if parts and parts[0] != "-DOCSTART-":
      tokens.append((parts[0], parts[-1] if parts[-1].startswith("I-") else "O"))
      continue
    if not tokens:
      continue
    text, gold, offset, previous = "", [], 0, "O"
    for token, tag in tokens:
      if tag != "O" and tag == previous:
        gold[-1] = (gold[-1][0], offset + len(token))
      elif tag != "O":
        gold.append((offset, offset + len(token)))
      previous = tag
      offset += len(token) + 1
    sentences.append((" ".join(t for t, _ in tokens), gold))
    tokens = []
  return sentences


@pytest.mark.skipif(not os.path.exists(WIKIGOLD), reason=f"WikiGold not found at {WIKIGOLD}")
def test_builtin_recall_on_wikigold():
  sentences = _read_wikigold(WIKIGOLD)
  assert len(sentences) == 1696
  tagger = salient_spans.BuiltinTagger()
  exact = overlap = total = 0
  for text, gold in sentences:
    spans = tagger(text)
    _assert_well_formed(text, spans)
    total += len(gold)
    exact += sum(g in spans for g in gold)
    overlap += sum(any(s < g[1] and g[0] < e for s, e in spans) for g in gold)
  assert total == 3558
  # Measured 2026-11-21 (benchmarks/salient_spans.py): exact recall 0.874, overlap recall 0.987.
  assert exact / total > 0.85
  assert overlap / total > 0.97


# ------------------------------------------------------------------------------------------------
# spaCy.

@pytest.fixture(scope="module")
def spacy_tagger():
  pytest.importorskip("spacy", reason="spaCy not installed (pip install 'spacy>=3.7.5,<3.9')",
                      exc_type=ImportError)
  try:
    return salient_spans.SpacyTagger()
  except ImportError as e:
    pytest.skip(f"spaCy model en_core_web_sm not installed: {e}")


def test_spacy_tagger(spacy_tagger):
  assert spacy_tagger.nlp.pipe_names == ["ner"]
  texts = [
      "Bank of America was founded in San Francisco on 17 October 1904 by Amadeo Giannini.",
      "In the 1990s, Microsoft opened an office in Paris.",
      "",
      "He moved to the United States.",
  ]
  batch = salient_spans.tag_batch(spacy_tagger, texts)
  assert batch == [spacy_tagger(text) for text in texts]
  found = [_texts(text, spans) for text, spans in zip(texts, batch)]
  for name in ("Bank of America", "San Francisco", "17 October 1904", "Amadeo Giannini"):
    assert name in found[0]
  assert "Microsoft" in found[1] and "Paris" in found[1]
  assert any("1990s" in span for span in found[1])  # spaCy's DATE merged with find_dates
  assert found[2] == []
  assert found[3] == ["United States"]  # spaCy's "the United States" without "the"
  for text, spans in zip(texts, batch):
    _assert_well_formed(text, spans)
  labels = {label for entities in spacy_tagger.entities(texts) for _, _, label in entities}
  assert labels <= set(salient_spans.SPACY_LABELS) and "DATE" in labels
