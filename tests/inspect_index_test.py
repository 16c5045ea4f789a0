"""`retrieval/inspect_index.py` on a tiny trained workdir (facts corpus, a few ICT steps, the
ICT run's final in-process index version).

A few ICT steps from random init do not make a retriever that finds a profile from its own
text (measured: 4 steps: 1% at rank 1, 30 steps: 2.5%, over 200 blocks), so the trained
version is checked for what holds whatever the model: the exact searcher's answer equals a
numpy brute force over the version's stored embeddings, ranks/scores/titles/snippets are
consistent, repeats are identical. Retrieving the right block is checked on a version published
from the run's own *query* embeddings of the block texts (L2-normalised, so by Cauchy-Schwarz a
block's own text is its unique best match): it fails if the query encoding, the doc-id mapping
across shards or the texts lookup is wrong.
"""

import json
import shutil

import jax
import numpy as np
import pytest

from realm_jax import config_lib
from realm_jax.data import prepare
from realm_jax.retrieval import index_format
from realm_jax.retrieval import inspect_index
from realm_jax.train import loop
from tiny_configs import tiny_config  # pylint: disable=g-bad-import-order

ICT_STEPS = 4


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """(workdir, block_texts records): ICT checkpoints 0 and ICT_STEPS, index version ICT_STEPS."""
  base = tmp_path_factory.mktemp("inspect")
  config = tiny_config(base / "corpus")
  config.objective = "ict"
  config.ict.num_steps = ICT_STEPS
  config.train.checkpoint_every = ICT_STEPS
  workdir = base / "run"
  loop.train_and_evaluate(config, workdir, devices=jax.devices()[:1])
  texts = [json.loads(line) for line in (base / "corpus" / "block_texts.jsonl").open()]
  return workdir, texts


@pytest.fixture(scope="module")
def inspector(trained):
  return inspect_index.Inspector(trained[0])


def _copy(workdir, tmp_path):
  """A private copy of the run (its config names the shared corpus folder by path)."""
  target = tmp_path / "run"
  shutil.copytree(workdir, target)
  return target


def _stored(workdir, step):
  """(embeddings [N, D], doc ids [N]) of a version, from its shards' files."""
  manifest = index_format.read_manifest(workdir / "index", step)
  embeddings, ids = [], []
  for entry in manifest["shards"]:
    shard = workdir / "index" / str(step) / entry["name"]
    embeddings.append(np.load(shard / "embeddings.npy"))
    ids.append(np.load(shard / "doc_ids.npy"))
  return np.concatenate(embeddings), np.concatenate(ids)


def test_trained_version_equals_brute_force(trained, inspector):
  workdir, texts = trained
  queries = [texts[0]["text"], texts[7]["title"], "who plays the accordion", texts[3]["text"]]
  k = 6
  results = inspector.search(queries, k=k)
  assert len(results) == len(queries)
  embeddings, doc_ids = _stored(workdir, ICT_STEPS)
  query_emb = inspector.embed(np.stack([inspector.encode(q).tokens for q in queries]))
  scores = query_emb @ embeddings.T  # the brute force: every stored block
  for query, record, row in zip(queries, results, scores):
    assert record["query"] == query
    assert (record["index_step"], record["checkpoint_step"]) == (ICT_STEPS, ICT_STEPS)
    assert record["checkpoint_source"] == "index" and record["searcher"] == "exact"
    hits = record["results"]
    assert [h["rank"] for h in hits] == list(range(1, k + 1))
    got = np.array([h["score"] for h in hits])
    assert np.all(np.diff(got) <= 0), "scores best first"
    order = np.argsort(-row, kind="stable")[:k]
    np.testing.assert_allclose(got, row[order], rtol=1e-6)
    ids = [h["doc_id"] for h in hits]
    assert len(set(ids)) == k and all(0 <= i < len(texts) for i in ids)
    # Equal ids up to exact ties (none expected, but a tie may order either way).
    distinct = np.concatenate([[True], np.diff(row[order]) != 0])
    assert [i for i, d in zip(ids, distinct) if d] == [int(doc_ids[o]) for o, d in
                                                       zip(order, distinct) if d]
    for hit in hits:
      assert hit["title"] == texts[hit["doc_id"]]["title"]
      assert hit["text"] == inspect_index.snippet(texts[hit["doc_id"]]["text"])
  assert results[0]["truncated"] and not results[2]["truncated"]
  assert results[2]["num_query_tokens"] > 0


def test_repeats_are_identical_and_batching_does_not_change_results(inspector, trained):
  _, texts = trained
  queries = [texts[5]["text"], texts[11]["title"]]
  first, second = inspector.search(queries, k=4), inspector.search(queries, k=4)
  assert first == second
  alone = inspector.search([queries[1]], k=4)[0]
  assert [h["doc_id"] for h in alone["results"]] == [h["doc_id"] for h in first[1]["results"]]
  np.testing.assert_allclose([h["score"] for h in alone["results"]],
                             [h["score"] for h in first[1]["results"]], rtol=1e-5)
  # k beyond the corpus: every block, once.
  everything = inspector.search([queries[0]], k=inspect_index.MAX_K)[0]["results"]
  assert sorted(h["doc_id"] for h in everything) == list(range(len(texts)))


def test_query_encoding_matches_pretraining_queries(inspector):
  """`[CLS] wordpieces [SEP]` + pad, cut to data.query_len, like the ICT/REALM query rows."""
  corpus, special = inspector.corpus, inspector.corpus.special
  sentence = corpus.sentence_ids(0)[0]
  text = inspector.tokenizer.decode(sentence.tolist())
  encoded = inspector.encode(text)
  expected = np.full(inspector.query_len, special.pad, np.int32)
  packed = [special.cls, *sentence[:inspector.query_len - 2], special.sep]
  expected[:len(packed)] = packed
  np.testing.assert_array_equal(encoded.tokens, expected)
  long = inspector.encode(" ".join([text] * 5))
  assert long.truncated and long.tokens[-1] == special.sep and long.num_wordpieces > 22
  assert inspector.encode("!!! zzqx").num_unknown >= 1


def test_self_embedded_version_returns_each_blocks_own_text(trained, inspector, tmp_path):
  workdir, texts = trained
  workdir = _copy(workdir, tmp_path)
  tokens = np.stack([inspector.encode(r["text"]).tokens for r in texts])
  emb = inspector.embed(tokens)
  emb = emb / np.linalg.norm(emb, axis=1, keepdims=True)
  perm = np.random.default_rng(0).permutation(len(texts))
  half = len(perm) // 2  # two shards, rows out of doc-id order
  step = 10**6  # no checkpoint of this step: its parameters are named by params_step
  index_format.publish_index(workdir / "index", step,
                             [(emb[perm[:half]], perm[:half]), (emb[perm[half:]], perm[half:])],
                             extra=dict(params_step=ICT_STEPS))
  # Blocks whose (cut) query rows are unique: the others tie with a twin.
  _, first, counts = np.unique(tokens, axis=0, return_index=True, return_counts=True)
  unique = np.sort(first[counts == 1])
  assert len(unique) > len(texts) // 2
  chosen = unique[:: max(1, len(unique) // 40)]
  results = inspect_index.retrieve(workdir, [texts[i]["text"] for i in chosen], k=3)
  assert all(r["index_step"] == step and r["checkpoint_step"] == ICT_STEPS and
             r["checkpoint_source"] == "index" for r in results)
  assert [r["results"][0]["doc_id"] for r in results] == chosen.tolist()
  assert all(r["results"][0]["title"] == texts[i]["title"] for r, i in zip(results, chosen))
  # The trained version is still there by its step.
  older = inspect_index.retrieve(workdir, [texts[0]["text"]], k=2, index_step=ICT_STEPS)
  assert older[0]["index_step"] == ICT_STEPS


def test_newest_checkpoint_when_the_versions_own_is_gone(trained, tmp_path):
  workdir = _copy(trained[0], tmp_path)
  embeddings, ids = _stored(workdir, ICT_STEPS)
  index_format.publish_index(workdir / "index", 7, [(embeddings, ids)])
  inspector = inspect_index.Inspector(workdir)
  assert (inspector.index_step, inspector.checkpoint_step) == (7, ICT_STEPS)
  assert inspector.checkpoint_source == "newest"
  assert any("checkpoint is gone" in w for w in inspector.warnings)
  results = inspector.search(["a photographer"], k=2)
  assert results[0]["checkpoint_source"] == "newest"
  text = inspect_index.format_results(results, inspector.warnings)
  assert "NEWEST checkpoint" in text and text.startswith("warning:")


def test_bad_latest_and_corrupt_versions(trained, tmp_path):
  workdir = _copy(trained[0], tmp_path)
  embeddings, ids = _stored(workdir, ICT_STEPS)
  index_format.publish_index(workdir / "index", 8, [(embeddings, ids)])
  (workdir / "index" / index_format.LATEST).write_text("garbage")
  inspector = inspect_index.Inspector(workdir)
  assert inspector.index_step == 8 and any("not a step number" in w for w in inspector.warnings)
  # The newest version corrupt: skipped by default, an error when asked for by step.
  shard = workdir / "index" / "8" / index_format.shard_name(0, 1) / "embeddings.npy"
  shard.write_bytes(shard.read_bytes()[:-16])
  (workdir / "index" / index_format.LATEST).write_text("8")
  inspector = inspect_index.Inspector(workdir)
  assert inspector.index_step == ICT_STEPS
  assert any("skipped index version 8" in w for w in inspector.warnings)
  with pytest.raises(inspect_index.RetrieveError, match="index version 8 cannot be used"):
    inspect_index.Inspector(workdir, index_step=8)


def test_clear_errors(trained, inspector, tmp_path):
  workdir, _ = trained
  error = inspect_index.RetrieveError
  with pytest.raises(error, match="does not exist"):
    inspect_index.retrieve(tmp_path / "nowhere", ["x"])
  with pytest.raises(error, match=r"not published .*published: \[4\]"):
    inspect_index.retrieve(workdir, ["x"], index_step=3)
  with pytest.raises(error, match="empty query"):
    inspector.search(["photographer", "  "])
  with pytest.raises(error, match="query 0: empty query"):
    inspector.search([""])
  with pytest.raises(error, match="tokenizes to nothing"):
    inspector.search(["\u200b\u200b"])
  with pytest.raises(error, match="must be a string"):
    inspector.search([None])
  with pytest.raises(error, match="list of strings"):
    inspector.search("photographer")
  for k in (0, -1, True, 2.5):
    with pytest.raises(error, match="k="):
      inspector.search(["photographer"], k=k)
  assert inspector.search([]) == []

  no_config = _copy(workdir, tmp_path / "a")
  (no_config / "config.json").unlink()
  with pytest.raises(error, match="holds no run config"):
    inspect_index.Inspector(no_config)
  no_index = _copy(workdir, tmp_path / "b")
  shutil.rmtree(no_index / "index")
  with pytest.raises(error, match="no published index version"):
    inspect_index.Inspector(no_index)
  no_checkpoints = _copy(workdir, tmp_path / "c")
  shutil.rmtree(no_checkpoints / "checkpoints")
  with pytest.raises(error, match="no checkpoint"):
    inspect_index.Inspector(no_checkpoints)
  config = inspector.config.copy_and_resolve_references()
  config.data.corpus_dir = str(tmp_path / "no_corpus")
  with pytest.raises(error, match="corpus is not there"):
    inspect_index.Inspector(workdir, config=config)


def test_batch_file_counts_bad_lines_and_writes_jsonl(trained, inspector, tmp_path):
  workdir, texts = trained
  lines = [json.dumps({"query": texts[2]["text"], "id": "a"}),  # 1
           "{not json",  # 2
           "",  # blank: skipped, not bad
           json.dumps(["query"]),  # 4
           json.dumps({"question": "x"}),  # 5
           json.dumps({"query": "   "}),  # 6
           json.dumps({"query": 3}),  # 7
           json.dumps({"query": "\u200b"}),  # 8
           json.dumps({"query": texts[9]["title"]})]  # 9
  queries = tmp_path / "queries.jsonl"
  queries.write_text("\n".join(lines) + "\n")
  output = tmp_path / "out" / "results.jsonl"
  report = inspect_index.retrieve_file(workdir, queries, output, k=3, inspector=inspector)
  assert report["num_queries"] == 2 and report["num_bad_lines"] == 6
  assert [b["line"] for b in report["bad_lines"]] == [2, 4, 5, 6, 7, 8]
  assert "tokenizes to nothing" in report["bad_lines"][-1]["error"]
  written = [json.loads(line) for line in output.read_text().splitlines()]
  assert [r["line"] for r in written] == [1, 9]
  direct = inspector.search([texts[2]["text"], texts[9]["title"]], k=3)
  assert [r["results"] for r in written] == [r["results"] for r in direct]
  assert report["index_step"] == ICT_STEPS and report["output"] == str(output)
  text = inspect_index.format_results(report["results"], report["warnings"],
                                      report["bad_lines"], report["num_bad_lines"])
  assert "6 bad query line(s) skipped" in text and "line 8:" in text
  assert "query (line 9):" in text

  only_bad = tmp_path / "bad.jsonl"
  only_bad.write_text("{}\nnope\n")
  with pytest.raises(inspect_index.RetrieveError, match="no usable query .*2 bad line"):
    inspect_index.retrieve_file(workdir, only_bad, inspector=inspector)
  with pytest.raises(inspect_index.RetrieveError, match="does not exist"):
    inspect_index.retrieve_file(workdir, tmp_path / "missing.jsonl", inspector=inspector)


def test_format_results_and_cli_entry_point(trained, tmp_path):
  workdir, texts = trained
  output = tmp_path / "one.jsonl"
  text = inspect_index.run_retrieve_mode(workdir, query=texts[1]["text"], k=2, output=output)
  record = json.loads(output.read_text())
  lines = text.splitlines()
  assert lines[0] == f"query: {texts[1]['text']}"
  assert f"index version {ICT_STEPS} (exact)" in lines[1] and "its own checkpoint" in lines[1]
  first = record["results"][0]
  assert lines[2].split()[:4] == ["1.", f"{first['score']:.4f}", "doc", str(first["doc_id"])]
  assert lines[2].endswith(first["title"]) and lines[3].strip() == first["text"]
  assert text.endswith(f"results written to {output}")
  with pytest.raises(inspect_index.RetrieveError, match="exactly one"):
    inspect_index.run_retrieve_mode(workdir)
  with pytest.raises(inspect_index.RetrieveError, match="exactly one"):
    inspect_index.run_retrieve_mode(workdir, query="x", queries_file=output)


def test_titles_and_text_without_block_texts(trained, tmp_path):
  """A corpus folder without block_texts.jsonl: titles from the corpus, text decoded."""
  workdir, texts = trained
  corpus = tmp_path / "corpus"
  shutil.copytree(workdir.parent / "corpus", corpus)
  (corpus / "block_texts.jsonl").unlink()
  config = config_lib.load_run_config(workdir)
  config.data.corpus_dir = str(corpus)
  inspector = inspect_index.Inspector(workdir, config=config)
  assert any("block_texts.jsonl is missing" in w for w in inspector.warnings)
  hit = inspector.search([texts[0]["text"]], k=1)[0]["results"][0]
  assert hit["title"] == texts[hit["doc_id"]]["title"]
  assert hit["text"].split()[:3] == texts[hit["doc_id"]]["text"].lower().split()[:3]
  assert prepare.BUILD_CONFIG  # the copied folder is a complete corpus


def test_scann_version(trained, inspector, tmp_path):
  """A ScaNN version (the default at scale; at 200 blocks ScaNN scores by brute force) answers
  like the exact version of the same embeddings."""
  workdir, texts = trained
  workdir = _copy(workdir, tmp_path)
  embeddings, ids = _stored(workdir, ICT_STEPS)
  index_format.publish_index(workdir / "index", 9, [(embeddings, ids)], searcher="scann",
                             extra=dict(checkpoint_step=ICT_STEPS))
  queries = [texts[i]["text"] for i in (0, 13, 77)]
  scann = inspect_index.retrieve(workdir, queries, k=4)
  exact = inspector.search(queries, k=4)
  for a, b in zip(scann, exact):
    assert a["searcher"] == "scann" and (a["index_step"], a["checkpoint_step"]) == (9, ICT_STEPS)
    assert a["checkpoint_source"] == "index"
    assert [h["doc_id"] for h in a["results"]] == [h["doc_id"] for h in b["results"]]
    np.testing.assert_allclose([h["score"] for h in a["results"]],
                               [h["score"] for h in b["results"]], rtol=1e-4)
