"""Incremental index versions (issue 11): a corpus update on the parameters of the index in use.

Library level on synthetic clustered vectors (fast, no model): ScaNN upsert/delete and the
exact searcher's append/mask against a full rebuild, removed ids never returned, a builder
killed mid-update publishes nothing. Then the builder + watcher path on a real (facts) corpus
version with a deterministic bag-of-wordpieces embedder standing in for the model.
"""

import os
import subprocess
import sys
import textwrap
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from realm_jax.data import corpus_versions as cv
from realm_jax.data import prepare
from realm_jax.retrieval import index_builder
from realm_jax.retrieval import index_format
from realm_jax.retrieval import index_update
from realm_jax.retrieval import scann_searcher
from realm_jax.retrieval import searcher as searcher_lib
from realm_jax.retrieval import watcher as watcher_lib
import lexical_embedder  # pylint: disable=g-bad-import-order
from data_wiki_corpus_test import write_jsonl  # pylint: disable=g-bad-import-order
from tiny_configs import tiny_config  # pylint: disable=g-bad-import-order

DIM = 32


def clustered(rng, n, centers):
  """[n, DIM] unit float32 points around random cluster centers (like trained embeddings; unit
  norm, so under inner product a point is its own nearest neighbour)."""
  which = rng.integers(len(centers), size=n)
  points = centers[which] + 0.3 * rng.normal(size=(n, DIM))
  return (points / np.linalg.norm(points, axis=1, keepdims=True)).astype(np.float32)


def fake_version(number, num_docs, removed_ids=()):
  """A CorpusVersion without blocks: what update_index needs (ids and tombstones)."""
  removed = np.zeros(num_docs, bool)
  removed[list(removed_ids)] = True
  return cv.CorpusVersion(number, types.SimpleNamespace(num_docs=num_docs), removed,
                          dict(version=number), None)


def overlap_at_k(a, b, k):
  return float(np.mean([len(set(x[:k]) & set(y[:k])) / k for x, y in zip(a, b)]))


@pytest.mark.parametrize("mode", ["delta", "rewrite"])
@pytest.mark.parametrize("kind", ["exact", "scann"])
def test_incremental_version_matches_a_full_rebuild(kind, mode, tmp_path):
  rng = np.random.default_rng(0)
  centers = rng.normal(size=(40, DIM)) * 2
  n0, n_add = 6000, 600  # a 10% update: 600 added, 300 removed
  table = clustered(rng, n0 + n_add, centers)  # the embedding of every doc id
  removed = rng.choice(n0, 300, replace=False)
  # 16 of 40 leaves searched: at 12, ScaNN's own run-to-run variation (its builds and upserts
  # are not bit-reproducible across processes) moved recall@10 of either index by up to 2.3%,
  # so a single comparison failed ~1 run in 4 (measured: incremental 0.9775-1.0, rebuild
  # 0.982-1.0); at 16 both stay >= 0.998 in 20 runs.
  options = dict(num_leaves=40, num_leaves_to_search=16) if kind == "scann" else {}
  old, new = fake_version(0, n0), fake_version(1, n0 + n_add, removed)
  shards = [(table[:3000], np.arange(3000)), (table[3000:n0], np.arange(3000, n0))]
  index_format.publish_index(tmp_path, 5, shards, searcher=kind, searcher_options=options)
  embedded = []
  def embed(rows):
    embedded.append(rows.copy())
    return table[rows]
  path = index_update.update_index(tmp_path, 5, old, new, embed, mode=mode)
  key = index_format.VersionKey(5, 1)
  assert path.name == "5+1" and index_format.latest_step(tmp_path) == key
  assert index_format.list_versions(tmp_path) == [5, key]
  np.testing.assert_array_equal(np.concatenate(embedded), np.arange(n0, n0 + n_add))  # only new
  manifest, searcher = index_format.load_index(tmp_path, key, expected_dim=DIM,
                                               expected_num_docs=n0 + n_add,
                                               removed=new.removed)
  assert (manifest["corpus_version"], manifest["param_step"], manifest["num_docs"],
          manifest["corpus_num_docs"]) == (1, 5, n0 + n_add - 300, n0 + n_add)
  assert manifest["incremental"]["added"] == n_add and manifest["incremental"]["removed"] == 300
  assert manifest["incremental"]["mode"] == mode
  kept = [3000 - np.isin(removed, np.arange(3000)).sum(),
          3000 - np.isin(removed, np.arange(3000, n0)).sum()]
  if mode == "rewrite":  # added blocks dealt round-robin into the shards
    assert [s["num_docs"] for s in manifest["shards"]] == [k + n_add // 2 for k in kept]
  else:  # the two shards shared (their files stay in 5/), the added ones in a shard of their own
    assert [s["num_docs"] for s in manifest["shards"]] == kept + [n_add]
    assert [s.get("stored_at") for s in manifest["shards"]] == [
        "5/shard-00000-of-00002", "5/shard-00001-of-00002", None]
    assert manifest["delta_shards"] == 1

  live = new.live_ids
  queries = clustered(rng, 200, centers)
  queries[:100] = table[n0:n0 + 100]  # about the added docs
  ids, _ = searcher.search(queries, 10)
  assert not np.isin(ids, removed).any()  # removed docs are never retrieved
  found = (ids[:100] == np.arange(n0, n0 + 100)[:, None]).any(axis=1)  # added docs retrieved
  assert found.mean() >= (1.0 if kind == "exact" else 0.98), found.mean()
  # Reference: a full rebuild (same kind and options) over the live docs' embeddings.
  full = searcher_lib.ShardedSearcher([
      s for _, _, s in index_update.make_full_shards(new, table[live], kind, options, 2)])
  full_ids, _ = full.search(queries, 10)
  exact_ids, _ = searcher_lib.ExactSearcher(table[live], live).search(queries, 10)
  # Recall@10 against the exact top 10: the incremental index keeps >= 98% of what a full
  # rebuild reaches (a fresh clone on 2026-12-03 saw 0.9875 vs 1.0 once: ScaNN's run-to-run
  # variation, so 99% was flaky). (Comparing the two approximate result lists directly would mostly measure
  # the rebuild's own misses: ScaNN training is randomized.)
  recall, recall_full = overlap_at_k(ids, exact_ids, 10), overlap_at_k(full_ids, exact_ids, 10)
  print(f"{kind}: recall@10 incremental {recall:.4f}, full rebuild {recall_full:.4f}, "
        f"overlap {overlap_at_k(ids, full_ids, 10):.4f}")
  assert recall >= 0.98 * recall_full
  if kind == "exact":
    np.testing.assert_array_equal(ids, exact_ids)


@pytest.mark.parametrize("kind", ["exact", "scann"])
def test_apply_update_changes_an_in_memory_searcher_like_the_published_update(kind):
  """The trainer-side path (`apply_update`, then `shards_to_publish`): a 2-shard searcher
  after an update holds exactly the live ids, added ones dealt round-robin, and searches like
  the exact searcher over the live rows (ScaNN brute force below BRUTE_FORCE_BELOW: exact)."""
  rng = np.random.default_rng(3)
  table = clustered(rng, 700, rng.normal(size=(10, DIM)) * 2)
  shards = [scann_searcher.make_searcher(kind, table[i:i + 300], np.arange(i, i + 300))
            for i in (0, 300)]
  removed = np.array([1, 2, 299, 300, 450])
  added = np.arange(600, 700)
  updated = index_update.apply_update(searcher_lib.ShardedSearcher(shards), table[added],
                                      added, removed)
  published, searchers = index_update.shards_to_publish(updated)
  held = np.concatenate([ids for _, ids in published])
  live = np.setdiff1d(np.arange(700), removed)
  np.testing.assert_array_equal(np.sort(held), live)
  assert [len(ids) for _, ids in published] == [297 + 50, 298 + 50] and len(searchers) == 2
  assert all((rows is None) == (kind == "scann") for rows, _ in published)
  queries = table[[0, 5, 299, 300, 600, 650, 699]]
  ids, _ = updated.search(queries, 5)
  exact_ids, _ = searcher_lib.ExactSearcher(table[live], live).search(queries, 5)
  np.testing.assert_array_equal(ids, exact_ids)


def test_scann_upsert_delete_and_rebalance_keep_recall(tmp_path):
  rng = np.random.default_rng(1)
  centers = rng.normal(size=(30, DIM)) * 2
  x = clustered(rng, 4000, centers)
  searcher = scann_searcher.ScannSearcher(x, np.arange(4000), num_leaves=40,
                                          num_leaves_to_search=12)
  added = clustered(rng, 400, centers)
  searcher.delete(np.arange(0, 4000, 10))  # 400 gone
  searcher.upsert(added, np.arange(10_000, 10_400))
  ids = np.concatenate([np.setdiff1d(np.arange(4000), np.arange(0, 4000, 10)),
                        np.arange(10_000, 10_400)])
  emb = np.concatenate([x[np.setdiff1d(np.arange(4000), np.arange(0, 4000, 10))], added])
  assert searcher.num_docs == 4000 and sorted(searcher.doc_ids.tolist()) == ids.tolist()
  queries = clustered(rng, 100, centers)
  exact, _ = searcher_lib.ExactSearcher(emb, ids).search(queries, 10)
  got, _ = searcher.search(queries, 10)
  assert overlap_at_k(got, exact, 10) >= 0.95 and not np.isin(got, np.arange(0, 4000, 10)).any()
  searcher.rebalance()
  got, _ = searcher.search(queries, 10)
  assert overlap_at_k(got, exact, 10) >= 0.95
  with pytest.raises(KeyError, match="not in this shard"):
    searcher.delete(np.array([10]))  # removed already
  searcher.save(tmp_path / "s")
  loaded = scann_searcher.ScannSearcher.load(tmp_path / "s")
  np.testing.assert_array_equal(loaded.search(queries, 10)[0], got)


def test_a_version_holding_a_removed_doc_is_rejected(tmp_path):
  rng = np.random.default_rng(2)
  emb = rng.normal(size=(50, 8)).astype(np.float32)
  key = index_format.VersionKey(3, 1)
  index_format.publish_index(tmp_path, key, [(emb, np.arange(50))],
                             extra=dict(corpus_version=1, corpus_num_docs=60))
  removed = np.zeros(60, bool)
  removed[[4, 9]] = True
  with pytest.raises(index_format.IndexVersionError, match="2 removed .*tombstoned"):
    index_format.load_index(tmp_path, key, expected_num_docs=60, removed=removed)
  removed[:] = False
  with pytest.raises(index_format.IndexVersionError, match="50 docs, the corpus version has 60"):
    index_format.load_index(tmp_path, key, expected_num_docs=60, removed=removed)


def test_version_keys_order_by_step_then_corpus_version(tmp_path):
  k = index_format.VersionKey
  assert sorted([k(6), k(3, 2), 3, k(3, 1), k(6, 1)]) == [3, k(3, 1), k(3, 2), 6, k(6, 1)]
  assert k(3) == 3 and k(3, 1) != 3 and 3 < k(3, 1) < 4 and k(3, 1) + 3 == 6
  assert str(k(3, 1)) == "3+1" and index_format.parse_version("3+1") == k(3, 1)
  assert index_format.parse_version("3+0") is None and index_format.parse_version("x") is None
  (tmp_path / index_format.LATEST).write_text("12+4")
  assert index_format.latest_step(tmp_path) == k(12, 4)


def test_builder_killed_mid_update_publishes_nothing(tmp_path):
  root = tmp_path / "index"
  table = np.random.default_rng(0).normal(size=(120, 8)).astype(np.float32)
  np.save(tmp_path / "table.npy", table)
  index_format.publish_index(root, 4, [(table[:100], np.arange(100))])
  script = textwrap.dedent(f"""
      import sys
      import numpy as np
      sys.path.insert(0, {os.path.dirname(__file__)!r})
      from index_update_test import fake_version
      from realm_jax.retrieval import index_update
      table = np.load(sys.argv[2])
      index_update.update_index(sys.argv[1], 4, fake_version(0, 100),
                                fake_version(1, 120, [1, 2]), lambda rows: table[rows])
  """)
  marker = tmp_path / "paused"
  env = dict(os.environ, **{index_format.PAUSE_ENV: "before_manifest",
                            index_format.PAUSE_MARKER_ENV: str(marker)})
  proc = subprocess.Popen([sys.executable, "-c", script, str(root), str(tmp_path / "table.npy")],
                          env=env, cwd=os.getcwd())
  try:
    deadline = time.time() + 120
    while not marker.exists():
      assert proc.poll() is None and time.time() < deadline, "the update never paused"
      time.sleep(0.1)
    # Both shards done: the shared one (4/'s, minus ids 1 and 2) and the one of added blocks.
    assert all((root / ".tmp-4+1" / index_format.shard_name(i, 2) / index_format.SHARD_DONE
                ).exists() for i in range(2))
  finally:
    proc.kill()
    proc.wait()
  # Killed after every shard was written, before the manifest: nothing new is visible.
  assert index_format.list_versions(root) == [4] and index_format.latest_step(root) == 4
  assert not (root / "4+1").exists()
  assert index_builder.remove_stale_tmp(root) == [".tmp-4+1"]  # the restarted leader cleans up
  index_update.update_index(root, 4, fake_version(0, 100), fake_version(1, 120, [1, 2]),
                            lambda rows: table[rows])
  assert index_format.list_versions(root) == [4, index_format.VersionKey(4, 1)]


# ---- The builder and the trainer's watcher on a real corpus version ------------------------


class _BagOfWordpiecesBuilder(index_builder.IndexBuilder):
  """IndexBuilder with a deterministic embedder: a fixed random vector per wordpiece, summed
  over a block's non-pad tokens and normalized (stands in for the model: no checkpoint)."""

  def _ensure_model(self, wait_seconds, poll_seconds, wait_log_seconds=60.0):
    if self.corpus is not None:
      return
    data = prepare.prepare_data(self.config, self.workdir, build=False)
    self.corpus_dir = data.directory
    self._corpora[0] = cv.CorpusVersion(0, data.corpus, np.zeros(data.corpus.num_docs, bool),
                                        dict(version=0), data.directory)
    self._refresh_corpus_version()
    self._embed_docs = lexical_embedder.bag_of_wordpieces(
        data.corpus.vocab_size, self.config.model.embed_dim, data.corpus.special.pad)

  def _params(self, step):
    self.param_steps = getattr(self, "param_steps", []) + [int(step)]
    return None


def test_builder_publishes_incremental_versions_and_the_watcher_swaps_them(tmp_path):
  config = tiny_config(tmp_path / "corpus")
  prepare.prepare_data(config, tmp_path)
  (tmp_path / "checkpoints" / "0").mkdir(parents=True)
  (tmp_path / "checkpoints" / "3").mkdir()
  builder = _BagOfWordpiecesBuilder(config, tmp_path, devices=jax.local_devices()[:1])
  assert builder.run(poll_seconds=0.01, max_builds=1) == [3]
  base = builder.corpus
  n0 = base.num_docs

  watcher = watcher_lib.IndexWatcher(tmp_path / "index", config.model.embed_dim, n0, 0.05,
                                     corpus_dir=tmp_path / "corpus").start()
  try:
    index = watcher_lib.WatchedIndex(watcher, base.null_id)
    index.wait_for_first(30)
    assert index.step == 3 and index.corpus is None
    from realm_jax.train import loop  # pylint: disable=g-import-not-at-top
    # What the trainer's added-block queries follow (loop.added_block_queries): nothing yet.
    assert getattr(loop._indexed_corpus_version(index), "version", 0) == 0  # pylint: disable=protected-access

    new_people = [dict(title=f"Zed Person {i}",
                       text=f"Zed Person {i} works as a pilot. Zed Person {i} plays the harp.")
                  for i in range(6)]
    add = write_jsonl(tmp_path / "add.jsonl", new_people)
    remove = tmp_path / "remove.txt"
    remove.write_text("0\n1\n2\n")
    cv.update_corpus(tmp_path / "corpus", add=str(add), remove=str(remove))
    key = index_format.VersionKey(3, 1)
    assert builder.run(poll_seconds=0.01, max_builds=1) == [key]
    assert builder.param_steps == [3, 3]  # the update used the parameters of version 3
    manifest = index_format.read_manifest(tmp_path / "index", key)
    assert manifest["incremental"]["embedded"] == 6 and manifest["incremental"]["removed"] == 3
    assert manifest["corpus_version"] == 1 and manifest["num_docs"] == n0 + 6 - 3

    deadline = time.time() + 30
    while not index.maybe_swap():
      assert time.time() < deadline, f"no swap: rejected {watcher.rejected}"
      time.sleep(0.05)
    assert index.step == key and index.corpus.num_docs == n0 + 6
    # The builder's version is the one the trainer draws added-block queries from: version 1,
    # its corpus, tombstones and folder (where its salient spans are stored).
    indexed = loop._indexed_corpus_version(index)  # pylint: disable=protected-access
    assert indexed.version == 1 and indexed.corpus is index.corpus
    np.testing.assert_array_equal(np.flatnonzero(indexed.removed), [0, 1, 2])
    assert indexed.directory == cv.load_version(tmp_path / "corpus", 1).directory
    # Query with a new block's own tokens: the new block comes first; removed ones never.
    version = cv.load_version(tmp_path / "corpus", 1)
    rows = np.arange(n0, n0 + 6)
    query = np.asarray(builder._embed_docs(None, jnp.asarray(version.corpus.retriever_tokens[rows]),
                                           None))
    ids, mask = index.retrieve(query, np.full(6, -1), 5, 2)
    assert (ids[:, 0] == n0 + 6).all()  # the new null id in slot 0
    np.testing.assert_array_equal(ids[:, 1], rows)
    everything, _ = index.searcher.search(query, n0 + 6)
    assert not np.isin(everything, [0, 1, 2]).any() and mask.all()

    # A newer checkpoint: the usual full refresh over the newest corpus version.
    (tmp_path / "checkpoints" / "6").mkdir()
    assert builder.run(poll_seconds=0.01, max_builds=1) == [6]
    assert index_format.latest_step(tmp_path / "index") == index_format.VersionKey(6, 1)
    full = index_format.read_manifest(tmp_path / "index", index_format.VersionKey(6, 1))
    assert "incremental" not in full and full["num_docs"] == n0 + 3
  finally:
    watcher.stop()


def test_the_loop_gathers_candidates_from_the_index_corpus_version():
  from realm_jax.train import loop  # pylint: disable=g-import-not-at-top
  base, newer = object(), object()
  config = types.SimpleNamespace(k=4, margin=2)
  with_version = types.SimpleNamespace(corpus=newer)
  assert loop.Retriever(True, config, base, with_version, None, None).candidate_corpus(
      base) is newer
  without = types.SimpleNamespace(corpus=None)  # a builder version over the build itself
  assert loop.Retriever(True, config, base, without, None, None).candidate_corpus(base) is base
  assert loop.Retriever(False, config, base, None, None, None).candidate_corpus(base) is base
