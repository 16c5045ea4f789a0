"""The main job of `make demo`: warm starts, REALM pretraining, a no-retrieval baseline.

Three runs share one generated corpus (`<workdir>/corpus`) and the model size of the config:
1. `ict`: the retriever's warm start (Inverse Cloze Task);
2. `realm`: REALM pretraining from it, as two processes sharing `<workdir>/realm`: this one
   trains, and a separate index-builder process (`--mode=index_builder`, log in
   `realm/index_builder.log`) re-embeds each new checkpoint and publishes index versions that
   the trainer hot-swaps (the reader starts from scratch: on this corpus a reader first
   trained as a plain MLM on the blocks learned to copy from retrieved documents later, not
   sooner, so the demo has no such phase);
3. `baseline`: the same model from the same warm start, trained for the same steps with the
   null document as its only candidate. The table compares masked-span accuracy on held-out entities (whose facts
no training query contains, so only retrieval can supply them) and gold-document recall@k of
the first and the last index. `<workdir>/demo_figure.png` (realm_jax/plots.py) plots held-out
span accuracy of both runs over steps (both evaluate every DEMO_EVAL_EVERY steps) and the recall
of every index version.
"""

from __future__ import annotations

import contextlib
import json
import logging
import subprocess
import sys
import time

import ml_collections
from etils import epath

from realm_jax import plots
from realm_jax.retrieval import index_builder
from realm_jax.train import loop
from realm_jax.train import metrics as metrics_lib


# Measured on 2 CPU cores (tiny): one held-out evaluation (1,000 queries, k=4) takes ~10-14 s, so
# four mid-run points cost REALM ~50 s and the baseline (null document only) less.
DEMO_EVAL_EVERY = 200


def phase_configs(config: ml_collections.ConfigDict, workdir: epath.Path
                  ) -> dict[str, ml_collections.ConfigDict]:
  """The three runs' configs, derived from the REALM config."""
  def derive(**overrides) -> ml_collections.ConfigDict:
    derived = config.copy_and_resolve_references()
    derived.data.corpus_dir = str(workdir / "corpus")
    for dotted, value in overrides.items():
      section, field = dotted.split("__")
      derived[section][field] = value
    return derived

  ict = derive()
  ict.objective = "ict"
  # REALM and the baseline evaluate on the held-out queries every DEMO_EVAL_EVERY steps too (the
  # figure's curve) unless the config evaluates periodically already.
  warm = dict(train__init_from=str(workdir / "ict"),
              eval__every=config.eval.every or DEMO_EVAL_EVERY)
  # The builder embeds saved checkpoints: save one every refresh.
  from_builder = dict(retrieval__index_source="builder",
                      train__checkpoint_every=config.retrieval.refresh_every,
                      train__keep_checkpoints=max(config.train.keep_checkpoints, 3))
  return dict(
      ict=ict,
      realm=derive(**warm, **from_builder),
      baseline=derive(retrieval__enabled=False, **warm),
  )


def _index_recalls(run_dir: epath.Path, key: str) -> list[tuple[int, float]]:
  records = metrics_lib.read_metrics(run_dir / "metrics" / "metrics.jsonl")
  return [(r["step"], r[key]) for r in records if r.get("phase") == "index" and key in r]


@contextlib.contextmanager
def index_builder_process(run_dir: epath.Path, done: bool):
  """Runs `--mode=index_builder` on `run_dir` in a child process for the `with` body.

  The child reads the config the trainer saves in `run_dir`; it is stopped on exit, also when
  the trainer fails. Nothing is started for a run that has already finished.
  """
  if done:
    yield None
    return
  run_dir.mkdir(parents=True, exist_ok=True)
  log_path = run_dir / "index_builder.log"
  command = [sys.executable, "-m", "realm_jax.main", "--mode=index_builder",
             f"--workdir={run_dir}"]
  with log_path.open("a") as log:  # a file, not a pipe: a full pipe would block the child
    child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    logging.info("demo: index builder started (pid %d), log %s", child.pid, log_path)
    try:
      yield child
    finally:
      child.terminate()
      try:
        child.wait(timeout=30)
      except subprocess.TimeoutExpired:
        child.kill()
        child.wait()
  if child.returncode not in (0, -15):  # -15: our SIGTERM
    logging.warning("demo: index builder exited with %s; see %s", child.returncode, log_path)


def _run_finished(run_dir: epath.Path, num_steps: int) -> bool:
  steps = index_builder.finished_checkpoint_steps(run_dir / "checkpoints")
  return bool(steps) and steps[-1] >= num_steps


def format_table(results: dict) -> str:
  rows = [
      ("masked-span accuracy (held-out)", results["realm"]["span_accuracy"],
       results["baseline"]["span_accuracy"]),
      ("masked-token accuracy (held-out)", results["realm"]["token_accuracy"],
       results["baseline"]["token_accuracy"]),
      ("masked-token loss (held-out)", results["realm"]["loss"], results["baseline"]["loss"]),
  ]
  lines = [f"{'metric':<36}{'REALM':>10}{'no retrieval':>14}"]
  lines += [f"{name:<36}{a:>10.3f}{b:>14.3f}" for name, a, b in rows]
  ratio = results["realm"]["span_accuracy"] / max(results["baseline"]["span_accuracy"], 1e-9)
  lines.append(f"{'span accuracy ratio REALM / baseline':<36}{ratio:>10.2f}")
  key = results["recall_key"]
  recalls = results["index_recalls"]
  lines.append("")
  lines.append(f"gold-document {key} of held-out queries per index version "
               f"({results['index_swaps']} hot swaps from the index-builder process):")
  lines += [f"  index step {step:>6}: {value:.3f}" for step, value in recalls]
  lines.append(f"ICT warm start alone: {key} = {results['ict'][key]:.3f}")
  lines.append(f"demo wall time: {results['seconds']:.0f}s")
  return "\n".join(lines)


def run_demo(config: ml_collections.ConfigDict, workdir: epath.PathLike) -> dict:
  """Runs the three phases (each resumable) and prints and saves the comparison table."""
  workdir = epath.Path(workdir)
  start = time.time()
  configs = phase_configs(config, workdir)
  results = {}
  for name in ("ict", "realm", "baseline"):
    logging.info("demo: ---- %s ----", name)
    run_dir = workdir / name
    if name == "realm":
      with index_builder_process(run_dir, _run_finished(run_dir, config.train.num_steps)):
        out = loop.train_and_evaluate(configs[name], run_dir)
    else:
      out = loop.train_and_evaluate(configs[name], run_dir)
    results[name] = {k: v for k, v in out.items() if isinstance(v, (int, float))}
  key = loop.recall_key(config.retrieval.k)
  results["recall_key"] = key
  results["index_recalls"] = _index_recalls(workdir / "realm", key)
  # The first version is loaded, every later one swapped in while training.
  results["index_swaps"] = len({step for step, _ in results["index_recalls"]}) - 1
  results["seconds"] = time.time() - start
  table = format_table(results)
  print("\n" + table + "\n", flush=True)
  (workdir / "demo_table.txt").write_text(table + "\n")
  try:  # the runs and the table are done: a figure that cannot be drawn must not lose them
    results["figure"] = str(plots.demo_figure(workdir, recall_key=key))
    print(f"figure: {results['figure']}", flush=True)
  except Exception:  # pylint: disable=broad-except
    logging.exception("demo: the figure could not be written (the table above stands)")
  (workdir / "demo_results.json").write_text(json.dumps(results, indent=1))
  return results
