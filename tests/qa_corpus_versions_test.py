"""Open-QA fine-tuning and evaluation follow corpus versions (issue 11, `qa/finetune.py`).

The frozen index of a tiny ICT run (0 steps, as in qa_finetune_test) over a private copy of
its corpus; versions are published with `corpus_versions.update_corpus`.

1. Evaluation on a newer version: the blocks that were the top retrieved ones are removed and
   never come back (searcher's full ranking, predictions); questions about people only in
   added profiles have recall 0 before the update and > 0 after, with the same parameters.
2. A version published mid-fine-tuning is picked up at the next check: the per-step metric
   `corpus_version` moves, the prefetched batch is redone, removed blocks are gone from every
   later batch and the final evaluation, and the brought-up index is recorded for evaluate_qa.
3. BM25 indexes the live blocks of the newest version.
4. A frozen index of another corpus version is a clear error naming the cause.
5. `trainable_examples`: questions whose known gold block is removed are left out of training.
6. A run stopped after a mid-run update and resumed continues on the updated version with the
   recorded index and the losses of an uninterrupted run.
"""

import json
import shutil

import jax
import numpy as np
import pytest

from data_wiki_corpus_test import write_jsonl  # pylint: disable=g-bad-import-order
from qa_finetune_test import qa_config, small_config  # pylint: disable=g-bad-import-order
from realm_jax.data import corpus_versions as cv
from realm_jax.qa import batches as batches_lib
from realm_jax.qa import data as qa_data
from realm_jax.qa import finetune
from realm_jax.retrieval import index_format
from realm_jax.train import loop
from realm_jax.train import partitioning

VersionKey = index_format.VersionKey
NUM_PEOPLE = 6


def _new_people():
  """Profiles of people the corpus never mentions; each birthplace is a made-up word found in
  no other block, so only the added profile can hold the answer."""
  return [dict(title=f"Quor Vantel{i}",
               text=f"Quor Vantel{i} was born in Zarnokvil{i}. Quor Vantel{i} works as a "
                    f"pilot. Quor Vantel{i} plays the harp.") for i in range(NUM_PEOPLE)]


def _questions_file(path):
  return write_jsonl(path, [dict(question=f"Where was Quor Vantel{i} born?",
                                 answer=[f"Zarnokvil{i}"]) for i in range(NUM_PEOPLE)])


@pytest.fixture(scope="module")
def ict_dir(tmp_path_factory):
  """An ICT run of 0 steps: a step-0 checkpoint, its corpus and the index it publishes."""
  workdir = tmp_path_factory.mktemp("ict")
  config = small_config()
  config.objective = "ict"
  config.ict.num_steps = 0
  loop.train_and_evaluate(config, workdir)
  return workdir


def _config(ict_dir, tmp_path, questions=False):
  """qa_config on a private copy of the ICT run's corpus (versions are published into it)."""
  corpus = tmp_path / "corpus"
  if not corpus.exists():
    shutil.copytree(ict_dir / "corpus", corpus)
  config = qa_config(ict_dir, corpus_dir=str(corpus))
  if questions:  # ORQA-style questions about the new people
    path = _questions_file(tmp_path / "people.jsonl")
    config.qa.dataset, config.qa.train_file, config.qa.dev_file = "nq", str(path), str(path)
  return config, corpus


def _ranked(world, params, index, examples):
  """[N, num_live] every live block id, ranked for each question by the live query tower."""
  tokens = world.encode(examples)
  shards = partitioning.data_parallel_size(world.mesh)
  padded = np.concatenate([tokens, np.repeat(tokens[:1], -len(tokens) % shards, 0)])
  emb = partitioning.to_host(world.embed_questions(
      partitioning.replicate(params, world.mesh),
      partitioning.shard_batch_global({"t": padded}, world.mesh)["t"]))
  ids, _ = index.searcher.search(emb[:len(tokens)], world.num_live)
  return ids


@pytest.fixture(scope="module")
def before_after(ict_dir, tmp_path_factory):
  """Evaluation of the same parameters on corpus version 0 and, after an update (the top-2
  blocks of every question removed, the new people's profiles added), on version 1."""
  tmp_path = tmp_path_factory.mktemp("qa_versions")
  config, corpus = _config(ict_dir, tmp_path, questions=True)
  workdir = tmp_path / "qa"
  rng = jax.random.key(config.seed)
  out = {}
  for version in (0, 1):
    if version == 1:
      removed = np.unique(out[0]["ranked"][:, :2])
      (tmp_path / "remove.txt").write_text("".join(f"{i}\n" for i in removed))
      cv.update_corpus(corpus, add=str(write_jsonl(tmp_path / "add.jsonl", _new_people())),
                       remove=str(tmp_path / "remove.txt"))
      out["removed"] = removed
    world = finetune.setup(config, workdir)
    params, doc_params = finetune._initial_params(world, rng)  # pylint: disable=protected-access
    # A start-up tower that is not the index's: the added blocks must not be embedded with it
    # (the index is init_from's, so its own checkpoint's tower is used).
    wrong_tower = jax.tree_util.tree_map(np.zeros_like, doc_params)
    index = finetune.resolve_index(config, workdir, world,
                                   lambda: wrong_tower)  # pylint: disable=cell-var-from-loop
    metrics, predictions = finetune.evaluate_examples(world, params, index, world.dev)
    out[version] = dict(world=world, index=index, metrics=metrics, predictions=predictions,
                        ranked=_ranked(world, params, index, world.dev), doc_params=doc_params)
  out["record"] = json.loads((workdir / finetune.INDEX_RECORD).read_text())
  out["workdir"], out["config"] = workdir, config
  return out


def test_removed_blocks_are_never_returned_by_evaluation(before_after):
  removed = before_after["removed"]
  old, new = before_after[0], before_after[1]
  assert np.isin(removed, old["ranked"]).all()  # they were the top blocks in version 0
  assert new["world"].corpus_version.version == 1 and new["index"].corpus_version == 1
  assert new["ranked"].shape[1] == new["world"].num_live  # the whole live corpus, ranked
  assert not np.isin(removed, new["ranked"]).any()
  assert not np.isin(removed, [p.block_id for p in new["predictions"]]).any()
  # The index was brought up (not re-embedded), published in the QA workdir and recorded.
  assert new["index"].step == VersionKey(0, 1) and new["index"].source == "init_from"
  assert before_after["record"]["version"] == "0+1"
  assert before_after["record"]["corpus_version"] == 1
  manifest = index_format.read_manifest(before_after["workdir"] / "index", VersionKey(0, 1))
  assert manifest["incremental"]["added"] == NUM_PEOPLE
  assert manifest["incremental"]["removed"] == len(removed)
  # Added blocks: embedded with the frozen index's document tower (init_from's step-0 one).
  added = np.arange(old["world"].corpus.num_docs, new["world"].corpus.num_docs)
  expected = finetune._embed_rows_fn(  # pylint: disable=protected-access
      new["world"], lambda: new["doc_params"], new["world"].corpus, "check")(added)
  np.testing.assert_allclose(new["index"].embeddings[added], expected, atol=1e-5)
  # Blocks kept from version 0 keep their frozen embeddings exactly.
  kept = np.setdiff1d(np.arange(old["world"].corpus.num_docs), removed)
  np.testing.assert_array_equal(new["index"].embeddings[kept], old["index"].embeddings[kept])


def test_questions_about_added_people_are_answerable_only_after_the_update(before_after):
  """Recall@k: the answer (a birthplace stated only in the added profile) in a top-k block."""
  old, new = before_after[0]["metrics"], before_after[1]["metrics"]
  deepest = max((k for k in old if k.startswith("recall@")), key=lambda k: int(k[7:]))
  assert deepest in new and int(deepest[7:]) >= 20
  assert all(old[k] == 0.0 for k in old if k.startswith("recall@")), old
  # Every question's profile is in the index: ranked somewhere among the live blocks.
  titles = np.array(before_after[1]["world"].corpus.titles, dtype=object)
  ranked_titles = titles[before_after[1]["ranked"]]
  profile_rank = np.array([list(ranked_titles[i]).index(f"Quor Vantel{i}")
                           for i in range(NUM_PEOPLE)])
  # The towers are untrained (0 ICT steps), so *where* a profile ranks is chance: whether it
  # lands in the top 20 differs between CPUs. What must hold is that recall@k counts exactly
  # the questions whose profile (the only block with the answer) the full ranking puts in the
  # top k (`index` above raised if a profile were missing from the ranking).
  for k in (key for key in new if key.startswith("recall@")):
    assert new[k] == pytest.approx(np.mean(profile_rank < int(k[7:]))), (k, profile_rank, new)


def test_bm25_indexes_the_live_blocks_of_the_latest_version(before_after, tmp_path):
  """qa.retriever=bm25 on the updated corpus: removed blocks are not even ranked last (BM25
  indexes the live ones only) and each new person's question finds the added profile."""
  config = before_after["config"].copy_and_resolve_references()
  config.qa.retriever = "bm25"
  world = finetune.setup(config, tmp_path / "bm25")
  assert world.corpus_version.version == 1
  ids = world.bm25().top_ids(world.dev, world.corpus.num_docs)  # as deep as there are blocks
  assert ids.shape == (NUM_PEOPLE, world.num_live)
  assert not np.isin(before_after["removed"], ids).any()
  titles = np.array(world.corpus.titles, dtype=object)
  assert list(titles[ids[:, 0]]) == [f"Quor Vantel{i}" for i in range(NUM_PEOPLE)]


def test_a_version_published_mid_finetuning_is_followed(ict_dir, tmp_path, monkeypatch):
  config, corpus = _config(ict_dir, tmp_path)
  config.qa.num_steps = 4
  config.qa.checkpoint_every = 4
  config.qa.corpus_check_every = 2
  config.qa.prefetch = True  # the batch of step 2 is retrieved during step 1, then redone
  batches = []  # (num_docs of the corpus the batch was built from, retrieved ids [B, K])
  rows = []  # each batch's question rows [B]
  train = finetune.load_examples(config)[0][:config.qa.max_train_examples]
  gold = np.array([e.gold_doc_id for e in train])  # [N] the training questions' gold blocks
  dev = finetune.load_examples(config)[1][:config.qa.max_eval_examples or None]
  dev_gold = np.array([e.gold_doc_id for e in dev])
  original_build = batches_lib.build_qa_batch

  def build(example_indices, question_tokens, ids, embeddings, matcher, reader_k, *a, **kw):
    batches.append((matcher.corpus.num_docs, np.array(ids)))
    rows.append(np.array(example_indices))
    return original_build(example_indices, question_tokens, ids, embeddings, matcher, reader_k,
                          *a, **kw)

  original_follow = finetune.follow_corpus
  calls = []

  def follow(world, index, doc_params_fn):
    calls.append(len(batches))
    if len(calls) == 2:  # the check at step 2: publish version 1 just before it
      seen = np.unique(np.concatenate([ids[:, :config.qa.reader_k] for _, ids in batches]))
      # and the gold profiles of the first training questions (those questions become
      # orphans) and of two dev questions (evaluation counts them)
      seen = np.union1d(seen, np.concatenate([gold[rows[0][:4]], dev_gold[:2]]))
      (tmp_path / "remove.txt").write_text("".join(f"{i}\n" for i in seen))
      cv.update_corpus(corpus, add=str(write_jsonl(tmp_path / "add.jsonl", _new_people())),
                       remove=str(tmp_path / "remove.txt"))
      calls.append(seen)
    return original_follow(world, index, doc_params_fn)

  monkeypatch.setattr(batches_lib, "build_qa_batch", build)
  monkeypatch.setattr(finetune, "follow_corpus", follow)
  workdir = tmp_path / "qa"
  out = finetune.finetune_qa(config, workdir)
  removed = calls[2]
  assert calls[:2] == [1, 3]  # looked at steps 0 and 2 only (after 1 and 3 batches were built)
  assert [h["corpus_version"] for h in out["history"]] == [0.0, 0.0, 1.0, 1.0]
  assert out["corpus_version"] == 1 and out["index"]["corpus_version"] == 1
  # Batches: steps 0, 1 (version 0), the prefetched step 2 (version 0, dropped), then the
  # step-2 batch again and step 3 on version 1, then the final evaluation's.
  num_docs = [n for n, _ in batches]
  n0, eval_batches = num_docs[0], 2  # 32 dev questions / qa.eval_batch_size 16
  assert num_docs == [n0] * 3 + [n0 + NUM_PEOPLE] * (2 + eval_batches)
  prefetched, redone = batches[2][1], batches[3][1]
  assert np.isin(prefetched[:, :config.qa.reader_k], removed).any()  # would have been read
  for _, ids in batches[3:]:
    assert not np.isin(ids, removed).any()
  predictions = [json.loads(l) for l in (workdir / "predictions.jsonl").read_text().splitlines()]
  assert not np.isin(removed, [p["block_id"] for p in predictions]).any()
  assert redone.shape == prefetched.shape
  # Training questions whose gold profile was removed are no longer drawn (steps 2 and 3).
  orphaned = np.flatnonzero(np.isin(gold, removed))
  assert len(orphaned) >= 4
  counts = [h["trainable_questions"] for h in out["history"]]
  assert counts == [len(gold)] * 2 + [len(gold) - len(orphaned)] * 2
  assert not np.isin(np.concatenate(rows[3:5]), orphaned).any()
  assert out["gold_removed"] == np.isin(dev_gold, removed).sum() >= 2
  # evaluate_qa reads the recorded, brought-up version (no second update).
  record = json.loads((workdir / finetune.INDEX_RECORD).read_text())
  assert record["version"] == "0+1" and record["corpus_version"] == 1
  monkeypatch.undo()
  result = finetune.evaluate_qa(config, workdir)
  assert result["corpus_version"] == 1 and result["index"]["corpus_version"] == 1
  assert result["exact_match"] == pytest.approx(out["exact_match"])


def test_an_index_of_another_corpus_version_is_a_clear_error(ict_dir, tmp_path):
  config, corpus = _config(ict_dir, tmp_path)
  num_docs = json.loads((corpus / "blocks" / "corpus.json").read_text())["num_docs"]
  dim = 128
  # An index that says it was built for corpus version 2, which this corpus never published.
  future = tmp_path / "future_index"
  index_format.publish_index(future, VersionKey(0, 2), [(np.ones((num_docs, dim), np.float32),
                                                          np.arange(num_docs))])
  config.qa.index_from = str(future)
  with pytest.raises(ValueError, match=r"qa.index_from: the index .* was built for corpus "
                                       r"version 2.*not published"):
    finetune.finetune_qa(config, tmp_path / "future")
  # Version 1 exists, but the index labelled with it holds version 0's id space.
  cv.update_corpus(corpus, add=str(write_jsonl(tmp_path / "add.jsonl", _new_people())))
  wrong = tmp_path / "wrong_index"
  index_format.publish_index(wrong, VersionKey(0, 1), [(np.ones((num_docs, dim), np.float32),
                                                         np.arange(num_docs))])
  config.qa.index_from = str(wrong)
  with pytest.raises(ValueError, match=rf"qa.index_from: .* corpus version 1 of "
                                       rf"{num_docs + NUM_PEOPLE} blocks.*{num_docs} docs"):
    finetune.finetune_qa(config, tmp_path / "wrong")


def test_an_index_from_another_run_embeds_added_blocks_with_the_startup_tower(
    ict_dir, tmp_path, caplog):
  """qa.index_from names an index whose parameters this run does not know: the blocks a
  corpus version adds are embedded with the start-up document tower (`doc_params_fn`), said
  in a warning; the kept blocks keep the index's embeddings exactly."""
  config, corpus = _config(ict_dir, tmp_path)
  shutil.copytree(ict_dir / "index", tmp_path / "other_index")
  config.qa.index_from = str(tmp_path / "other_index")
  num_docs = json.loads((corpus / "blocks" / "corpus.json").read_text())["num_docs"]
  cv.update_corpus(corpus, add=str(write_jsonl(tmp_path / "add.jsonl", _new_people())))
  workdir = tmp_path / "qa"
  world = finetune.setup(config, workdir)
  _, doc_params = finetune._initial_params(  # pylint: disable=protected-access
      world, jax.random.key(config.seed))
  tower = jax.tree_util.tree_map(lambda x: np.asarray(x) * 0.5, doc_params)  # not init_from's
  calls = []
  with caplog.at_level("WARNING"):
    index = finetune.resolve_index(config, workdir, world,
                                   lambda: calls.append(1) or tower)
  assert index.source == "index_from" and index.corpus_version == 1 and calls
  assert any("qa.index_from" in r.getMessage() and "start-up document tower" in r.getMessage()
             for r in caplog.records)
  added = np.arange(num_docs, num_docs + NUM_PEOPLE)
  expected = finetune._embed_rows_fn(  # pylint: disable=protected-access
      world, lambda: tower, world.corpus, "check")(added)
  np.testing.assert_allclose(index.embeddings[added], expected, atol=1e-5)
  step = index_format.latest_step(tmp_path / "other_index")
  original = finetune.version_embeddings(
      tmp_path / "other_index", step,
      index_format.read_manifest(tmp_path / "other_index", step), num_docs)
  np.testing.assert_array_equal(index.embeddings[:num_docs], original)


def _example(gold):
  return qa_data.QAExample(question="q", answers=("a",), gold_doc_id=gold)


def test_trainable_examples_leave_out_questions_whose_gold_block_is_removed():
  examples = [_example(g) for g in (0, 3, -1, 5, 3)]
  removed = np.zeros(6, bool)
  np.testing.assert_array_equal(finetune.trainable_examples(examples, removed), [0, 1, 2, 3, 4])
  removed[[3, 4]] = True  # block 4 is nobody's gold; -1 (unknown gold) always stays
  np.testing.assert_array_equal(finetune.trainable_examples(examples, removed), [0, 2, 3])


def _finetune_with_update_at_check(config, corpus, tmp_path, monkeypatch, workdir,
                                   max_steps_this_run=None):
  """finetune_qa with version 1 published just before the step-2 corpus check: the top
  `reader_k` blocks of the batches built so far are removed, the new people added. Returns
  (result, removed ids, [retrieved ids [B, K] of every batch built])."""
  batches, calls, removed = [], [], []
  original_build, original_follow = batches_lib.build_qa_batch, finetune.follow_corpus

  def build(example_indices, question_tokens, ids, *a, **kw):
    batches.append(np.array(ids))
    return original_build(example_indices, question_tokens, ids, *a, **kw)

  def follow(world, index, doc_params_fn):
    calls.append(1)
    if len(calls) == 2 and not removed:
      seen = np.unique(np.concatenate([ids[:, :config.qa.reader_k] for ids in batches]))
      (tmp_path / "remove.txt").write_text("".join(f"{i}\n" for i in seen))
      cv.update_corpus(corpus, add=str(write_jsonl(tmp_path / "add.jsonl", _new_people())),
                       remove=str(tmp_path / "remove.txt"))
      removed.append(seen)
    return original_follow(world, index, doc_params_fn)

  with monkeypatch.context() as patch:
    patch.setattr(batches_lib, "build_qa_batch", build)
    patch.setattr(finetune, "follow_corpus", follow)
    out = finetune.finetune_qa(config, workdir, max_steps_this_run=max_steps_this_run)
  return out, (removed[0] if removed else None), batches


def test_a_run_resumed_after_a_corpus_update_continues_on_the_updated_version(
    ict_dir, tmp_path, monkeypatch):
  """Fine-tuning stopped after a mid-run update (4 of 6 steps; version 1 at the step-2 check)
  and resumed: the resumed call starts on version 1 and loads the brought-up index the run
  recorded ("0+1", nothing embedded again), never retrieves a removed block, and its losses are
  those of an uninterrupted run with the same update (prefetch off; float32 tolerance)."""
  runs = {}
  for name in ("uninterrupted", "resumed"):
    config, corpus = _config(ict_dir, tmp_path / name)
    config.qa.num_steps = 6
    config.qa.checkpoint_every = 2
    config.qa.corpus_check_every = 2
    config.qa.prefetch = False
    workdir = tmp_path / name / "qa"
    first, removed, _ = _finetune_with_update_at_check(
        config, corpus, tmp_path / name, monkeypatch, workdir,
        max_steps_this_run=4 if name == "resumed" else None)
    runs[name] = dict(first=first, removed=removed, workdir=workdir)
    if name == "resumed":
      assert first["step"] == 4 and "exact_match" not in first
      record = json.loads((workdir / finetune.INDEX_RECORD).read_text())
      assert record["version"] == "0+1" and record["corpus_version"] == 1
      embedded = []
      original_embed = finetune._embed_rows_fn  # pylint: disable=protected-access
      monkeypatch.setattr(finetune, "_embed_rows_fn",
                          lambda *a, **kw: embedded.append(1) or original_embed(*a, **kw))
      second, removed_again, batches = _finetune_with_update_at_check(
          config, corpus, tmp_path / name, monkeypatch, workdir)
      monkeypatch.undo()
      assert removed_again is None  # no second update: version 1 was already the latest
      assert not embedded  # the recorded "0+1" index was loaded, not brought up again
      runs[name]["second"], runs[name]["batches"] = second, batches
  whole, resumed = runs["uninterrupted"], runs["resumed"]
  np.testing.assert_array_equal(whole["removed"], resumed["removed"])
  assert [h["corpus_version"] for h in whole["first"]["history"]] == [0, 0, 1, 1, 1, 1]
  assert [h["corpus_version"] for h in resumed["first"]["history"]] == [0, 0, 1, 1]
  second = resumed["second"]
  assert [h["step"] for h in second["history"]] == [5, 6]
  assert [h["corpus_version"] for h in second["history"]] == [1, 1]
  assert second["corpus_version"] == 1 and second["index"]["corpus_version"] == 1
  assert second["index"]["step"] == whole["first"]["index"]["step"]
  for ids in resumed["batches"]:  # the resumed steps' batches and the final evaluation's
    assert not np.isin(ids, resumed["removed"]).any()
  counts = [h["trainable_questions"] for h in second["history"]]
  assert counts == [h["trainable_questions"] for h in whole["first"]["history"][4:]]
  for key in ("loss", "reader_loss", "retriever_loss"):
    np.testing.assert_allclose([h[key] for h in second["history"]],
                               [h[key] for h in whole["first"]["history"][4:]],
                               rtol=1e-5, atol=1e-6, err_msg=key)
  assert second["exact_match"] == pytest.approx(whole["first"]["exact_match"])
  assert second["recall@20"] == pytest.approx(whole["first"]["recall@20"])
