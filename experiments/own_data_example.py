"""Train on your own data: any system, a list of {"image", "boxes", "labels"} examples.

    python -m experiments.own_data_example

README's "Train on your own data" section is `train_on_own_data` below.
"""

from __future__ import annotations

import numpy as np


def make_examples(n: int, seed: int) -> list[dict]:
  """Stand-in data: grey images with one bright square (class 0) or bar (class 1)."""
  g = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    image = np.full((64, 64, 3), 60, np.uint8)
    x, y, label = *g.integers(4, 36, 2), int(g.integers(2))
    w, h = (20, 20) if label == 0 else (24, 8)
    image[y:y + h, x:x + w] = 220
    out.append({"image": image, "boxes": np.array([[x, y, x + w, y + h]], np.float32),
                "labels": np.array([label], np.int32)})
  return out


def train_on_own_data(config, workdir, train_examples, test_examples, class_names):
  # --- README: Train on your own data ---
  from jaxdet.train import evaluate, train_and_evaluate
  config.data.name = "examples"             # the data are the lists passed below
  config.data.image_size = (64, 64)         # the images' (height, width)
  config.num_classes = len(class_names)
  train_and_evaluate(config, workdir, examples=train_examples,
                     eval_examples=test_examples, class_names=class_names)
  return evaluate(config, workdir, examples=test_examples, class_names=class_names)
  # --- end ---


if __name__ == "__main__":
  from experiments.configs import yolo   # or any system in experiments/configs
  config = yolo.get_config("cpu")
  config.unlock()
  print(train_on_own_data(config, "out/own_data", make_examples(64, 0), make_examples(16, 1),
                          ["square", "bar"]))
