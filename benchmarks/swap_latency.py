r"""Trainer step time with and without a running index builder, and around hot swaps.

  python benchmarks/swap_latency.py --config=experiments/realm_facts.py:size=tiny \
      --steps=300 --refresh_every=25 --workdir=/tmp/swap_bench --output=/tmp/swap.json

Two REALM runs of `--steps` steps on the same corpus, each with a separate index-builder
*process* (`python -m realm_jax.main --mode=index_builder`) sharing the run's workdir:
- `no_builder`: the builder publishes the step-0 index and exits (`--max_builds=1`), so the
  trainer trains on one fixed index: no builder load, no swaps;
- `builder`: the builder keeps re-embedding every `--refresh_every` steps' checkpoint and the
  trainer hot-swaps each new version between two steps (`IndexWatcher` loads and checks it on
  a background thread of the trainer process).
With `--pin` (default) the trainer is pinned to the first half of the CPUs and the builder to
the second half, standing in for the separate machines they run on in a real deployment; the
watcher thread stays with the trainer, so the cost of loading a version is measured.

Reported, from each step's `step_seconds` (the first `--skip` steps, i.e. compile and warm-up,
excluded): p50/p99/mean of both runs, and of the builder run split into steps within `--window`
steps before or after a swap (the watcher loads the version just before the swap step) vs the
rest. The target (issue 3): a swap adds < 10% to p99 step time.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from typing import Any

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_step as tsb  # pylint: disable=g-import-not-at-top,wrong-import-position

for _name in ("steps", "warmup", "batch_size", "k", "objective"):
  delattr(flags.FLAGS, _name)
_CONFIG, _OUTPUT = tsb._CONFIG, tsb._OUTPUT  # pylint: disable=protected-access
_STEPS = flags.DEFINE_integer("steps", 300, "REALM steps per run.")
_REFRESH = flags.DEFINE_integer("refresh_every", 25, "Builder refresh (and checkpoint) period.")
_SKIP = flags.DEFINE_integer("skip", 10, "First steps left out (compile, warm-up).")
_WINDOW = flags.DEFINE_integer("window", 3, "Steps before and after a swap counted as 'around "
                               "a swap'.")
_WORKDIR = flags.DEFINE_string("workdir", "/tmp/realm_swap_bench", "Scratch folder.")
_PIN = flags.DEFINE_bool("pin", True, "Pin trainer and builder to disjoint halves of the CPUs.")


def _cpu_halves() -> tuple[set[int], set[int]] | None:
  cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
  if len(cpus) < 2:
    return None
  half = len(cpus) // 2
  return set(cpus[:half]), set(cpus[half:])


@contextlib.contextmanager
def _builder(workdir: str, max_builds: int, cpus: set[int] | None):
  """The index-builder process on `workdir` (reads the trainer's saved config)."""
  command = [sys.executable, "-m", "realm_jax.main", "--mode=index_builder",
             f"--workdir={workdir}", f"--max_builds={max_builds}"]
  if cpus:
    command = ["taskset", "-c", ",".join(map(str, sorted(cpus)))] + command
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "index_builder.log"), "a") as log:
    child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
      yield child
    finally:
      child.terminate()
      child.wait()


def _stats(values) -> dict[str, float]:
  import numpy as np  # pylint: disable=g-import-not-at-top
  values = np.asarray(values, np.float64)
  if not len(values):
    return dict(n=0)
  return dict(n=int(len(values)), p50=float(np.percentile(values, 50)),
              p99=float(np.percentile(values, 99)), mean=float(values.mean()),
              max=float(values.max()))


def run(config, steps: int, refresh_every: int, workdir: str, skip: int, window: int,
        pin: bool) -> dict[str, Any]:
  from realm_jax.data import prepare  # pylint: disable=g-import-not-at-top
  from realm_jax.train import loop  # pylint: disable=g-import-not-at-top

  halves = _cpu_halves() if pin else None
  if halves:
    os.sched_setaffinity(0, halves[0])
  config.train.num_steps = steps
  config.train.checkpoint_every = refresh_every
  config.train.keep_checkpoints = 3
  config.eval.every = 0
  config.retrieval.index_source = "builder"
  config.retrieval.refresh_every = refresh_every
  config.retrieval.watch_poll_seconds = 0.2
  config.retrieval.builder_poll_seconds = 0.5
  config.data.corpus_dir = os.path.join(workdir, "corpus")
  prepare.prepare_data(config, workdir)  # built once, shared by both runs
  runs = {}
  for name, max_builds in (("no_builder", 1), ("builder", 0)):
    run_dir = os.path.join(workdir, f"{name}-{int(time.time())}")
    with _builder(run_dir, max_builds, halves[1] if halves else None):
      out = loop.train_and_evaluate(config, run_dir, max_steps_this_run=steps)
    history = out["history"][skip:]
    swap_steps = [h["step"] for h in out["history"] if "index_swaps" in h]
    # Around a swap: the steps while the watcher thread loaded the version (just before the
    # swap step) and just after it.
    near_swap = lambda step: any(-window <= step - s < window for s in swap_steps)
    near = [h["step_seconds"] for h in history if near_swap(h["step"])]
    far = [h["step_seconds"] for h in history if not near_swap(h["step"])]
    runs[name] = dict(all=_stats([h["step_seconds"] for h in history]), swaps=len(swap_steps),
                      around_swap=_stats(near), other=_stats(far),
                      index_load_seconds=_stats([h["index_load_seconds"] for h in out["history"]
                                                 if "index_load_seconds" in h]),
                      retrieval_seconds=_stats([h["retrieval_seconds"] for h in history]))
  base = runs["no_builder"]["all"]["p99"]
  return dict(config=str(_CONFIG.value.model.size), steps=steps, refresh_every=refresh_every,
              skip=skip, window=window, pinned=bool(halves),
              trainer_cpus=sorted(halves[0]) if halves else None,
              builder_cpus=sorted(halves[1]) if halves else None, runs=runs,
              p99_increase_with_builder=runs["builder"]["all"]["p99"] / base - 1,
              p99_increase_around_swaps=runs["builder"]["around_swap"].get("p99", base) / base - 1)


def _format(result: dict[str, Any]) -> str:
  lines = [f"trainer step time (ms), {result['steps']} steps, refresh every "
           f"{result['refresh_every']}, first {result['skip']} left out, pinned="
           f"{result['pinned']}",
           f"{'run / steps':<32}{'n':>6}{'p50':>9}{'p99':>9}{'mean':>9}{'max':>9}"]
  for name, r in result["runs"].items():
    for part in ("all", "around_swap", "other"):
      s = r[part]
      if not s.get("n"):
        continue
      lines.append(f"{name + ' / ' + part:<32}{s['n']:>6}{1e3 * s['p50']:>9.1f}"
                   f"{1e3 * s['p99']:>9.1f}{1e3 * s['mean']:>9.1f}{1e3 * s['max']:>9.1f}")
    lines.append(f"  {name}: {r['swaps']} swaps, index load (watcher thread) mean "
                 f"{r['index_load_seconds'].get('mean', 0):.3f}s")
  lines.append(f"p99 with builder vs without: {100 * result['p99_increase_with_builder']:+.1f}%; "
               f"p99 within {result['window']} steps of a swap vs no builder: "
               f"{100 * result['p99_increase_around_swaps']:+.1f}% (target < +10%)")
  return "\n".join(lines)


def main(argv):
  del argv
  load_before = tsb.load_average()
  result = run(_CONFIG.value, _STEPS.value, _REFRESH.value, _WORKDIR.value, _SKIP.value,
               _WINDOW.value, _PIN.value)
  tsb.report(result, load_before, _format)


if __name__ == "__main__":
  app.run(main)
