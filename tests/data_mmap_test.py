"""Corpus arrays the trainer reads are memory-mapped, and give the same batches as in memory."""

import zipfile

import numpy as np
import pytest

from realm_jax.data import corpus as corpus_lib
from realm_jax.data import npz_mmap
from realm_jax.data import pipeline
from realm_jax.data import tokenizer as tokenizer_lib
from realm_jax.data import wiki_corpus as wc
from data_wiki_corpus_test import DOC_LEN, capitalized_spans, make_articles, write_jsonl  # pylint: disable=g-bad-import-order


def test_npz_members_are_memmaps_with_the_saved_values(tmp_path):
  rng = np.random.default_rng(0)
  arrays = dict(a=rng.integers(0, 1 << 40, 1000), b=rng.integers(0, 9, (7, 3)).astype(np.int32),
                empty=np.zeros(0, np.int32), f=np.asfortranarray(rng.normal(size=(4, 5))))
  np.savez(tmp_path / "x.npz", **arrays)
  loaded = npz_mmap.load_npz(tmp_path / "x.npz")
  assert set(loaded) == set(arrays)
  for name, value in arrays.items():
    if value.size:
      assert isinstance(loaded[name], np.memmap), name
    np.testing.assert_array_equal(loaded[name], value)
    assert loaded[name].dtype == value.dtype


def test_compressed_npz_is_read_whole_with_the_same_values(tmp_path):
  value = np.arange(100, dtype=np.int64)
  np.savez_compressed(tmp_path / "c.npz", v=value)
  loaded = npz_mmap.load_npz(tmp_path / "c.npz")
  assert not isinstance(loaded["v"], np.memmap)
  np.testing.assert_array_equal(loaded["v"], value)


def test_missing_npz_names_the_path(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope.npz"):
    npz_mmap.load_npz(tmp_path / "nope.npz")


def test_built_wiki_corpus_spans_are_memmaps_and_give_the_same_batches(tmp_path):
  """A real build (zip64 members written by merge_shards): batches from the mapped spans equal
  batches from spans read whole with np.load."""
  source = write_jsonl(tmp_path / "in.jsonl", make_articles(30))
  tokenizer = tokenizer_lib.train_wordpiece(
      (a["title"] + " " + a["text"] for a in make_articles(30)), 300, tmp_path / "vocab")
  wc.build_wiki_corpus(f"jsonl:{source}", tmp_path / "out", tokenizer, doc_len=DOC_LEN, num_shards=2,
                       span_fn=capitalized_spans)
  mapped = wc.load_salient_spans(tmp_path / "out")
  with zipfile.ZipFile(tmp_path / "out" / wc.SPANS_FILE) as archive:
    assert all(i.compress_type == zipfile.ZIP_STORED for i in archive.infolist())
  with np.load(tmp_path / "out" / wc.SPANS_FILE) as f:
    in_memory = {name: f[name] for name in f.files}
  assert all(isinstance(v, np.memmap) for v in mapped.values())
  corpus = corpus_lib.load_block_corpus(tmp_path / "out" / wc.BLOCKS_DIR)
  assert isinstance(corpus.retriever_tokens, np.memmap)
  assert isinstance(corpus.sentence_token_ids, np.memmap)
  fits = np.flatnonzero((in_memory["span_end"] <= 30) &
                        (in_memory["span_end"] - in_memory["span_start"] <= 5))
  make = lambda spans, c: pipeline.SpanQuerySource(c, spans, fits, 8, 0, 32, 5)
  from_map = make(mapped, corpus)
  from_memory = make(in_memory, corpus_lib.load_block_corpus(tmp_path / "out" / wc.BLOCKS_DIR,
                                                             mmap=False))
  for step in range(3):
    a, b = from_map.batch_at(step), from_memory.batch_at(step)
    assert set(a) == set(b)
    for name in a:
      np.testing.assert_array_equal(a[name], b[name])
