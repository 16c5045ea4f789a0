"""Open-QA fine-tuning and evaluation entry points: `finetune_qa` and `evaluate_qa`.

What `--mode=finetune_qa` and `--mode=eval_qa` call (flax-examples style: tests call the same
functions). The recipe is ORQA/REALM's (DESIGN.md §1):

- **Index frozen.** A published index version (`retrieval/index_format.py`) from `qa.index_from`
  or from the pretraining workdir `qa.init_from` (its `index/`); when neither has one, the
  corpus is embedded once at start-up with the initial document embedder and published under
  `<workdir>/index/0`. Which version a run uses is recorded in `<workdir>/qa_index.json`, so a
  resumed run (and `evaluate_qa`) reads the very same embeddings. Documents are never
  re-embedded.
- **Corpus versions** (`data/corpus_versions.py`, `--mode=update_corpus`): both entry points
  use the newest published corpus version (candidate tokens, titles and answer matching from
  it). A frozen index built for an older version is checked against *that* version, then
  brought up to the newest (`index_update.follow_version`: removed blocks dropped, added ones
  embedded with the frozen document tower, the one a start-up index is embedded with), published
  as `<workdir>/index/<step>+<corpus version>` and recorded in qa_index.json, so a resume or
  `evaluate_qa` reloads it instead of embedding again. Fine-tuning looks for a newer version
  every `qa.corpus_check_every` steps, applies it at once (a prefetched retrieval is redone)
  and logs `corpus_version` with every step's metrics. Removed blocks are never retrieved nor
  read (BM25 too: it indexes the live blocks only).
- **Trained:** the query tower (`query_embedder`, from pretraining's `embedder` or
  `query_embedder`) and the reader (`reader/bert` from pretraining's `encoder/bert`; its span
  head is new). An ICT workdir gives the query tower only (its encoder never trained); the
  reader then starts random, from `model.init_from_hf`, or from `qa.init_reader_from` (any
  workdir whose encoder should read, e.g. the no-retrieval baseline).
- **Per step** (batch > 1, sharded over `data` like pretraining): embed the batch's questions
  with the live query tower (device), search the frozen index for the top `qa.retriever_k`
  (host), build the batch (answer spans matched once per (question, block) and cached,
  `qa/batches.py`), train (`qa/steps.py`). With `qa.prefetch` the question embedding of batch
  t+1 is queued before step t and its search runs while the devices compute step t.
- Orbax checkpoints with the data step, resume by default; metrics in `<workdir>/metrics`
  (JSONL + TensorBoard, phases "qa" and "qa_eval"); progress lines.

BM25 (`qa.retriever="bm25"`, `realm_jax.qa.bm25`): no index and no query tower step; the
reader trains on BM25's top `qa.reader_k` blocks of each question (computed once per run on the
host), the block-score term of the joint softmax is 0 and there is no retriever loss. The
lexical baseline beside every dense EM.

Evaluation: the argmax of span score + retrieval score over the reader's blocks, decoded and
judged by SQuAD-normalized EM (CuratedTREC: regex), recall@k (an answer string in a top-k
block) for k = 1, 5, 20, 100 up to `qa.eval_retrieve_k`, and the reader-oracle EM; written as
`<workdir>/predictions.jsonl` and `<workdir>/qa_results.json`.

Batch order is a pure function of (seed, step): a resumed run sees the same questions.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np
import tokenizers
from etils import epath
from flax.training import train_state

from realm_jax import config_lib
from realm_jax import progress as progress_lib
from realm_jax import storage
from realm_jax.data import corpus as corpus_lib
from realm_jax.data import corpus_versions
from realm_jax.data import facts_corpus as facts_lib
from realm_jax.data import prepare
from realm_jax.data import tokenizer as tokenizer_lib
from realm_jax.models import embedder as embedder_lib
from realm_jax.models import hf_weights
from realm_jax.models import reader as reader_lib
from realm_jax.qa import batches as batches_lib
from realm_jax.qa import bm25 as bm25_lib
from realm_jax.qa import data as data_lib
from realm_jax.qa import evaluate as evaluate_lib
from realm_jax.qa import fields as fields_lib
from realm_jax.qa import steps as qa_steps
from realm_jax.retrieval import in_process
from realm_jax.retrieval import index_format
from realm_jax.retrieval import index_update
from realm_jax.retrieval import searcher as searcher_lib
from realm_jax.train import checkpointing
from realm_jax.train import metrics as metrics_lib
from realm_jax.train import partitioning
from realm_jax.train import preemption
from realm_jax.train import state as state_lib
from realm_jax.train import steps as steps_lib

_LOG = logging.getLogger(__name__)

INDEX_RECORD = "qa_index.json"
PREDICTIONS_FILE = "predictions.jsonl"
RESULTS_FILE = "qa_results.json"


# ---- Jitted functions, shared by the calls of one process ------------------------------------

_JITTED: dict[tuple, Any] = {}


def _cached(kind: str, factory, model, mesh, *extra):
  """One jitted function per (kind, model, mesh layout, extra) in this process, so a resumed
  run or an evaluation after fine-tuning in the same process does not compile again."""
  key = (kind, model, tuple(mesh.shape.items()), tuple(d.id for d in mesh.devices.flat), *extra)
  if key not in _JITTED:
    _JITTED[key] = factory(model, mesh, *extra)
  return _JITTED[key]


def _compiled_train_step(jitted, state, batch) -> tuple[Any, dict[str, float]]:
  """(the executable of `jitted` for these shapes, its FLOPs and memory), compiled ahead of
  the first step and reported once per process; the loop runs the executable itself (a
  `lower().compile()` is not shared with the jit cache, so reporting on the side would
  compile twice)."""
  key = ("compiled", jitted, jax.tree_util.tree_structure((state, batch)),
         tuple((x.shape, x.dtype) for x in jax.tree_util.tree_leaves((state, batch))))
  if key not in _JITTED:
    start = time.time()
    compiled, report = steps_lib.compile_with_report(jitted, state, batch)
    report["compile_seconds"] = time.time() - start
    _LOG.info("compile: %.1fs; %s", report["compile_seconds"],
              ", ".join(f"{k} {v:.3g}" for k, v in report.items()))
    _JITTED[key] = (compiled, report)
  return _JITTED[key]


def _canonical_model(model: reader_lib.OpenQAModel) -> reader_lib.OpenQAModel:
  """The first instance equal to `model` made in this process."""
  return _JITTED.setdefault(("model", model), model)


def _make_embed_questions(model: reader_lib.OpenQAModel, mesh):
  """(params, tokens [B, Lq]) -> [B, D], batch-sharded; params in the caller's layout."""
  sharded = partitioning.batch_sharded(mesh)
  return jax.jit(lambda params, tokens: model.apply({"params": params}, tokens, True,
                                                    method=model.embed_questions),
                 in_shardings=(None, sharded), out_shardings=sharded)


# ---- Data: corpus, tokenizer, questions ------------------------------------------------------

def _read_run_config(workdir: str) -> dict | None:
  path = epath.Path(workdir) / config_lib.RUN_CONFIG
  return json.loads(path.read_text()) if path.exists() else None


def corpus_dir(config: ml_collections.ConfigDict, workdir: epath.PathLike) -> epath.Path:
  """The prepared corpus: `data.corpus_dir`, else the one `qa.init_from`'s run used (its doc
  ids are the index's), else `<workdir>/corpus` (built there if missing)."""
  if config.data.corpus_dir:
    return epath.Path(config.data.corpus_dir)
  init = config.qa.init_from
  if init:
    saved = _read_run_config(init) or {}
    used = saved.get("data", {}).get("corpus_dir", "")
    if used and (epath.Path(used) / prepare.BUILD_CONFIG).exists():
      return epath.Path(used)
    if (epath.Path(init) / "corpus" / prepare.BUILD_CONFIG).exists():
      return epath.Path(init) / "corpus"
  return epath.Path(workdir) / "corpus"


def load_examples(config: ml_collections.ConfigDict
                  ) -> tuple[list[data_lib.QAExample], list[data_lib.QAExample],
                             list[data_lib.QAExample] | None]:
  """(train, dev, test or None). Facts: the training entities' facts and the held-out ones'.

  0 usable examples anywhere is an error naming the source (`qa.data`)."""
  qa = config.qa
  if qa.dataset == "facts":
    d = config.data
    facts = facts_lib.generate_facts_corpus(d.num_entities, d.corpus_seed,
                                            mentions_per_entity=d.mentions_per_entity)
    return data_lib.facts_questions(facts, "train"), data_lib.facts_questions(facts, "eval"), None
  train, dev = data_lib.load_train_dev(qa.dataset, qa.train_file, qa.dev_file)
  test = data_lib.read_jsonl(qa.test_file, qa.dataset)[0] if qa.test_file else None
  return train, dev, test


def batch_rows(num_examples: int, batch_size: int, seed: int, step: int) -> np.ndarray:
  """[batch_size] example indices of global batch `step`: epochs of seeded permutations,
  a pure function of (seed, step)."""
  if num_examples <= 0:
    raise ValueError("no training questions to draw batches from")
  positions = step * batch_size + np.arange(batch_size)
  epochs, offsets = positions // num_examples, positions % num_examples
  rows = np.empty(batch_size, np.int64)
  for epoch in np.unique(epochs):
    perm = np.random.default_rng([seed, int(epoch)]).permutation(num_examples)
    rows[epochs == epoch] = perm[offsets[epochs == epoch]]
  return rows


def trainable_examples(examples: Sequence[data_lib.QAExample], removed: np.ndarray
                       ) -> np.ndarray:
  """[T] indices of the questions that can still be learned from the corpus version whose
  tombstones are `removed` ([num_docs] bool): a question whose known gold block was removed
  is left out (its answer string may still match other blocks, which would then teach the
  reader a wrong reason); questions without a known gold block (-1) always stay."""
  gold = np.array([e.gold_doc_id for e in examples], np.int64)
  known = (gold >= 0) & (gold < len(removed))
  orphaned = np.zeros(len(gold), bool)
  orphaned[known] = removed[gold[known]]
  return np.flatnonzero(~orphaned)


# ---- Model and warm start --------------------------------------------------------------------

def build_qa_model(config: ml_collections.ConfigDict, vocab_size: int, pad_id: int
                   ) -> reader_lib.OpenQAModel:
  """The query tower + reader, with pretraining's BERT shape (`train.state.build_model`)."""
  realm_config = state_lib.build_model(config, vocab_size, pad_id).config
  return reader_lib.OpenQAModel(reader_lib.OpenQAModelConfig(
      reader_lib.ReaderConfig(realm_config.bert, span_hidden_size=config.qa.span_hidden_size,
                              max_span_width=config.qa.max_span_width, pad_id=pad_id),
      embed_dim=realm_config.embed_dim,
      embedder_pooler=getattr(realm_config, "embedder_pooler", True)))


def _shapes(tree) -> Any:
  return jax.tree_util.tree_map(np.shape, tree)


def _copy_subtree(target, source, what: str, source_name: str):
  if _shapes(target) != _shapes(source):
    raise ValueError(
        f"{source_name}: its {what} parameters do not fit this model (other model size, "
        "vocabulary or embedder layout?); tree/shapes differ")
  return jax.tree_util.tree_map(lambda t, s: np.asarray(s, dtype=np.asarray(t).dtype),
                                target, source)


def query_tower_source(source_params: dict, source_name: str) -> tuple[str, Any]:
  """(key, params) of the tower that embeds queries in a pretraining run."""
  for key in ("query_embedder", "embedder"):
    if key in source_params:
      return key, source_params[key]
  raise ValueError(f"{source_name}: no embedder or query_embedder in its parameters "
                   f"({sorted(source_params)}): not a REALM or ICT workdir")


def doc_tower_source(source_params: dict) -> Any | None:
  """The document embedder of a pretraining run (None when it has none)."""
  for key in ("doc_embedder", "embedder"):
    if key in source_params:
      return source_params[key]
  return None


def warm_start_qa(params: dict, source_params: dict | None, source_name: str,
                  copy_reader: bool, reader_params: dict | None = None,
                  reader_name: str = "") -> tuple[dict, list[str]]:
  """Pretraining parameters into an `OpenQAModel` tree: the remap `state.warm_start` cannot do.

  `embedder` (or `query_embedder`) -> `query_embedder`; `encoder/bert` -> `reader/bert` when
  `copy_reader` (a REALM run), or from `reader_params` (another run's `encoder/bert`) when
  given. The reader's span head stays as initialized. Returns (params, what was copied).
  """
  params = jax.tree_util.tree_map(np.asarray, dict(params))
  params["reader"] = dict(params["reader"])
  copied = []
  if source_params is not None:
    key, tower = query_tower_source(source_params, source_name)
    params["query_embedder"] = _copy_subtree(params["query_embedder"], tower, key, source_name)
    copied.append(f"query_embedder <- {source_name}:{key}")
    if copy_reader and reader_params is None:
      if "encoder" not in source_params or "bert" not in source_params["encoder"]:
        raise ValueError(f"{source_name}: no encoder/bert to start the reader from")
      params["reader"]["bert"] = _copy_subtree(params["reader"]["bert"],
                                               source_params["encoder"]["bert"], "encoder/bert",
                                               source_name)
      copied.append(f"reader/bert <- {source_name}:encoder/bert")
  if reader_params is not None:
    if "encoder" not in reader_params or "bert" not in reader_params["encoder"]:
      raise ValueError(f"{reader_name}: no encoder/bert to start the reader from "
                       f"({sorted(reader_params)})")
    params["reader"]["bert"] = _copy_subtree(params["reader"]["bert"],
                                             reader_params["encoder"]["bert"], "encoder/bert",
                                             reader_name)
    copied.append(f"reader/bert <- {reader_name}:encoder/bert")
  return params, copied


def _trained_encoder(workdir: str) -> bool:
  """Whether a pretraining workdir trained its encoder (REALM does; ICT freezes it)."""
  saved = _read_run_config(workdir)
  return saved is None or saved.get("objective", "realm") != "ict"


# ---- The frozen index ------------------------------------------------------------------------

def _index_root(path: str) -> epath.Path:
  """An index folder, or a workdir holding one under index/."""
  path = epath.Path(path)
  return path / "index" if (path / "index").is_dir() else path


def supervision_gold_ids(examples, supervision: str) -> np.ndarray | None:
  """[N] the training questions' gold block ids (-1 unknown) under `qa.supervision="gold"`,
  None under "answer" (ORQA's weak supervision: any block matching an answer is a positive).
  Logs how many questions have one, so a "gold" run on data without gold blocks says so."""
  if supervision == "answer":
    return None
  if supervision != "gold":
    raise ValueError(f"qa.supervision={supervision!r} is not 'answer' or 'gold'")
  gold = np.array([e.gold_doc_id for e in examples], np.int64)
  _LOG.info("finetune_qa: qa.supervision=gold: %d of %d training questions have a known gold "
            "block (the others keep answer matching)", int((gold >= 0).sum()), len(gold))
  return gold


def _newest_step(root: epath.Path) -> int | None:
  try:
    step = index_format.latest_step(root)
  except index_format.IndexVersionError:
    step = None
  versions = index_format.list_versions(root)
  if step is not None and step in versions:
    return step
  return versions[-1] if versions else None


def version_embeddings(root: epath.PathLike, step: int, manifest: dict, num_docs: int
                       ) -> np.ndarray:
  """[num_docs, D] float32: a version's stored embeddings, row = doc id (checksummed and
  validated by `index_format.load_index` before)."""
  version = epath.Path(root) / str(step)
  out = np.zeros((num_docs, manifest["dim"]), np.float32)
  for entry in manifest["shards"]:
    embeddings, doc_ids = index_format.shard_rows(version, entry)  # ScaNN: ScaNN's copy
    out[doc_ids] = embeddings
  return out


@dataclasses.dataclass
class FrozenIndex:
  """The index fine-tuning searches: its searcher and the embeddings it was built from."""

  searcher: searcher_lib.Searcher
  embeddings: np.ndarray  # [num_docs, D] float32, row = doc id
  root: str
  step: int  # index_format.VersionKey: `<step>` or `<step>+<corpus version>`
  source: str  # "index_from", "init_from" or "startup"
  corpus_version: int = 0  # the corpus version whose live blocks the searcher holds
  searcher_kind: str = "exact"  # as published ("exact" or "scann"), for re-publishing
  searcher_options: dict = dataclasses.field(default_factory=dict)


def load_frozen_index(root: epath.PathLike, step: int, embed_dim: int,
                      corpus: corpus_lib.BlockCorpus, source: str, field: str,
                      corpus_at=None) -> FrozenIndex:
  """Loads and checks one version against the model's dim and the corpus version it was built
  for (its manifest's `corpus_version`; 0, the build `corpus`, when it records none): that
  version's doc count, fingerprint (an index of another corpus with as many blocks is refused)
  and tombstones (no removed block, every live one). `corpus_at(number)` ->
  `corpus_versions.CorpusVersion` loads a later version. A mismatch is a ValueError naming the
  config field that chose the index and the corpus version it was checked against."""
  path = epath.Path(root) / str(step)
  try:
    number = int(index_format.read_manifest(root, step).get("corpus_version", 0) or 0)
  except (index_format.IndexVersionError, OSError) as e:
    raise ValueError(f"{field}: the index {path} cannot be read: {e}") from e
  version = corpus_versions.build_version(corpus, None)
  if number:
    try:
      if corpus_at is None:
        raise corpus_versions.CorpusVersionError("no corpus versions to check it against")
      version = corpus_at(number)
    except corpus_versions.CorpusVersionError as e:
      raise ValueError(f"{field}: the index {path} was built for corpus version {number}, "
                       f"which this run's corpus cannot give: {e}") from e
  checked = version.corpus
  try:
    manifest, searcher = index_format.load_index(
        root, step, expected_dim=embed_dim, expected_num_docs=checked.num_docs,
        removed=version.removed if number else None,
        expected_fingerprint=index_format.fingerprint_of(checked))
  except index_format.IndexVersionError as e:
    raise ValueError(f"{field}: the index {path} does not fit this run (model.embed_dim="
                     f"{embed_dim}, corpus version {number} of {checked.num_docs} blocks, "
                     f"fingerprint {checked.fingerprint or 'none (an older corpus)'}): "
                     f"{e}") from e
  return FrozenIndex(searcher, version_embeddings(root, step, manifest, checked.num_docs),
                     str(root), step, source, corpus_version=number,
                     searcher_kind=manifest.get("searcher", "exact"),
                     searcher_options=dict(manifest.get("searcher_options") or {}))


def make_doc_embed_fn(model: reader_lib.OpenQAModel, mesh):
  """embed_docs(doc_embedder_params, tokens, segments [N, Ld]) -> [N, D], batch-sharded."""
  c = model.config
  embedder = embedder_lib.Embedder(c.reader.bert, c.embed_dim, c.reader.pad_id,
                                   pooler=c.embedder_pooler)
  batch, repl = partitioning.batch_sharded(mesh), partitioning.replicated(mesh)
  return jax.jit(lambda p, t, s: embedder.apply({"params": p}, t, s, True),
                 in_shardings=(repl, batch, batch), out_shardings=batch)


def _write_index_record(world: "QAWorld", index: FrozenIndex) -> None:
  """qa_index.json: the version a resume and `evaluate_qa` must load (process 0 writes):
  `version` is its folder name (`<step>` or `<step>+<corpus version>`), `step` the parameter
  step alone (what records written before corpus versions hold)."""
  if world.is_main:
    storage.write_text(world.workdir / INDEX_RECORD, json.dumps(dict(
        root=index.root, step=int(index.step), version=str(index.step), source=index.source,
        corpus_version=index.corpus_version)))


def _embed_rows_fn(world: "QAWorld", doc_params_fn, corpus: corpus_lib.BlockCorpus, what: str):
  """embed_rows(doc ids [n]) -> [n, D] with the frozen document tower (`doc_params_fn()`,
  read on first use): the embedder of a start-up index and of blocks added by a version."""
  embed_docs = _cached("embed_docs", make_doc_embed_fn, world.model, world.mesh)
  return lambda rows: in_process.embed_corpus(doc_params_fn(), corpus, embed_docs, world.mesh,
                                              world.config.retrieval.embed_batch_size,
                                              progress_name=what, rows=rows)


def frozen_doc_params(world: "QAWorld", index: FrozenIndex, doc_params_fn):
  """The document tower the frozen index was embedded with, for the blocks a corpus version
  adds: for an index of the `qa.init_from` run (source "init_from"), that run's checkpoint of
  the index's parameter step (only the embedder subtrees are read, once per process); else,
  or when that checkpoint is gone, `doc_params_fn()`: the tower a start-up index is embedded
  with (`qa.init_from`'s newest checkpoint, or the initial one). A `qa.index_from` index of
  another run gets that tower too (its own parameters are not known here): logged."""
  init, step = world.config.qa.init_from, int(index.step)
  if index.source == "init_from" and init:
    directory = checkpointing.resolve_checkpoint_dir(init)
    key = ("doc_params", str(directory), step)
    if key not in _JITTED and (directory / str(step)).exists():
      params, _ = checkpointing.restore_embedder_params(init, step,
                                                        keys=("doc_embedder", "embedder"))
      _JITTED[key] = doc_tower_source(params)
    if _JITTED.get(key) is not None:
      return _JITTED[key]
    _LOG.warning("index: no checkpoint %d in %s for the frozen index's document tower; the "
                 "added blocks are embedded with the run's start-up tower", step, directory)
  elif index.source == "index_from":
    _LOG.warning("index: qa.index_from=%r: blocks added by a corpus version are embedded with "
                 "the run's start-up document tower (the index's own parameters are unknown)",
                 world.config.qa.index_from)
  return doc_params_fn()


def bring_index_to(world: "QAWorld", index: FrozenIndex,
                   target: corpus_versions.CorpusVersion, doc_params_fn, field: str) -> bool:
  """Brings the frozen `index` (changed in place) from its corpus version to `target`: removed
  blocks leave the searcher, added ones are embedded with the frozen document tower
  (`frozen_doc_params`) and join it (`index_update.follow_version`, as the trainer's own index
  does), and the embedding table [num_docs, D] grows to the target's id space. Published as
  `<workdir>/index/<step>+<c>` and recorded, so a resume or `evaluate_qa` reloads it. False
  when already there.

  An index of a newer version than `target` (the corpus went back?) is a ValueError naming
  `field`: its ids would name blocks this corpus version does not have."""
  if index.corpus_version == target.version:
    return False
  where = f"{field}: the index {epath.Path(index.root) / str(index.step)}"
  if index.corpus_version > target.version:
    raise ValueError(f"{where} was built for corpus version {index.corpus_version}, newer than "
                     f"the corpus's latest published version {target.version} (CORPUS_LATEST "
                     f"of {world.corpus_directory}): point data.corpus_dir at the corpus it "
                     "indexes")
  start = time.time()
  old = world.corpus_at(index.corpus_version)
  try:
    searcher, added, removed, added_emb = index_update.follow_version(
        index.searcher, old, target,
        _embed_rows_fn(world, lambda: frozen_doc_params(world, index, doc_params_fn),
                       target.corpus, f"qa corpus version {target.version}"))
  except corpus_versions.CorpusVersionError as e:
    raise ValueError(f"{where} (corpus version {old.version}) cannot follow corpus version "
                     f"{target.version}: {e}") from e
  embeddings = np.zeros((target.corpus.num_docs, index.embeddings.shape[1]), np.float32)
  embeddings[:len(index.embeddings)] = index.embeddings
  embeddings[added] = added_emb
  embeddings[removed] = 0.0  # never gathered: removed blocks are not retrieved
  key = index_format.VersionKey(int(index.step), target.version)
  root = world.workdir / "index"  # never into another run's index folder
  if world.is_main:
    if (root / str(key) / index_format.MANIFEST).exists():
      storage.remove_folder(root / str(key), index_format.MANIFEST)  # an interrupted start
    shards, searchers = index_update.shards_to_publish(searcher)
    scann = index.searcher_kind == "scann"
    index_format.publish_index(
        root, key, shards, searcher=index.searcher_kind,
        searcher_options=index.searcher_options if scann else None,
        searchers=searchers if scann else None,
        extra=dict(source="qa_corpus_update", corpus_version=target.version,
                   corpus_num_docs=target.corpus.num_docs, param_step=int(index.step),
                   **index_format.corpus_record(target.corpus),
                   incremental=dict(parent=f"{index.root}/{index.step}",
                                    parent_corpus_version=old.version, added=int(len(added)),
                                    removed=int(len(removed)), embedded=int(len(added)),
                                    seconds=round(time.time() - start, 3))))
  _LOG.info("index: %s/%s followed corpus version %d -> %d: +%d blocks embedded, -%d removed, "
            "%d live, in %.1fs (now %s/%s)", index.root, index.step, old.version,
            target.version, len(added), len(removed), len(target.live_ids), time.time() - start,
            root, key)
  index.searcher, index.embeddings, index.root, index.step = searcher, embeddings, str(root), key
  index.corpus_version = target.version
  _write_index_record(world, index)
  return True


def _startup_index(world: "QAWorld", doc_params_fn) -> FrozenIndex:
  """The live blocks of the run's corpus version embedded with the initial document tower,
  published as `<workdir>/index/0` (`0+<c>` over corpus version c)."""
  version = world.corpus_version
  _LOG.info("index: none published by qa.init_from=%r; embedding the corpus with the "
            "initial document embedder", world.config.qa.init_from)
  start = time.time()
  live = version.live_ids  # [L]
  live_emb = _embed_rows_fn(world, doc_params_fn, version.corpus, "qa index")(live)  # [L, D]
  root, key = world.workdir / "index", index_format.VersionKey(0, version.version)
  if world.is_main:
    if (root / str(key) / index_format.MANIFEST).exists():
      (root / str(key)).rmtree()  # an interrupted earlier start-up: embed again
    index_format.publish_index(root, key, [(live_emb, live)],
                               extra=dict(source="qa_startup", corpus_version=version.version,
                                          corpus_num_docs=version.corpus.num_docs,
                                          **index_format.corpus_record(version.corpus)))
  _LOG.info("index: embedded %d blocks in %.1fs", len(live), time.time() - start)
  embeddings = np.zeros((version.corpus.num_docs, live_emb.shape[1]), np.float32)
  embeddings[live] = live_emb
  return FrozenIndex(searcher_lib.ExactSearcher(live_emb, live), embeddings, str(root), key,
                     "startup", corpus_version=version.version)


def resolve_index(config: ml_collections.ConfigDict, workdir: epath.Path, world: "QAWorld",
                  doc_params_fn) -> FrozenIndex:
  """The run's frozen index (see the module docstring for the order), at the run's corpus
  version (`world.corpus_version`, brought up to it when built for an older one); recorded on
  first use and after every corpus update.

  `doc_params_fn()` gives the document embedder's parameters, called only when blocks must be
  embedded (a start-up index, or blocks added by a corpus version).
  """
  qa = config.qa
  dim = world.model.config.embed_dim
  record_path = workdir / INDEX_RECORD
  load = lambda root, step, source, field: load_frozen_index(
      root, step, dim, world.base_corpus, source, field, corpus_at=world.corpus_at)
  index = None
  if record_path.exists():  # a resumed run, or evaluate_qa: the very same version
    record = json.loads(record_path.read_text())
    _LOG.info("index: %s version %s (recorded in %s)", record["root"],
              record.get("version", record["step"]), record_path)
    name = str(record.get("version", record["step"]))
    step = index_format.parse_version(name)
    if step is None:
      raise ValueError(f"{record_path}: version {name!r} is not an index version name")
    index = load(record["root"], step, record["source"], f"{record_path}")
  elif qa.index_from:
    root = _index_root(qa.index_from)
    step = _newest_step(root)
    if step is None:
      raise ValueError(f"qa.index_from={qa.index_from!r}: no complete index version in {root}")
    index = load(root, step, "index_from", "qa.index_from")
  elif qa.init_from and _newest_step(_index_root(qa.init_from)) is not None:
    root = _index_root(qa.init_from)
    index = load(root, _newest_step(root), "init_from", "qa.init_from")
  recorded = record_path.exists()
  if index is None:
    index = _startup_index(world, doc_params_fn)
  field = str(record_path) if recorded else f"qa.{index.source}"
  # bring_index_to records the index when it changes it; a first use is recorded as it is.
  changed = bring_index_to(world, index, world.corpus_version, doc_params_fn, field)
  if not changed and not recorded:
    _write_index_record(world, index)
  _LOG.info("index: %s version %s (%s), corpus version %d: %d live blocks x %d", index.root,
            index.step, index.source, index.corpus_version, len(world.corpus_version.live_ids),
            dim)
  return index


def follow_corpus(world: "QAWorld", index: FrozenIndex | None, doc_params_fn) -> bool:
  """A corpus version published since the run's one becomes the run's: the frozen index is
  brought up to it (`bring_index_to`; None for BM25) and candidates' tokens, titles and answer
  matching come from it from now on. Every process moves at the same call (process 0's
  CORPUS_LATEST, broadcast: the added blocks are embedded collectively). True when it moved."""
  latest = in_process.agreed_corpus_version(world.corpus_directory,
                                            world.corpus_version.version, world.latest_problems)
  if latest <= world.corpus_version.version:
    return False
  target = world.corpus_at(latest)
  if index is not None:
    bring_index_to(world, index, target, doc_params_fn, "corpus_versions")
  world.use_corpus(target)
  return True


# ---- Set-up shared by fine-tuning and evaluation ---------------------------------------------

@dataclasses.dataclass
class QAWorld:
  """Everything a QA run reads, built once at start-up."""

  config: ml_collections.ConfigDict
  workdir: epath.Path
  mesh: Any
  corpus: corpus_lib.BlockCorpus
  tokenizer: tokenizers.Tokenizer
  model: reader_lib.OpenQAModel
  train: list[data_lib.QAExample]
  dev: list[data_lib.QAExample]
  test: list[data_lib.QAExample] | None
  embed_questions: Any  # jitted (params, tokens [B, Lq]) -> [B, D], batch-sharded
  is_main: bool
  corpus_directory: str = ""
  # The corpus version the run reads (`corpus` is its BlockCorpus); version 0 is the build.
  corpus_version: corpus_versions.CorpusVersion | None = None
  latest_problems: set = dataclasses.field(default_factory=set)  # CORPUS_LATEST ones logged
  _corpora: dict = dataclasses.field(default_factory=dict)  # version number -> CorpusVersion

  def __post_init__(self):
    self.base_corpus = self.corpus  # version 0, the build: what the index ids started from
    if self.corpus_version is None:
      self.corpus_version = self.corpus_at(0)

  def corpus_at(self, number: int) -> corpus_versions.CorpusVersion:
    """Corpus version `number` of the run's corpus (loaded once; 0 is the build)."""
    if number not in self._corpora:
      self._corpora[number] = (
          corpus_versions.build_version(self.base_corpus, self.corpus_directory)
          if number == 0 else corpus_versions.load_version(self.corpus_directory, number))
    return self._corpora[number]

  def use_corpus(self, version: corpus_versions.CorpusVersion) -> None:
    """From now on the run reads `version`: its blocks' tokens, titles and tombstones."""
    self.corpus_version, self.corpus = version, version.corpus

  @property
  def num_live(self) -> int:
    """Blocks that can be retrieved in the run's corpus version (not tombstoned)."""
    return int((~self.corpus_version.removed).sum())

  def encode(self, examples: Sequence[data_lib.QAExample]) -> np.ndarray:
    return batches_lib.encode_questions(examples, self.tokenizer, self.config.qa.question_len,
                                        self.corpus.special.pad)

  def matcher(self, examples: Sequence[data_lib.QAExample]) -> batches_lib.AnswerMatcher:
    return batches_lib.AnswerMatcher(examples, self.tokenizer, self.corpus,
                                     self.config.qa.max_span_width)

  def bm25(self) -> bm25_lib.QuestionBM25:
    """The BM25 retriever over the live blocks of the run's corpus version (a removed block is
    never returned), built once per corpus version in this process (its question cache too: a
    question is searched once)."""
    key = ("bm25", str(self.corpus_directory), self.corpus.num_docs, self.corpus_version.version)
    if key not in _JITTED:
      start = time.time()
      live = self.corpus_version.live_ids  # [L]
      texts = bm25_lib.block_texts(self.corpus, self.tokenizer)
      _JITTED[key] = bm25_lib.QuestionBM25([texts[i] for i in live], doc_ids=live)
      _LOG.info("bm25: indexed the %d live blocks of corpus version %d in %.1fs", len(live),
                self.corpus_version.version, time.time() - start)
    return _JITTED[key]

  def dummy_batch(self) -> dict[str, np.ndarray]:
    """Smallest arrays with the run's shapes, for `init` (create and restore)."""
    qa = self.config.qa
    return dict(question_tokens=np.ones((1, qa.question_len), np.int32),
                cand_doc_emb=np.zeros((1, qa.retriever_k, self.model.config.embed_dim),
                                      np.float32),
                reader_block_tokens=np.ones((1, qa.reader_k, self.corpus.body_len), np.int32))


def setup(config: ml_collections.ConfigDict, workdir: epath.PathLike, devices=None) -> QAWorld:
  """Mesh, config checks, corpus, tokenizer, questions and model (no parameters yet)."""
  workdir = epath.Path(workdir)
  mesh = partitioning.make_mesh(config.mesh, devices)
  shards = partitioning.data_parallel_size(mesh)
  config_lib.validate(config, shards, jax.process_count())
  fields_lib.validate_qa(config, shards, jax.process_count())
  is_main = jax.process_index() == 0
  if is_main:
    workdir.mkdir(parents=True, exist_ok=True)
  _LOG.info("setup: %s", partitioning.describe(mesh))
  data_config = config.copy_and_resolve_references()
  data_config.data.corpus_dir = str(corpus_dir(config, workdir))
  data = prepare.prepare_data(data_config, workdir)
  corpus = data.corpus
  tokenizer = tokenizer_lib.load_tokenizer(data.directory / "vocab.txt")
  # The newest published corpus version (process 0's CORPUS_LATEST, on every process).
  latest = in_process.agreed_corpus_version(data.directory, 0, set())
  version = (corpus_versions.load_version(data.directory, latest) if latest else
             corpus_versions.build_version(corpus, data.directory))
  num_live = len(version.live_ids)
  if config.qa.retriever_k > num_live:
    raise config_lib.ConfigError(f"qa.retriever_k={config.qa.retriever_k} exceeds the "
                                 f"{num_live} live blocks of corpus version {latest}")
  train, dev, test = load_examples(config)
  if config.qa.max_train_examples:
    train = train[:config.qa.max_train_examples]
  if config.qa.max_eval_examples:
    dev = dev[:config.qa.max_eval_examples]
    test = None if test is None else test[:config.qa.max_eval_examples]
  _LOG.info("data: corpus %s (version %d, %d live blocks), %d train / %d dev%s questions (%s)",
            data.directory, latest, num_live, len(train), len(dev),
            "" if test is None else f" / {len(test)} test", config.qa.dataset)
  # One instance per model config in this process: `model.apply` is a static field of the
  # train state, and bound methods of equal but distinct modules compare unequal.
  model = _canonical_model(build_qa_model(config, corpus.vocab_size, corpus.special.pad))
  embed_questions = _cached("embed_questions", _make_embed_questions, model, mesh)
  world = QAWorld(config, workdir, mesh, corpus, tokenizer, model, train, dev, test,
                  embed_questions, is_main, str(data.directory))
  world._corpora[version.version] = version  # pylint: disable=protected-access  # loaded once
  world.use_corpus(version)
  return world


def _tx(config: ml_collections.ConfigDict):
  """The optimizer, one object per setting in this process: it is a static field of the train
  state, so an equal but new object would make the jitted step compile again."""
  qa, t = config.qa, config.train
  args = (qa.learning_rate, qa.num_steps, qa.warmup_steps, t.weight_decay, t.grad_clip_norm,
          qa.query_embedder_lr_multiplier)
  key = ("tx", *args)
  if key not in _JITTED:
    _JITTED[key] = state_lib.make_optimizer(*args[:5],
                                            lr_multipliers={"query_embedder": args[5]})
  return _JITTED[key]


def _initial_params(world: QAWorld, rng) -> tuple[Any, Any]:
  """(initial QA parameters after the warm starts, the document embedder's parameters for a
  start-up index)."""
  config, qa = world.config, world.config.qa
  init = _cached("init", lambda model, _: jax.jit(model.init), world.model, world.mesh)
  params = jax.device_get(init(rng, *world.dummy_batch().values())["params"])
  if config.model.get("init_from_hf"):
    params = hf_weights.apply_hf_checkpoint(
        params, config.model.init_from_hf, model_config=config.model,
        vocab_size=world.corpus.vocab_size, towers=("query_embedder", "reader"))
    _LOG.info("state: query tower and reader BERT from %s", config.model.init_from_hf)
  source = reader_source = None
  if qa.init_from:
    source, step = checkpointing.restore_params(qa.init_from)
    _LOG.info("state: pretraining parameters of %s (step %d)", qa.init_from, step)
  if qa.init_reader_from:
    reader_source, step = checkpointing.restore_params(qa.init_reader_from)
    _LOG.info("state: reader parameters of %s (step %d)", qa.init_reader_from, step)
  params, copied = warm_start_qa(
      params, source, f"qa.init_from={qa.init_from}",
      copy_reader=bool(qa.init_from) and _trained_encoder(qa.init_from),
      reader_params=reader_source, reader_name=f"qa.init_reader_from={qa.init_reader_from}")
  _LOG.info("state: warm start: %s", "; ".join(copied) or "none (random initialization)")
  doc_params = doc_tower_source(source) if source is not None else None
  if doc_params is None:
    doc_params = params["query_embedder"]  # no pretraining: the initial (shared) tower
  return params, doc_params


# ---- Evaluation ------------------------------------------------------------------------------

def evaluate_examples(world: QAWorld, params, index: FrozenIndex | None,
                      examples: Sequence[data_lib.QAExample]
                      ) -> tuple[dict[str, float], list[evaluate_lib.Prediction]]:
  """EM (with counts), recall@k and reader-oracle EM of `params` over `examples`, retrieving
  from the frozen `index`, or with BM25 when `index` is None (`qa.retriever="bm25"`).

  Every process builds every (padded) global batch on the host and gets all predictions
  (`shard_batch_global` / `to_host`), so process 0 can write them.
  """
  if not examples:
    raise ValueError("No examples to evaluate: exact match over 0 questions is undefined")
  qa, corpus, mesh = world.config.qa, world.corpus, world.mesh
  tokens = world.encode(examples)
  matcher = world.matcher(examples)
  bm25 = index is None
  retriever = "bm25" if bm25 else "dense"
  predict = _cached("predict", qa_steps.make_qa_predict_step, world.model, mesh, retriever)
  params = partitioning.replicate(params, mesh)
  k = qa.reader_k if bm25 else qa.retriever_k
  depth = min(max(qa.eval_retrieve_k, k), world.num_live)  # removed blocks are not searched
  bm25_ids = world.bm25().top_ids(examples, depth) if bm25 else None
  spans = reader_lib.span_table(corpus.body_len, qa.max_span_width)
  decode = lambda ids: world.tokenizer.decode(list(ids))
  title_of = lambda doc_id: corpus.titles[doc_id]
  batch_size = qa.eval_batch_size
  # Generated questions (facts) know their gold block: gold_recall@k says whether the retriever
  # found *the* profile, not just any block containing the answer string.
  gold_ids = np.array([e.gold_doc_id for e in examples], np.int64)
  has_gold = bool((gold_ids >= 0).all())
  predictions, has_answer, oracle, gold_hits = [], [], [], []
  progress = progress_lib.Progress("eval_qa", len(examples), unit="questions",
                                   every_seconds=30.0)
  for start in range(0, len(examples), batch_size):
    rows = np.arange(start, start + batch_size)
    real = rows < len(examples)
    rows = np.where(real, rows, 0)  # padding: copies of question 0, dropped below
    if bm25:
      ids = bm25_ids[rows]
    else:
      question_emb = partitioning.to_host(world.embed_questions(
          params, partitioning.shard_batch_global({"t": tokens[rows]}, mesh)["t"]))
      ids, _ = index.searcher.search(question_emb, depth)
    batch = batches_lib.build_qa_batch(rows, tokens, ids[:, :k],
                                       None if bm25 else index.embeddings, matcher, qa.reader_k)
    retrieval_logits, span_logits = predict(params, partitioning.shard_batch_global(
        {key: batch[key] for key in qa_steps.predict_keys(retriever)}, mesh))
    block_rank, span, score = evaluate_lib.best_spans(
        partitioning.to_host(retrieval_logits), partitioning.to_host(span_logits), spans)
    keep = np.flatnonzero(real)
    predictions += evaluate_lib.make_predictions(
        [examples[i] for i in rows[keep]], ids[keep, :qa.reader_k],
        batch["reader_block_tokens"][keep], block_rank[keep], span[keep], score[keep], decode,
        title_of)
    has_answer.append(np.array([[matcher.has_answer(int(r), int(j)) for j in ids[b]]
                                for b, r in zip(keep, rows[keep])], bool).reshape(-1, depth))
    oracle.append(batch["span_is_correct"][keep].reshape(len(keep), -1).any(-1))
    if has_gold:
      gold_hits.append(ids[keep] == gold_ids[rows[keep]][:, None])
    progress.update(len(keep))
  progress.close()
  metrics = evaluate_lib.exact_match_metrics(predictions, examples)
  metrics.update(evaluate_lib.recall_at_k(np.concatenate(has_answer)))
  if has_gold:
    metrics.update({f"gold_{k}": v for k, v in
                    evaluate_lib.recall_at_k(np.concatenate(gold_hits)).items()})
    # Questions whose gold block the corpus version removed (counted in, as misses: the
    # knowledge is gone); how many, so a drop in gold recall after an update can be read.
    metrics["gold_removed"] = float(len(examples) - len(
        trainable_examples(examples, world.corpus_version.removed)))
  metrics["reader_oracle_em"] = evaluate_lib.reader_oracle_em(
      np.concatenate(oracle)[:, None, None])
  metrics["answer_cache_hits"] = float(matcher.cache.hits)
  metrics["bad_answer_patterns"] = float(matcher.bad_patterns)
  return metrics, predictions


def _index_record(index: FrozenIndex | None) -> dict[str, Any]:
  """What results JSON say about the retrieval: the frozen index version, or BM25."""
  if index is None:
    return dict(root="", step=-1, source="bm25")
  return dict(root=index.root, step=int(index.step), source=index.source,
              corpus_version=index.corpus_version)


def _write_evaluation(world: QAWorld, step: int, split: str, index: FrozenIndex | None,
                      metrics: dict[str, float], predictions, writer) -> dict[str, Any]:
  results = dict(step=step, split=split, dataset=world.config.qa.dataset,
                 retriever=world.config.qa.retriever, index=_index_record(index),
                 corpus_version=world.corpus_version.version,
                 init_from=world.config.qa.init_from,
                 init_reader_from=world.config.qa.init_reader_from, **metrics)
  if world.is_main:
    evaluate_lib.write_predictions(world.workdir / PREDICTIONS_FILE, predictions)
    storage.write_text(world.workdir / RESULTS_FILE, json.dumps(results, indent=1))
    writer.write(step, {f"{split}_{k}": v for k, v in metrics.items()}, phase="qa_eval")
  _LOG.info("eval_qa (%s, step %d): EM %.4f (%d/%d), %s, reader-oracle EM %.4f", split, step,
            metrics["exact_match"], metrics["num_correct"], metrics["num_examples"],
            ", ".join(f"{k} {v:.3f}" for k, v in metrics.items() if "recall@" in k),
            metrics["reader_oracle_em"])
  return results


# ---- Entry points ----------------------------------------------------------------------------

def finetune_qa(config: ml_collections.ConfigDict, workdir: epath.PathLike,
                max_steps_this_run: int | None = None, devices=None) -> dict[str, Any]:
  """Fine-tunes the query tower and reader on `config.qa`'s questions in `workdir`, resuming
  if it holds a run; evaluates on the dev questions at the end (`qa.eval_at_end`).

  SIGTERM (preemption, train/preemption.py): the step in progress finishes, all processes stop
  before the same step, its checkpoint is saved and waited for, one line `preempted at step N:
  checkpoint saved to ...` is logged and `preemption.Preempted` is raised (no evaluation; the
  next call resumes; the CLI exits 0).

  Args:
    config: an Open-QA config (experiments/openqa_facts.py, experiments/openqa.py).
    workdir: the run's folder: checkpoints/, metrics/, qa_index.json (and index/ when the
      corpus was embedded at start-up), predictions.jsonl, qa_results.json.
    max_steps_this_run: stop after this many steps (a preemption stand-in; the schedule
      follows qa.num_steps and the next call resumes).
    devices: devices for the mesh (default: all).

  Returns:
    {"step", "history" (per-step metrics of this call), "compile"} plus the dev evaluation
    ("exact_match", counts, "recall@k", ...) when the run finished.
  """
  with preemption.sigterm_handled() as stop_request:
    return _finetune_qa(config, workdir, max_steps_this_run, devices, stop_request)


def _finetune_qa(config: ml_collections.ConfigDict, workdir: epath.PathLike,
                 max_steps_this_run: int | None, devices,
                 stop_request: preemption.StopRequest) -> dict[str, Any]:
  """`finetune_qa` with its SIGTERM handler installed (read at every step boundary)."""
  world = setup(config, workdir, devices)
  qa, mesh = config.qa, world.mesh
  workdir = world.workdir
  if world.is_main:
    config_lib.save_run_config(config, workdir)
  if not world.train:
    raise ValueError(f"qa.dataset={qa.dataset!r}: 0 training questions")

  # ---- Index first (a bad one fails before any compile), then state ---------------------
  rng = jax.random.key(config.seed)
  initial: dict[str, Any] = {}

  def initial_params():  # (warm-started QA params, document embedder params), made once
    if "params" not in initial:
      initial["params"] = _initial_params(world, rng)
    return initial["params"]

  bm25 = qa.retriever == "bm25"
  retriever = qa.retriever
  if bm25:
    index = None  # the reader reads BM25's blocks; nothing to embed or search
  else:
    index = resolve_index(config, workdir, world, lambda: initial_params()[1])
  tx = _tx(config)
  dummy = world.dummy_batch()
  shapes = jax.eval_shape(lambda r: qa_steps.create_qa_train_state(world.model, r, dummy, tx),
                          rng)
  state_sharding = partitioning.state_shardings_from_config(shapes, mesh, config)
  abstract = partitioning.with_shardings(shapes, state_sharding)
  _LOG.info("state: %s", partitioning.describe_state_layout(shapes, state_sharding, mesh))
  ckpt = checkpointing.Checkpointer(workdir / "checkpoints", keep=qa.keep_checkpoints)
  restored = ckpt.restore(abstract)
  if restored is not None:
    state, data_state, start_step = restored
    if data_state.get("step") != start_step:
      raise ValueError(f"checkpoint {start_step} holds data state {data_state}")
    _LOG.info("state: resumed from step %d", start_step)
  else:
    state = jax.device_put(train_state.TrainState.create(
        apply_fn=world.model.apply,
        params=jax.tree_util.tree_map(np.asarray, initial_params()[0]), tx=tx).replace(
            step=np.zeros((), np.int32)), state_sharding)  # int32 like a restored step
    start_step = 0
  _LOG.info("state: %.2fM parameters", state_lib.count_params(state.params) / 1e6)

  # ---- Steps and batches ---------------------------------------------------------------
  train_step = _cached("train", lambda model, mesh, seed, _, kind: qa_steps.make_qa_train_step(
      model, mesh, seed, state_sharding, kind), world.model, mesh, config.seed,
                       partitioning.layout_key(state_sharding), retriever)
  tokens = world.encode(world.train)
  matcher = world.matcher(world.train)
  gold_ids = supervision_gold_ids(world.train, qa.get("supervision", "answer"))
  bm25_ids = None
  if bm25:  # every training question's top blocks, once per corpus version
    start = time.time()
    bm25_ids = world.bm25().top_ids(world.train, qa.reader_k)
    _LOG.info("bm25: top %d blocks of %d questions in %.1fs", qa.reader_k, len(world.train),
              time.time() - start)
  per_process = qa.batch_size // jax.process_count()
  lo = jax.process_index() * per_process

  def trainable_now() -> np.ndarray:
    """The training questions of the run's corpus version (logged when some are left out)."""
    rows = trainable_examples(world.train, world.corpus_version.removed)
    if len(rows) < len(world.train):
      _LOG.info("finetune_qa: %d of %d training questions left out: their gold block is "
                "removed in corpus version %d", len(world.train) - len(rows), len(world.train),
                world.corpus_version.version)
    return rows

  trainable = trainable_now()

  def local_rows(step: int) -> np.ndarray:
    rows = batch_rows(len(trainable), qa.batch_size, config.seed, step)[lo:lo + per_process]
    return trainable[rows]  # no removed block: every question (trainable = arange)

  def start_retrieval(params, step: int):
    """Dispatches the live query embedding of batch `step`: (rows, [B, D] on the mesh)."""
    rows = local_rows(step)
    if bm25:
      return rows, None
    return rows, world.embed_questions(
        params, partitioning.shard_batch({"t": tokens[rows]}, mesh)["t"])

  def finish_retrieval(pending) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Host search of the frozen index and the QA batch (this process's rows)."""
    rows, question_emb = pending
    start = time.time()
    if bm25:
      ids, embeddings = bm25_ids[rows], None
    else:
      ids, _ = index.searcher.search(partitioning.local_rows(question_emb), qa.retriever_k)
      embeddings = index.embeddings
    batch = batches_lib.build_qa_batch(rows, tokens, ids, embeddings, matcher, qa.reader_k,
                                       gold_ids=None if gold_ids is None else gold_ids[rows])
    return batch, {"retrieval_seconds": time.time() - start}

  writer = metrics_lib.MetricWriter(workdir / "metrics", enabled=world.is_main, phase="qa",
                                    keep_through_step=start_step)
  if start_step == 0:
    writer.write_hparams(config)
  num_steps = qa.num_steps
  stop = num_steps if max_steps_this_run is None else min(num_steps,
                                                          start_step + max_steps_this_run)
  report: dict[str, float] = {}
  pending = None
  if start_step < stop:
    pending = finish_retrieval(start_retrieval(state.params, start_step))
    train_step, report = _compiled_train_step(train_step, state,
                                              partitioning.shard_batch(pending[0], mesh))

  def follow(step: int) -> bool:
    """Every qa.corpus_check_every steps: a newer corpus version becomes the run's (index,
    candidates, answer matching, BM25's blocks). True when it did."""
    nonlocal bm25_ids, trainable
    if step % check_every or not follow_corpus(world, index, lambda: initial_params()[1]):
      return False
    matcher.use_corpus(world.corpus)
    trainable = trainable_now()
    if bm25:
      bm25_ids = world.bm25().top_ids(world.train, qa.reader_k)
    _LOG.info("finetune_qa: corpus version %d from step %d", world.corpus_version.version, step)
    return True

  # ---- The loop ------------------------------------------------------------------------
  check_every = qa.get("corpus_check_every", 10)
  progress = progress_lib.Progress("finetune_qa", num_steps, unit="steps", start=start_step,
                                   every_count=qa.log_every)
  history = []
  preempted = False
  for step in range(start_step, stop):
    if stop_request.agreed():  # every process stops before the same step
      preempted = True
      break
    step_start = time.time()
    if follow(step):
      pending = None  # retrieved from the previous corpus version: retrieve again
    batch, scalars = pending if pending is not None else finish_retrieval(
        start_retrieval(state.params, step))
    pending = None
    ahead = start_retrieval(state.params, step + 1) if qa.prefetch and step + 1 < stop else None
    state, step_metrics = train_step(state, partitioning.shard_batch(batch, mesh))
    if ahead is not None:
      pending = finish_retrieval(ahead)  # the host search overlaps step t on the devices
    scalars.update({k: float(v) for k, v in jax.device_get(step_metrics).items()})
    scalars.update(step_seconds=time.time() - step_start,
                   corpus_version=float(world.corpus_version.version),
                   trainable_questions=float(len(trainable)),
                   answer_cache_hits=float(matcher.cache.hits),
                   answer_cache_misses=float(matcher.cache.misses))
    writer.write(step + 1, scalars)
    history.append(dict(step=step + 1, **scalars))
    bad = metrics_lib.nonfinite(scalars)
    if bad:  # NaN/inf loss or gradient norm: stop here, this state unsaved
      writer.flush()
      ckpt.wait()  # a periodic save in flight is a good state
      raise metrics_lib.nonfinite_error(bad, step + 1, ckpt.all_steps(), "finetune_qa")
    progress.update(1, {k: scalars[k] for k in ("loss", "reader_loss", "retriever_loss",
                                                "span_accuracy")})
    done = step + 1
    if done % qa.checkpoint_every == 0 or done == stop:
      ckpt.save(done, state, {"step": done})
  progress.close()
  writer.flush()
  ckpt.wait()

  final: dict[str, Any] = {"step": int(jax.device_get(state.step)), "history": history,
                           "compile": report, "retriever": retriever,
                           "index": _index_record(index),
                           "corpus_version": world.corpus_version.version}
  if preempted or stop_request.agreed():  # ---- Preemption: checkpoint, no evaluation ----
    try:
      _checkpoint_on_preemption(ckpt, state, final["step"], stop_request)
    finally:
      writer.close()
      ckpt.close()
  if stop == num_steps and qa.eval_at_end:
    metrics, predictions = evaluate_examples(world, jax.device_get(state.params), index,
                                             world.dev)
    final.update(_write_evaluation(world, final["step"], "dev", index, metrics, predictions,
                                   writer))
  writer.close()
  ckpt.close()
  return final


def _checkpoint_on_preemption(ckpt: checkpointing.Checkpointer, state, done: int,
                              stop_request: preemption.StopRequest) -> None:
  """The state after `done` steps to storage (waited for), unless already there; one line;
  then preemption.Preempted."""
  if done not in ckpt.all_steps():
    ckpt.save(done, state, {"step": done})
    ckpt.wait()
  path = ckpt.directory / str(done)
  message = (f"preempted at step {done} "
             f"({stop_request.signal_name or 'stop signal on another process'}): "
             f"checkpoint saved to {path}")
  _LOG.info("%s", message)
  raise preemption.Preempted(message, done, str(path))


def evaluate_qa(config: ml_collections.ConfigDict, workdir: epath.PathLike,
                devices=None) -> dict[str, Any]:
  """Evaluates the newest fine-tuned checkpoint of `workdir` on `qa.eval_split`'s questions.

  Reads the index the fine-tuning run used (`qa_index.json`). Writes predictions.jsonl,
  qa_results.json and a "qa_eval" metrics record; returns the results (EM with its counts,
  recall@k, reader-oracle EM, step, split, index).
  """
  world = setup(config, workdir, devices)
  workdir = world.workdir
  split = config.qa.eval_split
  examples = world.test if split == "test" else world.dev
  if not examples:
    raise ValueError(f"qa.eval_split={split!r}: 0 questions to evaluate")
  bm25 = config.qa.retriever == "bm25"
  if not bm25 and not (workdir / INDEX_RECORD).exists():
    raise FileNotFoundError(f"{workdir / INDEX_RECORD} does not exist: run finetune_qa on "
                            f"{workdir} first")
  try:
    params, step = checkpointing.restore_params(workdir)
  except FileNotFoundError as e:
    raise FileNotFoundError(f"no fine-tuned checkpoint in {workdir / 'checkpoints'}: run "
                            "finetune_qa first") from e
  # The frozen document tower, only if a corpus version added blocks to embed.
  doc_params = lambda: _initial_params(world, jax.random.key(config.seed))[1]
  index = None if bm25 else resolve_index(config, workdir, world, doc_params)
  metrics, predictions = evaluate_examples(world, params, index, examples)
  writer = metrics_lib.MetricWriter(workdir / "metrics", enabled=world.is_main, phase="qa_eval")
  try:
    return _write_evaluation(world, step, split, index, metrics, predictions, writer)
  finally:
    writer.close()
