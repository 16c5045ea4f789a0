"""One progress reporter for every long loop: training steps, corpus records, embedded blocks,
evaluation queries. It logs a line with the count, the rate and the ETA, every `every_count`
items and/or every `every_seconds` seconds, and once more when the loop finishes:

    [embed corpus] 12800/50000 blocks (25.6%) | 412 blocks/s | ETA 0:01:30

Lines go to the stdlib logger "realm_jax.progress" at INFO (what `realm_jax.main` shows).
"""

from __future__ import annotations

import logging
import time
from typing import Mapping

_LOG = logging.getLogger("realm_jax.progress")


def format_seconds(seconds: float) -> str:
  """h:mm:ss of a non-negative duration (negative or NaN durations show as 0:00:00)."""
  seconds = int(seconds) if seconds == seconds and seconds > 0 else 0
  return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class Progress:
  """Counts items of a loop and logs `[name] done/total unit | scalars | rate | ETA`.

  Args:
    name: what the loop does ("embed corpus", "ict", "eval").
    total: the number of items the loop will reach (its last `done`).
    unit: what an item is ("steps", "blocks", "records", "queries").
    start: items already done before this run (a resumed run): the rate counts only new ones.
    every_count: log when `done` crosses a multiple of this (0: not by count).
    every_seconds: log when this many seconds passed since the last line (0: not by time).
      With neither, every 10% of `total`.
    logger: where lines go (default "realm_jax.progress").
  """

  def __init__(self, name: str, total: int, unit: str = "steps", start: int = 0,
               every_count: int = 0, every_seconds: float = 0.0,
               logger: logging.Logger | None = None):
    if not every_count and not every_seconds:
      every_count = max(1, total // 10)
    self.name, self.total, self.unit = name, int(total), unit
    self.every_count, self.every_seconds = int(every_count), float(every_seconds)
    self.done = self._start = int(start)
    self._start_time = self._last_time = time.monotonic()
    self._logger = logger or _LOG
    self.lines = 0  # lines logged so far (tests)
    self._finished = False

  @property
  def rate(self) -> float:
    """Items per second since this reporter started."""
    return (self.done - self._start) / max(time.monotonic() - self._start_time, 1e-9)

  def update(self, count: int = 1, scalars: Mapping[str, float] | None = None) -> None:
    """Adds `count` finished items; logs if a count or time period has passed (or at total)."""
    self.set(self.done + count, scalars)

  def set(self, done: int, scalars: Mapping[str, float] | None = None) -> None:
    """Sets the number of finished items to `done`; logs like `update`."""
    before, self.done = self.done, int(done)
    now = time.monotonic()
    by_count = bool(self.every_count) and self.done // self.every_count > before // self.every_count
    by_time = bool(self.every_seconds) and now - self._last_time >= self.every_seconds
    if by_count or by_time or (self.done >= self.total and not self._finished):
      self._finished = self.done >= self.total
      self._log(now, scalars)

  def close(self, scalars: Mapping[str, float] | None = None) -> None:
    """Logs the final line if the last `update` did not (e.g. a loop that stopped early)."""
    if not self._finished:
      self._finished = True
      self._log(time.monotonic(), scalars)

  def _log(self, now: float, scalars: Mapping[str, float] | None) -> None:
    self._last_time = now
    rate = self.rate
    eta = (self.total - self.done) / rate if rate > 0 else float("nan")
    parts = [f"[{self.name}] {self.done}/{self.total} {self.unit} "
             f"({100.0 * self.done / max(self.total, 1):.1f}%)"]
    if scalars:
      parts.append(" ".join(f"{k} {v:.4g}" for k, v in scalars.items()))
    parts.append(f"{rate:.3g} {self.unit}/s")
    parts.append(f"ETA {format_seconds(eta)}" if self.done < self.total else
                 f"took {format_seconds(now - self._start_time)}")
    self._logger.info(" | ".join(parts))
    self.lines += 1
