"""Preemption (SIGTERM) with real signals on real processes: the trainer through the CLI, the
stop agreement across 2 jax.distributed processes, the index builder through the CLI, the ICT
loop and the QA fine-tune loop in this process.

What a person relies on after a preemption: exit 0, a checkpoint at the step the log names,
every step in metrics.jsonl once, a resumed run that continues with the losses of a run that
was never interrupted, and an index whose LATEST names a complete version.
"""

import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from realm_jax import lease as lease_lib
from realm_jax.data import pipeline
from realm_jax.data import prepare
from realm_jax.qa import finetune
from realm_jax.retrieval import index_format
from realm_jax.train import checkpointing
from realm_jax.train import loop
from realm_jax.train import metrics as metrics_lib
from realm_jax.train import preemption
from tiny_configs import tiny_config  # pylint: disable=g-bad-import-order

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_DIR = os.path.dirname(TESTS_DIR)
NUM_STEPS = 12  # steps the tests train; the schedule runs to SCHEDULE_STEPS (no final eval)
SCHEDULE_STEPS = 100
# Resumed vs uninterrupted losses: same executables on the same 8 CPU devices, state restored
# exactly from float32 checkpoints, so they agree to float32 rounding (the test prints the
# largest difference seen).
LOSS_RTOL, LOSS_ATOL = 1e-5, 1e-6

OVERRIDES = {"train.num_steps": SCHEDULE_STEPS, "train.checkpoint_every": NUM_STEPS,
             "model.num_layers": 1,
             "retrieval.refresh_every": 4, "retrieval.prefetch": False, "train.log_every": 4,
             "retrieval.embed_batch_size": 8, "retrieval.builder_poll_seconds": 0.2}

# A config file for `--config=`: tests/tiny_configs.py's config with OVERRIDES.
_CONFIG_FILE = """
import sys
sys.path.insert(0, {tests_dir!r})
from tiny_configs import tiny_config

def get_config():
  config = tiny_config({corpus_dir!r})
  for key, value in {overrides!r}.items():
    section, field = key.split(".")
    config[section][field] = value
  return config
"""

# The CLI in a child process; `slow` makes each REALM batch assembly (trainer) or each
# embedding batch (builder) take 0.3 s so the SIGTERM lands mid-run.
_CLI_CHILD = """
import sys, time
from absl import app
from realm_jax import main
from realm_jax.retrieval import index_builder
from realm_jax.train import loop

real_batch, real_embed = loop._realm_device_batch, index_builder.embed_rows

def slow_batch(*args, **kwargs):
  time.sleep(0.3)
  return real_batch(*args, **kwargs)

def slow_embed(*args, stop_requested=None, **kwargs):
  with open({marker!r}, "a") as f:
    f.write("embed\\n")
  def slow_stop():
    time.sleep(0.3)
    return stop_requested()
  return real_embed(*args, stop_requested=slow_stop, **kwargs)

loop._realm_device_batch = slow_batch
index_builder.embed_rows = slow_embed
sys.argv = ["realm_jax.main"] + {argv!r}
app.run(main.main)
"""


def configured(corpus_dir, overrides=None):
  config = tiny_config(corpus_dir)
  for key, value in (OVERRIDES if overrides is None else overrides).items():
    section, field = key.split(".")
    config[section][field] = value
  return config


def write_config_file(tmp_path, corpus_dir):
  path = tmp_path / "preempt_config.py"
  path.write_text(_CONFIG_FILE.format(tests_dir=TESTS_DIR, corpus_dir=str(corpus_dir),
                                      overrides=OVERRIDES))
  return path


def start_cli(tmp_path, name, argv):
  """`python -m realm_jax.main <argv>` (slowed, see _CLI_CHILD); its log is tmp_path/name.log."""
  script = _CLI_CHILD.format(marker=str(tmp_path / f"{name}.embeds"), argv=argv)
  with open(tmp_path / f"{name}.log", "w") as log:  # a file: a full pipe would block it
    return subprocess.Popen([sys.executable, "-c", script], stdout=log,
                            stderr=subprocess.STDOUT, cwd=REPO_DIR, env=dict(os.environ))


def train_records(workdir, phase="realm"):
  records, torn = metrics_lib.read_metrics_counted(workdir / "metrics" / "metrics.jsonl")
  assert torn == 0
  return [r for r in records if r["phase"] == phase]


def wait_until(condition, proc, what, timeout=300.0):
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    assert proc.poll() is None, f"child exited early with {proc.returncode} ({what})"
    if condition():
      return
    time.sleep(0.02)
  raise AssertionError(f"{what}: not within {timeout}s")


def preempted_lines(log):
  return re.findall(r"preempted at step (\d+) \((\w+)\): checkpoint saved to (\S+)", log)


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
  directory = tmp_path_factory.mktemp("data") / "corpus"
  prepare.prepare_data(tiny_config(directory), None)
  return directory


@pytest.fixture(scope="module")
def uninterrupted(corpus_dir, tmp_path_factory):
  """A 12-step REALM run never interrupted: (workdir, per-step losses)."""
  workdir = tmp_path_factory.mktemp("uninterrupted")
  loop.train_and_evaluate(configured(corpus_dir), workdir, max_steps_this_run=NUM_STEPS)
  losses = [r["loss"] for r in train_records(workdir)]
  assert len(losses) == NUM_STEPS
  return workdir, losses


# ---- The trainer: SIGTERM -> checkpoint, exit 0; the resume has the same losses -------------


def test_sigterm_saves_the_step_exits_0_and_the_resume_matches(corpus_dir, uninterrupted,
                                                               tmp_path):
  workdir = tmp_path / "run"
  config_file = write_config_file(tmp_path, corpus_dir)
  child = start_cli(tmp_path, "trainer", ["--mode=train", f"--config={config_file}",
                                          f"--workdir={workdir}"])
  wait_until(lambda: len(train_records(workdir)) >= 3, child, "step 3 recorded")
  child.send_signal(signal.SIGTERM)
  returncode = child.wait(120)
  log = (tmp_path / "trainer.log").read_text()
  assert returncode == 0, log[-3000:]
  saved = preempted_lines(log)
  assert len(saved) == 1, log[-3000:]
  stopped_at = int(saved[0][0])
  assert saved[0][1] == "SIGTERM" and saved[0][2].endswith(f"checkpoints/{stopped_at}")
  assert 3 <= stopped_at < NUM_STEPS, "stopped mid-run (each step takes >= 0.3 s)"
  assert checkpointing.Checkpointer(workdir / "checkpoints").latest_step() == stopped_at
  assert [r["step"] for r in train_records(workdir)] == list(range(1, stopped_at + 1))
  assert not (workdir / ".lease-trainer.json").exists(), "released on the way out"
  assert not [r for r in metrics_lib.read_metrics_counted(
      workdir / "metrics" / "metrics.jsonl")[0] if r["phase"] == "eval"], "no final eval"

  result = loop.train_and_evaluate(configured(corpus_dir), workdir,  # the same command again
                                   max_steps_this_run=NUM_STEPS - stopped_at)
  assert result["history"][0]["step"] == stopped_at + 1 and result["step"] == NUM_STEPS
  records = train_records(workdir)
  assert [r["step"] for r in records] == list(range(1, NUM_STEPS + 1)), "each step once"
  resumed = np.array([r["loss"] for r in records])
  print(f"resumed vs uninterrupted loss: max |diff| {np.abs(resumed - uninterrupted[1]).max():.3g}"
        f" over {NUM_STEPS} steps (preempted at step {stopped_at})")
  np.testing.assert_allclose(resumed, uninterrupted[1], rtol=LOSS_RTOL, atol=LOSS_ATOL)


# ---- Agreement: 2 jax.distributed processes stop before the same step ------------------------

_AGREE_CHILD = """
import json, logging, os, sys, time
logging.basicConfig(level=logging.INFO)
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.config.update("jax_enable_preemption_service", False)
pid = int(sys.argv[1])
jax.distributed.initialize("localhost:{port}", 2, pid)
from realm_jax.train import preemption
checks, seconds = 0, 0.0
with preemption.sigterm_handled() as stop:
  for step in range(20000):
    start = time.perf_counter()
    agreed = stop.agreed()  # one check per step boundary, as in the loops
    seconds += time.perf_counter() - start
    if agreed:
      break
    checks += 1
    if step % 10 == 0:
      print(f"step {{step}}", flush=True)
    time.sleep(0.005)
print(json.dumps(dict(process=pid, stop_step=step, requested=stop.requested,
                      ms_per_check=seconds / max(checks, 1) * 1e3)), flush=True)
jax.distributed.shutdown()
"""


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_two_processes_agree_on_the_stop_step(tmp_path):
  """SIGTERM to process 1 only: both processes stop before the same step."""
  script = _AGREE_CHILD.format(port=_free_port())
  logs = [tmp_path / f"p{i}.log" for i in range(2)]
  procs = []
  for i in range(2):
    with open(logs[i], "w") as log:
      procs.append(subprocess.Popen([sys.executable, "-c", script, str(i)], stdout=log,
                                    stderr=subprocess.STDOUT, cwd=REPO_DIR,
                                    env=dict(os.environ)))
  try:
    wait_until(lambda: "step 20\n" in logs[1].read_text(), procs[1], "process 1 at step 20",
               timeout=120)
    procs[1].send_signal(signal.SIGTERM)
    codes = [p.wait(60) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  texts = [log.read_text() for log in logs]
  assert codes == [0, 0], texts
  results = [json.loads(t.strip().splitlines()[-1]) for t in texts]
  assert results[0]["stop_step"] == results[1]["stop_step"] > 20, results
  assert [r["requested"] for r in results] == [False, True]
  assert "another process received a stop signal" in texts[0]
  print(f"agreement: {results[0]['ms_per_check']:.2f} ms per step boundary (2 processes, "
        "gloo)")


def test_handler_is_restored_and_only_installed_on_the_main_thread():
  previous = signal.getsignal(signal.SIGTERM)
  with preemption.sigterm_handled() as stop:
    assert signal.getsignal(signal.SIGTERM) is not previous
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.05)
    assert stop.requested and stop.agreed() and stop.signal_name == "SIGTERM"
  assert signal.getsignal(signal.SIGTERM) is previous
  seen = {}

  def in_thread():
    with preemption.sigterm_handled() as thread_stop:
      seen["handler"] = signal.getsignal(signal.SIGTERM)
      seen["stop"] = thread_stop.agreed()
  thread = threading.Thread(target=in_thread)
  thread.start()
  thread.join(10)
  assert seen == {"handler": previous, "stop": False}


# ---- The index builder: SIGTERM mid-build -> nothing half-published, LATEST valid ------------


def _copy_checkpoint(source, workdir, step):
  """Checkpoint `step` of `source` into workdir, appearing at once (copy, then rename)."""
  target = workdir / "checkpoints"
  target.mkdir(parents=True, exist_ok=True)
  shutil.copytree(source / "checkpoints" / str(step), target / f"copy-{step}")
  (target / f"copy-{step}").rename(target / str(step))


def test_builder_sigterm_abandons_the_build_and_keeps_latest_valid(corpus_dir, uninterrupted,
                                                                    tmp_path):
  source, _ = uninterrupted
  workdir = tmp_path / "builder_run"
  _copy_checkpoint(source, workdir, 0)
  config_file = write_config_file(tmp_path, corpus_dir)
  child = start_cli(tmp_path, "builder", ["--mode=index_builder", f"--config={config_file}",
                                          f"--workdir={workdir}"])
  root = workdir / "index"
  wait_until(lambda: index_format.latest_step(root) == 0, child, "version 0 published")
  _copy_checkpoint(source, workdir, NUM_STEPS)  # the trainer's final checkpoint appears
  embeds = tmp_path / "builder.embeds"
  wait_until(lambda: embeds.read_text().count("embed") >= 2, child, "building step 12")
  wait_until(lambda: index_format.tmp_dir(root, NUM_STEPS).exists(), child, "announced")
  time.sleep(0.5)  # some batches embedded
  child.send_signal(signal.SIGTERM)
  returncode = child.wait(60)
  log = (tmp_path / "builder.log").read_text()
  assert returncode == 0, log[-3000:]
  stops = re.findall(r"index_builder\[0\]: stopped by SIGTERM: (.*)", log)
  assert len(stops) == 1, log[-3000:]
  assert f"abandoned the build of step {NUM_STEPS}" in stops[0]
  assert "LATEST is version 0" in stops[0]
  assert index_format.list_versions(root) == [0], "no partial version"
  assert not [p.name for p in root.iterdir() if p.name.startswith(".")], "no tmp left"
  assert index_format.latest_step(root) == 0
  index_format.check_version(root, 0)
  assert not lease_lib.lease_path(workdir, "index_builder").exists(), "lease released"


def test_builder_waiting_for_the_corpus_stops_with_the_chosen_exit_code(tmp_path):
  """SIGTERM while the builder waits for a trainer's corpus; `--preempted_exit_code=42` (what
  a scheduler that restarts only failed jobs needs) is the exit status."""
  config_file = write_config_file(tmp_path, tmp_path / "no_corpus_yet")
  workdir = tmp_path / "empty"
  child = start_cli(tmp_path, "waiting", ["--mode=index_builder", f"--config={config_file}",
                                          f"--workdir={workdir}", "--preempted_exit_code=42"])
  log_path = tmp_path / "waiting.log"
  wait_until(lambda: "waiting (" in log_path.read_text(), child, "waiting for the corpus",
             timeout=120)
  child.send_signal(signal.SIGTERM)
  returncode = child.wait(60)
  log = log_path.read_text()
  assert returncode == 42, log[-3000:]
  assert re.search(r"stopped by SIGTERM: stopped while waiting for the trainer's corpus; "
                   r"lease released; LATEST is absent", log), log[-3000:]
  assert not lease_lib.lease_path(workdir, "index_builder").exists()


# ---- ICT (the same loop) and QA fine-tuning, SIGTERM to this process --------------------------


@pytest.fixture
def sigterm_guard():
  """A SIGTERM handler of the test's own while it runs (so a loop that installs none fails the
  test instead of killing pytest): -> the signals it caught. Restored afterwards."""
  caught = []
  previous = signal.signal(signal.SIGTERM, lambda signum, frame: caught.append(signum))
  yield caught
  signal.signal(signal.SIGTERM, previous)


def _sigterm_on_call(monkeypatch, owner, name, call_number):
  """Sends this process a real SIGTERM during the `call_number`-th call of owner.name."""
  real, calls = getattr(owner, name), []

  def patched(*args, **kwargs):
    calls.append(1)
    if len(calls) == call_number:
      os.kill(os.getpid(), signal.SIGTERM)
    return real(*args, **kwargs)
  monkeypatch.setattr(owner, name, patched)


def test_ict_loop_stops_on_sigterm_and_resumes(corpus_dir, tmp_path, monkeypatch, caplog,
                                               sigterm_guard):
  config = configured(corpus_dir, {"ict.num_steps": 6, "train.checkpoint_every": 6,
                                   "model.num_layers": 1})
  config.objective = "ict"
  workdir = tmp_path / "ict"
  caplog.set_level(logging.INFO)
  previous = signal.getsignal(signal.SIGTERM)
  _sigterm_on_call(monkeypatch, pipeline.IctBatchSource, "batch_at", 3)  # in step 3
  with pytest.raises(preemption.Preempted) as stopped:  # the CLI exits 0 on it
    loop.train_and_evaluate(config, workdir)
  assert signal.getsignal(signal.SIGTERM) is previous, "the previous handler is back"
  assert not sigterm_guard, "the loop's handler, not the previous one, got the signal"
  assert stopped.value.step == 3 and stopped.value.checkpoint.endswith("checkpoints/3")
  assert [m for m in caplog.messages if m.startswith("preempted at step 3 (SIGTERM)")]
  assert checkpointing.Checkpointer(workdir / "checkpoints").latest_step() == 3
  assert [r["step"] for r in train_records(workdir, "ict")] == [1, 2, 3]
  monkeypatch.undo()
  final = loop.train_and_evaluate(config, workdir)
  assert final["step"] == 6
  assert [r["step"] for r in train_records(workdir, "ict")] == list(range(1, 7))


def test_qa_finetune_stops_on_sigterm_and_resumes(corpus_dir, tmp_path, monkeypatch, caplog,
                                                  sigterm_guard):
  import qa_finetune_test as qa_helpers  # pylint: disable=g-import-not-at-top
  init = tmp_path / "ict0"
  init_config = qa_helpers.small_config(corpus_dir)
  init_config.objective = "ict"
  init_config.ict.num_steps = 0
  loop.train_and_evaluate(init_config, init)
  config = qa_helpers.qa_config(init, corpus_dir)
  config.qa.prefetch = False
  config.qa.num_steps = 6
  config.qa.checkpoint_every = 6
  workdir = tmp_path / "qa"
  caplog.set_level(logging.INFO)
  _sigterm_on_call(monkeypatch, finetune.batches_lib, "build_qa_batch", 3)  # in step 3
  with pytest.raises(preemption.Preempted) as stopped:  # the CLI exits 0 on it
    finetune.finetune_qa(config, workdir)
  assert not sigterm_guard, "the loop's handler, not the previous one, got the signal"
  assert stopped.value.step == 3
  assert not (workdir / finetune.RESULTS_FILE).exists(), "no evaluation"
  assert [m for m in caplog.messages if m.startswith("preempted at step 3 (SIGTERM)")]
  assert checkpointing.Checkpointer(workdir / "checkpoints").latest_step() == 3
  monkeypatch.undo()
  final = finetune.finetune_qa(config, workdir)
  assert final["step"] == 6 and "exact_match" in final
  assert [r["step"] for r in train_records(workdir, "qa")] == list(range(1, 7))
