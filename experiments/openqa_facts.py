r"""Open-QA fine-tuning and exact-match evaluation on the generated "facts" corpus.

The corpus, model and pretraining sections are experiments/realm_facts.py's (same sizes), so a
REALM (or ICT) run of that config is what `qa.init_from` points at; the `qa` section is the
fine-tuning recipe (ORQA/REALM: index frozen, query tower and reader trained):

  python -m realm_jax.main --mode=finetune_qa --config=experiments/openqa_facts.py:size=tiny \
      --config.qa.init_from=/tmp/realm_demo/realm --workdir=/tmp/qa_facts
  python -m realm_jax.main --mode=eval_qa --config=experiments/openqa_facts.py:size=tiny \
      --config.qa.init_from=/tmp/realm_demo/realm --workdir=/tmp/qa_facts

`retriever=bm25` (`get_config("size=tiny,retriever=bm25")`) is the lexical baseline: the same
reader over BM25's top blocks.

Questions are generated from the facts the corpus's queries state ("Where was <name> born?"):
the training entities' facts to fine-tune on, the held-out entities' facts (never in REALM's
training queries) as the dev set. The corpus is `qa.init_from`'s (`<init_from>/corpus`) unless
`data.corpus_dir` says otherwise: doc ids must be the index's.

Every `qa.*` field's help and accepted range: `realm_jax/qa/fields.py:QA_FIELDS`.
"""

import importlib.util
import os

import ml_collections

from realm_jax import config_lib

_SPEC = importlib.util.spec_from_file_location(
    "realm_facts", os.path.join(os.path.dirname(os.path.abspath(__file__)), "realm_facts.py"))
realm_facts = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(realm_facts)

RETRIEVERS = ("dense", "bm25")

# Per size: the fine-tuning schedule and the reader's shape. tiny: 2 CPU cores.
_QA_SIZES = {
    "tiny": dict(batch_size=16, num_steps=300, retriever_k=8, reader_k=4, span_hidden_size=64,
                 learning_rate=1e-3, eval_batch_size=32, checkpoint_every=100),
    "small": dict(batch_size=64, num_steps=2000, retriever_k=64, reader_k=5,
                  span_hidden_size=256, learning_rate=1e-4, eval_batch_size=128,
                  checkpoint_every=500),
    "base": dict(batch_size=128, num_steps=10000, retriever_k=1000, reader_k=5,
                 span_hidden_size=256, learning_rate=1e-5, eval_batch_size=256,
                 checkpoint_every=1000),
}


def qa_section(s: dict, question_len: int) -> ml_collections.ConfigDict:
  """The `qa` fields shared by the Open-QA experiments (see realm_jax/qa/fields.py)."""
  return ml_collections.ConfigDict(dict(
      dataset="facts",  # "facts", or "nq" / "wq" / "trec" with JSONL files below
      train_file="",
      dev_file="",  # empty: ORQA's sha256(question) mod 10 split of train_file
      test_file="",  # what eval_split="test" judges
      eval_split="dev",
      init_from="",  # REALM workdir (embedder + encoder) or ICT workdir (embedder)
      init_reader_from="",  # a workdir whose encoder BERT starts the reader instead
      index_from="",  # index folder or workdir; default init_from's, else embedded at start-up
      # "dense" or "bm25": BM25's top reader_k blocks, reader only (the lexical baseline).
      retriever="dense",
      question_len=question_len,
      retriever_k=s["retriever_k"],  # the retriever's loss is over these (paper: 5000)
      reader_k=s["reader_k"],  # blocks the reader reads (paper: 5)
      max_span_width=10,  # wordpieces (paper: 10)
      span_hidden_size=s["span_hidden_size"],  # paper: 256
      batch_size=s["batch_size"],
      num_steps=s["num_steps"],
      learning_rate=s["learning_rate"],
      warmup_steps=max(1, s["num_steps"] // 10),
      # The query tower moves slower than the reader (the lesson of REALM on this corpus: a
      # warm-started retriever at the full rate forgets its pretraining before the reader
      # can use it); 1.0 is ORQA's setting.
      query_embedder_lr_multiplier=0.1,
      checkpoint_every=s["checkpoint_every"],
      keep_checkpoints=2,
      log_every=10,
      prefetch=True,  # retrieve batch t+1 while step t runs
      eval_batch_size=s["eval_batch_size"],
      eval_retrieve_k=100,  # recall@1/5/20/100 depth (capped at the corpus size)
      eval_at_end=True,
      max_train_examples=0,  # 0: every training question
      max_eval_examples=0,  # 0: every dev question
  ))


def get_config(arg: str = "size=tiny") -> ml_collections.ConfigDict:
  args = config_lib.parse_arg(arg, size="tiny", retriever="dense")
  size = config_lib.check_choice("size", args.size, _QA_SIZES)
  config = realm_facts.get_config(f"size={size}")
  config.qa = qa_section(_QA_SIZES[size], config.data.query_len)
  config.qa.retriever = config_lib.check_choice("retriever", args.retriever, RETRIEVERS)
  return config
