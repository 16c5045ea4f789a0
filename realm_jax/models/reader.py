"""The Open-QA span reader (ORQA/REALM) and the fine-tuning model around it.

The reader reads `[CLS] question [SEP] block [SEP]` for each of the top `reader_k` blocks and
scores every span of <= `max_span_width` (10) wordpieces inside the block: start and end
projections of BERT's hidden states (one dense to 2 x 256, split in halves), their sum, ReLU,
LayerNorm, dense(1). This is HF's `RealmReaderProjection` (names `qa_outputs/dense_intermediate`,
`layer_normalization`, `dense_output`), whose LayerNorm epsilon is `reader_layer_norm_eps` =
1e-3 (HF `RealmConfig`), not BERT's 1e-12.

Spans are indexed *block-locally* in a fixed start-major table (`span_table`): span j is
[start, end] = [j // W, j // W + j % W] in block tokens, the same for every question, so the
answer spans of a (question, block) pair can be computed once on the host
(`realm_jax.qa.answers.spans_to_mask`) and never depend on the question's length. HF instead
enumerates spans over the whole `[CLS] q [SEP] block [SEP]` sequence and masks those outside
the block; the scores of the real spans are the same. Given the blocks' '##' flags
(`block_is_continuation`), spans that start or end inside a word are masked as well
(`whole_word_span_mask`), so neither the loss nor the prediction ever considers a fragment.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from realm_jax.models import bert
from realm_jax.models import embedder as embedder_lib
from realm_jax.models import reader_inputs

NEG_INF = -1e9  # as realm_jax.objectives: finite, so softmax and gradients stay NaN-free


def span_table(block_len: int, max_span_width: int) -> np.ndarray:
  """[block_len * max_span_width, 2] int32 (start, end) inclusive, block-local, start-major.

  Rows whose end reaches past the block are kept (static shape) and masked by the reader.
  """
  starts = np.repeat(np.arange(block_len), max_span_width)
  ends = starts + np.tile(np.arange(max_span_width), block_len)
  return np.stack([starts, ends], axis=-1).astype(np.int32)


def whole_word_span_mask(block_is_continuation, spans: np.ndarray):
  """[..., S] bool: span [start, end] covers whole words, i.e. its first wordpiece is not a
  '##' continuation and the piece after its last one is not either.

  Without it the reader's argmax can pick "##ember" or "sept" out of "sept ##ember", and the
  decoded prediction is a word fragment, never an exact match. The training answer spans here
  are whole words already (`qa.answers.find_answer_spans` with the '##' flags and
  `qa.batches.candidate_spans` only produce such spans), so the candidates of the softmax and
  of the argmax are restricted the same way.

  Args:
    block_is_continuation: [..., Lb] bool per block token (`block [SEP]` right-padded; the
      host looks the tokens up in `qa.batches.continuation_table`, [SEP]/padding are False).
    spans: [S, 2] the reader's `span_table` (ends past Lb count as ending at a word end;
      the reader masks them as outside the block anyway).
  """
  cont = jnp.asarray(block_is_continuation, bool)
  block_len = cont.shape[-1]
  starts = np.asarray(spans)[:, 0]
  after_end = np.asarray(spans)[:, 1] + 1
  # The piece after each end; a span reaching the last position is followed by nothing.
  next_cont = jnp.concatenate([cont, jnp.zeros_like(cont[..., :1])], axis=-1)
  return ~cont[..., np.minimum(starts, block_len - 1)] & ~next_cont[
      ..., np.minimum(after_end, block_len)]


@dataclasses.dataclass(frozen=True)
class ReaderConfig:
  """The reader's BERT plus its span head (HF RealmConfig defaults)."""

  bert: bert.BertConfig
  span_hidden_size: int = 256
  max_span_width: int = 10
  layer_norm_eps: float = 1e-3  # HF reader_layer_norm_eps
  pad_id: int = 0


class ReaderOutput(NamedTuple):
  span_logits: jax.Array  # [B, R, S] float32, NEG_INF where span_mask is False
  span_mask: jax.Array  # [B, R, S] bool: the span lies inside the block (before its [SEP])
  #   and, when the block's continuation flags are given, covers whole words
  spans: np.ndarray  # [S, 2] int32 block-local (start, end) inclusive (`span_table`)


class ReaderProjection(nn.Module):
  """HF `RealmReaderProjection`: span score from start and end projections."""

  config: ReaderConfig

  @nn.compact
  def __call__(self, hidden, start_positions, end_positions):
    """hidden [N, T, H]; start/end_positions [N, S] int32 (sequence positions) -> [N, S] f32."""
    c = self.config
    init = nn.initializers.normal(c.bert.initializer_range)
    projected = nn.Dense(2 * c.span_hidden_size, dtype=c.bert.dtype, kernel_init=init,
                         name="dense_intermediate")(hidden)  # [N, T, 2P]
    start_proj, end_proj = jnp.split(projected, 2, axis=-1)  # [N, T, P] each
    span_hidden = (jnp.take_along_axis(start_proj, start_positions[..., None], axis=1) +
                   jnp.take_along_axis(end_proj, end_positions[..., None], axis=1))  # [N, S, P]
    span_hidden = nn.LayerNorm(epsilon=c.layer_norm_eps, dtype=c.bert.dtype,
                               name="layer_normalization")(nn.relu(span_hidden))
    logits = nn.Dense(1, dtype=c.bert.dtype, kernel_init=init, name="dense_output")(span_hidden)
    return logits[..., 0].astype(jnp.float32)


class SpanReader(nn.Module):
  """BERT over `[CLS] question [SEP] block [SEP]` + `ReaderProjection` over the block's spans.

  Parameters: `bert` (same names as every BERT here) and `qa_outputs`.
  """

  config: ReaderConfig

  def setup(self):
    self.bert = bert.BertModel(self.config.bert)
    self.qa_outputs = ReaderProjection(self.config)

  def encode(self, question_tokens, block_tokens, deterministic: bool = True):
    """-> (hidden [B, R, T, H], question_lengths [B], block_lengths [B, R]).

    question_tokens: [B, Lq] `[CLS] question [SEP]` right-padded; block_tokens: [B, R, Lb]
    `block [SEP]` right-padded. A block's length excludes its final [SEP].
    """
    pad = self.config.pad_id
    batch, r, _ = block_tokens.shape
    tokens, segments = reader_inputs.concat_query_and_bodies(question_tokens, block_tokens, pad)
    total = tokens.shape[-1]
    flat = tokens.reshape(batch * r, total)
    hidden = self.bert(flat, segments.reshape(batch * r, total), flat != pad, deterministic)
    question_lengths = jnp.sum(question_tokens != pad, axis=-1)
    block_lengths = jnp.maximum(jnp.sum(block_tokens != pad, axis=-1) - 1, 0)
    return hidden.reshape(batch, r, total, -1), question_lengths, block_lengths

  def __call__(self, question_tokens, block_tokens, deterministic: bool = True,
               block_is_continuation=None) -> ReaderOutput:
    """block_is_continuation: optional [B, R, Lb] bool ('##' pieces of block_tokens); when
    given, spans that start or end inside a word are masked (`whole_word_span_mask`)."""
    c = self.config
    batch, r, block_len = block_tokens.shape
    hidden, question_lengths, block_lengths = self.encode(question_tokens, block_tokens,
                                                          deterministic)
    total = hidden.shape[2]
    spans = span_table(block_len, c.max_span_width)  # [S, 2]
    starts, ends = jnp.asarray(spans[:, 0]), jnp.asarray(spans[:, 1])
    offset = question_lengths[:, None, None]  # [B, 1, 1]: the block starts after the question
    start_pos = jnp.broadcast_to(offset + starts, (batch, r, len(spans)))
    end_pos = jnp.clip(jnp.broadcast_to(offset + ends, (batch, r, len(spans))), 0, total - 1)
    logits = self.qa_outputs(hidden.reshape(batch * r, total, -1),
                             start_pos.reshape(batch * r, -1),
                             end_pos.reshape(batch * r, -1)).reshape(batch, r, -1)
    span_mask = ends[None, None, :] < block_lengths[..., None]  # [B, R, S]
    if block_is_continuation is not None:
      span_mask &= whole_word_span_mask(block_is_continuation, spans)
    return ReaderOutput(jnp.where(span_mask, logits, NEG_INF), span_mask, spans)


@dataclasses.dataclass(frozen=True)
class OpenQAModelConfig:
  reader: ReaderConfig
  embed_dim: int = 128
  embedder_pooler: bool = True  # as pretraining's `RealmModelConfig.embedder_pooler`


class OpenQAOutput(NamedTuple):
  retrieval_logits: jax.Array  # [B, K] Embed(question) . doc_emb over the retrieved blocks
  span_logits: jax.Array  # [B, R, S]
  span_mask: jax.Array  # [B, R, S]
  spans: np.ndarray  # [S, 2]


class OpenQAModel(nn.Module):
  """Fine-tuning model: the trainable query tower and reader; documents are fixed embeddings.

  Parameters: `query_embedder` (an `Embedder`, warm-started from pretraining's `embedder` or
  `query_embedder`) and `reader` (a `SpanReader`, its `bert` from pretraining's `encoder/bert`).
  The block embeddings come from the frozen index, never re-embedded (ORQA/REALM).
  """

  config: OpenQAModelConfig

  def setup(self):
    reader_config = self.config.reader
    self.query_embedder = embedder_lib.Embedder(reader_config.bert, self.config.embed_dim,
                                                reader_config.pad_id,
                                                pooler=self.config.embedder_pooler)
    self.reader = SpanReader(reader_config)

  def embed_questions(self, question_tokens, deterministic: bool = True):
    """[B, Lq] -> [B, D] float32 (one segment, like pretraining queries)."""
    return self.query_embedder(question_tokens, jnp.zeros_like(question_tokens), deterministic)

  def __call__(self, question_tokens, cand_doc_emb, reader_block_tokens,
               deterministic: bool = True, reader_block_continuation=None) -> OpenQAOutput:
    """question_tokens [B, Lq]; cand_doc_emb [B, K, D] (index embeddings of the top K);
    reader_block_tokens [B, R, Lb] the first R of those K, as `block [SEP]`;
    reader_block_continuation [B, R, Lb] bool, optional: restricts spans to whole words."""
    question_emb = self.embed_questions(question_tokens, deterministic)  # [B, D]
    retrieval_logits = jnp.einsum("bd,bkd->bk", question_emb,
                                  cand_doc_emb.astype(jnp.float32))
    read = self.reader(question_tokens, reader_block_tokens, deterministic,
                       reader_block_continuation)
    return OpenQAOutput(retrieval_logits, read.span_logits, read.span_mask, read.spans)

  def read(self, question_tokens, reader_block_tokens, deterministic: bool = True,
           reader_block_continuation=None) -> OpenQAOutput:
    """The reader alone over given blocks (a BM25 retriever): retrieval_logits are 0 [B, R],
    so the joint softmax ranks spans by the reader's score only; the query tower is not run."""
    read = self.reader(question_tokens, reader_block_tokens, deterministic,
                       reader_block_continuation)
    zeros = jnp.zeros(reader_block_tokens.shape[:2], jnp.float32)
    return OpenQAOutput(zeros, read.span_logits, read.span_mask, read.spans)
