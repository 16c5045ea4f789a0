"""The separate index-builder job (DESIGN.md §2): newest checkpoint -> embedded corpus -> index.

`python -m realm_jax.main --mode=index_builder --config=<same as the trainer> --workdir=<same>`
polls `<workdir>/checkpoints/`, and whenever a checkpoint is at least `retrieval.refresh_every`
steps newer than the last version it published (or none exists yet), restores the embedder's
parameters alone (`checkpointing.restore_embedder_params`, an orbax partial restore: no
optimizer state, no encoder), re-embeds the corpus and publishes `<workdir>/index/<step>/` in
the shared index format (`index_format.py`). With `retrieval.searcher="scann"` every shard
carries its trained ScaNN searcher (options from `retrieval.scann`, else scaled to the shard),
so trainers load it instead of re-training the tree.

Several builder processes (P = `jax.process_count()`, or the constructor's `process_count`)
split the work through the shared index folder, no collectives needed:
- process 0 (the leader) picks the step and announces it (`index/.tmp-<step>/BUILD.json`);
- process p embeds its contiguous slice of the corpus rows (`shard_rows`) on its own local
  devices and writes shard p (`shard-0000p-of-0000P/`, its SHARD_DONE.json last);
- the leader waits for all P shards of that attempt, writes the manifest, renames the folder
  into place and moves LATEST. One process is the P = 1 case of the same protocol.

Restart-safe: it resumes from the newest published version (LATEST), so a checkpoint that
appeared while it was down is the next one built. Stale tmp folders are removed by the leader
alone, at start-up: followers only ever write into the attempt the *live* leader announced
(they check its attempt id before marking a shard done), so whatever exists before the leader
starts belongs to a dead leader's attempt; a follower still busy with one finds its attempt
gone and drops the work. (A timeout rule would have to outlast the slowest shard's embedding,
hours at scale.) The trainer side is `retrieval/watcher.py` (`retrieval.index_source="builder"`).

One builder job per workdir: the leader holds the workdir's "index_builder" lease
(`realm_jax.lease`) for the whole `run()`, checks it before it announces, publishes or prunes,
and stops (LeaseLostError) once another builder took it over (`force_lease`, the CLI's
`--force`). The leader resumes from the newest *valid* version (`index_format.check_version`,
newest first), not from whatever LATEST says: a garbage LATEST, one naming a missing version
or a corrupted newest version is reported in one line and LATEST is pointed at that valid
version; an invalid version is replaced when its checkpoint is built again.

Corpus versions (`data/corpus_versions.py`): every build embeds the live blocks of the newest
corpus version and names the version `index_format.VersionKey(step, corpus version)`. When a
new corpus version appears but no checkpoint is due, the leader publishes an *incremental*
version instead (`index_update.update_index`): only the added blocks are embedded, with the
parameters of the version in use (its checkpoint step), and the shards are updated in place
(ScaNN upsert/delete; exact: append/mask). A newer checkpoint gets the usual full refresh.

Never silent: while nothing is due it logs what it waits for (paths, the newest checkpoint vs
the last version + refresh_every) when the wait starts and every `wait_log_seconds`; each
build shows embedding progress and ends in one summary line. `run()` returns once the
trainer's final checkpoint (`train.num_steps` of a realm run; built even if less than
refresh_every newer) is indexed, or after `max_builds`.

SIGTERM (preemption, `train/preemption.py`): the builder stops at once. A build in
progress is abandoned between two embedding batches (its announcement is withdrawn; nothing
is half-published: a version only appears with its manifest, by one rename); a publish that
already has all its shards finishes. The lease is released and one line says what was
abandoned and which version LATEST names, and `run()` raises `preemption.Preempted` (the CLI
exits 0, or `--preempted_exit_code`). No agreement between builder processes is needed:
each stops on its own and the leader withdraws the attempt.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from etils import epath
from jax.sharding import Mesh

from realm_jax import config_lib
from realm_jax import lease as lease_lib
from realm_jax import progress as progress_lib
from realm_jax import storage
from realm_jax.data import corpus as corpus_lib
from realm_jax.data import corpus_versions
from realm_jax.data import prepare
from realm_jax.retrieval import index_format
from realm_jax.retrieval import index_update
from realm_jax.retrieval import scann_searcher
from realm_jax.retrieval import searcher as searcher_lib
from realm_jax.train import checkpointing
from realm_jax.train import partitioning
from realm_jax.train import preflight
from realm_jax.train import preemption
from realm_jax.train import state as state_lib
from realm_jax.train import steps as steps_lib

# Seconds the leader waits for the other processes' shards once its own is written (their
# slices are as large as its own, so they finish at about the same time).
DEFAULT_SHARD_TIMEOUT = 3600.0


def finished_checkpoint_steps(directory: epath.PathLike) -> list[int]:
  """Steps of complete orbax checkpoints: locally orbax renames a save's tmp folder to
  `<step>`; on GCS it writes `<step>/` in place and its commit file last (`storage`)."""
  directory = epath.Path(directory)
  if not directory.exists():
    return []
  return sorted(int(p.name) for p in directory.iterdir()
                if p.name.isdigit() and storage.checkpoint_finalized(p))


def remove_stale_tmp(index_root: epath.PathLike) -> list[str]:
  """Deletes the hidden tmp folders/files of publishes that never finished (leader, start-up);
  on object storage, the version folders without a manifest."""
  root = epath.Path(index_root)
  if not root.exists():
    return []
  stale = [p for p in root.iterdir() if p.name.startswith(index_format.TMP_PREFIX) or
           p.name.startswith(f".{index_format.LATEST}.tmp-")]
  stale += index_format.incomplete_versions(root)
  for path in stale:
    path.rmtree() if path.is_dir() else path.unlink()
  return [p.name for p in stale]


def shard_rows(num_docs: int, shard_index: int, num_shards: int) -> tuple[int, int]:
  """Contiguous [start, stop) corpus rows of one shard; sizes differ by at most one."""
  if not 0 <= shard_index < num_shards:
    raise ValueError(f"shard {shard_index} of {num_shards}")
  base, extra = divmod(num_docs, num_shards)
  start = shard_index * base + min(shard_index, extra)
  return start, start + base + (shard_index < extra)


def embed_rows(params, corpus: corpus_lib.BlockCorpus, embed_docs: Callable, mesh: Mesh,
               batch_size: int, rows: np.ndarray, progress_name: str = "embed corpus",
               progress_seconds: float = 30.0,
               stop_requested: Callable[[], bool] | None = None) -> np.ndarray:
  """Embeds the corpus rows `rows` [n] on `mesh` (this process's devices): -> [n, D] float32.

  Logs progress (blocks, rate, ETA) every `progress_seconds` and once at the end. Raises
  preemption.Preempted before a batch once `stop_requested()` is true (SIGTERM: abandon).
  """
  shards = partitioning.data_parallel_size(mesh)
  batch_size = max(shards, batch_size // shards * shards)
  outputs = []
  progress = progress_lib.Progress(progress_name, len(rows), unit="blocks",
                                   every_seconds=progress_seconds)
  for begin in range(0, len(rows), batch_size):
    if stop_requested is not None and stop_requested():
      raise preemption.Preempted(f"{progress_name}: stopped after {begin} of {len(rows)} blocks")
    chunk = rows[begin:begin + batch_size]
    padded = np.full(batch_size, corpus.null_id, np.int64)  # pad the last batch: null row
    padded[:len(chunk)] = chunk
    batch = {"t": np.asarray(corpus.retriever_tokens[padded]),
             "s": np.asarray(corpus.retriever_segments[padded])}
    device = partitioning.shard_batch_global(batch, mesh)
    emb = partitioning.to_host(embed_docs(params, device["t"], device["s"]))  # [batch, D]
    outputs.append(emb[:len(chunk)])
    progress.update(len(chunk))
  progress.close()
  return np.concatenate(outputs, axis=0)


class IndexBuilder:
  """Embeds the corpus with a checkpoint's embedder and publishes index versions.

  Args:
    config: the trainer's config (model, corpus, `retrieval.*`).
    workdir: the trainer's workdir (shared storage).
    devices: this process's devices to embed on (default: its local devices).
    process_index, process_count: this builder's place among the builder processes
      (default: `jax.process_index()`, `jax.process_count()`); injectable so several builders
      can share a workdir without multi-host JAX (tests, or independent jobs).
    force_lease: the leader takes the workdir's builder lease even from a live holder (which
      then stops before its next publish); a stale lease is taken over without it.
  """

  def __init__(self, config: ml_collections.ConfigDict, workdir: epath.PathLike,
               devices=None, process_index: int | None = None,
               process_count: int | None = None, force_lease: bool = False):
    self.config = config
    self.workdir = epath.Path(workdir)
    self.checkpoint_dir = self.workdir / "checkpoints"
    self.index_root = self.workdir / "index"
    self.process_index = jax.process_index() if process_index is None else int(process_index)
    self.process_count = jax.process_count() if process_count is None else int(process_count)
    if not 0 <= self.process_index < self.process_count:
      raise ValueError(f"process_index={self.process_index} not in [0, {self.process_count})")
    self.mesh = partitioning.make_mesh(config.mesh,
                                       jax.local_devices() if devices is None else devices)
    # The builder's own layout does not constrain the trainer's batch sizes: one process here.
    config_lib.validate(config, partitioning.data_parallel_size(self.mesh), 1)
    retrieval = config.retrieval
    self.searcher_options = (scann_searcher.options_from_config(retrieval)
                             if retrieval.searcher == "scann" else {})
    self.shard_timeout = float(retrieval.get("builder_shard_timeout", DEFAULT_SHARD_TIMEOUT))
    self.poll_seconds = float(retrieval.get("builder_poll_seconds", 5.0))
    self.corpus = None  # the BlockCorpus of self.corpus_version
    self.corpus_dir: epath.Path | None = None
    self.corpus_version: corpus_versions.CorpusVersion | None = None  # the newest one seen
    self._corpora: dict[int, corpus_versions.CorpusVersion] = {}
    self.rebalance_updates = bool(retrieval.get("rebalance_on_update", False))
    self.update_mode = retrieval.get("index_update_mode", "delta")
    self.max_delta_shards = int(retrieval.get("index_update_max_delta_shards",
                                              index_update.MAX_DELTA_SHARDS))
    self._embed_docs = None
    self._ignored: set[str] = set()  # attempts announced for another number of processes
    self.force_lease = bool(force_lease)
    self._lease: lease_lib.Lease | None = None  # held by the leader during run()
    self._last: int | None = None  # the leader's newest valid published version
    # The trainer's last checkpoint: once it is indexed the builder is done (realm runs only;
    # ICT trainers index in-process).
    self.final_step = (int(config.train.num_steps) if config.get("objective") == "realm"
                       else None)
    self._failures: dict[int, tuple[str, float]] = {}  # step -> (last error, when logged)
    self._stop = preemption.StopRequest()  # set by SIGTERM during run()
    self._abandoned = ""  # what a SIGTERM abandoned, in words (for the stop line)

  @property
  def is_leader(self) -> bool:
    return self.process_index == 0

  def _ensure_model(self, wait_seconds: float, poll_seconds: float,
                    wait_log_seconds: float = 60.0):
    """The corpus is prepared by the trainer; wait for it rather than build it twice."""
    if self.corpus is not None:
      return
    start = time.time()
    deadline, next_log = start + wait_seconds, start
    while True:
      try:
        data = prepare.prepare_data(self.config, self.workdir, build=False)
        break
      except FileNotFoundError as e:
        if time.time() > deadline:
          raise
        if self._stop.requested:
          raise preemption.Preempted("stopped while waiting for the trainer's corpus") from e
        if time.time() >= next_log:
          next_log = time.time() + wait_log_seconds
          logging.info("index_builder[%d]: waiting (%.0fs) for the trainer's corpus: %s%s",
                       self.process_index, time.time() - start, e, self._workdir_hint())
        self._sleep(poll_seconds)
    self.corpus_dir = data.directory
    self._corpora[0] = corpus_versions.build_version(data.corpus, data.directory)
    self._refresh_corpus_version()
    model = state_lib.build_model(self.config, data.corpus.vocab_size, data.corpus.special.pad)
    start, stop = shard_rows(len(self.corpus_version.live_ids), self.process_index,
                             self.process_count)
    preflight.check_builder(self.config, self.corpus, model, max(stop - start, 0))  # fail fast
    _, self._embed_docs = steps_lib.make_embed_fns(model, self.mesh)

  def corpus_at(self, version: int) -> corpus_versions.CorpusVersion:
    """Corpus version `version` (loaded once; published versions never change)."""
    if version not in self._corpora:
      if self.corpus_dir is None and version == 0:  # a corpus given without its folder
        return corpus_versions.build_version(self.corpus, None)
      self._corpora[version] = corpus_versions.load_version(self.corpus_dir, version)
    return self._corpora[version]

  def _refresh_corpus_version(self) -> corpus_versions.CorpusVersion:
    """The newest published corpus version (CORPUS_LATEST), becoming self.corpus."""
    if self.corpus_dir is None:
      return self.corpus_at(0)
    latest = corpus_versions.latest_version(self.corpus_dir)
    if self.corpus_version is None or latest != self.corpus_version.version:
      self.corpus_version = self.corpus_at(latest)
      self.corpus = self.corpus_version.corpus
      if latest:
        logging.info("index_builder[%d]: corpus version %d (%d blocks, %d live)",
                     self.process_index, latest, self.corpus.num_docs,
                     len(self.corpus_version.live_ids))
    return self.corpus_version

  def _params(self, step: int):
    params, _ = checkpointing.restore_embedder_params(self.checkpoint_dir, int(step))
    return partitioning.replicate(params, self.mesh)

  def build_shard(self, build: dict[str, Any]) -> dict[str, Any]:
    """Embeds this process's slice for an announced build and writes its shard."""
    self._ensure_model(wait_seconds=0.0, poll_seconds=0.0)
    if build["num_shards"] != self.process_count:
      raise ValueError(f"step {build['step']} was announced in {build['num_shards']} shards, "
                       f"but this is one of {self.process_count} builder processes")
    params = self._params(build["step"])
    version = self.corpus_at(int(build.get("corpus_version", 0)))
    live = version.live_ids  # [L] the blocks to index (tombstoned ones never are)
    start, stop = shard_rows(len(live), self.process_index, build["num_shards"])
    if stop <= start:
      raise ValueError(f"{len(live)} documents cannot fill {build['num_shards']} shards")
    rows = live[start:stop]
    embeddings = embed_rows(params, version.corpus, self._embed_docs, self.mesh,
                            self.config.retrieval.embed_batch_size, rows,
                            stop_requested=lambda: self._stop.requested)
    return index_format.write_shard(self.index_root, build, self.process_index, embeddings,
                                    rows)

  def update(self, key: index_format.VersionKey) -> epath.Path:
    """The leader publishes incremental version `key` (the last version's step, a newer
    corpus version): only the changed blocks embedded, with that step's parameters."""
    if self._last is None or int(key) != int(self._last):
      raise ValueError(f"an incremental version {key} needs the version of step {int(key)} "
                       f"in use, have {self._last}")
    self._check_lease()
    old = self.corpus_at(getattr(self._last, "corpus_version", 0))
    new = self.corpus_at(key.corpus_version)
    version = self.index_root / str(key)
    if version.exists():  # an invalid leftover of this key (a valid one would be _last)
      storage.remove_folder(version, index_format.MANIFEST)
    params = self._params(int(key))
    embed = lambda rows: embed_rows(params, new.corpus, self._embed_docs, self.mesh,
                                    self.config.retrieval.embed_batch_size, rows,
                                    progress_name=f"embed corpus update {key}",
                                    stop_requested=lambda: self._stop.requested)
    path = index_update.update_index(
        self.index_root, self._last, old, new, embed, rebalance=self.rebalance_updates,
        mode=self.update_mode, max_delta_shards=self.max_delta_shards,
        extra=dict(corpus_dir=str(self.corpus_dir)), before_publish=self._check_lease)
    self._last = key
    self._check_lease()
    index_format.prune_versions(self.index_root, self.config.retrieval.keep_index_versions)
    return path

  def build(self, step: int) -> epath.Path:
    """The leader publishes the version of checkpoint `step` (with the others' shards).

    A `VersionKey` with the last version's step and a newer corpus version is an incremental
    update (`update`); otherwise the newest corpus version is embedded in full.
    """
    if not self.is_leader:
      raise RuntimeError("only process 0 publishes; the others run `build_shard`")
    self._ensure_model(wait_seconds=0.0, poll_seconds=0.0)
    corpus = self._refresh_corpus_version()
    if (self._last is not None and int(step) == int(self._last) and
        getattr(step, "corpus_version", 0) > getattr(self._last, "corpus_version", 0)):
      return self.update(step)
    step = index_format.VersionKey(int(step), corpus.version)
    start = time.time()
    version = self.index_root / str(step)
    self._check_lease()
    if version.exists():  # a crashed run's leftover, or an invalid version of this step
      if step == self._last:
        raise ValueError(f"step {step} is the newest valid version already")
      logging.info("index_builder: replacing the existing (unfinished or invalid) %s", version)
      storage.remove_folder(version, index_format.MANIFEST)
    build = index_format.start_version(self.index_root, step, self.process_count,
                                       searcher_lib.published_kind(
                                           self.config.retrieval.searcher),
                                       self.searcher_options,
                                       info=dict(corpus_version=corpus.version))
    try:
      self.build_shard(build)
      shard_seconds = time.time() - start
      path = index_format.finish_version(
          self.index_root, build, timeout=self.shard_timeout,
          poll_seconds=min(self.poll_seconds, 1.0), expected_num_docs=len(corpus.live_ids),
          extra=dict(source="index_builder", num_processes=self.process_count,
                     embed_seconds=round(shard_seconds, 3), param_step=int(step),
                     corpus_version=corpus.version, corpus_num_docs=corpus.corpus.num_docs,
                     corpus_dir=None if self.corpus_dir is None else str(self.corpus_dir),
                     **index_format.corpus_record(corpus.corpus)),
          before_publish=self._check_lease)
    except Exception:
      # Withdraw the announcement, so followers stop working on a build that will not finish.
      current = index_format.read_build(self.index_root, step)
      if current is not None and current["attempt"] == build["attempt"]:
        index_format.tmp_dir(self.index_root, step).rmtree()
      raise
    self._last = step if self._last is None else max(self._last, step)
    self._check_lease()
    pruned = index_format.prune_versions(self.index_root,
                                         self.config.retrieval.keep_index_versions)
    newest = finished_checkpoint_steps(self.checkpoint_dir)
    logging.info(
        "index_builder: published step %d: %d docs in %d shard(s), %s searcher, %.1fs (own "
        "shard embedded and written in %.1fs, %.0f docs/s); newest checkpoint %s%s%s", step,
        self.corpus.num_docs, self.process_count, self.config.retrieval.searcher,
        time.time() - start, shard_seconds,
        self.corpus.num_docs / self.process_count / max(shard_seconds, 1e-9),
        newest[-1] if newest else None,
        f", final step {self.final_step}" if self.final_step is not None else "",
        f"; pruned {pruned}" if pruned else "")
    return path

  def _check_lease(self):
    """Raises lease.LeaseLostError if another builder took this workdir over (leader, run())."""
    if self._lease is not None:
      self._lease.check()

  def run(self, poll_seconds: float | None = None, max_builds: int | None = None,
          idle_timeout: float | None = None, wait_log_seconds: float = 60.0) -> list[int]:
    """Polls and builds; returns the steps this process built (published, or its shard of).

    Stops once the trainer's final checkpoint is indexed, after `max_builds` builds, or after
    `idle_timeout` seconds without a successful one. The leader holds the workdir's builder
    lease throughout (raises lease.LeaseHeldError if another live builder has it, and
    lease.LeaseLostError once one took it over). While waiting it logs what for, when the
    wait starts and then every `wait_log_seconds`. After a SIGTERM it abandons the build in
    progress, releases the lease, logs one line and raises preemption.Preempted (the CLI
    exits 0).
    """
    poll_seconds = self.poll_seconds if poll_seconds is None else poll_seconds
    with preemption.sigterm_handled() as self._stop:
      if self.is_leader:
        self._lease = lease_lib.acquire(self.workdir, "index_builder", force=self.force_lease)
      try:
        built = self._run(poll_seconds, max_builds, idle_timeout, wait_log_seconds)
      except preemption.Preempted as e:  # before any build (waiting for the corpus)
        self._abandoned, built = str(e), []
      except lease_lib.LeaseLostError as e:
        logging.error("index_builder: %s", e)
        raise
      finally:
        if self._lease is not None:
          self._lease.release()
          self._lease = None
    if self._stop.requested:
      message = (f"index_builder[{self.process_index}]: stopped by {self._stop.signal_name}: "
                 f"{self._abandoned or 'no build in progress'}; lease released; LATEST is "
                 f"{self._latest_text()}")
      logging.info("%s", message)
      raise preemption.Preempted(message)
    return built

  def _latest_text(self) -> str:
    """The version LATEST names, in words (for the stop line)."""
    try:
      latest = index_format.latest_step(self.index_root)
    except index_format.IndexVersionError as e:
      return f"unreadable ({e})"
    return "absent" if latest is None else f"version {latest}"

  def _sleep(self, seconds: float):
    """time.sleep(seconds), cut short by a stop request (checked every 0.2 s)."""
    deadline = time.time() + seconds
    while not self._stop.requested and time.time() < deadline:
      time.sleep(min(0.2, max(deadline - time.time(), 0.0)))

  def _run(self, poll_seconds: float, max_builds: int | None, idle_timeout: float | None,
           wait_log_seconds: float) -> list[int]:
    if self.is_leader:
      removed = remove_stale_tmp(self.index_root)
      if removed:
        logging.info("index_builder: removed stale %s", removed)
    self._ensure_model(wait_seconds=idle_timeout or float("inf"), poll_seconds=poll_seconds,
                       wait_log_seconds=wait_log_seconds)
    if self.is_leader:
      self._last = self.resume_point()
    built: list[int] = []
    idle_since = time.time()
    wait_start = next_log = None
    while max_builds is None or len(built) < max_builds:
      if self._stop.requested:  # SIGTERM while waiting (or during the last build)
        break
      self._check_lease()
      if self._final_indexed():
        logging.info("index_builder[%d]: the trainer's final checkpoint %d is indexed; done",
                     self.process_index, self.final_step)
        break
      build = None if self.is_leader else self._follower_due()  # an announced build
      step = self._leader_due() if self.is_leader else build and build["step"]
      if step is not None:
        try:
          if self.is_leader:
            self.build(step)
          else:
            self.build_shard(build)
        except lease_lib.LeaseLostError:
          raise
        except preemption.Preempted:  # withdrawn by build(): nothing was published
          self._abandoned = f"abandoned the build of step {step}"
          break
        except Exception as e:  # pylint: disable=broad-except
          # E.g. the trainer's keep-last-N deleted that checkpoint mid-restore, a follower's
          # shard timed out, or (followers) the leader restarted and replaced the attempt.
          # Nothing was published (a version only appears complete), so just look again.
          self._log_failure(step, e, wait_log_seconds)
        else:
          built.append(step)
          self._failures.pop(step, None)
          idle_since = time.time()
          wait_start = None
          continue
      now = time.time()
      if idle_timeout is not None and now - idle_since > idle_timeout:
        break  # a failing build does not count as activity
      if wait_start is None:
        wait_start, next_log = now, now
      if now >= next_log:
        next_log = now + wait_log_seconds
        logging.info("index_builder[%d]: waiting (%.0fs): %s", self.process_index,
                     now - wait_start, self._waiting_for())
      self._sleep(poll_seconds)
    return built

  def _log_failure(self, step: int, error: Exception, period: float):
    """A failed build in one line; the same failure again at most once per `period`."""
    message = f"{type(error).__name__}: {error}"
    last = self._failures.get(step)
    if last is not None and last[0] == message and time.time() - last[1] < period:
      return
    self._failures[step] = (message, time.time())
    logging.warning("index_builder[%d]: building step %d failed (%s); retrying%s",
                    self.process_index, step, message,
                    " (same error as before)" if last is not None and last[0] == message else "")

  def _workdir_hint(self) -> str:
    if (self.workdir / config_lib.RUN_CONFIG).exists():
      return ""
    return (f" (no {config_lib.RUN_CONFIG} in {self.workdir} either: is the trainer running "
            f"with --workdir={self.workdir}?)")

  def _waiting_for(self) -> str:
    """What the builder waits for, in words: paths, the newest checkpoint, the next due step."""
    if not self.is_leader:
      return (f"no build announced in {self.index_root} for process {self.process_index} of "
              f"{self.process_count} (the leader, process 0, announces them)")
    steps = finished_checkpoint_steps(self.checkpoint_dir)
    if not steps:
      return (f"no finished checkpoint in {self.checkpoint_dir} yet (the trainer saves step 0 "
              f"before training){self._workdir_hint()}")
    refresh = self.config.retrieval.refresh_every
    due = (f"the next build is due at a checkpoint >= {self._last + refresh}"
           if self._last is not None else "")
    if self.final_step is not None and self._last is not None:
      due += f" (or the final step {self.final_step})"
    return (f"newest checkpoint {steps[-1]} in {self.checkpoint_dir}, last index version "
            f"{self._last}, refresh_every {refresh}: {due}")

  def _final_indexed(self) -> bool:
    if self.final_step is None:
      return False
    if self.is_leader:
      return self._last is not None and self._last >= self.final_step
    try:  # followers: what the leader published
      latest = index_format.latest_step(self.index_root)
    except index_format.IndexVersionError:
      return False
    return latest is not None and latest >= self.final_step

  def resume_point(self) -> int | None:
    """The newest valid published version (the leader resumes from it), repairing LATEST.

    Versions are checked newest first (`index_format.check_version`: checksums and content
    against this corpus and model); each invalid one is reported in one line. A LATEST that is
    garbage, names a missing version or an invalid one is pointed at the valid version found.
    """
    root = self.index_root
    try:
      latest, problem = index_format.latest_step(root), None
    except index_format.IndexVersionError as e:
      latest, problem = None, str(e)
    valid = None
    for step in reversed(index_format.list_versions(root)):
      try:
        corpus = self.corpus_at(getattr(step, "corpus_version", 0))
        index_format.check_version(root, step, expected_dim=self.config.model.embed_dim,
                                   expected_num_docs=corpus.corpus.num_docs,
                                   removed=corpus.removed if corpus.version else None,
                                   expected_fingerprint=index_format.fingerprint_of(corpus.corpus))
      except (index_format.IndexVersionError, corpus_versions.CorpusVersionError, OSError) as e:
        logging.warning("index_builder: version %s is invalid (%s); it will be rebuilt or "
                        "pruned", step, e)
        if step == latest:
          problem = f"LATEST names the invalid version {latest}"
        continue
      valid = step
      break
    if latest is not None and problem is None and valid != latest and (
        latest not in index_format.list_versions(root)):
      problem = f"LATEST names version {latest}, which does not exist"
    if problem and valid is not None:
      self._check_lease()
      logging.warning("index_builder: %s; pointing LATEST at version %d, the newest valid one",
                      problem, valid)
      index_format.repair_latest(root, valid)
    elif problem:
      logging.warning("index_builder: %s, and there is no valid version; building from the "
                      "newest checkpoint", problem)
    if valid is not None:
      logging.info("index_builder: resuming after index version %d", valid)
    return valid

  def _leader_due(self) -> int | None:
    """The newest checkpoint, if refresh_every newer than the last valid version (or nothing
    published yet), or if it is the trainer's final one."""
    steps = finished_checkpoint_steps(self.checkpoint_dir)
    if not steps:
      return None
    last, newest = self._last, steps[-1]
    if last is None or newest >= last + self.config.retrieval.refresh_every:
      return newest
    if self.final_step is not None and newest >= self.final_step and newest > last:
      return newest  # the trainer's last checkpoint is indexed even if < refresh_every newer
    corpus = self._refresh_corpus_version()
    if corpus.version > getattr(last, "corpus_version", 0):  # a corpus update, same params
      return index_format.VersionKey(int(last), corpus.version)
    return None

  def _follower_due(self) -> dict[str, Any] | None:
    """The newest announced build whose shard of this process is not done for its attempt."""
    for build in index_format.pending_builds(self.index_root):
      if build.get("single_writer"):  # an incremental update: the leader writes every shard
        continue
      if build["num_shards"] != self.process_count:
        if build["attempt"] in self._ignored:
          continue
        self._ignored.add(build["attempt"])
        logging.warning("index_builder[%d]: step %d is announced in %d shards, this job has %d "
                        "processes; ignoring it", self.process_index, build["step"],
                        build["num_shards"], self.process_count)
        continue
      if index_format.shard_done(self.index_root, build, self.process_index) is None:
        return build
    return None
