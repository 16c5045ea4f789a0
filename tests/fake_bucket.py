"""A local fake of a GCS bucket behind `gs://`, for running the real publish code in tests.

`install(monkeypatch, root)` registers `FakeBucketFileSystem` as fsspec's "gs"/"gcs" filesystem,
which etils.epath uses for `gs://` paths when TensorFlow is absent, so `epath.Path("gs://b/x")`
in production code reads and writes objects kept as files under `root`. It has object-store
semantics, not a disk's:

- no rename or move at all (`mv`/`rename` raise OSError and are counted in `renames`);
- folders are only key prefixes: `mkdir` creates nothing, a prefix exists while an object
  under it does, and deleting its last object makes it vanish;
- an object write is atomic: the object appears whole when its file is closed (as with gcsfs,
  also when an exception closes it; a killed process's unclosed object never appears);
- listing is by prefix.
"""

from __future__ import annotations

import io
import os
import sys
import uuid

from fsspec.spec import AbstractFileSystem


class FakeBucketFileSystem(AbstractFileSystem):
  """Objects `bucket/key` stored as files `<local_root>/bucket/key` (see the module doc)."""

  protocol = ("gs", "gcs")
  root_marker = ""
  cachable = False
  local_root: str = ""  # set by `install`
  renames: list[tuple[str, str]] = []
  writes: list[str] = []  # every object written, in order

  def __init__(self, *args, **kwargs):
    del args, kwargs  # gcsfs options (finalize_on_close=...) mean nothing here
    super().__init__()

  @classmethod
  def _strip_protocol(cls, path):
    if isinstance(path, list):
      return [cls._strip_protocol(p) for p in path]
    path = os.fspath(path)
    for prefix in ("gs://", "gcs://"):
      if path.startswith(prefix):
        path = path[len(prefix):]
    return path.rstrip("/")

  def _local(self, key: str) -> str:
    return os.path.join(self.local_root, *self._strip_protocol(key).split("/"))

  @staticmethod
  def _has_objects(local_dir: str) -> bool:
    return any(files for _, _, files in os.walk(local_dir))

  def _entry(self, key: str, local: str) -> dict | None:
    if os.path.isfile(local):
      return dict(name=key, size=os.path.getsize(local), type="file")
    if os.path.isdir(local) and (self._has_objects(local) or "/" not in key):
      return dict(name=key, size=0, type="directory")  # a bucket always exists
    return None

  def info(self, path, **kwargs):
    key = self._strip_protocol(path)
    entry = self._entry(key, self._local(key))
    if entry is None:
      raise FileNotFoundError(path)
    return entry

  def ls(self, path, detail=True, **kwargs):
    key = self._strip_protocol(path)
    local = self._local(key)
    if os.path.isfile(local):
      entries = [self.info(key)]
    else:
      entries = []
      if os.path.isdir(local):
        for name in sorted(os.listdir(local)):
          entry = self._entry(f"{key}/{name}", os.path.join(local, name))
          if entry is not None:
            entries.append(entry)
      if not entries and self._entry(key, local) is None:
        raise FileNotFoundError(path)
    return entries if detail else [e["name"] for e in entries]

  def _open(self, path, mode="rb", block_size=None, autocommit=True, cache_options=None,
            **kwargs):
    key = self._strip_protocol(path)
    if "r" in mode:
      local = self._local(key)
      if not os.path.isfile(local):
        raise FileNotFoundError(path)
      return open(local, "rb")
    if "a" in mode:
      raise OSError("the fake bucket (like GCS) cannot append to an object")
    return _Upload(self, key)

  def _commit(self, key: str, data: bytes):
    local = self._local(key)
    if os.path.isdir(local):
      raise OSError(f"{key}: a prefix with objects under it")
    os.makedirs(os.path.dirname(local), exist_ok=True)
    staged = os.path.join(self.local_root, f".upload-{uuid.uuid4().hex}")
    with open(staged, "wb") as f:
      f.write(data)
    os.replace(staged, local)  # the object appears whole
    self.writes.append(key)

  def mkdir(self, path, create_parents=True, **kwargs):
    pass  # a prefix is not an object

  def makedirs(self, path, exist_ok=False):
    pass

  def rmdir(self, path):
    pass

  def rm(self, path, recursive=False, maxdepth=None):
    keys = self.expand_path(path, recursive=recursive, maxdepth=maxdepth)
    objects = [k for k in keys if os.path.isfile(self._local(k))]  # prefixes are not objects
    if not objects:
      raise FileNotFoundError(path)
    for key in objects:
      self.rm_file(key)

  def rm_file(self, path):
    local = self._local(self._strip_protocol(path))
    os.remove(local)
    parent = os.path.dirname(local)
    while (os.path.dirname(parent) != self.local_root  # the bucket itself stays
           and os.path.isdir(parent) and not os.listdir(parent)):
      os.rmdir(parent)
      parent = os.path.dirname(parent)

  def _rm(self, path):
    self.rm_file(path)

  def mv(self, path1, path2, **kwargs):
    self.renames.append((str(path1), str(path2)))
    raise OSError(f"the fake bucket has no rename ({path1} -> {path2}): object stores copy "
                  "and delete object by object, which is not atomic")

  rename = mv

  def cp_file(self, path1, path2, **kwargs):
    with self._open(path1) as f:
      self._commit(self._strip_protocol(path2), f.read())


class _Upload(io.BytesIO):
  """An object being written: it reaches the bucket whole when closed."""

  def __init__(self, fs: FakeBucketFileSystem, key: str):
    super().__init__()
    self._fs, self._key = fs, key

  def close(self):
    if not self.closed:
      self._fs._commit(self._key, self.getvalue())  # pylint: disable=protected-access
    super().close()


def install(monkeypatch, root) -> type[FakeBucketFileSystem]:
  """Serves `gs://` from the fake bucket under the local folder `root` for one test."""
  os.makedirs(root, exist_ok=True)
  import fsspec.registry  # pylint: disable=g-import-not-at-top,unused-import  (loads the module)
  registry = sys.modules["fsspec.registry"]._registry  # pylint: disable=protected-access
  fs_cls = type("FakeBucket", (FakeBucketFileSystem,),
                dict(local_root=os.fspath(root), renames=[], writes=[]))
  for name in ("gs", "gcs"):
    monkeypatch.setitem(registry, name, fs_cls)
  clear_cache()
  return fs_cls


def clear_cache():
  """Drops epath's cached gs:// filesystem (at install, and when the test is done with it)."""
  from etils.epath import backend  # pylint: disable=g-import-not-at-top
  backend.fsspec_backend._get_filesystem.cache_clear()  # pylint: disable=protected-access
