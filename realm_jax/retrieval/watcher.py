"""The trainer's side of the index-builder job: notice, load and validate new index versions.

A daemon thread polls `index/LATEST`; a new version is loaded and validated (manifest,
checksums, dim, document count and content: `index_format.load_index`) entirely off the
training thread. The loop calls `take_new()` between two steps and swaps the searcher in.

- A version that fails validation is rejected for good (keyed by step *and* manifest digest, so
  a rebuilt version of the same step is looked at again), with one log line; the old index stays.
- When LATEST is unusable (garbage, names a missing or a rejected version), the watcher falls
  back to the newest valid version newer than the one it has (`list_versions`, newest first)
  and says so once; a trainer restarted on a corrupted newest version thus starts from the
  newest valid older one instead of waiting forever.
- A version deleted while loading (pruned) is retried later, silently: LATEST moves on.
- A version over a corpus version (`<step>+<c>`, data/corpus_versions.py) is checked against
  that corpus version (doc-id space, no tombstoned id, one vector per live block) and comes
  with its corpus: `WatchedIndex` then gathers candidate tokens from it and uses its null id,
  so a removed document is never returned and new ids resolve to the right blocks.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

import numpy as np
from etils import epath

from realm_jax.data import corpus_versions
from realm_jax.retrieval import candidates as candidates_lib
from realm_jax.retrieval import index_format
from realm_jax.retrieval import searcher as searcher_lib

_LOADED, _REJECTED, _MISSING, _VANISHED = "loaded", "rejected", "missing", "vanished"


class IndexWatcher:
  """Background loader of the newest published (valid) index version."""

  def __init__(self, index_root: epath.PathLike, expected_dim: int, expected_num_docs: int,
               poll_seconds: float = 1.0, corpus_dir: epath.PathLike | None = None,
               prepare: Callable[[searcher_lib.Searcher], searcher_lib.Searcher] | None = None,
               expected_fingerprint: str | None = None):
    # `expected_fingerprint`: the trainer's corpus (version 0) fingerprint; a version over a
    # corpus version is checked against that version's own (`index_format.corpus_record`).
    # `prepare` runs on this thread after validation, e.g. placing a device searcher's table
    # on the accelerators (`device_searcher.prepare_for_swap`); a failure rejects the version.
    self._prepare = prepare
    self.root = epath.Path(index_root)
    # Where corpus versions live (default: the `corpus_dir` the builder wrote in the manifest).
    self.corpus_dir = None if corpus_dir is None else epath.Path(corpus_dir)
    self._corpora: dict[int, corpus_versions.CorpusVersion] = {}
    self.corpus_of: dict[int, corpus_versions.CorpusVersion | None] = {}  # by loaded version
    self._expected = dict(expected_dim=expected_dim, expected_num_docs=expected_num_docs,
                          expected_fingerprint=expected_fingerprint)
    self._poll = poll_seconds
    self._lock = threading.Lock()
    self._pending: tuple[int, searcher_lib.Searcher, float] | None = None
    self._newest: int | None = None  # newest step loaded (pending or taken)
    self._rejected_keys: set[tuple[int, str]] = set()  # (step, manifest digest) rejected
    self._notes: set[str] = set()  # LATEST problems already logged
    self.rejected: dict[int, str] = {}
    self.errors = 0  # unexpected exceptions survived by the polling thread
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, name="IndexWatcher", daemon=True)

  def start(self) -> "IndexWatcher":
    self._thread.start()
    return self

  def stop(self):
    self._stop.set()
    self._thread.join(timeout=10)

  def _note_once(self, key: str, message: str):
    """Logs `message` unless something was already said about `key` (a LATEST problem)."""
    if key not in self._notes:
      self._notes.add(key)
      logging.warning("index watcher: %s", message)

  def _try(self, step: int) -> str:
    """Loads version `step` unless rejected before: one of _LOADED/_REJECTED/_MISSING/_VANISHED."""
    key = index_format.manifest_id(self.root, step)
    if key is None:
      return _MISSING
    if (step, key) in self._rejected_keys:
      return _REJECTED
    try:
      loaded = self.load_now(step)
    except Exception as e:  # pylint: disable=broad-except
      if index_format.manifest_id(self.root, step) != key:  # pruned or rebuilt meanwhile
        logging.debug("index watcher: version %d changed while loading (%s)", step, e)
        return _VANISHED
      reason = str(e) if isinstance(e, index_format.IndexVersionError) else (
          f"{type(e).__name__}: {e}")
      self._rejected_keys.add((step, key))
      self.rejected[step] = reason
      logging.warning("index watcher: rejected version %d: %s (not loaded; keeping %s)", step,
                      reason, "no index yet" if self._newest is None else
                      f"version {self._newest}")
      return _REJECTED
    self._newest = step
    with self._lock:
      self._pending = loaded
    return _LOADED

  def load_now(self, step: int) -> tuple[int, searcher_lib.Searcher, float]:
    """Loads version `step` on this thread, as the polling thread would (its corpus version,
    validation, `prepare`): (step, searcher, load seconds); an error if it is not valid."""
    start = time.time()
    corpus = self._corpus_for(step)
    expected = dict(self._expected)
    if corpus is not None:
      expected.update(expected_num_docs=corpus.corpus.num_docs, removed=corpus.removed,
                      expected_fingerprint=index_format.fingerprint_of(corpus.corpus))
    _, searcher = index_format.load_index(self.root, step, **expected)
    if self._prepare is not None:
      searcher = self._prepare(searcher)
    with self._lock:
      self.corpus_of[step] = corpus
    return step, searcher, time.time() - start

  def _corpus_for(self, step: int) -> corpus_versions.CorpusVersion | None:
    """The corpus version a version was built for (None: the build itself, version 0)."""
    manifest = index_format.read_manifest(self.root, step)
    number = manifest.get("corpus_version", 0)
    if not number:
      return None
    if number not in self._corpora:
      where = self.corpus_dir or manifest.get("corpus_dir")
      if not where:
        raise index_format.IndexVersionError(
            f"version {step} is over corpus version {number}, but the corpus folder is unknown")
      self._corpora[number] = corpus_versions.load_version(where, number)
    return self._corpora[number]

  def _poll_once(self):
    try:
      latest, problem = index_format.latest_step(self.root), None
    except index_format.IndexVersionError as e:  # garbage LATEST: fall back to the listing
      latest, problem = None, str(e)
    except OSError:  # LATEST being replaced, or unreadable: try again later
      return
    outcome_of_latest = None
    if latest is not None:
      if self._newest is not None and latest <= self._newest:
        return  # nothing newer (the common case)
      outcome_of_latest = self._try(latest)
      if outcome_of_latest in (_LOADED, _VANISHED):
        return
      problem = (f"LATEST names version {latest}, which does not exist"
                 if outcome_of_latest == _MISSING
                 else f"LATEST names the rejected version {latest}")
    try:
      versions = index_format.list_versions(self.root)
    except OSError:
      return
    candidates = [s for s in reversed(versions)
                  if s != latest and (self._newest is None or s > self._newest)]
    for step in candidates:
      outcome = self._try(step)
      if outcome == _LOADED:
        if problem:
          self._notes.add(problem)
          logging.warning("index watcher: %s; fell back to version %d, the newest valid one",
                          problem, step)
        return
    if problem and outcome_of_latest != _REJECTED:  # a rejection has said its line already
      self._note_once(problem, f"{problem}; no valid newer version to fall back to (have "
                      f"{'none' if self._newest is None else self._newest})")

  def _run(self):
    while not self._stop.is_set():
      try:
        self._poll_once()
      except Exception:  # pylint: disable=broad-except
        # Never let a surprise kill the thread silently: the trainer would keep a stale index
        # forever. Log it and look again at the next poll.
        self.errors += 1
        logging.exception("index watcher: unexpected error while polling %s", self.root)
      self._stop.wait(self._poll)

  def take_new(self) -> tuple[int, searcher_lib.Searcher, float] | None:
    """The newest validated version not yet taken: (step, searcher, load seconds), or None."""
    with self._lock:
      pending, self._pending = self._pending, None
    return pending

  def _rejections(self) -> str:
    return "; ".join(f"rejected {step}: {why}" for step, why in sorted(self.rejected.items()))

  def wait_for_first(self, timeout: float, log_every: float = 60.0
                     ) -> tuple[int, searcher_lib.Searcher, float]:
    """Blocks until a first version is loaded (only the very first index is waited for).

    Says what it waits for when it starts and every `log_every` seconds (the versions it has
    seen and rejected), so a trainer blocked on a missing builder is never silent.
    """
    start = time.time()
    deadline, next_log = start + timeout, start + log_every
    logging.info("index watcher: waiting up to %.0fs for the index builder's first version in "
                 "%s (run --mode=index_builder with the same --config and --workdir)", timeout,
                 self.root)
    while time.time() < deadline:
      pending = self.take_new()
      if pending is not None:
        return pending
      if time.time() >= next_log:
        next_log += log_every
        logging.info("index watcher: still waiting (%.0fs) for a valid version in %s: %s",
                     time.time() - start, self.root,
                     self._rejections() or "no version published yet")
      time.sleep(min(self._poll, 0.2))
    raise TimeoutError(f"no valid index version appeared in {self.root} within {timeout:.0f}s: "
                       "is the index-builder job running on this workdir?"
                       + (f" ({self._rejections()})" if self.rejected else ""))


def due_version_step(step: int, refresh_every: int, lag: int) -> int:
  """`retrieval.builder_sync_lag` = lag > 0: the checkpoint step whose version batch `step` is
  retrieved from (each version is in use from `lag` steps after its checkpoint on)."""
  return max(0, (step - lag) // refresh_every * refresh_every)


class WatchedIndex:
  """The trainer's view of builder-published versions; same interface as InProcessIndex.

  Two ways to swap: `maybe_swap` takes each version as soon as the watcher has loaded it
  (asynchronous), `swap_when_due` only the version of the checkpoint a step is due to use,
  waiting for it if the builder is late (reproducible: `retrieval.builder_sync_lag`).
  """

  def __init__(self, watcher: IndexWatcher, null_id: int):
    self.watcher, self._null_id, self._base_null_id = watcher, null_id, null_id
    # The corpus the current version was built for (None: the trainer's own, the build).
    self.corpus = None
    self.searcher: searcher_lib.Searcher | None = None
    self.step: int | None = None
    self.last_refresh_seconds = 0.0  # here: the last version's load time (off-thread)
    self.swaps = 0
    # swap_when_due: a loaded version of a later checkpoint than the one due, held back.
    self._held: tuple[int, searcher_lib.Searcher, float] | None = None

  @property
  def removed(self) -> np.ndarray | None:
    """[num_docs] bool tombstones of the current version's corpus (None: the build itself)."""
    version = self.watcher.corpus_of.get(self.step)
    return None if version is None else version.removed

  def _set(self, loaded: tuple[int, searcher_lib.Searcher, float]) -> None:
    """Makes `loaded` (step, searcher, load seconds) the version in use, with its corpus."""
    self.step, self.searcher, self.last_refresh_seconds = loaded
    self._take_corpus()

  def _use(self, loaded: tuple[int, searcher_lib.Searcher, float]) -> None:
    """`_set`, counted as a swap."""
    self._set(loaded)
    self.swaps += 1

  def _take_corpus(self):
    version = self.watcher.corpus_of.get(self.step)
    self.corpus = None if version is None else version.corpus
    self._null_id = self._base_null_id if version is None else version.corpus.null_id

  def wait_for_first(self, timeout: float):
    self._set(self.watcher.wait_for_first(timeout))

  def maybe_swap(self) -> bool:
    """Swaps in a newer loaded version, if any; call between two steps."""
    new = self.watcher.take_new()
    if new is None or (self.step is not None and new[0] <= self.step):
      return False
    self._use(new)
    return True

  def swap_when_due(self, due: int, timeout: float, poll_seconds: float = 0.05,
                    log_every: float = 60.0) -> bool:
    """Makes the version in use the newest loaded one of checkpoint step <= `due`, waiting
    (up to `timeout` s, saying so every `log_every`) while none of step `due` is in use yet.

    A version of a later checkpoint loaded early is held back until it is due. One that
    arrives while `due` is still missing means the builder embedded a later checkpoint
    instead (a preemption's, or after a resume) and `due` will never come: it is taken with
    a warning (that stretch of the run is then not reproducible). Returns whether it swapped.
    """
    start = time.time()
    next_log = start + log_every
    swapped = False
    while True:
      new = self.watcher.take_new()
      if (new is not None and (self.step is None or new[0] > self.step) and
          (self._held is None or new[0] > self._held[0])):
        self._held = new  # newer than the one in use (an older one is dropped)
      if self._held is not None and int(self._held[0]) <= due:
        held, self._held = self._held, None
        self._use(held)
        swapped = True
      if self.step is not None and int(self.step) >= due:
        return swapped
      if self._held is not None:  # a later checkpoint's version, and `due` is not in use
        logging.warning("index: version %s is due but the builder published %s (a later "
                        "checkpoint) instead; using it from here", due, self._held[0])
        held, self._held = self._held, None
        self._use(held)
        return True
      now = time.time()
      if now - start > timeout:
        raise TimeoutError(f"retrieval.builder_sync_lag: the index version of checkpoint "
                           f"{due} did not appear in {self.watcher.root} within {timeout:.0f}s "
                           f"(in use: {self.step}); is the index-builder job running?")
      if now >= next_log:
        next_log += log_every
        logging.info("index: waiting (%.0fs) for the version of checkpoint %d (in use: %s)",
                     now - start, due, self.step)
      time.sleep(poll_seconds)

  def start_at_due(self, due: int, timeout: float) -> None:
    """The first version of a run in sync mode: the one of checkpoint `due` (a resumed run
    continues on the version its predecessor used at that step, if still published), else
    the first the builder offers, with a warning."""
    first = self.watcher.wait_for_first(timeout)
    if int(first[0]) < due:  # the builder is behind a resumed run: wait for `due`
      self._set(first)
      swaps = self.swaps
      self.swap_when_due(due, timeout)
      self.swaps = swaps  # still the start, not a swap
      return
    keys = [k for k in index_format.list_versions(self.watcher.root) if int(k) == due]
    if int(first[0]) > due and keys:
      self._held = first  # in use once it is due
      first = self.watcher.load_now(keys[-1])
    elif int(first[0]) > due:
      logging.warning("index: version %s is due at the start but is not published (pruned?); "
                      "starting from %s (not reproducible until the next version)", due,
                      first[0])
    self._set(first)

  def swap_to(self, step: int) -> None:
    """Swaps in exactly version `step` (multi-host: the version process 0 swapped in): the
    watcher's loaded one if it is that step, else loaded now, on this thread."""
    if self.step is not None and str(step) == str(self.step):
      return
    new = self.watcher.take_new()
    if new is None or str(new[0]) != str(step):
      new = self.watcher.load_now(step)
    self._use(new)

  def retrieve(self, query_emb: np.ndarray, source_ids: np.ndarray, k: int, margin: int
               ) -> tuple[np.ndarray, np.ndarray]:
    return candidates_lib.retrieve(self.searcher, query_emb, source_ids, k, margin, self._null_id)
