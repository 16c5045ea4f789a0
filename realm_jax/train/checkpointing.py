"""Orbax checkpoints of the train state plus the data iterator's state (maxtext-style).

Each checkpoint holds two items: `state` (params, optimizer state, step) and `data` (JSON: the
batch sources are pure functions of the step, so the step *is* the iterator state; saved
explicitly so a resumed run can check it). Saves are async and atomic (orbax writes a tmp folder
then renames), keep-last-N; a crash mid-save leaves the previous checkpoint intact.
"""

from __future__ import annotations

import logging
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath


class Checkpointer:
  """A thin wrapper over `ocp.CheckpointManager` for one run's `checkpoints/` folder."""

  def __init__(self, directory: epath.PathLike, keep: int = 3, async_save: bool = True):
    self.directory = epath.Path(directory)
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True),
        item_names=("state", "data"))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, data_state: dict[str, Any], force: bool = True) -> bool:
    saved = self._manager.save(
        step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                      data=ocp.args.JsonSave(data_state)), force=force)
    if saved:
      logging.info("checkpoint: saving step %d to %s", step, self.directory)
    return saved

  def restore(self, abstract_state: Any, step: int | None = None
              ) -> tuple[Any, dict[str, Any], int] | None:
    """Restores (state, data_state, step) into the shardings of `abstract_state`, or None."""
    step = self._manager.latest_step() if step is None else step
    if step is None:
      return None
    restored = self._manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                      data=ocp.args.JsonRestore()))
    return restored["state"], dict(restored["data"]), step

  def wait(self):
    """Blocks until pending async saves are on storage."""
    self._manager.wait_until_finished()

  def close(self):
    self._manager.wait_until_finished()
    self._manager.close()


def resolve_checkpoint_dir(path: epath.PathLike) -> epath.Path:
  """Accepts a run's workdir or its `checkpoints/` folder."""
  path = epath.Path(path)
  return path / "checkpoints" if (path / "checkpoints").exists() else path


def restore_params(path: epath.PathLike, step: int | None = None) -> tuple[Any, int]:
  """Loads the parameters of another run's latest (or given) checkpoint onto this host.

  Works across topologies (a checkpoint saved by 8 trainer devices restores in a 1-device
  builder): the restore target is built from the checkpoint's metadata, on one local device.
  The whole state is read (params and optimizer state); restoring the embedder subtree alone
  (orbax partial restore) is left for the index builder at scale.
  """
  directory = resolve_checkpoint_dir(path)
  manager = ocp.CheckpointManager(
      directory,
      options=ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0),
      item_handlers={"state": ocp.StandardCheckpointHandler(),
                     "data": ocp.JsonCheckpointHandler()})
  step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"no checkpoint found in {directory}")
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree_util.tree_map(
      lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
      manager.item_metadata(step)["state"])
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
  manager.close()
  return jax.device_get(restored["state"]["params"]), step
