"""The demo's figure: held-out span accuracy over steps, gold recall per index version, QA EM.

Reads `<workdir>/{realm,baseline}/metrics/metrics.jsonl` as the trainer writes them: one JSON
object a line with at least "step" and "phase". Records are picked by phase and key, so lines of
other phases (train steps, "config", ...) and fields added later are ignored, and a torn or
garbled line (a run killed mid-write) is skipped rather than fatal. The QA panel reads each QA
run's `<workdir>/<run>/qa_results.json` (what `qa.finetune` writes); a missing or unreadable
one leaves that run out.
"""

from __future__ import annotations

import io
import json
import logging
import math
import re
import textwrap

from etils import epath

from realm_jax import storage

FIGURE_NAME = "demo_figure.png"
QA_RESULTS = "qa_results.json"
_QA_BARS = (("exact_match", "exact match", "tab:blue"),
            ("reader_oracle_em", "reader-oracle EM", "tab:orange"))
_RECALL_KEY = re.compile(r"gold_recall_at_\d+$")


def read_records(path: epath.PathLike) -> list[dict]:
  """The parseable records of a metrics.jsonl (none if the file does not exist)."""
  path = epath.Path(path)
  if not path.exists():
    return []
  records, bad = [], 0
  for line in path.read_text().splitlines():
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError:
      bad += 1
      continue
    if isinstance(record, dict):
      records.append(record)
  if bad:
    logging.warning("plots: skipped %d unreadable lines of %s", bad, path)
  return records


def series(records: list[dict], phase: str, key: str) -> list[tuple[int, float]]:
  """(step, value) of the `phase` records that have a finite `key`, one per step (the last
  record of a step wins: a resumed run may have logged it again), sorted by step."""
  by_step: dict[int, float] = {}
  for record in records:
    if record.get("phase") != phase:
      continue
    step, value = record.get("step"), record.get(key)
    if isinstance(step, bool) or not isinstance(step, (int, float)):
      continue
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
      continue
    by_step[int(step)] = float(value)
  return sorted(by_step.items())


def find_recall_key(records: list[dict]) -> str | None:
  """The `gold_recall_at_<k>` key the index records use, if any."""
  for record in records:
    if record.get("phase") == "index":
      for key in record:
        if _RECALL_KEY.match(key):
          return key
  return None


def read_qa_results(workdir: epath.PathLike, runs: dict[str, str]) -> list[tuple[str, dict]]:
  """(label, results) of the QA runs (folder name -> label) whose qa_results.json reads."""
  out = []
  for name, label in runs.items():
    path = epath.Path(workdir) / name / QA_RESULTS
    try:
      results = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError) as e:
      logging.warning("plots: no QA results for %s (%s)", name, e)
      continue
    if isinstance(results, dict):
      out.append((label, results))
  return out


def demo_figure(workdir: epath.PathLike, out_path: epath.PathLike | None = None,
                recall_key: str | None = None,
                qa_runs: dict[str, str] | None = None) -> epath.Path:
  """Writes the demo's three-panel PNG (default `<workdir>/demo_figure.png`); returns its path.

  Left: held-out masked-span accuracy of REALM and the no-retrieval baseline at every
  evaluation ("eval" records). Middle: gold-document recall of held-out queries for every index
  version REALM used ("index" records of the realm run; the step-0 version is the ICT
  retriever alone). Right: exact match and reader-oracle EM of each QA run in `qa_runs`
  (folder name under `workdir` -> label). A panel without data says so instead of failing.
  """
  # The object API with the Agg canvas: no pyplot, no global backend, no display needed.
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top

  workdir = epath.Path(workdir)
  out_path = epath.Path(out_path) if out_path else workdir / FIGURE_NAME
  realm = read_records(workdir / "realm" / "metrics" / "metrics.jsonl")
  baseline = read_records(workdir / "baseline" / "metrics" / "metrics.jsonl")
  recall_key = recall_key or find_recall_key(realm) or "gold_recall_at_3"

  figure = Figure(figsize=(15, 4.6), dpi=100)
  FigureCanvasAgg(figure)
  accuracy_axes, recall_axes, qa_axes = figure.subplots(
      1, 3, gridspec_kw=dict(width_ratios=(1, 1, 0.8)))

  curves = [("REALM", series(realm, "eval", "span_accuracy"), "tab:blue"),
            ("no retrieval", series(baseline, "eval", "span_accuracy"), "tab:gray")]
  for label, points, color in curves:
    if points:
      steps, values = zip(*points)
      accuracy_axes.plot(steps, values, marker="o", color=color,
                         label=f"{label} (final {values[-1]:.3f})")
  _finish(accuracy_axes, any(points for _, points, _ in curves),
          title="held-out masked-span accuracy", xlabel="training step",
          ylabel="span accuracy")

  recalls = series(realm, "index", recall_key)
  if recalls:
    steps, values = zip(*recalls)
    recall_axes.plot(steps, values, marker="s", color="tab:green",
                     label=f"REALM index versions ({len(recalls)})")
    recall_axes.annotate("ICT alone" if steps[0] == 0 else f"step {steps[0]}",
                         (steps[0], values[0]), textcoords="offset points", xytext=(4, -12),
                         fontsize=8)
  _finish(recall_axes, bool(recalls), title=("held-out " + recall_key.replace("gold_recall_at_", "gold-document recall@")
                 + " per index version"),
          xlabel="index version (checkpoint step it embeds)", ylabel="gold-document recall")

  qa_results = read_qa_results(workdir, qa_runs or {})
  _qa_bars(qa_axes, qa_results)

  figure.suptitle(f"REALM demo: {workdir}", fontsize=9)
  figure.tight_layout()
  out_path.parent.mkdir(parents=True, exist_ok=True)
  png = io.BytesIO()
  figure.savefig(png, format="png")
  storage.write_bytes(out_path, png.getvalue())  # a reader never sees a half-written PNG
  logging.info("plots: %d + %d eval points, %d index versions, %d QA runs -> %s",
               len(curves[0][1]), len(curves[1][1]), len(recalls), len(qa_results), out_path)
  return out_path


def _qa_bars(axes, qa_results: list[tuple[str, dict]]):
  """Grouped bars: each QA run's exact match beside its reader-oracle EM (the share of
  questions whose answer is in a block the reader read), with the values written on them."""
  width = 0.38
  for offset, (key, label, color) in enumerate(_QA_BARS):
    positions = [i + (offset - 0.5) * width for i in range(len(qa_results))]
    values = [float(results.get(key, math.nan)) for _, results in qa_results]
    if not qa_results:
      continue
    bars = axes.bar(positions, values, width, color=color, label=label)
    axes.bar_label(bars, fmt="%.3f", fontsize=8, padding=2)
  axes.set_xticks(range(len(qa_results)))
  # Wrapped to the bar group's width: long run names overlapped their neighbours.
  axes.set_xticklabels([textwrap.fill(label, 18) for label, _ in qa_results], fontsize=8)
  examples = {results.get("num_examples") for _, results in qa_results}
  count = f"{examples.pop():.0f} " if len(examples) == 1 and None not in examples else ""
  _finish(axes, bool(qa_results), title=f"Open-QA on {count}held-out questions",
          xlabel="QA fine-tuning from", ylabel="exact match")
  # Room above bars at 1.0 for their labels and a one-row legend (at "best" it covered labels).
  axes.set_ylim(-0.02, 1.3)
  axes.set_yticks([0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
  if qa_results:
    axes.legend(fontsize=8, loc="upper center", ncol=2)


def _finish(axes, has_data: bool, title: str, xlabel: str, ylabel: str):
  axes.set_title(title, fontsize=10)
  axes.set_xlabel(xlabel)
  axes.set_ylabel(ylabel)
  axes.set_ylim(-0.02, 1.02)
  axes.grid(True, alpha=0.3)
  if has_data:
    axes.legend(fontsize=8, loc="best")
  else:
    axes.text(0.5, 0.5, "no records", ha="center", va="center", transform=axes.transAxes)
