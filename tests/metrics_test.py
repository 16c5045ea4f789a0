"""Metrics that survive crashes and full disks, hparams, the learning-rate schedule, and the
loop's teardown (realm_jax/train/metrics.py, teardown.py, state.learning_rate_schedule).
Fast: no training."""

import errno
import json
import logging
import os
import struct
import threading
import time

import numpy as np
import pytest

from realm_jax.train import metrics as metrics_lib
from realm_jax.train import state as state_lib
from realm_jax.train import teardown as teardown_lib
from tiny_configs import tiny_config  # pylint: disable=g-bad-import-order


def read_events(directory):
  """Every Event of the tfevents files under `directory` (TFRecord framing, no TensorFlow)."""
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  events = []
  for path in sorted(directory.glob("events.out.tfevents.*")):
    data, pos = path.read_bytes(), 0
    while pos + 12 <= len(data):
      (length,) = struct.unpack("Q", data[pos:pos + 8])
      events.append(event_pb2.Event.FromString(data[pos + 12:pos + 12 + length]))
      pos += 12 + length + 4
  return events


def in_thread(fn, timeout=30.0):
  """Runs fn() in a thread: (finished in time, its exception or None)."""
  outcome = {}

  def target():
    try:
      fn()
    except BaseException as e:  # pylint: disable=broad-except
      outcome["error"] = e
  thread = threading.Thread(target=target, daemon=True)
  thread.start()
  thread.join(timeout)
  return not thread.is_alive(), outcome.get("error")


# ---- Records on disk at once, whole lines, truncation on resume ---------------------------


def test_each_record_is_on_disk_as_a_complete_line_before_any_flush(tmp_path):
  writer = metrics_lib.MetricWriter(tmp_path, keep_through_step=0, flush_every_seconds=0)
  for step in range(1, 4):
    writer.write(step, {"loss": 1.0 / step})
    # A SIGKILL now would keep everything written so far: the bytes are in the file already.
    text = (tmp_path / "metrics.jsonl").read_text()
    assert text.endswith("\n")
    records = [json.loads(line) for line in text.splitlines()]
    assert [r["step"] for r in records if r["phase"] == "train"] == list(range(1, step + 1))
  writer.close()


def test_torn_last_line_is_skipped_and_counted(tmp_path, caplog):
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 1, "phase": "realm", "loss": 1.0}\n'
                  '{"step": 2, "phase": "realm", "loss": 0.5}\n{"step": 3, "pha')
  records, torn = metrics_lib.read_metrics_counted(path)
  assert [r["step"] for r in records] == [1, 2] and torn == 1
  with caplog.at_level(logging.WARNING):
    assert len(metrics_lib.read_metrics(path)) == 2
  assert "1 torn line" in caplog.text
  assert metrics_lib.read_metrics_counted(tmp_path / "missing.jsonl") == ([], 0)


def test_resume_drops_records_past_the_restored_step_in_every_phase(tmp_path):
  path = tmp_path / "metrics.jsonl"
  lines = [{"step": 0, "phase": "config", "config": {"a": 1}}]
  lines += [{"step": s, "phase": "realm", "loss": 1.0} for s in range(1, 6)]
  lines += [{"step": 3, "phase": "index", "r": 0.5}, {"step": 5, "phase": "eval", "x": 1.0},
            {"step": 6, "phase": "index", "r": 0.6}]
  path.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 6, "ph')
  writer = metrics_lib.MetricWriter(tmp_path, phase="realm", keep_through_step=3)
  assert writer.dropped == 4
  assert writer.has_record("config") and writer.has_record("index", 3)
  assert not writer.has_record("index", 6)
  for step in (4, 5):  # the replayed steps, logged again
    writer.write(step, {"loss": 2.0})
  writer.close()
  records, torn = metrics_lib.read_metrics_counted(path)
  assert torn == 0
  assert [r["step"] for r in records if r["phase"] == "realm"] == [1, 2, 3, 4, 5]
  assert [r["loss"] for r in records if r["phase"] == "realm"][3:] == [2.0, 2.0]
  assert [r["step"] for r in records if r["phase"] == "index"] == [3]
  assert not [r for r in records if r["phase"] == "eval"]
  assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl", "tensorboard"], (
      "the rewrite leaves no temporary file")
  # TensorBoard: the resumed writer starts with a purge marker at the first replayed step.
  starts = [e.step for e in read_events(tmp_path / "tensorboard") if e.HasField("session_log")]
  assert 4 in starts


def test_writer_flushes_periodically(tmp_path, monkeypatch):
  writer = metrics_lib.MetricWriter(tmp_path, keep_through_step=0, flush_every_seconds=0.05)
  flushes = []
  real_flush = writer.flush
  monkeypatch.setattr(writer, "flush", lambda: (flushes.append(1), real_flush()))
  writer.write(1, {"loss": 1.0})
  time.sleep(0.1)
  writer.write(2, {"loss": 1.0})
  assert flushes
  writer.close()


# ---- A full disk: an error at once, never a hang ------------------------------------------


def _tensorboard_on_a_full_disk(monkeypatch):
  """Every events file opens onto /dev/full: its writes fail with ENOSPC once flushed."""
  from tensorboardX import record_writer  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(record_writer, "open", lambda path, mode: open("/dev/full", mode),
                      raising=False)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_full_tensorboard_disk_raises_instead_of_hanging(tmp_path, monkeypatch):
  _tensorboard_on_a_full_disk(monkeypatch)
  writer = metrics_lib.MetricWriter(tmp_path, keep_through_step=0, flush_every_seconds=0)
  errors = []

  def write_many():
    try:
      for step in range(1, 2001):  # > the 8 KiB buffer, > tensorboardX's queue of 10
        writer.write(step, {f"m{i}": float(i) for i in range(10)})
      writer.flush()
    except metrics_lib.MetricsWriteError as e:
      errors.append(e)
    writer.close()  # closing a broken writer neither hangs nor raises

  finished, error = in_thread(write_many)
  assert finished, "a full disk must not hang the writer"
  assert error is None, error
  assert errors and errors[0].errno == errno.ENOSPC
  assert "cannot write metrics to" in str(errors[0])


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_full_jsonl_disk_raises_at_the_first_record(tmp_path):
  writer = metrics_lib.MetricWriter(tmp_path, keep_through_step=None, flush_every_seconds=0)
  writer._jsonl.close()  # pylint: disable=protected-access
  writer._jsonl = metrics_lib._JsonlFile(  # pylint: disable=protected-access
      metrics_lib.epath.Path("/dev/full"))
  with pytest.raises(metrics_lib.MetricsWriteError, match="No space left"):
    writer.write(1, {"loss": 1.0})
  with pytest.raises(metrics_lib.MetricsWriteError):  # nothing is appended after a failure
    writer.write(2, {"loss": 1.0})
  finished, error = in_thread(writer.close)
  assert finished and error is None


# ---- hparams --------------------------------------------------------------------------------


def test_hparams_written_as_json_jsonl_and_tensorboard(tmp_path):
  config = tiny_config("/corpus")
  writer = metrics_lib.MetricWriter(tmp_path, keep_through_step=0)
  flat = writer.write_hparams(config, 0, ["eval/span_accuracy"])
  writer.close()
  assert flat["train.batch_size"] == 8 and flat["data.corpus_dir"] == "/corpus"
  saved = json.loads((tmp_path / "hparams.json").read_text())
  assert saved == json.loads(json.dumps(flat))
  records = metrics_lib.read_metrics(tmp_path / "metrics.jsonl")
  assert [r["phase"] for r in records] == ["config"]
  assert records[0]["config"]["train.learning_rate"] == config.train.learning_rate
  from tensorboardX.proto import plugin_hparams_pb2  # pylint: disable=g-import-not-at-top
  tags = {v.tag: v for e in read_events(tmp_path / "tensorboard") for v in e.summary.value}
  assert {"_hparams_/experiment", "_hparams_/session_start_info"} <= set(tags)
  start = plugin_hparams_pb2.HParamsPluginData.FromString(
      tags["_hparams_/session_start_info"].metadata.plugin_data.content).session_start_info
  assert start.hparams["train.batch_size"].number_value == 8
  assert start.hparams["objective"].string_value == "realm"
  # A resumed writer sees the config record and need not write it again.
  assert metrics_lib.MetricWriter(tmp_path, keep_through_step=0).has_record("config")


def test_flatten_config_keeps_scalars_and_stringifies_the_rest():
  flat = metrics_lib.flatten_config({"a": {"b": 1, "c": [1, 2]}, "d": None, "e": (("x", -1),)})
  assert flat == {"a.b": 1, "a.c": "[1, 2]", "d": None, "e": '[["x", -1]]'}


# ---- The learning rate the metrics report is the one the optimizer applies ----------------


@pytest.mark.parametrize("objective", ["realm", "ict"])
def test_learning_rate_schedule_is_the_optimizers(objective):
  config = tiny_config()
  config.objective = objective
  config.train.weight_decay = 0.0
  config.train.warmup_steps = 2
  schedule = state_lib.learning_rate_schedule(config)
  peak = config.ict.learning_rate if objective == "ict" else config.train.learning_rate
  key = "embedder" if objective == "ict" else "encoder"
  params = {key: {"bias": np.ones(3, np.float32)}}
  tx = state_lib.optimizer_for(config)
  opt_state = tx.init(params)
  grads = {key: {"bias": np.full(3, 0.1, np.float32)}}
  for step in range(4):
    updates, opt_state = tx.update(grads, opt_state, params)
    # Adam's first moves are ~lr * sign(grad): the applied rate is the schedule at the step.
    np.testing.assert_allclose(-np.asarray(updates[key]["bias"]), float(schedule(step)),
                               rtol=1e-3, atol=1e-9)
  assert float(schedule(0)) == 0.0
  if objective == "realm":
    np.testing.assert_allclose(float(schedule(2)), peak, rtol=1e-6)
    assert float(schedule(config.train.num_steps)) == 0.0


# ---- Teardown ---------------------------------------------------------------------------------


def test_teardown_runs_every_step_and_the_bodys_error_wins(caplog):
  ran = []

  def failing():
    ran.append("failing")
    raise OSError("disk gone")
  with caplog.at_level(logging.ERROR):
    with pytest.raises(RuntimeError, match="boom"):
      with teardown_lib.Teardown() as teardown:
        teardown.add("first", lambda: ran.append("first"))
        teardown.add("failing", failing)
        teardown.add("last", lambda: ran.append("last"))
        raise RuntimeError("boom")
  assert ran == ["last", "failing", "first"]
  lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
  assert lines == ["teardown: failing failed after the run stopped on RuntimeError: "
                   "OSError: disk gone"]


def test_teardown_error_raised_when_the_body_succeeded():
  with pytest.raises(OSError, match="disk gone"):
    with teardown_lib.Teardown() as teardown:
      teardown.add("failing", lambda: (_ for _ in ()).throw(OSError("disk gone")))


def test_teardown_step_that_hangs_is_abandoned_after_its_timeout():
  release = threading.Event()
  start = time.monotonic()
  with pytest.raises(RuntimeError, match="boom"):
    with teardown_lib.Teardown() as teardown:
      teardown.add("stuck", release.wait, timeout=0.2)
      raise RuntimeError("boom")
  assert time.monotonic() - start < 5
  assert isinstance(teardown.failures[0][1], TimeoutError)
  release.set()


def test_tensorboard_tags_are_legal_and_jsonl_keeps_the_names(tmp_path, caplog):
  """recall@5 becomes recall_at_5 in TensorBoard (no per-write warning from tensorboardX);
  metrics.jsonl keeps recall@5."""
  writer = metrics_lib.MetricWriter(tmp_path, keep_through_step=0, phase="qa_eval")
  with caplog.at_level(logging.INFO):
    writer.write(3, {"dev_recall@5": 0.25, "em (dev)": 0.5})
  writer.close()
  assert not [r for r in caplog.records if "illegal" in r.getMessage()]
  tags = {v.tag: v.simple_value for e in read_events(tmp_path / "tensorboard")
          for v in e.summary.value}
  assert tags["qa_eval/dev_recall_at_5"] == 0.25 and tags["qa_eval/em__dev_"] == 0.5
  record = metrics_lib.read_metrics(tmp_path / "metrics.jsonl")[-1]
  assert record["dev_recall@5"] == 0.25 and record["step"] == 3
