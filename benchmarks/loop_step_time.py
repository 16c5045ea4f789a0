r"""Step time of the real training loop, A/B: one loop option off and on, runs interleaved.

  .venv/bin/python benchmarks/loop_step_time.py --config=experiments/realm_facts.py:size=tiny \
      --option=train.metrics_lag --steps=40 --pairs=3 --output=/tmp/loop_ab.json

`benchmarks/train_step.py` times the jitted step alone, on a batch already on the device; this
times `train_and_evaluate` itself: batch preparation, retrieval (prefetched or not), the
host-to-device copy, the step, fetching its metrics, writing records. The difference between
the two is the loop's own cost per step, which is what loop options change.

Each pair runs the loop twice on the same corpus (built once), with `--option` False then True
(the order alternates between pairs, so a drift of the machine hits both arms alike), each in a
fresh workdir with checkpoints, index refreshes and evaluations pushed past the end. Reported
per arm: the median `step_seconds` of each run (metrics.jsonl's, steps after `--skip` dropped as
warm-up), the median over runs, the median host search (`retrieval_seconds`) and wait for the
query embedding (`query_wait_seconds`: the devices finishing what was queued before it); and
the relative change.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile

from absl import app
from absl import flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from machine import cpu_model, git_state  # pylint: disable=g-import-not-at-top,wrong-import-position

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=False)
_OPTION = flags.DEFINE_string("option", "train.metrics_lag", "A boolean config field: the A/B.")
_STEPS = flags.DEFINE_integer("steps", 40, "Loop steps per run.")
_SKIP = flags.DEFINE_integer("skip", 3, "First steps of each run left out (warm-up).")
_PAIRS = flags.DEFINE_integer("pairs", 3, "Off/on pairs of runs.")
_ROOT = flags.DEFINE_string("workdir_root", "", "Where the runs go (default: a temp folder).")
_OUTPUT = flags.DEFINE_string("output", "", "Write the result as JSON here too.")


def _run(config, option: str, value: bool, workdir: str) -> dict:
  from realm_jax.train import loop  # pylint: disable=g-import-not-at-top
  config = config.copy_and_resolve_references()
  section, field = option.split(".")
  config[section][field] = value
  final = loop.train_and_evaluate(config, workdir)
  history = final["history"][_SKIP.value:]
  seconds = [h["step_seconds"] for h in history]
  return dict(value=value, median_step_seconds=statistics.median(seconds),
              median_retrieval_seconds=statistics.median(
                  h.get("retrieval_seconds", 0.0) for h in history),
              median_query_wait_seconds=statistics.median(
                  h.get("query_wait_seconds", 0.0) for h in history),
              steps=len(seconds))


def main(argv):
  del argv
  logging.getLogger().setLevel(logging.WARNING)
  import jax  # pylint: disable=g-import-not-at-top
  config = _CONFIG.value
  steps = _STEPS.value
  if steps <= _SKIP.value + 2:
    raise app.UsageError(f"--steps={steps} leaves too few timed steps after --skip")
  config.train.num_steps = steps
  config.train.checkpoint_every = steps  # the last step only
  config.retrieval.refresh_every = max(config.retrieval.refresh_every, steps)
  config.eval.every = 0
  root = _ROOT.value or tempfile.mkdtemp(prefix="loop_ab_")
  # The corpus once (the first run builds it into its workdir; every run then reads it).
  corpus_run = os.path.join(root, "corpus_run")
  first = config.copy_and_resolve_references()
  first.train.num_steps = 1
  first.train.checkpoint_every = 1
  from realm_jax.train import loop  # pylint: disable=g-import-not-at-top
  loop.train_and_evaluate(first, corpus_run)
  config.data.corpus_dir = os.path.join(corpus_run, "corpus")

  runs = []
  for pair in range(_PAIRS.value):
    order = (False, True) if pair % 2 == 0 else (True, False)
    for value in order:
      workdir = os.path.join(root, f"pair{pair}_{value}")
      result = _run(config, _OPTION.value, value, workdir)
      shutil.rmtree(workdir, ignore_errors=True)
      print(f"pair {pair} {_OPTION.value}={value}: median step "
            f"{result['median_step_seconds'] * 1e3:.1f} ms, retrieval "
            f"{result['median_retrieval_seconds'] * 1e3:.1f} ms, waiting for the query "
            f"embedding {result['median_query_wait_seconds'] * 1e3:.1f} ms", flush=True)
      runs.append(result)

  arms = {}
  for value in (False, True):
    medians = [r["median_step_seconds"] for r in runs if r["value"] == value]
    arms[str(value)] = dict(
        run_medians_ms=[round(m * 1e3, 2) for m in medians],
        median_ms=round(statistics.median(medians) * 1e3, 2),
        search_ms=[round(r["median_retrieval_seconds"] * 1e3, 2) for r in runs
                   if r["value"] == value],
        query_wait_ms=[round(r["median_query_wait_seconds"] * 1e3, 2) for r in runs
                       if r["value"] == value])
  change = arms["True"]["median_ms"] / arms["False"]["median_ms"] - 1.0
  result = dict(
      benchmark="loop_step_time", option=_OPTION.value, arms=arms,
      relative_change=round(change, 4), steps=steps, skip=_SKIP.value, pairs=_PAIRS.value,
      config=dict(model=config.model.hidden_size, layers=config.model.num_layers,
                  batch_size=config.train.batch_size, k=config.retrieval.k,
                  prefetch=config.retrieval.prefetch, searcher=config.retrieval.searcher),
      devices=f"{jax.device_count()} x {jax.devices()[0].device_kind}", cpu=cpu_model(),
      git=git_state(), date=datetime.date.today().isoformat())
  print(json.dumps(result, indent=1))
  if _OUTPUT.value:
    with open(_OUTPUT.value, "w") as f:
      json.dump(result, f, indent=1)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
