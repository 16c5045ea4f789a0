r"""REALM on the embedded "facts" corpus: the main job of `make demo`.

One file, three sizes (big_vision style):

  python -m realm_jax.main --mode=demo --config=experiments/realm_facts.py:size=tiny \
      --workdir=/tmp/realm_demo
  python -m realm_jax.main --mode=train --config=experiments/realm_facts.py:size=small \
      --config.train.batch_size=64 --workdir=...

`size=tiny` is exactly what CI and the demo run on 2 CPU cores. The `ict` block configures the
Inverse Cloze Task warm start that the demo runs first (`--config.objective=ict` trains it alone);
the `qa` block the Open-QA fine-tuning the demo runs last (`--mode=finetune_qa` with
experiments/openqa_facts.py runs it alone).

Every field's help and accepted range: `realm_jax/config_lib.py:FIELDS`, shown by
`python -m realm_jax.main --mode=print_config --config=experiments/realm_facts.py:size=tiny`.
"""

import ml_collections

from realm_jax import config_lib

# Per size: model, corpus and schedule. tiny: CPU demo/CI; small: a workstation GPU; base: paper.
_SIZES = {
    # tiny: the CPU demo and CI budget (k=4 instead of REALM's 8 to fit 2 cores; the demo,
    # QA included, took 13-14.5 min on 2 idle cores on 2026-12-04: EXPERIMENTS.md "Demo runs").
    "tiny": dict(model="tiny", num_entities=5000, vocab_size=2000, batch_size=16, k=4,
                 realm_steps=800, ict_steps=600, refresh_every=100,
                 eval_every=0),
    "small": dict(model="small", num_entities=20000, vocab_size=8000, batch_size=128, k=8,
                  realm_steps=5000, ict_steps=2000, refresh_every=250,
                  eval_every=1000),
    "base": dict(model="base", num_entities=50000, vocab_size=30522, batch_size=512, k=8,
                 realm_steps=20000, ict_steps=5000, refresh_every=500,
                 eval_every=2000),
}


# Per size: the Open-QA fine-tuning schedule and the reader's shape (the demo's QA phase and
# experiments/openqa_facts.py). tiny: 2 CPU cores.
QA_SIZES = {
    # tiny: 480 steps (was 160; measured from one demo's runs, QA EM REALM 0.335 -> 0.890,
    # ICT + baseline reader 0.525 -> 0.776: 160 steps had not taught the query towers the
    # question form), warm-up kept at the 16 steps it was measured with.
    "tiny": dict(batch_size=16, num_steps=480, warmup_steps=16, retriever_k=8, reader_k=4,
                 span_hidden_size=64, learning_rate=1e-3, eval_batch_size=32,
                 checkpoint_every=100),
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
      # Positives: "answer" (ORQA/REALM: any block whose text matches an answer) or "gold"
      # (a question's known gold block, where it has one: generated facts questions).
      supervision="answer",
      reader_k=s["reader_k"],  # blocks the reader reads (paper: 5)
      max_span_width=10,  # wordpieces (paper: 10)
      span_hidden_size=s["span_hidden_size"],  # paper: 256
      batch_size=s["batch_size"],
      num_steps=s["num_steps"],
      learning_rate=s["learning_rate"],
      warmup_steps=s.get("warmup_steps", max(1, s["num_steps"] // 10)),
      # The query tower moves slower than the reader (the lesson of REALM on this corpus: a
      # warm-started retriever at the full rate forgets its pretraining before the reader
      # can use it); 1.0 is ORQA's setting.
      query_embedder_lr_multiplier=0.1,
      checkpoint_every=s["checkpoint_every"],
      keep_checkpoints=2,
      log_every=10,
      prefetch=True,  # retrieve batch t+1 while step t runs
      # steps between two looks for a newer corpus version (--mode=update_corpus); one is
      # applied at once: the frozen index follows it (realm_jax/qa/finetune.py)
      corpus_check_every=10,
      eval_batch_size=s["eval_batch_size"],
      eval_retrieve_k=100,  # recall@1/5/20/100 depth (capped at the corpus size)
      eval_at_end=True,
      max_train_examples=0,  # 0: every training question
      max_eval_examples=0,  # 0: every dev question
  ))


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
  # No pretrained BERT here: with an ICT warm start (train.init_from, as the demo runs it) the
  # reader starts from the ICT embedder's BERT, as REALM starts both towers from one BERT.
  # Measured (tiny, 800 steps from one ICT run): held-out span accuracy 0.778 vs 0.037 with a
  # random reader (seed 1: 0.231), recall@3 0.959 vs 0.750 (EXPERIMENTS.md).
  config.train.init_encoder_from_embedder = True
  # The demo's QA phase (and experiments/openqa_facts.py): fine-tuning on questions generated
  # from the facts, starting from this config's REALM (or no-retrieval) run.
  config.qa = qa_section(QA_SIZES[size], config.data.query_len)
  # Generated questions know their person's profile: it is the only positive. Under ORQA's
  # answer matching an instrument or occupation answer also matches other people's profiles
  # and news blocks, and the query tower could settle on those: REALM QA EM 0.960 / 0.804 /
  # 0.590 over seeds 0-2 from one checkpoint, 0.973 / 0.966 / 0.970 with the gold block
  # (EXPERIMENTS.md, "Open-QA supervision").
  config.qa.supervision = "gold"
  return config
