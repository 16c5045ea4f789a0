"""The on-storage index format shared by the in-process refresh and the index-builder job.

```
index/<step>/MANIFEST.json                        written last: a version without it is not one
index/<step>/BUILD.json                           what was announced: step, shards, attempt id
index/<step>/shard-00000-of-00002/embeddings.npy  [n, D] float32
index/<step>/shard-00000-of-00002/doc_ids.npy     [n] int64
index/<step>/shard-00000-of-00002/scann/...       "scann" versions: the trained ScaNN searcher
index/<step>/shard-00000-of-00002/SHARD_DONE.json written last in the shard: its checksums
index/LATEST                                      the newest complete version's step
```
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
from typing import Any, Sequence

import numpy as np
from etils import epath

from realm_jax.retrieval import scann_searcher
from realm_jax.retrieval import searcher as searcher_lib

MANIFEST = "MANIFEST.json"
LATEST = "LATEST"
BUILD = "BUILD.json"
SHARD_DONE = "SHARD_DONE.json"
TMP_PREFIX = ".tmp-"
SCANN_DIR = "scann"  # in a shard: `ScannSearcher.save`'s folder
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


class StaleBuildError(IndexVersionError):
  """The attempt a shard was written for is no longer the announced one (leader restarted)."""


def shard_name(i: int, n: int) -> str:
  return f"shard-{i:05d}-of-{n:05d}"


def tmp_dir(index_root: epath.PathLike, step: int) -> epath.Path:
  """The one tmp folder of version `step`: deterministic, so every builder process finds it."""
  return epath.Path(index_root) / f"{TMP_PREFIX}{step}"


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
  """Write-then-rename, so a concurrent reader sees the old file, the new one, or none."""
  tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
  tmp.write_text(text)
  tmp.replace(path)  # atomic overwrite on local and POSIX-like stores


def _write_json_atomic(path: epath.Path, value: dict[str, Any]):
  _replace_text(path, json.dumps(value, indent=1))


def _read_json(path: epath.Path) -> dict[str, Any] | None:
  try:
    return json.loads(path.read_text())
  except (FileNotFoundError, json.JSONDecodeError):
    return None


def start_version(index_root: epath.PathLike, step: int, num_shards: int,
                  searcher: str = "exact", searcher_options: dict[str, Any] | None = None
                  ) -> dict[str, Any]:
  """The leader announces version `step` in `num_shards` shards; returns the build record.

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
  build = dict(step=int(step), num_shards=int(num_shards), searcher=searcher,
               searcher_options=dict(searcher_options or {}), attempt=uuid.uuid4().hex,
               created=time.time())
  _write_json_atomic(tmp / BUILD, build)
  return build


def read_build(index_root: epath.PathLike, step: int) -> dict[str, Any] | None:
  """The announced build of `step` (None if there is none in flight)."""
  return _read_json(tmp_dir(index_root, step) / BUILD)


def pending_builds(index_root: epath.PathLike) -> list[dict[str, Any]]:
  """Build records of every version in flight, newest step first (what followers poll)."""
  root = epath.Path(index_root)
  if not root.exists():
    return []
  builds = []
  for path in root.iterdir():
    if path.name.startswith(TMP_PREFIX) and path.name[len(TMP_PREFIX):].isdigit():
      build = _read_json(path / BUILD)
      if build is not None:
        builds.append(build)
  return sorted(builds, key=lambda b: -b["step"])


def shard_done(index_root: epath.PathLike, build: dict[str, Any], shard_index: int
               ) -> dict[str, Any] | None:
  """The shard's SHARD_DONE record if it was finished for this very attempt, else None."""
  path = (tmp_dir(index_root, build["step"]) / shard_name(shard_index, build["num_shards"]) /
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


def write_shard(index_root: epath.PathLike, build: dict[str, Any], shard_index: int,
                embeddings: np.ndarray, doc_ids: np.ndarray,
                searcher: searcher_lib.Searcher | None = None) -> dict[str, Any]:
  """Writes shard `shard_index` of an announced build: [n, D] embeddings, [n] doc ids.

  A "scann" build also trains (or takes the given) `ScannSearcher` and stores it. The shard's
  SHARD_DONE.json goes last, and only while `build` is still the announced attempt.
  """
  embeddings = np.asarray(embeddings, np.float32)
  doc_ids = np.asarray(doc_ids, np.int64)
  if embeddings.ndim != 2 or doc_ids.shape != (len(embeddings),):
    raise IndexVersionError(f"shard {shard_index}: embeddings {embeddings.shape} vs doc_ids "
                            f"{doc_ids.shape}")
  if not 0 <= shard_index < build["num_shards"]:
    raise IndexVersionError(f"shard {shard_index} of a {build['num_shards']}-shard build")
  name = shard_name(shard_index, build["num_shards"])
  shard = tmp_dir(index_root, build["step"]) / name
  if shard.exists():  # an earlier try of this shard (only its own process writes it)
    shard.rmtree()
  shard.mkdir()  # no parents: a tmp folder the leader removed is not brought back
  entry = dict(name=name, num_docs=int(len(doc_ids)), dim=int(embeddings.shape[1]),
               embeddings_sha256=_write_npy(shard / "embeddings.npy", embeddings),
               doc_ids_sha256=_write_npy(shard / "doc_ids.npy", doc_ids))
  if build["searcher"] == "scann":
    if searcher is None:
      searcher = scann_searcher.ScannSearcher(embeddings, doc_ids, **build["searcher_options"])
    if not isinstance(searcher, scann_searcher.ScannSearcher):
      raise IndexVersionError(f"a scann build got a {type(searcher).__name__}")
    entry["scann_files"] = _stage_scann(searcher, shard)
    entry["scann_params"] = dict(searcher.params)
  current = read_build(index_root, build["step"])
  if current is None or current["attempt"] != build["attempt"]:
    raise StaleBuildError(f"{name} of step {build['step']}: attempt {build['attempt']} is no "
                          "longer the announced one")
  _write_json_atomic(shard / SHARD_DONE, dict(entry, attempt=build["attempt"]))
  return entry


def finish_version(index_root: epath.PathLike, build: dict[str, Any], timeout: float = 0.0,
                   poll_seconds: float = 1.0, expected_num_docs: int | None = None,
                   extra: dict[str, Any] | None = None) -> epath.Path:
  """The leader: waits for every shard of `build`, writes the manifest, renames, moves LATEST.

  Raises IndexVersionError if shards are still missing after `timeout` seconds (nothing is
  published; the next `start_version` of the step starts over).
  """
  root = epath.Path(index_root)
  step, num_shards = build["step"], build["num_shards"]
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
  manifest = dict(format_version=FORMAT_VERSION, step=int(step), dim=dims.pop(),
                  num_docs=num_docs, searcher=build["searcher"],
                  searcher_options=build["searcher_options"], attempt=build["attempt"],
                  shards=shards, build_seconds=round(time.time() - build["created"], 3),
                  created=time.time(), **(extra or {}))
  _pause("before_manifest")
  (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
  if final.exists():  # leftover of a crashed publish without a manifest
    final.rmtree()
  tmp.rename(final)
  _replace_text(root / LATEST, str(step))
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


def latest_step(index_root: epath.PathLike) -> int | None:
  """The step LATEST points at, or None before the first publish."""
  path = epath.Path(index_root) / LATEST
  return int(path.read_text().strip()) if path.exists() else None


def list_versions(index_root: epath.PathLike) -> list[int]:
  """Steps of all complete versions (those with a manifest), ascending."""
  root = epath.Path(index_root)
  if not root.exists():
    return []
  return sorted(int(p.name) for p in root.iterdir()
                if p.name.isdigit() and (p / MANIFEST).exists())


def _load_scann_shard(shard: epath.Path, entry: dict[str, Any]
                      ) -> scann_searcher.ScannSearcher:
  """Checks every stored ScaNN file against the manifest, then loads (no re-training)."""
  for relative in entry["scann_files"]:
    if relative.startswith("/") or ".." in relative.split("/"):
      raise IndexVersionError(f"{shard}: bad ScaNN file name {relative!r} in the manifest")
  if _is_local(shard):
    for relative, sha256 in entry["scann_files"].items():
      _check_file(shard / relative, sha256)
    return _scann_load(shard, os.fspath(shard / SCANN_DIR))
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


def _load_shard(version: epath.Path, manifest: dict[str, Any], entry: dict[str, Any]
                ) -> searcher_lib.Searcher:
  shard = version / entry["name"]
  doc_ids = _read_npy(shard / "doc_ids.npy", entry["doc_ids_sha256"])
  if doc_ids.shape != (entry["num_docs"],):
    raise IndexVersionError(f"{shard}: {doc_ids.shape[0]} doc ids, the manifest says "
                            f"{entry['num_docs']}")
  kind = manifest["searcher"]
  if kind == "scann" and entry.get("scann_files"):
    searcher = _load_scann_shard(shard, entry)
    if ((searcher.num_docs, searcher.dim) != (entry["num_docs"], manifest["dim"]) or
        not np.array_equal(searcher.doc_ids, doc_ids)):
      raise IndexVersionError(f"{shard}: the stored ScaNN searcher does not match the shard")
    return searcher
  # Exact shards, and "scann" shards of versions written without ScaNN files: from embeddings.
  embeddings = _read_npy(shard / "embeddings.npy", entry["embeddings_sha256"])
  if embeddings.shape != (entry["num_docs"], manifest["dim"]):
    raise IndexVersionError(f"{shard}: shape {embeddings.shape} does not match the manifest")
  options = (manifest.get("searcher_options") or {}) if kind == "scann" else {}
  return scann_searcher.make_searcher(kind, embeddings, doc_ids, **options)


def load_index(index_root: epath.PathLike, step: int, expected_dim: int | None = None,
               expected_num_docs: int | None = None) -> tuple[dict, searcher_lib.ShardedSearcher]:
  """Loads and validates one version (checksums, dim, doc count) into the manifest's searcher.

  A "scann" shard loads its stored searcher (every file checked against the manifest); one
  without stored files (format version 1) is built here from the embeddings, in the caller's
  thread (the trainer's IndexWatcher: off the training thread).
  """
  version = epath.Path(index_root) / str(step)
  manifest_path = version / MANIFEST
  if not manifest_path.exists():
    raise IndexVersionError(f"{version} has no {MANIFEST}: not a complete index version")
  manifest = json.loads(manifest_path.read_text())
  if expected_dim is not None and manifest["dim"] != expected_dim:
    raise IndexVersionError(f"{version}: dim {manifest['dim']} != model's {expected_dim}")
  if expected_num_docs is not None and manifest["num_docs"] != expected_num_docs:
    raise IndexVersionError(f"{version}: {manifest['num_docs']} docs != corpus's "
                            f"{expected_num_docs}")
  shards = [_load_shard(version, manifest, entry) for entry in manifest["shards"]]
  return manifest, searcher_lib.ShardedSearcher(shards)


def prune_versions(index_root: epath.PathLike, keep_last: int) -> list[int]:
  """Deletes all but the newest `keep_last` versions, never the one LATEST names."""
  root = epath.Path(index_root)
  protected = latest_step(root)
  versions = list_versions(root)
  doomed = [s for s in versions[:-keep_last] if s != protected] if keep_last > 0 else []
  for step in doomed:
    (root / str(step)).rmtree()
  return doomed
