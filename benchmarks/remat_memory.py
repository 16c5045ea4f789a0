"""XLA temp memory of the REALM train step with and without rematerialization (no step run).

  python benchmarks/remat_memory.py --size=base --batch_size=1 --k=8 --query_len=96 \
      --doc_len=288 --variants=off,nothing,dots

Compiles `steps.make_realm_train_step` ahead of time on abstract inputs (no parameters are
allocated: `jax.eval_shape` of the train state, `ShapeDtypeStruct` batches) and prints
`compiled.memory_analysis()` for each `model.remat` / `model.remat_policy` variant: "off"
(remat=False) and one per policy of `bert.REMAT_POLICIES`. One JAX device (run without the
tests' fake-device flag) unless XLA_FLAGS says otherwise.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))


def compile_memory(size: str, batch_size: int, k: int, query_len: int, doc_len: int,
                   max_masked: int, vocab_size: int, remat: bool, policy: str,
                   dtype: str = "float32", dropout: float = 0.1) -> dict:
  """Lower + compile the train step for abstract inputs -> memory_analysis fields (bytes)."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from realm_jax import config_lib  # pylint: disable=import-outside-toplevel
  from realm_jax.train import partitioning  # pylint: disable=import-outside-toplevel
  from realm_jax.train import state as state_lib  # pylint: disable=import-outside-toplevel
  from realm_jax.train import steps as steps_lib  # pylint: disable=import-outside-toplevel
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "experiments"))
  import realm_facts  # pylint: disable=import-outside-toplevel

  config = realm_facts.get_config(f"size={size}")
  config.model.remat, config.model.remat_policy = remat, policy
  config.model.dtype, config.model.dropout_rate = dtype, dropout
  config.train.batch_size, config.retrieval.k = batch_size, k
  config.data.query_len, config.data.doc_len = query_len, doc_len
  config.data.max_masked, config.data.vocab_size = max_masked, vocab_size
  mesh = partitioning.make_mesh(config.mesh)
  config_lib.validate(config, partitioning.data_parallel_size(mesh), 1)
  model = state_lib.build_model(config, vocab_size, 0)
  repl, batched = partitioning.replicated(mesh), partitioning.batch_sharded(mesh)
  state = jax.tree_util.tree_map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=repl),
      state_lib.abstract_train_state(config, model, jax.random.key(0)))
  shapes = dict(query_tokens=((batch_size, query_len), np.int32),
                masked_positions=((batch_size, max_masked), np.int32),
                masked_labels=((batch_size, max_masked), np.int32),
                masked_weights=((batch_size, max_masked), np.float32),
                cand_doc_tokens=((batch_size, k, doc_len), np.int32),
                cand_doc_segments=((batch_size, k, doc_len), np.int32),
                cand_body_tokens=((batch_size, k, doc_len - 2), np.int32),
                cand_mask=((batch_size, k), bool))
  batch = {name: jax.ShapeDtypeStruct(shape, dt, sharding=batched)
           for name, (shape, dt) in shapes.items()}
  step = steps_lib.make_realm_train_step(model, mesh, 0, "token")
  start = time.perf_counter()
  compiled = step.lower(state, batch).compile()
  memory = compiled.memory_analysis()
  return dict(compile_seconds=time.perf_counter() - start,
              **{f: int(getattr(memory, f)) for f in (
                  "argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes")})


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--size", default="base")
  parser.add_argument("--batch_size", type=int, default=1)
  parser.add_argument("--k", type=int, default=8)
  parser.add_argument("--query_len", type=int, default=96)
  parser.add_argument("--doc_len", type=int, default=288)
  parser.add_argument("--max_masked", type=int, default=10)
  parser.add_argument("--vocab_size", type=int, default=30522)
  parser.add_argument("--dtype", default="float32")
  parser.add_argument("--variants", default="off,nothing,dots")
  parser.add_argument("--output", default=None)
  args = parser.parse_args()
  import jax  # pylint: disable=import-outside-toplevel
  rows = []
  for variant in args.variants.split(","):
    remat = variant != "off"
    row = dict(variant=variant, **compile_memory(
        args.size, args.batch_size, args.k, args.query_len, args.doc_len, args.max_masked,
        args.vocab_size, remat, variant if remat else "nothing", args.dtype))
    row["temp_gib"] = row["temp_size_in_bytes"] / 2**30
    print(json.dumps(row), flush=True)
    rows.append(row)
  result = dict(vars(args), rows=rows, jax=jax.__version__, devices=jax.device_count(),
                machine=platform.processor() or platform.machine(), cpus=os.cpu_count(),
                date=datetime.date.today().isoformat(), load_average=os.getloadavg())
  if args.output:
    with open(args.output, "w") as f:
      json.dump(result, f, indent=2)


if __name__ == "__main__":
  main()
