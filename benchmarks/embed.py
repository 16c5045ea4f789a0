r"""Embedding throughput of the index builder's document embedder, on random documents.

  python benchmarks/embed.py --config=experiments/realm_facts.py:size=tiny --num_docs=4096
  python benchmarks/embed.py --config=experiments/realm_facts.py:size=base \
      --config.model.dtype=bfloat16 --num_docs=65536 --batch_size=1024 --output=/tmp/embed.json

What it measures: the jitted `embed_docs` of `realm_jax.train.steps.make_embed_fns` (what
`realm_jax.retrieval.in_process.embed_corpus` calls on every refresh) over `--num_docs` random
full-length documents [N, data.doc_len] (segments 0 for the first 8 tokens, then 1), in
batches of `--batch_size`, parameters from `create_train_state` replicated on the mesh. The
first batch is compiled (and run once) before the clock starts; the timed loop does the same
host -> device -> host round trip per batch as `embed_corpus` (shard, embed, copy back).

Reported: docs/s, tokens/s, analytic forward FLOPs per document (`flops.embedder_flops`),
achieved FLOP/s, MFU against the bf16 dense peak of a known GPU/TPU (n/a on CPU), and the time
to re-embed REALM's Wikipedia index (13.35M blocks of 288 tokens) at this rate on 1 and 16
devices like this one, assuming constant time per token. That is approximate: through the
attention's t² term the analytic FLOPs per token grow from Ld = 48 to 288 by 1.05x for base
and 1.29x for tiny (both numbers are in the JSON: model_flops_per_doc[_wiki_block]).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_step as tsb  # pylint: disable=g-import-not-at-top,wrong-import-position

# train_step.py defines its own flags on import; keep --config and --output, drop the rest.
for _name in ("steps", "warmup", "batch_size", "k", "objective"):
  delattr(flags.FLAGS, _name)
_CONFIG, _OUTPUT = tsb._CONFIG, tsb._OUTPUT  # pylint: disable=protected-access
_NUM_DOCS = flags.DEFINE_integer("num_docs", 4096, "Random documents to embed (timed).")
_BATCH_SIZE = flags.DEFINE_integer(
    "batch_size", 0, "Documents per embed call; 0 = retrieval.embed_batch_size of the config.")

WIKI_BLOCKS = 13_350_000  # REALM's Wikipedia index (Guu et al. 2020)
WIKI_BLOCK_LEN = 288
TITLE_SEGMENT_LEN = 8  # segment 0 for the first 8 tokens, 1 after


def run(config, num_docs: int, batch_size: int) -> dict[str, Any]:
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from realm_jax.train import flops as flops_lib  # pylint: disable=g-import-not-at-top
  from realm_jax.train import partitioning  # pylint: disable=g-import-not-at-top
  from realm_jax.train import state as state_lib  # pylint: disable=g-import-not-at-top
  from realm_jax.train import steps as steps_lib  # pylint: disable=g-import-not-at-top

  mesh = partitioning.make_mesh(config.mesh)
  num_devices = int(np.prod(list(mesh.shape.values())))
  shards = partitioning.data_parallel_size(mesh)
  batch_size = batch_size or config.retrieval.embed_batch_size
  batch_size = max(shards, batch_size // shards * shards)  # as embed_corpus rounds it
  doc_len, vocab = config.data.doc_len, config.data.vocab_size

  model = state_lib.build_model(config, vocab, tsb.PAD)
  params = partitioning.replicate(
      state_lib.create_train_state(config, model, jax.random.key(config.seed)).params, mesh)
  _, embed_docs = steps_lib.make_embed_fns(model, mesh)

  rng = np.random.default_rng(config.seed)
  tokens = rng.integers(tsb.FIRST_WORD, vocab, size=(num_docs, doc_len), dtype=np.int32)
  tokens[:, 0], tokens[:, -1] = tsb.CLS, tsb.SEP
  segments = np.zeros((num_docs, doc_len), np.int32)
  segments[:, TITLE_SEGMENT_LEN:] = 1

  def batch(start):  # padded with copies of the first rows, like embed_corpus pads with null
    rows = np.arange(start, start + batch_size) % num_docs
    return partitioning.shard_batch_global({"t": tokens[rows], "s": segments[rows]}, mesh)

  start = time.perf_counter()
  first = batch(0)
  jax.block_until_ready(embed_docs(params, first["t"], first["s"]))
  compile_seconds = time.perf_counter() - start

  num_batches = -(-num_docs // batch_size)
  times = []
  start = time.perf_counter()
  for b in range(num_batches):
    t0 = time.perf_counter()
    device = batch(b * batch_size)
    emb = partitioning.to_host(jax.block_until_ready(embed_docs(params, device["t"], device["s"])))
    times.append(time.perf_counter() - t0)
  total = time.perf_counter() - start
  assert emb.shape == (batch_size, config.model.embed_dim) and np.isfinite(emb).all()

  dims = flops_lib.ModelDims.from_config(config, vocab)
  flops_per_doc = flops_lib.embedder_flops(1, doc_len, dims)
  docs_per_second = num_docs / total  # padding rows of the last batch are not counted
  achieved = docs_per_second * flops_per_doc
  device0 = jax.devices()[0]
  peak = tsb.peak_flops_per_device(device0.device_kind) if device0.platform != "cpu" else None
  # Constant time per token: a 288-token block costs 288 / doc_len of one of these documents.
  blocks_per_second = docs_per_second * doc_len / WIKI_BLOCK_LEN
  wiki_hours = {n: WIKI_BLOCKS / (blocks_per_second * n) / 3600 for n in (1, 16)}
  return dict(
      size=config.model.size, dtype=config.model.dtype, doc_len=doc_len, vocab_size=vocab,
      params=state_lib.count_params(params), embed_dim=config.model.embed_dim,
      num_docs=num_docs, batch_size=batch_size, num_batches=num_batches,
      platform=device0.platform, device_kind=device0.device_kind, num_devices=num_devices,
      mesh=dict(mesh.shape),
      compile_and_first_batch_seconds=compile_seconds,
      total_seconds=total,
      batch_seconds=dict(median=float(np.median(times)), p90=float(np.percentile(times, 90)),
                         min=float(np.min(times)), max=float(np.max(times))),
      docs_per_second=docs_per_second,
      tokens_per_second=docs_per_second * doc_len,
      model_flops_per_doc=flops_per_doc,
      model_flops_per_doc_wiki_block=flops_lib.embedder_flops(1, WIKI_BLOCK_LEN, dims),
      achieved_flops_per_second=achieved,
      peak_flops_per_device_bf16=peak,
      mfu=None if peak is None else achieved / (peak * num_devices),
      wiki_blocks=WIKI_BLOCKS, wiki_block_len=WIKI_BLOCK_LEN,
      wiki_assumption="time per token constant (blocks/s = docs/s * doc_len / 288)",
      wiki_hours_by_meshes=wiki_hours,  # N meshes like this one (N x num_devices devices)
  )


def format_table(r: dict[str, Any]) -> str:
  si = tsb._si  # pylint: disable=protected-access
  b = r["batch_seconds"]
  rows = [
      ("model", f"{r['size']} ({r['params'] / 1e6:.2f}M params), {r['dtype']}, "
                f"D={r['embed_dim']}"),
      ("documents", f"N={r['num_docs']}, Ld={r['doc_len']}, batch {r['batch_size']} "
                    f"({r['num_batches']} batches), V={r['vocab_size']}"),
      ("device", f"{r['num_devices']} x {r['device_kind']} [{r['platform']}], mesh {r['mesh']}"),
      ("compile + first batch", f"{r['compile_and_first_batch_seconds']:.2f} s (not timed)"),
      ("total / batch median / p90", f"{r['total_seconds']:.2f} s / {b['median'] * 1e3:.1f} ms"
                                     f" / {b['p90'] * 1e3:.1f} ms"),
      ("docs/s", f"{r['docs_per_second']:.1f}"),
      ("tokens/s", si(r["tokens_per_second"])),
      ("model FLOPs/doc (fwd)", si(r["model_flops_per_doc"], "FLOP")),
      ("achieved", si(r["achieved_flops_per_second"], "FLOP/s")),
      ("MFU", "n/a (no known bf16 peak for this device)" if r["mfu"] is None else
              f"{100 * r['mfu']:.1f}% of {r['num_devices']} x "
              f"{si(r['peak_flops_per_device_bf16'], 'FLOP/s')} bf16 dense"),
  ]
  for n, hours in r["wiki_hours_by_meshes"].items():
    rows.append((f"13.35M x 288 blocks, {n * r['num_devices']} device(s)",
                 f"{hours:.3g} h ({hours / 24:.3g} days), assuming constant time per token"))
  width = max(len(name) for name, _ in rows)
  return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  for noisy in ("absl", "jax._src", "orbax", "etils"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  if _CONFIG.value is None:
    sys.exit("error: --config is required, e.g. --config=experiments/realm_facts.py:size=tiny")
  if _NUM_DOCS.value < 1 or _BATCH_SIZE.value < 0:
    sys.exit("error: --num_docs must be >= 1 and --batch_size >= 0")
  load_before = tsb.load_average()
  tsb.report(run(_CONFIG.value, _NUM_DOCS.value, _BATCH_SIZE.value), load_before, format_table)

if __name__ == "__main__":
  app.run(main)
