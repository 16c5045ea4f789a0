"""realm_jax.qa.steps: the sharded QA train step learns a tiny synthetic task; predict shapes."""

import jax
import numpy as np

from realm_jax.models import bert
from realm_jax.models import reader
from realm_jax.qa import answers
from realm_jax.qa import steps
from realm_jax.train import partitioning
from realm_jax.train import state as state_lib

W, LB, LQ, K, R, D, B = 3, 8, 6, 4, 2, 8, 8
CONTINUATION = np.arange(30) >= 25  # ids 25..29 play '##' pieces; answers never use them


def _model():
  b = bert.BertConfig(vocab_size=30, hidden_size=32, num_layers=1, num_heads=2,
                      intermediate_size=64, max_position_embeddings=32, dropout_rate=0.1)
  return reader.OpenQAModel(reader.OpenQAModelConfig(
      reader.ReaderConfig(b, span_hidden_size=16, max_span_width=W), embed_dim=D))


def _batch(seed=0):
  """Blocks of random tokens; the answer is the one span whose tokens are the question's, a
  whole word (the token after it is not a '##' piece)."""
  rng = np.random.default_rng(seed)
  questions = np.zeros((B, LQ), np.int32)
  blocks = np.zeros((B, R, LB), np.int32)
  correct = np.zeros((B, R, LB * W), bool)
  for i in range(B):
    answer = rng.integers(5, 25, size=2)
    questions[i, :4] = [2, *answer, 3]
    for z in range(R):
      body = rng.integers(5, 30, size=LB - 2)
      if z == 0 or i % 2:  # the answer sits in block 0, and in block 1 for odd questions
        at = rng.integers(0, LB - 3)
        body[at:at + 2] = answer
        if at + 2 < len(body) and CONTINUATION[body[at + 2]]:
          body[at + 2] = 5
      blocks[i, z, :LB - 1] = [*body, 3]
      spans = answers.find_answer_spans(body, [tuple(answer)], W, CONTINUATION[body])
      correct[i, z] = answers.spans_to_mask(spans, LB, W)
  has_answer = np.zeros((B, K), bool)
  has_answer[:, :R] = correct.any(-1)
  cand_mask = np.ones((B, K), bool)
  cand_mask[0, -1] = False
  return dict(question_tokens=questions,
              cand_doc_emb=rng.normal(size=(B, K, D)).astype(np.float32),
              cand_mask=cand_mask, cand_has_answer=has_answer,
              reader_block_tokens=blocks, reader_block_continuation=CONTINUATION[blocks],
              span_is_correct=correct)


def test_train_step_on_the_mesh_reduces_the_loss():
  mesh = partitioning.make_mesh([("data", -1)])
  assert partitioning.data_parallel_size(mesh) == 8
  model = _model()
  host_batch = _batch()
  tx = state_lib.make_optimizer(3e-3, num_steps=100, warmup_steps=1, weight_decay=0.0,
                                grad_clip_norm=1.0)
  state = partitioning.replicate(
      steps.create_qa_train_state(model, jax.random.key(0), host_batch, tx), mesh)
  batch = partitioning.shard_batch(host_batch, mesh)
  assert batch["span_is_correct"].sharding.spec[0] == "data"
  eval_step = steps.make_qa_eval_step(model, mesh)
  before = eval_step(state.params, batch)
  assert float(before["reader_answerable"]) == 1.0
  train_step = steps.make_qa_train_step(model, mesh, seed=0)
  for _ in range(8):
    state, metrics = train_step(state, batch)
    assert np.isfinite(float(metrics["loss"])) and np.isfinite(float(metrics["grad_norm"]))
  after = eval_step(state.params, batch)
  assert int(state.step) == 8
  assert float(after["reader_loss"]) < 0.8 * float(before["reader_loss"]), (before, after)
  assert float(after["retriever_loss"]) < float(before["retriever_loss"])


def test_predict_step_shapes_and_sharding():
  mesh = partitioning.make_mesh([("data", -1)])
  model = _model()
  host_batch = _batch(1)
  state = steps.create_qa_train_state(model, jax.random.key(1), host_batch,
                                      state_lib.make_optimizer(1e-3, 10, 1, 0.0, 1.0))
  predict = steps.make_qa_predict_step(model, mesh)
  batch = partitioning.shard_batch({k: host_batch[k] for k in steps.PREDICT_KEYS}, mesh)
  retrieval_logits, span_logits = predict(partitioning.replicate(state.params, mesh), batch)
  assert retrieval_logits.shape == (B, K) and span_logits.shape == (B, R, LB * W)
  assert span_logits.sharding.spec[0] == "data"


def test_bm25_mode_is_the_reader_loss_with_block_score_zero():
  """retriever="bm25": loss = -log of the span mass that matches, one softmax over every valid
  (block, span) of the R reader blocks with a block score of 0 (numpy, written out), no
  retriever loss, no query tower gradient; predict returns zeros [B, R] as block scores."""
  mesh = partitioning.make_mesh([("data", -1)])
  model = _model()
  host_batch = _batch(2)
  bm25_batch = {k: v for k, v in host_batch.items() if k != "cand_doc_emb"}
  bm25_batch["cand_mask"] = host_batch["cand_mask"][:, :R]
  bm25_batch["cand_has_answer"] = host_batch["cand_has_answer"][:, :R]
  state = steps.create_qa_train_state(model, jax.random.key(2), host_batch,
                                      state_lib.make_optimizer(1e-3, 10, 1, 0.0, 1.0))
  metrics = steps.make_qa_eval_step(model, mesh, "bm25")(
      state.params, partitioning.shard_batch(bm25_batch, mesh))
  retrieval, span_logits = steps.make_qa_predict_step(model, mesh, "bm25")(
      state.params, partitioning.shard_batch(
          {k: bm25_batch[k] for k in steps.predict_keys("bm25")}, mesh))
  retrieval, span_logits = np.asarray(retrieval), np.asarray(span_logits, np.float64)
  assert retrieval.shape == (B, R) and not retrieval.any()
  losses = []
  for i in range(B):
    valid = span_logits[i] > -1e8  # [R, S], the reader's NEG_INF marks invalid spans
    logits = span_logits[i][valid]
    correct = host_batch["span_is_correct"][i][valid]
    log_z = np.log(np.exp(logits - logits.max()).sum()) + logits.max()
    log_num = np.log(np.exp(logits[correct] - logits.max()).sum()) + logits.max()
    losses.append(log_z - log_num)
  np.testing.assert_allclose(float(metrics["reader_loss"]), np.mean(losses), rtol=1e-5)
  # Spans inside words were among the block's spans, and are out of both softmax and argmax.
  in_block = np.asarray(steps.make_qa_predict_step(model, mesh, "bm25")(
      state.params, partitioning.shard_batch(
          {k: bm25_batch[k] for k in ("question_tokens", "reader_block_tokens")}, mesh))[1]) > -1e8
  assert (in_block & (span_logits <= -1e8)).any()
  assert float(metrics["retriever_loss"]) == 0.0
  assert float(metrics["loss"]) == float(metrics["reader_loss"])
  # The dense loss on the same blocks differs (its block scores are not 0): not vacuous.
  dense = steps.make_qa_eval_step(model, mesh)(state.params,
                                               partitioning.shard_batch(host_batch, mesh))
  assert abs(float(dense["reader_loss"]) - np.mean(losses)) > 1e-4
  grads = jax.grad(lambda p: steps.qa_forward(model, p, bm25_batch, None, True, "bm25")[0])(
      state.params)
  assert not any(np.any(g) for g in jax.tree_util.tree_leaves(grads["query_embedder"]))
