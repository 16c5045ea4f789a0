"""Start-up memory preflight: estimated per-host and per-device bytes vs what is available.

A REALM run holds the document embeddings (twice during a hot swap), the ScaNN searcher, the
corpus arrays that are resident (memory-mapped ones are paged in on demand and not counted) and
the train state. At 13.35M blocks these are tens of GB per host; finding out at the first
refresh, hours in, is too late. `check` fails fast with every number, or only warns.
"""

from __future__ import annotations

import dataclasses
import logging
import os

import numpy as np


class InsufficientMemory(RuntimeError):
  """The estimated footprint does not fit the host's (or a device's) available memory."""


@dataclasses.dataclass(frozen=True)
class Estimate:
  """Estimated bytes of one host and one device."""

  index_bytes: int  # embeddings (copies held during a swap) + searcher structures, per host
  corpus_bytes: int  # corpus arrays resident in RAM (not memory-mapped), per host
  state_bytes_per_device: int  # parameters + optimizer state on one device

  @property
  def host_bytes(self) -> int:
    return self.index_bytes + self.corpus_bytes


def index_bytes(num_vectors: int, dim: int, *, dtype_bytes: int = 4, copies: int = 2,
                searcher_bytes_per_vector: float = 0.0) -> int:
  """Embeddings [num_vectors, dim] x copies (the live and the incoming version) + searcher."""
  return int(num_vectors * dim * dtype_bytes * copies + num_vectors * searcher_bytes_per_vector)


def resident_bytes(arrays) -> int:
  """Bytes of the arrays that live in RAM; np.memmap arrays (paged on demand) count 0."""
  return int(sum(a.nbytes for a in arrays if not isinstance(a, np.memmap)))


def resident_corpus_bytes(corpus) -> int:
  """`resident_bytes` of a corpus dataclass's array fields (memory-mapped ones count 0)."""
  return resident_bytes(getattr(corpus, f.name) for f in dataclasses.fields(corpus)
                        if isinstance(getattr(corpus, f.name), np.ndarray))


def state_bytes_per_device(num_params: int, *, param_bytes: int = 4,
                           optimizer_copies: int = 2, fsdp: int = 1) -> int:
  """Parameters plus optimizer moments (Adam: 2 copies), split over the fsdp axis."""
  return int(num_params * param_bytes * (1 + optimizer_copies) / max(fsdp, 1))


def host_available_bytes(meminfo: str = "/proc/meminfo") -> int | None:
  """MemAvailable from /proc/meminfo (None where it cannot be read)."""
  try:
    with open(meminfo) as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except OSError:
    return None
  return None


def device_available_bytes(device) -> int | None:
  """A device's memory limit from memory_stats() (None on CPU and where unknown)."""
  stats = getattr(device, "memory_stats", lambda: None)()
  return int(stats["bytes_limit"]) if stats and "bytes_limit" in stats else None


def _gib(n: int | None) -> str:
  return "unknown" if n is None else f"{n / 2**30:.2f} GiB"


def check(estimate: Estimate, host_available: int | None, device_available: int | None,
          *, fail: bool = True, headroom: float = 0.9, where: str = "run") -> str:
  """Compares estimate with headroom x available; raises InsufficientMemory (fail) or warns.

  Returns the message with every number (logged at INFO when it fits). Unknown availability
  (None) is never a failure.
  """
  lines = [f"{where} memory preflight: host needs ~{_gib(estimate.host_bytes)} "
           f"(index {_gib(estimate.index_bytes)}, resident corpus arrays "
           f"{_gib(estimate.corpus_bytes)}), available {_gib(host_available)}; each device "
           f"needs ~{_gib(estimate.state_bytes_per_device)} of train state (parameters + "
           f"optimizer, activations not counted), available {_gib(device_available)}"]
  problems = []
  if host_available is not None and estimate.host_bytes > headroom * host_available:
    problems.append(f"host: {_gib(estimate.host_bytes)} > {headroom:.0%} of "
                    f"{_gib(host_available)} available")
  if device_available is not None and (
      estimate.state_bytes_per_device > headroom * device_available):
    problems.append(f"device: {_gib(estimate.state_bytes_per_device)} > {headroom:.0%} of "
                    f"{_gib(device_available)}")
  if not problems:
    logging.info("%s: fits", lines[0])
    return lines[0] + ": fits"
  message = (f"{lines[0]}: DOES NOT FIT ({'; '.join(problems)}). Use more hosts or a larger "
             "fsdp axis, a smaller corpus, memory-mapped corpus files, or fewer index copies; "
             "set the preflight switch to warn to run anyway.")
  if fail:
    raise InsufficientMemory(message)
  logging.warning("%s", message)
  return message


def env_fail() -> bool:
  """REALM_PREFLIGHT=warn downgrades a failed preflight to a warning (default: fail)."""
  return os.environ.get("REALM_PREFLIGHT", "fail") != "warn"


def check_trainer(config, corpus, state) -> str:
  """The trainer's preflight: its index (config.model.embed_dim x corpus rows, two copies; a
  ScaNN searcher assumed to add one more float32 copy for reordering), the corpus arrays not
  memory-mapped, and the train state's bytes on the first local device (measured from the
  shards, so fsdp is accounted for)."""
  import jax  # pylint: disable=g-import-not-at-top
  device = jax.local_devices()[0]
  state_bytes = sum(s.data.nbytes for leaf in jax.tree_util.tree_leaves(state)
                    if hasattr(leaf, "addressable_shards")
                    for s in leaf.addressable_shards if s.device == device)
  dim = config.model.embed_dim
  scann = config.retrieval.get("searcher", "exact") == "scann"
  estimate = Estimate(
      index_bytes=index_bytes(corpus.num_docs + 1, dim,
                              searcher_bytes_per_vector=4 * dim if scann else 0),
      corpus_bytes=resident_corpus_bytes(corpus), state_bytes_per_device=int(state_bytes))
  return check(estimate, host_available_bytes(), device_available_bytes(device),
               fail=env_fail(), where="trainer")


def check_builder(config, corpus, model, num_rows: int) -> str:
  """The index builder's preflight: the embeddings of its `num_rows` blocks [num_rows, D]
  float32 (one copy, plus ScaNN's float32 re-order copy with `searcher=scann`), the corpus
  arrays not memory-mapped, and the document tower's parameters on each device (replicated,
  no optimizer state; shapes from `jax.eval_shape`, nothing allocated)."""
  import jax  # pylint: disable=g-import-not-at-top
  from realm_jax.train import state as state_lib  # pylint: disable=g-import-not-at-top
  abstract = jax.eval_shape(model.init, jax.random.key(0), *state_lib.dummy_inputs(config))
  params = abstract["params"]
  tower = [params[k] for k in state_lib.EMBEDDER_KEYS if k in params] or [params]
  param_bytes = sum(int(np.prod(leaf.shape)) * leaf.dtype.itemsize
                    for leaf in jax.tree_util.tree_leaves(tower))
  dim = config.model.embed_dim
  scann = config.retrieval.get("searcher", "exact") == "scann"
  estimate = Estimate(
      index_bytes=index_bytes(num_rows, dim, copies=1,
                              searcher_bytes_per_vector=4 * dim if scann else 0),
      corpus_bytes=resident_corpus_bytes(corpus), state_bytes_per_device=int(param_bytes))
  return check(estimate, host_available_bytes(), device_available_bytes(jax.local_devices()[0]),
               fail=env_fail(), where="index_builder")
