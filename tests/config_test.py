"""Bad config values fail at start-up with a ConfigError naming the field (and via the CLI)."""

import os
import pathlib
import subprocess
import sys

import jax
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
