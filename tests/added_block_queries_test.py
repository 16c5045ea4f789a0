"""REALM trains on the blocks a corpus version adds (issue 11): queries from their stored salient
spans are mixed into each batch (`pipeline.AddedBlockQueries`), in a tiny wiki run whose corpus
gains a version mid-run, and the draw itself (fraction, determinism, process slices)."""

import numpy as np
import pytest

from data_wiki_corpus_test import write_jsonl  # pylint: disable=g-bad-import-order
from realm_jax.data import corpus_versions as cv
from realm_jax.data import pipeline
from realm_jax.data import prepare
from realm_jax.data import salient_spans
from realm_jax.data import wiki_corpus
from realm_jax.train import loop
from tiny_configs import tiny_wiki_config  # pylint: disable=g-bad-import-order
from wiki_data_test import write_articles  # pylint: disable=g-bad-import-order

UPDATE_AT = 1  # the version is published just before the trainer's check after step 1
_NEW = ["Zephyrine", "Quillmoor", "Brackenlow", "Thistlewade", "Corvanna", "Ombrevale"]


def _new_articles():
  return [dict(title=name, text=f"{name} is a harbour town on the coast of Ardelle Bay. "
               f"In 17{i}4 the people of {name} built a lighthouse over the rocks. "
               f"{name} became famous in 18{i}1 when Ada Merrow painted it.")
          for i, name in enumerate(_NEW)]


@pytest.fixture(scope="module")
def updated(tmp_path_factory):
  """A prepared tiny wiki corpus and its version 1 (the new articles added, tagged as the
  --mode=update_corpus CLI tags them)."""
  root = tmp_path_factory.mktemp("added_queries")
  write_articles(root / "articles.jsonl")
  config = tiny_wiki_config(root / "articles.jsonl", root / "corpus")
  data = prepare.prepare_data(config, None)
  cv.update_corpus(root / "corpus", add=str(write_jsonl(root / "add.jsonl", _new_articles())),
                   span_fn=salient_spans.make_tagger(config.data.salient_tagger),
                   max_span_wordpieces=config.data.max_masked)
  version = cv.load_version(root / "corpus", 1)
  spans = wiki_corpus.load_salient_spans(version.directory)
  return dict(config=config, data=data, version=version, spans=spans, root=root)


def _queries(updated, num_base, batch_size=8, process_index=0, process_count=1, seed=3):
  config, version = updated["config"], updated["version"]
  span_ids = pipeline.added_block_span_ids(version.corpus, updated["spans"],
                                           updated["data"].corpus.num_docs, version.removed,
                                           config.data.query_len, config.data.max_masked)
  return pipeline.AddedBlockQueries(version.corpus, updated["spans"], span_ids, num_base,
                                    batch_size, seed, config.data.query_len,
                                    config.data.max_masked, 1, process_index, process_count)


def test_span_ids_are_the_added_blocks_fitting_spans(updated):
  version, spans, n0 = updated["version"], updated["spans"], updated["data"].corpus.num_docs
  ids = _queries(updated, 0).span_ids
  docs = wiki_corpus_doc(version.corpus, spans["span_sentence"])
  assert len(ids) >= len(_NEW) and (docs[ids] >= n0).all()
  fits = ((spans["span_end"] <= updated["config"].data.query_len - 2) &
          (spans["span_end"] - spans["span_start"] <= updated["config"].data.max_masked))
  # Every fitting span of an added block is drawn from, and no span of an old block.
  assert set(ids.tolist()) == set(np.flatnonzero((docs >= n0) & fits).tolist())


def wiki_corpus_doc(corpus, sentences):
  return np.searchsorted(np.asarray(corpus.doc_sentence_offsets), sentences, side="right") - 1


def test_mix_replaces_rows_in_proportion_and_masks_an_added_span(updated):
  version, spans = updated["version"], updated["spans"]
  special, n0 = version.corpus.special, updated["data"].corpus.num_docs
  added = _queries(updated, num_base=60, batch_size=64)
  base = {k: np.asarray(v)[:64] for k, v in pipeline.span_masked_queries(
      [np.arange(5, 15)] * 64, [(1, 3)] * 64, special, 24, 10, source_ids=[0] * 64).items()
      if k != "kept"}
  base["query_tokens"] = base.pop("tokens")
  corpus, offsets = version.corpus, version.corpus.sentence_offsets
  spans_of = {}  # added doc id -> the wordpieces of each of its stored spans
  for i in added.span_ids.tolist():
    sentence = int(spans["span_sentence"][i])
    words = np.asarray(corpus.sentence_token_ids[offsets[sentence]:offsets[sentence + 1]])
    doc = int(wiki_corpus_doc(corpus, np.array([sentence]))[0])
    spans_of.setdefault(doc, []).append(
        words[spans["span_start"][i]:spans["span_end"][i]].tolist())
  fractions = []
  for step in range(20):
    out = added.mix(base, step)
    rows = np.flatnonzero(out["source_ids"] != 0)
    fractions.append(len(rows) / 64)
    assert (out["source_ids"][rows] >= n0).all() and (out["gold_ids"][rows] == -1).all()
    for row in rows:  # the masked labels are the wordpieces of a stored span of that block
      n = int(out["masked_weights"][row].sum())
      labels = out["masked_labels"][row, :n].tolist()
      positions = out["masked_positions"][row, :n]
      assert n >= 1 and (out["query_tokens"][row, positions] == special.mask).all()
      assert labels in spans_of[int(out["source_ids"][row])]
    np.testing.assert_array_equal(out["query_tokens"][out["source_ids"] == 0],
                                  base["query_tokens"][out["source_ids"] == 0])
  expected = added.fraction  # A / (A + 60)
  assert expected == pytest.approx(len(added.span_ids) / (len(added.span_ids) + 60))
  assert abs(np.mean(fractions) - expected) < 0.08, (np.mean(fractions), expected)
  # A pure function of (seed, step, version): the same again, and two processes' slices
  # concatenate to the one-process batch.
  again = _queries(updated, num_base=60, batch_size=64).mix(base, 7)
  np.testing.assert_array_equal(again["query_tokens"], added.mix(base, 7)["query_tokens"])
  halves = [_queries(updated, 60, 64, p, 2).mix({k: v[32 * p:32 * p + 32] for k, v in
                                                 base.items()}, 7) for p in (0, 1)]
  for key in base:
    np.testing.assert_array_equal(np.concatenate([h[key] for h in halves]), again[key])


def test_a_run_trains_on_the_added_blocks_after_the_version(tmp_path, monkeypatch):
  """Tiny wiki REALM, trainer-held index, version published before the step-1 check: no batch
  before it has an added block as its source; batches after it do (spans of the added
  articles, masked), and the log says how many queries the version brought."""
  write_articles(tmp_path / "articles.jsonl")
  config = tiny_wiki_config(tmp_path / "articles.jsonl", tmp_path / "corpus")
  config.retrieval.corpus_check_every = 1
  config.train.num_steps = 6
  config.retrieval.refresh_every = 100
  config.train.batch_size = 32
  data = prepare.prepare_data(config, tmp_path)
  n0 = data.corpus.num_docs
  add = write_jsonl(tmp_path / "add.jsonl", _new_articles() * 1)
  sources = []  # (step, source ids [B]) of every training batch the loop assembles
  original = loop._realm_device_batch  # pylint: disable=protected-access

  def record(queries, corpus, ids, mask):
    sources.append(np.array(queries["source_ids"]))
    return original(queries, corpus, ids, mask)

  from realm_jax.retrieval import in_process  # pylint: disable=g-import-not-at-top
  original_follow = in_process.InProcessIndex.follow_corpus

  def follow(self, params, step):
    if step == UPDATE_AT and cv.latest_version(tmp_path / "corpus") == 0:
      cv.update_corpus(tmp_path / "corpus", add=str(add),
                       span_fn=salient_spans.make_tagger(config.data.salient_tagger),
                       max_span_wordpieces=config.data.max_masked)
    return original_follow(self, params, step)

  monkeypatch.setattr(loop, "_realm_device_batch", record)
  monkeypatch.setattr(in_process.InProcessIndex, "follow_corpus", follow)
  out = loop.train_and_evaluate(config, tmp_path / "run")
  train_batches = sources[:config.train.num_steps]
  assert not (train_batches[0] >= n0).any()  # step 0, before the version
  after = np.concatenate(train_batches[1:])
  assert (after >= n0).sum() >= 3, after  # about A / (A + base) of 5 x 32 rows
  assert np.isfinite(out["loss"])
