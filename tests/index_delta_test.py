"""Delta index versions (issue 11): an incremental version shares the unchanged shards.

A chain of corpus updates on one parameter step: each delta version writes only the deleted
ids and one shard of added blocks (bytes scale with the change), loads exactly the live docs,
and after `max_delta_shards` updates one rewrite folds everything back into the base shards.
Pruning keeps a version while a kept one reads its files; a tampered or escaping share is
refused.
"""

import json
import shutil

import numpy as np
import pytest
from etils import epath

from realm_jax import storage
from realm_jax.retrieval import index_format
from realm_jax.retrieval import index_update
from realm_jax.retrieval import searcher as searcher_lib
from index_update_test import DIM, clustered, fake_version  # pylint: disable=g-bad-import-order

N0 = 4000  # docs of the first build, in 2 shards
ADD, REMOVE = 40, 20  # per update: 1% added, 0.5% removed


def _chain(tmp_path, kind, updates, **kwargs):
  """Publishes version 5 (2 shards) and `updates` corpus updates on it; -> (table of every doc
  id's vector, the corpus versions [0..updates], the published version keys)."""
  rng = np.random.default_rng(0)
  table = clustered(rng, N0 + updates * ADD, rng.normal(size=(30, DIM)) * 2)
  index_format.publish_index(tmp_path, 5, [(table[:2000], np.arange(2000)),
                                           (table[2000:N0], np.arange(2000, N0))],
                             searcher=kind,  # ScaNN: 10 of 20 leaves searched, recall ~1
                             searcher_options=dict(num_leaves=20, num_leaves_to_search=10)
                             if kind == "scann" else None)
  versions, keys, removed = [fake_version(0, N0)], [index_format.VersionKey(5)], []
  for u in range(1, updates + 1):
    live = np.setdiff1d(np.arange(N0 + (u - 1) * ADD), removed)
    removed = removed + rng.choice(live, REMOVE, replace=False).tolist()
    versions.append(fake_version(u, N0 + u * ADD, removed))
    index_update.update_index(tmp_path, keys[-1], versions[-2], versions[-1],
                              lambda rows: table[rows], **kwargs)
    keys.append(index_format.VersionKey(5, u))
  return table, versions, keys


def _version_bytes(root, key):
  folder = epath.Path(root) / str(key)
  return sum((folder / n).stat().length for n in storage.list_files(folder))


@pytest.mark.parametrize("kind", ["exact", "scann"])
def test_delta_versions_write_only_the_change_and_load_the_live_docs(kind, tmp_path):
  table, versions, keys = _chain(tmp_path, kind, 3)
  full_bytes = _version_bytes(tmp_path, keys[0])
  queries = table[np.r_[0:20, N0:N0 + 20, N0 + 2 * ADD:N0 + 2 * ADD + 20]]
  for u in (1, 2, 3):
    manifest, searcher = index_format.load_index(
        tmp_path, keys[u], expected_dim=DIM, expected_num_docs=N0 + u * ADD,
        removed=versions[u].removed)
    info = manifest["incremental"]
    assert info["mode"] == "delta" and manifest["delta_shards"] == u
    # The base shards stay in 5/ (never in an intermediate version), one update shard each.
    assert [e.get("stored_at") for e in manifest["shards"]] == (
        ["5/shard-00000-of-00002", "5/shard-00001-of-00002"] +
        [f"5+{v}/{index_format.shard_name(v + 1, v + 2)}" for v in range(1, u)] + [None])
    assert sum(e["num_docs"] for e in manifest["shards"]) == len(versions[u].live_ids)
    # What the version wrote: the added shard and the deleted-id lists, ~1% of a full build.
    manifest_bytes = (tmp_path / str(keys[u]) / index_format.MANIFEST).stat().st_size
    assert info["bytes_written"] == _version_bytes(tmp_path, keys[u]) - manifest_bytes
    assert info["bytes_written"] < 0.08 * full_bytes, (info["bytes_written"], full_bytes)
    live = versions[u].live_ids
    ids, _ = searcher.search(queries, 10)
    assert not np.isin(ids, np.flatnonzero(versions[u].removed)).any()
    exact_ids, _ = searcher_lib.ExactSearcher(table[live], live).search(queries, 10)
    if kind == "exact":
      np.testing.assert_array_equal(ids, exact_ids)
    else:  # ScaNN trees from the first build (the update shards: brute force, small)
      overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, exact_ids)])
      assert overlap >= 0.97, overlap
  # The builder's and QA's readers: live rows only, as the loaded searcher holds them.
  manifest = index_format.read_manifest(tmp_path, keys[3])
  rows = [index_format.shard_rows(tmp_path / str(keys[3]), e) for e in manifest["shards"]]
  held = np.concatenate([ids for _, ids in rows])
  np.testing.assert_array_equal(np.sort(held), versions[3].live_ids)
  np.testing.assert_allclose(np.concatenate([r for r, _ in rows]), table[held],
                             atol=0 if kind == "exact" else 1e-6)


def test_max_delta_shards_folds_the_updates_back_into_the_base_shards(tmp_path):
  table, versions, keys = _chain(tmp_path, "exact", 3, max_delta_shards=2)
  manifest, searcher = index_format.load_index(tmp_path, keys[3], removed=versions[3].removed)
  info = manifest["incremental"]
  assert info["mode"] == "rewrite" and "max_delta_shards=2" in info["rewrite_reason"]
  assert manifest["delta_shards"] == 0 and len(manifest["shards"]) == 2
  assert not any("stored_at" in e for e in manifest["shards"])
  live = versions[3].live_ids
  queries = table[np.r_[0:10, N0:N0 + 3 * ADD:4]]
  np.testing.assert_array_equal(searcher.search(queries, 10)[0],
                                searcher_lib.ExactSearcher(table[live], live).search(queries,
                                                                                     10)[0])
  # Folded: every doc of the update shards is in a base shard now, dealt round-robin.
  assert abs(manifest["shards"][0]["num_docs"] - manifest["shards"][1]["num_docs"]) <= 60
  # Nothing reads 5/ any more: pruning to one version removes every older one.
  assert index_format.prune_versions(tmp_path, 1) == keys[:3]
  assert index_format.list_versions(tmp_path) == [keys[3]]


def test_a_large_deletion_rewrites(tmp_path):
  rng = np.random.default_rng(1)
  table = clustered(rng, 1000, rng.normal(size=(10, DIM)))
  index_format.publish_index(tmp_path, 2, [(table[:900], np.arange(900))])
  index_update.update_index(tmp_path, 2, fake_version(0, 900),
                            fake_version(1, 1000, range(300)), lambda rows: table[rows])
  manifest = index_format.read_manifest(tmp_path, index_format.VersionKey(2, 1))
  assert manifest["incremental"]["mode"] == "rewrite"
  assert "max_deleted_fraction" in manifest["incremental"]["rewrite_reason"]
  assert [e["num_docs"] for e in manifest["shards"]] == [700]


def test_pruning_keeps_a_version_while_a_kept_one_shares_its_shards(tmp_path):
  _, versions, keys = _chain(tmp_path, "exact", 3)
  # keep_last=1: 5+3 shares 5's base shards and the update shards of 5+1 and 5+2.
  assert index_format.prune_versions(tmp_path, 1) == []
  assert index_format.shared_from(tmp_path, keys[3]) == {"5", "5+1", "5+2"}
  index_format.load_index(tmp_path, keys[3], removed=versions[3].removed)
  # A version that nothing shares goes: rewrite 5+3 into 5+4, then only 5+4 is kept.
  gone = np.flatnonzero(versions[3].removed).tolist() + [int(versions[3].live_ids[0])]
  index_update.update_index(tmp_path, keys[3], versions[3],
                            fake_version(4, N0 + 3 * ADD, gone), lambda rows: rows,
                            mode="rewrite")
  assert index_format.prune_versions(tmp_path, 1) == keys
  assert index_format.list_versions(tmp_path) == [index_format.VersionKey(5, 4)]


def test_a_tampered_or_escaping_share_is_refused(tmp_path):
  _, versions, keys = _chain(tmp_path, "exact", 1)
  folder = tmp_path / str(keys[1])
  manifest = json.loads((folder / index_format.MANIFEST).read_text())

  def rewritten(change):
    broken = json.loads(json.dumps(manifest))
    change(broken["shards"][0])
    (folder / index_format.MANIFEST).write_text(json.dumps(broken))

  for change, message in [
      (lambda e: e.update(stored_at="../elsewhere/shard-00000-of-00002"), "bad stored_at"),
      (lambda e: e.update(stored_at="7/shard-00000-of-00002"), "not an older version"),
      (lambda e: e.pop("deleted_ids_sha256"), "lacks their checksum"),
      (lambda e: e.update(stored_num_docs=e["num_docs"] - 1), "stored_num_docs")]:
    rewritten(change)
    with pytest.raises(index_format.IndexVersionError, match=message):
      index_format.load_index(tmp_path, keys[1])
  (folder / index_format.MANIFEST).write_text(json.dumps(manifest))
  index_format.load_index(tmp_path, keys[1], removed=versions[1].removed)  # intact again
  # The deleted-id list is checksummed: a changed list (a removed doc back) is refused.
  deleted = folder / manifest["shards"][0]["name"] / index_format.DELETED_IDS
  ids = np.load(deleted)
  np.save(deleted, np.where(ids == ids[0], (ids[0] + 1) % 2000, ids))
  with pytest.raises(index_format.IndexVersionError, match="sha256|checksum"):
    index_format.load_index(tmp_path, keys[1])
  # The shared files gone (the parent deleted by hand): the version vanished, not garbage.
  shutil.rmtree(tmp_path / "5")
  np.save(deleted, ids)
  with pytest.raises(OSError):
    index_format.load_index(tmp_path, keys[1])
