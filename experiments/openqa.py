r"""Open-QA fine-tuning and exact-match evaluation on Wikipedia blocks (NQ, WebQuestions,
CuratedTREC).

The corpus and model are experiments/realm_wiki.py's (same `size` and `init` args): on CPU the
10k-passage sample of ../shared/data/wiki_sample, at scale TFDS Wikipedia. The questions are
the shared ORQA-format files in ../shared/data/openqa/ by default, when that folder exists:

  dataset=nq    nq_efficientqa_dev.jsonl    1,800 NQ-open questions (EfficientQA dev)
  dataset=wq    webquestions_train.jsonl    3,778 WebQuestions training questions
  dataset=trec  curatedtrec_train.jsonl     1,479 CuratedTREC training questions (regex answers)

each split into train and dev by ORQA's hash of the question (`qa.dev_file` empty); any path is
overridable (`--config.qa.train_file=... --config.qa.dev_file=... --config.qa.test_file=...`).

  python -m realm_jax.main --mode=finetune_qa \
      --config=experiments/openqa.py:size=tiny,dataset=wq \
      --config.qa.init_from=/tmp/realm_wiki --workdir=/tmp/qa_wq

`retriever=bm25` gives the lexical baseline (the same reader over BM25's top blocks, no
retriever loss):

  python -m realm_jax.main --mode=finetune_qa \
      --config=experiments/openqa.py:size=tiny,dataset=wq,retriever=bm25 --workdir=/tmp/qa_wq_bm25

Only ~17-39% of these questions are answerable from the 10k-passage sample (see
../shared/data/README.md): report EM beside a lexical baseline, not as an absolute number.
Every `qa.*` field's help and accepted range: `realm_jax/qa/fields.py:QA_FIELDS`.
"""

import importlib.util
import os

import ml_collections

from realm_jax import config_lib

_HERE = os.path.dirname(os.path.abspath(__file__))


def _load(name: str):
  spec = importlib.util.spec_from_file_location(name, os.path.join(_HERE, f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


realm_wiki = _load("realm_wiki")
openqa_facts = _load("openqa_facts")

OPENQA_DIR = os.path.normpath(os.path.join(_HERE, "..", "..", "shared", "data", "openqa"))
QA_FILES = {"nq": "nq_efficientqa_dev.jsonl", "wq": "webquestions_train.jsonl",
            "trec": "curatedtrec_train.jsonl"}

_QA_SIZES = {
    "tiny": dict(batch_size=16, num_steps=300, retriever_k=16, reader_k=4, span_hidden_size=64,
                 learning_rate=1e-3, eval_batch_size=32, checkpoint_every=100),
    "small": dict(batch_size=64, num_steps=2000, retriever_k=100, reader_k=5,
                  span_hidden_size=256, learning_rate=1e-4, eval_batch_size=128,
                  checkpoint_every=500),
    "base": dict(batch_size=512, num_steps=10000, retriever_k=5000, reader_k=5,
                 span_hidden_size=256, learning_rate=1e-5, eval_batch_size=512,
                 checkpoint_every=1000),
}


# BERT's fine-tuning range (2e-5 to 5e-5, Devlin et al. 2019) at its top: batch 16 is small.
MINILM_QA_LEARNING_RATE = 5e-5


def default_train_file(dataset: str) -> str:
  """The shared file of `dataset`, or "" when ../shared/data/openqa/ does not hold it."""
  path = os.path.join(OPENQA_DIR, QA_FILES[dataset])
  return path if os.path.exists(path) else ""


def get_config(arg: str = "size=tiny,dataset=nq") -> ml_collections.ConfigDict:
  args = config_lib.parse_arg(arg, size="tiny", dataset="nq", init="scratch",
                              retriever="dense")
  size = config_lib.check_choice("size", args.size, _QA_SIZES)
  dataset = config_lib.check_choice("dataset", args.dataset, QA_FILES)
  config = realm_wiki.get_config(f"size={size},init={args.init}")
  config.qa = openqa_facts.qa_section(_QA_SIZES[size], 32 if size == "tiny" else 64)
  if args.init == "minilm":
    # A pretrained reader and query tower are fine-tuned at BERT's rates, not the from-scratch
    # tiny rate (1e-3 left MiniLM's reader at EM 0, oracle 0.27, on CuratedTREC: EXPERIMENTS.md).
    config.qa.learning_rate = min(config.qa.learning_rate, MINILM_QA_LEARNING_RATE)
  config.qa.dataset = dataset
  config.qa.train_file = default_train_file(dataset)
  config.qa.retriever = config_lib.check_choice("retriever", args.retriever,
                                                openqa_facts.RETRIEVERS)
  return config
