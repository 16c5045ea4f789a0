"""The retriever tower: BERT -> [CLS] -> dense(embed_dim) -> LayerNorm (REALM/ORQA)."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from realm_jax.models import bert


class Embedder(nn.Module):
  """Embeds queries or documents into the retrieval space; the score is a dot product."""

  config: bert.BertConfig
  embed_dim: int = 128
  pad_id: int = 0

  @nn.compact
  def __call__(self, token_ids, segment_ids, deterministic: bool = True):
    # token_ids, segment_ids: [B, T] int32 -> [B, embed_dim] float32
    hidden = bert.BertModel(self.config, name="bert")(
        token_ids, segment_ids, token_ids != self.pad_id, deterministic)
    cls = hidden[:, 0]
    x = nn.Dense(self.embed_dim, dtype=self.config.dtype,
                 kernel_init=nn.initializers.normal(self.config.initializer_range),
                 name="projection")(cls)
    x = nn.LayerNorm(epsilon=self.config.layer_norm_eps, dtype=self.config.dtype,
                     name="LayerNorm")(x)
    return x.astype(jnp.float32)
