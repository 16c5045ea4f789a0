"""Memory-maps the members of an uncompressed .npz (what np.savez writes) instead of reading them.

np.load ignores mmap_mode for .npz archives and reads each member whole when it is accessed;
salient_spans.npz holds ~1.6 GB at 10^8 spans. A stored (uncompressed) member is a plain .npy
at a fixed offset of the archive, so it can be np.memmap'ed in place. The file format is
unchanged (old corpora and file checksums stay valid); compressed members and non-local paths
(gs://) fall back to reading the member whole.
"""

from __future__ import annotations

import os
import struct
import zipfile

import numpy as np
from etils import epath

_LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")  # a zip local file header, 30 bytes
_LOCAL_MAGIC = b"PK\x03\x04"


def _member_data_offset(f, info: zipfile.ZipInfo) -> int:
  """Byte offset of a member's data in the archive (past its local header and extra field)."""
  f.seek(info.header_offset)
  fields = _LOCAL_HEADER.unpack(f.read(_LOCAL_HEADER.size))
  if fields[0] != _LOCAL_MAGIC:
    raise ValueError(f"bad zip local header for member {info.filename!r}")
  name_len, extra_len = fields[9], fields[10]
  return info.header_offset + _LOCAL_HEADER.size + name_len + extra_len


def _memmap_member(path: str, f, info: zipfile.ZipInfo) -> np.ndarray:
  """The .npy member `info` of the archive at path as a read-only memmap."""
  start = _member_data_offset(f, info)
  f.seek(start)
  version = np.lib.format.read_magic(f)
  if version == (1, 0):
    shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
  else:
    shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
  if dtype.hasobject:
    raise ValueError(f"{path}: member {info.filename!r} holds Python objects; cannot map it")
  if int(np.prod(shape)) == 0:
    return np.zeros(shape, dtype)
  return np.memmap(path, dtype=dtype, mode="r", offset=f.tell(), shape=shape,
                   order="F" if fortran else "C")


def load_npz(path: epath.PathLike, mmap: bool = True) -> dict[str, np.ndarray]:
  """All arrays of an .npz by name (member name without ".npy"); stored members memory-mapped.

  Raises FileNotFoundError naming the path when it is missing.
  """
  path = epath.Path(path)
  if not path.exists():
    raise FileNotFoundError(f"npz file not found: {os.fspath(path)}")
  local = "://" not in os.fspath(path)
  if not (mmap and local):
    with path.open("rb") as f, np.load(f) as archive:
      return {name: archive[name] for name in archive.files}
  out = {}
  with open(os.fspath(path), "rb") as f, zipfile.ZipFile(f) as archive:
    for info in archive.infolist():
      name = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
      if info.compress_type == zipfile.ZIP_STORED:
        out[name] = _memmap_member(os.fspath(path), f, info)
      else:  # np.savez_compressed: only a full read can decompress it
        with archive.open(info) as member:
          out[name] = np.lib.format.read_array(member, allow_pickle=False)
  return out
