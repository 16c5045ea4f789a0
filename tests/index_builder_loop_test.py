"""The index builder's loop without a model (fast): resume from the newest valid version, the
workdir lease, what it says while it waits, when it stops, and its progress lines.

The builder's embedding is faked (`_FakeBuilder`: random embeddings of a 20-document corpus);
tests/index_builder_test.py covers the real embedding with real processes.
"""

import threading
import time
import types

import jax
import numpy as np
import pytest

from realm_jax import lease
from realm_jax.retrieval import in_process
from realm_jax.retrieval import index_builder
from realm_jax.retrieval import index_format
from realm_jax.retrieval import watcher as watcher_lib
from realm_jax.train import partitioning
from tiny_configs import tiny_config  # pylint: disable=g-bad-import-order

DOCS = 20


class _FakeBuilder(index_builder.IndexBuilder):
  """IndexBuilder whose corpus is 20 docs and whose shard embeddings are random."""

  before_shard = None  # test hook: called with the build record before the shard is written

  def _ensure_model(self, wait_seconds, poll_seconds, wait_log_seconds=60.0):
    self.corpus = types.SimpleNamespace(num_docs=DOCS)

  def build_shard(self, build):
    if self.before_shard is not None:
      self.before_shard(build)  # pylint: disable=not-callable
    dim = self.config.model.embed_dim
    emb = np.random.default_rng(build["step"]).normal(size=(DOCS, dim)).astype(np.float32)
    return index_format.write_shard(self.index_root, build, 0, emb, np.arange(DOCS))


def _builder(workdir, **kwargs):
  return _FakeBuilder(tiny_config(), workdir, devices=jax.local_devices()[:1], **kwargs)


def _checkpoints(workdir, *steps):
  for step in steps:
    (workdir / "checkpoints" / str(step)).mkdir(parents=True, exist_ok=True)


def _publish(workdir, step, bad=False):
  dim = tiny_config().model.embed_dim
  emb = np.random.default_rng(step).normal(size=(DOCS, dim)).astype(np.float32)
  if bad:
    emb[3] = np.nan
  return index_format.publish_index(workdir / "index", step, [(emb, np.arange(DOCS))])


def _messages(caplog, text):
  return [r.getMessage() for r in caplog.records if text in r.getMessage()]


# ---- Resume from the newest valid version ------------------------------------------------


@pytest.mark.parametrize("latest", [b"", b"\x00\xffgarbage", b"twelve"])
def test_garbage_latest_does_not_crash_the_builder(tmp_path, caplog, latest):
  """Used to raise ValueError from int() at every restart."""
  _checkpoints(tmp_path, 0, 3)
  _publish(tmp_path, 0)
  (tmp_path / "index" / index_format.LATEST).write_bytes(latest)
  assert _builder(tmp_path).run(poll_seconds=0.01, max_builds=1, idle_timeout=10) == [3]
  assert index_format.latest_step(tmp_path / "index") == 3
  assert len(_messages(caplog, "not a step number")) == 1


def test_latest_naming_a_missing_version_does_not_stop_publishing(tmp_path):
  """Used to wait forever for a checkpoint >= 9 + refresh_every."""
  _checkpoints(tmp_path, 0, 3)
  _publish(tmp_path, 0)
  (tmp_path / "index" / index_format.LATEST).write_text("9")
  assert _builder(tmp_path).run(poll_seconds=0.01, max_builds=1, idle_timeout=10) == [3]
  assert index_format.latest_step(tmp_path / "index") == 3


def test_corrupted_newest_version_is_rebuilt_and_latest_points_at_a_valid_one(tmp_path, caplog):
  """Versions 0 (valid) and 3 (NaN, LATEST): resume after 0, rebuild 3 in place."""
  _checkpoints(tmp_path, 0, 3)
  _publish(tmp_path, 0)
  _publish(tmp_path, 3, bad=True)
  root = tmp_path / "index"
  builder = _builder(tmp_path)
  builder._ensure_model(0, 0)  # pylint: disable=protected-access
  assert builder.resume_point() == 0
  assert index_format.latest_step(root) == 0  # repaired: readers go to a valid version
  assert len(_messages(caplog, "version 3 is invalid")) == 1
  assert builder.run(poll_seconds=0.01, max_builds=1, idle_timeout=10) == [3]
  assert index_format.latest_step(root) == 3
  index_format.load_index(root, 3, expected_num_docs=DOCS)  # the rebuilt one is valid


def test_an_older_publish_never_moves_latest_back(tmp_path):
  _publish(tmp_path, 6)
  _publish(tmp_path, 3)
  assert index_format.latest_step(tmp_path / "index") == 6


# ---- One builder per workdir -------------------------------------------------------------


def test_a_second_builder_is_refused_naming_the_holder(tmp_path):
  _checkpoints(tmp_path, 0)
  held = lease.acquire(tmp_path, "index_builder")
  try:
    with pytest.raises(lease.LeaseHeldError, match=r"pid \d+.*--force"):
      _builder(tmp_path).run(poll_seconds=0.01, max_builds=1, idle_timeout=10)
    assert index_format.list_versions(tmp_path / "index") == []
    # --force takes over; the old holder notices.
    forced = _builder(tmp_path, force_lease=True)
    assert forced.run(poll_seconds=0.01, max_builds=1, idle_timeout=10) == [0]
    with pytest.raises(lease.LeaseLostError):
      held.check()
  finally:
    held.release()
  assert not lease.lease_path(tmp_path, "index_builder").exists()  # released at the end


def test_a_builder_whose_lease_was_taken_over_does_not_publish(tmp_path):
  """Builder A embeds step 0; meanwhile B takes the lease by force; A must not publish."""
  _checkpoints(tmp_path, 0)
  embedding, taken = threading.Event(), threading.Event()
  old = _builder(tmp_path)

  def pause(build):
    del build
    embedding.set()
    assert taken.wait(30)

  old.before_shard = pause
  result = {}

  def run_old():
    try:
      result["built"] = old.run(poll_seconds=0.01, max_builds=1, idle_timeout=10)
    except Exception as e:  # pylint: disable=broad-except
      result["error"] = e

  thread = threading.Thread(target=run_old)
  thread.start()
  assert embedding.wait(30)
  new_lease = lease.acquire(tmp_path, "index_builder", force=True)
  taken.set()
  thread.join(30)
  try:
    assert isinstance(result.get("error"), lease.LeaseLostError), result
    root = tmp_path / "index"
    assert index_format.list_versions(root) == [] and index_format.latest_step(root) is None
    assert lease.lease_path(tmp_path, "index_builder").exists()  # the new holder's, kept
  finally:
    new_lease.release()


# ---- Never silent; stops when the trainer's last checkpoint is indexed -------------------


def test_wrong_workdir_says_what_it_waits_for_every_period(tmp_path, caplog):
  caplog.set_level("INFO")
  assert _builder(tmp_path).run(poll_seconds=0.02, idle_timeout=0.5, wait_log_seconds=0.1) == []
  waits = _messages(caplog, "waiting (")
  assert 2 <= len(waits) <= 8, waits  # at the start, then every period, not every poll
  assert str(tmp_path / "checkpoints") in waits[0] and "no config.json" in waits[0]


def test_waiting_for_a_newer_checkpoint_names_both_steps(tmp_path, caplog):
  caplog.set_level("INFO")
  _checkpoints(tmp_path, 0)
  assert _builder(tmp_path).run(poll_seconds=0.02, idle_timeout=0.3,
                                wait_log_seconds=10.0) == [0]
  waits = _messages(caplog, "waiting (")
  assert len(waits) == 1, waits  # once when the wait starts (the period is longer)
  assert "newest checkpoint 0" in waits[0] and "last index version 0" in waits[0]
  assert ">= 3" in waits[0]


def test_exits_once_the_final_checkpoint_is_indexed(tmp_path, caplog):
  """num_steps 6, refresh_every 3: versions 0, 3, then the final 6 (and no idle timeout)."""
  caplog.set_level("INFO")
  _checkpoints(tmp_path, 0)
  builder = _builder(tmp_path)
  seen = []

  def next_checkpoint(build):  # the trainer saves the next checkpoint during each build
    seen.append(build["step"])
    _checkpoints(tmp_path, build["step"] + 3)

  builder.before_shard = next_checkpoint
  done = threading.Event()
  thread = threading.Thread(target=lambda: (builder.run(poll_seconds=0.01), done.set()))
  thread.daemon = True
  thread.start()
  assert done.wait(20), "the builder did not stop after the final checkpoint"
  assert seen == [0, 3, 6] and index_format.latest_step(tmp_path / "index") == 6
  assert _messages(caplog, "final checkpoint 6 is indexed")
  # A restart on a finished workdir returns at once (not after the idle timeout).
  start = time.time()
  assert _builder(tmp_path).run(poll_seconds=0.01, idle_timeout=10) == []
  assert time.time() - start < 5


def test_final_checkpoint_is_built_even_if_less_than_refresh_every_newer(tmp_path):
  config = tiny_config()
  config.train.num_steps = 5  # checkpoints 0, 3 and the final 5
  _checkpoints(tmp_path, 0, 3)
  _publish(tmp_path, 3)
  _checkpoints(tmp_path, 5)
  builder = _FakeBuilder(config, tmp_path, devices=jax.local_devices()[:1])
  assert builder.run(poll_seconds=0.01, idle_timeout=10) == [5]


def test_max_builds_stops_the_builder(tmp_path):
  config = tiny_config()
  config.objective = "ict"  # no final step to stop at
  _checkpoints(tmp_path, 0)
  builder = _FakeBuilder(config, tmp_path, devices=jax.local_devices()[:1])
  assert builder.final_step is None
  assert builder.run(poll_seconds=0.01, max_builds=1, idle_timeout=10) == [0]


def test_each_build_logs_one_summary_line(tmp_path, caplog):
  caplog.set_level("INFO")
  _checkpoints(tmp_path, 0)
  _builder(tmp_path).run(poll_seconds=0.01, max_builds=1, idle_timeout=10)
  summaries = _messages(caplog, "index_builder: published step 0")
  assert len(summaries) == 1 and "20 docs" in summaries[0] and "docs/s" in summaries[0]


# ---- Progress of the corpus embedding (builder and in-process refresh) -------------------


def _tiny_corpus(num_docs=50, length=4):
  tokens = np.arange((num_docs + 1) * length, dtype=np.int32).reshape(num_docs + 1, length)
  return types.SimpleNamespace(num_docs=num_docs, null_id=num_docs, retriever_tokens=tokens,
                               retriever_segments=np.zeros_like(tokens))


def _embed_docs(params, tokens, segments):
  del params
  return jax.numpy.stack([tokens.sum(-1), segments.sum(-1)], axis=-1).astype(np.float32)


def test_embedding_the_corpus_shows_progress(caplog):
  caplog.set_level("INFO", logger="realm_jax.progress")
  mesh = partitioning.make_mesh([("data", -1)])
  corpus = _tiny_corpus()
  rows = np.arange(10, 50)
  emb = index_builder.embed_rows(None, corpus, _embed_docs, mesh, 16, rows,
                                 progress_name="embed step 3", progress_seconds=1e-9)
  np.testing.assert_array_equal(emb[:, 0], corpus.retriever_tokens[rows].sum(-1))
  lines = _messages(caplog, "[embed step 3]")
  assert len(lines) == 3 and "40/40 blocks" in lines[-1] and "blocks/s" in lines[0]
  assert "ETA" in lines[0]
  caplog.clear()
  emb = in_process.embed_corpus(None, corpus, _embed_docs, mesh, 16,
                                progress_name="index refresh @5", progress_seconds=1e-9)
  assert emb.shape == (50, 2)
  lines = _messages(caplog, "[index refresh @5]")
  assert len(lines) == 4 and "50/50 blocks" in lines[-1]


def test_watcher_and_builder_agree_on_the_fallback(tmp_path):
  """After the builder repaired LATEST, a restarted trainer's watcher loads the valid version."""
  _checkpoints(tmp_path, 0, 3)
  _publish(tmp_path, 0)
  _publish(tmp_path, 3, bad=True)
  builder = _builder(tmp_path)
  builder._ensure_model(0, 0)  # pylint: disable=protected-access
  builder.resume_point()
  watcher = watcher_lib.IndexWatcher(tmp_path / "index", tiny_config().model.embed_dim, DOCS)
  watcher._poll_once()  # pylint: disable=protected-access
  assert watcher.take_new()[0] == 0


def test_waiting_for_the_corpus_says_so(tmp_path, caplog):
  """The real builder on an empty workdir: no corpus, no config.json (a wrong --workdir)."""
  caplog.set_level("INFO")
  builder = index_builder.IndexBuilder(tiny_config(), tmp_path, devices=jax.local_devices()[:1])
  with pytest.raises(FileNotFoundError, match="corpus"):
    builder.run(poll_seconds=0.02, idle_timeout=0.35, wait_log_seconds=0.1)
  waits = _messages(caplog, "waiting (")
  assert 2 <= len(waits) <= 6, waits
  assert "corpus" in waits[0] and "no config.json" in waits[0]
  assert not lease.lease_path(tmp_path, "index_builder").exists()  # released on the way out
