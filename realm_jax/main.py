r"""Command line: `python -m realm_jax.main --mode=... --config=... --workdir=...`.

Modes:
  train  train `config.objective` ("realm" or "ict") in --workdir, resuming if it holds a run
  demo   ICT warm start, REALM, and the no-retrieval baseline on the generated corpus
  index_builder  re-embed the corpus from each new checkpoint in --workdir and publish an
         index version (same --workdir as the trainer; without --config it reads the
         config the trainer saved there)
  build_corpus   build the config's corpus, blocks and queries (`data.corpus_dir`, default
         <workdir>/corpus) and exit; with --corpus_shard=i only shard i of
         data.num_build_shards (one process each, data.vocab_file required); then once
         without --corpus_shard (or the first train run) merges the shards
  eval_retrieval recall@k of the run's latest checkpoint on held-out queries vs BM25

Any config field can be overridden, e.g. `--config.train.batch_size=64`.
"""

from __future__ import annotations

import json
import logging
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run folder (local path or gs://).")
_MODE = flags.DEFINE_enum(
    "mode", "train", ["train", "demo", "index_builder", "build_corpus", "eval_retrieval"],
    "What to run.")
_CORPUS_SHARD = flags.DEFINE_integer(
    "corpus_shard", -1, "build_corpus: build only this shard of data.num_build_shards.")
_CONFIG_WAIT = flags.DEFINE_float(
    "config_wait_seconds", 600.0, "index_builder without --config: how long to wait for the "
    "trainer to write <workdir>/config.json.")
_MAX_BUILDS = flags.DEFINE_integer(
    "max_builds", 0, "index_builder: exit after this many published versions (0: run until "
    "stopped).")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Call jax.distributed.initialize() (multi-host; the launcher or the "
    "TPU/GPU cluster environment supplies coordinator and process ids).")


def _build_corpus(config, workdir: str, shard: int) -> None:
  """Prepares the config's data; or builds one shard of a sharded Wikipedia build."""
  from etils import epath  # pylint: disable=g-import-not-at-top

  from realm_jax import config_lib  # pylint: disable=g-import-not-at-top
  from realm_jax.data import prepare  # pylint: disable=g-import-not-at-top
  from realm_jax.data import salient_spans  # pylint: disable=g-import-not-at-top
  from realm_jax.data import wiki_corpus  # pylint: disable=g-import-not-at-top
  from realm_jax.data import wiki_data  # pylint: disable=g-import-not-at-top

  config_lib.validate(config, 1)
  data = config.data
  if shard < 0:
    prepare.prepare_data(config, workdir)
    return
  if data.corpus != "wiki" or not data.vocab_file:
    sys.exit("error: --corpus_shard needs data.corpus=wiki and a data.vocab_file (every "
             "shard must tokenize with the same vocabulary)")
  directory = epath.Path(data.corpus_dir or epath.Path(workdir) / "corpus")
  directory.mkdir(parents=True, exist_ok=True)
  tokenizer = wiki_data.tokenizer_for(data, directory)
  wiki_corpus.build_shard(
      data.source, directory, tokenizer, shard, data.num_build_shards, doc_len=data.doc_len,
      span_fn=salient_spans.make_tagger(data.salient_tagger),
      max_span_wordpieces=data.max_masked, limit=data.limit or None,
      tfds_data_dir=data.tfds_data_dir or None)
  done = sum((directory / wiki_corpus.SHARDS_DIR / wiki_corpus.shard_name(
      i, data.num_build_shards) / wiki_corpus.SHARD_METADATA).exists()
             for i in range(data.num_build_shards))
  logging.info("build_corpus: shard %d done; %d of %d shards exist (merge with one run of "
               "--mode=build_corpus without --corpus_shard once all do)", shard, done,
               data.num_build_shards)


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
    elif _MODE.value == "build_corpus":
      _build_corpus(_CONFIG.value, _WORKDIR.value, _CORPUS_SHARD.value)
    elif _MODE.value == "eval_retrieval":
      from realm_jax.retrieval import evaluation  # pylint: disable=g-import-not-at-top
      config_lib.validate(_CONFIG.value, 1)
      print(json.dumps(evaluation.evaluate_retrieval(_CONFIG.value, _WORKDIR.value), indent=1))
    else:
      loop.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except config_lib.ConfigError as e:
    sys.exit(f"config error: {e}")


if __name__ == "__main__":
  app.run(main)
