r"""Compiled for TPU on a CPU host: the BENCHMARKS.md table (realm_jax/train/aot.py).

  python benchmarks/compile_tpu.py --config=experiments/openqa.py:size=base \
      --config.data.query_len=96 --config.data.vocab_size=30522 \
      --config.model.dtype=bfloat16 --topologies=v5e:8x8,v4:2x2x4,v5p:2x4x4 \
      --output=/tmp/compile_tpu.json

The device searcher's search of REALM's index (13.35M x 128 bf16 rows split over all chips,
512 queries, approx_max_k at recall 0.95 then the exact merge; and the exact-top_k variant):

  python benchmarks/compile_tpu.py --config=experiments/openqa.py:size=base \
      --topologies=v5e:8x8,v4:2x2x4 --steps=device_search,device_search_exact

For each topology, one after the other: `aot.compile_for_topology` (the REALM train step, the
index builder's embedding step and, for an Open-QA config, the QA train step, compiled by libtpu
from abstract inputs; no TPU needed), its report printed, then a Markdown row per step. The JSON
file is rewritten after every topology, so a run stopped part-way keeps what compiled. Needs the
`tpu` extra (`pip install -e '.[tpu]'`); TPU compiles of a base-size step take minutes each on
a small CPU host.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import sys
import time

from absl import app
from absl import flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from machine import cpu_model, git_state  # pylint: disable=g-import-not-at-top,wrong-import-position

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_TOPOLOGIES = flags.DEFINE_list("topologies", ["v5e:8x8", "v4:2x2x4", "v5p:2x4x4"],
                                "TPU topologies to compile for, in order.")
_STEPS = flags.DEFINE_list("steps", ["realm_train", "embed_docs", "qa_train"],
                           "Steps to compile (qa_train only with a qa section; "
                           "device_search, device_search_exact: the device searcher).")
_OUTPUT = flags.DEFINE_string("output", "", "Write all results as JSON here.")
_MESH = flags.DEFINE_string("mesh", "", "Overrides config.mesh (a list, which --config.mesh "
                            "cannot set), e.g. data:16,fsdp:4 or data:-1.")
_SEARCH_DOCS = flags.DEFINE_integer("search_docs", 13_350_000,
                                    "device_search: rows of the table (REALM: 13.35M blocks).")
_SEARCH_BATCH = flags.DEFINE_integer("search_batch", 0,
                                     "device_search: queries per search (0: train.batch_size).")
_SEARCH_K = flags.DEFINE_integer("search_k", 0, "device_search: results per query (0: "
                                 "retrieval.k - 1 + retrieval.margin, the trainer's).")
_SEARCH_DTYPE = flags.DEFINE_enum("search_dtype", "bfloat16", ["bfloat16", "float32"],
                                  "device_search: table dtype.")

_HEADER = ("| topology | step | per chip: args / out (donated) / temp / total GiB of HBM | "
           "XLA TFLOP / GB accessed per chip | roofline ms (bound) | analytic / XLA FLOPs | "
           "compile s |")


def markdown_rows(result) -> list[str]:
  """One table row per step of one topology's result."""
  rows = []
  gib = lambda b: f"{b / 2**30:.2f}"
  mesh = " ".join(f"{k}={v}" for k, v in result["mesh"].items())
  where = f"{result['topology']} ({result['num_chips']} chips, {mesh})"
  for name, r in result["steps"].items():
    if r.get("error"):
      need = (f"temporaries {gib(r['xla_required_temp_bytes'])} GiB > "
              f"{gib(r['xla_available_hbm_bytes'])} GiB available (XLA)"
              if "xla_required_temp_bytes" in r else r["error"])
      seconds = f"{r['compile_seconds']:.0f}" if "compile_seconds" in r else ""
      rows.append(f"| {where} | {name} | "
                  f"**does not fit**: {need} | | | | {seconds} |")
      continue
    ratio = (f"{r['analytic_over_xla']:.2f}{'' if r['flops_agree'] else ' (disagree)'}"
             if r.get("analytic_flops") else "n/a")
    rows.append(
        f"| {where} | {name} | "
        f"{gib(r['argument_bytes'])} / {gib(r['output_bytes'])} ({gib(r['alias_bytes'])}) / "
        f"{gib(r['temp_bytes'])} / **{gib(r['total_bytes'])}** of {gib(r['hbm_bytes'])}"
        f"{'' if r['fits'] else ' DOES NOT FIT'} | {r['xla_flops'] / 1e12:.2f} / "
        f"{r['xla_bytes_accessed'] / 1e9:.2f} | {r['roofline_seconds'] * 1e3:.1f} "
        f"({r['bound']}) | {ratio} | {r['compile_seconds']:.0f} |")
  return rows


def search_shape(config):
  """The device-search shape of the flags (defaults: the trainer's search of `config`)."""
  from realm_jax.train import aot  # pylint: disable=g-import-not-at-top
  shape = aot.SearchShape.from_config(config, num_docs=_SEARCH_DOCS.value)
  return dataclasses.replace(shape, batch=_SEARCH_BATCH.value or shape.batch,
                             k=_SEARCH_K.value or shape.k, dtype=_SEARCH_DTYPE.value)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.getLogger().setLevel(logging.INFO)
  for noisy in ("absl", "jax._src", "orbax", "etils"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  if _CONFIG.value is None:
    sys.exit("error: --config is required, e.g. --config=experiments/openqa.py:size=base")
  import jax  # pylint: disable=g-import-not-at-top

  from realm_jax.train import aot  # pylint: disable=g-import-not-at-top

  run = dict(command=" ".join(["python"] + sys.argv), git=git_state(), cpu=cpu_model(),
             host_cpu_count=os.cpu_count(), jax_version=jax.__version__, results=[])
  try:
    import libtpu  # pylint: disable=g-import-not-at-top
    run["libtpu_version"] = getattr(libtpu, "__version__", "unknown")
  except ImportError:
    sys.exit("error: libtpu is not installed: pip install -e '.[tpu]'")
  config = _CONFIG.value
  if _MESH.value:
    from realm_jax import mesh_flag  # pylint: disable=g-import-not-at-top
    try:
      config.mesh = mesh_flag.parse_mesh(_MESH.value)
    except ValueError as e:
      raise app.UsageError(str(e)) from e
  run["mesh"] = [list(axis) for axis in config.mesh]
  rows = []
  for topology in _TOPOLOGIES.value:
    start = time.perf_counter()
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    load = os.getloadavg()[0]
    try:
      result = aot.compile_for_topology(config, topology, steps=_STEPS.value,
                                        search=search_shape(config))
    except (aot.TopologyError, ValueError) as e:
      print(f"{topology}: error: {e}", flush=True)
      run["results"].append(dict(topology=topology, error=str(e), date=date))
      continue
    result.update(date=date, wall_seconds=time.perf_counter() - start,
                  load_average_1min_before=load, load_average_1min_after=os.getloadavg()[0])
    run["results"].append(result)
    print(aot.format_result(result), flush=True)
    rows += markdown_rows(result)
    if _OUTPUT.value:
      with open(_OUTPUT.value, "w") as f:
        json.dump(run, f, indent=2, sort_keys=True)
  print("\n".join([_HEADER, "|---" * 7 + "|"] + rows))
  if _OUTPUT.value:
    with open(_OUTPUT.value, "w") as f:
      json.dump(run, f, indent=2, sort_keys=True)
    print(f"wrote {_OUTPUT.value}")


if __name__ == "__main__":
  app.run(main)
