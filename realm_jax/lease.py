"""One writer per workdir and role: a lease file with owner, host, pid and a heartbeat.

Two trainers (or two index builders) on one workdir corrupt each other: the second deletes the
first's in-progress checkpoint, versions get published out of order. Each job's process 0 takes
its role's lease before it writes anything, and refuses to start while another live holder has
it. The lease is `<workdir>/.lease-<role>.json`:

    {"owner": <uuid>, "role": "trainer", "host": ..., "pid": ..., "started": t, "heartbeat": t}

A background thread renews `heartbeat` every `heartbeat_every` seconds. A lease is *stale* when
its heartbeat is older than `stale_after` seconds, or when its holder ran on this host and that
pid is gone (a killed job restarts at once instead of waiting out the timeout); a stale lease
is taken over with a warning, a live one only with `force=True` (`--force`). A holder whose
lease was taken over notices at its next heartbeat or `check()` and must stop writing.

Works on local disk and on `gs://` alike (etils.epath): a lease write replaces the file whole
(`storage.write_text`: write-then-rename locally, one object write on object storage, where a
single object write is atomic), and a taker re-reads the file after a settle delay, so of two
racing takers exactly one keeps it. On object storage that is last-writer-wins, not mutual
exclusion: two takers whose writes both land before either re-reads (a settle delay shorter
than the store's write latency) can both believe they hold it. True exclusion there needs a
conditional write (GCS `ifGenerationMatch` preconditions), which etils.epath does not expose;
the heartbeat check (`check()` before each publish) bounds how long a loser keeps writing.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any

from etils import epath

from realm_jax import storage

DEFAULT_STALE_AFTER = 120.0


class LeaseHeldError(ValueError):
  """Another live process holds the lease; the message names it."""


class LeaseLostError(RuntimeError):
  """Our lease was taken over by another process: stop writing to the workdir."""


def lease_path(workdir: epath.PathLike, role: str) -> epath.Path:
  return epath.Path(workdir) / f".lease-{role}.json"


def _read(path: epath.Path) -> dict[str, Any] | None:
  try:
    record = json.loads(path.read_text())
  except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
    return None
  return record if isinstance(record, dict) and "owner" in record else None


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # exists, owned by someone else
    return True
  return True


def describe(record: dict[str, Any], now: float | None = None) -> str:
  """`host <h> pid <p>, last heartbeat <s>s ago` of a lease record."""
  now = time.time() if now is None else now
  return (f"host {record.get('host')} pid {record.get('pid')}, last heartbeat "
          f"{now - float(record.get('heartbeat', 0.0)):.0f}s ago")


def is_stale(record: dict[str, Any], stale_after: float, now: float | None = None) -> bool:
  """Heartbeat older than `stale_after`, or its holder was on this host and has exited."""
  now = time.time() if now is None else now
  if now - float(record.get("heartbeat", 0.0)) > stale_after:
    return True
  return record.get("host") == socket.gethostname() and not _pid_alive(int(record.get("pid", -1)))


class Lease:
  """A held lease; renews itself in a daemon thread until `release()`."""

  def __init__(self, path: epath.Path, role: str, heartbeat_every: float):
    self.path, self.role = path, role
    self.record = dict(owner=uuid.uuid4().hex, role=role, host=socket.gethostname(),
                       pid=os.getpid(), started=time.time(), heartbeat=time.time())
    self._every = heartbeat_every
    self._stop = threading.Event()
    self._lost: str | None = None
    self._thread = threading.Thread(target=self._beat, name=f"Lease-{role}", daemon=True)

  @property
  def owner(self) -> str:
    return self.record["owner"]

  def _write(self):
    self.record["heartbeat"] = time.time()
    storage.write_text(self.path, json.dumps(self.record))

  def _holder(self) -> dict[str, Any] | None:
    return _read(self.path)

  def _beat(self):
    while not self._stop.wait(self._every):
      try:
        holder = self._holder()
        if holder is None or holder["owner"] != self.owner:
          self._lost = (describe(holder) if holder else "the lease file was removed")
          logging.error("lease: the %s lease of %s was taken over (%s); this process must "
                        "stop writing", self.role, self.path.parent, self._lost)
          return
        self._write()
      except OSError as e:  # storage hiccup: try again at the next beat; stale only if it lasts
        logging.warning("lease: could not renew %s (%s)", self.path, e)

  def check(self):
    """Raises LeaseLostError if another process holds the lease now."""
    if self._lost is None:
      holder = self._holder()
      if holder is None or holder["owner"] != self.owner:
        self._lost = describe(holder) if holder else "the lease file was removed"
    if self._lost is not None:
      raise LeaseLostError(f"the {self.role} lease of {self.path.parent} was taken over "
                           f"({self._lost}); stopping without writing")

  def release(self):
    """Stops renewing; removes the lease file if it is still ours. Safe to call twice."""
    self._stop.set()
    if self._thread.is_alive():
      self._thread.join(timeout=5)
    try:
      holder = self._holder()
      if holder is not None and holder["owner"] == self.owner:
        self.path.unlink()
    except OSError as e:
      logging.warning("lease: could not release %s (%s)", self.path, e)

  def __enter__(self) -> "Lease":
    return self

  def __exit__(self, *exc):
    self.release()


def acquire(workdir: epath.PathLike, role: str, force: bool = False,
            stale_after: float = DEFAULT_STALE_AFTER, heartbeat_every: float | None = None,
            settle_seconds: float = 0.2) -> Lease:
  """Takes the `role` lease of `workdir` (created if missing) or raises LeaseHeldError."""
  if stale_after <= 0:
    raise ValueError(f"stale_after={stale_after} must be > 0")
  heartbeat_every = stale_after / 4 if heartbeat_every is None else heartbeat_every
  path = lease_path(workdir, role)
  path.parent.mkdir(parents=True, exist_ok=True)
  held = Lease(path, role, heartbeat_every)
  holder = _read(path)
  if holder is None and path.exists():
    logging.warning("lease: replacing the unreadable lease file %s", path)
  if holder is not None:
    if not is_stale(holder, stale_after):
      if not force:
        raise LeaseHeldError(
            f"another {role} holds {path.parent} ({describe(holder)}); stop it first, or pass "
            f"--force to take over (its lease goes stale {stale_after:.0f}s after its last "
            "heartbeat)")
      logging.warning("lease: --force: taking the %s lease of %s from a live holder (%s)", role,
                      path.parent, describe(holder))
    else:
      logging.warning("lease: taking over the stale %s lease of %s (%s)", role, path.parent,
                      describe(holder))
  if holder is None and not path.exists() and not storage.is_object_storage(path):
    # Local disk: an exclusive create, so of two takers of a free lease exactly one gets it.
    try:
      fd = os.open(os.fspath(path), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
      return acquire(workdir, role, force, stale_after, heartbeat_every, settle_seconds)
    with os.fdopen(fd, "w") as f:
      f.write(json.dumps(held.record))
  else:
    held._write()  # pylint: disable=protected-access
  time.sleep(settle_seconds)  # a racing taker's rename lands before we look again
  winner = _read(path)
  if winner is None or winner["owner"] != held.owner:
    raise LeaseHeldError(f"another {role} took {path.parent} at the same time "
                         f"({describe(winner) if winner else 'and released it'}); not starting")
  held._thread.start()  # pylint: disable=protected-access
  logging.info("lease: %s of %s held by pid %d", role, path.parent, os.getpid())
  return held
