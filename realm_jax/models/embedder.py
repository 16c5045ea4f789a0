"""The retriever tower (ORQA/REALM): BERT -> pooled [CLS] -> dense(embed_dim) -> LayerNorm.

ORQA's `ict_model.py` and REALM embed BERT's `pooled_output` (the pooler: dense + tanh over
`[CLS]`), project it to `embed_dim` (128), LayerNorm it, and apply dropout 0.1 to the result in
training only. HF's `RealmEmbedder` is the same in evaluation (it has no dropout there).

Parameter names and their HF `RealmEmbedder` counterparts:
  bert/...                  realm.embeddings..., realm.encoder...
  bert/pooler/dense         realm.pooler.dense
  projection                cls.dense
  LayerNorm                 cls.LayerNorm
(HF's embedder also carries an unused, untied `cls.predictions` MLM head; we have none.)

Convention differences, all measured or read from the sources:
- The projection LayerNorm's epsilon is BERT's `layer_norm_eps` (1e-12), as in HF; ORQA's
  original uses Keras' `LayerNormalization()` default, 1e-3. On a 128-d projection of unit
  scale the two differ by ~1e-4 relative.
- `pooler=False` (config `model.embedder_pooler=False`) is this project's embedder before the
  pooler was added (raw `[CLS]` hidden state into the projection). Kept for a measured reason:
  from a *random* initialization the extra layer slows the tiny ICT warm start (tiny config,
  2 CPU cores, 32 eval queries: gold recall@3 after 30 steps 0.06 with the pooler vs 0.19
  without, 0.22 vs 0.25 after 90; final ICT loss 1.97 vs 1.94 and 1.11 vs 0.72), and for
  checkpoints written before it. Starting from BERT/HF weights, whose pooler is trained, and
  for HF parity, keep the default (True).
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from realm_jax.models import bert


class Embedder(nn.Module):
  """Embeds queries or documents into the retrieval space; the score is a dot product."""

  config: bert.BertConfig
  embed_dim: int = 128
  pad_id: int = 0
  pooler: bool = True  # BERT's pooler before the projection (ORQA, REALM, HF)
  dropout_rate: float | None = None  # on the output in training; None = config.dropout_rate

  @nn.compact
  def __call__(self, token_ids, segment_ids, deterministic: bool = True):
    # token_ids, segment_ids: [B, T] int32 -> [B, embed_dim] float32
    bert_model = bert.BertModel(self.config, name="bert")
    hidden = bert_model(token_ids, segment_ids, token_ids != self.pad_id, deterministic)
    cls = bert_model.pool(hidden) if self.pooler else hidden[:, 0]  # [B, H]
    x = nn.Dense(self.embed_dim, dtype=self.config.dtype,
                 kernel_init=nn.initializers.normal(self.config.initializer_range),
                 name="projection")(cls)
    x = nn.LayerNorm(epsilon=self.config.layer_norm_eps, dtype=self.config.dtype,
                     name="LayerNorm")(x)
    rate = self.config.dropout_rate if self.dropout_rate is None else self.dropout_rate
    x = nn.Dropout(rate)(x, deterministic=deterministic)
    return x.astype(jnp.float32)
