"""Gradient bytes all-reduced per train step for each paper preset (no weights, no compute).

    python -m experiments.allreduce_bytes [system ...]

Data parallelism (jaxdet.train.parallel) averages the whole gradient tree with one pmean per
step: every float32 parameter's gradient, frozen ones included (train_step takes the global
gradient norm over all of them before the optimizer zeroes the frozen updates). The parameter
shapes come from jax.eval_shape of System.init at the paper preset (pretrained weights and
init_from switched off; they do not change the shapes). A ring all-reduce over N devices sends
and receives 2 (N - 1) / N times those bytes per device.
"""

from __future__ import annotations

import importlib
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

SYSTEMS = ("classify", "localization", "overfeat", "windows", "rcnn", "fast_rcnn",
           "faster_rcnn", "yolo")


def paper_config(name: str):
  config = importlib.import_module(f"experiments.configs.{name}").get_config("paper")
  config.unlock()
  for key in ("pretrained", "init_from"):
    if key in config.model:
      config.model[key] = ""
  # frozen layers without weights are an error at build time; counted by name in `count`
  config.frozen_names = tuple(config.model.get("frozen", ()) or ())
  if "frozen" in config.model:
    config.model.frozen = ()
  if name == "rcnn":   # the network fine-tuned by train_step (the SVMs are not all-reduced)
    from experiments import rcnn_stages
    config = rcnn_stages.finetune_config(config)
  return config


def batch_struct(config) -> dict[str, jax.ShapeDtypeStruct]:
  """Shapes of one paper batch: the largest shape bucket of the data config (parameter shapes
  do not depend on it, but for YOLO's fc layer, which its square input fixes)."""
  from jaxdet.data import transforms
  try:
    buckets = config.data.get("buckets") or transforms.default_buckets(config.data)
  except ValueError:   # a resize mode without default buckets: its longer-side cap, square
    side = int(config.data.resize.max_size)
    buckets = [(side, side)]
  h, w = max((tuple(int(x) for x in b) for b in buckets), key=lambda hw: hw[0] * hw[1])
  b, m, p = int(config.train.batch_size), int(config.data.max_boxes), 2000
  s = jax.ShapeDtypeStruct
  return {"image": s((b, h, w, 3), jnp.uint8), "image_size": s((b, 2), jnp.int32),
          "boxes": s((b, m, 4), jnp.float32), "labels": s((b, m), jnp.int32),
          "box_mask": s((b, m), jnp.bool_), "proposals": s((b, p, 4), jnp.float32),
          "proposal_mask": s((b, p), jnp.bool_)}


def count(name: str) -> dict[str, object]:
  from jaxdet.train import setup
  config = paper_config(name)
  system = setup.system_from_config(config)
  shapes = jax.eval_shape(system.init, jax.random.PRNGKey(0), batch_struct(config))
  params = shapes["params"]
  leaves = jax.tree_util.tree_leaves(params)
  total = int(sum(np.prod(x.shape) for x in leaves))
  names = set(config.frozen_names)   # the paper's frozen layers (loaded weights, not trained)
  frozen = int(sum(np.prod(x.shape) for path, x in jax.tree_util.tree_flatten_with_path(params)[0]
                   if names & {getattr(k, "key", None) for k in path}))
  nbytes = 4 * total   # float32 gradients
  return {"system": name, "backbone": str(config.model.get("backbone", config.model.get(
              "variant", ""))), "batch": int(config.train.batch_size), "params": total,
          "frozen_params": frozen, "grad_mb": round(nbytes / 2**20, 1),
          "ring_mb_per_device_8": round(2 * 7 / 8 * nbytes / 2**20, 1)}


def main(argv: list[str]) -> list[dict]:
  rows, failed = [], {}
  for name in argv[1:] or SYSTEMS:
    try:
      rows.append(count(name))
    except ValueError as e:   # a preset whose System.init fails: reported, not counted
      failed[name] = str(e).splitlines()[0][:200]
  print(f"{'system':12s} {'backbone':13s} {'batch':>5s} {'params':>12s} {'frozen':>10s} "
        f"{'grad MiB':>9s} {'ring MiB/dev (8)':>17s}")
  for r in rows:
    print(f"{r['system']:12s} {r['backbone']:13s} {r['batch']:5d} {r['params']:12,d} "
          f"{r['frozen_params']:10,d} {r['grad_mb']:9.1f} {r['ring_mb_per_device_8']:17.1f}")
  for name, error in failed.items():
    print(f"{name:12s} init failed: {error}")
  print(json.dumps(rows))
  return rows


if __name__ == "__main__":
  main(sys.argv)
