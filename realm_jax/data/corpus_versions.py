"""Corpus versions: add, remove and replace documents of a built corpus without a rebuild.

`--mode=update_corpus --add=new.jsonl [--remove=ids_or_titles.txt] [--replace=changed.jsonl]`
publishes a new version of a prepared corpus (facts or wiki, `data.corpus_dir`):

- added records (`{"title", "text"}` JSON lines) go through the wiki build's own per-record
  pipeline (`wiki_corpus.build_shard`: cleaning, bad-record counting, exact-duplicate drop,
  sentence split, greedy packing into blocks, salient-span tagging with `data.salient_tagger`
  for wiki, none for facts, whose full build tags nothing); their blocks get new doc ids after
  every existing one, so a doc id is never reused;
- removed blocks (a `--remove` line is a doc id or a title: every live block of that title)
  are tombstoned: `removed.npy` marks them and their token rows read as the null block,
  but their rows stay, so every other doc id keeps its meaning;
- a replaced record (same title as live blocks) removes those blocks and adds its new ones.

Layout (version 0 is the build itself, `<corpus_dir>/blocks/`, never changed). A version
stores only what it changed (delta storage: O(change) bytes per update, however big the corpus):
```
<corpus_dir>/versions/000001/blocks/          a BlockCorpus of the rows version 1 added (doc
                                              ids added[0]..added[1]-1, offsets counting from
                                              0, plus a copy of the null row)
<corpus_dir>/versions/000001/removed.npy      [num_docs] bool tombstones (cumulative: 1 byte
                                              per doc, 13 MB at Wikipedia scale)
<corpus_dir>/versions/000001/block_texts.jsonl {"doc_id","record","title","text","version"} of
                                              the added rows
<corpus_dir>/versions/000001/salient_spans.npz the added blocks' spans (global sentence index)
<corpus_dir>/versions/000001/VERSION.json     written last: the manifest (see `_update`)
<corpus_dir>/CORPUS_LATEST                    the newest published version number
```
A reader of version n sees one corpus (`load_version`): the build's rows, then the rows each
version 1..n added, read in place from their memory-mapped files (`data/chained.py`), with
tombstoned rows reading as the null block, so nothing of a removed text is retrievable and
every other doc id keeps its meaning. The null document is the last row (null_id grows with
num_docs). A version's fingerprint chains its parent's, its added rows' and its tombstones', so
it is O(change) to compute. Versions written before delta storage (format_version 1: a
whole copy of the corpus per version) still load, and can be the parent of delta versions.

Publishing follows the index format's discipline: everything is written into a hidden tmp
folder, VERSION.json last, the folder is renamed into place, and only then is CORPUS_LATEST
replaced (write-then-rename). On object storage (no atomic rename) the files go straight into
`versions/<n>/`, VERSION.json last, and CORPUS_LATEST is one object written whole
(`storage.publish_folder`). A killed update leaves a tmp folder (object storage: a version
folder without VERSION.json) that the next update removes; no reader ever sees a partial
version: readers take only versions with a VERSION.json. Published versions are never modified, so a reader of
an older version (a trainer on the index built for it) keeps working until it moves on. One
updater at a time: the corpus folder's `corpus_update` lease (`realm_jax.lease`).

Bad input is a `CorpusVersionError` naming the cause, before anything is published: a corpus
still being built (no build_config.json), a removed id or title that does not exist or is
already removed, a replaced title that is not in the corpus, an added title that is already
live (that is a --replace) or one named twice, an update with nothing to do, an add file
without one usable record, a config whose doc_len or vocabulary differs from the
corpus's, and (when loading) a version whose vocabulary or block length differs from the base,
or whose chain of parents is broken.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import tempfile
import time
import uuid
import zipfile
from collections.abc import Sequence
from typing import Any

import numpy as np
from etils import epath

from realm_jax import lease as lease_lib
from realm_jax import storage
from realm_jax.data import chained
from realm_jax.data import corpus as corpus_lib
from realm_jax.data import tokenizer as tokenizer_lib
from realm_jax.data import wiki_corpus

VERSIONS_DIR = "versions"
LATEST = "CORPUS_LATEST"
MANIFEST = "VERSION.json"
REMOVED = "removed.npy"
BUILD_CONFIG = "build_config.json"  # prepare.BUILD_CONFIG (not imported: prepare imports us)
FORMAT_VERSION = 2  # 1: every version a whole copy of the corpus (still loads); 2: deltas
LEASE_ROLE = "corpus_update"
TMP_PREFIX = ".tmp-"
# Test hook: an update whose environment names this point pauses there (for kill tests).
PAUSE_ENV = "REALM_CORPUS_TEST_PAUSE"
PAUSE_MARKER_ENV = "REALM_CORPUS_TEST_PAUSE_MARKER"  # a file touched when the pause starts


class CorpusVersionError(ValueError):
  """An update that cannot be applied, or a version that does not fit its corpus."""


@dataclasses.dataclass
class CorpusVersion:
  """One published version: its blocks, tombstones and manifest."""

  version: int
  corpus: corpus_lib.BlockCorpus
  removed: np.ndarray  # [num_docs] bool, True: tombstoned (never to be retrieved)
  manifest: dict[str, Any]
  directory: epath.Path  # the folder holding blocks/ (the corpus dir itself for version 0)
  # (version, folder, first doc id, stop doc id) of each stored part of `corpus`, in doc id
  # order: the build (or a format-1 whole copy), then each delta version's added rows. Their
  # texts and spans are in those folders.
  chain: tuple[tuple[int, epath.Path, int, int], ...] = ()

  @property
  def live_ids(self) -> np.ndarray:
    """Doc ids that are not removed: [L] int64."""
    return np.flatnonzero(~self.removed).astype(np.int64)


def build_version(corpus: corpus_lib.BlockCorpus, directory: epath.PathLike | None
                  ) -> CorpusVersion:
  """Version 0 (the build itself, no tombstones) of an already loaded corpus: what a reader
  holds before any update, without loading the blocks again."""
  directory = None if directory is None else epath.Path(directory)
  return CorpusVersion(0, corpus, np.zeros(corpus.num_docs, bool), dict(version=0), directory,
                       () if directory is None else ((0, directory, 0, corpus.num_docs),))


def version_dir(corpus_dir: epath.PathLike, version: int) -> epath.Path:
  corpus_dir = epath.Path(corpus_dir)
  return corpus_dir if version == 0 else corpus_dir / VERSIONS_DIR / f"{version:06d}"


def list_versions(corpus_dir: epath.PathLike) -> list[int]:
  """Published version numbers (those with a manifest), ascending; 0 is always the build."""
  root = epath.Path(corpus_dir) / VERSIONS_DIR
  found = [0]
  if root.is_dir():
    found += sorted(int(p.name) for p in root.iterdir()
                    if p.name.isdigit() and (p / MANIFEST).exists())
  return found


def latest_version(corpus_dir: epath.PathLike) -> int:
  """The version CORPUS_LATEST names (0 without one). A garbage pointer is an error."""
  path = epath.Path(corpus_dir) / LATEST
  if not path.exists():
    return 0
  text = path.read_text().strip()
  if not text.isdigit():
    raise CorpusVersionError(f"{path} holds {text[:40]!r}, not a version number")
  return int(text)


def vocab_sha256(corpus_dir: epath.PathLike) -> str:
  """sha256 of the corpus's vocab.txt: what every version must be tokenized with."""
  return hashlib.sha256(
      (epath.Path(corpus_dir) / tokenizer_lib.VOCAB_FILENAME).read_bytes()).hexdigest()


def _base_metadata(corpus_dir: epath.Path) -> dict[str, Any]:
  return json.loads((corpus_dir / "blocks" / corpus_lib.METADATA_FILENAME).read_text())


def load_version(corpus_dir: epath.PathLike, version: int | None = None, mmap: bool = True
                 ) -> CorpusVersion:
  """Loads `version` (default: CORPUS_LATEST) and checks it fits the base build.

  The version's vocabulary (sha256 of vocab.txt) and block lengths must be the base's: a
  version tokenized otherwise would feed the model ids it was not trained on. A delta version
  reads the rows of every version before it (`_parts`); none is copied.
  """
  corpus_dir = epath.Path(corpus_dir)
  version = latest_version(corpus_dir) if version is None else int(version)
  directory = version_dir(corpus_dir, version)
  if version == 0:
    corpus = corpus_lib.load_block_corpus(corpus_dir / "blocks", mmap=mmap)
    return CorpusVersion(0, corpus, np.zeros(corpus.num_docs, bool),
                         dict(version=0, num_docs=corpus.num_docs), corpus_dir,
                         ((0, corpus_dir, 0, corpus.num_docs),))
  manifest = _checked_manifest(corpus_dir, version)
  with (directory / REMOVED).open("rb") as f:
    removed = np.load(f).astype(bool)
  parts = _parts(corpus_dir, version, mmap)
  if len(parts) == 1:  # a format-1 version: one whole copy, its tombstones already blanked
    corpus = parts[0][2]
  else:
    corpus = _chained_corpus([part for _, _, part in parts], removed, manifest["fingerprint"])
  if corpus.num_docs != manifest["num_docs"] or removed.shape != (corpus.num_docs,):
    raise CorpusVersionError(f"{directory}: {corpus.num_docs} blocks and {removed.shape} "
                             f"tombstones, the manifest says {manifest['num_docs']} docs")
  starts = np.cumsum([0] + [part.num_docs for _, _, part in parts]).tolist()
  chain = tuple((number, folder, starts[i], starts[i + 1])
                for i, (number, folder, _) in enumerate(parts))
  return CorpusVersion(version, corpus, removed, manifest, directory, chain)


def _checked_manifest(corpus_dir: epath.Path, version: int) -> dict[str, Any]:
  """VERSION.json of a published version, checked against the base build."""
  directory = version_dir(corpus_dir, version)
  if not (directory / MANIFEST).exists():
    raise CorpusVersionError(f"corpus version {version} is not published in {corpus_dir} "
                             f"(no {directory / MANIFEST})")
  manifest = json.loads((directory / MANIFEST).read_text())
  base = _base_metadata(corpus_dir)
  problems = [f"{key} {manifest.get(key)!r} != the corpus's {base[key]!r}"
              for key in ("doc_len", "body_len", "vocab_size") if manifest.get(key) != base[key]]
  if manifest.get("vocab_sha256") != vocab_sha256(corpus_dir):
    problems.append("its vocabulary (vocab_sha256) is not the corpus's vocab.txt")
  if manifest.get("format_version", 1) not in (1, FORMAT_VERSION):
    problems.append(f"format_version {manifest.get('format_version')} is not 1 or "
                    f"{FORMAT_VERSION} (written by a newer realm_jax?)")
  if problems:
    raise CorpusVersionError(f"corpus version {version} in {directory} does not fit the corpus "
                             f"{corpus_dir}: {'; '.join(problems)}")
  return manifest


def _parts(corpus_dir: epath.Path, version: int, mmap: bool
           ) -> list[tuple[int, epath.Path, corpus_lib.BlockCorpus]]:
  """(version, folder, stored BlockCorpus) of every part of `version`, in doc id order: the
  build or a format-1 copy first, then each delta version's added rows."""
  parts, firsts = [], []  # firsts: the first doc id each part holds, as its manifest says
  while True:
    folder = version_dir(corpus_dir, version)
    if version == 0:
      parts.append((0, corpus_dir, corpus_lib.load_block_corpus(corpus_dir / "blocks", mmap)))
      firsts.append(0)
      break
    manifest = _checked_manifest(corpus_dir, version)
    part = corpus_lib.load_block_corpus(folder / "blocks", mmap=mmap)
    parts.append((version, folder, part))
    if manifest.get("format_version", 1) == 1:
      firsts.append(0)
      break
    first, stop = manifest["added"]
    firsts.append(first)
    if part.num_docs != stop - first:
      raise CorpusVersionError(f"{folder}: {part.num_docs} added blocks stored, the manifest "
                               f"says ids {first}..{stop - 1}")
    parent = int(manifest["parent"])
    if not 0 <= parent < version:
      raise CorpusVersionError(f"{folder}: parent version {parent} is not older than {version}")
    version = parent
  parts.reverse()
  firsts.reverse()
  expected = 0
  for (number, folder, part), first in zip(parts, firsts):
    if first != expected:
      raise CorpusVersionError(f"corpus version {number} in {folder} adds ids from {first}, "
                               f"but the versions before it end at {expected}")
    expected += part.num_docs
  return parts


def _chained_corpus(parts: Sequence[corpus_lib.BlockCorpus], removed: np.ndarray,
                    fingerprint: str | None) -> corpus_lib.BlockCorpus:
  """One BlockCorpus reading the parts' rows in place: their docs in order, then the first
  part's null row; tombstoned rows (`removed` [num_docs]) read as the null row."""
  first = parts[0]
  rows = {}
  for name in ("retriever_tokens", "retriever_segments", "reader_tokens", "reader_lengths"):
    null = getattr(first, name)[first.null_id:first.null_id + 1]
    rows[name] = chained.ChainedRows(
        [getattr(p, name)[:p.num_docs] for p in parts] + [null], masked=removed,
        fill=np.array(null[0]))
  return corpus_lib.BlockCorpus(
      **rows,
      sentence_token_ids=chained.ChainedRows([p.sentence_token_ids for p in parts]),
      sentence_offsets=chained.chained_offsets([p.sentence_offsets for p in parts]),
      doc_sentence_offsets=chained.chained_offsets([p.doc_sentence_offsets for p in parts]),
      title_token_ids=chained.ChainedRows([p.title_token_ids for p in parts]),
      title_offsets=chained.chained_offsets([p.title_offsets for p in parts]),
      titles=chained.ChainedTitles([p.titles for p in parts]), vocab_size=first.vocab_size,
      special=first.special, fingerprint=fingerprint)


def text_files(version: CorpusVersion) -> list[tuple[epath.Path, int, int]]:
  """(block_texts.jsonl, first doc id, stop doc id) of each part of this version: where the
  display texts of its blocks are (the build's file, then each delta's added rows')."""
  return [(folder / wiki_corpus.TEXTS_FILE, first, stop)
          for _, folder, first, stop in version.chain]


def added_spans(version: CorpusVersion) -> dict[str, np.ndarray]:
  """Salient spans of the blocks versions 1..n added (span_sentence: global sentence index in
  `version.corpus`); empty for the build. May include the build's spans when the chain starts
  at a format-1 copy (whose file held all): callers keep spans of added docs only."""
  found = [wiki_corpus.load_salient_spans(folder) for number, folder, _, _ in version.chain
           if number and (folder / wiki_corpus.SPANS_FILE).exists()]
  if not found:
    return dict(span_sentence=np.zeros(0, np.int64), span_start=np.zeros(0, np.int32),
                span_end=np.zeros(0, np.int32))
  return {name: np.concatenate([spans[name] for spans in found]) for name in found[0]}


def chained_fingerprint(parent: str | None, added: str | None, removed: np.ndarray) -> str:
  """A version's fingerprint from its parent's, its added rows' and its tombstones [num_docs]:
  O(change) to compute; differs when any of the three does."""
  text = json.dumps([parent, added, hashlib.sha256(
      np.ascontiguousarray(removed, bool).tobytes()).hexdigest()])
  return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def changes(old: CorpusVersion, new: CorpusVersion) -> tuple[np.ndarray, np.ndarray]:
  """What turned `old` into `new`: (added live doc ids [A], removed doc ids [R]), int64.

  Ids only grow and rows never change once written, so the added ones are the new rows that
  are live, and the removed ones are old rows tombstoned since.
  """
  if new.corpus.num_docs < old.corpus.num_docs or (old.removed & ~new.removed[
      :old.corpus.num_docs]).any():
    raise CorpusVersionError(f"corpus version {new.version} does not descend from "
                             f"{old.version}")
  added = np.arange(old.corpus.num_docs, new.corpus.num_docs, dtype=np.int64)
  added = added[~new.removed[added]]
  removed = np.flatnonzero(new.removed[:old.corpus.num_docs] & ~old.removed).astype(np.int64)
  return added, removed


def live_queries(queries: dict[str, np.ndarray], removed: np.ndarray | None
                 ) -> dict[str, np.ndarray]:
  """Training queries as they stand in a corpus version with tombstones `removed` [num_docs].

  The queries were made from the build's (version 0's) text. A query whose source document
  (`source_ids`) is removed is made inert, as eval padding is: zero `masked_weights` (no loss,
  no gradient) and unknown gold (-1): removed text is no longer trained on, and the batch keeps
  its shape and every other row (resumes stay deterministic). A query whose gold document is
  removed keeps training (its fact may still be stated elsewhere) but its gold becomes unknown,
  so gold recall only counts documents that can still be retrieved. Unchanged (the same dict)
  when nothing it holds is removed.
  """
  if removed is None:
    return queries
  # Per step on the training path: only the batch's ids are looked up (O(B)), never a scan of
  # the [num_docs] tombstones.
  def gone(ids):
    ids = np.asarray(ids)
    inside = (ids >= 0) & (ids < len(removed))
    return inside & removed[np.where(inside, ids, 0)]
  dead_source = gone(queries["source_ids"])
  dead_gold = gone(queries["gold_ids"]) | dead_source
  if not dead_gold.any():
    return queries
  out = dict(queries)
  out["gold_ids"] = np.where(dead_gold, -1, queries["gold_ids"]).astype(
      np.asarray(queries["gold_ids"]).dtype)
  out["masked_weights"] = np.where(dead_source[:, None], 0, queries["masked_weights"]).astype(
      np.asarray(queries["masked_weights"]).dtype)
  return out


# ---------------------------------------------------------------------------------------------
# Updating.


def _read_lines(path: epath.PathLike | None) -> list[bytes]:
  if not path:
    return []
  path = epath.Path(path)
  if not path.is_file():
    raise CorpusVersionError(f"update input {os.fspath(path)} does not exist")
  return path.read_bytes().splitlines()


def _resolve_removals(lines: Sequence[bytes], parent: CorpusVersion, path: str) -> np.ndarray:
  """Doc ids named by --remove lines (an integer id, or a title: all its live blocks)."""
  by_title: dict[str, list[int]] = {}
  for doc_id, title in enumerate(parent.corpus.titles):
    if not parent.removed[doc_id]:
      by_title.setdefault(title, []).append(doc_id)
  ids, unknown, gone = [], [], []
  for raw in lines:
    item = raw.decode("utf-8", "replace").strip()
    if not item:
      continue
    if item.isdigit():
      doc_id = int(item)
      if doc_id >= parent.corpus.num_docs:
        unknown.append(item)
      elif parent.removed[doc_id]:
        gone.append(item)
      else:
        ids.append(doc_id)
    elif item in by_title:
      ids.extend(by_title[item])
    else:
      unknown.append(item)
  if unknown or gone:
    detail = "; ".join(
        part for part in (f"unknown ids or titles {unknown[:10]}" if unknown else "",
                          f"ids already removed {gone[:10]}" if gone else "") if part)
    raise CorpusVersionError(f"--remove={path}: {detail} (version {parent.version} has doc "
                             f"ids 0..{parent.corpus.num_docs - 1}); nothing was published")
  return np.unique(np.asarray(ids, np.int64))


def _titles_of(lines: Sequence[bytes]) -> list[str | None]:
  """Each replace line's title (None for a bad record: counted by the build instead)."""
  titles = []
  for raw in lines:
    try:
      titles.append(wiki_corpus.parse_record(raw, 1 << 20)[0])
    except wiki_corpus.BadRecord:
      titles.append(None)
  return titles


def _check_added_titles(added: Sequence[str | None], replaced: Sequence[str],
                        parent: CorpusVersion, removed_now: np.ndarray, add, replace):
  """Refuses an update that would leave two live documents with one title.

  An --add title that is live in the parent (and not removed by this update) is a change of an
  existing document: --replace says so and tombstones the old blocks; adding it would keep both
  and retrieval would return the stale text beside the new one. A title twice in --replace, or
  in both --add and --replace, is ambiguous the same way.
  """
  leaving = np.zeros(parent.corpus.num_docs, bool)
  leaving[removed_now] = True
  live = {t for t, gone, now in zip(parent.corpus.titles, parent.removed, leaving)
          if not gone and not now}
  problems = []
  clash = sorted({t for t in added if t is not None and t in live})
  if clash:
    problems.append(f"--add={add} has titles already live in corpus version {parent.version} "
                    f"(use --replace to change a document): {clash[:10]}")
  both = sorted(set(t for t in added if t is not None) & set(replaced))
  if both:
    problems.append(f"titles in both --add and --replace: {both[:10]}")
  seen, twice = set(), set()
  for title in replaced:
    (twice if title in seen else seen).add(title)
  if twice:
    problems.append(f"--replace={replace} names a title more than once: {sorted(twice)[:10]}")
  if problems:
    raise CorpusVersionError("; ".join(problems) + "; nothing was published")


def _read_all(shard_dir: epath.Path, name: str, widths: dict[str, int]) -> np.ndarray:
  dtype, width = wiki_corpus._STREAMS[name]  # pylint: disable=protected-access
  chunks = list(wiki_corpus._read_stream(shard_dir, name, widths))  # pylint: disable=protected-access
  if not chunks:
    shape = (0,) if width is None else (0, widths[width])
    return np.zeros(shape, dtype)
  return np.concatenate(chunks)


def _added_part(parent: CorpusVersion, shard_dir: epath.Path | None
                ) -> tuple[corpus_lib.BlockCorpus, list[dict], dict[str, np.ndarray]]:
  """What the update stores: a BlockCorpus of the shard's blocks (offsets from 0, then a copy
  of the null row), their block_texts lines and salient spans (sentence index not yet global).
  No shard: nothing added (a removal-only update)."""
  base = parent.corpus
  widths = dict(doc_len=base.doc_len, body_len=base.body_len)
  names = wiki_corpus._STREAMS  # pylint: disable=protected-access
  if shard_dir is None:
    new = {name: np.zeros((0,) if width is None else (0, widths[width]), dtype)
           for name, (dtype, width) in names.items()}
    texts = []
  else:
    new = {name: _read_all(shard_dir, name, widths) for name in names}
    with (shard_dir / wiki_corpus.TEXTS_FILE).open("r") as f:
      texts = [json.loads(line) for line in f]
  rows = {}
  for name in ("retriever_tokens", "retriever_segments", "reader_tokens", "reader_lengths"):
    null = np.asarray(getattr(base, name)[base.null_id:base.null_id + 1])
    rows[name] = np.concatenate([new[name].astype(null.dtype), null])
  offsets = lambda lengths: np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
  part = corpus_lib.BlockCorpus(
      **rows, sentence_token_ids=new["sentence_token_ids"].astype(np.int32),
      sentence_offsets=offsets(new["sentence_lengths"]),
      doc_sentence_offsets=offsets(new["doc_sentence_counts"]),
      title_token_ids=new["title_token_ids"].astype(np.int32),
      title_offsets=offsets(new["title_lengths"]), titles=[t["title"] for t in texts],
      vocab_size=base.vocab_size, special=base.special)
  spans = {name: new[name] for name in ("span_sentence", "span_start", "span_end")}
  return part, texts, spans


def _sha256_file(path: epath.Path) -> str:
  digest = hashlib.sha256()
  with path.open("rb") as f:
    while chunk := f.read(1 << 24):
      digest.update(chunk)
  return digest.hexdigest()


def _pause(point: str):
  if os.environ.get(PAUSE_ENV) == point:
    if os.environ.get(PAUSE_MARKER_ENV):
      epath.Path(os.environ[PAUSE_MARKER_ENV]).write_text(point)
    logging.warning("corpus_versions: pausing at %r (test hook %s)", point, PAUSE_ENV)
    while True:
      time.sleep(3600)


def _replace_text(path: epath.Path, text: str):
  storage.write_text(path, text)  # write-then-rename locally, one whole object on a bucket


def update_corpus(corpus_dir: epath.PathLike, *, add: str | None = None,
                  remove: str | None = None, replace: str | None = None,
                  span_fn: wiki_corpus.SpanFn | None = None, max_span_wordpieces: int = 10,
                  doc_len: int | None = None, vocab_file: str | None = None,
                  force_lease: bool = False) -> dict[str, Any]:
  """Publishes the next version of the corpus in `corpus_dir`; returns its manifest.

  add / replace: JSONL files of {"title", "text"} records; remove: a text file, one doc id or
  title per line. doc_len / vocab_file (the run's data config) must match the corpus's.
  """
  corpus_dir = epath.Path(corpus_dir)
  if not (corpus_dir / BUILD_CONFIG).exists():
    raise CorpusVersionError(
        f"{corpus_dir} is not a finished corpus (no {BUILD_CONFIG}): it is being built or its "
        "build failed; run --mode=build_corpus to completion before updating it")
  if not (add or remove or replace):
    raise CorpusVersionError("update_corpus needs --add, --remove or --replace")
  with lease_lib.acquire(corpus_dir, LEASE_ROLE, force=force_lease) as held:
    return _update(corpus_dir, add, remove, replace, span_fn, max_span_wordpieces, doc_len,
                   vocab_file, held)


def _update(corpus_dir: epath.Path, add, remove, replace, span_fn, max_span_wordpieces,
            doc_len, vocab_file, held: lease_lib.Lease) -> dict[str, Any]:
  start_time = time.time()
  versions_root = corpus_dir / VERSIONS_DIR
  versions_root.mkdir(exist_ok=True)
  stale = list(versions_root.glob(f"{TMP_PREFIX}*"))  # a killed update's (one updater: lease)
  if storage.is_object_storage(versions_root) and versions_root.exists():
    stale += [p for p in versions_root.iterdir()
              if p.name.isdigit() and not (p / MANIFEST).exists()]
  for path in stale:
    logging.info("update_corpus: removing the leftover %s", path)
    path.rmtree()
  parent_version = max(latest_version(corpus_dir), list_versions(corpus_dir)[-1])
  parent = load_version(corpus_dir, parent_version)
  base = _base_metadata(corpus_dir)
  if doc_len is not None and doc_len != base["doc_len"]:
    raise CorpusVersionError(f"data.doc_len={doc_len} but the corpus in {corpus_dir} has "
                             f"blocks of {base['doc_len']}: a version cannot change it")
  vocab_path = corpus_dir / tokenizer_lib.VOCAB_FILENAME
  if vocab_file and epath.Path(vocab_file).read_bytes() != vocab_path.read_bytes():
    raise CorpusVersionError(f"data.vocab_file={vocab_file} is not the vocabulary the corpus "
                             f"in {corpus_dir} was built with ({vocab_path})")
  tokenizer = tokenizer_lib.load_tokenizer(vocab_path)

  add_lines, replace_lines = _read_lines(add), _read_lines(replace)
  removed_now = _resolve_removals(_read_lines(remove), parent, remove)
  replaced_titles = [t for t in _titles_of(replace_lines) if t is not None]
  if replaced_titles:
    live = {t for t, gone in zip(parent.corpus.titles, parent.removed) if not gone}
    missing = sorted(set(replaced_titles) - live)
    if missing:
      raise CorpusVersionError(f"--replace={replace}: titles not in corpus version "
                               f"{parent.version}: {missing[:10]}; nothing was published")
    wanted = set(replaced_titles)
    replaced_ids = [i for i, (t, gone) in enumerate(zip(parent.corpus.titles, parent.removed))
                    if t in wanted and not gone]
    removed_now = np.union1d(removed_now, np.asarray(replaced_ids, np.int64))
  _check_added_titles(_titles_of(add_lines), replaced_titles, parent, removed_now, add, replace)

  version = parent_version + 1
  with storage.publish_folder(
      version_dir(corpus_dir, version), MANIFEST,
      tmp=versions_root / f"{TMP_PREFIX}{version:06d}-{uuid.uuid4().hex[:8]}") as tmp:
    lines = add_lines + replace_lines
    report = wiki_corpus.BuildReport()
    if lines:
      work = epath.Path(tempfile.mkdtemp(prefix="realm-corpus-update-"))
      try:
        report = wiki_corpus.build_shard(
            wiki_corpus.SequenceSource(lines, description=f"update:{add}+{replace}"),
            work, tokenizer, 0, 1, doc_len=base["doc_len"], body_len=base["body_len"],
            span_fn=span_fn, max_span_wordpieces=max_span_wordpieces, progress_every_s=30.0)
        if not report.records_ok:
          raise CorpusVersionError(
              f"{wiki_corpus.no_usable_records(f'update records ({add}, {replace})', report)}"
              "; nothing was published")
        part, new_texts, new_spans = _added_part(
            parent, work / wiki_corpus.SHARDS_DIR / wiki_corpus.shard_name(0, 1))
      finally:
        work.rmtree()
    else:
      if not len(removed_now):
        raise CorpusVersionError("the update removes nothing and adds nothing")
      part, new_texts, new_spans = _added_part(parent, None)
    first_new, num_new = parent.corpus.num_docs, part.num_docs
    num_docs = first_new + num_new
    removed = np.zeros(num_docs, bool)
    removed[:first_new] = parent.removed
    removed[removed_now] = True

    corpus_lib.save_block_corpus(part, tmp / "blocks")  # only the added rows: O(change) bytes
    part_fingerprint = json.loads((tmp / "blocks" / corpus_lib.METADATA_FILENAME).read_text()
                                  )["fingerprint"]
    with (tmp / REMOVED).open("wb") as f:
      np.save(f, removed)
    with (tmp / wiki_corpus.TEXTS_FILE).open("w") as f:
      for doc_id, line in enumerate(new_texts, start=first_new):
        f.write(json.dumps(dict(line, doc_id=doc_id, version=version)) + "\n")
    offset = int(len(parent.corpus.sentence_offsets) - 1)  # sentences before the added ones
    new_spans["span_sentence"] = np.asarray(new_spans["span_sentence"], np.int64) + offset
    with (tmp / wiki_corpus.SPANS_FILE).open("wb") as f:
      np.savez(f, **new_spans)
    files = {name: _sha256_file(tmp / name) for name in storage.list_files(tmp)}
    manifest = dict(
        format_version=FORMAT_VERSION, storage="delta", version=version, parent=parent_version,
        created=time.time(), num_docs=num_docs, num_live=int((~removed).sum()),
        doc_len=part.doc_len, body_len=part.body_len, vocab_size=part.vocab_size,
        vocab_sha256=vocab_sha256(corpus_dir), added=[first_new, num_docs],
        removed=removed_now.tolist(), num_removed=int(removed.sum()),
        fingerprint=chained_fingerprint(parent.corpus.fingerprint, part_fingerprint, removed),
        inputs=dict(add=add, remove=remove, replace=replace), report=report.to_dict(),
        files=files, bytes_written=sum(int((tmp / name).stat().length) for name in files),
        seconds=round(time.time() - start_time, 3))
    held.check()  # another updater took over (--force): publish nothing
    _pause("before_manifest")
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
  _replace_text(corpus_dir / LATEST, str(version))
  logging.info("update_corpus: published version %d of %s: +%d blocks (ids %d..%d), %d removed "
               "now (%d in all), %d live; records: %s", version, corpus_dir, num_new, first_new,
               first_new + num_new - 1, len(removed_now), int(removed.sum()),
               int((~removed).sum()), report.summary() if lines else "none added")
  return manifest
