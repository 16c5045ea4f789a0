"""A deterministic stand-in for the retriever towers in index tests: bag of wordpieces.

Each wordpiece gets a fixed random vector (seeded); a block or query embeds as the normalized
sum over its non-pad tokens, so texts sharing wordpieces (a person's name) score high. No
training and no checkpoint: tests of index plumbing (corpus versions, incremental updates)
then retrieve by word overlap, like a lexical retriever.
"""

import jax.numpy as jnp
import numpy as np


def bag_of_wordpieces(vocab_size: int, dim: int, pad_id: int, seed: int = 0,
                      ignore_ids=()):
  """-> embed(params, tokens [B, L], segments) -> [B, dim] float32 (params, segments unused),
  the signature of the model's embed_docs / embed_queries. `ignore_ids` (e.g. [CLS], [SEP],
  [MASK]) count for nothing, like the pad."""
  table = jnp.asarray(np.random.default_rng(seed).normal(size=(vocab_size, dim)), jnp.float32)
  table = table.at[np.asarray([pad_id, *ignore_ids], np.int64)].set(0.0)

  def embed(params, tokens, segments=None):
    del params, segments
    emb = table[tokens].sum(axis=1)
    return emb / jnp.linalg.norm(emb, axis=1, keepdims=True)
  return embed
