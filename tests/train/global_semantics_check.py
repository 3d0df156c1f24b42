"""Run with 4 simulated CPU devices: every detector's cpu preset, 2 train steps on 1 device
(plain jit at the global batch) and under shard_map and pmap over 4 devices.

    XLA_FLAGS=--xla_force_host_platform_device_count=4 python tests/train/global_semantics_check.py \
        [system ...]

Prints one JSON line {system: {"shard_map": max |dparam|, "pmap": ..., "moved": max |param
change| of the one-device run}, "devices": 4}. Reduced presets: 16 training images, batch 8
(R-CNN's fine-tuning 4), precomputed proposals replaced by random boxes (no selective search).
"""

import importlib
import json
import os
import sys

import jax
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

from jaxdet.data.pipeline import make_loader  # noqa: E402
from jaxdet.train import loop, setup  # noqa: E402
from jaxdet.train.step import make_steps  # noqa: E402

SYSTEMS = ("classify", "localization", "windows", "overfeat", "rcnn", "fast_rcnn",
           "faster_rcnn", "yolo")
STEPS = 2


def reduced_config(name: str):
  config = importlib.import_module(f"experiments.configs.{name}").get_config("cpu")
  config.unlock()
  config.data.num_train = 16
  config.data.prefetch = 0
  config.data.num_workers = 1
  if "proposals" in config.data:
    config.data.proposals.max_proposals = 0
  if name == "rcnn":   # the fine-tuning stage: the one stage trained by train_step
    from experiments import rcnn_stages
    config = rcnn_stages.finetune_config(config)
    config.unlock()
  if "init_from" in config.model:
    config.model.init_from = ""
  config.train.batch_size = 4 if name == "rcnn" else 8
  # plain SGD: Adam's m / sqrt(v) would magnify float32 reassociation in parameters whose
  # gradients nearly cancel, hiding what this check compares (the update's semantics)
  config.optimizer.name = "sgd"
  config.optimizer.momentum = 0.0
  # small enough that 2 steps stay in the linear regime (the per-image sums of localization's
  # and YOLO's losses give large gradients)
  config.optimizer.learning_rate = {"localization": 1e-4, "yolo": 1e-5}.get(name, 0.02)
  config.optimizer.warmup_steps = 0
  return config


def with_proposals(batch, index: int, num: int = 32):
  """Adds random proposals (and the ground truth boxes among them) to a batch."""
  rng = np.random.default_rng(index)
  b, h, w = batch["image"].shape[:3]
  xy = rng.uniform(0, 0.7, (b, num, 2)) * [w, h]
  wh = rng.uniform(0.15, 0.3, (b, num, 2)) * [w, h]
  props = np.concatenate([xy, np.minimum(xy + wh, [w, h])], -1).astype(np.float32)
  m = batch["boxes"].shape[1]
  props[:, :m] = np.where(batch["box_mask"][..., None], batch["boxes"], props[:, :m])
  mask = np.ones((b, num), bool)
  mask[:, -4:] = False
  return {**batch, "proposals": props, "proposal_mask": mask}


def batches_of(name: str, config):
  loader = make_loader(config.data, "train", batch_size=int(config.train.batch_size), seed=0,
                       train=True)
  out = []
  for i in range(STEPS):
    batch = {k: v for k, v in next(loader).items() if k != "example_mask"}
    out.append(with_proposals(batch, i) if name in ("rcnn", "fast_rcnn") else batch)
  return out


def run(mode, config, system, batches):
  state, rng, _ = setup.init_state(config, system, batches[0])
  if mode is None:   # one device, plain jit of the same step at the global batch
    step = jax.jit(make_steps(system)[0])
    for b in batches:
      state, _ = step(state, b, rng)
    return state.params, state.model_state
  runner = loop.make_runner(system, mode, donate=False)
  dstate, drng = runner.put_state(state), runner.put_rng(rng)
  for b in batches:
    dstate, _ = runner.step(dstate, runner.put_batch(b), drng)
  final = runner.get_state(dstate)
  return final.params, final.model_state


def max_diff(a, b) -> float:
  diffs = jax.tree_util.tree_map(lambda x, y: float(np.max(np.abs(np.asarray(x) - np.asarray(y)))),
                                 a, b)
  return max(jax.tree_util.tree_leaves(diffs), default=0.0)


def check(name: str) -> dict:
  config = reduced_config(name)
  system = setup.system_from_config(config)
  batches = batches_of(name, config)
  one = run(None, config, system, batches)
  out = {"moved": max_diff(one[0], setup.init_state(config, system, batches[0])[0].params)}
  for mode in ("shard_map", "pmap"):
    params, model_state = run(mode, config, system, batches)
    out[mode] = max_diff(one[0], params)
    if model_state:   # BatchNorm statistics over the global batch
      out[mode + "_model_state"] = max_diff(one[1], model_state)
  return out


def main(names):
  out = {"devices": jax.device_count()}
  for name in names or SYSTEMS:
    out[name] = check(name)
  print(json.dumps(out))


if __name__ == "__main__":
  main(sys.argv[1:])
