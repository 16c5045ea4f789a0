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
  reader_block_continuation [B, R, Lb] bool  True for '##' pieces: spans must cover whole
                                    words, in the loss's softmax and in prediction
                                    (`models.reader.whole_word_span_mask`)
  span_is_correct     [B, R, S]  bool   `answers.spans_to_mask` of each (question, block)

With `retriever="bm25"` (`qa.retriever`) there is no `cand_doc_emb` and K = R: the blocks are
BM25's top R, the query tower is not run, the block-score term of the joint softmax is 0 and
there is no retriever loss (`realm_jax.qa.bm25` says why).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax.training import train_state
from jax.sharding import Mesh

from realm_jax import objectives
from realm_jax.models import reader as reader_lib
from realm_jax.train import partitioning

QA_KEYS = ("question_tokens", "cand_doc_emb", "cand_mask", "cand_has_answer",
           "reader_block_tokens", "reader_block_continuation", "span_is_correct")
PREDICT_KEYS = ("question_tokens", "cand_doc_emb", "reader_block_tokens",
                "reader_block_continuation")
RETRIEVERS = ("dense", "bm25")


def predict_keys(retriever: str = "dense") -> tuple[str, ...]:
  """The batch keys `make_qa_predict_step` reads."""
  return PREDICT_KEYS if retriever == "dense" else tuple(k for k in PREDICT_KEYS
                                                          if k != "cand_doc_emb")


def _check_retriever(retriever: str) -> None:
  if retriever not in RETRIEVERS:
    raise ValueError(f"qa.retriever={retriever!r} is not one of {list(RETRIEVERS)}")


def _apply(model: reader_lib.OpenQAModel, params, batch, retriever: str, deterministic: bool,
           rng=None) -> reader_lib.OpenQAOutput:
  """The model on a batch: dense retrieval logits over the K candidates, or (BM25) 0 for
  each of the R reader blocks without running the query tower. With
  `reader_block_continuation` in the batch (`batches.build_qa_batch` always adds it) only
  whole-word spans are candidates; without it every span inside the block is."""
  rngs = None if deterministic else {"dropout": rng}
  continuation = batch.get("reader_block_continuation")
  if retriever == "bm25":
    return model.apply({"params": params}, batch["question_tokens"],
                       batch["reader_block_tokens"], deterministic=deterministic, rngs=rngs,
                       reader_block_continuation=continuation, method=model.read)
  return model.apply({"params": params}, batch["question_tokens"], batch["cand_doc_emb"],
                     batch["reader_block_tokens"], deterministic=deterministic, rngs=rngs,
                     reader_block_continuation=continuation)


def qa_forward(model: reader_lib.OpenQAModel, params, batch, rng, deterministic: bool,
               retriever: str = "dense") -> tuple[jax.Array, dict[str, jax.Array]]:
  """-> (loss, metrics) of one batch (`objectives.qa_loss`). With BM25 the retriever's
  weak labels are all False, so its loss is 0 (and `retriever_answerable` 0)."""
  _check_retriever(retriever)
  out = _apply(model, params, batch, retriever, deterministic, rng)
  reader_k = batch["reader_block_tokens"].shape[1]
  has_answer = batch["cand_has_answer"]
  if retriever == "bm25":
    has_answer = jnp.zeros_like(has_answer, bool)
  qa = objectives.qa_loss(out.span_logits, out.span_mask, out.retrieval_logits[:, :reader_k],
                          batch["cand_mask"][:, :reader_k], batch["span_is_correct"],
                          out.retrieval_logits, batch["cand_mask"], has_answer)
  return qa.loss, qa._asdict()


def create_qa_train_state(model: reader_lib.OpenQAModel, rng: jax.Array, batch,
                          tx: optax.GradientTransformation) -> train_state.TrainState:
  """Initializes the parameters from one (host) batch's shapes."""
  params = jax.jit(model.init)(rng, batch["question_tokens"], batch["cand_doc_emb"],
                               batch["reader_block_tokens"])["params"]
  return train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx)


def make_qa_train_step(model: reader_lib.OpenQAModel, mesh: Mesh, seed: int,
                       state_sharding=None, retriever: str = "dense"):
  """(state, batch) -> (state, metrics); the state is donated and keeps `state_sharding`
  (a pytree of shardings, or one for all; default replicated)."""
  _check_retriever(retriever)

  def step(state, batch):
    rng = jax.random.fold_in(jax.random.key(seed), state.step)
    (_, metrics), grads = jax.value_and_grad(
        lambda p: qa_forward(model, p, batch, rng, deterministic=False, retriever=retriever),
        has_aux=True)(
            state.params)
    metrics = dict(metrics, grad_norm=optax.tree.norm(grads))
    return state.apply_gradients(grads=grads), metrics

  replicated = partitioning.replicated(mesh)
  state_sharding = replicated if state_sharding is None else state_sharding
  return jax.jit(step, in_shardings=(state_sharding, partitioning.batch_sharded(mesh)),
                 out_shardings=(state_sharding, replicated), donate_argnums=(0,))


def make_qa_eval_step(model: reader_lib.OpenQAModel, mesh: Mesh, retriever: str = "dense"):
  """(params, batch) -> metrics of `qa_forward`, deterministic."""
  replicated = partitioning.replicated(mesh)
  return jax.jit(lambda params, batch: qa_forward(model, params, batch, None, True,
                                                  retriever)[1],
                 in_shardings=(None, partitioning.batch_sharded(mesh)),
                 out_shardings=replicated)


def make_qa_predict_step(model: reader_lib.OpenQAModel, mesh: Mesh, retriever: str = "dense"):
  """(params, batch with `predict_keys(retriever)`) -> (retrieval_logits [B, K] (BM25: zeros
  [B, R]), span_logits [B, R, S]), batch-sharded; `qa.evaluate.best_spans` picks the answers
  on the host."""
  _check_retriever(retriever)
  sharded = partitioning.batch_sharded(mesh)

  def predict(params, batch):
    out = _apply(model, params, batch, retriever, deterministic=True)
    return out.retrieval_logits, out.span_logits

  return jax.jit(predict, in_shardings=(None, sharded),
                 out_shardings=(sharded, sharded))
