"""gs:// workdirs (issue 10): every publish is correct on object storage, with no rename.

The real publish code runs against `fake_bucket` (a gs:// filesystem with no rename, folders
that are only key prefixes, atomic object writes): versions are loadable, nothing is ever
renamed, and a writer killed mid-publish leaves nothing a reader accepts.
"""

import json
import sys

import numpy as np
import pytest
from etils import epath

from realm_jax import lease as lease_lib
from realm_jax import main as main_lib
from realm_jax import storage
from realm_jax.data import corpus as corpus_lib
from realm_jax.data import corpus_versions as cv
from realm_jax.data import prepare
from realm_jax.data import tokenizer as tokenizer_lib
from realm_jax.retrieval import index_builder
from realm_jax.retrieval import index_format
from realm_jax.retrieval import searcher as searcher_lib
import fake_bucket  # pylint: disable=g-bad-import-order
import index_delta_test  # pylint: disable=g-bad-import-order
import tiny_configs  # pylint: disable=g-bad-import-order
from data_corpus_versions_test import NEW_PEOPLE  # pylint: disable=g-bad-import-order
from data_wiki_corpus_test import write_jsonl  # pylint: disable=g-bad-import-order

DIM = 8


@pytest.fixture
def bucket(monkeypatch, tmp_path):
  """gs://bkt/... served from a local folder with object-store semantics."""
  fs = fake_bucket.install(monkeypatch, tmp_path / "bucket-store")
  yield fs
  fake_bucket.clear_cache()


class Killed(Exception):
  """Stands for the writer's process dying at a pause point."""


def _kill_at(monkeypatch, module, point):
  def pause(name):
    if name == point:
      raise Killed(name)
  monkeypatch.setattr(module, "_pause", pause)


def _shards(rng, sizes):
  start, out = 0, []
  for n in sizes:
    out.append((rng.normal(size=(n, DIM)).astype(np.float32), np.arange(start, start + n)))
    start += n
  return out


def _objects(fs):
  """Every object key in the fake bucket."""
  return sorted(fs().find("gs://bkt"))


# --- the storage module itself ------------------------------------------------------------

def test_object_storage_is_told_by_scheme():
  assert storage.is_object_storage("gs://b/x") and storage.is_object_storage(epath.Path("s3://b"))
  assert not storage.is_object_storage("/tmp/x") and not storage.is_object_storage("file:///x")
  assert not storage.is_object_storage(epath.Path("relative/dir"))


def test_a_gs_workdir_without_gcsfs_names_the_extra(monkeypatch):
  registry = sys.modules["fsspec.registry"]._registry  # pylint: disable=protected-access
  for name in ("gs", "gcs"):
    monkeypatch.delitem(registry, name, raising=False)
  monkeypatch.setitem(sys.modules, "gcsfs", None)  # `import gcsfs` raises ImportError
  monkeypatch.setitem(sys.modules, "tensorflow", None)
  with pytest.raises(storage.StorageUnavailableError, match=r"realm_jax\[gcs\]"):
    storage.check_available("gs://bkt/run")
  storage.check_available("/tmp/run")  # local paths need nothing
  with pytest.raises(SystemExit, match=r"error: .*pip install 'realm_jax\[gcs\]'"):
    main_lib._check_storage(None, "gs://bkt/run")  # pylint: disable=protected-access
  config = tiny_configs.tiny_config("gs://bkt/corpus")
  with pytest.raises(SystemExit, match=r"gs://bkt/corpus"):
    main_lib._check_storage(config, "/tmp/run")  # pylint: disable=protected-access


def test_a_gs_workdir_with_a_filesystem_passes_the_check(bucket):
  del bucket
  storage.check_available("gs://bkt/run")


def test_fake_bucket_has_object_store_semantics(bucket):
  folder = epath.Path("gs://bkt/a")
  folder.mkdir(parents=True)
  assert not folder.exists()  # a prefix is not an object
  (folder / "x").write_text("1")
  assert folder.is_dir() and [p.name for p in folder.iterdir()] == ["x"]
  with pytest.raises(OSError, match="no rename"):
    folder.rename(epath.Path("gs://bkt/b"))
  (folder / "x").unlink()
  assert not folder.exists() and bucket.renames


def test_orbax_commit_file_is_the_one_orbax_writes():
  from orbax.checkpoint._src.path import atomicity_types  # pylint: disable=g-import-not-at-top
  assert storage.ORBAX_COMMIT_FILE == atomicity_types.COMMIT_SUCCESS_FILE


def test_orbax_picks_its_commit_file_protocol_for_gs_paths():
  """The trainer's CheckpointManager sets no atomicity option, so orbax's default for a gs://
  checkpoint folder applies: write in place, commit_success.txt last (no rename)."""
  from orbax.checkpoint._src.path import atomicity  # pylint: disable=g-import-not-at-top
  from orbax.checkpoint._src.path import atomicity_defaults  # pylint: disable=g-import-not-at-top
  assert (atomicity_defaults.get_default_temporary_path_class(epath.Path("gs://b/ckpt"))
          is atomicity.CommitFileTemporaryPath)
  assert (atomicity_defaults.get_default_temporary_path_class(epath.Path("/tmp/ckpt"))
          is atomicity.AtomicRenameTemporaryPath)


def test_builder_sees_only_committed_gs_checkpoints(bucket):
  del bucket
  ckpt = epath.Path("gs://bkt/run/checkpoints")
  (ckpt / "0" / storage.ORBAX_COMMIT_FILE).write_text("")
  (ckpt / "0" / "state" / "x").write_text("")
  (ckpt / "5" / "state" / "x").write_text("")  # a save still in flight (no commit file yet)
  assert index_builder.finished_checkpoint_steps(ckpt) == [0]


def test_publish_folder_local_keeps_tmp_then_rename(tmp_path):
  final = tmp_path / "v"
  with storage.publish_folder(epath.Path(final), "DONE") as folder:
    assert folder != final and folder.parent == final.parent
    (folder / "a").write_text("a")
    (folder / "DONE").write_text("")
    assert not final.exists()
  assert sorted(p.name for p in final.iterdir()) == ["DONE", "a"]
  with pytest.raises(Killed):
    with storage.publish_folder(epath.Path(tmp_path / "w"), "DONE") as folder:
      (folder / "a").write_text("a")
      raise Killed()
  assert sorted(p.name for p in tmp_path.iterdir()) == ["v"]


def test_publish_folder_on_a_bucket_writes_in_place_marker_last(bucket):
  final = epath.Path("gs://bkt/v")
  (final / "stale").write_text("a killed writer's object")
  with storage.publish_folder(final, "DONE") as folder:
    assert folder == final and not final.exists()  # the leftover was cleared
    (folder / "a").write_text("a")
    (folder / "DONE").write_text("")
  assert bucket.writes[-2:] == ["bkt/v/a", "bkt/v/DONE"] and not bucket.renames
  with pytest.raises(FileExistsError):
    with storage.publish_folder(final, "DONE"):
      pass
  with pytest.raises(Killed):
    with storage.publish_folder(epath.Path("gs://bkt/w"), "DONE") as folder:
      (folder / "a").write_text("a")
      raise Killed()
  assert not epath.Path("gs://bkt/w").exists()
  (epath.Path("gs://bkt/x") / "stale").write_text("")
  with pytest.raises(FileExistsError, match="leftover"):
    with storage.publish_folder(epath.Path("gs://bkt/x"), "DONE", clear_leftover=False):
      pass


# --- index versions -----------------------------------------------------------------------

def test_index_publish_on_a_bucket_never_renames_and_loads(bucket):
  root = epath.Path("gs://bkt/run/index")
  rng = np.random.default_rng(0)
  index_format.publish_index(root, 3, _shards(rng, [20, 12]))
  assert not bucket.renames
  assert index_format.latest_step(root) == 3 and index_format.list_versions(root) == [3]
  manifest, searcher = index_format.load_index(root, 3, expected_dim=DIM,
                                               expected_num_docs=32)
  assert manifest["num_docs"] == 32 and searcher is not None
  # Objects land in the version folder; the manifest after every shard file, LATEST last.
  writes = bucket.writes
  manifest_at = writes.index("bkt/run/index/3/MANIFEST.json")
  shard_files = [i for i, k in enumerate(writes) if "/shard-" in k]
  assert shard_files and max(shard_files) < manifest_at
  assert writes[-1] == "bkt/run/index/LATEST" and manifest_at < len(writes) - 1
  assert not [k for k in _objects(bucket) if ".tmp-" in k]
  assert index_format.pending_builds(root) == []
  assert index_format.read_build(root, 3) is None  # published: the withdraw path leaves it

  index_format.publish_index(root, 7, _shards(rng, [32]))
  assert index_format.latest_step(root) == 7
  assert index_format.prune_versions(root, keep_last=1) == [3]
  assert not epath.Path("gs://bkt/run/index/3").exists()
  assert not bucket.renames


@pytest.mark.parametrize("kind", ["exact", "scann"])
def test_delta_index_versions_on_a_bucket_share_shards_and_search_the_live_docs(bucket, kind):
  """Incremental index versions whose base shards stay in the parent's folder (`stored_at`)
  on object storage: no rename, shares resolved and loaded through gs://, pruning keeps the
  version whose shards a kept one reads."""
  root = epath.Path("gs://bkt/run/index")
  table, versions, keys = index_delta_test._chain(root, kind, 2)  # pylint: disable=protected-access
  assert not bucket.renames
  manifest, searcher = index_format.load_index(
      root, keys[2], expected_dim=index_delta_test.DIM,
      expected_num_docs=versions[2].corpus.num_docs, removed=versions[2].removed)
  assert [e.get("stored_at") for e in manifest["shards"]][:2] == [
      "5/shard-00000-of-00002", "5/shard-00001-of-00002"]
  # Only the change was written under 5+2/: of a base shard, its deleted ids and done marker.
  base_shard = "bkt/run/index/5+2/shard-00000-of-00004/"
  assert {k[len(base_shard):] for k in _objects(bucket) if k.startswith(base_shard)} == {
      "SHARD_DONE.json", "deleted_ids.npy"}
  live = versions[2].live_ids
  queries = table[np.r_[0:10, index_delta_test.N0:index_delta_test.N0 + 20]]
  ids, _ = searcher.search(queries, 10)
  assert not np.isin(ids, np.flatnonzero(versions[2].removed)).any()
  exact_ids, _ = searcher_lib.ExactSearcher(table[live], live).search(queries, 10)
  overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, exact_ids)])
  assert overlap == 1.0 if kind == "exact" else overlap >= 0.95, overlap
  index_format.prune_versions(root, keep_last=1)
  assert (root / "5" / index_format.MANIFEST).exists()  # 5+2 reads its shards
  assert index_format.load_index(root, keys[2], expected_dim=index_delta_test.DIM,
                                 expected_num_docs=versions[2].corpus.num_docs,
                                 removed=versions[2].removed)[1] is not None
  assert not bucket.renames


def test_index_writer_killed_before_the_manifest_publishes_nothing(bucket, monkeypatch):
  root = epath.Path("gs://bkt/run/index")
  rng = np.random.default_rng(1)
  index_format.publish_index(root, 2, _shards(rng, [16]))
  real_pause = index_format._pause  # pylint: disable=protected-access
  _kill_at(monkeypatch, index_format, "before_manifest")
  with pytest.raises(Killed):
    index_format.publish_index(root, 4, _shards(rng, [10, 6]))
  # The shards are on the bucket, in the version's own folder, but no reader takes them.
  assert epath.Path("gs://bkt/run/index/4/shard-00000-of-00002/SHARD_DONE.json").exists()
  assert index_format.list_versions(root) == [2] and index_format.latest_step(root) == 2
  with pytest.raises(index_format.IndexVersionError, match="not a complete index version"):
    index_format.load_index(root, 4)
  assert [b["version"] for b in index_format.pending_builds(root)] == ["4"]
  assert [p.name for p in index_format.incomplete_versions(root)] == ["4"]
  # The builder's start-up clean-up removes the dead build; a new publish then succeeds.
  assert index_builder.remove_stale_tmp(root) == ["4"]
  assert not epath.Path("gs://bkt/run/index/4").exists()
  monkeypatch.setattr(index_format, "_pause", real_pause)
  index_format.publish_index(root, 4, _shards(rng, [16]))
  assert index_format.latest_step(root) == 4
  index_format.load_index(root, 4, expected_num_docs=16)


def test_multi_writer_protocol_on_a_bucket(bucket):
  root = epath.Path("gs://bkt/run/index")
  rng = np.random.default_rng(2)
  build = index_format.start_version(root, 9, num_shards=2)
  assert index_format.tmp_dir(root, 9) == root / "9"
  for i, (emb, ids) in enumerate(_shards(rng, [5, 7])):
    assert index_format.pending_builds(root)[0]["attempt"] == build["attempt"]
    index_format.write_shard(root, build, i, emb, ids)
  assert index_format.list_versions(root) == []  # all shards done, still no version
  index_format.finish_version(root, build, expected_num_docs=12)
  assert index_format.list_versions(root) == [9] and index_format.pending_builds(root) == []
  # A restarted leader's fresh attempt of a published step is refused, not overwritten.
  with pytest.raises(index_format.IndexVersionError, match="already exists"):
    index_format.start_version(root, 9, num_shards=2)
  assert not bucket.renames


# --- corpus builds and versions -----------------------------------------------------------

def test_block_corpus_on_a_bucket(bucket, monkeypatch):
  root = epath.Path("gs://bkt/facts")
  config = tiny_configs.tiny_config(str(root / "corpus"))
  prepare.prepare_data(config, "gs://bkt/run")
  assert not bucket.renames
  assert (root / "corpus" / prepare.BUILD_CONFIG).exists()
  blocks = corpus_lib.load_block_corpus(root / "corpus" / "blocks")
  assert bucket.writes.index("bkt/facts/corpus/blocks/corpus.json") > max(
      i for i, k in enumerate(bucket.writes) if k.startswith("bkt/facts/corpus/blocks/"
                                                               ) and k.endswith(".npy"))
  assert bucket.writes[-1] == f"bkt/facts/corpus/{prepare.BUILD_CONFIG}"
  data = prepare.prepare_data(config, "gs://bkt/run", build=False)  # loads from the bucket
  assert data.corpus.num_docs == blocks.num_docs

  # A save killed after the first array: no corpus.json, so nothing loads, and nothing stays.
  calls = []
  real_save = np.save

  def dying_save(f, array, *args, **kwargs):
    calls.append(1)
    if len(calls) == 2:
      raise Killed()
    return real_save(f, array, *args, **kwargs)
  monkeypatch.setattr(np, "save", dying_save)
  target = epath.Path("gs://bkt/copy")
  with pytest.raises(Killed):
    corpus_lib.save_block_corpus(blocks, target)
  with pytest.raises(FileNotFoundError):
    corpus_lib.load_block_corpus(target)
  monkeypatch.setattr(np, "save", real_save)
  corpus_lib.save_block_corpus(blocks, target)
  assert corpus_lib.load_block_corpus(target).num_docs == blocks.num_docs
  with pytest.raises(FileExistsError):
    corpus_lib.save_block_corpus(blocks, target)
  assert not bucket.renames


@pytest.fixture
def gs_corpus(bucket):
  config = tiny_configs.tiny_config("gs://bkt/corpus")
  prepare.prepare_data(config, "gs://bkt/run")
  return epath.Path("gs://bkt/corpus")


def test_corpus_version_on_a_bucket_publishes_without_rename(bucket, gs_corpus, tmp_path):
  add = write_jsonl(tmp_path / "add.jsonl", NEW_PEOPLE)
  n0 = cv.load_version(gs_corpus, 0).corpus.num_docs
  manifest = cv.update_corpus(gs_corpus, add=str(add))
  assert not bucket.renames
  assert cv.latest_version(gs_corpus) == 1 and cv.list_versions(gs_corpus) == [0, 1]
  v1 = cv.load_version(gs_corpus)
  assert v1.version == 1 and v1.corpus.num_docs == n0 + 2
  # Every file written is listed with its checksum (os.walk would have found none on gs://).
  assert {"blocks/corpus.json", "removed.npy", "block_texts.jsonl",
          "salient_spans.npz"} <= set(manifest["files"])
  writes = [k for k in bucket.writes if k.startswith("bkt/corpus/versions/000001/")]
  assert writes[-1] == f"bkt/corpus/versions/000001/{cv.MANIFEST}"
  assert bucket.writes.index(f"bkt/corpus/{cv.LATEST}") > bucket.writes.index(
      f"bkt/corpus/versions/000001/{cv.MANIFEST}")
  assert not (gs_corpus / lease_lib.lease_path(gs_corpus, cv.LEASE_ROLE).name).exists()
  # A delta on the delta: version 2 reads the build's and version 1's rows from the bucket.
  remove = tmp_path / "remove.txt"
  remove.write_text(f"{n0}\n1\n")
  cv.update_corpus(gs_corpus, remove=str(remove))
  v2 = cv.load_version(gs_corpus)
  assert [number for number, *_ in v2.chain] == [0, 1, 2] and not bucket.renames
  np.testing.assert_array_equal(np.flatnonzero(v2.removed), [1, n0])
  v0 = cv.load_version(gs_corpus, 0)
  null = np.asarray(v0.corpus.retriever_tokens[n0])
  for doc, expected in ((0, v0.corpus.retriever_tokens[0]), (1, null), (n0, null),
                        (n0 + 1, v1.corpus.retriever_tokens[n0 + 1])):
    np.testing.assert_array_equal(v2.corpus.retriever_tokens[doc], expected)


def test_corpus_update_killed_before_the_manifest_publishes_nothing(bucket, gs_corpus, tmp_path,
                                                                     monkeypatch):
  add = write_jsonl(tmp_path / "add.jsonl", NEW_PEOPLE)
  _kill_at(monkeypatch, cv, "before_manifest")
  with pytest.raises(Killed):
    cv.update_corpus(gs_corpus, add=str(add))
  assert cv.list_versions(gs_corpus) == [0] and cv.latest_version(gs_corpus) == 0
  with pytest.raises(cv.CorpusVersionError, match="not published"):
    cv.load_version(gs_corpus, 1)
  # A killed process (no exception handler ran) leaves objects; the next update clears them.
  (gs_corpus / cv.VERSIONS_DIR / "000001" / "removed.npy").write_bytes(b"partial")
  monkeypatch.setattr(cv, "_pause", lambda point: None)
  cv.update_corpus(gs_corpus, add=str(add))
  assert cv.latest_version(gs_corpus) == 1 and cv.load_version(gs_corpus).version == 1
  assert not bucket.renames


def test_lease_on_a_bucket_is_one_object_write(bucket):
  held = lease_lib.acquire("gs://bkt/run", "trainer", settle_seconds=0.0)
  try:
    record = json.loads(lease_lib.lease_path("gs://bkt/run", "trainer").read_text())
    assert record["owner"] == held.owner
    with pytest.raises(lease_lib.LeaseHeldError):
      lease_lib.acquire("gs://bkt/run", "trainer", settle_seconds=0.0)
  finally:
    held.release()
  assert not lease_lib.lease_path("gs://bkt/run", "trainer").exists() and not bucket.renames


# --- the sharded wiki build ---------------------------------------------------------------

def test_wiki_build_on_a_bucket_matches_a_local_one(bucket, tmp_path, monkeypatch):
  from data_wiki_corpus_test import DOC_LEN, make_articles  # pylint: disable=g-import-not-at-top
  from realm_jax.data import wiki_corpus as wc  # pylint: disable=g-import-not-at-top
  source = f"jsonl:{write_jsonl(tmp_path / 'a.jsonl', make_articles(12))}"
  tokenizer = tokenizer_lib.train_wordpiece(
      [a["title"] + " " + a["text"] for a in make_articles(12)], 300, tmp_path / "vocab")
  local = tmp_path / "local"
  wc.build_wiki_corpus(source, local, tokenizer, doc_len=DOC_LEN, num_shards=2)
  out = epath.Path("gs://bkt/wiki")

  # Shard 1 killed mid-write: shard 0 finished, shard 1 has no shard.json, nothing merged.
  real_write = wc._write_batch  # pylint: disable=protected-access
  def dying_write(*args, **kwargs):
    raise Killed()
  wc.build_shard(source, out, tokenizer, 0, 2, doc_len=DOC_LEN)
  monkeypatch.setattr(wc, "_write_batch", dying_write)
  with pytest.raises(Killed):
    wc.build_shard(source, out, tokenizer, 1, 2, doc_len=DOC_LEN)
  assert not (out / wc.SHARDS_DIR / wc.shard_name(1, 2) / wc.SHARD_METADATA).exists()
  # ... and a merge killed before its report: the build is not done.
  monkeypatch.setattr(wc, "_write_batch", real_write)
  wc.build_shard(source, out, tokenizer, 1, 2, doc_len=DOC_LEN)
  real_spans = wc._write_spans_npz  # pylint: disable=protected-access
  monkeypatch.setattr(wc, "_write_spans_npz", dying_write)
  with pytest.raises(Killed):
    wc.merge_shards(out)
  assert not (out / wc.REPORT_FILE).exists()
  monkeypatch.setattr(wc, "_write_spans_npz", real_spans)
  wc.build_wiki_corpus(source, out, tokenizer, doc_len=DOC_LEN, num_shards=2)
  assert not bucket.renames
  assert bucket.writes[-1] == f"bkt/wiki/{wc.REPORT_FILE}"
  ours = corpus_lib.load_block_corpus(out / wc.BLOCKS_DIR, mmap=False)
  theirs = corpus_lib.load_block_corpus(epath.Path(local) / wc.BLOCKS_DIR, mmap=False)
  for name in corpus_lib._ARRAY_NAMES:  # pylint: disable=protected-access
    np.testing.assert_array_equal(getattr(ours, name), getattr(theirs, name), err_msg=name)
  assert (out / wc.TEXTS_FILE).read_text() == (local / wc.TEXTS_FILE).read_text()
  spans, local_spans = wc.load_salient_spans(out), wc.load_salient_spans(local)
  assert spans.keys() == local_spans.keys() and all(
      np.array_equal(spans[k], local_spans[k]) for k in spans)


def test_run_config_and_metrics_files_on_a_bucket(bucket):
  from realm_jax import config_lib  # pylint: disable=g-import-not-at-top
  config = tiny_configs.tiny_config()
  config_lib.save_run_config(config, "gs://bkt/run")
  loaded = config_lib.load_run_config("gs://bkt/run")
  assert loaded.train.batch_size == config.train.batch_size and loaded.data.corpus == "facts"
  path = epath.Path("gs://bkt/run/metrics/x.json")
  storage.write_text(path, "{}")  # how metrics writes hparams.json and a truncated jsonl
  assert path.read_text() == "{}"
  assert not bucket.renames and not [k for k in _objects(bucket) if ".tmp" in k]


def test_a_stale_shard_writer_leaves_a_published_version_alone(bucket):
  root = epath.Path("gs://bkt/run/index")
  rng = np.random.default_rng(3)
  (emb, ids), = _shards(rng, [6])
  stale = index_format.start_version(root, 5, num_shards=1)
  build = index_format.start_version(root, 5, num_shards=1)  # the leader restarted
  index_format.write_shard(root, build, 0, emb, ids)
  index_format.finish_version(root, build)
  with pytest.raises(index_format.StaleBuildError):
    index_format.write_shard(root, stale, 0, emb[::-1], ids)
  index_format.load_index(root, 5, expected_num_docs=6)  # intact
