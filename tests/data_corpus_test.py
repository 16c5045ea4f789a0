"""Tests of realm_jax.data.corpus: block layout, truncation, save/load and gathering."""

import dataclasses

import numpy as np
import pytest

from realm_jax.data import corpus as corpus_lib
from realm_jax.data import facts_corpus
from realm_jax.data import tokenizer as tokenizer_lib
from data_helpers import PlainDoc, ids  # pylint: disable=g-bad-import-order

DOC_LEN = 96


@pytest.fixture(scope="module")
def facts():
  return facts_corpus.generate_facts_corpus(12, seed=1)


@pytest.fixture(scope="module")
def tokenizer(facts, tmp_path_factory):
  return tokenizer_lib.train_wordpiece(facts.all_texts(), 400, tmp_path_factory.mktemp("vocab"))


@pytest.fixture(scope="module")
def blocks(facts, tokenizer):
  return corpus_lib.build_block_corpus(facts.docs, tokenizer, DOC_LEN)


def test_retriever_rows_are_cls_title_sep_body_sep_with_segments(facts, tokenizer, blocks):
  special = blocks.special
  for doc in (facts.docs[0], facts.docs[-1]):
    title, body = ids(tokenizer, doc.title), ids(tokenizer, " ".join(doc.sentences))
    expected = [special.cls, *title, special.sep, *body, special.sep]
    assert len(expected) < DOC_LEN  # these docs fit without truncation
    row = blocks.retriever_tokens[doc.doc_id]
    np.testing.assert_array_equal(row, expected + [special.pad] * (DOC_LEN - len(expected)))
    segments = [0] * (len(title) + 2) + [1] * (len(body) + 1)
    np.testing.assert_array_equal(blocks.retriever_segments[doc.doc_id],
                                  segments + [0] * (DOC_LEN - len(segments)))
    decoded = tokenizer.decode(row.tolist(), skip_special_tokens=False)
    assert decoded.startswith(f"[CLS] {doc.title.lower()} [SEP] {doc.sentences[0].lower()[:10]}")


def test_reader_rows_are_body_sep_without_title(facts, tokenizer, blocks):
  doc = facts.docs[3]
  body = ids(tokenizer, " ".join(doc.sentences))
  assert blocks.body_len == DOC_LEN - 2
  np.testing.assert_array_equal(blocks.reader_tokens[3, :len(body) + 1],
                                body + [blocks.special.sep])
  assert np.all(blocks.reader_tokens[3, len(body) + 1:] == blocks.special.pad)
  np.testing.assert_array_equal(blocks.reader_lengths,
                                (blocks.reader_tokens != blocks.special.pad).sum(axis=1))


def test_null_document_is_the_last_row(facts, blocks):
  special = blocks.special
  assert blocks.num_docs == len(facts.docs) and blocks.null_id == len(facts.docs)
  assert blocks.retriever_tokens.shape == (len(facts.docs) + 1, DOC_LEN)
  np.testing.assert_array_equal(blocks.retriever_tokens[-1, :4],
                                [special.cls, special.sep, special.sep, special.pad])
  np.testing.assert_array_equal(blocks.retriever_segments[-1, :3], [0, 0, 1])
  np.testing.assert_array_equal(blocks.reader_tokens[-1, :2], [special.sep, special.pad])
  assert blocks.reader_lengths[-1] == 1


def test_truncation_keeps_final_sep_and_caps_title(tokenizer):
  long_title = "Velmora gazette of the harbor fair and the spring festival"
  long_body = tuple(f"The baker played the violin {i} times." for i in range(6))
  docs = [PlainDoc(long_title, long_body), PlainDoc("Short", ())]
  blocks = corpus_lib.build_block_corpus(docs, tokenizer, doc_len=16)
  special = blocks.special
  row, segments = blocks.retriever_tokens[0], blocks.retriever_segments[0]
  assert np.all(row != special.pad)  # filled to the end
  assert row[-1] == special.sep and row[0] == special.cls
  assert row[1 + 16 // 4] == special.sep  # title cut to doc_len // 4 = 4 wordpieces
  np.testing.assert_array_equal(row[1:5], ids(tokenizer, long_title)[:4])
  np.testing.assert_array_equal(segments, [0] * 6 + [1] * 10)
  assert blocks.reader_tokens[0, -1] == special.sep and blocks.reader_lengths[0] == 14
  np.testing.assert_array_equal(blocks.reader_tokens[0, :13],
                                ids(tokenizer, " ".join(long_body))[:13])
  # A doc without sentences is `[CLS] title [SEP] [SEP]`.
  expected = [special.cls, *ids(tokenizer, "Short")[:4], special.sep, special.sep, special.pad]
  assert blocks.retriever_tokens[1, :len(expected)].tolist() == expected


def test_untruncated_sentences_and_titles_are_kept(facts, tokenizer, blocks):
  np.testing.assert_array_equal(blocks.sentence_counts(), [len(d.sentences) for d in facts.docs])
  for doc in (facts.docs[2], facts.docs[-2]):
    stored = blocks.sentence_ids(doc.doc_id)
    assert [s.tolist() for s in stored] == [ids(tokenizer, s) for s in doc.sentences]
    assert blocks.title_ids(doc.doc_id).tolist() == ids(tokenizer, doc.title)
  assert blocks.sentence_token_ids.dtype == np.int32


def test_save_load_round_trip(blocks, tmp_path):
  corpus_lib.save_block_corpus(blocks, tmp_path / "corpus")
  assert [p.name for p in tmp_path.iterdir()] == ["corpus"]  # no tmp dir left behind
  for mmap in (True, False):
    loaded = corpus_lib.load_block_corpus(tmp_path / "corpus", mmap=mmap)
    for field in dataclasses.fields(corpus_lib.BlockCorpus):
      original, restored = getattr(blocks, field.name), getattr(loaded, field.name)
      if isinstance(original, np.ndarray):
        np.testing.assert_array_equal(restored, original)
        assert restored.dtype == original.dtype
      else:
        assert restored == original, field.name
    assert isinstance(loaded.retriever_tokens, np.memmap) == mmap
  with pytest.raises(FileExistsError):
    corpus_lib.save_block_corpus(blocks, tmp_path / "corpus")


def test_titles_are_memory_mapped_utf8_not_in_corpus_json(blocks, tmp_path):
  """Titles (non-ASCII included) come back equal, decoded from memory-mapped files; corpus.json
  no longer lists them; a corpus.json of the older format (titles listed) still loads."""
  import json
  titles = ["Zoë Baptiste", "東京", ""] + list(blocks.titles[3:])
  corpus = dataclasses.replace(blocks, titles=titles)
  corpus_lib.save_block_corpus(corpus, tmp_path / "corpus")
  metadata = json.loads((tmp_path / "corpus" / "corpus.json").read_text())
  assert "titles" not in metadata
  loaded = corpus_lib.load_block_corpus(tmp_path / "corpus")
  assert isinstance(loaded.titles, corpus_lib.Titles)
  assert isinstance(loaded.titles.text, np.memmap) and isinstance(loaded.titles.offsets, np.memmap)
  assert list(loaded.titles) == titles and loaded.titles == titles
  assert loaded.titles[1] == "東京" and loaded.titles[-1] == titles[-1]
  assert loaded.titles[0:2] == titles[0:2] and loaded.num_docs == len(titles)
  with pytest.raises(IndexError):
    loaded.titles[len(titles)]  # pylint: disable=pointless-statement
  # The older layout: titles in corpus.json, no title files.
  for name in (corpus_lib.TITLE_TEXT_FILE, corpus_lib.TITLE_TEXT_OFFSETS_FILE):
    (tmp_path / "corpus" / name).unlink()
  metadata["titles"] = titles
  (tmp_path / "corpus" / "corpus.json").write_text(json.dumps(metadata))
  assert corpus_lib.load_block_corpus(tmp_path / "corpus").titles == titles
  metadata["titles"] = titles[:-1]  # disagrees with num_docs: named, not a silent shift
  (tmp_path / "corpus" / "corpus.json").write_text(json.dumps(metadata))
  with pytest.raises(ValueError, match="titles, corpus.json says"):
    corpus_lib.load_block_corpus(tmp_path / "corpus")


def test_load_errors_name_the_missing_path(blocks, tmp_path):
  with pytest.raises(FileNotFoundError, match=str(tmp_path / "absent")):
    corpus_lib.load_block_corpus(tmp_path / "absent")
  corpus_lib.save_block_corpus(blocks, tmp_path / "corpus")
  (tmp_path / "corpus" / "reader_tokens.npy").unlink()
  with pytest.raises(FileNotFoundError, match="reader_tokens.npy"):
    corpus_lib.load_block_corpus(tmp_path / "corpus")
  (tmp_path / "corpus" / "corpus.json").unlink()
  with pytest.raises(FileNotFoundError, match="corpus.json"):
    corpus_lib.load_block_corpus(tmp_path / "corpus")


def test_gather_candidates_shapes_and_rows(blocks):
  ids = np.array([[blocks.null_id, 0, 5], [blocks.null_id, 7, 7]])  # [B=2, k=3]
  gathered = corpus_lib.gather_candidates(blocks, ids)
  assert gathered["retriever_tokens"].shape == (2, 3, DOC_LEN)
  assert gathered["retriever_segments"].shape == (2, 3, DOC_LEN)
  assert gathered["reader_tokens"].shape == (2, 3, DOC_LEN - 2)
  np.testing.assert_array_equal(gathered["retriever_tokens"][0, 2], blocks.retriever_tokens[5])
  np.testing.assert_array_equal(gathered["reader_tokens"][1, 0], blocks.reader_tokens[-1])
  np.testing.assert_array_equal(gathered["retriever_segments"][1, 1], blocks.retriever_segments[7])
  with pytest.raises(ValueError):
    corpus_lib.gather_candidates(blocks, np.array([[-1, 0]]))
