"""Bad config values fail at start-up with a ConfigError naming the field (and via the CLI)."""

import os
import pathlib
import subprocess
import sys

import jax
import ml_collections
import pytest

from realm_jax import config_lib
from realm_jax.train import loop
from tiny_configs import realm_facts, tiny_config  # pylint: disable=g-bad-import-order

ROOT = pathlib.Path(__file__).parent.parent


def test_tiny_config_is_valid():
  config_lib.validate(tiny_config(), num_data_shards=8)
  config_lib.validate(realm_facts.get_config("size=tiny"), num_data_shards=8)
  for size in ("small", "base"):
    assert realm_facts.get_config(f"size={size}").model.size in ("small", "base")
  assert realm_facts.get_config("tiny").model.hidden_size == 128  # bare arg = size


def test_unknown_size():
  with pytest.raises(config_lib.ConfigError, match="size='huge'"):
    realm_facts.get_config("size=huge")


def test_unknown_get_config_argument():
  with pytest.raises(config_lib.ConfigError, match="unknown config argument 'colour'"):
    realm_facts.get_config("size=tiny,colour=blue")


def _fails_at_startup(config, tmp_path, match, devices=None):
  """train_and_evaluate raises ConfigError(match) before it writes anything."""
  workdir = tmp_path / "run"
  with pytest.raises(config_lib.ConfigError, match=match):
    loop.train_and_evaluate(config, workdir, devices=devices)
  assert not workdir.exists(), "a bad config must fail before any work (corpus, checkpoints)"


def test_retrieval_k_one(tmp_path):
  config = tiny_config()
  config.retrieval.k = 1
  _fails_at_startup(config, tmp_path, r"retrieval\.k=1")


def test_batch_size_not_divisible_by_devices(tmp_path):
  config = tiny_config()
  config.train.batch_size = 12
  _fails_at_startup(config, tmp_path, r"train\.batch_size=12 is not divisible by the 8")
  # ...but fine on 4 devices.
  config_lib.validate(config, num_data_shards=4)


@pytest.mark.parametrize("field", ["eval.batch_size", "ict.batch_size"])
def test_other_batch_sizes_not_divisible(field):
  config = tiny_config()
  config.objective = "ict"
  section, name = field.split(".")
  config[section][name] = 12
  with pytest.raises(config_lib.ConfigError, match=rf"{field}=12"):
    config_lib.validate(config, num_data_shards=8)


def test_missing_vocab_file(tmp_path):
  config = tiny_config()
  config.data.vocab_file = str(tmp_path / "nope" / "vocab.txt")
  _fails_at_startup(config, tmp_path, r"data\.vocab_file=.*nope")


def test_missing_init_from(tmp_path):
  config = tiny_config()
  config.train.init_from = str(tmp_path / "no_ict_run")
  _fails_at_startup(config, tmp_path, r"train\.init_from=.*no_ict_run")


def test_bad_marginalization(tmp_path):
  config = tiny_config()
  config.loss.marginalization = "sequence"
  _fails_at_startup(config, tmp_path, r"loss\.marginalization='sequence'")


@pytest.mark.parametrize("field,value,match", [
    ("objective", "mlm", r"objective=.mlm."),
    ("model.dtype", "float16", r"model\.dtype='float16'"),
    ("model.num_heads", 3, r"model\.num_heads=3"),
    ("data.masking", "whole_word", r"data\.masking"),
    ("data.max_masked", 0, r"data\.max_masked=0"),
    ("data.doc_len", 500, r"model\.max_position_embeddings"),
    ("retrieval.margin", 0, r"retrieval\.margin=0"),
    ("retrieval.refresh_every", 0, r"retrieval\.refresh_every=0"),
    ("train.checkpoint_every", 0, r"train\.checkpoint_every=0"),
])
def test_other_bad_values_name_their_field(field, value, match):
  config = tiny_config()
  section, _, name = field.rpartition(".")
  (config[section] if section else config)[name] = value
  with pytest.raises(config_lib.ConfigError, match=match):
    config_lib.validate(config, num_data_shards=8)


def test_bad_mesh_fails_at_startup(tmp_path):
  config = tiny_config()
  config.mesh = [("data", 3)]
  with pytest.raises(ValueError, match=r"config\.mesh"):
    loop.train_and_evaluate(config, tmp_path / "run")
  assert not (tmp_path / "run").exists()


def test_batch_checked_against_the_devices_actually_used(tmp_path):
  config = tiny_config()
  config.train.batch_size = config.eval.batch_size = 6
  # 6 rows do not split over 4 devices, even though they would over 2 or 3.
  _fails_at_startup(config, tmp_path, r"batch_size=6 is not divisible by the 4",
                    devices=jax.devices()[:4])


def test_cli_reports_config_error(tmp_path):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["JAX_PLATFORMS"] = "cpu"
  workdir = tmp_path / "cli_run"
  result = subprocess.run(
      [sys.executable, "-m", "realm_jax.main", "--mode=train",
       "--config=experiments/realm_facts.py:size=tiny", "--config.retrieval.k=1",
       f"--workdir={workdir}"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
  assert result.returncode != 0
  lines = (result.stdout + result.stderr).splitlines()
  named = [line for line in lines if "retrieval.k" in line]
  assert named, result.stderr[-2000:]
  assert not any(line.startswith("Traceback") for line in lines), "a clear message, no traceback"
  assert not workdir.exists()


def test_builder_needs_a_checkpoint_every_refresh(tmp_path):
  config = tiny_config()
  config.retrieval.index_source = "builder"
  config.retrieval.refresh_every = 10
  config.train.checkpoint_every = 25
  _fails_at_startup(config, tmp_path, r"train.checkpoint_every=25 > retrieval.refresh_every=10")


@pytest.mark.parametrize("lag, checkpoint_every, message", [
    (10, 10, r"builder_sync_lag=10 must be below retrieval.refresh_every=10"),
    (4, 5, r"builder_sync_lag=4 needs train.checkpoint_every == retrieval.refresh_every"),
])
def test_a_sync_lag_needs_a_checkpoint_per_refresh_and_a_lag_below_it(
    tmp_path, lag, checkpoint_every, message):
  config = tiny_config()
  config.retrieval.index_source = "builder"
  config.retrieval.refresh_every = 10
  config.retrieval.builder_sync_lag = lag
  config.train.checkpoint_every = checkpoint_every
  _fails_at_startup(config, tmp_path, message)


def test_run_config_round_trips_through_the_workdir(tmp_path):
  """The builder started with --workdir alone gets the trainer's exact config back."""
  config = realm_facts.get_config("size=tiny")
  config.retrieval.index_source = "builder"
  config.train.checkpoint_every = config.retrieval.refresh_every
  config.mesh = [("data", 2), ("model", -1)]
  config_lib.save_run_config(config, tmp_path)
  loaded = config_lib.load_run_config(tmp_path)
  assert loaded.to_dict() == config.to_dict()
  assert loaded.mesh == [("data", 2), ("model", -1)]
  config_lib.validate(loaded, num_data_shards=2)
  assert not list(tmp_path.glob(".*tmp*")), "no tmp file left behind"


def test_missing_run_config_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="start the trainer on this workdir"):
    config_lib.load_run_config(tmp_path, wait_seconds=0.0)


# ---- Every field has a range (FIELDS), checked before anything is written --------------------

def _experiment_configs():
  """Every experiment config at every size (and the wiki experiment's init switch)."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  for path in sorted((ROOT / "experiments").glob("*.py")):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for size in ("tiny", "small", "base"):
      yield f"{path.stem}:size={size}", module.get_config(f"size={size}")
    if path.stem in ("realm_wiki", "openqa"):
      yield f"{path.stem}:init=minilm", module.get_config("size=tiny,init=minilm")


def test_every_experiment_field_is_in_the_table_with_help_and_range():
  """A field added to an experiment without an entry in config_lib.FIELDS fails here."""
  seen = set()
  for name, config in _experiment_configs():
    for field, value in config_lib.leaves(config):
      seen.add(field)
      assert field in config_lib.FIELDS, f"{name}: {field} has no entry in config_lib.FIELDS"
      spec = config_lib.FIELDS[field]
      assert spec.help, f"{field} has no help"
      if isinstance(value, (int, float)) and not isinstance(value, bool):
        assert spec.numeric, f"{name}: numeric field {field}={value!r} has no range"
      assert spec.problem(value) is None, f"{name}: default {field}={value!r} is out of range"
  assert not set(config_lib.FIELDS) - seen, "FIELDS entries no experiment has"


@pytest.mark.parametrize("field,value", [
    ("train.learning_rate", -1e-3), ("train.learning_rate", float("nan")),
    ("train.learning_rate", 0.0), ("ict.learning_rate", float("nan")),
    ("ict.learning_rate", -1.0), ("train.grad_clip_norm", -1.0),
    ("train.grad_clip_norm", float("inf")), ("train.retriever_lr_multiplier", -0.1),
    ("train.keep_checkpoints", 0), ("train.warmup_steps", -5), ("eval.every", -1),
    ("model.embed_dim", 0), ("data.vocab_size", 50), ("model.dropout_rate", 1.0),
    ("ict.remove_prob", 1.5), ("train.weight_decay", float("nan")), ("train.log_every", 0),
    ("retrieval.keep_index_versions", 0), ("retrieval.watch_poll_seconds", 0.0),
    ("retrieval.first_index_timeout", float("inf")), ("retrieval.scann.reorder", -1),
    ("seed", -1), ("ict.num_steps", -1), ("train.batch_size", 0),
])
def test_out_of_range_value_names_field_value_and_range(field, value):
  config = tiny_config()
  section, _, name = field.rpartition(".")
  parent = config
  for key in filter(None, section.split(".")):
    parent = parent[key]
  parent[name] = value
  with pytest.raises(config_lib.ConfigError) as raised:
    config_lib.validate(config, num_data_shards=8)
  message = str(raised.value)
  assert message.startswith(f"{field}={value!r} must be"), message
  assert "in [" in message or "in (" in message, message  # the allowed range


def test_integer_field_refuses_a_float():
  """A hand-edited config.json (the builder validates what it loads) can hold any type."""
  data = tiny_config().to_dict()
  data["data"]["vocab_size"] = 2000.5
  config = ml_collections.ConfigDict(data)
  with pytest.raises(config_lib.ConfigError, match=r"data\.vocab_size=2000\.5 must be an integer"):
    config_lib.validate(config, num_data_shards=8)


@pytest.mark.parametrize("field,value", [("train.learning_rate", float("nan")),
                                         ("train.keep_checkpoints", 0),
                                         ("model.embed_dim", 0)])
def test_out_of_range_fails_before_the_workdir_exists(tmp_path, field, value):
  config = tiny_config()
  section, name = field.split(".")
  config[section][name] = value
  _fails_at_startup(config, tmp_path, rf"{field.replace('.', '[.]')}=")


# ---- Resume under a changed config -----------------------------------------------------------

def test_config_diff_lists_fields_and_marks_shape_fields():
  saved = tiny_config().to_dict()
  current = tiny_config()
  current.model.embed_dim = 64
  current.train.num_steps = 50
  diff = config_lib.config_diff(saved, current.to_dict())
  assert diff == [("model.embed_dim", 128, 64, True), ("train.num_steps", 6, 50, False)]
  assert config_lib.config_diff(saved, tiny_config().to_dict()) == []
  # A field only one side has (e.g. added to the code since) is reported, never fatal.
  del saved["train"]["log_every"]
  assert ("train.log_every", "<absent>", 10, False) in config_lib.config_diff(
      saved, tiny_config().to_dict())


def test_resume_with_another_model_shape_is_refused_and_keeps_config_json(tmp_path):
  config_lib.save_run_config(tiny_config(), tmp_path)
  before = (tmp_path / "config.json").read_text()
  changed = tiny_config()
  changed.model.hidden_size = 64
  changed.data.vocab_size = 1000
  changed.train.num_steps = 50
  with pytest.raises(config_lib.ConfigError) as raised:
    config_lib.save_run_config(changed, tmp_path)
  message = str(raised.value)
  assert "model.hidden_size: 32 -> 64" in message and "data.vocab_size: 2000 -> 1000" in message
  assert "train.num_steps" not in message, "only the fields that cannot change"
  assert (tmp_path / "config.json").read_text() == before


def test_resume_with_other_changes_warns_and_updates(tmp_path, caplog):
  config_lib.save_run_config(tiny_config(), tmp_path)
  changed = tiny_config()
  changed.train.num_steps = 50
  changed.train.learning_rate = 5e-4
  with caplog.at_level("WARNING"):
    config_lib.save_run_config(changed, tmp_path)
  warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
  assert len(warnings) == 1, warnings
  assert "train.learning_rate: 0.001 -> 0.0005" in warnings[0]
  assert "train.num_steps: 6 -> 50" in warnings[0]
  assert config_lib.load_run_config(tmp_path).train.num_steps == 50
  caplog.clear()
  with caplog.at_level("WARNING"):
    config_lib.save_run_config(changed, tmp_path)  # the same config again: silent
  assert not [r for r in caplog.records if r.levelname == "WARNING"]


def test_resume_through_the_trainer_refuses_before_touching_the_run(tmp_path):
  """The trainer's own call order: validate, mkdir, save_run_config (which refuses)."""
  workdir = tmp_path / "run"
  workdir.mkdir()
  config_lib.save_run_config(tiny_config(), workdir)
  changed = tiny_config()
  changed.model.embed_dim = 16
  with pytest.raises(config_lib.ConfigError, match=r"model\.embed_dim: 128 -> 16"):
    loop.train_and_evaluate(changed, workdir)
  assert sorted(p.name for p in workdir.iterdir()) == ["config.json"], "no corpus, no checkpoint"


# ---- Overrides that do nothing ---------------------------------------------------------------

def test_ineffective_fields_for_ict():
  config = tiny_config()
  config.objective = "ict"
  out = dict(config_lib.ineffective_fields(
      config, ["train.num_steps", "ict.num_steps", "loss.marginalization", "train.batch_size",
               "train.grad_clip_norm", "retrieval.k", "eval.recall_k"]))
  assert set(out) == {"train.num_steps", "loss.marginalization", "train.batch_size",
                      "eval.recall_k"}
  assert "ict.num_steps" in out["train.num_steps"]


def test_ineffective_fields_for_realm_and_no_retrieval():
  config = tiny_config()
  overridden = ["ict.num_steps", "retrieval.k", "retrieval.watch_poll_seconds",
                "retrieval.scann.reorder", "train.num_steps"]
  out = dict(config_lib.ineffective_fields(config, overridden))
  assert set(out) == {"ict.num_steps", "retrieval.watch_poll_seconds", "retrieval.scann.reorder"}
  config.retrieval.enabled = False
  config.train.init_encoder_from_embedder = False  # else init_from starts the reader (below)
  out = dict(config_lib.ineffective_fields(config, overridden + ["train.init_from"]))
  assert set(out) == {"ict.num_steps", "retrieval.k", "retrieval.watch_poll_seconds",
                      "retrieval.scann.reorder", "train.init_from"}
  config.retrieval.enabled = True
  config.retrieval.index_source = "builder"
  config.retrieval.searcher = "scann"
  assert config_lib.ineffective_fields(config, ["retrieval.watch_poll_seconds",
                                                "retrieval.scann.reorder"]) == []


def test_ineffective_fields_for_the_encoder_copy_of_the_embedder():
  config = tiny_config()
  field = ["train.init_encoder_from_embedder"]
  config.train.init_encoder_from_embedder = True
  assert "needs train.init_from" in dict(config_lib.ineffective_fields(config, field))[field[0]]
  config.train.init_from = "/ict"
  assert config_lib.ineffective_fields(config, field) == []
  config.retrieval.enabled = False  # the baseline: init_from matters (its BERT), not ignored
  assert config_lib.ineffective_fields(config, field + ["train.init_from"]) == []
  config.train.init_encoder_from = "/realm"
  out = dict(config_lib.ineffective_fields(config, field + ["train.init_from"]))
  assert "instead" in out[field[0]]
  assert "never used" in out["train.init_from"]  # no copy, no retrieval: init_from is unused


def test_ineffective_fields_per_mode():
  config = tiny_config()
  assert config_lib.ineffective_fields(config, ["train.num_steps", "data.vocab_size"],
                                       mode="build_corpus") == [
                                           ("train.num_steps", "build_corpus reads only data.*")]
  assert [f for f, _ in config_lib.ineffective_fields(
      config, ["train.num_steps", "retrieval.embed_batch_size", "model.embed_dim"],
      mode="index_builder")] == ["train.num_steps"]
  assert config_lib.ineffective_fields(config, ["ict.num_steps"], mode="demo") == []


def test_describe_config_has_every_field_with_help():
  config = tiny_config()
  lines = config_lib.describe_config(config)
  assert len(lines) == len(list(config_lib.leaves(config)))
  assert "train.batch_size = 8  # REALM global batch, over all devices [an integer in " in (
      "\n".join(lines))
  assert all("  # " in line for line in lines)
