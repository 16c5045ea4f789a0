"""Tests of realm_jax.data.facts_corpus: the generated facts world and its queries."""

import collections
import re

import pytest

from realm_jax.data import facts_corpus
from realm_jax.data import tokenizer as tokenizer_lib

NUM_ENTITIES = 50


@pytest.fixture(scope="module")
def corpus():
  return facts_corpus.generate_facts_corpus(NUM_ENTITIES, seed=3)


def test_same_seed_same_corpus_other_seed_other_corpus(corpus):
  assert facts_corpus.generate_facts_corpus(NUM_ENTITIES, seed=3) == corpus
  other = facts_corpus.generate_facts_corpus(NUM_ENTITIES, seed=4)
  assert other.docs != corpus.docs
  assert other.entities != corpus.entities


@pytest.mark.parametrize("mentions_per_entity, sentences_per_doc", [(4, 3), (2, 4), (6, 1)])
def test_sizes_and_doc_ids_are_as_requested(mentions_per_entity, sentences_per_doc):
  corpus = facts_corpus.generate_facts_corpus(
      17, seed=0, mentions_per_entity=mentions_per_entity,
      sentences_per_mention_doc=sentences_per_doc)
  assert len(corpus.entities) == 17
  assert len(corpus.queries) == 17 * mentions_per_entity
  assert [doc.doc_id for doc in corpus.docs] == list(range(len(corpus.docs)))
  assert [doc.kind for doc in corpus.docs[:17]] == ["profile"] * 17
  mentions = corpus.docs[17:]
  assert {doc.kind for doc in mentions} == {"mention"}
  assert len(mentions) == mentions_per_entity * 17  # one entity per mention doc
  assert {len(doc.sentences) for doc in mentions} == {sentences_per_doc}


def test_each_mention_doc_is_about_one_entity_and_states_one_fact(corpus):
  by_doc = {q.source_doc_id: q for q in corpus.queries}
  for doc in corpus.docs:
    if doc.kind != "mention":
      continue
    entity = corpus.entities[by_doc[doc.doc_id].entity_id]
    assert all(entity.last_name in sentence for sentence in doc.sentences), doc
    stated = [a for a in facts_corpus.ATTRIBUTES
              if any(entity.attributes[a] in s for s in doc.sentences)]
    assert stated == [by_doc[doc.doc_id].attribute], doc


def test_profile_docs_state_all_four_attributes_of_their_entity(corpus):
  for entity in corpus.entities:
    profile = corpus.docs[entity.entity_id]
    assert profile.title == entity.full_name
    assert sorted(_stated_attributes(profile, entity)) == sorted(facts_corpus.ATTRIBUTES)


def _stated_attributes(doc, entity):
  """The attribute whose value each sentence states (each must state exactly one)."""
  stated = [[a for a, v in entity.attributes.items() if v in s] for s in doc.sentences]
  assert all(len(attributes) == 1 for attributes in stated), doc
  return [attributes[0] for attributes in stated]


def test_query_span_is_the_gold_value_found_once_in_query_and_in_gold_profile(corpus):
  for query in corpus.queries:
    entity = corpus.entities[query.entity_id]
    value = entity.attributes[query.attribute]
    assert query.text[query.span[0]:query.span[1]] == value
    assert query.text.lower().count(value.lower()) == 1
    assert query.gold_doc_id == query.entity_id
    assert value in " ".join(corpus.docs[query.gold_doc_id].sentences)


def test_each_query_states_exactly_one_attribute_value(corpus):
  all_values = {v.lower() for vocab in corpus.attribute_values.values() for v in vocab}
  for query in corpus.queries:
    words = set(re.findall(r"\w+", query.text.lower()))
    value = corpus.entities[query.entity_id].attributes[query.attribute]
    assert words & all_values == {value.lower()}, query.text


def test_entity_full_name_in_query_and_gold_profile(corpus):
  for query in corpus.queries:
    name = corpus.entities[query.entity_id].full_name
    assert name in query.text
    assert name in " ".join(corpus.docs[query.gold_doc_id].sentences)


def test_query_comes_from_its_source_mention_doc_whose_entities_differ(corpus):
  for query in corpus.queries:
    source = corpus.docs[query.source_doc_id]
    assert source.kind == "mention"
    assert query.text in source.sentences
  entities_by_doc = collections.defaultdict(list)
  for query in corpus.queries:
    entities_by_doc[query.source_doc_id].append(query.entity_id)
  for entity_ids in entities_by_doc.values():
    assert len(set(entity_ids)) == len(entity_ids)


def test_each_entity_is_mentioned_once_per_attribute(corpus):
  attributes_by_entity = collections.defaultdict(list)
  for query in corpus.queries:
    attributes_by_entity[query.entity_id].append(query.attribute)
  assert len(attributes_by_entity) == NUM_ENTITIES
  for attributes in attributes_by_entity.values():
    assert sorted(attributes) == sorted(facts_corpus.ATTRIBUTES)


def test_split_is_by_entity(corpus):
  train_entities = {q.entity_id for q in corpus.train_queries()}
  eval_entities = {q.entity_id for q in corpus.eval_queries()}
  assert not train_entities & eval_entities
  assert len(eval_entities) == round(0.2 * NUM_ENTITIES)
  assert len(corpus.train_queries()) + len(corpus.eval_queries()) == len(corpus.queries)


def test_attribute_value_vocabularies_are_disjoint_and_used(corpus):
  values = corpus.attribute_values
  all_values = [v.lower() for vocab in values.values() for v in vocab]
  assert len(all_values) == len(set(all_values))
  for entity in corpus.entities:
    for attribute, value in entity.attributes.items():
      assert value in values[attribute]


def test_names_are_unique_pairs_of_shared_first_and_last_names(corpus):
  full_names = [e.full_name for e in corpus.entities]
  assert len(set(full_names)) == NUM_ENTITIES
  assert len({e.first_name for e in corpus.entities}) < NUM_ENTITIES
  assert len({e.last_name for e in corpus.entities}) < NUM_ENTITIES
  city_names = set(corpus.attribute_values["birthplace"])
  person_names = {e.first_name for e in corpus.entities} | {e.last_name for e in corpus.entities}
  assert not city_names & person_names


def test_all_texts_are_titles_and_sentences(corpus):
  texts = corpus.all_texts()
  assert len(texts) == sum(1 + len(doc.sentences) for doc in corpus.docs)
  assert corpus.docs[5].title in texts and corpus.docs[-1].sentences[0] in texts


@pytest.mark.parametrize("kwargs", [dict(num_entities=0), dict(eval_fraction=1.0),
                                    dict(sentences_per_mention_doc=0)])
def test_bad_arguments_raise(kwargs):
  with pytest.raises(ValueError):
    facts_corpus.generate_facts_corpus(**{"num_entities": 5, "seed": 0, **kwargs})


def test_the_vocabulary_makes_each_question_word_one_token(corpus, tmp_path):
  """The QA questions' words ("when", "where", "?") are in no corpus sentence: trained on the
  corpus alone the vocabulary splits them into pieces that tell "when" from "where" by a
  barely trained piece or two; trained on `vocab_texts` each is one token."""
  def question_pieces(texts):
    tok = tokenizer_lib.train_wordpiece(texts, 400, tmp_path / str(len(texts)))
    pieces = {}
    for attribute, template in facts_corpus.QUESTION_TEMPLATES.items():
      words = template.replace("{name}", "").replace("?", " ?").lower().split()
      pieces[attribute] = [tok.encode(w).tokens for w in words]
    return pieces

  corpus_only = question_pieces(corpus.all_texts())
  assert corpus_only["birthplace"][0] != ["where"]  # the defect this guards against
  assert ["[UNK]"] in corpus_only["birth_year"]  # "?" was not even in the alphabet
  with_questions = question_pieces(corpus.vocab_texts())
  for attribute, words in with_questions.items():
    assert all(len(word) == 1 and word[0] != "[UNK]" for word in words), (attribute, words)
  questions = corpus.vocab_texts()[len(corpus.all_texts()):]
  assert len(questions) == NUM_ENTITIES * len(facts_corpus.ATTRIBUTES)
  assert corpus.question(3, "birth_year") == f"When was {corpus.entities[3].full_name} born?"
