r"""Fault campaign: randomized SIGKILLs of a real trainer and a real index builder (issue 8).

  .venv/bin/python benchmarks/fault_campaign.py --trials=5 --kills_per_trial=4 --seed=0 \
      --workdir_root=/tmp/fault_campaign --out=/tmp/fault_campaign.json

Every trial starts two processes on one fresh workdir, exactly as a person would:

  python -m realm_jax.main --mode=train --config=experiments/realm_facts.py:size=tiny \
      --config.retrieval.index_source=builder <small overrides> --workdir=W
  python -m realm_jax.main --mode=index_builder --workdir=W

and SIGKILLs them at seeded random moments: a kill is tied either to the trainer's progress
(once its log shows step s, plus a random fraction of a second: mid-step, mid-checkpoint,
mid-swap) or to a role's start-up (a random delay after its (re)start: corpus preparation,
restore, compile, the wait for the first index). After each kill the killed role is restarted
on the same workdir at once (its lease names a dead local pid, so it is stale). Once per trial
(`--mid_publish`) the builder is also restarted with the test hook
`REALM_INDEX_TEST_PAUSE=before_manifest` and killed where it pauses: shards written, manifest
not yet (a publish cut in the middle).

While the processes run, the campaign watches the workdir every `--poll` seconds, with checks
of its own that share no code with realm_jax:
- every complete index version (`index/<step>/MANIFEST.json`) is verified as soon as it
  appears: sha256 of every file the manifest lists, shapes, doc ids unique and in range,
  finite embeddings; `index/LATEST` must never move backwards;
- at each trainer kill, the newest *finished* checkpoint (`checkpoints/<step>`, a plain number:
  orbax writes `<step>.orbax-checkpoint-tmp-*` and renames it when complete) is recorded, and
  the restarted trainer must log `resumed from step <that step>` (or start from scratch when
  there was none).

At the end of a trial: every version the trainer ever loaded (its `index: version N` log lines
and the `index_step` of its metrics) must have been verified complete and valid ("partial
versions loaded" counts those that were not); every train step 1..N must appear exactly once
in `metrics/metrics.jsonl` (lost, duplicated and torn lines counted); the final run must exit 0
with a finite loss. The summary is printed and, with `--out`, written as JSON; the exit code is
non-zero when any invariant fails.

Children get one CPU device each and share a persistent XLA compilation cache
(`--compile_cache`, default on: a restart then costs seconds, not a recompile); the cache changes
nothing the trainer or the builder do with their state.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from typing import Any

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import machine  # pylint: disable=g-import-not-at-top,wrong-import-position

# The index format's test hook (realm_jax/retrieval/index_format.py), spelled out here so the
# campaign imports nothing of the code under test.
PAUSE_ENV = "REALM_INDEX_TEST_PAUSE"
PAUSE_MARKER_ENV = "REALM_INDEX_TEST_PAUSE_MARKER"
MANIFEST = "MANIFEST.json"

# Small overrides of experiments/realm_facts.py:size=tiny (the sizes of tests/tiny_configs.py):
# 200 documents, hidden 32, batch 8, one CPU device; a trainer run is ~10 s of CPU.
BASE_OVERRIDES = {
    "data.num_entities": 40,
    "data.mentions_per_entity": 4,
    "data.query_len": 24,
    "train.batch_size": 8,
    "eval.batch_size": 8,
    "ict.batch_size": 8,
    "retrieval.k": 4,
    "model.hidden_size": 32,
    "model.intermediate_size": 64,
    "model.num_heads": 2,
    "retrieval.index_source": "builder",
    "train.log_every": 1,
    "retrieval.watch_poll_seconds": 0.2,
    "retrieval.builder_poll_seconds": 0.2,
    "retrieval.first_index_timeout": 180.0,
}

_STEP_RE = re.compile(r"\[(?:realm|train)\][^\n]*?\b(\d+)/(\d+)\b")
_RESUMED_RE = re.compile(r"resumed from (?:checkpoint |step )?(\d+)")
_FRESH_RE = re.compile(r"checkpoint: saving step 0\b")
_INDEX_RE = re.compile(r"index: version (\d+)")


# ---- Checks of the workdir (no realm_jax code) ----------------------------------------------

def finished_checkpoints(checkpoint_dir: str) -> list[int]:
  """Steps of complete checkpoints: folders named by a plain number (orbax's tmp folders are not)."""
  try:
    names = os.listdir(checkpoint_dir)
  except FileNotFoundError:
    return []
  return sorted(int(n) for n in names
                if n.isdigit() and os.path.isdir(os.path.join(checkpoint_dir, n)))


def unfinished_checkpoints(checkpoint_dir: str) -> list[str]:
  """Names of in-flight (or abandoned) orbax saves: `<step>.orbax-checkpoint-tmp-*`."""
  try:
    return sorted(n for n in os.listdir(checkpoint_dir) if "tmp" in n)
  except FileNotFoundError:
    return []


def _mtime(path: str) -> float:
  """Modification time, or 0 for a path that is gone."""
  try:
    return os.stat(path).st_mtime
  except FileNotFoundError:
    return 0.0


def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      digest.update(chunk)
  return digest.hexdigest()


def verify_version(version_dir: str) -> tuple[str, str]:
  """("ok" | "bad" | "vanished", why) for one index version folder.

  "bad": no manifest, a checksum mismatch, inconsistent shapes, doc ids out of range or
  repeated, non-finite embeddings. "vanished": a file disappeared while reading (pruned).
  """
  try:
    manifest_path = os.path.join(version_dir, MANIFEST)
    if not os.path.exists(manifest_path):
      return "bad", "no MANIFEST.json"
    with open(manifest_path) as f:
      manifest = json.load(f)
    num_docs, dim = int(manifest["num_docs"]), int(manifest["dim"])
    all_ids = []
    for entry in manifest["shards"]:
      shard = os.path.join(version_dir, entry["name"])
      files = {"embeddings.npy": entry["embeddings_sha256"],
               "doc_ids.npy": entry["doc_ids_sha256"]}
      files.update(entry.get("scann_files") or {})
      for relative, sha256 in files.items():
        if _sha256(os.path.join(shard, relative)) != sha256:
          return "bad", f"checksum mismatch in {entry['name']}/{relative}"
      ids = np.load(os.path.join(shard, "doc_ids.npy"))
      emb = np.load(os.path.join(shard, "embeddings.npy"))
      if ids.shape != (entry["num_docs"],) or emb.shape != (entry["num_docs"], dim):
        return "bad", (f"{entry['name']}: ids {ids.shape}, embeddings {emb.shape}, manifest "
                       f"{entry['num_docs']} x {dim}")
      if not np.isfinite(emb).all():
        return "bad", f"{entry['name']}: non-finite embeddings"
      all_ids.append(ids)
    ids = np.concatenate(all_ids) if all_ids else np.zeros([0], np.int64)
    if len(ids) != num_docs:
      return "bad", f"{len(ids)} doc ids, the manifest says {num_docs}"
    if len(np.unique(ids)) != len(ids):
      return "bad", "repeated doc ids"
    if len(ids) and (ids.min() < 0 or ids.max() >= num_docs):
      return "bad", f"doc ids outside [0, {num_docs})"
    return "ok", ""
  except FileNotFoundError as e:
    return "vanished", str(e)
  except (ValueError, KeyError, TypeError, OSError) as e:  # torn JSON, garbage .npy, ...
    if not os.path.isdir(version_dir):
      return "vanished", str(e)
    return "bad", f"{type(e).__name__}: {e}"


def read_metrics(path: str) -> tuple[list[dict], int]:
  """(records, torn lines) of a metrics.jsonl; a line that does not parse is torn."""
  records, torn = [], 0
  try:
    with open(path, encoding="utf-8", errors="replace") as f:
      lines = f.read().split("\n")
  except FileNotFoundError:
    return [], 0
  for line in lines:
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError:
      torn += 1
      continue
    if isinstance(record, dict):
      records.append(record)
    else:
      torn += 1
  return records, torn


def count_train_records(records: list[dict], num_steps: int,
                        train_phases=("realm", "train")) -> dict[str, Any]:
  """Lost / duplicated train-step records: every step 1..num_steps must appear exactly once."""
  counts: dict[int, int] = {}
  for r in records:
    if r.get("phase") in train_phases:
      counts[int(r["step"])] = counts.get(int(r["step"]), 0) + 1
  lost = [s for s in range(1, num_steps + 1) if counts.get(s, 0) == 0]
  duplicated = {s: c for s, c in sorted(counts.items()) if c > 1}
  extra = sorted(s for s in counts if not 1 <= s <= num_steps)
  return dict(lost=len(lost), lost_steps=lost[:50], duplicated=sum(c - 1 for c in
                                                                  duplicated.values()),
              duplicated_steps=list(duplicated)[:50], out_of_range=extra[:50])


# ---- Processes --------------------------------------------------------------------------------

@dataclasses.dataclass
class Child:
  """One started trainer or builder process and its log."""
  role: str
  number: int
  proc: subprocess.Popen
  log_path: str
  started: float
  armed: bool = False  # started with the before_manifest pause hook
  killed_by_us: bool = False
  exited_by_itself: bool = False  # exit code 0 without a kill (the builder: all indexed)
  _offset: int = 0
  max_step: int = -1  # highest train step this run logged
  first_step: int | None = None  # the first train step this run logged (log_every=1)
  resumed_from: int | None = None
  fresh_start: bool = False
  index_versions: list[int] = dataclasses.field(default_factory=list)
  last_line: str = ""
  marker: str | None = None  # armed: the file the pause hook touches
  expected: int | None = None  # a restarted trainer: the newest finished checkpoint at the kill
  resume_noted: bool = False

  def alive(self) -> bool:
    return self.proc.poll() is None

  def scan_log(self):
    """Parses what the child logged since the last call."""
    try:
      with open(self.log_path, "rb") as f:
        f.seek(self._offset)
        chunk = f.read()
    except FileNotFoundError:
      return
    cut = chunk.rfind(b"\n") + 1  # whole lines only
    self._offset += cut
    for line in chunk[:cut].decode("utf-8", "replace").splitlines():
      if line.strip():
        self.last_line = line
      if self.role != "trainer":
        continue
      if (m := _STEP_RE.search(line)):
        self.max_step = max(self.max_step, int(m.group(1)))
        if self.first_step is None:
          self.first_step = int(m.group(1))
      if self.resumed_from is None and (m := _RESUMED_RE.search(line)):
        self.resumed_from = int(m.group(1))
      if _FRESH_RE.search(line) and self.resumed_from is None:
        self.fresh_start = True
      if (m := _INDEX_RE.search(line)):
        self.index_versions.append(int(m.group(1)))

  def tail(self, chars: int = 2500) -> str:
    try:
      with open(self.log_path, encoding="utf-8", errors="replace") as f:
        return f.read()[-chars:]
    except FileNotFoundError:
      return ""

  def sigkill(self):
    self.killed_by_us = True
    try:
      os.kill(self.proc.pid, signal.SIGKILL)
    except ProcessLookupError:
      pass
    self.proc.wait()
    self.scan_log()


def child_env(cache_dir: str | None, pause_marker: str | None = None) -> dict[str, str]:
  env = {k: v for k, v in os.environ.items()
         if k not in ("XLA_FLAGS", PAUSE_ENV, PAUSE_MARKER_ENV)}  # one CPU device each
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONUNBUFFERED"] = "1"
  if cache_dir:
    env.update(JAX_COMPILATION_CACHE_DIR=cache_dir, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  if pause_marker:
    env[PAUSE_ENV] = "before_manifest"
    env[PAUSE_MARKER_ENV] = pause_marker
  return env


def trainer_command(workdir: str, overrides: dict[str, Any]) -> list[str]:
  return ([sys.executable, "-m", "realm_jax.main", "--mode=train",
           "--config=experiments/realm_facts.py:size=tiny"] +
          [f"--config.{k}={v}" for k, v in overrides.items()] + [f"--workdir={workdir}"])


def builder_command(workdir: str) -> list[str]:
  return [sys.executable, "-m", "realm_jax.main", "--mode=index_builder", f"--workdir={workdir}",
          "--config_wait_seconds=300"]


# ---- The kill schedule --------------------------------------------------------------------------

@dataclasses.dataclass
class Event:
  role: str  # "trainer" or "builder"
  kind: str  # "step": once the trainer logged `step`, after `delay` s; "startup": `delay` s
  #            after the role's latest (re)start
  step: int = 0
  delay: float = 0.0
  arm: bool = False  # builder: restart it with the mid-publish pause hook
  reached: float | None = None  # when the trainer logged `step`


def make_schedule(rng: random.Random, kills: int, num_steps: int, mid_publish: bool,
                  startup_fraction: float = 0.25) -> list[Event]:
  """`kills` seeded events, both roles when kills >= 2; one builder event arms mid-publish."""
  roles = [rng.choice(("trainer", "builder")) for _ in range(kills)]
  if kills >= 2 and len(set(roles)) == 1:
    roles[rng.randrange(kills)] = "builder" if roles[0] == "trainer" else "trainer"
  step_events, startup_events = [], []
  for role in roles:
    if rng.random() < startup_fraction:
      startup_events.append(Event(role, "startup", delay=round(rng.uniform(0.5, 10.0), 2)))
    else:
      step_events.append(Event(role, "step", step=rng.randint(1, max(1, num_steps - 1)),
                               delay=round(rng.uniform(0.0, 0.3), 2)))
  events = sorted(step_events, key=lambda e: e.step)
  for event in startup_events:
    events.insert(rng.randint(0, len(events)), event)
  if mid_publish:
    builders = [e for e in events if e.role == "builder"]
    if builders:
      rng.choice(builders).arm = True
    else:  # a builder kill of its own, early enough that a publish follows it
      events.insert(0, Event("builder", "step", step=rng.randint(1, max(1, num_steps // 2)),
                             delay=round(rng.uniform(0.0, 0.3), 2), arm=True))
  return events


# ---- One trial ----------------------------------------------------------------------------------

class Trial:
  """One workdir, one trainer and one builder, the schedule's kills, and the checks."""

  def __init__(self, number: int, root: str, events: list[Event], overrides: dict[str, Any],
               cache_dir: str | None, poll: float, timeout: float, event_timeout: float,
               max_crash_restarts: int = 3, log=print):
    self.number, self.events, self.overrides = number, list(events), dict(overrides)
    self.num_steps = int(overrides["train.num_steps"])
    self.dir = os.path.join(root, f"trial-{number:02d}")
    self.workdir = os.path.join(self.dir, "workdir")
    self.logs = os.path.join(self.dir, "logs")
    self.cache_dir, self.poll, self.timeout = cache_dir, poll, timeout
    self.event_timeout, self.max_crash_restarts, self.log = event_timeout, max_crash_restarts, log
    self.children: list[Child] = []
    self.trainer: Child | None = None
    self.builder: Child | None = None
    self.counts = {"trainer": 0, "builder": 0}
    self.verified: dict[int, list[tuple[str, str]]] = {}  # step -> [(status, why), ...]
    self._seen_dirs: dict[int, float] = {}  # step -> mtime of the folder we verified
    self.latest_seen: list[int] = []
    self.latest_backwards: list[tuple[int, int]] = []
    self.latest_garbage = 0
    self.kills: list[dict[str, Any]] = []
    self.resumes: list[dict[str, Any]] = []
    self.unexpected_exits: list[dict[str, Any]] = []
    self.mid_publish: list[dict[str, Any]] = []
    self.skipped_events: list[dict[str, Any]] = []
    self._expect: int | None = None  # the newest finished checkpoint at the last trainer kill

  # -- processes
  def _start(self, role: str, armed: bool = False) -> Child:
    self.counts[role] += 1
    number = self.counts[role]
    log_path = os.path.join(self.logs, f"{role}-{number}.log")
    marker = os.path.join(self.logs, f"paused-{number}") if armed else None
    command = (trainer_command(self.workdir, self.overrides) if role == "trainer"
               else builder_command(self.workdir))
    with open(log_path, "w") as log:  # a file, not a pipe: a full pipe would block the child
      proc = subprocess.Popen(command, cwd=REPO, env=child_env(self.cache_dir, marker),
                              stdout=log, stderr=subprocess.STDOUT)
    child = Child(role, number, proc, log_path, time.time(), armed=armed, marker=marker)
    self.children.append(child)
    setattr(self, role, child)
    return child

  def _kill(self, child: Child, why: str) -> dict[str, Any]:
    child.scan_log()
    ckpt_dir = os.path.join(self.workdir, "checkpoints")
    index_dir = os.path.join(self.workdir, "index")
    in_flight_before = unfinished_checkpoints(ckpt_dir)
    child.sigkill()
    self._note_resume(child, final=True, killed=True)
    record = dict(role=child.role, run=child.number, why=why,
                  seconds_after_start=round(time.time() - child.started, 2),
                  trainer_step=self.trainer.max_step if self.trainer else None,
                  last_line=child.last_line[-160:])
    if child.role == "trainer":
      finished = finished_checkpoints(ckpt_dir)
      unfinished = sorted(set(in_flight_before) | set(unfinished_checkpoints(ckpt_dir)))
      in_flight = [n for n in unfinished if _mtime(os.path.join(ckpt_dir, n)) >= child.started]
      record.update(newest_finished_checkpoint=finished[-1] if finished else None,
                    mid_checkpoint=bool(in_flight), unfinished_checkpoints=unfinished)
      self._expect = finished[-1] if finished else None
    else:
      try:
        tmp = [n for n in os.listdir(index_dir) if n.startswith(".tmp-")]
      except FileNotFoundError:
        tmp = []
      record.update(mid_build=bool(tmp))
    self.kills.append(record)
    self.log(f"  trial {self.number}: SIGKILL {child.role} #{child.number} ({why}) at "
             f"{record['seconds_after_start']}s, trainer step {record['trainer_step']}"
             + (f", newest finished checkpoint {record['newest_finished_checkpoint']}"
                if child.role == "trainer" else ""))
    return record

  def _note_resume(self, child: Child, final: bool = False, killed: bool = False):
    """Once a restarted trainer has restored (or started fresh), compare with the expectation.

    The restored step comes from its `resumed from step N` line; without one (a changed log
    format), from the first step it logged (log_every=1): N + 1.
    """
    if child.role != "trainer" or child.number == 1 or child.resume_noted:
      return
    expected, source = child.expected, "log line"
    if child.resumed_from is not None:
      got = child.resumed_from
    elif child.fresh_start:
      got = None
    elif child.first_step is not None:
      got, source = child.first_step - 1, "first step logged"
    elif killed:
      got, source = "unknown", "killed before restoring"
    elif final:
      got, source = "unknown", "neither"
    else:
      return
    child.resume_noted = True
    if source == "first step logged":  # step 0 restored and a fresh start look the same
      from_newest = got == (expected or 0)
    else:
      from_newest = got == expected
    self.resumes.append(dict(run=child.number, expected=expected, restored=got, source=source,
                             from_newest=from_newest, observed=got != "unknown"))

  # -- watching the workdir
  def _watch_index(self):
    index_dir = os.path.join(self.workdir, "index")
    try:
      names = os.listdir(index_dir)
    except FileNotFoundError:
      return
    for name in names:
      if not name.isdigit():
        continue
      path = os.path.join(index_dir, name)
      if not os.path.exists(os.path.join(path, MANIFEST)):
        continue  # not (yet) a version: a tmp folder is renamed into place with its manifest
      try:
        mtime = os.stat(path).st_mtime
      except FileNotFoundError:
        continue
      step = int(name)
      if self._seen_dirs.get(step) == mtime:
        continue
      self._seen_dirs[step] = mtime  # re-verify a republished (new attempt) version
      self.verified.setdefault(step, []).append(verify_version(path))
    try:
      with open(os.path.join(index_dir, "LATEST")) as f:
        text = f.read().strip()
    except FileNotFoundError:
      return
    if not text.isdigit():
      self.latest_garbage += 1
      return
    latest = int(text)
    if self.latest_seen and latest < max(self.latest_seen):
      self.latest_backwards.append((max(self.latest_seen), latest))
    if not self.latest_seen or self.latest_seen[-1] != latest:
      self.latest_seen.append(latest)

  # -- events
  def _due(self, event: Event, since: float) -> bool:
    target = self.trainer if event.role == "trainer" else self.builder
    now = time.time()
    if event.kind == "startup":
      return target is not None and now >= target.started + event.delay
    if self.trainer is not None and self.trainer.max_step >= event.step:
      if event.reached is None:
        event.reached = now
      return now >= event.reached + event.delay
    return now - since > self.event_timeout  # the trainer is stuck somewhere: kill anyway

  def _fire(self, event: Event):
    target = self.trainer if event.role == "trainer" else self.builder
    if target is None or not target.alive():
      self.skipped_events.append(dict(dataclasses.asdict(event), why="not running"))
      return
    kind = f"{event.kind} {event.step}" if event.kind == "step" else f"startup +{event.delay}s"
    self._kill(target, kind)
    if event.role == "trainer":
      child = self._start("trainer")
      child.expected = self._expect
    else:
      self._start("builder", armed=event.arm or target.armed)

  def _check_paused_builder(self):
    b = self.builder
    if b is None or not b.armed or not b.alive() or not os.path.exists(b.marker):
      return
    index_dir = os.path.join(self.workdir, "index")
    tmp = sorted(n for n in os.listdir(index_dir) if n.startswith(".tmp-"))
    steps = [int(n[len(".tmp-"):]) for n in tmp if n[len(".tmp-"):].isdigit()]
    record = self._kill(b, "paused before its manifest")
    record["mid_publish"] = True
    step = steps[-1] if steps else None
    self._watch_index()
    self.mid_publish.append(dict(
        step=step, tmp=tmp, latest=self.latest_seen[-1] if self.latest_seen else None,
        version_folder_exists=step is not None and os.path.exists(
            os.path.join(index_dir, str(step)))))
    self._start("builder")

  # -- the trial
  def run(self) -> dict[str, Any]:
    os.makedirs(self.logs, exist_ok=True)
    start = time.time()
    self._start("trainer")
    self._start("builder")
    events = list(self.events)
    since = time.time()
    crash_restarts = 0
    hung = False
    while True:
      for child in (self.trainer, self.builder):
        child.scan_log()
      self._watch_index()
      self._note_resume(self.trainer)
      t = self.trainer
      if not t.alive():
        t.scan_log()
        self._note_resume(t, final=True)
        if t.proc.returncode == 0:
          break
        self.unexpected_exits.append(dict(role="trainer", run=t.number, rc=t.proc.returncode,
                                          tail=t.tail()))
        self.log(f"  trial {self.number}: trainer #{t.number} exited rc={t.proc.returncode}:\n"
                 + t.tail(1200))
        if crash_restarts >= self.max_crash_restarts:
          break
        crash_restarts += 1
        finished = finished_checkpoints(os.path.join(self.workdir, "checkpoints"))
        child = self._start("trainer")
        child.expected = finished[-1] if finished else None
      b = self.builder
      if not b.alive() and not b.killed_by_us and not b.exited_by_itself:
        b.scan_log()
        if b.proc.returncode == 0:
          if not b.exited_by_itself:
            b.exited_by_itself = True  # done (the final checkpoint is indexed): not restarted
            self.log(f"  trial {self.number}: builder #{b.number} exited by itself (rc 0) at "
                     f"trainer step {t.max_step}")
        else:
          self.unexpected_exits.append(dict(role="builder", run=b.number,
                                            rc=b.proc.returncode, tail=b.tail()))
          self.log(f"  trial {self.number}: builder #{b.number} exited "
                   f"rc={b.proc.returncode}:\n" + b.tail(1200))
          if crash_restarts >= self.max_crash_restarts:
            break
          crash_restarts += 1
          self._start("builder", armed=b.armed)
      self._check_paused_builder()
      if events and self._due(events[0], since):
        self._fire(events.pop(0))
        since = time.time()
      if time.time() - start > self.timeout:
        hung = True
        self.log(f"  trial {self.number}: no finish within {self.timeout:.0f}s; trainer tail:\n"
                 + self.trainer.tail(1500) + "\nbuilder tail:\n" + self.builder.tail(800))
        break
      time.sleep(self.poll)
    trainer_seconds = time.time() - start
    self.skipped_events += [dict(dataclasses.asdict(e), why="trainer finished first")
                            for e in events]
    # The builder: give it a moment to index the final checkpoint and exit by itself.
    builder_exit = None
    deadline = time.time() + 5.0
    while self.builder.alive() and time.time() < deadline and not hung:
      self._watch_index()
      time.sleep(self.poll)
    self._watch_index()
    if self.builder.exited_by_itself or (not self.builder.alive() and
                                         not self.builder.killed_by_us):
      builder_exit = self.builder.proc.returncode
    for child in self.children:
      if child.alive():
        child.proc.terminate()
        try:
          child.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
          child.proc.kill()
          child.proc.wait()
    return self._report(hung, trainer_seconds, builder_exit, time.time() - start)

  def _report(self, hung: bool, trainer_seconds: float, builder_exit, wall: float
              ) -> dict[str, Any]:
    for child in self.children:
      child.scan_log()
    records, torn = read_metrics(os.path.join(self.workdir, "metrics", "metrics.jsonl"))
    metrics = count_train_records(records, self.num_steps)
    train = [r for r in records if r.get("phase") in ("realm", "train")]
    # Versions the trainer loaded: its log lines, and the index_step of every train record.
    loaded = sorted({v for c in self.children if c.role == "trainer" for v in c.index_versions} |
                    {int(r["index_step"]) for r in train if "index_step" in r})
    partial, unverified = [], []
    for step in loaded:
      results = self.verified.get(step)
      if not results or all(status == "vanished" for status, _ in results):
        unverified.append(step)
      elif any(status == "bad" for status, _ in results):
        partial.append(dict(step=step, why=[why for status, why in results if status == "bad"]))
    bad_published = {s: [w for st, w in r if st == "bad"] for s, r in self.verified.items()
                     if any(st == "bad" for st, _ in r)}
    final = self.trainer
    last = [r for r in train if int(r.get("step", -1)) == self.num_steps]
    evals = [r for r in records if r.get("phase") == "eval" and "loss" in r]
    final_loss = float(last[-1]["loss"]) if last and "loss" in last[-1] else float("nan")
    eval_loss = float(evals[-1]["loss"]) if evals else float("nan")
    finished = (not hung and final.proc.returncode == 0)
    return dict(
        trial=self.number, workdir=self.workdir, wall_seconds=round(wall, 1),
        trainer_seconds=round(trainer_seconds, 1),
        schedule=[dataclasses.asdict(e) for e in self.events],
        kills=self.kills, skipped_events=self.skipped_events,
        trainer_runs=self.counts["trainer"], builder_runs=self.counts["builder"],
        resumes=self.resumes, mid_publish=self.mid_publish,
        unexpected_exits=[{k: v for k, v in e.items()} for e in self.unexpected_exits],
        hung=hung, final_rc=final.proc.returncode, finished=finished,
        final_loss=final_loss, final_eval_loss=eval_loss,
        final_loss_finite=finished and math.isfinite(final_loss),
        versions_verified=sorted(self.verified), versions_bad=bad_published,
        versions_loaded=loaded, partial_loaded=partial, unverified_loaded=unverified,
        latest_history=self.latest_seen, latest_backwards=self.latest_backwards,
        latest_garbage=self.latest_garbage, metrics_torn_lines=torn, **{
            f"metrics_{k}": v for k, v in metrics.items()},
        builder_exited_by_itself=builder_exit)


# ---- The campaign ---------------------------------------------------------------------------

def summarize(trials: list[dict[str, Any]]) -> dict[str, Any]:
  kills = [k for t in trials for k in t["kills"]]
  resumes = [r for t in trials for r in t["resumes"]]
  s = dict(
      trials=len(trials),
      kills_trainer=sum(k["role"] == "trainer" for k in kills),
      kills_trainer_mid_checkpoint=sum(bool(k.get("mid_checkpoint")) for k in kills),
      kills_builder=sum(k["role"] == "builder" and not k.get("mid_publish") for k in kills),
      kills_builder_mid_build=sum(bool(k.get("mid_build")) and not k.get("mid_publish")
                                  for k in kills),
      kills_builder_mid_publish=sum(bool(k.get("mid_publish")) for k in kills),
      trainer_restarts=sum(t["trainer_runs"] - 1 for t in trials),
      resumes=sum(r["observed"] for r in resumes),
      resumes_from_a_checkpoint=sum(r["observed"] and r["restored"] is not None
                                    for r in resumes),
      resumes_from_newest_finished=sum(r["from_newest"] for r in resumes),
      resumes_wrong=[dict(trial=t["trial"], **r) for t in trials for r in t["resumes"]
                     if r["observed"] and not r["from_newest"]],
      restarts_killed_before_restore=sum(r["source"] == "killed before restoring"
                                         for r in resumes),
      resumes_unparsed=sum(r["source"] == "neither" for r in resumes),
      index_versions_verified=sum(len(t["versions_verified"]) for t in trials),
      index_versions_bad_on_storage=sum(len(t["versions_bad"]) for t in trials),
      index_versions_loaded=sum(len(t["versions_loaded"]) for t in trials),
      partial_versions_loaded=sum(len(t["partial_loaded"]) for t in trials),
      unverified_versions_loaded=sum(len(t["unverified_loaded"]) for t in trials),
      latest_moved_backwards=sum(len(t["latest_backwards"]) for t in trials),
      metrics_lost=sum(t["metrics_lost"] for t in trials),
      metrics_duplicated=sum(t["metrics_duplicated"] for t in trials),
      metrics_torn_lines=sum(t["metrics_torn_lines"] for t in trials),
      unexpected_exits=sum(len(t["unexpected_exits"]) for t in trials),
      hangs=sum(t["hung"] for t in trials),
      final_runs_finished=sum(t["finished"] for t in trials),
      final_loss_finite=sum(t["final_loss_finite"] for t in trials),
      builder_exited_by_itself=sum(t["builder_exited_by_itself"] == 0 for t in trials),
      events_skipped=sum(len(t["skipped_events"]) for t in trials),
  )
  s["ok"] = (s["partial_versions_loaded"] == 0 and s["unverified_versions_loaded"] == 0 and
             s["metrics_lost"] == 0 and s["metrics_duplicated"] == 0 and
             s["metrics_torn_lines"] == 0 and not s["resumes_wrong"] and
             s["resumes_unparsed"] == 0 and
             s["latest_moved_backwards"] == 0 and s["unexpected_exits"] == 0 and
             s["hangs"] == 0 and s["final_runs_finished"] == len(trials) and
             s["final_loss_finite"] == len(trials))
  return s


def run_campaign(trials: int = 5, seed: int = 0, kills_per_trial: int = 4,
                 workdir_root: str = "/tmp/fault_campaign", num_steps: int = 60,
                 checkpoint_every: int = 5, refresh_every: int = 5, mid_publish: bool = True,
                 compile_cache: bool = True, poll: float = 0.05, trial_timeout: float = 420.0,
                 event_timeout: float = 120.0, keep_workdirs: str = "failed",
                 extra_overrides: dict[str, Any] | None = None, log=print) -> dict[str, Any]:
  """Runs the trials; returns {"summary", "trials", "config"} (see the module docstring)."""
  os.makedirs(workdir_root, exist_ok=True)
  overrides = dict(BASE_OVERRIDES, **{"train.num_steps": num_steps,
                                      "train.checkpoint_every": checkpoint_every,
                                      "retrieval.refresh_every": refresh_every},
                   **(extra_overrides or {}))
  cache_dir = os.path.join(workdir_root, "jax_cache") if compile_cache else None
  start = time.time()
  results = []
  for number in range(trials):
    rng = random.Random(f"{seed}-{number}")
    events = make_schedule(rng, kills_per_trial, num_steps, mid_publish)
    trial_dir = os.path.join(workdir_root, f"trial-{number:02d}")
    if os.path.exists(trial_dir):
      shutil.rmtree(trial_dir)
    log(f"trial {number}: " + ", ".join(
        f"{e.role}@{'step ' + str(e.step) if e.kind == 'step' else 'start+' + str(e.delay) + 's'}"
        + (" (then mid-publish)" if e.arm else "") for e in events))
    trial = Trial(number, workdir_root, events, overrides, cache_dir, poll, trial_timeout,
                  event_timeout, log=log)
    result = trial.run()
    results.append(result)
    ok = summarize([result])["ok"]
    log(f"trial {number}: {'ok' if ok else 'FAILED'} in {result['wall_seconds']}s; "
        f"{len(result['kills'])} kills, resumes {[(r['expected'], r['restored']) for r in result['resumes']]}, "
        f"loaded {result['versions_loaded']}, metrics lost {result['metrics_lost']} "
        f"dup {result['metrics_duplicated']}, final loss {result['final_loss']:.4f}")
    if keep_workdirs == "none" or (keep_workdirs == "failed" and ok):
      shutil.rmtree(os.path.join(trial_dir, "workdir"), ignore_errors=True)
  summary = summarize(results)
  summary["wall_seconds"] = round(time.time() - start, 1)
  return dict(summary=summary, trials=results, config=dict(
      trials=trials, seed=seed, kills_per_trial=kills_per_trial, workdir_root=workdir_root,
      mid_publish=mid_publish, compile_cache=compile_cache, overrides=overrides,
      trainer_command=" ".join(trainer_command("<workdir>", overrides)[1:]),
      builder_command=" ".join(builder_command("<workdir>")[1:])))


def machine_facts() -> dict[str, Any]:
  try:
    with open("/proc/meminfo") as f:
      mem_kb = int(next(line for line in f if line.startswith("MemTotal")).split()[1])
  except (OSError, StopIteration, ValueError):
    mem_kb = 0
  return dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              nproc=os.cpu_count(), cpu=machine.cpu_model(),
              ram_gib=round(mem_kb / 2**20, 1), commit=machine.git_state(),
              python=sys.version.split()[0])


def format_summary(s: dict[str, Any]) -> str:
  lines = [
      f"trials                                   {s['trials']}",
      f"SIGKILLs of the trainer                  {s['kills_trainer']} "
      f"({s['kills_trainer_mid_checkpoint']} with a checkpoint save in flight)",
      f"SIGKILLs of the builder                  {s['kills_builder']} "
      f"({s['kills_builder_mid_build']} mid-build) + {s['kills_builder_mid_publish']} "
      "mid-publish (before the manifest)",
      f"trainer restarts                         {s['trainer_restarts']} "
      f"({s['restarts_killed_before_restore']} killed again before restoring)",
      f"resumes from the newest finished ckpt    {s['resumes_from_newest_finished']}/"
      f"{s['resumes']} ({s['resumes_from_a_checkpoint']} from a checkpoint, the rest from "
      "scratch with none saved)",
      f"index versions verified / loaded         {s['index_versions_verified']} / "
      f"{s['index_versions_loaded']} (bad on storage: {s['index_versions_bad_on_storage']})",
      f"partial versions loaded                  {s['partial_versions_loaded']} "
      f"(unverified: {s['unverified_versions_loaded']})",
      f"LATEST moved backwards                   {s['latest_moved_backwards']}",
      f"metrics records lost / duplicated / torn {s['metrics_lost']} / "
      f"{s['metrics_duplicated']} / {s['metrics_torn_lines']}",
      f"unexpected exits / hangs                 {s['unexpected_exits']} / {s['hangs']}",
      f"final runs finished, finite loss         {s['final_runs_finished']}, "
      f"{s['final_loss_finite']} of {s['trials']}",
      f"builder exited by itself at the end      {s['builder_exited_by_itself']} of {s['trials']}",
      f"scheduled kills not fired                {s['events_skipped']}",
      f"wall time                                {s.get('wall_seconds', 0):.0f}s",
      f"all invariants hold                      {s['ok']}",
  ]
  return "\n".join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--trials", type=int, default=5)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--kills_per_trial", type=int, default=4)
  parser.add_argument("--workdir_root", default="/tmp/fault_campaign")
  parser.add_argument("--out", default="", help="write the full results as JSON here")
  parser.add_argument("--num_steps", type=int, default=60)
  parser.add_argument("--checkpoint_every", type=int, default=5)
  parser.add_argument("--refresh_every", type=int, default=5)
  parser.add_argument("--mid_publish", type=int, default=1,
                      help="1: once per trial, kill the builder paused before its manifest")
  parser.add_argument("--compile_cache", type=int, default=1,
                      help="1: children share a persistent XLA compilation cache")
  parser.add_argument("--trial_timeout", type=float, default=420.0)
  parser.add_argument("--keep_workdirs", choices=("all", "failed", "none"), default="failed")
  args = parser.parse_args(argv)
  facts = machine_facts()  # the commit the run starts from
  result = run_campaign(
      trials=args.trials, seed=args.seed, kills_per_trial=args.kills_per_trial,
      workdir_root=args.workdir_root, num_steps=args.num_steps,
      checkpoint_every=args.checkpoint_every, refresh_every=args.refresh_every,
      mid_publish=bool(args.mid_publish), compile_cache=bool(args.compile_cache),
      trial_timeout=args.trial_timeout, keep_workdirs=args.keep_workdirs)
  facts["finished"] = machine_facts()["date"]
  result["machine"] = facts
  result["command"] = " ".join([os.path.relpath(sys.executable, REPO)
                                if sys.executable.startswith(REPO) else sys.executable,
                                os.path.relpath(os.path.abspath(__file__), REPO)] +
                               (sys.argv[1:] if argv is None else list(argv)))
  print("\n" + format_summary(result["summary"]))
  for t in result["trials"]:
    for e in t["unexpected_exits"]:
      print(f"\ntrial {t['trial']}: {e['role']} run {e['run']} exited rc={e['rc']}; log tail:\n"
            f"{e['tail'][-1500:]}")
    for r in t["resumes"]:
      if r["observed"] and not r["from_newest"]:
        print(f"trial {t['trial']}: trainer run {r['run']} restored {r['restored']}, the newest "
              f"finished checkpoint was {r['expected']}")
    if t["metrics_lost"] or t["metrics_duplicated"]:
      print(f"trial {t['trial']}: metrics lost steps {t['metrics_lost_steps']}, duplicated "
            f"steps {t['metrics_duplicated_steps']} (workdir {t['workdir']})")
  if args.out:
    with open(args.out, "w") as f:
      json.dump(result, f, indent=1, default=str)
    print(f"results: {args.out}")
  return 0 if result["summary"]["ok"] else 1


if __name__ == "__main__":
  sys.exit(main())
