"""Jitted Open-QA fine-tuning and prediction steps (batch > 1, sharded on the mesh).

The query tower and the reader train; the retrieved blocks' embeddings come from the frozen
index and are inputs, so documents are never re-embedded (ORQA/REALM). Layout as in
`realm_jax.train.steps`: the train state in the caller's `state_sharding` (replicated by
default, `partitioning.state_shardings` for FSDP), parameters-only functions taking the
parameters in whatever layout they come, the batch split over `data` (x `fsdp`)
(`partitioning.shard_batch`), dropout keys `fold_in(seed, step)`.

Batch (all [B, ...], built on the host; B questions, K retrieved blocks, R = reader_k <= K
reader blocks = the first R of the K, S = Lb * max_span_width spans):
  question_tokens     [B, Lq]    int32  `[CLS] question [SEP]`
  cand_doc_emb        [B, K, D]  float  index embeddings of the retrieved blocks
  cand_mask           [B, K]     bool   False for padding candidates
  cand_has_answer     [B, K]     bool   the block contains an answer (retriever supervision)
  reader_block_tokens [B, R, Lb] int32  `block [SEP]` of the first R candidates
  span_is_correct     [B, R, S]  bool   `answers.spans_to_mask` of each (question, block)
"""

from __future__ import annotations

import jax
import optax
from flax.training import train_state
from jax.sharding import Mesh

from realm_jax import objectives
from realm_jax.models import reader as reader_lib
from realm_jax.train import partitioning

QA_KEYS = ("question_tokens", "cand_doc_emb", "cand_mask", "cand_has_answer",
           "reader_block_tokens", "span_is_correct")
PREDICT_KEYS = ("question_tokens", "cand_doc_emb", "reader_block_tokens")


def qa_forward(model: reader_lib.OpenQAModel, params, batch, rng, deterministic: bool
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """-> (loss, metrics) of one batch (`objectives.qa_loss`)."""
  out = model.apply({"params": params}, batch["question_tokens"], batch["cand_doc_emb"],
                    batch["reader_block_tokens"], deterministic=deterministic,
                    rngs=None if deterministic else {"dropout": rng})
  reader_k = batch["reader_block_tokens"].shape[1]
  qa = objectives.qa_loss(out.span_logits, out.span_mask, out.retrieval_logits[:, :reader_k],
                          batch["cand_mask"][:, :reader_k], batch["span_is_correct"],
                          out.retrieval_logits, batch["cand_mask"], batch["cand_has_answer"])
  return qa.loss, qa._asdict()


def create_qa_train_state(model: reader_lib.OpenQAModel, rng: jax.Array, batch,
                          tx: optax.GradientTransformation) -> train_state.TrainState:
  """Initializes the parameters from one (host) batch's shapes."""
  params = jax.jit(model.init)(rng, batch["question_tokens"], batch["cand_doc_emb"],
                               batch["reader_block_tokens"])["params"]
  return train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx)


def make_qa_train_step(model: reader_lib.OpenQAModel, mesh: Mesh, seed: int,
                       state_sharding=None):
  """(state, batch) -> (state, metrics); the state is donated and keeps `state_sharding`
  (a pytree of shardings, or one for all; default replicated)."""
  def step(state, batch):
    rng = jax.random.fold_in(jax.random.key(seed), state.step)
    (_, metrics), grads = jax.value_and_grad(
        lambda p: qa_forward(model, p, batch, rng, deterministic=False), has_aux=True)(
            state.params)
    metrics = dict(metrics, grad_norm=optax.tree.norm(grads))
    return state.apply_gradients(grads=grads), metrics

  replicated = partitioning.replicated(mesh)
  state_sharding = replicated if state_sharding is None else state_sharding
  return jax.jit(step, in_shardings=(state_sharding, partitioning.batch_sharded(mesh)),
                 out_shardings=(state_sharding, replicated), donate_argnums=(0,))


def make_qa_eval_step(model: reader_lib.OpenQAModel, mesh: Mesh):
  """(params, batch) -> metrics of `qa_forward`, deterministic."""
  replicated = partitioning.replicated(mesh)
  return jax.jit(lambda params, batch: qa_forward(model, params, batch, None, True)[1],
                 in_shardings=(None, partitioning.batch_sharded(mesh)),
                 out_shardings=replicated)


def make_qa_predict_step(model: reader_lib.OpenQAModel, mesh: Mesh):
  """(params, batch with PREDICT_KEYS) -> (retrieval_logits [B, K], span_logits [B, R, S]),
  batch-sharded; `qa.evaluate.best_spans` picks the answers on the host."""
  sharded = partitioning.batch_sharded(mesh)

  def predict(params, batch):
    out = model.apply({"params": params}, batch["question_tokens"], batch["cand_doc_emb"],
                      batch["reader_block_tokens"], deterministic=True)
    return out.retrieval_logits, out.span_logits

  return jax.jit(predict, in_shardings=(None, sharded),
                 out_shardings=(sharded, sharded))
