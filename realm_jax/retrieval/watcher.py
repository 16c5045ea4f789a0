"""The trainer's side of the index-builder job: notice, load and validate new index versions.

A daemon thread polls `index/LATEST`; a new version is loaded and validated (manifest,
checksums, dim and document count) entirely off the training thread. The loop calls
`take_new()` between two steps and swaps the searcher in; a version that fails validation is
logged and skipped (the old index stays), one deleted while loading is retried later.
"""

from __future__ import annotations

import logging
import threading
import time

import numpy as np
from etils import epath

from realm_jax.retrieval import candidates as candidates_lib
from realm_jax.retrieval import index_format
from realm_jax.retrieval import searcher as searcher_lib


class IndexWatcher:
  """Background loader of the newest published index version."""

  def __init__(self, index_root: epath.PathLike, expected_dim: int, expected_num_docs: int,
               poll_seconds: float = 1.0):
    self.root = epath.Path(index_root)
    self._expected = dict(expected_dim=expected_dim, expected_num_docs=expected_num_docs)
    self._poll = poll_seconds
    self._lock = threading.Lock()
    self._pending: tuple[int, searcher_lib.Searcher, float] | None = None
    self._seen: set[int] = set()  # loaded or rejected for good
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

  def _poll_once(self):
    try:
      step = index_format.latest_step(self.root)
    except (OSError, ValueError):  # LATEST being replaced, or unreadable: try again later
      return
    if step is None or step in self._seen:
      return
    start = time.time()
    try:
      _, searcher = index_format.load_index(self.root, step, **self._expected)
    except index_format.IndexVersionError as e:
      self._seen.add(step)
      self.rejected[step] = str(e)
      logging.warning("index watcher: rejected version %d: %s (keeping the current index)",
                      step, e)
      return
    except (FileNotFoundError, OSError) as e:  # deleted while loading: LATEST will move on
      logging.warning("index watcher: version %d vanished while loading (%s); retrying", step, e)
      return
    self._seen.add(step)
    with self._lock:
      self._pending = (step, searcher, time.time() - start)

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

  def wait_for_first(self, timeout: float) -> tuple[int, searcher_lib.Searcher, float]:
    """Blocks until a first version is loaded (only the very first index is waited for)."""
    deadline = time.time() + timeout
    logging.info("index watcher: waiting up to %.0fs for the index builder's first version in "
                 "%s (run --mode=index_builder with the same --config and --workdir)", timeout,
                 self.root)
    while time.time() < deadline:
      pending = self.take_new()
      if pending is not None:
        return pending
      time.sleep(min(self._poll, 0.2))
    raise TimeoutError(f"no valid index version appeared in {self.root} within {timeout:.0f}s: "
                       "is the index-builder job running on this workdir?")


class WatchedIndex:
  """The trainer's view of builder-published versions; same interface as InProcessIndex."""

  def __init__(self, watcher: IndexWatcher, null_id: int):
    self.watcher, self._null_id = watcher, null_id
    self.searcher: searcher_lib.Searcher | None = None
    self.step: int | None = None
    self.last_refresh_seconds = 0.0  # here: the last version's load time (off-thread)
    self.swaps = 0

  def wait_for_first(self, timeout: float):
    self.step, self.searcher, self.last_refresh_seconds = self.watcher.wait_for_first(timeout)

  def maybe_swap(self) -> bool:
    """Swaps in a newer loaded version, if any; call between two steps."""
    new = self.watcher.take_new()
    if new is None or (self.step is not None and new[0] <= self.step):
      return False
    self.step, self.searcher, self.last_refresh_seconds = new
    self.swaps += 1
    return True

  def retrieve(self, query_emb: np.ndarray, source_ids: np.ndarray, k: int, margin: int
               ) -> tuple[np.ndarray, np.ndarray]:
    return candidates_lib.retrieve(self.searcher, query_emb, source_ids, k, margin, self._null_id)
