"""The on-storage index format shared by the in-process refresh and the index-builder job.

```
index/<step>/MANIFEST.json                       written last: a version without it is not one
index/<step>/shard-00000-of-00002/embeddings.npy [n, D] float32
index/<step>/shard-00000-of-00002/doc_ids.npy    [n] int64
index/LATEST                                     the newest complete version's step
```
A version is written in a hidden tmp folder, renamed into place, and only then is LATEST
replaced (write-then-rename), so a reader never sees half of one. Paths are `etils.epath`, so
`gs://` works the same as a local folder.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
import uuid
from typing import Any, Sequence

import numpy as np
from etils import epath

from realm_jax.retrieval import scann_searcher
from realm_jax.retrieval import searcher as searcher_lib

MANIFEST = "MANIFEST.json"
LATEST = "LATEST"
FORMAT_VERSION = 1


class IndexVersionError(ValueError):
  """An index version that is missing, incomplete or inconsistent."""


def _shard_name(i: int, n: int) -> str:
  return f"shard-{i:05d}-of-{n:05d}"


def _write_npy(path: epath.Path, array: np.ndarray) -> str:
  buffer = io.BytesIO()
  np.save(buffer, array)
  data = buffer.getvalue()
  path.write_bytes(data)
  return hashlib.sha256(data).hexdigest()


def _read_npy(path: epath.Path, sha256: str | None) -> np.ndarray:
  data = path.read_bytes()
  if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
    raise IndexVersionError(f"checksum mismatch in {path}")
  return np.load(io.BytesIO(data))


def publish_index(index_root: epath.PathLike, step: int,
                  shards: Sequence[tuple[np.ndarray, np.ndarray]],
                  searcher: str = "exact", extra: dict[str, Any] | None = None) -> epath.Path:
  """Writes one version from [(embeddings [n, D], doc_ids [n]), ...] and points LATEST at it."""
  start = time.time()
  root = epath.Path(index_root)
  root.mkdir(parents=True, exist_ok=True)
  final = root / str(step)
  if (final / MANIFEST).exists():
    raise IndexVersionError(f"index version {final} already exists")
  tmp = root / f".tmp-{step}-{uuid.uuid4().hex[:8]}"
  tmp.mkdir(parents=True)
  shard_entries, dims = [], set()
  for i, (embeddings, doc_ids) in enumerate(shards):
    embeddings = np.asarray(embeddings, np.float32)
    doc_ids = np.asarray(doc_ids, np.int64)
    if embeddings.ndim != 2 or doc_ids.shape != (len(embeddings),):
      raise IndexVersionError(f"shard {i}: embeddings {embeddings.shape} vs doc_ids {doc_ids.shape}")
    dims.add(embeddings.shape[1])
    name = _shard_name(i, len(shards))
    (tmp / name).mkdir()
    shard_entries.append(dict(
        name=name, num_docs=int(len(doc_ids)),
        embeddings_sha256=_write_npy(tmp / name / "embeddings.npy", embeddings),
        doc_ids_sha256=_write_npy(tmp / name / "doc_ids.npy", doc_ids)))
  if len(dims) != 1:
    raise IndexVersionError(f"shards disagree on the embedding dim: {sorted(dims)}")
  manifest = dict(format_version=FORMAT_VERSION, step=int(step), dim=dims.pop(),
                  num_docs=sum(s["num_docs"] for s in shard_entries), searcher=searcher,
                  shards=shard_entries, build_seconds=round(time.time() - start, 3),
                  created=time.time(), **(extra or {}))
  (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
  if final.exists():  # leftover of a crashed publish without a manifest
    final.rmtree()
  tmp.rename(final)
  latest_tmp = root / f".{LATEST}.tmp-{uuid.uuid4().hex[:8]}"
  latest_tmp.write_text(str(step))
  latest_tmp.replace(root / LATEST)  # atomic overwrite on local and POSIX-like stores
  return final


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


def load_index(index_root: epath.PathLike, step: int, expected_dim: int | None = None,
               expected_num_docs: int | None = None) -> tuple[dict, searcher_lib.ShardedSearcher]:
  """Loads and validates one version (checksums, dim, doc count) into the manifest's searcher.

  A "scann" version builds its ScaNN shards here from the stored embeddings (in the caller's
  thread: the trainer's IndexWatcher, off the training thread).
  """
  version = epath.Path(index_root) / str(step)
  manifest_path = version / MANIFEST
  if not manifest_path.exists():
    raise IndexVersionError(f"{version} has no {MANIFEST}: not a complete index version")
  manifest = json.loads(manifest_path.read_text())
  if expected_dim is not None and manifest["dim"] != expected_dim:
    raise IndexVersionError(f"{version}: dim {manifest['dim']} != model's {expected_dim}")
  if expected_num_docs is not None and manifest["num_docs"] != expected_num_docs:
    raise IndexVersionError(f"{version}: {manifest['num_docs']} docs != corpus's {expected_num_docs}")
  shards = []
  for entry in manifest["shards"]:
    embeddings = _read_npy(version / entry["name"] / "embeddings.npy",
                           entry["embeddings_sha256"])
    doc_ids = _read_npy(version / entry["name"] / "doc_ids.npy", entry["doc_ids_sha256"])
    if embeddings.shape != (entry["num_docs"], manifest["dim"]):
      raise IndexVersionError(f"{version}/{entry['name']}: shape {embeddings.shape} does not match "
                        f"the manifest")
    shards.append(scann_searcher.make_searcher(manifest["searcher"], embeddings, doc_ids))
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
