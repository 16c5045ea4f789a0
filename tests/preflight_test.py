"""The memory preflight's estimate, message and pass/fail decision, with fake availability."""

import numpy as np
import pytest

from realm_jax.train import preflight

GIB = 2**30


def test_estimates_match_hand_counts(tmp_path):
  # 13.35M blocks x 128 float32, two copies: 13.35e6 * 128 * 4 * 2 bytes.
  assert preflight.index_bytes(13_350_000, 128) == 13_350_000 * 128 * 8
  assert preflight.index_bytes(10, 4, copies=1, searcher_bytes_per_vector=2.5) == 160 + 25
  assert preflight.state_bytes_per_device(1000, fsdp=4) == 1000 * 4 * 3 // 4
  np.save(tmp_path / "a.npy", np.zeros((100, 8), np.int32))
  mapped = np.load(tmp_path / "a.npy", mmap_mode="r")
  assert preflight.resident_bytes([mapped, np.zeros(10, np.int64)]) == 80


def test_fits_returns_the_numbers():
  est = preflight.Estimate(index_bytes=2 * GIB, corpus_bytes=GIB, state_bytes_per_device=GIB)
  msg = preflight.check(est, host_available=10 * GIB, device_available=None)
  assert "3.00 GiB" in msg and "fits" in msg and "unknown" in msg


def test_host_too_small_fails_with_every_number_and_warn_mode_only_warns():
  est = preflight.Estimate(index_bytes=20 * GIB, corpus_bytes=GIB, state_bytes_per_device=GIB)
  with pytest.raises(preflight.InsufficientMemory) as e:
    preflight.check(est, host_available=16 * GIB, device_available=32 * GIB, where="trainer")
  text = str(e.value)
  for part in ("trainer", "21.00 GiB", "20.00 GiB", "1.00 GiB", "16.00 GiB", "host:"):
    assert part in text
  assert "device:" not in text
  assert "DOES NOT FIT" in preflight.check(est, 16 * GIB, 32 * GIB, fail=False)


def test_device_too_small_fails_and_unknown_availability_never_fails():
  est = preflight.Estimate(index_bytes=0, corpus_bytes=0, state_bytes_per_device=15 * GIB)
  with pytest.raises(preflight.InsufficientMemory, match="device: 15.00 GiB > 90% of 16.00"):
    preflight.check(est, host_available=None, device_available=16 * GIB)
  assert "fits" in preflight.check(est, None, None)


def test_host_available_reads_meminfo(tmp_path):
  (tmp_path / "meminfo").write_text("MemTotal: 100 kB\nMemAvailable:   2048 kB\n")
  assert preflight.host_available_bytes(str(tmp_path / "meminfo")) == 2048 * 1024
  assert preflight.host_available_bytes(str(tmp_path / "missing")) is None


def test_check_trainer_measures_fsdp_shards_and_maps(tmp_path, monkeypatch):
  """On 8 fake devices a [64, 16] float32 leaf sharded 8 ways is 512 bytes on device 0."""
  import jax
  import ml_collections
  from jax.sharding import NamedSharding, PartitionSpec
  mesh = jax.make_mesh((8,), ("fsdp",))
  leaf = jax.device_put(np.ones((64, 16), np.float32), NamedSharding(mesh, PartitionSpec("fsdp")))
  config = ml_collections.ConfigDict(dict(model=dict(embed_dim=4),
                                          retrieval=dict(searcher="exact")))
  np.save(tmp_path / "t.npy", np.zeros((11, 3), np.int32))
  corpus = type("C", (), {})()
  import dataclasses
  corpus = dataclasses.make_dataclass("C", ["tokens", "lengths"])(
      np.load(tmp_path / "t.npy", mmap_mode="r"), np.zeros(11, np.int32))
  corpus.num_docs = 10
  monkeypatch.setattr(preflight, "host_available_bytes", lambda: 100 * GIB)
  msg = preflight.check_trainer(config, corpus, {"w": leaf})
  # index 11 x 4 x 4 x 2 = 352 B, resident corpus 44 B (the memmap not counted), state 512 B
  assert "fits" in msg
  est_state = 64 * 16 * 4 // 8
  monkeypatch.setattr(preflight, "device_available_bytes", lambda d: est_state)
  with pytest.raises(preflight.InsufficientMemory, match="device"):
    preflight.check_trainer(config, corpus, {"w": leaf})
  monkeypatch.setattr(preflight, "host_available_bytes", lambda: 396 / 0.95)
  with pytest.raises(preflight.InsufficientMemory, match="host"):
    preflight.check_trainer(config, corpus, {"w": np.zeros(1)})
  monkeypatch.setenv("REALM_PREFLIGHT", "warn")
  assert "DOES NOT FIT" in preflight.check_trainer(config, corpus, {"w": np.zeros(1)})
