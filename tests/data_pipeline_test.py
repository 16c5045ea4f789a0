"""Tests of realm_jax.data.pipeline: query masking, batch sources and ICT examples."""

import numpy as np
import pytest

from realm_jax.data import corpus as corpus_lib
from realm_jax.data import facts_corpus
from realm_jax.data import pipeline
from realm_jax.data import tokenizer as tokenizer_lib
from data_helpers import PlainDoc, ids  # pylint: disable=g-bad-import-order

QUERY_LEN = 48
DOC_LEN = 160


@pytest.fixture(scope="module")
def facts():
  return facts_corpus.generate_facts_corpus(60, seed=2)


@pytest.fixture(scope="module")
def tokenizer(facts, tmp_path_factory):
  # A small vocab, so fictional names and cities split into several wordpieces.
  return tokenizer_lib.train_wordpiece(facts.all_texts(), 400, tmp_path_factory.mktemp("vocab"))


@pytest.fixture(scope="module")
def blocks(facts, tokenizer):
  return corpus_lib.build_block_corpus(facts.docs, tokenizer, DOC_LEN)


def test_salient_masks_decode_to_exactly_the_span(facts, tokenizer):
  queries = facts.queries
  encoded = pipeline.encode_facts_queries(queries, tokenizer, QUERY_LEN, max_masked=10)
  mask_id = tokenizer_lib.special_ids(tokenizer).mask
  assert len(encoded["kept"]) == len(queries)
  assert encoded["masked_weights"].sum(1).max() > 1  # some spans are several wordpieces
  for row, index in enumerate(encoded["kept"]):
    query = queries[index]
    real = encoded["masked_weights"][row] > 0
    positions = encoded["masked_positions"][row][real]
    labels = encoded["masked_labels"][row][real]
    span_text = query.text[query.span[0]:query.span[1]]
    assert tokenizer.decode(labels.tolist()) == span_text.lower()
    tokens = encoded["tokens"][row]
    assert np.all(tokens[positions] == mask_id)
    unmasked = tokens.copy()
    unmasked[positions] = labels
    original = ids(tokenizer, query.text)
    np.testing.assert_array_equal(unmasked[:len(original) + 2],
                                  [tokenizer_lib.special_ids(tokenizer).cls, *original,
                                   tokenizer_lib.special_ids(tokenizer).sep])
    assert np.sum(tokens == mask_id) == len(positions)
  np.testing.assert_array_equal(encoded["source_ids"], [q.source_doc_id for q in queries])
  np.testing.assert_array_equal(encoded["gold_ids"], [q.gold_doc_id for q in queries])


def _pieces_overlapping(encoding, start, end):
  return [j for j, (a, b) in enumerate(encoding.offsets) if a < end and b > start]


def test_salient_drops_long_truncated_and_empty_spans(tokenizer):
  text = "The baker plays the violin at the harbor fair."
  violin = (text.index("violin"), text.index("violin") + len("violin"))
  fair = (text.index("fair"), text.index("fair") + len("fair"))
  encoding = tokenizer.encode(text, add_special_tokens=False)
  max_masked = len(_pieces_overlapping(encoding, *violin))
  query_len = _pieces_overlapping(encoding, *fair)[0] + 2  # "fair" falls just past the cut
  assert _pieces_overlapping(encoding, *violin)[-1] < query_len - 2
  spans = [violin, (0, len(text)), fair, (4, 4), (5, 7)]  # ok, too long, cut off, empty, "ak"
  encoded = pipeline.encode_salient_queries(
      [text] * len(spans), spans, tokenizer, query_len, max_masked, gold_ids=[10, 11, 12, 13, 14])
  np.testing.assert_array_equal(encoded["kept"], [0, 4])
  np.testing.assert_array_equal(encoded["gold_ids"], [10, 14])
  np.testing.assert_array_equal(encoded["source_ids"], [-1, -1])
  assert encoded["tokens"].shape == (2, query_len)
  assert encoded["masked_weights"].sum(1)[0] == max_masked
  # A span inside a word masks the whole wordpieces it overlaps.
  labels = encoded["masked_labels"][1][encoded["masked_weights"][1] > 0]
  partial = "".join(tokenizer.id_to_token(int(i)).removeprefix("##") for i in labels)
  assert "ak" in partial and partial in "baker"


def test_random_masking_rate_mix_and_determinism(facts, tokenizer):
  texts = [s for doc in facts.docs for s in doc.sentences]
  special = tokenizer_lib.special_ids(tokenizer)
  encoded = pipeline.encode_random_masked_queries(texts, tokenizer, QUERY_LEN, 10, seed=7)
  real_tokens = np.sum(encoded["tokens"] != special.pad) - 2 * len(texts)
  masked = encoded["masked_weights"] > 0
  assert abs(masked.sum() / real_tokens - 0.15) < 0.02
  at_positions = np.take_along_axis(encoded["tokens"], encoded["masked_positions"], axis=1)[masked]
  labels = encoded["masked_labels"][masked]
  assert abs(np.mean(at_positions == special.mask) - 0.8) < 0.05
  assert abs(np.mean((at_positions != special.mask) & (at_positions != labels)) - 0.1) < 0.04
  assert not np.isin(at_positions[at_positions != special.mask], special.as_tuple()).any()
  again = pipeline.encode_random_masked_queries(texts, tokenizer, QUERY_LEN, max_masked=10, seed=7)
  other = pipeline.encode_random_masked_queries(texts, tokenizer, QUERY_LEN, max_masked=10, seed=8)
  for key in encoded:
    np.testing.assert_array_equal(again[key], encoded[key])
  assert not np.array_equal(other["masked_positions"], encoded["masked_positions"])


def _toy_arrays():
  return {"x": np.arange(10) * 10, "y": np.arange(30).reshape(10, 3)}


def test_batch_source_is_deterministic_and_reshuffles_each_epoch():
  source = pipeline.BatchSource(_toy_arrays(), global_batch_size=4, seed=0)
  batch = source.batch_at(0)
  assert batch["x"].shape == (4,) and batch["y"].shape == (4, 3)
  np.testing.assert_array_equal(batch["y"][:, 0], batch["x"] // 10 * 3)  # rows stay aligned
  assert source.steps_per_epoch == 2
  epochs = [np.concatenate([source.batch_at(s)["x"] for s in (2 * e, 2 * e + 1)]) for e in range(3)]
  assert all(len(set(epoch.tolist())) == 8 for epoch in epochs)  # no repeats within an epoch
  assert not np.array_equal(epochs[0], epochs[1])
  rebuilt = pipeline.BatchSource(_toy_arrays(), global_batch_size=4, seed=0)
  np.testing.assert_array_equal(rebuilt.batch_at(5)["x"], source.batch_at(5)["x"])
  other_seed = pipeline.BatchSource(_toy_arrays(), global_batch_size=4, seed=1)
  assert any(not np.array_equal(other_seed.batch_at(s)["x"], source.batch_at(s)["x"])
             for s in range(3))


def test_batch_source_process_slices_concatenate_to_the_global_batch():
  single = pipeline.BatchSource(_toy_arrays(), global_batch_size=4, seed=3)
  shards = [pipeline.BatchSource(_toy_arrays(), 4, 3, process_index=i, process_count=2)
            for i in (0, 1)]
  for step in (0, 1, 7):
    parts = [shard.batch_at(step) for shard in shards]
    assert parts[0]["x"].shape == (2,)
    for key in ("x", "y"):
      np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]),
                                    single.batch_at(step)[key])


@pytest.mark.parametrize("arrays, batch, count", [
    (_toy_arrays(), 3, 2),  # not divisible by process_count
    (_toy_arrays(), 11, 1),  # more than the examples
    ({"x": np.arange(10), "y": np.arange(9)}, 2, 1),  # unequal lengths
])
def test_batch_source_rejects_bad_sizes(arrays, batch, count):
  with pytest.raises(ValueError):
    pipeline.BatchSource(arrays, batch, seed=0, process_count=count)


def _between_seps(row, special):
  """Body of a packed block: the tokens between its first and last [SEP]."""
  seps = np.flatnonzero(row == special.sep)
  return row[seps[0] + 1:seps[-1]].tolist()


def _query_sentence(row, special):
  return row[1:np.flatnonzero(row == special.sep)[0]].tolist()


@pytest.mark.parametrize("remove_prob", [0.0, 1.0])
def test_ict_removes_the_query_sentence_with_remove_prob(blocks, remove_prob):
  doc_ids = np.arange(0, blocks.num_docs, 7)
  batch = pipeline.ict_batch(blocks, doc_ids, np.random.default_rng(0), QUERY_LEN, remove_prob)
  special = blocks.special
  assert batch["query_tokens"].shape == (len(doc_ids), QUERY_LEN)
  assert batch["doc_tokens"].shape == batch["doc_segments"].shape == (len(doc_ids), DOC_LEN)
  for row, doc_id in enumerate(doc_ids):
    sentences = [s.tolist() for s in blocks.sentence_ids(doc_id)]
    query = _query_sentence(batch["query_tokens"][row], special)
    assert query in sentences  # the fixture's sentences all fit in QUERY_LEN
    removed = remove_prob == 1.0 and len(sentences) > 1
    assert batch["query_removed"][row] == removed
    expected_body = [t for s in sentences if not (removed and s == query) for t in s]
    assert _between_seps(batch["doc_tokens"][row], special) == expected_body
    np.testing.assert_array_equal(
        batch["doc_tokens"][row, :len(blocks.title_ids(doc_id)) + 1],
        [special.cls, *blocks.title_ids(doc_id)])
  if remove_prob == 0.0:  # the full block is exactly the corpus's retriever row
    np.testing.assert_array_equal(batch["doc_tokens"], blocks.retriever_tokens[doc_ids])
    np.testing.assert_array_equal(batch["doc_segments"], blocks.retriever_segments[doc_ids])


def test_ict_source_distinct_deterministic_and_process_sliced(blocks):
  single = pipeline.IctBatchSource(blocks, global_batch_size=16, seed=0, query_len=QUERY_LEN)
  shards = [pipeline.IctBatchSource(blocks, 16, 0, QUERY_LEN, process_index=i, process_count=2)
            for i in (0, 1)]
  removed = []
  for step in range(6):
    batch = single.batch_at(step)
    assert len(set(batch["doc_ids"].tolist())) == 16
    parts = [shard.batch_at(step) for shard in shards]
    for key, value in batch.items():
      np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), value)
    removed.extend(batch["query_removed"])
  assert not np.array_equal(single.batch_at(0)["doc_ids"], single.batch_at(1)["doc_ids"])
  assert 0.7 < np.mean(removed) < 1  # remove_prob 0.9; some blocks have a single sentence


def test_ict_skips_empty_docs_and_keeps_single_sentences(tokenizer):
  docs = [PlainDoc("Alone", ("The baker plays the harp.",)), PlainDoc("Empty", ()),
          PlainDoc("Pair", ("The pilot sings.", "The nurse reads."))]
  blocks = corpus_lib.build_block_corpus(docs, tokenizer, DOC_LEN)
  source = pipeline.IctBatchSource(blocks, 2, seed=0, query_len=QUERY_LEN, remove_prob=1.0)
  assert source.num_skipped_docs == 1 and source.num_single_sentence_docs == 1
  for step in range(4):
    batch = source.batch_at(step)
    assert sorted(batch["doc_ids"].tolist()) == [0, 2]
    alone = batch["doc_ids"].tolist().index(0)
    assert not batch["query_removed"][alone]
    body = _between_seps(batch["doc_tokens"][alone], blocks.special)
    assert body == blocks.sentence_ids(0)[0].tolist()
  with pytest.raises(ValueError, match="doc 1"):
    pipeline.ict_batch(blocks, np.array([1]), np.random.default_rng(0), QUERY_LEN)
  with pytest.raises(ValueError):
    pipeline.IctBatchSource(blocks, 3, seed=0, query_len=QUERY_LEN)
