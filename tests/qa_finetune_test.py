"""realm_jax.qa.finetune end to end on a tiny facts corpus: a short REALM run to start from,
fine-tuning with a resume, evaluation, and bad input."""

import importlib.util
import json
import pathlib

import numpy as np
import pytest

import tiny_configs
from realm_jax import config_lib
from realm_jax.data import corpus as corpus_lib
from realm_jax.qa import fields
from realm_jax.qa import finetune
from realm_jax.retrieval import index_format
from realm_jax.train import loop

_PATH = pathlib.Path(__file__).parent.parent / "experiments" / "openqa_facts.py"
_SPEC = importlib.util.spec_from_file_location("openqa_facts", _PATH)
openqa_facts = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(openqa_facts)

QA_STEPS = 8


def small_config(corpus_dir=""):
  """tests/tiny_configs.py's config with one layer per tower (compiles faster)."""
  config = tiny_configs.tiny_config(corpus_dir)
  config.model.num_layers = 1
  return config


def qa_config(init_from, corpus_dir=""):
  """The test model with the facts QA section."""
  config = small_config(corpus_dir)
  config.qa = openqa_facts.qa_section(openqa_facts._QA_SIZES["tiny"], config.data.query_len)
  qa = config.qa
  qa.init_from = str(init_from)
  qa.init_reader_from = str(init_from)
  qa.batch_size = 8
  qa.eval_batch_size = 16
  qa.num_steps = QA_STEPS
  qa.warmup_steps = 1
  # The start is untrained (random retriever): a deep top-K so the retriever's loss has
  # answer blocks to learn from, the same 8 questions every step so its decrease is visible.
  qa.retriever_k = 48
  qa.reader_k = 4
  qa.max_train_examples = 8
  qa.span_hidden_size = 16
  qa.checkpoint_every = 4
  qa.log_every = 4
  qa.query_embedder_lr_multiplier = 1.0
  qa.eval_retrieve_k = 20
  return config


@pytest.fixture(scope="module")
def realm_dir(tmp_path_factory):
  """The fastest pretraining workdir: an ICT run of 0 steps (the tiny config's step-0
  checkpoint, its corpus, and the index it publishes at the end). Its encoder is the
  untrained one, copied into the reader by `qa.init_reader_from` in the tests below; the
  REALM remap itself is checked without a run in test_warm_start_remap."""
  workdir = tmp_path_factory.mktemp("ict")
  config = small_config()
  config.objective = "ict"
  config.ict.num_steps = 0
  loop.train_and_evaluate(config, workdir)
  return workdir


def test_finetune_resume_and_evaluate(realm_dir, tmp_path):
  config = qa_config(realm_dir)
  config.qa.prefetch = False  # strictly sequential: a resume repeats the losses exactly
  workdir = tmp_path / "qa"
  first = finetune.finetune_qa(config, workdir, max_steps_this_run=5)
  assert first["step"] == 5 and "exact_match" not in first  # stopped early: no evaluation
  assert first["index"]["source"] == "init_from"  # the run's own published index, frozen
  assert first["index"]["root"] == str(realm_dir / "index")
  second = finetune.finetune_qa(config, workdir)  # resumes from the step-5 checkpoint
  assert second["step"] == QA_STEPS
  assert [h["step"] for h in second["history"]] == list(range(6, QA_STEPS + 1))
  history = first["history"] + second["history"]
  assert all(np.isfinite(h["loss"]) and np.isfinite(h["grad_norm"]) for h in history)
  # The total loss switches its reader part on and off as answer blocks enter and leave the
  # top reader_k; the retriever's loss over the same 8 questions is what must fall.
  retriever = [h["retriever_loss"] for h in history]
  assert np.mean(retriever[-3:]) < np.mean(retriever[:3]), retriever
  # The same run without the interruption gives the same losses (the compiled step is reused).
  config.qa.eval_at_end = False
  straight = finetune.finetune_qa(config, tmp_path / "straight")
  np.testing.assert_allclose([h["loss"] for h in straight["history"]],
                             [h["loss"] for h in history], rtol=1e-5)
  assert second["history"][-1]["answer_cache_hits"] > 0  # matching reused across steps
  assert 0.0 <= second["exact_match"] <= 1.0
  assert second["num_examples"] == 32  # 8 held-out entities x 4 facts
  assert "recall@1" in second and "recall@5" in second and "recall@20" in second

  result = finetune.evaluate_qa(config, workdir)
  assert result["step"] == QA_STEPS and result["split"] == "dev"
  assert 0.0 <= result["exact_match"] <= 1.0
  assert result["num_correct"] == round(result["exact_match"] * result["num_examples"])
  assert result["exact_match"] == pytest.approx(second["exact_match"])  # same params, index
  assert 0.0 <= result["recall@1"] <= result["recall@5"] <= result["recall@20"] <= 1.0
  # Facts questions know their gold profile, which states the answer: found implies recalled.
  for k in (1, 5, 20):
    assert 0.0 <= result[f"gold_recall@{k}"] <= result[f"recall@{k}"]
  assert result["gold_recall@1"] <= result["gold_recall@5"] <= result["gold_recall@20"]
  lines = (workdir / "predictions.jsonl").read_text().splitlines()
  assert len(lines) == 32
  first_prediction = json.loads(lines[0])
  assert set(first_prediction) >= {"question", "prediction", "score", "block_id",
                                   "block_title"}
  saved = json.loads((workdir / "qa_results.json").read_text())
  assert saved["exact_match"] == result["exact_match"] and saved["index"]["step"] == 0
  records = [json.loads(l) for l in (workdir / "metrics" / "metrics.jsonl").read_text()
             .splitlines()]
  train_steps = [r["step"] for r in records if r["phase"] == "qa"]
  assert train_steps == list(range(1, QA_STEPS + 1))  # each step logged once across the resume


def test_startup_index_when_the_init_run_has_none(realm_dir, tmp_path):
  """No index to reuse (here: an empty index_from is refused; init_from without index/ embeds
  at start-up, records it, and a resume reads that record)."""
  fake_init = tmp_path / "no_index_run"
  fake_init.mkdir()
  (fake_init / "checkpoints").symlink_to(realm_dir / "checkpoints")
  config = qa_config(fake_init, corpus_dir=str(realm_dir / "corpus"))
  out = finetune.finetune_qa(config, tmp_path / "qa", max_steps_this_run=1)
  assert out["step"] == 1 and out["index"]["source"] == "startup"
  assert index_format.list_versions(tmp_path / "qa" / "index") == [0]
  record = json.loads((tmp_path / "qa" / finetune.INDEX_RECORD).read_text())
  assert record["step"] == 0 and record["source"] == "startup"


def test_bad_input_is_a_clear_error(realm_dir, tmp_path):
  # 0 usable questions.
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"question": "", "answer": ["x"]}\nnot json\n{"question": "q"}\n')
  config = qa_config(realm_dir)
  config.qa.dataset = "nq"
  config.qa.train_file = str(bad)
  with pytest.raises(ValueError, match="No usable question"):
    finetune.finetune_qa(config, tmp_path / "zero")

  # An index whose dimension is not the model's.
  index_root = tmp_path / "wrong_index"
  num_docs = json.loads((realm_dir / "corpus" / "blocks" / "corpus.json").read_text())[
      "num_docs"]
  index_format.publish_index(index_root, 0, [(np.ones((num_docs, 7), np.float32),
                                              np.arange(num_docs))])
  config = qa_config(realm_dir)
  config.qa.index_from = str(index_root)
  with pytest.raises(ValueError, match=r"qa.index_from.*dim 7 != model's 128"):
    finetune.finetune_qa(config, tmp_path / "dim")

  # An index of another corpus (doc count).
  other_root = tmp_path / "other_corpus"
  index_format.publish_index(other_root, 0, [(np.ones((num_docs + 3, 128), np.float32),
                                              np.arange(num_docs + 3))])
  config.qa.index_from = str(other_root)
  with pytest.raises(ValueError, match=f"{num_docs + 3} docs != corpus's {num_docs}"):
    finetune.finetune_qa(config, tmp_path / "docs")

  # An index of another corpus with as many blocks: only the fingerprint tells them apart.
  ours = corpus_lib.load_block_corpus(realm_dir / "corpus" / "blocks").fingerprint
  assert ours and ours.startswith("sha256:")
  same_count = tmp_path / "same_count_corpus"
  index_format.publish_index(same_count, 0, [(np.ones((num_docs, 128), np.float32),
                                              np.arange(num_docs))],
                             extra={index_format.CORPUS_FINGERPRINT: "sha256:corpus-b"})
  config.qa.index_from = str(same_count)
  with pytest.raises(ValueError, match=rf"qa.index_from.*another corpus.*sha256:corpus-b.*"
                                       rf"{ours}"):
    finetune.finetune_qa(config, tmp_path / "fingerprint")


def test_validate_qa_names_the_field(realm_dir):
  config = qa_config(realm_dir)
  fields.validate_qa(config, 8)
  config.qa.reader_k = 49
  with pytest.raises(config_lib.ConfigError, match="qa.reader_k=49 > qa.retriever_k=48"):
    fields.validate_qa(config, 8)
  config = qa_config(realm_dir)
  config.qa.batch_size = 12
  with pytest.raises(config_lib.ConfigError, match="qa.batch_size=12 is not divisible by the 8"):
    fields.validate_qa(config, 8)
  config = qa_config(realm_dir)
  config.qa.dataset = "squad"
  with pytest.raises(config_lib.ConfigError, match="qa.dataset='squad'"):
    fields.validate_qa(config, 8)
  config = qa_config(realm_dir)
  config.qa.init_from = "/nonexistent/run"
  with pytest.raises(config_lib.ConfigError, match="qa.init_from='/nonexistent/run' does not"):
    fields.validate_qa(config, 8)
  config = qa_config(realm_dir)
  config.qa.dataset = "wq"
  with pytest.raises(config_lib.ConfigError, match="needs qa.train_file"):
    fields.validate_qa(config, 8)
  # Every numeric qa leaf of the experiment configs has a QA_FIELDS entry.
  for name, value in config_lib.leaves(openqa_facts.get_config("size=tiny").qa, "qa."):
    assert name in fields.QA_FIELDS, name


def test_warm_start_remap():
  """REALM's embedder -> query_embedder and encoder/bert -> reader/bert; shapes checked."""
  leaf = lambda *shape: np.zeros(shape, np.float32)
  params = {"query_embedder": {"bert": {"w": leaf(2, 3)}, "projection": {"kernel": leaf(3, 4)}},
            "reader": {"bert": {"w": leaf(2, 3)}, "qa_outputs": {"kernel": leaf(3, 1)}}}
  source = {"embedder": {"bert": {"w": leaf(2, 3) + 1}, "projection": {"kernel": leaf(3, 4) + 2}},
            "encoder": {"bert": {"w": leaf(2, 3) + 3}, "cls": {"bias": leaf(5)}}}
  out, copied = finetune.warm_start_qa(params, source, "realm", copy_reader=True)
  assert (out["query_embedder"]["bert"]["w"] == 1).all()
  assert (out["query_embedder"]["projection"]["kernel"] == 2).all()
  assert (out["reader"]["bert"]["w"] == 3).all()
  assert (out["reader"]["qa_outputs"]["kernel"] == 0).all()  # the span head stays new
  assert len(copied) == 2
  ict_out, copied = finetune.warm_start_qa(params, source, "ict", copy_reader=False)
  assert (ict_out["reader"]["bert"]["w"] == 0).all() and len(copied) == 1
  source["embedder"]["bert"]["w"] = leaf(2, 5)
  with pytest.raises(ValueError, match="realm: its embedder parameters do not fit"):
    finetune.warm_start_qa(params, source, "realm", copy_reader=True)
  with pytest.raises(ValueError, match="no embedder or query_embedder"):
    finetune.warm_start_qa(params, {"encoder": {}}, "other", copy_reader=True)


def test_bm25_top_ids_find_the_named_entity_profile(realm_dir):
  """A facts question names its entity ("Where was <full name> born?"); BM25 over the blocks'
  text must rank that entity's profile block near the top for (nearly) every question."""
  config = qa_config(realm_dir)
  config.qa.retriever = "bm25"
  world = finetune.setup(config, realm_dir / "bm25_probe")
  examples = world.dev
  bm25 = world.bm25()
  ids = bm25.top_ids(examples, 5)
  assert ids.shape == (len(examples), 5)
  gold = np.array([e.gold_doc_id for e in examples])
  assert (gold >= 0).all()
  found = (ids == gold[:, None]).any(axis=1)
  assert found.mean() >= 0.9, (found.mean(), [e.question for e, f in zip(examples, found)
                                              if not f][:3])
  # Cached: asking again searches nothing; a shallower request is a slice.
  searched = bm25.searched
  np.testing.assert_array_equal(bm25.top_ids(examples, 3), ids[:, :3])
  assert bm25.searched == searched and bm25 is world.bm25()


def test_bm25_reader_finetunes_and_evaluates(realm_dir, tmp_path):
  """qa.retriever=bm25: the reader alone trains on BM25's blocks (no retriever loss, no index
  published or recorded) and evaluate_qa reproduces the end-of-run evaluation."""
  config = qa_config(realm_dir)
  config.qa.retriever = "bm25"
  config.qa.num_steps = 4
  config.qa.checkpoint_every = 4
  workdir = tmp_path / "bm25"
  out = finetune.finetune_qa(config, workdir)
  assert out["step"] == 4 and out["retriever"] == "bm25" and out["index"]["source"] == "bm25"
  history = out["history"]
  assert all(h["retriever_loss"] == 0.0 and h["retriever_answerable"] == 0.0 for h in history)
  assert all(np.isfinite(h["reader_loss"]) for h in history)
  # BM25 finds the profile block, so the reader's loss has answers to learn from.
  assert max(h["reader_answerable"] for h in history) > 0.5
  assert not (workdir / finetune.INDEX_RECORD).exists() and not (workdir / "index").exists()
  assert out["num_examples"] == 32 and 0.0 <= out["exact_match"] <= 1.0
  assert out["recall@5"] >= 0.9  # the profile states every attribute
  result = finetune.evaluate_qa(config, workdir)
  assert result["retriever"] == "bm25" and result["step"] == 4
  assert result["exact_match"] == pytest.approx(out["exact_match"])
  assert result["recall@5"] == pytest.approx(out["recall@5"])
  saved = json.loads((workdir / "qa_results.json").read_text())
  assert saved["retriever"] == "bm25"


def _write_regex_files(config, tmp_path):
  """The facts questions as CuratedTREC-style JSONL (answers are regular expressions), plus a
  line whose pattern does not compile."""
  import re  # pylint: disable=g-import-not-at-top
  from realm_jax.data import facts_corpus  # pylint: disable=g-import-not-at-top
  from realm_jax.qa import data  # pylint: disable=g-import-not-at-top
  d = config.data
  facts = facts_corpus.generate_facts_corpus(d.num_entities, d.corpus_seed,
                                             mentions_per_entity=d.mentions_per_entity)
  paths = {}
  for split, name in (("train", "train"), ("eval", "dev")):
    lines = [json.dumps({"question": e.question,
                         "answer": [f"(the )?{re.escape(e.answers[0])}( player)?"]})
             for e in data.facts_questions(facts, split)]
    if split == "train":
      lines.insert(1, json.dumps({"question": "Who?", "answer": ["(unclosed"]}))
    paths[name] = tmp_path / f"{name}.jsonl"
    paths[name].write_text("\n".join(lines) + "\n")
  return paths


def test_regex_answers_finetune_end_to_end(realm_dir, tmp_path, caplog):
  """qa.dataset=trec over the facts corpus: regex answers give the reader training spans; the
  line with a bad pattern is counted and skipped, the run goes on."""
  config = qa_config(realm_dir)
  paths = _write_regex_files(config, tmp_path)
  config.qa.dataset = "trec"
  config.qa.train_file, config.qa.dev_file = str(paths["train"]), str(paths["dev"])
  config.qa.retriever = "bm25"
  config.qa.num_steps = 2
  config.qa.max_train_examples = 16
  with caplog.at_level("WARNING"):
    out = finetune.finetune_qa(config, tmp_path / "trec")
  assert "bad_regex: 1 (first at line 2)" in caplog.text
  assert max(h["reader_answerable"] for h in out["history"]) > 0.5  # regex spans found
  assert out["num_examples"] == 32 and out["recall@5"] >= 0.9
  assert out["bad_answer_patterns"] == 0  # the reader already dropped the bad line


def test_bad_input_end_to_end(realm_dir, tmp_path):
  """The issue's bad-input list through finetune_qa / evaluate_qa: each a clear error."""
  config = qa_config(realm_dir)
  config.qa.dataset = "squad"
  with pytest.raises(config_lib.ConfigError, match="qa.dataset='squad' must be one of"):
    finetune.finetune_qa(config, tmp_path / "dataset")
  config = qa_config(realm_dir)
  config.qa.retriever = "tfidf"
  with pytest.raises(config_lib.ConfigError, match="qa.retriever='tfidf'"):
    finetune.finetune_qa(config, tmp_path / "retriever")
  for reason, line in (("missing_answer", '{"question": "Who?"}'),
                       ("empty_question", '{"question": "  ", "answer": ["x"]}')):
    bad = tmp_path / f"{reason}.jsonl"
    bad.write_text(line + "\n")
    config = qa_config(realm_dir)
    config.qa.dataset, config.qa.train_file = "nq", str(bad)
    with pytest.raises(ValueError, match=f"No usable question.*{reason}: 1"):
      finetune.finetune_qa(config, tmp_path / reason)
  bad = tmp_path / "bad_regex.jsonl"
  bad.write_text('{"question": "Who?", "answer": ["(unclosed"]}\n')
  config = qa_config(realm_dir)
  config.qa.dataset, config.qa.train_file = "trec", str(bad)
  with pytest.raises(ValueError, match="No usable question.*bad_regex: 1"):
    finetune.finetune_qa(config, tmp_path / "regex")
  # 0 examples to evaluate: a test file with no usable line (facts has no test split).
  config = qa_config(realm_dir)
  config.qa.eval_split, config.qa.test_file = "test", str(bad)
  with pytest.raises(config_lib.ConfigError, match="set qa.dataset to nq, wq or trec"):
    finetune.evaluate_qa(config, tmp_path / "eval")
  good = tmp_path / "good.jsonl"
  good.write_text("".join(json.dumps({"question": f"Question {i}?", "answer": ["x"]}) + "\n"
                          for i in range(40)))
  config.qa.dataset, config.qa.train_file = "trec", str(good)
  with pytest.raises(ValueError, match="No usable question.*bad_regex: 1"):
    finetune.evaluate_qa(config, tmp_path / "eval")
  with pytest.raises(ValueError, match="0 questions"):
    finetune.evaluate_examples(finetune.setup(qa_config(realm_dir), tmp_path / "e"), {}, None,
                               [])
  # The data split helper and the experiment config refuse unknown names too.
  with pytest.raises(config_lib.ConfigError, match="dataset='squad'"):
    _load_openqa().get_config("size=tiny,dataset=squad")
  with pytest.raises(config_lib.ConfigError, match="retriever='tfidf'"):
    openqa_facts.get_config("size=tiny,retriever=tfidf")


def test_openqa_minilm_init_fine_tunes_at_berts_rate_not_the_from_scratch_rate():
  openqa = _load_openqa()
  scratch = openqa.get_config("size=tiny,dataset=trec")
  minilm = openqa.get_config("size=tiny,dataset=trec,init=minilm")
  assert scratch.qa.learning_rate == 1e-3
  assert minilm.qa.learning_rate == openqa.MINILM_QA_LEARNING_RATE == 5e-5
  # A size whose own rate is already lower keeps it.
  assert openqa.get_config("size=base,init=minilm").qa.learning_rate == 1e-5


def _load_openqa():
  spec = importlib.util.spec_from_file_location("openqa", _PATH.parent / "openqa.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module
