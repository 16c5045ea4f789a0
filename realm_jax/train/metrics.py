"""Metrics a person can plot (JSONL + TensorBoard) and a progress line with rate and ETA.

Only process 0 writes; other processes get a writer that does nothing.
"""

from __future__ import annotations

import json
import logging
import math
import time
from typing import Mapping

from etils import epath


class MetricWriter:
  """Appends `{"step": s, "phase": ..., name: value}` lines and TensorBoard scalars."""

  def __init__(self, directory: epath.PathLike, enabled: bool = True, phase: str = "train"):
    self.enabled = enabled
    self.phase = phase
    self._tb = None
    self._jsonl = None
    if enabled:
      self.directory = epath.Path(directory)
      self.directory.mkdir(parents=True, exist_ok=True)
      self._jsonl = (self.directory / "metrics.jsonl").open("a")
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tb = SummaryWriter(str(self.directory / "tensorboard"), flush_secs=10)

  def write(self, step: int, scalars: Mapping[str, float], phase: str | None = None):
    if not self.enabled:
      return
    phase = phase or self.phase
    clean = {k: float(v) for k, v in scalars.items()}
    self._jsonl.write(json.dumps({"step": int(step), "phase": phase, **clean}) + "\n")
    for name, value in clean.items():
      if math.isfinite(value):
        self._tb.add_scalar(f"{phase}/{name}", value, int(step))

  def flush(self):
    if self.enabled:
      self._jsonl.flush()
      self._tb.flush()

  def close(self):
    if self.enabled:
      self._jsonl.close()
      self._tb.close()


def read_metrics(path: epath.PathLike) -> list[dict]:
  """All records of a metrics.jsonl (for tests, the demo table and plotting)."""
  return [json.loads(line) for line in epath.Path(path).read_text().splitlines() if line]


def _format_seconds(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class Progress:
  """Logs `step n/N | metrics | x steps/s | ETA h:mm:ss` every `every` steps."""

  def __init__(self, name: str, total_steps: int, start_step: int = 0, every: int = 10):
    self.name, self.total, self.every = name, total_steps, max(every, 1)
    self._start_step, self._start_time = start_step, time.time()

  def update(self, step: int, scalars: Mapping[str, float]):
    """Call after finishing step index `step` (0-based)."""
    done = step + 1
    if done % self.every and done != self.total:
      return
    elapsed = time.time() - self._start_time
    rate = (done - self._start_step) / max(elapsed, 1e-9)
    eta = (self.total - done) / max(rate, 1e-9)
    shown = " | ".join(f"{k} {v:.4g}" for k, v in scalars.items())
    logging.info("[%s] step %d/%d | %s | %.2f steps/s | ETA %s", self.name, done, self.total,
                 shown, rate, _format_seconds(eta))
