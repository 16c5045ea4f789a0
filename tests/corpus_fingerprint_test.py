"""Corpus fingerprints: stored at build time, recorded in index manifests, and an index of
another corpus with the same number of blocks is refused by the loaders (QA's frozen index,
the trainer's watcher and resume); manifests from before fingerprints still load."""

import json
import logging

import numpy as np
import pytest

from realm_jax.data import corpus as corpus_lib
from realm_jax.data import tokenizer as tokenizer_lib
from realm_jax.qa import finetune
from realm_jax.retrieval import in_process
from realm_jax.retrieval import index_format
from realm_jax.retrieval import watcher as watcher_lib
from data_helpers import PlainDoc  # pylint: disable=g-bad-import-order

DIM, DOCS = 8, 6
_TEXTS_A = [f"alpha river number {i} flows north" for i in range(DOCS)]
_TEXTS_B = [f"beta mountain number {i} rises west" for i in range(DOCS)]


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
  """Corpora A and B: the same number of blocks (and shapes), different text."""
  tok = tokenizer_lib.train_wordpiece(_TEXTS_A + _TEXTS_B, 200, tmp_path_factory.mktemp("v"))
  build = lambda texts: corpus_lib.build_block_corpus(
      [PlainDoc(f"doc {i}", (t,)) for i, t in enumerate(texts)], tok, doc_len=16)
  a, b = build(_TEXTS_A), build(_TEXTS_B)
  assert a.num_docs == b.num_docs and a.retriever_tokens.shape == b.retriever_tokens.shape
  return a, b


def _publish(root, step, corpus):
  emb = np.random.default_rng(step).normal(size=(DOCS, DIM)).astype(np.float32)
  return index_format.publish_index(root, step, [(emb, np.arange(DOCS))],
                                    extra=index_format.corpus_record(corpus))


def test_fingerprint_is_stored_reloaded_and_tells_same_size_corpora_apart(corpora, tmp_path):
  a, b = corpora
  assert a.fingerprint == corpus_lib.fingerprint(a) and a.fingerprint.startswith("sha256:")
  assert a.fingerprint != b.fingerprint
  corpus_lib.save_block_corpus(a, tmp_path / "a")
  stored = json.loads((tmp_path / "a" / corpus_lib.METADATA_FILENAME).read_text())
  assert stored["fingerprint"] == a.fingerprint
  for mmap in (True, False):  # read back, not recomputed; equal to hashing the saved arrays
    loaded = corpus_lib.load_block_corpus(tmp_path / "a", mmap=mmap)
    assert loaded.fingerprint == a.fingerprint == corpus_lib.fingerprint(loaded)
  # One changed token changes it; a corpus.json from before fingerprints loads with None.
  changed = corpus_lib.load_block_corpus(tmp_path / "a", mmap=False)
  changed.reader_tokens[0, 0] += 1
  assert corpus_lib.fingerprint(changed) != a.fingerprint
  del stored["fingerprint"]
  (tmp_path / "a" / corpus_lib.METADATA_FILENAME).write_text(json.dumps(stored))
  assert corpus_lib.load_block_corpus(tmp_path / "a").fingerprint is None


def test_index_of_another_corpus_with_as_many_blocks_is_refused(corpora, tmp_path):
  a, b = corpora
  version = _publish(tmp_path, 1, a)
  manifest = json.loads((version / index_format.MANIFEST).read_text())
  assert manifest[index_format.CORPUS_FINGERPRINT] == a.fingerprint
  index_format.load_index(tmp_path, 1, DIM, DOCS, expected_fingerprint=a.fingerprint)
  for load in (index_format.load_index, index_format.check_version):
    with pytest.raises(index_format.IndexVersionError) as e:
      load(tmp_path, 1, DIM, DOCS, expected_fingerprint=b.fingerprint)
    message = str(e.value)
    assert "another corpus" in message and a.fingerprint in message and b.fingerprint in message
  # Open-QA's frozen index (from pretraining): the same refusal, naming the config field.
  with pytest.raises(ValueError, match=r"qa.index_from.*another corpus"):
    finetune.load_frozen_index(tmp_path, 1, DIM, b, "index_from", "qa.index_from")
  assert finetune.load_frozen_index(tmp_path, 1, DIM, a, "index_from", "qa.index_from").step == 1


def test_the_watcher_rejects_and_the_trainer_resume_re_embeds(corpora, tmp_path):
  a, b = corpora
  _publish(tmp_path, 2, a)
  watcher = watcher_lib.IndexWatcher(tmp_path, DIM, DOCS, expected_fingerprint=b.fingerprint)
  watcher._poll_once()  # pylint: disable=protected-access
  assert "another corpus" in watcher.rejected[2]
  ok = watcher_lib.IndexWatcher(tmp_path, DIM, DOCS, expected_fingerprint=a.fingerprint)
  assert ok.load_now(2)[0] == 2
  # Resume: the trainer's own version of step 2 was of corpus A; on corpus B it re-embeds.
  index = in_process.InProcessIndex(b, None, None, tmp_path, 4, 3, write=False)
  refreshed = []
  index.refresh = lambda params, step: refreshed.append(step)
  index.load_or_refresh(None, 3, refresh_every=2)
  assert refreshed == [3]
  index = in_process.InProcessIndex(a, None, None, tmp_path, 4, 3, write=False)
  index.refresh = lambda params, step: refreshed.append(step)
  index.load_or_refresh(None, 3, refresh_every=2)
  assert refreshed == [3] and index.step == 2


def test_manifests_without_a_fingerprint_still_load_and_warn_once(corpora, tmp_path, caplog):
  a, _ = corpora
  old = tmp_path / "old"
  for step in (1, 2):  # written as before fingerprints: no corpus record
    emb = np.ones((DOCS, DIM), np.float32)
    index_format.publish_index(old, step, [(emb, np.arange(DOCS))])
  with caplog.at_level(logging.WARNING):
    for step in (1, 2, 2):
      index_format.load_index(old, step, DIM, DOCS, expected_fingerprint=a.fingerprint)
  said = [r for r in caplog.records if "records no corpus fingerprint" in r.getMessage()]
  assert len(said) == 1
  # A corpus from before fingerprints: the version's fingerprint cannot be compared; loads.
  _publish(tmp_path / "new", 1, a)
  with caplog.at_level(logging.WARNING):
    index_format.load_index(tmp_path / "new", 1, DIM, DOCS, expected_fingerprint=None)
  assert any("corpus has no fingerprint" in r.getMessage() for r in caplog.records)
