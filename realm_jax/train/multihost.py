"""Agreement between the processes of one multi-host job (jax.distributed).

Some decisions are taken by process 0 alone because it alone writes the workdir: the trainer
lease, the resume config check, building the corpus. If its outcome stayed local, process 0
would raise while the others went on into the first collective and hung there (or trained
alone). `agree` runs such a decision on process 0 and broadcasts its outcome
(`multihost_utils.broadcast_one_to_all`): every process returns, or every process raises the
same error type with process 0's message.

`sum_over_processes` adds host-side counts (retrieval hits of each process's rows) so that the
metrics process 0 records are those of the global batch. With one process every function is
the plain local computation, without collectives.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np

from realm_jax import config_lib
from realm_jax import lease as lease_lib
from realm_jax.data import prepare

MAX_MESSAGE_BYTES = 4096
# Errors process 0 may raise in an agreed decision, re-raised as themselves everywhere; any
# other error type is re-raised as a RuntimeError naming it.
_KNOWN_ERRORS: tuple[type[BaseException], ...] = (
    lease_lib.LeaseHeldError, lease_lib.LeaseLostError, config_lib.ConfigError,
    prepare.CorpusTooSmall, FileNotFoundError, TimeoutError, ValueError)


def _encode(error: BaseException | None) -> dict[str, np.ndarray]:
  """The outcome as fixed-shape arrays: error kind (0 ok, 1 + index in _KNOWN_ERRORS, -1
  other) and the UTF-8 message (truncated to MAX_MESSAGE_BYTES)."""
  if error is None:
    kind, text = 0, b""
  else:
    kind = next((1 + i for i, t in enumerate(_KNOWN_ERRORS) if type(error) is t), -1)
    text = (str(error) if kind > 0 else f"{type(error).__name__}: {error}").encode()
  text = text[:MAX_MESSAGE_BYTES]
  message = np.zeros(MAX_MESSAGE_BYTES, np.uint8)
  message[:len(text)] = np.frombuffer(text, np.uint8)
  return dict(kind=np.int32(kind), length=np.int32(len(text)), message=message)


def _decode(outcome: dict[str, np.ndarray], what: str) -> BaseException | None:
  kind = int(outcome["kind"])
  if kind == 0:
    return None
  text = bytes(np.asarray(outcome["message"])[:int(outcome["length"])]).decode(errors="replace")
  if kind > 0:
    return _KNOWN_ERRORS[kind - 1](text)
  return RuntimeError(f"process 0 failed in {what}: {text}")


def agree(fn: Callable[[], Any], what: str) -> Any:
  """Runs `fn` on process 0 only; every process then returns (fn's result on process 0, None
  elsewhere) or raises process 0's error. A collective: every process must call it, at the
  same point."""
  if jax.process_count() == 1:
    return fn()
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  result, error = None, None
  if jax.process_index() == 0:
    try:
      result = fn()
    except Exception as e:  # pylint: disable=broad-except
      error = e
  outcome = multihost_utils.broadcast_one_to_all(_encode(error))
  if error is not None:
    raise error  # process 0: its own error, traceback intact
  decoded = _decode(outcome, what)
  if decoded is not None:
    raise decoded
  return result


def broadcast_int(value: int) -> int:
  """Process 0's `value` (int32 range) on every process."""
  if jax.process_count() == 1:
    return int(value)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return int(multihost_utils.broadcast_one_to_all(np.int32(value)))


def sum_over_processes(counts) -> tuple[int, ...]:
  """Elementwise sum of each process's integer `counts` (a short tuple), on every process."""
  counts = np.asarray(counts, np.int32)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    counts = np.asarray(multihost_utils.process_allgather(counts)).sum(axis=0)
  return tuple(int(c) for c in counts)
