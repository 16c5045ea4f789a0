"""The trainer under faults: SIGKILL and Ctrl-C mid-run (real subprocesses), an exception or a
full disk inside the loop, a second trainer on the same workdir, a lease taken over mid-run.

Each fault is checked by what a person relies on afterwards: every train step logged exactly
once, a checkpoint of the interrupted step, the first error propagated, the lease released,
the first trainer's files untouched.
"""

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from realm_jax import lease as lease_lib
from realm_jax.data import prepare
from realm_jax.train import checkpointing
from realm_jax.train import loop
from realm_jax.train import metrics as metrics_lib
from realm_jax.train import state as state_lib
from tiny_configs import tiny_config  # pylint: disable=g-bad-import-order

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_DIR = os.path.dirname(TESTS_DIR)
CHAIN_STEPS = 40

_CHILD = """
import json, logging, signal, sys
# A foreground job's Ctrl-C: a shell starting the suite in the background (`make test &` without
# job control) makes SIGINT ignored, and children inherit that.
signal.signal(signal.SIGINT, signal.default_int_handler)
sys.path.insert(0, {tests_dir!r})
logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                    format="%(levelname)s %(name)s] %(message)s")
for noisy in ("absl", "jax._src", "orbax", "etils"):
  logging.getLogger(noisy).setLevel(logging.WARNING)
from tiny_configs import tiny_config
from realm_jax.train import loop
config = tiny_config({corpus_dir!r})
for key, value in json.loads({overrides!r}).items():
  section, field = key.split(".")
  config[section][field] = value
loop.train_and_evaluate(config, {workdir!r})
"""


def chain_overrides():
  return {"train.num_steps": CHAIN_STEPS, "train.checkpoint_every": 20,
          "retrieval.refresh_every": 20, "retrieval.prefetch": False, "train.log_every": 5}


def configured(corpus_dir, overrides):
  config = tiny_config(corpus_dir)
  for key, value in overrides.items():
    section, field = key.split(".")
    config[section][field] = value
  return config


def train_records(workdir, phase="realm"):
  records, torn = metrics_lib.read_metrics_counted(workdir / "metrics" / "metrics.jsonl")
  return [r for r in records if r["phase"] == phase], torn


def start_child(workdir, corpus_dir, overrides, log_path):
  script = _CHILD.format(tests_dir=TESTS_DIR, corpus_dir=str(corpus_dir),
                         overrides=json.dumps(overrides), workdir=str(workdir))
  with open(log_path, "w") as log:  # a file, not a pipe: a full pipe would block the child
    return subprocess.Popen([sys.executable, "-c", script], stdout=log,
                            stderr=subprocess.STDOUT, cwd=REPO_DIR, env=dict(os.environ))


def wait_for_step(proc, workdir, step, timeout=300.0):
  """Polls metrics.jsonl until a train record of `step` (or later) is there."""
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    assert proc.poll() is None, f"child exited early with {proc.returncode}"
    records, _ = train_records(workdir)
    if records and max(r["step"] for r in records) >= step:
      return
    time.sleep(0.02)
  raise AssertionError(f"no step {step} within {timeout}s")


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
  directory = tmp_path_factory.mktemp("data") / "corpus"
  prepare.prepare_data(tiny_config(directory), None)
  return directory


# ---- SIGKILL, then Ctrl-C, then a finishing run: every step once ---------------------------


def test_sigkill_then_sigint_then_resume_logs_every_step_once(corpus_dir, tmp_path, caplog):
  workdir = tmp_path / "run"
  overrides = chain_overrides()

  # 1. SIGKILL a few steps in (after the step-0 checkpoint, before the one at 20).
  killed = start_child(workdir, corpus_dir, overrides, tmp_path / "killed.log")
  wait_for_step(killed, workdir, 4)
  killed.send_signal(signal.SIGKILL)
  killed.wait(60)
  before, torn = train_records(workdir)
  assert torn == 0, "records are whole lines, even under SIGKILL"
  steps_before = [r["step"] for r in before]
  assert steps_before == list(range(1, len(steps_before) + 1)) and len(steps_before) >= 4, (
      "every step written before the kill is on disk")

  # 2. Resume in a second child, Ctrl-C it mid-run: it saves the step it reached.
  interrupted = start_child(workdir, corpus_dir, overrides, tmp_path / "interrupted.log")
  # Past the killed run's own records (it may have left 8 or more): the Ctrl-C must reach the
  # resumed loop, not a child still starting up.
  wait_for_step(interrupted, workdir, max(8, steps_before[-1] + 2))
  interrupted.send_signal(signal.SIGINT)
  returncode = interrupted.wait(120)
  log = (tmp_path / "interrupted.log").read_text()
  assert returncode != 0, log[-3000:]
  assert "state: resumed from step 0" in log
  saved = re.findall(r"interrupted at step (\d+): checkpoint saved to (\S+)", log)
  assert len(saved) == 1, log[-3000:]
  interrupted_at = int(saved[0][0])
  assert 8 <= interrupted_at < CHAIN_STEPS
  assert saved[0][1].endswith(f"checkpoints/{interrupted_at}")
  assert log.rstrip().splitlines()[-1] == "KeyboardInterrupt", "re-raised after the save"
  assert checkpointing.Checkpointer(workdir / "checkpoints").latest_step() == interrupted_at
  assert not (workdir / ".lease-trainer.json").exists(), "released on the way out"

  # 3. Finish in this process: it continues from the interrupted step.
  caplog.set_level(logging.INFO)
  result = loop.train_and_evaluate(configured(corpus_dir, overrides), workdir)
  assert result["history"][0]["step"] == interrupted_at + 1
  assert result["step"] == CHAIN_STEPS
  records, torn = train_records(workdir)
  assert torn == 0
  assert [r["step"] for r in records] == list(range(1, CHAIN_STEPS + 1)), "each step once"

  # Metrics a person plots: the learning rate applied, wall time across the three runs.
  schedule = state_lib.learning_rate_schedule(configured(corpus_dir, overrides))
  np.testing.assert_allclose([r["learning_rate"] for r in records],
                             [float(schedule(r["step"] - 1)) for r in records], rtol=1e-6)
  wall = [r["wall_seconds"] for r in records]
  assert all(w > 0 for w in wall) and all(b >= a for a, b in zip(wall, wall[1:])), wall
  assert all(abs(r["timestamp"] - time.time()) < 3600 for r in records)
  all_records, _ = metrics_lib.read_metrics_counted(workdir / "metrics" / "metrics.jsonl")
  assert len([r for r in all_records if r["phase"] == "config"]) == 1
  assert (workdir / "metrics" / "hparams.json").exists()
  index_steps = [r["step"] for r in all_records if r["phase"] == "index"]
  assert len(index_steps) == len(set(index_steps)), index_steps
  assert [r["step"] for r in all_records if r["phase"] == "eval"] == [CHAIN_STEPS]

  # Progress lines: training steps and the evaluation's queries.
  messages = [r.getMessage() for r in caplog.records if r.name == "realm_jax.progress"]
  assert any(m.startswith(f"[realm] {CHAIN_STEPS}/{CHAIN_STEPS} steps") for m in messages)
  assert any(re.match(r"\[eval\] (\d+)/\1 queries", m) for m in messages), messages


# ---- Exceptions and full disks inside the loop ---------------------------------------------


def _raise_on_call(monkeypatch, call_number, error):
  """Makes the loop's `call_number`-th batch assembly (step index call_number - 1) raise."""
  real, calls = loop._realm_device_batch, []  # pylint: disable=protected-access

  def patched(*args, **kwargs):
    calls.append(1)
    if len(calls) == call_number:
      raise error
    return real(*args, **kwargs)
  monkeypatch.setattr(loop, "_realm_device_batch", patched)


def test_error_in_the_loop_propagates_first_and_teardown_runs(corpus_dir, tmp_path,
                                                              monkeypatch, caplog):
  workdir = tmp_path / "run"
  config = configured(corpus_dir, {"retrieval.prefetch": False})
  _raise_on_call(monkeypatch, 5, RuntimeError("boom in step 5"))
  real_close = metrics_lib.MetricWriter.close

  def failing_close(self):  # a teardown step that fails too must not hide the first error
    real_close(self)
    raise OSError("metrics disk gone")
  monkeypatch.setattr(metrics_lib.MetricWriter, "close", failing_close)
  caplog.set_level(logging.INFO)
  with pytest.raises(RuntimeError, match="boom in step 5"):
    loop.train_and_evaluate(config, workdir)
  assert any("teardown: metrics close failed after the run stopped on RuntimeError: "
             "OSError: metrics disk gone" in r.getMessage() for r in caplog.records)
  # The checkpoint saved at step 3 is complete; no orphaned temporary folder.
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["0", "3"]
  _, step = checkpointing.restore_params(workdir)
  assert step == 3
  assert not (workdir / ".lease-trainer.json").exists()
  records, torn = train_records(workdir)
  assert [r["step"] for r in records] == [1, 2, 3, 4] and torn == 0


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_full_metrics_disk_stops_the_trainer_with_the_disk_error(corpus_dir, tmp_path,
                                                                 monkeypatch):
  from tensorboardX import record_writer  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(record_writer, "open", lambda path, mode: open("/dev/full", mode),
                      raising=False)
  workdir = tmp_path / "run"
  outcome = {}

  def run():
    try:
      loop.train_and_evaluate(configured(corpus_dir, {}), workdir)
    except BaseException as e:  # pylint: disable=broad-except
      outcome["error"] = e
  thread = threading.Thread(target=run, daemon=True)
  thread.start()
  thread.join(240)
  assert not thread.is_alive(), "a full metrics disk must not hang the trainer"
  error = outcome.get("error")
  assert isinstance(error, metrics_lib.MetricsWriteError), repr(error)
  assert "No space left on device" in str(error) and "tensorboard" in str(error)
  assert not (workdir / ".lease-trainer.json").exists()


# ---- One trainer per workdir ----------------------------------------------------------------


def _snapshot(workdir):
  files = {}
  for path in sorted(workdir.rglob("*")):
    if path.is_file() and ".lease-" not in path.name:
      stat = path.stat()
      files[str(path.relative_to(workdir))] = (stat.st_size, stat.st_mtime_ns)
  return files


def test_second_trainer_is_refused_and_a_lost_lease_stops_before_saving(corpus_dir, tmp_path,
                                                                        monkeypatch):
  workdir = tmp_path / "run"
  config = configured(corpus_dir, {"retrieval.prefetch": False})
  loop.train_and_evaluate(config, workdir, max_steps_this_run=3)
  assert not (workdir / ".lease-trainer.json").exists()

  # A live first trainer (this process holds its lease): a second one is refused, naming it.
  first = lease_lib.acquire(workdir, "trainer", settle_seconds=0.0)
  before = _snapshot(workdir)
  with pytest.raises(lease_lib.LeaseHeldError) as refused:
    loop.train_and_evaluate(config, workdir)
  message = str(refused.value)
  assert socket.gethostname() in message and f"pid {os.getpid()}" in message
  assert "--force" in message
  assert _snapshot(workdir) == before, "the refused trainer touched the first one's files"
  first.check()  # still the holder

  # --force takes it over; then someone takes it from *it* mid-run: it stops at its next
  # lease check (every LEASE_CHECK_SECONDS, before each record; here every step) without
  # saving or writing another record. The takeover comes while step 5's batch is prepared;
  # step 4's record, fetched one step late (train.metrics_lag), is refused too.
  monkeypatch.setattr(loop, "LEASE_CHECK_SECONDS", 0.0)
  takers = []

  def take_over():
    takers.append(lease_lib.acquire(workdir, "trainer", force=True, settle_seconds=0.0))
  real, calls = loop._realm_device_batch, []  # pylint: disable=protected-access

  def patched(*args, **kwargs):
    calls.append(1)
    if len(calls) == 2:  # step index 4
      take_over()
    return real(*args, **kwargs)
  monkeypatch.setattr(loop, "_realm_device_batch", patched)
  with pytest.raises(lease_lib.LeaseLostError, match="taken over"):
    loop.train_and_evaluate(config, workdir, force_lease=True)
  with pytest.raises(lease_lib.LeaseLostError):
    first.check()
  assert checkpointing.Checkpointer(workdir / "checkpoints").latest_step() == 3
  records, _ = train_records(workdir)
  assert [r["step"] for r in records] == [1, 2, 3], "no record after the takeover"
  assert lease_lib.lease_path(workdir, "trainer").exists(), "the new holder's lease stays"
  for held in [first] + takers:
    held.release()


def test_ctrl_c_during_the_donating_step_call_is_raised_after_it():
  """The step donates the old state: a Ctrl-C that lands inside the call must wait until the
  new state is assigned (otherwise there is no state left to save)."""
  previous = signal.getsignal(signal.SIGINT)
  done = []
  with pytest.raises(KeyboardInterrupt):
    with loop._sigint_deferred():  # pylint: disable=protected-access
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(0.05)  # delivered now: the handler must only note it
      done.append("state assigned")
  assert done == ["state assigned"]
  assert signal.getsignal(signal.SIGINT) is previous
  with loop._sigint_deferred():  # pylint: disable=protected-access
    pass  # no interrupt: nothing raised


# ---- A diverging run stops at the first non-finite loss, unsaved -------------------------


# (5, 3, 6): step 6 was dispatched before step 5's lagged check; (3, 0, 3): step 3 is a
# checkpoint step, checked before its save and before step 4 starts.
@pytest.mark.parametrize("bad_step,last_checkpoint,steps_run", [(5, 3, 6), (3, 0, 3)])
def test_nonfinite_loss_stops_the_run_without_checkpointing_that_state(
    corpus_dir, tmp_path, monkeypatch, bad_step, last_checkpoint, steps_run):
  """Step `bad_step`'s loss comes back NaN (the real step, its loss replaced) while metrics are
  fetched one step late (train.metrics_lag): the loop raises naming that step, not the next
  one already dispatched, and the last good checkpoint; it saves nothing after it (step 3 is a
  checkpoint and refresh step: the lagged check runs before the save), releases the lease, and
  the bad step's record is the last line of metrics.jsonl."""
  from realm_jax.train import steps as steps_lib  # pylint: disable=g-import-not-at-top
  workdir = tmp_path / "run"
  config = configured(corpus_dir, {"retrieval.prefetch": False, "train.metrics_lag": True})
  real_make = steps_lib.make_realm_train_step
  calls = []

  def make_poisoned(*args, **kwargs):
    step_fn = real_make(*args, **kwargs)

    def poisoned(state, batch):
      calls.append(1)
      state, metrics = step_fn(state, batch)
      if len(calls) == bad_step:
        metrics = dict(metrics, loss=metrics["loss"] * float("nan"))
      return state, metrics
    poisoned.lower = getattr(step_fn, "lower", None)  # compile_report uses it
    return poisoned
  monkeypatch.setattr(steps_lib, "make_realm_train_step", make_poisoned)
  with pytest.raises(metrics_lib.NonFiniteMetrics,
                     match=rf"realm: step {bad_step} has non-finite loss=nan; "
                           rf".*last checkpoint is step {last_checkpoint}"):
    loop.train_and_evaluate(config, workdir)
  assert len(calls) == steps_run
  assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()) == sorted(
      {0, last_checkpoint})
  records, _ = train_records(workdir)
  assert [r["step"] for r in records] == list(range(1, bad_step + 1))
  assert np.isnan(records[-1]["loss"])
  assert all(np.isfinite(r["loss"]) for r in records[:-1])
  assert not (workdir / ".lease-trainer.json").exists()  # released: the run can resume


def test_nonfinite_names_the_values_and_passes_finite_ones():
  assert metrics_lib.nonfinite({"loss": 1.0, "grad_norm": 2.0, "other": float("nan")}) == {}
  bad = metrics_lib.nonfinite({"loss": 1.0, "grad_norm": float("inf")})
  assert bad == {"grad_norm": float("inf")}
  with pytest.raises(metrics_lib.NonFiniteMetrics, match=r"x: step 5 has non-finite "
                     r"grad_norm=inf; .*no checkpoint was saved"):
    raise metrics_lib.nonfinite_error(bad, 5, [], "x")
