"""`retrieval.searcher=device` as 2 trainer processes (4 fake CPU devices each) + a builder.

One 2-process launch (tests/multiprocess.py) trains with `index_source=builder`: a separate
index-builder process publishes version 0 (from checkpoint 0) and later versions from later
checkpoints; each trainer process places the table on its devices off the training thread and
hot-swaps it between two steps. When the swap happens depends on the builder's speed, so the
1-process x 8-device reference replays the schedule the 2-process run recorded (the same
published versions, swapped in before the same steps) and must give the same losses. Both
processes must report the same index version at every step (process 0 decides, both swap).
"""

import os
import shutil
import subprocess
import sys

import numpy as np

import multiprocess  # pylint: disable=g-bad-import-order
from realm_jax.retrieval import index_format
from realm_jax.train import loop
from tiny_configs import tiny_config  # pylint: disable=g-bad-import-order

NUM_STEPS = 8
STEPS_RUN = NUM_STEPS - 1  # no final evaluation (its compile would double the test's time)
# Same 8 devices and parameters: only gloo's cross-process all-reduce may order float32 sums
# differently (tests/multihost_test.py holds the host-searcher runs to the same 1e-4).
RTOL = 1e-4
OVERRIDES = {
    "train.num_steps": NUM_STEPS,
    "retrieval.index_source": "builder",
    "retrieval.searcher": "device",
    "retrieval.device.top_k": "exact",
    "retrieval.prefetch": False,  # sequential: batch t retrieved with the parameters of t
    "retrieval.refresh_every": 2,  # the builder publishes from checkpoints 2, 4, 6
    "train.checkpoint_every": 2,
    "retrieval.keep_index_versions": 100,  # the reference replays every published version
    "retrieval.watch_poll_seconds": 0.2,
    "retrieval.builder_poll_seconds": 0.2,  # the builder looks for checkpoints this often
    "retrieval.first_index_timeout": 600.0,
}


def _config(corpus_dir=""):
  config = tiny_config(corpus_dir)
  for dotted, value in OVERRIDES.items():
    *parents, leaf = dotted.split(".")
    node = config
    for key in parents:
      node = node[key]
    node[leaf] = value
  return config


def _replay_swaps(monkeypatch, schedule):
  """Makes loop._agreed_swap swap in version schedule[i] before step i + 1 (index 0 also at
  start-up), as the 2-process run recorded it; returns the versions swapped in."""
  calls, taken = [0], []

  def agreed_swap(index, first_timeout=None, due=None, timeout=0.0):
    del first_timeout, due, timeout  # the recorded schedule decides (builder_sync_lag is 0)
    target = schedule[min(calls[0] - 1, len(schedule) - 1)] if calls[0] else schedule[0]
    calls[0] += 1
    if index.step is not None and int(index.step) == target:
      return False
    index.swap_to(index_format.VersionKey(target, 0))
    taken.append(target)
    return True
  monkeypatch.setattr(loop, "_agreed_swap", agreed_swap)
  return taken


def test_two_trainer_processes_hot_swap_builder_versions_on_devices(tmp_path, monkeypatch):
  workdir = tmp_path / "run"
  log_path = tmp_path / "builder.log"
  with log_path.open("w") as log:  # the index-builder job: 1 process, 1 device
    builder = subprocess.Popen(
        [sys.executable, "-m", "realm_jax.main", "--mode=index_builder",
         "--config_wait_seconds=600", f"--workdir={workdir}"], cwd=multiprocess.REPO_DIR,
        stdout=log, stderr=subprocess.STDOUT,
        env=multiprocess.one_device_env())
  try:
    results = multiprocess.run(
        [dict(workdir=str(workdir), overrides=OVERRIDES, max_steps_this_run=STEPS_RUN)],
        tmp_path / "launch", timeout=900)
  finally:
    builder.kill()
    builder.wait()
  builder_log = log_path.read_text()[-3000:]
  finals = []
  for process, (result,) in enumerate(results):
    assert "error" not in result, (process, result, builder_log)
    finals.append(result["final"])
  histories = [f["history"] for f in finals]
  schedule = [h["index_step"] for h in histories[0]]  # the version step i + 1 used
  # The swap is agreed: both processes used the same version at every step.
  assert [h["index_step"] for h in histories[1]] == schedule
  assert schedule[0] == 0 and schedule == sorted(schedule)
  swapped_at = [i + 1 for i in range(1, STEPS_RUN) if schedule[i] != schedule[i - 1]]
  print(f"index version per step: {schedule}; hot swaps before steps {swapped_at}")
  assert swapped_at, (f"the builder published no version during the run ({schedule}); "
                      f"builder log:\n{builder_log}")
  for history in histories:  # both processes counted the hot swap at the same step
    assert [h["step"] for h in history if "index_swaps" in h] == swapped_at

  # The 1-process x 8-device reference: same corpus, the published versions, the same swaps.
  reference_dir = tmp_path / "reference"
  reference_dir.mkdir()
  shutil.copytree(workdir / "index", reference_dir / "index")
  taken = _replay_swaps(monkeypatch, schedule)
  reference = loop.train_and_evaluate(_config(str(workdir / "corpus")), reference_dir,
                                      max_steps_this_run=STEPS_RUN)["history"]
  assert taken == sorted(set(schedule))
  assert [h["index_step"] for h in reference] == schedule
  losses = np.array([h["loss"] for h in reference])
  for history in histories:
    np.testing.assert_allclose([h["loss"] for h in history], losses, rtol=RTOL)
  key = f"train_{loop.recall_key(_config().retrieval.k)}"  # the same candidates were found
  np.testing.assert_allclose([h[key] for h in histories[0]], [h[key] for h in reference])
