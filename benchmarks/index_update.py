"""Incremental index versions vs a full rebuild: time, bytes written, recall, queries/s.

  python benchmarks/index_update.py --num_docs=1000000 --dim=128 --output=index_update.json

A synthetic clustered corpus (benchmarks/search.py's generator) is published as a ScaNN index
version; then, for each change fraction (default 1% and 10%: that many blocks added and as
many removed), the same new corpus version is indexed twice on the same vectors:
- delta (the default): `index_update.update_index(mode="delta")` shares the parent's shards
  and writes the deleted ids plus one new shard of the added vectors;
- rewrite: `update_index(mode="rewrite")` (load the version, ScaNN delete/upsert, write all);
- full rebuild: `index_format.publish_index` over the live vectors (train + write).
Embedding is not simulated: the vectors are given, so only the index side is timed; a real
update also embeds only the changed blocks (embedded = added), a full rebuild all of them.

Then `--num_updates` successive 1% updates are chained (`--chain_mode`) without rebalancing, and recall@k
(against exact numpy top-k over the live vectors) and queries/s are measured after them, and
again after one ScaNN `rebalance` of every shard (what `retrieval.rebalance_on_update` does
on each update).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
import types

import numpy as np

from realm_jax.data import corpus_versions
from realm_jax.retrieval import index_format
from realm_jax.retrieval import index_update
from realm_jax.retrieval import searcher as searcher_lib

import search as search_bench  # benchmarks/search.py: the clustered generator


def _bytes(path) -> int:
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, names in os.walk(path) for f in names)


def _version(number, num_docs, removed):
  mask = np.zeros(num_docs, bool)
  mask[removed] = True
  return corpus_versions.CorpusVersion(number, types.SimpleNamespace(num_docs=num_docs), mask,
                                       dict(version=number), None)


def _recall(searcher, queries, table, live, k):
  exact, _ = searcher_lib.ExactSearcher(table[live], live).search(queries, k)
  start = time.perf_counter()
  got, _ = searcher.search(queries, k)
  seconds = time.perf_counter() - start
  recall = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(got, exact)]))
  return recall, len(queries) / seconds


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--num_docs", type=int, default=1_000_000)
  parser.add_argument("--dim", type=int, default=128)
  parser.add_argument("--num_shards", type=int, default=1)
  parser.add_argument("--fractions", default="0.01,0.1")
  parser.add_argument("--num_updates", type=int, default=10)
  parser.add_argument("--num_queries", type=int, default=1000)
  parser.add_argument("--k", type=int, default=10)
  parser.add_argument("--reorder_dtype", default="float32")
  parser.add_argument("--chain_mode", default="delta", choices=index_update.MODES,
                      help="how the chained updates are written (a delta chain rewrites "
                      "after index_update.MAX_DELTA_SHARDS updates)")
  parser.add_argument("--output", default=None)
  args = parser.parse_args()
  fractions = [float(f) for f in args.fractions.split(",")]
  extra = int(args.num_docs * (max(fractions) + 0.01 * args.num_updates)) + 1
  table, queries = search_bench.clustered(args.num_docs + extra, args.dim, args.num_queries,
                                          num_clusters=max(10, args.num_docs // 1000), seed=0)
  n0 = args.num_docs
  options = dict(reorder_dtype=args.reorder_dtype)
  rng = np.random.default_rng(1)
  root = tempfile.mkdtemp(prefix="realm-index-update-bench-")
  results = dict(num_docs=n0, dim=args.dim, num_shards=args.num_shards, k=args.k,
                 reorder_dtype=args.reorder_dtype, machine=platform.processor() or
                 platform.machine(), cpus=os.cpu_count(), changes=[])
  try:
    start = time.time()
    shards = list(zip(np.array_split(table[:n0], args.num_shards),
                      np.array_split(np.arange(n0), args.num_shards)))
    base = index_format.publish_index(root, 1, shards, searcher="scann",
                                      searcher_options=options)
    results["base_build_seconds"] = round(time.time() - start, 2)
    results["base_bytes"] = _bytes(base)
    old = _version(0, n0, [])
    for fraction in fractions:
      change = int(n0 * fraction)
      removed = rng.choice(n0, change, replace=False)
      new = _version(1, n0 + change, removed)
      incremental = {}
      for mode in index_update.MODES:
        start = time.time()
        path = index_update.update_index(root, 1, old, new, lambda rows: table[rows],
                                         mode=mode)
        seconds = time.time() - start
        written = _bytes(path)
        start = time.time()
        _, searcher = index_format.load_index(root, index_format.VersionKey(1, 1))
        load_seconds = time.time() - start
        recall, qps = _recall(searcher, queries, table, new.live_ids, args.k)
        incremental[mode] = dict(seconds=round(seconds, 2), bytes=written, embedded=change,
                                 load_seconds=round(load_seconds, 2), recall=round(recall, 4),
                                 qps=round(qps))
        shutil.rmtree(path)
        index_format.repair_latest(root, 1)
      live = new.live_ids
      start = time.time()
      full_shards = list(zip(np.array_split(table[live], args.num_shards),
                             np.array_split(live, args.num_shards)))
      full = index_format.publish_index(root, 2, full_shards, searcher="scann",
                                        searcher_options=options,
                                        extra=dict(corpus_num_docs=new.corpus.num_docs))
      full_seconds = time.time() - start
      full_bytes = _bytes(full)
      _, full_searcher = index_format.load_index(root, 2)
      full_recall, full_qps = _recall(full_searcher, queries, table, live, args.k)
      shutil.rmtree(full)
      index_format.repair_latest(root, 1)
      row = dict(fraction=fraction, added=change, removed=change,
                 **incremental,
                 full=dict(seconds=round(full_seconds, 2), bytes=full_bytes,
                           embedded=len(live), recall=round(full_recall, 4),
                           qps=round(full_qps)))
      results["changes"].append(row)
      print(json.dumps(row), flush=True)

    # Many chained 1% updates, then one rebalance.
    step_change = max(1, n0 // 100)
    current, number, parent = old, 0, index_format.VersionKey(1)
    removed_all: list[np.ndarray] = []
    chain_bytes = 0
    start = time.time()
    for _ in range(args.num_updates):
      live = current.live_ids
      removed_now = rng.choice(live, step_change, replace=False)
      removed_all.append(removed_now)
      new = _version(number + 1, current.corpus.num_docs + step_change,
                     np.concatenate(removed_all))
      path = index_update.update_index(root, parent, current, new, lambda rows: table[rows],
                                       mode=args.chain_mode)
      chain_bytes += _bytes(path)
      index_format.prune_versions(root, 1)  # the chain's newest (and what it shares) stays
      parent, current, number = index_format.VersionKey(1, number + 1), new, number + 1
    chain_seconds = time.time() - start
    _, searcher = index_format.load_index(root, parent)
    recall, qps = _recall(searcher, queries, table, current.live_ids, args.k)
    start = time.time()
    for shard in searcher.shards:
      shard.rebalance()
    rebalance_seconds = time.time() - start
    rebalanced_recall, rebalanced_qps = _recall(searcher, queries, table, current.live_ids,
                                                args.k)
    results["many_updates"] = dict(
        updates=args.num_updates, change_each=step_change, mode=args.chain_mode,
        seconds=round(chain_seconds, 2), bytes_written=chain_bytes,
        shards=len(searcher.shards),
        recall=round(recall, 4), qps=round(qps), rebalance_seconds=round(rebalance_seconds, 2),
        rebalanced_recall=round(rebalanced_recall, 4), rebalanced_qps=round(rebalanced_qps))
    print(json.dumps(results["many_updates"]), flush=True)
  finally:
    shutil.rmtree(root, ignore_errors=True)
  if args.output:
    with open(args.output, "w") as f:
      json.dump(results, f, indent=1)
  print(json.dumps(results, indent=1))


if __name__ == "__main__":
  main()
