"""Corpus versions (issue 11): add / remove / replace documents of a built corpus."""

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from realm_jax.data import corpus as corpus_lib
from realm_jax.data import corpus_versions as cv
from realm_jax.data import prepare
from realm_jax.data import tokenizer as tokenizer_lib
from realm_jax.data import wiki_corpus as wc
from realm_jax.data.sentences import split_sentences
import tiny_configs  # pylint: disable=g-bad-import-order
from data_helpers import PlainDoc  # pylint: disable=g-bad-import-order
from data_wiki_corpus_test import capitalized_spans, make_articles, write_jsonl  # pylint: disable=g-bad-import-order

# New people, written like the generated profiles (their words are in the facts vocabulary
# only partly: unknown pieces become [UNK], as they would in a full build with this vocab).
NEW_PEOPLE = [
    dict(title="Ada Quill", text="Ada Quill works as a baker. Ada Quill plays the harp."),
    dict(title="Bo Vettle", text="Bo Vettle was born in the year 1950. Vettle plays the flute."),
]


@pytest.fixture(scope="module")
def facts_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("facts")
  config = tiny_configs.tiny_config(root / "corpus")
  prepare.prepare_data(config, root)
  return root / "corpus"


@pytest.fixture
def corpus_dir(facts_dir, tmp_path):
  """A private copy of the built facts corpus (updates publish into it)."""
  target = tmp_path / "corpus"
  subprocess.run(["cp", "-r", str(facts_dir), str(target)], check=True)
  return target


def reference_blocks(corpus_dir, records, doc_len):
  """The blocks a full (facts) build makes of these records: build_block_corpus, row i = i."""
  tokenizer = tokenizer_lib.load_tokenizer(corpus_dir / "vocab.txt")
  docs = [PlainDoc(r["title"], tuple(r["text"][a:b] for a, b in split_sentences(r["text"])))
          for r in records]
  return corpus_lib.build_block_corpus(docs, tokenizer, doc_len)


def test_add_remove_replace_publishes_versions_with_stable_ids(corpus_dir, tmp_path):
  v0 = cv.load_version(corpus_dir, 0, mmap=False)
  n0 = v0.corpus.num_docs
  old_row = np.array(v0.corpus.retriever_tokens[5])
  add = write_jsonl(tmp_path / "add.jsonl", [NEW_PEOPLE[0], b"not json", NEW_PEOPLE[1],
                                             dict(title="No text")])
  remove = tmp_path / "remove.txt"
  remove.write_text(f"3\n{v0.corpus.titles[7]}\n")
  manifest = cv.update_corpus(corpus_dir, add=str(add), remove=str(remove))
  assert cv.latest_version(corpus_dir) == 1 and cv.list_versions(corpus_dir) == [0, 1]
  assert manifest["added"] == [n0, n0 + 2] and manifest["removed"] == sorted({3, 7})
  assert manifest["report"]["bad_records"] == {wc.INVALID_JSON: 1, wc.MISSING_TEXT: 1}
  assert manifest["report"]["records_ok"] == 2

  v1 = cv.load_version(corpus_dir, mmap=False)
  assert v1.version == 1 and v1.corpus.num_docs == n0 + 2 and v1.corpus.null_id == n0 + 2
  np.testing.assert_array_equal(np.flatnonzero(v1.removed), [3, 7])
  # New blocks: exactly what the full build makes of the same records.
  ref = reference_blocks(corpus_dir, NEW_PEOPLE, v0.corpus.doc_len)
  for name in ("retriever_tokens", "retriever_segments", "reader_tokens", "reader_lengths"):
    np.testing.assert_array_equal(getattr(v1.corpus, name)[n0:n0 + 2],
                                  getattr(ref, name)[:2], err_msg=name)
    # Tombstoned rows are the null block; other old rows and the null row are unchanged.
    for row in (3, 7):
      np.testing.assert_array_equal(getattr(v1.corpus, name)[row],
                                    getattr(v0.corpus, name)[v0.corpus.null_id])
    np.testing.assert_array_equal(getattr(v1.corpus, name)[v1.corpus.null_id],
                                  getattr(v0.corpus, name)[v0.corpus.null_id])
  np.testing.assert_array_equal(v1.corpus.retriever_tokens[5], old_row)
  assert v1.corpus.titles[n0:] == [p["title"] for p in NEW_PEOPLE]
  assert [s.tolist() for s in v1.corpus.sentence_ids(n0 + 1)] == [
      s.tolist() for s in ref.sentence_ids(1)]
  texts = [json.loads(line) for line in (cv.version_dir(corpus_dir, 1) /
                                         wc.TEXTS_FILE).open()]
  # Delta storage: the version holds the added rows only (texts, blocks), not a copy.
  assert [t["doc_id"] for t in texts] == [n0, n0 + 1] and texts[0]["version"] == 1
  stored = corpus_lib.load_block_corpus(cv.version_dir(corpus_dir, 1) / "blocks")
  assert stored.num_docs == 2 and manifest["storage"] == "delta"
  base_bytes = sum(f.stat().st_size for f in (corpus_dir / "blocks").iterdir())
  assert manifest["bytes_written"] < base_bytes / 4
  assert cv.text_files(v1) == [(corpus_dir / wc.TEXTS_FILE, 0, n0),
                               (cv.version_dir(corpus_dir, 1) / wc.TEXTS_FILE, n0, n0 + 2)]
  # The older version is untouched: a reader of it keeps working.
  again = cv.load_version(corpus_dir, 0, mmap=False)
  assert again.corpus.num_docs == n0 and not again.removed.any()
  np.testing.assert_array_equal(again.corpus.retriever_tokens, v0.corpus.retriever_tokens)

  # Replace a new person (its block is tombstoned, the new text appended): ids never reused.
  replace = write_jsonl(tmp_path / "replace.jsonl",
                        [dict(title="Ada Quill", text="Ada Quill works as a pilot.")])
  manifest = cv.update_corpus(corpus_dir, replace=str(replace))
  v2 = cv.load_version(corpus_dir, mmap=False)
  assert v2.version == 2 and manifest["parent"] == 1
  assert manifest["removed"] == [n0] and manifest["added"] == [n0 + 2, n0 + 3]
  added, removed = cv.changes(v1, v2)
  assert added.tolist() == [n0 + 2] and removed.tolist() == [n0]
  added, removed = cv.changes(v0, v2)
  assert added.tolist() == [n0 + 1, n0 + 2] and removed.tolist() == [3, 7]
  assert v2.live_ids.size == n0 + 3 - 3


PER_DOC = ("retriever_tokens", "retriever_segments", "reader_tokens", "reader_lengths")


def materialized(corpus):
  """A BlockCorpus of plain arrays holding what `corpus` (perhaps a chained view) reads."""
  arrays = {name: np.asarray(getattr(corpus, name)) for name in corpus_lib._ARRAY_NAMES}  # pylint: disable=protected-access
  return corpus_lib.BlockCorpus(**arrays, titles=list(corpus.titles),
                                vocab_size=corpus.vocab_size, special=corpus.special,
                                fingerprint=corpus.fingerprint)


def expected_rows(v0, removed_ids, added_ref, name):
  """What a version must read for a per-doc array: the build's rows with the tombstoned ones
  as the null row, the added blocks (a full build of their records), the null row."""
  base = np.array(getattr(v0.corpus, name))
  null = base[v0.corpus.null_id]
  rows = np.concatenate([base[:-1], np.asarray(getattr(added_ref, name))[:-1], null[None]])
  rows[list(removed_ids)] = null
  return rows


def test_a_chain_of_delta_versions_reads_as_the_whole_corpus(corpus_dir, tmp_path):
  v0 = cv.load_version(corpus_dir, 0, mmap=False)
  n0 = v0.corpus.num_docs
  cv.update_corpus(corpus_dir, add=str(write_jsonl(tmp_path / "a1.jsonl", NEW_PEOPLE[:1])))
  remove = tmp_path / "remove.txt"
  remove.write_text(f"{v0.corpus.titles[2]}\n{n0}\n")  # a build doc and version 1's doc
  only_removes = cv.update_corpus(corpus_dir, remove=str(remove))
  cv.update_corpus(corpus_dir, add=str(write_jsonl(tmp_path / "a3.jsonl", NEW_PEOPLE[1:])))
  v3 = cv.load_version(corpus_dir)
  assert [number for number, *_ in v3.chain] == [0, 1, 2, 3]
  assert [(first, stop) for *_, first, stop in v3.chain] == [
      (0, n0), (n0, n0 + 1), (n0 + 1, n0 + 1), (n0 + 1, n0 + 2)]
  # Each version stored its change only: one block, none, one.
  assert [corpus_lib.load_block_corpus(cv.version_dir(corpus_dir, n) / "blocks").num_docs
          for n in (1, 2, 3)] == [1, 0, 1]
  assert only_removes["bytes_written"] < 20_000
  ref = reference_blocks(corpus_dir, NEW_PEOPLE, v0.corpus.doc_len)
  removed = [2, n0]
  np.testing.assert_array_equal(np.flatnonzero(v3.removed), removed)
  for name in PER_DOC:
    np.testing.assert_array_equal(np.asarray(getattr(v3.corpus, name)),
                                  expected_rows(v0, removed, ref, name), err_msg=name)
  ids = np.array([[n0 + 1, 2, 0], [n0 + 2, n0, 5]])  # the gather a training step does
  gathered = corpus_lib.gather_candidates(v3.corpus, ids)
  for name, values in gathered.items():
    np.testing.assert_array_equal(values, expected_rows(v0, removed, ref, name)[ids])
  assert list(v3.corpus.titles) == list(v0.corpus.titles) + [p["title"] for p in NEW_PEOPLE]
  for doc, ref_doc in ((n0, 0), (n0 + 1, 1)):
    assert [s.tolist() for s in v3.corpus.sentence_ids(doc)] == [
        s.tolist() for s in ref.sentence_ids(ref_doc)]
    assert v3.corpus.title_ids(doc).tolist() == ref.title_ids(ref_doc).tolist()
  assert [s.tolist() for s in v3.corpus.sentence_ids(4)] == [
      s.tolist() for s in v0.corpus.sentence_ids(4)]
  # Fingerprints chain: every version's differs, and a reload reads the same one.
  prints = [cv.load_version(corpus_dir, n).corpus.fingerprint for n in range(4)]
  assert len(set(prints)) == 4 and prints[3] == v3.corpus.fingerprint

  # A parent that is gone breaks the chain: a clear error, not a shorter corpus.
  (corpus_dir / cv.VERSIONS_DIR / "000002").rename(tmp_path / "moved")
  with pytest.raises(cv.CorpusVersionError, match="corpus version 2 is not published"):
    cv.load_version(corpus_dir, 3)


def test_a_version_stored_whole_still_loads_and_parents_a_delta(corpus_dir, tmp_path):
  """Versions written before delta storage (format 1: a whole copy, tombstones blanked)."""
  v0 = cv.load_version(corpus_dir, 0, mmap=False)
  n0 = v0.corpus.num_docs
  remove = tmp_path / "remove.txt"
  remove.write_text("4\n")
  cv.update_corpus(corpus_dir, add=str(write_jsonl(tmp_path / "a.jsonl", NEW_PEOPLE[:1])),
                   remove=str(remove))
  folder = cv.version_dir(corpus_dir, 1)
  whole = materialized(cv.load_version(corpus_dir, 1).corpus)
  manifest = json.loads((folder / cv.MANIFEST).read_text())
  for name in ("storage", "fingerprint", "bytes_written"):
    manifest.pop(name)
  (folder / "blocks").rename(tmp_path / "delta_blocks")
  corpus_lib.save_block_corpus(whole, folder / "blocks")  # rows 0..n0 and the null row
  (folder / cv.MANIFEST).write_text(json.dumps(dict(manifest, format_version=1)))
  v1 = cv.load_version(corpus_dir, 1)
  assert v1.chain == ((1, folder, 0, n0 + 1),) and v1.corpus.num_docs == n0 + 1
  cv.update_corpus(corpus_dir, add=str(write_jsonl(tmp_path / "b.jsonl", NEW_PEOPLE[1:])))
  v2 = cv.load_version(corpus_dir)
  assert [number for number, *_ in v2.chain] == [1, 2]
  ref = reference_blocks(corpus_dir, NEW_PEOPLE, v0.corpus.doc_len)
  for name in PER_DOC:
    np.testing.assert_array_equal(np.asarray(getattr(v2.corpus, name)),
                                  expected_rows(v0, [4], ref, name), err_msg=name)
  assert [s.tolist() for s in v2.corpus.sentence_ids(n0 + 1)] == [
      s.tolist() for s in ref.sentence_ids(1)]
  manifest_path = cv.version_dir(corpus_dir, 2) / cv.MANIFEST
  manifest = json.loads(manifest_path.read_text())
  manifest_path.write_text(json.dumps(dict(manifest, format_version=9)))
  with pytest.raises(cv.CorpusVersionError, match="format_version 9"):
    cv.load_version(corpus_dir, 2)


@pytest.mark.parametrize("remove, message", [
    ("999999", "unknown ids or titles ['999999']"),
    ("Nobody At All", "unknown ids or titles ['Nobody At All']"),
])
def test_removing_what_does_not_exist_publishes_nothing(corpus_dir, tmp_path, remove, message):
  path = tmp_path / "remove.txt"
  path.write_text(remove + "\n")
  with pytest.raises(cv.CorpusVersionError, match=message.replace("[", r"\[")):
    cv.update_corpus(corpus_dir, remove=str(path))
  assert cv.list_versions(corpus_dir) == [0] and not (corpus_dir / cv.LATEST).exists()
  assert not list((corpus_dir / cv.VERSIONS_DIR).iterdir())


def test_bad_updates_are_clear_errors_and_publish_nothing(corpus_dir, tmp_path):
  remove = tmp_path / "remove.txt"
  remove.write_text("2\n")
  cv.update_corpus(corpus_dir, remove=str(remove))
  with pytest.raises(cv.CorpusVersionError, match=r"ids already removed \['2'\]"):
    cv.update_corpus(corpus_dir, remove=str(remove))
  bad = write_jsonl(tmp_path / "bad.jsonl", [b"{", dict(title="x")])
  with pytest.raises(cv.CorpusVersionError, match="0 usable records.*invalid_json=1"):
    cv.update_corpus(corpus_dir, add=str(bad))
  replace = write_jsonl(tmp_path / "r.jsonl", [dict(title="Not A Title Here", text="Text.")])
  with pytest.raises(cv.CorpusVersionError, match="titles not in corpus version 1"):
    cv.update_corpus(corpus_dir, replace=str(replace))
  add = write_jsonl(tmp_path / "add.jsonl", NEW_PEOPLE)
  with pytest.raises(cv.CorpusVersionError, match="data.doc_len=64 but .* blocks of 48"):
    cv.update_corpus(corpus_dir, add=str(add), doc_len=64)
  other_vocab = tmp_path / "vocab.txt"
  other_vocab.write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\nother\n")
  with pytest.raises(cv.CorpusVersionError, match="is not the vocabulary"):
    cv.update_corpus(corpus_dir, add=str(add), vocab_file=str(other_vocab))
  with pytest.raises(cv.CorpusVersionError, match="needs --add, --remove or --replace"):
    cv.update_corpus(corpus_dir)
  assert cv.list_versions(corpus_dir) == [0, 1] and cv.latest_version(corpus_dir) == 1
  assert not list((corpus_dir / cv.VERSIONS_DIR).glob(".tmp-*"))

  # A version that names another vocabulary or block length is refused when loaded.
  manifest_path = cv.version_dir(corpus_dir, 1) / cv.MANIFEST
  manifest = json.loads(manifest_path.read_text())
  manifest_path.write_text(json.dumps(dict(manifest, vocab_sha256="0" * 64, doc_len=64)))
  with pytest.raises(cv.CorpusVersionError, match="doc_len 64 != the corpus's 48.*vocab"):
    cv.load_version(corpus_dir, 1)


def test_an_added_title_that_is_live_is_refused_unless_replaced_or_removed(corpus_dir,
                                                                            tmp_path):
  """Two live documents with one title would keep the stale text retrievable beside the new."""
  corpus = cv.load_version(corpus_dir, 0).corpus
  title = corpus.titles[0]
  changed = dict(title=title, text=f"{title} works as a baker. {title} plays the harp.")
  add = write_jsonl(tmp_path / "add.jsonl", [NEW_PEOPLE[0], changed])
  with pytest.raises(cv.CorpusVersionError,
                     match=f"already live in corpus version 0.*--replace.*{title}"):
    cv.update_corpus(corpus_dir, add=str(add))
  both = write_jsonl(tmp_path / "both.jsonl", [changed])
  with pytest.raises(cv.CorpusVersionError, match=f"both --add and --replace.*{title}"):
    cv.update_corpus(corpus_dir, add=str(both), replace=str(both))
  twice = write_jsonl(tmp_path / "twice.jsonl", [changed, dict(changed, text="Other text.")])
  with pytest.raises(cv.CorpusVersionError, match=f"more than once.*{title}"):
    cv.update_corpus(corpus_dir, replace=str(twice))
  assert cv.list_versions(corpus_dir) == [0]
  assert not list((corpus_dir / cv.VERSIONS_DIR).iterdir())

  # Removing the title in the same update makes the add legal (a replace written in two files).
  remove = tmp_path / "remove.txt"
  remove.write_text(title + "\n")
  manifest = cv.update_corpus(corpus_dir, add=str(add), remove=str(remove))
  version = cv.load_version(corpus_dir, manifest["version"])
  live = [t for t, gone in zip(version.corpus.titles, version.removed) if not gone]
  assert live.count(title) >= 1 and manifest["num_removed"] >= 1
  old_ids = [i for i, t in enumerate(corpus.titles) if t == title]
  assert all(version.removed[i] for i in old_ids)


def test_a_corpus_being_built_cannot_be_updated(corpus_dir, tmp_path):
  (corpus_dir / prepare.BUILD_CONFIG).unlink()
  add = write_jsonl(tmp_path / "add.jsonl", NEW_PEOPLE)
  with pytest.raises(cv.CorpusVersionError, match="not a finished corpus.*being built"):
    cv.update_corpus(corpus_dir, add=str(add))
  assert not (corpus_dir / cv.VERSIONS_DIR).exists()


def test_killed_update_publishes_nothing_and_the_next_one_cleans_up(corpus_dir, tmp_path):
  add = write_jsonl(tmp_path / "add.jsonl", NEW_PEOPLE)
  marker = tmp_path / "paused"
  env = dict(os.environ, **{cv.PAUSE_ENV: "before_manifest", cv.PAUSE_MARKER_ENV: str(marker)})
  code = ("import sys; from realm_jax.data import corpus_versions as cv; "
          "cv.update_corpus(sys.argv[1], add=sys.argv[2])")
  proc = subprocess.Popen([sys.executable, "-c", code, str(corpus_dir), str(add)], env=env,
                          cwd=os.getcwd())
  try:
    deadline = time.time() + 60
    while not marker.exists():
      assert proc.poll() is None and time.time() < deadline, "the update never paused"
      time.sleep(0.1)
    assert list((corpus_dir / cv.VERSIONS_DIR).glob(".tmp-*"))  # written, not published
  finally:
    proc.kill()
    proc.wait()
  assert cv.list_versions(corpus_dir) == [0] and cv.latest_version(corpus_dir) == 0
  cv.update_corpus(corpus_dir, add=str(add), force_lease=True)  # the killed one's lease
  assert cv.list_versions(corpus_dir) == [0, 1]
  assert not list((corpus_dir / cv.VERSIONS_DIR).glob(".tmp-*"))


def test_wiki_update_tags_spans_and_matches_a_full_build(tmp_path):
  articles = make_articles(8, seed=5)
  texts = [a["title"] for a in articles] + [a["text"] for a in articles]
  tokenizer = tokenizer_lib.train_wordpiece(texts, 300, tmp_path / "vocab")
  corpus_dir = tmp_path / "corpus"
  corpus_dir.mkdir()
  (corpus_dir / "vocab.txt").write_text((tmp_path / "vocab" / "vocab.txt").read_text())
  base = write_jsonl(tmp_path / "base.jsonl", articles[:6])
  wc.build_wiki_corpus(f"jsonl:{base}", corpus_dir, tokenizer, doc_len=48,
                       span_fn=capitalized_spans)
  (corpus_dir / prepare.BUILD_CONFIG).write_text("{}")
  v0 = cv.load_version(corpus_dir, 0, mmap=False)
  add = write_jsonl(tmp_path / "add.jsonl", articles[6:])
  cv.update_corpus(corpus_dir, add=str(add), span_fn=capitalized_spans)
  v1 = cv.load_version(corpus_dir, mmap=False)
  # Reference: a full build of all 8 articles in one go has the same blocks and spans.
  full_dir = tmp_path / "full"
  wc.build_wiki_corpus(f"jsonl:{write_jsonl(tmp_path / 'all.jsonl', articles)}", full_dir,
                       tokenizer, doc_len=48, span_fn=capitalized_spans)
  full = corpus_lib.load_block_corpus(full_dir / wc.BLOCKS_DIR, mmap=False)
  assert v1.corpus.num_docs == full.num_docs > v0.corpus.num_docs
  for name in corpus_lib._ARRAY_NAMES:  # pylint: disable=protected-access
    np.testing.assert_array_equal(getattr(v1.corpus, name), getattr(full, name), err_msg=name)
  assert v1.corpus.titles == full.titles
  # The build's spans then the added blocks' (stored alone, global sentence index): the full
  # build's spans.
  base, added = wc.load_salient_spans(corpus_dir), cv.added_spans(v1)
  assert len(added["span_sentence"]) and cv.added_spans(v0)["span_sentence"].size == 0
  for name, values in wc.load_salient_spans(full_dir).items():
    np.testing.assert_array_equal(np.concatenate([base[name], added[name]]), values,
                                  err_msg=name)
