"""A BERT encoder in Flax with HF-compatible parameter names.

Parameter paths follow Hugging Face's Flax BERT (`embeddings/word_embeddings/embedding`,
`encoder/layer/0/attention/self/query/kernel`, ...), so `bert-base-uncased`-style weights map
onto it one to one. Compute dtype is configurable (bf16 or float32); parameters stay float32.
Attention goes through `jax.nn.dot_product_attention`, which picks a fused kernel where one
applies; only when attention-probability dropout is active (training with
`attention_dropout_rate > 0`) is the softmax written out, as BERT/HF drop attention
probabilities and the fused kernel cannot.

Numerics follow the checkpoint's `config.json` (see `hf_weights.read_hf_config`): `hidden_act`
("gelu" is the exact erf GELU of HF BERT; "gelu_new" / "gelu_pytorch_tanh" / "gelu_fast" the
tanh approximation of original BERT and HF REALM) and `layer_norm_eps`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

# Named model sizes (hidden, layers, heads, intermediate); BERT's own shapes from `small` up.
SIZES = {
    "tiny": dict(hidden_size=128, num_layers=2, num_heads=2, intermediate_size=512),
    "mini": dict(hidden_size=256, num_layers=4, num_heads=4, intermediate_size=1024),
    "small": dict(hidden_size=512, num_layers=4, num_heads=8, intermediate_size=2048),
    # all-MiniLM-L6-v2's shape, to start from its pretrained weights (model.init_from_hf).
    "minilm-l6": dict(hidden_size=384, num_layers=6, num_heads=12, intermediate_size=1536),
    "base": dict(hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072),
    "large": dict(hidden_size=1024, num_layers=24, num_heads=16, intermediate_size=4096),
}


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """Shapes and numerics of one BERT tower."""

  vocab_size: int
  hidden_size: int = 768
  num_layers: int = 12
  num_heads: int = 12
  intermediate_size: int = 3072
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  dropout_rate: float = 0.1
  # Dropout on attention probabilities (HF attention_probs_dropout_prob); None = dropout_rate.
  attention_dropout_rate: float | None = None
  layer_norm_eps: float = 1e-12
  hidden_act: str = "gelu"  # HF names, see ACTIVATIONS
  initializer_range: float = 0.02
  dtype: Any = jnp.float32  # compute dtype; parameters are always float32
  remat: bool = False  # rematerialize each layer in the backward pass
  remat_policy: str = "nothing"  # what a rematerialized layer keeps (REMAT_POLICIES)

  def __post_init__(self):
    if self.hidden_size % self.num_heads:
      raise ValueError(
          f"model.hidden_size={self.hidden_size} is not divisible by "
          f"model.num_heads={self.num_heads}")
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f"model.remat_policy={self.remat_policy!r} is not one of "
                       f"{sorted(REMAT_POLICIES)}.")
    if self.hidden_act not in ACTIVATIONS:
      raise ValueError(f"model.hidden_act={self.hidden_act!r} is not one of "
                       f"{sorted(ACTIVATIONS)}.")

  @property
  def attention_dropout(self) -> float:
    """The attention-probability dropout rate actually used."""
    return (self.dropout_rate if self.attention_dropout_rate is None
            else self.attention_dropout_rate)

  @classmethod
  def from_model_config(cls, model_config: Any, vocab_size: int) -> "BertConfig":
    """From an ml_collections `config.model`; fields it lacks take this class's defaults.

    `hidden_act`, `layer_norm_eps` and `attention_dropout_rate` are read with `.get`, so a
    config written before they existed builds today's model (exact GELU, eps 1e-12, attention
    dropout = dropout_rate).
    """
    m = model_config
    get = m.get if hasattr(m, "get") else lambda k, d=None: getattr(m, k, d)
    return cls(
        vocab_size=vocab_size, hidden_size=m.hidden_size, num_layers=m.num_layers,
        num_heads=m.num_heads, intermediate_size=m.intermediate_size,
        max_position_embeddings=m.max_position_embeddings,
        type_vocab_size=get("type_vocab_size", 2), dropout_rate=m.dropout_rate,
        attention_dropout_rate=get("attention_dropout_rate", None),
        layer_norm_eps=get("layer_norm_eps", 1e-12), hidden_act=get("hidden_act", "gelu"),
        dtype=jnp.dtype(get("dtype", "float32")), remat=get("remat", False),
        remat_policy=get("remat_policy", "nothing"))


def _gelu_exact(x):
  return nn.gelu(x, approximate=False)


def _gelu_tanh(x):
  return nn.gelu(x, approximate=True)


# HF `ACT2FN` names -> functions. "gelu" in HF is the exact erf form; the tanh approximation
# ("gelu_new", original BERT's and HF RealmConfig's default) differs by up to ~1e-3.
ACTIVATIONS = {
    "gelu": _gelu_exact,
    "gelu_python": _gelu_exact,
    "gelu_new": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
    "gelu_fast": _gelu_tanh,
    "relu": nn.relu,
    "silu": nn.silu,
    "swish": nn.silu,
}


# `model.remat_policy` -> what `jax.checkpoint` may keep from a rematerialized layer's
# forward pass for its backward pass (everything else is recomputed there):
#   "nothing": only the layer's input (least memory; the layer's forward runs twice);
#   "dots": also the outputs of matmuls without batch dimensions (the dense projections;
#     attention score/probability tensors, which do have batch dims, are recomputed).
REMAT_POLICIES = {
    "nothing": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def activation(config: BertConfig):
  """The feed-forward / MLM-transform activation of `config` (HF `hidden_act`)."""
  return ACTIVATIONS[config.hidden_act]


def _dense(config: BertConfig, features: int, name: str) -> nn.Dense:
  return nn.Dense(
      features,
      dtype=config.dtype,
      kernel_init=nn.initializers.normal(config.initializer_range),
      name=name)


def _layer_norm(config: BertConfig, name: str = "LayerNorm") -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=config.layer_norm_eps, dtype=config.dtype, name=name)


class BertEmbeddings(nn.Module):
  """Word + position + token-type embeddings, then LayerNorm and dropout."""

  config: BertConfig

  def setup(self):
    init = nn.initializers.normal(self.config.initializer_range)
    self.word_embeddings = nn.Embed(
        self.config.vocab_size, self.config.hidden_size, embedding_init=init,
        dtype=self.config.dtype)
    self.position_embeddings = nn.Embed(
        self.config.max_position_embeddings, self.config.hidden_size,
        embedding_init=init, dtype=self.config.dtype)
    self.token_type_embeddings = nn.Embed(
        self.config.type_vocab_size, self.config.hidden_size, embedding_init=init,
        dtype=self.config.dtype)
    self.LayerNorm = _layer_norm(self.config)  # pylint: disable=invalid-name
    self.dropout = nn.Dropout(self.config.dropout_rate)

  def __call__(self, token_ids, segment_ids, deterministic: bool):
    # token_ids, segment_ids: [B, T] int32
    positions = jnp.arange(token_ids.shape[-1])[None, :]
    x = (self.word_embeddings(token_ids) + self.position_embeddings(positions) +
         self.token_type_embeddings(segment_ids))
    return self.dropout(self.LayerNorm(x), deterministic=deterministic)


class BertSelfAttention(nn.Module):
  """Multi-head self-attention (HF names: query, key, value)."""

  config: BertConfig

  @nn.compact
  def __call__(self, x, attention_mask, deterministic: bool = True):
    # x: [B, T, H]; attention_mask: [B, T] bool (True = real token)
    heads = self.config.num_heads
    head_dim = self.config.hidden_size // heads
    split = lambda t: t.reshape(t.shape[:-1] + (heads, head_dim))  # [B, T, N, D]
    q = split(_dense(self.config, self.config.hidden_size, "query")(x))
    k = split(_dense(self.config, self.config.hidden_size, "key")(x))
    v = split(_dense(self.config, self.config.hidden_size, "value")(x))
    mask = attention_mask[:, None, None, :]  # [B, 1, 1, S] broadcast over heads and queries
    rate = self.config.attention_dropout
    if deterministic or rate == 0.0:
      out = jax.nn.dot_product_attention(q, k, v, mask=mask)  # [B, T, N, D]
    else:
      # Written out so the probabilities can be dropped (BERT / HF attention_probs_dropout).
      scores = jnp.einsum("btnd,bsnd->bnts", q, k,
                          preferred_element_type=jnp.float32) / jnp.sqrt(head_dim)
      scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)  # [B, N, T, S]
      probs = jax.nn.softmax(scores, axis=-1)
      probs = nn.Dropout(rate)(probs, deterministic=False).astype(v.dtype)
      out = jnp.einsum("bnts,bsnd->btnd", probs, v)
    return out.reshape(out.shape[:-2] + (self.config.hidden_size,))


class BertResidualOutput(nn.Module):
  """Dense, dropout, residual add and LayerNorm (HF's `*Output` blocks)."""

  config: BertConfig

  @nn.compact
  def __call__(self, x, residual, deterministic: bool):
    x = _dense(self.config, self.config.hidden_size, "dense")(x)
    x = nn.Dropout(self.config.dropout_rate)(x, deterministic=deterministic)
    return _layer_norm(self.config)(x + residual)


class BertAttention(nn.Module):
  config: BertConfig

  @nn.compact
  def __call__(self, x, attention_mask, deterministic: bool):
    attended = BertSelfAttention(self.config, name="self")(x, attention_mask, deterministic)
    return BertResidualOutput(self.config, name="output")(attended, x, deterministic)


class BertIntermediate(nn.Module):
  config: BertConfig

  @nn.compact
  def __call__(self, x):
    x = _dense(self.config, self.config.intermediate_size, "dense")(x)
    return activation(self.config)(x)


class BertLayer(nn.Module):
  """One transformer block: attention, then the feed-forward network."""

  config: BertConfig

  @nn.compact
  def __call__(self, x, attention_mask, deterministic: bool):
    x = BertAttention(self.config, name="attention")(x, attention_mask, deterministic)
    h = BertIntermediate(self.config, name="intermediate")(x)
    return BertResidualOutput(self.config, name="output")(h, x, deterministic)


def _key_data(key):
  """Raw uint32 data of a PRNG key, typed (`jax.random.key`) or legacy uint32 [2]."""
  return jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key


def _layer_fn(config: BertConfig, deterministic: bool):
  """One layer as a pure function: (params, x [B, T, H], mask [B, T], key data) -> [B, T, H].

  `key_data` is the raw uint32 data of the layer's dropout key (unused when deterministic)."""
  def fn(params, x, attention_mask, key_data):
    rngs = None if deterministic else {"dropout": jax.random.wrap_key_data(key_data)}
    return BertLayer(config, parent=None).apply({"params": params}, x, attention_mask,
                                                deterministic, rngs=rngs)
  return fn


class BertLayerStack(nn.Module):
  """The layers, named "0", "1", ... as in HF (`encoder/layer/<i>`).

  After `init`, each layer runs as a pure function of its parameters (`_layer_fn`) with one
  dropout key per layer drawn here from the "dropout" stream, so `model.remat` changes memory
  and time, never the numbers.

  `model.remat`: the layers' parameters are stacked ([L, ...], a copy per step) and the layers
  run as one `jax.lax.scan` over a `jax.checkpoint`ed layer (policy `model.remat_policy`).
  Why a scan and not `nn.remat` per layer (what this was before): XLA's CPU pipeline removes
  the optimization barriers that keep a checkpoint's recomputation apart from the forward pass,
  and CSE then merges the two, so per-layer remat saved nothing (measured: XLA temp unchanged;
  BENCHMARKS.md "Rematerialization"). The backward pass of a scan is a separate loop, which
  must replay each layer's forward from its saved input: one layer's activations at a time.
  """

  config: BertConfig

  def setup(self):
    self.layers = [BertLayer(self.config, name=str(i)) for i in range(self.config.num_layers)]

  def __call__(self, x, attention_mask, deterministic: bool):
    # x: [B, T, H]; attention_mask: [B, T] bool -> [B, T, H]
    if self.is_initializing():  # creates the parameters under their HF names
      for layer in self.layers:
        x = layer(x, attention_mask, deterministic)
      return x
    fn = _layer_fn(self.config, deterministic)
    params = [self.variables["params"][str(i)] for i in range(self.config.num_layers)]
    keys = [jnp.zeros((2,), jnp.uint32) if deterministic else _key_data(self.make_rng("dropout"))
            for _ in params]  # [2] uint32 each (threefry key data)
    if not self.config.remat:
      for layer_params, key in zip(params, keys):
        x = fn(layer_params, x, attention_mask, key)
      return x
    step = jax.checkpoint(fn, policy=REMAT_POLICIES[self.config.remat_policy])
    stacked = jax.tree_util.tree_map(lambda *p: jnp.stack(p), *params)  # leaves [L, ...]
    x, _ = jax.lax.scan(lambda h, pk: (step(pk[0], h, attention_mask, pk[1]), None), x,
                        (stacked, jnp.stack(keys)))  # keys [L, 2]
    return x


class BertEncoder(nn.Module):
  config: BertConfig

  @nn.compact
  def __call__(self, x, attention_mask, deterministic: bool):
    return BertLayerStack(self.config, name="layer")(x, attention_mask, deterministic)


class BertPooler(nn.Module):
  """HF `pooler`: dense(H) + tanh over the first ([CLS]) position: [B, T, H] -> [B, H]."""

  config: BertConfig

  @nn.compact
  def __call__(self, hidden):
    return jnp.tanh(_dense(self.config, self.config.hidden_size, "dense")(hidden[:, 0]))


class BertModel(nn.Module):
  """BERT: token ids -> hidden states [B, T, H]; `pool` adds HF's pooler (`pooler/dense`).

  The pooler's parameters exist only in models that call `pool` (the retriever embedder);
  the MLM encoder and the reader never use it, as in REALM/ORQA.
  """

  config: BertConfig

  def setup(self):
    self.embeddings = BertEmbeddings(self.config)
    self.encoder = BertEncoder(self.config)
    self.pooler = BertPooler(self.config)

  def __call__(self, token_ids, segment_ids, attention_mask, deterministic: bool = True):
    # token_ids, segment_ids: [B, T] int32; attention_mask: [B, T] bool
    x = self.embeddings(token_ids, segment_ids, deterministic)
    return self.encoder(x, attention_mask, deterministic)

  def pool(self, hidden):
    """BERT's `pooled_output`: tanh(dense(hidden[:, 0])), [B, T, H] -> [B, H]."""
    return self.pooler(hidden)

  def attend_word_embeddings(self, x):
    """Logits against the (tied) word embedding table: [..., H] -> [..., V]."""
    return self.embeddings.word_embeddings.attend(x)
