"""A multi-process harness for tests: N local Python processes under `jax.distributed`.

`run(scenarios, tmp_path)` spawns `num_processes` copies of this file (`python
tests/multiprocess.py <spec.json> <process_id>`), each a JAX process with
`devices_per_process` fake CPU devices and gloo cross-process collectives, coordinated over a
free localhost port. Every process runs the same list of scenarios (each one
`loop.train_and_evaluate` on a tiny config, `tests/tiny_configs.py`, in one distributed
session, so later scenarios reuse the compile cache) and writes one JSON result per process:
per scenario either the run's history and final metrics, or the error it raised (type and
message). A process that hangs or crashes fails the test with every process's output.

Each non-zero process also reports, per scenario, the paths under the scenario's workdir it
opened for writing, created, renamed or removed (a `sys.addaudithook` on Python's file
operations; tensorstore's C++ writes inside orbax are not seen), so a test can check that
only process 0 writes metrics, the config and index versions.
"""

from __future__ import annotations

import json
import faulthandler
import logging
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

TESTS_DIR = pathlib.Path(__file__).resolve().parent
REPO_DIR = TESTS_DIR.parent
# The subprocesses compile with XLA's backend optimizations off, as the suite does
# (tests/conftest.py): tiny programs, where compiling is most of the time.
FAST_COMPILE_FLAGS = "--xla_backend_optimization_level=0"
_WRITE_EVENTS = ("os.mkdir", "os.rename", "os.remove", "os.rmdir", "shutil.rmtree",
                 "shutil.move", "os.truncate")


class MultiprocessError(AssertionError):
  """A process failed, timed out or returned nothing; the message holds every output."""


def one_device_env() -> dict[str, str]:
  """This environment for a one-CPU-device subprocess (the index builder, a CLI run)."""
  return dict(os.environ, XLA_FLAGS=FAST_COMPILE_FLAGS)


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def run(scenarios: list[dict], tmp_path: pathlib.Path, num_processes: int = 2,
        devices_per_process: int = 4, timeout: float = 300.0,
        env: dict[str, str] | None = None) -> list[list[dict]]:
  """Runs `scenarios` in `num_processes` processes; -> results[process][scenario].

  A scenario is a dict: `workdir`, `overrides` ({dotted config field: value}, applied to
  `tiny_config(corpus_dir)`), optional `corpus_dir`, `max_steps_this_run`, `force_lease`,
  `steal_lease_at_step`, `update_corpus_at_step` (see `_record_steps`). A result holds `final`
  (the run's return
  value) or `error` and `message`, plus `written` (paths under the workdir, processes > 0
  only meaningful) and `steps_seen` (the steps whose records the loop wrote).
  Raises MultiprocessError (with both processes' output) if any process exits non-zero, runs
  past `timeout` seconds, or writes no result.
  """
  tmp_path.mkdir(parents=True, exist_ok=True)
  spec = dict(port=free_port(), num_processes=num_processes, scenarios=scenarios)
  spec_path = tmp_path / "multiprocess_spec.json"
  spec_path.write_text(json.dumps(spec))
  full_env = dict(os.environ, **(env or {}))
  full_env.update(JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([str(REPO_DIR), str(TESTS_DIR)]),
                  XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_process} "
                            f"{FAST_COMPILE_FLAGS}")
  logs = [tmp_path / f"process_{i}.log" for i in range(num_processes)]
  procs = []
  for i, log in enumerate(logs):
    with log.open("w") as f:
      procs.append(subprocess.Popen([sys.executable, str(TESTS_DIR / "multiprocess.py"),
                                     str(spec_path), str(i)], cwd=REPO_DIR, env=full_env,
                                    stdout=f, stderr=subprocess.STDOUT))
  deadline = time.monotonic() + timeout
  timed_out = False
  for proc in procs:
    try:
      proc.wait(timeout=max(deadline - time.monotonic(), 1.0))
    except subprocess.TimeoutExpired:
      timed_out = True
  for proc in procs:  # a hung process prints its Python stacks (faulthandler) on SIGUSR1
    if proc.poll() is None:
      proc.send_signal(signal.SIGUSR1)
  for proc in procs:
    try:
      proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
      proc.kill()
      proc.wait()
  results = []
  for i in range(num_processes):
    path = tmp_path / f"result_{i}.json"
    results.append(json.loads(path.read_text()) if path.exists() else None)
  if timed_out or any(p.returncode for p in procs) or None in results:
    outputs = "\n".join(f"---- process {i} (exit {p.returncode}) ----\n{_tail(log)}"
                        for i, (p, log) in enumerate(zip(procs, logs)))
    why = f"timed out after {timeout:.0f}s" if timed_out else "a process failed"
    raise MultiprocessError(f"{num_processes}-process run {why}:\n{outputs}")
  return results


def _tail(path: pathlib.Path, chars: int = 8000) -> str:
  """The end of a process's output, without gloo's connection chatter."""
  text = "".join(line for line in path.read_text(errors="replace").splitlines(keepends=True)
                 if not line.startswith("[Gloo]"))
  return text if len(text) <= chars else "...\n" + text[-chars:]


# ---- The worker (one JAX process) --------------------------------------------------------


class _WriteAudit:
  """Paths under `root` this process writes (Python-level file operations only)."""

  def __init__(self):
    self.root: str | None = None
    self.paths: set[str] = set()

  def __call__(self, event: str, args):
    if self.root is None:
      return
    if event == "open":
      path, mode, flags = args
      writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
          isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
      paths = [path] if writing else []
    elif event in _WRITE_EVENTS:
      paths = [a for a in args[:2] if isinstance(a, (str, bytes, os.PathLike))]
    else:
      return
    for path in paths:
      if isinstance(path, int):
        continue
      path = os.path.abspath(os.fsdecode(path))
      if path.startswith(self.root + os.sep):
        self.paths.add(os.path.relpath(path, self.root))


def _config(scenario: dict):
  from tiny_configs import tiny_config  # pylint: disable=g-import-not-at-top
  config = tiny_config(scenario.get("corpus_dir", ""))
  for dotted, value in scenario.get("overrides", {}).items():
    *parents, leaf = dotted.split(".")
    node = config
    for key in parents:
      node = node[key]
    node[leaf] = value
  return config


def _jsonable(value):
  if isinstance(value, dict):
    return {k: _jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_jsonable(v) for v in value]
  if hasattr(value, "item"):
    return value.item()
  return value


def _record_steps(scenario: dict, seen: list[int]) -> None:
  """Wraps MetricWriter.write to note each step it is called with (on every process: the
  writer of processes > 0 is a no-op, but it is still called); with `steal_lease_at_step`,
  process 0 then overwrites the trainer lease with a foreign owner's record at that step (a
  second trainer taking the workdir over with --force); with `update_corpus_at_step`, process
  0 publishes a corpus version of the scenario's corpus_dir at that step
  (`corpus_versions.update_corpus(**scenario["update_corpus"])`: a --mode=update_corpus run
  between two steps)."""
  import jax  # pylint: disable=g-import-not-at-top
  from realm_jax import lease  # pylint: disable=g-import-not-at-top
  from realm_jax.train import metrics  # pylint: disable=g-import-not-at-top
  original = metrics.MetricWriter.write
  steal_at = scenario.get("steal_lease_at_step")
  update_at = scenario.get("update_corpus_at_step")

  def write(self, step, scalars, phase=None):
    if phase is None:
      seen.append(int(step))
      if step == steal_at and jax.process_index() == 0:
        path = lease.lease_path(scenario["workdir"], "trainer")
        record = dict(json.loads(path.read_text()), owner="another-trainer", pid=1)
        path.write_text(json.dumps(record))
      if step == update_at and jax.process_index() == 0:
        from realm_jax.data import corpus_versions  # pylint: disable=g-import-not-at-top
        corpus_versions.update_corpus(scenario["corpus_dir"], **scenario["update_corpus"])
    return original(self, step, scalars, phase)
  metrics.MetricWriter.write = write


def _worker(spec_path: str, process_id: int) -> None:
  """One process: distributed init, then every scenario; the result file last."""
  spec = json.loads(pathlib.Path(spec_path).read_text())
  faulthandler.register(signal.SIGUSR1, all_threads=True, chain=False)
  logging.basicConfig(level=logging.INFO, format=f"[process {process_id}] %(asctime)s "
                      "%(levelname)s %(name)s: %(message)s")
  for noisy in ("absl", "jax._src", "orbax", "etils"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  # Each scenario builds new jitted step functions: a persistent cache per process lets the
  # later scenarios skip their compiles.
  jax.config.update("jax_compilation_cache_dir",
                    str(pathlib.Path(spec_path).parent / f"jax_cache_{process_id}"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  jax.distributed.initialize(coordinator_address=f"localhost:{spec['port']}",
                             num_processes=spec["num_processes"], process_id=process_id,
                             initialization_timeout=120)
  from realm_jax.train import loop  # pylint: disable=g-import-not-at-top
  from realm_jax.train import metrics as metrics_module  # pylint: disable=g-import-not-at-top
  original_write = metrics_module.MetricWriter.write
  audit = _WriteAudit()
  sys.addaudithook(audit)
  results = []
  for scenario in spec["scenarios"]:
    audit.root, audit.paths = os.path.abspath(scenario["workdir"]), set()
    seen: list[int] = []
    _record_steps(scenario, seen)
    try:
      final = loop.train_and_evaluate(_config(scenario), scenario["workdir"],
                                      max_steps_this_run=scenario.get("max_steps_this_run"),
                                      force_lease=scenario.get("force_lease", False))
      outcome = dict(final=_jsonable(final))
    except Exception as e:  # pylint: disable=broad-except
      outcome = dict(error=type(e).__name__, message=str(e))
    audit.root = None
    metrics_module.MetricWriter.write = original_write
    outcome.update(written=sorted(audit.paths), steps_seen=seen)
    results.append(outcome)
    print(f"multiprocess: process {process_id} scenario {len(results)}: "
          f"{outcome.get('error', 'ok')}", flush=True)
  out = pathlib.Path(spec_path).parent / f"result_{process_id}.json"
  tmp = out.with_suffix(".tmp")
  tmp.write_text(json.dumps(results))
  tmp.replace(out)
  jax.distributed.shutdown()


if __name__ == "__main__":
  _worker(sys.argv[1], int(sys.argv[2]))
