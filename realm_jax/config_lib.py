"""Config helpers shared by the experiment files, and start-up validation of a whole config.

Every check raises `ConfigError` naming the offending field, so a bad value fails in the first
second of a job instead of an hour into it.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import ml_collections
from etils import epath

from realm_jax.models import bert


class ConfigError(ValueError):
  """A config value that cannot work; the message names the field."""


def parse_arg(arg: str, **defaults) -> ml_collections.ConfigDict:
  """Parses big_vision-style `get_config` args: "size=tiny,foo=1" (a bare "tiny" = size)."""
  out = dict(defaults)
  for part in filter(None, (arg or "").split(",")):
    key, sep, value = part.partition("=")
    if not sep:
      key, value = "size", key
    if key not in out:
      raise ConfigError(f"unknown config argument {key!r} in {arg!r}; known: {sorted(out)}")
    out[key] = value
  return ml_collections.ConfigDict(out)


def check_choice(field: str, value: Any, choices) -> Any:
  if value not in choices:
    raise ConfigError(f"{field}={value!r} is not one of {sorted(choices)}")
  return value


def model_config(size: str) -> ml_collections.ConfigDict:
  """Model fields for a named BERT size (tiny .. large)."""
  check_choice("model.size", size, bert.SIZES)
  return ml_collections.ConfigDict(dict(
      size=size,
      **bert.SIZES[size],
      max_position_embeddings=512,
      embed_dim=128,  # retrieval embedding size (REALM/ORQA: 128)
      share_embedders=True,  # one embedder for queries and documents
      dropout_rate=0.0 if size == "tiny" else 0.1,
      dtype="float32",  # compute dtype: "float32" or "bfloat16" (parameters stay float32)
      remat=False,
      # A Hugging Face BERT folder (model.safetensors + config.json) whose weights start every
      # BERT tower; the model's shape and data.vocab_file must be the checkpoint's.
      init_from_hf="",
  ))


def add_training_sections(config: ml_collections.ConfigDict, s: dict[str, Any],
                          size: str) -> None:
  """The retrieval, loss, train, ict, eval and mesh sections every experiment shares.

  `s` holds the experiment's per-size numbers: k, refresh_every, batch_size, realm_steps,
  ict_steps and eval_every.
  """
  config.retrieval = ml_collections.ConfigDict(dict(
      enabled=True,  # False: null document only (the no-retrieval baseline)
      k=s["k"],  # candidates per query, counting the null document in slot 0
      margin=2,  # over-retrieve this many extra ids to survive dropping the source doc
      refresh_every=s["refresh_every"],  # re-embed the corpus every this many steps
      embed_batch_size=256,  # documents per embedding call during a refresh
      keep_index_versions=3,
      # "trainer": re-embed in-process every refresh_every steps (synchronous, small corpora);
      # "builder": a separate `--mode=index_builder` job publishes versions, the trainer swaps.
      index_source="trainer",
      searcher="exact",  # "exact" (matmul + top-k) or "scann" (for builder-published versions)
      first_index_timeout=900.0,  # seconds the trainer waits for the builder's first version
      watch_poll_seconds=1.0,  # how often the trainer looks for a new version
      builder_poll_seconds=5.0,  # how often the index builder looks for a new checkpoint
      # Several builder processes: how long process 0 waits for the others' shards.
      builder_shard_timeout=3600.0,
      # ScaNN settings; 0 = scaled to each shard's size (retrieval/scann_searcher.py).
      scann=dict(num_leaves=0, num_leaves_to_search=0, reorder=0, dims_per_block=0,
                 training_sample_size=0),
      # Retrieve batch t+1 while the devices run step t (its candidates are then chosen with
      # the parameters before step t). False: strictly sequential, bit-exact across resumes.
      prefetch=True,
  ))

  config.loss = ml_collections.ConfigDict(dict(marginalization="token"))  # or "span"

  config.train = ml_collections.ConfigDict(dict(
      batch_size=s["batch_size"],  # global, over all devices
      num_steps=s["realm_steps"],
      learning_rate=1e-3 if size == "tiny" else 1e-4,
      # The warm-started retriever moves slower than the reader learns: a fast-moving query
      # tower forgets ICT before the reader can tell good documents from bad ones.
      retriever_lr_multiplier=0.1,
      warmup_steps=max(10, s["realm_steps"] // 20),
      weight_decay=0.01,
      grad_clip_norm=1.0,
      log_every=10,
      checkpoint_every=250 if size == "tiny" else 1000,
      keep_checkpoints=3,
      init_from="",  # a workdir (or its checkpoints/) whose embedder(s) warm-start this run
      init_encoder_from="",  # a workdir whose knowledge-augmented encoder (reader) starts this run
  ))

  config.ict = ml_collections.ConfigDict(dict(
      num_steps=s["ict_steps"],
      batch_size=max(32, s["batch_size"] * 2),  # in-batch negatives: bigger is better
      learning_rate=2e-3 if size == "tiny" else 1e-4,
      remove_prob=0.9,  # the pseudo-query sentence is removed from its block this often
  ))

  config.eval = ml_collections.ConfigDict(dict(
      every=s["eval_every"],
      batch_size=s["batch_size"],
      recall_k=s["k"] - 1,  # gold-document recall@k over real documents (null excluded)
  ))

  config.mesh = [("data", -1)]


def _require(condition: bool, message: str):
  if not condition:
    raise ConfigError(message)


def validate(config: ml_collections.ConfigDict, num_data_shards: int,
             process_count: int = 1) -> None:
  """Checks a resolved config against itself and the device layout."""
  check_choice("objective", config.objective, ("realm", "ict"))
  check_choice("model.size", config.model.size, bert.SIZES)
  check_choice("model.dtype", config.model.dtype, ("float32", "bfloat16"))
  _require(config.model.hidden_size % config.model.num_heads == 0,
           f"model.hidden_size={config.model.hidden_size} is not divisible by "
           f"model.num_heads={config.model.num_heads}")
  check_choice("data.masking", config.data.masking, ("salient", "random"))
  check_choice("loss.marginalization", config.loss.marginalization, ("token", "span"))
  check_choice("retrieval.index_source", config.retrieval.index_source, ("trainer", "builder"))
  check_choice("retrieval.searcher", config.retrieval.searcher, ("exact", "scann"))
  check_choice("data.corpus", config.data.corpus, ("facts", "wiki"))
  if config.data.corpus == "wiki":
    check_choice("data.salient_tagger", config.data.salient_tagger, ("builtin", "spacy", "dates"))
    kind, _, rest = config.data.source.partition(":")
    _require(kind in ("jsonl", "tfds") and bool(rest),
             f"data.source={config.data.source!r}: expected 'jsonl:<glob>' or "
             "'tfds:<name>[:<split>]'")
    if kind == "jsonl":
      pattern = epath.Path(rest)
      _require(bool(list(pattern.parent.glob(pattern.name))) if pattern.parent.exists()
               else False, f"data.source={config.data.source!r} matches no file")
  if config.data.vocab_file and not epath.Path(config.data.vocab_file).exists():
    raise ConfigError(f"data.vocab_file={config.data.vocab_file!r} does not exist")
  _require(config.data.doc_len + config.data.query_len <= config.model.max_position_embeddings,
           f"data.doc_len + data.query_len = {config.data.doc_len + config.data.query_len} "
           f"exceeds model.max_position_embeddings={config.model.max_position_embeddings}")
  _require(1 <= config.data.max_masked < config.data.query_len,
           f"data.max_masked={config.data.max_masked} must be in [1, data.query_len)")
  if config.objective == "realm" and config.retrieval.enabled:
    _require(config.retrieval.k >= 2,
             f"retrieval.k={config.retrieval.k}: REALM needs k >= 2 (the null document plus "
             "at least one retrieved document); use retrieval.enabled=False for no retrieval")
    _require(config.retrieval.refresh_every >= 1,
             f"retrieval.refresh_every={config.retrieval.refresh_every} must be >= 1")
    if config.retrieval.index_source == "builder":
      _require(config.train.checkpoint_every <= config.retrieval.refresh_every,
               f"train.checkpoint_every={config.train.checkpoint_every} > retrieval."
               f"refresh_every={config.retrieval.refresh_every}: the index builder embeds "
               "saved checkpoints, so it could refresh only every checkpoint_every steps")
  _require(config.retrieval.margin >= 1,
           f"retrieval.margin={config.retrieval.margin} must be >= 1 (the source document "
           "is dropped from every query's results)")
  batches = {"train.batch_size": config.train.batch_size, "eval.batch_size": config.eval.batch_size}
  if config.objective == "ict":
    batches["ict.batch_size"] = config.ict.batch_size
  for field, size in batches.items():
    _require(size >= 1 and size % num_data_shards == 0,
             f"{field}={size} is not divisible by the {num_data_shards} data-parallel "
             "devices of the mesh")
    _require(size % process_count == 0,
             f"{field}={size} is not divisible by the {process_count} processes")
  _require(config.train.num_steps >= 0, f"train.num_steps={config.train.num_steps} < 0")
  _require(config.train.checkpoint_every >= 1,
           f"train.checkpoint_every={config.train.checkpoint_every} must be >= 1")
  if config.model.get("init_from_hf"):
    _require(epath.Path(config.model.init_from_hf).exists(),
             f"model.init_from_hf={config.model.init_from_hf!r} does not exist")
    _require(bool(config.data.vocab_file),
             "model.init_from_hf needs data.vocab_file: the checkpoint's vocab.txt, so token "
             "ids mean what its embeddings learned")
  for field in ("init_from", "init_encoder_from"):
    path = config.train[field]
    if path and not epath.Path(path).exists():
      raise ConfigError(f"train.{field}={path!r} does not exist")


RUN_CONFIG = "config.json"


def save_run_config(config: ml_collections.ConfigDict, workdir: epath.PathLike) -> None:
  """Writes the resolved config of a run as `<workdir>/config.json` (read by the builder)."""
  path = epath.Path(workdir) / RUN_CONFIG
  tmp = path.parent / f".{RUN_CONFIG}.tmp"
  tmp.write_text(json.dumps(config.to_dict(), indent=1, default=str))
  tmp.replace(path)  # a reader never sees half a file


def load_run_config(workdir: epath.PathLike, wait_seconds: float = 0.0,
                    poll_seconds: float = 2.0) -> ml_collections.ConfigDict:
  """The config a trainer saved in `workdir`, waiting up to `wait_seconds` for it to appear.

  Lets the index builder run with `--workdir` alone, on exactly the trainer's settings.
  """
  path = epath.Path(workdir) / RUN_CONFIG
  deadline = time.time() + wait_seconds
  while not path.exists():
    if time.time() >= deadline:
      raise FileNotFoundError(f"no run config at {path}: start the trainer on this workdir, "
                              "or pass the trainer's --config")
    logging.info("waiting for the trainer to write %s", path)
    time.sleep(poll_seconds)
  config = ml_collections.ConfigDict(json.loads(path.read_text()))
  config.mesh = [tuple(axis) for axis in config.mesh]  # JSON turned the (name, size) pairs into lists
  return config
