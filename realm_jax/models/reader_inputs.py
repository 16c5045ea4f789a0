"""Builds the knowledge-augmented encoder's input `[CLS] query [SEP] body [SEP]` on device.

Pure jnp, so it runs inside the jitted step: the host only gathers the candidates' body tokens.
The query comes first, so masked positions in the query keep their indices.
"""

from __future__ import annotations

import jax.numpy as jnp


def concat_query_and_bodies(query_tokens, body_tokens, pad_id: int = 0):
  """Packs each query with each of its k candidate bodies, padding only at the end.

  Args:
    query_tokens: [B, Lq] int32, `[CLS] query [SEP]` right-padded with pad_id.
    body_tokens: [B, k, Lb] int32, `body [SEP]` right-padded with pad_id.
    pad_id: padding token id.

  Returns:
    token_ids [B, k, Lq + Lb] and segment_ids [B, k, Lq + Lb] (0 query, 1 body, 0 padding).
  """
  batch, query_len = query_tokens.shape
  _, k, body_len = body_tokens.shape
  total = query_len + body_len
  query_lengths = jnp.sum(query_tokens != pad_id, axis=-1)[:, None, None]  # [B, 1, 1]
  t = jnp.arange(total)[None, None, :]  # [1, 1, T]
  in_query = t < query_lengths
  body_pos = t - query_lengths  # [B, 1, T]
  in_body = (body_pos >= 0) & (body_pos < body_len)
  query_part = jnp.take_along_axis(
      query_tokens[:, None, :], jnp.minimum(t, query_len - 1), axis=-1)  # [B, 1, T]
  body_part = jnp.take_along_axis(
      body_tokens, jnp.broadcast_to(jnp.clip(body_pos, 0, body_len - 1), (batch, k, total)),
      axis=-1)  # [B, k, T]
  token_ids = jnp.where(in_query, query_part, jnp.where(in_body, body_part, pad_id))
  segment_ids = (~in_query & (token_ids != pad_id)).astype(jnp.int32)
  return token_ids.astype(jnp.int32), segment_ids
