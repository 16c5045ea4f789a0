"""The trainer's own index follows corpus versions (issue 11, `retrieval.index_source=trainer`).

1. A tiny REALM run on the facts corpus with a corpus version published mid-run (training
   queries' source documents and some profiles removed, new profiles added): it is applied at
   the next check, removed documents are never retrieved again, their queries stop counting,
   the version is published as `<step>+<c>`, and a resume picks that version up.
2. "Add N docs -> queries about them retrieve them": people whose only documents are re-added
   profiles are found by queries about them once the index follows the version (a
   bag-of-wordpieces embedder stands in for a trained retriever: no model in the loop).
3. After `index_update_max_delta_shards` delta versions the trainer's rewrite folds the update
   shards into the base shard (in memory and published; also after a resume).
4. `--mode=retrieve --index_step=<step>+<c>` parsing, and its error for bad forms.
"""

import json

import jax
import numpy as np
import pytest

import lexical_embedder  # pylint: disable=g-bad-import-order
from data_wiki_corpus_test import write_jsonl  # pylint: disable=g-bad-import-order
from realm_jax import main
from realm_jax.data import corpus_versions as cv
from realm_jax.data import prepare
from realm_jax.retrieval import in_process
from realm_jax.retrieval import index_format
from realm_jax.retrieval import inspect_index
from realm_jax.retrieval import searcher as searcher_lib
from realm_jax.train import loop
from realm_jax.train import partitioning
from tiny_configs import tiny_config  # pylint: disable=g-bad-import-order

VersionKey = index_format.VersionKey
UPDATE_AT = 1  # the corpus version is published just before the check after step 1


def _new_people(n):
  """Profiles of people the corpus has never mentioned (facts-corpus wording)."""
  return [dict(title=f"Quor Vantel{i}", text=f"Quor Vantel{i} works as a pilot. "
               f"Quor Vantel{i} plays the harp. Quor Vantel{i} was born in the year 19{i}5.")
          for i in range(n)]


@pytest.fixture(scope="module")
def living_run(tmp_path_factory):
  """Two calls of a 6-step run (steps 0-1, then a resume to the end) whose corpus gains a
  version at step UPDATE_AT; records every REALM batch the loop assembles."""
  root = tmp_path_factory.mktemp("living")
  config = tiny_config(root / "corpus")
  config.retrieval.corpus_check_every = 1
  data = prepare.prepare_data(config, root)
  base = data.corpus
  train = data.train_queries
  # Removed: the source (mention) documents of the first training queries, and the gold
  # profiles of a few others; added: 6 profiles of new people.
  removed = np.unique(np.concatenate([train["source_ids"][:12], train["gold_ids"][20:24]]))
  remove_file = root / "remove.txt"
  remove_file.write_text("".join(f"{i}\n" for i in removed))
  add_file = write_jsonl(root / "add.jsonl", _new_people(6))

  batches = []  # (candidate corpus num_docs, source_ids, gold_ids, row weights, ids, mask)
  original_batch = loop._realm_device_batch  # pylint: disable=protected-access

  def record(queries, corpus, ids, mask):
    batches.append(dict(num_docs=corpus.num_docs, source=np.array(queries["source_ids"]),
                        gold=np.array(queries["gold_ids"]),
                        weight=np.asarray(queries["masked_weights"]).sum(axis=1),
                        ids=np.array(ids), mask=np.array(mask)))
    return original_batch(queries, corpus, ids, mask)

  searched = []  # (corpus version, every id the searcher ranks for the batch's queries)
  original_retrieve = in_process.InProcessIndex.retrieve

  def retrieve(self, query_emb, source_ids, k, margin):
    ranked, _ = self.searcher.search(query_emb, self.searcher.num_docs)
    searched.append((self.corpus_version.version, np.unique(ranked)))
    return original_retrieve(self, query_emb, source_ids, k, margin)

  original_follow = in_process.InProcessIndex.follow_corpus

  def follow(self, params, step):
    if step == UPDATE_AT and cv.latest_version(root / "corpus") == 0:
      cv.update_corpus(root / "corpus", add=str(add_file), remove=str(remove_file))
    return original_follow(self, params, step)

  mp = pytest.MonkeyPatch()
  mp.setattr(loop, "_realm_device_batch", record)
  mp.setattr(in_process.InProcessIndex, "follow_corpus", follow)
  mp.setattr(in_process.InProcessIndex, "retrieve", retrieve)
  try:
    first = loop.train_and_evaluate(config, root / "run", max_steps_this_run=2)
    after_first = dict(versions=index_format.list_versions(root / "run" / "index"),
                       num_batches=len(batches))
    second = loop.train_and_evaluate(config, root / "run")
  finally:
    mp.undo()
  return dict(root=root, base=base, removed=removed, first=first, second=second,
              batches=batches, searched=searched, added=np.arange(base.num_docs, base.num_docs + 6),
              **after_first)


def test_the_version_is_applied_at_the_next_check_and_published(living_run):
  history = living_run["first"]["history"]
  # The record of step s is the batch of step s - 1: step 0 on corpus version 0, step 1
  # (retrieved after the check at step 1) on version 1, from the same index step 0.
  assert [(h["index_step"], h["index_corpus_version"]) for h in history] == [(0, 0), (0, 1)]
  assert living_run["versions"] == [0, VersionKey(0, 1)]
  index_root = living_run["root"] / "run" / "index"
  manifest = index_format.read_manifest(index_root, VersionKey(0, 1))
  n0, removed = living_run["base"].num_docs, living_run["removed"]
  assert manifest["corpus_version"] == 1 and manifest["param_step"] == 0
  assert manifest["incremental"]["added"] == 6
  assert manifest["incremental"]["removed"] == len(removed)
  # A delta: the refresh version's shard shared (its rows minus the removed ones), the 6
  # added blocks in a shard of their own; only those and the deleted ids were written.
  assert manifest["incremental"]["mode"] == "delta" and manifest["delta_shards"] == 1
  assert [e.get("stored_at") for e in manifest["shards"]] == ["0/shard-00000-of-00001", None]
  assert [e["num_docs"] for e in manifest["shards"]] == [n0 - len(removed), 6]
  # The final version (a full refresh) holds exactly the live blocks of corpus version 1:
  # load_index with the tombstones refuses a removed id or a missing live one.
  assert index_format.latest_step(index_root) == VersionKey(6, 1)
  version = cv.load_version(living_run["root"] / "corpus", 1)
  _, searcher = index_format.load_index(index_root, VersionKey(6, 1),
                                        expected_num_docs=n0 + 6, removed=version.removed)
  held = np.concatenate([s.doc_ids for s in searcher.shards])
  assert np.isin(living_run["added"], held).all() and not np.isin(removed, held).any()


def test_removed_documents_are_never_retrieved_after_the_update(living_run):
  """Not among any batch's candidates, nor anywhere in the searcher's full ranking, from the
  check that saw the version on (training batches, index recall, final evaluation)."""
  n0, removed = living_run["base"].num_docs, living_run["removed"]
  before = [b for b in living_run["batches"] if b["num_docs"] == n0]
  after = [b for b in living_run["batches"] if b["num_docs"] == n0 + 6]
  assert len(before) >= 1 and len(after) >= 5  # train steps 1-5 and the final evaluation
  hit = lambda b: np.isin(np.where(b["mask"], b["ids"], -1), removed).any()
  assert not any(hit(b) for b in after)
  ranked = dict(before=[r for v, r in living_run["searched"] if v == 0],
                after=[r for v, r in living_run["searched"] if v == 1])
  assert ranked["before"] and all(np.isin(removed, r).all() for r in ranked["before"])
  assert len(ranked["after"]) >= 5 and not any(np.isin(removed, r).any()
                                               for r in ranked["after"])
  # ... while the added blocks are ranked from the update on.
  assert all(np.isin(living_run["added"], r).all() for r in ranked["after"])


def test_queries_from_removed_documents_stop_counting(living_run):
  n0, removed = living_run["base"].num_docs, living_run["removed"]
  rows = [(b["source"], b["gold"], b["weight"]) for b in living_run["batches"]
          if b["num_docs"] == n0 + 6]
  dead = [(w[np.isin(s, removed)], g[np.isin(s, removed)]) for s, g, w in rows]
  assert sum(len(w) for w, _ in dead) > 0, "no query of a removed source was drawn"
  assert all((w == 0).all() and (g == -1).all() for w, g in dead)
  # Removed gold profiles are unknown gold (not counted as recall misses); live rows train.
  for source, gold, weight in rows:
    assert not np.isin(gold, removed).any()
    assert (weight[~np.isin(source, removed)] > 0).all()


def test_the_resume_reloads_the_incremental_version(living_run):
  history = living_run["second"]["history"]
  # Resumed at step 2: version 0+1 was reloaded, not re-embedded (that would be index step
  # 2); the refresh at step 3 re-embedded corpus version 1.
  assert [(h["index_step"], h["index_corpus_version"]) for h in history] == [
      (0, 1), (3, 1), (3, 1), (3, 1)]
  assert np.isfinite(living_run["second"]["loss"])


def test_add_n_docs_then_queries_about_them_retrieve_them(tmp_path):
  """People whose documents are all removed (version 1) and whose profiles alone come back as
  new blocks (version 2): their held-out queries (mention sentences, the fact masked) retrieve
  the new profiles once the trainer's index follows version 2; in version 1 they cannot.

  Measured: recall@3, the person's profile (by title) among the 3 retrieved blocks, with a
  bag-of-wordpieces embedder standing in for a trained retriever (the test is of the index
  following the corpus, not of learning). Thresholds: version 1 exactly 0 (nothing about
  them is indexed); version 2 at least the recall the same queries had for the original
  profiles in version 0 (same text, and fewer competitors: their mentions are gone), and
  >= 0.4 absolute (measured on 32 queries: 0.41 in version 0, 0.53 in version 2; name parts
  are shared between a few people and template words between all, so not every query wins). Span accuracy / EM would need a trained reader: not affordable on CPU here.
  """
  config = tiny_config(tmp_path / "corpus")
  data = prepare.prepare_data(config, tmp_path)
  base, queries = data.corpus, data.eval_queries
  corpus_dir = tmp_path / "corpus"
  texts = [json.loads(line) for line in (corpus_dir / "block_texts.jsonl").open()]
  people = np.unique(queries["gold_ids"])  # held-out entities' profile doc ids
  names = {texts[int(p)]["title"] for p in people}
  wanted = np.array([texts[int(g)]["title"] for g in queries["gold_ids"]], dtype=object)

  mesh = partitioning.make_mesh([("data", -1)])
  embed = jax.jit(lexical_embedder.bag_of_wordpieces(base.vocab_size, 64, base.special.pad,
                                                     ignore_ids=base.special.as_tuple()))
  index = in_process.InProcessIndex(base, embed, mesh, tmp_path / "index", 64, 3, write=True,
                                    corpus_dir=corpus_dir, corpus_check_every=1)
  query_emb = np.asarray(embed(None, queries["query_tokens"]))

  def recall():
    ids, mask = index.retrieve(query_emb, np.full(len(query_emb), -1), 4, 2)
    titles = np.array(index.corpus.titles, dtype=object)
    found = (titles[np.where(mask, ids, 0)[:, 1:]] == wanted[:, None]) & mask[:, 1:]
    return found.any(axis=1).mean()

  index.refresh(None, 0)
  original = recall()  # version 0: the original profiles
  # Version 1: every block naming one of them (profile and mentions) removed.
  theirs = [t["doc_id"] for t in texts if any(name in t["text"] for name in names)]
  (tmp_path / "remove.txt").write_text("".join(f"{i}\n" for i in theirs))
  cv.update_corpus(corpus_dir, remove=str(tmp_path / "remove.txt"))
  assert index.follow_corpus(None, 1) and index.step == VersionKey(0, 1)
  assert recall() == 0.0
  # Version 2: their profiles added back as new blocks (new doc ids).
  add = write_jsonl(tmp_path / "add.jsonl", [dict(title=texts[int(p)]["title"],
                                                   text=texts[int(p)]["text"]) for p in people])
  cv.update_corpus(corpus_dir, add=str(add))
  assert index.follow_corpus(None, 2) and index.step == VersionKey(0, 2)
  assert index_format.latest_step(tmp_path / "index") == VersionKey(0, 2)
  added = recall()
  assert added >= max(original, 0.4), (original, added)


@pytest.mark.parametrize("kind", ["exact", "scann"])
@pytest.mark.parametrize("resumed", [False, True], ids=["in_memory", "resumed"])
def test_a_rewrite_folds_the_update_shards_into_the_base_shard(tmp_path, kind, resumed):
  """retrieval.index_update_max_delta_shards=2: two delta versions add one update shard each;
  the third update rewrites, and the update shards' rows (minus those removed since) and the
  new blocks are folded into the base shard, in memory and in the published version: one
  shard, no update shards, every live block once, and the search of an index built from
  scratch over the live blocks. `resumed`: a new trainer index resumes from the second delta
  (its update rows read back from the published files) before the third update."""
  config = tiny_config(tmp_path / "corpus")
  data = prepare.prepare_data(config, tmp_path)
  base, corpus_dir = data.corpus, tmp_path / "corpus"
  mesh = partitioning.make_mesh([("data", -1)])
  embed = jax.jit(lexical_embedder.bag_of_wordpieces(base.vocab_size, 32, base.special.pad,
                                                     ignore_ids=base.special.as_tuple()))
  make = lambda: in_process.InProcessIndex(
      base, embed, mesh, tmp_path / "index", 64, 10, write=True, searcher_kind=kind,
      corpus_dir=corpus_dir, corpus_check_every=1, max_delta_shards=2)
  index = make()
  index.refresh(None, 0)
  people = _new_people(9)
  for version in (1, 2, 3):
    add = write_jsonl(tmp_path / f"add{version}.jsonl", people[3 * version - 3:3 * version])
    # Each update removes two original blocks, and the third one also a block the first added.
    remove = [10 * version, 10 * version + 1] + ([base.num_docs] if version == 3 else [])
    (tmp_path / f"remove{version}.txt").write_text("".join(f"{i}\n" for i in remove))
    cv.update_corpus(corpus_dir, add=str(add), remove=str(tmp_path / f"remove{version}.txt"))
    if version == 3 and resumed:
      index = make()
      index.load_or_refresh(None, 0, refresh_every=100)
      assert index.step == VersionKey(0, 2) and len(index.searcher.shards) == 3
    assert index.follow_corpus(None, version)
    manifest = index_format.read_manifest(tmp_path / "index", VersionKey(0, version))
    if version < 3:
      assert manifest["incremental"]["mode"] == "delta"
      assert manifest["delta_shards"] == version and len(index.searcher.shards) == 1 + version
  assert manifest["incremental"]["mode"] == "rewrite"
  assert "update shards" in manifest["incremental"]["rewrite_reason"]
  assert manifest.get("delta_shards", 0) == 0 and len(manifest["shards"]) == 1
  assert not hasattr(index.searcher, "shards")  # one searcher in memory too
  live = index.corpus_version.live_ids
  assert base.num_docs not in live and len(live) == base.num_docs - 7 + 9
  assert sorted(index.searcher.doc_ids.tolist()) == sorted(live.tolist())
  # The search: that of an exact index built from scratch over the live blocks.
  reference = in_process.embed_corpus(None, index.corpus, embed, mesh, 64, rows=live)
  queries = reference[::7] + 0.01
  expected, _ = searcher_lib.ExactSearcher(reference, live).search(queries, 10)
  got, _ = index.searcher.search(queries, 10)
  recall = np.mean([len(set(g) & set(e)) / 10 for g, e in zip(got, expected)])
  assert recall == 1.0 if kind == "exact" else recall >= 0.95, recall
  # The published version loads as what the trainer searches.
  _, loaded = index_format.load_index(tmp_path / "index", VersionKey(0, 3),
                                      expected_num_docs=index.corpus.num_docs,
                                      removed=index.corpus_version.removed)
  assert sorted(np.concatenate([s.doc_ids for s in loaded.shards]).tolist()) == sorted(
      live.tolist())
  np.testing.assert_array_equal(loaded.search(queries, 10)[0], got)


def test_retrieve_mode_searches_a_step_and_corpus_version(living_run):
  """--mode=retrieve --index_step=3+1 on the living run: that version, its checkpoint, the
  corpus version's blocks (a new person's profile found by name; no removed doc)."""
  workdir = living_run["root"] / "run"
  text = inspect_index.run_retrieve_mode(workdir, query="Quor Vantel2 plays the harp", k=200,
                                         index_step=main.parse_index_version("3+1"),
                                         output=workdir / "out.jsonl")
  assert "index version 3+1" in text
  record = json.loads((workdir / "out.jsonl").read_text().splitlines()[0])
  assert (record["index_version"], record["index_step"], record["checkpoint_step"]) == (
      "3+1", 3, 3)
  ids = [r["doc_id"] for r in record["results"]]
  assert len(ids) == living_run["base"].num_docs + 6 - len(living_run["removed"])
  assert not np.isin(ids, living_run["removed"]).any()
  assert "Quor Vantel2" in [r["title"] for r in record["results"]]
  with pytest.raises(inspect_index.RetrieveError, match="not published.*3\\+1"):
    inspect_index.run_retrieve_mode(workdir, query="x", index_step=main.parse_index_version("3"))


@pytest.mark.parametrize("text,key", [("200", VersionKey(200)), ("200+3", VersionKey(200, 3)),
                                      (" 7+1 ", VersionKey(7, 1)), (None, None)])
def test_index_step_flag_accepts_a_step_or_a_step_and_corpus_version(text, key):
  parsed = main.parse_index_version(text)
  assert parsed == key and str(parsed) == str(key)


@pytest.mark.parametrize("text,hint", [("200+0", "without '+0'"), ("latest", "200+3"),
                                       ("3+", "200+3"), ("-1", "200+3"), ("2+x", "200+3")])
def test_index_step_flag_rejects_other_forms_clearly(text, hint):
  with pytest.raises(ValueError, match="--index_step") as error:
    main.parse_index_version(text)
  assert hint in str(error.value)
