"""Read-only arrays made of several stored arrays back to back, without copying them.

A corpus version (data/corpus_versions.py) stores only the blocks it added; its readers see the
build's rows, then each version's added rows, as one corpus. `ChainedRows` is that view: rows
are read from the (memory-mapped) part that holds them, so a Wikipedia-size base is never
copied. It also serves the two tricks a version needs: tombstoned rows read as a fill row (the
null block), and offset arrays whose parts count from 0 read as one running offset.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from realm_jax.data.corpus import TitleList


class ChainedRows:
  """Rows of `parts` concatenated along axis 0: shape [sum(len(p)), *row_shape].

  adds[i] is added to every value read from part i (offset arrays; needs an integer dtype).
  Rows where `masked` [len] is True read as `fill` [*row_shape] instead.
  Supports what corpus code does with numpy arrays: an int, a slice or an integer array of
  any shape as the row index, optionally followed by indices into the row
  (`a[ids, :n]`), `len`, `shape`, `dtype`, `ndim`, and `np.asarray` (materializes: for small
  arrays and tests, not for the token arrays of a large corpus).
  """

  def __init__(self, parts: Sequence[np.ndarray], adds: Sequence[int] | None = None,
               masked: np.ndarray | None = None, fill: np.ndarray | None = None):
    if not parts:
      raise ValueError("ChainedRows needs at least one part")
    row_shapes = {tuple(p.shape[1:]) for p in parts}
    if len(row_shapes) != 1:
      raise ValueError(f"parts have different row shapes: {sorted(row_shapes)}")
    self.parts = list(parts)
    self.adds = None if adds is None else [int(a) for a in adds]
    if self.adds is not None and len(self.adds) != len(self.parts):
      raise ValueError(f"{len(self.adds)} adds for {len(self.parts)} parts")
    self.dtype = np.result_type(*[p.dtype for p in parts])
    self.starts = np.concatenate([[0], np.cumsum([len(p) for p in parts])]).astype(np.int64)
    self.shape = (int(self.starts[-1]), *row_shapes.pop())
    if masked is not None:
      masked = np.asarray(masked, bool)
      if masked.ndim != 1 or len(masked) > self.shape[0]:
        raise ValueError(f"mask of shape {masked.shape} for {self.shape[0]} rows")
      if fill is None or np.shape(fill) != self.shape[1:]:
        raise ValueError(f"a mask needs a fill row of shape {self.shape[1:]}")
      fill = np.asarray(fill, self.dtype)
    self.masked, self.fill = masked, fill

  @property
  def ndim(self) -> int:
    return len(self.shape)

  def __len__(self) -> int:
    return self.shape[0]

  def __array__(self, dtype=None, copy=None):  # pylint: disable=unused-argument
    out = self[:]
    return out if dtype is None else out.astype(dtype)

  def __repr__(self) -> str:
    return f"ChainedRows({len(self.parts)} parts, shape={self.shape}, dtype={self.dtype})"

  def __getitem__(self, index):
    rest = ()
    if isinstance(index, tuple):
      index, rest = (index[0], index[1:]) if index else (slice(None), ())
    if isinstance(index, (int, np.integer)):
      out = self._rows(np.asarray([index], np.int64))[0]
      return out[rest] if rest else out
    if isinstance(index, slice):
      start, stop, step = index.indices(self.shape[0])
      out = (self._range(start, stop) if step == 1 else
             self._rows(np.arange(start, stop, step, dtype=np.int64)))
      lead = 1
    else:
      index = np.asarray(index)
      if index.dtype == bool:
        raise TypeError("ChainedRows takes integer row indices, not a boolean mask")
      out = self._rows(index.astype(np.int64).reshape(-1)).reshape(*index.shape, *self.shape[1:])
      lead = index.ndim
    return out[(slice(None),) * lead + rest] if rest else out

  def _check(self, rows: np.ndarray) -> np.ndarray:
    rows = np.where(rows < 0, rows + self.shape[0], rows)
    if rows.size and (rows.min() < 0 or rows.max() >= self.shape[0]):
      raise IndexError(f"row index out of range for {self.shape[0]} rows")
    return rows

  def _apply(self, out: np.ndarray, rows: np.ndarray) -> np.ndarray:
    if self.masked is not None and rows.size:
      inside = rows < len(self.masked)
      hit = np.zeros(len(rows), bool)
      hit[inside] = self.masked[rows[inside]]
      out[hit] = self.fill
    return out

  def _rows(self, rows: np.ndarray) -> np.ndarray:
    """Rows at arbitrary indices [R] -> [R, *row_shape], read part by part."""
    rows = self._check(rows)
    which = np.searchsorted(self.starts, rows, side="right") - 1
    # The biggest part (the build, in a corpus version) answers in one fancy read, no mask;
    # rows of the other parts are then overwritten from theirs.
    big = int(np.argmax([len(p) for p in self.parts]))
    if len(self.parts[big]) == 0:
      out = np.empty((len(rows), *self.shape[1:]), self.dtype)
    else:
      local = np.clip(rows - self.starts[big], 0, len(self.parts[big]) - 1)
      # a memmap fancy read touches only these rows
      out = np.asarray(self.parts[big][local]).astype(self.dtype, copy=False)
      if self.adds is not None:
        out = out + self.adds[big]
    for i in np.unique(which).tolist():
      if i == big:
        continue
      here = which == i
      values = np.asarray(self.parts[i][rows[here] - self.starts[i]])
      out[here] = values + self.adds[i] if self.adds is not None else values
    return self._apply(out, rows)

  def _range(self, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) -> [stop - start, *row_shape], as contiguous reads of each part."""
    stop = max(start, stop)
    out = np.empty((stop - start, *self.shape[1:]), self.dtype)
    for i, part in enumerate(self.parts):
      lo, hi = max(start, int(self.starts[i])), min(stop, int(self.starts[i + 1]))
      if lo < hi:
        values = np.asarray(part[lo - self.starts[i]:hi - self.starts[i]])
        out[lo - start:hi - start] = values + self.adds[i] if self.adds is not None else values
    if self.masked is not None:
      self._apply(out, np.arange(start, stop, dtype=np.int64))
    return out


def searchsorted(array, values, side: str = "left") -> np.ndarray:
  """np.searchsorted of a sorted 1-D array or `ChainedRows`, without materializing the chain:
  in a sorted chain the insertion point is the sum of each part's own (O(parts * log n))."""
  values = np.asarray(values)
  if not isinstance(array, ChainedRows):
    return np.searchsorted(array, values, side=side)
  if array.ndim != 1 or array.masked is not None:
    raise ValueError("searchsorted needs an unmasked 1-D chain")
  found = np.zeros(values.shape, np.int64)
  for i, part in enumerate(array.parts):
    add = array.adds[i] if array.adds is not None else 0
    found += np.searchsorted(part, values - add, side=side)
  return found


def chained_offsets(parts: Sequence[np.ndarray]) -> ChainedRows:
  """Offset arrays [n_i + 1], each counting from its own first value -> one running offset
  array [sum(n_i) + 1]: part i's values shifted by the totals of the parts before it."""
  totals = [int(p[-1]) - int(p[0]) for p in parts]
  before = np.concatenate([[0], np.cumsum(totals)]).astype(np.int64)  # [len(parts) + 1]
  pieces = [p[:-1] for p in parts]
  adds = [int(before[i]) - int(p[0]) for i, p in enumerate(parts)]
  return ChainedRows(pieces + [np.asarray([int(before[-1])], np.int64)], adds=adds + [0])


class ChainedTitles(TitleList):
  """The titles of several corpus parts read as one list (each part a Sequence of str)."""

  def __init__(self, parts: Sequence[Sequence[str]]):
    self.parts = list(parts)
    self.starts = np.concatenate([[0], np.cumsum([len(p) for p in parts])]).astype(np.int64)

  def __len__(self) -> int:
    return int(self.starts[-1])

  def _title(self, index: int) -> str:
    part = int(np.searchsorted(self.starts, index, side="right")) - 1
    return self.parts[part][index - int(self.starts[part])]

  def __iter__(self):
    for part in self.parts:
      yield from part

  def __repr__(self) -> str:
    return f"ChainedTitles({len(self)} titles in {len(self.parts)} parts)"
