"""A dependency-free, regex-based English sentence splitter returning character spans.

Good enough for packing Wikipedia into blocks (where a missed boundary only makes one sentence
longer) and for picking query sentences. Rules:
- a newline always ends a sentence (paragraphs, list items, headings);
- otherwise a sentence ends at `.`, `!`, `?` or `…` (possibly repeated), followed by optional
  closing quotes or brackets, then whitespace, when the next character is not lowercase;
- a `.` does not end a sentence after a known abbreviation (Mr., Dr., St., No., e.g., i.e., ...),
  a single capital letter (an initial: "J. R. R. Tolkien") or a dotted acronym ("U.S.", "a.m.");
- decimals ("3.5") and dotted names ("Node.js") never split, since whitespace must follow.
Known misses: a sentence that really ends with an initial or an abbreviation ("vitamin C. It")
is joined to the next one.
"""

from __future__ import annotations

import re

# Lowercase, without the final period. Words that (almost) never end a sentence in Wikipedia
# prose: titles before names, references, "et al.", months, circa, ... "etc." is deliberately
# absent: it usually ends its sentence when a capital follows.
ABBREVIATIONS = frozenset("""
mr mrs ms messrs dr prof st mt ft jr sr gen col lt maj capt sgt cmdr adm gov sen rep rev hon pres
fr br sra sta ste
no nos vol vols fig figs pp op ed eds cf al approx ca c b d r fl viz vs v est dept univ
inc ltd co corp bros assn
jan feb mar apr jun jul aug sep sept oct nov dec
e.g i.e a.k.a ph.d
""".split())

_CLOSERS = "\"'”’»)]"
_TERMINATOR = re.compile(r"[.!?…]+[\"'”’»)\]]*(?=\s)")
_NON_SPACE = re.compile(r"\S")
_WORD_BEFORE = re.compile(r"\S+$")
_DOTTED = re.compile(r"(?:[A-Za-z]\.){2,}")  # U.S., e.g., a.m. (with the final period)
_INITIAL = re.compile(r"[A-Z]\.")
_OPENERS = "\"'“‘«([{"
_MAX_ABBREVIATION_CHARS = 16


def _is_abbreviation(text: str, line_start: int, period: int) -> bool:
  """Whether the `.` at text[period] closes an abbreviation, an initial or a dotted acronym."""
  window_start = max(line_start, period - _MAX_ABBREVIATION_CHARS)
  match = _WORD_BEFORE.search(text, window_start, period + 1)
  if match is None or (match.start() == window_start > line_start
                       and not text[window_start - 1].isspace()):
    return False  # no word, or one longer than any abbreviation
  word = match.group().lstrip(_OPENERS)
  if _DOTTED.fullmatch(word) or _INITIAL.fullmatch(word):
    return True
  return word[:-1].lower() in ABBREVIATIONS


def _strip(text: str, start: int, end: int) -> tuple[int, int]:
  """text[start:end] without its leading and trailing whitespace, as a span."""
  while start < end and text[start].isspace():
    start += 1
  while end > start and text[end - 1].isspace():
    end -= 1
  return start, end


def _split_line(text: str, start: int, end: int) -> list[tuple[int, int]]:
  """Sentence spans within text[start:end] (one line), whitespace stripped, empty ones dropped."""
  spans = []
  sentence_start = start
  for match in _TERMINATOR.finditer(text, start, end):
    following = _NON_SPACE.search(text, match.end(), end)
    if following is None or text[following.start()].islower():
      continue
    if match.group().rstrip(_CLOSERS) == "." and _is_abbreviation(text, start, match.start()):
      continue
    spans.append((sentence_start, match.end()))
    sentence_start = following.start()
  spans.append((sentence_start, end))
  return [(a, b) for a, b in (_strip(text, *span) for span in spans) if a < b]


def split_sentences(text: str) -> list[tuple[int, int]]:
  """Character spans [start, end) of the sentences of text, in order, without outer whitespace."""
  spans = []
  line_start = 0
  for line in text.splitlines(keepends=True):
    spans.extend(_split_line(text, line_start, line_start + len(line)))
    line_start += len(line)
  return spans
