"""The index-builder job: publishes exactly what the trainer's embedder gives, restart-safely.

Also the embedder-only (partial) restore it reads checkpoints with, several builder processes
sharing one version, and a builder killed mid-publish.
"""

import dataclasses
import importlib.util
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import optax
import pytest
from flax.training import train_state

from realm_jax.retrieval import in_process
from realm_jax.retrieval import index_builder
from realm_jax.retrieval import index_format
from realm_jax.retrieval import scann_searcher
from realm_jax.retrieval import watcher as watcher_lib
from realm_jax.train import checkpointing
from realm_jax.train import loop
from realm_jax.train import partitioning
from realm_jax.train import state as state_lib
from realm_jax.train import steps as steps_lib
import multiprocess  # pylint: disable=g-bad-import-order
from tiny_configs import tiny_config  # pylint: disable=g-bad-import-order

TESTS_DIR = pathlib.Path(__file__).parent


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A finished tiny REALM run (checkpoints 0, 3, 6) whose own index we then delete."""
  workdir = tmp_path_factory.mktemp("run")
  config = tiny_config()
  loop.train_and_evaluate(config, workdir)
  (workdir / "index").rename(workdir / "trainer_index")
  return config, workdir


def test_builds_from_newest_checkpoint_and_matches_the_trainer_embedder(trained):
  config, workdir = trained
  builder = index_builder.IndexBuilder(config, workdir)
  assert builder.run(poll_seconds=0.01, max_builds=1) == [6]
  manifest, searcher = index_format.load_index(workdir / "index", 6, expected_dim=128)
  assert manifest["source"] == "index_builder" and index_format.latest_step(workdir / "index") == 6
  # Independent path: the trainer's in-process embedding of the same checkpoint's params.
  params, _ = checkpointing.restore_params(workdir / "checkpoints", 6)
  mesh = partitioning.make_mesh(config.mesh)
  model = state_lib.build_model(config, builder.corpus.vocab_size, 0)
  _, embed_docs = steps_lib.make_embed_fns(model, mesh)
  expected = in_process.embed_corpus(partitioning.replicate(params, mesh), builder.corpus,
                                     embed_docs, mesh, 64)
  np.testing.assert_allclose(searcher.shards[0].embeddings, expected, rtol=1e-5, atol=1e-5)


def test_restart_cleans_tmp_and_waits_for_a_newer_checkpoint(trained, tmp_path):
  config, workdir = trained
  (workdir / "index" / ".tmp-9-deadbeef").mkdir(parents=True, exist_ok=True)
  if index_format.latest_step(workdir / "index") != 6:  # run alone: the first test's build
    assert index_builder.IndexBuilder(config, workdir).run(poll_seconds=0.01, max_builds=1) == [6]
  builder = index_builder.IndexBuilder(config, workdir)
  # Version 6 is published and no checkpoint is refresh_every (3) newer: nothing to build.
  assert builder.run(poll_seconds=0.01, idle_timeout=0.2) == []
  assert not (workdir / "index" / ".tmp-9-deadbeef").exists()
  assert index_format.list_versions(workdir / "index") == [6]


def test_builder_preflight_fails_fast_before_embedding_and_publishes_nothing(trained,
                                                                           monkeypatch):
  """A host too small for the builder's shard stops it at start-up with the numbers; the
  estimate is the shard's float32 embeddings and the resident corpus arrays (hand count)."""
  from realm_jax.train import preflight
  config, workdir = trained
  before = index_format.list_versions(workdir / "index")
  seen = {}
  real_check = preflight.check
  def spy(estimate, *args, **kwargs):
    seen["estimate"] = estimate
    return real_check(estimate, *args, **kwargs)
  monkeypatch.setattr(preflight, "check", spy)
  monkeypatch.setattr(preflight, "host_available_bytes", lambda: 1000)  # 1 kB
  builder = index_builder.IndexBuilder(config, workdir, process_index=0, process_count=2)
  with pytest.raises(preflight.InsufficientMemory, match="index_builder memory preflight.*"
                     "DOES NOT FIT.*host"):
    builder.run(poll_seconds=0.01, max_builds=1)
  corpus = builder.corpus
  rows = index_builder.shard_rows(corpus.num_docs, 0, 2)
  assert seen["estimate"].index_bytes == (rows[1] - rows[0]) * config.model.embed_dim * 4
  resident = sum(getattr(corpus, f.name).nbytes for f in dataclasses.fields(corpus)
                 if isinstance(getattr(corpus, f.name), np.ndarray)
                 and not isinstance(getattr(corpus, f.name), np.memmap))
  assert seen["estimate"].corpus_bytes == resident
  assert seen["estimate"].state_bytes_per_device > 0  # the document tower's parameters
  assert index_format.list_versions(workdir / "index") == before  # nothing built
  assert builder._embed_docs is None  # stopped before compiling the embedder
  monkeypatch.setenv("REALM_PREFLIGHT", "warn")  # the switch downgrades it to a warning
  builder = index_builder.IndexBuilder(config, workdir)
  builder._ensure_model(wait_seconds=0.0, poll_seconds=0.0)
  assert builder._embed_docs is not None


def test_checkpoint_steps_ignore_unfinished_saves(tmp_path):
  for name in ("0", "3", "6.orbax-checkpoint-tmp-12", "notes"):
    (tmp_path / name).mkdir()
  assert index_builder.finished_checkpoint_steps(tmp_path) == [0, 3]
  assert index_builder.finished_checkpoint_steps(tmp_path / "missing") == []


def _train_beside_a_builder_process(tmp_path, num_steps: int, sync_lag: int = 0):
  """Two real processes share a workdir: the builder publishes, the trainer swaps. Returns
  the trainer's result and the builder's log."""
  tests_dir = pathlib.Path(__file__).parent
  config_file = tmp_path / "two_process_config.py"
  config_file.write_text(textwrap.dedent(f"""
      import sys
      sys.path.insert(0, {str(tests_dir)!r})
      from tiny_configs import tiny_config

      def get_config():
        config = tiny_config()
        config.retrieval.index_source = "builder"
        config.retrieval.refresh_every = 10
        config.retrieval.builder_sync_lag = {sync_lag}
        config.retrieval.watch_poll_seconds = 0.1
        config.retrieval.builder_poll_seconds = 0.1
        config.retrieval.first_index_timeout = 120.0
        config.train.num_steps = {num_steps}
        config.train.checkpoint_every = 10
        config.train.keep_checkpoints = 5
        return config
      """))
  spec = importlib.util.spec_from_file_location("two_process_config", config_file)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  workdir = tmp_path / "run"
  env = multiprocess.one_device_env()  # the builder: 1 device
  log_path = tmp_path / "builder.log"
  with log_path.open("w") as log:  # a file, not a pipe: a full pipe would block the builder
    builder = subprocess.Popen(
        [sys.executable, "-m", "realm_jax.main", "--mode=index_builder",
         f"--config={config_file}", f"--workdir={workdir}"],
        cwd=tests_dir.parent, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
      result = loop.train_and_evaluate(module.get_config(), workdir)
    finally:
      builder.kill()
      builder.wait()
  return result, log_path.read_text()


def test_trainer_hot_swaps_versions_from_a_builder_process(tmp_path):
  """Asynchronous swaps (builder_sync_lag 0): each version as soon as it is loaded (>= 2)."""
  result, output = _train_beside_a_builder_process(tmp_path, num_steps=200)
  history = result["history"]
  swaps = max((h.get("index_swaps", 0) for h in history), default=0)
  assert swaps >= 2, output[-3000:]
  assert np.all(np.isfinite([h["loss"] for h in history]))
  index_steps = [h["index_step"] for h in history]
  assert index_steps == sorted(index_steps) and index_steps[-1] > 0
  assert all(h["staleness"] >= 0 for h in history)


def test_with_a_sync_lag_every_batch_uses_the_version_it_is_due(tmp_path):
  """builder_sync_lag = 4, refresh_every = 10: batch t is retrieved from the version of
  checkpoint 10 * floor((t - 4) / 10) at every logged step, however fast the builder is (the
  trainer waits when it is late), so the run does not depend on the builder's timing."""
  result, output = _train_beside_a_builder_process(tmp_path, num_steps=60, sync_lag=4)
  history = result["history"]
  assert len(history) >= 5, history
  for record in history:  # record "step" t + 1 is the one after batch t
    due = max(0, (record["step"] - 1 - 4) // 10 * 10)
    assert record["index_step"] == due, (record, output[-3000:])
  assert {h["index_step"] for h in history} >= {0, 20, 40}  # versions came and were used
  assert np.all(np.isfinite([h["loss"] for h in history]))


def _run_dir(source, path, steps):
  """A fresh workdir holding copies of some of `source`'s checkpoints (the corpus stays put)."""
  for step in steps:
    shutil.copytree(source / "checkpoints" / str(step), path / "checkpoints" / str(step))
  return path


def _config(source, searcher="exact"):
  config = tiny_config(corpus_dir=source / "corpus")
  config.retrieval.searcher = searcher
  return config


_BUILDER_SCRIPT = """
import sys
import jax
sys.path.insert(0, {tests_dir!r})
from tiny_configs import tiny_config
from realm_jax.retrieval import index_builder

config = tiny_config(corpus_dir={corpus_dir!r})
config.retrieval.searcher = {searcher!r}
if {coordinator!r}:  # real multi-host JAX: the builder takes its place from jax.process_*()
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize({coordinator!r}, {count}, {index})
  builder = index_builder.IndexBuilder(config, {workdir!r})
  assert (builder.process_index, builder.process_count) == ({index}, {count})
else:  # independent processes, told their place
  builder = index_builder.IndexBuilder(config, {workdir!r}, process_index={index},
                                       process_count={count})
print("built", builder.run(poll_seconds=0.05, max_builds=1, idle_timeout=60))
"""


def _start_builder(source, workdir, log_path, index=0, count=1, searcher="exact", env=None,
                   coordinator=""):
  """An index-builder process on one CPU device (the checkpoints come from 8)."""
  script = _BUILDER_SCRIPT.format(tests_dir=str(TESTS_DIR), corpus_dir=str(source / "corpus"),
                                  searcher=searcher, workdir=str(workdir), index=index,
                                  count=count, coordinator=coordinator)
  full_env = multiprocess.one_device_env()
  full_env.update(env or {})
  with open(log_path, "w") as log:  # a file, not a pipe: a full pipe would block the builder
    return subprocess.Popen([sys.executable, "-c", script], cwd=TESTS_DIR.parent, env=full_env,
                            stdout=log, stderr=subprocess.STDOUT)


@pytest.fixture(scope="module")
def reference(trained, tmp_path_factory):
  """Checkpoint 6 published by one in-process (8-device) builder: (embeddings [N, D], searcher)."""
  _, source = trained
  workdir = _run_dir(source, tmp_path_factory.mktemp("reference"), [6])
  builder = index_builder.IndexBuilder(_config(source), workdir)
  assert builder.run(poll_seconds=0.01, max_builds=1) == [6]
  _, searcher = index_format.load_index(workdir / "index", 6)
  return searcher.shards[0].embeddings, searcher


def _file_bytes_read() -> int:
  ts = pytest.importorskip("tensorstore")
  metrics = ts.experimental_collect_matching_metrics("/tensorstore/kvstore/file/bytes_read")
  return sum(value["value"] for metric in metrics for value in metric["values"])


def test_restore_embedder_params_equals_the_full_restores_subtree(trained):
  _, workdir = trained
  partial, step = checkpointing.restore_embedder_params(workdir, 6)
  full, _ = checkpointing.restore_params(workdir, 6)
  assert step == 6 and sorted(partial) == ["embedder"]  # shared embedders: one tower, no encoder
  assert jax.tree.structure(partial["embedder"]) == jax.tree.structure(full["embedder"])
  jax.tree.map(np.testing.assert_array_equal, partial["embedder"], full["embedder"])
  with pytest.raises(ValueError, match="none of"):
    checkpointing.restore_embedder_params(workdir, 6, keys=("query_embedder",))


def test_restore_embedder_params_reads_neither_encoder_nor_optimizer_state(tmp_path):
  """Saved like the trainer saves (8 devices, Adam), restored on 1: only the embedder is read."""
  rng = np.random.default_rng(0)
  params = {"embedder": {"kernel": rng.normal(size=(64, 256)).astype(np.float32)},
            "encoder": {"kernel": rng.normal(size=(1024, 1024)).astype(np.float32)}}
  state = train_state.TrainState.create(apply_fn=None, params=params, tx=optax.adam(1e-3))
  mesh = partitioning.make_mesh([("data", -1)])
  ckpt = checkpointing.Checkpointer(tmp_path, async_save=False)
  ckpt.save(1, partitioning.replicate(state, mesh), {"step": 1})
  ckpt.close()
  before = _file_bytes_read()
  partial, _ = checkpointing.restore_embedder_params(tmp_path, 1)
  partial_bytes = _file_bytes_read() - before
  before = _file_bytes_read()
  full, _ = checkpointing.restore_params(tmp_path, 1)
  full_bytes = _file_bytes_read() - before
  np.testing.assert_array_equal(partial["embedder"]["kernel"], params["embedder"]["kernel"])
  np.testing.assert_array_equal(full["encoder"]["kernel"], params["encoder"]["kernel"])
  embedder_bytes = params["embedder"]["kernel"].nbytes  # 64 KiB of a ~12 MiB state
  assert partial_bytes < 2 * embedder_bytes, (partial_bytes, embedder_bytes)
  assert full_bytes > 20 * partial_bytes, (full_bytes, partial_bytes)


def test_shard_rows_cover_the_corpus_once_contiguously():
  for num_docs, num_shards in ((10, 1), (10, 3), (200, 2), (7, 7)):
    ranges = [index_builder.shard_rows(num_docs, i, num_shards) for i in range(num_shards)]
    assert ranges[0][0] == 0 and ranges[-1][1] == num_docs
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    assert max(b - a for a, b in ranges) - min(b - a for a, b in ranges) <= 1


def _free_port() -> int:
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    return sock.getsockname()[1]


@pytest.mark.parametrize("multihost", [False, True], ids=["injected", "jax_distributed"])
def test_two_builder_processes_publish_one_scann_version(trained, reference, tmp_path,
                                                         multihost):
  """Process p embeds rows slice p on its own device; process 0 publishes both shards.

  Either two independent processes told their index, or one 2-process JAX job (no
  collectives happen: the restores are process-local, the shards meet in the index folder).
  """
  _, source = trained
  workdir = _run_dir(source, tmp_path / "run", [6])
  coordinator = f"127.0.0.1:{_free_port()}" if multihost else ""
  procs = [_start_builder(source, workdir, tmp_path / f"builder-{i}.log", index=i, count=2,
                          searcher="scann", coordinator=coordinator) for i in (1, 0)]
  try:
    for proc in procs:
      proc.wait(timeout=180)
  finally:
    for proc in procs:
      proc.kill()
  logs = "\n".join((tmp_path / f"builder-{i}.log").read_text()[-2000:] for i in (1, 0))
  assert [proc.returncode for proc in procs] == [0, 0], logs
  expected, single = reference
  num_docs = len(expected)
  manifest, merged = index_format.load_index(workdir / "index", 6, expected_dim=128,
                                             expected_num_docs=num_docs)
  assert index_format.latest_step(workdir / "index") == 6
  assert manifest["num_processes"] == 2 and manifest["searcher"] == "scann"
  assert [s["name"] for s in manifest["shards"]] == ["shard-00000-of-00002",
                                                    "shard-00001-of-00002"]
  assert all(isinstance(s, scann_searcher.ScannSearcher) for s in merged.shards)
  assert all(s["scann_files"] for s in manifest["shards"])
  ids = np.concatenate([s.doc_ids for s in merged.shards])
  np.testing.assert_array_equal(ids, np.arange(num_docs))  # every doc once, contiguous slices
  assert not list((workdir / "index").glob(".tmp-*"))
  version = workdir / "index" / "6"
  assert not list(version.glob("*/embeddings.npy"))  # each vector stored once: ScaNN's copy
  embeddings = np.concatenate([index_format.shard_vectors(version, s)
                               for s in manifest["shards"]])
  np.testing.assert_allclose(embeddings, expected, rtol=1e-5, atol=1e-5)
  queries = np.random.default_rng(0).normal(size=(16, 128)).astype(np.float32)
  got_ids, got_scores = merged.search(queries, 10)
  want_ids, want_scores = single.search(queries, 10)
  np.testing.assert_allclose(got_scores, want_scores, rtol=1e-4, atol=1e-4)
  # The same ids in the same order, except that two neighbours whose reference scores tie
  # within the embeddings' float32 rounding (1e-4) may trade places (seen once: 28 <-> 42).
  gaps = np.abs(np.diff(want_scores, axis=1)) < 1e-4  # [Q, k-1]
  tied = np.zeros(want_ids.shape, bool)
  tied[:, 1:] |= gaps
  tied[:, :-1] |= gaps
  np.testing.assert_array_equal(np.where(tied, -1, got_ids), np.where(tied, -1, want_ids))
  assert tied.mean() < 0.1  # a tie is the exception, not what the check rests on


def test_leader_without_its_followers_publishes_nothing_and_withdraws(trained, tmp_path):
  """Process 0 of 2 alone: its shard is written, the other never comes; no version, no tmp."""
  _, source = trained
  config = _config(source)
  config.retrieval.builder_shard_timeout = 0.3
  workdir = _run_dir(source, tmp_path / "run", [6])
  leader = index_builder.IndexBuilder(config, workdir, process_index=0, process_count=2)
  assert leader.run(poll_seconds=0.01, idle_timeout=0.1) == []  # failed, gave up when idle
  with pytest.raises(index_format.IndexVersionError, match=r"shards \[1\] of 2 not done"):
    leader.build(6)
  root = workdir / "index"
  assert index_format.list_versions(root) == [] and index_format.latest_step(root) is None
  assert not list(root.glob(".tmp-*")) and index_format.pending_builds(root) == []


def _wait_for(path, proc, log_path, timeout=180.0):
  deadline = time.time() + timeout
  while not path.exists():
    assert proc.poll() is None, log_path.read_text()[-3000:]
    assert time.time() < deadline, log_path.read_text()[-3000:]
    time.sleep(0.05)


def test_builder_killed_mid_publish_publishes_nothing_and_a_restart_recovers(
    trained, reference, tmp_path):
  _, source = trained
  config = _config(source)
  workdir = _run_dir(source, tmp_path / "run", [0])
  root = workdir / "index"
  assert index_builder.IndexBuilder(config, workdir).run(poll_seconds=0.01, max_builds=1) == [0]
  num_docs = len(reference[0])
  watcher = watcher_lib.IndexWatcher(root, expected_dim=128, expected_num_docs=num_docs)
  index = watcher_lib.WatchedIndex(watcher, null_id=num_docs)
  watcher._poll_once()  # pylint: disable=protected-access
  assert index.maybe_swap() and index.step == 0

  # Checkpoint 3 appears; a builder process embeds it and is SIGKILLed inside publishing:
  # its shard is done, the manifest not yet written.
  _run_dir(source, workdir, [3])
  marker, log_path = tmp_path / "paused", tmp_path / "killed.log"
  proc = _start_builder(source, workdir, log_path, env={
      index_format.PAUSE_ENV: "before_manifest", index_format.PAUSE_MARKER_ENV: str(marker)})
  try:
    _wait_for(marker, proc, log_path)
    killed = index_format.read_build(root, 3)
    assert index_format.shard_done(root, killed, 0) is not None
    os.kill(proc.pid, signal.SIGKILL)
  finally:
    proc.kill()
    proc.wait()
  assert index_format.latest_step(root) == 0 and index_format.list_versions(root) == [0]
  with pytest.raises(index_format.IndexVersionError, match="MANIFEST"):
    index_format.load_index(root, 3)
  watcher._poll_once()  # pylint: disable=protected-access
  assert not index.maybe_swap() and index.step == 0

  # A restarted builder removes the dead attempt and publishes step 3 whole.
  builder = index_builder.IndexBuilder(config, workdir)
  assert builder.run(poll_seconds=0.01, max_builds=1) == [3]
  assert not list(root.glob(".tmp-*")) and index_format.latest_step(root) == 3
  manifest, _ = index_format.load_index(root, 3, expected_num_docs=num_docs)
  assert manifest["attempt"] != killed["attempt"]  # nothing of the dead attempt was reused
  watcher._poll_once()  # pylint: disable=protected-access
  assert index.maybe_swap() and index.step == 3

  # Checkpoint 6 appears while no builder runs: the next one builds it (the newest), and its
  # version is the reference build of checkpoint 6.
  _run_dir(source, workdir, [6])
  assert index_builder.IndexBuilder(config, workdir).run(poll_seconds=0.01, max_builds=1) == [6]
  _, searcher = index_format.load_index(root, 6, expected_num_docs=num_docs)
  np.testing.assert_allclose(searcher.shards[0].embeddings, reference[0], rtol=1e-6, atol=1e-6)
