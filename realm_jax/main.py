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
  update_corpus  publish a new version of the built corpus: --add=new.jsonl
         [--remove=ids_or_titles.txt] [--replace=changed.jsonl] (data/corpus_versions.py)
  eval_retrieval recall@k of the run's latest checkpoint on held-out queries vs BM25
  finetune_qa    Open-QA fine-tuning (query tower + span reader, index frozen) of
         experiments/openqa*.py configs, from a pretraining run (`qa.init_from`)
  eval_qa        exact match, recall@k and predictions.jsonl of the fine-tuned run
  retrieve       look inside a run's index: --query="..." (or --queries=file.jsonl) [--k=5]
         [--index_step=N or N+C] [--output=results.jsonl]: top-k blocks with scores and titles,
         embedded with the checkpoint the index was built from; --config optional
  print_config   print the resolved config (after overrides), one `field = value  # help`
         line per field; needs no --workdir
  compile        ahead-of-time compile of the REALM, embedding and QA steps for
         --topology=v5e:8x8 (libtpu, `[tpu]` extra; no TPU needed): per-chip memory, FLOPs,
         roofline time [--output=report.json]; exit 1 when a step does not fit HBM; no --workdir

Any config field can be overridden, e.g. `--config.train.batch_size=64`; an override that
cannot affect the chosen objective or mode (e.g. `train.num_steps` on an ICT run, which reads
`ict.num_steps`) is reported with a warning. `--force` takes over the workdir's lease from a
trainer or builder that holds it.

Exit codes: 0 done, or stopped by SIGTERM (preemption: the trainer, ICT and QA loops finish
the step in progress and save a checkpoint, logging `preempted at step N: checkpoint saved to
...`; the index builder abandons the version in progress; the same command resumes;
`--preempted_exit_code` changes this 0 for schedulers that restart failed jobs only); 1 an
error (its traceback, then one last line `error: <Type>: <message> (caused by <root cause>)`,
or `config error: ...` for a bad config); 130 interrupted (Ctrl-C; the trainer saves a
checkpoint first, so the same command resumes).
"""

from __future__ import annotations

import inspect
import json
import logging
import sys
import traceback

from absl import app
from absl import flags
from ml_collections import config_flags

from realm_jax import mesh_flag

_MESH_OVERRIDE = None  # --config.mesh from the command line (run), applied in main

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run folder (local path or gs://).")
_MODE = flags.DEFINE_enum(
    "mode", "train",
    ["train", "demo", "index_builder", "build_corpus", "eval_retrieval", "print_config",
     "finetune_qa", "eval_qa", "retrieve", "update_corpus", "compile"],
    "What to run (the modes are listed at the top of --help).")
_CORPUS_SHARD = flags.DEFINE_integer(
    "corpus_shard", -1, "build_corpus: build only this shard of data.num_build_shards.")
_CONFIG_WAIT = flags.DEFINE_float(
    "config_wait_seconds", 600.0, "index_builder without --config: how long to wait for the "
    "trainer to write <workdir>/config.json.")
_MAX_BUILDS = flags.DEFINE_integer(
    "max_builds", 0, "index_builder: exit after this many published versions (0: run until "
    "stopped).")
_FORCE = flags.DEFINE_bool(
    "force", False, "Take over the workdir's lease held by another trainer/builder (e.g. one "
    "that died before its lease went stale).")
_ADD = flags.DEFINE_string("add", None, 'update_corpus: JSONL of {"title", "text"} to add.')
_REMOVE = flags.DEFINE_string("remove", None,
                              "update_corpus: doc ids or titles to remove, one per line.")
_REPLACE = flags.DEFINE_string(
    "replace", None, "update_corpus: JSONL records replacing the live blocks of their title.")
_QUERY = flags.DEFINE_string("query", None, "retrieve: one query text.")
_QUERIES = flags.DEFINE_string("queries", None, 'retrieve: a JSONL file of {"query": ...} lines.')
_K = flags.DEFINE_integer("k", 5, "retrieve: documents per query.")
_INDEX_STEP = flags.DEFINE_string(
    "index_step", None, "retrieve: the index version to search, a step (200) or a step and "
    "corpus version (200+3, data/corpus_versions.py) (default: LATEST).")
_OUTPUT = flags.DEFINE_string("output", None, "retrieve: also write the results as JSONL here; "
                              "compile: write the report as JSON here.")
_TOPOLOGY = flags.DEFINE_string("topology", None, "compile: TPU topology, e.g. v5e:8x8, v4:2x2x4.")
_PREEMPTED_EXIT_CODE = flags.DEFINE_integer(
    "preempted_exit_code", 0, "Exit status after a SIGTERM stop with the checkpoint saved (0: "
    "done for now; a launcher whose scheduler restarts only failed jobs, e.g. xpk's JobSet "
    "restarting on 42, passes that code).", lower_bound=0, upper_bound=255)
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


def _update_corpus(config, workdir: str) -> None:
  """Publishes the next corpus version (data/corpus_versions.py) and prints its manifest."""
  from etils import epath  # pylint: disable=g-import-not-at-top

  from realm_jax.data import corpus_versions  # pylint: disable=g-import-not-at-top
  from realm_jax.data import salient_spans  # pylint: disable=g-import-not-at-top

  data = config.data
  directory = epath.Path(data.corpus_dir or epath.Path(workdir) / "corpus")
  manifest = corpus_versions.update_corpus(
      directory, add=_ADD.value, remove=_REMOVE.value, replace=_REPLACE.value,
      span_fn=(salient_spans.make_tagger(data.salient_tagger) if data.corpus == "wiki"
               else None),
      max_span_wordpieces=data.max_masked, doc_len=data.doc_len,
      vocab_file=data.get("vocab_file") or None, force_lease=_FORCE.value)
  print(json.dumps({k: v for k, v in manifest.items() if k not in ("files", "removed")},
                   indent=1))


def parse_index_version(text: str | None):
  """--index_step's text as an index VersionKey (`"200"`, `"200+3"`); None when not given.

  A bad key is a ValueError naming the flag and the accepted forms.
  """
  from realm_jax.retrieval import index_format  # pylint: disable=g-import-not-at-top
  if text is None or not text.strip():
    return None
  key = index_format.parse_version(text.strip())
  if key is None:
    hint = (" (corpus version 0 is written without '+0')"
            if text.strip().endswith("+0") else "")
    raise ValueError(f"--index_step={text!r} is not an index version: give a step (200) or a "
                     f"step and a corpus version >= 1 (200+3), as the folders in "
                     f"<workdir>/index/ are named{hint}")
  return key


def _root_cause(error: BaseException) -> BaseException:
  """The last exception of `error`'s chain (`raise ... from` or raised while handling)."""
  seen = {id(error)}
  while True:
    nxt = error.__cause__ or (None if error.__suppress_context__ else error.__context__)
    if nxt is None or id(nxt) in seen:
      return error
    seen.add(id(nxt))
    error = nxt


def _one_line(error: BaseException) -> str:
  text = " ".join(str(error).split())
  return f"{type(error).__name__}: {text}" if text else type(error).__name__


def error_line(error: BaseException) -> str:
  """`error: <Type>: <message> (caused by <Type>: <message>)`, the root cause when chained."""
  line = f"error: {_one_line(error)}"
  root = _root_cause(error)
  if root is not error:
    line += f" (caused by {_one_line(root)})"
  return line


def _with_force(fn, *args, **kwargs):
  """Calls `fn` with force_lease=--force where it accepts it (leases may be absent)."""
  parameters = inspect.signature(fn).parameters
  if "force_lease" in parameters or any(
      p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
    kwargs["force_lease"] = _FORCE.value
  elif _FORCE.value:
    logging.warning("--force: %s takes no lease; nothing to take over", fn.__qualname__)
  return fn(*args, **kwargs)


def _warn_ineffective(config, mode: str) -> None:
  """One warning line per `--config.<field>` override that cannot affect this run."""
  from realm_jax import config_lib  # pylint: disable=g-import-not-at-top
  if config is None:
    return
  overridden = list(config_flags.get_override_values(flags.FLAGS["config"]))
  for field, reason in config_lib.ineffective_fields(config, overridden, mode):
    logging.warning("override --config.%s has no effect: %s", field, reason)


def _print_config(config) -> None:
  """Prints every field with its help, then checks the fields' ranges (a bad one: exit 1)."""
  from realm_jax import config_lib  # pylint: disable=g-import-not-at-top
  print("\n".join(config_lib.describe_config(config)), flush=True)
  try:
    config_lib.check_fields(config)
  except config_lib.ConfigError as e:
    sys.exit(f"config error: {e}")


def _run_mode(mode: str, config, workdir: str) -> None:
  """Runs one mode (everything after flag checks and distributed init)."""
  from realm_jax import config_lib  # pylint: disable=g-import-not-at-top
  from realm_jax import demo  # pylint: disable=g-import-not-at-top
  from realm_jax.retrieval import index_builder  # pylint: disable=g-import-not-at-top
  from realm_jax.train import loop  # pylint: disable=g-import-not-at-top
  from realm_jax import compile_cache  # pylint: disable=g-import-not-at-top

  compile_cache.enable(config)  # index_builder/retrieve without --config: the default folder
  if mode == "demo":
    demo.run_demo(config, workdir)
  elif mode == "index_builder":
    config = config or config_lib.load_run_config(workdir, _CONFIG_WAIT.value)
    _with_force(index_builder.IndexBuilder, config, workdir).run(
        poll_seconds=config.retrieval.builder_poll_seconds,
        max_builds=_MAX_BUILDS.value or None)
  elif mode == "build_corpus":
    _build_corpus(config, workdir, _CORPUS_SHARD.value)
  elif mode == "update_corpus":
    _update_corpus(config, workdir)
  elif mode == "eval_retrieval":
    from realm_jax.retrieval import evaluation  # pylint: disable=g-import-not-at-top
    config_lib.validate(config, 1)
    print(json.dumps(evaluation.evaluate_retrieval(config, workdir), indent=1))
  elif mode == "retrieve":
    from realm_jax.retrieval import inspect_index  # pylint: disable=g-import-not-at-top
    try:
      index_step = parse_index_version(_INDEX_STEP.value)
    except ValueError as e:
      sys.exit(f"error: {e}")
    print(inspect_index.run_retrieve_mode(
        workdir, query=_QUERY.value, queries_file=_QUERIES.value, k=_K.value,
        index_step=index_step, output=_OUTPUT.value, config=config))
  elif mode in ("finetune_qa", "eval_qa"):
    from realm_jax.qa import finetune  # pylint: disable=g-import-not-at-top
    run = finetune.finetune_qa if mode == "finetune_qa" else finetune.evaluate_qa
    out = run(config, workdir)
    print(json.dumps({k: v for k, v in out.items() if isinstance(v, (int, float, str))},
                     indent=1))
  else:
    _with_force(loop.train_and_evaluate, config, workdir)


def _check_storage(config, workdir: str) -> None:
  """Exits with one line naming the install command when a gs:// (s3://) path of the run
  cannot be opened (gcsfs missing), before anything starts."""
  from realm_jax import storage  # pylint: disable=g-import-not-at-top
  data = config.get("data") if config is not None else None
  paths = [workdir] + [data.get(key) for key in ("corpus_dir", "vocab_file", "tfds_data_dir")
                       if data is not None and data.get(key)]
  try:
    for path in paths:
      storage.check_available(path)
  except storage.StorageUnavailableError as e:
    sys.exit(f"error: {e}")


def main(argv):
  del argv
  logging.getLogger().setLevel(logging.INFO)
  for noisy in ("absl", "jax._src", "orbax", "etils"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  mode, config = _MODE.value, _CONFIG.value
  if _MESH_OVERRIDE is not None and config is not None:
    config.mesh = _MESH_OVERRIDE
  if config is None and mode not in ("index_builder", "retrieve"):
    sys.exit("error: --config is required")
  _warn_ineffective(config, mode)
  if mode == "print_config":
    _print_config(config)
    return
  if mode == "compile":  # realm_jax/train/aot.py
    from realm_jax.train import aot  # pylint: disable=g-import-not-at-top
    sys.exit(aot.run_compile_mode(config, _TOPOLOGY.value, _OUTPUT.value))
  if not _WORKDIR.value:
    sys.exit("error: --workdir is required")
  _check_storage(config, _WORKDIR.value)

  from realm_jax import config_lib  # pylint: disable=g-import-not-at-top
  from realm_jax.train import preemption  # pylint: disable=g-import-not-at-top
  try:
    if _DISTRIBUTED.value:
      import jax  # pylint: disable=g-import-not-at-top
      # SIGTERM is handled in Python (train/preemption.py); JAX's preemption service would
      # install a C++ SIGTERM handler that swallows the signal outside the loops.
      jax.config.update("jax_enable_preemption_service", False)
      jax.distributed.initialize()
    _run_mode(mode, config, _WORKDIR.value)
  except config_lib.ConfigError as e:
    sys.exit(f"config error: {e}")
  except preemption.Preempted:  # its one line is logged; the same command resumes
    sys.exit(_PREEMPTED_EXIT_CODE.value)
  except KeyboardInterrupt:
    sys.stderr.flush()
    print(f"interrupted: --mode={mode} stopped by Ctrl-C; run the same command to resume "
          "(the trainer saves a checkpoint on interrupt)", file=sys.stderr, flush=True)
    sys.exit(130)
  except Exception as e:  # pylint: disable=broad-except
    traceback.print_exc()
    sys.stderr.flush()
    print(error_line(e), file=sys.stderr, flush=True)
    sys.exit(1)


def run(argv: list[str]) -> None:
  """app.run(main) with --config.mesh=data:2,fsdp:4 taken out of argv first (mesh_flag.py)."""
  global _MESH_OVERRIDE
  try:
    argv, _MESH_OVERRIDE = mesh_flag.extract_mesh_flag(argv)
  except ValueError as e:
    sys.exit(f"error: {e}")
  sys.argv[:] = argv  # config_flags reads its overrides from sys.argv itself
  app.run(main, argv=argv)


if __name__ == "__main__":
  run(sys.argv)
