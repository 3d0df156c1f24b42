"""Run with 4 simulated CPU devices: 3 train steps under shard_map, pmap and on 1 device.

    XLA_FLAGS=--xla_force_host_platform_device_count=4 python tests/train/parallel_check.py

Prints one JSON line: the largest absolute parameter difference of each wrapper from the
one-device run on the same global batch, and the device count.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from toy_system import build_system, toy_batch, toy_config  # noqa: E402

from jaxdet.train import loop, setup  # noqa: E402
from jaxdet.train.step import make_steps  # noqa: E402


def run(mode: str | None, config, system, batches):
  state, rng, _ = setup.init_state(config, system, batches[0])
  if mode is None:   # one device, plain jit of the same step
    step = jax.jit(make_steps(system)[0])
    for b in batches:
      state, _ = step(state, b, rng)
    return state.params, []
  runner = loop.make_runner(system, mode)
  dstate, drng = runner.put_state(state), runner.put_rng(rng)
  for b in batches:
    dstate, metrics = runner.step(dstate, runner.put_batch(b), drng)
  shapes = sorted({tuple(np.shape(v)) for v in jax.device_get(metrics).values()})
  return runner.get_state(dstate).params, shapes


def main():
  config = toy_config(**{"optimizer.name": "adamw", "optimizer.learning_rate": 0.01,
                         "optimizer.grad_clip_norm": 1.0, "train.batch_size": 8})
  system = build_system(config)
  batches = [toy_batch(i, 0, 8) for i in range(3)]
  one, _ = run(None, config, system, batches)
  out = {"devices": jax.device_count()}
  for mode in ("shard_map", "pmap"):
    params, out[mode + "_metric_shapes"] = run(mode, config, system, batches)
    diffs = jax.tree_util.tree_map(lambda a, b: float(np.max(np.abs(np.asarray(a) - b))),
                                   one, params)
    out[mode] = max(jax.tree_util.tree_leaves(diffs))
  moved = jax.tree_util.tree_map(
      lambda a, b: float(np.max(np.abs(np.asarray(a) - b))), one,
      setup.init_state(config, system, batches[0])[0].params)
  out["moved"] = max(jax.tree_util.tree_leaves(moved))
  print(json.dumps(out))


if __name__ == "__main__":
  main()
