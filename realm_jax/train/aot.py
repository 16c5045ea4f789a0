"""Ahead-of-time compile of the real steps for a named TPU topology, on a host without TPUs.

`--mode=compile --topology=v5e:8x8` (realm_jax/main.py) and benchmarks/compile_tpu.py call
`compile_for_topology`: libtpu (the `tpu` extra, `jax[tpu]`) describes the topology's chips
(`jax.experimental.topologies.get_topology_desc`), the mesh of `config.mesh` is laid over them,
and the REALM train step, the index builder's document-embedding step and (when the config has
a `qa` section) the Open-QA train step are lowered from `jax.ShapeDtypeStruct` inputs carrying
their shardings (no array is ever allocated) and compiled by the TPU compiler. The train state
is laid out as the trainer lays it out (`partitioning.state_shardings_from_config`: replicated,
or split over an `fsdp` mesh axis). On request (`steps=("device_search", ...)`) the device
searcher's jitted search (retrieval/device_searcher.py) is compiled the same way for a table of
`SearchShape` rows split over all the chips: approx_max_k per shard at the recall target with
`reduction_input_size_override` = the whole table, as `top_k=auto` runs on TPU, then the exact
merge (`device_search_exact`: exact top_k per shard instead).

Per chip, each step reports XLA's memory analysis (arguments, outputs, donated aliases,
temporaries, generated code), XLA's FLOP and bytes-accessed counts, the analytic model FLOPs of
`train/flops.py` divided over the chips (and whether the two agree), and a roofline estimate of
the step time: max(FLOPs / peak bf16 FLOP/s, bytes accessed / HBM bandwidth), from `CHIPS`.
XLA's own `optimal_seconds` is not used: it came back negative in a trial. XLA's cost analysis
counts a while loop's body once, and `model.remat` runs the layers as a `lax.scan`; where the
analytic count is above XLA's by more than the agreement tolerance, the roofline is raised to
the analytic FLOPs' compute time (each is a lower bound), and `while_loops` says how many loops
the compiled HLO holds.

A step that does not fit the chip's HBM is an error (`StepDoesNotFitError`) naming the sizes,
whether the TPU compiler rejects it (RESOURCE_EXHAUSTED) or its memory analysis exceeds HBM.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
import time
from typing import Any, Iterable

GIB = 2 ** 30
_LOG = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ChipSpec:
  """One TPU chip (one JAX device: v4 and v5p run their two TensorCores as one megacore)."""

  name: str
  peak_bf16_flops: float  # dense bf16 FLOP/s per chip
  hbm_bytes: float  # HBM capacity per chip
  hbm_bytes_per_second: float  # HBM bandwidth per chip
  libtpu_prefix: str  # the chip's name in libtpu's topology names
  chip_config_name: str  # "megacore" (two TensorCores as one device) or "default"


# Per-chip figures from Google Cloud's per-version TPU pages, read 2026-12-02 (bandwidths in
# 10^9 bytes/s; capacities as the pages state them, v4 in GiB, the others in "GB", taken as
# GiB here: the usable HBM a TPU runtime reports is a little below either).
CHIPS = {
    # cloud.google.com/tpu/docs/v4: "275 teraflops (bf16 or int8)", "32 GiB, 1200 GBps".
    "v4": ChipSpec("TPU v4", 275e12, 32 * GIB, 1200e9, "v4", "megacore"),
    # cloud.google.com/tpu/docs/v5e: "197 TFLOPs" bf16, "HBM2 ... 16 GB, 819 GBps".
    "v5e": ChipSpec("TPU v5e", 197e12, 16 * GIB, 819e9, "v5e", "default"),
    # cloud.google.com/tpu/docs/v5p: "459 TFLOPs" bf16, "HBM2e ... 95GB, 2765 GBps".
    "v5p": ChipSpec("TPU v5p", 459e12, 95 * GIB, 2765e9, "v5", "megacore"),
    # cloud.google.com/tpu/docs/v6e: "918 TFLOPs" bf16, "32 GB", "1638 GBps".
    "v6e": ChipSpec("TPU v6e", 918e12, 32 * GIB, 1638e9, "v6e", "default"),
}

# XLA's FLOPs count every floating-point op (LayerNorm, softmax, GELU, the optimizer), the
# analytic count only the matmuls: within this ratio the two are said to agree.
AGREE_TOLERANCE = 0.25


class StepDoesNotFitError(ValueError):
  """A compiled step needs more memory per chip than the chip's HBM. `details`: what is known
  (compile_seconds; XLA's required and available bytes when the compiler said them)."""

  def __init__(self, message: str, details: dict[str, Any] | None = None):
    super().__init__(message)
    self.details = dict(details or {})


_G = {"K": 2.0 ** 10, "M": 2.0 ** 20, "G": 2.0 ** 30, "T": 2.0 ** 40}


def xla_oom_bytes(text: str) -> dict[str, float]:
  """From libtpu's 'the total memory required for HLO temporaries (75.44G) exceeds available
  HBM (30.75G)': {'xla_required_temp_bytes': ..., 'xla_available_hbm_bytes': ...} (what it says)."""
  out = {}
  for key, pattern in (("xla_required_temp_bytes", r"temporaries \(([\d.]+)([KMGT])\)"),
                       ("xla_available_hbm_bytes", r"available HBM \(([\d.]+)([KMGT])\)")):
    match = re.search(pattern, text)
    if match:
      out[key] = float(match.group(1)) * _G[match.group(2)]
  return out


class TopologyError(ValueError):
  """An unknown or malformed topology name, or no libtpu to describe it."""


def parse_topology(name: str) -> tuple[str, str]:
  """'v5e:8x8' -> ('v5e', 'v5e:8x8'): the chip key of `CHIPS` and libtpu's topology name
  ('v5p:2x4x4' -> ('v5p', 'v5:2x4x4'); libtpu calls v5p 'v5')."""
  chip, sep, shape = name.partition(":")
  chip = chip.strip().lower()
  if chip == "v5":
    chip = "v5p"
  if not sep or chip not in CHIPS or not re.fullmatch(r"\d+(x\d+){1,2}", shape):
    raise TopologyError(
        f"topology {name!r}: expected <chip>:<shape> with chip one of {sorted(CHIPS)} and a "
        "shape like 2x2, 8x8 or 2x2x4 (chips per dimension), e.g. v5e:8x8 (v5e-64), "
        "v4:2x2x4 (v4-32), v5p:2x4x4 (v5p-64)")
  return chip, f"{CHIPS[chip].libtpu_prefix}:{shape}"


def topology_devices(name: str) -> tuple[ChipSpec, list[Any]]:
  """(the chip's spec, the topology's devices as libtpu describes them); no TPU needed."""
  chip, libtpu_name = parse_topology(name)
  try:
    import libtpu  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  except ImportError as e:
    raise TopologyError(
        f"compiling for {name} needs libtpu: pip install -e '.[tpu]' (jax[tpu]==0.10.2)") from e
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  try:
    desc = topologies.get_topology_desc(platform="tpu", topology_name=libtpu_name,
                                        chip_config_name=CHIPS[chip].chip_config_name)
  except Exception as e:  # pylint: disable=broad-except
    raise TopologyError(f"libtpu does not know topology {name!r} ({libtpu_name}): {e}") from e
  return CHIPS[chip], list(desc.devices)


# ---- Per-step report -----------------------------------------------------------------------

def memory_report(compiled) -> dict[str, float]:
  """XLA's per-chip memory analysis, in bytes, and `total_bytes`: what the step holds at its
  peak = arguments + outputs - donated aliases + temporaries + generated code."""
  m = compiled.memory_analysis()
  if m is None:
    raise ValueError("the compiled step has no memory analysis")
  out = {f: float(getattr(m, f"{f}_size_in_bytes"))
         for f in ("argument", "output", "alias", "temp", "generated_code")}
  out["total"] = (out["argument"] + out["output"] - out["alias"] + out["temp"]
                  + out["generated_code"])
  return {f"{k}_bytes": v for k, v in out.items()}


def cost_report(compiled) -> dict[str, float]:
  """XLA's per-chip `flops` and `bytes accessed` of the compiled (partitioned) program."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  cost = cost or {}
  flops, accessed = cost.get("flops"), cost.get("bytes accessed")
  if flops is None or accessed is None or flops < 0 or accessed < 0:
    raise ValueError(f"XLA's cost analysis has no usable flops / bytes accessed: "
                     f"{ {k: cost.get(k) for k in ('flops', 'bytes accessed')} }")
  return {"xla_flops": float(flops), "xla_bytes_accessed": float(accessed)}


def roofline(flops: float, bytes_accessed: float, chip: ChipSpec) -> dict[str, Any]:
  """Step time lower bound: max(compute time at peak, HBM traffic time at full bandwidth)."""
  compute = flops / chip.peak_bf16_flops
  memory = bytes_accessed / chip.hbm_bytes_per_second
  return {"compute_seconds": compute, "memory_seconds": memory,
          "roofline_seconds": max(compute, memory),
          "bound": "compute" if compute >= memory else "memory"}


def step_report(name: str, compiled, chip: ChipSpec, analytic_flops_per_chip: float | None,
                compile_seconds: float) -> dict[str, Any]:
  """Memory, FLOPs, roofline and the analytic cross-check of one compiled step."""
  report: dict[str, Any] = {"step": name, "compile_seconds": compile_seconds}
  report.update(memory_report(compiled))
  report.update(cost_report(compiled))
  report.update(roofline(report["xla_flops"], report["xla_bytes_accessed"], chip))
  report["hbm_bytes"] = chip.hbm_bytes
  report["fits"] = report["total_bytes"] <= chip.hbm_bytes
  report["analytic_flops"] = analytic_flops_per_chip
  report["while_loops"] = while_loops(compiled)
  if analytic_flops_per_chip:
    ratio = analytic_flops_per_chip / report["xla_flops"] if report["xla_flops"] else math.inf
    report["analytic_over_xla"] = ratio
    report["flops_agree"] = abs(ratio - 1) <= AGREE_TOLERANCE
    # XLA's cost analysis counts a while loop's body once (model.remat runs the layers as a
    # lax.scan), so its FLOPs and bytes can be far below what runs. Each of XLA's two times
    # and the analytic matmul time is a lower bound of the step time: where the counts
    # disagree, the roofline is the largest of the three.
    analytic_compute = analytic_flops_per_chip / chip.peak_bf16_flops
    report["analytic_compute_seconds"] = analytic_compute
    if not report["flops_agree"] and analytic_compute > report["roofline_seconds"]:
      report["roofline_seconds"] = analytic_compute
      report["bound"] = "compute (analytic FLOPs)"
  return report


def while_loops(compiled) -> int | None:
  """How many while loops the compiled HLO holds (their bodies are counted once by XLA's
  cost analysis); None when the compiled text is not available."""
  try:
    text = compiled.as_text()
  except Exception:  # pylint: disable=broad-except
    return None
  return len(re.findall(r"\swhile\(", text or ""))


def _gib(b: float) -> str:
  return f"{b / GIB:.2f} GiB"


def does_not_fit_message(report: dict[str, Any], chip: ChipSpec, topology: str) -> str:
  return (f"{report['step']} does not fit a {chip.name} of {topology}: it needs "
          f"{_gib(report['total_bytes'])} per chip (arguments {_gib(report['argument_bytes'])}"
          f" + outputs {_gib(report['output_bytes'])} - donated "
          f"{_gib(report['alias_bytes'])} + temporaries {_gib(report['temp_bytes'])} + code "
          f"{_gib(report['generated_code_bytes'])}) and the chip has {_gib(chip.hbm_bytes)} "
          "HBM; lower the batch, set model.remat=True or shard the state")


def check_fits(report: dict[str, Any], chip: ChipSpec, topology: str) -> None:
  if report["total_bytes"] > chip.hbm_bytes:
    raise StepDoesNotFitError(does_not_fit_message(report, chip, topology))


def tree_bytes(tree) -> int:
  """Bytes of a pytree of arrays or ShapeDtypeStructs (whole, not per chip)."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize
             for x in jax.tree_util.tree_leaves(tree))


def compile_step(name: str, jitted, args: tuple, chip: ChipSpec, topology: str,
                 analytic_flops_per_chip: float | None) -> dict[str, Any]:
  """Lowers and compiles `jitted(*args)`; a RESOURCE_EXHAUSTED compile becomes
  `StepDoesNotFitError` with the step's argument bytes and XLA's own words."""
  start = time.perf_counter()
  try:
    compiled = jitted.lower(*args).compile()
  except Exception as e:  # pylint: disable=broad-except
    text = str(e)
    if "RESOURCE_EXHAUSTED" not in text and "out of memory" not in text.lower():
      raise
    xla = next((line.strip() for line in text.splitlines() if "hbm" in line.lower()),
               text.splitlines()[0] if text else "")
    raise StepDoesNotFitError(
        f"{name} does not fit a {chip.name} of {topology}: the TPU compiler ran out of HBM "
        f"({_gib(chip.hbm_bytes)} per chip; the step's inputs are {_gib(tree_bytes(args))} "
        f"in all, before sharding): {xla}",
        dict(compile_seconds=time.perf_counter() - start, **xla_oom_bytes(text))) from e
  return step_report(name, compiled, chip, analytic_flops_per_chip,
                     time.perf_counter() - start)


# ---- The project's steps -------------------------------------------------------------------

def realm_batch_shapes(config, batch_size: int, k: int) -> dict[str, tuple[tuple, Any]]:
  """{key: (shape, dtype)} of the REALM train batch (`steps.REALM_KEYS`, no cand_is_gold)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  d = config.data
  b, lq, ld, m = batch_size, d.query_len, d.doc_len, d.max_masked
  return {"query_tokens": ((b, lq), np.int32), "masked_positions": ((b, m), np.int32),
          "masked_labels": ((b, m), np.int32), "masked_weights": ((b, m), np.float32),
          "cand_doc_tokens": ((b, k, ld), np.int32),
          "cand_doc_segments": ((b, k, ld), np.int32),
          "cand_body_tokens": ((b, k, ld - 2), np.int32), "cand_mask": ((b, k), np.bool_)}


def qa_batch_shapes(config, batch_size: int, embed_dim: int) -> dict[str, tuple[tuple, Any]]:
  """{key: (shape, dtype)} of the Open-QA train batch (`qa.steps.QA_KEYS`)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  qa = config.qa
  b, body_len = batch_size, config.data.doc_len - 2  # corpus body_len default
  spans = body_len * qa.max_span_width
  return {"question_tokens": ((b, qa.question_len), np.int32),
          "cand_doc_emb": ((b, qa.retriever_k, embed_dim), np.float32),
          "cand_mask": ((b, qa.retriever_k), np.bool_),
          "cand_has_answer": ((b, qa.retriever_k), np.bool_),
          "reader_block_tokens": ((b, qa.reader_k, body_len), np.int32),
          "reader_block_continuation": ((b, qa.reader_k, body_len), np.bool_),
          "span_is_correct": ((b, qa.reader_k, spans), np.bool_)}


def _sharded_batch(shapes, sharding):
  import jax  # pylint: disable=g-import-not-at-top
  return {key: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
          for key, (shape, dtype) in shapes.items()}


def _require_divisible(what: str, size: int, shards: int) -> None:
  from realm_jax import config_lib  # pylint: disable=g-import-not-at-top
  if size < 1 or size % shards:
    raise config_lib.ConfigError(f"{what}={size} is not divisible by the {shards} "
                                 "data-parallel devices of the mesh")


MODEL_STEPS = ("realm_train", "embed_docs", "qa_train")
# The device searcher's jitted search (retrieval/device_searcher.py): approx_max_k per shard,
# as `top_k=auto` does on TPU, and the exact `jax.lax.top_k` variant beside it.
SEARCH_STEPS = ("device_search", "device_search_exact")
STEPS = MODEL_STEPS + SEARCH_STEPS
DEFAULT_STEPS = MODEL_STEPS  # what --mode=compile compiles

# REALM's Wikipedia index (Guu et al. 2020: 13.35M blocks of 288 tokens), the default table.
REALM_NUM_BLOCKS = 13_350_000


@dataclasses.dataclass(frozen=True)
class SearchShape:
  """What the device-search compile searches: a [num_docs, dim] table of `dtype` rows split over
  the mesh's `data` axis, `batch` queries, `k` results each (the trainer asks for
  retrieval.k - 1 + retrieval.margin), approx_max_k at `recall_target`."""

  num_docs: int = REALM_NUM_BLOCKS
  dim: int = 128
  batch: int = 512
  k: int = 9
  dtype: str = "bfloat16"
  recall_target: float = 0.95

  @classmethod
  def from_config(cls, config, num_docs: int = REALM_NUM_BLOCKS) -> "SearchShape":
    """The trainer's search of `config`: its batch, embed_dim, k - 1 + margin, device dtype
    and recall target (retrieval.device), over `num_docs` rows."""
    r = config.retrieval
    device = dict(r.get("device", None) or {})
    return cls(num_docs=num_docs, dim=config.model.embed_dim, batch=config.train.batch_size,
               k=r.k - 1 + r.margin, dtype=device.get("dtype", "float32"),
               recall_target=float(device.get("recall_target", 0.95)))


def search_args(shape: SearchShape, mesh) -> tuple[Any, Any]:
  """Abstract (queries [B, D] float32 batch-sharded, table [S * R, D] rows over `data`) as
  `DeviceSearcher.search_device` receives them (R = ceil(N / S) rows per shard, zero-padded)."""
  import jax  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top
  from realm_jax.train import partitioning  # pylint: disable=g-import-not-at-top
  shards = mesh.shape[partitioning.DATA_AXIS]
  rows = -(-shape.num_docs // shards) * shards
  queries = jax.ShapeDtypeStruct((shape.batch, shape.dim), jax.numpy.float32,
                                 sharding=NamedSharding(mesh, P(partitioning.DATA_AXIS)))
  table = jax.ShapeDtypeStruct((rows, shape.dim), jax.numpy.dtype(shape.dtype),
                               sharding=NamedSharding(mesh, P(partitioning.DATA_AXIS, None)))
  return queries, table


def search_flops(shape: SearchShape) -> float:
  """The search's matmul FLOPs (2 B N D over the whole table; top-k and merge not counted)."""
  return 2.0 * shape.batch * shape.num_docs * shape.dim


def compile_for_topology(config, topology: str, steps: Iterable[str] = DEFAULT_STEPS,
                         pad_id: int = 0, search: SearchShape | None = None) -> dict[str, Any]:
  """Compiles `steps` for `topology`; returns the report (JSON-able). Does not raise on a step
  that does not fit: its report says `fits: false` (or carries `error`); see `check_result`.

  The train state is laid out by `config.partitioning`'s rules over `config.mesh`, as the
  trainer does (replicated without an `fsdp` axis). The search steps compile the device
  searcher's function for `search` (default `SearchShape.from_config(config)`) on a mesh of
  all the topology's chips on `data` (the table is split over `data` only)."""
  import jax  # pylint: disable=g-import-not-at-top

  from realm_jax import config_lib  # pylint: disable=g-import-not-at-top
  from realm_jax.qa import finetune  # pylint: disable=g-import-not-at-top
  from realm_jax.retrieval import device_searcher  # pylint: disable=g-import-not-at-top
  from realm_jax.qa import steps as qa_steps  # pylint: disable=g-import-not-at-top
  from realm_jax.train import flops as flops_lib  # pylint: disable=g-import-not-at-top
  from realm_jax.train import partitioning  # pylint: disable=g-import-not-at-top
  from realm_jax.train import state as state_lib  # pylint: disable=g-import-not-at-top
  from realm_jax.train import steps as steps_lib  # pylint: disable=g-import-not-at-top

  steps = list(steps)
  unknown = sorted(set(steps) - set(STEPS))
  if unknown:
    raise ValueError(f"unknown steps {unknown}; choose from {list(STEPS)}")
  if "qa_train" in steps and "qa" not in config:
    steps.remove("qa_train")  # a pretraining config has no QA step to compile
  config_lib.check_fields(config)
  chip, devices = topology_devices(topology)
  mesh = partitioning.make_mesh(config.mesh, devices)
  chips = math.prod(mesh.shape.values())
  shards = partitioning.data_parallel_size(mesh)
  batch_sharding = partitioning.batch_sharded(mesh)
  vocab = config.data.vocab_size
  dims = flops_lib.ModelDims.from_config(config, vocab)
  result: dict[str, Any] = {
      "topology": topology, "chip": dataclasses.asdict(chip), "num_chips": chips,
      "num_hosts": len({d.process_index for d in devices}), "mesh": dict(mesh.shape),
      "model": config.model.size, "dtype": config.model.dtype, "remat": bool(config.model.remat),
      "vocab_size": vocab, "query_len": config.data.query_len, "doc_len": config.data.doc_len,
      "max_masked": config.data.max_masked, "jax_version": jax.__version__, "steps": {}}

  def run(name, make_args):
    try:
      jitted, args, analytic_flops = make_args()
      _LOG.info("compiling %s for %s (%d chips) ...", name, topology, chips)
      result["steps"][name] = compile_step(name, jitted, args, chip, topology, analytic_flops)
      _LOG.info("compiled %s in %.0f s", name, result["steps"][name]["compile_seconds"])
    except StepDoesNotFitError as e:
      result["steps"][name] = {"step": name, "fits": False, "error": str(e), **e.details}

  if any(name in SEARCH_STEPS for name in steps):
    search = search or SearchShape.from_config(config)
    search_mesh = partitioning.make_mesh([(partitioning.DATA_AXIS, -1)], devices)
    search_shards = search_mesh.shape[partitioning.DATA_AXIS]
    _require_divisible("search batch", search.batch, search_shards)
    rows_per_shard = -(-search.num_docs // search_shards)
    result["search"] = dict(dataclasses.asdict(search), shards=search_shards,
                            rows_per_shard=rows_per_shard,
                            table_bytes_per_chip=rows_per_shard * search.dim
                            * jax.numpy.dtype(search.dtype).itemsize)
    for name in SEARCH_STEPS:
      if name in steps:
        approx = name == "device_search"
        # The searcher's own jitted function (what DeviceSearcher.search_device calls).
        fn = device_searcher._compiled_search(  # pylint: disable=protected-access
            search_mesh, min(search.k, search.num_docs), search.num_docs, approx,
            search.recall_target)
        run(name, lambda fn=fn: (fn, search_args(search, search_mesh),
                                 search_flops(search) / search_shards))
  if not any(name in MODEL_STEPS for name in steps):
    return result

  model = state_lib.build_model(config, vocab, pad_id)
  abstract_state = state_lib.abstract_train_state(config, model, jax.random.key(config.seed))
  state_sharding = partitioning.state_shardings_from_config(abstract_state, mesh, config)
  state = partitioning.with_shardings(abstract_state, state_sharding)
  result["params"] = sum(math.prod(x.shape)
                         for x in jax.tree_util.tree_leaves(abstract_state.params))
  result["train_state_bytes"] = tree_bytes(abstract_state)
  result["train_state_bytes_per_chip"] = partitioning.bytes_per_device(abstract_state,
                                                                       state_sharding)

  if "realm_train" in steps:
    b, k = config.train.batch_size, config.retrieval.k
    _require_divisible("train.batch_size", b, shards)
    result.update(batch_size=b, k=k)
    flops = flops_lib.step_flops_from_config(config, "realm", b, k, vocab).train_step
    run("realm_train", lambda: (
        steps_lib.make_realm_train_step(model, mesh, config.seed, config.loss.marginalization,
                                        state_sharding),
        (state, _sharded_batch(realm_batch_shapes(config, b, k), batch_sharding)),
        flops / chips))

  if "embed_docs" in steps:
    # The index builder's call: params of the train state, rows padded to a multiple of the
    # data-parallel devices (retrieval/index_builder.py:embed_rows).
    n = max(shards, config.retrieval.embed_batch_size // shards * shards)
    ld = config.data.doc_len
    result["embed_batch_size"] = n
    tokens = jax.ShapeDtypeStruct((n, ld), jax.numpy.int32, sharding=batch_sharding)
    flops = flops_lib.embedder_flops(n, ld, dims)  # forward only: no backward in this step
    run("embed_docs", lambda: (steps_lib.make_embed_fns(model, mesh)[1],
                               (state.params, tokens, tokens), flops / chips))

  if "qa_train" in steps:
    qa = config.qa
    _require_divisible("qa.batch_size", qa.batch_size, shards)
    result["qa"] = {"batch_size": qa.batch_size, "retriever_k": qa.retriever_k,
                    "reader_k": qa.reader_k, "question_len": qa.question_len}
    qa_model = finetune.build_qa_model(config, vocab, pad_id)
    shapes = qa_batch_shapes(config, qa.batch_size, qa_model.config.embed_dim)
    one = {key: jax.ShapeDtypeStruct((1,) + shape[1:], dtype)
           for key, (shape, dtype) in shapes.items()}
    tx = finetune._tx(config)  # pylint: disable=protected-access  (the loop's optimizer)
    qa_state = jax.eval_shape(
        lambda r: qa_steps.create_qa_train_state(qa_model, r, one, tx),
        jax.random.key(config.seed))
    # train/flops.py counts REALM and ICT only: the QA step has no analytic cross-check.
    qa_sharding = partitioning.state_shardings_from_config(qa_state, mesh, config)
    run("qa_train", lambda: (qa_steps.make_qa_train_step(qa_model, mesh, config.seed,
                                                         qa_sharding),
                             (partitioning.with_shardings(qa_state, qa_sharding),
                              _sharded_batch(shapes, batch_sharding)), None))
  return result


def check_result(result: dict[str, Any]) -> None:
  """Raises `StepDoesNotFitError` naming every step that does not fit (after the report)."""
  chip = ChipSpec(**result["chip"])
  problems = []
  for report in result["steps"].values():
    if report.get("error"):
      problems.append(report["error"])
    elif not report["fits"]:
      problems.append(does_not_fit_message(report, chip, result["topology"]))
  if problems:
    raise StepDoesNotFitError("; ".join(problems))


def _si(value: float, unit: str) -> str:
  for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
    if abs(value) >= scale:
      return f"{value / scale:.3g} {prefix}{unit}"
  return f"{value:.3g} {unit}"


def format_result(result: dict[str, Any]) -> str:
  """The human-readable report, one block per step."""
  chip = result["chip"]
  lines = [f"{result['topology']}: {result['num_chips']} x {chip['name']} "
           f"({result['num_hosts']} host(s)), mesh {result['mesh']}; peak "
           f"{_si(chip['peak_bf16_flops'], 'FLOP/s')} bf16, {_gib(chip['hbm_bytes'])} HBM at "
           f"{_si(chip['hbm_bytes_per_second'], 'B/s')} per chip"]
  if "params" in result:
    per_chip = result.get("train_state_bytes_per_chip", result["train_state_bytes"])
    lines.append(f"model {result['model']} ({result['params'] / 1e6:.1f}M params, "
                 f"{result['dtype']}{', remat' if result['remat'] else ''}), train state "
                 f"{_gib(result['train_state_bytes'])}, {_gib(per_chip)} per chip")
  if "search" in result:
    s = result["search"]
    lines.append(f"device search: {s['num_docs']:,} x {s['dim']} {s['dtype']} rows over "
                 f"{s['shards']} chips ({s['rows_per_shard']:,} rows = "
                 f"{_gib(s['table_bytes_per_chip'])} per chip), {s['batch']} queries, k = "
                 f"{s['k']}, approx recall target {s['recall_target']}")
  for name, r in result["steps"].items():
    lines.append(f"[{name}]")
    if r.get("error"):
      lines.append(f"  DOES NOT FIT: {r['error']}")
      continue
    lines.append(f"  compile {r['compile_seconds']:.1f} s; per chip: arguments "
                 f"{_gib(r['argument_bytes'])}, outputs {_gib(r['output_bytes'])} (donated "
                 f"{_gib(r['alias_bytes'])}), temporaries {_gib(r['temp_bytes'])}, code "
                 f"{_gib(r['generated_code_bytes'])} = {_gib(r['total_bytes'])} of "
                 f"{_gib(r['hbm_bytes'])}{'' if r['fits'] else '  DOES NOT FIT'}")
    xla_bound = "compute" if r["compute_seconds"] >= r["memory_seconds"] else "memory"
    lines.append(f"  XLA: {_si(r['xla_flops'], 'FLOP')}, {_si(r['xla_bytes_accessed'], 'B')} "
                 f"accessed per chip -> roofline "
                 f"{max(r['compute_seconds'], r['memory_seconds']) * 1e3:.2f} ms "
                 f"({xla_bound}-bound: compute {r['compute_seconds'] * 1e3:.2f} ms, HBM "
                 f"{r['memory_seconds'] * 1e3:.2f} ms)")
    if r.get("analytic_flops") and r["bound"].startswith("compute (analytic"):
      lines.append(f"  roofline raised to the analytic FLOPs' compute time "
                   f"{r['roofline_seconds'] * 1e3:.2f} ms: XLA counts each of the step's "
                   f"{r.get('while_loops') or 'its'} while loops' bodies once")
    if r.get("analytic_flops"):
      verdict = "agree" if r["flops_agree"] else "DISAGREE"
      source = "2 B N D matmul" if name in SEARCH_STEPS else "train/flops.py"
      lines.append(f"  analytic ({source}) {_si(r['analytic_flops'], 'FLOP')} per chip: "
                   f"analytic / XLA = {r['analytic_over_xla']:.3f} ({verdict} within "
                   f"{AGREE_TOLERANCE:.0%})")
    else:
      lines.append("  analytic: n/a (train/flops.py has no count for this step)")
  return "\n".join(lines)


def run_compile_mode(config, topology: str | None, output: str | None) -> int | str:
  """`--mode=compile`: prints (and writes --output JSON) the report; 0, or an error line."""
  from realm_jax import config_lib  # pylint: disable=g-import-not-at-top
  if not topology:
    return "error: --mode=compile needs --topology, e.g. --topology=v5e:8x8"
  try:
    result = compile_for_topology(config, topology)
  except (TopologyError, config_lib.ConfigError) as e:
    return f"error: {e}"
  print(format_result(result), flush=True)
  if output:
    with open(output, "w") as f:
      json.dump(result, f, indent=2, sort_keys=True)
    print(f"wrote {output}", flush=True)
  try:
    check_result(result)
  except StepDoesNotFitError as e:
    return f"error: {e}"
  return 0
