"""Config helpers shared by the experiment files, and start-up validation of a whole config.

Every check raises `ConfigError` naming the offending field, so a bad value fails in the first
second of a job instead of an hour into it. `FIELDS` is the one table of every config field:
its one-line help (`--mode=print_config` shows it) and, for numbers, the allowed range (checked
by `validate`); a test walks every experiment config and fails on a field missing from it.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import logging
import math
import time
from typing import Any, Iterator, Sequence

import ml_collections
from etils import epath

from realm_jax import storage
from realm_jax.models import bert


class ConfigError(ValueError):
  """A config value that cannot work; the message names the field."""


@dataclasses.dataclass(frozen=True)
class Field:
  """One config field: help text, and the values it accepts.

  Numbers (`integer` or not) must lie in [lo, hi] (open ends with `lo_open`/`hi_open`; None:
  unbounded) and are always finite (NaN and inf are refused); `choices` lists the allowed
  values of a string field.
  """

  help: str
  lo: float | None = None
  hi: float | None = None
  integer: bool = False
  lo_open: bool = False
  hi_open: bool = False
  choices: tuple[Any, ...] | None = None

  @property
  def numeric(self) -> bool:
    return self.lo is not None or self.hi is not None or self.integer

  def describe(self) -> str:
    """The accepted values in words, e.g. "an integer in [1, inf)" or "a float in (0, 1]"."""
    if self.choices is not None:
      return f"one of {list(self.choices)}"
    if not self.numeric:
      return ""
    show = lambda x: str(int(x)) if self.integer else f"{x:g}"
    lo = "-inf" if self.lo is None else show(self.lo)
    hi = "inf" if self.hi is None else show(self.hi)
    interval = (f"{'(' if self.lo_open or self.lo is None else '['}{lo}, "
                f"{hi}{')' if self.hi_open or self.hi is None else ']'}")
    return f"{'an integer' if self.integer else 'a finite number'} in {interval}"

  def problem(self, value: Any) -> str | None:
    """Why `value` is not accepted (None when it is)."""
    if self.choices is not None:
      return None if value in self.choices else f"must be {self.describe()}"
    if not self.numeric:
      return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      return f"must be {self.describe()}, got a {type(value).__name__}"
    if self.integer and not isinstance(value, int):
      return f"must be {self.describe()}"
    if not math.isfinite(value):
      return f"must be {self.describe()} (not NaN or inf)"
    if self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo):
      return f"must be {self.describe()}"
    if self.hi is not None and (value >= self.hi if self.hi_open else value > self.hi):
      return f"must be {self.describe()}"
    return None


def _int(help_text: str, lo: int | None = 0, hi: int | None = None) -> Field:
  return Field(help_text, lo=lo, hi=hi, integer=True)


def _float(help_text: str, lo: float | None = 0.0, hi: float | None = None,
           lo_open: bool = False, hi_open: bool = False) -> Field:
  return Field(help_text, lo=lo, hi=hi, lo_open=lo_open, hi_open=hi_open)


def _choice(help_text: str, choices) -> Field:
  return Field(help_text, choices=tuple(choices))


_SEED_MAX = 2**31 - 1  # numpy and jax.random take any non-negative int32 seed
_DAY = 86400.0  # waits longer than a day are a typo, not a plan
_STEPS_MAX = 10**9

# Every config field of the experiments (dotted name -> help and accepted values). A field added
# to an experiment or to `add_training_sections` needs an entry here (tests/config_test.py).
FIELDS: dict[str, Field] = {
    "objective": _choice('"realm" (marginal MLM over retrieved docs) or "ict" (the Inverse '
                         "Cloze Task warm start of the retriever)", ("realm", "ict")),
    "seed": _int("parameter initialization, batch order and masking", 0, _SEED_MAX),
    "mesh": Field('device mesh axes [(name, size)], size -1 = all remaining devices; names '
                  '"data" and "fsdp" (batch split over data x fsdp, parameters and optimizer '
                  'state sharded over fsdp by partitioning.rules)'),
    "partitioning.rules": Field(
        '[(regex, "fsdp" | "replicate")], first re.search of the train-state leaf path wins '
        '(e.g. "params/encoder/.../kernel", also matching its Adam moments); "fsdp" splits '
        "the largest dimension divisible by the fsdp size; unmatched leaves are replicated; "
        "no effect without an fsdp mesh axis (train/partitioning.py)"),
    "partitioning.fsdp_min_size": _int(
        'leaves with fewer elements stay replicated under "fsdp" (biases, LayerNorm)', 0),
    "compilation_cache_dir": Field(
        'JAX persistent compilation cache: "" = the user cache dir '
        '(~/.cache/realm_jax/jax_compilation_cache), "none" = off, else a folder '
        "(realm_jax/compile_cache.py)"),
    # ---- model ----
    "model.size": _choice("named BERT size the shape fields below were taken from", bert.SIZES),
    "model.hidden_size": _int("BERT hidden width (divisible by model.num_heads)", 1, 65536),
    "model.num_layers": _int("BERT encoder layers per tower", 1, 1024),
    "model.num_heads": _int("attention heads per layer", 1, 1024),
    "model.intermediate_size": _int("BERT feed-forward width", 1, 262144),
    "model.max_position_embeddings": _int(
        "position embeddings; >= data.query_len + data.doc_len (the reader's input)", 2, 65536),
    "model.embed_dim": _int("retrieval embedding size (REALM/ORQA: 128)", 1, 65536),
    "model.share_embedders": Field("one embedder for queries and documents"),
    "model.dropout_rate": _float("dropout in every BERT tower", 0.0, 1.0, hi_open=True),
    "model.dtype": _choice('compute dtype (parameters stay float32)', ("float32", "bfloat16")),
    "model.attention_dropout_rate": _float("dropout on attention probabilities (BERT: 0.1)",
                                           0.0, 1.0, hi_open=True),
    "model.hidden_act": _choice(
        'BERT activation, HF names: "gelu" (exact), "gelu_new"/"gelu_pytorch_tanh"/"gelu_fast" '
        "(tanh approximation; HF REALM), ...",
        ("gelu", "gelu_new", "gelu_pytorch_tanh", "gelu_fast", "gelu_python", "relu", "silu",
         "swish")),
    "model.layer_norm_eps": _float("LayerNorm epsilon of the BERT towers (BERT: 1e-12)", 0.0,
                                   1e-2, lo_open=True),
    "model.embedder_pooler": Field(
        "retriever embeds BERT's pooled [CLS] (dense + tanh; ORQA/REALM/HF) before dense(embed_dim) "
        "+ LayerNorm; False: the raw [CLS] state (faster ICT from a random init, see "
        "models/embedder.py)"),
    "model.remat": Field("rematerialize encoder layers (less memory, more compute)"),
    "model.remat_policy": _choice(
        'model.remat: what each layer keeps for the backward pass; "nothing" (least memory) '
        'or "dots" (keeps the dense projections\' outputs)', ("nothing", "dots")),
    "model.init_from_hf": Field(
        "a Hugging Face BERT or REALM folder (model.safetensors or pytorch_model.bin + "
        "config.json) whose weights start the towers it has, or several comma-separated (HF's "
        "REALM embedder and encoder are separate; two giving the same parameter is an error); "
        "the model's shape and data.vocab_file must be the checkpoints'"),
    # ---- data ----
    "data.corpus": _choice('"facts" (the generated corpus) or "wiki" (Wikipedia blocks)',
                           ("facts", "wiki")),
    "data.corpus_dir": Field("where the prepared corpus lives (default <workdir>/corpus); share "
                             "one between runs"),
    "data.num_entities": _int("facts: entities in the generated corpus", 1, 10**8),
    "data.mentions_per_entity": _int(
        "facts: mention docs (each one query) per entity; fewer means fewer same-name documents "
        "competing with the gold profile", 1, 1000),
    "data.corpus_seed": _int("corpus generation, held-out split and query masking", 0, _SEED_MAX),
    # Lower bound: the vocabulary always holds the special tokens and the character alphabet,
    # so a few hundred entries are mostly single characters; salient spans then exceed
    # data.max_masked wordpieces and sentences data.query_len, and their queries are dropped.
    # Measured on the facts corpus (300 entities, query_len 16): vocab 200 keeps 15% of the
    # queries, 300 keeps 26%, 400 keeps 64%, 1000 keeps all.
    "data.vocab_size": _int("WordPiece vocab trained on the corpus when data.vocab_file is empty",
                            400, 2**20),
    "data.vocab_file": Field("a BERT vocab.txt (bert-base-uncased layout) to use instead of "
                             "training one"),
    "data.vocab_records": _int("wiki: records the vocab is trained on", 1, 10**9),
    "data.source": Field("wiki: 'jsonl:<glob>' of {title, text} lines, or "
                         "'tfds:<name>[:<split>]'"),
    "data.tfds_data_dir": Field("wiki: TFDS data_dir (e.g. gs://...) for a tfds: source"),
    "data.limit": _int("wiki: read only the first N records (0: all)", 0, None),
    "data.num_build_shards": _int(
        "wiki: corpus build shards (--mode=build_corpus --corpus_shard=i each)", 1, 100_000),
    # 3 special tokens plus at least one title/body and one sentence wordpiece.
    "data.doc_len": _int("[CLS] title [SEP] body [SEP] wordpieces per block (REALM: 288)",
                         4, 65536),
    "data.query_len": _int("[CLS] sentence [SEP] wordpieces per query (REALM: 96)", 3, 65536),
    "data.max_masked": _int("salient span length cap (wordpieces); longer spans are not used",
                            1, 1024),
    "data.masking": _choice('"salient" spans or "random" BERT 15% masking (the ablation)',
                            ("salient", "random")),
    "data.salient_tagger": _choice('wiki: "builtin" (dates + capitalised phrases), "spacy", '
                                   '"dates"', ("builtin", "spacy", "dates")),
    "data.num_eval_docs": _int("wiki: blocks whose held-out sentence is the evaluation set",
                               1, 10**8),
    "data.max_train_queries": _int("wiki: cap on training queries (0: every span)", 0, None),
    # ---- retrieval ----
    "retrieval.enabled": Field("False: null document only (the no-retrieval baseline)"),
    "retrieval.k": _int("candidates per query, counting the null document in slot 0", 1, 10000),
    "retrieval.margin": _int("over-retrieve this many extra ids to survive dropping the "
                             "source doc", 1, 10000),
    "retrieval.refresh_every": _int("re-embed the corpus every this many steps", 1, _STEPS_MAX),
    "retrieval.embed_batch_size": _int("documents per embedding call during a refresh",
                                       1, 10**6),
    "retrieval.keep_index_versions": _int("index versions kept in <workdir>/index", 1, 1000),
    "retrieval.corpus_check_every": _int(
        "index_source=trainer: look for a new corpus version (data/corpus_versions.py) every "
        "this many steps, and apply it to the index at once", 1, _STEPS_MAX),
    "retrieval.index_source": _choice(
        '"trainer": re-embed in-process every refresh_every steps; "builder": a separate '
        "--mode=index_builder job publishes versions", ("trainer", "builder")),
    "retrieval.searcher": _choice(
        '"exact" (host matmul + top-k), "scann" (host), or "device" (the table sharded over '
        "the mesh's data axis, searched in jit; versions are published as exact)",
        ("exact", "scann", "device")),
    "retrieval.device.dtype": _choice("searcher=device: dtype of the table on the devices",
                                      ("float32", "bfloat16")),
    "retrieval.device.top_k": _choice(
        'searcher=device: local top-k per shard; "auto": approx_max_k on TPU, exact top_k '
        "elsewhere", ("auto", "exact", "approx")),
    "retrieval.device.recall_target": _float("searcher=device: approx_max_k's recall target",
                                             0.0, 1.0, lo_open=True),
    "retrieval.first_index_timeout": _float(
        "seconds the trainer waits for the builder's first version", 0.0, 7 * _DAY,
        lo_open=True),
    "retrieval.watch_poll_seconds": _float("how often the trainer looks for a new version",
                                           0.0, _DAY, lo_open=True),
    "retrieval.builder_poll_seconds": _float(
        "how often the index builder looks for a new checkpoint", 0.0, _DAY, lo_open=True),
    "retrieval.builder_sync_lag": _int(
        "index_source=builder: 0 swaps each version in as soon as it is loaded (as fast as "
        "the builder, not reproducible); n > 0 retrieves batch t from the version of "
        "checkpoint refresh_every * floor((t - n) / refresh_every), waiting for it if need be "
        "(reproducible run to run)", 0, _STEPS_MAX),
    "retrieval.rebalance_on_update": Field(
        "index builder: retrain (ScaNN rebalance) each shard after an incremental corpus "
        "update instead of only upsert/delete"),
    "retrieval.index_update_mode": _choice(
        'incremental versions: "delta" (share the unchanged shards, write only the changes) '
        'or "rewrite" (every shard written anew)', ("delta", "rewrite")),
    "retrieval.index_update_max_delta_shards": _int(
        "delta updates (one update shard each) before an incremental version is rewritten",
        0, 10**4),
    "retrieval.builder_shard_timeout": _float(
        "several builder processes: how long process 0 waits for the others' shards", 0.0,
        7 * _DAY, lo_open=True),
    "retrieval.scann.num_leaves": _int("ScaNN partitions (0: scaled to the shard)", 0, 10**7),
    "retrieval.scann.num_leaves_to_search": _int("ScaNN partitions searched (0: scaled)",
                                                 0, 10**7),
    "retrieval.scann.reorder": _int("ScaNN exact re-scoring candidates (0: scaled)", 0, 10**7),
    "retrieval.scann.reorder_dtype": _choice(
        "how ScaNN stores the re-scored vectors (each shard's only copy): float32, bfloat16 "
        "(1/2 the bytes) or int8 (1/4)", ("float32", "bfloat16", "int8")),
    "retrieval.scann.dims_per_block": _int("ScaNN quantization dims per block (0: scaled)",
                                           0, 65536),
    "retrieval.scann.training_sample_size": _int("ScaNN training sample (0: scaled)", 0, 10**9),
    "retrieval.prefetch": Field(
        "retrieve batch t+1 while the devices run step t; False: strictly sequential, "
        "bit-exact across resumes"),
    # ---- loss ----
    "loss.marginalization": _choice('"token" (original code: per masked token) or "span" '
                                    "(the paper: product over the span)", ("token", "span")),
    # ---- train (REALM; ICT reads ict.* for its schedule) ----
    "train.batch_size": _int("REALM global batch, over all devices", 1, 10**7),
    "train.num_steps": _int("REALM training steps", 0, _STEPS_MAX),
    "train.learning_rate": _float("REALM peak learning rate (AdamW, linear warm-up and decay)",
                                  0.0, 1.0, lo_open=True),
    "train.retriever_lr_multiplier": _float(
        "the embedders' rate = this x train.learning_rate (0 freezes the retriever)", 0.0, 100.0),
    "train.warmup_steps": _int("REALM linear warm-up steps", 0, _STEPS_MAX),
    "train.weight_decay": _float("AdamW weight decay (REALM and ICT)", 0.0, 1.0),
    "train.grad_clip_norm": _float("global gradient-norm clip (REALM and ICT)", 0.0, 1e6,
                                   lo_open=True),
    "train.metrics_lag": Field(
        "fetch step t's metrics after step t+1 is dispatched (the host's record writing and "
        "batch copy overlap the devices; NaN still stops at the step that had it); False: "
        "each step's metrics are fetched before the next step starts"),
    "train.log_every": _int("log a progress line every this many steps", 1, _STEPS_MAX),
    "train.checkpoint_every": _int("save a checkpoint every this many steps (REALM and ICT)",
                                   1, _STEPS_MAX),
    "train.keep_checkpoints": _int("checkpoints kept (the newest ones)", 1, 10**6),
    "train.init_from": Field("a workdir (or its checkpoints/) whose embedder(s) warm-start this "
                             "run, e.g. an ICT run"),
    "train.init_encoder_from": Field("a workdir whose knowledge-augmented encoder (reader) "
                                     "starts this run"),
    "train.init_encoder_from_embedder": Field(
        "the reader's BERT starts as a copy of train.init_from's embedder BERT (the document "
        "tower's when not shared), as REALM starts both towers from one pretrained BERT; only "
        "when the reader has no other start (model.init_from_hf, train.init_encoder_from)"),
    # ---- ict ----
    "ict.num_steps": _int("ICT training steps", 0, _STEPS_MAX),
    "ict.batch_size": _int("ICT global batch; in-batch negatives: bigger is better", 1, 10**7),
    "ict.learning_rate": _float("ICT peak learning rate", 0.0, 1.0, lo_open=True),
    "ict.remove_prob": _float("the pseudo-query sentence is removed from its block this often",
                              0.0, 1.0),
    # ---- eval ----
    "eval.every": _int("REALM: evaluate on held-out queries every this many steps (0: at the "
                       "end only)", 0, _STEPS_MAX),
    "eval.batch_size": _int("evaluation global batch", 1, 10**7),
    "eval.recall_k": _int("informational: recall is reported over the retrieval.k - 1 real "
                          "candidates", 1, 10000),
}


def leaves(config: ml_collections.ConfigDict | dict,
           prefix: str = "") -> Iterator[tuple[str, Any]]:
  """(dotted name, value) of every leaf of a config (nested dicts walked; lists are leaves)."""
  for key, value in config.items():
    name = f"{prefix}{key}"
    if isinstance(value, (dict, ml_collections.ConfigDict)):
      yield from leaves(value, name + ".")
    else:
      yield name, value


def check_fields(config: ml_collections.ConfigDict) -> None:
  """Checks every leaf that `FIELDS` knows against its range or choices (unknown: skipped)."""
  for name, value in leaves(config):
    spec = FIELDS.get(name)
    problem = spec.problem(value) if spec is not None else None
    if problem:
      raise ConfigError(f"{name}={value!r} {problem}")


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
      attention_dropout_rate=0.0 if size == "tiny" else 0.1,  # on attention probabilities
      hidden_act="gelu",  # BERT's exact GELU; HF REALM checkpoints: "gelu_new" (tanh form)
      layer_norm_eps=1e-12,
      embedder_pooler=True,  # BERT pooler (dense + tanh over [CLS]) before the projection
      dtype="float32",  # compute dtype: "float32" or "bfloat16" (parameters stay float32)
      remat=False,
      remat_policy="nothing",  # with remat: "nothing" or "dots" (models/bert.py)
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
      # index_source=trainer: steps between two looks for a newer corpus version
      # (--mode=update_corpus); one is applied at once (retrieval/in_process.py).
      corpus_check_every=10,
      # "trainer": re-embed in-process every refresh_every steps (synchronous, small corpora);
      # "builder": a separate `--mode=index_builder` job publishes versions, the trainer swaps.
      index_source="trainer",
      # "exact" (matmul + top-k), "scann" (for builder-published versions) or "device" (the
      # table on the accelerators, searched in jit: retrieval/device_searcher.py).
      searcher="exact",
      # searcher=device: table dtype, local top-k ("auto": approx_max_k on TPU, exact
      # top_k elsewhere) and approx_max_k's recall target.
      device=dict(dtype="float32", top_k="auto", recall_target=0.95),
      first_index_timeout=900.0,  # seconds the trainer waits for the builder's first version
      watch_poll_seconds=1.0,  # how often the trainer looks for a new version
      builder_poll_seconds=5.0,  # how often the index builder looks for a new checkpoint
      # 0: swap a builder version in as soon as it is loaded (asynchronous: which step it
      # lands at depends on the builder's speed). n > 0: batch t is retrieved from the version
      # of checkpoint refresh_every * floor((t - n) / refresh_every), waited for if late, so a
      # run with the separate builder is reproducible (retrieval/watcher.py `swap_when_due`).
      builder_sync_lag=0,
      # Incremental versions (a corpus update, no newer checkpoint): ScaNN rebalance after
      # upsert/delete (a full retrain of each shard's tree) instead of updating in place.
      rebalance_on_update=False,
      # Incremental versions share the unchanged shards and write only the change ("delta":
      # deleted ids plus one shard of added blocks) until this many update shards pile up;
      # "rewrite": every shard written anew (retrieval/index_update.py).
      index_update_mode="delta", index_update_max_delta_shards=8,
      # Several builder processes: how long process 0 waits for the others' shards.
      builder_shard_timeout=3600.0,
      # ScaNN settings; 0 = scaled to each shard's size (retrieval/scann_searcher.py).
      scann=dict(num_leaves=0, num_leaves_to_search=0, reorder=0, dims_per_block=0,
                 training_sample_size=0, reorder_dtype="float32"),
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
      metrics_lag=True,  # step t's metrics fetched after step t+1 is dispatched
      checkpoint_every=250 if size == "tiny" else 1000,
      keep_checkpoints=3,
      init_from="",  # a workdir (or its checkpoints/) whose embedder(s) warm-start this run
      init_encoder_from="",  # a workdir whose knowledge-augmented encoder (reader) starts this run
      init_encoder_from_embedder=False,  # the reader's BERT <- a copy of init_from's embedder BERT
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
  # Parameter/optimizer-state layout over an "fsdp" mesh axis (train/partitioning.py).
  config.partitioning = ml_collections.ConfigDict(dict(rules=[(".*", "fsdp")],
                                                       fsdp_min_size=4096))
  # JAX's persistent compilation cache: "" = ~/.cache/realm_jax/jax_compilation_cache (or
  # $XDG_CACHE_HOME), "none" = off, else a folder (realm_jax/compile_cache.py).
  config.compilation_cache_dir = ""


def _require(condition: bool, message: str):
  if not condition:
    raise ConfigError(message)


def validate(config: ml_collections.ConfigDict, num_data_shards: int,
             process_count: int = 1) -> None:
  """Checks a resolved config: every field's range (`FIELDS`), then fields against each other
  and against the device layout."""
  check_fields(config)
  for field in ("objective", "model.size", "model.dtype", "data.masking", "data.corpus",
                "loss.marginalization", "retrieval.index_source", "retrieval.searcher"):
    _get(config, field)  # a required field missing is a KeyError naming it
  _require(config.model.hidden_size % config.model.num_heads == 0,
           f"model.hidden_size={config.model.hidden_size} is not divisible by "
           f"model.num_heads={config.model.num_heads}")
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
    if config.retrieval.index_source == "builder":
      _require(config.train.checkpoint_every <= config.retrieval.refresh_every,
               f"train.checkpoint_every={config.train.checkpoint_every} > retrieval."
               f"refresh_every={config.retrieval.refresh_every}: the index builder embeds "
               "saved checkpoints, so it could refresh only every checkpoint_every steps")
      lag = config.retrieval.get("builder_sync_lag", 0)
      if lag:
        _require(lag < config.retrieval.refresh_every,
                 f"retrieval.builder_sync_lag={lag} must be below retrieval.refresh_every="
                 f"{config.retrieval.refresh_every} (each version is used from n steps after "
                 "its checkpoint until the next one's turn)")
        _require(config.train.checkpoint_every == config.retrieval.refresh_every,
                 f"retrieval.builder_sync_lag={lag} needs train.checkpoint_every == "
                 f"retrieval.refresh_every (now {config.train.checkpoint_every} and "
                 f"{config.retrieval.refresh_every}): the builder embeds the newest checkpoint, "
                 "so with more frequent ones which step it embeds would depend on timing")
  batches = {"train.batch_size": config.train.batch_size, "eval.batch_size": config.eval.batch_size}
  if config.objective == "ict":
    batches["ict.batch_size"] = config.ict.batch_size
  for field, size in batches.items():
    _require(size >= 1 and size % num_data_shards == 0,
             f"{field}={size} is not divisible by the {num_data_shards} data-parallel "
             "devices of the mesh (config.mesh: the batch is split over data x fsdp)")
    _require(size % process_count == 0,
             f"{field}={size} is not divisible by the {process_count} processes")
  if "partitioning" in config:
    from realm_jax.train import partitioning  # pylint: disable=g-import-not-at-top
    try:
      partitioning.rules_from_config(config)
    except ValueError as e:
      raise ConfigError(str(e)) from e
  if config.model.get("init_from_hf"):
    for path in str(config.model.init_from_hf).split(","):  # several folders: comma-separated
      _require(bool(path.strip()) and epath.Path(path.strip()).exists(),
               f"model.init_from_hf={config.model.init_from_hf!r}: {path.strip()!r} does not "
               "exist")
    _require(bool(config.data.vocab_file),
             "model.init_from_hf needs data.vocab_file: the checkpoint's vocab.txt, so token "
             "ids mean what its embeddings learned")
  for field in ("init_from", "init_encoder_from"):
    path = config.train[field]
    if path and not epath.Path(path).exists():
      raise ConfigError(f"train.{field}={path!r} does not exist")


def _get(config, dotted: str) -> Any:
  value = config
  for key in dotted.split("."):
    if key not in value:
      raise ConfigError(f"the config has no field {dotted}")
    value = value[key]
  return value


# ---- The run's config in its workdir ---------------------------------------------------------

RUN_CONFIG = "config.json"

# Fields a resumed run cannot change: they fix the parameter shapes, the optimizer's structure
# (objective), or the corpus and its doc ids (the data fields `data/prepare.py` builds with),
# so the workdir's checkpoints and index versions would not fit. (model.dropout_rate, dtype and
# remat change numerics or memory, not shapes; model.init_from_hf is read only at step 0.)
RESUME_FIXED = (
    "objective", "model.size", "model.hidden_size", "model.num_layers", "model.num_heads",
    "model.intermediate_size", "model.max_position_embeddings", "model.embed_dim",
    "model.share_embedders", "model.embedder_pooler", "model.hidden_act", "data.corpus", "data.source", "data.limit", "data.num_entities",
    "data.mentions_per_entity", "data.corpus_seed", "data.vocab_size", "data.vocab_file",
    "data.vocab_records", "data.doc_len", "data.query_len", "data.max_masked", "data.masking",
    "data.salient_tagger", "data.num_eval_docs", "data.max_train_queries",
)

_ABSENT = "<absent>"


def _as_json(config: ml_collections.ConfigDict | dict) -> dict:
  """The config as `config.json` holds it (tuples become lists, odd values strings)."""
  data = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else config
  return json.loads(json.dumps(data, default=str))


def config_diff(saved: dict, current: dict) -> list[tuple[str, Any, Any, bool]]:
  """Fields that differ between a saved run config and the current one (both JSON-like dicts).

  Returns:
    (dotted field, saved value, current value, fixed) for each difference, sorted by field;
    `fixed` is True for a `RESUME_FIXED` field present on both sides (a field only one side has,
    e.g. one added to the code since, is never fixed). A missing value reads "<absent>".
  """
  old, new = dict(leaves(_as_json(saved))), dict(leaves(_as_json(current)))
  out = []
  for field in sorted(old.keys() | new.keys()):
    a, b = old.get(field, _ABSENT), new.get(field, _ABSENT)
    if a != b and not (isinstance(a, float) and isinstance(b, float) and
                       math.isnan(a) and math.isnan(b)):
      both = field in old and field in new
      out.append((field, a, b, both and field in RESUME_FIXED))
  return out


def _describe_diff(diff) -> str:
  return "; ".join(f"{field}: {old!r} -> {new!r}" for field, old, new, _ in diff)


def save_run_config(config: ml_collections.ConfigDict, workdir: epath.PathLike) -> None:
  """Writes the resolved config of a run as `<workdir>/config.json` (read by the builder).

  When the workdir already holds a run's config, compares first: a differing `RESUME_FIXED`
  field (model shape, objective, corpus) raises ConfigError listing every such field
  `old -> new` and leaves the file as it is; other differences are logged as one warning and
  the file is updated to the current config.
  """
  path = epath.Path(workdir) / RUN_CONFIG
  if path.exists():
    try:
      saved = json.loads(path.read_text())
    except json.JSONDecodeError as e:
      raise ConfigError(f"{path} is not valid JSON ({e}); delete it to start this workdir "
                        "afresh") from e
    diff = config_diff(saved, config.to_dict())
    fixed = [d for d in diff if d[3]]
    if fixed:
      raise ConfigError(
          f"{path} holds a run with another model or corpus; these fields cannot change when "
          f"resuming: {_describe_diff(fixed)}. Use a new --workdir (or restore these values)")
    if diff:
      logging.warning("config: resuming %s with %d changed field(s): %s", workdir, len(diff),
                      _describe_diff(diff))
    else:
      return
  # A reader never sees half a file: write-then-rename locally, one object on a bucket.
  storage.write_text(path, json.dumps(config.to_dict(), indent=1, default=str))


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
  if "partitioning" in config and "rules" in config.partitioning:
    config.partitioning.rules = [tuple(rule) for rule in config.partitioning.rules]
  return config


# ---- Discovery: the resolved config with help, and overrides that do nothing ---------------

def describe_config(config: ml_collections.ConfigDict) -> list[str]:
  """One line per field: `dotted.name = value  # help [accepted values]` (help when known)."""
  lines = []
  for name, value in leaves(config):
    line = f"{name} = {value!r}"
    spec = FIELDS.get(name)
    if spec is not None:
      accepted = spec.describe()
      line += f"  # {spec.help}" + (f" [{accepted}]" if accepted else "")
    lines.append(line)
  return lines


# (pattern, reason) per situation; patterns are fnmatch-style dotted names.
_ICT_IGNORES = (
    ("train.num_steps", "ICT reads ict.num_steps"),
    ("train.batch_size", "ICT reads ict.batch_size"),
    ("train.learning_rate", "ICT reads ict.learning_rate"),
    ("train.warmup_steps", "ICT warms up over ict.num_steps // 20 steps"),
    ("train.retriever_lr_multiplier", "ICT trains the embedder(s) at ict.learning_rate"),
    ("train.init_from", "ICT starts from scratch (or model.init_from_hf)"),
    ("train.init_encoder_from", "ICT does not train the reader"),
    ("train.init_encoder_from_embedder", "ICT does not train the reader"),
    ("loss.*", "the REALM loss; ICT has its own"),
    ("eval.every", "ICT evaluates once, at the end"),
    ("retrieval.enabled", "ICT trains on in-batch negatives, not retrieved documents"),
    ("retrieval.refresh_every", "ICT embeds the corpus once, for its final recall"),
    ("retrieval.prefetch", "ICT does not retrieve during training"),
    ("retrieval.index_source", "ICT builds its own in-process index for its final recall"),
    ("retrieval.first_index_timeout", "ICT does not wait for an index builder"),
    ("retrieval.watch_poll_seconds", "ICT does not watch for index versions"),
    ("retrieval.builder_*", "ICT does not use an index builder"),
)
_REALM_IGNORES = (("ict.*", "read only when objective=ict"),)
_NO_RETRIEVAL_IGNORES = (
    ("retrieval.*", "retrieval.enabled=False: the null document alone, no index"),
    ("train.init_from", "retrieval.enabled=False: the embedder is never used"),
    ("train.retriever_lr_multiplier", "retrieval.enabled=False: the embedder is never used"),
)
_TRAINER_INDEX_IGNORES = tuple(
    (f"retrieval.{name}", "read only with retrieval.index_source=builder")
    for name in ("first_index_timeout", "watch_poll_seconds", "builder_poll_seconds",
                 "builder_shard_timeout", "builder_sync_lag"))
_ALWAYS_IGNORES = (
    ("eval.recall_k", "not read: recall is reported over the retrieval.k - 1 real candidates"),
)


def encoder_copy_skipped(config: ml_collections.ConfigDict) -> str | None:
  """Why a REALM run would not copy the embedder's BERT into the reader with
  train.init_encoder_from_embedder; None when it would (the one rule: train/state.py applies
  it, ineffective_fields reports it)."""
  t = config.train
  if not t.get("init_from"):
    return "needs train.init_from: the warm start whose embedder BERT the reader copies"
  if t.get("init_encoder_from") or config.model.get("init_from_hf"):
    return "the reader starts from train.init_encoder_from / model.init_from_hf instead"
  return None


def ineffective_fields(config: ml_collections.ConfigDict, overridden: Sequence[str],
                       mode: str = "train") -> list[tuple[str, str]]:
  """The overridden fields that cannot affect this run, each with the reason.

  Args:
    config: the resolved config (after the overrides).
    overridden: dotted names given on the command line (`--config.<name>=...`).
    mode: the main.py mode; the objective's rules apply to train and print_config, demo
      runs both objectives, build_corpus reads data.* only, index_builder model.*, data.*,
      retrieval.*, mesh and seed.

  Returns:
    [(field, reason)] in the order of `overridden`, one entry per field.
  """
  rules = list(_ALWAYS_IGNORES)
  if mode in ("train", "print_config"):
    if config.get("objective") == "ict":
      rules += _ICT_IGNORES
    else:
      rules += _REALM_IGNORES
      if not config.retrieval.get("enabled", True):
        copies = config.train.get("init_encoder_from_embedder") and (
            encoder_copy_skipped(config) is None)  # init_from's BERT starts the reader
        rules += [rule for rule in _NO_RETRIEVAL_IGNORES
                  if not (copies and rule[0] == "train.init_from")]
      elif config.retrieval.get("index_source") == "trainer":
        rules += _TRAINER_INDEX_IGNORES
  elif mode in ("finetune_qa", "eval_qa"):
    for section in ("train.*", "ict.*", "loss.*", "eval.*", "objective"):
      rules.append((section, "the QA modes read qa.*, model.*, data.* and mesh"))
  elif mode == "index_builder":
    for section in ("train.*", "ict.*", "loss.*", "eval.*", "objective", "partitioning.*"):
      rules.append((section, "the index builder reads only model.*, data.*, retrieval.*, "
                    "mesh and seed"))
  if mode in ("train", "print_config", "index_builder") and (
      config.retrieval.get("searcher") != "scann"):
    rules.append(("retrieval.scann.*", "read only with retrieval.searcher=scann"))
  if mode == "index_builder":
    rules.append(("retrieval.device.*", "the trainer's device searcher; the builder "
                  "publishes embeddings (exact versions) for it"))
  elif mode in ("train", "print_config") and config.retrieval.get("searcher") != "device":
    rules.append(("retrieval.device.*", "read only with retrieval.searcher=device"))
  if mode in ("train", "print_config") and config.get("objective") != "ict":
    skipped = encoder_copy_skipped(config)
    if skipped:
      rules.append(("train.init_encoder_from_embedder", skipped))
  out = []
  for field in overridden:
    if mode == "build_corpus" and not field.startswith("data."):
      out.append((field, "build_corpus reads only data.*"))
      continue
    for pattern, reason in rules:
      if fnmatch.fnmatchcase(field, pattern):
        out.append((field, reason))
        break
  return out


# The Open-QA section's fields live beside the QA code; one table for every check and listing.
from realm_jax.qa import fields as _qa_fields  # pylint: disable=g-import-not-at-top,wrong-import-position

FIELDS.update(_qa_fields.QA_FIELDS)
