r"""REALM on the embedded "facts" corpus: the main job of `make demo`.

One file, three sizes (big_vision style):

  python -m realm_jax.main --mode=demo --config=experiments/realm_facts.py:size=tiny \
      --workdir=/tmp/realm_demo
  python -m realm_jax.main --mode=train --config=experiments/realm_facts.py:size=small \
      --config.train.batch_size=64 --workdir=...

`size=tiny` is exactly what CI and the demo run on 2 CPU cores. The `ict` block configures the
Inverse Cloze Task warm start that the demo runs first (`--config.objective=ict` trains it alone).
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

  config.retrieval = ml_collections.ConfigDict(dict(
      enabled=True,  # False: null document only (the no-retrieval baseline)
      k=s["k"],  # candidates per query, counting the null document in slot 0
      margin=2,  # over-retrieve this many extra ids to survive dropping the source doc
      refresh_every=s["refresh_every"],  # re-embed the corpus every this many steps
      embed_batch_size=256,  # documents per embedding call during a refresh
      keep_index_versions=3,
      # "trainer": re-embed in-process every refresh_every steps (synchronous, small corpora);
      # "builder": a separate `--mode=index_builder` job publishes versions, the trainer swaps.
      index_source="trainer",
      searcher="exact",  # "exact" (matmul + top-k) or "scann" (for builder-published versions)
      first_index_timeout=900.0,  # seconds the trainer waits for the builder's first version
      watch_poll_seconds=1.0,  # how often the trainer looks for a new version
      builder_poll_seconds=5.0,  # how often the index builder looks for a new checkpoint
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
      checkpoint_every=250 if size == "tiny" else 1000,
      keep_checkpoints=3,
      init_from="",  # a workdir (or its checkpoints/) whose embedder(s) warm-start this run
      init_encoder_from="",  # a workdir whose knowledge-augmented encoder (reader) starts this run
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
  return config
