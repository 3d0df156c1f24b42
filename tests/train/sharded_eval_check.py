"""Run with 4 simulated CPU devices: sharded evaluation against one-device evaluation.

    XLA_FLAGS=--xla_force_host_platform_device_count=4 python tests/train/sharded_eval_check.py

The toy detector (random init) over an eval loader of 2 batches of 6 images (6 does not divide
over 4 devices; the last batch half padding). Prints one JSON line: the device count, the
largest |difference| of the per-image detections and ground truth, whether the image lists
match, and the scores of both.
"""

import dataclasses
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from toy_system import ToyLoader, build_system, toy_config  # noqa: E402

from jaxdet.train import parallel, setup  # noqa: E402
from jaxdet.train.evaluate import evaluate_variables, predict_dataset  # noqa: E402


def near_ground_truth(toy_predict):
  """The ground truth boxes moved by up to 8 px by the network's box output, scored by its
  class probability: detections whose VOC and COCO scores are neither 0 nor 1."""
  def predict(variables, batch):
    out = toy_predict(variables, batch)
    shift = (out["boxes"][:, :, :2] / batch["image_size"][:, None, ::-1] - 0.5) * 16.0
    m = batch["boxes"].shape[1]
    return {"boxes": batch["boxes"] + jax.numpy.tile(shift, (1, m, 2)),
            "scores": jax.numpy.broadcast_to(out["scores"], (len(shift), m)) * batch["box_mask"],
            "labels": batch["labels"], "valid": batch["box_mask"]}
  return predict


def main():
  config = toy_config()
  system = build_system(config)
  system = dataclasses.replace(system, predict=near_ground_truth(system.predict))
  loader = lambda: ToyLoader(6, 0, False, num_classes=3)   # noqa: E731
  state = setup.init_state(config, system, next(ToyLoader(6, 0, True, num_classes=3)))[0]
  one_mesh = parallel.data_mesh(jax.devices()[:1])
  g1, d1, _, n1 = predict_dataset(system.predict, state.variables, loader(), mesh=one_mesh)
  g4, d4, _, n4 = predict_dataset(system.predict, state.variables, loader())
  diff = 0.0
  for a, b in zip(d1 + g1, d4 + g4):
    assert sorted(a) == sorted(b)
    for k in a:
      diff = max(diff, float(np.max(np.abs(np.asarray(a[k], np.float64) - b[k]), initial=0.0)))
  keys = ("voc07_map", "coco_AP", "num_images")
  s1 = evaluate_variables(system.predict, state.variables, loader(), 3, mesh=one_mesh)
  s4 = evaluate_variables(system.predict, state.variables, loader(), 3)
  print(json.dumps({"devices": jax.device_count(), "images": [n1, n4, len(d1), len(d4)],
                    "same_lists": len(d1) == len(d4) and len(g1) == len(g4), "diff": diff,
                    "one": {k: s1[k] for k in keys}, "sharded": {k: s4[k] for k in keys}}))


if __name__ == "__main__":
  main()
