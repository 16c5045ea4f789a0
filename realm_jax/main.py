r"""Command line: `python -m realm_jax.main --mode=... --config=... --workdir=...`.

Modes:
  train  train `config.objective` ("realm" or "ict") in --workdir, resuming if it holds a run
  demo   ICT warm start, REALM, and the no-retrieval baseline on the generated corpus
  index_builder  re-embed the corpus from each new checkpoint in --workdir and publish an
         index version (same --workdir as the trainer; without --config it reads the
         config the trainer saved there)

Any config field can be overridden, e.g. `--config.train.batch_size=64`.
"""

from __future__ import annotations

import logging
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run folder (local path or gs://).")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "demo", "index_builder"], "What to run.")
_CONFIG_WAIT = flags.DEFINE_float(
    "config_wait_seconds", 600.0, "index_builder without --config: how long to wait for the "
    "trainer to write <workdir>/config.json.")
_MAX_BUILDS = flags.DEFINE_integer(
    "max_builds", 0, "index_builder: exit after this many published versions (0: run until "
    "stopped).")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Call jax.distributed.initialize() (multi-host; the launcher or the "
    "TPU/GPU cluster environment supplies coordinator and process ids).")


def main(argv):
  del argv
  import jax  # pylint: disable=g-import-not-at-top

  from realm_jax import config_lib  # pylint: disable=g-import-not-at-top
  from realm_jax import demo  # pylint: disable=g-import-not-at-top
  from realm_jax.retrieval import index_builder  # pylint: disable=g-import-not-at-top
  from realm_jax.train import loop  # pylint: disable=g-import-not-at-top

  logging.getLogger().setLevel(logging.INFO)
  for noisy in ("absl", "jax._src", "orbax", "etils"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  if not _WORKDIR.value:
    sys.exit("error: --workdir is required")
  if _CONFIG.value is None and _MODE.value != "index_builder":
    sys.exit("error: --config is required")
  if _DISTRIBUTED.value:
    jax.distributed.initialize()
  try:
    if _MODE.value == "demo":
      demo.run_demo(_CONFIG.value, _WORKDIR.value)
    elif _MODE.value == "index_builder":
      config = _CONFIG.value or config_lib.load_run_config(_WORKDIR.value,
                                                           _CONFIG_WAIT.value)
      index_builder.IndexBuilder(config, _WORKDIR.value).run(
          poll_seconds=config.retrieval.builder_poll_seconds,
          max_builds=_MAX_BUILDS.value or None)
    else:
      loop.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except config_lib.ConfigError as e:
    sys.exit(f"config error: {e}")


if __name__ == "__main__":
  app.run(main)
