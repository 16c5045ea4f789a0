"""A generated world of fictional people whose masked facts only retrieval can recover.

Every entity has one *profile* document stating its four attributes. *Mention* documents
restate single facts in other words; each mention sentence is a query whose salient span is the
attribute value, answerable from the entity's profile (the gold document) and not from the
sentence itself. Queries are split by entity, so eval facts are never seen in training queries.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Literal

import numpy as np

ATTRIBUTES = ("birthplace", "birth_year", "occupation", "instrument")

OCCUPATIONS = (
    "baker", "pilot", "farmer", "teacher", "doctor", "nurse", "lawyer", "carpenter", "plumber",
    "tailor", "butcher", "painter", "sculptor", "architect", "engineer", "chemist", "dentist",
    "pharmacist", "librarian", "journalist", "photographer", "fisherman", "blacksmith", "potter",
    "jeweler", "surgeon", "astronomer", "geologist", "banker", "accountant",
)
INSTRUMENTS = (
    "violin", "cello", "flute", "drum", "trumpet", "harp", "piano", "guitar", "clarinet", "oboe",
    "saxophone", "trombone", "banjo", "accordion", "harmonica", "mandolin", "tuba", "bassoon",
    "ukulele", "xylophone", "bagpipe", "sitar", "zither", "viola",
)
BIRTH_YEARS = tuple(str(year) for year in range(1900, 2000))
NUM_CITIES = 48

# Fictional words are built from these syllables; cities add a place-like ending.
_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "gr",
           "kr", "st", "th", "tr", "sh")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ei", "ou")
_CODAS = ("", "", "n", "r", "l", "s", "m", "th")
_CITY_ENDINGS = ("mora", "holm", "dell", "wick", "stad", "burg", "ria", "mouth")

_EVENTS = ("harbor fair", "spring festival", "town meeting", "winter market", "book fair",
           "charity dinner", "river parade", "science fair", "garden show", "autumn gala",
           "chess tournament", "film night")
_NEWSPAPERS = ("Morning Herald", "Evening Courier", "Weekly Chronicle", "Daily Ledger",
               "Sunday Gazette", "City Bulletin")

# {name}: full name, {last}: last name, {a}: "a"/"an" for {value}. Short sentences keep blocks
# small (CPU demo), and no wording is shared between two attributes, so the masked slot's type
# is always clear from the query ("born in [MASK]" could be a city or a year: not used).
_PROFILE_TEMPLATES = {
    "birthplace": ("{name} is a native of {value}.", "The hometown of {name} is {value}.",
                   "{last} comes from {value}."),
    "birth_year": ("{name} was born in the year {value}.", "The birth year of {name} is {value}.",
                   "{last} was born in the year {value}."),
    "occupation": ("{name} works as {a} {value}.", "{last} works as {a} {value}.",
                   "By profession, {name} is {a} {value}."),
    "instrument": ("{name} plays the {value}.", "{last} plays the {value}.",
                   "{name} is a skilled {value} player."),
}
# Mention templates word each fact differently from the profile and never start with {value}.
_MENTION_TEMPLATES = {
    "birthplace": ("{name} grew up in {value}.", "{name} spoke fondly of {value}, their hometown.",
                   "{name} first saw the light of day in {value}."),
    "birth_year": ("Records from {value} note the birth of {name}.",
                   "{name} came into the world in {value}.",
                   "{name} has been alive since {value}."),
    "occupation": ("The {value} {name} gave a short talk.",
                   "Everyone knew {name} as the local {value}.",
                   "{name} earns a living as {a} {value}."),
    "instrument": ("{name} performed a piece on the {value}.",
                   "Neighbors often hear {name} practicing the {value}.",
                   "{name} surprised everyone with a solo on the {value}."),
}

# The Open-QA question asked about each attribute (qa/data.py:facts_questions). Their words are
# in the tokenizer's training texts (FactsCorpus.vocab_texts), not in the corpus.
QUESTION_TEMPLATES = {
    "birthplace": "Where was {name} born?",
    "birth_year": "When was {name} born?",
    "occupation": "What does {name} do for a living?",
    "instrument": "What instrument does {name} play?",
}

# Sentences about an entity that state none of its attributes (mention-doc filler).
_FILLER_TEMPLATES = (
    "{name} attended the {event} with friends.",
    "Friends describe {name} as generous and kind.",
    "{name} won a small prize at the {event}.",
    "Many people in town know {last} well.",
    "{name} met the mayor at the {event}.",
    "Last year {last} moved to a bigger house.",
)


@dataclasses.dataclass(frozen=True)
class Entity:
  """A fictional person and its four attribute values."""

  entity_id: int
  first_name: str
  last_name: str
  attributes: Mapping[str, str]

  @property
  def full_name(self) -> str:
    return f"{self.first_name} {self.last_name}"


@dataclasses.dataclass(frozen=True)
class Doc:
  """A corpus document: a title and its body sentences."""

  doc_id: int
  title: str
  sentences: tuple[str, ...]
  kind: Literal["profile", "mention"]


@dataclasses.dataclass(frozen=True)
class Query:
  """A mention sentence whose attribute value (the salient span) is to be masked and predicted."""

  text: str
  span: tuple[int, int]  # [start, end) character offsets of the attribute value in text
  source_doc_id: int  # the mention doc the sentence came from (trivial retrieval, excluded)
  gold_doc_id: int  # the entity's profile doc
  entity_id: int
  attribute: str
  split: Literal["train", "eval"]


@dataclasses.dataclass(frozen=True)
class FactsCorpus:
  """Documents (profiles at ids 0..E-1, then mentions), queries and the entities behind them."""

  docs: tuple[Doc, ...]
  queries: tuple[Query, ...]
  entities: tuple[Entity, ...]
  attribute_values: Mapping[str, tuple[str, ...]]  # each attribute's value vocabulary

  def train_queries(self) -> tuple[Query, ...]:
    return tuple(q for q in self.queries if q.split == "train")

  def eval_queries(self) -> tuple[Query, ...]:
    return tuple(q for q in self.queries if q.split == "eval")

  def all_texts(self) -> list[str]:
    """Every title and sentence."""
    return [text for doc in self.docs for text in (doc.title, *doc.sentences)]

  def question(self, entity_id: int, attribute: str) -> str:
    """The Open-QA question asking for one entity's attribute ("When was <name> born?")."""
    return QUESTION_TEMPLATES[attribute].format(name=self.entities[entity_id].full_name)

  def vocab_texts(self) -> list[str]:
    """The tokenizer's training texts: every title and sentence, and every entity's questions.

    The corpus states facts and never asks: "when", "where", "what" and "?" are in none of its
    sentences. A vocabulary learned from them alone splits "when" / "where" into pieces
    ("w ##he ##n" / "w ##her ##e") and "?" into [UNK], and the QA reader had to tell the
    question kinds apart from those barely trained pieces: in some runs it answered "when" with
    the place (issue 12). With the questions counted, each question word is one token.
    """
    questions = [self.question(entity.entity_id, attribute)
                 for entity in self.entities for attribute in ATTRIBUTES]
    return self.all_texts() + questions


def _fictional_words(
    rng: np.random.Generator, count: int, syllables: int, endings: tuple[str, ...],
    taken: set[str],
) -> list[str]:
  """`count` new capitalized words that neither contain nor are contained in any `taken` word."""
  words: list[str] = []
  while len(words) < count:
    parts = [_ONSETS[rng.integers(len(_ONSETS))] + _VOWELS[rng.integers(len(_VOWELS))]
             + _CODAS[rng.integers(len(_CODAS))] for _ in range(syllables)]
    word = "".join(parts) + endings[rng.integers(len(endings))]
    if 4 <= len(word) <= 12 and not any(word in t or t in word for t in taken):
      taken.add(word)
      words.append(word.capitalize())
  return words


def _fill(template: str, value: str, **fields: str) -> tuple[str, tuple[int, int]]:
  """Formats a template and returns the text with the character span of {value}."""
  before, after = template.split("{value}")
  article = "an" if value[0] in "aeiou" else "a"
  prefix = before.format(a=article, **fields)
  text = prefix + value + after.format(a=article, **fields)
  return text, (len(prefix), len(prefix) + len(value))


def generate_facts_corpus(
    num_entities: int,
    seed: int,
    mentions_per_entity: int = 4,
    sentences_per_mention_doc: int = 3,
    eval_fraction: float = 0.2,
    name_pool_size: int = 0,
) -> FactsCorpus:
  """Generates the corpus deterministically from `seed` (see the module docstring)."""
  if num_entities < 1 or mentions_per_entity < 1 or sentences_per_mention_doc < 1:
    raise ValueError(
        "num_entities, mentions_per_entity and sentences_per_mention_doc must be >= 1.")
  if sentences_per_mention_doc > len(_FILLER_TEMPLATES) + 1:
    raise ValueError(f"sentences_per_mention_doc must be <= {len(_FILLER_TEMPLATES) + 1}.")
  if not 0.0 <= eval_fraction < 1.0:
    raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}.")
  rng = np.random.default_rng(seed)

  taken = {w for w in OCCUPATIONS + INSTRUMENTS}
  cities = tuple(_fictional_words(rng, NUM_CITIES, 1, _CITY_ENDINGS, taken))
  # First and last names each; full names are unique pairs, parts are shared across entities.
  num_names = max(name_pool_size, math.ceil(math.sqrt(3 * num_entities)))
  first_names = _fictional_words(rng, num_names, 2, ("",), taken)
  last_names = _fictional_words(rng, num_names, 2, ("",), taken)
  values = {"birthplace": cities, "birth_year": BIRTH_YEARS, "occupation": OCCUPATIONS,
            "instrument": INSTRUMENTS}

  pairs = rng.choice(num_names * num_names, size=num_entities, replace=False)
  entities = tuple(
      Entity(e, first_names[p // num_names], last_names[p % num_names],
             {a: values[a][rng.integers(len(values[a]))] for a in ATTRIBUTES})
      for e, p in enumerate(pairs))

  # Profile and mention sentences draw on one template pool, so a retriever cannot tell the
  # gold profile from the entity's other documents by style: it has to learn (REALM's signal)
  # that the profile is the document that holds the masked fact.
  def fact_sentence(entity: Entity, attribute: str, full_name: bool = False
                    ) -> tuple[str, tuple[int, int]]:
    templates = _PROFILE_TEMPLATES[attribute] + _MENTION_TEMPLATES[attribute]
    if full_name:  # queries always name the entity in full, or retrieval would be a guess
      templates = tuple(t for t in templates if "{name}" in t)
    return _fill(templates[rng.integers(len(templates))], entity.attributes[attribute],
                 name=entity.full_name, last=entity.last_name,
                 event=_EVENTS[rng.integers(len(_EVENTS))])

  def fillers(entity: Entity, count: int) -> list[str]:
    return [_FILLER_TEMPLATES[i].format(name=entity.full_name, last=entity.last_name,
                                        event=_EVENTS[rng.integers(len(_EVENTS))])
            for i in rng.choice(len(_FILLER_TEMPLATES), count, replace=False)]

  docs = []
  for entity in entities:
    sentences = [fact_sentence(entity, a)[0] for a in ATTRIBUTES]
    docs.append(Doc(entity.entity_id, entity.full_name,
                    tuple(sentences[i] for i in rng.permutation(len(sentences))), "profile"))

  num_eval = round(num_entities * eval_fraction)
  eval_entities = set(rng.permutation(num_entities)[:num_eval].tolist())
  # Each mention doc is about one entity (as a Wikipedia block is about its topic, so ICT can
  # learn from it): one sentence stating a single attribute, the query, plus filler sentences
  # about the entity with no attribute value. Mention r of an entity states attribute
  # (offset + r) mod 4, so its other mention docs never hold the answer: only the profile does.
  attribute_offset = rng.integers(len(ATTRIBUTES), size=num_entities)
  queries = []
  issues = dict.fromkeys(_NEWSPAPERS, 0)
  for round_index in range(mentions_per_entity):
    for e in rng.permutation(num_entities).tolist():
      doc_id = len(docs)
      entity = entities[e]
      attribute = ATTRIBUTES[(attribute_offset[e] + round_index) % len(ATTRIBUTES)]
      text, span = fact_sentence(entity, attribute, full_name=True)
      sentences = fillers(entity, sentences_per_mention_doc - 1) + [text]
      sentences = [sentences[i] for i in rng.permutation(len(sentences))]
      queries.append(Query(text, span, doc_id, e, e, attribute,
                           "eval" if e in eval_entities else "train"))
      paper = _NEWSPAPERS[rng.integers(len(_NEWSPAPERS))]
      issues[paper] += 1
      docs.append(Doc(doc_id, f"{paper} issue {issues[paper]}", tuple(sentences), "mention"))

  return FactsCorpus(tuple(docs), tuple(queries), entities, values)
