r"""The host's per-step gather of candidate tokens from a memory-mapped corpus (issue 13).

  python benchmarks/candidate_gather.py --num_docs=1000000 --dir=/tmp/gather_bench \
      --batch_sizes=512,128 --draws=100 --output=/tmp/gather.json

Writes (once; reused if present) the three per-block token arrays REALM gathers per step at
base shapes (`retriever_tokens`, `retriever_segments` [N+1, doc_len], `reader_tokens`
[N+1, body_len], int32, random ids) as .npy files, memory-maps them as a loaded corpus is, and
times `corpus.gather_candidates` for `--draws` random [B, k] id draws per batch size: the bytes
`shard_batch` then copies to the devices, and the gather's median / p90 (page cache warm after
the first draws: the arrays are read once when written).
"""

from __future__ import annotations

import json
import os
import sys
import time
import types

from absl import app
from absl import flags
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import machine  # pylint: disable=g-import-not-at-top,wrong-import-position
from realm_jax.data import corpus as corpus_lib  # pylint: disable=g-import-not-at-top,wrong-import-position

_NUM_DOCS = flags.DEFINE_integer("num_docs", 1_000_000, "blocks in the stand-in corpus")
_DOC_LEN = flags.DEFINE_integer("doc_len", 288, "retriever block length (base: 288)")
_BODY_LEN = flags.DEFINE_integer("body_len", 286, "reader body length (doc_len - 2)")
_K = flags.DEFINE_integer("k", 8, "candidates per query")
_BATCH_SIZES = flags.DEFINE_list("batch_sizes", ["512", "128"],
                                 "queries per gather (512: a global batch; 128: one of 4 hosts)")
_DRAWS = flags.DEFINE_integer("draws", 100, "timed gathers per batch size")
_DIR = flags.DEFINE_string("dir", "/tmp/gather_bench", "where the .npy arrays are written")
_OUTPUT = flags.DEFINE_string("output", "", "JSON file for the results")


def _arrays(directory: str, num_rows: int) -> dict[str, np.ndarray]:
  widths = dict(retriever_tokens=_DOC_LEN.value, retriever_segments=_DOC_LEN.value,
                reader_tokens=_BODY_LEN.value)
  os.makedirs(directory, exist_ok=True)
  rng = np.random.default_rng(0)
  out = {}
  for name, width in widths.items():
    path = os.path.join(directory, f"{name}.npy")
    if not os.path.exists(path) or np.load(path, mmap_mode="r").shape != (num_rows, width):
      array = np.lib.format.open_memmap(path, "w+", np.int32, (num_rows, width))
      for lo in range(0, num_rows, 100_000):
        hi = min(lo + 100_000, num_rows)
        array[lo:hi] = rng.integers(0, 30522, (hi - lo, width), dtype=np.int32)
      array.flush()
      del array
    out[name] = np.load(path, mmap_mode="r")
  return out


def main(argv):
  del argv
  corpus = types.SimpleNamespace(**_arrays(_DIR.value, _NUM_DOCS.value + 1),
                                 null_id=_NUM_DOCS.value)
  rng = np.random.default_rng(1)
  rows = []
  for batch_size in map(int, _BATCH_SIZES.value):
    seconds = []
    for _ in range(_DRAWS.value):
      ids = rng.integers(0, _NUM_DOCS.value, (batch_size, _K.value))
      start = time.perf_counter()
      gathered = corpus_lib.gather_candidates(corpus, ids)
      seconds.append(time.perf_counter() - start)
    row = dict(batch_size=batch_size, k=_K.value,
               megabytes=sum(v.nbytes for v in gathered.values()) / 1e6,
               median_ms=1e3 * float(np.median(seconds)),
               p90_ms=1e3 * float(np.percentile(seconds, 90)))
    rows.append(row)
    print(f"B={batch_size} k={_K.value}: {row['megabytes']:.2f} MB, median "
          f"{row['median_ms']:.1f} ms, p90 {row['p90_ms']:.1f} ms ({_DRAWS.value} draws)")
  result = dict(machine=machine.cpu_model(), git=machine.git_state(), num_docs=_NUM_DOCS.value,
                doc_len=_DOC_LEN.value, body_len=_BODY_LEN.value, rows=rows,
                date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
  if _OUTPUT.value:
    with open(_OUTPUT.value, "w") as f:
      json.dump(result, f, indent=1)


if __name__ == "__main__":
  app.run(main)
