"""The jitted device computations: REALM and ICT train steps, eval step, embedding calls.

Each factory returns a `jax.jit` function whose shardings come from `partitioning`: the batch
split over `data` (x `fsdp`), the train state as `state_sharding` says (replicated by default;
`partitioning.state_shardings` for FSDP). Functions that only read the parameters (eval,
embedding) take them in whatever layout the caller placed them (`in_shardings` None: the
argument's own sharding), so the trainer's sharded parameters and the builder's replicated ones
both fit. Dropout keys are `fold_in(seed, step)`, so a run gives the same numbers on 1 or 8
devices, under either layout and after a resume.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import optax
from jax.sharding import Mesh

from realm_jax import objectives
from realm_jax.models import realm
from realm_jax.train import partitioning

# Batch keys the REALM step reads (all [B, ...], sharded on the batch dimension).
REALM_KEYS = ("query_tokens", "masked_positions", "masked_labels", "masked_weights",
              "cand_doc_tokens", "cand_doc_segments", "cand_body_tokens", "cand_mask",
              "cand_is_gold")  # the last is optional: a diagnostic where gold docs are known
ICT_KEYS = ("query_tokens", "doc_tokens", "doc_segments")


def _realm_forward(model: realm.RealmModel, params, batch, rng, marginalization: str,
                   deterministic: bool) -> tuple[jax.Array, dict[str, jax.Array]]:
  """-> (loss, metrics); `cand_is_gold` [B, k] (known gold documents) adds gold_doc_prob."""
  retrieval_logits, mlm_logits = model.apply(
      {"params": params}, batch["query_tokens"], batch["masked_positions"],
      batch["cand_doc_tokens"], batch["cand_doc_segments"], batch["cand_body_tokens"],
      deterministic=deterministic, rngs=None if deterministic else {"dropout": rng})
  out = objectives.realm_loss(retrieval_logits, batch["cand_mask"], mlm_logits,
                              batch["masked_labels"], batch["masked_weights"], marginalization)
  metrics = out._asdict()
  if "cand_is_gold" in batch:
    metrics["gold_doc_prob"] = objectives.gold_doc_prob(retrieval_logits, batch["cand_mask"],
                                                        batch["cand_is_gold"])
  return out.loss, metrics


def _ict_forward(model: realm.RealmModel, params, batch, rng, deterministic: bool):
  rngs = None if deterministic else {"dropout": rng}
  query_emb = model.apply({"params": params}, batch["query_tokens"], deterministic,
                          method=model.embed_queries, rngs=rngs)
  doc_emb = model.apply({"params": params}, batch["doc_tokens"], batch["doc_segments"],
                        deterministic, method=model.embed_docs, rngs=rngs)
  return objectives.ict_loss(query_emb, doc_emb)


def _apply_gradients(state, grads, metrics):
  metrics = dict(metrics, grad_norm=optax.tree.norm(grads))
  return state.apply_gradients(grads=grads), metrics


def _jit_step(fn: Callable, mesh: Mesh, state_sharding=None):
  """Train state in `state_sharding` (a pytree of shardings, or one for all; default
  replicated: data parallelism) in and out, batch split over the batch axes, state donated,
  metrics replicated."""
  replicated = partitioning.replicated(mesh)
  state_sharding = replicated if state_sharding is None else state_sharding
  return jax.jit(fn, in_shardings=(state_sharding, partitioning.batch_sharded(mesh)),
                 out_shardings=(state_sharding, replicated), donate_argnums=(0,))


def make_realm_train_step(model: realm.RealmModel, mesh: Mesh, seed: int,
                          marginalization: str, state_sharding=None):
  def step(state, batch):
    rng = jax.random.fold_in(jax.random.key(seed), state.step)

    def loss_fn(params):
      return _realm_forward(model, params, batch, rng, marginalization, deterministic=False)

    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    return _apply_gradients(state, grads, metrics)

  return _jit_step(step, mesh, state_sharding)


def make_ict_train_step(model: realm.RealmModel, mesh: Mesh, seed: int, state_sharding=None):
  def step(state, batch):
    rng = jax.random.fold_in(jax.random.key(seed), state.step)

    def loss_fn(params):
      loss, accuracy = _ict_forward(model, params, batch, rng, deterministic=False)
      return loss, accuracy

    (loss, accuracy), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    return _apply_gradients(state, grads, dict(loss=loss, accuracy=accuracy))

  return _jit_step(step, mesh, state_sharding)


def make_realm_eval_step(model: realm.RealmModel, mesh: Mesh, marginalization: str):
  """Deterministic forward pass -> RealmOutputs (means and counts) for one eval batch."""
  def step(params, batch):
    return _realm_forward(model, params, batch, None, marginalization, deterministic=True)[1]

  return jax.jit(step, in_shardings=(None, partitioning.batch_sharded(mesh)),
                 out_shardings=partitioning.replicated(mesh))


def make_embed_fns(model: realm.RealmModel, mesh: Mesh):
  """(embed_queries(params, tokens [B, Lq]), embed_docs(params, tokens, segments [N, Ld])),
  parameters in the caller's layout (replicated or fsdp-sharded)."""
  batch = partitioning.batch_sharded(mesh)
  embed_queries = jax.jit(
      lambda params, tokens: model.apply({"params": params}, tokens, True,
                                         method=model.embed_queries),
      in_shardings=(None, batch), out_shardings=batch)
  embed_docs = jax.jit(
      lambda params, tokens, segments: model.apply({"params": params}, tokens, segments, True,
                                                   method=model.embed_docs),
      in_shardings=(None, batch, batch), out_shardings=batch)
  return embed_queries, embed_docs


def compile_report(jitted, *args) -> dict[str, float]:
  """Compiles ahead of the first step; returns FLOPs and memory as XLA counts them."""
  return compile_with_report(jitted, *args)[1]


def compile_with_report(jitted, *args) -> tuple[Any, dict[str, float]]:
  """(the executable of `jitted` for `args`, its FLOPs and memory as XLA counts them)."""
  compiled = jitted.lower(*args).compile()
  report = {}
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  if cost and "flops" in cost:
    report["flops_per_step"] = float(cost["flops"])
  memory = compiled.memory_analysis()
  if memory is not None:
    for field in ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
                  "generated_code_size_in_bytes"):
      if hasattr(memory, field):
        report[field.replace("_in_bytes", "_bytes")] = float(getattr(memory, field))
  return compiled, report
