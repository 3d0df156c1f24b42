"""Draws the detections of a workdir's latest checkpoint on images.

    python -m experiments.detect --config experiments/configs/<system>.py[:preset] \
        --workdir DIR --images A.png B.jpg --out OUT [--score_threshold 0.3]

Each image is resized as the config's evaluation data is, run through `predict`, and its
detections are mapped back to the original pixels and drawn into OUT/<name>.png.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import numpy as np

from experiments.configs import common


def define_flags(fv) -> None:
  from absl import flags
  flags.DEFINE_string("workdir", None, "the training run's directory", flag_values=fv)
  flags.DEFINE_multi_string("images", [], "image files (PNG, JPEG, ...)", flag_values=fv)
  flags.DEFINE_string("out", None, "where the drawn images go", flag_values=fv)
  flags.DEFINE_float("score_threshold", 0.3, "draw detections scoring at least this", flag_values=fv)


def image_batch(config: Any, image: np.ndarray) -> dict[str, np.ndarray]:
  """One image u8[H, W, 3] as a batch of 1, resized and padded as evaluation data is.

  With resize mode "none" (data of one fixed size), the image is resized to
  `data.image_size`, the size the model was trained at.
  """
  from jaxdet.data import batching, transforms
  example = {"image": image, "boxes": np.zeros((0, 4), np.float32),
             "labels": np.zeros((0,), np.int32)}
  if config.data.resize.mode == "none":
    example = transforms.resize(example, config.data.image_size)
  example = transforms.make_transform(config.data, False)(example, np.random.default_rng(0))
  buckets = config.data.get("buckets") or transforms.default_buckets(config.data)
  h, w = example["image"].shape[:2]
  shape = transforms.choose_bucket(h, w, buckets)
  return batching.collate([example], int(config.data.max_boxes), image_shape=shape)


def class_names(config: Any) -> list[str] | None:
  """The dataset's class names (None for one's own examples)."""
  from jaxdet.data import pipeline
  if config.data.name == "examples":
    return None
  return list(pipeline.make_source(config.data, "test").class_names)


def detect(config: Any, workdir: str, paths: list[str], out: str, *,
           score_threshold: float = 0.3, system: Any = None) -> list[str]:
  """Draws the detections of the latest checkpoint on each image; returns the written paths."""
  import jax
  from PIL import Image
  from jaxdet.eval.detections import unbatch_detections
  from jaxdet.eval.draw import draw_detections, save_image
  from jaxdet.train import loop, setup
  system = setup.system_from_config(config) if system is None else system
  images = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
  batches = [image_batch(config, im) for im in images]
  state = loop.restore_for_inference(config, workdir, system, batches[0])
  predict = jax.jit(system.predict)
  names, written = class_names(config), []
  for path, image, batch in zip(paths, images, batches):
    det = unbatch_detections(jax.device_get(predict(state.variables, batch)))[0]
    (h, w), (h0, w0) = batch["image_size"][0], image.shape[:2]
    boxes = det["boxes"] * np.float32([w0 / w, h0 / h, w0 / w, h0 / h])   # original pixels
    drawn = draw_detections(image, boxes, det["labels"], det["scores"], class_names=names,
                            score_threshold=score_threshold)
    stem = os.path.splitext(os.path.basename(path))[0]
    written.append(str(save_image(os.path.join(out, f"{stem}.png"), drawn)))
  return written


def expand_list_flag(argv: list[str], name: str) -> list[str]:
  """`--images A B` -> `--images=A --images=B` (absl wants one flag per value)."""
  out, in_list = [], False
  for arg in argv:
    if arg == f"--{name}":
      in_list = True
    elif in_list and not arg.startswith("--"):
      out.append(f"--{name}={arg}")
    else:
      in_list = False
      out.append(arg)
  return out


def main(argv: list[str]) -> list[str]:
  config, flags = common.parse_flags(expand_list_flag(list(argv), "images"), define_flags)
  if not flags.workdir or not flags.out or not flags.images:
    raise ValueError("--workdir, --images and --out: expected a run directory, image files "
                     "and an output directory")
  written = detect(config, flags.workdir, list(flags.images), flags.out,
                   score_threshold=flags.score_threshold)
  print("\n".join(written))
  return written


if __name__ == "__main__":
  main(sys.argv)
