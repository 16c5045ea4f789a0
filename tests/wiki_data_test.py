"""Wikipedia data end to end: held-out sentences, masked-span queries, ICT and REALM runs on the
blocks, dense vs BM25 retrieval recall, sharded builds; and the real 10k-passage sample."""

import json
import pathlib

import numpy as np
import pytest

from realm_jax import main as main_lib
from realm_jax.data import corpus as corpus_lib
from realm_jax.data import pipeline
from realm_jax.data import prepare
from realm_jax.retrieval import evaluation
from realm_jax.train import loop
from tiny_configs import tiny_wiki_config  # pylint: disable=g-bad-import-order

SAMPLE = pathlib.Path(__file__).parent.parent.parent / "shared" / "data" / "wiki_sample" / \
    "passages.jsonl"
_NAMES = ["Zorbal", "Quentix", "Marwood", "Feldane", "Ostrava", "Pellucid", "Kandor", "Vintry",
          "Alderic", "Brumley", "Cassowen", "Dunmere", "Evering", "Fallowby", "Grisdale",
          "Harrowgate", "Ilverton", "Jessamy", "Kestrel", "Lowther", "Merrow", "Nantwell",
          "Orrery", "Pimbury", "Quarley", "Rostherne", "Selwick", "Tarrant", "Ulverby",
          "Vexmoor", "Wendle", "Yarrowby"]
_TOPICS = ["river", "castle", "novel", "painter", "mountain", "battle", "composer", "island"]


def write_articles(path: pathlib.Path) -> None:
  """32 articles of 4 sentences; every sentence names its article's subject (a rare word)."""
  rng = np.random.default_rng(0)
  with path.open("w") as f:
    for i, name in enumerate(_NAMES):
      topic = _TOPICS[i % len(_TOPICS)]
      years = rng.integers(1200, 1990, size=4)
      sentences = [
          f"{name} is a {topic} in the region of {_NAMES[(i + 3) % 32]} Valley.",
          f"The {topic} {name} was first described in {years[0]} by Ada {_NAMES[(i + 5) % 32]}.",
          f"In {years[1]} the people of {name} built a bridge over the water.",
          f"{name} became famous in {years[2]} when Tom {_NAMES[(i + 7) % 32]} visited it.",
      ]
      f.write(json.dumps({"title": name, "text": " ".join(sentences)}) + "\n")


@pytest.fixture(scope="module")
def wiki(tmp_path_factory):
  root = tmp_path_factory.mktemp("wiki")
  write_articles(root / "articles.jsonl")
  config = tiny_wiki_config(root / "articles.jsonl", root / "corpus")
  return config, prepare.prepare_data(config, None), root


def test_heldout_sentences_leave_their_blocks(wiki):
  _, data, _ = wiki
  corpus, special = data.corpus, data.corpus.special
  held = set(data.heldout_doc_ids.tolist())
  assert len(held) == 8
  with np.load(data.directory / "heldout.npz") as f:
    pairs = list(zip(f["doc_ids"].tolist(), f["sentences"].tolist()))
  for doc_id in range(corpus.num_docs):
    sentences = corpus.sentence_ids(doc_id)
    first = int(corpus.doc_sentence_offsets[doc_id])
    removed = {s for d, s in pairs if d == doc_id}
    body = np.concatenate([s for i, s in enumerate(sentences) if first + i not in removed])
    tokens, segments = corpus_lib.pack_block(corpus.title_ids(doc_id), body, corpus.doc_len,
                                             special)
    np.testing.assert_array_equal(corpus.retriever_tokens[doc_id], tokens, err_msg=str(doc_id))
    np.testing.assert_array_equal(corpus.retriever_segments[doc_id], segments)
    reader = np.append(body[:corpus.body_len - 1], special.sep)
    np.testing.assert_array_equal(corpus.reader_tokens[doc_id, :len(reader)], reader)
    assert corpus.reader_lengths[doc_id] == len(reader)
    assert (doc_id in held) == bool(removed)
  # corpus.json's fingerprint is of the rows as they are now (after the rewrite), which is
  # what an index built from them records.
  assert corpus.fingerprint == corpus_lib.fingerprint(corpus)


def test_queries_mask_stored_spans_and_keep_heldout_apart(wiki):
  config, data, _ = wiki
  corpus, held = data.corpus, set(data.heldout_doc_ids.tolist())
  evaluation_q, ict = data.eval_queries, data.ict_eval_queries
  assert len(data.train_span_ids) > 50 and len(evaluation_q["query_tokens"]) >= 8
  source = data.train_source(config.data, 16, seed=0)
  train = {k: np.concatenate([source.batch_at(step)[k] for step in range(source.steps_per_epoch)])
           for k in ("query_tokens", "masked_positions", "masked_labels", "masked_weights",
                     "source_ids", "gold_ids")}
  assert not held & set(train["source_ids"].tolist())
  assert (train["gold_ids"] == -1).all()
  assert set(evaluation_q["gold_ids"].tolist()) <= held and (evaluation_q["source_ids"] == -1).all()
  assert sorted(ict["gold_ids"].tolist()) == sorted(held)
  mask_id = corpus.special.mask
  for row in range(0, len(train["query_tokens"]), 7):
    weights = train["masked_weights"][row] > 0
    positions = train["masked_positions"][row][weights]
    assert (train["query_tokens"][row][positions] == mask_id).all()
    # The masked labels are wordpieces of a sentence of the source block.
    sentences = corpus.sentence_ids(int(train["source_ids"][row]))
    labels = train["masked_labels"][row][weights].tolist()
    assert any(labels == s[i:i + len(labels)].tolist()
               for s in sentences for i in range(len(s))), row
  # ICT eval queries are whole held-out sentences: not in any block any more.
  with np.load(data.directory / "heldout.npz") as f:
    for doc_id, sentence in zip(f["doc_ids"], f["sentences"]):
      ids = corpus.sentence_token_ids[corpus.sentence_offsets[sentence]:
                                      corpus.sentence_offsets[sentence + 1]]
      row = ict["query_tokens"][list(ict["gold_ids"]).index(doc_id)]
      np.testing.assert_array_equal(row[1:1 + len(ids)], ids[:row.size - 2])


def _contains(row: np.ndarray, ids: np.ndarray) -> bool:
  return any((row[i:i + len(ids)] == ids).all() for i in range(len(row) - len(ids) + 1))


@pytest.mark.parametrize("masking", ["salient", "random"])
def test_span_query_source_is_a_function_of_step_split_over_processes(wiki, masking):
  config, data, _ = wiki
  make = lambda index, count: pipeline.SpanQuerySource(
      data.corpus, data.salient_spans, data.train_span_ids, 8, 3, config.data.query_len,
      config.data.max_masked, masking, index, count)
  whole, halves = make(0, 1), [make(0, 2), make(1, 2)]
  for step in (0, 5):
    batch = whole.batch_at(step)
    assert batch["query_tokens"].shape == (8, config.data.query_len)
    for key, value in batch.items():
      np.testing.assert_array_equal(value, make(0, 1).batch_at(step)[key], err_msg=key)
      np.testing.assert_array_equal(
          value, np.concatenate([h.batch_at(step)[key] for h in halves]), err_msg=key)
    masked = batch["masked_weights"] > 0
    assert masked.any(axis=1).all() and (batch["masked_labels"][masked] > 4).all()
  assert not np.array_equal(whole.batch_at(0)["query_tokens"], whole.batch_at(1)["query_tokens"])


def test_ict_never_sees_heldout_sentences(wiki):
  """ICT trains on the evaluation blocks too, but never on their held-out sentences."""
  config, data, _ = wiki
  corpus = data.corpus
  source = pipeline.IctBatchSource(corpus, 8, 0, config.data.query_len,
                                   exclude_sentences=data.heldout_sentences)
  offsets = corpus.sentence_offsets
  held = {int(d): np.asarray(corpus.sentence_token_ids[offsets[s]:offsets[s + 1]])
          for d, s in zip(data.heldout_doc_ids, data.heldout_sentences)}
  seen_heldout_docs = 0
  for step in range(40):
    batch = source.batch_at(step)
    for row, doc_id in enumerate(batch["doc_ids"].tolist()):
      if doc_id in held:
        seen_heldout_docs += 1
        sentence = held[doc_id][:8]
        assert not _contains(batch["query_tokens"][row], sentence)
        assert not _contains(batch["doc_tokens"][row], sentence)
  assert seen_heldout_docs > 0, "evaluation blocks should still train ICT"
  unfiltered = pipeline.IctBatchSource(corpus, 8, 0, config.data.query_len)
  assert any(_contains(batch["query_tokens"][row], held[d][:8])
             for batch in map(unfiltered.batch_at, range(40))
             for row, d in enumerate(batch["doc_ids"].tolist()) if d in held), \
      "without the exclusion held-out sentences do appear (the check above can fail)"


@pytest.fixture(scope="module")
def ict_run(wiki):
  config, _, root = wiki
  config = config.copy_and_resolve_references()
  config.objective = "ict"
  result = loop.train_and_evaluate(config, root / "ict")
  return config, result, root / "ict"


def test_ict_then_realm_train_on_wiki_blocks(wiki, ict_run):
  config, _, root = wiki
  _, ict_result, ict_dir = ict_run
  assert all(np.isfinite(h["loss"]) for h in ict_result["history"])
  assert 0.0 <= ict_result["gold_recall_at_3"] <= 1.0
  realm = config.copy_and_resolve_references()
  realm.train.init_from = str(ict_dir)
  result = loop.train_and_evaluate(realm, root / "realm")
  assert [h["step"] for h in result["history"]] == [1, 2, 3, 4]
  assert all(np.isfinite(h["loss"]) for h in result["history"])
  assert 0.0 <= result["span_accuracy"] <= 1.0 and "gold_recall_at_3" in result


def test_retrieval_eval_dense_and_bm25(ict_run):
  config, _, ict_dir = ict_run
  result = evaluation.evaluate_retrieval(config, ict_dir, ks=(1, 5, 20))
  assert result["num_queries"] == 8 and result["checkpoint_step"] == 4
  for name in ("dense", "bm25"):
    values = [result[name][f"recall@{k}"] for k in (1, 5, 20)]
    assert values == sorted(values) and 0.0 <= values[0] and values[-1] <= 1.0, name
  # Every held-out sentence names its article's subject, a word only that article's two
  # blocks contain: BM25 must rank the gold block in its top 5 (of 64 blocks) nearly always;
  # a wrong id mapping or decode would find it ~8% of the time.
  assert result["num_blocks"] == 64
  assert result["bm25"]["recall@5"] >= 0.875, result
  assert json.loads((ict_dir / "retrieval_eval.json").read_text())["bm25"] == result["bm25"]


def test_recall_at_ks_matches_a_hand_count():
  top = np.array([[3, 1, 2], [0, 5, 4], [7, 8, 9]])
  assert evaluation.recall_at_ks(top, np.array([1, 0, 6]), (1, 2, 3)) == {
      "recall@1": 1 / 3, "recall@2": 2 / 3, "recall@3": 2 / 3}


def test_sharded_build_corpus_equals_one_process(wiki, tmp_path):
  config, data, root = wiki
  sharded = config.copy_and_resolve_references()
  sharded.data.corpus_dir = str(tmp_path / "corpus")
  sharded.data.num_build_shards = 3
  sharded.data.vocab_file = str(data.directory / "vocab.txt")
  single = config.copy_and_resolve_references()
  single.data.corpus_dir = str(tmp_path / "single")
  single.data.vocab_file = sharded.data.vocab_file
  for shard in (2, 0, 1):
    main_lib._build_corpus(sharded, str(tmp_path), shard)  # pylint: disable=protected-access
  assert not (tmp_path / "corpus" / "build_config.json").exists()
  main_lib._build_corpus(sharded, str(tmp_path), -1)  # pylint: disable=protected-access
  a = prepare.prepare_data(sharded, None, build=False)
  b = prepare.prepare_data(single, None)
  for name in ("retriever_tokens", "reader_tokens", "sentence_token_ids"):
    np.testing.assert_array_equal(getattr(a.corpus, name), getattr(b.corpus, name), err_msg=name)
  np.testing.assert_array_equal(a.train_span_ids, b.train_span_ids)
  for key in b.eval_queries:
    np.testing.assert_array_equal(a.eval_queries[key], b.eval_queries[key], err_msg=key)


@pytest.mark.skipif(not SAMPLE.exists(), reason=f"real Wikipedia sample not found at {SAMPLE}")
def test_real_wiki_sample_prepares(tmp_path):
  config = tiny_wiki_config(SAMPLE, tmp_path / "corpus")
  config.data.limit = 400
  config.data.vocab_size = 2000
  config.data.doc_len = 128
  config.data.query_len = 48
  config.data.num_eval_docs = 50
  data = prepare.prepare_data(config, None)
  assert data.corpus.num_docs >= 400
  assert (data.corpus.reader_lengths[:-1] > 1).all()
  assert len(data.heldout_doc_ids) == 50 and len(data.ict_eval_queries["query_tokens"]) == 50
  report = json.loads((data.directory / "build_report.json").read_text())
  assert report["records_read"] == 400
  assert len(data.train_span_ids) > 1000  # several salient spans per passage
