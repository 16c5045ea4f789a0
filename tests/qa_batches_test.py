"""realm_jax.qa.batches on a small facts corpus: spans point at the answer, matching is cached."""

import re

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
  # The reader's whole-word mask input: '##' pieces of the vocabulary, nothing else.
  pieces = np.vectorize(lambda t: tok.id_to_token(int(t)).startswith("##"))(
      batch["reader_block_tokens"])
  np.testing.assert_array_equal(batch["reader_block_continuation"], pieces)
  vocab = tok.get_vocab()
  hashes = np.array([i for t, i in vocab.items() if t.startswith("##")])
  assert hashes.size  # the lookup is not vacuous: the vocabulary has '##' pieces
  np.testing.assert_array_equal(matcher.is_continuation(hashes), True)
  np.testing.assert_array_equal(matcher.is_continuation([vocab["[SEP]"], 0]), False)
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


def test_gold_supervision_keeps_only_the_known_gold_block_positive(world):
  """qa.supervision="gold": a block that contains the answer string but is not the question's
  gold block (another person's profile naming the same instrument) is no positive, for the
  retriever label and the reader spans; the gold block and questions without a known gold
  block (-1) are as under answer matching."""
  facts, tok, blocks = world
  examples = data.facts_questions(facts, "all")
  matcher = batches.AnswerMatcher(examples, tok, blocks, max_span_width=10)
  # Questions whose answer also appears in some other block: (question, gold, that block).
  chosen = []
  for i, e in enumerate(examples):
    decoy = next((b for b in range(len(blocks.titles))
                  if b != e.gold_doc_id and matcher.has_answer(i, b)), None)
    if decoy is not None:
      chosen.append((i, e.gold_doc_id, decoy))
    if len(chosen) == 3:
      break
  assert len(chosen) == 3, "the corpus has no shared answers to test with"
  rows = np.array([c[0] for c in chosen])
  ids = np.array([[c[2], c[1]] for c in chosen])  # the decoy first, then the gold block
  pad = tokenizer_lib.special_ids(tok).pad
  questions = batches.encode_questions(examples, tok, query_len=16, pad_id=pad)
  doc_emb = np.zeros((len(blocks.titles) + 1, 4))
  weak = batches.build_qa_batch(rows, questions, ids, doc_emb, matcher, reader_k=2)
  gold_ids = np.array([c[1] for c in chosen])
  gold_ids[2] = -1  # the third question's gold block is unknown: answer matching
  strict = batches.build_qa_batch(rows, questions, ids, doc_emb, matcher, reader_k=2,
                                  gold_ids=gold_ids)
  assert weak["cand_has_answer"].all() and weak["span_is_correct"][:, 0].any(axis=1).all()
  np.testing.assert_array_equal(strict["cand_has_answer"], [[False, True], [False, True],
                                                            [True, True]])
  assert not strict["span_is_correct"][:2, 0].any()  # the decoys' spans are gone
  np.testing.assert_array_equal(strict["span_is_correct"][:, 1], weak["span_is_correct"][:, 1])
  np.testing.assert_array_equal(strict["span_is_correct"][2], weak["span_is_correct"][2])


def _brute_force_regex_spans(tok, tokens, patterns, width):
  """Reference: every span of <= width wordpieces that starts and ends on whole words, decoded
  on its own and kept when some pattern re.fullmatch-es it (case-insensitive)."""
  pieces = [tok.id_to_token(int(t)) for t in tokens]
  compiled = []
  for p in patterns:
    try:
      compiled.append(re.compile(p, re.IGNORECASE))
    except re.error:
      pass
  found = []
  for start in range(len(tokens)):
    if pieces[start].startswith("##"):
      continue
    for end in range(start, min(start + width, len(tokens))):
      if end + 1 < len(tokens) and pieces[end + 1].startswith("##"):
        continue
      text = tok.decode([int(t) for t in tokens[start:end + 1]])
      if any(c.fullmatch(text) for c in compiled):
        found.append((start, end))
  return found


def test_regex_answer_spans_match_a_brute_force_reference(world):
  """CuratedTREC-style answers: spans and block labels against an independent enumeration of
  all spans of every block; a pattern that does not compile is counted, not a crash."""
  facts, tok, blocks = world
  patterns = [
      (r"1[0-9]{3}",),  # every year (one or more wordpieces)
      (r"(the )?(cello|violin|flute|piano)( player)?",),  # multi-word, optional parts
      (r"Dram\w*", r"Gum(li)?"),  # first-name prefix: must cover whole words only
      (r"(unclosed", r"skilled \w+ player"),  # a bad pattern beside a good one
      (r"[", ),  # only a bad pattern: never matches
  ]
  examples = [data.QAExample(f"q{i}", p, "regex") for i, p in enumerate(patterns)]
  matcher = batches.AnswerMatcher(examples, tok, blocks, max_span_width=6)
  assert matcher.bad_patterns == 2
  total = 0
  for block_id in range(blocks.num_docs):
    length = int(blocks.reader_lengths[block_id]) - 1
    tokens = np.asarray(blocks.reader_tokens[block_id, :length])
    body = tok.decode(tokens.tolist())
    for i, p in enumerate(patterns):
      expected = _brute_force_regex_spans(tok, tokens, p, 6)
      got = [tuple(x) for x in matcher.spans(i, block_id).tolist()]
      assert sorted(got) == sorted(expected), (block_id, p, got, expected)
      total += len(expected)
      searched = any(re.search(q, body, re.IGNORECASE) for q in p if q not in ("(unclosed", "["))
      assert matcher.has_answer(i, block_id) == bool(searched)
  assert total > blocks.num_docs  # the patterns do find spans (the check is not vacuous)
  assert all(len(matcher.spans(4, b)) == 0 for b in range(blocks.num_docs))
  # The batch marks exactly those spans; a second batch is served from the caches.
  pad = tokenizer_lib.special_ids(tok).pad
  questions = batches.encode_questions(examples, tok, query_len=8, pad_id=pad)
  ids = np.tile(np.arange(3), (5, 1))
  batch = batches.build_qa_batch(np.arange(5), questions, ids, None, matcher, reader_k=2)
  assert "cand_doc_emb" not in batch
  for i in range(5):
    for j in range(2):
      expected = answers.spans_to_mask(matcher.spans(i, j), blocks.body_len, 6)
      np.testing.assert_array_equal(batch["span_is_correct"][i, j], expected)
  misses = matcher.cache.misses + matcher.label_cache.misses
  batches.build_qa_batch(np.arange(5), questions, ids, None, matcher, reader_k=2)
  assert matcher.cache.misses + matcher.label_cache.misses == misses


def test_bad_reader_k_is_a_clear_error(world):
  _, tok, blocks = world
  matcher = batches.AnswerMatcher([data.QAExample("q", ("a",))], tok, blocks)
  with pytest.raises(ValueError, match="qa.reader_k=3"):
    batches.build_qa_batch(np.arange(1), np.zeros((1, 4), np.int32), np.zeros((1, 2), int),
                           np.zeros((blocks.num_docs + 1, 2)), matcher, reader_k=3)


def test_supervision_gold_ids_per_setting(world):
  from realm_jax.qa import finetune  # pylint: disable=import-outside-toplevel
  facts, _, _ = world
  examples = list(data.facts_questions(facts, "all")[:3]) + [
      data.QAExample(question="q", answers=("a",))]  # ORQA-style: no gold block
  assert finetune.supervision_gold_ids(examples, "answer") is None
  np.testing.assert_array_equal(finetune.supervision_gold_ids(examples, "gold"),
                                [e.gold_doc_id for e in examples[:3]] + [-1])
  with pytest.raises(ValueError, match="qa.supervision"):
    finetune.supervision_gold_ids(examples, "oracle")
