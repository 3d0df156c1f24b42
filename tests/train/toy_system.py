"""A test-only detector: a tiny conv net that regresses one box and one class per image.

The template of a detector module (README "Add a detector"): the detector anatomy of the
design notes, in its order, each part as short as it can be. It follows the System
contract of jaxdet.system exactly (K = 1 detections), so the training machinery is tested
without any real detector. Also a stand-in data loader with the
`jaxdet.data.pipeline.make_loader` interface (deterministic batches, get_state/set_state).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdet import checks
from jaxdet.models import settings
from jaxdet.system import System

# ----------------------------------------------------------------------------- 1. settings


@dataclasses.dataclass(frozen=True)
class Loss(settings.LossSettings):
  """`model.loss`: each term a function of jaxdet.losses.TERMS[kind] or a dotted path."""
  TERMS = {"box": "box", "cls": "class"}
  box: str = "l2"                          # on the box in [0, 1] of the image
  box_weight: float = 1.0
  cls: str = "softmax_cross_entropy"       # over the C classes (no background)
  cls_weight: float = 1.0


@dataclasses.dataclass(frozen=True)
class Settings(settings.Settings):
  """`config.model` (num_classes: the top-level config.num_classes)."""
  num_classes: int = 3
  features: int = 8                        # conv channels
  batch_norm: bool = False
  loss: Loss = Loss()

  def validate(self, where):
    checks.check_positive("config.num_classes", self.num_classes)
    checks.check_positive(f"{where}.features", self.features)


# ----------------------------------------------------------------------------- 2. network


class ToyNet(nn.Module):
  """image u8[B, H, W, 3] -> (box f32[B, 4] in [0, 1] of the image, logits f32[B, C])."""
  num_classes: int
  features: int = 8
  batch_norm: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, image, train: bool):
    x = image.astype(self.dtype) / 255.0
    x = nn.Conv(self.features, (3, 3), strides=(2, 2), dtype=self.dtype)(x)
    if self.batch_norm:
      x = nn.BatchNorm(use_running_average=not train, momentum=0.9, dtype=self.dtype)(x)
    x = nn.relu(x)
    x = nn.Conv(self.features, (3, 3), strides=(2, 2), dtype=self.dtype)(x)
    x = nn.relu(x).mean(axis=(1, 2))
    out = nn.Dense(4 + self.num_classes, dtype=self.dtype)(x).astype(jnp.float32)
    return jax.nn.sigmoid(out[:, :4]), out[:, 4:]


# ----------------------------------------------------------------------------- 3. targets


def image_scale(image_size):
  """i32[2] (height, width) -> f32[4] (w, h, w, h): box in [0, 1] of the image -> pixels."""
  hw = image_size.astype(jnp.float32)
  return jnp.stack([hw[1], hw[0], hw[1], hw[0]])


def targets(boxes, labels, box_mask, image_size):
  """One image's targets: its first box, in [0, 1] of the image, and class.

  Args: boxes f32[M, 4] pixels; labels i32[M]; box_mask bool[M]; image_size i32[2].
  Returns: (box f32[4], label i32[], has_box bool[]).
  """
  return boxes[0] / image_scale(image_size), labels[0], box_mask[0]


# ----------------------------------------------------------------------------- 4. loss


def loss(net, s, variables, batch, rng):
  """System.loss: the terms `box` and `cls` over the images that have a box, each averaged
  over those images and weighted; metrics `loss/box`, `loss/cls` add up to the loss."""
  del rng
  mutable = ["batch_stats"] if "batch_stats" in variables else []
  (box, logits), new_state = net.apply(variables, batch["image"], train=True, mutable=mutable)
  target, label, has_box = jax.vmap(targets)(batch["boxes"], batch["labels"],
                                             batch["box_mask"], batch["image_size"])
  scale = jax.vmap(image_scale)(batch["image_size"])                   # [B, 4]
  n = jnp.maximum(has_box.sum(), 1.0)
  per_image = {"box": s.loss.fn("box")(box, target, has_box, decode=lambda c: c * scale),
               "cls": s.loss.fn("cls")(logits, label, has_box)}        # each f32[B]
  metrics = {f"loss/{t}": s.loss.weight(t) * v.sum() / n for t, v in per_image.items()}
  return sum(metrics.values()), metrics, dict(new_state)


# ----------------------------------------------------------------------------- 5. post-processing


def predict(net, variables, batch):
  """System.predict: one detection per image (K = 1), its box in pixels."""
  box, logits = net.apply(variables, batch["image"], train=False)
  probs = jax.nn.softmax(logits)
  box = box * jax.vmap(image_scale)(batch["image_size"])
  return {"boxes": box[:, None], "scores": probs.max(-1)[:, None],
          "labels": probs.argmax(-1).astype(jnp.int32)[:, None],
          "valid": jnp.ones(box.shape[:1] + (1,), bool)}


# ----------------------------------------------------------------------------- 6. system


@dataclasses.dataclass(frozen=True)
class Extras:
  """The toy system's parts for experiments and tools."""
  settings: Settings
  network: ToyNet


def build_system(config: Any) -> System:
  """The toy System from `config.model` (`Settings`), `num_classes` and `compute_dtype`."""
  s = Settings.from_config(config)
  net = ToyNet(s.num_classes, features=s.features, batch_norm=s.batch_norm,
               dtype=jnp.dtype(config.get("compute_dtype", "float32")))
  return System(name="toy", num_classes=s.num_classes,
                init=lambda rng, batch: net.init(rng, batch["image"], train=False),
                loss=functools.partial(loss, net, s), predict=functools.partial(predict, net),
                extras=Extras(settings=s, network=net))


def toy_batch(index: int, seed: int, batch_size: int, *, size: int = 16, max_boxes: int = 4,
              num_classes: int = 3) -> dict[str, np.ndarray]:
  """A deterministic batch: each image has 1..max_boxes bright boxes on a dark background."""
  g = np.random.default_rng([seed, index])
  image = np.zeros((batch_size, size, size, 3), np.uint8)
  boxes = np.zeros((batch_size, max_boxes, 4), np.float32)
  labels = np.zeros((batch_size, max_boxes), np.int32)
  mask = np.zeros((batch_size, max_boxes), bool)
  for b in range(batch_size):
    n = int(g.integers(1, max_boxes + 1))
    for j in range(n):
      x1, y1 = g.integers(0, size // 2, 2)
      w, h = g.integers(2, size // 2, 2)
      c = int(g.integers(num_classes))
      image[b, y1:y1 + h, x1:x1 + w, c] = 255
      boxes[b, j] = (x1, y1, x1 + w, y1 + h)
      labels[b, j] = c
      mask[b, j] = True
  return {"image": image, "image_size": np.full((batch_size, 2), size, np.int32),
          "boxes": boxes, "labels": labels, "box_mask": mask}


class ToyLoader:
  """Stand-in for jaxdet.data.pipeline's Loader: fixed-shape batches, resumable.

  Train loaders are infinite; eval loaders give `num_eval_batches` batches with an
  "example_mask" (the last batch is half padding).
  """

  def __init__(self, batch_size: int, seed: int, train: bool, *, num_eval_batches: int = 2,
               delay_s: float = 0.0, **batch_kw):
    self.batch_size, self.seed, self.train = batch_size, seed, train
    self.num_eval_batches, self.delay_s, self.batch_kw = num_eval_batches, delay_s, batch_kw
    self.index = 0

  def get_state(self) -> dict[str, int]:
    return {"index": self.index}

  def set_state(self, state: dict[str, int]) -> None:
    self.index = int(state["index"])

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if not self.train and self.index >= self.num_eval_batches:
      raise StopIteration
    if self.delay_s:
      import time
      time.sleep(self.delay_s)
    seed = self.seed if self.train else self.seed + 10_000
    batch = toy_batch(self.index, seed, self.batch_size, **self.batch_kw)
    if not self.train:
      last = self.index == self.num_eval_batches - 1
      keep = self.batch_size // 2 if last and self.batch_size > 1 else self.batch_size
      batch["example_mask"] = np.arange(self.batch_size) < keep
      batch["image_id"] = (self.index * self.batch_size
                           + np.arange(self.batch_size)).astype(np.int32)
    self.index += 1
    return batch


def make_toy_loader(data_config: Any, split: str, *, batch_size: int, seed: int, train: bool,
                    examples: Any = None, delay_s: float = 0.0) -> ToyLoader:
  """Same signature as jaxdet.data.pipeline.make_loader (examples is ignored)."""
  del split, examples
  return ToyLoader(batch_size, seed, train, delay_s=delay_s,
                   num_classes=3)


def toy_config(**overrides: Any):
  """A complete experiment config for the toy system (ml_collections ConfigDict)."""
  from experiments.configs import common
  config = common.base_config("cpu")
  config.system = "toy"
  config.model = {"features": 8, "batch_norm": False}
  config.num_classes = 3
  return set_keys(config, overrides)


def set_keys(config: Any, overrides: dict[str, Any]):
  """Sets dotted keys ("train.batch_size") of a config in place; returns it."""
  for key, value in overrides.items():
    node = config
    *path, last = key.split(".")
    for p in path:
      node = node[p]
    node[last] = value
  return config


def resume_config(num_steps: int):
  """The toy config of the kill-and-resume test: checkpoints every step, batch norm on."""
  return toy_config(**{"train.num_steps": num_steps, "train.batch_size": 4,
                       "train.log_every": 1, "checkpoint.every_steps": 1,
                       "eval.every_steps": 0, "eval.batch_size": 4, "model.batch_norm": True,
                       "optimizer.warmup_steps": 2})
