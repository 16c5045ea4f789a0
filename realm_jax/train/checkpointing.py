"""Orbax checkpoints of the train state plus the data iterator's state (maxtext-style).

Each checkpoint holds two items: `state` (params, optimizer state, step) and `data` (JSON: the
batch sources are pure functions of the step, so the step *is* the iterator state; saved
explicitly so a resumed run can check it). Saves are async and atomic, keep-last-N; a crash
mid-save leaves the previous checkpoint intact. Orbax picks the protocol by path: locally a tmp
folder renamed into place; on gs:// (no atomic rename) it writes `<step>/` in place and
`commit_success.txt` last (its default CommitFileTemporaryPath, which no option here overrides),
and both orbax and `index_builder.finished_checkpoint_steps` skip a step folder without it.

Other jobs read a run's checkpoints with `restore_params` (all parameters, for warm starts) and
`restore_embedder_params` (the retriever alone, by orbax partial restore, for the index
builder); both restore onto one local device whatever topology saved them.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import jax
import orbax.checkpoint as ocp
from etils import epath

from realm_jax.train import state as state_lib
from realm_jax.train import teardown


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

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def wait(self, timeout: float | None = None):
    """Blocks until pending async saves are on storage; TimeoutError after `timeout` seconds
    (a save stuck on failing storage; orbax's tmp folder is then never renamed into place, so
    the step stays absent and the folder is cleaned up when the next run opens the manager)."""
    teardown.call_with_timeout(self._manager.wait_until_finished, timeout,
                               f"checkpoint save to {self.directory}")

  def close(self, timeout: float | None = None):
    """Waits (bounded by `timeout`) for pending saves, then closes; after a timeout the
    manager is left open (closing would wait again)."""
    self.wait(timeout)
    self._manager.close()


def resolve_checkpoint_dir(path: epath.PathLike) -> epath.Path:
  """Accepts a run's workdir or its `checkpoints/` folder."""
  path = epath.Path(path)
  return path / "checkpoints" if (path / "checkpoints").exists() else path


def _read_only_manager(directory: epath.Path, state_handler_cls) -> ocp.CheckpointManager:
  """A manager over this process alone: no cross-process barriers around a read (builder
  processes restore independently, and a retried restore must not wait for the others)."""
  local = ocp.options.MultiprocessingOptions(primary_host=jax.process_index(),
                                             active_processes={jax.process_index()})
  return ocp.CheckpointManager(
      directory,
      options=ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0,
                                           multiprocessing_options=local),
      item_handlers={"state": state_handler_cls(multiprocessing_options=local),
                     "data": ocp.JsonCheckpointHandler(multiprocessing_options=local)})


def _on_one_device(metadata_tree: Any) -> Any:
  """Restore targets on this host's first device, whatever topology saved the arrays."""
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return jax.tree_util.tree_map(
      lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), metadata_tree)


def _resolve_step(manager: ocp.CheckpointManager, directory: epath.Path,
                  step: int | None) -> int:
  step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"no checkpoint found in {directory}")
  return step


def restore_params(path: epath.PathLike, step: int | None = None) -> tuple[Any, int]:
  """Loads the parameters of another run's latest (or given) checkpoint onto this host.

  Works across topologies (a checkpoint saved by 8 trainer devices restores in a 1-device
  builder): the restore target is built from the checkpoint's metadata, on one local device.
  The whole state is read (params and optimizer state); `restore_embedder_params` reads only
  the retriever's subtree.
  """
  directory = resolve_checkpoint_dir(path)
  manager = _read_only_manager(directory, ocp.StandardCheckpointHandler)
  try:
    step = _resolve_step(manager, directory, step)
    target = _on_one_device(manager.item_metadata(step)["state"])
    restored = manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
  finally:
    manager.close()
  return jax.device_get(restored["state"]["params"]), step


def restore_embedder_params(path: epath.PathLike, step: int | None = None,
                            keys: Sequence[str] = state_lib.EMBEDDER_KEYS
                            ) -> tuple[dict[str, Any], int]:
  """Loads only `state.params[k]` for the `keys` the checkpoint has: {key: subtree}, step.

  An orbax partial restore (`PyTreeRestore(partial_restore=True)` with a target holding just
  those subtrees): the optimizer state and the encoder are neither read nor allocated, which
  is what the index builder needs from a trainer's checkpoint (at BERT-base the embedder is
  ~1/2 of the parameters and ~1/6 of the state with Adam's two moments). Cross-topology like
  `restore_params`: onto this host's first device.
  """
  directory = resolve_checkpoint_dir(path)
  manager = _read_only_manager(directory, ocp.PyTreeCheckpointHandler)
  try:
    step = _resolve_step(manager, directory, step)
    params_metadata = manager.item_metadata(step)["state"]["params"]
    present = [key for key in keys if key in params_metadata]
    if not present:
      raise ValueError(f"checkpoint {directory}/{step} has none of {list(keys)} in its "
                       f"params ({sorted(params_metadata)})")
    target = {"params": {key: _on_one_device(params_metadata[key]) for key in present}}
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True)))
  finally:
    manager.close()
  return jax.device_get(restored["state"]["params"]), step
