"""Test set-up: 8 fake CPU devices, set before jax is imported anywhere, and one persistent
compilation cache for the whole run (both xdist workers and every subprocess they start)."""

import os
import shutil
import tempfile

# XLA's backend optimizations off: the tests' programs are tiny, so compiling dominates and the
# optimizations buy nothing (measured: train_loop + fsdp tests 339 -> 178 s). Numerics stay
# float32; the numeric tests compare with stated tolerances that hold either way.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8"
                           " --xla_backend_optimization_level=0").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Many tests compile the same tiny programs (the same step of the same tiny config, in-process
# and in CLI subprocesses); JAX's persistent cache (compiles >= 1 s) lets later ones load them.
# A fresh folder per run (named by the controller's pid; xdist workers and subprocesses inherit
# the variable), so a run's time does not depend on earlier runs; removed when the run ends.
# Measured: three train_hardening loops 56-69 s -> 27-36 s.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(),
                                   f"realm_jax_test_jax_cache_pid{os.getpid()}"))


def pytest_sessionfinish(session, exitstatus):
  """Removes this run's compilation cache (once, from the controller, not the xdist workers):
  a fresh folder per run would otherwise pile up in the temp dir."""
  del exitstatus
  if hasattr(session.config, "workerinput"):  # an xdist worker: the controller cleans up
    return
  cache = os.environ.get("JAX_COMPILATION_CACHE_DIR", "")
  if os.path.basename(cache).startswith("realm_jax_test_jax_cache_"):
    shutil.rmtree(cache, ignore_errors=True)
