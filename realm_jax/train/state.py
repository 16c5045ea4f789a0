"""Model, optimizer and train state from a config.

ICT trains the embedder(s) only (the encoder's updates are zeroed, so weight decay does not
touch it either); REALM trains everything.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax.training import train_state

from realm_jax import config_lib
from realm_jax.models import bert
from realm_jax.models import realm

EMBEDDER_KEYS = ("embedder", "query_embedder", "doc_embedder")
ENCODER_KEYS = ("encoder",)


def build_model(config: ml_collections.ConfigDict, vocab_size: int, pad_id: int
                ) -> realm.RealmModel:
  m = config.model
  bert_config = bert.BertConfig.from_model_config(m, vocab_size)
  return realm.RealmModel(realm.RealmModelConfig(
      bert=bert_config, embed_dim=m.embed_dim, share_embedders=m.share_embedders,
      pad_id=pad_id, embedder_pooler=m.get("embedder_pooler", True)))


def dummy_inputs(config: ml_collections.ConfigDict) -> tuple[jax.Array, ...]:
  """Smallest inputs with the config's sequence lengths, for `init`."""
  d = config.data
  k = 2
  return (jnp.ones((1, d.query_len), jnp.int32), jnp.zeros((1, d.max_masked), jnp.int32),
          jnp.ones((1, k, d.doc_len), jnp.int32), jnp.zeros((1, k, d.doc_len), jnp.int32),
          jnp.ones((1, k, d.doc_len - 2), jnp.int32))


def _decay_mask(params):
  """Weight decay on kernels and embeddings, not on biases or LayerNorm scales."""
  flat = flax.traverse_util.flatten_dict(params)
  return flax.traverse_util.unflatten_dict(
      {path: path[-1] in ("kernel", "embedding") for path in flat})


def make_schedule(learning_rate: float, num_steps: int, warmup_steps: int) -> optax.Schedule:
  """BERT's schedule: linear warm-up from 0 to `learning_rate`, then linear decay to 0.

  The optimizer evaluates it at its update count, so the update of 0-based step t (logged as
  step t + 1) uses `schedule(t)`.
  """
  return optax.join_schedules(
      [optax.linear_schedule(0.0, learning_rate, max(warmup_steps, 1)),
       optax.linear_schedule(learning_rate, 0.0, max(num_steps - warmup_steps, 1))],
      [max(warmup_steps, 1)])


def _schedule_args(config: ml_collections.ConfigDict) -> tuple[float, int, int]:
  """(peak learning rate, steps, warm-up steps) of `config.objective`'s optimizer."""
  if config.objective == "ict":
    return config.ict.learning_rate, config.ict.num_steps, max(1, config.ict.num_steps // 20)
  return config.train.learning_rate, config.train.num_steps, config.train.warmup_steps


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  """The learning rate of the optimizer `optimizer_for(config)` builds, at multiplier 1 (the
  encoder in REALM, the embedder in ICT), as a function of the 0-based step: for the metrics."""
  return make_schedule(*_schedule_args(config))


def make_optimizer(learning_rate: float, num_steps: int, warmup_steps: int,
                   weight_decay: float, grad_clip_norm: float,
                   lr_multipliers: Mapping[str, float] | None = None
                   ) -> optax.GradientTransformation:
  """AdamW with linear warmup and linear decay (BERT's schedule) after global-norm clipping.

  `lr_multipliers` scales the learning rate of top-level parameter groups (e.g.
  `{"embedder": 0.1}`); a multiplier of 0 freezes the group (no update, no weight decay).

  One object per setting in this process: the optimizer is a static field of the train state,
  so two states built with equal settings (a created one and the `abstract_train_state` a
  restore fills) must share it to have the same tree structure, which per-leaf shardings
  (`jax.device_put`, `jax.jit` in/out shardings) require.
  """
  return _make_optimizer(float(learning_rate), int(num_steps), int(warmup_steps),
                         float(weight_decay), float(grad_clip_norm),
                         tuple(sorted(dict(lr_multipliers or {}).items())))


@functools.lru_cache(maxsize=None)
def _make_optimizer(learning_rate: float, num_steps: int, warmup_steps: int,
                    weight_decay: float, grad_clip_norm: float,
                    lr_multipliers: tuple[tuple[str, float], ...]
                    ) -> optax.GradientTransformation:
  """`make_optimizer`, cached on its (hashable) arguments."""
  lr_multipliers = dict(lr_multipliers)
  schedule = make_schedule(learning_rate, num_steps, warmup_steps)

  def group(multiplier: float) -> optax.GradientTransformation:
    if multiplier == 0:
      return optax.set_to_zero()
    return optax.adamw(lambda step: schedule(step) * multiplier, weight_decay=weight_decay,
                       mask=_decay_mask)

  multipliers = sorted(set(lr_multipliers.values()) | {1.0})
  labels = lambda params: {key: f"lr_x{lr_multipliers.get(key, 1.0)}" for key in params}
  return optax.chain(
      optax.clip_by_global_norm(grad_clip_norm),
      optax.multi_transform({f"lr_x{m}": group(m) for m in multipliers}, labels))


def optimizer_for(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """ICT trains the embedder(s) only; REALM scales the retriever's rate by config."""
  t = config.train
  if config.objective == "ict":
    return make_optimizer(*_schedule_args(config), t.weight_decay, t.grad_clip_norm,
                          lr_multipliers={"encoder": 0.0})
  return make_optimizer(*_schedule_args(config), t.weight_decay, t.grad_clip_norm,
                        lr_multipliers={k: t.retriever_lr_multiplier for k in EMBEDDER_KEYS})


def create_train_state(config: ml_collections.ConfigDict, model: realm.RealmModel,
                       rng: jax.Array, sharding=None) -> train_state.TrainState:
  """Initial parameters and optimizer state. With `sharding` (a pytree of shardings like the
  state, e.g. `partitioning.state_shardings`) the state is created in that layout by one jitted
  call, never whole on one device: what a model too large to replicate needs."""
  if sharding is not None:
    return jax.jit(lambda r: create_train_state(config, model, r), out_shardings=sharding)(rng)
  params = jax.jit(model.init)(rng, *dummy_inputs(config))["params"]
  return train_state.TrainState.create(apply_fn=model.apply, params=params,
                                       tx=optimizer_for(config))


def abstract_train_state(config, model, rng) -> Any:
  """Shapes and dtypes of the train state, without allocating it (for restoring)."""
  return jax.eval_shape(lambda r: create_train_state(config, model, r), rng)


def _placed_like(target, value):
  """value with target's sharding when target is a placed jax.Array, else a jnp array."""
  sharding = getattr(target, "sharding", None)
  if isinstance(target, jax.Array) and sharding is not None:
    return jax.device_put(value, sharding)
  return jnp.asarray(value)


def warm_start(params, source_params, keys: tuple[str, ...], source_name: str
               ) -> tuple[Any, list[str]]:
  """Copies the top-level subtrees `keys` that `source_params` has into `params`, each leaf
  placed with the target leaf's sharding (so an fsdp state stays sharded)."""
  params = dict(params)
  copied = []
  for key in keys:
    if key in params and key in source_params:
      target_shapes = jax.tree_util.tree_map(jnp.shape, params[key])
      source_shapes = jax.tree_util.tree_map(jnp.shape, source_params[key])
      if target_shapes != source_shapes:
        raise ValueError(f"{source_name}: the {key!r} parameters have other shapes than "
                         "this model's (different model size or vocabulary?)")
      # Straight into the target leaf's layout (fsdp shards), never whole on one device first.
      params[key] = jax.tree_util.tree_map(_placed_like, params[key], source_params[key])
      copied.append(key)
  if not copied:
    raise ValueError(f"{source_name}: none of {', '.join(keys)} found; it has "
                     f"{sorted(source_params)}")
  return params, copied


def copies_embedder_into_encoder(config: ml_collections.ConfigDict) -> bool:
  """train.init_encoder_from_embedder applies: a REALM run warm-started from an embedder
  (train.init_from) whose reader has no other start."""
  return bool(config.get("objective", "realm") != "ict"
              and config.train.get("init_encoder_from_embedder")
              and config_lib.encoder_copy_skipped(config) is None)


def encoder_from_embedder(params) -> tuple[Any, str]:
  """params with the encoder's BERT replaced by a copy of the (document) embedder's BERT, and
  the source's name.

  REALM starts the retriever and the reader from one pretrained BERT; a run without one starts
  the reader from its warm-started retriever's BERT instead (measured on the facts corpus,
  tiny: a random reader stayed at the answer-type prior, 0.037 held-out span accuracy after
  800 steps; this one reached 0.778). Leaves are copies (the state is donated), placed like the
  encoder's; the embedder's pooler, which the encoder lacks, is not copied.
  """
  source = "embedder" if "embedder" in params else "doc_embedder"
  flat_source = flax.traverse_util.flatten_dict(params[source]["bert"])
  flat_target = flax.traverse_util.flatten_dict(params["encoder"]["bert"])
  for path, leaf in flat_target.items():
    if path not in flat_source or jnp.shape(flat_source[path]) != jnp.shape(leaf):
      raise ValueError(f"the encoder's BERT parameter {'/'.join(path)} has no counterpart of the "
                       f"same shape in the {source}'s BERT")
  copied = {path: _placed_like(leaf, jnp.array(flat_source[path], copy=True))
            for path, leaf in flat_target.items()}
  params = dict(params)
  params["encoder"] = dict(params["encoder"], bert=flax.traverse_util.unflatten_dict(copied))
  return params, source


def count_params(params) -> int:
  return sum(x.size for x in jax.tree_util.tree_leaves(params))
