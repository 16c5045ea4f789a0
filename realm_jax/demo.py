"""The main job of `make demo`: warm starts, REALM pretraining, a no-retrieval baseline, Open-QA.

Three pretraining runs share one generated corpus (`<workdir>/corpus`) and the model size of
the config:
1. `ict`: the retriever's warm start (Inverse Cloze Task);
2. `realm`: REALM pretraining from it, as two processes sharing `<workdir>/realm`: this one
   trains, and a separate index-builder process (`--mode=index_builder`, log in
   `realm/index_builder.log`) re-embeds each new checkpoint and publishes index versions that
   the trainer hot-swaps. The reader starts as a copy of the ICT embedder's BERT
   (`train.init_encoder_from_embedder`): a random reader often never learned to copy from the
   retrieved profiles (a reader first trained as a plain MLM on the blocks learned it later,
   not sooner, so the demo has no such phase);
3. `baseline`: the same model from the same warm start (the same reader init), trained for
   the same steps with the null document as its only candidate.
Then the QA phase (`QA_RUNS`): Open-QA fine-tuning (`qa.finetune.finetune_qa`, the config's
`qa` section) on questions generated from the training people's facts, evaluated by exact match
on questions about the held-out people, once from each pretraining run: `qa_realm` (REALM's
retriever, its last index and its reader) and `qa_baseline` (the ICT retriever and index, the
baseline's reader).

The table compares masked-span accuracy on held-out entities (whose facts no training query
contains, so only retrieval can supply them), gold-document recall@k of every index version, the
QA runs' exact match, reader-oracle EM and recall@k, and every phase's wall time.
`<workdir>/demo_figure.png` (realm_jax/plots.py) plots held-out span accuracy of both runs over
steps (both evaluate every DEMO_EVAL_EVERY steps), the recall of every index version and the
QA exact match of every QA run.
"""

from __future__ import annotations

import contextlib
import json
import logging
import resource
import subprocess
import sys
import time

import ml_collections
from etils import epath

from realm_jax import plots
from realm_jax.data import prepare
from realm_jax.qa import finetune
from realm_jax.retrieval import index_builder
from realm_jax.train import loop
from realm_jax.train import metrics as metrics_lib


# Measured on 2 CPU cores (tiny): one held-out evaluation (1,000 queries, k=4) takes ~10-14 s, so
# four mid-run points cost REALM ~50 s and the baseline (null document only) less.
DEMO_EVAL_EVERY = 200

PRETRAINING_PHASES = ("ict", "realm", "baseline")

# Held-out span accuracy REALM / baseline below which the table says REALM's reader did not
# learn to use its documents: held-out facts are only in retrieved profiles, so a reader that
# copies from them is many times the baseline (0.357 vs 0.031 in a good run), one that does not
# is near 1 (0.040 vs 0.033; README, "What it says, honestly").
MIN_REALM_GAIN = 2.0


def qa_runs(workdir: epath.Path) -> dict[str, tuple[str, dict]]:
  """The QA phase's fine-tunes: run name (its folder under `workdir`) -> (label, qa.* overrides).

  Each starts from a pretraining run of the demo: the query tower and the frozen index from
  `qa.init_from` (REALM: its last published index; ICT: the index it publishes at its end),
  the reader from `qa.init_from`'s encoder or `qa.init_reader_from`'s. The table, the results
  JSON and the figure list every entry, in this order.
  """
  return {
      "qa_realm": ("REALM (retriever + reader)",
                   dict(init_from=str(workdir / "realm"), init_reader_from="")),
      "qa_baseline": ("no retrieval (ICT retriever, baseline reader)",
                      dict(init_from=str(workdir / "ict"),
                           init_reader_from=str(workdir / "baseline"))),
      # The lexical baseline (issue 12): the same baseline reader over BM25's top blocks (no
      # query tower, no index; `init_from` only names the corpus's run).
      "qa_bm25": ("BM25 + baseline reader",
                  dict(retriever="bm25", init_from=str(workdir / "ict"),
                       init_reader_from=str(workdir / "baseline"))),
  }


def phase_configs(config: ml_collections.ConfigDict, workdir: epath.Path
                  ) -> dict[str, ml_collections.ConfigDict]:
  """Every run's config (pretraining phases and QA runs), derived from the REALM config."""
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
  # builder_sync_lag: each version from half a refresh after its checkpoint, waited for if
  # late, so the demo's REALM phase is the same run to run (swaps at the builder's pace made
  # held-out span accuracy vary 0.25-0.66 between runs).
  from_builder = dict(retrieval__index_source="builder",
                      retrieval__builder_sync_lag=(config.retrieval.get("builder_sync_lag")
                                                   or config.retrieval.refresh_every // 2),
                      train__checkpoint_every=config.retrieval.refresh_every,
                      train__keep_checkpoints=max(config.train.keep_checkpoints, 3))
  configs = dict(
      ict=ict,
      realm=derive(**warm, **from_builder),
      baseline=derive(retrieval__enabled=False, **warm),
  )
  for name, (_, overrides) in qa_runs(workdir).items():
    configs[name] = derive(**{f"qa__{field}": value for field, value in overrides.items()})
  return configs


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


def _qa_columns(results: dict) -> list[str]:
  """The QA metrics the table shows, in order: EM, reader-oracle EM, recall@1/5 (an answer
  string in the top k) and gold_recall@1/5 (the person's profile in the top k), as present."""
  keys = {k for name in qa_names(results) for k in results[name]}
  ranked = lambda prefix: sorted((k for k in keys if k.startswith(prefix)),
                                 key=lambda k: int(k[len(prefix):]))[:2]
  return ["exact_match", "reader_oracle_em"] + ranked("recall@") + ranked("gold_recall@")


def qa_names(results: dict) -> list[str]:
  """The QA runs present in `results`, in `qa_runs` order."""
  return [name for name in results.get("qa_order", []) if name in results]


def format_qa_table(results: dict) -> list[str]:
  """One line per QA run: EM, reader-oracle EM and recall@1/5 on the held-out questions."""
  names = qa_names(results)
  if not names:
    return []
  columns = _qa_columns(results)
  headers = {"exact_match": "EM", "reader_oracle_em": "oracle EM", "gold_recall@1": "gold@1",
             "gold_recall@5": "gold@5"}
  first = results[names[0]]
  lines = ["", f"Open-QA exact match on {first.get('num_examples', 0):.0f} questions about the "
           f"held-out people ({first.get('step', 0):.0f} fine-tuning steps from each run):",
           f"{'QA run':<48}" + "".join(f"{headers.get(c, c):>11}" for c in columns)]
  for name in names:
    row = results[name]
    cells = "".join(f"{row[c]:>11.3f}" if c in row else f"{'-':>11}" for c in columns)
    lines.append(f"{results['qa_labels'][name]:<48}{cells}")
  return lines


def realm_gain(results: dict) -> float:
  """Held-out span accuracy of REALM over the no-retrieval baseline's."""
  return results["realm"]["span_accuracy"] / max(results["baseline"]["span_accuracy"], 1e-9)


def no_gain_warning(ratio: float) -> str:
  return (f"WARNING: REALM's reader did not learn to use the retrieved documents (span accuracy "
          f"only {ratio:.2f}x the no-retrieval baseline's, expected >= {MIN_REALM_GAIN:g}x); "
          "this run's REALM numbers say nothing about retrieval (README: 'What it says, "
          "honestly').")


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
  ratio = realm_gain(results)
  lines.append(f"{'span accuracy ratio REALM / baseline':<36}{ratio:>10.2f}")
  if ratio < MIN_REALM_GAIN:
    lines.append(no_gain_warning(ratio))
  key = results["recall_key"]
  recalls = results["index_recalls"]
  lines.append("")
  lines.append(f"gold-document {key} of held-out queries per index version "
               f"({results['index_swaps']} hot swaps from the index-builder process):")
  lines += [f"  index step {step:>6}: {value:.3f}" for step, value in recalls]
  drops = metrics_lib.recall_drops(recalls)
  if drops:
    lines.append(metrics_lib.recall_drop_warning(drops, key))
  lines.append(f"ICT warm start alone: {key} = {results['ict'][key]:.3f}")
  lines += format_qa_table(results)
  lines.append("")
  phases = ", ".join(f"{name} {seconds:.0f}s" for name, seconds in
                     results.get("phase_seconds", {}).items())
  lines.append(f"demo wall time: {results['seconds']:.0f}s ({phases})")
  if results.get("phase_cpu_seconds"):
    lines.append("CPU time (user + system, builder included): " + ", ".join(
        f"{name} {seconds:.0f}s" for name, seconds in results["phase_cpu_seconds"].items()))
  return "\n".join(lines)


def cpu_seconds() -> float:
  """CPU time (user + system) of this process and of its finished children (the index
  builder, once stopped): on a shared machine it varies much less with the load than wall
  time does, so it says what a phase costs the cores."""
  own, children = (resource.getrusage(who) for who in (resource.RUSAGE_SELF,
                                                      resource.RUSAGE_CHILDREN))
  return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


@contextlib.contextmanager
def timed_phase(name: str, phase_seconds: dict[str, float], phase_cpu: dict[str, float]):
  """Logs the `with` body's wall time and CPU time as phase `name` and records them (the
  lead times the demo on an idle machine; these say where the minutes went)."""
  logging.info("demo: ---- %s ----", name)
  start, cpu_start = time.time(), cpu_seconds()
  try:
    yield
  finally:
    phase_seconds[name] = time.time() - start
    phase_cpu[name] = cpu_seconds() - cpu_start
    logging.info("demo: phase %s took %.1fs wall, %.1fs CPU", name, phase_seconds[name],
                 phase_cpu[name])


def _numbers(out: dict) -> dict:
  return {k: v for k, v in out.items() if isinstance(v, (int, float))}


def run_demo(config: ml_collections.ConfigDict, workdir: epath.PathLike) -> dict:
  """Runs every phase (each resumable) and prints and saves the comparison table."""
  workdir = epath.Path(workdir)
  start = time.time()
  configs = phase_configs(config, workdir)
  results: dict = {}
  phase_seconds: dict[str, float] = {}
  phase_cpu: dict[str, float] = {}
  timed = lambda name: timed_phase(name, phase_seconds, phase_cpu)
  with timed("corpus"):  # generated corpus and vocabulary, shared by all
    prepare.prepare_data(configs["ict"], workdir)
  for name in PRETRAINING_PHASES:
    run_dir = workdir / name
    with timed(name):
      if name == "realm":
        with index_builder_process(run_dir, _run_finished(run_dir, config.train.num_steps)):
          out = loop.train_and_evaluate(configs[name], run_dir)
      else:
        out = loop.train_and_evaluate(configs[name], run_dir)
    results[name] = _numbers(out)
  runs = qa_runs(workdir)
  results["qa_order"] = list(runs)
  results["qa_labels"] = {name: label for name, (label, _) in runs.items()}
  for name in runs:
    with timed(name):
      results[name] = _numbers(finetune.finetune_qa(configs[name], workdir / name))
  results["phase_seconds"] = phase_seconds
  results["phase_cpu_seconds"] = phase_cpu
  key = loop.recall_key(config.retrieval.k)
  results["recall_key"] = key
  results["index_recalls"] = _index_recalls(workdir / "realm", key)
  # The first version is loaded, every later one swapped in while training.
  results["index_swaps"] = len({step for step, _ in results["index_recalls"]}) - 1
  results["seconds"] = time.time() - start
  table = format_table(results)
  if realm_gain(results) < MIN_REALM_GAIN:
    logging.warning("demo: %s", no_gain_warning(realm_gain(results)))
  print("\n" + table + "\n", flush=True)
  (workdir / "demo_table.txt").write_text(table + "\n")
  try:  # the runs and the table are done: a figure that cannot be drawn must not lose them
    results["figure"] = str(plots.demo_figure(workdir, recall_key=key,
                                              qa_runs=results["qa_labels"]))
    print(f"figure: {results['figure']}", flush=True)
  except Exception:  # pylint: disable=broad-except
    logging.exception("demo: the figure could not be written (the table above stands)")
  (workdir / "demo_results.json").write_text(json.dumps(results, indent=1))
  return results
