"""JAX's persistent compilation cache, on by default: a re-run skips XLA compiles it has done.

Compiling the base-size step takes minutes on a CPU host (and tens of seconds on an
accelerator); with the cache a restarted or repeated run with the same shapes and flags loads
the executables instead. Where (`compilation_cache_dir`, top level of the config):
  ""      (default) `$XDG_CACHE_HOME/realm_jax/jax_compilation_cache`, else
          `~/.cache/realm_jax/jax_compilation_cache`;
  "none"  off;
  a path  that folder (local; shared by every run that points there).
The `JAX_COMPILATION_CACHE_DIR` environment variable, when set, wins (JAX reads it itself).
Entries are keyed by JAX on the computation, the compile options, the jax/jaxlib version and
the devices, so a stale entry is never used for a different program.
"""

from __future__ import annotations

import logging
import os

import jax

DISABLED = "none"


def default_dir() -> str:
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "realm_jax", "jax_compilation_cache")


def resolve(setting: str | None) -> str | None:
  """The folder the cache uses for a `compilation_cache_dir` value (None: off)."""
  if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    return os.environ["JAX_COMPILATION_CACHE_DIR"]
  if setting == DISABLED:
    return None
  return setting or default_dir()


def enable(config) -> str | None:
  """Points JAX's compilation cache at the config's folder (before the first compile)."""
  setting = config.get("compilation_cache_dir", "") if config is not None else ""
  directory = resolve(setting)
  if directory is None:
    logging.info("compilation cache: off (compilation_cache_dir=none)")
    return None
  if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    os.makedirs(directory, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", directory)
  logging.info("compilation cache: %s", directory)
  return directory
