"""ScaNN vs exact vs the device searcher on a synthetic clustered corpus: build time, recall@k,
queries/s, memory.

  python benchmarks/search.py --num_docs=1000000 --dim=128 --num_queries=1000 --k=10 \
      --device_counts=1,8 --output=search.json

Exact is the reference (`ExactSearcher`: numpy matmul + argpartition top-k), and optionally
`jax.lax.top_k` on `jnp.dot` (--jax). `--device_counts` runs `DeviceSearcher`
(retrieval/device_searcher.py, searcher=device) on meshes of that many devices, for each
`--device_dtypes`; on CPU the script asks XLA for max(device_counts) fake host devices (set
before jax is imported), which share the same cores. Its q/s includes placing the queries on
the mesh and fetching ids and scores back (what `search()` does); "placement" is the table's
transfer to the devices. Documents are Gaussian clusters around random centres (generated in
chunks, float32); queries are drawn near the centres.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this tree
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


def device_rows(args, counts, docs, doc_ids, queries, ref_ids, result):
  """DeviceSearcher on each mesh size and table dtype: placement time, q/s, recall, memory."""
  import jax  # pylint: disable=import-outside-toplevel
  from realm_jax.retrieval import device_searcher  # pylint: disable=import-outside-toplevel
  from realm_jax.train import partitioning  # pylint: disable=import-outside-toplevel
  result["device_platform"] = jax.default_backend()
  result["device_rows"] = rows = []
  for count in counts:
    mesh = partitioning.make_mesh([("data", -1)], jax.devices()[:count])
    for dtype in args.device_dtypes.split(","):
      rss_before = rss_mib()
      t = time.perf_counter()
      searcher = device_searcher.DeviceSearcher(docs, doc_ids, mesh=mesh, dtype=dtype,
                                                top_k=args.device_top_k).block_until_ready()
      row = dict(devices=count, dtype=dtype, approx=searcher.approx,
                 placement_s=time.perf_counter() - t,
                 table_mib_per_device=searcher.table_bytes_per_device / 2**20,
                 rss_mib_delta_table=rss_mib() - rss_before)
      ids, row["qps"] = timed_search(searcher.search, queries, args.k, args.batch)
      row["recall"] = recall(ids, ref_ids)
      row["rss_mib_after_search"] = rss_mib()
      print(f"device searcher, {count} device(s), {dtype}: {row['qps']:.1f} q/s, "
            f"recall {row['recall']:.4f}", flush=True)
      rows.append(row)
      del searcher


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
  parser.add_argument("--device_counts", default="1,8",
                      help="meshes for the device searcher ('' = skip it)")
  parser.add_argument("--device_dtypes", default="float32,bfloat16")
  parser.add_argument("--device_top_k", default="auto", help="auto, exact or approx")
  parser.add_argument("--scann", action=argparse.BooleanOptionalAction, default=True)
  args = parser.parse_args()
  counts = [int(c) for c in args.device_counts.split(",") if c]
  if counts and "jax" not in sys.modules and "device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={max(counts)}").strip()

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

  if counts:
    device_rows(args, counts, docs, doc_ids, queries, ref_ids, result)

  if not args.scann:
    print(json.dumps(result, indent=2))
    if args.output:
      with open(args.output, "w") as f:
        json.dump(result, f, indent=2)
    return
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
