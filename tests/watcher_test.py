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

  _publish(tmp_path, 2)
  monkeypatch.setattr(index_format, "latest_step", flaky_latest_step)
  watcher = watcher_lib.IndexWatcher(tmp_path, expected_dim=DIM, expected_num_docs=DOCS,
                                     poll_seconds=0.01).start()
  try:
    step, _, _ = watcher.wait_for_first(timeout=10.0)
  finally:
    watcher.stop()
  assert step == 2 and watcher.errors == 1 and len(calls) >= 2


# ---- Wrong versions, unusable LATEST, fallback to the newest valid version ------------------


def _publish_bad(root, step, kind):
  """A version whose files match their checksums but whose content is wrong."""
  emb = np.random.default_rng(step).normal(size=(DOCS, DIM)).astype(np.float32)
  ids = np.arange(DOCS)
  if kind == "nan":
    emb[7, 3] = np.nan
  elif kind == "inf":
    emb[0] = np.inf
  elif kind == "out_of_range":
    ids = ids + 1  # id DOCS is the null row: the trainer's gather would go past the corpus
  elif kind == "repeated":
    ids[5] = ids[4]
  return index_format.publish_index(root, step, [(emb, ids)])


def _lines(caplog, text):
  return [r for r in caplog.records if text in r.getMessage()]


@pytest.mark.parametrize("kind", ["nan", "inf", "out_of_range", "repeated"])
def test_wrong_content_is_never_swapped_in_and_is_logged_once(tmp_path, caplog, kind):
  watcher, index = _watched(tmp_path)
  _publish(tmp_path, 1)
  watcher._poll_once()  # pylint: disable=protected-access
  assert index.maybe_swap() and index.step == 1
  _publish_bad(tmp_path, 2, kind)
  for _ in range(5):
    watcher._poll_once()  # pylint: disable=protected-access
    assert not index.maybe_swap() and index.step == 1
  assert 2 in watcher.rejected
  rejections = _lines(caplog, "rejected version 2")
  assert len(rejections) == 1, [r.getMessage() for r in caplog.records]
  assert rejections[0].exc_info is None  # one line, no traceback


def test_restart_on_a_corrupted_newest_version_starts_from_the_newest_valid_one(tmp_path, caplog):
  """Used to deadlock: the trainer's wait_for_first timed out although versions 1, 2 are fine."""
  _publish(tmp_path, 1)
  _publish(tmp_path, 2, seed=2)
  _publish_bad(tmp_path, 3, "nan")
  assert index_format.latest_step(tmp_path) == 3
  watcher = watcher_lib.IndexWatcher(tmp_path, DIM, DOCS, poll_seconds=0.01).start()
  try:
    step, searcher, _ = watcher.wait_for_first(timeout=10)
  finally:
    watcher.stop()
  assert step == 2 and searcher.num_docs == DOCS
  assert "not finite" in watcher.rejected[3]
  assert len(_lines(caplog, "fell back to version 2")) == 1


@pytest.mark.parametrize("latest", [b"", b"\x00\xff\x13binary", b"not a number", b"99"])
def test_unusable_latest_falls_back_to_the_newest_valid_version(tmp_path, caplog, latest):
  """Garbage LATEST, or one naming a version that does not exist."""
  watcher, index = _watched(tmp_path)
  _publish(tmp_path, 1)
  _publish(tmp_path, 4, seed=4)
  (tmp_path / index_format.LATEST).write_bytes(latest)
  for _ in range(3):
    watcher._poll_once()  # pylint: disable=protected-access
  assert index.maybe_swap() and index.step == 4
  assert len(_lines(caplog, "fell back to version 4")) == 1
  for _ in range(3):  # nothing newer: quiet
    watcher._poll_once()  # pylint: disable=protected-access
  assert not index.maybe_swap()
  assert len([r for r in caplog.records if r.levelname == "WARNING"]) == 1
  _publish(tmp_path, 6, seed=6)  # the builder publishes again (and repairs LATEST)
  watcher._poll_once()  # pylint: disable=protected-access
  assert index.maybe_swap() and index.step == 6


def test_a_rebuilt_version_of_a_rejected_step_is_looked_at_again(tmp_path):
  watcher, index = _watched(tmp_path)
  bad = _publish_bad(tmp_path, 3, "out_of_range")
  watcher._poll_once()  # pylint: disable=protected-access
  assert not index.maybe_swap() and 3 in watcher.rejected
  bad.rmtree()
  _publish(tmp_path, 3)
  watcher._poll_once()  # pylint: disable=protected-access
  assert index.maybe_swap() and index.step == 3


def test_a_version_missing_a_file_is_rejected_once_not_retried_every_poll(tmp_path, caplog):
  watcher, index = _watched(tmp_path)
  version = _publish(tmp_path, 2)
  (version / "shard-00000-of-00001" / "doc_ids.npy").unlink()
  for _ in range(4):
    watcher._poll_once()  # pylint: disable=protected-access
  assert not index.maybe_swap() and 2 in watcher.rejected
  assert len([r for r in caplog.records if r.levelname == "WARNING"]) == 1


def test_wait_for_first_says_what_it_waits_for(tmp_path, caplog):
  caplog.set_level("INFO")
  _publish_bad(tmp_path, 5, "nan")
  watcher = watcher_lib.IndexWatcher(tmp_path, DIM, DOCS, poll_seconds=0.01).start()
  try:
    with pytest.raises(TimeoutError, match="rejected 5: .*not finite"):
      watcher.wait_for_first(timeout=0.5, log_every=0.1)
  finally:
    watcher.stop()
  assert len(_lines(caplog, "still waiting")) >= 2
  assert "not finite" in _lines(caplog, "still waiting")[-1].getMessage()


def test_sync_swaps_hold_a_version_back_until_it_is_due_and_wait_for_a_late_one(tmp_path, caplog):
  """retrieval.builder_sync_lag: `swap_when_due` takes only the version a step is due to use."""
  watcher, index = _watched(tmp_path)
  _publish(tmp_path, 0)
  watcher._poll_once()  # pylint: disable=protected-access
  index.start_at_due(0, timeout=1)
  assert index.step == 0 and index.swaps == 0
  _publish(tmp_path, 10, seed=1)
  watcher._poll_once()  # pylint: disable=protected-access
  assert not index.swap_when_due(0, timeout=1) and index.step == 0  # loaded, held back
  assert index.swap_when_due(10, timeout=1) and index.step == 10 and index.swaps == 1
  assert not index.swap_when_due(10, timeout=1)
  with pytest.raises(TimeoutError, match="version of checkpoint 20 did not appear"):
    index.swap_when_due(20, timeout=0.2)  # the builder is late: the trainer waits, then says so
  _publish(tmp_path, 30, seed=2)  # the builder embedded a later checkpoint instead of 20
  watcher._poll_once()  # pylint: disable=protected-access
  assert index.swap_when_due(20, timeout=1) and index.step == 30
  assert "version 20 is due but the builder published 30" in caplog.text


def test_sync_start_of_a_resumed_run_uses_the_version_due_at_its_step(tmp_path):
  """A run resumed at step 15 with lag 8 is due version 0 although 10 is newer; 10 follows
  when due."""
  watcher, index = _watched(tmp_path)
  _publish(tmp_path, 0)
  _publish(tmp_path, 10, seed=1)
  watcher._poll_once()  # pylint: disable=protected-access
  index.start_at_due(watcher_lib.due_version_step(15, refresh_every=10, lag=8), timeout=1)
  assert index.step == 0
  assert not index.swap_when_due(watcher_lib.due_version_step(17, 10, 8), timeout=1)
  assert index.swap_when_due(watcher_lib.due_version_step(18, 10, 8), timeout=1)
  assert index.step == 10
