"""Index footprint (issue 11): each vector stored once; bfloat16 / int8 stored vectors.

A "scann" version keeps its vectors only in ScaNN's re-scoring dataset (no embeddings.npy),
in the configured `reorder_dtype`; the recall cost of the smaller dtypes is measured against
the exact top 10 (numpy) on clustered unit vectors.
"""

import os

import numpy as np
import pytest

from realm_jax.retrieval import index_format
from realm_jax.retrieval import index_update
from realm_jax.retrieval import searcher as searcher_lib
from index_update_test import fake_version, overlap_at_k  # pylint: disable=g-bad-import-order

DIM = 32


def _bytes(path):
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, names in os.walk(path) for f in names)


@pytest.fixture(scope="module")
def data():
  rng = np.random.default_rng(3)
  centers = rng.normal(size=(40, DIM))
  def points(n):  # unit vectors around 40 centers, looser than index_update_test's clusters
    x = centers[rng.integers(40, size=n)] + 0.6 * rng.normal(size=(n, DIM))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
  return points(6000), points(200)


def test_vectors_are_stored_once_in_each_dtype_and_recall_cost_is_small(data, tmp_path):
  emb, queries = data
  exact, _ = searcher_lib.ExactSearcher(emb).search(queries, 10)
  sizes, recalls = {}, {}
  for step, dtype in enumerate(("float32", "bfloat16", "int8")):
    options = dict(num_leaves=40, num_leaves_to_search=20, reorder_dtype=dtype)
    version = index_format.publish_index(tmp_path, step, [(emb, np.arange(len(emb)))],
                                         searcher="scann", searcher_options=options)
    assert not list(version.glob("*/embeddings.npy"))
    manifest, searcher = index_format.load_index(tmp_path, step, expected_num_docs=len(emb))
    stored = index_format.shard_vectors(version, manifest["shards"][0])  # [N, D] float32
    tolerance = dict(float32=0.0, bfloat16=2 ** -8, int8=2 ** -6)[dtype]
    np.testing.assert_allclose(stored, emb, atol=tolerance * 4, rtol=tolerance)
    got, _ = searcher.search(queries, 10)
    sizes[dtype], recalls[dtype] = _bytes(version), overlap_at_k(got, exact, 10)
  print("bytes per version:", sizes, "recall@10 vs exact:", recalls)
  raw = emb.nbytes  # one float32 copy of the vectors
  assert sizes["float32"] < 1.5 * raw  # not 2x: no embeddings.npy beside ScaNN's copy
  assert sizes["bfloat16"] < sizes["float32"] - 0.4 * raw
  assert sizes["int8"] < sizes["bfloat16"] - 0.2 * raw
  assert recalls["float32"] >= 0.98
  assert recalls["bfloat16"] >= recalls["float32"] - 0.02  # measured: ~0.01
  assert recalls["int8"] >= recalls["float32"] - 0.05  # measured: ~0.035


def test_a_bfloat16_version_takes_incremental_updates(data, tmp_path):
  emb, queries = data
  n0 = 5000
  options = dict(num_leaves=40, num_leaves_to_search=12, reorder_dtype="bfloat16")
  index_format.publish_index(tmp_path, 2, [(emb[:n0], np.arange(n0))], searcher="scann",
                             searcher_options=options)
  new = fake_version(1, len(emb), removed_ids=range(0, 100))
  index_update.update_index(tmp_path, 2, fake_version(0, n0), new, lambda rows: emb[rows])
  key = index_format.VersionKey(2, 1)
  manifest, searcher = index_format.load_index(tmp_path, key, removed=new.removed,
                                               expected_num_docs=len(emb))
  assert manifest["shards"][0]["scann_params"]["reorder_dtype"] == "bfloat16"
  got, _ = searcher.search(queries, 10)
  exact, _ = searcher_lib.ExactSearcher(emb[new.live_ids], new.live_ids).search(queries, 10)
  assert overlap_at_k(got, exact, 10) >= 0.95 and not np.isin(got, np.arange(100)).any()
