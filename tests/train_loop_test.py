"""End-to-end `train_and_evaluate` on a tiny corpus: device-count invariance, exact resume,
workdir layout, metrics, ICT, warm start and the no-retrieval baseline.

Runs are shared through module-scoped fixtures (each costs a compile and a corpus embedding).
"""

import json
import shutil

import flax
import jax
import numpy as np
import pytest

from realm_jax.data import prepare
from realm_jax.retrieval import in_process
from realm_jax.train import checkpointing
from realm_jax.train import loop
from realm_jax.train import metrics as metrics_lib
from realm_jax.train import partitioning
from realm_jax.train import state as state_lib
from realm_jax.train import steps as steps_lib
from tiny_configs import NUM_STEPS, tiny_config  # pylint: disable=g-bad-import-order

ICT_STEPS = 30
EVAL_KEYS = ("loss", "retrieval_utility", "token_accuracy", "span_accuracy", "null_doc_prob",
             "num_queries", "gold_recall_at_3")


def realm_config(corpus_dir, prefetch=False):
  config = tiny_config(corpus_dir)
  # Dropout on, so the per-step dropout keys must also agree across devices and resumes.
  config.model.dropout_rate = 0.1
  # Sequential retrieval is the bit-exact-across-resumes reference; prefetch has its own test.
  config.retrieval.prefetch = prefetch
  return config


def _losses(history):
  return np.array([h["loss"] for h in history])


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
  directory = tmp_path_factory.mktemp("data") / "corpus"
  data = prepare.prepare_data(tiny_config(directory), None)
  assert data.corpus.num_docs >= 40 and len(data.eval_queries["query_tokens"]) >= 8
  return directory


@pytest.fixture(scope="module")
def run_a(corpus_dir, tmp_path_factory):
  """The reference run: REALM on all 8 devices, uninterrupted."""
  workdir = tmp_path_factory.mktemp("run_a")
  result = loop.train_and_evaluate(realm_config(corpus_dir), workdir)
  return workdir, result


@pytest.fixture(scope="module")
def ict_run(corpus_dir, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("ict")
  config = tiny_config(corpus_dir)
  config.objective = "ict"
  config.ict.num_steps = ICT_STEPS
  config.train.checkpoint_every = ICT_STEPS  # keeps checkpoints 0 and ICT_STEPS only
  return workdir, loop.train_and_evaluate(config, workdir)


# ---- REALM: 1 vs 8 devices, resume -------------------------------------------------------


def test_same_numbers_on_one_and_eight_devices(run_a, corpus_dir, tmp_path):
  _, a = run_a
  one = loop.train_and_evaluate(realm_config(corpus_dir), tmp_path / "one",
                                devices=jax.devices()[:1])
  assert [h["step"] for h in one["history"]] == list(range(1, NUM_STEPS + 1))
  assert [h["step"] for h in a["history"]] == list(range(1, NUM_STEPS + 1))
  np.testing.assert_allclose(_losses(one["history"]), _losses(a["history"]), rtol=1e-4)
  # Step 1 starts from identical parameters: its metrics agree to float32 reduction order
  # (sums split over 8 devices vs 1; ~2e-5 relative seen on p(null) through the softmax).
  for name in ("loss", "null_doc_prob", "grad_norm"):
    np.testing.assert_allclose(one["history"][0][name], a["history"][0][name], rtol=1e-4,
                               err_msg=name)
  # Later steps drift a little (Adam divides by tiny second moments, p(z|x) is a softmax over
  # dot products of ~sqrt(128)-norm embeddings), so the retrieval metrics get looser bounds.
  # retrieval_utility is a difference of two ~6.6 log-likelihoods: absolute tolerance.
  for name, rtol, atol in (("retrieval_utility", 0, 2e-4), ("null_doc_prob", 1e-2, 0),
                           ("grad_norm", 1e-2, 0)):
    np.testing.assert_allclose([h[name] for h in one["history"]],
                               [h[name] for h in a["history"]], rtol=rtol, atol=atol,
                               err_msg=name)
  assert one["step"] == a["step"] == NUM_STEPS
  for name in EVAL_KEYS:
    rtol = 1e-2 if name == "null_doc_prob" else 1e-4
    np.testing.assert_allclose(one[name], a[name], rtol=rtol, atol=1e-4, err_msg=name)


def test_resume_continues_exactly(run_a, corpus_dir, tmp_path):
  _, a = run_a
  config = realm_config(corpus_dir)
  workdir = tmp_path / "b"
  # Interrupted before the first refresh (2) and between checkpoints/refreshes (4).
  first = loop.train_and_evaluate(config, workdir, max_steps_this_run=2)
  assert [h["step"] for h in first["history"]] == [1, 2] and first["step"] == 2
  assert "loss" not in first, "no final evaluation before num_steps"
  second = loop.train_and_evaluate(config, workdir, max_steps_this_run=2)
  assert [h["step"] for h in second["history"]] == [3, 4] and second["step"] == 4
  third = loop.train_and_evaluate(config, workdir)
  assert [h["step"] for h in third["history"]] == [5, 6]
  assert third["step"] == NUM_STEPS
  resumed = first["history"] + second["history"] + third["history"]
  np.testing.assert_allclose(_losses(resumed), _losses(a["history"]), rtol=1e-5)
  # The resumed run uses the very index versions the uninterrupted one did.
  assert [h["index_step"] for h in resumed] == [h["index_step"] for h in a["history"]]
  for name in EVAL_KEYS:
    np.testing.assert_allclose(third[name], a[name], rtol=1e-5, atol=1e-6, err_msg=name)
  # Every train step is logged exactly once across the three calls.
  records = metrics_lib.read_metrics(workdir / "metrics" / "metrics.jsonl")
  assert [r["step"] for r in records if r["phase"] == "realm"] == list(range(1, NUM_STEPS + 1))
  assert checkpointing.Checkpointer(workdir / "checkpoints").latest_step() == NUM_STEPS


def test_prefetch_trains_like_sequential_retrieval(run_a, corpus_dir, tmp_path):
  """Batch t+1 retrieved during step t (parameters one update older) trains the same run:
  step 1 is identical, later steps agree to rounding (at this learning rate the candidates do
  not change), and the index bookkeeping is the same."""
  _, a = run_a
  prefetched = loop.train_and_evaluate(realm_config(corpus_dir, prefetch=True), tmp_path)
  assert [h["step"] for h in prefetched["history"]] == list(range(1, NUM_STEPS + 1))
  np.testing.assert_allclose(prefetched["history"][0]["loss"], a["history"][0]["loss"],
                             rtol=1e-6)
  np.testing.assert_allclose(_losses(prefetched["history"]), _losses(a["history"]), rtol=1e-3)
  for name in ("index_step", "staleness"):
    assert [h[name] for h in prefetched["history"]] == [h[name] for h in a["history"]], name
  assert all(h["retrieval_seconds"] >= 0 and h["query_wait_seconds"] >= 0
             for h in prefetched["history"])


def test_workdir_layout(run_a):
  workdir, _ = run_a
  config = json.loads((workdir / "config.json").read_text())
  assert config["objective"] == "realm" and config["train"]["batch_size"] == 8
  assert config["retrieval"]["k"] == 4
  steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  assert steps == [0, 3, 6]  # step 0 (first index), every 3, the last; keep_checkpoints=3
  # The final refresh (with the final parameters) is the newest complete version.
  assert int((workdir / "index" / "LATEST").read_text().strip()) == NUM_STEPS
  assert (workdir / "index" / str(NUM_STEPS) / "MANIFEST.json").exists()
  records = metrics_lib.read_metrics(workdir / "metrics" / "metrics.jsonl")
  train = [r for r in records if r["phase"] == "realm"]
  assert [r["step"] for r in train] == list(range(1, NUM_STEPS + 1))
  assert all(np.isfinite(r["loss"]) for r in train)
  evals = [r for r in records if r["phase"] == "eval"]
  assert evals and evals[-1]["step"] == NUM_STEPS and "span_accuracy" in evals[-1]
  events = list((workdir / "metrics" / "tensorboard").glob("events.out.tfevents.*"))
  assert events and events[0].stat().st_size > 0


def test_metrics_history(run_a):
  _, a = run_a
  refresh_every = 3
  for h in a["history"]:
    for name in ("loss", "retrieval_utility", "span_accuracy", "token_accuracy",
                 "null_doc_prob", "index_step", "staleness", "step_seconds",
                 "examples_per_second", "grad_norm"):
      assert name in h, f"{name} missing at step {h['step']}: {sorted(h)}"
    assert np.isfinite(h["loss"]) and h["loss"] > 0
    assert 0.0 <= h["span_accuracy"] <= 1.0
    assert 0.0 < h["null_doc_prob"] < 1.0
    # The index was built from the parameters after `index_step` updates; the step logged as
    # h["step"] (updates done after it) retrieved with the parameters after h["step"] - 1.
    assert h["index_step"] % refresh_every == 0 and h["index_step"] <= h["step"] - 1
    assert h["staleness"] == h["step"] - 1 - h["index_step"]
    assert 0 <= h["staleness"] < refresh_every
    assert h["step_seconds"] > 0
    np.testing.assert_allclose(h["examples_per_second"], 8 / h["step_seconds"], rtol=1e-6)
  assert [h["index_step"] for h in a["history"]] == [0, 0, 0, 3, 3, 3]
  assert a["compile"].get("flops_per_step", 0) > 0


def test_rerunning_a_finished_run_returns_its_final_eval(run_a, corpus_dir, tmp_path):
  workdir, a = run_a
  copy = tmp_path / "copy"
  shutil.copytree(workdir, copy)
  again = loop.train_and_evaluate(realm_config(corpus_dir), copy)
  assert again["step"] == NUM_STEPS and again["history"] == []
  np.testing.assert_allclose(again["loss"], a["loss"], rtol=1e-5)


# ---- Evaluation ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def evals_by_batch_size(run_a, corpus_dir):
  """evaluate_realm of run A's final parameters with eval batches of 8 (no padding) and 24
  (32 held-out queries -> 16 padding rows)."""
  workdir, _ = run_a
  config = realm_config(corpus_dir)
  data = prepare.prepare_data(config, workdir, build=False)
  assert len(data.eval_queries["query_tokens"]) % 24, "the 24-batch must need padding"
  params, step = checkpointing.restore_params(workdir)
  assert step == NUM_STEPS
  mesh = partitioning.make_mesh([("data", -1)])
  model = state_lib.build_model(config, data.corpus.vocab_size, data.corpus.special.pad)
  params = partitioning.replicate(params, mesh)
  embed_queries, embed_docs = steps_lib.make_embed_fns(model, mesh)
  index = in_process.InProcessIndex(data.corpus, embed_docs, mesh, workdir / "eval_index", 256,
                                    1, write=False)
  index.refresh(params, step)
  retriever = loop.Retriever(True, config.retrieval, data.corpus, index, embed_queries, mesh)
  eval_step = steps_lib.make_realm_eval_step(model, mesh, "token")
  return {size: loop.evaluate_realm(params, data.eval_queries, data.corpus, retriever,
                                    eval_step, mesh, size) for size in (8, 24)}


def test_eval_reproduces_final_metrics(run_a, evals_by_batch_size):
  _, a = run_a
  for name in EVAL_KEYS:
    np.testing.assert_allclose(evals_by_batch_size[8][name], a[name], rtol=1e-5, atol=1e-6,
                               err_msg=name)


def test_eval_padding_does_not_change_token_metrics(evals_by_batch_size):
  small, padded = evals_by_batch_size[8], evals_by_batch_size[24]
  for name in ("loss", "token_accuracy", "span_accuracy", "num_queries", "gold_recall_at_3"):
    np.testing.assert_allclose(padded[name], small[name], rtol=1e-5, atol=1e-6, err_msg=name)
  # A difference of two ~6.6-nat log-likelihoods summed in another order: float32 absolute.
  np.testing.assert_allclose(padded["retrieval_utility"], small["retrieval_utility"], atol=2e-5)


def test_eval_padding_does_not_change_null_doc_prob(evals_by_batch_size):
  np.testing.assert_allclose(evals_by_batch_size[24]["null_doc_prob"],
                             evals_by_batch_size[8]["null_doc_prob"], rtol=1e-5)


# ---- ICT, warm start, no retrieval --------------------------------------------------------


def test_ict_trains_and_reports_gold_recall(ict_run):
  workdir, result = ict_run
  history = result["history"]
  assert [h["step"] for h in history] == list(range(1, ICT_STEPS + 1))
  losses = _losses(history)
  assert np.all(np.isfinite(losses))
  assert losses[:5].mean() > losses[-5:].mean() + 0.1, losses
  assert all("accuracy" in h for h in history)
  assert 0.0 <= result["gold_recall_at_3"] <= 1.0
  assert result["step"] == ICT_STEPS
  # ICT is judged by retrieval and never runs the REALM eval.
  assert "loss" not in result
  assert (workdir / "index" / "LATEST").exists()


def test_ict_keeps_the_encoder_frozen(ict_run):
  workdir, _ = ict_run
  start, _ = checkpointing.restore_params(workdir, step=0)
  end, step = checkpointing.restore_params(workdir)
  assert step == ICT_STEPS
  for a, b in zip(jax.tree_util.tree_leaves(start["encoder"]),
                  jax.tree_util.tree_leaves(end["encoder"])):
    np.testing.assert_array_equal(a, b)
  changed = [not np.array_equal(a, b) for a, b in zip(
      jax.tree_util.tree_leaves(start["embedder"]), jax.tree_util.tree_leaves(end["embedder"]))]
  assert all(changed)


def test_warm_start_copies_the_embedder_only(ict_run, corpus_dir, tmp_path):
  ict_workdir, _ = ict_run
  config = realm_config(corpus_dir)
  config.seed = 1  # a fresh encoder that differs from the ICT run's (frozen) one
  config.train.init_from = str(ict_workdir)
  config.train.init_encoder_from_embedder = False  # the plain warm start (the copy: below)
  workdir = tmp_path / "warm"
  result = loop.train_and_evaluate(config, workdir, max_steps_this_run=1)
  assert np.isfinite(result["history"][0]["loss"])
  ict_params, ict_step = checkpointing.restore_params(ict_workdir)
  assert ict_step == ICT_STEPS
  start, step = checkpointing.restore_params(workdir, step=0)
  assert step == 0
  flat_ict = flax.traverse_util.flatten_dict(ict_params, sep="/")
  flat_start = flax.traverse_util.flatten_dict(start, sep="/")
  embedder_paths = [p for p in flat_start if p.startswith("embedder/")]
  assert embedder_paths
  for path in embedder_paths:
    np.testing.assert_array_equal(flat_start[path], flat_ict[path], err_msg=path)
  # The encoder is not copied: this run's own initialization (seed 1) differs from the ICT
  # run's encoder (seed 0, frozen during ICT).
  encoder_paths = [p for p in flat_start if p.startswith("encoder/")]
  assert encoder_paths
  for path in encoder_paths:
    if path.endswith("kernel") or path.endswith("embedding"):
      assert not np.array_equal(flat_start[path], flat_ict[path]), path


def test_encoder_starts_from_the_warm_started_embedder_bert(ict_run, corpus_dir, tmp_path):
  """train.init_encoder_from_embedder: the reader's BERT at step 0 is the ICT embedder's, leaf
  for leaf (the pooler, which the encoder has not, aside); its MLM head keeps this run's init;
  three steps later the two towers have moved apart (separate parameters, not aliases)."""
  ict_workdir, _ = ict_run
  config = realm_config(corpus_dir)
  config.seed = 1
  config.train.init_from = str(ict_workdir)
  config.train.init_encoder_from_embedder = True
  workdir = tmp_path / "copied"
  loop.train_and_evaluate(config, workdir, max_steps_this_run=3)  # checkpoint_every=3
  ict_params, _ = checkpointing.restore_params(ict_workdir)
  start, _ = checkpointing.restore_params(workdir, step=0)
  flat_ict_bert = flax.traverse_util.flatten_dict(ict_params["embedder"]["bert"], sep="/")
  flat_encoder_bert = flax.traverse_util.flatten_dict(start["encoder"]["bert"], sep="/")
  assert flat_encoder_bert and set(flat_encoder_bert) <= set(flat_ict_bert)
  for path, value in flat_encoder_bert.items():
    np.testing.assert_array_equal(value, flat_ict_bert[path], err_msg=path)
  head = flax.traverse_util.flatten_dict(start["encoder"]["cls"], sep="/")
  ict_head = flax.traverse_util.flatten_dict(ict_params["encoder"]["cls"], sep="/")
  assert any(not np.array_equal(head[p], ict_head[p]) for p in head if p.endswith("kernel"))
  stepped, step = checkpointing.restore_params(workdir)
  assert step == 3
  a = stepped["encoder"]["bert"]["embeddings"]["word_embeddings"]["embedding"]
  b = stepped["embedder"]["bert"]["embeddings"]["word_embeddings"]["embedding"]
  assert not np.array_equal(a, b)


def test_no_retrieval_baseline(corpus_dir, tmp_path):
  config = tiny_config(corpus_dir)
  config.retrieval.enabled = False
  config.train.num_steps = 3
  result = loop.train_and_evaluate(config, tmp_path / "baseline")
  assert [h["step"] for h in result["history"]] == [1, 2, 3]
  assert all(h["null_doc_prob"] == 1.0 for h in result["history"])
  assert all(abs(h["retrieval_utility"]) < 1e-6 for h in result["history"])
  assert all("index_step" not in h and "staleness" not in h for h in result["history"])
  assert result["null_doc_prob"] == 1.0
  assert np.isfinite(result["loss"]) and abs(result["retrieval_utility"]) < 1e-6
  assert "gold_recall_at_3" not in result
  assert not (tmp_path / "baseline" / "index" / "LATEST").exists()
