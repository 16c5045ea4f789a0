r"""REALM on the embedded "facts" corpus: the main job of `make demo`.

One file, three sizes (big_vision style):

  python -m realm_jax.main --mode=demo --config=experiments/realm_facts.py:size=tiny \
      --workdir=/tmp/realm_demo
  python -m realm_jax.main --mode=train --config=experiments/realm_facts.py:size=small \
      --config.train.batch_size=64 --workdir=...

`size=tiny` is exactly what CI and the demo run on 2 CPU cores. The `ict` block configures the
Inverse Cloze Task warm start that the demo runs first (`--config.objective=ict` trains it alone).

Every field's help and accepted range: `realm_jax/config_lib.py:FIELDS`, shown by
`python -m realm_jax.main --mode=print_config --config=experiments/realm_facts.py:size=tiny`.
"""

import ml_collections

from realm_jax import config_lib

# Per size: model, corpus and schedule. tiny: CPU demo/CI; small: a workstation GPU; base: paper.
_SIZES = {
    # tiny: the CPU demo and CI budget (k=4 instead of REALM's 8 to fit 2 cores in ~10 min).
    "tiny": dict(model="tiny", num_entities=5000, vocab_size=2000, batch_size=16, k=4,
                 realm_steps=1000, ict_steps=800, refresh_every=100,
                 eval_every=0),
    "small": dict(model="small", num_entities=20000, vocab_size=8000, batch_size=128, k=8,
                  realm_steps=5000, ict_steps=2000, refresh_every=250,
                  eval_every=1000),
    "base": dict(model="base", num_entities=50000, vocab_size=30522, batch_size=512, k=8,
                 realm_steps=20000, ict_steps=5000, refresh_every=500,
                 eval_every=2000),
}


def get_config(arg: str = "size=tiny") -> ml_collections.ConfigDict:
  args = config_lib.parse_arg(arg, size="tiny")
  size = config_lib.check_choice("size", args.size, _SIZES)
  s = _SIZES[size]

  config = ml_collections.ConfigDict()
  config.objective = "realm"  # "realm" (marginal MLM over retrieved docs) or "ict"
  config.seed = 0

  config.model = config_lib.model_config(s["model"])
  # Every facts run starts from a random init, where the pooler's extra tanh layer slows the
  # ICT warm start (measured at tiny: recall@3 0.06 vs 0.19 after 30 steps; models/embedder.py).
  config.model.embedder_pooler = False

  config.data = ml_collections.ConfigDict(dict(
      corpus="facts",  # the generated corpus; written to <workdir>/corpus unless corpus_dir
      corpus_dir="",
      num_entities=s["num_entities"],
      # Mention docs (each one query) per entity; fewer means fewer same-name documents
      # competing with the gold profile.
      mentions_per_entity=1,
      corpus_seed=0,
      vocab_size=s["vocab_size"],  # WordPiece vocab trained on the corpus
      vocab_file="",  # or a BERT vocab.txt to load instead of training one
      doc_len=48,  # [CLS] title [SEP] body [SEP] wordpieces (facts profiles: <= 46)
      query_len=16,  # [CLS] sentence [SEP] wordpieces (facts queries: <= 13)
      max_masked=10,  # salient span length cap (wordpieces)
      masking="salient",  # "salient" (the attribute value) or "random" (BERT 15% ablation)
  ))

  config_lib.add_training_sections(config, s, size)
  return config
