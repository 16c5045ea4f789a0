"""REALM's two halves in one Flax module: the retriever embedder(s) and the knowledge-augmented
masked-language-model encoder.

`RealmModel.__call__` scores the k candidates of each query with the *live* embedder (so the
retriever gets gradients through p(z|x)) and returns MLM logits only at the masked positions,
never `[B*k, T, vocab]` (DESIGN.md §6).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax.numpy as jnp

from realm_jax.models import bert
from realm_jax.models import embedder as embedder_lib
from realm_jax.models import reader_inputs


@dataclasses.dataclass(frozen=True)
class RealmModelConfig:
  """Both towers' shapes; the embedder and the encoder are separate BERTs of one size."""

  bert: bert.BertConfig
  embed_dim: int = 128
  share_embedders: bool = True  # one embedder for queries and documents
  pad_id: int = 0
  embedder_pooler: bool = True  # BERT's pooler in the embedder (ORQA/REALM/HF); see embedder.py


class MlmPredictionHead(nn.Module):
  """HF `cls/predictions`: transform (dense, gelu, LayerNorm) + output bias; decoder is tied."""

  config: bert.BertConfig

  @nn.compact
  def __call__(self, hidden):
    transform = _MlmTransform(self.config, name="transform")
    bias = self.param("bias", nn.initializers.zeros, (self.config.vocab_size,))
    return transform(hidden), bias


class _MlmTransform(nn.Module):
  config: bert.BertConfig

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(self.config.hidden_size, dtype=self.config.dtype,
                 kernel_init=nn.initializers.normal(self.config.initializer_range),
                 name="dense")(x)
    x = bert.activation(self.config)(x)  # HF: config.hidden_act here too
    return nn.LayerNorm(epsilon=self.config.layer_norm_eps, dtype=self.config.dtype,
                        name="LayerNorm")(x)


class _MlmHeadScope(nn.Module):
  """Holds `predictions` under the HF name `cls`."""

  config: bert.BertConfig

  @nn.compact
  def __call__(self, hidden):
    return MlmPredictionHead(self.config, name="predictions")(hidden)


class KnowledgeAugmentedEncoder(nn.Module):
  """BERT + MLM head over `[CLS] query [SEP] doc_body [SEP]`, logits at masked positions only."""

  config: bert.BertConfig
  pad_id: int = 0

  def setup(self):
    self.bert = bert.BertModel(self.config)
    self.cls = _MlmHeadScope(self.config)

  def __call__(self, token_ids, segment_ids, masked_positions, deterministic: bool = True):
    # token_ids, segment_ids: [N, T]; masked_positions: [N, M] -> logits [N, M, V] float32
    hidden = self.bert(token_ids, segment_ids, token_ids != self.pad_id, deterministic)
    masked_hidden = jnp.take_along_axis(hidden, masked_positions[..., None], axis=1)  # [N, M, H]
    transformed, bias = self.cls(masked_hidden)
    logits = self.bert.attend_word_embeddings(transformed)
    return logits.astype(jnp.float32) + bias


class RealmModel(nn.Module):
  """Retriever embedder(s) plus knowledge-augmented encoder.

  Parameter tree: `embedder` (or `query_embedder` and `doc_embedder` when not shared) and
  `encoder`. ICT trains the embedder(s) only; REALM trains everything.
  """

  config: RealmModelConfig

  def setup(self):
    make = lambda: embedder_lib.Embedder(
        self.config.bert, self.config.embed_dim, self.config.pad_id,
        pooler=self.config.embedder_pooler)
    if self.config.share_embedders:
      self.embedder = make()
    else:
      self.query_embedder = make()
      self.doc_embedder = make()
    self.encoder = KnowledgeAugmentedEncoder(self.config.bert, self.config.pad_id)

  def _embedders(self):
    if self.config.share_embedders:
      return self.embedder, self.embedder
    return self.query_embedder, self.doc_embedder

  def embed_queries(self, query_tokens, deterministic: bool = True):
    """[B, Lq] int32 -> [B, D] float32 (queries are a single segment)."""
    query_embedder, _ = self._embedders()
    return query_embedder(query_tokens, jnp.zeros_like(query_tokens), deterministic)

  def embed_docs(self, doc_tokens, doc_segments, deterministic: bool = True):
    """[N, Ld] int32 (`[CLS] title [SEP] body [SEP]`) -> [N, D] float32."""
    _, doc_embedder = self._embedders()
    return doc_embedder(doc_tokens, doc_segments, deterministic)

  def __call__(self, query_tokens, masked_positions, cand_doc_tokens, cand_doc_segments,
               cand_body_tokens, deterministic: bool = True):
    """Scores and reads the candidates of each query.

    Args:
      query_tokens: [B, Lq] int32, masked query `[CLS] ... [MASK] ... [SEP]`.
      masked_positions: [B, M] int32 positions in the query to predict.
      cand_doc_tokens, cand_doc_segments: [B, k, Ld] candidates for re-embedding.
      cand_body_tokens: [B, k, Lb] candidate bodies `body [SEP]` for the reader.
      deterministic: disables dropout when True.

    Returns:
      retrieval_logits [B, k] float32 (f(x, z) = Embed(x) . Embed(z)) and
      mlm_logits [B, k, M, V] float32.
    """
    batch, k, doc_len = cand_doc_tokens.shape
    query_emb = self.embed_queries(query_tokens, deterministic)  # [B, D]
    doc_emb = self.embed_docs(cand_doc_tokens.reshape(batch * k, doc_len),
                              cand_doc_segments.reshape(batch * k, doc_len),
                              deterministic).reshape(batch, k, -1)  # [B, k, D]
    retrieval_logits = jnp.einsum("bd,bkd->bk", query_emb, doc_emb)
    reader_tokens, reader_segments = reader_inputs.concat_query_and_bodies(
        query_tokens, cand_body_tokens, self.config.pad_id)  # [B, k, T]
    total = reader_tokens.shape[-1]
    positions = jnp.broadcast_to(masked_positions[:, None, :], (batch, k) +
                                 masked_positions.shape[1:]).reshape(batch * k, -1)
    mlm_logits = self.encoder(reader_tokens.reshape(batch * k, total),
                              reader_segments.reshape(batch * k, total), positions,
                              deterministic)
    return retrieval_logits, mlm_logits.reshape(batch, k, *mlm_logits.shape[1:])
