r"""Throughput and MFU of one REALM or ICT train step, on random data (no corpus, no index).

  python benchmarks/train_step.py --config=experiments/realm_facts.py:size=tiny
  python benchmarks/train_step.py --config=experiments/realm_facts.py:size=tiny --objective=ict
  python benchmarks/train_step.py --config=experiments/realm_facts.py:size=base \
      --config.model.dtype=bfloat16 --output=/tmp/base_bf16.json

What it measures: the jitted train step of `realm_jax.train.steps` (the same function the
training loop runs) on a batch already on the device, state donated from step to step. Host
work (retrieval, candidate gathering) is not part of it: the loop overlaps that with the step.

Order: build the model and state from the config, compile ahead of time (compile time and
XLA's memory analysis are reported), run `--warmup` steps, then time `--steps` steps with
`block_until_ready` on each step's outputs. Reported: median and p90 step time, examples/s,
tokens/s, the analytic model FLOPs per step (`realm_jax.train.flops`, train step = 3 x forward),
achieved FLOP/s, and MFU against the device's bf16 dense peak where the device is known (n/a on
CPU). Batch contents are random token ids with full-length queries and candidates, so every
position is a real token; FLOPs do not depend on the contents (all shapes are dense).
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import sys
import time
from typing import Any

from absl import app
from absl import flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from machine import cpu_model, git_state, time_steps  # pylint: disable=g-import-not-at-top,wrong-import-position

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_STEPS = flags.DEFINE_integer("steps", 20, "Timed steps (after warm-up).")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps after compilation.")
_BATCH_SIZE = flags.DEFINE_integer(
    "batch_size", 0, "Global batch (queries); 0 = the config's (train.batch_size for REALM, "
    "ict.batch_size for ICT).")
_K = flags.DEFINE_integer("k", 0, "REALM candidates per query, null document included; "
                          "0 = retrieval.k of the config.")
_OBJECTIVE = flags.DEFINE_enum("objective", None, ["realm", "ict"],
                               "Step to measure; default: the config's objective.")
_OUTPUT = flags.DEFINE_string("output", "", "Also write the results as JSON to this path.")

# bf16 dense peak FLOP/s per device (vendor figures, no sparsity). Matched in order against
# `device_kind`, case-insensitive, so the more specific names come first.
PEAK_BF16_FLOPS = (
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM
    ("H200", 989e12),
    ("A100", 312e12),
    ("TPU v4", 275e12),
    ("TPU v5 lite", 197e12),  # v5e
    ("TPU v5e", 197e12),
    ("TPU v5p", 459e12),
    ("TPU v5", 459e12),  # v5p reports itself as "TPU v5"
    ("TPU v6 lite", 918e12),  # v6e
    ("TPU v6e", 918e12),
)

# Special ids of a vocabulary built by realm_jax.data.tokenizer (SPECIAL_TOKENS order).
PAD, CLS, SEP, MASK = 0, 2, 3, 4
FIRST_WORD = 5
TITLE_LEN = 4


def peak_flops_per_device(device_kind: str) -> float | None:
  kind = device_kind.lower()
  for name, peak in PEAK_BF16_FLOPS:
    if name.lower() in kind:
      return peak
  return None


def realm_batch(rng, batch: int, k: int, query_len: int, doc_len: int, max_masked: int,
                vocab: int) -> dict[str, Any]:
  """Random REALM batch with `steps.REALM_KEYS`; slot 0 is the null document, as in training."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  words = lambda *shape: rng.integers(FIRST_WORD, vocab, size=shape, dtype=np.int32)
  query = words(batch, query_len)
  query[:, 0], query[:, -1] = CLS, SEP
  # M distinct masked positions per query, inside [CLS] ... [SEP].
  positions = np.sort(np.argsort(rng.random((batch, query_len - 2)), axis=1)[:, :max_masked],
                      axis=1).astype(np.int32) + 1
  labels = np.take_along_axis(query, positions, axis=1)
  np.put_along_axis(query, positions, MASK, axis=1)

  body_len = doc_len - 2
  docs = words(batch, k, doc_len)  # [CLS] title [SEP] body [SEP]
  docs[..., 0], docs[..., TITLE_LEN + 1], docs[..., -1] = CLS, SEP, SEP
  segments = np.zeros((batch, k, doc_len), np.int32)
  segments[..., TITLE_LEN + 2:] = 1
  bodies = np.full((batch, k, body_len), PAD, np.int32)  # body [SEP], right-padded
  bodies[..., :doc_len - TITLE_LEN - 2] = docs[..., TITLE_LEN + 2:]
  # The null document: [CLS] [SEP] [SEP] for the retriever, [SEP] for the reader.
  docs[:, 0] = PAD
  docs[:, 0, :3] = (CLS, SEP, SEP)
  segments[:, 0] = 0
  segments[:, 0, 2] = 1
  bodies[:, 0] = PAD
  bodies[:, 0, 0] = SEP
  return dict(query_tokens=query, masked_positions=positions, masked_labels=labels,
              masked_weights=np.ones((batch, max_masked), np.float32),
              cand_doc_tokens=docs, cand_doc_segments=segments, cand_body_tokens=bodies,
              cand_mask=np.ones((batch, k), bool),
              cand_is_gold=np.arange(k)[None, :].repeat(batch, 0) == 1)  # gold in slot 1


def ict_batch(rng, batch: int, query_len: int, doc_len: int, vocab: int) -> dict[str, Any]:
  """Random ICT batch with `steps.ICT_KEYS`."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  query = rng.integers(FIRST_WORD, vocab, size=(batch, query_len), dtype=np.int32)
  query[:, 0], query[:, -1] = CLS, SEP
  docs = rng.integers(FIRST_WORD, vocab, size=(batch, doc_len), dtype=np.int32)
  docs[:, 0], docs[:, TITLE_LEN + 1], docs[:, -1] = CLS, SEP, SEP
  segments = np.zeros((batch, doc_len), np.int32)
  segments[:, TITLE_LEN + 2:] = 1
  return dict(query_tokens=query, doc_tokens=docs, doc_segments=segments)


class _Precompiled:
  """Lets `steps.compile_report` read an executable compiled here (no second compilation)."""

  def __init__(self, compiled):
    self._compiled = compiled

  def lower(self, *unused_args):
    return self

  def compile(self):
    return self._compiled


def run(config, objective: str, batch_size: int, k: int, steps: int, warmup: int
        ) -> dict[str, Any]:
  """Compiles and times the train step; returns every number the table shows."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from realm_jax import config_lib  # pylint: disable=g-import-not-at-top
  from realm_jax.train import flops as flops_lib  # pylint: disable=g-import-not-at-top
  from realm_jax.train import partitioning  # pylint: disable=g-import-not-at-top
  from realm_jax.train import state as state_lib  # pylint: disable=g-import-not-at-top
  from realm_jax.train import steps as steps_lib  # pylint: disable=g-import-not-at-top

  is_ict = objective == "ict"
  config.objective = objective  # ICT freezes the encoder in the optimizer, as in training
  if is_ict:
    config.ict.batch_size = batch_size or config.ict.batch_size
    batch_size = config.ict.batch_size
  else:
    config.train.batch_size = batch_size or config.train.batch_size
    batch_size = config.train.batch_size
    config.retrieval.k = k or config.retrieval.k
    k = config.retrieval.k
  mesh = partitioning.make_mesh(config.mesh)
  num_devices = int(np.prod(list(mesh.shape.values())))
  config_lib.validate(config, partitioning.data_parallel_size(mesh), jax.process_count())
  d, vocab = config.data, config.data.vocab_size

  model = state_lib.build_model(config, vocab, PAD)
  state = jax.device_put(state_lib.create_train_state(config, model, jax.random.key(config.seed)),
                         partitioning.replicated(mesh))
  rng = np.random.default_rng(config.seed)
  if is_ict:
    host = ict_batch(rng, batch_size, d.query_len, d.doc_len, vocab)
    step_fn = steps_lib.make_ict_train_step(model, mesh, config.seed)
    keys = steps_lib.ICT_KEYS
    tokens_per_step = batch_size * (d.query_len + d.doc_len)
    encoder_positions = tokens_per_step
  else:
    host = realm_batch(rng, batch_size, k, d.query_len, d.doc_len, d.max_masked, vocab)
    step_fn = steps_lib.make_realm_train_step(model, mesh, config.seed,
                                              config.loss.marginalization)
    keys = steps_lib.REALM_KEYS
    tokens_per_step = batch_size * (d.query_len + k * d.doc_len)
    encoder_positions = tokens_per_step + batch_size * k * (d.query_len + d.doc_len - 2)
  missing = [key for key in keys if key not in host]
  if missing and missing != ["cand_is_gold"]:  # the one optional key
    raise KeyError(f"the benchmark does not generate batch keys {missing}")
  batch = partitioning.shard_batch({key: host[key] for key in keys if key in host}, mesh)

  start = time.perf_counter()
  lowered = step_fn.lower(state, batch)
  lower_seconds = time.perf_counter() - start
  start = time.perf_counter()
  compiled = lowered.compile()
  compile_seconds = time.perf_counter() - start
  report = steps_lib.compile_report(_Precompiled(compiled), state, batch)

  state, metrics, times = time_steps(compiled, state, batch, warmup, steps)
  loss = float(jax.device_get(metrics["loss"])) if metrics is not None else float("nan")

  step_flops = flops_lib.step_flops_from_config(config, objective, batch_size, k, vocab)
  median = float(np.median(times))
  device = jax.devices()[0]
  peak = peak_flops_per_device(device.device_kind) if device.platform != "cpu" else None
  achieved = step_flops.train_step / median
  return dict(
      objective=objective,
      size=config.model.size,
      dtype=config.model.dtype,
      remat=bool(config.model.remat),
      batch_size=batch_size,
      k=k if not is_ict else None,
      query_len=d.query_len, doc_len=d.doc_len, max_masked=d.max_masked, vocab_size=vocab,
      params=state_lib.count_params(state.params),
      platform=device.platform, device_kind=device.device_kind, num_devices=num_devices,
      mesh=dict(mesh.shape),
      lower_seconds=lower_seconds, compile_seconds=compile_seconds,
      memory={key: value for key, value in report.items() if key.endswith("_bytes")},
      xla_flops_per_step=report.get("flops_per_step"),
      warmup_steps=warmup, timed_steps=steps,
      step_seconds=dict(median=median, p90=float(np.percentile(times, 90)),
                        mean=float(np.mean(times)), min=float(np.min(times)),
                        max=float(np.max(times))),
      examples_per_second=batch_size / median,
      tokens_per_step=tokens_per_step,
      tokens_per_second=tokens_per_step / median,
      encoder_positions_per_step=encoder_positions,
      model_flops_per_step=step_flops.train_step,
      model_flops_forward_parts=step_flops.parts,
      achieved_flops_per_second=achieved,
      peak_flops_per_device_bf16=peak,
      mfu=None if peak is None else achieved / (peak * num_devices),
      final_loss=loss,
  )


def _si(value: float, unit: str = "") -> str:
  for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
    if abs(value) >= scale:
      return f"{value / scale:.3g} {prefix}{unit}"
  return f"{value:.3g} {unit}".rstrip()


def format_table(r: dict[str, Any]) -> str:
  step = r["step_seconds"]
  mib = lambda b: f"{b / 2**20:.1f} MiB"
  rows = [
      ("objective", r["objective"]),
      ("model", f"{r['size']} ({r['params'] / 1e6:.2f}M params), {r['dtype']}"
                f"{', remat' if r['remat'] else ''}"),
      ("batch", f"B={r['batch_size']}" + (f", k={r['k']}" if r["k"] else "") +
                f", Lq={r['query_len']}, Ld={r['doc_len']}" +
                (f", M={r['max_masked']}" if r["objective"] == "realm" else "") +
                f", V={r['vocab_size']}"),
      ("device", f"{r['num_devices']} x {r['device_kind']} [{r['platform']}], mesh {r['mesh']}"),
      ("lower + compile", f"{r['lower_seconds']:.2f} s + {r['compile_seconds']:.2f} s"),
  ]
  for key, value in r["memory"].items():
    rows.append((f"memory: {key.replace('_bytes', '').replace('_', ' ')}", mib(value)))
  rows += [
      ("step time median / p90",
       f"{step['median'] * 1e3:.1f} ms / {step['p90'] * 1e3:.1f} ms "
       f"({r['timed_steps']} steps after {r['warmup_steps']} warm-up)"),
      ("examples/s", f"{r['examples_per_second']:.1f}"),
      ("tokens/s", f"{_si(r['tokens_per_second'])} ({r['tokens_per_step']} query + candidate "
                   "tokens/step)"),
      ("model FLOPs/step (3 x fwd)", _si(r["model_flops_per_step"], "FLOP")),
  ]
  forward = sum(r["model_flops_forward_parts"].values())
  for part, value in r["model_flops_forward_parts"].items():
    rows.append((f"  fwd {part}", f"{_si(value, 'FLOP')} ({100 * value / forward:.1f}%)"))
  if r["xla_flops_per_step"]:
    rows.append(("XLA cost analysis FLOPs/step",
                 f"{_si(r['xla_flops_per_step'], 'FLOP')} "
                 f"(analytic / XLA = {r['model_flops_per_step'] / r['xla_flops_per_step']:.3f})"))
  rows.append(("achieved", _si(r["achieved_flops_per_second"], "FLOP/s")))
  if r["mfu"] is None:
    rows.append(("MFU", "n/a (no known bf16 peak for this device)"))
  else:
    rows.append(("MFU", f"{100 * r['mfu']:.1f}% of {r['num_devices']} x "
                        f"{_si(r['peak_flops_per_device_bf16'], 'FLOP/s')} bf16 dense"))
  rows.append(("final loss", f"{r['final_loss']:.4f}"))
  width = max(len(name) for name, _ in rows)
  return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  for noisy in ("absl", "jax._src", "orbax", "etils"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  if _STEPS.value < 1 or _WARMUP.value < 0:
    sys.exit("error: --steps must be >= 1 and --warmup >= 0")
  if _CONFIG.value is None:
    sys.exit("error: --config is required, e.g. --config=experiments/realm_facts.py:size=tiny")
  from realm_jax import config_lib  # pylint: disable=g-import-not-at-top

  config = _CONFIG.value
  objective = _OBJECTIVE.value or config.objective
  if objective not in ("realm", "ict"):
    sys.exit(f"error: objective {objective!r} has no benchmark here; use --objective=realm|ict")
  load_before = load_average()
  try:
    result = run(config, objective, _BATCH_SIZE.value, _K.value, _STEPS.value, _WARMUP.value)
  except config_lib.ConfigError as e:
    sys.exit(f"config error: {e}")
  report(result, load_before, format_table)


def load_average() -> float | None:
  return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def report(result: dict[str, Any], load_before: float | None, formatter) -> None:
  """Adds the machine, software and time to `result`, prints it, writes --output JSON."""
  import jax  # pylint: disable=g-import-not-at-top
  result.update(
      command=" ".join(["python"] + sys.argv), jax_version=jax.__version__, git=git_state(),
      cpu=cpu_model(), host_cpu_count=os.cpu_count(), load_average_1min_before=load_before,
      load_average_1min_after=load_average(),
      date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
  print(formatter(result))
  if _OUTPUT.value:
    with open(_OUTPUT.value, "w") as f:
      json.dump(result, f, indent=2, sort_keys=True)
    print(f"wrote {_OUTPUT.value}")


if __name__ == "__main__":
  app.run(main)
