"""The separate index-builder job (DESIGN.md §2): newest checkpoint -> embedded corpus -> index.

`python -m realm_jax.main --mode=index_builder --config=<same as the trainer> --workdir=<same>`
polls `<workdir>/checkpoints/`, and whenever a checkpoint is at least `retrieval.refresh_every`
steps newer than the last version it published (or none exists yet), restores the parameters,
re-embeds every corpus block and publishes `<workdir>/index/<step>/` in the shared index format
(manifest last, then LATEST). Restart-safe: it resumes from the newest published version and
removes tmp folders a killed run left behind.

The trainer side is `retrieval/watcher.py` (`retrieval.index_source="builder"`).
Not yet here (issue 3): serialized ScaNN assets in the version (a "scann" version is built
by its reader from the stored embeddings), restoring the embedder subtree alone (orbax
partial restore), and slicing the corpus over several builder processes.
"""

from __future__ import annotations

import logging
import time

import jax
import ml_collections
import numpy as np
from etils import epath

from realm_jax import config_lib
from realm_jax.data import prepare
from realm_jax.retrieval import in_process
from realm_jax.retrieval import index_format
from realm_jax.train import checkpointing
from realm_jax.train import partitioning
from realm_jax.train import state as state_lib
from realm_jax.train import steps as steps_lib


def finished_checkpoint_steps(directory: epath.PathLike) -> list[int]:
  """Steps of complete orbax checkpoints (orbax renames a save's tmp folder to `<step>`)."""
  directory = epath.Path(directory)
  if not directory.exists():
    return []
  return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def remove_stale_tmp(index_root: epath.PathLike) -> list[str]:
  """Deletes the hidden tmp folders/files of publishes that never finished."""
  root = epath.Path(index_root)
  if not root.exists():
    return []
  stale = [p for p in root.iterdir() if p.name.startswith(".tmp-") or
           p.name.startswith(f".{index_format.LATEST}.tmp-")]
  for path in stale:
    path.rmtree() if path.is_dir() else path.unlink()
  return [p.name for p in stale]


class IndexBuilder:
  """Embeds the corpus with the newest checkpoint's embedder and publishes index versions."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: epath.PathLike,
               devices=None):
    self.config = config
    self.workdir = epath.Path(workdir)
    self.checkpoint_dir = self.workdir / "checkpoints"
    self.index_root = self.workdir / "index"
    self.mesh = partitioning.make_mesh(config.mesh, devices)
    config_lib.validate(config, partitioning.data_parallel_size(self.mesh), jax.process_count())
    self.corpus = None
    self._embed_docs = None

  def _ensure_model(self, wait_seconds: float, poll_seconds: float):
    """The corpus is prepared by the trainer; wait for it rather than build it twice."""
    if self.corpus is not None:
      return
    deadline = time.time() + wait_seconds
    while True:
      try:
        data = prepare.prepare_data(self.config, self.workdir, build=False)
        break
      except FileNotFoundError:
        if time.time() > deadline:
          raise
        time.sleep(poll_seconds)
    self.corpus = data.corpus
    model = state_lib.build_model(self.config, data.corpus.vocab_size, data.corpus.special.pad)
    _, self._embed_docs = steps_lib.make_embed_fns(model, self.mesh)

  def build(self, step: int) -> epath.Path:
    """Publishes the index version of checkpoint `step`."""
    start = time.time()
    params, _ = checkpointing.restore_params(self.checkpoint_dir, step)
    params = partitioning.replicate(
        {k: v for k, v in params.items() if k in state_lib.EMBEDDER_KEYS}, self.mesh)
    embeddings = in_process.embed_corpus(params, self.corpus, self._embed_docs, self.mesh,
                                         self.config.retrieval.embed_batch_size)
    if (self.index_root / str(step)).exists():  # a version dir without manifest: a crashed run
      (self.index_root / str(step)).rmtree()
    path = index_format.publish_index(
        self.index_root, step, [(embeddings, np.arange(len(embeddings)))],
        searcher=self.config.retrieval.searcher,
        extra=dict(source="index_builder", embed_seconds=round(time.time() - start, 3)))
    index_format.prune_versions(self.index_root, self.config.retrieval.keep_index_versions)
    logging.info("index_builder: published step %d (%d docs) in %.1fs", step, len(embeddings),
                 time.time() - start)
    return path

  def run(self, poll_seconds: float = 5.0, max_builds: int | None = None,
          idle_timeout: float | None = None) -> list[int]:
    """Polls for checkpoints and builds; returns the steps built by this call.

    Stops after `max_builds` builds, or after `idle_timeout` seconds without a new build.
    """
    removed = remove_stale_tmp(self.index_root)
    if removed and jax.process_index() == 0:
      logging.info("index_builder: removed stale %s", removed)
    self._ensure_model(wait_seconds=idle_timeout or float("inf"), poll_seconds=poll_seconds)
    last = index_format.latest_step(self.index_root)
    built: list[int] = []
    idle_since = time.time()
    while max_builds is None or len(built) < max_builds:
      steps = finished_checkpoint_steps(self.checkpoint_dir)
      newest = steps[-1] if steps else None
      due = newest is not None and (
          last is None or newest >= last + self.config.retrieval.refresh_every)
      if due:
        try:
          self.build(newest)
        except Exception as e:  # pylint: disable=broad-except
          # E.g. the trainer's keep-last-N deleted that checkpoint mid-restore. Nothing was
          # published (the version only appears complete), so just look again.
          logging.warning("index_builder: building step %d failed (%s: %s); retrying", newest,
                          type(e).__name__, e)
          time.sleep(poll_seconds)
          continue
        built.append(newest)
        last = newest
        idle_since = time.time()
        continue
      if idle_timeout is not None and time.time() - idle_since > idle_timeout:
        break
      time.sleep(poll_seconds)
    return built
