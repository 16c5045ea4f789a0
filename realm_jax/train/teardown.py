"""The training loop's teardown in one place: run always, each step bounded, first error wins.

A crash inside a long loop used to end in a cascade: the checkpointer, the metric writers and
the watcher thread each failed (or hung) on their own way out, and the error that started it
was buried under their tracebacks. `Teardown` is a context manager that runs the cleanup steps
registered with `add`, in reverse order, however the body ends:

- each step runs under a time limit (`call_with_timeout`): a write that never returns (a full
  or vanished disk) costs its timeout, not the process;
- every step runs even when an earlier one fails;
- an error raised by the body propagates unchanged; teardown failures after it are logged, one
  line each. If the body succeeded, the first teardown failure is raised (a final checkpoint
  that could not be written must not pass silently).
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable

_LOG = logging.getLogger(__name__)


def one_line(error: BaseException) -> str:
  """`Type: message` of an error, on one line."""
  text = " ".join(str(error).split())
  return f"{type(error).__name__}: {text}" if text else type(error).__name__


def call_with_timeout(fn: Callable[[], Any], timeout: float | None, what: str) -> Any:
  """Runs `fn()` in a daemon thread; its result, its exception, or TimeoutError after
  `timeout` seconds (the thread is then abandoned). `timeout=None` calls `fn` directly."""
  if timeout is None:
    return fn()
  outcome: dict[str, Any] = {}

  def target():
    try:
      outcome["result"] = fn()
    except BaseException as e:  # pylint: disable=broad-except
      outcome["error"] = e

  thread = threading.Thread(target=target, name=f"bounded: {what}", daemon=True)
  thread.start()
  thread.join(timeout)
  if thread.is_alive():
    raise TimeoutError(f"{what} did not finish within {timeout:.0f}s; abandoned")
  if "error" in outcome:
    raise outcome["error"]
  return outcome.get("result")


class Teardown:
  """Cleanup steps of one run: `add(name, fn, timeout)`; they run on exit of the `with`."""

  def __init__(self):
    self._steps: list[tuple[str, Callable[[], Any], float | None]] = []
    self.failures: list[tuple[str, BaseException]] = []

  def add(self, name: str, fn: Callable[[], Any], timeout: float | None = 30.0):
    """Registers `fn` to run at teardown (last added runs first), limited to `timeout` s."""
    self._steps.append((name, fn, timeout))

  def run(self, error: BaseException | None = None):
    """Runs (and forgets) every registered step; see the module docstring for errors."""
    steps, self._steps = self._steps, []
    for name, fn, timeout in reversed(steps):
      try:
        call_with_timeout(fn, timeout, name)
      except Exception as e:  # pylint: disable=broad-except
        self.failures.append((name, e))
        if error is not None:
          _LOG.error("teardown: %s failed after the run stopped on %s: %s", name,
                     type(error).__name__, one_line(e))
        else:
          _LOG.error("teardown: %s failed: %s", name, one_line(e))
    if error is None and self.failures:
      raise self.failures[0][1]

  def __enter__(self) -> "Teardown":
    return self

  def __exit__(self, exc_type, exc, tb) -> bool:
    self.run(exc)
    return False  # the body's own error (if any) propagates unchanged
