"""LaggedMetrics: each step finished once, in order, one step late; flush checks the rest."""

import time

import jax.numpy as jnp
import pytest

from realm_jax.train import lagged_metrics


class Bad(Exception):
  pass


def _recorder(bad_step=None):
  finished = []

  def finish(step, scalars):
    finished.append((step, scalars))
    if step == bad_step:
      raise Bad(step)
  return finished, finish


def test_lag_finishes_the_previous_step_on_push_and_the_last_on_flush():
  finished, finish = _recorder()
  records = lagged_metrics.LaggedMetrics(finish, lag=True)
  for step in (1, 2, 3):
    records.push(step, {"loss": jnp.float32(step / 2)}, {"host": 10.0 * step}, time.time())
    assert [s for s, _ in finished] == list(range(1, step))  # one step behind
    assert records.pending_step == step
  records.flush()
  assert records.pending_step is None
  assert [s for s, _ in finished] == [1, 2, 3]
  assert [(r["loss"], r["host"]) for _, r in finished] == [(0.5, 10.0), (1.0, 20.0), (1.5, 30.0)]
  assert all(isinstance(r["loss"], float) and r["step_seconds"] >= 0 for _, r in finished)
  records.flush()  # nothing pending: nothing finished twice
  assert len(finished) == 3


def test_without_lag_each_push_finishes_its_own_step():
  finished, finish = _recorder()
  records = lagged_metrics.LaggedMetrics(finish, lag=False)
  for step in (1, 2):
    records.push(step, {"loss": jnp.float32(1.0)}, {}, time.time())
    assert [s for s, _ in finished] == list(range(1, step + 1))
    assert records.pending_step is None


def test_step_seconds_tile_the_wall_clock():
  """Consecutive steps' step_seconds add up to the time from the first start to the last fetch
  (lagged steps are not counted from their own start, which overlaps the previous step)."""
  finished, finish = _recorder()
  records = lagged_metrics.LaggedMetrics(finish, lag=True)
  first_start = time.time()
  for step in (1, 2, 3):
    records.push(step, {"loss": jnp.float32(0.0)}, {}, first_start if step == 1 else time.time())
    time.sleep(0.05)
  records.flush()
  total = time.time() - first_start
  seconds = [r["step_seconds"] for _, r in finished]
  assert sum(seconds) == pytest.approx(total, abs=0.02)
  assert all(s >= 0.04 for s in seconds[:2])  # the sleeps between fetches are counted once


def test_a_failing_step_raises_at_the_next_push_and_is_not_finished_again():
  finished, finish = _recorder(bad_step=2)
  records = lagged_metrics.LaggedMetrics(finish, lag=True)
  records.push(1, {"loss": jnp.float32(0.0)}, {}, time.time())
  records.push(2, {"loss": jnp.float32(0.0)}, {}, time.time())
  with pytest.raises(Bad, match="2"):
    records.push(3, {"loss": jnp.float32(0.0)}, {}, time.time())
  assert [s for s, _ in finished] == [1, 2]  # step 3 is dispatched but never recorded


def test_settle_records_the_pending_step_unless_a_record_failed():
  finished, finish = _recorder()
  records = lagged_metrics.LaggedMetrics(finish, lag=True)
  records.push(1, {"loss": jnp.float32(0.0)}, {}, time.time())
  records.settle()  # the loop stopped on another error: step 1 ran, so it is recorded
  assert [s for s, _ in finished] == [1]

  finished, finish = _recorder(bad_step=1)
  records = lagged_metrics.LaggedMetrics(finish, lag=True)
  records.push(1, {"loss": jnp.float32(0.0)}, {}, time.time())
  with pytest.raises(Bad):
    records.push(2, {"loss": jnp.float32(0.0)}, {}, time.time())
  records.settle()  # step 1's record failed (e.g. NaN): step 2 is never recorded after it
  records.flush()
  assert [s for s, _ in finished] == [1]
