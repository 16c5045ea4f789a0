"""Searchers, candidate assembly and the index format."""

import json

import numpy as np
import pytest

from realm_jax.retrieval import candidates
from realm_jax.retrieval import index_format
from realm_jax.retrieval import searcher


def _brute_force(queries, docs, k):
  scores = queries.astype(np.float64) @ docs.astype(np.float64).T
  return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def test_exact_searcher_matches_brute_force():
  rng = np.random.default_rng(0)
  docs, queries = rng.normal(size=(500, 16)), rng.normal(size=(7, 16))
  ids, scores = searcher.ExactSearcher(docs).search(queries, 10)
  np.testing.assert_array_equal(ids, _brute_force(queries, docs, 10))
  assert np.all(np.diff(scores, axis=1) <= 0), "best first"
  np.testing.assert_allclose(scores[:, 0], (queries @ docs.T).max(1), rtol=1e-5)


def test_sharded_search_merges_exactly():
  rng = np.random.default_rng(1)
  docs, queries = rng.normal(size=(300, 8)), rng.normal(size=(5, 8))
  shards = [searcher.ExactSearcher(docs[i::3], np.arange(300)[i::3]) for i in range(3)]
  ids, _ = searcher.ShardedSearcher(shards).search(queries, 12)
  np.testing.assert_array_equal(ids, _brute_force(queries, docs, 12))


def test_searcher_rejects_wrong_dim():
  with pytest.raises(ValueError, match=r"\[B, 4\]"):
    searcher.ExactSearcher(np.zeros((3, 4))).search(np.zeros((2, 5)), 1)


def test_assemble_candidates_drops_source_dedupes_and_prepends_null():
  null = 99
  retrieved = np.array([[5, 3, 5, 7, 8],    # source 3 dropped, duplicate 5 dropped
                        [1, 2, 4, 6, 9],    # source absent: first k-1 kept
                        [4, 4, 4, 4, 4]])   # only one distinct id: padded with masked nulls
  ids, mask = candidates.assemble_candidates(retrieved, np.array([3, -1, 2]), k=4, null_id=null)
  np.testing.assert_array_equal(ids, [[null, 5, 7, 8], [null, 1, 2, 4], [null, 4, null, null]])
  np.testing.assert_array_equal(mask, [[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0]])


def test_assemble_candidates_pads_when_fewer_results_than_slots():
  ids, mask = candidates.assemble_candidates(np.array([[2]]), np.array([-1]), k=3, null_id=0)
  np.testing.assert_array_equal(ids, [[0, 2, 0]])
  np.testing.assert_array_equal(mask, [[True, True, False]])


def _shards(rng, n=40, dim=8, num_shards=2):
  emb = rng.normal(size=(n, dim)).astype(np.float32)
  return [(emb[i::num_shards], np.arange(n)[i::num_shards]) for i in range(num_shards)], emb


def test_publish_load_round_trip(tmp_path):
  rng = np.random.default_rng(0)
  shards, emb = _shards(rng)
  index_format.publish_index(tmp_path, 10, shards)
  assert index_format.latest_step(tmp_path) == 10
  manifest, loaded = index_format.load_index(tmp_path, 10, expected_dim=8, expected_num_docs=40)
  assert manifest["num_docs"] == 40 and len(manifest["shards"]) == 2
  q = rng.normal(size=(3, 8))
  np.testing.assert_array_equal(loaded.search(q, 5)[0], _brute_force(q, emb, 5))


def test_corrupted_shard_and_mismatched_manifest_are_rejected(tmp_path):
  shards, _ = _shards(np.random.default_rng(0))
  version = index_format.publish_index(tmp_path, 3, shards)
  with pytest.raises(index_format.IndexVersionError, match="dim"):
    index_format.load_index(tmp_path, 3, expected_dim=16)
  with pytest.raises(index_format.IndexVersionError, match="docs"):
    index_format.load_index(tmp_path, 3, expected_num_docs=41)
  path = version / "shard-00001-of-00002" / "embeddings.npy"
  data = bytearray(path.read_bytes())
  data[-1] ^= 0xFF
  path.write_bytes(bytes(data))
  with pytest.raises(index_format.IndexVersionError, match="checksum"):
    index_format.load_index(tmp_path, 3)


def test_version_without_manifest_is_not_a_version(tmp_path):
  shards, _ = _shards(np.random.default_rng(0))
  index_format.publish_index(tmp_path, 1, shards)
  (tmp_path / "2").mkdir()  # a crashed writer's leftovers
  assert index_format.list_versions(tmp_path) == [1]
  with pytest.raises(index_format.IndexVersionError, match="MANIFEST"):
    index_format.load_index(tmp_path, 2)


def test_prune_keeps_newest_and_latest(tmp_path):
  shards, _ = _shards(np.random.default_rng(0))
  for step in (1, 2, 3, 4):
    index_format.publish_index(tmp_path, step, shards)
  assert index_format.prune_versions(tmp_path, keep_last=2) == [1, 2]
  assert index_format.list_versions(tmp_path) == [3, 4]
  manifest = json.loads((tmp_path / "4" / index_format.MANIFEST).read_text())
  assert manifest["step"] == 4 and manifest["dim"] == 8


def test_scann_version_loads_as_scann_and_agrees_with_exact(tmp_path):
  from realm_jax.retrieval import scann_searcher  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(3)
  centres = rng.normal(size=(40, 16)).astype(np.float32)
  emb = (centres[rng.integers(40, size=5000)] + 0.1 * rng.normal(size=(5000, 16))).astype(
      np.float32)
  index_format.publish_index(tmp_path, 7, [(emb, np.arange(5000))], searcher="scann")
  manifest, loaded = index_format.load_index(tmp_path, 7)
  assert manifest["searcher"] == "scann"
  assert isinstance(loaded.shards[0], scann_searcher.ScannSearcher)
  queries = centres[:20] + 0.1 * rng.normal(size=(20, 16)).astype(np.float32)
  got, _ = loaded.search(queries, 10)
  want = _brute_force(queries, emb, 10)
  recall = np.mean([len(set(g) & set(w)) / 10 for g, w in zip(got, want)])
  assert recall >= 0.95, recall
