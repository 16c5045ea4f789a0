"""Precision, recall and speed of the salient-span taggers on WikiGold (CoNLL NER, IO tags).

  python benchmarks/salient_spans.py
  python benchmarks/salient_spans.py --data=../shared/data/ner/wikigold.conll.txt \
      --taggers=dates,builtin,spacy --output=/tmp/salient_spans.json

Each sentence's text is its tokens joined by single spaces; gold spans are maximal runs of one
non-O tag (PER, LOC, ORG, MISC), as character offsets into that text. Taggers run per sentence
(spaCy through `tag_batch`, i.e. nlp.pipe). Matching: exact (same start and end) and overlap (a
prediction counts as correct when it overlaps some gold span; a gold span counts as found when
some prediction overlaps it). WikiGold has no date type, so date predictions count against
precision; the "no dates" columns leave out predictions lying entirely inside a date span
(`find_dates`, plus spaCy's DATE/TIME entities for the spaCy tagger).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import sys
import platform
import time
from collections.abc import Sequence

from realm_jax.data import salient_spans

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from machine import cpu_model  # pylint: disable=g-import-not-at-top,wrong-import-position

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_DATA = os.path.join(_REPO_ROOT, "..", "shared", "data", "ner", "wikigold.conll.txt")
TYPES = ("PER", "LOC", "ORG", "MISC")


@dataclasses.dataclass
class Sentence:
  text: str
  gold: list[tuple[int, int, str]]  # (start, end, type)


def read_conll(path: str) -> list[Sentence]:
  """Sentences of a CoNLL "token TAG" file; -DOCSTART- lines and blank lines separate them."""
  sentences: list[Sentence] = []
  tokens: list[tuple[str, str]] = []

  def flush() -> None:
    if tokens:
      sentences.append(_sentence(tokens))
    tokens.clear()

  with open(path, encoding="utf-8") as f:
    for line in f:
      parts = line.split()
      if not parts or parts[0] == "-DOCSTART-":
        flush()
        continue
      tag = parts[-1]  # IO or BIO; anything else (WikiGold has one stray "0") is O
      tag = tag if tag.startswith("B-") else tag[2:] if tag.startswith("I-") else "O"
      tokens.append((parts[0], tag))
  flush()
  return sentences


def _sentence(tokens: Sequence[tuple[str, str]]) -> Sentence:
  """Joins tokens with single spaces; gold spans are maximal runs of the same non-O tag."""
  pieces, gold, offset = [], [], 0
  current: list | None = None  # [start, end, type]
  for token, tag in tokens:
    begin = tag.startswith("B-")
    tag = tag.removeprefix("B-")
    start, end = offset, offset + len(token)
    if current is not None and (tag != current[2] or begin):
      gold.append(tuple(current))
      current = None
    if tag != "O":
      if current is None:
        current = [start, end, tag]
      else:
        current[1] = end
    pieces.append(token)
    offset = end + 1
  if current is not None:
    gold.append(tuple(current))
  return Sentence(" ".join(pieces), gold)


def _overlaps(a: tuple[int, int], b: tuple[int, int]) -> bool:
  return a[0] < b[1] and b[0] < a[1]


def _within(span: tuple[int, int], covers: Sequence[tuple[int, int]]) -> bool:
  return any(s <= span[0] and span[1] <= e for s, e in covers)


def _prf(correct_p: int, predicted: int, correct_r: int, gold: int) -> tuple[float, float, float]:
  p = correct_p / predicted if predicted else 0.0
  r = correct_r / gold if gold else 0.0
  return p, r, (2 * p * r / (p + r) if p + r else 0.0)


def score(sentences: Sequence[Sentence], predictions: Sequence[list[tuple[int, int]]],
          date_spans: Sequence[list[tuple[int, int]]]) -> dict:
  """Exact and overlap precision/recall/F1, precision without date-only predictions, per type."""
  c = collections.Counter()
  by_type = collections.Counter()
  for sentence, predicted, dates in zip(sentences, predictions, date_spans):
    gold = [(s, e) for s, e, _ in sentence.gold]
    gold_set = set(gold)
    c["gold"] += len(gold)
    c["predicted"] += len(predicted)
    for span in predicted:
      exact = span in gold_set
      overlap = any(_overlaps(span, g) for g in gold)
      c["exact_p"] += exact
      c["overlap_p"] += overlap
      if not _within(span, dates):
        c["predicted_nodate"] += 1
        c["exact_p_nodate"] += exact
        c["overlap_p_nodate"] += overlap
    predicted_set = set(predicted)
    for s, e, kind in sentence.gold:
      exact = (s, e) in predicted_set
      overlap = any(_overlaps((s, e), p) for p in predicted)
      c["exact_r"] += exact
      c["overlap_r"] += overlap
      by_type[kind, "gold"] += 1
      by_type[kind, "exact"] += exact
      by_type[kind, "overlap"] += overlap
  exact = _prf(c["exact_p"], c["predicted"], c["exact_r"], c["gold"])
  overlap = _prf(c["overlap_p"], c["predicted"], c["overlap_r"], c["gold"])
  nodate = c["predicted_nodate"]
  return {
      "gold_spans": c["gold"],
      "predicted_spans": c["predicted"],
      "predicted_spans_without_dates": nodate,
      "spans_per_sentence": c["predicted"] / len(sentences),
      "exact": dict(zip(("precision", "recall", "f1"), exact)),
      "overlap": dict(zip(("precision", "recall", "f1"), overlap)),
      "exact_precision_without_dates": c["exact_p_nodate"] / nodate if nodate else 0.0,
      "overlap_precision_without_dates": c["overlap_p_nodate"] / nodate if nodate else 0.0,
      "recall_by_type": {
          kind: {"gold": by_type[kind, "gold"],
                 "exact": by_type[kind, "exact"] / max(by_type[kind, "gold"], 1),
                 "overlap": by_type[kind, "overlap"] / max(by_type[kind, "gold"], 1)}
          for kind in TYPES},
  }


def run_tagger(name: str, texts: Sequence[str], repeats: int) -> tuple:
  """The tagger, its predictions, date spans, load seconds and best sentences/s over repeats."""
  start = time.perf_counter()
  tagger = salient_spans.make_tagger(name)
  load_s = time.perf_counter() - start
  salient_spans.tag_batch(tagger, texts[:32])  # warm-up
  best = 0.0
  for _ in range(repeats):
    start = time.perf_counter()
    predictions = salient_spans.tag_batch(tagger, texts)
    best = max(best, len(texts) / (time.perf_counter() - start))
  dates = [salient_spans.find_dates(text) for text in texts]
  if isinstance(tagger, salient_spans.SpacyTagger):
    entities = tagger.entities(texts)
    dates = [salient_spans.merge_spans(d + [(s, e) for s, e, label in ents
                                            if label in ("DATE", "TIME")])
             for d, ents in zip(dates, entities)]
  return tagger, predictions, dates, load_s, best


def markdown(results: dict) -> str:
  """Two markdown tables: overall scores and recall by gold type."""
  lines = [
      "| tagger | spans/sent | exact P | exact R | exact F1 | overlap P | overlap R | overlap F1 "
      "| exact P, no dates | overlap P, no dates | sentences/s |",
      "|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for name, r in results.items():
    e, o = r["exact"], r["overlap"]
    if r["predicted_spans_without_dates"]:
      nodate = (f"{r['exact_precision_without_dates']:.3f} | "
                f"{r['overlap_precision_without_dates']:.3f}")
    else:
      nodate = "n/a | n/a"
    lines.append(
        f"| {name} | {r['spans_per_sentence']:.2f} | {e['precision']:.3f} | {e['recall']:.3f} "
        f"| {e['f1']:.3f} | {o['precision']:.3f} | {o['recall']:.3f} | {o['f1']:.3f} "
        f"| {nodate} | {r['sentences_per_second']:.0f} |")
  lines += ["", "| tagger (recall exact / overlap) | " + " | ".join(TYPES) + " |",
            "|---|" + "---|" * len(TYPES)]
  for name, r in results.items():
    cells = [f"{r['recall_by_type'][k]['exact']:.3f} / {r['recall_by_type'][k]['overlap']:.3f}"
             for k in TYPES]
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--data", default=DEFAULT_DATA, help="WikiGold CoNLL file.")
  parser.add_argument("--taggers", default="dates,builtin,spacy",
                      help="Comma-separated; spacy is skipped when not installed.")
  parser.add_argument("--repeats", type=int, default=3, help="Timed passes; the best is reported.")
  parser.add_argument("--output", default=None, help="Optional JSON file for the results.")
  args = parser.parse_args()

  sentences = read_conll(args.data)
  texts = [s.text for s in sentences]
  gold_by_type = collections.Counter(kind for s in sentences for _, _, kind in s.gold)
  print(f"{len(sentences)} sentences, {sum(gold_by_type.values())} gold spans "
        f"({', '.join(f'{k} {gold_by_type[k]}' for k in TYPES)}); {cpu_model()}, "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}, "
        f"Python {platform.python_version()}")
  results = {}
  for name in args.taggers.split(","):
    try:
      tagger, predictions, dates, load_s, speed = run_tagger(name, texts, args.repeats)
    except ImportError as e:
      print(f"skipping {name}: {e}")
      continue
    results[name] = score(sentences, predictions, dates)
    results[name]["sentences_per_second"] = speed
    results[name]["load_seconds"] = load_s
    print(f"{name}: loaded in {load_s:.2f} s, {speed:.0f} sentences/s")
    if isinstance(tagger, salient_spans.SpacyTagger):
      import spacy  # pylint: disable=g-import-not-at-top
      nlp = tagger.nlp
      print(f"  spaCy {spacy.__version__}, model {nlp.meta['lang']}_{nlp.meta['name']} "
            f"{nlp.meta['version']}, pipeline {nlp.pipe_names}")
  print()
  print(markdown(results))
  if args.output:
    with open(args.output, "w") as f:
      json.dump({"data": os.path.abspath(args.data), "sentences": len(sentences),
                 "results": results}, f, indent=2)


if __name__ == "__main__":
  main()
