"""REALM document blocks from Wikipedia (JSONL files or TFDS), built in shards, with salient spans.

Each article is split into sentences, tokenized, and its consecutive sentences are packed greedily
into blocks `[CLS] title [SEP] body [SEP]` of at most doc_len wordpieces (a sentence too long for
a block gets a block of its own, truncated). Every block is one document of a BlockCorpus; doc
ids follow the input order (record order, then block order within the article), whatever the
number of shards. Bad records (invalid UTF-8 or JSON, JSON nested too deeply, missing or
non-string title or text, empty title or text, over-long title, text without wordpieces, a record
the source cannot read, any exception while parsing, splitting, tokenizing or tagging one record)
are counted by reason, skipped and reported; they never stop a build. A UTF-8 byte-order mark
before a record is ignored. Exact duplicates (a record whose stripped text equals an earlier
record's text in the same shard, whatever its title) are dropped and counted as `duplicate`;
duplicates in different shards are dropped at merge (the first occurrence in record order wins,
whatever the number of shards) and counted both as `duplicate` and as
`duplicates_across_shards` of the report; `wiki_data` never holds out a sentence that occurs
twice in the corpus. A build
whose shards hold no usable record at all is an error (with the report), never a finished corpus.

Layout of `out_dir`:
```
shards/shard-00000-of-00004/   one per shard, renamed into place when complete (so a killed build
    shard.json                   resumes by skipping finished shards); params, record range, counts
    report.json                  this shard's BuildReport
    <stream>.bin                 raw little-endian arrays (see _STREAMS), rows in doc/sentence order
    block_texts.jsonl            {"record", "title", "text"} per block
    record_hashes.bin            uint64 fingerprint of each kept record's text (cross-shard
                                   duplicates, dropped at merge)
blocks/                        the merged BlockCorpus (corpus.load_block_corpus(out_dir / "blocks"))
salient_spans.npz              span_sentence [P] int64 (global sentence index, as in
                                 blocks/sentence_offsets), span_start, span_end [P] int32
                                 (wordpiece range [start, end) within that sentence)
block_texts.jsonl              {"doc_id", "record", "title", "text"} per block, for display and
                                 answer matching (text: the block's sentences joined by spaces)
build_report.json              the summed BuildReport and build params; written last
```
Several processes may each run `build_shard(..., shard_index=i, num_shards=S)`; once all S
shards exist, one process runs `merge_shards(out_dir)`. `build_wiki_corpus` does both in one
process. Merging streams shard files into the merged .npy files, so it never holds all blocks
in memory (the titles excepted, written as title_text.npy at the end; a shard that loses records to cross-shard
duplicates is filtered in memory, one shard at a time).
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import hashlib
import json
import logging
import os
import re
import time
import uuid
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, BinaryIO, Protocol

import numpy as np
import tokenizers
from etils import epath

from realm_jax import progress as progress_lib
from realm_jax import storage
from realm_jax.data import corpus as corpus_lib
from realm_jax.data import npz_mmap
from realm_jax.data.sentences import split_sentences
from realm_jax.data.tokenizer import special_ids

# Char spans [start, end) of the salient spans of a sentence (e.g. salient_spans.BuiltinTagger);
# an optional `tag_batch(list[str]) -> list[spans]` method is used when present.
SpanFn = Callable[[str], Sequence[tuple[int, int]]]

SHARD_FORMAT_VERSION = 1
SHARDS_DIR = "shards"
SHARD_METADATA = "shard.json"
SHARD_REPORT = "report.json"
BLOCKS_DIR = "blocks"
SPANS_FILE = "salient_spans.npz"
TEXTS_FILE = "block_texts.jsonl"
REPORT_FILE = "build_report.json"
_SHARD_NAME = re.compile(r"shard-(\d{5})-of-(\d{5})")
_MAX_BAD_EXAMPLES = 5  # record indices kept per bad-record reason
_COPY_BYTES = 1 << 24  # chunk size when streaming shard files into merged ones

# Bad-record reasons.
INVALID_UTF8 = "invalid_utf8"
INVALID_JSON = "invalid_json"
EMPTY_LINE = "empty_line"
NOT_AN_OBJECT = "not_an_object"
MISSING_TITLE = "missing_title"
MISSING_TEXT = "missing_text"
TITLE_NOT_STRING = "title_not_string"
TEXT_NOT_STRING = "text_not_string"
EMPTY_TITLE = "empty_title"
EMPTY_TEXT = "empty_text"
TITLE_TOO_LONG = "title_too_long"
NO_WORDPIECES = "no_wordpieces"
TOO_DEEP = "too_deeply_nested"  # JSON nested beyond the parser's recursion limit
READ_ERROR = "read_error"  # the source could not return the record
DUPLICATE = "duplicate"  # same stripped text as an earlier record of the shard
RECORD_ERROR = "error"  # any other exception on one record: "error:<where>:<ExceptionType>"
_BOM = "\ufeff"
HASHES_FILE = "record_hashes.bin"


# ---------------------------------------------------------------------------------------------
# Record sources.


class RecordSource(Protocol):
  """Records with a stable order: `read(start, stop)` yields (index, raw record) for the range."""

  description: str

  def __len__(self) -> int:
    ...

  def read(self, start: int, stop: int) -> Iterator[tuple[int, Any]]:
    ...


def _glob(pattern: str) -> list[epath.Path]:
  """Files matching a glob (local or gs://), sorted; a pattern without wildcards is one file."""
  if not any(c in pattern for c in "*?["):
    path = epath.Path(pattern)
    return [path] if path.is_file() else []
  parts = pattern.split("/")
  first = next(i for i, part in enumerate(parts) if any(c in part for c in "*?["))
  base = "/".join(parts[:first]) or ("/" if pattern.startswith("/") else ".")
  base_path = epath.Path(base)
  if not base_path.is_dir():
    return []
  return sorted((p for p in base_path.glob("/".join(parts[first:])) if p.is_file()),
                key=os.fspath)


def _count_lines(path: epath.Path) -> int:
  """Lines of a file as binary iteration sees them (a last line without a newline counts)."""
  count, last = 0, b""
  with path.open("rb") as f:
    while chunk := f.read(_COPY_BYTES):
      count += chunk.count(b"\n")
      last = chunk[-1:]
  return count + (last not in (b"", b"\n"))


class JsonlSource:
  """JSON-lines files (a glob, local or gs://) in sorted file order; a record is one raw line."""

  def __init__(self, pattern: str):
    self.files = _glob(pattern)
    if not self.files:
      raise FileNotFoundError(f"No JSONL files match {pattern!r}.")
    self.description = f"jsonl:{pattern}"
    self._line_counts: list[int] | None = None

  def line_counts(self) -> list[int]:
    """Lines per file (read once; the records of a JSONL source are its lines)."""
    if self._line_counts is None:
      self._line_counts = [_count_lines(path) for path in self.files]
    return self._line_counts

  def __len__(self) -> int:
    return sum(self.line_counts())

  def read(self, start: int, stop: int) -> Iterator[tuple[int, bytes]]:
    file_start = 0
    for path, count in zip(self.files, self.line_counts()):
      file_stop = file_start + count
      if file_stop > start and file_start < stop:
        with path.open("rb") as f:
          for index, line in enumerate(f, file_start):
            if index >= stop:
              break
            if index >= start:
              yield index, line
      file_start = file_stop
      if file_start >= stop:
        return


class SequenceSource:
  """Any random-access sequence of dicts with `title` and `text` (a TFDS data source, a list).

  With batched (default), records are fetched `batch_size` at a time through `__getitems__`
  where the sequence has it (ArrayRecord data sources read such batches in parallel).
  """

  def __init__(self, records: Sequence[Mapping[str, Any]], description: str = "sequence",
               batch_size: int = 256, batched: bool = True):
    self.records = records
    self.description = description
    self.batch_size = batch_size
    self.batched = batched

  def __len__(self) -> int:
    return len(self.records)

  def read(self, start: int, stop: int) -> Iterator[tuple[int, Any]]:
    """(index, record) for [start, stop); a record the sequence fails to return is yielded as
    an Unreadable (counted as read_error by the build), so one bad record never stops a read."""
    get_many = getattr(self.records, "__getitems__", None) if self.batched else None
    for batch_start in range(start, stop, self.batch_size):
      keys = list(range(batch_start, min(stop, batch_start + self.batch_size)))
      try:
        batch = get_many(keys) if get_many else None
      except Exception:  # pylint: disable=broad-except
        batch = None  # retry record by record to find the bad ones
      if batch is None:
        batch = [self._get(k) for k in keys]
      yield from zip(keys, batch)

  def _get(self, key: int) -> Any:
    try:
      return self.records[key]
    except Exception as e:  # pylint: disable=broad-except
      return Unreadable(f"{type(e).__name__}: {e}")


@dataclasses.dataclass(frozen=True)
class Unreadable:
  """Stands for a record its source failed to return (why: the exception)."""

  why: str


TFDS_INSTALL_HINT = (
    "data.source=tfds:... needs TensorFlow Datasets: pip install 'realm_jax[tfds]'. Reading a "
    "prepared dataset needs only that; building (preparing) Wikipedia with TFDS also needs "
    "TensorFlow and Apache Beam, or point data.tfds_data_dir at an already prepared copy (or "
    "use a data.source=jsonl:<glob> of {\"title\", \"text\"} lines instead).")


def _import_tfds():
  """tensorflow_datasets, imported only when a tfds: source is used (an optional extra)."""
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(f"{TFDS_INSTALL_HINT} (import failed: {e})") from e
  return tfds


def tfds_source(name: str, split: str = "train", data_dir: str | None = None) -> SequenceSource:
  """A prepared TFDS dataset (e.g. wikipedia/20230601.en) read by random access, no TensorFlow.

  Never downloads: the dataset must already be prepared (ArrayRecord files) under data_dir.
  tensorflow_datasets is imported here only (the `[tfds]` extra); without it, an ImportError
  says what to install.
  """
  tfds = _import_tfds()
  records = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
  return SequenceSource(records, description=f"tfds:{name}:{split}")


def open_source(spec: str, *, tfds_data_dir: str | None = None) -> RecordSource:
  """`jsonl:<glob>` or `tfds:<name>[:<split>]` (split defaults to train) as a RecordSource."""
  kind, _, rest = spec.partition(":")
  if kind == "jsonl" and rest:
    return JsonlSource(rest)
  if kind == "tfds" and rest:
    name, _, split = rest.partition(":")
    return tfds_source(name, split or "train", tfds_data_dir)
  raise ValueError(f"Bad source spec {spec!r}: expected 'jsonl:<glob>' or "
                   "'tfds:<name>[:<split>]'.")


# ---------------------------------------------------------------------------------------------
# Validation and the build report.


class BadRecord(Exception):
  """A record that cannot become an article; `reason` is one of the bad-record reasons."""

  def __init__(self, reason: str):
    super().__init__(reason)
    self.reason = reason


def _as_text(value: Any, missing: str, not_string: str) -> str:
  """A str from a str/bytes record field (0-d numpy arrays unwrapped)."""
  if value is None:
    raise BadRecord(missing)
  if isinstance(value, np.ndarray) and value.ndim == 0:
    value = value.item()
  if isinstance(value, bytes):
    try:
      value = value.decode("utf-8")
    except UnicodeDecodeError as e:
      raise BadRecord(INVALID_UTF8) from e
  if not isinstance(value, str):
    raise BadRecord(not_string)
  try:
    value.encode("utf-8")  # lone surrogates (from JSON "\ud800" escapes) cannot be tokenized
  except UnicodeEncodeError as e:
    raise BadRecord(INVALID_UTF8) from e
  return value


def parse_record(raw: Any, max_title_chars: int) -> tuple[str, str]:
  """(title, text), both stripped, from a JSONL line or a dict; raises BadRecord.

  A UTF-8 byte-order mark before the JSON (the first line of a file saved "with BOM") is
  ignored. Any failure of this one record raises BadRecord, never another exception.
  """
  if isinstance(raw, Unreadable):
    raise BadRecord(READ_ERROR)
  if isinstance(raw, (bytes, bytearray, memoryview, str)):
    if not isinstance(raw, str):
      try:
        raw = bytes(raw).decode("utf-8")
      except UnicodeDecodeError as e:
        raise BadRecord(INVALID_UTF8) from e
    raw = raw.removeprefix(_BOM)
    if not raw.strip():
      raise BadRecord(EMPTY_LINE)
    try:
      raw = json.loads(raw)
    except RecursionError as e:
      raise BadRecord(TOO_DEEP) from e
    except ValueError as e:
      raise BadRecord(INVALID_JSON) from e
  if not isinstance(raw, Mapping):
    raise BadRecord(NOT_AN_OBJECT)
  title = _as_text(raw.get("title"), MISSING_TITLE, TITLE_NOT_STRING).strip()
  text = _as_text(raw.get("text"), MISSING_TEXT, TEXT_NOT_STRING).strip()
  if not title:
    raise BadRecord(EMPTY_TITLE)
  if len(title) > max_title_chars:
    raise BadRecord(TITLE_TOO_LONG)
  if not text:
    raise BadRecord(EMPTY_TEXT)
  return title, text


@dataclasses.dataclass
class BuildReport:
  """What a build read, made and skipped; reports of shards add up (`+`)."""

  records_read: int = 0
  records_ok: int = 0
  bad_records: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
  bad_examples: dict[str, list[int]] = dataclasses.field(default_factory=dict)  # reason: records
  blocks: int = 0
  sentences: int = 0
  truncated_sentences: int = 0  # sentences longer than a block's body, cut
  spans: int = 0
  spans_dropped: int = 0  # spans covering no wordpiece or more than max_span_wordpieces
  duplicates_across_shards: int = 0  # records whose text an earlier shard has (dropped; merge)
  seconds: float = 0.0

  def add_bad(self, reason: str, record_index: int) -> None:
    self.bad_records[reason] += 1
    examples = self.bad_examples.setdefault(reason, [])
    if len(examples) < _MAX_BAD_EXAMPLES:
      examples.append(record_index)

  def __add__(self, other: BuildReport) -> BuildReport:
    examples = {reason: list(indices) for reason, indices in self.bad_examples.items()}
    for reason, indices in other.bad_examples.items():
      merged = examples.setdefault(reason, [])
      merged.extend(indices[:_MAX_BAD_EXAMPLES - len(merged)])
    counts = {f.name: getattr(self, f.name) + getattr(other, f.name)
              for f in dataclasses.fields(self) if f.name not in ("bad_records", "bad_examples")}
    return BuildReport(**counts, bad_records=self.bad_records + other.bad_records,
                       bad_examples=examples)

  def to_dict(self) -> dict[str, Any]:
    return dict(dataclasses.asdict(self), bad_records=dict(sorted(self.bad_records.items())))

  @classmethod
  def from_dict(cls, values: Mapping[str, Any]) -> BuildReport:
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: v for k, v in values.items() if k in names}
    kwargs["bad_records"] = collections.Counter(kwargs.get("bad_records", {}))
    return cls(**kwargs)

  def summary(self) -> str:
    bad = ", ".join(f"{reason}={count}" for reason, count in sorted(self.bad_records.items()))
    examples = "; ".join(f"{reason}: records {indices}"
                         for reason, indices in sorted(self.bad_examples.items()))
    across = (f"; {self.duplicates_across_shards} duplicates across shards (dropped)"
              if self.duplicates_across_shards else "")
    return (f"{self.records_read} records read, {self.records_ok} ok, "
            f"{sum(self.bad_records.values())} skipped ({bad or 'none'}); {self.blocks} blocks, "
            f"{self.sentences} sentences ({self.truncated_sentences} truncated), "
            f"{self.spans} salient spans ({self.spans_dropped} dropped){across}; "
            f"{self.seconds:.1f} s" + (f" [first skipped: {examples}]" if examples else ""))


class NoUsableRecords(ValueError):
  """A source (or a whole build) gave no usable record: nothing to build a corpus from."""


def no_usable_records(what: str, report: BuildReport) -> NoUsableRecords:
  """The error for a build with 0 usable records, with what was read and why it was skipped."""
  hint = ("the source is empty" if not report.records_read else
          "expected JSON lines (UTF-8) of objects with string \"title\" and \"text\"")
  return NoUsableRecords(f"{what}: 0 usable records ({hint}): {report.summary()}")


# ---------------------------------------------------------------------------------------------
# Packing articles into blocks.


def pack_sentences(lengths: Sequence[int], capacity: int) -> list[tuple[int, int]]:
  """Greedy packing of consecutive sentences: [(first, stop)] groups of at most capacity pieces.

  A sentence longer than capacity gets a group of its own (to be truncated).
  """
  groups, first, used = [], 0, 0
  for index, length in enumerate(lengths):
    if index > first and used + length > capacity:
      groups.append((first, index))
      first, used = index, 0
    used += length
    if used > capacity:  # an over-long sentence, alone
      groups.append((first, index + 1))
      first, used = index + 1, 0
  if first < len(lengths):
    groups.append((first, len(lengths)))
  return groups


def align_span(offsets: Sequence[tuple[int, int]], start: int, end: int) -> tuple[int, int]:
  """Wordpiece range [first, stop) of the pieces overlapping char span [start, end).

  offsets: the (char start, char end) of each piece, non-decreasing (tokenizers' Encoding).
  An empty span (end <= start) covers no piece.
  """
  if end <= start:
    return 0, 0
  first = bisect.bisect_right([b for _, b in offsets], start)
  stop = bisect.bisect_left([a for a, _ in offsets], end)
  return first, max(first, stop)


# name: (dtype, row width or None for 1-d), the raw arrays a shard writes.
_STREAMS = {
    "retriever_tokens": (np.int32, "doc_len"),  # [n, doc_len]
    "retriever_segments": (np.int32, "doc_len"),  # [n, doc_len]
    "reader_tokens": (np.int32, "body_len"),  # [n, body_len]
    "reader_lengths": (np.int32, None),  # [n]
    "sentence_token_ids": (np.int32, None),  # [T] untruncated wordpieces of all sentences
    "sentence_lengths": (np.int32, None),  # [S]
    "doc_sentence_counts": (np.int32, None),  # [n]
    "title_token_ids": (np.int32, None),  # [U] untruncated title wordpieces, one title per block
    "title_lengths": (np.int32, None),  # [n]
    "span_sentence": (np.int64, None),  # [P] sentence index within the shard
    "span_start": (np.int32, None),  # [P]
    "span_end": (np.int32, None),  # [P]
}


class _ShardWriter:
  """Appends blocks to the raw stream files and block_texts.jsonl of a shard's tmp dir."""

  def __init__(self, directory: epath.Path, widths: Mapping[str, int]):
    self.widths = widths
    self.files: dict[str, BinaryIO] = {
        name: (directory / f"{name}.bin").open("wb") for name in _STREAMS}
    self.texts = (directory / TEXTS_FILE).open("w")
    self.hashes = (directory / HASHES_FILE).open("wb")
    self.rows = collections.Counter({name: 0 for name in _STREAMS})

  def write(self, name: str, values: Any) -> None:
    dtype, width = _STREAMS[name]
    array = np.asarray(values, dtype=np.dtype(dtype).newbyteorder("<"))
    if width is not None:
      array = array.reshape(-1, self.widths[width])
    self.files[name].write(array.tobytes())
    self.rows[name] += len(array)

  def write_texts(self, lines: Iterable[str]) -> None:
    self.texts.write("".join(lines))

  def write_hashes(self, fingerprints: Sequence[int]) -> None:
    self.hashes.write(np.asarray(fingerprints, np.dtype("<u8")).tobytes())

  def close(self) -> None:
    for f in self.files.values():
      f.close()
    self.texts.close()
    self.hashes.close()


@dataclasses.dataclass
class _Article:
  """A valid record split into sentences."""

  record: int
  title: str
  sentences: list[str]
  fingerprint: int = 0  # text_fingerprint of the record's text


def text_fingerprint(text: str) -> int:
  """64-bit fingerprint of a record's (stripped) text: the key of exact-duplicate detection."""
  digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()
  return int.from_bytes(digest, "little")


def _error_reason(where: str, error: BaseException) -> str:
  return f"{RECORD_ERROR}:{where}:{type(error).__name__}"


def _parse_batch(batch: Sequence[tuple[int, Any]], max_title_chars: int,
                 report: BuildReport, seen: dict[int, int] | None = None) -> list[_Article]:
  """Valid records of a batch as articles split into sentences; bad ones counted.

  seen (text fingerprint -> first record) drops exact duplicates (counted as `duplicate`); it
  is updated with the batch's new texts. Any exception on one record is counted, not raised.
  """
  articles = []
  for index, raw in batch:
    report.records_read += 1
    try:
      title, text = parse_record(raw, max_title_chars)
      key = text_fingerprint(text)
      if seen is not None and key in seen:
        raise BadRecord(DUPLICATE)
      sentences = [text[a:b] for a, b in split_sentences(text)]
    except BadRecord as e:
      report.add_bad(e.reason, index)
      continue
    except Exception as e:  # pylint: disable=broad-except
      report.add_bad(_error_reason("parse", e), index)
      continue
    if seen is not None:
      seen[key] = index
    articles.append(_Article(index, title, sentences, key))
  return articles


def _tag_sentences(span_fn: SpanFn | None, sentences: Sequence[str]
                   ) -> Sequence[Sequence[tuple[int, int]]]:
  """Char spans of each sentence: none without span_fn, through span_fn.tag_batch when it has
  one (batched taggers such as spaCy's are much faster that way), else one call per sentence."""
  if span_fn is None:
    return [()] * len(sentences)
  tag_batch = getattr(span_fn, "tag_batch", None)
  spans = tag_batch(list(sentences)) if tag_batch is not None else [
      span_fn(s) for s in sentences]
  if len(spans) != len(sentences):
    raise ValueError(f"span_fn.tag_batch returned {len(spans)} results for {len(sentences)} "
                     "sentences.")
  return spans


class _StageError(Exception):
  """An exception of one stage ("tokenize", "tag") of encoding articles."""

  def __init__(self, where: str, error: BaseException):
    super().__init__(f"{where}: {error!r}")
    self.where, self.error = where, error


def _encode_all(articles: Sequence[_Article], tokenizer: tokenizers.Tokenizer,
                span_fn: SpanFn | None) -> list[tuple[_Article, Any, list[Any], list[Any]]]:
  """(article, title encoding, sentence encodings, sentence char spans) of each article."""
  sentences = [s for a in articles for s in a.sentences]
  try:
    title_encodings = tokenizer.encode_batch([a.title for a in articles],
                                             add_special_tokens=False)
    sentence_encodings = iter(tokenizer.encode_batch(sentences, add_special_tokens=False))
  except Exception as e:  # pylint: disable=broad-except
    raise _StageError("tokenize", e) from e
  try:
    sentence_spans = iter(_tag_sentences(span_fn, sentences))
  except Exception as e:  # pylint: disable=broad-except
    raise _StageError("tag", e) from e
  return [(article, title_encoding, [next(sentence_encodings) for _ in article.sentences],
           [next(sentence_spans) for _ in article.sentences])
          for article, title_encoding in zip(articles, title_encodings)]


def _encode_articles(articles: Sequence[_Article], tokenizer: tokenizers.Tokenizer,
                     span_fn: SpanFn | None, report: BuildReport
                     ) -> list[tuple[_Article, Any, list[Any], list[Any]]]:
  """_encode_all of the batch; if it fails, article by article, failures counted by stage."""
  try:
    return _encode_all(articles, tokenizer, span_fn)
  except _StageError:
    pass
  encoded = []
  for article in articles:
    try:
      encoded.extend(_encode_all([article], tokenizer, span_fn))
    except _StageError as e:
      report.add_bad(_error_reason(e.where, e.error), article.record)
  return encoded


def _pack_article(
    article: _Article, title_encoding: Any, encodings: Sequence[Any],
    char_spans: Sequence[Sequence[tuple[int, int]]], first_sentence: int, doc_len: int,
    body_len: int, special: corpus_lib.SpecialIds, max_span_wordpieces: int,
) -> tuple[dict[str, list[Any]], list[str], collections.Counter[str]] | None:
  """The stream rows, block_texts lines and report counts of one article's blocks.

  first_sentence: the shard-local index its first kept sentence gets. None: no wordpieces.
  """
  kept = [(s, e, c) for s, e, c in zip(article.sentences, encodings, char_spans) if e.ids]
  if not kept:
    return None
  out: dict[str, list[Any]] = collections.defaultdict(list)
  counts: collections.Counter[str] = collections.Counter()
  texts = []
  title_ids = np.asarray(title_encoding.ids, np.int32)
  capacity = doc_len - 3 - min(len(title_ids), doc_len // 4)
  sentence_index = first_sentence
  for first, stop in pack_sentences([len(e.ids) for _, e, _ in kept], capacity):
    block = kept[first:stop]
    body = np.asarray([i for _, e, _ in block for i in e.ids], np.int32)
    if len(body) > capacity:
      counts["truncated_sentences"] += 1
    tokens, segments = corpus_lib.pack_block(title_ids, body, doc_len, special)
    reader = np.full(body_len, special.pad, np.int32)
    reader_body = np.append(body[:body_len - 1], special.sep)
    reader[:len(reader_body)] = reader_body
    out["retriever_tokens"].append(tokens)
    out["retriever_segments"].append(segments)
    out["reader_tokens"].append(reader)
    out["reader_lengths"].append(len(reader_body))
    out["title_token_ids"].extend(title_encoding.ids)
    out["title_lengths"].append(len(title_ids))
    out["doc_sentence_counts"].append(len(block))
    for _, encoding, spans in block:
      out["sentence_token_ids"].extend(encoding.ids)
      out["sentence_lengths"].append(len(encoding.ids))
      found = set()
      for start, end in spans:
        first_piece, stop_piece = align_span(encoding.offsets, start, end)
        if 1 <= stop_piece - first_piece <= max_span_wordpieces:
          found.add((first_piece, stop_piece))
        else:
          counts["spans_dropped"] += 1
      for first_piece, stop_piece in sorted(found):
        out["span_sentence"].append(sentence_index)
        out["span_start"].append(first_piece)
        out["span_end"].append(stop_piece)
      counts["spans"] += len(found)
      sentence_index += 1
    counts["blocks"] += 1
    counts["sentences"] += len(block)
    texts.append(json.dumps(dict(record=article.record, title=article.title,
                                 text=" ".join(s for s, _, _ in block))) + "\n")
  return out, texts, counts


def _write_batch(
    articles: Sequence[_Article], tokenizer: tokenizers.Tokenizer, writer: _ShardWriter,
    doc_len: int, body_len: int, span_fn: SpanFn | None, max_span_wordpieces: int,
    report: BuildReport,
) -> None:
  """Tokenizes, packs and writes the blocks (and salient spans) of a batch of articles.

  An article that fails (tokenizer, tagger or packing exception) is counted and left out
  whole; the others are written.
  """
  special = special_ids(tokenizer)
  out: dict[str, list[Any]] = collections.defaultdict(list)
  texts, fingerprints = [], []
  for article, title_encoding, encodings, char_spans in _encode_articles(
      articles, tokenizer, span_fn, report):
    try:
      packed = _pack_article(article, title_encoding, encodings, char_spans,
                             writer.rows["sentence_lengths"] + len(out["sentence_lengths"]),
                             doc_len, body_len, special, max_span_wordpieces)
    except Exception as e:  # pylint: disable=broad-except
      report.add_bad(_error_reason("pack", e), article.record)
      continue
    if packed is None:
      report.add_bad(NO_WORDPIECES, article.record)
      continue
    rows, article_texts, counts = packed
    report.records_ok += 1
    for name, values in rows.items():
      out[name].extend(values)
    texts.extend(article_texts)
    fingerprints.append(article.fingerprint)
    for name, count in counts.items():
      setattr(report, name, getattr(report, name) + count)
  for name in _STREAMS:
    writer.write(name, out[name])
  writer.write_texts(texts)
  writer.write_hashes(fingerprints)


# ---------------------------------------------------------------------------------------------
# Shards.


def shard_name(shard_index: int, num_shards: int) -> str:
  return f"shard-{shard_index:05d}-of-{num_shards:05d}"


def shard_range(num_records: int, shard_index: int, num_shards: int) -> tuple[int, int]:
  """Records [start, stop) of a shard: contiguous, near-equal, covering [0, num_records)."""
  return (shard_index * num_records // num_shards, (shard_index + 1) * num_records // num_shards)


def _vocab_fingerprint(tokenizer: tokenizers.Tokenizer) -> str:
  vocab = sorted(tokenizer.get_vocab(with_added_tokens=True).items(), key=lambda kv: kv[1])
  return hashlib.sha256(json.dumps(vocab).encode()).hexdigest()[:16]


def _build_params(source: RecordSource, limit: int | None, num_shards: int,
                  tokenizer: tokenizers.Tokenizer, doc_len: int, body_len: int,
                  span_fn: SpanFn | None, max_title_chars: int,
                  max_span_wordpieces: int) -> dict[str, Any]:
  """Everything a shard's content depends on; all shards of one build must agree on it."""
  num_records = len(source) if limit is None else min(len(source), limit)
  span_name = None if span_fn is None else getattr(span_fn, "__qualname__",
                                                   type(span_fn).__qualname__)
  return dict(source=source.description, num_records=num_records, num_shards=num_shards,
              doc_len=doc_len, body_len=body_len, max_title_chars=max_title_chars,
              max_span_wordpieces=max_span_wordpieces, span_fn=span_name,
              vocab_size=tokenizer.get_vocab_size(), vocab_sha256=_vocab_fingerprint(tokenizer),
              special=dataclasses.asdict(special_ids(tokenizer)))


def _read_json(path: epath.Path) -> Any:
  return json.loads(path.read_text())


def _finished_shard(directory: epath.Path) -> dict[str, Any] | None:
  """A shard's metadata if it is complete (shard.json is written last), else None."""
  return _read_json(directory / SHARD_METADATA) if (directory / SHARD_METADATA).exists() else None


def _remove(path: epath.Path) -> None:
  if path.is_dir():
    path.rmtree()
  elif path.exists():
    path.unlink()


def _as_source(source: str | RecordSource, tfds_data_dir: str | None) -> RecordSource:
  return open_source(source, tfds_data_dir=tfds_data_dir) if isinstance(source, str) else source


def build_shard(
    source: str | RecordSource, out_dir: epath.PathLike, tokenizer: tokenizers.Tokenizer,
    shard_index: int, num_shards: int, *, doc_len: int = 288, body_len: int | None = None,
    span_fn: SpanFn | None = None, max_title_chars: int = 256, max_span_wordpieces: int = 10,
    limit: int | None = None, tfds_data_dir: str | None = None, batch_size: int = 256,
    progress_every_s: float = 30.0,
) -> BuildReport:
  """Builds shard shard_index of num_shards into out_dir/shards/ (skipped if already finished).

  body_len (reader rows) defaults to doc_len - 2, as in corpus.build_block_corpus; limit caps
  the records read from the source. Returns the shard's report (the saved one when skipped).
  """
  body_len = doc_len - 2 if body_len is None else body_len
  if doc_len < 3 or body_len < 1:
    raise ValueError(f"Need doc_len >= 3 and body_len >= 1, got {doc_len=}, {body_len=}.")
  if not 0 <= shard_index < num_shards:
    raise ValueError(f"shard_index {shard_index} not in [0, {num_shards}).")
  source = _as_source(source, tfds_data_dir)
  params = _build_params(source, limit, num_shards, tokenizer, doc_len, body_len, span_fn,
                         max_title_chars, max_span_wordpieces)
  shards_dir = epath.Path(out_dir) / SHARDS_DIR
  name = shard_name(shard_index, num_shards)
  directory = shards_dir / name
  existing = _finished_shard(directory)
  if existing is not None:
    if existing["params"] != params:
      raise ValueError(f"{os.fspath(directory)} was built with other params "
                       f"({existing['params']}) than now ({params}); use a fresh out_dir.")
    logging.info("%s: already built, skipped.", name)
    return BuildReport.from_dict(_read_json(directory / SHARD_REPORT))
  # Leftovers of a killed build of this shard: an incomplete dir (a non-atomic rename on GCS)
  # or tmp dirs. One process per shard index, so none of them is in use.
  for stale in [directory, *shards_dir.glob(f".{name}.tmp-*")]:
    if stale.exists():
      logging.info("%s: removing the leftover %s.", name, os.fspath(stale))
      _remove(stale)

  start_time = time.monotonic()
  start, stop = shard_range(params["num_records"], shard_index, num_shards)
  logging.info("%s: records [%d, %d) of %s.", name, start, stop, source.description)
  # Local: a tmp folder renamed into place; object storage: `directory` itself, shard.json
  # (what `_finished_shard` requires) written last.
  with storage.publish_folder(directory, SHARD_METADATA,
                              tmp=shards_dir / f".{name}.tmp-{uuid.uuid4().hex[:8]}") as tmp:
    writer = _ShardWriter(tmp, dict(doc_len=doc_len, body_len=body_len))
    report = BuildReport()
    progress = progress_lib.Progress(f"corpus {name}", stop - start, unit="records",
                                     every_seconds=progress_every_s)
    records = source.read(start, stop)
    seen: dict[int, int] = {}  # text fingerprint -> first record (exact duplicates)
    try:
      while batch := [record for _, record in zip(range(batch_size), records)]:
        articles = _parse_batch(batch, max_title_chars, report, seen)
        _write_batch(articles, tokenizer, writer, doc_len, body_len, span_fn,
                     max_span_wordpieces, report)
        progress.update(len(batch))
    finally:
      writer.close()
    progress.close()
    report.seconds = time.monotonic() - start_time
    (tmp / SHARD_REPORT).write_text(json.dumps(report.to_dict(), indent=1))
    metadata = dict(format_version=SHARD_FORMAT_VERSION, params=params,
                    shard_index=shard_index, record_start=start, record_stop=stop,
                    rows=dict(writer.rows))
    (tmp / SHARD_METADATA).write_text(json.dumps(metadata, indent=1))
  logging.info("%s: %s (%.0f records/s).", name, report.summary(),
               report.records_read / max(report.seconds, 1e-9))
  return report


# ---------------------------------------------------------------------------------------------
# Merging.


class _NpyStream:
  """Writes one .npy file of a known shape chunk by chunk (works for gs:// paths too)."""

  def __init__(self, f: BinaryIO, dtype: Any, shape: tuple[int, ...]):
    self.f, self.dtype, self.shape = f, np.dtype(dtype).newbyteorder("<"), shape
    self.rows = 0
    np.lib.format.write_array_header_1_0(f, dict(
        descr=np.lib.format.dtype_to_descr(self.dtype), fortran_order=False, shape=shape))

  def write(self, values: Any) -> None:
    array = np.asarray(values, self.dtype).reshape((-1, *self.shape[1:]))
    self.f.write(array.tobytes())
    self.rows += len(array)

  def check(self, name: str) -> None:
    if self.rows != self.shape[0]:
      raise RuntimeError(f"Merged {name} has {self.rows} rows, expected {self.shape[0]}.")


def _read_stream(shard_dir: epath.Path, name: str, widths: Mapping[str, int]
                 ) -> Iterator[np.ndarray]:
  """A shard's raw stream file in chunks of whole rows."""
  dtype, width = _STREAMS[name]
  dtype = np.dtype(dtype).newbyteorder("<")
  row_bytes = dtype.itemsize * (1 if width is None else widths[width])
  chunk_bytes = max(row_bytes, _COPY_BYTES // row_bytes * row_bytes)
  pending = b""
  with (shard_dir / f"{name}.bin").open("rb") as f:
    while data := f.read(chunk_bytes):
      data = pending + data
      whole = len(data) // row_bytes * row_bytes
      pending = data[whole:]
      array = np.frombuffer(data[:whole], dtype)
      yield array if width is None else array.reshape(-1, widths[width])
  if pending:
    raise ValueError(f"{os.fspath(shard_dir / name)}.bin ends in a partial row.")


def _shard_dirs(out_dir: epath.Path, num_shards: int | None) -> list[epath.Path]:
  """The finished shard dirs of a build in order; a clear error if any is missing."""
  shards_dir = out_dir / SHARDS_DIR
  found = {}
  if shards_dir.is_dir():
    for path in shards_dir.iterdir():
      match = _SHARD_NAME.fullmatch(path.name)
      if match and (path / SHARD_METADATA).exists():
        found[int(match.group(1)), int(match.group(2))] = path
  counts = sorted({total for _, total in found})
  if num_shards is None:
    if len(counts) != 1:
      raise FileNotFoundError(
          f"Cannot tell the shard count from {os.fspath(shards_dir)}: finished shards of "
          f"counts {counts or 'none'}; pass num_shards.")
    num_shards = counts[0]
  missing = [shard_name(i, num_shards) for i in range(num_shards) if (i, num_shards) not in found]
  if missing:
    raise FileNotFoundError(
        f"Cannot merge {os.fspath(out_dir)}: {len(missing)} of {num_shards} shards missing or "
        f"unfinished: {', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}. Build "
        f"them with build_shard(..., shard_index=i, num_shards={num_shards}) first.")
  return [found[i, num_shards] for i in range(num_shards)]


def _write_spans_npz(f: BinaryIO, shard_dirs: Sequence[epath.Path],
                     views: Sequence["_ShardView"], sentence_starts: Sequence[int]) -> None:
  """salient_spans.npz, each member streamed; span_sentence made global."""
  total = sum(v.rows("span_start") for v in views)
  with zipfile.ZipFile(f, "w", allowZip64=True) as archive:
    for name, dtype in (("span_sentence", np.int64), ("span_start", np.int32),
                        ("span_end", np.int32)):
      with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
        stream = _NpyStream(member, dtype, (total,))
        for view, sentence_start in zip(views, sentence_starts):
          for chunk in view.chunks(name, {}):
            stream.write(chunk + sentence_start if name == "span_sentence" else chunk)
        stream.check(name)


def _record_hashes(shard_dir: epath.Path) -> np.ndarray | None:
  """The shard's record fingerprints [R] uint64 (one per kept record, in record order)."""
  if not (shard_dir / HASHES_FILE).exists():
    return None
  with (shard_dir / HASHES_FILE).open("rb") as f:
    return np.frombuffer(f.read(), np.dtype("<u8"))


def _cross_shard_keep(shard_dirs: Sequence[epath.Path]) -> list[np.ndarray | None]:
  """Per shard, which kept records [R_s] bool survive the merge: a record whose text an earlier
  record (in record order, so an earlier shard) has is dropped. None: keep all (no drops, or
  a shard without record_hashes.bin)."""
  hashes = [_record_hashes(d) for d in shard_dirs]
  present = [h for h in hashes if h is not None]
  if not present:
    return [None] * len(shard_dirs)
  values = np.concatenate(present)
  _, first = np.unique(values, return_index=True)
  keep_all = np.zeros(len(values), bool)
  keep_all[first] = True
  out, start = [], 0
  for h in hashes:
    if h is None:
      out.append(None)
      continue
    keep = keep_all[start:start + len(h)]
    start += len(h)
    out.append(None if keep.all() else keep)
  return out


class _ShardView:
  """A finished shard's streams, minus the blocks of the records the merge drops.

  Without drops, `chunks` streams the shard's files as they are; with drops, the shard's
  arrays are read whole and filtered: blocks of dropped records, their sentences, wordpieces
  and spans (span_sentence renumbered to the kept sentences).
  """

  def __init__(self, shard_dir: epath.Path, metadata: Mapping[str, Any],
               keep_records: np.ndarray | None, widths: Mapping[str, int]):
    self.dir, self.metadata = shard_dir, metadata
    self.masks: dict[str, np.ndarray] | None = None
    self.dropped = collections.Counter()
    if keep_records is None:
      return
    with (shard_dir / TEXTS_FILE).open("r") as f:
      records = np.asarray([json.loads(line)["record"] for line in f], np.int64)  # [n]
    ordinal = np.cumsum(np.r_[True, records[1:] != records[:-1]]) - 1 if len(records) else (
        np.zeros(0, np.int64))  # [n] the block's record among the shard's kept records
    if len(records) and ordinal[-1] + 1 != len(keep_records):
      raise ValueError(f"{os.fspath(shard_dir)}: {ordinal[-1] + 1} records in {TEXTS_FILE}, "
                       f"{len(keep_records)} in {HASHES_FILE}.")
    block = keep_records[ordinal]  # [n] bool
    read = lambda name: np.concatenate([np.zeros(0, _STREAMS[name][0]),
                                        *_read_stream(shard_dir, name, widths)])
    sentence = np.repeat(block, read("doc_sentence_counts"))  # [S] bool
    new_index = np.cumsum(sentence) - 1  # [S] kept sentences renumbered
    span_sentence = read("span_sentence")
    span = sentence[span_sentence] if len(span_sentence) else np.zeros(0, bool)
    self.masks = dict(
        retriever_tokens=block, retriever_segments=block, reader_tokens=block,
        reader_lengths=block, doc_sentence_counts=block, title_lengths=block,
        sentence_lengths=sentence,
        sentence_token_ids=np.repeat(sentence, read("sentence_lengths")),
        title_token_ids=np.repeat(block, read("title_lengths")),
        span_sentence=span, span_start=span, span_end=span)
    self._renumber = new_index
    self.block_keep = block
    self.dropped.update(records_ok=int((~keep_records).sum()), blocks=int((~block).sum()),
                        sentences=int((~sentence).sum()), spans=int((~span).sum()))

  def rows(self, name: str) -> int:
    if self.masks is None:
      return self.metadata["rows"][name]
    return int(self.masks[name].sum())

  def chunks(self, name: str, widths: Mapping[str, int]) -> Iterator[np.ndarray]:
    if self.masks is None:
      yield from _read_stream(self.dir, name, widths)
      return
    chunks = list(_read_stream(self.dir, name, widths))
    if not chunks:
      return
    array = np.concatenate(chunks)[self.masks[name]]
    yield self._renumber[array] if name == "span_sentence" else array

  def keeps_block(self, index: int) -> bool:
    return self.masks is None or bool(self.block_keep[index])


def merge_shards(out_dir: epath.PathLike, num_shards: int | None = None,
                 delete_shards: bool = False) -> BuildReport:
  """Merges all finished shards into out_dir/blocks/, salient_spans.npz, block_texts.jsonl and
  build_report.json (written last); returns the summed report.

  An out_dir already merged (build_report.json present) is left alone and its report returned.
  delete_shards removes out_dir/shards/ after a successful merge (they take as much space as
  the merged arrays).
  """
  out_dir = epath.Path(out_dir)
  if (out_dir / REPORT_FILE).exists():
    logging.info("%s already merged.", os.fspath(out_dir))
    return BuildReport.from_dict(_read_json(out_dir / REPORT_FILE))
  start_time = time.monotonic()
  shard_dirs = _shard_dirs(out_dir, num_shards)
  metadata = [_read_json(d / SHARD_METADATA) for d in shard_dirs]
  params = metadata[0]["params"]
  for d, m in zip(shard_dirs, metadata):
    if m["params"] != params:
      raise ValueError(f"Shards disagree on build params: {os.fspath(shard_dirs[0])} has "
                       f"{params}, {os.fspath(d)} has {m['params']}.")
  report = BuildReport()
  for d in shard_dirs:
    report += BuildReport.from_dict(_read_json(d / SHARD_REPORT))
  if not report.blocks:
    raise no_usable_records(f"{params['source']} ({len(shard_dirs)} shards in "
                            f"{os.fspath(out_dir)})", report)
  doc_len, body_len = params["doc_len"], params["body_len"]
  widths = dict(doc_len=doc_len, body_len=body_len)
  views = [_ShardView(d, m, keep, widths)
           for d, m, keep in zip(shard_dirs, metadata, _cross_shard_keep(shard_dirs))]
  dropped = sum((v.dropped for v in views), collections.Counter())
  report.duplicates_across_shards = dropped["records_ok"]
  if report.duplicates_across_shards:
    for name, count in dropped.items():
      setattr(report, name, getattr(report, name) - count)
    report.bad_records[DUPLICATE] += report.duplicates_across_shards
    logging.warning("%s: dropped %d records (%d blocks) that repeat the text of a record in an "
                    "earlier shard.", os.fspath(out_dir), report.duplicates_across_shards,
                    dropped["blocks"])
  special = corpus_lib.SpecialIds(**params["special"])
  total = lambda name: sum(v.rows(name) for v in views)
  num_docs = total("reader_lengths")
  sentence_starts = np.cumsum([0] + [v.rows("sentence_lengths") for v in views])

  # Left by a merge that was killed (one process merges, so none of them is in use).
  for stale in [*(out_dir / name for name in (BLOCKS_DIR, SPANS_FILE, TEXTS_FILE)),
                *out_dir.glob(".merge.tmp-*")]:
    _remove(stale)
  # Object storage (no atomic rename): the merged files go straight into out_dir; readers
  # take the merge as done only once build_report.json, written last, is there.
  in_place = storage.is_object_storage(out_dir)
  tmp = out_dir if in_place else out_dir / f".merge.tmp-{uuid.uuid4().hex[:8]}"
  blocks_tmp = tmp / BLOCKS_DIR
  blocks_tmp.mkdir(parents=True)

  null_tokens, null_segments = corpus_lib.pack_block(
      np.zeros(0, np.int32), np.zeros(0, np.int32), doc_len, special)
  null_reader = np.full(body_len, special.pad, np.int32)
  null_reader[0] = special.sep
  # Row arrays: the shards' rows back to back, then the null document's row where it has one.
  null_rows = dict(retriever_tokens=null_tokens, retriever_segments=null_segments,
                   reader_tokens=null_reader, reader_lengths=[1], sentence_token_ids=None,
                   title_token_ids=None)
  # Offset arrays: exclusive prefix sums of the shards' lengths, [count + 1] int64.
  lengths = dict(sentence_offsets="sentence_lengths", doc_sentence_offsets="doc_sentence_counts",
                 title_offsets="title_lengths")
  array_names = corpus_lib._ARRAY_NAMES  # pylint: disable=protected-access
  assert set(null_rows) | set(lengths) == set(array_names)
  # Files written: the arrays, block_texts.jsonl and salient_spans.npz.
  progress = progress_lib.Progress(f"corpus merge ({num_docs} blocks)", len(array_names) + 2,
                                   unit="files", every_seconds=10.0)
  digests = {}  # the corpus fingerprint's arrays, hashed as they stream (no second read)
  for name, null_row in null_rows.items():
    dtype, width = _STREAMS[name]
    shape = (total(name) + (null_row is not None),) + ((widths[width],) if width else ())
    digest = digests[name] = (corpus_lib.ArrayDigest(dtype, shape)
                              if name in corpus_lib.FINGERPRINT_ARRAYS else None)
    with (blocks_tmp / f"{name}.npy").open("wb") as f:
      stream = _NpyStream(f, dtype, shape)
      for view in views:
        for chunk in view.chunks(name, widths):
          stream.write(chunk)
          if digest is not None:
            digest.update(np.asarray(chunk).reshape((-1, *shape[1:])))
      if null_row is not None:
        stream.write(null_row)
        if digest is not None:
          digest.update(np.asarray(null_row).reshape((-1, *shape[1:])))
      stream.check(name)
    progress.update(1)
  for name, lengths_name in lengths.items():
    with (blocks_tmp / f"{name}.npy").open("wb") as f:
      stream = _NpyStream(f, np.int64, (total(lengths_name) + 1,))
      stream.write([0])
      running = 0
      for view in views:
        for chunk in view.chunks(lengths_name, widths):
          if len(chunk):
            sums = np.cumsum(chunk, dtype=np.int64) + running
            running = int(sums[-1])
            stream.write(sums)
      stream.check(name)
    progress.update(1)

  titles = []
  with (tmp / TEXTS_FILE).open("w") as texts:
    doc_id = 0
    for view in views:
      with (view.dir / TEXTS_FILE).open("r") as f:
        for index, line in enumerate(f):
          if not view.keeps_block(index):
            continue
          block = json.loads(line)
          titles.append(block["title"])
          texts.write(json.dumps(dict(doc_id=doc_id, **block)) + "\n")
          doc_id += 1
  if len(titles) != num_docs:
    raise RuntimeError(f"block_texts has {len(titles)} blocks, the arrays {num_docs}.")
  progress.update(1)
  corpus_metadata = dict(
      format_version=corpus_lib.FORMAT_VERSION, num_docs=num_docs, doc_len=doc_len,
      body_len=body_len, vocab_size=params["vocab_size"], special=params["special"],
      fingerprint=corpus_lib.combine_digests(digests))
  corpus_lib.write_titles(blocks_tmp, titles)
  (blocks_tmp / corpus_lib.METADATA_FILENAME).write_text(json.dumps(corpus_metadata))
  with (tmp / SPANS_FILE).open("wb") as f:
    _write_spans_npz(f, shard_dirs, views, sentence_starts[:-1].tolist())
  progress.update(1)

  if not in_place:
    for name in (BLOCKS_DIR, SPANS_FILE, TEXTS_FILE):
      (tmp / name).rename(out_dir / name)
    tmp.rmtree()
  report.seconds += time.monotonic() - start_time
  summary = dict(report.to_dict(), params=params)
  (out_dir / REPORT_FILE).write_text(json.dumps(summary, indent=1))
  logging.info("Merged %d shards into %s: %s", len(shard_dirs), os.fspath(out_dir),
               report.summary())
  if delete_shards:
    (out_dir / SHARDS_DIR).rmtree()
  return report


def load_salient_spans(out_dir: epath.PathLike) -> dict[str, np.ndarray]:
  """span_sentence [P] int64, span_start and span_end [P] int32 of a merged build.

  Memory-mapped from the (uncompressed) npz on local disks, not read whole (npz_mmap).
  """
  return npz_mmap.load_npz(epath.Path(out_dir) / SPANS_FILE)


def build_wiki_corpus(
    source: str | RecordSource, out_dir: epath.PathLike, tokenizer: tokenizers.Tokenizer, *,
    doc_len: int = 288, num_shards: int = 1, shard_indices: Sequence[int] | None = None,
    span_fn: SpanFn | None = None, max_title_chars: int = 256, max_span_wordpieces: int = 10,
    limit: int | None = None, body_len: int | None = None, tfds_data_dir: str | None = None,
    progress_every_s: float = 30.0, delete_shards: bool = False,
) -> BuildReport:
  """Builds the given shards (default all, finished ones skipped), then merges once all exist.

  A finished build (build_report.json present, same params) is returned as it is. Returns the
  merged report, or the sum of the given shards' reports when others are still missing.
  """
  out_dir = epath.Path(out_dir)
  source = _as_source(source, tfds_data_dir)
  if (out_dir / REPORT_FILE).exists():  # merged already: check it is this build
    saved = _read_json(out_dir / REPORT_FILE)
    params = _build_params(source, limit, num_shards, tokenizer, doc_len,
                           doc_len - 2 if body_len is None else body_len, span_fn,
                           max_title_chars, max_span_wordpieces)
    if saved["params"] != params:
      raise ValueError(f"{os.fspath(out_dir)} holds a build with other params "
                       f"({saved['params']}) than now ({params}); use a fresh out_dir.")
    logging.info("%s already built and merged.", os.fspath(out_dir))
    return BuildReport.from_dict(saved)
  indices = range(num_shards) if shard_indices is None else shard_indices
  report = BuildReport()
  for index in indices:
    report += build_shard(
        source, out_dir, tokenizer, index, num_shards, doc_len=doc_len, body_len=body_len,
        span_fn=span_fn, max_title_chars=max_title_chars,
        max_span_wordpieces=max_span_wordpieces, limit=limit, progress_every_s=progress_every_s)
  done = [(out_dir / SHARDS_DIR / shard_name(i, num_shards) / SHARD_METADATA).exists()
          for i in range(num_shards)]
  if not all(done):
    logging.info("%d of %d shards built; merge once all exist.", sum(done), num_shards)
    return report
  return merge_shards(out_dir, num_shards, delete_shards=delete_shards)
