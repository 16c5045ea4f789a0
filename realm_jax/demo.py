"""The main job of `make demo`: warm starts, REALM pretraining, a no-retrieval baseline.

Three runs share one generated corpus (`<workdir>/corpus`) and the model size of the config:
1. `ict`: the retriever's warm start (Inverse Cloze Task);
2. `realm`: REALM pretraining from it (the reader starts from scratch: on this corpus a reader
   first trained as a plain MLM on the blocks learned to copy from retrieved documents later,
   not sooner, so the demo has no such phase);
3. `baseline`: the same model from the same warm start, trained for the same steps with the
   null document as its only candidate. The table compares masked-span accuracy on held-out entities (whose facts
no training query contains, so only retrieval can supply them) and gold-document recall@k of
the first and the last index.
"""

from __future__ import annotations

import json
import logging
import time

import ml_collections
from etils import epath

from realm_jax.train import loop
from realm_jax.train import metrics as metrics_lib


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
  warm = dict(train__init_from=str(workdir / "ict"))
  return dict(
      ict=ict,
      realm=derive(**warm),
      baseline=derive(retrieval__enabled=False, **warm),
  )


def _index_recalls(run_dir: epath.Path, key: str) -> list[tuple[int, float]]:
  records = metrics_lib.read_metrics(run_dir / "metrics" / "metrics.jsonl")
  return [(r["step"], r[key]) for r in records if r.get("phase") == "index" and key in r]


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
  lines.append(f"gold-document {key} of held-out queries per index version:")
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
    out = loop.train_and_evaluate(configs[name], workdir / name)
    results[name] = {k: v for k, v in out.items() if isinstance(v, (int, float))}
  key = loop.recall_key(config.retrieval.k)
  results["recall_key"] = key
  results["index_recalls"] = _index_recalls(workdir / "realm", key)
  results["seconds"] = time.time() - start
  table = format_table(results)
  print("\n" + table + "\n", flush=True)
  (workdir / "demo_results.json").write_text(json.dumps(results, indent=1))
  (workdir / "demo_table.txt").write_text(table + "\n")
  return results
