"""Every system learns: a short run on a few synthetic images must score well on those same
images (it can overfit them), so that a broken target, loss or decoding fails CI.

Each case is the system's cpu preset (experiments/configs/<system>.py, its network, loss and
optimizer unchanged) trained through `jaxdet.train.train_and_evaluate` on the first few images
of the synthetic train split (no augmentation, no warm-up) and evaluated on that same split
(`eval.split = "train"`). Thresholds sit well below the measured scores (other changes move the
numerics: the per-step PRNG, float reductions); each comment gives the score measured with

    python -m pytest -q -n 0 --durations=0 tests/test_learning.py

on the 2-core development machine (jax 0.10.2 CPU; the 8 runs took 146 s of CPU). A broken
target (labels shifted by one class, box targets zero) leaves these scores near 0.
"""

import importlib
import json
import os

import pytest

from jaxdet.train import train_and_evaluate

# system -> (config overrides, eval metric, threshold). The first 4 synthetic train images hold
# 8 objects of 5 classes, the first 8 hold 16 objects of all 6 classes.
FEW = {"data.num_train": 4, "train.batch_size": 4, "eval.batch_size": 4}
CASES = {
    # measured: accuracy 1.000 (after 40 steps)
    "classify": ({"train.num_steps": 40}, "accuracy", 0.8),
    # measured: VOC07 mAP 1.000, mean IoU 0.894
    "localization": ({"train.num_steps": 50}, "voc07_map", 0.8),
    # measured: VOC07 mAP 1.000 (a run evaluated on the way: 0.848 after 40 steps)
    "windows": ({**FEW, "train.num_steps": 80}, "voc07_map", 0.7),
    # measured: VOC07 mAP 1.000 (0.932 after 50 steps)
    "overfeat": ({**FEW, "train.num_steps": 100}, "voc07_map", 0.7),
    # the fine-tuned region classifier's softmax (the SVM stages are experiments.rcnn_stages')
    # measured: VOC07 mAP 0.955 (0.803 after 50 steps)
    "rcnn": ({**FEW, "train.num_steps": 100}, "voc07_map", 0.7),
    # measured: VOC07 mAP 0.970 (0.825 after 40 steps)
    "fast_rcnn": ({**FEW, "train.num_steps": 80}, "voc07_map", 0.7),
    # approximate joint training; measured: VOC07 mAP 1.000 (of a 150-step schedule: 0.679 /
    # 0.740 / 1.000 after 75 / 100 / 125 steps)
    "faster_rcnn": ({**FEW, "train.num_steps": 180}, "voc07_map", 0.6),
    # measured: VOC07 mAP 1.000 (of a 60-step schedule: 0.177 / 0.991 after 30 / 45 steps)
    "yolo": ({"train.num_steps": 80}, "voc07_map", 0.7),
}


def learning_config(system, workdir, overrides):
  """The system's cpu preset, trained on a few images and evaluated on the same ones."""
  config = importlib.import_module(f"experiments.configs.{system}").get_config("cpu")
  config.unlock()
  settings = {"data.num_train": 8, "data.prefetch": 0, "data.num_workers": 1,
              "data.augment.hflip": False, "train.batch_size": 8, "train.log_every": 1000,
              "optimizer.warmup_steps": 0, "eval.split": "train", "eval.every_steps": 0,
              "eval.max_batches": -1, "eval.batch_size": 8, "checkpoint.every_steps": 0,
              **overrides}
  for key, value in settings.items():
    *path, last = key.split(".")
    node = config
    for name in path:
      node = node[name]
    node[last] = value
  if config.data.get("proposals"):   # selective search on the few images, cached here
    config.data.proposals.cache_root = os.path.join(workdir, "proposals")
    config.data.proposals.num_workers = 1
  return config


def train_and_score(system, workdir, overrides):
  """Trains `system` as CASES says in `workdir`; its final eval metrics on the train split."""
  train_and_evaluate(learning_config(system, workdir, overrides), workdir)
  with open(os.path.join(workdir, "eval.json")) as f:
    return json.load(f)


@pytest.mark.slow
@pytest.mark.parametrize("system", list(CASES))
def test_system_learns_its_training_images(system, tmp_path):
  overrides, metric, threshold = CASES[system]
  scores = train_and_score(system, str(tmp_path), overrides)
  assert scores["num_images"] == overrides.get("data.num_train", 8)
  assert scores[metric] >= threshold, (system, metric, scores)
