"""Metrics a person can plot: `metrics.jsonl` and TensorBoard event files that survive crashes.

Only process 0 writes; other processes get a writer that does nothing.

What a crash can and cannot do to them:
- Every record is one complete line, handed to the OS in one `os.write` as soon as it is
  written (local disk), so a SIGKILL loses nothing already written and never tears a line in
  the middle of the file. `flush` (every checkpoint, and every `flush_every_seconds`) also
  fsyncs, for a machine that dies. On remote storage (gs://) lines are buffered and reach
  storage at `flush`.
- A resumed run first rewrites `metrics.jsonl` (write-then-rename) keeping only the records at
  or before the restored step, so the steps it replays are logged once, not twice; its
  TensorBoard events start with a purge marker that hides the old events past that step.
- A torn last line (a kill mid-write on a filesystem that splits writes, or remote storage) is
  skipped and counted by `read_metrics_counted`, and dropped by that rewrite.
- TensorBoard events are written synchronously in the caller's thread (tensorboardX's own
  `SummaryWriter` writes from a thread: when its file write fails, e.g. a full disk, that
  thread dies and the next `add_scalar` blocks forever on its full queue). A failed write
  raises `MetricsWriteError` (an OSError naming the file) at once.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
import uuid
from typing import Any, Iterable, Mapping, Sequence

from etils import epath

from realm_jax import storage

METRICS_FILE = "metrics.jsonl"
HPARAMS_FILE = "hparams.json"


class MetricsWriteError(OSError):
  """Writing metrics failed (e.g. the disk is full); the message names the file."""


def _is_local(path: epath.Path) -> bool:
  return "://" not in os.fspath(path)


def _write_error(path, e: OSError) -> MetricsWriteError:
  return MetricsWriteError(e.errno, f"cannot write metrics to {path}: {e.strerror or e}")


class _JsonlFile:
  """Appends complete lines: one `os.write` per line on local disk, buffered elsewhere."""

  def __init__(self, path: epath.Path):
    self.path = path
    self._fd = self._file = None
    self.broken: OSError | None = None  # a failed write: nothing more is appended after it
    if _is_local(path):
      self._fd = os.open(os.fspath(path), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    else:
      self._file = path.open("a")

  def write_line(self, line: str):
    if self.broken is not None:
      raise _write_error(self.path, self.broken)
    try:
      if self._fd is not None:
        data = (line + "\n").encode("utf-8")
        while data:  # a regular file takes it all at once unless the disk fills mid-line
          data = data[os.write(self._fd, data):]
      else:
        self._file.write(line + "\n")
    except OSError as e:
      self.broken = e
      raise _write_error(self.path, e) from e

  def flush(self):
    try:
      if self._fd is not None:
        os.fsync(self._fd)
      else:
        self._file.flush()
    except OSError as e:
      raise _write_error(self.path, e) from e

  def close(self):
    fd, file, self._fd, self._file = self._fd, self._file, None, None
    if fd is not None:
      os.close(fd)
    if file is not None:
      file.close()


class _EventFile:
  """TensorBoard events written in the caller's thread (no queue, no writer thread)."""

  def __init__(self, logdir: epath.Path, purge_step: int | None):
    # pylint: disable=g-import-not-at-top
    from tensorboardX import event_file_writer
    from tensorboardX import record_writer
    from tensorboardX import summary as tb_summary
    from tensorboardX.proto import event_pb2
    from tensorboardX.proto import summary_pb2
    # pylint: enable=g-import-not-at-top
    self._pb, self._summary_pb, self._summary = event_pb2, summary_pb2, tb_summary
    self.logdir = os.fspath(logdir)
    try:
      record_writer.directory_check(self.logdir)
      self._writer = event_file_writer.EventsWriter(
          os.path.join(self.logdir, "events"),  # unique: two writers in one second on a host
          filename_suffix=f".{os.getpid()}.{uuid.uuid4().hex[:6]}")
      if purge_step is not None:  # TensorBoard hides older events at steps >= purge_step
        self._add(event_pb2.Event(step=purge_step, session_log=event_pb2.SessionLog(
            status=event_pb2.SessionLog.START)))
    except OSError as e:
      raise _write_error(self.logdir, e) from e
    self.path = getattr(self._writer, "_file_name", self.logdir)
    self.broken: OSError | None = None

  def _add(self, event):
    event.wall_time = event.wall_time or time.time()
    self._writer.write_event(event)

  def _guarded(self, fn, *args):
    if self.broken is not None:
      raise _write_error(self.path, self.broken)
    try:
      fn(*args)
    except OSError as e:
      self.broken = e
      raise _write_error(self.path, e) from e

  def add_scalars(self, step: int, scalars: Mapping[str, float]):
    values = [v for tag, x in scalars.items() for v in self._summary.scalar(tag, x).value]
    summary = self._summary_pb.Summary(value=values)
    self._guarded(self._add, self._pb.Event(step=step, summary=summary))

  def add_summary(self, step: int, summary):
    self._guarded(self._add, self._pb.Event(step=step, summary=summary))

  def flush(self):
    self._guarded(self._writer.flush)  # flushes and fsyncs (tensorboardX's RecordWriter)

  def close(self):
    """Flushes and closes; a writer that already failed closes its file quietly (the buffer
    it cannot write is dropped; its error was raised when it happened)."""
    broken = self.broken
    try:
      self._guarded(self._writer.close)  # EventsWriter.close flushes first
    except MetricsWriteError:
      if broken is None:
        raise


def flatten_config(config: Any, prefix: str = "") -> dict[str, Any]:
  """{"train.batch_size": 8, ...}: the scalar fields of a (nested) config; lists as strings."""
  items = config.items() if hasattr(config, "items") else []
  flat: dict[str, Any] = {}
  for key, value in items:
    name = f"{prefix}{key}"
    if hasattr(value, "items"):
      flat.update(flatten_config(value, name + "."))
    elif value is None or isinstance(value, (bool, int, float, str)):
      flat[name] = value
    else:
      flat[name] = json.dumps(value, default=str) if isinstance(value, (list, tuple)) else str(
          value)
  return flat


class NonFiniteMetrics(FloatingPointError):
  """A train step's loss or gradient norm is NaN or infinite: the run stops, unsaved."""


GUARDED_METRICS = ("loss", "grad_norm")


def nonfinite(scalars: Mapping[str, float]) -> dict[str, float]:
  """The `GUARDED_METRICS` of a step's scalars that are NaN or infinite ({} when all finite)."""
  return {k: scalars[k] for k in GUARDED_METRICS if k in scalars and not math.isfinite(scalars[k])}


def nonfinite_error(bad: Mapping[str, float], step: int, checkpoints: Sequence[int],
                    where: str) -> NonFiniteMetrics:
  """The error for step `step`'s non-finite values `bad`, naming the checkpoint to resume from.

  Every process has the same (global) values, so all stop at the same step. The state after
  such a step is never checkpointed.
  """
  last = max(checkpoints) if checkpoints else None
  resume = (f"the last checkpoint is step {last}: resume from it (e.g. with a lower learning "
            "rate or without the bad data)" if last is not None else "no checkpoint was saved")
  return NonFiniteMetrics(
      f"{where}: step {step} has non-finite {', '.join(f'{k}={v}' for k, v in bad.items())}; "
      f"stopped without saving this state ({resume}). The step's record is in metrics.jsonl.")


def tensorboard_tag(name: str) -> str:
  """A metric name as a TensorBoard tag: "qa_eval/dev_recall@5" -> "qa_eval/dev_recall_at_5".

  TensorBoard allows [A-Za-z0-9_./-]; tensorboardX would rewrite other characters itself
  (recall@5 -> recall_5) and log a warning per scalar per write. metrics.jsonl keeps the name.
  """
  return re.sub(r"[^A-Za-z0-9_./-]", "_", name.replace("@", "_at_"))


class MetricWriter:
  """Appends `{"step": s, "phase": ..., name: value}` lines and TensorBoard scalars.

  Args:
    directory: the run's `metrics/` folder.
    enabled: False on processes other than 0 (everything is then a no-op).
    phase: the default phase of `write` ("realm", "ict").
    keep_through_step: the step the run resumes from (0 for a fresh run): records of later
      steps, left by a run that crashed after its last checkpoint, are dropped first (they are
      about to be logged again). None keeps the file as it is.
    flush_every_seconds: `write` also flushes (and fsyncs) when this long passed since the last
      flush (0: only explicit `flush` calls).
  """

  def __init__(self, directory: epath.PathLike, enabled: bool = True, phase: str = "train",
               keep_through_step: int | None = None, flush_every_seconds: float = 30.0):
    self.enabled = enabled
    self.phase = phase
    self.flush_every_seconds = float(flush_every_seconds)
    self.kept: list[dict] = []  # the records already in the file (after truncation)
    self.dropped = 0  # records past keep_through_step removed at start
    self._jsonl = self._tb = None
    self._last_flush = time.monotonic()
    if not enabled:
      return
    self.directory = epath.Path(directory)
    self.path = self.directory / METRICS_FILE
    try:
      self.directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
      raise _write_error(self.directory, e) from e
    if keep_through_step is not None:
      self.kept, self.dropped = truncate_after(self.path, keep_through_step)
    try:
      self._jsonl = _JsonlFile(self.path)
    except OSError as e:
      raise _write_error(self.path, e) from e
    try:
      self._tb = _EventFile(self.directory / "tensorboard",
                            None if keep_through_step is None else keep_through_step + 1)
    except BaseException:
      self._jsonl.close()
      raise

  def has_record(self, phase: str, step: int | None = None) -> bool:
    """Whether the file held a `phase` record (at `step`) when this writer opened it."""
    return any(r.get("phase") == phase and (step is None or r.get("step") == step)
               for r in self.kept)

  def write(self, step: int, scalars: Mapping[str, float], phase: str | None = None):
    """One record: a complete line in metrics.jsonl and `phase/name` scalars in TensorBoard."""
    if not self.enabled:
      return
    phase = phase or self.phase
    clean = {k: float(v) for k, v in scalars.items()}
    self._jsonl.write_line(json.dumps({"step": int(step), "phase": phase, **clean}))
    finite = {tensorboard_tag(f"{phase}/{k}"): v for k, v in clean.items() if math.isfinite(v)}
    if finite:
      self._tb.add_scalars(int(step), finite)
    if self.flush_every_seconds and (time.monotonic() - self._last_flush >=
                                     self.flush_every_seconds):
      self.flush()

  def write_hparams(self, config: Any, step: int = 0,
                    metric_tags: Iterable[str] = ()) -> dict[str, Any]:
    """The run's config, once: `hparams.json` (atomic), a `phase="config"` JSONL record, and
    TensorBoard's hparams plugin data (the session's values; `metric_tags` are the scalar tags,
    e.g. "eval/span_accuracy", its table shows next to them). Returns the flat config."""
    flat = flatten_config(config)
    if not self.enabled:
      return flat
    try:
      storage.write_text(self.directory / HPARAMS_FILE, json.dumps(flat, indent=1,
                                                                   sort_keys=True))
    except OSError as e:
      raise _write_error(self.directory / HPARAMS_FILE, e) from e
    self._jsonl.write_line(json.dumps({"step": int(step), "phase": "config", "config": flat}))
    from tensorboardX import summary as tb_summary  # pylint: disable=g-import-not-at-top
    experiment, start, end = tb_summary.hparams(
        {k: v for k, v in flat.items() if v is not None}, {tag: 0.0 for tag in metric_tags})
    for part in (experiment, start, end):
      self._tb.add_summary(int(step), part)
    return flat

  def flush(self):
    """Puts every record written so far on storage (fsync on local disk)."""
    if self.enabled:
      self._last_flush = time.monotonic()
      self._jsonl.flush()
      self._tb.flush()

  def close(self):
    """Flushes and closes both files; closes them even when the flush fails (then raises)."""
    if not self.enabled or self._jsonl is None:
      return
    jsonl, tb, self._jsonl, self._tb = self._jsonl, self._tb, None, None
    self.enabled = False
    try:
      if jsonl.broken is None:
        jsonl.flush()
    finally:
      try:
        jsonl.close()
      finally:
        tb.close()


def read_metrics_counted(path: epath.PathLike) -> tuple[list[dict], int]:
  """(records, torn lines) of a metrics.jsonl; a line that is not a JSON object is torn (only
  the last line can be, and only after a kill mid-write). A missing file has no records."""
  path = epath.Path(path)
  try:
    text = path.read_bytes().decode("utf-8", errors="replace")
  except FileNotFoundError:
    return [], 0
  records, torn = [], 0
  for line in text.split("\n"):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError:
      torn += 1
      continue
    if isinstance(record, dict) and "step" in record:
      records.append(record)
    else:
      torn += 1
  return records, torn


def read_metrics(path: epath.PathLike) -> list[dict]:
  """All complete records of a metrics.jsonl (tests, the demo table, plotting); torn lines are
  skipped with a warning."""
  records, torn = read_metrics_counted(path)
  if torn:
    logging.warning("metrics: skipped %d torn line(s) of %s", torn, path)
  return records


def truncate_after(path: epath.PathLike, step: int) -> tuple[list[dict], int]:
  """Keeps the records with `step <= step` (every phase) and drops torn lines, atomically.

  A run that resumes from checkpoint `step` replays the steps after it: their records from
  before the crash would otherwise appear twice. Returns (kept records, dropped count).
  """
  path = epath.Path(path)
  if not path.exists():
    return [], 0
  records, torn = read_metrics_counted(path)
  kept = [r for r in records if isinstance(r.get("step"), (int, float)) and r["step"] <= step]
  dropped = len(records) - len(kept)
  if dropped or torn:
    storage.write_text(path, "".join(json.dumps(r) + "\n" for r in kept))
    logging.info("metrics: resuming at step %d: dropped %d record(s) of later steps%s from %s",
                 step, dropped, f" and {torn} torn line(s)" if torn else "", path)
  return kept, dropped


# A held-out recall below this fraction of the best one so far (once the best is at least
# RECALL_DROP_FLOOR) is reported: a retriever that collapsed mid-training can recover, but its
# run trained for a while on wrong documents, and its final numbers say so only indirectly.
RECALL_DROP_FRACTION = 0.5
RECALL_DROP_FLOOR = 0.2


def recall_drops(recalls, fraction: float = RECALL_DROP_FRACTION,
                 floor: float = RECALL_DROP_FLOOR) -> list[tuple[int, float, int, float]]:
  """[(best step, best recall, step, recall), ...] for each (step, recall) of `recalls` (in
  step order) that fell below `fraction` x the best recall before it (best >= `floor`)."""
  drops, best, best_step = [], -1.0, None
  for step, value in recalls:
    if best >= floor and value < fraction * best:
      drops.append((best_step, best, step, value))
    if value > best:
      best, best_step = value, step
  return drops


def recall_drop_warning(drops, key: str) -> str:
  """One line naming the worst drop of `recall_drops`."""
  best_step, best, step, value = min(drops, key=lambda d: d[3] / max(d[1], 1e-9))
  more = f" (and {len(drops) - 1} more drop(s))" if len(drops) > 1 else ""
  return (f"WARNING: held-out {key} fell from {best:.3f} (index step {best_step}) to "
          f"{value:.3f} (index step {step}){more}: the retriever collapsed for a while, and "
          "the run trained on wrong documents meanwhile.")
