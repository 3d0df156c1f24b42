"""Detection by classifying sliding windows (the brute-force baseline), as a System.

The window classifier of `jaxdet.models.overfeat` (background + C classes, background class 0)
without a box head: every window of several image scales, evaluated densely with the fc
layers run as convolutions, is a detection of its own box with its class probabilities;
per-class NMS keeps the best. See `jaxdet.models.overfeat` for the network, the training
windows and their targets, the loss and the window geometry.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

import jax

from jaxdet import checks
from jaxdet.models import overfeat, settings
from jaxdet.ops.boxes import clip_boxes
from jaxdet.ops.nms import multiclass_nms
from jaxdet.system import System

Array = jax.Array


# ----------------------------------------------------------------------------- settings


@dataclasses.dataclass(frozen=True)
class Predict(settings.Settings):
  """`model.predict`: per-class NMS of the windows."""
  score_threshold: float = 0.05  # (window, class) pairs below this probability are dropped
  iou_threshold: float = 0.3     # per-class NMS
  max_detections: int = 50

  def validate(self, where: str) -> None:
    for name in ("score_threshold", "iou_threshold"):
      checks.check_fraction(f"{where}.{name}", getattr(self, name))
    checks.check_positive(f"{where}.max_detections", self.max_detections)


Loss = settings.ClassLoss   # `model.loss`: the window classifier's term


@dataclasses.dataclass(frozen=True)
class Settings(overfeat.WindowSettings):
  """The "windows" system's settings (`config.model`; the shared ones in
  `overfeat.WindowSettings`, the training windows in `overfeat.WindowSampling`)."""
  predict: Predict = Predict()
  loss: Loss = Loss()


# ----------------------------------------------------------------------------- post-processing


def windows_detections(windows: Array, probs: Array, image_size: Array, *, iou_threshold: float,
                       score_threshold: float, max_detections: int) -> dict[str, Array]:
  """The brute-force detector's post-processing for one image: window boxes, per-class NMS.

  Args:
    windows: f32[N, 4] every window's box; probs: f32[N, C + 1] (column 0 background, c + 1
      object class c); image_size: i32[2].
  Returns:
    Detections of one image (boxes f32[K, 4] clipped to the image, scores, labels i32[K] in
    [0, C) (the data's classes), valid).
  """
  boxes = clip_boxes(windows, image_size[0], image_size[1])
  return multiclass_nms(boxes, probs[:, 1:], iou_threshold=iou_threshold,
                        max_output=max_detections, score_threshold=score_threshold)


def predict(extras: overfeat.Extras, variables: Any, batch: Mapping[str, Array]
            ) -> dict[str, Array]:
  """The detections of a batch: `overfeat.dense_windows`, then `windows_detections`."""
  p = extras.settings.predict
  dense = overfeat.dense_windows(extras.conv_network, overfeat.conv_variables(extras, variables),
                                 batch["image"], extras.scales, window=extras.window,
                                 step=extras.step)
  post = functools.partial(windows_detections, dense["windows"], iou_threshold=p.iou_threshold,
                           score_threshold=p.score_threshold, max_detections=p.max_detections)
  return jax.vmap(post)(dense["probs"], batch["image_size"])


# ----------------------------------------------------------------------------- system


def build_system(config: Any) -> System:
  """The "windows" System from an experiment config (keys: `Settings`)."""
  s = Settings.from_config(config)
  extras = overfeat.make_extras(s, box_head=False,
                                compute_dtype=config.get("compute_dtype", "float32"))
  return System(name="windows", num_classes=s.num_classes,
                init=functools.partial(overfeat.init_variables, extras),
                loss=functools.partial(overfeat.window_loss, extras, prefix="windows"),
                predict=functools.partial(predict, extras), extras=extras)
