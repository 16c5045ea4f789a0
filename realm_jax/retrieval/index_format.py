"""The on-storage index format shared by the in-process refresh and the index-builder job.

```
index/<step>/MANIFEST.json                        written last: a version without it is not one
index/<step>/BUILD.json                           what was announced: step, shards, attempt id
index/<step>/shard-00000-of-00002/embeddings.npy  [n, D] float32 ("exact" shards only: a
                                                  "scann" shard's only copy of its vectors is
                                                  ScaNN's re-scoring dataset, in its
                                                  reorder_dtype; `shard_vectors` reads either)
index/<step>/shard-00000-of-00002/doc_ids.npy     [n] int64
index/<step>/shard-00000-of-00002/scann/...       "scann" versions: the trained ScaNN searcher
index/<step>/shard-00000-of-00002/SHARD_DONE.json written last in the shard: its checksums
index/LATEST                                      the newest complete version's name
index/<step>+<c>/...                              a version of corpus version c (c >= 1) at
                                                  parameter step <step> (see VersionKey)
index/<step>+<c>/shard-.../deleted_ids.npy        a shard shared with an older version: the
                                                  ids deleted from it since (SHARD_DONE.json
                                                  names the shard's files, `stored_at`)
```
A version's name is its `VersionKey`: the parameter step alone while the corpus is the build
itself (corpus version 0, every version before corpus versions existed), else
`<step>+<corpus version>`. Keys order by (step, corpus version), so an incremental version (new
corpus version, same parameters) sorts after the version it updates and before the next
checkpoint's; `VersionKey` is an `int` (the step) for all arithmetic and plain ints compare as
corpus version 0, so step-based callers keep working. The manifest of a version over a
corpus version records `corpus_version`, `corpus_num_docs` (the doc-id space: tombstoned ids
are absent from the index, so `num_docs`, the vectors, can be smaller) and `param_step`.
Every writer also records `corpus_fingerprint`, the `data.corpus.fingerprint` of the corpus
(version) it embedded: a doc count alone cannot tell two corpora of equally many blocks apart,
so loaders given the expected fingerprint refuse a version of another corpus
(`check_corpus_fingerprint`). Versions written before the field existed, or a corpus saved
before fingerprints, still load, with one warning each (nothing to compare).
An incremental version (`index_update`) may *share* a shard with the version it updates
instead of copying it: the entry's `stored_at` (`"<older version>/<shard name>"`, relative to
the index root) says where the shard's files are, `stored_num_docs` how many rows they hold,
and `deleted_ids_sha256` checksums this version's `deleted_ids.npy` of the rows it leaves out
(loaders drop them: ScaNN `delete`, exact rows masked). `num_docs` is the live count.
`prune_versions` keeps a version while a kept one still reads its files. Versions written
before shared shards have no `stored_at`, and load as before.

Publishing is one protocol for one writer or many (the builder's processes):

1. `start_version` (the leader, process 0): (re)creates the tmp folder `.tmp-<step>` (its name
   is a function of the step, so every process finds it) and writes `BUILD.json` with a fresh
   attempt id.
2. `write_shard` (each process, for its shard): writes the shard's files, then its
   `SHARD_DONE.json` (checksums and the attempt id), last, and only if the attempt is still
   the announced one.
3. `finish_version` (the leader): waits until every shard of the attempt is done, writes
   `MANIFEST.json` from the shards' records, renames the tmp folder to `<step>`, and only then
   replaces LATEST (write-then-rename).

A reader never sees half a version: the rename publishes it whole, and LATEST names only
renamed ones. `publish_index` is the one-process case (all shards from one caller). Every file
is listed with its sha256 and checked by `load_index`. Paths are `etils.epath`, so `gs://`
works the same as a local folder (ScaNN's assets are staged through a local temp folder).

On object storage (gs://, s3://: `storage.is_object_storage`) there is no atomic rename, so
the build folder *is* the version folder: `tmp_dir(root, step)` is `<step>/`, the shards are
written there, and the MANIFEST.json object, written last, publishes the version (readers
already take only folders with a manifest); LATEST is one object written whole. A `<step>/`
without a manifest is a build in flight or a dead one's leftover (`read_build`,
`pending_builds`, `incomplete_versions`), never a version.

A checksum only proves a file is what its writer wrote, so `load_index` also checks the
*content*: every doc id an integer in [0, num_docs), each id once across
all shards, counts that agree (shards == manifest == the trainer's corpus), one dim, and every
stored embedding finite. A "scann" shard is checked on what it stores: its doc ids (also those
inside the searcher), counts and dim, its stored vectors (ScaNN's re-scoring dataset, or the
`embeddings.npy` of older versions; read and checked for NaN/inf; the searcher's own codebooks
are covered by their checksums), and a probe search must return
in-range ids with finite scores. Any defect is one `IndexVersionError` naming it.

LATEST never moves backwards: `finish_version` replaces it only when the version it names is
missing, unreadable or older (`latest_step` raises IndexVersionError on a garbage LATEST).
Readers that find LATEST unusable fall back to the newest *valid* version among the listed
ones (`list_versions`, newest first).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tempfile
import time
import uuid
from typing import Any, Callable, Sequence

import numpy as np
from etils import epath

from realm_jax import storage
from realm_jax.retrieval import scann_searcher
from realm_jax.retrieval import searcher as searcher_lib

MANIFEST = "MANIFEST.json"
LATEST = "LATEST"
BUILD = "BUILD.json"
SHARD_DONE = "SHARD_DONE.json"
TMP_PREFIX = ".tmp-"
SCANN_DIR = "scann"  # in a shard: `ScannSearcher.save`'s folder
CORPUS_FINGERPRINT = "corpus_fingerprint"  # manifest field: the embedded corpus's fingerprint
_WARNED: set[tuple[str, str]] = set()  # (root, what): unverifiable fingerprints, said once
# 2: optional serialized ScaNN searchers per shard, BUILD.json and SHARD_DONE.json. Version-1
# folders (no ScaNN files) still load: their "scann" shards are built from the embeddings.
FORMAT_VERSION = 2
# Test hook: a process whose environment names a `_pause` point ("before_manifest") stops there
# (after touching the file named by PAUSE_MARKER_ENV), so a test can kill it mid-publish.
PAUSE_ENV = "REALM_INDEX_TEST_PAUSE"
PAUSE_MARKER_ENV = "REALM_INDEX_TEST_PAUSE_MARKER"
_CHUNK = 1 << 24


class IndexVersionError(ValueError):
  """An index version that is missing, incomplete or inconsistent."""


class VersionKey(int):
  """An index version's name: its parameter step (the int value) and its corpus version.

  `str()` is the folder name (`"<step>"`, or `"<step>+<corpus version>"` for corpus versions
  >= 1); comparisons order by (step, corpus version), a plain int being corpus version 0.
  """

  corpus_version: int

  def __new__(cls, step: int, corpus_version: int = 0):
    if int(step) < 0 or int(corpus_version) < 0:
      raise ValueError(f"bad version key ({step}, {corpus_version})")
    self = super().__new__(cls, int(step))
    self.corpus_version = int(corpus_version)
    return self

  @property
  def step(self) -> int:
    return int(self)

  def _key(self) -> tuple[int, int]:
    return int(self), self.corpus_version

  def __str__(self) -> str:
    return (str(int(self)) if not self.corpus_version
            else f"{int(self)}+{self.corpus_version}")

  __repr__ = __str__

  def __hash__(self) -> int:
    return hash(int(self)) if not self.corpus_version else hash(self._key())

  def __reduce__(self):
    return VersionKey, self._key()


def _as_key(value) -> tuple[int, int]:
  return (int(value), getattr(value, "corpus_version", 0))


for _name, _op in (("__eq__", lambda a, b: a == b), ("__ne__", lambda a, b: a != b),
                   ("__lt__", lambda a, b: a < b), ("__le__", lambda a, b: a <= b),
                   ("__gt__", lambda a, b: a > b), ("__ge__", lambda a, b: a >= b)):
  def _compare(self, other, _op=_op):
    if not isinstance(other, int) or isinstance(other, bool):
      return NotImplemented
    return _op(_as_key(self), _as_key(other))
  setattr(VersionKey, _name, _compare)


def parse_version(name: str) -> VersionKey | None:
  """A version folder name (`"12"`, `"12+3"`) as its key; None for anything else."""
  step, plus, corpus_version = name.partition("+")
  if not (step.isdigit() and step.isascii()):
    return None
  if plus and not (corpus_version.isdigit() and corpus_version.isascii()
                   and int(corpus_version) > 0):
    return None
  return VersionKey(int(step), int(corpus_version) if plus else 0)


class StaleBuildError(IndexVersionError):
  """The attempt a shard was written for is no longer the announced one (leader restarted)."""


def shard_name(i: int, n: int) -> str:
  return f"shard-{i:05d}-of-{n:05d}"


DELETED_IDS = "deleted_ids.npy"  # in a shared shard's own folder: rows its version drops


def stored_dir(version: epath.PathLike, entry: dict[str, Any]) -> epath.Path:
  """The folder holding a shard's files: its own, or for a shard shared with an older version
  (`stored_at`, checked by `read_manifest`) that version's, under the same index root."""
  version = epath.Path(version)
  stored = entry.get("stored_at")
  return version / entry["name"] if stored is None else version.parent / stored


def stored_num_docs(entry: dict[str, Any]) -> int:
  """Rows in the shard's stored files (>= its live `num_docs` when rows are deleted)."""
  return entry.get("stored_num_docs", entry["num_docs"])


def deleted_ids(version: epath.PathLike, entry: dict[str, Any]) -> np.ndarray:
  """[stored - live] int64, sorted: the stored rows version `version` leaves out (checksummed;
  empty for a shard that deletes nothing)."""
  count = stored_num_docs(entry) - entry["num_docs"]
  if not count:
    return np.zeros(0, np.int64)
  shard = epath.Path(version) / entry["name"]
  ids = _read_array(shard, DELETED_IDS, entry["deleted_ids_sha256"], "iu", (count,))
  return ids.astype(np.int64)


def _live_rows(stored_ids: np.ndarray, deleted: np.ndarray, where: epath.Path) -> np.ndarray:
  """[S] bool: which stored rows (ids [S]) are live, given the deleted ids [R] (each must be
  stored, once)."""
  if deleted.size and (np.unique(deleted).size != deleted.size or
                       not np.isin(deleted, stored_ids).all()):
    raise IndexVersionError(f"{where}: {DELETED_IDS} repeats ids or names ids the shard does "
                            "not hold")
  return ~np.isin(stored_ids, deleted)


def _stored_doc_ids(version: epath.Path, entry: dict[str, Any]) -> np.ndarray:
  """[S] int64: the checksummed doc ids of a shard's stored files."""
  return _read_array(stored_dir(version, entry), "doc_ids.npy", entry["doc_ids_sha256"], "iu",
                     (stored_num_docs(entry),)).astype(np.int64)


def live_doc_ids(version: epath.PathLike, entry: dict[str, Any]) -> np.ndarray:
  """[n] int64: a shard's doc ids in version `version` (its stored ids without the ones the
  version deletes from a shared shard), checksummed."""
  version = epath.Path(version)
  stored = _stored_doc_ids(version, entry)
  return stored[_live_rows(stored, deleted_ids(version, entry), version / entry["name"])]


def without_ids(searcher, deleted: np.ndarray):
  """A shard's searcher without the `deleted` ids (ScaNN: in place; exact: a new one)."""
  if not deleted.size or searcher is None:
    return searcher
  if isinstance(searcher, scann_searcher.ScannSearcher):
    searcher.delete(deleted)
    return searcher
  return searcher.updated(np.zeros((0, searcher.dim), np.float32), np.zeros(0, np.int64),
                          deleted)


def tmp_dir(index_root: epath.PathLike, step: int) -> epath.Path:
  """The one build folder of version `step`: deterministic, so every builder process finds it.

  `.tmp-<step>` (renamed to `<step>` on publish) locally; `<step>` itself on object storage,
  where the manifest written last publishes it in place.
  """
  root = epath.Path(index_root)
  if storage.is_object_storage(root):
    return root / str(step)
  return root / f"{TMP_PREFIX}{step}"


def _pause(point: str):
  if os.environ.get(PAUSE_ENV) == point:
    marker = os.environ.get(PAUSE_MARKER_ENV)
    if marker:
      epath.Path(marker).write_text(point)
    logging.warning("index_format: pausing at %r (test hook %s)", point, PAUSE_ENV)
    while True:
      time.sleep(3600)


def _is_local(path: epath.Path) -> bool:
  return "://" not in os.fspath(path)


def _write_bytes(path: epath.Path, data: bytes) -> str:
  path.write_bytes(data)
  return hashlib.sha256(data).hexdigest()


def _write_npy(path: epath.Path, array: np.ndarray) -> str:
  buffer = io.BytesIO()
  np.save(buffer, array)
  return _write_bytes(path, buffer.getvalue())


def _read_checked(path: epath.Path, sha256: str | None) -> bytes:
  data = path.read_bytes()
  if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
    raise IndexVersionError(f"checksum mismatch in {path}")
  return data


def _read_npy(path: epath.Path, sha256: str | None) -> np.ndarray:
  return np.load(io.BytesIO(_read_checked(path, sha256)))


def _check_file(path: epath.Path, sha256: str):
  """Streams a (possibly large) file through sha256 without holding it in memory."""
  digest = hashlib.sha256()
  with path.open("rb") as f:
    while chunk := f.read(_CHUNK):
      digest.update(chunk)
  if digest.hexdigest() != sha256:
    raise IndexVersionError(f"checksum mismatch in {path}")


def _replace_text(path: epath.Path, text: str):
  """A concurrent reader sees the old file, the new one, or none (`storage.write_text`)."""
  storage.write_text(path, text)


def _write_json_atomic(path: epath.Path, value: dict[str, Any]):
  _replace_text(path, json.dumps(value, indent=1))


def _read_json(path: epath.Path) -> dict[str, Any] | None:
  try:
    return json.loads(path.read_text())
  except (FileNotFoundError, json.JSONDecodeError):
    return None


def start_version(index_root: epath.PathLike, step: int, num_shards: int,
                  searcher: str = "exact", searcher_options: dict[str, Any] | None = None,
                  single_writer: bool = False, info: dict[str, Any] | None = None
                  ) -> dict[str, Any]:
  """The leader announces version `step` in `num_shards` shards; returns the build record.

  `step` may be a `VersionKey` (a version over a corpus version). `single_writer`: the leader
  writes every shard itself (an incremental update); followers leave such a build alone.
  `info` (e.g. the corpus version to embed) is added to the build record.

  A tmp folder of `step` left by a dead attempt is replaced: its shards may be stale, and a
  writer still busy with that attempt finds the new attempt id and drops its work.
  """
  root = epath.Path(index_root)
  root.mkdir(parents=True, exist_ok=True)
  if (root / str(step) / MANIFEST).exists():
    raise IndexVersionError(f"index version {root / str(step)} already exists")
  if searcher not in scann_searcher.SEARCHER_KINDS:
    raise IndexVersionError(f"unknown searcher {searcher!r}")
  if searcher == "exact" and searcher_options:
    raise IndexVersionError(f"the exact searcher takes no options, got {searcher_options}")
  if num_shards < 1:
    raise IndexVersionError(f"num_shards={num_shards} must be >= 1")
  tmp = tmp_dir(root, step)
  if tmp.exists():
    tmp.rmtree()
  tmp.mkdir()
  build = dict(step=int(step), version=str(step), num_shards=int(num_shards),
               searcher=searcher, searcher_options=dict(searcher_options or {}),
               attempt=uuid.uuid4().hex, created=time.time(), single_writer=bool(single_writer),
               **(info or {}))
  _write_json_atomic(tmp / BUILD, build)
  return build


def build_key(build: dict[str, Any]) -> VersionKey:
  """The version a build record announces (records without "version": the step alone)."""
  key = parse_version(str(build.get("version", build["step"])))
  if key is None:
    raise IndexVersionError(f"bad version {build.get('version')!r} in a build record")
  return key


def read_build(index_root: epath.PathLike, step: int) -> dict[str, Any] | None:
  """The announced build of `step` (None if there is none in flight).

  On object storage a published version keeps its BUILD.json in place: it is not in flight.
  """
  folder = tmp_dir(index_root, step)
  build = _read_json(folder / BUILD)
  if build is not None and storage.is_object_storage(folder) and (folder / MANIFEST).exists():
    return None
  return build


def _build_folders(root: epath.Path) -> list[epath.Path]:
  """Folders that may hold a build in flight: `.tmp-<key>` locally, `<key>` on object storage."""
  if storage.is_object_storage(root):
    return [p for p in root.iterdir() if parse_version(p.name) is not None]
  return [p for p in root.iterdir()
          if p.name.startswith(TMP_PREFIX) and parse_version(p.name[len(TMP_PREFIX):])]


def pending_builds(index_root: epath.PathLike) -> list[dict[str, Any]]:
  """Build records of every version in flight, newest step first (what followers poll)."""
  root = epath.Path(index_root)
  if not root.exists():
    return []
  builds = []
  for path in _build_folders(root):
    build = _read_json(path / BUILD)
    if build is not None and not (storage.is_object_storage(root) and
                                  (path / MANIFEST).exists()):
      builds.append(build)
  return sorted(builds, key=build_key, reverse=True)


def incomplete_versions(index_root: epath.PathLike) -> list[epath.Path]:
  """Object storage: version folders without a manifest (builds in flight or dead ones).

  Locally those are the `.tmp-*` folders instead, and this is empty: `<step>/` only ever
  appears by rename, manifest included.
  """
  root = epath.Path(index_root)
  if not storage.is_object_storage(root) or not root.exists():
    return []
  return [p for p in _build_folders(root) if not (p / MANIFEST).exists()]


def shard_done(index_root: epath.PathLike, build: dict[str, Any], shard_index: int
               ) -> dict[str, Any] | None:
  """The shard's SHARD_DONE record if it was finished for this very attempt, else None."""
  path = (tmp_dir(index_root, build_key(build)) / shard_name(shard_index, build["num_shards"]) /
          SHARD_DONE)
  done = _read_json(path)
  return done if done is not None and done.get("attempt") == build["attempt"] else None


def _stage_scann(searcher: scann_searcher.ScannSearcher, shard: epath.Path) -> dict[str, str]:
  """Saves the searcher locally (ScaNN writes local files) and copies it into the shard."""
  files = {}
  with tempfile.TemporaryDirectory(prefix="realm-scann-") as local:
    searcher.save(local)
    for directory, _, names in os.walk(local):
      for name in sorted(names):
        source = os.path.join(directory, name)
        relative = os.path.relpath(source, local).replace(os.sep, "/")
        target = shard / SCANN_DIR / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(source, "rb") as f:
          files[f"{SCANN_DIR}/{relative}"] = _write_bytes(target, f.read())
  return files


def _check_attempt(index_root: epath.PathLike, build: dict[str, Any], name: str) -> None:
  """StaleBuildError unless `build` is still the announced attempt of its version."""
  current = read_build(index_root, build_key(build))
  if current is None or current["attempt"] != build["attempt"]:
    raise StaleBuildError(f"{name} of step {build['step']}: attempt {build['attempt']} is no "
                          "longer the announced one")


def write_shard(index_root: epath.PathLike, build: dict[str, Any], shard_index: int,
                embeddings: np.ndarray | None, doc_ids: np.ndarray,
                searcher: searcher_lib.Searcher | None = None) -> dict[str, Any]:
  """Writes shard `shard_index` of an announced build: [n, D] embeddings, [n] doc ids.

  A "scann" build also trains (or takes the given) `ScannSearcher` and stores it, and stores
  the vectors only once, inside ScaNN's own files (the ones it re-scores with, in its
  `reorder_dtype`): no embeddings.npy beside them. `embeddings` may then be None when the
  searcher is given (an updated searcher). The shard's SHARD_DONE.json goes last, and only
  while `build` is still the announced attempt.
  """
  doc_ids = np.asarray(doc_ids, np.int64)
  scann_build = build["searcher"] == "scann"
  if embeddings is None:
    if not (scann_build and searcher is not None):
      raise IndexVersionError(f"shard {shard_index}: no embeddings (only a given ScaNN "
                              "searcher holds its own)")
    dim = searcher.dim
  else:
    embeddings = np.asarray(embeddings, np.float32)
    if embeddings.ndim != 2 or doc_ids.shape != (len(embeddings),):
      raise IndexVersionError(f"shard {shard_index}: embeddings {embeddings.shape} vs doc_ids "
                              f"{doc_ids.shape}")
    dim = embeddings.shape[1]
  if not 0 <= shard_index < build["num_shards"]:
    raise IndexVersionError(f"shard {shard_index} of a {build['num_shards']}-shard build")
  name = shard_name(shard_index, build["num_shards"])
  shard = tmp_dir(index_root, build_key(build)) / name
  if storage.is_object_storage(shard):
    # The build folder is the version folder there, and no rename moves a published one out
    # of reach: a writer of a replaced (or published) attempt must not touch it at all.
    _check_attempt(index_root, build, name)
  if shard.exists():  # an earlier try of this shard (only its own process writes it)
    shard.rmtree()
  shard.mkdir()  # no parents: a tmp folder the leader removed is not brought back
  entry = dict(name=name, num_docs=int(len(doc_ids)), dim=int(dim),
               doc_ids_sha256=_write_npy(shard / "doc_ids.npy", doc_ids))
  if scann_build:
    if searcher is None:
      searcher = scann_searcher.ScannSearcher(embeddings, doc_ids, **build["searcher_options"])
    if not isinstance(searcher, scann_searcher.ScannSearcher):
      raise IndexVersionError(f"a scann build got a {type(searcher).__name__}")
    if searcher.num_docs != len(doc_ids) or not np.array_equal(searcher.doc_ids, doc_ids):
      raise IndexVersionError(f"shard {shard_index}: the searcher's doc ids are not the shard's")
    entry["scann_files"] = _stage_scann(searcher, shard)
    entry["scann_params"] = dict(searcher.params)
    entry["vectors"] = "scann"  # stored once, in ScaNN's re-scoring dataset
  else:
    entry["embeddings_sha256"] = _write_npy(shard / "embeddings.npy", embeddings)
  _check_attempt(index_root, build, name)
  _write_json_atomic(shard / SHARD_DONE, dict(entry, attempt=build["attempt"]))
  return entry


def share_shard(index_root: epath.PathLike, build: dict[str, Any], shard_index: int,
                parent: int, entry: dict[str, Any], deleted: np.ndarray) -> dict[str, Any]:
  """Records shard `shard_index` of an announced build as parent version `parent`'s shard
  `entry`, not copied: its files stay where they are (`stored_at`); this version writes only
  the ids it leaves out, `deleted` [R] (all of the shard's deletions: the parent's and new
  ones). What an incremental update does with a shard it does not otherwise change."""
  root = epath.Path(index_root)
  name = shard_name(shard_index, build["num_shards"])
  shard = tmp_dir(root, build_key(build)) / name
  if not 0 <= shard_index < build["num_shards"]:
    raise IndexVersionError(f"shard {shard_index} of a {build['num_shards']}-shard build")
  _check_attempt(root, build, name)
  deleted = np.unique(np.asarray(deleted, np.int64))
  stored = stored_num_docs(entry)
  if len(deleted) >= stored:
    raise IndexVersionError(f"shard {shard_index}: deletes all {stored} of its rows")
  if shard.exists():
    shard.rmtree()
  shard.mkdir()
  record = {k: v for k, v in entry.items()
            if k not in ("name", "num_docs", "stored_at", "stored_num_docs",
                         "deleted_ids_sha256")}
  record.update(name=name, num_docs=int(stored - len(deleted)), stored_num_docs=int(stored),
                stored_at=entry.get("stored_at") or f"{parent}/{entry['name']}")
  if len(deleted):
    record["deleted_ids_sha256"] = _write_npy(shard / DELETED_IDS, deleted)
  _check_attempt(root, build, name)
  _write_json_atomic(shard / SHARD_DONE, dict(record, attempt=build["attempt"]))
  return record


def finish_version(index_root: epath.PathLike, build: dict[str, Any], timeout: float = 0.0,
                   poll_seconds: float = 1.0, expected_num_docs: int | None = None,
                   extra: dict[str, Any] | None = None,
                   before_publish: Callable[[], None] | None = None) -> epath.Path:
  """The leader: waits for every shard of `build`, writes the manifest, renames, moves LATEST.

  Raises IndexVersionError if shards are still missing after `timeout` seconds (nothing is
  published; the next `start_version` of the step starts over). `before_publish` runs once
  the shards are done, right before the manifest is written; whatever it raises stops the
  publish (the builder checks its workdir lease there). LATEST moves only forwards
  (`move_latest`).
  """
  root = epath.Path(index_root)
  step, num_shards = build_key(build), build["num_shards"]
  tmp, final = tmp_dir(root, step), root / str(step)
  deadline = time.time() + timeout
  while True:
    current = read_build(root, step)
    if current is None or current["attempt"] != build["attempt"]:
      raise StaleBuildError(f"step {step}: attempt {build['attempt']} was replaced or removed")
    done = [shard_done(root, build, i) for i in range(num_shards)]
    missing = [i for i, d in enumerate(done) if d is None]
    if not missing:
      break
    if time.time() >= deadline:
      raise IndexVersionError(f"step {step}: shards {missing} of {num_shards} not done within "
                              f"{timeout:.0f}s")
    time.sleep(poll_seconds)
  dims = {d["dim"] for d in done}
  if len(dims) != 1:
    raise IndexVersionError(f"shards disagree on the embedding dim: {sorted(dims)}")
  shards = [{k: v for k, v in d.items() if k != "attempt"} for d in done]
  num_docs = sum(s["num_docs"] for s in shards)
  if expected_num_docs is not None and num_docs != expected_num_docs:
    raise IndexVersionError(f"step {step}: shards hold {num_docs} docs, expected "
                            f"{expected_num_docs}")
  extra = dict(extra or {})
  if step.corpus_version:
    extra.setdefault("corpus_version", step.corpus_version)
  manifest = dict(format_version=FORMAT_VERSION, step=int(step), version=str(step),
                  dim=dims.pop(),
                  num_docs=num_docs, searcher=build["searcher"],
                  searcher_options=build["searcher_options"], attempt=build["attempt"],
                  shards=shards, build_seconds=round(time.time() - build["created"], 3),
                  created=time.time(), **extra)
  if before_publish is not None:
    before_publish()
  _pause("before_manifest")
  (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))  # object storage: the publish
  if tmp != final:  # local: publish by rename
    if final.exists():  # leftover of a crashed publish without a manifest
      final.rmtree()
    tmp.rename(final)
  move_latest(root, step)
  return final


def publish_index(index_root: epath.PathLike, step: int,
                  shards: Sequence[tuple[np.ndarray, np.ndarray]],
                  searcher: str = "exact", extra: dict[str, Any] | None = None,
                  searcher_options: dict[str, Any] | None = None,
                  searchers: Sequence[searcher_lib.Searcher] | None = None) -> epath.Path:
  """Writes one version from [(embeddings [n, D], doc_ids [n]), ...] and points LATEST at it.

  The one-process case of the protocol above. A "scann" version stores a trained ScaNN
  searcher per shard (`searchers`, if the caller already built them, else trained here with
  `searcher_options`).
  """
  if searchers is not None and len(searchers) != len(shards):
    raise ValueError(f"{len(searchers)} searchers for {len(shards)} shards")
  build = start_version(index_root, step, len(shards), searcher, searcher_options)
  for i, (embeddings, doc_ids) in enumerate(shards):
    write_shard(index_root, build, i, embeddings, doc_ids,
                searcher=searchers[i] if searchers is not None else None)
  return finish_version(index_root, build, extra=extra)


def parse_step(text: str | bytes) -> VersionKey:
  """The version a LATEST file holds: `<step>` or `<step>+<corpus version>` (a VersionKey;
  IndexVersionError if it is anything else)."""
  try:
    if isinstance(text, bytes):
      text = text.decode("ascii")
    value = text.strip()
    key = parse_version(value)
    if key is None:
      raise ValueError(value)
    return key
  except (UnicodeDecodeError, ValueError):
    shown = text[:40] if isinstance(text, (str, bytes)) else text
    raise IndexVersionError(f"LATEST holds {shown!r}, not a step number") from None


def latest_step(index_root: epath.PathLike) -> int | None:
  """The step LATEST points at, or None before the first publish.

  Raises IndexVersionError when LATEST is not a step number (empty, text, binary): the callers
  fall back to the newest valid version (`list_versions`) rather than crash.
  """
  path = epath.Path(index_root) / LATEST
  try:
    data = path.read_bytes()
  except FileNotFoundError:
    return None
  return parse_step(data)


def _latest_or_none(index_root: epath.PathLike) -> int | None:
  """LATEST's step, None when it is missing or garbage (for writers deciding what to replace)."""
  try:
    return latest_step(index_root)
  except IndexVersionError:
    return None


def repair_latest(index_root: epath.PathLike, step: int) -> None:
  """Points LATEST at valid version `step` unconditionally (write-then-rename).

  For the single writer (the index builder, under its lease) when LATEST is garbage or names
  a missing or invalid version; publishes go through `move_latest`, which never moves back.
  """
  root = epath.Path(index_root)
  if not (root / str(step) / MANIFEST).exists():
    raise IndexVersionError(f"{root / str(step)} is not a complete version")
  _replace_text(root / LATEST, str(step))


def move_latest(index_root: epath.PathLike, step: int) -> bool:
  """Points LATEST at complete version `step` unless it names a complete newer one.

  LATEST never moves backwards: a publish of an older step (a late or re-run build) leaves it.
  A LATEST that is garbage or names a version that no longer exists is replaced. Returns
  whether LATEST now names `step`.
  """
  root = epath.Path(index_root)
  current = _latest_or_none(root)
  if current is not None and current > step and (root / str(current) / MANIFEST).exists():
    logging.warning("index: published step %d but LATEST stays at the newer version %d", step,
                    current)
    return False
  if current != step:
    _replace_text(root / LATEST, str(step))
  return True


def list_versions(index_root: epath.PathLike) -> list[int]:
  """Steps of all complete versions (those with a manifest), ascending."""
  root = epath.Path(index_root)
  if not root.exists():
    return []
  keys = ((parse_version(p.name), p) for p in root.iterdir())
  return sorted(key for key, p in keys if key is not None and (p / MANIFEST).exists())


def _load_scann_shard(shard: epath.Path, entry: dict[str, Any], build: bool = True
                      ) -> scann_searcher.ScannSearcher | None:
  """Checks every stored ScaNN file against the manifest, then loads (no re-training).

  With `build=False` only the checksums are checked (streamed; nothing is loaded).
  """
  for relative in entry["scann_files"]:
    if relative.startswith("/") or ".." in relative.split("/"):
      raise IndexVersionError(f"{shard}: bad ScaNN file name {relative!r} in the manifest")
  if _is_local(shard) or not build:
    for relative, sha256 in entry["scann_files"].items():
      _check_file(shard / relative, sha256)
    return _scann_load(shard, os.fspath(shard / SCANN_DIR)) if build else None
  with tempfile.TemporaryDirectory(prefix="realm-scann-") as local:
    for relative, sha256 in entry["scann_files"].items():
      target = os.path.join(local, *relative.split("/"))
      os.makedirs(os.path.dirname(target), exist_ok=True)
      with open(target, "wb") as f:
        f.write(_read_checked(shard / relative, sha256))
    return _scann_load(shard, os.path.join(local, SCANN_DIR))


def _scann_load(shard: epath.Path, local_dir: str) -> scann_searcher.ScannSearcher:
  """ScaNN's own errors as the format's: vanished (pruned meanwhile) or unusable."""
  try:
    return scann_searcher.ScannSearcher.load(local_dir)
  except Exception as e:  # pylint: disable=broad-except  (ScaNN raises RuntimeError, ValueError)
    if not os.path.isdir(local_dir):
      raise FileNotFoundError(f"{shard}: the stored ScaNN searcher vanished") from e
    raise IndexVersionError(f"{shard}: ScaNN could not load the stored searcher: {e}") from e


def _is_int(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def read_manifest(index_root: epath.PathLike, step: int) -> dict[str, Any]:
  """The parsed, structurally checked manifest of version `step` (IndexVersionError if not).

  Checks what the manifest says about itself: its step, format, searcher kind, a positive dim
  and doc count, and shard entries (safe unique names, counts summing to the total).
  """
  version = epath.Path(index_root) / str(step)
  path = version / MANIFEST
  try:
    text = path.read_bytes()
  except FileNotFoundError:
    raise IndexVersionError(f"{version} has no {MANIFEST}: not a complete index version"
                            ) from None
  try:
    manifest = json.loads(text)
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise IndexVersionError(f"{path} is not JSON ({e})") from None
  if not isinstance(manifest, dict):
    raise IndexVersionError(f"{path} is not a JSON object")
  problem = None
  shards = manifest.get("shards")
  recorded = (parse_version(str(manifest.get("version", manifest.get("step"))))
              if _is_int(manifest.get("step")) else None)
  if recorded is None or recorded != step or int(recorded) != manifest["step"]:
    problem = (f"its step {manifest.get('step')!r} (version {manifest.get('version')!r}) is "
               f"not the folder's {step}")
  elif not _is_int(manifest.get("format_version", 1)) or not (
      1 <= manifest.get("format_version", 1) <= FORMAT_VERSION):
    problem = (f"format_version {manifest.get('format_version')!r} (this code reads 1.."
               f"{FORMAT_VERSION})")
  elif manifest.get("searcher") not in scann_searcher.SEARCHER_KINDS:
    problem = f"unknown searcher {manifest.get('searcher')!r}"
  elif not _is_int(manifest.get("dim")) or manifest["dim"] < 1:
    problem = f"dim {manifest.get('dim')!r} is not a positive integer"
  elif not _is_int(manifest.get("num_docs")) or manifest["num_docs"] < 1:
    problem = f"num_docs {manifest.get('num_docs')!r} is not a positive integer"
  elif not isinstance(shards, list) or not shards or not all(
      isinstance(e, dict) for e in shards):
    problem = "no shard list"
  else:
    names = [e.get("name") for e in shards]
    counts = [e.get("num_docs") for e in shards]
    if not all(isinstance(n, str) and n.startswith("shard-") and "/" not in n and
               ".." not in n for n in names) or len(set(names)) != len(names):
      problem = f"bad or repeated shard names {names}"
    elif not all(_is_int(c) and c >= 1 for c in counts):
      problem = f"shard doc counts {counts} are not positive integers"
    elif sum(counts) != manifest["num_docs"]:
      problem = f"shards hold {sum(counts)} docs, the manifest's total says {manifest['num_docs']}"
    elif any(e.get("dim", manifest["dim"]) != manifest["dim"] for e in shards):
      problem = f"shard dims {[e.get('dim') for e in shards]} differ from dim {manifest['dim']}"
    elif not all(isinstance(e.get("doc_ids_sha256"), str) and
                 (isinstance(e.get("embeddings_sha256"), str) or
                  (manifest["searcher"] == "scann" and isinstance(e.get("scann_files"), dict)))
                 for e in shards):
      problem = "a shard lacks its checksums"
    else:
      problem = next(filter(None, (_sharing_problem(e, recorded) for e in shards)), None)
  if problem:
    raise IndexVersionError(f"{path}: {problem}")
  return manifest


def _sharing_problem(entry: dict[str, Any], version: VersionKey) -> str | None:
  """What is wrong with a shard entry's sharing fields (None when fine or not shared)."""
  if "stored_at" not in entry:
    return ("a shard deletes rows without being shared" if
            "stored_num_docs" in entry or "deleted_ids_sha256" in entry else None)
  stored, count = entry["stored_at"], entry.get("stored_num_docs")
  owner, slash, name = stored.partition("/") if isinstance(stored, str) else ("", "", "")
  owner_key = parse_version(owner)
  if not (slash and owner_key is not None and name.startswith("shard-") and "/" not in name
          and ".." not in name):
    return f"bad stored_at {stored!r} (not <version>/<shard name>)"
  if owner_key >= version:
    return f"shard {entry['name']} is stored in {owner}, not an older version"
  if not _is_int(count) or count < entry["num_docs"]:
    return f"shard {entry['name']}: stored_num_docs {count!r} < its {entry['num_docs']} docs"
  if count > entry["num_docs"] and not isinstance(entry.get("deleted_ids_sha256"), str):
    return f"shard {entry['name']} deletes rows but lacks their checksum"
  return None


def manifest_id(index_root: epath.PathLike, step: int) -> str | None:
  """A short digest of version `step`'s manifest bytes (None if it has none).

  Tells two publishes of one step apart (a rebuilt version is a new candidate for readers that
  rejected the old one) without parsing or trusting the manifest.
  """
  try:
    data = (epath.Path(index_root) / str(step) / MANIFEST).read_bytes()
  except FileNotFoundError:
    return None
  return hashlib.sha256(data).hexdigest()[:16]


def _check_finite(shard: epath.Path, embeddings: np.ndarray, rows: int = 1 << 16):
  """Every embedding finite (row blocks, so a huge shard needs no [N, D] bool temporary)."""
  for begin in range(0, len(embeddings), rows):
    block = embeddings[begin:begin + rows]
    if not np.isfinite(block).all():
      bad = begin + int(np.flatnonzero(~np.isfinite(block).all(axis=1))[0])
      raise IndexVersionError(f"{shard}: embeddings are not finite (first in row {bad}: "
                              f"{block[bad - begin][~np.isfinite(block[bad - begin])][:3]})")


def _read_array(shard: epath.Path, name: str, sha256: str, kinds: str, shape: tuple[int, ...]
                ) -> np.ndarray:
  """A checksummed .npy of one of the dtype `kinds` ("iu", "f") and this exact shape."""
  try:
    array = _read_npy(shard / name, sha256)
  except ValueError as e:  # not a plain .npy (np.load refuses pickles and bad headers)
    if isinstance(e, IndexVersionError):
      raise
    raise IndexVersionError(f"{shard / name} is not a readable array ({e})") from None
  if array.dtype.kind not in kinds:
    raise IndexVersionError(f"{shard / name}: dtype {array.dtype}, expected "
                            f"{'integers' if 'i' in kinds else 'floats'}")
  if array.shape != shape:
    raise IndexVersionError(f"{shard / name}: shape {array.shape}, the manifest says {shape}")
  return array


def _load_shard(version: epath.Path, manifest: dict[str, Any], entry: dict[str, Any],
                total_docs: int, build: bool = True
                ) -> tuple[searcher_lib.Searcher | None, np.ndarray]:
  """Checks one shard's files and content; -> (its searcher, or None unless `build`; doc ids)."""
  shard = stored_dir(version, entry)
  num_docs, dim = stored_num_docs(entry), manifest["dim"]
  doc_ids = _read_array(shard, "doc_ids.npy", entry["doc_ids_sha256"], "iu", (num_docs,))
  doc_ids = doc_ids.astype(np.int64)
  out_of_range = (doc_ids < 0) | (doc_ids >= total_docs)
  if out_of_range.any():
    raise IndexVersionError(f"{shard}: {int(out_of_range.sum())} doc ids outside [0, "
                            f"{total_docs}) (e.g. {doc_ids[out_of_range][:3].tolist()})")
  deleted = deleted_ids(version, entry)
  live = doc_ids[_live_rows(doc_ids, deleted, version / entry["name"])]
  searcher, _ = _load_stored_shard(shard, manifest, entry, doc_ids, build)
  return without_ids(searcher, deleted), live


def _load_stored_shard(shard: epath.Path, manifest: dict[str, Any], entry: dict[str, Any],
                       doc_ids: np.ndarray, build: bool
                       ) -> tuple[searcher_lib.Searcher | None, np.ndarray]:
  """The searcher of a shard's stored files (all their rows) and its checked doc ids."""
  num_docs, dim = len(doc_ids), manifest["dim"]
  kind = manifest["searcher"]
  if "embeddings_sha256" not in entry:  # vectors stored once, inside ScaNN's files
    if not isinstance(entry.get("scann_files"), dict):
      raise IndexVersionError(f"{shard}: neither embeddings.npy nor ScaNN files")
    _check_scann_vectors(shard, entry, num_docs, dim)
    return _stored_scann_searcher(shard, entry, build, num_docs, dim, doc_ids), doc_ids
  # The stored embeddings, also of "scann" shards whose searcher is stored: a NaN/inf there
  # means the searcher was trained on it too (its codebooks themselves are only checksummed).
  embeddings = _read_array(shard, "embeddings.npy", entry["embeddings_sha256"], "f",
                           (num_docs, dim))
  _check_finite(shard, embeddings)
  if kind == "scann" and entry.get("scann_files"):
    if not isinstance(entry["scann_files"], dict):
      raise IndexVersionError(f"{shard}: scann_files is not a mapping")
    del embeddings
    return _stored_scann_searcher(shard, entry, build, num_docs, dim, doc_ids), doc_ids
  if not build:
    return None, doc_ids
  # Exact shards, and "scann" shards of versions written without ScaNN files: from embeddings.
  options = (manifest.get("searcher_options") or {}) if kind == "scann" else {}
  return scann_searcher.make_searcher(kind, embeddings, doc_ids, **options), doc_ids


def _stored_scann_searcher(shard, entry: dict, build: bool, num_docs: int, dim: int,
                           doc_ids: np.ndarray):
  """The shard's stored ScaNN searcher (None unless `build`), checked against its manifest."""
  searcher = _load_scann_shard(shard, entry, build=build)
  if searcher is not None and (
      (searcher.num_docs, searcher.dim) != (num_docs, dim) or
      not np.array_equal(searcher.doc_ids, doc_ids)):
    raise IndexVersionError(f"{shard}: the stored ScaNN searcher does not match the shard")
  return searcher


def _check_scann_vectors(shard: epath.Path, entry: dict[str, Any], num_docs: int, dim: int):
  """The vectors inside a ScaNN shard's files (its re-scoring dataset, the shard's only copy):
  checksummed, [num_docs, dim], and finite (float32 and bfloat16; int8 codes always are, their
  per-dimension multipliers are checked)."""
  dtype = (entry.get("scann_params") or {}).get("reorder_dtype", "float32")
  wanted = scann_searcher.REORDER_FILES.get(dtype)
  files = entry["scann_files"]
  names = [name for name in files if name.rsplit("/", 1)[-1] == wanted]
  if len(names) != 1:
    raise IndexVersionError(f"{shard}: no single {wanted} (the {dtype} vectors) among its ScaNN "
                            "files")
  data = _read_checked(shard / names[0], files[names[0]])
  try:
    vectors = np.load(io.BytesIO(data))
  except ValueError as e:
    raise IndexVersionError(f"{shard / names[0]} is not a readable array ({e})") from None
  if vectors.shape != (num_docs, dim):
    raise IndexVersionError(f"{shard / names[0]}: shape {vectors.shape}, the manifest says "
                            f"{(num_docs, dim)}")
  if dtype == "float32":
    _check_finite(shard, vectors)
  elif dtype == "bfloat16":  # stored as raw 16-bit words: all-ones exponent is NaN/inf
    bad = (vectors.view(np.uint16) & 0x7F80) == 0x7F80
    if bad.any():
      raise IndexVersionError(f"{shard}: bfloat16 vectors are not finite (row "
                              f"{int(np.flatnonzero(bad.any(axis=1))[0])})")
  else:
    multipliers = [name for name in files if name.endswith("int8_multipliers.npy")]
    for name in multipliers:
      if not np.isfinite(np.load(io.BytesIO(_read_checked(shard / name, files[name])))).all():
        raise IndexVersionError(f"{shard}: int8 multipliers are not finite")


def _probe(version: epath.Path, searcher: searcher_lib.Searcher, num_docs: int):
  """A few fixed queries must return in-range ids with finite scores (catches what the stored
  files cannot show alone: e.g. dot products that overflow, or a searcher answering garbage)."""
  queries = np.random.default_rng(0).normal(size=(4, searcher.dim)).astype(np.float32)
  with np.errstate(over="ignore", invalid="ignore"):
    ids, scores = searcher.search(queries, min(10, num_docs))
  if ((ids < 0) | (ids >= num_docs)).any() or not np.isfinite(scores).all():
    raise IndexVersionError(f"{version}: a probe search returned ids {ids[0][:5].tolist()} "
                            f"with scores {scores[0][:5].tolist()} (out of range or not finite)")


def fingerprint_of(corpus) -> str | None:
  """A corpus's `fingerprint` (`data.corpus.BlockCorpus`), None for one saved before
  fingerprints or a stand-in without the attribute."""
  return getattr(corpus, "fingerprint", None)


def corpus_record(corpus) -> dict[str, str]:
  """The manifest fields a writer adds for the corpus it embedded (a `BlockCorpus`):
  {CORPUS_FINGERPRINT: its fingerprint}, or {} for a corpus saved before fingerprints."""
  fingerprint = fingerprint_of(corpus)
  return {CORPUS_FINGERPRINT: fingerprint} if fingerprint else {}


def _warn_once(root: epath.PathLike, what: str, message: str) -> None:
  key = (os.fspath(root), what)
  if key not in _WARNED:
    _WARNED.add(key)
    logging.warning("%s", message)


def check_corpus_fingerprint(index_root: epath.PathLike, step: int, manifest: dict[str, Any],
                             expected: str | None) -> None:
  """Raises IndexVersionError when the version was built for another corpus than `expected`
  (the loader's `BlockCorpus.fingerprint`): same doc count, different blocks, so every
  retrieved id would name the wrong text. When either side has no fingerprint (a version or
  a corpus from before fingerprints) nothing can be compared: a warning, once per index root.
  """
  version = epath.Path(index_root) / str(step)
  recorded = manifest.get(CORPUS_FINGERPRINT)
  if recorded and expected:
    if recorded != expected:
      where = manifest.get("corpus_dir")
      raise IndexVersionError(
          f"{version}: built for another corpus: the index's corpus fingerprint is {recorded}"
          f"{f' (corpus {where})' if where else ''}, the expected corpus's is {expected} "
          f"(both have {manifest.get('corpus_num_docs', manifest.get('num_docs'))} blocks); "
          "rebuild the index for this corpus or point data.corpus_dir at the one it indexes")
  elif expected:
    _warn_once(index_root, "no index fingerprint",
               f"index {index_root}: version {step} (and maybe others) records no corpus "
               "fingerprint (written before fingerprints): cannot check that it was built for "
               "this corpus, only its doc count")
  elif recorded:
    _warn_once(index_root, "no corpus fingerprint",
               f"index {index_root}: the corpus has no fingerprint (saved before fingerprints; "
               f"rebuild it to get one), so version {step}'s {recorded} cannot be compared")


def _load(index_root: epath.PathLike, step: int, expected_dim: int | None,
          expected_num_docs: int | None, build: bool, removed: np.ndarray | None = None,
          expected_fingerprint: str | None = None
          ) -> tuple[dict, searcher_lib.ShardedSearcher | None]:
  version = epath.Path(index_root) / str(step)
  manifest = read_manifest(index_root, step)
  if expected_dim is not None and manifest["dim"] != expected_dim:
    raise IndexVersionError(f"{version}: dim {manifest['dim']} != model's {expected_dim}")
  # The doc-id space: the corpus (version)'s blocks; the vectors can be fewer (tombstones).
  total = manifest.get("corpus_num_docs", manifest["num_docs"])
  if not _is_int(total) or total < manifest["num_docs"]:
    raise IndexVersionError(f"{version}: corpus_num_docs {total!r} < its {manifest['num_docs']} "
                            "vectors")
  if expected_num_docs is not None and total != expected_num_docs:
    raise IndexVersionError(f"{version}: {total} docs != corpus's {expected_num_docs}")
  if expected_num_docs is not None or expected_fingerprint is not None:
    check_corpus_fingerprint(index_root, step, manifest, expected_fingerprint)
  if removed is not None and removed.shape != (total,):
    raise IndexVersionError(f"{version}: tombstones for {removed.shape} docs, the index has "
                            f"{total}")
  try:
    loaded = [_load_shard(version, manifest, entry, total, build)
              for entry in manifest["shards"]]
    # In range and as many ids as docs: a repeat is exactly a doc that is missing.
    all_ids = np.concatenate([ids for _, ids in loaded])
    counts = np.bincount(all_ids, minlength=total)
    repeated = np.flatnonzero(counts > 1)
    if repeated.size:
      raise IndexVersionError(f"{version}: {repeated.size} doc ids appear more than once "
                              f"(e.g. {repeated[:3].tolist()}), so {repeated.size} or more docs "
                              "are missing")
    if removed is not None:
      dead = all_ids[removed[all_ids]]
      if dead.size:
        raise IndexVersionError(f"{version}: holds {dead.size} removed (tombstoned) docs, "
                                f"e.g. {dead[:3].tolist()}")
      if len(all_ids) != int((~removed).sum()):
        raise IndexVersionError(f"{version}: {len(all_ids)} docs, the corpus version has "
                                f"{int((~removed).sum())} live ones")
    if not build:
      return manifest, None
    searcher = searcher_lib.ShardedSearcher([s for s, _ in loaded])
    _probe(version, searcher, total)
  except (IndexVersionError, OSError):  # OSError: vanished while loading (pruned): retry later
    raise
  except (KeyError, TypeError, ValueError, AttributeError) as e:  # whatever slipped past
    raise IndexVersionError(f"{version}: malformed ({type(e).__name__}: {e})") from e
  return manifest, searcher


def load_index(index_root: epath.PathLike, step: int, expected_dim: int | None = None,
               expected_num_docs: int | None = None, removed: np.ndarray | None = None,
               expected_fingerprint: str | None = None
               ) -> tuple[dict, searcher_lib.ShardedSearcher]:
  """Loads and validates one version into the manifest's searcher.

  Checked: the manifest's structure, every file's checksum, dim, doc count and corpus
  fingerprint (`check_corpus_fingerprint`) against the caller's model and corpus, and the content (see the module docstring:
  ids in range and unique, embeddings finite, a probe search). Any defect raises
  IndexVersionError with one line naming it; FileNotFoundError/OSError mean the version
  vanished (was pruned) while loading. A "scann" shard loads its stored searcher; one without
  stored files (format version 1) is built here from the embeddings, in the caller's thread
  (the trainer's IndexWatcher: off the training thread).
  """
  return _load(index_root, step, expected_dim, expected_num_docs, build=True,
               removed=removed, expected_fingerprint=expected_fingerprint)


def check_version(index_root: epath.PathLike, step: int, expected_dim: int | None = None,
                  expected_num_docs: int | None = None, removed: np.ndarray | None = None,
                  expected_fingerprint: str | None = None) -> dict[str, Any]:
  """`load_index`'s checks without building or loading searchers (ScaNN files only checksummed,
  no probe search): what the index builder runs on existing versions. -> the manifest."""
  return _load(index_root, step, expected_dim, expected_num_docs, build=False,
               removed=removed, expected_fingerprint=expected_fingerprint)[0]


def shard_vectors(version: epath.PathLike, entry: dict[str, Any]) -> np.ndarray:
  """A shard's stored vectors as [n, D] float32 in its doc_ids order (checksummed): its
  embeddings.npy, or ScaNN's re-scoring dataset where that is the only copy (bfloat16 widened
  exactly; int8 codes times their per-dimension multipliers, i.e. what ScaNN re-scores with).
  All stored rows, deleted ones included: `shard_rows` gives the live ones."""
  shard = stored_dir(version, entry)
  if "embeddings_sha256" in entry:
    return _read_npy(shard / "embeddings.npy", entry["embeddings_sha256"]).astype(np.float32)
  files = entry["scann_files"]
  dtype = (entry.get("scann_params") or {}).get("reorder_dtype", "float32")
  def load(suffix):
    name = next(n for n in files if n.rsplit("/", 1)[-1] == suffix)
    return np.load(io.BytesIO(_read_checked(shard / name, files[name])))
  vectors = load(scann_searcher.REORDER_FILES[dtype])
  if dtype == "bfloat16":
    return (vectors.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
  if dtype == "int8":
    return vectors.astype(np.float32) / load("int8_multipliers.npy").astype(np.float32)
  return vectors.astype(np.float32)


def shard_rows(version: epath.PathLike, entry: dict[str, Any]
               ) -> tuple[np.ndarray, np.ndarray]:
  """A shard's live rows: (vectors [n, D] float32, doc ids [n] int64), checksummed, without
  the ids its version deletes from a shared shard."""
  version = epath.Path(version)
  doc_ids = _stored_doc_ids(version, entry)
  keep = _live_rows(doc_ids, deleted_ids(version, entry), version / entry["name"])
  return shard_vectors(version, entry)[keep], doc_ids[keep]


def load_shards(index_root: epath.PathLike, step: int
                ) -> tuple[dict[str, Any], list[tuple[np.ndarray, np.ndarray, Any]]]:
  """Version `step`'s shards as (embeddings [n, D] float32 or None where ScaNN holds the only
  copy, doc_ids [n] int64, its stored ScaNN searcher or None), each file checked against the manifest: what an incremental
  update starts from. -> (manifest, shards in manifest order)."""
  version = epath.Path(index_root) / str(step)
  manifest = read_manifest(index_root, step)
  out = []
  for entry in manifest["shards"]:
    shard = stored_dir(version, entry)
    doc_ids = _stored_doc_ids(version, entry)
    embeddings = None  # ScaNN shards hold their vectors in the searcher only
    if "embeddings_sha256" in entry:
      embeddings = _read_array(shard, "embeddings.npy", entry["embeddings_sha256"], "f",
                               (stored_num_docs(entry), manifest["dim"])).astype(np.float32)
    searcher = (_load_scann_shard(shard, entry) if manifest["searcher"] == "scann" and
                entry.get("scann_files") else None)
    if searcher is not None and not np.array_equal(searcher.doc_ids, doc_ids):
      raise IndexVersionError(f"{shard}: the stored ScaNN searcher does not match the shard")
    deleted = deleted_ids(version, entry)
    if deleted.size:  # a shared shard: this version's rows only
      keep = _live_rows(doc_ids, deleted, version / entry["name"])
      doc_ids = doc_ids[keep]
      embeddings = embeddings[keep] if embeddings is not None else None
      searcher = without_ids(searcher, deleted)
    out.append((embeddings, doc_ids, searcher))
  return manifest, out


def shared_from(index_root: epath.PathLike, step: int) -> set[str]:
  """Names of the older versions whose folders version `step` reads shards from (`stored_at`);
  empty for a version that holds all its files (or whose manifest is unreadable)."""
  try:
    manifest = read_manifest(index_root, step)
  except IndexVersionError:
    return set()
  return {e["stored_at"].split("/", 1)[0] for e in manifest["shards"] if "stored_at" in e}


def prune_versions(index_root: epath.PathLike, keep_last: int) -> list[int]:
  """Deletes all but the newest `keep_last` versions, never the one LATEST names, nor one
  whose shards a kept version shares (it goes once no kept version reads it)."""
  root = epath.Path(index_root)
  protected = _latest_or_none(root)
  versions = list_versions(root)
  if keep_last <= 0:
    return []
  kept = {str(s) for s in versions[-keep_last:]} | ({str(protected)} if protected else set())
  todo = list(kept)
  while todo:  # and what those read (a kept-for-sharing version must still load whole)
    for name in shared_from(root, parse_version(todo.pop())) - kept:
      kept.add(name)
      todo.append(name)
  doomed = [s for s in versions[:-keep_last] if str(s) not in kept]
  for step in doomed:
    storage.remove_folder(root / str(step), MANIFEST)
  return doomed
