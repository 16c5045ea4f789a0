"""Builds (once) and loads everything a run reads: blocks, vocabulary and encoded queries.

Layout of a prepared corpus folder (`data.corpus_dir`, default `<workdir>/corpus`):
```
vocab.txt            WordPiece vocabulary (trained on the corpus or copied from data.vocab_file)
blocks/              BlockCorpus arrays (random access by doc id, memory-mapped)
queries.npz          train_* and eval_* masked-query arrays (+ source and gold doc ids);
                     wiki: also ict_eval_* (held-out sentences as ICT pseudo-queries)
block_texts.jsonl    {"doc_id", "record", "title", "text"} per block, for display (facts: record
                     = doc_id; wiki: the source record, see wiki_corpus)
build_config.json    the data config it was built from, checked on every load; written last
```
`data.corpus="facts"`: the generated corpus, built in a tmp sibling and renamed into place.
`data.corpus="wiki"`: Wikipedia (`data.source`: JSONL or TFDS) built in place by `wiki_corpus`
(sharded, resumable) plus `wiki_data` (held-out split, queries); build_config.json last.
Either way a folder without build_config.json is never read as a finished one.

A corpus too small for the run is refused when it is built (before build_config.json, so the
folder is not marked complete) and again when it is loaded, with the numbers (check_sizes):
train.batch_size training queries, ict.batch_size blocks with sentences, eval.batch_size
held-out queries, retrieval.k blocks, and (wiki) data.num_eval_docs held-out blocks.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
import uuid

import ml_collections
import numpy as np
from etils import epath

from realm_jax import storage
from realm_jax.data import corpus as corpus_lib
from realm_jax.data import facts_corpus
from realm_jax.data import npz_mmap
from realm_jax.data import pipeline
from realm_jax.data import tokenizer as tokenizer_lib
from realm_jax.data import wiki_corpus
from realm_jax.data import wiki_data

BUILD_CONFIG = "build_config.json"
# Data fields that change what is built, per corpus kind.
_BUILD_FIELDS = {
    "facts": ("corpus", "num_entities", "mentions_per_entity", "corpus_seed", "vocab_size",
              "vocab_file", "doc_len", "query_len", "max_masked", "masking"),
    "wiki": ("corpus", "source", "limit", "corpus_seed", "vocab_size", "vocab_file",
             "vocab_records", "doc_len", "query_len", "max_masked", "masking", "salient_tagger",
             "num_eval_docs", "max_train_queries"),
}


class CorpusTooSmall(ValueError):
  """The prepared corpus cannot fill the configured batches or held-out set."""


@dataclasses.dataclass(frozen=True)
class CorpusSizes:
  """What a prepared corpus offers a run (see check_sizes)."""

  num_docs: int  # blocks (the null document not counted)
  ict_docs: int  # blocks with a sentence ICT may use (held-out sentences excluded)
  train_queries: int  # REALM training queries (wiki: usable salient spans)
  eval_queries: int  # held-out masked queries
  heldout_docs: int | None = None  # wiki: blocks holding out a sentence


def check_sizes(config: ml_collections.ConfigDict, sizes: CorpusSizes, where: str) -> None:
  """Raises CorpusTooSmall naming every batch or held-out field the corpus cannot serve."""
  problems = []
  def need(have: int, field: str, want: int, what: str) -> None:
    if have < want:
      problems.append(f"{have} {what} < {field}={want}")
  need(sizes.train_queries, "train.batch_size", config.train.batch_size, "training queries")
  need(sizes.ict_docs, "ict.batch_size", config.ict.batch_size, "blocks with ICT sentences")
  need(sizes.eval_queries, "eval.batch_size", config.eval.batch_size, "held-out queries")
  need(sizes.num_docs, "retrieval.k", config.retrieval.k, "blocks")
  if sizes.heldout_docs is not None and config.data.corpus == "wiki":
    need(sizes.heldout_docs, "data.num_eval_docs", config.data.num_eval_docs,
         "blocks could hold out a sentence (>= 2 sentences, one with a usable salient span "
         "found nowhere else)")
  if problems:
    raise CorpusTooSmall(
        f"{where}: the corpus is too small for this config: {'; '.join(problems)} "
        f"({sizes.num_docs} blocks in all). Use more data (data.num_entities, data.limit, "
        "data.source) or smaller batches / data.num_eval_docs.")


def _ict_docs(corpus: corpus_lib.BlockCorpus, heldout_sentences: np.ndarray | None) -> int:
  """Blocks with at least one sentence that is not held out."""
  counts = corpus.sentence_counts()
  if heldout_sentences is not None and len(heldout_sentences):
    docs = wiki_data.doc_of_sentence(corpus, np.asarray(heldout_sentences))
    counts = counts - np.bincount(docs, minlength=len(counts))
  return int(np.sum(counts > 0))


def write_block_texts(docs, path: epath.Path) -> None:
  """block_texts.jsonl of a corpus built from docs (row i = docs[i]): the wiki format."""
  with path.open("w") as f:
    for doc_id, doc in enumerate(docs):
      f.write(json.dumps(dict(doc_id=doc_id, record=doc_id, title=doc.title,
                              text=" ".join(doc.sentences))) + "\n")


@dataclasses.dataclass
class PreparedData:
  corpus: corpus_lib.BlockCorpus
  # query_tokens, masked_*, source_ids, gold_ids: [Q, ...] (facts; wiki: see train_span_ids)
  train_queries: dict[str, np.ndarray]
  eval_queries: dict[str, np.ndarray]
  directory: epath.Path
  # Unmasked held-out pseudo-queries with their gold block, for ICT recall (wiki); None: use
  # eval_queries (facts: their gold document is known).
  ict_eval_queries: dict[str, np.ndarray] | None = None
  # Wiki: evaluation blocks [E] and their held-out sentences [E] (global sentence index),
  # which ICT never trains on.
  heldout_doc_ids: np.ndarray | None = None
  heldout_sentences: np.ndarray | None = None
  # Wiki: training queries are built per batch from these spans (span_sentence, span_start,
  # span_end [P]) and the usable span ids [P'] (SpanQuerySource), not materialized.
  salient_spans: dict[str, np.ndarray] | None = None
  train_span_ids: np.ndarray | None = None

  def train_source(self, data_config: ml_collections.ConfigDict, global_batch_size: int,
                   seed: int, process_index: int = 0, process_count: int = 1):
    """The REALM batch source: `batch_at(step)` -> this process's masked queries."""
    if self.train_span_ids is not None:
      return pipeline.SpanQuerySource(
          self.corpus, self.salient_spans, self.train_span_ids, global_batch_size, seed,
          data_config.query_len, data_config.max_masked, data_config.masking, process_index,
          process_count)
    return pipeline.BatchSource(self.train_queries, global_batch_size, seed, process_index,
                                process_count)

  @property
  def special(self) -> tokenizer_lib.SpecialIds:
    return self.corpus.special


def _build_spec(data_config: ml_collections.ConfigDict) -> dict:
  return {field: data_config[field] for field in _BUILD_FIELDS[data_config.corpus]}


def _encode(queries, tokenizer, data_config, seed: int) -> dict[str, np.ndarray]:
  """Masked-query arrays (query_tokens, masked_*, source_ids, gold_ids), all [Q, ...]."""
  if data_config.masking == "salient":
    arrays = pipeline.encode_facts_queries(queries, tokenizer, data_config.query_len,
                                           data_config.max_masked)
  else:  # random-token masking: the ablation of salient spans
    arrays = pipeline.encode_random_masked_queries(
        [q.text for q in queries], tokenizer, data_config.query_len, data_config.max_masked,
        seed=seed, source_ids=[q.source_doc_id for q in queries],
        gold_ids=[q.gold_doc_id for q in queries])
  arrays = dict(arrays)
  arrays.pop("kept")
  arrays["query_tokens"] = arrays.pop("tokens")
  return arrays


def build_facts_data(data_config: ml_collections.ConfigDict, directory: epath.PathLike,
                     config: ml_collections.ConfigDict | None = None) -> None:
  """Generates the facts corpus, its tokenizer, blocks and queries into `directory`.

  With the run's config, a corpus too small for it (check_sizes) is refused before anything
  is published.
  """
  directory = epath.Path(directory)
  start = time.time()
  facts = facts_corpus.generate_facts_corpus(
      data_config.num_entities, data_config.corpus_seed,
      mentions_per_entity=data_config.mentions_per_entity)
  # Local: built in a tmp folder renamed into place; object storage: in `directory` itself,
  # build_config.json (what `prepare_data` requires) last (`storage.publish_folder`).
  with storage.publish_folder(
      directory, BUILD_CONFIG, clear_leftover=False,
      tmp=directory.parent / f".{directory.name}.tmp-{uuid.uuid4().hex[:8]}") as tmp:
    if data_config.vocab_file:
      tokenizer = tokenizer_lib.load_tokenizer(data_config.vocab_file)
      (tmp / "vocab.txt").write_text(
          tokenizer_lib.read_vocab_file(data_config.vocab_file)[1])
    else:
      tokenizer = tokenizer_lib.train_wordpiece(facts.vocab_texts(), data_config.vocab_size, tmp)
    blocks = corpus_lib.build_block_corpus(facts.docs, tokenizer, data_config.doc_len)
    train = _encode(facts.train_queries(), tokenizer, data_config, seed=data_config.corpus_seed)
    evaluation = _encode(facts.eval_queries(), tokenizer, data_config,
                         seed=data_config.corpus_seed + 1)
    if config is not None:
      check_sizes(config, CorpusSizes(
          num_docs=blocks.num_docs, ict_docs=_ict_docs(blocks, None),
          train_queries=len(train["query_tokens"]),
          eval_queries=len(evaluation["query_tokens"])), f"facts corpus for {directory}")
    corpus_lib.save_block_corpus(blocks, tmp / "blocks")
    write_block_texts(facts.docs, tmp / wiki_corpus.TEXTS_FILE)
    with (tmp / "queries.npz").open("wb") as f:  # np.savez of a gs:// path would write locally
      np.savez(f, **{f"train_{k}": v for k, v in train.items()},
               **{f"eval_{k}": v for k, v in evaluation.items()})
    (tmp / BUILD_CONFIG).write_text(json.dumps(_build_spec(data_config), indent=1))
  logging.info("data: built %d documents, %d train and %d eval queries, vocab %d in %s (%.1fs)",
               blocks.num_docs, len(train["query_tokens"]), len(evaluation["query_tokens"]),
               blocks.vocab_size, directory, time.time() - start)


def build_wiki_data(data_config: ml_collections.ConfigDict, directory: epath.PathLike,
                    config: ml_collections.ConfigDict | None = None) -> None:
  """Builds (resuming) the Wikipedia blocks, held-out split and queries in `directory`.

  With the run's config, a corpus too small for it (check_sizes) is refused before
  build_config.json marks the folder complete (the built blocks stay, for a resumed build).
  """
  directory = epath.Path(directory)
  start = time.time()
  queries = wiki_data.build_wiki_data(data_config, directory, seed=data_config.corpus_seed)
  if config is not None:
    blocks = corpus_lib.load_block_corpus(directory / "blocks")
    heldout = wiki_data.load_heldout(directory)
    check_sizes(config, CorpusSizes(
        num_docs=blocks.num_docs, ict_docs=_ict_docs(blocks, heldout[1]),
        train_queries=len(queries["train_span_ids"]),
        eval_queries=len(queries["eval_query_tokens"]), heldout_docs=len(heldout[0])),
        f"wiki corpus in {directory}")
  with (directory / "queries.npz").open("wb") as f:
    np.savez(f, **queries)
  (directory / BUILD_CONFIG).write_text(json.dumps(_build_spec(data_config), indent=1))
  logging.info("data: wiki data ready in %s (%.1fs)", directory, time.time() - start)


def prepare_data(config: ml_collections.ConfigDict, workdir: epath.PathLike,
                 build: bool = True) -> PreparedData:
  """Loads the prepared corpus, building it first when it is missing and `build` is set."""
  data_config = config.data
  directory = epath.Path(data_config.corpus_dir or epath.Path(workdir) / "corpus")
  if not (directory / BUILD_CONFIG).exists():
    if not build:
      raise FileNotFoundError(f"no prepared corpus at {directory}")
    if data_config.corpus == "wiki":
      build_wiki_data(data_config, directory, config)
    else:
      build_facts_data(data_config, directory, config)
  built_with = json.loads((directory / BUILD_CONFIG).read_text())
  differing = {k: (built_with.get(k), v) for k, v in _build_spec(data_config).items()
               if built_with.get(k) != v}
  if differing:
    detail = ", ".join(f"data.{k}: built {b!r}, config {c!r}" for k, (b, c) in differing.items())
    raise ValueError(f"the corpus in {directory} was built with other settings ({detail}); "
                     "use another workdir or data.corpus_dir")
  blocks = corpus_lib.load_block_corpus(directory / "blocks")
  arrays = npz_mmap.load_npz(directory / "queries.npz")  # train_span_ids mapped, not read
  split = lambda prefix: {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}
  heldout = wiki_data.load_heldout(directory)
  train_span_ids = arrays.pop("train_span_ids", None)
  train_queries, eval_queries = split("train_"), split("eval_")
  check_sizes(config, CorpusSizes(
      num_docs=blocks.num_docs,
      ict_docs=_ict_docs(blocks, None if heldout is None else heldout[1]),
      train_queries=(len(train_queries["query_tokens"]) if train_span_ids is None
                     else len(train_span_ids)),
      eval_queries=len(eval_queries["query_tokens"]),
      heldout_docs=None if heldout is None else len(heldout[0])), f"corpus in {directory}")
  return PreparedData(blocks, train_queries, eval_queries, directory,
                      ict_eval_queries=split("ict_eval_") or None,
                      heldout_doc_ids=None if heldout is None else heldout[0],
                      heldout_sentences=None if heldout is None else heldout[1],
                      salient_spans=(None if train_span_ids is None
                                     else wiki_corpus.load_salient_spans(directory)),
                      train_span_ids=train_span_ids)
