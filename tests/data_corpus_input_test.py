"""Corpus input hardening (issue 8 class 2): bad input never gives a finished, wrong corpus.

Each case is one kind of bad input: 0 usable records is an error with the report and nothing
is marked complete; every record-level failure is counted by reason; a UTF-8 byte-order mark
is ignored; exact duplicates are dropped and counted; a corpus too small for the configured
batches or held-out set is refused at build time with the numbers.
"""

import json
import logging
import sys

import numpy as np
import pytest

from realm_jax.data import corpus as corpus_lib
from realm_jax.data import prepare
from realm_jax.data import tokenizer as tokenizer_lib
from realm_jax.data import wiki_corpus as wc
from realm_jax.data import wiki_data
import tiny_configs  # pylint: disable=g-bad-import-order
from data_wiki_corpus_test import capitalized_spans, make_articles, write_jsonl  # pylint: disable=g-bad-import-order

DOC_LEN = 48
ARTICLES = make_articles(12, seed=3)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  texts = [a["title"] for a in ARTICLES] + [a["text"] for a in ARTICLES]
  return tokenizer_lib.train_wordpiece(texts, 300, tmp_path_factory.mktemp("vocab"))


def build(path, tokenizer, out, **kwargs):
  return wc.build_wiki_corpus(f"jsonl:{path}", out, tokenizer, doc_len=DOC_LEN, **kwargs)


# --- 0 usable records: an error with the report, nothing marked complete ---------------------


@pytest.mark.parametrize("content, reason", [
    (b"", "source is empty"),
    (b"\n\n  \n", "empty_line=3"),
    (b'{"title": "x"\nnot json\n[1, 2]\n{"title": 1, "text": "t"}\n',
     "invalid_json=2, not_an_object=1, title_not_string=1"),
    (bytes(range(256)) * 8, "invalid_utf8="),  # binary garbage
    (b"\xff\xfe{\x00\"\x00t\x00\n\x00", "invalid_utf8="),  # UTF-16: not what a JSONL reader takes
], ids=["empty", "blank_lines", "all_bad", "binary", "utf16"])
def test_no_usable_record_is_an_error_and_nothing_is_complete(content, reason, tokenizer,
                                                              tmp_path):
  path = tmp_path / "in.jsonl"
  path.write_bytes(content)
  out = tmp_path / "out"
  with pytest.raises(wc.NoUsableRecords, match="0 usable records") as error:
    build(path, tokenizer, out)
  assert reason in str(error.value)
  assert not (out / wc.REPORT_FILE).exists() and not (out / wc.BLOCKS_DIR).exists()


def test_no_usable_record_stops_vocab_training_and_prepare(tmp_path):
  path = tmp_path / "in.jsonl"
  path.write_bytes(b"not json\n" * 5)
  config = tiny_configs.tiny_wiki_config(path, tmp_path / "corpus")
  with pytest.raises(wc.NoUsableRecords, match=r"5 records read, 0 ok.*invalid_json=5"):
    prepare.prepare_data(config, tmp_path)
  assert not (tmp_path / "corpus" / prepare.BUILD_CONFIG).exists()
  assert not (tmp_path / "corpus" / tokenizer_lib.VOCAB_FILENAME).exists()


def test_train_wordpiece_without_words_is_an_error(tmp_path):
  with pytest.raises(ValueError, match="no word"):
    tokenizer_lib.train_wordpiece(["", "  "], 100, tmp_path)


# --- record-level failures: counted by reason, never fatal ------------------------------------


def test_deeply_nested_json_is_counted_not_fatal(tokenizer, tmp_path):
  nested = b'{"title": "Deep", "text": ' + b"[" * 200_000 + b"]" * 200_000 + b"}"
  deep_field = b'{"title": "Deep", "text": "ok.", "extra": ' + b'{"a":' * 100_000 + b"1" + (
      b"}" * 100_000) + b"}"
  path = write_jsonl(tmp_path / "in.jsonl", [ARTICLES[0], nested, ARTICLES[1], deep_field])
  report = build(path, tokenizer, tmp_path / "out")
  assert report.records_ok == 2
  assert dict(report.bad_records) == {wc.TOO_DEEP: 2}
  assert report.bad_examples[wc.TOO_DEEP] == [1, 3]


class _FailOn:
  """A span tagger that raises on sentences containing `word` (an exception on one record)."""

  def __init__(self, word):
    self.word = word

  def __call__(self, sentence):
    if self.word in sentence:
      raise RuntimeError("tagger bug")
    return capitalized_spans(sentence)


def test_an_exception_on_one_record_is_counted_and_the_rest_built(tokenizer, tmp_path):
  articles = [dict(a) for a in ARTICLES[:4]]
  articles[2]["text"] += " Zzyzx appears here."
  path = write_jsonl(tmp_path / "in.jsonl", articles)
  report = build(path, tokenizer, tmp_path / "out", span_fn=_FailOn("Zzyzx"))
  assert dict(report.bad_records) == {"error:tag:RuntimeError": 1}
  assert report.bad_examples["error:tag:RuntimeError"] == [2]
  assert report.records_ok == 3
  texts = [json.loads(line) for line in (tmp_path / "out" / wc.TEXTS_FILE).open()]
  assert sorted({t["record"] for t in texts}) == [0, 1, 3]
  assert report.spans > 0  # the batch's other records still got their spans


class _FlakySequence:
  """A random-access source whose record 1 cannot be read (a corrupt TFDS record)."""

  def __init__(self, records):
    self.records = records

  def __len__(self):
    return len(self.records)

  def __getitem__(self, key):
    if key == 1:
      raise OSError("corrupt record")
    return self.records[key]

  def __getitems__(self, keys):
    return [self[k] for k in keys]


def test_a_record_the_source_cannot_read_is_counted(tokenizer, tmp_path):
  source = wc.SequenceSource(_FlakySequence(ARTICLES[:4]), batch_size=2)
  report = wc.build_wiki_corpus(source, tmp_path, tokenizer, doc_len=DOC_LEN)
  assert dict(report.bad_records) == {wc.READ_ERROR: 1}
  assert report.records_read == 4 and report.records_ok == 3


def test_parse_record_raises_only_bad_record_for_odd_values():
  odd = [b"\x00\x01", "null", "1e400", '{"title": {"a": 1}, "text": "t"}',
         '{"title": "t", "text": ["x"]}', b'{"title": "t", "text": "x"' + b"}" * 3,
         "9" * 5000, wc.Unreadable("boom"), 3.5, None, bytearray(b"[]")]
  for raw in odd:
    with pytest.raises(wc.BadRecord):
      wc.parse_record(raw, 256)


# --- byte-order mark --------------------------------------------------------------------------


def test_utf8_byte_order_mark_keeps_the_first_record(tokenizer, tmp_path):
  path = tmp_path / "in.jsonl"
  path.write_bytes(b"\xef\xbb\xbf" + b"".join(
      json.dumps(a).encode() + b"\n" for a in ARTICLES[:3]))
  report = build(path, tokenizer, tmp_path / "out")
  assert report.records_ok == 3 and not report.bad_records
  assert wc.parse_record("\ufeff" + json.dumps(ARTICLES[0]), 256)[0] == ARTICLES[0]["title"]


# --- exact duplicates -------------------------------------------------------------------------


def test_exact_duplicates_are_dropped_and_counted(tokenizer, tmp_path):
  copy = dict(ARTICLES[0], title="Another title, same text")
  spaced = dict(ARTICLES[1], text="  " + ARTICLES[1]["text"] + "\n")  # same text once stripped
  lines = [ARTICLES[0], ARTICLES[1], copy, ARTICLES[2], spaced, ARTICLES[0]]
  path = write_jsonl(tmp_path / "in.jsonl", lines)
  report = build(path, tokenizer, tmp_path / "out")
  assert dict(report.bad_records) == {wc.DUPLICATE: 3}
  assert report.bad_examples[wc.DUPLICATE] == [2, 4, 5]
  texts = [json.loads(line) for line in (tmp_path / "out" / wc.TEXTS_FILE).open()]
  assert sorted({t["record"] for t in texts}) == [0, 1, 3]
  unique = build(write_jsonl(tmp_path / "u.jsonl", ARTICLES[:3]), tokenizer, tmp_path / "u")
  assert report.blocks == unique.blocks


def test_duplicates_across_shards_are_dropped_at_merge_and_counted(tokenizer, tmp_path):
  # Shards: records 0-2 and 3-5; records 3 and 5 repeat records 0 and 2 (5 with another title).
  lines = [ARTICLES[0], ARTICLES[1], ARTICLES[2], ARTICLES[0], ARTICLES[3],
           dict(ARTICLES[2], title="Same text, other title")]
  path = write_jsonl(tmp_path / "in.jsonl", lines)
  report = build(path, tokenizer, tmp_path / "two", num_shards=2, span_fn=capitalized_spans)
  assert report.duplicates_across_shards == 2
  assert report.bad_records[wc.DUPLICATE] == 2 and report.records_ok == 4
  assert "2 duplicates across shards (dropped)" in report.summary()
  saved = json.loads((tmp_path / "two" / wc.REPORT_FILE).read_text())
  assert saved["duplicates_across_shards"] == 2 and saved["bad_records"] == {wc.DUPLICATE: 2}
  texts = [json.loads(line) for line in (tmp_path / "two" / wc.TEXTS_FILE).open()]
  assert sorted({t["record"] for t in texts}) == [0, 1, 2, 4]  # the first occurrence wins
  assert [t["doc_id"] for t in texts] == list(range(len(texts)))
  # One copy of each: exactly what a one-shard build (which drops in-shard repeats) gives.
  one = build(path, tokenizer, tmp_path / "one", span_fn=capitalized_spans)
  assert (one.blocks, one.sentences, one.spans) == (report.blocks, report.sentences,
                                                    report.spans)
  merged = corpus_lib.load_block_corpus(tmp_path / "two" / wc.BLOCKS_DIR, mmap=False)
  single = corpus_lib.load_block_corpus(tmp_path / "one" / wc.BLOCKS_DIR, mmap=False)
  for name in corpus_lib._ARRAY_NAMES:  # pylint: disable=protected-access
    np.testing.assert_array_equal(getattr(merged, name), getattr(single, name), err_msg=name)
  assert merged.titles == single.titles
  for name, values in wc.load_salient_spans(tmp_path / "one").items():
    np.testing.assert_array_equal(wc.load_salient_spans(tmp_path / "two")[name], values)
  # No sentence is in two blocks any more, so none can be held out and also trained on.
  assert not wiki_data.repeated_sentences(merged).any()
  spans = wc.load_salient_spans(tmp_path / "two")
  docs, sentences = wiki_data.choose_heldout(merged, spans, 10, 24, seed=0)
  assert len(docs)
  fingerprints = wiki_data.sentence_fingerprints(merged)
  held = set(fingerprints[sentences].tolist())
  others = np.setdiff1d(np.arange(len(fingerprints)), sentences)
  assert not held & set(fingerprints[others].tolist())


def test_a_repeated_sentence_is_never_held_out(tokenizer, tmp_path):
  # Every article repeats a sentence with salient spans; only "Plain words here i." is unique.
  shared = "Ada Lovelace met Alan Turing."
  articles = [dict(title=f"T{i}", text=f"{shared} Plain words here {i}. More plain text.")
              for i in range(6)]
  path = write_jsonl(tmp_path / "in.jsonl", articles)
  build(path, tokenizer, tmp_path / "out", span_fn=capitalized_spans)
  corpus = corpus_lib.load_block_corpus(tmp_path / "out" / wc.BLOCKS_DIR, mmap=False)
  spans = wc.load_salient_spans(tmp_path / "out")
  repeated = wiki_data.repeated_sentences(corpus)
  assert repeated.sum() == 12  # the shared sentence and "More plain text.", in every block
  docs, sentences = wiki_data.choose_heldout(corpus, spans, 10, 24, seed=0)
  assert len(docs) == 6 and not repeated[sentences].any()
  np.testing.assert_array_equal(sentences, np.asarray(corpus.doc_sentence_offsets[:-1]) + 1)


def test_sentence_fingerprints_follow_the_wordpieces():
  offsets = np.array([0, 2, 4, 6, 6, 9], np.int64)
  ids = np.array([5, 7, 7, 5, 5, 7, 1, 2, 3], np.int32)
  corpus = type("C", (), dict(sentence_offsets=offsets, sentence_token_ids=ids))()
  fingerprints = wiki_data.sentence_fingerprints(corpus, chunk_sentences=2)
  assert fingerprints[0] == fingerprints[2] != fingerprints[1]  # order matters
  assert len(set(fingerprints.tolist())) == 4
  np.testing.assert_array_equal(fingerprints, wiki_data.sentence_fingerprints(corpus))


# --- a corpus too small for the run ------------------------------------------------------------


def test_facts_corpus_too_small_for_the_batch_is_refused_at_build(tmp_path):
  config = tiny_configs.tiny_config(tmp_path / "corpus")
  config.data.num_entities = 5  # 20 queries: 16 train, 4 eval
  config.train.batch_size = 32
  config.eval.batch_size = 8
  with pytest.raises(prepare.CorpusTooSmall) as error:
    prepare.prepare_data(config, tmp_path)
  message = str(error.value)
  assert "< train.batch_size=32" in message and "< eval.batch_size=8" in message
  assert "ict.batch_size" not in message  # 25 blocks >= 8
  assert not (tmp_path / "corpus").exists()
  assert not list(tmp_path.glob(".corpus.tmp-*"))


def test_loading_a_corpus_too_small_for_a_bigger_batch_is_refused(tmp_path):
  config = tiny_configs.tiny_config(tmp_path / "corpus")
  data = prepare.prepare_data(config, tmp_path)
  assert (tmp_path / "corpus" / prepare.BUILD_CONFIG).exists()
  config.ict.batch_size = data.corpus.num_docs + 1
  with pytest.raises(prepare.CorpusTooSmall,
                     match=f"{data.corpus.num_docs} blocks with ICT sentences < ict.batch_size"):
    prepare.prepare_data(config, tmp_path)


def test_wiki_corpus_too_small_for_the_heldout_set_is_refused(tmp_path):
  path = write_jsonl(tmp_path / "in.jsonl", make_articles(30, seed=5))
  config = tiny_configs.tiny_wiki_config(path, tmp_path / "corpus")
  config.data.num_eval_docs = 1000
  with pytest.raises(prepare.CorpusTooSmall, match=r"< data.num_eval_docs=1000"):
    prepare.prepare_data(config, tmp_path)
  assert not (tmp_path / "corpus" / prepare.BUILD_CONFIG).exists()


# --- facts corpus: block texts and vocab files --------------------------------------------------


def test_facts_corpus_writes_block_texts(tmp_path):
  config = tiny_configs.tiny_config(tmp_path / "corpus")
  data = prepare.prepare_data(config, tmp_path)
  lines = [json.loads(line) for line in (tmp_path / "corpus" / wc.TEXTS_FILE).open()]
  assert len(lines) == data.corpus.num_docs
  assert [line["doc_id"] for line in lines] == list(range(data.corpus.num_docs))
  assert [line["title"] for line in lines] == data.corpus.titles
  assert set(lines[0]) == {"doc_id", "record", "title", "text"}
  tokenizer = tokenizer_lib.load_tokenizer(tmp_path / "corpus" / "vocab.txt")
  first = tokenizer.encode(lines[0]["text"], add_special_tokens=False).ids
  np.testing.assert_array_equal(data.corpus.reader_tokens[0, :len(first)], first)


def test_vocab_file_with_bom_or_garbage(tmp_path):
  good = tmp_path / "good.txt"
  good.write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\nhello\n")
  bom = tmp_path / "bom.txt"
  bom.write_bytes(b"\xef\xbb\xbf" + good.read_bytes())
  assert tokenizer_lib.special_ids(tokenizer_lib.load_tokenizer(bom)).pad == 0
  garbage = tmp_path / "garbage.txt"
  garbage.write_bytes(bytes(range(128, 256)))
  with pytest.raises(ValueError, match="garbage.txt is not UTF-8"):
    tokenizer_lib.load_tokenizer(garbage)
  empty = tmp_path / "empty.txt"
  empty.write_bytes(b"")
  with pytest.raises(ValueError, match="empty.txt is empty"):
    tokenizer_lib.load_tokenizer(empty)


# --- TFDS is optional -----------------------------------------------------------------------------


def test_tfds_source_without_tensorflow_datasets_says_what_to_install(monkeypatch):
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # import raises ImportError
  with pytest.raises(ImportError, match=r"pip install 'realm_jax\[tfds\]'") as error:
    wc.open_source("tfds:wikipedia/20230601.en")
  assert "Apache Beam" in str(error.value) and "data.tfds_data_dir" in str(error.value)


def test_importing_the_data_modules_does_not_need_tensorflow_datasets(monkeypatch):
  for name in [m for m in sys.modules if m.startswith("realm_jax.data")]:
    monkeypatch.delitem(sys.modules, name)
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
  __import__("realm_jax.data.prepare")
  assert sys.modules["tensorflow_datasets"] is None


# --- progress on the CLI -------------------------------------------------------------------------


def test_tiny_builds_log_progress_lines(tmp_path, caplog):
  path = write_jsonl(tmp_path / "in.jsonl", make_articles(30, seed=5))
  config = tiny_configs.tiny_wiki_config(path, tmp_path / "corpus")
  config.data.num_eval_docs = 4
  with caplog.at_level(logging.INFO):
    prepare.prepare_data(config, tmp_path)
  progress = [r.getMessage() for r in caplog.records if r.name == "realm_jax.progress"]
  for name in ("[vocab: read records]", "[vocab: learn wordpieces]",
               "[corpus shard-00000-of-00001]", "[corpus merge"):
    assert any(line.startswith(name) for line in progress), (name, progress)
  assert any("30/30 records" in line for line in progress)
  caplog.clear()
  with caplog.at_level(logging.INFO):
    prepare.prepare_data(tiny_configs.tiny_config(tmp_path / "facts"), tmp_path)
  progress = [r.getMessage() for r in caplog.records if r.name == "realm_jax.progress"]
  for name in ("[vocab: count words]", "[vocab: learn wordpieces]", "[corpus: pack blocks]"):
    assert any(line.startswith(name) for line in progress), (name, progress)
