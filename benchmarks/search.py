"""ScaNN vs exact MIPS on a synthetic clustered corpus: build time, recall@k, queries/s, memory.

  python benchmarks/search.py --num_docs=1000000 --dim=128 --num_queries=1000 --k=10 \
      --output=search.json

Exact is the reference (`ExactSearcher`: numpy matmul + argpartition top-k), and optionally
`jax.lax.top_k` on `jnp.dot` (--jax). Documents are Gaussian clusters around random centres
(generated in chunks, float32); queries are drawn near the centres.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import time

import numpy as np

from realm_jax.retrieval import scann_searcher
from realm_jax.retrieval import searcher as searcher_lib


def rss_mib() -> float:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmRSS:"):
        return int(line.split()[1]) / 1024
  return float("nan")


def peak_rss_mib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def clustered(num_docs, dim, num_queries, num_clusters, seed, chunk=100_000):
  rng = np.random.default_rng(seed)
  centres = rng.normal(size=(num_clusters, dim)).astype(np.float32)
  docs = np.empty((num_docs, dim), np.float32)
  for start in range(0, num_docs, chunk):
    n = min(chunk, num_docs - start)
    docs[start:start + n] = (centres[rng.integers(num_clusters, size=n)]
                             + 0.5 * rng.standard_normal((n, dim), dtype=np.float32))
  queries = (centres[rng.integers(num_clusters, size=num_queries)]
             + 0.1 * rng.standard_normal((num_queries, dim), dtype=np.float32))
  return docs, queries.astype(np.float32)


def timed_search(search_fn, queries, k, batch):
  search_fn(queries[:batch], k)  # warm-up (JIT compile, thread pool)
  ids = []
  start = time.perf_counter()
  for i in range(0, len(queries), batch):
    ids.append(np.asarray(search_fn(queries[i:i + batch], k)[0]))
  seconds = time.perf_counter() - start
  return np.concatenate(ids), len(queries) / seconds


def recall(ids, ref_ids):
  return float(np.mean([len(np.intersect1d(a, b)) / len(b) for a, b in zip(ids, ref_ids)]))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--num_docs", type=int, default=1_000_000)
  parser.add_argument("--dim", type=int, default=128)
  parser.add_argument("--num_queries", type=int, default=1000)
  parser.add_argument("--k", type=int, default=10)
  parser.add_argument("--batch", type=int, default=100)
  parser.add_argument("--num_clusters", type=int, default=1000)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--jax", action=argparse.BooleanOptionalAction, default=True)
  parser.add_argument("--output", default=None, help="write the results as JSON here")
  args = parser.parse_args()

  result = dict(vars(args), machine=f"{platform.node()} {platform.processor() or ''}".strip(),
                cpus=os.cpu_count(), load_average_start=os.getloadavg())
  t = time.perf_counter()
  docs, queries = clustered(args.num_docs, args.dim, args.num_queries, args.num_clusters,
                            args.seed)
  result["generate_s"] = time.perf_counter() - t
  result["embeddings_mib"] = docs.nbytes / 2**20
  result["rss_mib_after_data"] = rss_mib()
  doc_ids = np.arange(args.num_docs, dtype=np.int64)

  exact = searcher_lib.ExactSearcher(docs, doc_ids)
  ref_ids, result["exact_numpy_qps"] = timed_search(exact.search, queries, args.k, args.batch)
  print(f"exact numpy: {result['exact_numpy_qps']:.1f} q/s", flush=True)

  if args.jax:
    import jax  # pylint: disable=import-outside-toplevel
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
    docs_dev = jax.device_put(docs)
    search_jax = jax.jit(lambda q, d: jax.lax.top_k(jnp.dot(q, d.T), args.k))  # (scores, rows)
    jax_ids, result["exact_jax_qps"] = timed_search(
        lambda q, k: search_jax(q, docs_dev)[::-1], queries, args.k, args.batch)
    result["exact_jax_recall"] = recall(jax_ids, ref_ids)
    result["jax_backend"] = jax.default_backend()
    del docs_dev
    print(f"exact jax: {result['exact_jax_qps']:.1f} q/s", flush=True)

  rss_before = rss_mib()
  t = time.perf_counter()
  scann_index = scann_searcher.ScannSearcher(docs, doc_ids)
  result["scann_build_s"] = time.perf_counter() - t
  result["rss_mib_before_scann_build"] = rss_before
  result["rss_mib_after_scann_build"] = rss_mib()
  result["scann_params"] = dict(scann_index.params,
                                reorder_used=scann_searcher.default_reorder(args.k)
                                if scann_index.reorder is None else scann_index.reorder,
                                hash="lut16", anisotropic_threshold=scann_searcher.ANISOTROPIC_THRESHOLD,
                                training_sample_size=min(args.num_docs, 100_000))
  print(f"scann build: {result['scann_build_s']:.1f} s", flush=True)
  scann_ids, result["scann_qps"] = timed_search(scann_index.search, queries, args.k, args.batch)
  result["scann_recall"] = recall(scann_ids, ref_ids)
  result["peak_rss_mib"] = peak_rss_mib()
  result["load_average_end"] = os.getloadavg()
  print(json.dumps(result, indent=2))
  if args.output:
    with open(args.output, "w") as f:
      json.dump(result, f, indent=2)


if __name__ == "__main__":
  main()
