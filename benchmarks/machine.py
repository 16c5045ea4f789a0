"""Machine facts every benchmark records next to its numbers: CPU model and git commit."""

from __future__ import annotations

import os
import platform
import subprocess


def cpu_model() -> str:
  """The CPU's model name (from /proc/cpuinfo where there is one)."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown"


def git_state() -> str:
  """`<commit>` or `<commit>+dirty` of the checkout the benchmark runs from, if it is one."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  try:
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                            text=True, check=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                           capture_output=True, text=True, check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return "unknown"
  return commit + ("+dirty" if dirty else "")


def time_steps(step, state, batch, warmup: int, steps: int):
  """Runs `state, metrics = step(state, batch)` `warmup` times, then `steps` timed times,
  blocking on each result: -> (state, last metrics or None, [seconds per timed step])."""
  import jax  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top
  metrics = None
  for _ in range(warmup):
    state, metrics = step(state, batch)
    jax.block_until_ready((state, metrics))
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - start)
  return state, metrics, times
