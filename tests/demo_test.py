"""The demo's figure (realm_jax/plots.py) on synthetic metrics, and the demo's phase configs."""

import json
import math

import numpy as np
import pytest
from etils import epath
from matplotlib import image as mpl_image

from experiments import realm_facts
from realm_jax import demo
from realm_jax import plots

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TAB_BLUE = np.array([31, 119, 180]) / 255  # the REALM curve's colour


def _write_jsonl(path: epath.Path, records, torn_tail: str = ""):
  path.parent.mkdir(parents=True, exist_ok=True)
  lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
  path.write_text("\n".join(lines) + "\n" + torn_tail)


def _synthetic_workdir(workdir: epath.Path):
  realm = [{"step": 0, "phase": "config", "config": {"objective": "realm"}},
           {"step": 0, "phase": "index", "gold_recall_at_3": 0.70, "refresh_seconds": 2.0}]
  for step in range(1, 1001):
    realm.append({"step": step, "phase": "realm", "loss": 3.0, "learning_rate": 1e-3,
                  "wall_time": 1.7e9 + step})
    if step % 100 == 0:
      realm.append({"step": step, "phase": "index", "gold_recall_at_3": 0.6 + step / 3000})
    if step % 200 == 0:
      realm.append({"step": step, "phase": "eval", "span_accuracy": min(step / 1500, 0.65),
                    "loss": 2.4})
  realm.append("not json at all")
  baseline = [{"step": s, "phase": "eval", "span_accuracy": 0.03} for s in (200, 400, 600, 800)]
  baseline.append({"step": 1000, "phase": "eval", "span_accuracy": 0.033})
  _write_jsonl(workdir / "realm" / "metrics" / "metrics.jsonl", realm,
               torn_tail='{"step": 1000, "phase": "ev')  # a run killed mid-write
  _write_jsonl(workdir / "baseline" / "metrics" / "metrics.jsonl", baseline)


def _read_png(path: epath.Path) -> np.ndarray:
  data = path.read_bytes()
  assert data[:8] == PNG_SIGNATURE
  return mpl_image.imread(str(path))


def test_figure_from_synthetic_metrics(tmp_path):
  workdir = epath.Path(tmp_path)
  _synthetic_workdir(workdir)
  path = plots.demo_figure(workdir)
  assert path == workdir / plots.FIGURE_NAME
  assert len(path.read_bytes()) > 20_000  # two panels with curves, labels and legends
  pixels = _read_png(path)
  assert pixels.shape[:2] == (420, 1100)
  blue = np.abs(pixels[..., :3] - TAB_BLUE).max(axis=-1) < 0.05
  assert blue.sum() > 200  # the REALM curve is drawn
  assert not list(workdir.glob("*.tmp"))


def test_figure_without_records_still_written(tmp_path):
  path = plots.demo_figure(tmp_path, out_path=epath.Path(tmp_path) / "sub" / "f.png")
  pixels = _read_png(path)
  blue = np.abs(pixels[..., :3] - TAB_BLUE).max(axis=-1) < 0.05
  assert blue.sum() == 0  # no curve drawn from nothing


def test_series_reads_defensively(tmp_path):
  path = epath.Path(tmp_path) / "metrics.jsonl"
  _write_jsonl(path, [
      {"step": 200, "phase": "eval", "span_accuracy": 0.1},
      {"step": 100, "phase": "eval", "span_accuracy": 0.05},
      {"step": 200, "phase": "eval", "span_accuracy": 0.2},  # logged again after a resume
      {"step": 300, "phase": "eval", "span_accuracy": float("nan")},
      {"step": 300, "phase": "eval", "loss": 1.0},  # no span_accuracy
      {"step": 400, "phase": "realm", "span_accuracy": 0.9},  # a train step, not an eval
      {"phase": "eval", "span_accuracy": 0.5},  # no step
      ["a", "list"],
  ], torn_tail='{"step": 5')
  records = plots.read_records(path)
  assert plots.series(records, "eval", "span_accuracy") == [(100, 0.05), (200, 0.2)]
  assert plots.read_records(epath.Path(tmp_path) / "missing.jsonl") == []
  assert plots.find_recall_key([{"phase": "index", "gold_recall_at_7": 0.5}]) == "gold_recall_at_7"
  assert plots.find_recall_key([{"phase": "eval", "gold_recall_at_7": 0.5}]) is None


@pytest.mark.parametrize("every", [0, 50])
def test_demo_runs_evaluate_periodically(tmp_path, every):
  config = realm_facts.get_config("size=tiny")
  config.eval.every = every
  configs = demo.phase_configs(config, epath.Path(tmp_path))
  expected = every or demo.DEMO_EVAL_EVERY
  assert configs["realm"].eval.every == expected
  assert configs["baseline"].eval.every == expected
  assert not configs["baseline"].retrieval.enabled
  assert configs["realm"].train.init_from == configs["baseline"].train.init_from
  assert configs["ict"].objective == "ict"
  assert math.isclose(config.eval.every, every)  # the caller's config is left alone
