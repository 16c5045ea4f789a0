"""Tests of realm_jax.data.wiki_corpus (Wikipedia blocks in shards) and data.sentences."""

import json
import pathlib
import random
import re

import numpy as np
import pytest

from realm_jax.data import corpus as corpus_lib
from realm_jax.data import tokenizer as tokenizer_lib
from realm_jax.data import wiki_corpus as wc
from realm_jax.data.sentences import split_sentences
from data_helpers import PlainDoc  # pylint: disable=g-bad-import-order

DOC_LEN = 48
WIKI_SAMPLE = pathlib.Path(__file__).resolve().parents[1].parent / (
    "shared/data/wiki_sample/passages.jsonl")
_CAPITALIZED = re.compile(r"\b[A-Z][a-z]+(?: [A-Z][a-z]+)*")
_FIRST = ("Ada", "Alan", "Grace", "Marie", "Isaac", "Rosalind", "Niels", "Emmy")
_LAST = ("Lovelace", "Turing", "Hopper", "Curie", "Newton", "Franklin", "Bohr", "Noether")
_PLACES = ("Paris", "New York", "Rome", "Cape Town", "Lima", "Oslo", "St. Louis")


def capitalized_spans(sentence):
  """Stand-in salient-span tagger: runs of capitalized words."""
  return [m.span() for m in _CAPITALIZED.finditer(sentence)]


def make_articles(num, seed=0):
  """Deterministic articles {"title", "text"}; some have paragraphs, one a 90-word sentence."""
  rng = random.Random(seed)
  articles = []
  for i in range(num):
    sentences = []
    for _ in range(rng.randint(1, 7)):
      sentences.append(
          f"{rng.choice(_FIRST)} {rng.choice(_LAST)} visited {rng.choice(_PLACES)} in "
          f"{rng.randint(1800, 1999)} with Dr. {rng.choice(_LAST)}, who paid {rng.randint(1, 9)}."
          f"{rng.randint(0, 9)} pounds.")
    if i % 4 == 1:
      sentences.insert(len(sentences) // 2, "\n\nSecond paragraph starts here!")
    if i == 2:
      sentences.insert(1, "The long march" + " the long march" * 29 + " ended.")
    articles.append(dict(title=f"{rng.choice(_LAST)} expedition {i}", text=" ".join(sentences)))
  return articles


def write_jsonl(path, lines):
  """Writes dicts as JSON lines and bytes lines as they are."""
  with open(path, "wb") as f:
    for line in lines:
      f.write((json.dumps(line).encode() if isinstance(line, dict) else line) + b"\n")
  return path


def read_texts(out_dir):
  with open(out_dir / wc.TEXTS_FILE) as f:
    return [json.loads(line) for line in f]


def load_all(out_dir):
  """The merged corpus, spans, block texts and report of a build."""
  return (corpus_lib.load_block_corpus(out_dir / wc.BLOCKS_DIR, mmap=False),
          wc.load_salient_spans(out_dir), read_texts(out_dir),
          json.loads((out_dir / wc.REPORT_FILE).read_text()))


# Good records plus one of each bad kind, with the reason each must be counted under.
BAD_LINES = [
    (dict(text="No title here."), wc.MISSING_TITLE),
    (dict(title="Numbers", text=5), wc.TEXT_NOT_STRING),
    (dict(title=["a list"], text="A title that is a list."), wc.TITLE_NOT_STRING),
    (dict(title="No text"), wc.MISSING_TEXT),
    (dict(title="Blank", text="  \n "), wc.EMPTY_TEXT),
    (dict(title="  ", text="Blank title."), wc.EMPTY_TITLE),
    (b'{"title": "Bad bytes", "text": "caf\xe9 au lait."}', wc.INVALID_UTF8),
    (b'{"title": "Surrogate", "text": "lone \\ud800 half."}', wc.INVALID_UTF8),
    (dict(title="T" * 1000, text="A very long title."), wc.TITLE_TOO_LONG),
    (b'{"title": "Broken", "text": "no closing brace"', wc.INVALID_JSON),
    (b"", wc.EMPTY_LINE),
    (b'["an", "array"]', wc.NOT_AN_OBJECT),
    (dict(title="Invisible", text="\u200b\x01"), wc.NO_WORDPIECES),  # dropped by BERT's cleaning
]
ARTICLES = make_articles(14)


def mixed_lines():
  """ARTICLES with the BAD_LINES interleaved; returns lines and the good records' indices."""
  lines, good = [], []
  for i, article in enumerate(ARTICLES):
    good.append(len(lines))
    lines.append(article)
    if i < len(BAD_LINES):
      lines.append(BAD_LINES[i][0])
  return lines, good


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  texts = [a["title"] for a in ARTICLES] + [a["text"] for a in ARTICLES]
  return tokenizer_lib.train_wordpiece(texts, 300, tmp_path_factory.mktemp("vocab"))


@pytest.fixture(scope="module")
def mixed_jsonl(tmp_path_factory):
  lines, _ = mixed_lines()
  return write_jsonl(tmp_path_factory.mktemp("jsonl") / "mixed.jsonl", lines)


@pytest.fixture(scope="module")
def one_shard(mixed_jsonl, tokenizer, tmp_path_factory):
  out = tmp_path_factory.mktemp("one_shard")
  wc.build_wiki_corpus(f"jsonl:{mixed_jsonl}", out, tokenizer, doc_len=DOC_LEN,
                       span_fn=capitalized_spans)
  return out


# --- sentences ---------------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("Mr. Smith met Dr. Jones at St. Paul's. They talked.",
     ["Mr. Smith met Dr. Jones at St. Paul's.", "They talked."]),
    ("J. R. R. Tolkien wrote it. J.R.R. Tolkien again.",
     ["J. R. R. Tolkien wrote it.", "J.R.R. Tolkien again."]),
    ("The U.S. Army grew 3.5 times. Fruit, e.g. apples, i.e. food, etc. Next one.",
     ["The U.S. Army grew 3.5 times.", "Fruit, e.g. apples, i.e. food, etc.", "Next one."]),
    ('He said "Go home." Then he left. (A note.) Another? Yes!',
     ['He said "Go home."', "Then he left.", "(A note.)", "Another?", "Yes!"]),
    ("A line without a period\nNext line.\n\n  New paragraph. Born c. 1500 in No. 5 street.",
     ["A line without a period", "Next line.", "New paragraph.",
      "Born c. 1500 in No. 5 street."]),
    ("It ended... Then more. it is lowercase. version 2.0 is out.",
     ["It ended...", "Then more. it is lowercase. version 2.0 is out."]),
    ("  \n ", []),
])
def test_split_sentences_tricky_cases(text, expected):
  spans = split_sentences(text)
  assert [text[a:b] for a, b in spans] == expected
  assert all(a < b <= c for (a, b), (c, _) in zip(spans, spans[1:]))  # ordered, disjoint


# --- validation, report ------------------------------------------------------------------------


def test_bad_records_are_counted_by_reason_and_good_ones_kept(one_shard):
  corpus, _, texts, report = load_all(one_shard)
  expected_bad = {}
  for _, reason in BAD_LINES:
    expected_bad[reason] = expected_bad.get(reason, 0) + 1
  assert report["bad_records"] == expected_bad
  assert report["records_read"] == len(ARTICLES) + len(BAD_LINES)
  assert report["records_ok"] == len(ARTICLES)
  _, good = mixed_lines()
  assert sorted({t["record"] for t in texts}) == good
  assert [t["title"] for t in texts] == corpus.titles
  assert {t["title"] for t in texts} == {a["title"] for a in ARTICLES}
  # The first bad line follows article 0, at line 1: examples are record indices.
  assert report["bad_examples"][wc.MISSING_TITLE] == [1]
  assert report["blocks"] == corpus.num_docs
  assert report["sentences"] == len(corpus.sentence_offsets) - 1


def test_parse_record_decodes_bytes_and_numpy_values():
  raw = dict(title=np.array(b"Caf\xc3\xa9"), text=np.bytes_(b" Text. "))
  assert wc.parse_record(raw, 256) == ("Café", "Text.")
  with pytest.raises(wc.BadRecord, match=wc.INVALID_UTF8):
    wc.parse_record(dict(title=b"\xff", text="x"), 256)
  with pytest.raises(wc.BadRecord, match=wc.TITLE_TOO_LONG):
    wc.parse_record(dict(title="abc", text="x"), 2)


# --- packing -----------------------------------------------------------------------------------


def test_blocks_are_cls_title_sep_body_sep_and_lose_no_sentence(one_shard, tokenizer):
  corpus, _, texts, report = load_all(one_shard)
  special = corpus.special
  capacity_used = []
  for doc_id, text in enumerate(texts):
    title = corpus.title_ids(doc_id)
    np.testing.assert_array_equal(title, tokenizer.encode(text["title"],
                                                          add_special_tokens=False).ids)
    body = np.concatenate(corpus.sentence_ids(doc_id))
    row = corpus.retriever_tokens[doc_id]
    kept_body = body[:DOC_LEN - 3 - len(title)]
    expected = [special.cls, *title, special.sep, *kept_body, special.sep]
    np.testing.assert_array_equal(row[:len(expected)], expected)
    assert np.all(row[len(expected):] == special.pad)
    segments = [0] * (len(title) + 2) + [1] * (len(kept_body) + 1)
    np.testing.assert_array_equal(corpus.retriever_segments[doc_id, :len(segments)], segments)
    assert corpus.reader_lengths[doc_id] == min(len(body), DOC_LEN - 3) + 1
    if len(body) > DOC_LEN - 3 - len(title):  # truncated: only a single too-long sentence
      assert corpus.sentence_counts()[doc_id] == 1
    capacity_used.append((text["record"], len(body), len(corpus.sentence_ids(doc_id)[0]),
                          DOC_LEN - 3 - len(title)))
  assert np.all((corpus.retriever_tokens != special.pad).sum(axis=1) <= DOC_LEN)
  assert report["truncated_sentences"] == 1
  # Greedy: a block would have overflowed with the next block's first sentence (same article).
  for (record, used, _, capacity), (next_record, _, next_first, _) in zip(
      capacity_used, capacity_used[1:]):
    if record == next_record:
      assert used + next_first > capacity
  # No sentence lost: an article's block bodies are its whole text's wordpieces, in order.
  for record in sorted({t["record"] for t in texts}):
    doc_ids = [i for i, t in enumerate(texts) if t["record"] == record]
    assert doc_ids == list(range(doc_ids[0], doc_ids[-1] + 1))
    article = mixed_lines()[0][record]
    pieces = np.concatenate([np.concatenate(corpus.sentence_ids(i)) for i in doc_ids])
    np.testing.assert_array_equal(pieces, tokenizer.encode(article["text"],
                                                           add_special_tokens=False).ids)
    assert " ".join(texts[i]["text"] for i in doc_ids) == " ".join(article["text"].split())
  long_block = next(i for i, t in enumerate(texts) if t["text"].startswith("The long march"))
  assert corpus.sentence_counts()[long_block] == 1
  assert corpus.retriever_tokens[long_block, -1] == special.sep  # full, cut before the last [SEP]


def test_pack_sentences_greedy_groups():
  assert wc.pack_sentences([5, 300, 5, 50, 50, 1], 100) == [(0, 1), (1, 2), (2, 4), (4, 6)]
  assert wc.pack_sentences([300], 100) == [(0, 1)]
  assert wc.pack_sentences([], 100) == []


def test_null_document_is_last_and_corpus_matches_build_block_corpus(one_shard, tokenizer):
  """The merged arrays equal corpus.build_block_corpus of the same blocks' sentences."""
  corpus, _, texts, _ = load_all(one_shard)
  null = corpus.null_id
  np.testing.assert_array_equal(corpus.retriever_tokens[null, :3],
                                [corpus.special.cls, corpus.special.sep, corpus.special.sep])
  assert corpus.reader_lengths[null] == 1 and corpus.sentence_counts().sum() == len(
      corpus.sentence_offsets) - 1
  # The blocks' sentences, recovered by decoding each stored sentence back to text.
  docs = [PlainDoc(t["title"], tuple(tokenizer.decode(s.tolist()) for s in corpus.sentence_ids(i)))
          for i, t in enumerate(texts)]
  expected = corpus_lib.build_block_corpus(docs, tokenizer, DOC_LEN)
  for name in corpus_lib._ARRAY_NAMES:  # pylint: disable=protected-access
    np.testing.assert_array_equal(getattr(corpus, name), getattr(expected, name), err_msg=name)
  # The fingerprint hashed while streaming the merge is the one of the saved arrays.
  assert corpus.fingerprint == corpus_lib.fingerprint(corpus) == expected.fingerprint


# --- salient spans -----------------------------------------------------------------------------


def test_spans_align_to_wordpieces_of_their_sentence(one_shard, tokenizer):
  corpus, spans, _, report = load_all(one_shard)
  sentence_texts = [article["text"][a:b] for article in ARTICLES
                    for a, b in split_sentences(article["text"])]
  assert len(sentence_texts) == len(corpus.sentence_offsets) - 1
  offsets = corpus.sentence_offsets
  for index in (0, len(sentence_texts) - 1):
    np.testing.assert_array_equal(
        corpus.sentence_token_ids[offsets[index]:offsets[index + 1]],
        tokenizer.encode(sentence_texts[index], add_special_tokens=False).ids)
  assert len(spans["span_sentence"]) == report["spans"] > 0
  assert spans["span_sentence"].dtype == np.int64 and spans["span_start"].dtype == np.int32
  assert np.all(np.diff(spans["span_sentence"]) >= 0)
  for sentence, start, end in zip(spans["span_sentence"], spans["span_start"], spans["span_end"]):
    ids = corpus.sentence_token_ids[offsets[sentence]:offsets[sentence + 1]]
    assert 1 <= end - start <= 10 and end <= len(ids)
    targets = {sentence_texts[sentence][a:b].lower()
               for a, b in capitalized_spans(sentence_texts[sentence])}
    assert tokenizer.decode(ids[start:end].tolist()) in targets
  expected_count = sum(len(capitalized_spans(s)) for s in sentence_texts)
  assert report["spans"] == expected_count and report["spans_dropped"] == 0


def test_spans_too_long_or_empty_are_dropped(tmp_path, tokenizer):
  def span_fn(sentence):  # the whole sentence, an empty span, a real one
    return [(0, len(sentence)), (3, 3), *capitalized_spans(sentence)[:1]]
  sentences = [a["text"][s:e] for a in ARTICLES[:3] for s, e in split_sentences(a["text"])]
  lengths = sorted(len(tokenizer.encode(s, add_special_tokens=False).ids) for s in sentences)
  max_span = lengths[len(lengths) // 2]  # whole sentences: about half kept, half too long
  report = wc.build_wiki_corpus(wc.SequenceSource(ARTICLES[:3]), tmp_path, tokenizer,
                                doc_len=DOC_LEN, span_fn=span_fn, max_span_wordpieces=max_span)
  long = sum(length > max_span for length in lengths)
  assert 0 < long < len(sentences)
  assert report.spans_dropped == long + len(sentences)  # + one empty span per sentence
  assert report.spans == len(sentences) - long + sum(
      1 for s in sentences if capitalized_spans(s))


def test_span_fn_tag_batch_is_used_when_present(one_shard, mixed_jsonl, tokenizer, tmp_path):
  class BatchTagger:
    calls = 0

    def __call__(self, sentence):
      raise AssertionError("tag_batch should be used")

    def tag_batch(self, sentences):
      BatchTagger.calls += 1
      return [capitalized_spans(s) for s in sentences]

  wc.build_wiki_corpus(f"jsonl:{mixed_jsonl}", tmp_path, tokenizer, doc_len=DOC_LEN,
                       span_fn=BatchTagger())
  assert BatchTagger.calls >= 1
  for name, values in load_all(tmp_path)[1].items():
    np.testing.assert_array_equal(values, load_all(one_shard)[1][name])


def test_align_span_takes_the_pieces_overlapping_the_span():
  offsets = [(0, 3), (3, 5), (6, 10), (10, 11)]  # "abcde fghi." as abc ##de fghi .
  assert wc.align_span(offsets, 4, 8) == (1, 3)
  assert wc.align_span(offsets, 6, 10) == (2, 3)
  assert wc.align_span(offsets, 5, 6) == (2, 2)  # only whitespace: no piece
  assert wc.align_span(offsets, 0, 11) == (0, 4)
  assert wc.align_span(offsets, 4, 4) == (0, 0)  # empty, even inside a piece


# --- shards ------------------------------------------------------------------------------------


def test_one_and_three_shards_give_identical_outputs(mixed_jsonl, one_shard, tokenizer, tmp_path):
  report = wc.build_wiki_corpus(f"jsonl:{mixed_jsonl}", tmp_path, tokenizer, doc_len=DOC_LEN,
                                num_shards=3, span_fn=capitalized_spans)
  one, three = load_all(one_shard), load_all(tmp_path)
  for name in corpus_lib._ARRAY_NAMES:  # pylint: disable=protected-access
    np.testing.assert_array_equal(getattr(one[0], name), getattr(three[0], name), err_msg=name)
  assert one[0].titles == three[0].titles
  for name in ("span_sentence", "span_start", "span_end"):
    np.testing.assert_array_equal(one[1][name], three[1][name])
  assert one[2] == three[2]
  drop = lambda r: {k: v for k, v in r.items() if k not in ("seconds", "params")}
  assert drop(one[3]) == drop(three[3]) == drop(report.to_dict())
  assert one[3]["params"] == dict(three[3]["params"], num_shards=1)
  assert len(list((tmp_path / wc.SHARDS_DIR).iterdir())) == 3


def test_finished_shard_is_skipped_and_params_checked(mixed_jsonl, tokenizer, tmp_path):
  source = f"jsonl:{mixed_jsonl}"
  first = wc.build_shard(source, tmp_path, tokenizer, 0, 2, doc_len=DOC_LEN)
  shard = tmp_path / wc.SHARDS_DIR / wc.shard_name(0, 2)
  (shard / "marker").write_text("kept if the shard is not rebuilt")
  metadata = (shard / wc.SHARD_METADATA).read_text()
  report = wc.build_wiki_corpus(source, tmp_path, tokenizer, doc_len=DOC_LEN, num_shards=2)
  assert (shard / "marker").exists() and (shard / wc.SHARD_METADATA).read_text() == metadata
  assert report.records_read == len(mixed_lines()[0]) and first.records_read == len(
      mixed_lines()[0]) // 2
  assert corpus_lib.load_block_corpus(tmp_path / wc.BLOCKS_DIR).num_docs == report.blocks
  with pytest.raises(ValueError, match="other params"):
    wc.build_shard(source, tmp_path, tokenizer, 0, 2, doc_len=DOC_LEN + 1)
  # Merging again is a no-op returning the saved report.
  assert wc.merge_shards(tmp_path).blocks == report.blocks


def test_finished_build_is_returned_as_is_and_shards_can_go(mixed_jsonl, tokenizer, tmp_path):
  source = f"jsonl:{mixed_jsonl}"
  report = wc.build_wiki_corpus(source, tmp_path, tokenizer, doc_len=DOC_LEN, num_shards=2,
                                delete_shards=True)
  assert not (tmp_path / wc.SHARDS_DIR).exists()
  again = wc.build_wiki_corpus(source, tmp_path, tokenizer, doc_len=DOC_LEN, num_shards=2)
  assert not (tmp_path / wc.SHARDS_DIR).exists()  # nothing rebuilt
  assert again.to_dict() == report.to_dict()
  with pytest.raises(ValueError, match="other params"):
    wc.build_wiki_corpus(source, tmp_path, tokenizer, doc_len=DOC_LEN + 1, num_shards=2)


def test_merge_names_missing_shards(mixed_jsonl, tokenizer, tmp_path):
  report = wc.build_wiki_corpus(f"jsonl:{mixed_jsonl}", tmp_path, tokenizer, doc_len=DOC_LEN,
                                num_shards=3, shard_indices=[1])
  assert report.records_read == len(mixed_lines()[0]) * 2 // 3 - len(mixed_lines()[0]) // 3
  assert not (tmp_path / wc.BLOCKS_DIR).exists()
  (tmp_path / wc.SHARDS_DIR / ".shard-00000-of-00003.tmp-dead").mkdir()  # a killed build
  with pytest.raises(FileNotFoundError, match="shard-00000-of-00003, shard-00002-of-00003"):
    wc.merge_shards(tmp_path)
  wc.build_shard(f"jsonl:{mixed_jsonl}", tmp_path, tokenizer, 0, 3, doc_len=DOC_LEN)
  assert not (tmp_path / wc.SHARDS_DIR / ".shard-00000-of-00003.tmp-dead").exists()


# --- sources -----------------------------------------------------------------------------------


def test_jsonl_glob_reads_files_in_sorted_order_with_global_indices(tmp_path):
  write_jsonl(tmp_path / "b.jsonl", [dict(title="B", text="b.")] * 2)
  write_jsonl(tmp_path / "a.jsonl", [dict(title="A", text="a.")] * 3)
  (tmp_path / "c.jsonl").write_bytes(b'{"title": "C", "text": "no final newline"}')
  source = wc.open_source(f"jsonl:{tmp_path}/*.jsonl")
  assert len(source) == 6
  records = list(source.read(2, 6))
  assert [i for i, _ in records] == [2, 3, 4, 5]
  assert [json.loads(line)["title"] for _, line in records] == ["A", "B", "B", "C"]
  with pytest.raises(FileNotFoundError, match="No JSONL files"):
    wc.open_source(f"jsonl:{tmp_path}/*.txt")
  with pytest.raises(ValueError, match="Bad source spec"):
    wc.open_source("csv:foo")


def test_sequence_source_with_bytes_matches_jsonl_build(tokenizer, tmp_path):
  """A TFDS-style random-access source with bytes values builds what the JSONL source does."""
  records = [{k: v.encode() for k, v in a.items()} for a in ARTICLES[:5]]
  records.insert(2, dict(title=b"Bad", text=b"caf\xe9."))
  records.insert(4, dict(title=b"No text"))
  report = wc.build_wiki_corpus(wc.SequenceSource(records, batch_size=2), tmp_path / "seq",
                                tokenizer, doc_len=DOC_LEN, num_shards=2,
                                span_fn=capitalized_spans)
  assert report.records_ok == 5
  assert dict(report.bad_records) == {wc.INVALID_UTF8: 1, wc.MISSING_TEXT: 1}
  jsonl = write_jsonl(tmp_path / "good.jsonl", ARTICLES[:5])
  wc.build_wiki_corpus(f"jsonl:{jsonl}", tmp_path / "jsonl", tokenizer, doc_len=DOC_LEN,
                       span_fn=capitalized_spans)
  from_seq, from_jsonl = load_all(tmp_path / "seq"), load_all(tmp_path / "jsonl")
  for name in corpus_lib._ARRAY_NAMES:  # pylint: disable=protected-access
    np.testing.assert_array_equal(getattr(from_seq[0], name), getattr(from_jsonl[0], name))
  np.testing.assert_array_equal(from_seq[1]["span_start"], from_jsonl[1]["span_start"])
  assert [t["text"] for t in from_seq[2]] == [t["text"] for t in from_jsonl[2]]


def test_tfds_data_source_through_mock_data(tokenizer, tmp_path):
  """The real tfds.data_source path (ArrayRecordDataSource, mocked files), no TF, no network."""
  tfds = pytest.importorskip("tensorflow_datasets")
  # Without TensorFlow, tfds registers dataset builders only when their module is imported.
  import tensorflow_datasets.text.wikipedia  # pylint: disable=g-import-not-at-top,unused-import
  with tfds.testing.mock_data(num_examples=7):
    source = wc.open_source("tfds:wikipedia/20230601.en:train")
    # mock_data's __getitems__ is broken (tfds 4.9.10 sets it on a MagicMock as a plain
    # attribute, so it is called without self); real ArrayRecord sources have a working one.
    source.batched = False
    expected_titles = [source.records[i]["title"] for i in range(7)]
    report = wc.build_wiki_corpus(source, tmp_path, tokenizer, doc_len=DOC_LEN, num_shards=2)
  assert source.description == "tfds:wikipedia/20230601.en:train" and len(source) == 7
  assert report.records_read == 7
  corpus = corpus_lib.load_block_corpus(tmp_path / wc.BLOCKS_DIR)
  valid = [t.decode() if isinstance(t, bytes) else t for t in expected_titles]
  assert report.records_ok == sum(bool(t.strip()) for t in valid)
  assert sorted(set(corpus.titles)) == sorted({t.strip() for t in valid if t.strip()})


# --- the real Wikipedia sample -----------------------------------------------------------------


@pytest.mark.skipif(not WIKI_SAMPLE.exists(), reason=f"{WIKI_SAMPLE} not present (the shared "
                    "real-data folder is not part of a fresh clone).")
def test_wiki_sample_first_300_records(tmp_path):
  with open(WIKI_SAMPLE) as f:
    records = [json.loads(next(f)) for _ in range(300)]
  tokenizer = tokenizer_lib.train_wordpiece(
      [r["title"] for r in records] + [r["text"] for r in records], 3000, tmp_path / "vocab")
  report = wc.build_wiki_corpus(f"jsonl:{WIKI_SAMPLE}", tmp_path / "out", tokenizer,
                                num_shards=2, limit=300, span_fn=capitalized_spans)
  assert report.records_read == report.records_ok == 300 and not report.bad_records
  corpus = corpus_lib.load_block_corpus(tmp_path / "out" / wc.BLOCKS_DIR)
  assert corpus.num_docs == report.blocks >= 300 and corpus.doc_len == 288
  assert np.all((corpus.retriever_tokens != corpus.special.pad).sum(axis=1) <= 288)
  assert corpus.sentence_counts().sum() == report.sentences > 300
  texts = read_texts(tmp_path / "out")
  assert [t["record"] for t in texts] == sorted(t["record"] for t in texts)
  first_blocks = {t["record"]: t["title"] for t in reversed(texts)}
  assert [first_blocks[i] for i in range(300)] == [r["title"] for r in records]
  assert report.spans > report.sentences  # Wikipedia sentences name many things
