"""One writer per workdir: the lease refuses a second live holder and names it."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from realm_jax import lease


def test_second_holder_refused_with_host_and_pid(tmp_path):
  first = lease.acquire(tmp_path, "trainer", settle_seconds=0)
  try:
    with pytest.raises(lease.LeaseHeldError) as err:
      lease.acquire(tmp_path, "trainer", settle_seconds=0)
    message = str(err.value)
    assert socket.gethostname() in message and f"pid {os.getpid()}" in message
    assert "--force" in message
    first.check()  # still ours
    # Another role is independent.
    lease.acquire(tmp_path, "index_builder", settle_seconds=0).release()
  finally:
    first.release()
  assert not lease.lease_path(tmp_path, "trainer").exists()
  lease.acquire(tmp_path, "trainer", settle_seconds=0).release()  # free again


def test_force_takes_over_and_the_old_holder_notices(tmp_path):
  first = lease.acquire(tmp_path, "index_builder", settle_seconds=0, heartbeat_every=0.05)
  second = lease.acquire(tmp_path, "index_builder", force=True, settle_seconds=0)
  with pytest.raises(lease.LeaseLostError):
    first.check()
  time.sleep(0.2)  # the old holder's heartbeat thread sees it too, and stops renewing
  assert json.loads(lease.lease_path(tmp_path, "index_builder").read_text())["owner"] == \
      second.owner
  first.release()  # not ours any more: must not delete the new holder's file
  assert lease.lease_path(tmp_path, "index_builder").exists()
  second.check()
  second.release()


def _write_record(path, **fields):
  record = dict(owner="someone", role="trainer", host=socket.gethostname(), pid=os.getpid(),
                started=time.time(), heartbeat=time.time())
  record.update(fields)
  path.write_text(json.dumps(record))


def test_stale_heartbeat_and_dead_local_pid_are_taken_over(tmp_path):
  path = lease.lease_path(tmp_path, "trainer")
  _write_record(path, host="another-host", heartbeat=time.time() - 1000)
  lease.acquire(tmp_path, "trainer", stale_after=60, settle_seconds=0).release()

  done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                        capture_output=True, text=True, check=True)
  _write_record(path, pid=int(done.stdout))  # fresh heartbeat, but that process has exited
  lease.acquire(tmp_path, "trainer", settle_seconds=0).release()

  _write_record(path, host="another-host")  # live on another host: refused
  with pytest.raises(lease.LeaseHeldError, match="another-host"):
    lease.acquire(tmp_path, "trainer", settle_seconds=0)


def test_heartbeat_renews(tmp_path):
  held = lease.acquire(tmp_path, "trainer", settle_seconds=0, heartbeat_every=0.05)
  try:
    before = json.loads(lease.lease_path(tmp_path, "trainer").read_text())["heartbeat"]
    time.sleep(0.3)
    after = json.loads(lease.lease_path(tmp_path, "trainer").read_text())["heartbeat"]
    assert after > before
  finally:
    held.release()


def test_garbage_lease_file_is_replaced(tmp_path):
  lease.lease_path(tmp_path, "trainer").write_bytes(b"\x00\xffnot json")
  held = lease.acquire(tmp_path, "trainer", settle_seconds=0)
  held.check()
  held.release()
