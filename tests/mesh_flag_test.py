"""--config.mesh on the command line (ml_collections cannot override list fields itself)."""

import subprocess
import sys

import pytest

from realm_jax import mesh_flag


def test_parse_mesh_pairs_and_minus_one():
  assert mesh_flag.parse_mesh("data:2,fsdp:4") == [("data", 2), ("fsdp", 4)]
  assert mesh_flag.parse_mesh(" data:-1 ") == [("data", -1)]


@pytest.mark.parametrize("text", ["data2", "data:x", "data:0", ":2", "data:2,", "data:-2"])
def test_bad_mesh_names_the_flag_and_the_bad_part(text):
  with pytest.raises(ValueError, match=r"--config.mesh=.*name:size"):
    mesh_flag.parse_mesh(text)


def test_extract_takes_both_forms_and_leaves_the_rest():
  rest, mesh = mesh_flag.extract_mesh_flag(
      ["prog", "--config=x.py", "--config.mesh", "data:8", "--config.seed=1"])
  assert rest == ["prog", "--config=x.py", "--config.seed=1"] and mesh == [("data", 8)]
  rest, mesh = mesh_flag.extract_mesh_flag(["prog", "--config.mesh=data:2,fsdp:4"])
  assert rest == ["prog"] and mesh == [("data", 2), ("fsdp", 4)]
  assert mesh_flag.extract_mesh_flag(["prog", "--mode=train"]) == (["prog", "--mode=train"], None)
  with pytest.raises(ValueError, match="needs a value"):
    mesh_flag.extract_mesh_flag(["prog", "--config.mesh"])


def test_main_applies_the_mesh_override_with_other_overrides():
  """The real command line (a subprocess, ~3 s: absl + the config file)."""
  out = subprocess.run(
      [sys.executable, "-m", "realm_jax.main", "--mode=print_config",
       "--config=experiments/realm_facts.py:size=tiny", "--config.mesh=data:2,fsdp:4",
       "--config.seed=3"], capture_output=True, text=True, timeout=120, check=True).stdout
  assert "mesh = [('data', 2), ('fsdp', 4)]" in out
  assert "seed = 3 " in out
