"""Steps/s and images/s of the jitted train step of a config, on whatever devices exist.

    python -m experiments.bench_train --config experiments/configs/<system>.py[:preset] \
        [--steps 20] [--config.train.parallel=pmap] [--config.key=value ...]

One batch from the config's train loader is reused for every step, so data loading is not
measured. Compilation (the first call) is timed separately and excluded from the rates.
Prints one JSON line.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from experiments.configs import common


def define_flags(fv) -> None:
  from absl import flags
  flags.DEFINE_integer("steps", 20, "timed steps after compilation", flag_values=fv)


def bench(config: Any, steps: int, *, system: Any = None, make_loader: Any = None
          ) -> dict[str, Any]:
  """Times compilation and `steps` train steps; returns the figures as a dict."""
  import jax
  from jaxdet.train import loop, parallel, setup
  system = setup.system_from_config(config) if system is None else system
  make_loader = setup.default_make_loader() if make_loader is None else make_loader
  batch_size = int(config.train.batch_size)
  parallel.check_batch_divisible(batch_size, jax.device_count())
  loader = make_loader(config.data, "train", batch_size=batch_size, seed=int(config.seed),
                       train=True)
  host_batch = next(iter(loader))
  state, rng, _ = setup.init_state(config, system, host_batch)
  runner = loop.make_runner(system, str(config.train.get("parallel", "shard_map")))
  state, batch, rng = runner.put_state(state), runner.put_batch(host_batch), runner.put_rng(rng)
  start = time.perf_counter()
  state, metrics = jax.block_until_ready(runner.step(state, batch, rng))
  compile_s = time.perf_counter() - start
  start = time.perf_counter()
  for _ in range(steps):
    state, metrics = runner.step(state, batch, rng)
  jax.block_until_ready((state, metrics))
  seconds = time.perf_counter() - start
  return {"system": system.name, "preset": config.get("preset", ""),
          "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
          "parallel": str(config.train.get("parallel", "shard_map")),
          "batch_size": batch_size, "image_shape": list(host_batch["image"].shape[1:3]),
          "compute_dtype": str(config.get("compute_dtype", "float32")),
          "compile_plus_first_step_s": round(compile_s, 3), "steps": steps,
          "steps_per_s": round(steps / seconds, 3),
          "images_per_s": round(steps * batch_size / seconds, 2)}


def main(argv: list[str]) -> dict[str, Any]:
  config, flags = common.parse_flags(argv, define_flags)
  result = bench(config, int(flags.steps))
  print(json.dumps(result))
  return result


if __name__ == "__main__":
  main(sys.argv)
