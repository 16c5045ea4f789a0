r"""Command line: `python -m realm_jax.main --mode=... --config=... --workdir=...`.

Modes:
  train  train `config.objective` ("realm" or "ict") in --workdir, resuming if it holds a run
  demo   ICT warm start, REALM, and the no-retrieval baseline on the generated corpus
  index_builder  re-embed the corpus from each new checkpoint in --workdir and publish an
         index version (same --config and --workdir as the trainer)

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
  if _CONFIG.value is None or not _WORKDIR.value:
    sys.exit("error: --config and --workdir are required")
  if _DISTRIBUTED.value:
    jax.distributed.initialize()
  try:
    if _MODE.value == "demo":
      demo.run_demo(_CONFIG.value, _WORKDIR.value)
    elif _MODE.value == "index_builder":
      index_builder.IndexBuilder(_CONFIG.value, _WORKDIR.value).run(
          poll_seconds=_CONFIG.value.retrieval.builder_poll_seconds)
    else:
      loop.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except config_lib.ConfigError as e:
    sys.exit(f"config error: {e}")


if __name__ == "__main__":
  app.run(main)
