"""The `qa.*` config fields (help and accepted values) and the QA-specific cross-field checks.

`QA_FIELDS` has the shape of `realm_jax.config_lib.FIELDS` (dotted name -> `config_lib.Field`)
and is merged into it by the config module; `validate_qa` checks what a range cannot (reader_k
<= retriever_k, batches that split over the mesh, files that exist, the dataset name), so a bad
Open-QA config fails in the first second of `finetune_qa` / `evaluate_qa`.
"""

from __future__ import annotations

import ml_collections
from etils import epath

from realm_jax import config_lib
from realm_jax.qa import data as data_lib

_int, _float, _choice, Field = (config_lib._int, config_lib._float, config_lib._choice,  # pylint: disable=protected-access
                                config_lib.Field)

_STEPS_MAX = 10**9

# "facts": questions generated from the facts corpus (its held-out entities are the dev set);
# the others are ORQA-format JSONL files (answer matching per `qa.data.DATASETS`).
DATASETS = ("facts", *data_lib.DATASETS)

QA_FIELDS: dict[str, config_lib.Field] = {
    "qa.dataset": _choice('"facts" (questions generated from the facts corpus), "nq", "wq" or '
                          '"trec" (ORQA JSONL; trec answers are regular expressions)', DATASETS),
    "qa.train_file": Field('JSONL {"question", "answer": [...]} to fine-tune on (not for '
                           "facts)"),
    "qa.dev_file": Field("JSONL dev questions; empty: ORQA's split of qa.train_file by "
                         "sha256(question) mod 10"),
    "qa.test_file": Field("JSONL questions that qa.eval_split=test evaluates"),
    "qa.eval_split": _choice('what evaluate_qa judges: "dev" or "test" (qa.test_file)',
                             ("dev", "test")),
    "qa.init_from": Field("a pretraining workdir: REALM gives the query tower (its embedder) and "
                          "the reader's BERT (its encoder), ICT the query tower only"),
    "qa.init_reader_from": Field("a workdir whose encoder's BERT starts the reader instead of "
                                 "qa.init_from's (e.g. the no-retrieval baseline)"),
    "qa.index_from": Field("the frozen index: an index folder or a workdir holding index/ "
                           "(default: qa.init_from's; none there: the corpus is embedded at "
                           "start-up)"),
    "qa.retriever": _choice('"dense" (the frozen index searched with the trained query tower) '
                            'or "bm25" (bm25s over the same blocks\' text; reader only, no '
                            "retriever loss, block-score term 0: the lexical baseline)",
                            ("dense", "bm25")),
    "qa.supervision": _choice(
        'training positives: "answer" (ORQA/REALM: any block whose text matches an answer) or '
        '"gold" (a question\'s known gold block only, where it has one: generated facts '
        'questions; the others keep answer matching)', ("answer", "gold")),
    "qa.question_len": _int("[CLS] question [SEP] wordpieces", 3, 65536),
    "qa.retriever_k": _int("blocks retrieved per question; the retriever's loss is over these "
                           "(paper: 5000)", 1, 100_000),
    "qa.reader_k": _int("the top blocks the reader reads (paper: 5); <= qa.retriever_k",
                        1, 1000),
    "qa.max_span_width": _int("longest answer span in wordpieces (paper: 10)", 1, 1024),
    "qa.span_hidden_size": _int("the reader's start/end projection width (paper: 256)",
                                1, 65536),
    "qa.batch_size": _int("fine-tuning global batch of questions, over all devices", 1, 10**6),
    "qa.num_steps": _int("fine-tuning steps", 0, _STEPS_MAX),
    "qa.learning_rate": _float("peak learning rate (AdamW, linear warm-up and decay)", 0.0, 1.0,
                               lo_open=True),
    "qa.warmup_steps": _int("linear warm-up steps", 0, _STEPS_MAX),
    "qa.query_embedder_lr_multiplier": _float(
        "the query tower's rate = this x qa.learning_rate (0 freezes it)", 0.0, 100.0),
    "qa.checkpoint_every": _int("save a checkpoint every this many steps", 1, _STEPS_MAX),
    "qa.keep_checkpoints": _int("checkpoints kept (the newest ones)", 1, 10**6),
    "qa.log_every": _int("log a progress line every this many steps", 1, _STEPS_MAX),
    "qa.prefetch": Field("retrieve batch t+1 while the devices run step t"),
    "qa.corpus_check_every": _int(
        "look for a newer corpus version (--mode=update_corpus) every this many fine-tuning "
        "steps; one is applied at once (frozen index brought up to it, removed blocks gone, "
        "added ones embedded with the frozen document tower)", 1, _STEPS_MAX),
    "qa.eval_batch_size": _int("evaluation global batch of questions", 1, 10**6),
    "qa.eval_retrieve_k": _int("blocks retrieved per question in evaluation, for recall@k "
                               "(k = 1, 5, 20, 100 up to this; at least qa.retriever_k)",
                               1, 100_000),
    "qa.eval_at_end": Field("finetune_qa evaluates on the dev questions when it finishes"),
    "qa.max_train_examples": _int("fine-tune on the first N training questions only (0: all)",
                                  0, None),
    "qa.max_eval_examples": _int("evaluate on the first N questions only (0: all)", 0, None),
}


def _require(condition: bool, message: str) -> None:
  if not condition:
    raise config_lib.ConfigError(message)


def _check_path(config: ml_collections.ConfigDict, field: str) -> None:
  path = config.qa[field]
  if path and not epath.Path(path).exists():
    raise config_lib.ConfigError(f"qa.{field}={path!r} does not exist")


def validate_qa(config: ml_collections.ConfigDict, num_data_shards: int = 1,
                process_count: int = 1) -> None:
  """Checks the `qa` section: ranges (`QA_FIELDS`), then fields against each other, the mesh
  and the file system. Raises `config_lib.ConfigError` naming the field."""
  _require("qa" in config, "the config has no qa section (use experiments/openqa_*.py)")
  for name, value in config_lib.leaves(config.qa, "qa."):
    spec = QA_FIELDS.get(name)
    problem = spec.problem(value) if spec is not None else None
    if problem:
      raise config_lib.ConfigError(f"{name}={value!r} {problem}")
  qa = config.qa
  _require(qa.dataset in DATASETS, f"qa.dataset={qa.dataset!r} is not one of {list(DATASETS)}")
  _require(qa.reader_k <= qa.retriever_k,
           f"qa.reader_k={qa.reader_k} > qa.retriever_k={qa.retriever_k}: the reader reads "
           "the top reader_k of the retrieved blocks")
  if qa.dataset == "facts":
    _require(config.data.corpus == "facts",
             f"qa.dataset='facts' asks about the facts corpus, but data.corpus="
             f"{config.data.corpus!r}")
  else:
    _require(bool(qa.train_file) or qa.eval_split == "test",
             f"qa.dataset={qa.dataset!r} needs qa.train_file (ORQA JSONL)")
  if qa.eval_split == "test":
    _require(bool(qa.test_file), "qa.eval_split='test' needs qa.test_file")
    _require(qa.dataset != "facts", "qa.eval_split='test' reads qa.test_file as ORQA JSONL: "
             "set qa.dataset to nq, wq or trec (facts questions have only their dev split)")
  for field in ("train_file", "dev_file", "test_file", "init_from", "init_reader_from",
                "index_from"):
    _check_path(config, field)
  for field in ("batch_size", "eval_batch_size"):
    size = qa[field]
    _require(size % num_data_shards == 0,
             f"qa.{field}={size} is not divisible by the {num_data_shards} data-parallel "
             "devices of the mesh")
    _require(size % process_count == 0,
             f"qa.{field}={size} is not divisible by the {process_count} processes")
  total = qa.question_len + config.data.doc_len
  _require(total <= config.model.max_position_embeddings,
           f"qa.question_len + data.doc_len = {total} exceeds model.max_position_embeddings="
           f"{config.model.max_position_embeddings} (the reader reads question + block)")
