"""Tokenized document blocks with random access by doc id, saved as memory-mappable .npy files.

Row i of every per-doc array is doc id i; one extra final row is the null document
(`null_id == num_docs`). Retriever blocks are `[CLS] title [SEP] body [SEP]` (segments 0 then 1);
reader blocks drop the title, `body [SEP]`, since the reader input is
`[CLS] query [SEP] body [SEP]`.

Titles are stored as one UTF-8 byte array plus offsets (`title_text.npy`,
`title_text_offsets.npy`) and memory-mapped like the token arrays (`Titles`): at 13.35M
Wikipedia blocks a Python list from corpus.json would hold ~1 GB resident on every host.
Corpora written before that (titles listed in corpus.json) still load.

`corpus.json` records a `fingerprint` of the blocks (`fingerprint`: sha256 over the block token
arrays), computed once when the corpus is built or saved. Index versions record the fingerprint
of the corpus they embed (`retrieval.index_format`), so an index of another corpus with the
same number of blocks is refused instead of silently retrieving the wrong blocks. Corpora
saved before fingerprints existed load with `fingerprint=None` (nothing to compare).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import uuid
from collections.abc import Sequence
from typing import Protocol

import numpy as np
import tokenizers
from etils import epath

from realm_jax import progress as progress_lib
from realm_jax import storage
from realm_jax.data.tokenizer import SpecialIds, special_ids

FORMAT_VERSION = 1
METADATA_FILENAME = "corpus.json"
_ARRAY_NAMES = (
    "retriever_tokens", "retriever_segments", "reader_tokens", "reader_lengths",
    "sentence_token_ids", "sentence_offsets", "doc_sentence_offsets", "title_token_ids",
    "title_offsets",
)
# What the fingerprint covers: the rows that are embedded, retrieved and read. Titles and
# sentence arrays only feed these rows (and masking), so equal rows are the same corpus here.
FINGERPRINT_ARRAYS = ("retriever_tokens", "retriever_segments", "reader_tokens",
                      "reader_lengths")
_HASH_ROWS = 1 << 16  # rows per chunk: bounded memory on memory-mapped Wikipedia-size arrays


TITLE_TEXT_FILE = "title_text.npy"  # [total bytes] uint8: every title's UTF-8, concatenated
TITLE_TEXT_OFFSETS_FILE = "title_text_offsets.npy"  # [N+1] int64: title i is bytes o[i]:o[i+1]


class TitleList(Sequence):
  """A read-only list of document titles decoded on access: subclasses give `__len__` and
  `_title(i)` for 0 <= i < len; slicing, negative indices, bounds and equality are here."""

  def _title(self, index: int) -> str:
    raise NotImplementedError

  def __getitem__(self, index):
    if isinstance(index, slice):
      return [self[i] for i in range(*index.indices(len(self)))]
    index = int(index)
    if index < 0:
      index += len(self)
    if not 0 <= index < len(self):
      raise IndexError(f"title {index} out of range for {len(self)} documents")
    return self._title(index)

  def __eq__(self, other) -> bool:
    if not isinstance(other, Sequence) or isinstance(other, str) or len(other) != len(self):
      return False
    return all(a == b for a, b in zip(self, other))


class Titles(TitleList):
  """The N document titles, decoded on access from a UTF-8 blob [bytes] and offsets [N+1]
  (both memory-mapped when loaded from disk): a list's read-only interface, not its memory."""

  def __init__(self, text: np.ndarray, offsets: np.ndarray):
    if offsets.ndim != 1 or len(offsets) < 1 or int(offsets[-1]) != len(text):
      raise ValueError(f"title offsets [{len(offsets)}] ending at "
                       f"{int(offsets[-1]) if len(offsets) else None} do not cover the "
                       f"{len(text)} bytes of title text")
    self.text, self.offsets = text, offsets

  @classmethod
  def from_list(cls, titles: Sequence[str]) -> "Titles":
    encoded = [t.encode("utf-8") for t in titles]
    offsets = np.zeros(len(encoded) + 1, np.int64)
    np.cumsum([len(e) for e in encoded], out=offsets[1:])
    return cls(np.frombuffer(b"".join(encoded), np.uint8).copy(), offsets)

  def __len__(self) -> int:
    return len(self.offsets) - 1

  def _title(self, index: int) -> str:
    start, stop = int(self.offsets[index]), int(self.offsets[index + 1])
    return bytes(self.text[start:stop]).decode("utf-8")

  def __repr__(self) -> str:
    return f"Titles({len(self)} titles, {len(self.text)} bytes)"


def write_titles(folder: epath.Path, titles: Sequence[str]) -> None:
  """The two title files of a corpus folder (`Titles.from_list` of `titles`)."""
  stored = titles if isinstance(titles, Titles) else Titles.from_list(titles)
  for name, array in ((TITLE_TEXT_FILE, stored.text), (TITLE_TEXT_OFFSETS_FILE, stored.offsets)):
    with (folder / name).open("wb") as f:
      np.save(f, np.asarray(array))


def _load_titles(directory: epath.Path, metadata: dict, mmap: bool) -> Sequence[str]:
  """Titles of a corpus folder: the memory-mapped files, or corpus.json's list (older)."""
  if "titles" in metadata:
    return metadata["titles"]
  return Titles(_load_array(directory / TITLE_TEXT_FILE, mmap),
                _load_array(directory / TITLE_TEXT_OFFSETS_FILE, mmap))


class TitledDoc(Protocol):
  """Anything with a title and body sentences (e.g. facts_corpus.Doc)."""

  title: str
  sentences: Sequence[str]


@dataclasses.dataclass
class BlockCorpus:
  """Token arrays of N documents plus the null document (last row)."""

  retriever_tokens: np.ndarray  # [N+1, doc_len] int32, [CLS] title [SEP] body [SEP] + pad
  retriever_segments: np.ndarray  # [N+1, doc_len] int32, 0 title part, 1 body part, 0 pad
  reader_tokens: np.ndarray  # [N+1, body_len] int32, body [SEP] + pad
  reader_lengths: np.ndarray  # [N+1] int32, non-pad tokens of reader_tokens rows
  sentence_token_ids: np.ndarray  # [S_total] int32, untruncated wordpieces of all body sentences
  sentence_offsets: np.ndarray  # [S+1] int64, sentence j is sentence_token_ids[o[j]:o[j+1]]
  doc_sentence_offsets: np.ndarray  # [N+1] int64, doc i owns sentences o[i]..o[i+1]-1
  title_token_ids: np.ndarray  # [T_total] int32, untruncated wordpieces of all titles
  title_offsets: np.ndarray  # [N+1] int64, doc i's title is title_token_ids[o[i]:o[i+1]]
  titles: Sequence[str]  # [N]: a list, or `Titles` (memory-mapped) once loaded
  vocab_size: int
  special: SpecialIds
  fingerprint: str | None = None  # `fingerprint(self)`, from corpus.json; None: older corpus

  @property
  def num_docs(self) -> int:
    return len(self.titles)

  @property
  def null_id(self) -> int:
    return self.num_docs

  @property
  def doc_len(self) -> int:
    return self.retriever_tokens.shape[1]

  @property
  def body_len(self) -> int:
    return self.reader_tokens.shape[1]

  def sentence_counts(self) -> np.ndarray:
    """Body sentences per doc: [N] int64."""
    return np.diff(self.doc_sentence_offsets)

  def title_ids(self, doc_id: int) -> np.ndarray:
    """Untruncated title wordpieces of one doc: [T] int32."""
    return self.title_token_ids[self.title_offsets[doc_id]:self.title_offsets[doc_id + 1]]

  def sentence_ids(self, doc_id: int) -> list[np.ndarray]:
    """Untruncated wordpieces of each body sentence of one doc."""
    first, last = self.doc_sentence_offsets[doc_id], self.doc_sentence_offsets[doc_id + 1]
    bounds = self.sentence_offsets[first:last + 1]
    return [self.sentence_token_ids[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


class ArrayDigest:
  """sha256 of one array's rows, fed in chunks (little-endian, C order), with its dtype and
  shape: what `fingerprint` combines. The wiki build feeds it while streaming the merge, so the
  result equals hashing the saved array."""

  def __init__(self, dtype, shape: Sequence[int]):
    self.dtype = np.dtype(dtype).newbyteorder("<")
    self.shape = tuple(int(d) for d in shape)
    self._sha = hashlib.sha256()

  def update(self, rows) -> None:
    self._sha.update(np.ascontiguousarray(rows, self.dtype).tobytes())

  def record(self) -> list:
    return [self.dtype.str, list(self.shape), self._sha.hexdigest()]


def array_digest(array: np.ndarray) -> ArrayDigest:
  """`ArrayDigest` of a whole (possibly memory-mapped) array, chunk by chunk."""
  digest = ArrayDigest(array.dtype, array.shape)
  for start in range(0, max(len(array), 1), _HASH_ROWS):
    digest.update(array[start:start + _HASH_ROWS])
  return digest


def combine_digests(digests: dict[str, ArrayDigest]) -> str:
  """The corpus fingerprint from the `FINGERPRINT_ARRAYS` digests: "sha256:<hex>"."""
  text = json.dumps([[name, *digests[name].record()] for name in FINGERPRINT_ARRAYS])
  return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def fingerprint(corpus: BlockCorpus) -> str:
  """A content hash of the corpus's blocks (`FINGERPRINT_ARRAYS`: dtype, shape and bytes).

  Two corpora with the same number of blocks but different text get different fingerprints,
  which `num_docs` alone cannot tell apart. O(corpus bytes) (sha256, ~1 GB/s per core): run
  once at build/save time and read from corpus.json afterwards, never per load.
  """
  return combine_digests({name: array_digest(np.asarray(getattr(corpus, name)))
                          for name in FINGERPRINT_ARRAYS})


def refresh_fingerprint(directory: epath.PathLike) -> str:
  """Recomputes the fingerprint of a saved corpus whose rows were rewritten in place (the wiki
  build's held-out sentences) and stores it in its corpus.json; returns it."""
  directory = epath.Path(directory)
  metadata = json.loads((directory / METADATA_FILENAME).read_text())
  value = fingerprint(load_block_corpus(directory))
  if metadata.get("fingerprint") != value:
    metadata["fingerprint"] = value
    storage.write_text(directory / METADATA_FILENAME, json.dumps(metadata))
  return value


def pack_block(
    title_ids: np.ndarray, body_ids: np.ndarray, doc_len: int, special: SpecialIds
) -> tuple[np.ndarray, np.ndarray]:
  """`[CLS] title [SEP] body [SEP]` padded to doc_len, title cut to doc_len // 4, body to fit.

  Returns tokens and segments, each [doc_len] int32.
  """
  title = title_ids[:doc_len // 4]
  body = body_ids[:doc_len - 3 - len(title)]
  tokens = np.full(doc_len, special.pad, np.int32)
  segments = np.zeros(doc_len, np.int32)
  packed = np.concatenate([[special.cls], title, [special.sep], body, [special.sep]])
  tokens[:len(packed)] = packed
  segments[len(title) + 2:len(packed)] = 1
  return tokens, segments


def _offsets(lengths: Sequence[int]) -> np.ndarray:
  """Exclusive prefix sums: [len(lengths) + 1] int64."""
  return np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])


def _flat_ids(encodings: Sequence[tokenizers.Encoding]) -> np.ndarray:
  """All encodings' ids back to back: [sum of lengths] int32."""
  return np.fromiter((i for e in encodings for i in e.ids), np.int32)


def build_block_corpus(
    docs: Sequence[TitledDoc], tokenizer: tokenizers.Tokenizer, doc_len: int,
    body_len: int | None = None,
) -> BlockCorpus:
  """Tokenizes docs (row i = docs[i]) into blocks; body_len defaults to doc_len - 2.

  The reader body is cut to body_len - 1 wordpieces on its own, so it can keep more of the body
  than the retriever block, which also holds the title.
  """
  body_len = doc_len - 2 if body_len is None else body_len
  if doc_len < 3 or body_len < 1:
    raise ValueError(f"Need doc_len >= 3 and body_len >= 1, got {doc_len=}, {body_len=}.")
  special = special_ids(tokenizer)
  titles = [doc.title for doc in docs]
  sentences = [s for doc in docs for s in doc.sentences]
  title_encodings = tokenizer.encode_batch(titles, add_special_tokens=False)
  sentence_encodings = tokenizer.encode_batch(sentences, add_special_tokens=False)
  title_offsets = _offsets([len(e.ids) for e in title_encodings])
  title_token_ids = _flat_ids(title_encodings)
  sentence_offsets = _offsets([len(e.ids) for e in sentence_encodings])
  sentence_token_ids = _flat_ids(sentence_encodings)
  doc_sentence_offsets = _offsets([len(doc.sentences) for doc in docs])

  num_rows = len(docs) + 1  # the null document is the last row
  retriever_tokens = np.full((num_rows, doc_len), special.pad, np.int32)
  retriever_segments = np.zeros((num_rows, doc_len), np.int32)
  reader_tokens = np.full((num_rows, body_len), special.pad, np.int32)
  reader_lengths = np.zeros(num_rows, np.int32)
  empty = np.zeros(0, np.int32)
  progress = progress_lib.Progress("corpus: pack blocks", num_rows, unit="blocks",
                                   every_seconds=30.0)
  for row in range(num_rows):
    if row < len(docs):
      title = title_token_ids[title_offsets[row]:title_offsets[row + 1]]
      body_start = sentence_offsets[doc_sentence_offsets[row]]
      body_end = sentence_offsets[doc_sentence_offsets[row + 1]]
      body = sentence_token_ids[body_start:body_end]
    else:
      title, body = empty, empty
    retriever_tokens[row], retriever_segments[row] = pack_block(title, body, doc_len, special)
    reader_body = np.append(body[:body_len - 1], special.sep)
    reader_tokens[row, :len(reader_body)] = reader_body
    reader_lengths[row] = len(reader_body)
    progress.update(1)

  corpus = BlockCorpus(
      retriever_tokens=retriever_tokens, retriever_segments=retriever_segments,
      reader_tokens=reader_tokens, reader_lengths=reader_lengths,
      sentence_token_ids=sentence_token_ids, sentence_offsets=sentence_offsets,
      doc_sentence_offsets=doc_sentence_offsets, title_token_ids=title_token_ids,
      title_offsets=title_offsets, titles=titles, vocab_size=tokenizer.get_vocab_size(),
      special=special)
  corpus.fingerprint = fingerprint(corpus)
  return corpus


def save_block_corpus(corpus: BlockCorpus, directory: epath.PathLike) -> None:
  """Writes the .npy arrays, then corpus.json, into a tmp dir and renames it to directory.

  On object storage the arrays go straight into `directory` and corpus.json, the marker
  `load_block_corpus` requires, is written last (`storage.publish_folder`).

  The fingerprint is recomputed from the arrays being saved (a caller may have changed rows
  since it was built, as corpus versions do) and stored in corpus.json.
  """
  directory = epath.Path(directory)
  if directory.exists() and not storage.is_object_storage(directory):
    raise FileExistsError(f"Corpus directory already exists: {os.fspath(directory)}")
  tmp = directory.parent / f".{directory.name}.tmp-{uuid.uuid4().hex}"
  with storage.publish_folder(directory, METADATA_FILENAME, tmp=tmp) as folder:
    for name in _ARRAY_NAMES:
      with (folder / f"{name}.npy").open("wb") as f:
        np.save(f, np.asarray(getattr(corpus, name)))
    write_titles(folder, corpus.titles)
    metadata = dict(
        format_version=FORMAT_VERSION, num_docs=corpus.num_docs, doc_len=corpus.doc_len,
        body_len=corpus.body_len, vocab_size=corpus.vocab_size,
        special=dataclasses.asdict(corpus.special), fingerprint=fingerprint(corpus))
    (folder / METADATA_FILENAME).write_text(json.dumps(metadata))


def _load_array(path: epath.Path, mmap: bool) -> np.ndarray:
  """np.load, memory-mapped when asked and the file is local."""
  if not path.exists():
    raise FileNotFoundError(f"Corpus array file not found: {os.fspath(path)}")
  if mmap and "://" not in os.fspath(path):
    return np.load(os.fspath(path), mmap_mode="r")
  with path.open("rb") as f:
    return np.load(f)


def load_block_corpus(directory: epath.PathLike, mmap: bool = True) -> BlockCorpus:
  """Loads a corpus written by save_block_corpus, checking its format and array shapes."""
  directory = epath.Path(directory)
  metadata_file = directory / METADATA_FILENAME
  if not directory.is_dir():
    raise FileNotFoundError(f"Corpus directory not found: {os.fspath(directory)}")
  if not metadata_file.exists():
    raise FileNotFoundError(
        f"Corpus metadata not found (incomplete corpus?): {os.fspath(metadata_file)}")
  metadata = json.loads(metadata_file.read_text())
  if metadata.get("format_version") != FORMAT_VERSION:
    raise ValueError(f"{os.fspath(metadata_file)}: format_version "
                     f"{metadata.get('format_version')}, expected {FORMAT_VERSION}.")
  arrays = {name: _load_array(directory / f"{name}.npy", mmap) for name in _ARRAY_NAMES}
  titles = _load_titles(directory, metadata, mmap)
  if len(titles) != metadata["num_docs"]:
    raise ValueError(f"{os.fspath(directory)}: {len(titles)} titles, corpus.json says "
                     f"{metadata['num_docs']} documents.")
  corpus = BlockCorpus(**arrays, titles=titles, vocab_size=metadata["vocab_size"],
                       special=SpecialIds(**metadata["special"]),
                       fingerprint=metadata.get("fingerprint"))
  num_rows = metadata["num_docs"] + 1
  expected_shapes = dict(retriever_tokens=(num_rows, metadata["doc_len"]),
                         retriever_segments=(num_rows, metadata["doc_len"]),
                         reader_tokens=(num_rows, metadata["body_len"]), reader_lengths=(num_rows,),
                         doc_sentence_offsets=(num_rows,), title_offsets=(num_rows,))
  for name, shape in expected_shapes.items():
    if arrays[name].shape != shape:
      raise ValueError(f"{os.fspath(directory)}: {name} has shape {arrays[name].shape}, "
                       f"corpus.json implies {shape}.")
  return corpus


def gather_candidates(corpus: BlockCorpus, ids: np.ndarray) -> dict[str, np.ndarray]:
  """Candidate rows: ids [B, k] -> retriever_* [B, k, doc_len], reader_tokens [B, k, body_len]."""
  ids = np.asarray(ids)
  if ids.size and (ids.min() < 0 or ids.max() > corpus.null_id):
    raise ValueError(
        f"Candidate ids must lie in [0, {corpus.null_id}], got [{ids.min()}, {ids.max()}].")
  return dict(
      retriever_tokens=np.asarray(corpus.retriever_tokens[ids]),
      retriever_segments=np.asarray(corpus.retriever_segments[ids]),
      reader_tokens=np.asarray(corpus.reader_tokens[ids]),
  )
