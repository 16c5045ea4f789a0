"""Retrieval recall@k of a trained embedder on held-out queries, side by side with BM25.

The queries are the held-out pseudo-queries of a prepared corpus (wiki: each a sentence removed
from its block, gold = that block; facts: the masked eval queries with their gold profile).
Both retrievers search the very same blocks: BM25 (the `bm25s` package, Lucene variant, English
stopwords) indexes the decoded wordpieces of each retriever row (`[CLS] title [SEP] body`, as
truncated for the embedder) and reads the decoded query, so neither side sees text the other
does not. `python -m realm_jax.main --mode=eval_retrieval --config=... --workdir=<run>`.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence

import jax
import ml_collections
import numpy as np
import tokenizers
from etils import epath

from realm_jax.data import corpus as corpus_lib
from realm_jax.data import prepare
from realm_jax.data import tokenizer as tokenizer_lib
from realm_jax.retrieval import in_process
from realm_jax.retrieval import searcher as searcher_lib
from realm_jax.train import checkpointing
from realm_jax.train import partitioning
from realm_jax.train import state as state_lib
from realm_jax.train import steps as steps_lib

DEFAULT_KS = (1, 5, 20, 100)


def recall_at_ks(top_ids: np.ndarray, gold_ids: np.ndarray, ks: Sequence[int]
                 ) -> dict[str, float]:
  """Fraction of queries whose gold id is among the first k of top_ids [Q, K], per k."""
  hits = top_ids == np.asarray(gold_ids)[:, None]  # [Q, K]
  return {f"recall@{k}": float(hits[:, :k].any(axis=1).mean()) for k in ks}


def decode_rows(tokenizer: tokenizers.Tokenizer, rows: np.ndarray) -> list[str]:
  """Text of token rows without special tokens or padding."""
  return tokenizer.decode_batch([row.tolist() for row in rows], skip_special_tokens=True)


class BM25Index:
  """A bm25s index (Lucene scoring, English stopwords) over block texts, built once and
  searched many times (Open-QA retrieves for every question set of a run with one index)."""

  def __init__(self, block_texts: Sequence[str]):
    import bm25s  # pylint: disable=g-import-not-at-top  (core dependency; imported when used)
    self._bm25s = bm25s
    self.num_blocks = len(block_texts)
    if not self.num_blocks:
      raise ValueError("BM25 over 0 blocks: the corpus is empty")
    self._retriever = bm25s.BM25()
    self._retriever.index(bm25s.tokenize(list(block_texts), stopwords="en",
                                         show_progress=False), show_progress=False)

  def search(self, query_texts: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids [Q, k'] int64, scores [Q, k'] float32) best first, k' = min(k, num_blocks).

    A query with no indexed word (all stopwords or unknown) scores 0 everywhere; its ids are
    then bm25s's arbitrary order, as in any BM25 tie."""
    k = min(k, self.num_blocks)
    if not query_texts:
      return np.zeros((0, k), np.int64), np.zeros((0, k), np.float32)
    ids, scores = self._retriever.retrieve(
        self._bm25s.tokenize(list(query_texts), stopwords="en", show_progress=False), k=k,
        show_progress=False)
    return np.asarray(ids, np.int64), np.asarray(scores, np.float32)


def bm25_top_ids(block_texts: Sequence[str], query_texts: Sequence[str], k: int) -> np.ndarray:
  """BM25 top-k block ids [Q, k] (bm25s; Lucene scoring, English stopwords)."""
  return BM25Index(block_texts).search(query_texts, k)[0]


def dense_top_ids(config: ml_collections.ConfigDict, params, corpus: corpus_lib.BlockCorpus,
                  query_tokens: np.ndarray, k: int) -> np.ndarray:
  """Exact MIPS top-k block ids [Q, k] with the run's embedder over every block."""
  mesh = partitioning.make_mesh([("data", 1)], jax.local_devices()[:1])
  model = state_lib.build_model(config, corpus.vocab_size, corpus.special.pad)
  embed_queries, embed_docs = steps_lib.make_embed_fns(model, mesh)
  params = partitioning.replicate(
      {key: value for key, value in params.items() if key in state_lib.EMBEDDER_KEYS}, mesh)
  doc_emb = in_process.embed_corpus(params, corpus, embed_docs, mesh,
                                    config.retrieval.embed_batch_size)
  searcher = searcher_lib.ExactSearcher(doc_emb)
  query_emb = np.concatenate([
      np.asarray(embed_queries(params, query_tokens[start:start + 256]))
      for start in range(0, len(query_tokens), 256)])
  ids, _ = searcher.search(query_emb, k)
  return ids


def evaluate_retrieval(config: ml_collections.ConfigDict, workdir: epath.PathLike,
                       ks: Sequence[int] = DEFAULT_KS, step: int | None = None) -> dict:
  """Recall@ks of the run's latest (or `step`) checkpoint and of BM25 on the same queries.

  Writes `<workdir>/retrieval_eval.json` and returns the same dict.
  """
  workdir = epath.Path(workdir)
  data = prepare.prepare_data(config, workdir, build=False)
  queries = data.ict_eval_queries if data.ict_eval_queries is not None else data.eval_queries
  known = queries["gold_ids"] >= 0
  query_tokens, gold = queries["query_tokens"][known], queries["gold_ids"][known]
  corpus = data.corpus
  tokenizer = tokenizer_lib.load_tokenizer(data.directory / tokenizer_lib.VOCAB_FILENAME)
  result: dict = dict(num_queries=int(len(gold)), num_blocks=corpus.num_docs, ks=list(ks))

  start = time.time()
  block_texts = decode_rows(tokenizer, np.asarray(corpus.retriever_tokens[:corpus.num_docs]))
  query_texts = [text.replace("[MASK]", " ") for text in decode_rows(tokenizer, query_tokens)]
  result["bm25"] = recall_at_ks(bm25_top_ids(block_texts, query_texts, max(ks)), gold, ks)
  result["bm25_seconds"] = round(time.time() - start, 2)

  params, result["checkpoint_step"] = checkpointing.restore_params(workdir, step)
  start = time.time()
  result["dense"] = recall_at_ks(dense_top_ids(config, params, corpus, query_tokens, max(ks)),
                                 gold, ks)
  result["dense_seconds"] = round(time.time() - start, 2)
  (workdir / "retrieval_eval.json").write_text(json.dumps(result, indent=1))
  logging.info("eval_retrieval: %d queries over %d blocks; dense (step %d) %s; BM25 %s",
               len(gold), corpus.num_docs, result["checkpoint_step"], result["dense"],
               result["bm25"])
  return result
