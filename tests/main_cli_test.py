"""The command line: print_config, override warnings, --force, and how a run ends on an error.

Each test runs `python -m realm_jax.main` (or a two-line wrapper of its `main`) in a subprocess,
exactly as a user would; none trains.
"""

import os
import pathlib
import subprocess
import sys

import pytest

from realm_jax import main as main_lib

ROOT = pathlib.Path(__file__).parent.parent
TINY = "--config=experiments/realm_facts.py:size=tiny"


def _env():
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["JAX_PLATFORMS"] = "cpu"
  return env


def _cli(*args, timeout=180):
  return subprocess.run([sys.executable, "-m", "realm_jax.main", *args], cwd=ROOT, env=_env(),
                        capture_output=True, text=True, timeout=timeout)


# `main` with `_run_mode` (or a library entry point) replaced: how main ends, without the work.
_WRAPPER = """
import sys
from absl import app
import realm_jax.main as m
{patch}
app.run(m.main, argv=sys.argv)
"""


def _wrapped(patch: str, *args, timeout=180):
  return subprocess.run([sys.executable, "-c", _WRAPPER.format(patch=patch), *args], cwd=ROOT,
                        env=_env(), capture_output=True, text=True, timeout=timeout)


def _last_line(result) -> str:
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  return lines[-1] if lines else ""


def test_print_config_shows_resolved_fields_with_help():
  result = _cli("--mode=print_config", TINY, "--config.train.batch_size=8")
  assert result.returncode == 0, result.stderr[-2000:]
  lines = result.stdout.splitlines()
  batch = [line for line in lines if line.startswith("train.batch_size = ")]
  assert batch == [batch[0]] and batch[0].startswith("train.batch_size = 8  # "), batch
  assert "global" in batch[0]  # its help text
  assert any(line.startswith("train.learning_rate = 0.001  # ") and "in (0, 1]" in line
             for line in lines), "the accepted range is shown"
  assert all(" = " in line for line in lines)


def test_print_config_of_a_bad_value_names_it():
  result = _cli("--mode=print_config", TINY, "--config.train.keep_checkpoints=0")
  assert result.returncode != 0
  assert "train.keep_checkpoints = 0" in result.stdout
  assert _last_line(result).startswith("config error: train.keep_checkpoints=0 must be")


def test_override_ict_ignores_is_one_warning_line():
  result = _cli("--mode=print_config", "--config=experiments/realm_facts.py:size=tiny",
                "--config.objective=ict", "--config.train.num_steps=50",
                "--config.ict.num_steps=7")
  assert result.returncode == 0, result.stderr[-2000:]
  warned = [line for line in result.stderr.splitlines() if "has no effect" in line]
  assert len(warned) == 1, result.stderr
  assert "--config.train.num_steps has no effect: ICT reads ict.num_steps" in warned[0]


def test_config_error_exits_nonzero_naming_the_field(tmp_path):
  workdir = tmp_path / "run"
  result = _cli("--mode=train", TINY, "--config.train.learning_rate=nan", f"--workdir={workdir}")
  assert result.returncode != 0
  last = _last_line(result)
  assert last.startswith("config error: train.learning_rate=nan must be"), result.stderr[-2000:]
  assert "Traceback" not in result.stderr
  assert not workdir.exists()


def test_bad_workdir_ends_with_one_error_line(tmp_path):
  workdir = tmp_path / "a_file"
  workdir.write_text("not a folder")
  result = _cli("--mode=train", TINY, f"--workdir={workdir}")
  assert result.returncode == 1, result.stderr[-2000:]
  last = _last_line(result)
  assert last.startswith("error: ") and str(workdir) in last, result.stderr[-3000:]
  assert "Traceback" in result.stderr, "the full traceback comes first"
  assert result.stderr.index("Traceback") < result.stderr.rindex(last)
  assert workdir.read_text() == "not a folder"


def test_error_line_names_the_root_cause():
  patch = """
def boom(*args):
  try:
    raise OSError(28, "No space left on device")
  except OSError as e:
    raise RuntimeError("checkpoint 250 failed\\n  while saving") from e
m._run_mode = boom
"""
  result = _wrapped(patch, TINY, "--workdir=/tmp/unused")
  assert result.returncode == 1
  assert _last_line(result) == ("error: RuntimeError: checkpoint 250 failed while saving "
                                "(caused by OSError: [Errno 28] No space left on device)")


def test_keyboard_interrupt_is_one_line_and_exit_130():
  patch = """
def interrupted(*args):
  raise KeyboardInterrupt()
m._run_mode = interrupted
"""
  result = _wrapped(patch, TINY, "--workdir=/tmp/unused")
  assert result.returncode == 130, result.stderr[-2000:]
  assert _last_line(result).startswith("interrupted: ")
  assert "Traceback" not in result.stderr


def test_force_reaches_trainer_and_builder():
  patch = """
from realm_jax.train import loop
from realm_jax.retrieval import index_builder
def fake_train(config, workdir, max_steps_this_run=None, devices=None, force_lease=False):
  print("train force_lease", force_lease)
class FakeBuilder:
  def __init__(self, config, workdir, devices=None, force_lease=False):
    print("builder force_lease", force_lease)
  def run(self, **kwargs):
    pass
loop.train_and_evaluate = fake_train
index_builder.IndexBuilder = FakeBuilder
"""
  for mode, who in (("train", "train"), ("index_builder", "builder")):
    result = _wrapped(patch, f"--mode={mode}", TINY, "--workdir=/tmp/unused", "--force")
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"{who} force_lease True" in result.stdout
  result = _wrapped(patch, "--mode=train", TINY, "--workdir=/tmp/unused")
  assert "train force_lease False" in result.stdout


def test_root_cause_follows_cause_and_context():
  try:
    try:
      raise ValueError("inner")
    except ValueError:
      raise KeyError("outer")  # pylint: disable=raise-missing-from
  except KeyError as e:
    assert main_lib.error_line(e) == "error: KeyError: 'outer' (caused by ValueError: inner)"
  plain = RuntimeError("alone")
  assert main_lib.error_line(plain) == "error: RuntimeError: alone"
  suppressed = RuntimeError("mine")
  suppressed.__context__, suppressed.__suppress_context__ = ValueError("hidden"), True
  assert main_lib.error_line(suppressed) == "error: RuntimeError: mine"


def test_help_lists_the_modes():
  result = _cli("--help")  # absl's --help exits 1 by design
  for mode in ("train", "demo", "index_builder", "build_corpus", "eval_retrieval",
               "print_config", "update_corpus"):
    assert f"  {mode} " in result.stdout
  assert "--force" in result.stdout


def test_update_corpus_on_a_corpus_not_built_is_one_clear_error(tmp_path):
  add = tmp_path / "add.jsonl"
  add.write_text('{"title": "T", "text": "A sentence."}\n')
  result = _cli("--mode=update_corpus", TINY, f"--workdir={tmp_path}", f"--add={add}")
  assert result.returncode == 1
  assert _last_line(result).startswith("error: CorpusVersionError: ")
  assert "not a finished corpus" in _last_line(result)
  assert not (tmp_path / "corpus" / "versions").exists()


@pytest.mark.parametrize("mode", ["train"])
def test_workdir_still_required_outside_print_config(mode):
  result = _cli(f"--mode={mode}", TINY)
  assert result.returncode != 0 and "--workdir is required" in _last_line(result)


def test_qa_modes_reach_their_entry_points_and_report_json():
  patch = """
from realm_jax.qa import finetune
finetune.finetune_qa = lambda config, workdir: {"step": 3, "exact_match": 0.5, "history": []}
finetune.evaluate_qa = lambda config, workdir: {"exact_match": 0.25, "num_examples": 8}
"""
  config = "--config=experiments/openqa_facts.py:size=tiny"
  result = _wrapped(patch, "--mode=finetune_qa", config, "--workdir=/tmp/unused")
  assert result.returncode == 0, result.stderr[-2000:]
  assert '"exact_match": 0.5' in result.stdout and "history" not in result.stdout
  result = _wrapped(patch, "--mode=eval_qa", config, "--workdir=/tmp/unused",
                    "--config.train.num_steps=5")
  assert result.returncode == 0, result.stderr[-2000:]
  assert '"exact_match": 0.25' in result.stdout
  assert "train.num_steps" in result.stderr  # an override the QA modes never read: warned


def test_retrieve_mode_passes_its_flags_and_needs_no_config():
  patch = """
from realm_jax.retrieval import inspect_index
def fake(workdir, query=None, queries_file=None, k=5, index_step=None, output=None, config=None):
  return f"retrieve {workdir} {query!r} {queries_file} {k} {index_step} {output} {config is None}"
inspect_index.run_retrieve_mode = fake
"""
  result = _wrapped(patch, "--mode=retrieve", "--workdir=/tmp/run", "--query=who plays the oboe",
                    "--k=3", "--index_step=200", "--output=/tmp/out.jsonl")
  assert result.returncode == 0, result.stderr[-2000:]
  assert "retrieve /tmp/run 'who plays the oboe' None 3 200 /tmp/out.jsonl True" in result.stdout
  # A version over a corpus version (`<step>+<c>`) reaches it as that key; a bad form is an
  # error naming the accepted ones, before anything is loaded.
  result = _wrapped(patch, "--mode=retrieve", "--workdir=/tmp/run", "--query=q",
                    "--index_step=200+3")
  assert result.returncode == 0, result.stderr[-2000:]
  assert "retrieve /tmp/run 'q' None 5 200+3 None True" in result.stdout
  result = _wrapped(patch, "--mode=retrieve", "--workdir=/tmp/run", "--query=q",
                    "--index_step=200+0")
  assert result.returncode != 0 and "retrieve /tmp" not in result.stdout
  assert "--index_step='200+0' is not an index version" in _last_line(result)
  assert "without '+0'" in _last_line(result)
