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

The same config is what `make demo`'s QA phase fine-tunes with (realm_facts.py carries the `qa`
section, so `--config.qa.*` overrides reach the demo too).

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

# The `qa` section (and its per-size schedule) lives in realm_facts.py, whose config the demo's
# QA phase fine-tunes with; these names stay for experiments/openqa.py and the tests.
_QA_SIZES = realm_facts.QA_SIZES
qa_section = realm_facts.qa_section


def get_config(arg: str = "size=tiny") -> ml_collections.ConfigDict:
  args = config_lib.parse_arg(arg, size="tiny", retriever="dense")
  size = config_lib.check_choice("size", args.size, _QA_SIZES)
  config = realm_facts.get_config(f"size={size}")  # its `qa` section is this recipe
  config.qa.retriever = config_lib.check_choice("retriever", args.retriever, RETRIEVERS)
  return config
