"""The index-builder job: publishes exactly what the trainer's embedder gives, restart-safely."""

import importlib.util
import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from realm_jax.retrieval import in_process
from realm_jax.retrieval import index_builder
from realm_jax.retrieval import index_format
from realm_jax.train import checkpointing
from realm_jax.train import loop
from realm_jax.train import partitioning
from realm_jax.train import state as state_lib
from realm_jax.train import steps as steps_lib
from tiny_configs import tiny_config  # pylint: disable=g-bad-import-order


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
  builder = index_builder.IndexBuilder(config, workdir)
  # Version 6 is published and no checkpoint is refresh_every (3) newer: nothing to build.
  assert builder.run(poll_seconds=0.01, idle_timeout=0.2) == []
  assert not (workdir / "index" / ".tmp-9-deadbeef").exists()
  assert index_format.list_versions(workdir / "index") == [6]


def test_checkpoint_steps_ignore_unfinished_saves(tmp_path):
  for name in ("0", "3", "6.orbax-checkpoint-tmp-12", "notes"):
    (tmp_path / name).mkdir()
  assert index_builder.finished_checkpoint_steps(tmp_path) == [0, 3]
  assert index_builder.finished_checkpoint_steps(tmp_path / "missing") == []


def test_trainer_hot_swaps_versions_from_a_builder_process(tmp_path):
  """Two real processes share a workdir: the builder publishes, the trainer swaps (>= 2)."""
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
        config.retrieval.watch_poll_seconds = 0.1
        config.retrieval.builder_poll_seconds = 0.1
        config.retrieval.first_index_timeout = 120.0
        config.train.num_steps = 200
        config.train.checkpoint_every = 10
        config.train.keep_checkpoints = 5
        return config
      """))
  spec = importlib.util.spec_from_file_location("two_process_config", config_file)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  workdir = tmp_path / "run"
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # the builder: 1 device
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
  output = log_path.read_text()
  history = result["history"]
  swaps = max((h.get("index_swaps", 0) for h in history), default=0)
  assert swaps >= 2, output[-3000:]
  assert np.all(np.isfinite([h["loss"] for h in history]))
  index_steps = [h["index_step"] for h in history]
  assert index_steps == sorted(index_steps) and index_steps[-1] > 0
  assert all(h["staleness"] >= 0 for h in history)
