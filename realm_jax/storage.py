"""Publishing folders and pointers on a local disk and on object storage (gs://, s3://) alike.

A reader must never see half a version. On a local (POSIX) filesystem a folder is written under
a hidden tmp name and renamed into place, one atomic step. Object stores have no directory
rename (gcsfs emulates one by copying and deleting object by object, which a reader can watch
half done), but a single object write is atomic: the object appears whole or not at all. So on
object storage a new version's objects are written straight into its final folder and its
*marker* object (a manifest, `corpus.json`, ...) is written last; readers accept only folders
that hold the marker, which they already must for local folders (a rename publishes the marker
with everything else). Pointers (`index/LATEST`, `CORPUS_LATEST`) and small records are one
object each: written whole on object storage, write-then-rename locally.

`publish_folder` is that protocol for a single writer; `index_format` applies the same rule to
its multi-writer protocol. Orbax checkpoints need nothing from here: orbax picks its commit-file
protocol for gs:// paths itself (`commit_success.txt`, see `checkpoint_finalized`).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
import uuid
from typing import Iterator

from etils import epath

# What `--workdir=<scheme>://...` needs besides etils: the fsspec backend, and its pip package.
_BACKENDS = {"gs": ("gcsfs", "pip install 'realm_jax[gcs]'"),
             "s3": ("s3fs", "pip install s3fs"),
             "az": ("adlfs", "pip install adlfs")}
# The file orbax writes last into a checkpoint saved on GCS (orbax's COMMIT_SUCCESS_FILE in
# orbax/checkpoint/_src/path/atomicity_types.py; a test checks the two agree).
ORBAX_COMMIT_FILE = "commit_success.txt"


class StorageUnavailableError(RuntimeError):
  """A path on an object store whose filesystem package is not installed."""


def scheme(path: epath.PathLike) -> str | None:
  """`"gs"` for `gs://b/x`, None for a local path (and for `file://`)."""
  text = os.fspath(path)
  if "://" not in text:
    return None
  name = text.split("://", 1)[0].lower()
  return None if name == "file" else name


def is_object_storage(path: epath.PathLike) -> bool:
  """Whether `path` lives on an object store (no atomic directory rename) rather than a disk."""
  return scheme(path) is not None


def _module_available(name: str) -> bool:
  if name in sys.modules:  # a test may block an import by setting sys.modules[name] = None
    return sys.modules[name] is not None
  return importlib.util.find_spec(name) is not None


def check_available(path: epath.PathLike) -> None:
  """Raises StorageUnavailableError, naming the install command, if `path` cannot be opened.

  Called at start-up for `--workdir` and the data folders, so a gs:// run without gcsfs stops
  with one clear line instead of deep inside the first write. etils reads gs:// through
  TensorFlow's gfile when TensorFlow is installed, so that also counts.
  """
  name = scheme(path)
  if name is None:
    return
  package, install = _BACKENDS.get(name, (None, None))
  if name in ("gs", "s3") and _module_available("tensorflow"):
    return
  import fsspec  # pylint: disable=g-import-not-at-top  (etils[epath] depends on it)
  try:
    fsspec.get_filesystem_class(name)
  except (ImportError, ValueError) as e:
    hint = f"{install} (it provides {package})" if install else "install its fsspec backend"
    raise StorageUnavailableError(
        f"{os.fspath(path)}: {name}:// storage needs a filesystem package that is not "
        f"installed: {hint}") from e


def write_bytes(path: epath.PathLike, data: bytes) -> None:
  """Replaces the file/object at `path` whole: readers see the old content, the new, or none.

  Local: a temporary file, fsynced (complete even after a machine crash), renamed into place;
  removed again if the write fails. Object storage: one object write, which is atomic there.
  """
  path = epath.Path(path)
  if is_object_storage(path):
    path.write_bytes(data)
    return
  tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
  try:
    with open(os.fspath(tmp), "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    tmp.replace(path)
  except BaseException:
    try:
      tmp.unlink(missing_ok=True)
    except OSError:
      pass
    raise


def write_text(path: epath.PathLike, text: str) -> None:
  """`write_bytes` of UTF-8 text (pointers such as LATEST, JSON records)."""
  write_bytes(path, text.encode("utf-8"))


def move_file(source: epath.PathLike, target: epath.PathLike) -> None:
  """Moves one small finished file into place whole: a rename locally; on object storage the
  target object is written from the source's bytes (one atomic object write), then the
  source is deleted."""
  source, target = epath.Path(source), epath.Path(target)
  if is_object_storage(target) or is_object_storage(source):
    target.write_bytes(source.read_bytes())
    source.unlink()
    return
  source.rename(target)


def list_files(root: epath.PathLike) -> list[str]:
  """Every file under `root` as a sorted `/`-joined relative name (local or object storage).

  `os.walk` sees nothing at a gs:// path, and epath's walk there yields folders without the
  `gs://` prefix, so names are taken relative to the prefix-less root.
  """
  root = epath.Path(root)
  base = os.fspath(root).split("://", 1)[-1].rstrip("/")
  names = []
  for directory, _, files in root.walk():
    relative = os.fspath(directory).split("://", 1)[-1].rstrip("/")[len(base):].strip("/")
    names += [f"{relative}/{name}" if relative else name for name in files]
  return sorted(names)


def remove_folder(path: epath.PathLike, marker: str | None = None) -> None:
  """Deletes a published folder, its marker first, so no reader takes a half-deleted one.

  A recursive delete is object by object on object storage (and file by file locally); with
  the marker gone first, what is left is a folder readers already ignore.
  """
  path = epath.Path(path)
  if marker is not None and (path / marker).exists():
    (path / marker).unlink()
  if path.exists():
    path.rmtree()


@contextlib.contextmanager
def publish_folder(final: epath.PathLike, marker: str, tmp: epath.PathLike | None = None,
                   clear_leftover: bool = True) -> Iterator[epath.Path]:
  """Yields the folder to write the new folder `final` into; the caller writes `marker` last.

  Local: the folder is `tmp` (default `.<name>.tmp-<uuid>` beside `final`), renamed to `final`
  when the block exits normally and removed when it raises. Object storage: the folder is
  `final` itself; the marker's write is the publish, and a block that raises before writing it
  has its objects removed. A leftover `final` without its marker (a killed writer's objects)
  is removed first, or, with `clear_leftover=False` (a folder the caller does not own
  outright), refused like a published one (FileExistsError). One writer per folder at a time
  (callers hold a lease or own the folder).
  """
  final = epath.Path(final)
  if is_object_storage(final):
    if (final / marker).exists():
      raise FileExistsError(f"{os.fspath(final)} is already published")
    if final.exists():
      if not clear_leftover:
        raise FileExistsError(f"{os.fspath(final)} exists without {marker} (a killed build's "
                              "leftover?): remove it, then run again")
      final.rmtree()
    try:
      yield final
    except BaseException:
      if not (final / marker).exists() and final.exists():
        final.rmtree()
      raise
    if not (final / marker).exists():
      raise RuntimeError(f"{os.fspath(final)}: the writer did not write its marker {marker}")
    return
  staging = (epath.Path(tmp) if tmp is not None
             else final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}")
  staging.mkdir(parents=True)
  try:
    yield staging
  except BaseException:
    if staging.exists():
      staging.rmtree()
    raise
  staging.rename(final)


def checkpoint_finalized(step_dir: epath.PathLike) -> bool:
  """Whether an orbax step folder is a finished checkpoint (not a save still in flight).

  Locally orbax renames a finished save into `<step>/`, so the name is enough. On GCS orbax
  writes straight into `<step>/` and adds `commit_success.txt` last (its CommitFileTemporaryPath,
  the default it picks for gs:// paths); only a folder holding that file is finished.
  """
  step_dir = epath.Path(step_dir)
  if scheme(step_dir) != "gs":  # orbax's commit-file default is for gs:// paths only
    return True
  return (step_dir / ORBAX_COMMIT_FILE).exists()
