r"""ICT warm start of the retriever on Wikipedia blocks: experiments/realm_wiki.py, objective ict.

  python -m realm_jax.main --mode=train --config=experiments/ict_wiki.py:size=tiny \
      --workdir=/tmp/ict_wiki
Held-out sentences (one per evaluation block, removed from it) are the pseudo-queries of the
recall it reports; `--mode=eval_retrieval` compares that recall with BM25.
"""

import importlib.util
import os

import ml_collections

_SPEC = importlib.util.spec_from_file_location(
    "realm_wiki", os.path.join(os.path.dirname(os.path.abspath(__file__)), "realm_wiki.py"))
realm_wiki = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(realm_wiki)


def get_config(arg: str = "size=tiny") -> ml_collections.ConfigDict:
  config = realm_wiki.get_config(arg)
  config.objective = "ict"
  return config
