"""realm_jax.qa.batches on a small facts corpus: spans point at the answer, matching is cached."""

import numpy as np
import pytest

from realm_jax.data import corpus as corpus_lib
from realm_jax.data import facts_corpus
from realm_jax.data import tokenizer as tokenizer_lib
from realm_jax.qa import answers
from realm_jax.qa import batches
from realm_jax.qa import data


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  facts = facts_corpus.generate_facts_corpus(num_entities=12, seed=0)
  tok = tokenizer_lib.train_wordpiece(facts.all_texts(), 600, tmp_path_factory.mktemp("vocab"))
  blocks = corpus_lib.build_block_corpus(facts.docs, tok, doc_len=96)  # whole profiles
  return facts, tok, blocks


def test_batch_marks_the_answer_in_the_profile_block(world):
  facts, tok, blocks = world
  examples = data.facts_questions(facts, "all")[:4]
  pad = tokenizer_lib.special_ids(tok).pad
  questions = batches.encode_questions(examples, tok, query_len=16, pad_id=pad)
  assert questions.shape == (4, 16)
  matcher = batches.AnswerMatcher(examples, tok, blocks, max_span_width=10)
  gold = np.array([e.gold_doc_id for e in examples])
  other = (gold + 1) % len(facts.entities)  # another entity's profile
  ids = np.stack([gold, other, gold + len(facts.entities)], axis=1)  # K = 3
  doc_emb = np.random.default_rng(0).normal(size=(len(blocks.titles) + 1, 8))
  batch = batches.build_qa_batch(np.arange(4), questions, ids, doc_emb, matcher, reader_k=2)
  assert batch["reader_block_tokens"].shape == (4, 2, blocks.body_len)
  assert batch["span_is_correct"].shape == (4, 2, blocks.body_len * 10)
  assert batch["cand_doc_emb"].shape == (4, 3, 8)
  np.testing.assert_allclose(batch["cand_doc_emb"][:, 0], doc_emb[gold])
  assert batch["cand_has_answer"][:, 0].all()  # the profile states every attribute
  table_starts = np.repeat(np.arange(blocks.body_len), 10)
  table_ends = table_starts + np.tile(np.arange(10), blocks.body_len)
  for i, example in enumerate(examples):
    hits = np.flatnonzero(batch["span_is_correct"][i, 0])
    assert hits.size
    for h in hits:
      piece = batch["reader_block_tokens"][i, 0, table_starts[h]:table_ends[h] + 1]
      assert answers.exact_match(tok.decode(piece.tolist()), example.answers)
  # Every pair was matched once; a second batch is served from the cache.
  misses = matcher.cache.misses
  assert misses == 12
  batches.build_qa_batch(np.arange(4), questions, ids, doc_emb, matcher, reader_k=2)
  assert matcher.cache.misses == misses and matcher.cache.hits == 12


def test_regex_answers_and_bad_reader_k_are_clear_errors(world):
  _, tok, blocks = world
  with pytest.raises(ValueError, match="regular-expression answers"):
    batches.AnswerMatcher([data.QAExample("q", ("a+",), "regex")], tok, blocks)
  matcher = batches.AnswerMatcher([data.QAExample("q", ("a",))], tok, blocks)
  with pytest.raises(ValueError, match="qa.reader_k=3"):
    batches.build_qa_batch(np.arange(1), np.zeros((1, 4), np.int32), np.zeros((1, 2), int),
                           np.zeros((blocks.num_docs + 1, 2)), matcher, reader_k=3)
