"""One training loop for ICT warm start and REALM pretraining: `train_and_evaluate`.

Sections, in the order they run: set-up (mesh, config checks, data, model), state (restore or
create, warm start, step-0 checkpoint), compile (FLOPs and memory reported before step 1),
index (REALM only), the loop (batch -> retrieve -> step -> metrics -> refresh -> checkpoint ->
eval), and the final evaluation.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import signal
import threading
import time
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from etils import epath

from realm_jax import config_lib
from realm_jax import lease as lease_lib
from realm_jax import progress as progress_lib
from realm_jax.data import corpus as corpus_lib
from realm_jax.data import corpus_versions
from realm_jax.data import pipeline
from realm_jax.data import prepare
from realm_jax.models import hf_weights
from realm_jax.retrieval import candidates as candidates_lib
from realm_jax.retrieval import device_searcher
from realm_jax.retrieval import in_process
from realm_jax.retrieval import index_format
from realm_jax.retrieval import index_update
from realm_jax.retrieval import searcher as searcher_lib
from realm_jax.retrieval import watcher as watcher_lib
from realm_jax.train import checkpointing
from realm_jax.train import lagged_metrics
from realm_jax.train import metrics as metrics_lib
from realm_jax.train import multihost
from realm_jax.train import partitioning
from realm_jax.train import preemption
from realm_jax.train import preflight
from realm_jax.train import state as state_lib
from realm_jax.train import steps as steps_lib
from realm_jax.train import teardown as teardown_lib

QUERY_KEYS = ("query_tokens", "masked_positions", "masked_labels", "masked_weights")

# Bounds of the teardown steps (seconds): a save to slow storage may take minutes; a metrics
# flush or a thread join that takes longer than this is stuck.
CHECKPOINT_WAIT_SECONDS = 600.0
WRITER_CLOSE_SECONDS = 30.0
WATCHER_STOP_SECONDS = 15.0
LEASE_RELEASE_SECONDS = 15.0
METRICS_FLUSH_SECONDS = 30.0  # metrics also reach storage at least this often
LEASE_CHECK_SECONDS = 10.0  # a trainer whose lease was taken over stops within about this
EVAL_PROGRESS_SECONDS = 30.0


def recall_key(k: int) -> str:
  """Metric name of gold-document recall over the k - 1 retrieved (non-null) candidates."""
  return f"gold_recall_at_{k - 1}"


def _realm_device_batch(queries: dict[str, np.ndarray], corpus: corpus_lib.BlockCorpus,
                        ids: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
  """Host arrays of one REALM batch: the queries plus their candidates' tokens."""
  cands = corpus_lib.gather_candidates(corpus, ids)
  return {**{k: queries[k] for k in QUERY_KEYS},
          "cand_doc_tokens": cands["retriever_tokens"],
          "cand_doc_segments": cands["retriever_segments"],
          "cand_body_tokens": cands["reader_tokens"],
          "cand_mask": mask,
          "cand_is_gold": (ids == queries["gold_ids"][:, None]) & mask}


class Retriever:
  """Candidates for a batch of queries: live query embedding, index search, assembly.

  `start` dispatches the query embedding to the devices and returns at once; `finish` waits
  for it and searches on the host. The loop starts batch t+1 before dispatching step t, so
  the host search runs while the devices train. With `retrieval.searcher=device` `start`
  also dispatches the search itself (the query embeddings never leave the devices) and
  `finish` fetches only the [B, k - 1 + margin] ids for the candidate assembly.
  """

  def __init__(self, enabled: bool, retrieval_config, corpus, index, embed_queries, mesh):
    self.enabled = enabled  # False: the null document alone (no-retrieval baseline)
    self.k, self.margin = retrieval_config.k, retrieval_config.margin
    self.corpus, self.index, self._embed_queries, self._mesh = corpus, index, embed_queries, mesh

  def start(self, params, queries: dict[str, np.ndarray]) -> jax.Array | None:
    """Dispatches the embedding of this process's queries: [B_global, D] on the mesh."""
    if not self.enabled:
      return None
    tokens = partitioning.shard_batch({"t": queries["query_tokens"]}, self._mesh)["t"]
    query_emb = self._embed_queries(params, tokens)
    if isinstance(self.index.searcher, device_searcher.DeviceSearcher):
      return device_searcher.start_retrieval(self.index.searcher, query_emb, self.k,
                                             self.margin)
    return query_emb

  def finish(self, queries: dict[str, np.ndarray],
             query_emb: jax.Array | device_searcher.PendingSearch | None
             ) -> tuple[np.ndarray, np.ndarray]:
    """-> candidate ids [B_local, k] and mask [B_local, k] for this process's queries."""
    if not self.enabled:
      return candidates_lib.null_only_candidates(len(queries["query_tokens"]),
                                                 self.corpus.null_id)
    if isinstance(query_emb, device_searcher.PendingSearch):
      return device_searcher.finish_retrieval(query_emb, queries["source_ids"], self.k,
                                              self.candidate_corpus(self.corpus).null_id)
    return self.index.retrieve(partitioning.local_rows(query_emb), queries["source_ids"],
                               self.k, self.margin)

  def __call__(self, params, queries: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    return self.finish(queries, self.start(params, queries))

  def candidate_corpus(self, default):
    """Where candidates' tokens come from: the corpus version the index in use was built for
    (a builder version over an updated corpus), else `default`, the run's corpus."""
    return getattr(self.index, "corpus", None) or default


def _indexed_corpus_version(index):
  """The CorpusVersion the index in use was built for (trainer-held or builder-published);
  None when it is the build itself as loaded by the run."""
  version = getattr(index, "corpus_version", None)  # InProcessIndex
  if version is None and hasattr(index, "watcher"):  # WatchedIndex
    version = index.watcher.corpus_of.get(index.step)
  return version


def _local_slice(arrays: dict[str, np.ndarray], start: int, stop: int) -> dict[str, np.ndarray]:
  """Rows [start, stop) of the global eval order that belong to this process."""
  per_process = (stop - start) // jax.process_count()
  lo = start + jax.process_index() * per_process
  return {k: v[lo:lo + per_process] for k, v in arrays.items()}


def _eval_batches(queries: dict[str, np.ndarray], batch_size: int):
  """This process's part of each global eval batch, the last padded with inert rows.

  Padding rows are copies of query 0 with zero mask weights and unknown gold, so they count
  for nothing.
  """
  n = len(queries["query_tokens"])
  padded = -(-n // batch_size) * batch_size
  real = np.arange(padded) < n
  arrays = {k: v[np.where(real, np.arange(padded), 0)] for k, v in queries.items()}
  arrays["gold_ids"] = np.where(real, arrays["gold_ids"], -1)
  if "masked_weights" in arrays:
    arrays["masked_weights"] = arrays["masked_weights"] * real[:, None]
  for start in range(0, padded, batch_size):
    yield _local_slice(arrays, start, start + batch_size), min(batch_size, n - start)


def _eval_progress(name: str, queries: dict[str, np.ndarray]) -> progress_lib.Progress:
  return progress_lib.Progress(name, len(queries["query_tokens"]), unit="queries",
                               every_seconds=EVAL_PROGRESS_SECONDS)


def _gold_hits(ids: np.ndarray, mask: np.ndarray, gold: np.ndarray) -> tuple[int, int]:
  """(queries whose gold doc is among the real candidates, queries with a known gold doc)."""
  found = (np.where(mask, ids, -2)[:, 1:] == gold[:, None]).any(axis=1) & (gold >= 0)
  return int(found.sum()), int((gold >= 0).sum())


def evaluate_realm(params, queries: dict[str, np.ndarray], corpus, retriever: Retriever,
                   eval_step, mesh, batch_size: int, progress_name: str = "eval"
                   ) -> dict[str, float]:
  """Masked-span accuracy, loss, RU and gold recall@k over all held-out queries (with a
  progress line over the queries)."""
  totals = dict(loss=0.0, retrieval_utility=0.0, token_accuracy=0.0, span_accuracy=0.0,
                null_doc_prob=0.0, num_tokens=0.0, num_queries=0.0)
  hits = known = 0
  progress = _eval_progress(progress_name, queries)
  for local, num_real in _eval_batches(queries, batch_size):
    ids, mask = retriever(params, local)
    out = jax.device_get(eval_step(params, partitioning.shard_batch(
        _realm_device_batch(local, retriever.candidate_corpus(corpus), ids, mask), mesh)))
    for name in ("loss", "retrieval_utility", "token_accuracy"):
      totals[name] += float(out[name]) * float(out["num_tokens"])
    for name in ("span_accuracy", "null_doc_prob"):
      totals[name] += float(out[name]) * float(out["num_queries"])
    totals["num_tokens"] += float(out["num_tokens"])
    totals["num_queries"] += float(out["num_queries"])
    if retriever.enabled:
      batch_hits, batch_known = _gold_hits(ids, mask, local["gold_ids"])
      hits, known = hits + batch_hits, known + batch_known
    progress.update(num_real)
  progress.close()
  hits, known = multihost.sum_over_processes((hits, known))  # each process judged its rows
  tokens, num_queries = max(totals["num_tokens"], 1.0), max(totals["num_queries"], 1.0)
  result = {name: totals[name] / tokens for name in ("loss", "retrieval_utility", "token_accuracy")}
  result["span_accuracy"] = totals["span_accuracy"] / num_queries
  result["null_doc_prob"] = totals["null_doc_prob"] / num_queries
  result["num_queries"] = totals["num_queries"]
  if retriever.enabled and known:
    result[recall_key(retriever.k)] = hits / known
  return result


def index_recall(params, queries: dict[str, np.ndarray], retriever: Retriever,
                 batch_size: int, progress_name: str = "index recall") -> float:
  """Gold-document recall@(k-1) of the current index for held-out queries (retrieval only)."""
  hits = known = 0
  progress = _eval_progress(progress_name, queries)
  for local, num_real in _eval_batches(queries, batch_size):
    batch_hits, batch_known = _gold_hits(*retriever(params, local), local["gold_ids"])
    hits, known = hits + batch_hits, known + batch_known
    progress.update(num_real)
  progress.close()
  hits, known = multihost.sum_over_processes((hits, known))  # each process judged its rows
  return hits / max(known, 1)


def _agreed_swap(index: watcher_lib.WatchedIndex, first_timeout: float | None = None,
                 due: int | None = None, timeout: float = 0.0) -> bool:
  """Swaps in a newer builder version (with `first_timeout`: waits for the first one).

  With `due` (retrieval.builder_sync_lag > 0) only the version of checkpoint `due` is taken,
  waited for up to `timeout` s (`WatchedIndex.swap_when_due`), instead of whatever is newest.

  With several processes, process 0's watcher decides and every process swaps in that very
  version at the same step (each process's watcher polls on its own clock; candidates that
  differed between processes would be a different batch than one process would build).
  Returns whether a version was swapped in.
  """
  def decide() -> int:
    if first_timeout is not None:
      if due is None:
        index.wait_for_first(first_timeout)
      else:
        index.start_at_due(due, first_timeout)
      return index.step
    if due is not None:
      return index.step if index.swap_when_due(due, timeout) else -1
    return index.step if index.maybe_swap() else -1
  if jax.process_count() == 1:
    return decide() >= 0
  step = multihost.agree(decide, "the index version swap")  # its errors are everyone's
  # The version's name is (parameter step, corpus version): both travel.
  corpus_version = multihost.broadcast_int(getattr(step, "corpus_version", 0) if step else 0)
  step = multihost.broadcast_int(-1 if step is None else step)
  if step < 0:
    return False
  if jax.process_index() != 0:
    index.swap_to(index_format.VersionKey(step, corpus_version))
  return True


@contextlib.contextmanager
def _sigint_deferred():
  """Holds a Ctrl-C back until the block is done, then raises it (KeyboardInterrupt).

  The train step donates the state's buffers: an interrupt between the call and the
  assignment of its result would leave neither the old state (deleted) nor the new one to
  save. A no-op off the main thread (Python delivers signals to the main thread only).
  """
  if threading.current_thread() is not threading.main_thread():
    yield
    return
  caught = []
  previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
  try:
    yield
  finally:
    signal.signal(signal.SIGINT, previous)
  if caught:
    raise KeyboardInterrupt


def _learning_rates(config: ml_collections.ConfigDict, start: int,
                    stop: int) -> Callable[[int], float]:
  """step (0-based) -> the learning rate of that step's update (multiplier-1 group), for the
  steps [start, stop) of this call, evaluated once (no device work per step)."""
  schedule = state_lib.learning_rate_schedule(config)
  values = np.asarray(jax.device_get(schedule(np.arange(start, max(stop, start)))),
                      np.float64)
  return lambda step: float(values[step - start])


def _eval_metric_tags(config: ml_collections.ConfigDict) -> list[str]:
  """The eval scalars TensorBoard's hparams table shows next to the config."""
  recall = f"eval/{recall_key(config.retrieval.k)}"
  if config.objective == "ict":
    return [recall]
  return ["eval/span_accuracy", "eval/loss", "eval/retrieval_utility", recall]


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: epath.PathLike,
                       max_steps_this_run: int | None = None, devices=None,
                       force_lease: bool = False) -> dict[str, Any]:
  """Trains `config.objective` ("realm" or "ict") in `workdir`, resuming if it holds a run.

  One writer per workdir: process 0 takes the workdir's "trainer" lease (realm_jax/lease.py)
  after the config checks and before it writes anything; a second trainer is refused with a
  LeaseHeldError naming the holder. The lease is checked before every checkpoint save, so a
  trainer whose lease was taken over stops (LeaseLostError) without saving.

  However the run ends, one teardown (train/teardown.py) stops the index watcher, closes the
  metric writers, waits for the in-flight checkpoint (bounded) and releases the lease; an
  error inside the loop propagates as itself, teardown failures after it are logged.
  Ctrl-C (KeyboardInterrupt) in the loop saves a checkpoint of the last finished step, logs
  `interrupted at step N: checkpoint saved to ...` and re-raises.
  SIGTERM (preemption, train/preemption.py) anywhere in the call: the step in progress
  finishes, every process stops before the same step (agreed at each step boundary), the
  checkpoint of the last finished step is saved and waited for, one line `preempted at step
  N: checkpoint saved to ...` is logged and `preemption.Preempted` is raised (no final
  evaluation: the next call resumes and evaluates; the CLI exits 0).

  Args:
    config: a resolved experiment config (see experiments/realm_facts.py).
    workdir: the run's folder (local or gs://); checkpoints, index, metrics go under it.
    max_steps_this_run: stop after this many steps (a preemption stand-in; the schedule still
      follows train.num_steps, and the next call resumes).
    devices: devices for the mesh (default: all).
    force_lease: take the trainer lease even from a live holder (the CLI's --force).

  Returns:
    The final evaluation metrics (held-out queries) and the per-step history of this call.
  """
  run_start = time.time()
  workdir = epath.Path(workdir)
  mesh = partitioning.make_mesh(config.mesh, devices)
  config_lib.validate(config, partitioning.data_parallel_size(mesh), jax.process_count())
  # The SIGTERM handler outlives the teardown: a preemption during a checkpoint wait is noted.
  with preemption.sigterm_handled() as stop_request, teardown_lib.Teardown() as teardown:
    return _train(config, workdir, mesh, max_steps_this_run, force_lease, teardown, run_start,
                  stop_request)


def _train(config: ml_collections.ConfigDict, workdir: epath.Path, mesh,
           max_steps_this_run: int | None, force_lease: bool, teardown: teardown_lib.Teardown,
           run_start: float, stop_request: preemption.StopRequest) -> dict[str, Any]:
  """`train_and_evaluate` after the config checks; every resource it opens is registered
  with `teardown` as soon as it exists; `stop_request` is read at every step boundary."""
  # ---- Set-up: the lease, data, model ----------------------------------------------------
  is_main = jax.process_index() == 0
  stuck = {"checkpoint": False}  # a save still running at teardown keeps the lease held

  def take_workdir() -> lease_lib.Lease:
    """Process 0: the lease, then the resume config check (which writes config.json)."""
    workdir.mkdir(parents=True, exist_ok=True)
    taken = lease_lib.acquire(workdir, "trainer", force=force_lease)

    def release_lease():
      if stuck["checkpoint"]:
        logging.warning("lease: kept on %s: a checkpoint save is still running", workdir)
      else:
        taken.release()
    teardown.add("trainer lease release", release_lease, LEASE_RELEASE_SECONDS)
    config_lib.save_run_config(config, workdir)
    return taken

  # Process 0's outcome (lease held by another trainer, resume refusal, a corpus that cannot
  # be built) is every process's: none trains alone, none waits in a collective forever.
  held = multihost.agree(take_workdir, "the trainer lease and resume config check")
  logging.info("setup: %s", partitioning.describe(mesh))
  # Process 0 builds the corpus (if missing); the others load what it built.
  data = multihost.agree(lambda: prepare.prepare_data(config, workdir), "corpus preparation")
  if data is None:
    data = prepare.prepare_data(config, workdir, build=False)
  corpus = data.corpus
  model = state_lib.build_model(config, corpus.vocab_size, corpus.special.pad)
  is_ict = config.objective == "ict"
  phase = config.ict if is_ict else config.train
  num_steps, batch_size = phase.num_steps, phase.batch_size
  gold_recall = recall_key(config.retrieval.k)

  # ---- State: restore, or create (+ warm start) and save step 0 ------------------------
  rng = jax.random.key(config.seed)
  shapes = state_lib.abstract_train_state(config, model, rng)
  state_sharding = partitioning.state_shardings_from_config(shapes, mesh, config)
  abstract = partitioning.with_shardings(shapes, state_sharding)
  logging.info("state: %s", partitioning.describe_state_layout(shapes, state_sharding, mesh))
  ckpt = checkpointing.Checkpointer(workdir / "checkpoints", keep=config.train.keep_checkpoints)

  def close_checkpointer():
    try:
      ckpt.close(CHECKPOINT_WAIT_SECONDS)
    except TimeoutError:
      stuck["checkpoint"] = True
      raise
  teardown.add("checkpoint wait and close", close_checkpointer, None)  # bounded inside
  restored = ckpt.restore(abstract)
  start_step = 0 if restored is None else restored[2]
  # Records past the restored step are from a run that crashed after its last checkpoint:
  # dropped now, logged again as those steps are replayed.
  writer = metrics_lib.MetricWriter(workdir / "metrics", enabled=is_main,
                                    phase=config.objective, keep_through_step=start_step,
                                    flush_every_seconds=METRICS_FLUSH_SECONDS)
  teardown.add("metrics close", writer.close, WRITER_CLOSE_SECONDS)
  if not writer.has_record("config"):
    writer.write_hparams(config, start_step, _eval_metric_tags(config))
  wall_offset = 0.0  # seconds this run trained in earlier calls (from the checkpoint)
  if restored is not None:
    state, data_state, _ = restored
    if data_state.get("step") != start_step:
      raise ValueError(f"checkpoint {start_step} holds data state {data_state}")
    wall_offset = float(data_state.get("wall_seconds", 0.0))
    logging.info("state: resumed from step %d", start_step)

  def wall_seconds() -> float:
    return wall_offset + time.time() - run_start

  last_lease_check = [time.monotonic()]

  def check_lease(every: float = 0.0):
    """LeaseLostError if another trainer took the workdir over (looked at most every `every`
    seconds: the lease file is read each time). Process 0 looks; every process raises, so all
    stop at the same step."""
    def look():
      if held is not None and time.monotonic() - last_lease_check[0] >= every:
        held.check()
        last_lease_check[0] = time.monotonic()
    multihost.agree(look, "the trainer lease check")

  def save_checkpoint(done: int):
    """Checkpoint of `state` after `done` steps, if the lease is still ours; the metrics up to
    it are put on storage first."""
    check_lease()
    writer.flush()
    ckpt.save(done, state, {"step": done, "wall_seconds": wall_seconds()})

  if restored is None:
    state = state_lib.create_train_state(config, model, rng, state_sharding)
    if config.model.get("init_from_hf"):
      state = state.replace(params=hf_weights.apply_hf_checkpoint(
          state.params, config.model.init_from_hf, model_config=config.model,
          vocab_size=corpus.vocab_size))
      logging.info("state: BERT towers from %s", config.model.init_from_hf)
    for field, keys in (("init_from", state_lib.EMBEDDER_KEYS),
                        ("init_encoder_from", state_lib.ENCODER_KEYS)):
      if config.train[field] and not is_ict:
        source, source_step = checkpointing.restore_params(config.train[field])
        params, copied = state_lib.warm_start(state.params, source, keys, f"train.{field}")
        state = state.replace(params=params)
        logging.info("state: warm start of %s from %s (step %d)", copied, config.train[field],
                     source_step)
    if state_lib.copies_embedder_into_encoder(config):
      params, source_name = state_lib.encoder_from_embedder(state.params)
      state = state.replace(params=params)
      logging.info("state: the encoder's BERT starts as a copy of the %s's", source_name)
    state = jax.device_put(state, state_sharding)
    save_checkpoint(0)  # the index builder's first checkpoint
  logging.info("state: %.2fM parameters", state_lib.count_params(state.params) / 1e6)

  # ---- Compile: the step functions, with FLOPs and memory before the first step --------
  embed_queries, embed_docs = steps_lib.make_embed_fns(model, mesh)
  if is_ict:
    train_step = steps_lib.make_ict_train_step(model, mesh, config.seed, state_sharding)
    source = pipeline.IctBatchSource(corpus, batch_size, config.seed, config.data.query_len,
                                     config.ict.remove_prob, jax.process_index(),
                                     jax.process_count(),
                                     exclude_sentences=data.heldout_sentences)
  else:
    train_step = steps_lib.make_realm_train_step(model, mesh, config.seed,
                                                 config.loss.marginalization, state_sharding)
    source = data.train_source(config.data, batch_size, config.seed, jax.process_index(),
                               jax.process_count())
  eval_step = steps_lib.make_realm_eval_step(model, mesh, config.loss.marginalization)

  # ---- Index: the trainer's own exact index (REALM with retrieval) ---------------------
  retrieval_on = not is_ict and config.retrieval.enabled
  preflight.check_trainer(config, corpus, state)  # fail fast before the index is built
  from_builder = retrieval_on and config.retrieval.index_source == "builder"
  index = None
  if from_builder:  # versions come from the separate index-builder job
    index = watcher_lib.WatchedIndex(watcher_lib.IndexWatcher(
        workdir / "index", config.model.embed_dim, corpus.num_docs,
        config.retrieval.watch_poll_seconds, corpus_dir=data.directory,
        prepare=(functools.partial(device_searcher.prepare_for_swap, mesh=mesh,
                                   **device_searcher.options_from_config(config.retrieval))
                 if config.retrieval.searcher == "device" else None),
        expected_fingerprint=corpus.fingerprint).start(), corpus.null_id)
    teardown.add("index watcher stop", index.watcher.stop, WATCHER_STOP_SECONDS)
  elif retrieval_on or is_ict:
    index = in_process.InProcessIndex(corpus, embed_docs, mesh, workdir / "index",
                                      config.retrieval.embed_batch_size,
                                      config.retrieval.keep_index_versions, write=is_main,
                                      searcher_kind=config.retrieval.searcher,
                                      searcher_options=searcher_lib.options_for(
                                          config.retrieval.searcher, config.retrieval),
                                      corpus_dir=data.directory,
                                      corpus_check_every=config.retrieval.corpus_check_every,
                                      update_mode=config.retrieval.get("index_update_mode",
                                                                       "delta"),
                                      max_delta_shards=config.retrieval.get(
                                          "index_update_max_delta_shards",
                                          index_update.MAX_DELTA_SHARDS))
  # REALM retrieves for its batches; ICT only for judging its embedder on held-out queries;
  # the no-retrieval baseline (no index) gets the null document alone.
  retriever = Retriever(index is not None, config.retrieval, corpus, index, embed_queries, mesh)
  # Held-out queries whose gold document is known: REALM's masked ones; ICT's unmasked
  # pseudo-queries when the corpus has them (wiki), else the masked ones (facts).
  recall_queries = (data.ict_eval_queries if is_ict and data.ict_eval_queries is not None
                    else data.eval_queries)

  index_recalls: list[tuple[int, float]] = []  # (step, held-out recall) per version seen

  def log_index_recall(step: int):
    """Held-out gold recall of the current index version (recorded once per version: a
    resumed run does not record again a version its predecessor recorded)."""
    if index is None:
      return
    recall = index_recall(state.params, recall_queries, retriever,
                          config.eval.batch_size)
    if not writer.has_record("index", step):
      writer.write(step, {gold_recall: recall, "refresh_seconds": index.last_refresh_seconds},
                   phase="index")
    logging.info("index: version %s, held-out %s = %.3f", index.step, gold_recall, recall)
    index_recalls.append((step, recall))
    drops = metrics_lib.recall_drops(index_recalls)
    if drops and drops[-1][2] == step:
      logging.warning("index: %s", metrics_lib.recall_drop_warning(drops[-1:], gold_recall))

  # retrieval.builder_sync_lag > 0: batch t is retrieved from the version of checkpoint
  # due_version(t), so which version a step sees does not depend on the builder's speed.
  sync_lag = config.retrieval.get("builder_sync_lag", 0) if from_builder else 0
  due_version = (None if not sync_lag else functools.partial(
      watcher_lib.due_version_step, refresh_every=config.retrieval.refresh_every, lag=sync_lag))
  sync_timeout = config.retrieval.first_index_timeout
  if from_builder:
    ckpt.wait(CHECKPOINT_WAIT_SECONDS)  # the builder embeds the step-0 (or resumed)
    _agreed_swap(index, config.retrieval.first_index_timeout,  # checkpoint: it must be there
                 due=None if due_version is None else due_version(start_step))
    log_index_recall(index.step)
  elif retrieval_on and start_step < num_steps:
    index.load_or_refresh(state.params, start_step, config.retrieval.refresh_every)
    log_index_recall(index.step)

  def realm_inputs(batch, query_emb, step: int) -> tuple[dict[str, np.ndarray], dict]:
    """Finishes the retrieval of batch `step`: the device batch (host arrays) and metrics."""
    wait_start = time.time()
    if isinstance(query_emb, jax.Array):  # the devices finish what is queued before it first
      query_emb.block_until_ready()
    retrieval_start = time.time()
    ids, mask = retriever.finish(batch, query_emb)
    scalars = {"query_wait_seconds": retrieval_start - wait_start,  # device time, not search
               "retrieval_seconds": time.time() - retrieval_start}
    if retrieval_on:
      scalars["index_step"] = int(index.step)
      scalars["index_corpus_version"] = getattr(index.step, "corpus_version", 0)
      scalars["staleness"] = step - index.step  # updates since the index was embedded
      hits, known = multihost.sum_over_processes(_gold_hits(ids, mask, batch["gold_ids"]))
      if known:  # over the global batch (each process retrieved its own rows)
        scalars[f"train_{gold_recall}"] = hits / known
    return _realm_device_batch(batch, retriever.candidate_corpus(corpus), ids, mask), scalars

  added_queries: dict[str, Any] = {}  # the AddedBlockQueries of the indexed corpus version

  def added_block_queries() -> pipeline.AddedBlockQueries | None:
    """Queries from the salient spans of blocks the indexed corpus version added (wiki
    corpora, salient masking; None for the build itself or without stored spans)."""
    version = _indexed_corpus_version(index)
    if (version is None or version.version == 0 or data.train_span_ids is None or
        config.data.masking != "salient"):
      return None
    if added_queries.get("version") != version.version:
      spans = corpus_versions.added_spans(version)
      span_ids = pipeline.added_block_span_ids(version.corpus, spans, corpus.num_docs,
                                               version.removed, config.data.query_len,
                                               config.data.max_masked)
      added_queries["version"] = version.version
      added_queries["source"] = pipeline.AddedBlockQueries(
          version.corpus, spans, span_ids, len(data.train_span_ids), batch_size, config.seed,
          config.data.query_len, config.data.max_masked, version.version,
          jax.process_index(), jax.process_count())
      logging.info("data: corpus version %d: %d training span queries from added blocks "
                   "(%.2f%% of each batch)", version.version, len(span_ids),
                   100 * added_queries["source"].fraction)
    return added_queries["source"]

  def train_batch(step: int) -> dict[str, np.ndarray]:
    """Batch `step` of the source; REALM: queries from documents removed in the indexed
    corpus version made inert (`corpus_versions.live_queries`), and queries from the blocks
    it added mixed in (`pipeline.AddedBlockQueries`)."""
    batch = source.batch_at(step)
    if not retrieval_on:
      return batch
    batch = corpus_versions.live_queries(batch, index.removed)
    added = added_block_queries()
    return batch if added is None else added.mix(batch, step)

  def inputs_at(step: int) -> tuple[dict[str, np.ndarray], dict]:
    """Batch `step` retrieved now, with the current parameters and index."""
    batch = train_batch(step)
    if is_ict:
      return {k: batch[k] for k in steps_lib.ICT_KEYS}, {}
    return realm_inputs(batch, retriever.start(state.params, batch), step)

  stop = num_steps if max_steps_this_run is None else min(num_steps,
                                                          start_step + max_steps_this_run)
  report: dict[str, float] = {}
  pending = None  # (inputs, retrieval metrics) of the next step, prepared ahead
  if start_step < stop:  # a finished run goes straight to its final evaluation
    pending = inputs_at(start_step)
    compile_start = time.time()
    report = steps_lib.compile_report(train_step, state,
                                      partitioning.shard_batch(pending[0], mesh))
    logging.info("compile: %.1fs; %s", time.time() - compile_start,
                 ", ".join(f"{k} {v:.3g}" for k, v in report.items()))

  def checkpoint_last_step() -> int:
    """The state of the last finished step to storage (waited for): its step number. Its
    lagged record is checked first (a non-finite step raises instead of being saved)."""
    records.flush()
    done = int(jax.device_get(state.step))
    ckpt.wait(CHECKPOINT_WAIT_SECONDS)  # a save in flight when the stop came
    if done not in ckpt.all_steps():
      save_checkpoint(done)
      ckpt.wait(CHECKPOINT_WAIT_SECONDS)
    else:
      writer.flush()
    return done

  def checkpoint_on_interrupt():
    """Ctrl-C in the loop: the state of the last finished step goes to storage (waited for)."""
    try:
      done = checkpoint_last_step()
    except Exception as e:  # pylint: disable=broad-except
      logging.error("interrupted: no checkpoint saved (%s)", teardown_lib.one_line(e))
      return
    logging.info("interrupted at step %d: checkpoint saved to %s", done,
                 ckpt.directory / str(done))

  def checkpoint_on_preemption():
    """SIGTERM: the last finished step's checkpoint, then Preempted (a failed save raises its
    own error instead: exit 1, not 0)."""
    records.flush()  # the last step's record before the progress bar closes
    if start_step < stop:
      progress.close()
    done = checkpoint_last_step()
    message = (f"preempted at step {done} "
               f"({stop_request.signal_name or 'stop signal on another process'}): "
               f"checkpoint saved to {ckpt.directory / str(done)}")
    logging.info("%s", message)
    raise preemption.Preempted(message, done, str(ckpt.directory / str(done)))

  # ---- The loop ------------------------------------------------------------------------
  # With retrieval.prefetch, batch t+1's query embedding is queued before step t and its host
  # search runs while the devices compute step t (candidates chosen with the parameters from
  # before step t's update; the index itself is refresh_every steps stale anyway).
  prefetch = not is_ict and config.retrieval.prefetch
  learning_rate = _learning_rates(config, start_step, stop)
  progress = progress_lib.Progress(config.objective, num_steps, unit="steps", start=start_step,
                                   every_count=config.train.log_every)
  history = []

  def record_step(done: int, scalars: dict[str, float]):
    """Step `done`'s record (metrics.jsonl, TensorBoard, progress); NonFiniteMetrics first if
    its loss or gradient norm is NaN/inf (the state after it is never saved)."""
    scalars.update(examples_per_second=batch_size / scalars["step_seconds"],
                   learning_rate=learning_rate(done - 1), wall_seconds=wall_seconds(),
                   timestamp=time.time())
    check_lease(LEASE_CHECK_SECONDS)  # no records into a workdir another trainer now owns
    writer.write(done, scalars)
    history.append(dict(step=done, **scalars))
    bad = metrics_lib.nonfinite(scalars)
    if bad:  # NaN/inf loss or gradient norm: stop here, this state unsaved
      writer.flush()
      ckpt.wait(CHECKPOINT_WAIT_SECONDS)  # a periodic save in flight is a good state
      raise metrics_lib.nonfinite_error(bad, done, ckpt.all_steps(), config.objective)
    progress.set(done, {k: scalars[k] for k in ("loss", "span_accuracy", "accuracy",
                                                "retrieval_utility") if k in scalars})

  # Step t's metrics are fetched after step t+1 is dispatched (train.metrics_lag), and every
  # pending step is checked before a checkpoint, refresh, evaluation, stop or the end.
  records = lagged_metrics.LaggedMetrics(record_step, lag=config.train.metrics_lag)
  preempted = False
  try:
    for step in range(start_step, stop):
      if stop_request.agreed():  # every process stops before the same step
        preempted = True
        break
      step_start = time.time()
      scalars: dict[str, float] = {}
      # Between two steps, never inside one; in sync mode the version the next batch to be
      # retrieved is due (with prefetch that is batch step + 1, retrieved during this step).
      due = None if due_version is None else due_version(step + 1 if prefetch else step)
      if from_builder and _agreed_swap(index, due=due, timeout=sync_timeout):
        scalars.update(index_swaps=index.swaps, index_load_seconds=index.last_refresh_seconds)
        log_index_recall(index.step)
      inputs, retrieval_scalars = pending if pending is not None else inputs_at(step)
      scalars.update(retrieval_scalars)
      pending = None
      if prefetch and step + 1 < stop:
        next_batch = train_batch(step + 1)
        next_emb = retriever.start(state.params, next_batch)  # queued ahead of step t
      device_inputs = partitioning.shard_batch(inputs, mesh)
      # A Ctrl-C from here until the step is recorded waits for it: the old state is donated
      # (only the new one can be saved) and its record must precede its checkpoint.
      with _sigint_deferred():
        state, step_metrics = train_step(state, device_inputs)
        if prefetch and step + 1 < stop:
          pending = realm_inputs(next_batch, next_emb, step + 1)  # host search overlaps step t
        records.push(step + 1, step_metrics, scalars, step_start)  # finishes step t-1 (lag)

      done = step + 1
      refresh = (retrieval_on and not from_builder and done % config.retrieval.refresh_every == 0
                 and done < num_steps)
      save = done % config.train.checkpoint_every == 0 or done == num_steps or done == stop
      evaluate = (not is_ict and config.eval.every and done % config.eval.every == 0 and
                  done < num_steps)
      if (refresh or save or evaluate or
          (retrieval_on and not from_builder and index.corpus_check_due(done))):
        with _sigint_deferred():
          records.flush()  # every step checked before its state is saved or used
      if refresh:
        index.refresh(state.params, done)
        log_index_recall(done)
        pending = None  # retrieved from the old index: redo it from the new one
      elif (retrieval_on and not from_builder and done < num_steps and
            index.follow_corpus(state.params, done)):  # a new corpus version, same params
        pending = None  # may hold a removed document: redo it from the updated index
      if save:
        save_checkpoint(done)
      if evaluate:
        writer.write(done, evaluate_realm(state.params, data.eval_queries, corpus,
                                          retriever, eval_step, mesh,
                                          config.eval.batch_size), phase="eval")
  except KeyboardInterrupt:
    checkpoint_on_interrupt()
    raise
  except Exception:
    records.settle()  # the last finished step's record, unless the error was a record's
    raise
  if preempted or stop_request.agreed():  # a SIGTERM in the last step: no final evaluation
    checkpoint_on_preemption()
  records.flush()  # (already flushed by the last step's checkpoint)
  if start_step < stop:
    progress.close()
  writer.flush()
  ckpt.wait(CHECKPOINT_WAIT_SECONDS)

  # ---- Final evaluation ----------------------------------------------------------------
  final: dict[str, Any] = {"step": int(jax.device_get(state.step)), "history": history,
                           "compile": report}
  if stop == num_steps:
    if is_ict:
      index.refresh(state.params, stop)
      final[gold_recall] = index_recall(state.params, recall_queries, retriever,
                                       config.eval.batch_size)
      if not writer.has_record("eval", stop):
        writer.write(stop, {gold_recall: final[gold_recall]}, phase="eval")
    else:
      if from_builder:  # sync mode: the final checkpoint's version, waited for
        _agreed_swap(index, due=None if due_version is None else stop, timeout=sync_timeout)
      elif retrieval_on:
        index.refresh(state.params, stop)
        log_index_recall(stop)
      final.update(evaluate_realm(state.params, data.eval_queries, corpus, retriever,
                                  eval_step, mesh, config.eval.batch_size))
      if not writer.has_record("eval", stop):  # a finished run evaluated again: recorded once
        writer.write(stop, {k: v for k, v in final.items() if isinstance(v, float)},
                     phase="eval")
    logging.info("eval: %s", {k: round(v, 4) for k, v in final.items() if isinstance(v, float)})
  return final
