"""A step's device metrics fetched one step late, so the host never idles the devices.

`jax.device_get(metrics)` right after dispatching step t blocks the host until step t ends;
writing its record, preparing batch t+1 and copying it to the devices then happen while the
devices wait. With `lag=True`, step t's metrics are fetched after step t+1 is dispatched: the
host does that work while the devices run t+1, and the fetch is (nearly) free.

The NaN guard stays exact: records are finished in step order, the first non-finite step
raises naming itself, and `flush()` (before a checkpoint, an index refresh, an evaluation, a
preemption or the end of the loop) checks every dispatched step, so a state after a bad step is
never saved or used to embed an index.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Callable

import jax


@dataclasses.dataclass
class _Pending:
  step: int  # the step's number after it (1-based, as in metrics.jsonl)
  device_metrics: Any  # {name: scalar jax.Array}, not yet fetched
  scalars: dict[str, float]  # host-side values of the step (retrieval, index)
  started: float  # time.time() when the step's host work began


class LaggedMetrics:
  """Holds at most one dispatched step's metrics; `finish(step, scalars)` gets each step once,
  in order, with the fetched values merged into `scalars` and `step_seconds` set.

  `step_seconds` is the time from the end of the previous step's record (or this step's
  start, if later) to this one's fetch: consecutive steps tile the wall clock, so it is the
  step period the run actually achieves, host- or device-bound, lagged or not.
  """

  def __init__(self, finish: Callable[[int, dict[str, float]], None], lag: bool = True):
    self._finish = finish
    self._lag = lag
    self._pending: _Pending | None = None
    self._last_fetch = 0.0
    self._failed = False  # a record raised (NaN, lost lease): no later step is recorded

  @property
  def pending_step(self) -> int | None:
    """The step whose metrics are not fetched yet (None when none)."""
    return None if self._pending is None else self._pending.step

  def push(self, step: int, device_metrics, scalars: dict[str, float], started: float) -> None:
    """Step `step` was just dispatched: the previous one is finished now (lag) or this one is."""
    previous, self._pending = self._pending, _Pending(step, device_metrics, scalars, started)
    if previous is not None:
      self._complete(previous)
    if not self._lag:
      self.flush()

  def flush(self) -> None:
    """Fetches and finishes the pending step, if any (raises what `finish` raises)."""
    pending, self._pending = self._pending, None
    if pending is not None:
      self._complete(pending)

  def settle(self) -> None:
    """For a loop stopping on an error that is not the records' own: the step that ran before
    it is still recorded. A failure in doing so is logged, never raised over the first error."""
    if self._failed or self._pending is None:
      return
    step = self._pending.step
    try:
      self.flush()
    except Exception as e:  # pylint: disable=broad-except
      logging.warning("metrics: step %d not recorded (%s: %s)", step, type(e).__name__, e)

  def _complete(self, pending: _Pending) -> None:
    if self._failed:
      return
    self._failed = True  # until the record is written
    values = jax.device_get(pending.device_metrics)  # blocks until that step has run
    now = time.time()
    scalars = dict(pending.scalars)
    scalars.update({k: float(v) for k, v in values.items()})
    scalars["step_seconds"] = now - max(pending.started, self._last_fetch)
    self._last_fetch = now
    self._finish(pending.step, scalars)
    self._failed = False
