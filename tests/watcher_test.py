"""IndexWatcher: only complete, valid versions are ever handed to the trainer."""

import numpy as np
import pytest

from realm_jax.retrieval import index_format
from realm_jax.retrieval import watcher as watcher_lib
from data_helpers import flip_byte  # pylint: disable=g-bad-import-order

DIM, DOCS = 8, 30


def _publish(root, step, seed=0):
  emb = np.random.default_rng(seed).normal(size=(DOCS, DIM)).astype(np.float32)
  return index_format.publish_index(root, step, [(emb, np.arange(DOCS))])


def _watched(root):
  watcher = watcher_lib.IndexWatcher(root, expected_dim=DIM, expected_num_docs=DOCS)
  return watcher, watcher_lib.WatchedIndex(watcher, null_id=DOCS)


def test_swaps_to_newer_valid_versions_only(tmp_path):
  watcher, index = _watched(tmp_path)
  _publish(tmp_path, 0)
  watcher._poll_once()  # pylint: disable=protected-access
  assert index.maybe_swap() and index.step == 0 and index.swaps == 1
  watcher._poll_once()  # pylint: disable=protected-access
  assert not index.maybe_swap(), "the same version twice is not a swap"
  _publish(tmp_path, 5, seed=1)
  watcher._poll_once()  # pylint: disable=protected-access
  assert index.maybe_swap() and index.step == 5 and index.swaps == 2
  ids, mask = index.retrieve(np.ones((2, DIM), np.float32), np.array([-1, 3]), k=4, margin=2)
  assert ids.shape == (2, 4) and (ids[:, 0] == DOCS).all() and mask.all()
  assert 3 not in ids[1], "the source document is dropped"


def test_corrupted_or_mismatched_version_is_rejected_and_old_index_kept(tmp_path):
  watcher, index = _watched(tmp_path)
  _publish(tmp_path, 1)
  watcher._poll_once()  # pylint: disable=protected-access
  index.maybe_swap()
  version = _publish(tmp_path, 2, seed=2)
  path = version / "shard-00000-of-00001" / "embeddings.npy"
  flip_byte(path, -4)
  watcher._poll_once()  # pylint: disable=protected-access
  assert not index.maybe_swap() and index.step == 1
  assert "checksum" in watcher.rejected[2]
  other_dim = np.zeros((DOCS, DIM + 1), np.float32)
  index_format.publish_index(tmp_path, 3, [(other_dim, np.arange(DOCS))])
  watcher._poll_once()  # pylint: disable=protected-access
  assert not index.maybe_swap() and "dim" in watcher.rejected[3]
  _publish(tmp_path, 4, seed=4)  # the builder carries on: the next good version is taken
  watcher._poll_once()  # pylint: disable=protected-access
  assert index.maybe_swap() and index.step == 4


def test_half_written_or_deleted_versions_are_never_loaded(tmp_path):
  watcher, index = _watched(tmp_path)
  _publish(tmp_path, 1)
  watcher._poll_once()  # pylint: disable=protected-access
  index.maybe_swap()
  # A builder killed mid-publish leaves a tmp folder and LATEST untouched.
  (tmp_path / ".tmp-2-abcd" / "shard-00000-of-00001").mkdir(parents=True)
  watcher._poll_once()  # pylint: disable=protected-access
  assert not index.maybe_swap() and index.step == 1
  # A version that LATEST names but that vanished (pruned) before it could be read.
  version = _publish(tmp_path, 3)
  version.rmtree()
  watcher._poll_once()  # pylint: disable=protected-access
  assert not index.maybe_swap() and index.step == 1
  _publish(tmp_path, 4)
  watcher._poll_once()  # pylint: disable=protected-access
  assert index.maybe_swap() and index.step == 4


def test_background_thread_and_first_index_timeout(tmp_path):
  watcher = watcher_lib.IndexWatcher(tmp_path, DIM, DOCS, poll_seconds=0.01).start()
  try:
    with pytest.raises(TimeoutError, match="index-builder job"):
      watcher.wait_for_first(timeout=0.1)
    _publish(tmp_path, 7)
    step, searcher, _ = watcher.wait_for_first(timeout=10)
    assert step == 7 and searcher.num_docs == DOCS
  finally:
    watcher.stop()


def test_scann_versions_load_their_stored_searchers_and_bad_assets_are_rejected(tmp_path):
  pytest.importorskip("scann")
  from realm_jax.retrieval import scann_searcher  # pylint: disable=g-import-not-at-top
  watcher, index = _watched(tmp_path)
  emb = np.random.default_rng(0).normal(size=(DOCS, DIM)).astype(np.float32)
  index_format.publish_index(tmp_path, 1, [(emb, np.arange(DOCS))], searcher="scann")
  watcher._poll_once()  # pylint: disable=protected-access
  assert index.maybe_swap() and isinstance(index.searcher.shards[0], scann_searcher.ScannSearcher)
  version = index_format.publish_index(tmp_path, 2, [(emb, np.arange(DOCS))], searcher="scann")
  path = version / "shard-00000-of-00001" / "scann" / "realm_scann_searcher.json"
  path.write_text(path.read_text().replace('"dim": 8', '"dim": 9'))
  watcher._poll_once()  # pylint: disable=protected-access
  assert not index.maybe_swap() and index.step == 1 and "checksum" in watcher.rejected[2]


def test_polling_thread_survives_an_unexpected_error(tmp_path, monkeypatch):
  """A surprise exception is logged and counted; the thread keeps polling and loads later."""
  real_latest_step, calls = index_format.latest_step, []

  def flaky_latest_step(root):
    calls.append(root)
    if len(calls) == 1:
      raise RuntimeError("storage hiccup")
    return real_latest_step(root)

  monkeypatch.setattr(index_format, "latest_step", flaky_latest_step)
  _publish(tmp_path, 2)
  watcher = watcher_lib.IndexWatcher(tmp_path, expected_dim=DIM, expected_num_docs=DOCS,
                                     poll_seconds=0.01).start()
  try:
    step, _, _ = watcher.wait_for_first(timeout=10.0)
  finally:
    watcher.stop()
  assert step == 2 and watcher.errors == 1 and len(calls) >= 2
