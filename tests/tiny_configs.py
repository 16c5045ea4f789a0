"""The experiment's tiny config shrunk further for tests (shared by the test modules)."""

import importlib.util
import pathlib

_PATH = pathlib.Path(__file__).parent.parent / "experiments" / "realm_facts.py"
_SPEC = importlib.util.spec_from_file_location("realm_facts", _PATH)
realm_facts = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(realm_facts)

NUM_STEPS = 6


def tiny_config(corpus_dir=""):
  """40 entities (160 queries, 32 held out), hidden 32, batch 8, 6 REALM steps."""
  config = realm_facts.get_config("size=tiny")
  config.data.num_entities = 40
  config.data.mentions_per_entity = 4
  config.train.batch_size = 8
  config.eval.batch_size = 8
  config.ict.batch_size = 8
  config.train.num_steps = NUM_STEPS
  config.ict.num_steps = 4
  config.retrieval.refresh_every = 3
  config.train.checkpoint_every = 3
  config.eval.every = 0
  config.retrieval.k = 4
  config.data.doc_len = 48
  config.data.query_len = 24
  config.model.hidden_size = 32
  config.model.intermediate_size = 64
  config.model.num_heads = 2
  config.data.corpus_dir = str(corpus_dir)
  return config


_WIKI_PATH = pathlib.Path(__file__).parent.parent / "experiments" / "realm_wiki.py"
_WIKI_SPEC = importlib.util.spec_from_file_location("realm_wiki", _WIKI_PATH)
realm_wiki = importlib.util.module_from_spec(_WIKI_SPEC)
_WIKI_SPEC.loader.exec_module(realm_wiki)


def tiny_wiki_config(jsonl_path, corpus_dir=""):
  """experiments/realm_wiki.py:size=tiny on a small JSONL, with the test-sized model."""
  config = realm_wiki.get_config("size=tiny")
  config.data.source = f"jsonl:{jsonl_path}"
  config.data.corpus_dir = str(corpus_dir)
  config.data.vocab_size = 400
  config.data.doc_len = 40
  config.data.query_len = 24
  config.data.num_eval_docs = 8
  for section in ("train", "eval", "ict"):
    config[section].batch_size = 8
  config.train.num_steps = 4
  config.ict.num_steps = 4
  config.retrieval.refresh_every = 2
  config.train.checkpoint_every = 2
  config.model.hidden_size = 32
  config.model.intermediate_size = 64
  config.model.num_heads = 2
  return config
