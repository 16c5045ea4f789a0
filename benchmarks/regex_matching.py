r"""CuratedTREC answer matching on the host: seconds per question at the QA experiments' K.

  python benchmarks/regex_matching.py                       # K=16/R=4 (tiny), K=100/R=5 (small)
  python benchmarks/regex_matching.py --ks=16:4,100:5 --questions=200 --out=/tmp/regex.json

CuratedTREC answers are regular expressions, so `qa.batches.AnswerMatcher` matches them on
text: per (question, block) pair the retriever's weak label searches the block's detokenized
body (all K blocks), and for the first R (reader) blocks every whole-word candidate span of
<= 10 wordpieces is detokenized (`tokenizer.decode_batch`, cached per block) and `fullmatch`ed.
Both are cached per pair for the run, so this cost is paid once per (question, block).

What it builds, model-free: the Wikipedia sample (`shared/data/wiki_sample/passages.jsonl`,
one block per passage, `--doc_len` wordpieces, a WordPiece vocab of `--vocab_size` trained on
it), the CuratedTREC training questions (`shared/data/openqa/curatedtrec_train.jsonl`), and
each question's top K blocks by BM25 (`qa.bm25`, realistic blocks for the question; the
matching cost does not depend on how they were found). Timed, for the first `--questions`
questions: `build_qa_batch` in batches of 32 on a fresh matcher (cold: every pair matched
the first time), the same again (warm: from the caches), and the two parts of the cold cost
alone on fresh matchers (labels over K blocks; spans over R blocks). Median of `--repeats`.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import tempfile
import time

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from machine import cpu_model, git_state  # pylint: disable=g-import-not-at-top,wrong-import-position

_SHARED = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..",
                                        "shared", "data"))
_PASSAGES = flags.DEFINE_string("passages", os.path.join(_SHARED, "wiki_sample",
                                                         "passages.jsonl"), "Corpus JSONL.")
_QUESTIONS_FILE = flags.DEFINE_string("questions_file", os.path.join(
    _SHARED, "openqa", "curatedtrec_train.jsonl"), "CuratedTREC JSONL.")
_KS = flags.DEFINE_list("ks", ["16:4", "100:5"], "retriever_k:reader_k pairs "
                        "(experiments/openqa.py tiny, small).")
_QUESTIONS = flags.DEFINE_integer("questions", 200, "Questions timed.")
_DOC_LEN = flags.DEFINE_integer("doc_len", 128, "Block length (realm_wiki tiny: 128).")
_VOCAB = flags.DEFINE_integer("vocab_size", 8000, "WordPiece vocab (realm_wiki: 8000).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Fresh matchers timed (median).")
_OUT = flags.DEFINE_string("out", "", "Also write the results as JSON here.")
_BATCH = 32


def _median_seconds(fn, repeats: int) -> float:
  import numpy as np  # pylint: disable=g-import-not-at-top
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def main(argv):
  del argv
  import numpy as np  # pylint: disable=g-import-not-at-top
  from realm_jax.data import corpus as corpus_lib  # pylint: disable=g-import-not-at-top
  from realm_jax.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  from realm_jax.qa import batches  # pylint: disable=g-import-not-at-top
  from realm_jax.qa import bm25  # pylint: disable=g-import-not-at-top
  from realm_jax.qa import data  # pylint: disable=g-import-not-at-top

  class _Doc:  # what build_block_corpus reads
    def __init__(self, title, text):
      self.title, self.sentences = title, (text,)

  with open(_PASSAGES.value) as f:
    records = [json.loads(line) for line in f]
  setup = time.perf_counter()
  with tempfile.TemporaryDirectory() as vocab_dir:
    tok = tokenizer_lib.train_wordpiece([r["text"] for r in records], _VOCAB.value, vocab_dir)
  corpus = corpus_lib.build_block_corpus([_Doc(r["title"], r["text"]) for r in records], tok,
                                         _DOC_LEN.value)
  examples, _ = data.read_jsonl(_QUESTIONS_FILE.value, "trec")
  examples = examples[:_QUESTIONS.value]
  n = len(examples)
  pad = tokenizer_lib.special_ids(tok).pad
  questions = batches.encode_questions(examples, tok, 32, pad)
  searcher = bm25.QuestionBM25(bm25.block_texts(corpus, tok))
  max_k = max(int(pair.split(":")[0]) for pair in _KS.value)
  all_ids = searcher.top_ids(examples, max_k)
  setup = time.perf_counter() - setup
  chunks = [np.arange(i, min(i + _BATCH, n)) for i in range(0, n, _BATCH)]

  results = []
  for pair in _KS.value:
    k, r = (int(x) for x in pair.split(":"))
    ids = all_ids[:, :k]
    fresh = lambda: batches.AnswerMatcher(examples, tok, corpus)
    row = dict(retriever_k=k, reader_k=r)
    matcher = None

    def cold():
      nonlocal matcher
      matcher = fresh()
      for c in chunks:
        batches.build_qa_batch(c, questions, ids[c], None, matcher, r)

    row["build_qa_batch_cold"] = _median_seconds(cold, _REPEATS.value) / n
    row["build_qa_batch_warm"] = _median_seconds(
        lambda: [batches.build_qa_batch(c, questions, ids[c], None, matcher, r)
                 for c in chunks], _REPEATS.value) / n
    has_answer = np.array([[matcher.has_answer(q, int(b)) for b in ids[q]] for q in range(n)])

    def labels_only():
      m = fresh()
      for q in range(n):
        for b in ids[q]:
          m.has_answer(q, int(b))

    def spans_only():
      m = fresh()
      for q in range(n):
        for b in ids[q, :r]:
          m.spans(q, int(b))

    row["labels_cold_over_k"] = _median_seconds(labels_only, _REPEATS.value) / n
    row["spans_cold_over_r"] = _median_seconds(spans_only, _REPEATS.value) / n
    row["questions_with_answer_in_top_k"] = float(has_answer.any(-1).mean())
    results.append(row)

  report = dict(
      date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
      cpu=cpu_model(), cores=os.cpu_count(), load_average=os.getloadavg(), code=git_state(),
      blocks=corpus.num_docs, doc_len=corpus.doc_len, vocab=tok.get_vocab_size(),
      questions=n, setup_seconds=round(setup, 1), seconds_per_question=results)
  print(json.dumps(report, indent=1))
  for row in results:
    print(f"K={row['retriever_k']:4d} R={row['reader_k']}: per question "
          f"build_qa_batch cold {row['build_qa_batch_cold'] * 1e3:.2f} ms, warm "
          f"{row['build_qa_batch_warm'] * 1e3:.3f} ms; labels over K "
          f"{row['labels_cold_over_k'] * 1e3:.2f} ms, spans over R "
          f"{row['spans_cold_over_r'] * 1e3:.2f} ms")
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      json.dump(report, f, indent=1)


if __name__ == "__main__":
  app.run(main)
