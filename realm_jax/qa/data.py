"""Open-QA examples: the ORQA resplit JSONL reader, the train/dev split, and facts-corpus questions.

The file format is one JSON object per line, `{"question": str, "answer": [str, ...]}` (extra
fields such as "id" are ignored). For CuratedTREC the answers are regular expressions
(`answers.regex_match`), for NQ and WebQuestions plain strings (`answers.exact_match`).

Bad lines never crash a run: each is counted under one reason (`BAD_REASONS`) and reported in
`ReadReport`; a file with no usable example is an error, so a run never evaluates on nothing.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import logging
import re
from collections.abc import Iterable, Sequence
from typing import Literal

from etils import epath

from realm_jax.data import facts_corpus as facts_lib

_LOG = logging.getLogger(__name__)

# Dataset name -> how its answers are matched.
DATASETS: dict[str, Literal["exact", "regex"]] = {"nq": "exact", "wq": "exact", "trec": "regex"}

BAD_REASONS = ("bad_utf8", "bad_json", "not_an_object", "missing_question", "empty_question",
               "missing_answer", "empty_answer", "answer_not_string", "bad_regex")


def answer_kind(dataset: str) -> Literal["exact", "regex"]:
  """"exact" (SQuAD-normalized string match) or "regex" (CuratedTREC) for a dataset name."""
  if dataset not in DATASETS:
    raise ValueError(f"qa.dataset={dataset!r} is not one of {sorted(DATASETS)} "
                     "(nq: Natural Questions, wq: WebQuestions, trec: CuratedTREC)")
  return DATASETS[dataset]


@dataclasses.dataclass(frozen=True)
class QAExample:
  """One question with its gold answers (strings, or regular expressions for CuratedTREC)."""

  question: str
  answers: tuple[str, ...]
  answer_kind: Literal["exact", "regex"] = "exact"
  example_id: str = ""  # the line's "id" field or its 1-based line number
  gold_doc_id: int = -1  # known gold block (generated questions), -1 when unknown


@dataclasses.dataclass
class ReadReport:
  """What reading one file found: usable examples and bad lines by reason."""

  path: str
  num_lines: int = 0  # non-blank lines
  num_examples: int = 0
  bad: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  first_bad_line: dict[str, int] = dataclasses.field(default_factory=dict)  # reason -> line no.

  @property
  def num_bad(self) -> int:
    return sum(self.bad.values())

  def add_bad(self, reason: str, line_number: int) -> None:
    self.bad[reason] += 1
    self.first_bad_line.setdefault(reason, line_number)

  def summary(self) -> str:
    """One log line: `path: 1479 lines, 1477 examples, 2 bad (bad_regex: 2, first at line 17)`."""
    text = f"{self.path}: {self.num_lines} lines, {self.num_examples} examples"
    if self.bad:
      parts = ", ".join(f"{reason}: {count} (first at line {self.first_bad_line[reason]})"
                        for reason, count in sorted(self.bad.items()))
      text += f", {self.num_bad} bad [{parts}]"
    return text


def parse_line(line: str | bytes, answer_kind_: Literal["exact", "regex"]
               ) -> tuple[dict | None, str | None]:
  """One JSONL line (text, or UTF-8 bytes) -> (fields, None) or (None, bad reason). Pure."""
  if isinstance(line, bytes):
    try:
      line = line.decode("utf-8")
    except UnicodeDecodeError:
      return None, "bad_utf8"
  try:
    record = json.loads(line)
  except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
    return None, "bad_json"
  if not isinstance(record, dict):
    return None, "not_an_object"
  if "question" not in record:
    return None, "missing_question"
  question = record["question"]
  if not isinstance(question, str) or not question.strip():
    return None, "empty_question"
  if "answer" not in record:
    return None, "missing_answer"
  answers = record["answer"]
  if isinstance(answers, str):  # a bare string is one answer, not a list of characters
    answers = [answers]
  if not isinstance(answers, list) or not answers:
    return None, "empty_answer"
  if not all(isinstance(a, str) for a in answers):
    return None, "answer_not_string"
  answers = [a for a in answers if a.strip()]
  if not answers:
    return None, "empty_answer"
  if answer_kind_ == "regex":
    for pattern in answers:
      try:
        re.compile(pattern)
      except (re.error, RecursionError, OverflowError):
        return None, "bad_regex"
  return dict(question=question.strip(), answers=tuple(answers),
              example_id=str(record.get("id", ""))), None


def read_jsonl_lines(lines: Iterable[str | bytes], dataset: str, path: str = "<lines>"
                     ) -> tuple[list[QAExample], ReadReport]:
  """Parses JSONL lines (blank lines skipped, not counted); bad lines are counted by reason.

  Raises ValueError when no line gives a usable example.
  """
  kind = answer_kind(dataset)
  report = ReadReport(path)
  examples = []
  for line_number, line in enumerate(lines, start=1):
    if not line.strip():
      continue
    report.num_lines += 1
    fields, reason = parse_line(line, kind)
    if reason is not None:
      report.add_bad(reason, line_number)
      continue
    fields["example_id"] = fields["example_id"] or str(line_number)
    examples.append(QAExample(answer_kind=kind, **fields))
  report.num_examples = len(examples)
  if report.num_bad:
    _LOG.warning("Skipped bad lines: %s", report.summary())
  if not examples:
    raise ValueError(f"No usable question in {report.summary()} (dataset={dataset!r}; "
                     'each line must be {"question": str, "answer": [str, ...]})')
  return examples, report


def read_jsonl(path: str | epath.PathLike, dataset: str) -> tuple[list[QAExample], ReadReport]:
  """Reads an ORQA-format JSONL file; see `read_jsonl_lines`. A missing file is an error."""
  path = epath.Path(path)
  if not path.exists():
    raise FileNotFoundError(f"QA data file {path} does not exist")
  examples, report = read_jsonl_lines(path.read_bytes().splitlines(), dataset, str(path))
  _LOG.info("Read %s", report.summary())
  return examples, report


def question_bucket(question: str, num_buckets: int = 10) -> int:
  """Stable bucket of a question: sha256 of its UTF-8 text mod `num_buckets` (not `hash()`,
  which Python salts per process)."""
  digest = hashlib.sha256(question.encode("utf-8")).digest()
  return int.from_bytes(digest[:8], "big") % num_buckets


def split_train_dev(examples: Sequence[QAExample], num_buckets: int = 10, dev_buckets: int = 1
                    ) -> tuple[list[QAExample], list[QAExample]]:
  """ORQA's deterministic resplit: a question is dev when its bucket is < `dev_buckets`.

  The same question always lands on the same side, on every host and run. Either side being
  empty is an error (too few examples for a held-out split).
  """
  if not 0 < dev_buckets < num_buckets:
    raise ValueError(f"dev_buckets={dev_buckets} must be in (0, num_buckets={num_buckets})")
  train, dev = [], []
  for example in examples:
    (dev if question_bucket(example.question, num_buckets) < dev_buckets else train).append(
        example)
  if not train or not dev:
    raise ValueError(f"Splitting {len(examples)} examples by question hash gave "
                     f"{len(train)} train and {len(dev)} dev: too few examples")
  return train, dev


def load_train_dev(dataset: str, train_path: str, dev_path: str = ""
                   ) -> tuple[list[QAExample], list[QAExample]]:
  """Train and dev examples: from two files, or the hash split of the train file alone."""
  train, _ = read_jsonl(train_path, dataset)
  if dev_path:
    dev, _ = read_jsonl(dev_path, dataset)
    return train, dev
  train, dev = split_train_dev(train)
  _LOG.info("No dev file: split %s by question hash into %d train / %d dev", train_path,
            len(train), len(dev))
  return train, dev


def facts_questions(corpus: facts_lib.FactsCorpus,
                    split: Literal["train", "eval", "all"] = "eval") -> list[QAExample]:
  """One question per (entity, attribute) fact stated by the corpus's queries of `split`.

  "eval" gives the held-out entities' facts (never in REALM's training queries). The answer is
  the attribute value; the gold block is the entity's profile document.
  """
  if split not in ("train", "eval", "all"):
    raise ValueError(f"split must be 'train', 'eval' or 'all', got {split!r}")
  seen = set()
  examples = []
  for query in corpus.queries:
    if split != "all" and query.split != split:
      continue
    key = (query.entity_id, query.attribute)
    if key in seen:
      continue
    seen.add(key)
    entity = corpus.entities[query.entity_id]
    examples.append(QAExample(
        question=corpus.question(query.entity_id, query.attribute),
        answers=(entity.attributes[query.attribute],), answer_kind="exact",
        example_id=f"{entity.entity_id}:{query.attribute}", gold_doc_id=query.gold_doc_id))
  if not examples:
    raise ValueError(f"The facts corpus has no {split!r} facts to ask about")
  return examples
