"""REALM training data from Wikipedia blocks: held-out sentences, masked-span queries, ICT eval.

Built once into the prepared corpus folder (see prepare.py), after `wiki_corpus` has built and
merged the blocks there:
```
heldout.npz    doc_ids [E] int64, sentences [E] int64 (global sentence index): one held-out
               sentence per evaluation block, removed from that block's retriever and reader
               rows (the sentence arrays keep it), so neither retrieval nor the reader sees it
queries.npz    train_span_ids: the salient spans (indices into salient_spans.npz) of all other
                         blocks' sentences that fit a query; each batch's masked queries are
                         built from them (pipeline.SpanQuerySource; source = their block)
               eval_*  : masked-span queries from the held-out sentences (gold_ids = the
                         block they were removed from; nothing to exclude)
               ict_eval_*: the held-out sentences unmasked, as ICT pseudo-queries (gold_ids)
```
ICT trains on every block, but never sees a held-out sentence (as query or as block text);
no REALM training query comes from a held-out block. A sentence whose wordpieces occur more than
once in the corpus (a duplicated record across shards, a boilerplate sentence) is never held
out, since its copy would stay in a training block.
"""

from __future__ import annotations

import logging
import os
import uuid

import ml_collections
import numpy as np
import tokenizers
from etils import epath

from realm_jax import progress as progress_lib
from realm_jax import storage
from realm_jax.data import corpus as corpus_lib
from realm_jax.data import pipeline
from realm_jax.data import salient_spans
from realm_jax.data import tokenizer as tokenizer_lib
from realm_jax.data import wiki_corpus

HELDOUT_FILE = "heldout.npz"


def tokenizer_for(data_config: ml_collections.ConfigDict,
                  directory: epath.Path) -> tokenizers.Tokenizer:
  """`directory/vocab.txt`: a copy of data.vocab_file, or trained on the source's texts."""
  vocab = directory / tokenizer_lib.VOCAB_FILENAME
  if vocab.exists():  # only ever renamed into place complete (below)
    return tokenizer_lib.load_tokenizer(vocab)
  tmp = directory / f".vocab.tmp-{uuid.uuid4().hex[:8]}"
  if data_config.vocab_file:
    tmp.mkdir(parents=True)
    (tmp / tokenizer_lib.VOCAB_FILENAME).write_text(
        epath.Path(data_config.vocab_file).read_text())
  else:
    _train_vocab(data_config, tmp)
  storage.move_file(tmp / tokenizer_lib.VOCAB_FILENAME, vocab)  # vocab.txt appears whole
  tmp.rmtree()
  return tokenizer_lib.load_tokenizer(vocab)


def _train_vocab(data_config: ml_collections.ConfigDict, directory: epath.Path) -> None:
  """Trains data.vocab_size wordpieces on the first data.vocab_records records' texts.

  Bad records are skipped and counted (logged); none usable at all is a NoUsableRecords error
  with that count, before anything else is built.
  """
  source = wiki_corpus.open_source(data_config.source,
                                   tfds_data_dir=data_config.tfds_data_dir or None)
  stop = min(len(source), data_config.limit or len(source), data_config.vocab_records)
  report = wiki_corpus.BuildReport()
  progress = progress_lib.Progress("vocab: read records", stop, unit="records",
                                   every_seconds=30.0)

  def texts():
    for index, raw in source.read(0, stop):
      report.records_read += 1
      progress.update(1)
      try:
        title, text = wiki_corpus.parse_record(raw, max_title_chars=256)
      except wiki_corpus.BadRecord as e:
        report.add_bad(e.reason, index)
        continue
      except Exception as e:  # pylint: disable=broad-except
        report.add_bad(f"{wiki_corpus.RECORD_ERROR}:parse:{type(e).__name__}", index)
        continue
      report.records_ok += 1
      yield title
      yield text
    progress.close()
    if not report.records_ok:
      raise wiki_corpus.no_usable_records(
          f"{data_config.source} (vocabulary: first {stop} records)", report)
  tokenizer_lib.train_wordpiece(texts(), data_config.vocab_size, directory)
  skipped = ", ".join(f"{k}={v}" for k, v in sorted(report.bad_records.items()))
  logging.info("vocab: trained on %d of %d records read (skipped: %s)", report.records_ok,
               report.records_read, skipped or "none")


def doc_of_sentence(corpus: corpus_lib.BlockCorpus, sentences: np.ndarray) -> np.ndarray:
  """The block each global sentence index belongs to: [S'] int64."""
  return np.searchsorted(np.asarray(corpus.doc_sentence_offsets), sentences, side="right") - 1


_MIX = (np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB))


def _mix64(x: np.ndarray) -> np.ndarray:
  """splitmix64's finalizer, elementwise on uint64 (wrapping arithmetic)."""
  x = x ^ (x >> np.uint64(30))
  x = x * _MIX[1]
  x = x ^ (x >> np.uint64(27))
  x = x * _MIX[2]
  return x ^ (x >> np.uint64(31))


def sentence_fingerprints(corpus: corpus_lib.BlockCorpus,
                          chunk_sentences: int = 1 << 20) -> np.ndarray:
  """A 64-bit fingerprint of each sentence's wordpiece sequence: [S] uint64.

  Order-sensitive (each token mixed with its position), vectorized over chunks of sentences, so
  it stays fast and bounded in memory for Wikipedia-sized corpora.
  """
  offsets = np.asarray(corpus.sentence_offsets, np.int64)
  num = len(offsets) - 1
  out = np.zeros(num, np.uint64)
  with np.errstate(over="ignore"):
    for a in range(0, num, chunk_sentences):
      b = min(num, a + chunk_sentences)
      lo, hi = offsets[a], offsets[b]
      lengths = np.diff(offsets[a:b + 1])
      if hi == lo:
        continue
      ids = np.asarray(corpus.sentence_token_ids[lo:hi]).astype(np.uint64)
      position = (np.arange(hi - lo, dtype=np.int64)
                  - np.repeat(offsets[a:b] - lo, lengths)).astype(np.uint64)
      mixed = _mix64(ids * _MIX[0] + _mix64(position + np.uint64(1)))
      nonempty = lengths > 0
      sums = np.add.reduceat(mixed, (offsets[a:b] - lo)[nonempty])
      out[a:b][nonempty] = _mix64(sums ^ lengths[nonempty].astype(np.uint64))
  return out


def repeated_sentences(corpus: corpus_lib.BlockCorpus) -> np.ndarray:
  """Whether each sentence's wordpieces occur again elsewhere in the corpus: [S] bool."""
  fingerprints = sentence_fingerprints(corpus)
  _, inverse, counts = np.unique(fingerprints, return_inverse=True, return_counts=True)
  return counts[inverse] > 1


def choose_heldout(corpus: corpus_lib.BlockCorpus, spans: dict[str, np.ndarray],
                   num_docs: int, query_len: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """One held-out sentence per evaluation block: doc_ids [E], sentences [E] (sorted by doc).

  Candidates are blocks with >= 2 sentences (one stays) and sentences with a salient span that
  fits a query of query_len and whose wordpieces occur nowhere else in the corpus (a copy in
  another block would leak the held-out sentence into training).
  """
  fits = spans["span_end"] <= query_len - 2
  sentence = np.unique(spans["span_sentence"][fits])  # [S'] sentences with a usable span
  sentence = sentence[~repeated_sentences(corpus)[sentence]]
  docs = doc_of_sentence(corpus, sentence)
  multi = corpus.sentence_counts()[docs] >= 2
  sentence, docs = sentence[multi], docs[multi]
  rng = np.random.default_rng(seed)
  order = rng.permutation(len(sentence))
  _, first = np.unique(docs[order], return_index=True)  # one random sentence per doc
  pick = order[first]
  if len(pick) > num_docs:
    pick = rng.choice(pick, num_docs, replace=False)
  pick = pick[np.argsort(docs[pick])]
  return docs[pick].astype(np.int64), sentence[pick].astype(np.int64)


def remove_heldout_sentences(blocks_dir: epath.Path, corpus: corpus_lib.BlockCorpus,
                             doc_ids: np.ndarray, sentences: np.ndarray) -> None:
  """Rewrites the retriever and reader rows of held-out blocks without their sentence.

  Idempotent: rows are recomputed from the untouched sentence arrays.
  """
  names = ("retriever_tokens", "retriever_segments", "reader_tokens", "reader_lengths")
  local = "://" not in os.fspath(blocks_dir)
  arrays = {}
  for name in names:
    path = blocks_dir / f"{name}.npy"
    if local:
      arrays[name] = np.load(os.fspath(path), mmap_mode="r+")
    else:
      with path.open("rb") as f:
        arrays[name] = np.load(f)
  special, body_len = corpus.special, corpus.body_len
  for doc_id, sentence in zip(doc_ids.tolist(), sentences.tolist()):
    first = int(corpus.doc_sentence_offsets[doc_id])
    kept = [s for i, s in enumerate(corpus.sentence_ids(doc_id)) if first + i != sentence]
    body = np.concatenate(kept) if kept else np.zeros(0, np.int32)
    tokens, segments = corpus_lib.pack_block(corpus.title_ids(doc_id), body, corpus.doc_len,
                                             special)
    arrays["retriever_tokens"][doc_id] = tokens
    arrays["retriever_segments"][doc_id] = segments
    reader = np.append(body[:body_len - 1], special.sep)
    arrays["reader_tokens"][doc_id] = special.pad
    arrays["reader_tokens"][doc_id, :len(reader)] = reader
    arrays["reader_lengths"][doc_id] = len(reader)
  for name, array in arrays.items():
    if local:
      array.flush()
    else:
      with (blocks_dir / f"{name}.npy").open("wb") as f:
        np.save(f, array)


def _queries(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  arrays = dict(arrays)
  arrays.pop("kept")
  arrays["query_tokens"] = arrays.pop("tokens")
  return arrays


def _sentence_rows(corpus: corpus_lib.BlockCorpus, sentences: np.ndarray) -> list[np.ndarray]:
  offsets = np.asarray(corpus.sentence_offsets)
  return [np.asarray(corpus.sentence_token_ids[offsets[s]:offsets[s + 1]]) for s in sentences]


def build_queries(corpus: corpus_lib.BlockCorpus, spans: dict[str, np.ndarray],
                  heldout_docs: np.ndarray, heldout_sentences: np.ndarray,
                  data_config: ml_collections.ConfigDict, seed: int) -> dict[str, np.ndarray]:
  """train_span_ids, eval_* and ict_eval_* query arrays (see the module docstring)."""
  special, query_len = corpus.special, data_config.query_len
  span_sentence = spans["span_sentence"]
  span_doc = doc_of_sentence(corpus, span_sentence)
  held_out = np.isin(span_doc, heldout_docs)
  rng = np.random.default_rng(seed)

  # Training queries: spans of every sentence outside the held-out blocks, stored as span ids
  # (pipeline.SpanQuerySource builds each batch's queries from them).
  train = np.flatnonzero(~held_out & (spans["span_end"] <= query_len - 2) &
                         (spans["span_end"] - spans["span_start"] <= data_config.max_masked))
  if data_config.max_train_queries and len(train) > data_config.max_train_queries:
    train = np.sort(rng.choice(train, data_config.max_train_queries, replace=False))

  # Evaluation: the spans of the held-out sentences, which no block contains any more.
  evaluation = np.flatnonzero(np.isin(span_sentence, heldout_sentences))
  eval_arrays = pipeline.span_masked_queries(
      _sentence_rows(corpus, span_sentence[evaluation]),
      list(zip(spans["span_start"][evaluation], spans["span_end"][evaluation])), special,
      query_len, data_config.max_masked, gold_ids=span_doc[evaluation])

  # ICT evaluation: each held-out sentence as a pseudo-query for the block it came from.
  ict_tokens = np.full((len(heldout_sentences), query_len), special.pad, np.int32)
  for row, ids in enumerate(_sentence_rows(corpus, heldout_sentences)):
    packed = np.concatenate([[special.cls], ids[:query_len - 2], [special.sep]])
    ict_tokens[row, :len(packed)] = packed
  ict_eval = dict(query_tokens=ict_tokens, gold_ids=heldout_docs.astype(np.int32),
                  source_ids=np.full(len(heldout_docs), -1, np.int32))
  out = {"train_span_ids": train.astype(np.int64)}
  out.update({f"eval_{k}": v for k, v in _queries(eval_arrays).items()})
  out.update({f"ict_eval_{k}": v for k, v in ict_eval.items()})
  return out


def build_wiki_data(data_config: ml_collections.ConfigDict, directory: epath.Path,
                    seed: int) -> dict[str, np.ndarray]:
  """Builds (or resumes) blocks, held-out split and queries in `directory`; returns queries.

  The caller writes queries.npz and then the build config, which marks the folder complete.
  """
  directory.mkdir(parents=True, exist_ok=True)
  tokenizer = tokenizer_for(data_config, directory)
  tagger = salient_spans.make_tagger(data_config.salient_tagger)
  report = wiki_corpus.build_wiki_corpus(
      data_config.source, directory, tokenizer, doc_len=data_config.doc_len,
      num_shards=data_config.num_build_shards, span_fn=tagger,
      max_span_wordpieces=data_config.max_masked, limit=data_config.limit or None,
      tfds_data_dir=data_config.tfds_data_dir or None)
  if not (directory / wiki_corpus.REPORT_FILE).exists():
    raise RuntimeError(f"{directory}: not all {data_config.num_build_shards} corpus shards are "
                       "built yet (run --mode=build_corpus for the missing shards)")
  logging.info("wiki corpus: %s", report.summary())
  corpus = corpus_lib.load_block_corpus(directory / "blocks")
  spans = wiki_corpus.load_salient_spans(directory)
  docs, sentences = choose_heldout(corpus, spans, data_config.num_eval_docs,
                                   data_config.query_len, seed)
  with (directory / HELDOUT_FILE).open("wb") as f:
    np.savez(f, doc_ids=docs, sentences=sentences)
  remove_heldout_sentences(directory / "blocks", corpus, docs, sentences)
  corpus_lib.refresh_fingerprint(directory / "blocks")  # the rows changed
  corpus = corpus_lib.load_block_corpus(directory / "blocks")
  queries = build_queries(corpus, spans, docs, sentences, data_config, seed)
  logging.info("wiki data: %d blocks, %d held out; %d train, %d eval span queries",
               corpus.num_docs, len(docs), len(queries["train_span_ids"]),
               len(queries["eval_query_tokens"]))
  return queries


def load_heldout(directory: epath.Path) -> tuple[np.ndarray, np.ndarray] | None:
  """(doc_ids [E], sentences [E]) held out in a prepared wiki folder; None for other corpora."""
  path = directory / HELDOUT_FILE
  if not path.exists():
    return None
  with path.open("rb") as f, np.load(f) as heldout:
    return heldout["doc_ids"], heldout["sentences"]
