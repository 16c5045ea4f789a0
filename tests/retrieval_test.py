"""Searchers, candidate assembly and the index format."""

import hashlib
import json

import numpy as np
import pytest

from realm_jax.retrieval import candidates
from realm_jax.retrieval import index_format
from realm_jax.retrieval import searcher
from data_helpers import flip_byte  # pylint: disable=g-bad-import-order


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
  flip_byte(path, -1)
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


def _clustered(seed, num_docs=5000, dim=16, num_queries=20):
  rng = np.random.default_rng(seed)
  centres = rng.normal(size=(40, dim)).astype(np.float32)
  emb = (centres[rng.integers(40, size=num_docs)] +
         0.1 * rng.normal(size=(num_docs, dim))).astype(np.float32)
  queries = (centres[:num_queries] + 0.1 * rng.normal(size=(num_queries, dim))).astype(np.float32)
  return emb, queries


def _publish_scann(root, step, emb, num_shards=2, **kwargs):
  ids = np.arange(len(emb))
  bounds = np.linspace(0, len(emb), num_shards + 1).astype(int)
  shards = [(emb[a:b], ids[a:b]) for a, b in zip(bounds, bounds[1:])]
  return index_format.publish_index(root, step, shards, searcher="scann", **kwargs)


def _fail_training(*args, **kwargs):
  """Replaces `ScannSearcher.__init__`: loading a stored searcher must not train one."""
  raise AssertionError("a stored ScaNN searcher was re-trained")


def test_scann_version_stores_trained_searchers_per_shard(tmp_path, monkeypatch):
  pytest.importorskip("scann")
  from realm_jax.retrieval import scann_searcher  # pylint: disable=g-import-not-at-top
  emb, queries = _clustered(0)
  options = dict(num_leaves=20, num_leaves_to_search=5)
  version = _publish_scann(tmp_path, 7, emb, searcher_options=options)
  manifest = json.loads((version / index_format.MANIFEST).read_text())
  assert manifest["searcher_options"] == options
  for entry in manifest["shards"]:
    assert entry["scann_params"]["num_leaves"] == 20 and not entry["scann_params"]["brute_force"]
    assert "scann/assets/scann_assets.pbtxt" in entry["scann_files"]
    for relative in entry["scann_files"]:
      assert (version / entry["name"] / relative).is_file()
  monkeypatch.setattr(scann_searcher.ScannSearcher, "__init__", _fail_training)
  _, loaded = index_format.load_index(tmp_path, 7, expected_dim=16, expected_num_docs=5000)
  assert [s.num_leaves for s in loaded.shards] == [20, 20]
  got, _ = loaded.search(queries, 10)
  want = _brute_force(queries, emb, 10)
  recall = np.mean([len(set(g) & set(w)) / 10 for g, w in zip(got, want)])
  assert recall >= 0.95, recall


def test_scann_version_stores_the_callers_searchers(tmp_path, monkeypatch):
  """Searchers the caller already trained are stored as they are: same results after loading."""
  pytest.importorskip("scann")
  from realm_jax.retrieval import scann_searcher  # pylint: disable=g-import-not-at-top
  emb, queries = _clustered(4)
  halves = [(emb[:2500], np.arange(2500)), (emb[2500:], np.arange(2500, 5000))]
  built = [scann_searcher.ScannSearcher(e, i, num_leaves=25) for e, i in halves]
  index_format.publish_index(tmp_path, 2, halves, searcher="scann", searchers=built)
  want = searcher.ShardedSearcher(built).search(queries, 10)
  monkeypatch.setattr(scann_searcher.ScannSearcher, "__init__", _fail_training)
  got = index_format.load_index(tmp_path, 2)[1].search(queries, 10)
  np.testing.assert_array_equal(got[0], want[0])
  np.testing.assert_array_equal(got[1], want[1])


def test_scann_version_loads_the_same_after_its_folder_moved(tmp_path, monkeypatch):
  """ScaNN's assets hold no absolute paths: a renamed/moved index folder loads identically."""
  pytest.importorskip("scann")
  from realm_jax.retrieval import scann_searcher  # pylint: disable=g-import-not-at-top
  emb, queries = _clustered(1)
  first = tmp_path / "first"
  _publish_scann(first, 3, emb)
  want = index_format.load_index(first, 3)[1].search(queries, 10)
  moved = tmp_path / "elsewhere" / "index"
  moved.parent.mkdir()
  first.rename(moved)
  files = [path for path in moved.glob("3/**/*") if path.is_file()]
  assert len(files) > 10
  for path in files:  # neither the publish folder nor ScaNN's local staging folder
    assert str(first).encode() not in path.read_bytes(), path
    assert b"realm-scann-" not in path.read_bytes(), path
  pbtxt = (moved / "3" / "shard-00000-of-00002" / "scann" / "assets" / "scann_assets.pbtxt")
  assert 'asset_path: "dataset.npy"' in pbtxt.read_text()
  monkeypatch.setattr(scann_searcher.ScannSearcher, "__init__", _fail_training)
  got = index_format.load_index(moved, 3)[1].search(queries, 10)
  np.testing.assert_array_equal(got[0], want[0])
  np.testing.assert_array_equal(got[1], want[1])
  # Through the remote (gs://) path too: files staged into a local temp folder, then loaded.
  monkeypatch.setattr(index_format, "_is_local", lambda path: False)
  staged = index_format.load_index(moved, 3)[1].search(queries, 10)
  np.testing.assert_array_equal(staged[0], want[0])


def test_corrupted_scann_asset_is_rejected(tmp_path):
  pytest.importorskip("scann")
  emb, _ = _clustered(2, num_docs=300)  # brute-force ScaNN: still its own stored files
  version = _publish_scann(tmp_path, 4, emb, num_shards=1)
  path = version / "shard-00000-of-00001" / "scann" / "assets" / "dataset.npy"
  flip_byte(path, -3)
  with pytest.raises(index_format.IndexVersionError, match="checksum"):
    index_format.load_index(tmp_path, 4)


def test_scann_version_without_stored_searchers_is_built_from_embeddings(tmp_path):
  """Versions written before ScaNN files were stored (format 1) still load, as ScaNN."""
  pytest.importorskip("scann")
  from realm_jax.retrieval import scann_searcher  # pylint: disable=g-import-not-at-top
  emb, queries = _clustered(3)
  version = _publish_scann(tmp_path, 5, emb, searcher_options=dict(num_leaves=30))
  manifest = json.loads((version / index_format.MANIFEST).read_text())
  for entry in manifest["shards"]:  # as a format-1 writer wrote it: embeddings.npy, no ScaNN
    vectors = index_format.shard_vectors(version, entry)
    np.save((version / entry["name"] / "embeddings.npy").open("wb"), vectors)
    entry["embeddings_sha256"] = hashlib.sha256(
        (version / entry["name"] / "embeddings.npy").read_bytes()).hexdigest()
    del entry["scann_files"], entry["scann_params"], entry["dim"], entry["vectors"]
    (version / entry["name"] / "scann").rmtree()
  manifest["format_version"] = 1
  (version / index_format.MANIFEST).write_text(json.dumps(manifest))
  _, loaded = index_format.load_index(tmp_path, 5)
  assert all(isinstance(s, scann_searcher.ScannSearcher) and s.num_leaves == 30
             for s in loaded.shards)
  got, _ = loaded.search(queries, 10)
  want = _brute_force(queries, emb, 10)
  assert np.mean([len(set(g) & set(w)) / 10 for g, w in zip(got, want)]) >= 0.95


def test_version_is_published_only_when_every_writers_shard_is_done(tmp_path):
  """The several-writer protocol: announce, shards in any order, then manifest + LATEST."""
  shards, emb = _shards(np.random.default_rng(5))
  build = index_format.start_version(tmp_path, 8, num_shards=2)
  assert index_format.pending_builds(tmp_path) == [build]
  index_format.write_shard(tmp_path, build, 1, *shards[1])
  with pytest.raises(index_format.IndexVersionError, match=r"shards \[0\] of 2 not done"):
    index_format.finish_version(tmp_path, build, timeout=0.0)
  assert index_format.list_versions(tmp_path) == [] and index_format.latest_step(tmp_path) is None
  index_format.write_shard(tmp_path, build, 0, *shards[0])
  index_format.finish_version(tmp_path, build, expected_num_docs=40)
  assert index_format.latest_step(tmp_path) == 8 and index_format.pending_builds(tmp_path) == []
  _, loaded = index_format.load_index(tmp_path, 8)
  q = np.random.default_rng(6).normal(size=(3, 8))
  np.testing.assert_array_equal(loaded.search(q, 5)[0], _brute_force(q, emb, 5))


def test_a_replaced_attempt_is_never_published(tmp_path):
  """A restarted leader re-announces the step: nothing of the dead attempt counts."""
  shards, _ = _shards(np.random.default_rng(7))
  old = index_format.start_version(tmp_path, 9, num_shards=2)
  index_format.write_shard(tmp_path, old, 0, *shards[0])
  new = index_format.start_version(tmp_path, 9, num_shards=2)  # the leader restarted
  assert new["attempt"] != old["attempt"]
  assert index_format.shard_done(tmp_path, new, 0) is None  # gone with the old folder
  with pytest.raises(index_format.StaleBuildError):  # a follower still on the old attempt
    index_format.write_shard(tmp_path, old, 1, *shards[1])
  assert index_format.shard_done(tmp_path, new, 1) is None
  with pytest.raises(index_format.StaleBuildError):
    index_format.finish_version(tmp_path, old)
  index_format.write_shard(tmp_path, new, 0, *shards[0])
  done = index_format.tmp_dir(tmp_path, 9) / "shard-00000-of-00002" / index_format.SHARD_DONE
  record = json.loads(done.read_text())
  done.write_text(json.dumps(dict(record, attempt=old["attempt"])))
  assert index_format.shard_done(tmp_path, new, 0) is None  # a done-mark of another attempt
  done.write_text(json.dumps(record))
  index_format.write_shard(tmp_path, new, 1, *shards[1])
  assert index_format.finish_version(tmp_path, new).name == "9"
  assert index_format.list_versions(tmp_path) == [9]


# ---- Versions that pass their checksums but are wrong ---------------------------------------


def _rewrite(version, shard, name, array):
  """Replaces a shard file by `array` *with* a matching checksum (a writer that wrote garbage)."""
  path = version / shard / name
  np.save(path.open("wb"), array)
  manifest_path = version / index_format.MANIFEST
  manifest = json.loads(manifest_path.read_text())
  key = "embeddings_sha256" if name == "embeddings.npy" else "doc_ids_sha256"
  for entry in manifest["shards"]:
    if entry["name"] == shard:
      entry[key] = hashlib.sha256(path.read_bytes()).hexdigest()
  manifest_path.write_text(json.dumps(manifest))


def _edit_manifest(version, **changes):
  path = version / index_format.MANIFEST
  manifest = json.loads(path.read_text())
  manifest.update(changes)
  path.write_text(json.dumps(manifest))


S0, S1 = "shard-00000-of-00002", "shard-00001-of-00002"


@pytest.mark.parametrize("corrupt, message", [
    (lambda v, e: _rewrite(v, S1, "doc_ids.npy", np.arange(40)[1::2] + 1), r"outside \[0, 40\)"),
    (lambda v, e: _rewrite(v, S0, "doc_ids.npy", np.arange(40)[0::2] - 2), r"outside \[0, 40\)"),
    (lambda v, e: _rewrite(v, S1, "doc_ids.npy", np.arange(40)[0::2]), "more than once"),
    (lambda v, e: _rewrite(v, S0, "doc_ids.npy", np.zeros(20, np.int64)), "more than once"),
    (lambda v, e: _rewrite(v, S0, "doc_ids.npy", np.arange(40)[0::2] + 0.5), "dtype"),
    (lambda v, e: _rewrite(v, S0, "doc_ids.npy", np.arange(40)[0:30:2]), "shape"),
    (lambda v, e: _rewrite(v, S0, "embeddings.npy",
                           np.where(np.arange(20)[:, None] == 3, np.nan, e[0::2])), "not finite"),
    (lambda v, e: _rewrite(v, S1, "embeddings.npy", np.full((20, 8), np.inf, np.float32)),
     "not finite"),
    (lambda v, e: _rewrite(v, S1, "embeddings.npy", np.full((20, 8), 3e38, np.float32)),
     "probe search"),
    (lambda v, e: _rewrite(v, S1, "embeddings.npy", e[1::2, :4]), "shape"),
    (lambda v, e: _edit_manifest(v, num_docs=41), "total"),
    (lambda v, e: _edit_manifest(v, dim=0), "dim"),
    (lambda v, e: _edit_manifest(v, step=4), "step"),
    (lambda v, e: _edit_manifest(v, shards=[]), "shard"),
    (lambda v, e: _edit_manifest(v, searcher="faiss"), "searcher"),
    (lambda v, e: _edit_manifest(v, format_version=99), "format_version"),
    (lambda v, e: (v / index_format.MANIFEST).write_bytes(b"\x00\xff{garbage"), "not JSON"),
    (lambda v, e: (v / index_format.MANIFEST).write_text("[1, 2]"), "not a JSON object"),
])
def test_versions_that_pass_checksums_but_are_wrong_are_rejected(tmp_path, corrupt, message):
  """Content checks: ids in range and unique, shapes, dtypes, finite values, a sane manifest."""
  shards, emb = _shards(np.random.default_rng(0))
  version = index_format.publish_index(tmp_path, 3, shards)
  index_format.load_index(tmp_path, 3, expected_dim=8, expected_num_docs=40)  # fine before
  corrupt(version, emb)
  with pytest.raises(index_format.IndexVersionError, match=message):
    index_format.load_index(tmp_path, 3, expected_dim=8, expected_num_docs=40)
  if message != "probe search":  # the builder's lighter check (no searchers, no probe)
    with pytest.raises(index_format.IndexVersionError, match=message):
      index_format.check_version(tmp_path, 3, expected_dim=8, expected_num_docs=40)


def test_scann_version_with_non_finite_embeddings_is_rejected(tmp_path):
  """A "scann" shard is judged by its stored vectors (ScaNN's re-scoring dataset, the shard's
  only copy: no embeddings.npy beside it)."""
  pytest.importorskip("scann")
  rng = np.random.default_rng(1)
  emb = rng.normal(size=(60, 8)).astype(np.float32)
  version = index_format.publish_index(tmp_path, 2, [(emb, np.arange(60))], searcher="scann")
  index_format.load_index(tmp_path, 2, expected_num_docs=60)
  shard = version / "shard-00000-of-00001"
  assert not (shard / "embeddings.npy").exists()
  manifest = json.loads((version / index_format.MANIFEST).read_text())
  np.testing.assert_array_equal(index_format.shard_vectors(version, manifest["shards"][0]), emb)
  name = next(n for n in manifest["shards"][0]["scann_files"] if n.endswith("/dataset.npy"))
  bad = np.where(np.arange(60)[:, None] == 59, np.nan, emb).astype(np.float32)
  np.save((shard / name).open("wb"), bad)
  manifest["shards"][0]["scann_files"][name] = hashlib.sha256(
      (shard / name).read_bytes()).hexdigest()
  (version / index_format.MANIFEST).write_text(json.dumps(manifest))
  with pytest.raises(index_format.IndexVersionError, match="not finite"):
    index_format.load_index(tmp_path, 2, expected_num_docs=60)
  np.save((shard / name).open("wb"), emb)
  manifest["shards"][0]["scann_files"][name] = hashlib.sha256(
      (shard / name).read_bytes()).hexdigest()
  (version / index_format.MANIFEST).write_text(json.dumps(manifest))
  # Doc ids that disagree with the ones stored inside the searcher.
  _rewrite(version, "shard-00000-of-00001", "embeddings.npy", emb)
  _rewrite(version, "shard-00000-of-00001", "doc_ids.npy", np.arange(60)[::-1].copy())
  with pytest.raises(index_format.IndexVersionError, match="does not match"):
    index_format.load_index(tmp_path, 2, expected_num_docs=60)


@pytest.mark.parametrize("content", [b"", b"seven", b"\x00\xff\xfe", b"-3", b"7.0", b"\n"])
def test_garbage_latest_is_an_index_version_error(tmp_path, content):
  (tmp_path / index_format.LATEST).write_bytes(content)
  with pytest.raises(index_format.IndexVersionError, match="not a step number"):
    index_format.latest_step(tmp_path)
  (tmp_path / index_format.LATEST).write_bytes(b" 12\n")
  assert index_format.latest_step(tmp_path) == 12


def test_latest_never_moves_backwards_but_replaces_garbage_or_missing_targets(tmp_path):
  shards, _ = _shards(np.random.default_rng(0))
  index_format.publish_index(tmp_path, 10, shards)
  index_format.publish_index(tmp_path, 5, shards)  # a late publish of an older step
  assert index_format.latest_step(tmp_path) == 10
  (tmp_path / index_format.LATEST).write_bytes(b"\x00garbage")
  index_format.publish_index(tmp_path, 7, shards)
  assert index_format.latest_step(tmp_path) == 7
  (tmp_path / index_format.LATEST).write_text("99")  # names a version that does not exist
  index_format.publish_index(tmp_path, 8, shards)
  assert index_format.latest_step(tmp_path) == 8
  index_format.publish_index(tmp_path, 12, shards)
  assert index_format.latest_step(tmp_path) == 12
  assert index_format.prune_versions(tmp_path, keep_last=2) == [5, 7, 8]
