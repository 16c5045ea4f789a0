"""BM25 as the Open-QA retriever (`qa.retriever="bm25"`): the lexical baseline of every EM table.

BM25 (bm25s, `retrieval.evaluation.BM25Index`) indexes the same blocks the dense retriever
searches, as the decoded wordpieces of each retriever row (`[CLS] title [SEP] body`, as cut for
the embedder), and reads the question's raw text. Its ranking never changes during a run, so
the top ids of a question are computed once on the host and cached (`QuestionBM25.top_ids`).

With BM25 the reader is trained on BM25's top `reader_k` blocks and there is no retriever loss
(BM25 has no parameters). The block-score term of the joint (block, span) softmax is 0 for
every block: BM25 scores are unnormalized and on a scale unrelated to span logits, so adding
them would let one lexical outlier dominate the softmax; with 0 the reader alone picks among
the retrieved blocks (DrQA's choice for its BM25/TF-IDF pipeline).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import tokenizers

from realm_jax.data import corpus as corpus_lib
from realm_jax.qa import data as data_lib
from realm_jax.retrieval import evaluation


def block_texts(corpus: corpus_lib.BlockCorpus, tokenizer: tokenizers.Tokenizer) -> list[str]:
  """[num_docs] text of each block's retriever row (title + body, special tokens dropped)."""
  return evaluation.decode_rows(tokenizer, np.asarray(corpus.retriever_tokens[:corpus.num_docs]))


class QuestionBM25:
  """BM25 top block ids per question, each question searched once per run.

  The cache is keyed by the question text and holds the deepest ranking asked for so far; a
  shallower request is a slice of it (BM25's order does not depend on k).
  """

  def __init__(self, texts: Sequence[str], doc_ids: np.ndarray | None = None):
    """texts [n]: the blocks to index; doc_ids [n]: their block ids (default 0..n-1), what
    `top_ids` returns (a corpus version's live blocks: removed ones are not indexed)."""
    self.index = evaluation.BM25Index(texts)
    self.doc_ids = (np.arange(len(texts), dtype=np.int64) if doc_ids is None else
                    np.asarray(doc_ids, np.int64))
    if self.doc_ids.shape != (len(texts),):
      raise ValueError(f"{self.doc_ids.shape} doc ids for {len(texts)} texts")
    self._cache: dict[str, np.ndarray] = {}
    self.searched = 0  # questions sent to bm25s (misses)
    self.hits = 0

  def top_ids(self, examples: Sequence[data_lib.QAExample], k: int) -> np.ndarray:
    """[N, k'] int64 block ids best first, k' = min(k, num_blocks)."""
    k = min(k, self.index.num_blocks)
    missing = sorted({e.question for e in examples
                      if e.question not in self._cache or len(self._cache[e.question]) < k})
    if missing:
      ids, _ = self.index.search(missing, k)
      self._cache.update(zip(missing, ids))
      self.searched += len(missing)
    missing_set = set(missing)
    self.hits += sum(e.question not in missing_set for e in examples)
    if not examples:
      return np.zeros((0, k), np.int64)
    return self.doc_ids[np.stack([self._cache[e.question][:k] for e in examples])]
