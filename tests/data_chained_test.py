"""ChainedRows / ChainedTitles (the read view of delta corpus versions) against numpy on the
concatenated arrays."""

import numpy as np
import pytest

from realm_jax.data import chained


@pytest.fixture
def rows():
  rng = np.random.default_rng(0)
  parts = [rng.integers(0, 100, (n, 3)).astype(np.int32) for n in (5, 0, 2, 4)]
  masked = np.zeros(10, bool)
  masked[[1, 6, 9]] = True  # the last (11th) row, like the null row, is never masked
  fill = np.full(3, -7, np.int32)
  reference = np.concatenate(parts)
  reference[masked.nonzero()[0]] = fill
  return chained.ChainedRows(parts, masked=masked, fill=fill), reference


def test_every_kind_of_index_reads_what_the_concatenation_holds(rows):
  view, reference = rows
  assert view.shape == reference.shape == (11, 3) and len(view) == 11 and view.ndim == 2
  np.testing.assert_array_equal(np.asarray(view), reference)
  for index in (0, 4, 5, 6, 10, -1, -11):
    np.testing.assert_array_equal(view[index], reference[index])
  for index in (slice(None), slice(3, 8), slice(5, 5), slice(9, 100), slice(None, None, 3),
                slice(8, 2, -2)):
    np.testing.assert_array_equal(view[index], reference[index], err_msg=str(index))
  ids = np.array([[10, 0, 6], [6, 5, 1]])  # any shape, repeats, across parts
  np.testing.assert_array_equal(view[ids], reference[ids])
  np.testing.assert_array_equal(view[ids, 1:], reference[ids, 1:])
  np.testing.assert_array_equal(view[4, :2], reference[4, :2])
  np.testing.assert_array_equal(view[2:9, 2], reference[2:9, 2])
  with pytest.raises(IndexError):
    view[11]
  with pytest.raises(IndexError):
    view[np.array([3, 12])]


def test_offsets_of_parts_counting_from_zero_read_as_one_running_offset():
  parts = [np.array([0, 2, 5]), np.array([0]), np.array([0, 1, 4, 4]), np.array([3, 6])]
  lengths = np.concatenate([np.diff(p) for p in parts])
  reference = np.concatenate([[0], np.cumsum(lengths)])
  view = chained.chained_offsets(parts)
  np.testing.assert_array_equal(np.asarray(view), reference)
  assert view.dtype == np.int64 and int(view[-1]) == lengths.sum()
  values = np.array([-1, 0, 1, 2, 5, 6, 8, 9, 12, 99])
  for side in ("left", "right"):
    np.testing.assert_array_equal(chained.searchsorted(view, values, side=side),
                                  np.searchsorted(reference, values, side=side), err_msg=side)
    np.testing.assert_array_equal(chained.searchsorted(reference, values, side=side),
                                  np.searchsorted(reference, values, side=side))


def test_titles_of_parts_read_as_one_list():
  titles = chained.ChainedTitles([["a", "b"], [], ["c"], ["d", "e"]])
  assert len(titles) == 5 and list(titles) == ["a", "b", "c", "d", "e"]
  assert titles[2] == "c" and titles[-1] == "e" and titles[1:4] == ["b", "c", "d"]
  assert titles == ["a", "b", "c", "d", "e"] and titles != ["a", "b", "c", "d", "x"]
  with pytest.raises(IndexError):
    titles[5]


def test_bad_parts_are_refused():
  with pytest.raises(ValueError, match="row shapes"):
    chained.ChainedRows([np.zeros((2, 3)), np.zeros((2, 4))])
  with pytest.raises(ValueError, match="fill row"):
    chained.ChainedRows([np.zeros((2, 3))], masked=np.zeros(2, bool))
  with pytest.raises(TypeError, match="boolean"):
    chained.ChainedRows([np.zeros((2, 3))])[np.array([True, False])]
