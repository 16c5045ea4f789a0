"""The demo's figure (realm_jax/plots.py) on synthetic metrics, the demo's phase configs and
table, and the whole demo (pretraining, index builder, QA phase) on a tiny config."""

import json
import math

import numpy as np
import pytest
from etils import epath
from matplotlib import image as mpl_image

import tiny_configs
from experiments import realm_facts
from realm_jax import demo
from realm_jax.train import metrics as metrics_lib
from realm_jax import plots

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TAB_BLUE = np.array([31, 119, 180]) / 255  # the REALM curve's colour
TAB_ORANGE = np.array([255, 127, 14]) / 255  # the QA panel's reader-oracle bars
QA_LABELS = {"qa_realm": "REALM (retriever + reader)", "qa_baseline": "no retrieval"}


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
  for name, em in (("qa_realm", 0.65), ("qa_baseline", 0.3)):
    (workdir / name).mkdir()
    (workdir / name / "qa_results.json").write_text(json.dumps(
        {"exact_match": em, "reader_oracle_em": 0.9, "num_examples": 1000.0}))


def _read_png(path: epath.Path) -> np.ndarray:
  data = path.read_bytes()
  assert data[:8] == PNG_SIGNATURE
  return mpl_image.imread(str(path))


def test_figure_from_synthetic_metrics(tmp_path):
  workdir = epath.Path(tmp_path)
  _synthetic_workdir(workdir)
  without_qa = _read_png(plots.demo_figure(workdir, out_path=workdir / "no_qa.png"))
  path = plots.demo_figure(workdir, qa_runs=dict(QA_LABELS, qa_missing="never ran"))
  assert path == workdir / plots.FIGURE_NAME
  assert len(path.read_bytes()) > 20_000  # three panels with curves, bars, labels and legends
  pixels = _read_png(path)
  assert pixels.shape[:2] == (460, 1500)
  blue = np.abs(pixels[..., :3] - TAB_BLUE).max(axis=-1) < 0.05
  assert blue.sum() > 200  # the REALM curve is drawn
  # The QA panel (the right third): bars for the two runs that have results, none without.
  orange = np.abs(pixels[..., :3] - TAB_ORANGE).max(axis=-1) < 0.05
  assert orange[:, 1000:].sum() > 500 and orange[:, :1000].sum() == 0
  assert (np.abs(without_qa[..., :3] - TAB_ORANGE).max(axis=-1) < 0.05).sum() == 0
  # REALM's EM bar (0.65) is taller than the baseline's (0.3): blue columns in the QA panel.
  qa_blue = blue[:, 1000:]
  heights = [np.flatnonzero(column).size for column in qa_blue.T if column.any()]
  assert max(heights) > 1.8 * min(heights)
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


def test_qa_runs_start_from_the_demo_runs(tmp_path):
  workdir = epath.Path(tmp_path)
  configs = demo.phase_configs(realm_facts.get_config("size=tiny"), workdir)
  realm, baseline = configs["qa_realm"].qa, configs["qa_baseline"].qa
  # REALM: its retriever, its last index and its reader. Baseline: the ICT retriever and
  # index (what the baseline started from and never trained) and the baseline's reader.
  assert (realm.init_from, realm.init_reader_from) == (str(workdir / "realm"), "")
  assert (baseline.init_from, baseline.init_reader_from) == (str(workdir / "ict"),
                                                            str(workdir / "baseline"))
  assert realm.num_steps == baseline.num_steps > 0 and realm.dataset == "facts"
  bm25 = configs["qa_bm25"].qa  # the lexical baseline: the same baseline reader over BM25
  assert (bm25.retriever, bm25.init_reader_from) == ("bm25", str(workdir / "baseline"))
  assert realm.retriever == baseline.retriever == "dense"
  names = list(demo.qa_runs(workdir))
  assert names == ["qa_realm", "qa_baseline", "qa_bm25"] and set(names) <= set(configs)
  assert len({c.data.corpus_dir for c in configs.values()}) == 1  # one corpus for all runs


def _fake_results(qa_realm: dict) -> dict:
  return {
      "realm": {"span_accuracy": 0.7, "token_accuracy": 0.8, "loss": 1.5},
      "baseline": {"span_accuracy": 0.05, "token_accuracy": 0.1, "loss": 3.8},
      "ict": {"gold_recall_at_3": 0.7}, "recall_key": "gold_recall_at_3",
      "index_recalls": [(0, 0.7), (100, 0.8)], "index_swaps": 1, "seconds": 500.0,
      "qa_order": ["qa_realm", "qa_baseline", "qa_bm25"],  # qa_bm25 did not run: no row
      "qa_labels": {"qa_realm": "REALM QA", "qa_baseline": "baseline QA", "qa_bm25": "BM25"},
      "qa_realm": qa_realm,
      "qa_baseline": {"exact_match": 0.25, "reader_oracle_em": 0.7, "recall@1": 0.5,
                      "recall@5": 0.75, "recall@20": 0.9, "gold_recall@1": 0.25,
                      "gold_recall@5": 0.5, "gold_recall@20": 0.6, "num_examples": 1000,
                      "step": 200},
      "phase_seconds": {"ict": 70.0, "qa_realm": 61.4},
  }


def test_table_lists_every_qa_run_and_phase_time():
  table = demo.format_table(_fake_results(
      {"exact_match": 0.6, "reader_oracle_em": 0.9, "recall@1": 0.85, "num_examples": 1000,
       "step": 200}))
  lines = table.splitlines()
  assert any("1000 questions" in line and "200 fine-tuning steps" in line for line in lines)
  header = next(line for line in lines if line.startswith("QA run"))
  assert header.split()[2:] == ["EM", "oracle", "EM", "recall@1", "recall@5", "gold@1",
                                "gold@5"]
  realm_row = next(line for line in lines if line.startswith("REALM QA"))
  # no recall@5 nor gold recall: dashes
  assert realm_row.split()[2:] == ["0.600", "0.900", "0.850", "-", "-", "-"]
  baseline_row = next(line for line in lines if line.startswith("baseline QA"))
  assert baseline_row.split()[2:] == ["0.250", "0.700", "0.500", "0.750", "0.250", "0.500"]
  assert not any(line.startswith("BM25") for line in lines)
  assert "ict 70s" in lines[-1] and "qa_realm 61s" in lines[-1]


@pytest.mark.parametrize("realm_span,warned", [(0.7, False), (0.099, True), (0.04, True)])
def test_table_warns_when_realm_does_not_beat_the_baseline(realm_span, warned):
  """Baseline 0.05: REALM at 0.7 (14x) is a working reader, 0.099 (< 2x) and 0.04 are not."""
  results = _fake_results({"exact_match": 0.6, "num_examples": 1000, "step": 200})
  results["realm"]["span_accuracy"] = realm_span
  warnings = [line for line in demo.format_table(results).splitlines()
              if line.startswith("WARNING")]
  assert len(warnings) == int(warned)
  if warned:
    ratio = realm_span / 0.05
    assert f"{ratio:.2f}x" in warnings[0] and "did not learn" in warnings[0]


def test_table_warns_when_the_retriever_collapsed_between_versions():
  """The 2026-12-03 demo's recalls: 0.829 at step 200, 0.179 at 300, recovered by 500."""
  results = _fake_results({"exact_match": 0.6, "num_examples": 1000, "step": 200})
  results["index_recalls"] = [(0, 0.713), (100, 0.779), (200, 0.829), (300, 0.179),
                              (400, 0.386), (500, 0.864)]
  warnings = [line for line in demo.format_table(results).splitlines()
              if line.startswith("WARNING")]
  assert len(warnings) == 1
  assert "0.829 (index step 200) to 0.179 (index step 300)" in warnings[0]
  assert "1 more drop" in warnings[0]  # 0.386 at step 400 is still below half of 0.829
  results["index_recalls"] = [(0, 0.713), (100, 0.60), (200, 0.829), (300, 0.42)]
  assert not any(line.startswith("WARNING") for line in
                 demo.format_table(results).splitlines())  # 0.42 > 0.829 / 2: no collapse


def test_recall_drops_need_a_real_best_first():
  assert metrics_lib.recall_drops([(0, 0.1), (1, 0.01)]) == []  # best 0.1 < the 0.2 floor
  assert metrics_lib.recall_drops([(0, 0.3), (1, 0.1), (2, 0.16)]) == [(0, 0.3, 1, 0.1)]


def test_whole_demo_with_qa_phase_on_a_tiny_config(tmp_path):
  """The demo end to end at test size: ICT, REALM with the index-builder child process,
  the baseline, both QA fine-tunes, the table, the results JSON and the figure."""
  workdir = epath.Path(tmp_path) / "demo"
  config = tiny_configs.tiny_config()
  config.model.num_layers = 1
  config.qa.batch_size = 8
  config.qa.eval_batch_size = 16
  config.qa.num_steps = 3
  config.qa.warmup_steps = 1
  config.qa.checkpoint_every = 3
  config.qa.span_hidden_size = 16
  config.qa.eval_retrieve_k = 20
  results = demo.run_demo(config, workdir)

  # The trainer's first index came from the builder child (how many more it swaps in during
  # 6 steps depends on timing).
  assert results["index_recalls"] and results["index_swaps"] >= 0
  for name in ("qa_realm", "qa_baseline", "qa_bm25"):
    qa = results[name]
    assert qa["step"] == 3 and qa["num_examples"] == 32  # 8 held-out people x 4 facts
    assert 0.0 <= qa["exact_match"] <= qa["reader_oracle_em"] <= 1.0
    assert 0.0 <= qa["recall@1"] <= qa["recall@5"] <= 1.0
    if name != "qa_bm25":  # the profile states every fact: finding it finds an answer
      assert qa["gold_recall@1"] <= qa["recall@1"] and qa["gold_recall@5"] <= qa["recall@5"]
  used = {name: json.loads((workdir / name / "qa_results.json").read_text())
          for name in ("qa_realm", "qa_baseline")}
  assert used["qa_realm"]["index"]["root"] == str(workdir / "realm" / "index")
  assert used["qa_baseline"]["index"]["root"] == str(workdir / "ict" / "index")
  assert used["qa_baseline"]["init_reader_from"] == str(workdir / "baseline")
  bm25 = json.loads((workdir / "qa_bm25" / "qa_results.json").read_text())
  assert bm25["retriever"] == "bm25" and bm25["init_reader_from"] == str(workdir / "baseline")
  assert list(results["phase_seconds"]) == ["corpus", "ict", "realm", "baseline", "qa_realm",
                                            "qa_baseline", "qa_bm25"]
  assert all(seconds > 0 for seconds in results["phase_seconds"].values())
  assert sum(results["phase_seconds"].values()) <= results["seconds"]
  assert list(results["phase_cpu_seconds"]) == list(results["phase_seconds"])
  assert results["phase_cpu_seconds"]["realm"] > 0
  saved = json.loads((workdir / "demo_results.json").read_text())
  assert saved["qa_realm"]["exact_match"] == results["qa_realm"]["exact_match"]
  table = (workdir / "demo_table.txt").read_text()
  for label in results["qa_labels"].values():
    assert label in table
  assert _read_png(epath.Path(results["figure"])).shape[:2] == (460, 1500)
