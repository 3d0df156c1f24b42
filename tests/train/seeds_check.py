"""Run with 4 simulated CPU devices: 3 train steps of 2 seeds in one program under shard_map
and pmap, against one-seed runs of seeds 0 and 1 under shard_map.

    XLA_FLAGS=--xla_force_host_platform_device_count=4 python tests/train/seeds_check.py

Prints one JSON line: for each wrapper the largest absolute difference of replica i's
parameters and batch statistics from the one-seed run of seed i, the metric shapes, how far
training moved the parameters, and the device count. (The toy's BatchNorm takes statistics
per device, so the references run split over the devices as well, not on one device.)
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from toy_system import build_system, toy_batch, toy_config  # noqa: E402

from jaxdet.train import loop, setup  # noqa: E402


def config(**kw):
  # SGD: Adam would turn the float noise of the conv bias before BatchNorm (its gradient is 0
  # up to rounding, which differs between the vmapped and the plain step) into full steps
  return toy_config(**{"optimizer.learning_rate": 0.1, "train.batch_size": 8,
                       "model.batch_norm": True, **kw})


def max_diff(a, b):
  return max(jax.tree_util.tree_leaves(jax.tree_util.tree_map(
      lambda x, y: float(np.max(np.abs(np.asarray(x) - np.asarray(y)))), a, b)))


def train(runner, state, rng, batches):
  dstate, drng = runner.put_state(state), runner.put_rng(rng)
  for b in batches:
    dstate, metrics = runner.step(dstate, runner.put_batch(b), drng)
  return runner.get_state(dstate), metrics


def main():
  batches = [toy_batch(i, 0, 8) for i in range(3)]
  system = build_system(config())
  seeded = config(**{"train.num_seeds": 2})
  out = {"devices": jax.device_count()}
  one = loop.make_runner(system, "shard_map")   # one compile for both seeds
  singles = [train(one, *setup.init_state(config(seed=seed), system, batches[0])[:2],
                   batches)[0] for seed in (0, 1)]
  for mode in ("shard_map", "pmap"):   # both split the batch alike: 2 images a device
    final, metrics = train(loop.make_runner(system, mode, num_seeds=2),
                           *setup.init_state(seeded, system, batches[0])[:2], batches)
    out[mode] = max(max_diff(jax.tree_util.tree_map(lambda x, i=i: np.asarray(x)[i],
                                                    (final.params, final.model_state)),
                             (single.params, single.model_state))
                    for i, single in enumerate(singles))
    out[mode + "_metric_shapes"] = sorted({tuple(np.shape(v))
                                           for v in jax.device_get(metrics).values()})
  out["moved"] = max_diff(singles[0].params,
                          setup.init_state(config(), system, batches[0])[0].params)
  print(json.dumps(out))


if __name__ == "__main__":
  main()
