"""Incremental index versions: a new corpus version on the parameters of the index in use.

When the corpus gains a version (`data/corpus_versions.py`) but no newer checkpoint is due, the
index builder embeds only the added blocks, with the parameters the current index was built
with, and publishes version `<step>+<corpus version>` (`index_format.VersionKey`):

- exact shards: removed doc ids are masked out (their rows dropped) and the added rows
  appended (`ExactSearcher.updated`);
- ScaNN shards: the stored, trained searcher is loaded and changed in place with ScaNN's own
  `delete` and `upsert` (no retraining: added points go to the nearest existing leaf and are
  quantized with the existing codebooks); `rebalance=True` retrains it from the points it holds.
  Added blocks are dealt round-robin over the shards, so they stay balanced.

By default (`mode="delta"`) the version writes only what changed: the parent's shards are
*shared*, not copied (`index_format.share_shard`: the new manifest points at their files and
lists the ids it deletes from them), and the added blocks go into one new shard of their own.
Bytes written then scale with the change, not the index. Every `max_delta_shards` updates, or
once more than `max_deleted_fraction` of the stored rows are deleted ones, an update
*rewrites* instead (`mode="rewrite"`, also what `rebalance=True` does): each base shard is
loaded, its deletions applied for real, the delta shards' rows and the added ones upserted
round-robin, and every shard written anew. A new checkpoint's full refresh starts over anyway.

The version goes through the usual publish protocol (`start_version` / `write_shard` /
`finish_version`: tmp folder, manifest last, rename, LATEST), announced `single_writer` (the
leader writes every shard; followers leave it alone), so a builder killed mid-update publishes
nothing. Its manifest carries `corpus_version`, `corpus_num_docs` (the id space), `param_step`, `delta_shards` (how
many of its last shards are update shards) and `incremental` (the parent version, the mode,
added/removed/embedded counts, bytes written, seconds).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

import numpy as np
from etils import epath

from realm_jax import storage
from realm_jax.data import corpus_versions
from realm_jax.retrieval import index_format
from realm_jax.retrieval import scann_searcher
from realm_jax.retrieval import searcher as searcher_lib


MODES = ("delta", "rewrite")
MAX_DELTA_SHARDS = 8  # update shards (one per delta update) before an update rewrites
MAX_DELETED_FRACTION = 0.2  # deleted share of the stored rows before an update rewrites


def update_index(index_root: epath.PathLike, parent_key: int,
                 old: corpus_versions.CorpusVersion, new: corpus_versions.CorpusVersion,
                 embed_rows: Callable[[np.ndarray], np.ndarray], *, rebalance: bool = False,
                 mode: str = "delta", max_delta_shards: int = MAX_DELTA_SHARDS,
                 max_deleted_fraction: float = MAX_DELETED_FRACTION,
                 extra: dict[str, Any] | None = None,
                 before_publish: Callable[[], None] | None = None) -> epath.Path:
  """Publishes `<parent step>+<new.version>`: version `parent_key` changed from corpus `old`
  to `new`. embed_rows(doc ids [A]) -> [A, D] embeds with the parent's parameters. `mode`:
  "delta" (share the parent's shards, see the module docstring) or "rewrite"."""
  if mode not in MODES:
    raise ValueError(f"mode {mode!r} not in {MODES}")
  start = time.time()
  root = epath.Path(index_root)
  manifest = index_format.read_manifest(root, parent_key)
  if manifest.get("corpus_version", 0) != old.version:
    raise index_format.IndexVersionError(
        f"version {parent_key} was built for corpus version {manifest.get('corpus_version', 0)}"
        f", not {old.version}")
  if new.version <= old.version:
    raise ValueError(f"corpus version {new.version} is not newer than {old.version}")
  added, removed = corpus_versions.changes(old, new)
  key = index_format.VersionKey(int(parent_key), new.version)
  parent_dir = root / str(parent_key)
  lives = None  # each parent shard's live ids [n_i], read once for a delta's decision and plan
  why_rewrite = "rebalance" if rebalance else "asked" if mode == "rewrite" else None
  if not why_rewrite:
    lives = [index_format.live_doc_ids(parent_dir, e) for e in manifest["shards"]]
    why_rewrite = _rewrite_reason(manifest, lives, removed, len(added), max_delta_shards,
                                  max_deleted_fraction)
  embed_start = time.time()
  added_embeddings = (embed_rows(added) if len(added) else
                      np.zeros((0, manifest["dim"]), np.float32))
  embed_seconds = time.time() - embed_start
  if added_embeddings.shape != (len(added), manifest["dim"]):
    raise ValueError(f"embed_rows gave {added_embeddings.shape} for {len(added)} blocks")
  added_embeddings = np.asarray(added_embeddings, np.float32)
  if why_rewrite:
    plan, delta_shards = _rewrite_plan(root, parent_key, manifest, added, added_embeddings,
                                       removed, rebalance)
  else:
    new_shard = delta_shard(manifest["searcher"], added_embeddings, added,
                            manifest.get("searcher_options") or {})
    plan, delta_shards = _delta_plan(parent_dir, manifest, lives, added, new_shard, removed)
  info = dict(
      source="index_update", param_step=int(parent_key),
      incremental=dict(parent=str(parent_key), parent_corpus_version=old.version,
                       mode="rewrite" if why_rewrite else "delta",
                       rewrite_reason=why_rewrite or None,
                       added=int(len(added)), removed=int(len(removed)),
                       embedded=int(len(added)), rebalanced=bool(rebalance),
                       embed_seconds=round(embed_seconds, 3)),
      **(extra or {}))
  path = _publish_plan(root, key, manifest, plan, delta_shards, new, info, start,
                       before_publish)
  logging.info("index: published incremental version %s (from %s, %s%s): +%d embedded, "
               "-%d removed, %d docs, %.1f MB written, %.1fs", key, parent_key,
               "rewrite" if why_rewrite else "delta",
               f": {why_rewrite}" if why_rewrite else "", len(added), len(removed),
               len(new.live_ids), info["incremental"]["bytes_written"] / 1e6,
               time.time() - start)
  return path


def publish_delta(index_root: epath.PathLike, parent_key: int, key: int,
                  new: corpus_versions.CorpusVersion, added: np.ndarray, new_shard,
                  removed: np.ndarray, extra: dict[str, Any] | None = None) -> epath.Path:
  """Publishes version `key` as a delta of `parent_key`: its shards shared minus `removed`
  [R], plus `new_shard` (`delta_shard`'s searcher of the `added` [A] ids, or None when none
  are added). For a writer that already holds the changed searcher (the trainer's own index:
  `delta_update` is its in-memory twin)."""
  start = time.time()
  root = epath.Path(index_root)
  manifest = index_format.read_manifest(root, parent_key)
  parent_dir = root / str(parent_key)
  lives = [index_format.live_doc_ids(parent_dir, e) for e in manifest["shards"]]
  plan, delta_shards = _delta_plan(parent_dir, manifest, lives, np.asarray(added), new_shard,
                                   np.asarray(removed, np.int64))
  info = dict(extra or {})
  info["incremental"] = dict(info.get("incremental") or {}, parent=str(parent_key),
                             mode="delta")
  return _publish_plan(root, index_format.VersionKey(int(key), new.version), manifest, plan,
                       delta_shards, new, info, start, None)


def _publish_plan(root: epath.Path, key, manifest: dict[str, Any], plan, delta_shards: int,
                  new: corpus_versions.CorpusVersion, info: dict[str, Any], start: float,
                  before_publish: Callable[[], None] | None) -> epath.Path:
  """Runs the shard writers of `plan` as version `key` and publishes it (nothing on failure);
  `info` goes into the manifest, with the bytes written and seconds added to its
  `incremental`."""
  build = index_format.start_version(root, key, len(plan), manifest["searcher"],
                                     manifest.get("searcher_options") or {},
                                     single_writer=True,
                                     info=dict(corpus_version=new.version))
  try:
    for i, write in enumerate(plan):
      write(build, i)
    info["incremental"] = dict(info.get("incremental") or {},
                               bytes_written=_bytes_under(index_format.tmp_dir(root, key)),
                               seconds=round(time.time() - start, 3))
    info.update(corpus_version=new.version, corpus_num_docs=new.corpus.num_docs,
                delta_shards=delta_shards, **index_format.corpus_record(new.corpus))
    return index_format.finish_version(root, build, expected_num_docs=len(new.live_ids),
                                       extra=info, before_publish=before_publish)
  except BaseException:
    current = index_format.read_build(root, key)
    if current is not None and current["attempt"] == build["attempt"]:
      index_format.tmp_dir(root, key).rmtree()
    raise


def _rewrite_reason(manifest: dict[str, Any], lives: list[np.ndarray], removed: np.ndarray,
                    num_added: int, max_delta_shards: int, max_deleted_fraction: float
                    ) -> str | None:
  """Why a delta update of a published version (its shards' live ids `lives`) should rewrite
  instead (None: a delta)."""
  stored = sum(index_format.stored_num_docs(e) for e in manifest["shards"])
  live = np.concatenate(lives)
  deleted = (stored - len(live)) + int(np.isin(removed, live).sum())
  return rewrite_reason(int(manifest.get("delta_shards", 0)), stored, deleted, num_added,
                        max_delta_shards, max_deleted_fraction)


def delta_shard(kind: str, added_embeddings: np.ndarray, added_ids: np.ndarray,
                options: dict[str, Any]):
  """The one new shard of a delta update: [A, D] rows of ids [A] as an exact or ScaNN
  searcher (None when nothing is added). ScaNN: leaves sized to the shard, a quarter of them
  searched, not the default tenth: the shard is a small part of the index, so this costs
  little and keeps its recall at the base shards' (10% of 20k rows as one update: recall@10
  0.9715 -> 0.998, BENCHMARKS.md)."""
  if not len(added_ids):
    return None
  added_embeddings = np.asarray(added_embeddings, np.float32)
  if kind != "scann":
    return searcher_lib.ExactSearcher(added_embeddings, np.asarray(added_ids, np.int64))
  options = {k: v for k, v in options.items() if k not in ("num_leaves", "num_leaves_to_search")}
  leaves = scann_searcher.default_num_leaves(len(added_ids))
  options.update(num_leaves=leaves, num_leaves_to_search=max(1, -(-leaves // 4)))
  return scann_searcher.ScannSearcher(added_embeddings, added_ids, **options)


def delta_update(searcher, new_shard, removed_ids: np.ndarray
                 ) -> searcher_lib.ShardedSearcher:
  """The in-memory twin of a delta version: each shard of `searcher` without `removed_ids`
  (ScaNN in place; a shard left empty is dropped), then `new_shard` (`delta_shard`'s)."""
  removed_ids = np.asarray(removed_ids, np.int64)
  shards = []
  for shard in getattr(searcher, "shards", [searcher]):
    gone = removed_ids[np.isin(removed_ids, shard.doc_ids)]
    if len(gone) == len(shard.doc_ids):
      continue
    shards.append(index_format.without_ids(shard, gone))
  if new_shard is not None:
    shards.append(new_shard)
  if not shards:
    raise index_format.IndexVersionError("the update would leave the index empty")
  return searcher_lib.ShardedSearcher(shards)


def rewrite_reason(delta_shards: int, stored_rows: int, deleted_rows: int, num_added: int,
                   max_delta_shards: int = MAX_DELTA_SHARDS,
                   max_deleted_fraction: float = MAX_DELETED_FRACTION) -> str | None:
  """Why the next update should rewrite rather than add a delta (None: a delta): the update
  shards it would make, and the deleted share of the rows the files would hold."""
  if delta_shards + (1 if num_added else 0) > max_delta_shards:
    return (f"{delta_shards + 1} update shards > max_delta_shards={max_delta_shards}")
  if deleted_rows > max_deleted_fraction * (stored_rows + num_added):
    return (f"{deleted_rows} of {stored_rows + num_added} stored rows deleted > "
            f"max_deleted_fraction={max_deleted_fraction}")
  return None


def _delta_plan(parent_dir: epath.Path, manifest: dict[str, Any], lives: list[np.ndarray],
                added: np.ndarray, new_shard, removed: np.ndarray):
  """Writers for a delta version: each parent shard (live ids `lives[i]`) shared with its
  deletions, and dropped when nothing of it is left, then `new_shard` (`delta_shard`'s
  searcher of the `added` ids, None when there are none). -> (plan, delta shards)."""
  plan = []
  entries = manifest["shards"]
  delta_shards = int(manifest.get("delta_shards", 0))
  first_delta = len(entries) - delta_shards
  for position, (entry, live) in enumerate(zip(entries, lives)):
    gone = removed[np.isin(removed, live)]
    if len(gone) == len(live):
      delta_shards -= int(position >= first_delta)
      continue  # every row deleted: the shard leaves the index
    deleted = np.concatenate([index_format.deleted_ids(parent_dir, entry), gone])
    plan.append(lambda build, i, entry=entry, deleted=deleted: index_format.share_shard(
        parent_dir.parent, build, i, index_format.parse_version(parent_dir.name), entry,
        deleted))
  if new_shard is not None:
    if not np.array_equal(np.sort(new_shard.doc_ids), np.sort(added)):
      raise ValueError("the new shard does not hold exactly the added ids")
    scann = isinstance(new_shard, scann_searcher.ScannSearcher)
    rows = None if scann else new_shard.embeddings  # ScaNN: stored in its own files
    plan.append(lambda build, i: index_format.write_shard(
        parent_dir.parent, build, i, rows, new_shard.doc_ids,
        searcher=new_shard if scann else None))
    delta_shards += 1
  if not plan:
    raise index_format.IndexVersionError("the update would leave the index empty")
  return plan, delta_shards


def _rewrite_plan(root: epath.Path, parent_key: int, manifest: dict[str, Any],
                  added: np.ndarray, added_embeddings: np.ndarray, removed: np.ndarray,
                  rebalance: bool):
  """Writers for a rewritten version: the parent's base shards with their deletions applied,
  and the delta shards' rows plus the added ones dealt round-robin into them. -> (plan, 0)."""
  _, shards = index_format.load_shards(root, parent_key)
  num_delta = int(manifest.get("delta_shards", 0))
  base = shards[:len(shards) - num_delta]
  parent_dir = root / str(parent_key)
  moved = [index_format.shard_rows(parent_dir, e)  # the update shards' live rows
           for e in manifest["shards"][len(shards) - num_delta:]]
  add_ids = np.concatenate([ids for _, ids in moved] + [added]).astype(np.int64)
  add_rows = np.concatenate([rows for rows, _ in moved] + [added_embeddings])
  keep = ~np.isin(add_ids, removed)
  add_ids, add_rows = add_ids[keep], add_rows[keep]
  if not base:
    raise index_format.IndexVersionError(f"version {parent_key} has no base shards")
  num_shards = len(base)
  plan = []
  for i, (embeddings, doc_ids, searcher) in enumerate(base):
    ids_i, rows_i = add_ids[i::num_shards], add_rows[i::num_shards]
    gone = removed[np.isin(removed, doc_ids)]
    if manifest["searcher"] == "scann" and searcher is not None:
      searcher.delete(gone)
      searcher.upsert(rows_i, ids_i)
      if rebalance:
        searcher.rebalance()
      ids = searcher.doc_ids
      rows = None  # the searcher holds the only copy of the vectors
    elif embeddings is None:
      raise index_format.IndexVersionError(f"shard {i} of {parent_key} has no vectors to "
                                           "update")
    else:
      exact = searcher_lib.ExactSearcher(embeddings, doc_ids).updated(rows_i, ids_i, gone)
      ids, rows = exact.doc_ids, exact.embeddings
      searcher = None  # write_shard trains ScaNN for old-format scann shards
    if not len(ids):
      raise index_format.IndexVersionError(f"shard {i} would be empty after the update")
    plan.append(lambda build, j, rows=rows, ids=ids, searcher=searcher:
                index_format.write_shard(root, build, j, rows, ids, searcher=searcher))
  return plan, 0


def _bytes_under(folder: epath.Path) -> int:
  """Bytes of the files under a (local or remote) folder: what this version wrote."""
  return sum((folder / name).stat().length for name in storage.list_files(folder))


def make_full_shards(new: corpus_versions.CorpusVersion, embeddings: np.ndarray,
                     kind: str, options: dict[str, Any], num_shards: int = 1
                     ) -> list[tuple[np.ndarray, np.ndarray, Any]]:
  """A full rebuild's shards over the live blocks (reference for tests and benchmarks):
  embeddings [L, D] of new.live_ids, split contiguously."""
  ids = new.live_ids
  out = []
  for part_ids, part in zip(np.array_split(ids, num_shards),
                            np.array_split(embeddings, num_shards)):
    out.append((part, part_ids, scann_searcher.make_searcher(kind, part, part_ids, **options)))
  return out


def apply_update(searcher, added_embeddings: np.ndarray, added_ids: np.ndarray,
                 removed_ids: np.ndarray):
  """An in-memory searcher changed by a corpus update: removed_ids [R] dropped, added rows
  [A, D] / ids [A] added (dealt round-robin over a ShardedSearcher's shards). -> the searcher
  to use from now on (ScaNN shards change in place; exact ones are replaced)."""
  removed_ids = np.asarray(removed_ids, np.int64)
  added_ids = np.asarray(added_ids, np.int64)
  if isinstance(searcher, searcher_lib.ShardedSearcher):
    n = len(searcher.shards)
    return searcher_lib.ShardedSearcher([
        apply_update(shard, added_embeddings[i::n], added_ids[i::n],
                     removed_ids[np.isin(removed_ids, shard.doc_ids)])
        for i, shard in enumerate(searcher.shards)])
  if isinstance(searcher, scann_searcher.ScannSearcher):
    searcher.delete(removed_ids[np.isin(removed_ids, searcher.doc_ids)])
    searcher.upsert(added_embeddings, added_ids)
    return searcher
  if isinstance(searcher, searcher_lib.ExactSearcher):
    return searcher.updated(added_embeddings, added_ids, removed_ids)
  raise TypeError(f"cannot update a {type(searcher).__name__} in place (rebuild it from an "
                  "exact searcher)")


def rewrite_in_memory(searcher, update_ids: np.ndarray, update_embeddings: np.ndarray,
                      added_embeddings: np.ndarray, added_ids: np.ndarray,
                      removed_ids: np.ndarray):
  """The in-memory twin of a rewritten version (`_rewrite_plan`): the shards of `searcher`
  holding none of `update_ids` [U] are its base shards; the update shards' rows
  (`update_embeddings` [U, D]) and the added ones ([A, D], `added_ids` [A]) are dealt
  round-robin into them, every id in `removed_ids` dropped. -> the searcher (base shards only;
  ScaNN ones changed in place)."""
  update_ids = np.asarray(update_ids, np.int64)
  removed_ids = np.asarray(removed_ids, np.int64)
  base = [s for s in getattr(searcher, "shards", [searcher])
          if not np.isin(s.doc_ids, update_ids).any()]
  if not base:
    raise index_format.IndexVersionError("no base shard to fold the update shards into")
  ids = np.concatenate([update_ids, np.asarray(added_ids, np.int64)])
  rows = np.concatenate([np.asarray(update_embeddings, np.float32).reshape(-1, searcher.dim),
                         np.asarray(added_embeddings, np.float32).reshape(-1, searcher.dim)])
  keep = ~np.isin(ids, removed_ids)
  return apply_update(base[0] if len(base) == 1 else searcher_lib.ShardedSearcher(base),
                      rows[keep], ids[keep], removed_ids)


def follow_version(searcher, old: corpus_versions.CorpusVersion,
                   new: corpus_versions.CorpusVersion,
                   embed_rows: Callable[[np.ndarray], np.ndarray]):
  """An in-memory searcher over corpus version `old` brought to `new`: the blocks added since
  are embedded (`embed_rows(doc ids [A]) -> [A, D]`, the caller's document tower) and added,
  the removed ones dropped (`apply_update`). What the trainer's own index and Open-QA's frozen
  index both do when a corpus version is published.

  -> (the searcher to use from now on, added ids [A], removed ids [R], added embeddings [A, D])
  """
  added, removed = corpus_versions.changes(old, new)
  added_embeddings = (np.asarray(embed_rows(added), np.float32) if len(added) else
                      np.zeros((0, searcher.dim), np.float32))
  if added_embeddings.shape != (len(added), searcher.dim):
    raise ValueError(f"embed_rows gave {added_embeddings.shape} for {len(added)} blocks of "
                     f"dim {searcher.dim}")
  return (apply_update(searcher, added_embeddings, added, removed), added, removed,
          added_embeddings)


def shards_to_publish(searcher) -> tuple[list[tuple[np.ndarray | None, np.ndarray]], list]:
  """([(embeddings [n, D] or None for ScaNN, doc ids [n]), ...], [searcher per shard]) of an
  in-memory searcher, as `index_format.publish_index` takes them."""
  shards = getattr(searcher, "shards", [searcher])
  return ([(getattr(s, "embeddings", None), np.asarray(s.doc_ids)) for s in shards],
          list(shards))
