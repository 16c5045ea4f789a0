r"""Corpus versions (issue 11): update time and bytes written for 1% / 10% changes, and the
per-step candidate gather on a chained (delta) version vs the build itself.

  python benchmarks/corpus_update.py --num_docs=100000 --dir=/tmp/corpus_update_bench \
      --changes=0.01,0.1 --output=/tmp/corpus_update.json

Writes a stand-in built corpus (random token rows at base shapes, doc_len 288, through
`corpus.save_block_corpus`, with a WordPiece vocabulary of the stand-in words), then for each
change fraction f publishes, on a fresh copy of it, one corpus version that adds f * N new
records (`--mode=update_corpus`'s own `update_corpus`: tokenize, split, pack) and removes f * N
blocks. Reports the update's seconds and bytes written against the build's bytes (what a
version that copies the corpus writes), and the median `gather_candidates` time of [B, k]
random ids on version 0 and on the version (chained view: base rows memory-mapped, added rows
from the delta, tombstones masked).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

from absl import app
from absl import flags
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import machine  # pylint: disable=g-import-not-at-top,wrong-import-position
from realm_jax.data import corpus as corpus_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from realm_jax.data import corpus_versions  # pylint: disable=g-import-not-at-top,wrong-import-position
from realm_jax.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top,wrong-import-position

_NUM_DOCS = flags.DEFINE_integer("num_docs", 100_000, "blocks in the stand-in build")
_DOC_LEN = flags.DEFINE_integer("doc_len", 288, "retriever block length (base: 288)")
_CHANGES = flags.DEFINE_list("changes", ["0.01", "0.1"], "fractions of N added and removed")
_BATCH = flags.DEFINE_integer("batch", 512, "queries per timed gather")
_K = flags.DEFINE_integer("k", 8, "candidates per query")
_DRAWS = flags.DEFINE_integer("draws", 30, "timed gathers per corpus")
_DIR = flags.DEFINE_string("dir", "/tmp/corpus_update_bench", "scratch folder")
_OUTPUT = flags.DEFINE_string("output", "", "JSON file for the results")

_WORDS = [f"word{i}" for i in range(500)]


def _folder_bytes(path: str) -> int:
  return sum(os.path.getsize(os.path.join(root, name))
             for root, _, names in os.walk(path) for name in names)


def _build(directory: str) -> None:
  """A stand-in finished corpus: vocab.txt, build_config.json and blocks/ of N random rows."""
  os.makedirs(directory)
  tokenizer = tokenizer_lib.train_wordpiece([" ".join(_WORDS)] * 4, 1000, directory)
  special = tokenizer_lib.special_ids(tokenizer)
  n, doc_len = _NUM_DOCS.value, _DOC_LEN.value
  rng = np.random.default_rng(0)
  vocab = tokenizer.get_vocab_size()
  rows = lambda width: rng.integers(5, vocab, (n + 1, width), dtype=np.int32)
  sentences_per_doc = 3
  lengths = rng.integers(20, 60, n * sentences_per_doc)
  corpus = corpus_lib.BlockCorpus(
      retriever_tokens=rows(doc_len), retriever_segments=np.ones((n + 1, doc_len), np.int32),
      reader_tokens=rows(doc_len - 2), reader_lengths=np.full(n + 1, doc_len - 2, np.int32),
      sentence_token_ids=rng.integers(5, vocab, int(lengths.sum()), dtype=np.int32),
      sentence_offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
      doc_sentence_offsets=np.arange(0, n * sentences_per_doc + 1, sentences_per_doc,
                                     dtype=np.int64),
      title_token_ids=rng.integers(5, vocab, 2 * n, dtype=np.int32),
      title_offsets=np.arange(0, 2 * n + 1, 2, dtype=np.int64),
      titles=[f"Doc {i}" for i in range(n)], vocab_size=vocab, special=special)
  for name in ("retriever_tokens", "retriever_segments", "reader_tokens"):
    getattr(corpus, name)[n] = special.pad  # the null row
  corpus.reader_lengths[n] = 0
  corpus_lib.save_block_corpus(corpus, os.path.join(directory, "blocks"))
  with open(os.path.join(directory, corpus_versions.BUILD_CONFIG), "w") as f:
    f.write("{}")


def _gather_ms(corpus, rng) -> float:
  times = []
  for _ in range(_DRAWS.value):
    ids = rng.integers(0, corpus.null_id + 1, (_BATCH.value, _K.value))
    start = time.perf_counter()
    corpus_lib.gather_candidates(corpus, ids)
    times.append(time.perf_counter() - start)
  return 1000 * float(np.median(times[3:]))  # the first draws warm the page cache


def main(argv):
  del argv
  base = os.path.join(_DIR.value, "base")
  if os.path.exists(_DIR.value):
    shutil.rmtree(_DIR.value)
  start = time.time()
  _build(base)
  build_bytes = _folder_bytes(os.path.join(base, "blocks"))
  print(f"stand-in build: {_NUM_DOCS.value} blocks, {build_bytes / 1e6:.1f} MB of blocks, "
        f"{time.time() - start:.1f} s", flush=True)
  rng = np.random.default_rng(1)
  results = dict(cpu=machine.cpu_model(), git=machine.git_state(), num_docs=_NUM_DOCS.value,
                 doc_len=_DOC_LEN.value, build_bytes=build_bytes, rows=[])
  for change in (float(c) for c in _CHANGES.value):
    work = os.path.join(_DIR.value, f"change_{change}")
    subprocess.run(["cp", "-r", base, work], check=True)
    count = max(1, int(change * _NUM_DOCS.value))
    add = os.path.join(_DIR.value, f"add_{change}.jsonl")
    with open(add, "w") as f:
      for i in range(count):
        text = ". ".join(" ".join(rng.choice(_WORDS, 12)) for _ in range(4)) + "."
        f.write(json.dumps(dict(title=f"New {i}", text=text)) + "\n")
    remove = os.path.join(_DIR.value, f"remove_{change}.txt")
    with open(remove, "w") as f:
      f.write("\n".join(str(i) for i in rng.choice(_NUM_DOCS.value, count, replace=False)))
    start = time.time()
    manifest = corpus_versions.update_corpus(work, add=add, remove=remove)
    seconds = time.time() - start
    v0 = corpus_versions.load_version(work, 0)
    start = time.time()
    v1 = corpus_versions.load_version(work, 1)
    load_seconds = time.time() - start
    row = dict(change=change, added=count, removed=count, seconds=round(seconds, 2),
               bytes_written=manifest.get("bytes_written"),  # None before delta storage
               version_folder_bytes=_folder_bytes(corpus_versions.version_dir(work, 1)),
               whole_copy_bytes=build_bytes, load_seconds=round(load_seconds, 3),
               gather_ms_build=round(_gather_ms(v0.corpus, rng), 2),
               gather_ms_version=round(_gather_ms(v1.corpus, rng), 2))
    results["rows"].append(row)
    print(json.dumps(row), flush=True)
    shutil.rmtree(work)
  if _OUTPUT.value:
    with open(_OUTPUT.value, "w") as f:
      json.dump(results, f, indent=1)


if __name__ == "__main__":
  app.run(main)
