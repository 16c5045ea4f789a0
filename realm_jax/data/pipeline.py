"""Masked-query and ICT examples, and batches that are a pure function of (seed, step, process).

A batch depends only on the seed, the step and the process's place, so the data-iterator state
to checkpoint is just the step: a resumed run asks for `batch_at(step)` and continues exactly.
Each process builds only its own slice `[global_batch // process_count]` of the global batch.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import grain
import numpy as np
import tokenizers

from realm_jax.data import chained
from realm_jax.data.corpus import BlockCorpus, pack_block
from realm_jax.data.facts_corpus import Query
from realm_jax.data.tokenizer import SpecialIds, special_ids

_RANDOM_MASK_FRACTIONS = (0.8, 0.1)  # BERT: 80% [MASK], 10% random token, 10% unchanged


def _masked_query_arrays(
    ids: list[list[int]], positions: list[np.ndarray], labels: list[np.ndarray],
    query_len: int, max_masked: int, special: SpecialIds,
) -> dict[str, np.ndarray]:
  """Packs `[CLS] ids [SEP]` rows (ids already truncated, masked) and their masked slots."""
  num = len(ids)
  tokens = np.full((num, query_len), special.pad, np.int32)
  masked_positions = np.zeros((num, max_masked), np.int32)
  masked_labels = np.zeros((num, max_masked), np.int32)
  masked_weights = np.zeros((num, max_masked), np.float32)
  for row in range(num):
    packed = [special.cls, *ids[row], special.sep]
    tokens[row, :len(packed)] = packed
    count = len(positions[row])
    masked_positions[row, :count] = positions[row]
    masked_labels[row, :count] = labels[row]
    masked_weights[row, :count] = 1.0
  return dict(tokens=tokens, masked_positions=masked_positions, masked_labels=masked_labels,
              masked_weights=masked_weights)


def _with_doc_ids(
    arrays: dict[str, np.ndarray], kept: list[int], source_ids: Sequence[int] | None,
    gold_ids: Sequence[int] | None,
) -> dict[str, np.ndarray]:
  """Adds kept [Q'] (input indices), source_ids and gold_ids [Q'] (-1 when not given), int32."""
  def select(values: Sequence[int] | None) -> np.ndarray:
    if values is None:
      return np.full(len(kept), -1, np.int32)
    return np.asarray(values, np.int32)[np.asarray(kept, np.int64)]
  return dict(arrays, kept=np.asarray(kept, np.int32), source_ids=select(source_ids),
              gold_ids=select(gold_ids))


def encode_salient_queries(
    texts: Sequence[str], spans: Sequence[tuple[int, int]], tokenizer: tokenizers.Tokenizer,
    query_len: int, max_masked: int, source_ids: Sequence[int] | None = None,
    gold_ids: Sequence[int] | None = None,
) -> dict[str, np.ndarray]:
  """`[CLS] text [SEP]` with every wordpiece overlapping the char span masked.

  Returns, for the Q' kept queries: tokens [Q', query_len], masked_positions / masked_labels
  [Q', max_masked] int32, masked_weights [Q', max_masked] float32, kept, source_ids, gold_ids
  [Q'] int32. Queries whose span covers no wordpiece, more than max_masked wordpieces, or
  wordpieces cut off by truncation are dropped (and counted in the log).
  """
  special = special_ids(tokenizer)
  max_body = query_len - 2
  encodings = tokenizer.encode_batch(list(texts), add_special_tokens=False)
  kept, ids, positions, labels = [], [], [], []
  for index, (encoding, (start, end)) in enumerate(zip(encodings, spans, strict=True)):
    span_pieces = [j for j, (a, b) in enumerate(encoding.offsets) if a < end and b > start]
    if not span_pieces or len(span_pieces) > max_masked or span_pieces[-1] >= max_body:
      continue
    row_ids = encoding.ids[:max_body]
    labels.append(np.asarray([row_ids[j] for j in span_pieces], np.int32))
    for j in span_pieces:
      row_ids[j] = special.mask
    kept.append(index)
    ids.append(row_ids)
    positions.append(np.asarray(span_pieces, np.int32) + 1)  # +1 for [CLS]
  if len(kept) < len(texts):
    logging.info("encode_salient_queries: dropped %d of %d queries (span empty, longer than %d "
                 "wordpieces, or truncated).", len(texts) - len(kept), len(texts), max_masked)
  arrays = _masked_query_arrays(ids, positions, labels, query_len, max_masked, special)
  return _with_doc_ids(arrays, kept, source_ids, gold_ids)


def encode_random_masked_queries(
    texts: Sequence[str], tokenizer: tokenizers.Tokenizer, query_len: int, max_masked: int,
    mask_prob: float = 0.15, seed: int = 0, source_ids: Sequence[int] | None = None,
    gold_ids: Sequence[int] | None = None,
) -> dict[str, np.ndarray]:
  """BERT-style random masking (the ablation) of texts: see random_masked_queries."""
  encodings = tokenizer.encode_batch(list(texts), add_special_tokens=False)
  return random_masked_queries([e.ids for e in encodings], special_ids(tokenizer),
                               tokenizer.get_vocab_size(), query_len, max_masked, mask_prob,
                               seed, source_ids, gold_ids)


def random_masked_queries(
    wordpiece_ids: Sequence[Sequence[int]], special: SpecialIds, vocab_size: int,
    query_len: int, max_masked: int, mask_prob: float = 0.15, seed: int = 0,
    source_ids: Sequence[int] | None = None, gold_ids: Sequence[int] | None = None,
) -> dict[str, np.ndarray]:
  """BERT-style random masking of wordpiece rows: same keys as encode_salient_queries.

  Each query masks mask_prob of its wordpieces (stochastically rounded, at least 1, at most
  max_masked) at random positions: 80% become [MASK], 10% a random non-special token, 10% stay.
  Empty rows are dropped.
  """
  rng = np.random.default_rng(seed)
  replacement_ids = np.setdiff1d(np.arange(vocab_size), special.as_tuple())
  kept, ids, positions, labels = [], [], [], []
  for index, row in enumerate(wordpiece_ids):
    row_ids = np.array(row[:query_len - 2], np.int32)  # a copy: rows may be read-only
    if not len(row_ids):
      continue
    expected_count = mask_prob * len(row_ids)
    count = min(max_masked, max(1, int(expected_count + rng.random())))  # unbiased rounding
    chosen = np.sort(rng.choice(len(row_ids), count, replace=False))
    labels.append(row_ids[chosen])
    action = rng.random(count)  # [count]
    random_tokens = rng.choice(replacement_ids, count)
    mask_fraction, random_fraction = _RANDOM_MASK_FRACTIONS
    row_ids[chosen] = np.where(
        action < mask_fraction, special.mask,
        np.where(action < mask_fraction + random_fraction, random_tokens, row_ids[chosen]))
    kept.append(index)
    ids.append(row_ids.tolist())
    positions.append(chosen + 1)  # +1 for [CLS]
  arrays = _masked_query_arrays(ids, positions, labels, query_len, max_masked, special)
  return _with_doc_ids(arrays, kept, source_ids, gold_ids)


def span_masked_queries(
    wordpiece_ids: Sequence[np.ndarray], spans: Sequence[tuple[int, int]], special: SpecialIds,
    query_len: int, max_masked: int, source_ids: Sequence[int] | None = None,
    gold_ids: Sequence[int] | None = None,
) -> dict[str, np.ndarray]:
  """`[CLS] sentence [SEP]` with the wordpiece span [start, end) masked, from stored spans.

  Same keys as encode_salient_queries; spans that are empty, longer than max_masked or cut off
  by truncation to query_len are dropped.
  """
  max_body = query_len - 2
  kept, ids, positions, labels = [], [], [], []
  for index, (row, (start, end)) in enumerate(zip(wordpiece_ids, spans, strict=True)):
    if not 0 <= start < end <= min(len(row), max_body) or end - start > max_masked:
      continue
    row_ids = np.array(row[:max_body], np.int32)
    labels.append(row_ids[start:end].copy())
    row_ids[start:end] = special.mask
    kept.append(index)
    ids.append(row_ids.tolist())
    positions.append(np.arange(start, end, dtype=np.int32) + 1)  # +1 for [CLS]
  arrays = _masked_query_arrays(ids, positions, labels, query_len, max_masked, special)
  return _with_doc_ids(arrays, kept, source_ids, gold_ids)


def encode_facts_queries(
    queries: Sequence[Query], tokenizer: tokenizers.Tokenizer, query_len: int, max_masked: int,
) -> dict[str, np.ndarray]:
  """Salient-span queries of the facts corpus, with their source and gold doc ids."""
  return encode_salient_queries(
      [q.text for q in queries], [q.span for q in queries], tokenizer, query_len, max_masked,
      source_ids=[q.source_doc_id for q in queries], gold_ids=[q.gold_doc_id for q in queries])


def _local_slice(global_batch_size: int, process_index: int, process_count: int) -> slice:
  """This process's rows of a global batch; validates the batch split."""
  if global_batch_size % process_count:
    raise ValueError(f"global_batch_size {global_batch_size} is not divisible by "
                     f"process_count {process_count}.")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, {process_count}).")
  local = global_batch_size // process_count
  return slice(process_index * local, (process_index + 1) * local)


class BatchSource:
  """Shuffled batches of equal-length arrays: each epoch reshuffled, its remainder dropped.

  `batch_at(step)` is a pure function of (seed, step, process_index, process_count); the
  processes' slices of one step concatenate to the single-process batch. Checkpoint the step.
  """

  def __init__(self, arrays: Mapping[str, np.ndarray], global_batch_size: int, seed: int,
               process_index: int = 0, process_count: int = 1):
    lengths = {name: len(array) for name, array in arrays.items()}
    if len(set(lengths.values())) != 1:
      raise ValueError(f"Arrays must have one common length, got {lengths}.")
    num_examples = next(iter(lengths.values()))
    if global_batch_size > num_examples:
      raise ValueError(f"global_batch_size {global_batch_size} > {num_examples} examples.")
    self._local_slice = _local_slice(global_batch_size, process_index, process_count)
    self._arrays = dict(arrays)
    self._index_batches = (grain.MapDataset.source(range(num_examples)).shuffle(seed=seed)
                           .batch(global_batch_size, drop_remainder=True).repeat())
    self.steps_per_epoch = num_examples // global_batch_size

  def batch_at(self, step: int) -> dict[str, np.ndarray]:
    """This process's rows of the global batch of `step`: [global_batch // process_count, ...]."""
    indices = np.asarray(self._index_batches[step])[self._local_slice]
    return {name: np.asarray(array[indices]) for name, array in self._arrays.items()}


def _ict_examples(
    corpus: BlockCorpus, doc_ids: np.ndarray, draws: np.ndarray, query_len: int,
    remove_prob: float, excluded: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
  """ICT examples from fixed uniform draws [B, 2] (which sentence, whether to remove it).

  `excluded` [S] bool marks sentences (global index) that are never a query nor block text.
  """
  special = corpus.special
  num = len(doc_ids)
  query_tokens = np.full((num, query_len), special.pad, np.int32)
  doc_tokens = np.zeros((num, corpus.doc_len), np.int32)
  doc_segments = np.zeros((num, corpus.doc_len), np.int32)
  query_removed = np.zeros(num, bool)
  for row, doc_id in enumerate(doc_ids.tolist()):
    sentences = corpus.sentence_ids(doc_id)
    if excluded is not None:
      first = int(corpus.doc_sentence_offsets[doc_id])
      sentences = [s for i, s in enumerate(sentences) if not excluded[first + i]]
    if not sentences:
      raise ValueError(f"ICT needs a doc with sentences; doc {doc_id} has none.")
    chosen = min(int(draws[row, 0] * len(sentences)), len(sentences) - 1)
    query = np.concatenate([[special.cls], sentences[chosen][:query_len - 2], [special.sep]])
    query_tokens[row, :len(query)] = query
    query_removed[row] = len(sentences) > 1 and draws[row, 1] < remove_prob
    body = [s for i, s in enumerate(sentences) if not (query_removed[row] and i == chosen)]
    doc_tokens[row], doc_segments[row] = pack_block(
        corpus.title_ids(doc_id), np.concatenate(body), corpus.doc_len, special)
  return dict(query_tokens=query_tokens, doc_tokens=doc_tokens, doc_segments=doc_segments,
              query_removed=query_removed, doc_ids=doc_ids.astype(np.int32))


def ict_batch(
    corpus: BlockCorpus, doc_ids: np.ndarray, rng: np.random.Generator, query_len: int,
    remove_prob: float = 0.9,
) -> dict[str, np.ndarray]:
  """Inverse Cloze Task examples: a random sentence of each block is the pseudo-query.

  With probability remove_prob the sentence is removed from its block (never from a
  single-sentence block). Returns query_tokens [B, query_len] (`[CLS] sentence [SEP]`),
  doc_tokens / doc_segments [B, doc_len] (`[CLS] title [SEP] rest of body [SEP]`),
  query_removed [B] bool and doc_ids [B] int32.
  """
  doc_ids = np.asarray(doc_ids)
  draws = rng.random((len(doc_ids), 2))  # [B, 2]
  return _ict_examples(corpus, doc_ids, draws, query_len, remove_prob)


class IctBatchSource:
  """ICT batches of distinct blocks (in-batch negatives), a pure function of (seed, step).

  `exclude_sentences` (global sentence indices, e.g. held-out evaluation sentences) are never
  a query nor part of a block. Docs without (other) sentences are skipped; single-sentence docs
  always keep their sentence. The processes' slices of one step concatenate to the
  single-process batch. Checkpoint the step.
  """

  def __init__(self, corpus: BlockCorpus, global_batch_size: int, seed: int, query_len: int,
               remove_prob: float = 0.9, process_index: int = 0, process_count: int = 1,
               exclude_sentences: np.ndarray | None = None):
    counts = corpus.sentence_counts()  # [N]
    self._excluded = None
    if exclude_sentences is not None and len(exclude_sentences):
      self._excluded = np.zeros(len(corpus.sentence_offsets) - 1, bool)  # [S]
      self._excluded[np.asarray(exclude_sentences, np.int64)] = True
      excluded_per_doc = np.add.reduceat(
          self._excluded, np.asarray(corpus.doc_sentence_offsets[:-1]))  # [N]
      counts = counts - np.where(counts > 0, excluded_per_doc, 0)
    self._eligible_ids = np.flatnonzero(counts > 0)
    self.num_skipped_docs = int(np.sum(counts == 0))
    self.num_single_sentence_docs = int(np.sum(counts == 1))
    if global_batch_size > len(self._eligible_ids):
      raise ValueError(f"global_batch_size {global_batch_size} > {len(self._eligible_ids)} docs "
                       "with sentences.")
    self._local_slice = _local_slice(global_batch_size, process_index, process_count)
    self._corpus = corpus
    self._global_batch_size = global_batch_size
    self._seed = seed
    self._query_len = query_len
    self._remove_prob = remove_prob
    logging.info("IctBatchSource: %d docs, %d skipped (no sentences), %d single-sentence docs "
                 "keep their query sentence.", len(self._eligible_ids), self.num_skipped_docs,
                 self.num_single_sentence_docs)

  def batch_at(self, step: int) -> dict[str, np.ndarray]:
    """This process's slice of the ICT batch of `step` (see ict_batch for the keys)."""
    rng = np.random.default_rng([self._seed, step])
    doc_ids = rng.choice(self._eligible_ids, self._global_batch_size, replace=False)  # [B]
    draws = rng.random((self._global_batch_size, 2))  # [B, 2]
    return _ict_examples(self._corpus, doc_ids[self._local_slice], draws[self._local_slice],
                         self._query_len, self._remove_prob, self._excluded)


class SpanQuerySource:
  """Masked-span queries built per batch from stored salient spans: nothing materialized.

  For Wikipedia-scale corpora (~10^8 spans). Row r of the shuffled order is span
  `span_ids[r]` of `spans` (span_sentence, span_start, span_end): its sentence as
  `[CLS] sentence [SEP]` with the span masked ("salient"), or BERT random masking of the same
  sentence ("random"), with the sentence's block as source_ids (excluded from retrieval).
  Spans must fit query_len and max_masked (wiki_data filters them). Same contract as
  BatchSource: `batch_at(step)` is a pure function of (seed, step, process).
  """

  def __init__(self, corpus: BlockCorpus, spans: Mapping[str, np.ndarray], span_ids: np.ndarray,
               global_batch_size: int, seed: int, query_len: int, max_masked: int,
               masking: str = "salient", process_index: int = 0, process_count: int = 1):
    span_ids = np.asarray(span_ids, np.int64)
    if global_batch_size > len(span_ids):
      raise ValueError(f"global_batch_size {global_batch_size} > {len(span_ids)} span queries.")
    lengths = spans["span_end"][span_ids] - spans["span_start"][span_ids]
    if (spans["span_end"][span_ids] > query_len - 2).any() or (lengths > max_masked).any():
      raise ValueError("span_ids include spans that do not fit query_len / max_masked")
    self._corpus, self._spans, self._span_ids = corpus, spans, span_ids
    self._seed, self._query_len, self._max_masked = seed, query_len, max_masked
    self._masking = masking
    self._local_slice = _local_slice(global_batch_size, process_index, process_count)
    self._index_batches = (grain.MapDataset.source(range(len(span_ids))).shuffle(seed=seed)
                           .batch(global_batch_size, drop_remainder=True).repeat())
    self.steps_per_epoch = len(span_ids) // global_batch_size

  def batch_at(self, step: int) -> dict[str, np.ndarray]:
    """This process's rows of the global batch of `step`: query_tokens, masked_*, source_ids,
    gold_ids (-1), each [global_batch // process_count, ...]."""
    rows = np.asarray(self._index_batches[step])[self._local_slice]
    chosen = self._span_ids[rows]  # [B_local] span indices
    sentences = self._spans["span_sentence"][chosen]
    offsets = self._corpus.sentence_offsets
    wordpieces = [np.asarray(self._corpus.sentence_token_ids[offsets[i]:offsets[i + 1]])
                  for i in sentences.tolist()]
    docs = chained.searchsorted(self._corpus.doc_sentence_offsets, sentences,
                           side="right") - 1
    if self._masking == "salient":
      spans = list(zip(self._spans["span_start"][chosen].tolist(),
                       self._spans["span_end"][chosen].tolist()))
      arrays = span_masked_queries(wordpieces, spans, self._corpus.special, self._query_len,
                                   self._max_masked, source_ids=docs)
    else:  # each row seeded by its place in the global batch, so processes agree
      per_row = [random_masked_queries(
          [row], self._corpus.special, self._corpus.vocab_size, self._query_len,
          self._max_masked, seed=int(np.random.SeedSequence(
              [self._seed, step, self._local_slice.start + i]).generate_state(1)[0]),
          source_ids=docs[i:i + 1]) for i, row in enumerate(wordpieces)]
      arrays = {k: np.concatenate([a[k] for a in per_row]) for k in per_row[0]}
    if len(arrays["kept"]) != len(chosen):
      raise AssertionError("a filtered span query was dropped")
    arrays.pop("kept")
    arrays["query_tokens"] = arrays.pop("tokens")
    return arrays


class AddedBlockQueries:
  """Masked salient-span training queries from the blocks a corpus version added.

  A trainer following corpus versions (data/corpus_versions.py) retrieves added blocks, but
  its query source was built from the first build's text. This mixes queries from the added
  blocks' stored salient spans into each batch, in proportion to their share of all training
  queries: each row of the global batch of `step` is replaced with probability
  `A / (A + num_base_queries)` by a query from one of the A added spans, drawn with
  replacement. A pure function of (seed, step, corpus version), so processes agree and a resume
  replays it; rows keep their shape, gold unknown (-1), source = the added block.
  """

  def __init__(self, corpus: BlockCorpus, spans: Mapping[str, np.ndarray],
               span_ids: np.ndarray, num_base_queries: int, global_batch_size: int, seed: int,
               query_len: int, max_masked: int, version: int, process_index: int = 0,
               process_count: int = 1):
    self._corpus, self._spans = corpus, spans
    self.span_ids = np.asarray(span_ids, np.int64)
    self.version, self._seed = int(version), seed
    self._query_len, self._max_masked = query_len, max_masked
    self._global_batch_size = global_batch_size
    self._local_slice = _local_slice(global_batch_size, process_index, process_count)
    total = len(self.span_ids) + int(num_base_queries)
    self.fraction = len(self.span_ids) / total if total else 0.0

  def mix(self, batch: dict[str, np.ndarray], step: int) -> dict[str, np.ndarray]:
    """`batch` (this process's rows of step `step`) with its drawn rows replaced."""
    if not len(self.span_ids):
      return batch
    rng = np.random.default_rng([self._seed, step, self.version, 0x11AD])
    replace = rng.random(self._global_batch_size)[self._local_slice] < self.fraction  # [B]
    chosen = self.span_ids[rng.integers(len(self.span_ids),
                                        size=self._global_batch_size)[self._local_slice]]
    rows = np.flatnonzero(replace)
    if not len(rows):
      return batch
    sentences = self._spans["span_sentence"][chosen[rows]]
    offsets = self._corpus.sentence_offsets
    wordpieces = [np.asarray(self._corpus.sentence_token_ids[offsets[i]:offsets[i + 1]])
                  for i in sentences.tolist()]
    docs = chained.searchsorted(self._corpus.doc_sentence_offsets, sentences,
                           side="right") - 1
    spans = list(zip(self._spans["span_start"][chosen[rows]].tolist(),
                     self._spans["span_end"][chosen[rows]].tolist()))
    added = span_masked_queries(wordpieces, spans, self._corpus.special, self._query_len,
                                self._max_masked, source_ids=docs)
    if len(added["kept"]) != len(rows):
      raise AssertionError("an added-block span query was dropped (span_ids not filtered?)")
    added["query_tokens"] = added.pop("tokens")
    out = {name: np.array(array) for name, array in batch.items()}
    for name, array in added.items():
      if name in out:
        out[name][rows] = array.astype(out[name].dtype)
    return out


def added_block_span_ids(corpus: BlockCorpus, spans: Mapping[str, np.ndarray],
                         first_added: int, removed: np.ndarray, query_len: int,
                         max_masked: int) -> np.ndarray:
  """[A] the stored spans of live blocks with doc id >= `first_added` (the build's num_docs:
  every block a corpus version added) that fit a query: what AddedBlockQueries draws from."""
  sentence = np.asarray(spans["span_sentence"])
  docs = chained.searchsorted(corpus.doc_sentence_offsets, sentence, side="right") - 1
  start, end = np.asarray(spans["span_start"]), np.asarray(spans["span_end"])
  live = (docs >= first_added) & (docs < len(removed))
  live[live] = ~np.asarray(removed)[docs[live]]
  return np.flatnonzero(live & (end <= query_len - 2) & (end - start <= max_masked) &
                        (end > start)).astype(np.int64)
