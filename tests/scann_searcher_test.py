"""ScaNN searcher: recall against exact search, global ids, sharding, save/load, factory."""

import numpy as np
import pytest

from realm_jax.retrieval import scann_searcher
from realm_jax.retrieval import searcher

pytest.importorskip("scann")

K = 10


def _clustered(rng, num_docs, dim, num_clusters=50, num_queries=200):
  """Gaussian clusters around random centres; queries drawn near the centres."""
  centres = rng.normal(size=(num_clusters, dim)).astype(np.float32)
  docs = centres[rng.integers(num_clusters, size=num_docs)]
  docs = docs + 0.5 * rng.normal(size=docs.shape).astype(np.float32)
  queries = centres[rng.integers(num_clusters, size=num_queries)]
  queries = queries + 0.1 * rng.normal(size=queries.shape).astype(np.float32)
  return docs.astype(np.float32), queries.astype(np.float32)


def _recall(ids, ref_ids):
  return np.mean([len(np.intersect1d(a, b)) / b.shape[0] for a, b in zip(ids, ref_ids)])


@pytest.fixture(scope="module")
def data():
  rng = np.random.default_rng(0)
  docs, queries = _clustered(rng, 20_000, 32)
  # Non-contiguous global ids: a row index leaking through would not be a valid id.
  doc_ids = np.sort(rng.choice(10**9, size=len(docs), replace=False)).astype(np.int64) * 3 + 7
  exact = searcher.ExactSearcher(docs, doc_ids)
  return docs, queries, doc_ids, exact, exact.search(queries, K)


@pytest.fixture(scope="module")
def scann_index(data):
  docs, _, doc_ids, _, _ = data
  return scann_searcher.ScannSearcher(docs, doc_ids)


def test_recall_against_exact(data, scann_index):
  _, queries, doc_ids, _, (ref_ids, ref_scores) = data
  assert not scann_index.brute_force and scann_index.num_leaves > 1
  assert (scann_index.num_docs, scann_index.dim) == (20_000, 32)
  ids, scores = scann_index.search(queries, K)
  assert ids.shape == scores.shape == (len(queries), K)
  assert ids.dtype == np.int64 and scores.dtype == np.float32
  assert np.isin(ids, doc_ids).all(), "global doc ids, not ScaNN row indices"
  assert np.all(np.diff(scores, axis=1) <= 0), "best first"
  recall = _recall(ids, ref_ids)
  assert recall >= 0.95, recall
  # Re-ordered scores are exact dot products of the returned documents.
  rows = np.searchsorted(doc_ids, ids)
  np.testing.assert_allclose(scores, np.einsum("bd,bkd->bk", queries, data[0][rows]),
                             rtol=1e-4, atol=1e-4)


def test_brute_force_fallback_matches_exact():
  rng = np.random.default_rng(1)
  docs, queries = rng.normal(size=(500, 16)), rng.normal(size=(7, 16))
  doc_ids = np.arange(500) * 5 + 11
  scann_index = scann_searcher.ScannSearcher(docs, doc_ids)
  assert scann_index.brute_force
  ids, scores = scann_index.search(queries, K)
  ref_ids, ref_scores = searcher.ExactSearcher(docs, doc_ids).search(queries, K)
  np.testing.assert_array_equal(ids, ref_ids)
  np.testing.assert_allclose(scores, ref_scores, rtol=1e-5, atol=1e-5)  # summation order
  # k beyond the shard clips like ExactSearcher (ScaNN itself would pad with NaN).
  ids, scores = scann_index.search(queries[:2], 600)
  assert ids.shape == (2, 500) and np.isfinite(scores).all()


def test_sharded_scann_merges(data):
  docs, queries, doc_ids, _, (ref_ids, _) = data
  shards = [scann_searcher.ScannSearcher(docs[i::2], doc_ids[i::2]) for i in range(2)]
  merged = searcher.ShardedSearcher(shards)
  assert merged.num_docs == len(docs)
  ids, scores = merged.search(queries, K)
  assert np.all(np.diff(scores, axis=1) <= 0)
  assert all(len(set(row)) == K for row in ids)
  recall = _recall(ids, ref_ids)
  assert recall >= 0.95, recall


def test_save_load_round_trip(data, scann_index, tmp_path):
  """Loads without retraining, from a folder moved after saving (assets use relative paths)."""
  queries = data[1]
  scann_index.save(tmp_path / "shard")
  (tmp_path / "shard").rename(tmp_path / "moved")
  loaded = scann_searcher.ScannSearcher.load(tmp_path / "moved")
  assert (loaded.num_docs, loaded.dim, loaded.params) == (
      scann_index.num_docs, scann_index.dim, scann_index.params)
  ids, scores = scann_index.search(queries, K)
  ids2, scores2 = loaded.search(queries, K)
  np.testing.assert_array_equal(ids, ids2)
  np.testing.assert_array_equal(scores, scores2)


def test_bad_query_dim_raises(scann_index):
  with pytest.raises(ValueError, match=r"\[B, 32\]"):
    scann_index.search(np.zeros((3, 31), np.float32), K)
  with pytest.raises(ValueError, match=r"\[B, 32\]"):
    scann_index.search(np.zeros((32,), np.float32), K)


def test_options_from_config():
  assert scann_searcher.options_from_config({}) == {}
  assert scann_searcher.options_from_config({"searcher": "scann"}) == {}
  retrieval = {"scann": {"num_leaves": 300, "num_leaves_to_search": 0, "reorder": None}}
  assert scann_searcher.options_from_config(retrieval) == {"num_leaves": 300}
  with pytest.raises(ValueError, match="num_leafs"):
    scann_searcher.options_from_config({"scann": {"num_leafs": 3}})


def test_make_searcher():
  docs = np.random.default_rng(2).normal(size=(100, 8)).astype(np.float32)
  assert isinstance(scann_searcher.make_searcher("exact", docs, None), searcher.ExactSearcher)
  assert isinstance(scann_searcher.make_searcher("scann", docs, None, reorder=50),
                    scann_searcher.ScannSearcher)
  with pytest.raises(ValueError, match="retrieval.searcher"):
    scann_searcher.make_searcher("faiss", docs, None)
