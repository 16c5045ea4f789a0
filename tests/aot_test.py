"""realm_jax/train/aot.py: the report arithmetic and the does-not-fit error on CPU, and one real
TPU compile of the tiny REALM step for v5e:2x2 (skipped where libtpu is not installed)."""

import dataclasses
import importlib.util
import json
import math
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import pytest

import tiny_configs
from realm_jax.train import aot
from realm_jax.train import flops as flops_lib

SMALL_CHIP = aot.ChipSpec("test chip", peak_bf16_flops=1e12, hbm_bytes=1000.0,
                          hbm_bytes_per_second=1e9, libtpu_prefix="x", chip_config_name="default")


class FakeCompiled:
  """What `jax.stages.Compiled` gives the report: memory_analysis() and cost_analysis()."""

  def __init__(self, argument, output, alias, temp, code, flops, accessed):
    self._memory = types.SimpleNamespace(
        argument_size_in_bytes=argument, output_size_in_bytes=output,
        alias_size_in_bytes=alias, temp_size_in_bytes=temp,
        generated_code_size_in_bytes=code)
    self._cost = {"flops": flops, "bytes accessed": accessed, "optimal_seconds": -1.0}

  def memory_analysis(self):
    return self._memory

  def cost_analysis(self):
    return self._cost


def test_memory_total_subtracts_donated_aliases():
  r = aot.memory_report(FakeCompiled(400, 300, 250, 100, 10, 0, 0))
  assert r["total_bytes"] == 400 + 300 - 250 + 100 + 10


def test_roofline_is_the_larger_of_compute_and_memory_time():
  # 2e9 FLOPs at 1e12 FLOP/s = 2 ms; 1e6 bytes at 1e9 B/s = 1 ms: compute-bound at 2 ms.
  r = aot.roofline(2e9, 1e6, SMALL_CHIP)
  assert r["roofline_seconds"] == pytest.approx(2e-3) and r["bound"] == "compute"
  r = aot.roofline(1e9, 5e6, SMALL_CHIP)
  assert r["roofline_seconds"] == pytest.approx(5e-3) and r["bound"] == "memory"


def test_step_report_cross_checks_the_analytic_count_and_ignores_optimal_seconds():
  fake = FakeCompiled(100, 100, 0, 100, 0, flops=1e9, accessed=1e6)
  agree = aot.step_report("s", fake, SMALL_CHIP, 1.1e9, compile_seconds=1.0)
  assert agree["flops_agree"] and agree["analytic_over_xla"] == pytest.approx(1.1)
  assert agree["roofline_seconds"] == pytest.approx(1e-3)  # not XLA's -1
  assert agree["fits"]
  off = aot.step_report("s", fake, SMALL_CHIP, 2e9, compile_seconds=1.0)
  assert not off["flops_agree"]
  assert "DISAGREE" in aot.format_result(_result({"s": off}))


def test_an_xla_count_below_the_analytic_one_raises_the_roofline_to_it():
  """XLA counts a while loop's body once (the remat scan over layers): 1e9 FLOPs counted, 8e9
  analytic -> the compute lower bound is 8e9 / 1e12 = 8 ms, above XLA's 1 ms roofline."""
  fake = FakeCompiled(100, 100, 0, 100, 0, flops=1e9, accessed=1e6)
  fake.as_text = lambda: "%w = (s32[]) while(%t), condition=%c, body=%b\n" * 2
  report = aot.step_report("s", fake, SMALL_CHIP, 8e9, compile_seconds=1.0)
  assert report["roofline_seconds"] == pytest.approx(8e-3)
  assert report["analytic_compute_seconds"] == pytest.approx(8e-3)
  assert report["bound"] == "compute (analytic FLOPs)" and report["while_loops"] == 2
  text = aot.format_result(_result({"s": report}))
  assert "roofline 1.00 ms" in text and "raised to the analytic FLOPs' compute time 8.00 ms" in text
  # An analytic count below XLA's (matmuls only, as usual) leaves XLA's roofline alone.
  agree = aot.step_report("s", fake, SMALL_CHIP, 0.9e9, compile_seconds=1.0)
  assert agree["roofline_seconds"] == pytest.approx(1e-3) and agree["bound"] == "compute"
  assert agree["while_loops"] == 2
  assert aot.step_report("s", FakeCompiled(1, 1, 0, 1, 0, 1e9, 1e6), SMALL_CHIP, None,
                         1.0)["while_loops"] is None  # no HLO text: unknown


def test_negative_cost_analysis_is_rejected():
  with pytest.raises(ValueError, match="no usable flops"):
    aot.cost_report(FakeCompiled(0, 0, 0, 0, 0, flops=-5.0, accessed=10.0))


def _result(steps):
  return {"topology": "x:1x1", "chip": dataclasses.asdict(SMALL_CHIP), "num_chips": 1,
          "num_hosts": 1, "mesh": {"data": 1}, "model": "tiny", "params": 1, "dtype": "float32",
          "remat": False, "train_state_bytes": 1, "steps": steps}


def test_does_not_fit_names_the_sizes():
  report = aot.step_report("realm_train", FakeCompiled(600, 400, 300, 500, 24, 1e9, 1e6),
                           SMALL_CHIP, None, 1.0)
  assert not report["fits"]
  with pytest.raises(aot.StepDoesNotFitError) as e:
    aot.check_result(_result({"realm_train": report}))
  message = str(e.value)
  assert "realm_train does not fit a test chip of x:1x1" in message
  for part in ("temporaries", "arguments", "donated", "HBM"):
    assert part in message


def test_a_cpu_compiled_step_reports_real_numbers_and_fails_on_a_small_chip():
  """A real jitted matmul compiled on CPU: XLA's FLOPs are the matmul's 2·m·n·k."""
  f = jax.jit(lambda a, b: a @ b)
  args = (jax.ShapeDtypeStruct((64, 128), jnp.float32), jax.ShapeDtypeStruct((128, 32),
                                                                             jnp.float32))
  report = aot.compile_step("matmul", f, args, SMALL_CHIP, "cpu", 2 * 64 * 128 * 32)
  assert report["xla_flops"] == pytest.approx(2 * 64 * 128 * 32, rel=0.05)
  assert report["flops_agree"]
  assert report["argument_bytes"] == 4 * (64 * 128 + 128 * 32)
  assert report["output_bytes"] == 4 * 64 * 32
  assert not report["fits"]  # 40 KiB of arguments on a 1000-byte chip
  with pytest.raises(aot.StepDoesNotFitError, match="matmul does not fit"):
    aot.check_fits(report, SMALL_CHIP, "cpu")


def test_a_compiler_out_of_memory_becomes_does_not_fit():
  class OutOfMemory:
    def lower(self, *args):
      return self

    def compile(self):
      raise RuntimeError("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of "
                         "memory in memory space hbm. Used 20.5G of 15.75G hbm.")

  with pytest.raises(aot.StepDoesNotFitError, match=r"Used 20.5G of 15.75G hbm"):
    aot.compile_step("qa_train", OutOfMemory(), (jax.ShapeDtypeStruct((4,), jnp.float32),),
                     SMALL_CHIP, "x:1x1", None)


@pytest.mark.parametrize("name,expected", [
    ("v5e:8x8", ("v5e", "v5e:8x8")), ("v4:2x2x4", ("v4", "v4:2x2x4")),
    ("v5p:2x4x4", ("v5p", "v5:2x4x4")), ("v6e:2x2", ("v6e", "v6e:2x2"))])
def test_parse_topology(name, expected):
  assert aot.parse_topology(name) == expected


@pytest.mark.parametrize("name", ["v9:2x2", "v5e", "v5e:8by8", "v4-32"])
def test_unknown_topology_is_a_clear_error(name):
  with pytest.raises(aot.TopologyError, match="expected <chip>:<shape>"):
    aot.parse_topology(name)


def test_chip_table_is_sane():
  for chip in aot.CHIPS.values():
    # Ridge point (FLOPs per HBM byte) of every TPU generation is between 100 and 1000.
    assert 100 < chip.peak_bf16_flops / chip.hbm_bytes_per_second < 1000
    assert 16 * aot.GIB <= chip.hbm_bytes <= 96 * aot.GIB


def test_compile_mode_without_topology_is_an_error_line():
  assert "needs --topology" in aot.run_compile_mode(tiny_configs.tiny_config(), None, None)


HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None


@pytest.mark.skipif(not HAS_LIBTPU, reason="libtpu is not installed (pip install -e '.[tpu]'); "
                    "the TPU compile for v5e:2x2 needs it")
def test_tiny_realm_step_compiles_for_v5e_2x2(tmp_path):
  """The real REALM train step and embedding step, compiled by libtpu for 4 v5e chips."""
  config = tiny_configs.tiny_config()
  result = aot.compile_for_topology(config, "v5e:2x2", steps=("realm_train", "embed_docs"))
  assert result["num_chips"] == 4 and result["mesh"] == {"data": 4}
  realm = result["steps"]["realm_train"]
  assert realm["fits"] and realm["temp_bytes"] > 0 and realm["xla_flops"] > 0
  # Per chip, the state is replicated: the arguments hold at least the whole train state.
  assert realm["argument_bytes"] >= result["train_state_bytes"]
  expected = flops_lib.step_flops_from_config(config, "realm", config.train.batch_size,
                                              config.retrieval.k).train_step / 4
  assert realm["analytic_flops"] == pytest.approx(expected)
  assert math.isfinite(realm["roofline_seconds"]) and realm["roofline_seconds"] > 0
  assert result["steps"]["embed_docs"]["fits"]


def test_compile_mode_cli_rejects_an_unknown_topology():
  out = subprocess.run([sys.executable, "-m", "realm_jax.main", "--mode=compile",
                        "--config=experiments/realm_facts.py:size=tiny", "--topology=v9:2x2"],
                       capture_output=True, text=True, timeout=120,
                       cwd=str(tiny_configs._PATH.parent.parent))  # pylint: disable=protected-access
  assert out.returncode == 1 and "expected <chip>:<shape>" in out.stderr


def _tiny_qa_config():
  path = tiny_configs._PATH.parent / "openqa_facts.py"  # pylint: disable=protected-access
  spec = importlib.util.spec_from_file_location("openqa_facts", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("size=tiny")
  config.model.hidden_size, config.model.intermediate_size, config.model.num_heads = 32, 64, 2
  config.train.batch_size = config.qa.batch_size = 8
  config.qa.retriever_k, config.qa.reader_k = 8, 2
  return config


def test_all_three_steps_compile_end_to_end_on_cpu_devices(monkeypatch):
  """`compile_for_topology` with the topology's devices swapped for 4 fake CPU devices: the
  same abstract inputs, shardings and reports as on a TPU topology."""
  big = dataclasses.replace(SMALL_CHIP, hbm_bytes=64 * aot.GIB)
  monkeypatch.setattr(aot, "topology_devices", lambda name: (big, jax.devices()[:4]))
  config = _tiny_qa_config()
  result = aot.compile_for_topology(config, "cpu:2x2")
  assert set(result["steps"]) == {"realm_train", "embed_docs", "qa_train"}
  assert result["mesh"] == {"data": 4}
  for name, r in result["steps"].items():
    assert r["fits"] and r["xla_flops"] > 0 and r["total_bytes"] > 0, name
  realm = result["steps"]["realm_train"]
  # Replicated state: every chip holds the whole train state as an argument.
  assert realm["argument_bytes"] >= result["train_state_bytes"]
  # Per-chip analytic FLOPs are the step's over the 4 chips.
  total = flops_lib.step_flops_from_config(config, "realm", 8, config.retrieval.k).train_step
  assert realm["analytic_flops"] == pytest.approx(total / 4)
  assert result["steps"]["qa_train"]["analytic_flops"] is None
  json.dumps(result)  # --output writes it
  text = aot.format_result(result)
  assert "[qa_train]" in text and "roofline" in text


def test_a_batch_that_does_not_divide_the_mesh_is_a_config_error(monkeypatch):
  from realm_jax import config_lib  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(aot, "topology_devices", lambda name: (SMALL_CHIP, jax.devices()[:4]))
  config = tiny_configs.tiny_config()
  config.train.batch_size = 6
  with pytest.raises(config_lib.ConfigError, match="train.batch_size=6 is not divisible by the 4"):
    aot.compile_for_topology(config, "cpu:2x2", steps=("realm_train",))


_CLI_WRAPPER = """
import sys
import jax
from absl import app
import realm_jax.main as m
from realm_jax.train import aot
chip = aot.ChipSpec("1 MiB chip", 1e12, 2.0 ** 20, 1e9, "x", "default")
aot.topology_devices = lambda name: (chip, jax.devices()[:2])
app.run(m.main, argv=sys.argv)
"""


def test_compile_mode_cli_writes_the_report_then_fails_when_a_step_does_not_fit(tmp_path):
  """`--mode=compile` end to end (2 CPU devices stand in for the topology's chips): the JSON
  report is written, and the exit is 1 with a last line naming the step and its sizes."""
  import os  # pylint: disable=g-import-not-at-top
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=2")
  out_path = tmp_path / "report.json"
  out = subprocess.run(
      [sys.executable, "-c", _CLI_WRAPPER, "--mode=compile",
       "--config=experiments/realm_facts.py:size=tiny", "--config.model.hidden_size=32",
       "--config.model.intermediate_size=64", "--config.train.batch_size=4",
       "--config.retrieval.embed_batch_size=4", "--topology=v5e:1x2",
       f"--output={out_path}"],
      capture_output=True, text=True, timeout=900,
      cwd=str(tiny_configs._PATH.parent.parent), env=env)  # pylint: disable=protected-access
  last = [line for line in out.stderr.splitlines() if line.strip()][-1]
  assert out.returncode == 1, out.stderr[-2000:]
  assert last.startswith("error: realm_train does not fit a 1 MiB chip of v5e:1x2: it needs")
  assert "temporaries" in last and "GiB HBM" in last
  report = json.loads(out_path.read_text())
  # realm_facts.py carries the demo's `qa` section, so its QA step is compiled too.
  assert set(report["steps"]) == {"realm_train", "embed_docs", "qa_train"}
  assert report["steps"]["realm_train"]["fits"] is False
  assert "[realm_train]" in out.stdout and "DOES NOT FIT" in out.stdout


def test_xla_oom_sizes_are_parsed():
  text = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
          "temporaries (75.44G) exceeds available HBM (30.75G).")
  got = aot.xla_oom_bytes(text)
  assert got["xla_required_temp_bytes"] == pytest.approx(75.44 * 2 ** 30)
  assert got["xla_available_hbm_bytes"] == pytest.approx(30.75 * 2 ** 30)
  assert aot.xla_oom_bytes("no sizes here") == {}


def test_device_search_compiles_with_its_table_sharded_on_cpu_devices(monkeypatch):
  """The device searcher's jitted search through `compile_for_topology` (4 fake CPU devices for
  the topology's chips): the table shard per chip, the matmul FLOPs, no model built."""
  big = dataclasses.replace(SMALL_CHIP, hbm_bytes=64 * aot.GIB)
  monkeypatch.setattr(aot, "topology_devices", lambda name: (big, jax.devices()[:4]))
  search = aot.SearchShape(num_docs=1003, dim=16, batch=8, k=5, dtype="bfloat16")
  result = aot.compile_for_topology(tiny_configs.tiny_config(), "cpu:2x2",
                                    steps=aot.SEARCH_STEPS, search=search)
  assert "params" not in result  # search-only: the model is not built
  assert result["search"]["rows_per_shard"] == 251  # ceil(1003 / 4), padded rows
  assert result["search"]["table_bytes_per_chip"] == 251 * 16 * 2
  for name in aot.SEARCH_STEPS:
    r = result["steps"][name]
    assert r["fits"] and r["xla_flops"] > 0, name
    assert r["analytic_flops"] == pytest.approx(2 * 8 * 1003 * 16 / 4)
    # The per-chip arguments: the query shard and the table shard (bf16).
    assert r["argument_bytes"] >= 251 * 16 * 2
  text = aot.format_result(result)
  assert "[device_search]" in text and "1,003 x 16 bfloat16" in text


def test_search_shape_from_config_is_the_trainers_search():
  config = tiny_configs.tiny_config()
  shape = aot.SearchShape.from_config(config, num_docs=100)
  assert shape.k == config.retrieval.k - 1 + config.retrieval.margin
  assert shape.batch == config.train.batch_size and shape.dim == config.model.embed_dim
