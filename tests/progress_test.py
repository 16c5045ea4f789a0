"""The shared progress reporter: when it logs, and what a line says."""

import logging

from realm_jax import progress as progress_lib


def _reporter(caplog, **kwargs):
  caplog.set_level(logging.INFO, logger="realm_jax.progress")
  return progress_lib.Progress(**kwargs)


def test_logs_every_count_and_at_the_end(caplog):
  p = _reporter(caplog, name="embed", total=25, unit="blocks", every_count=10)
  for _ in range(25):
    p.update(1)
  lines = [r.getMessage() for r in caplog.records]
  assert len(lines) == 3  # at 10, 20 and the total
  assert lines[0].startswith("[embed] 10/25 blocks (40.0%)")
  assert "ETA" in lines[0] and "blocks/s" in lines[0]
  assert lines[-1].startswith("[embed] 25/25 blocks (100.0%)") and "took" in lines[-1]
  p.close()  # already finished: no second final line
  assert len(caplog.records) == 3


def test_batched_updates_cross_periods_and_resume_rate(caplog):
  p = _reporter(caplog, name="train", total=100, start=40, every_count=10)
  p.update(25, {"loss": 1.5})  # 40 -> 65 crosses 50 and 60: one line
  assert len(caplog.records) == 1
  assert "65/100" in caplog.records[0].getMessage()
  assert "loss 1.5" in caplog.records[0].getMessage()
  assert p.done == 65


def test_default_period_is_a_tenth_and_close_logs_early_stop(caplog):
  p = _reporter(caplog, name="eval", total=50, unit="queries")
  p.update(4)
  assert not caplog.records
  p.update(1)
  assert len(caplog.records) == 1
  p.close()
  assert len(caplog.records) == 2 and "5/50" in caplog.records[-1].getMessage()


def test_format_seconds():
  assert progress_lib.format_seconds(3725) == "1:02:05"
  assert progress_lib.format_seconds(float("nan")) == "0:00:00"
  assert progress_lib.format_seconds(-3) == "0:00:00"
