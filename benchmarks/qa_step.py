r"""Open-QA fine-tuning: the jitted QA train step at batch 1 vs batch 32, and the host cost of
answer matching (cold and from the cache).

  python benchmarks/qa_step.py --config=experiments/openqa_facts.py:size=tiny
  python benchmarks/qa_step.py --config=experiments/openqa_facts.py:size=tiny \
      --batch_sizes=1,32 --steps=30 --out=/tmp/qa_step.json

What it builds, as `realm_jax.qa.finetune.finetune_qa` does for a run from scratch: the corpus
(`finetune.setup`, the facts corpus of the config with `--num_entities` entities, prepared under
`--workdir` or a temporary folder), the QA model (query tower + reader) with its random initial
parameters, a frozen index embedded once with the initial document tower (the start-up index
of a run with no `qa.init_from`), and the training questions of the config.

1. **Train step** (`qa.steps.make_qa_train_step`, the function the fine-tuning loop runs), for
   each `--batch_sizes` B: the first B questions of the loop's batch 0 (`finetune.batch_rows`),
   their top `qa.retriever_k` blocks from the index, the batch from `build_qa_batch`. Compiled
   ahead of time (`steps.compile_with_report`: XLA's FLOPs and memory of the executable), then
   `--warmup` untimed and `--steps` timed steps, each blocking on the new state and metrics;
   the same device batch every step, the train state donated from step to step. Reported:
   median and p90 step time, examples/s = B / median, XLA FLOPs/step (cost analysis; absent on
   backends that do not give one) and the achieved FLOP/s.
2. **Answer matching** (host, `qa.batches.AnswerMatcher` / `build_qa_batch`), over the first
   `--match_examples` training questions and their top-K retrieved blocks: matcher
   construction (each question's answers tokenized once), then `build_qa_batch` in batches of
   `--match_batch` questions on a fresh matcher (cold: every (question, block) pair is matched
   for the first time) and again with the same ids (warm: every pair from the cache). The
   matching alone (`matcher.spans` over the same pairs) is timed the same way. Each is the
   median of `--match_repeats` fresh matchers; per example = per question with its K blocks.

CPU-friendly by default: the config's tiny model, 400 entities, 20 steps per batch size.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from typing import Any

from absl import app
from absl import flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from machine import cpu_model, git_state, time_steps  # pylint: disable=g-import-not-at-top,wrong-import-position

_CONFIG = config_flags.DEFINE_config_file("config", None, "Open-QA experiment config file.",
                                          lock_config=True)
_BATCH_SIZES = flags.DEFINE_list("batch_sizes", ["1", "32"], "Global batch sizes (questions) "
                                 "to time the train step at.")
_STEPS = flags.DEFINE_integer("steps", 20, "Timed steps per batch size (after warm-up).")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps after compilation.")
_NUM_ENTITIES = flags.DEFINE_integer(
    "num_entities", 400, "Entities of the facts corpus (sets data.num_entities; 0 = the "
    "config's). The step's shapes do not depend on it, only the vocabulary trained on it does.")
_MATCH_EXAMPLES = flags.DEFINE_integer("match_examples", 256, "Questions whose answer "
                                       "matching is timed (capped at the training questions).")
_MATCH_BATCH = flags.DEFINE_integer("match_batch", 32, "Questions per build_qa_batch call in "
                                    "the matching measurement.")
_MATCH_REPEATS = flags.DEFINE_integer("match_repeats", 3, "Fresh matchers timed (median).")
_WORKDIR = flags.DEFINE_string("workdir", "", "Where the corpus is prepared (kept, reused by "
                               "the next run); default: a temporary folder, removed at the end.")
_OUT = flags.DEFINE_string("out", "", "Also write the results as JSON to this path.")


def _stats(times) -> dict[str, float]:
  import numpy as np  # pylint: disable=g-import-not-at-top
  return dict(median=float(np.median(times)), p90=float(np.percentile(times, 90)),
              mean=float(np.mean(times)), min=float(np.min(times)), max=float(np.max(times)))


def _retrieve(world, params, searcher, tokens, rows, k):
  """Top-k block ids of questions `rows` with the live query tower (as the loop does)."""
  from realm_jax.train import partitioning  # pylint: disable=g-import-not-at-top
  emb = world.embed_questions(params, partitioning.shard_batch({"t": tokens[rows]},
                                                               world.mesh)["t"])
  ids, _ = searcher.search(partitioning.local_rows(emb), k)
  return ids


def measure_matching(world, tokens, ids, embeddings, num_batch: int, repeats: int
                     ) -> dict[str, Any]:
  """Cold and warm host cost of answer matching over questions 0..len(ids)-1 and their ids."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from realm_jax.qa import batches as batches_lib  # pylint: disable=g-import-not-at-top

  qa = world.config.qa
  n, k = ids.shape
  rows = np.arange(n)
  chunks = [rows[i:i + num_batch] for i in range(0, n, num_batch)]
  examples = world.train[:n]
  runs = dict(construct=[], batch_cold=[], batch_warm=[], spans_cold=[], spans_warm=[])
  has_answer = hits = misses = None
  for _ in range(repeats):
    # build_qa_batch on a fresh matcher: cold, then the same batches again: warm.
    start = time.perf_counter()
    matcher = world.matcher(examples)
    runs["construct"].append(time.perf_counter() - start)
    for kind in ("batch_cold", "batch_warm"):
      start = time.perf_counter()
      built = [batches_lib.build_qa_batch(c, tokens, ids[c], embeddings, matcher, qa.reader_k)
               for c in chunks]
      runs[kind].append(time.perf_counter() - start)
    has_answer = np.concatenate([b["cand_has_answer"] for b in built])
    hits, misses = matcher.cache.hits, matcher.cache.misses
    # The matching alone, on another fresh matcher.
    matcher = world.matcher(examples)
    for kind in ("spans_cold", "spans_warm"):
      start = time.perf_counter()
      for r in range(n):
        for j in range(k):
          matcher.spans(r, int(ids[r, j]))
      runs[kind].append(time.perf_counter() - start)
  med = {kind: float(np.median(v)) for kind, v in runs.items()}
  per_example = {kind: value / n for kind, value in med.items()}
  return dict(
      examples=n, blocks_per_example=k, reader_k=qa.reader_k, batch=num_batch,
      repeats=repeats, pairs=n * k,
      seconds_total=med, seconds_per_example=per_example,
      seconds_per_pair={kind: value / (n * k) for kind, value in med.items()
                        if kind.startswith("spans")},
      cache_hits_per_repeat=int(hits), cache_misses_per_repeat=int(misses),
      pairs_with_answer=float(has_answer.mean()),
      examples_with_answer_in_top_k=float(has_answer.any(-1).mean()),
  )


def measure_step(world, init_params, tx, searcher, embeddings, tokens, batch_size: int,
                 steps: int, warmup: int) -> dict[str, Any]:
  """Compiles and times the QA train step at `batch_size`."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from flax.training import train_state  # pylint: disable=g-import-not-at-top

  from realm_jax.qa import batches as batches_lib  # pylint: disable=g-import-not-at-top
  from realm_jax.qa import finetune  # pylint: disable=g-import-not-at-top
  from realm_jax.qa import steps as qa_steps  # pylint: disable=g-import-not-at-top
  from realm_jax.train import partitioning  # pylint: disable=g-import-not-at-top
  from realm_jax.train import steps as steps_lib  # pylint: disable=g-import-not-at-top

  config, mesh, qa = world.config, world.mesh, world.config.qa
  shards = partitioning.data_parallel_size(mesh)
  if batch_size % shards:
    raise ValueError(f"batch size {batch_size} is not divisible by the mesh's {shards} "
                     "data-parallel shards")
  replicated = partitioning.replicated(mesh)
  rows = finetune.batch_rows(len(world.train), batch_size, config.seed, 0)
  ids = _retrieve(world, jax.device_put(init_params, replicated), searcher, tokens, rows,
                  qa.retriever_k)
  matcher = world.matcher(world.train)
  host = batches_lib.build_qa_batch(rows, tokens, ids, embeddings, matcher, qa.reader_k)
  batch = partitioning.shard_batch(host, mesh)
  state = jax.device_put(train_state.TrainState.create(
      apply_fn=world.model.apply, params=jax.tree_util.tree_map(np.array, init_params),
      tx=tx).replace(step=np.zeros((), np.int32)), replicated)
  step_fn = qa_steps.make_qa_train_step(world.model, mesh, config.seed)

  start = time.perf_counter()
  compiled, report = steps_lib.compile_with_report(step_fn, state, batch)
  compile_seconds = time.perf_counter() - start
  state, metrics, times = time_steps(compiled, state, batch, warmup, steps)
  metrics = {key: float(v) for key, v in jax.device_get(metrics).items()}
  step = _stats(times)
  flops = report.get("flops_per_step")
  return dict(
      batch_size=batch_size,
      shapes={key: list(value.shape) for key, value in host.items()},
      lower_and_compile_seconds=compile_seconds,
      memory={key: value for key, value in report.items() if key.endswith("_bytes")},
      xla_flops_per_step=flops,
      xla_flops_per_example=None if flops is None else flops / batch_size,
      warmup_steps=warmup, timed_steps=steps, step_seconds=step,
      step_seconds_per_example=step["median"] / batch_size,
      examples_per_second=batch_size / step["median"],
      achieved_flops_per_second=None if flops is None else flops / step["median"],
      reader_blocks_with_answer=float(host["span_is_correct"].any(-1).mean()),
      final_metrics=metrics,
  )


def run(config, batch_sizes: list[int], steps: int, warmup: int, workdir: str,
        match_examples: int, match_batch: int, match_repeats: int) -> dict[str, Any]:
  """Builds the corpus, model, index and questions; measures steps and matching."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from realm_jax.qa import finetune  # pylint: disable=g-import-not-at-top
  from realm_jax.retrieval import in_process  # pylint: disable=g-import-not-at-top
  from realm_jax.retrieval import searcher as searcher_lib  # pylint: disable=g-import-not-at-top
  from realm_jax.train import partitioning  # pylint: disable=g-import-not-at-top
  from realm_jax.train import state as state_lib  # pylint: disable=g-import-not-at-top

  start = time.perf_counter()
  world = finetune.setup(config, workdir)
  setup_seconds = time.perf_counter() - start
  qa, corpus, mesh = config.qa, world.corpus, world.mesh
  init = jax.jit(world.model.init)(jax.random.key(config.seed), *world.dummy_batch().values())
  params = jax.device_get(init["params"])

  # The start-up index of a run without qa.init_from: the corpus embedded once with the
  # initial (shared) tower, searched exactly.
  start = time.perf_counter()
  embed_docs = finetune.make_doc_embed_fn(world.model, mesh)
  embeddings = in_process.embed_corpus(
      jax.device_put(params["query_embedder"], partitioning.replicated(mesh)), corpus,
      embed_docs, mesh, config.retrieval.embed_batch_size, progress_name="qa_step index")
  index_seconds = time.perf_counter() - start
  searcher = searcher_lib.ExactSearcher(embeddings)
  tokens = world.encode(world.train)
  tx = finetune._tx(config)  # pylint: disable=protected-access  # the loop's optimizer

  step_results = [measure_step(world, params, tx, searcher, embeddings, tokens, b, steps,
                               warmup) for b in batch_sizes]

  n = min(match_examples, len(world.train))
  ids = _retrieve(world, jax.device_put(params, partitioning.replicated(mesh)), searcher,
                  tokens, np.arange(n), qa.retriever_k)
  matching = measure_matching(world, tokens, ids, embeddings, match_batch, match_repeats)

  device = jax.devices()[0]
  return dict(
      size=config.model.size, dtype=config.model.dtype,
      params=state_lib.count_params(params),
      num_entities=config.data.num_entities, corpus_blocks=corpus.num_docs,
      vocab_size=corpus.vocab_size, train_questions=len(world.train),
      question_len=qa.question_len, body_len=corpus.body_len, retriever_k=qa.retriever_k,
      reader_k=qa.reader_k, max_span_width=qa.max_span_width,
      platform=device.platform, device_kind=device.device_kind,
      num_devices=int(np.prod(list(mesh.shape.values()))), mesh=dict(mesh.shape),
      setup_seconds=setup_seconds, index_seconds=index_seconds,
      steps=step_results, matching=matching)


def _si(value: float, unit: str = "") -> str:
  for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
    if abs(value) >= scale:
      return f"{value / scale:.3g} {prefix}{unit}"
  return f"{value:.3g} {unit}".rstrip()


def _us(seconds: float) -> str:
  return f"{seconds * 1e6:.1f} us" if seconds < 1e-3 else f"{seconds * 1e3:.2f} ms"


def format_table(r: dict[str, Any]) -> str:
  lines = [
      f"model {r['size']} ({r['params'] / 1e6:.2f}M params, {r['dtype']}), facts corpus of "
      f"{r['num_entities']} entities = {r['corpus_blocks']} blocks, vocab {r['vocab_size']}, "
      f"{r['train_questions']} training questions",
      f"Lq={r['question_len']}, block body {r['body_len']}, retriever_k={r['retriever_k']}, "
      f"reader_k={r['reader_k']}, max span width {r['max_span_width']}; "
      f"{r['num_devices']} x {r['device_kind']} [{r['platform']}]",
      f"setup (corpus, tokenizer, questions) {r['setup_seconds']:.1f} s, start-up index "
      f"{r['index_seconds']:.1f} s",
      "",
  ]
  cols = [f"B={s['batch_size']}" for s in r["steps"]]
  rows = [("lower + compile", [f"{s['lower_and_compile_seconds']:.2f} s" for s in r["steps"]]),
          ("timed steps", [f"{s['timed_steps']} (after {s['warmup_steps']})"
                           for s in r["steps"]]),
          ("step median", [f"{s['step_seconds']['median'] * 1e3:.1f} ms" for s in r["steps"]]),
          ("step p90", [f"{s['step_seconds']['p90'] * 1e3:.1f} ms" for s in r["steps"]]),
          ("per example (median / B)", [f"{s['step_seconds_per_example'] * 1e3:.2f} ms"
                                        for s in r["steps"]]),
          ("examples/s", [f"{s['examples_per_second']:.1f}" for s in r["steps"]]),
          ("XLA FLOPs/step", [_si(s["xla_flops_per_step"], "FLOP") if s["xla_flops_per_step"]
                              else "n/a" for s in r["steps"]]),
          ("XLA FLOPs/example", [_si(s["xla_flops_per_example"], "FLOP")
                                 if s["xla_flops_per_example"] else "n/a" for s in r["steps"]]),
          ("achieved", [_si(s["achieved_flops_per_second"], "FLOP/s")
                        if s["achieved_flops_per_second"] else "n/a" for s in r["steps"]]),
          ("temp memory", [f"{s['memory'].get('temp_size_bytes', 0) / 2**20:.1f} MiB"
                           for s in r["steps"]]),
          ("final loss", [f"{s['final_metrics']['loss']:.4f}" for s in r["steps"]])]
  if len(r["steps"]) >= 2:
    first, last = r["steps"][0], r["steps"][-1]
    ratio = last["examples_per_second"] / first["examples_per_second"]
    rows.append((f"examples/s vs B={first['batch_size']}",
                 ["1.00x"] * (len(cols) - 1) + [f"{ratio:.2f}x"]))
  width = max(len(name) for name, _ in rows)
  colw = max(max(len(c) for c in cols), max(len(v) for _, vals in rows for v in vals))
  lines.append(f"{'QA train step':<{width}}  " + "  ".join(f"{c:>{colw}}" for c in cols))
  for name, values in rows:
    lines.append(f"{name:<{width}}  " + "  ".join(f"{v:>{colw}}" for v in values))

  m = r["matching"]
  pe, pp = m["seconds_per_example"], m["seconds_per_pair"]
  lines += [
      "",
      f"answer matching (host): {m['examples']} questions x {m['blocks_per_example']} blocks "
      f"= {m['pairs']} pairs, build_qa_batch in batches of {m['batch']}, median of "
      f"{m['repeats']} fresh matchers; {100 * m['pairs_with_answer']:.1f}% of pairs hold an "
      f"answer, {100 * m['examples_with_answer_in_top_k']:.1f}% of questions have one in "
      "their top-K",
      f"  matcher construction        {_us(pe['construct'])} per example",
      f"  build_qa_batch, cold        {_us(pe['batch_cold'])} per example",
      f"  build_qa_batch, warm        {_us(pe['batch_warm'])} per example "
      f"(cold/warm {pe['batch_cold'] / pe['batch_warm']:.1f}x)",
      f"  matching only, cold         {_us(pe['spans_cold'])} per example, "
      f"{_us(pp['spans_cold'])} per (question, block)",
      f"  matching only, warm (cache) {_us(pe['spans_warm'])} per example, "
      f"{_us(pp['spans_warm'])} per (question, block)",
      f"  cache per repeat: {m['cache_misses_per_repeat']} misses, "
      f"{m['cache_hits_per_repeat']} hits",
  ]
  for s in r["steps"]:
    lines.append(f"  warm build_qa_batch / step time per example at B={s['batch_size']}: "
                 f"{100 * pe['batch_warm'] / s['step_seconds_per_example']:.2f}% "
                 f"(cold {100 * pe['batch_cold'] / s['step_seconds_per_example']:.2f}%)")
  return "\n".join(lines)


def _mem_total_gib() -> float | None:
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemTotal:"):
          return int(line.split()[1]) / 2**20
  except OSError:
    pass
  return None


def _load() -> float | None:
  return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  for noisy in ("absl", "jax._src", "orbax", "etils", "realm_jax"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  if _CONFIG.value is None:
    sys.exit("error: --config is required, e.g. --config=experiments/openqa_facts.py:size=tiny")
  if _STEPS.value < 1 or _WARMUP.value < 0:
    sys.exit("error: --steps must be >= 1 and --warmup >= 0")
  if min(_MATCH_EXAMPLES.value, _MATCH_BATCH.value, _MATCH_REPEATS.value) < 1:
    sys.exit("error: --match_examples, --match_batch and --match_repeats must be >= 1")
  try:
    batch_sizes = [int(b) for b in _BATCH_SIZES.value]
  except ValueError:
    sys.exit(f"error: --batch_sizes must be integers, got {_BATCH_SIZES.value}")
  if not batch_sizes or min(batch_sizes) < 1:
    sys.exit("error: --batch_sizes must be positive")
  config = _CONFIG.value
  if "qa" not in config:
    sys.exit("error: the config has no qa section; use experiments/openqa_facts.py or "
             "experiments/openqa.py")
  from realm_jax import config_lib  # pylint: disable=g-import-not-at-top
  with config.unlocked():
    if _NUM_ENTITIES.value and config.data.get("corpus") == "facts":
      config.data.num_entities = _NUM_ENTITIES.value
    config.qa.init_from = config.qa.init_reader_from = config.qa.index_from = ""

  workdir = _WORKDIR.value or tempfile.mkdtemp(prefix="qa_step_")
  load_before = _load()
  try:
    result = run(config, batch_sizes, _STEPS.value, _WARMUP.value, workdir,
                 _MATCH_EXAMPLES.value, _MATCH_BATCH.value, _MATCH_REPEATS.value)
  except (config_lib.ConfigError, ValueError) as e:
    sys.exit(f"error: {e}")
  finally:
    if not _WORKDIR.value:
      shutil.rmtree(workdir, ignore_errors=True)

  import jax  # pylint: disable=g-import-not-at-top
  result.update(
      command=" ".join(["python"] + sys.argv), jax_version=jax.__version__, git=git_state(),
      cpu=cpu_model(), host_cpu_count=os.cpu_count(), ram_gib=_mem_total_gib(),
      load_average_1min_before=load_before, load_average_1min_after=_load(),
      date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
  print(format_table(result))
  print(f"machine: {result['cpu']}, {result['host_cpu_count']} cores, "
        f"{result['ram_gib']:.1f} GiB RAM; load average {load_before} -> "
        f"{result['load_average_1min_after']}; git {result['git']}; {result['date']}")
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      json.dump(result, f, indent=2, sort_keys=True)
    print(f"wrote {_OUT.value}")


if __name__ == "__main__":
  app.run(main)
