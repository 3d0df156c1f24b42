"""Localization as regression: a class head and a box (or point) head on one backbone.

The network (`LocalizationNet`) predicts, for each of K slots (K = 1: classification plus
localization of the one object; K > 1: "multiple objects, fixed count"), class logits over C
classes and coordinates normalised by the image size:

  * targets "boxes": (x1 / W, y1 / H, x2 / W, y2 / H), trained with an L2 loss;
  * targets "points": K keypoints (x / W, y / H) (as in pose estimation); with the synthetic
    data the keypoints are the objects' box centres.

The loss (`jaxdet.losses.localization_loss`) has two terms, chosen and weighted in
`config.model.loss` (`Loss`): `cls` (softmax cross-entropy) and `box` (L2 on the codes above,
summed over the coordinates; its `decode`, `coords_to_boxes`, gives pixel boxes, points as
zero-size boxes, and with targets "points" the term gets f32[N, 2] codes).

The coordinate head attaches after the last conv layer (its own fc layers on the pooled conv
features, `box_head_at="conv"`) or after the last fc layer (sharing the classifier's fc
features, `box_head_at="fc"`), and predicts one set of coordinates per class (`per_class`) or
one shared set. Slot k's ground truth is the k-th real object in the order of box centres (x,
then y), padding slots are masked out of the loss.

Evaluation: `predict` returns K detections per image (slot k's box of its argmax class, scored
by the class probability); `localization_metrics` (also `System.eval_metrics`)
computes classification accuracy and the ILSVRC localization criterion (right class and
IoU >= 0.5) on the host. `build_system(config)` wires it (`Settings` holds every option;
`System.extras` is an `Extras`: settings, network).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdet import checks, losses
from jaxdet.models import backbones
from jaxdet.models import init_from
from jaxdet.models import settings
from jaxdet.ops.boxes import clip_boxes
from jaxdet.system import System

Array = jax.Array

TARGETS = {"boxes": 4, "points": 2}


# ----------------------------------------------------------------------------- settings


@dataclasses.dataclass(frozen=True)
class Loss(settings.LossSettings):
  """`config.model.loss` (`jaxdet.losses.localization_loss`): the slot's class and its
  coordinates (fractions of the image size; `decode` gives pixel boxes)."""
  TERMS = {"cls": "class", "box": "box"}
  cls: str = "softmax_cross_entropy"
  cls_weight: float = 1.0
  box: str = "l2"
  box_weight: float = 10.0   # coordinates are fractions of the image: squared errors ~ 0.01


@dataclasses.dataclass(frozen=True)
class Settings(settings.Settings):
  """`config.model` of localization as regression (a top-level `config.num_classes` wins)."""
  num_classes: int = 6
  backbone: str = "tiny"
  backbone_kw: dict = dataclasses.field(default_factory=lambda: {
      "stride": 16, "widths": (16, 32, 64, 128), "fc_features": (256, 256), "roi_size": 4,
      "dropout_rate": 0.3})
  num_slots: int = 1                 # K
  targets: str = "boxes"             # "boxes" | "points"
  per_class: bool = False            # one box per class, or one shared box
  box_head_at: str = "fc"            # "fc" | "conv"
  box_fc_features: tuple = (256,)    # the conv-attached head's own fc layers
  detach_box: bool = False           # box loss trains the box layers only (stop_gradient)
  pretrained: str = ""               # a local torchvision weights file of the backbone
  init_from: str = ""                # a finished classify run's workdir (same backbone)
  loss: Loss = Loss()

  def validate(self, where: str) -> None:
    checks.check_positive(f"{where}.num_classes", self.num_classes)
    checks.check_positive(f"{where}.num_slots", self.num_slots)
    if self.targets not in TARGETS:
      raise ValueError(f"{where}.targets: expected one of {sorted(TARGETS)}, "
                       f"got {self.targets!r}")
    if self.box_head_at not in ("fc", "conv"):
      raise ValueError(f"{where}.box_head_at: expected 'fc' or 'conv', "
                       f"got {self.box_head_at!r}")
    if self.targets == "points" and self.loss.box == "giou":
      raise ValueError(f"{where}.loss.box: 'giou' needs boxes; targets 'points' are points "
                       f"(use a loss on coordinates, e.g. 'l2')")


class LocalizationNet(nn.Module):
  """Backbone + class head + coordinate head for K slots.

  images f[B, H, W, 3] -> (logits f32[B, K, C], coords f32[B, K, G, D]) with G = C (per_class)
  or 1, D = 4 (boxes) or 2 (points), coordinates as fractions of the image size.
  Parameters {"conv", "fc", "cls_head", "box_head"} (+ "box_fc" when box_head_at="conv"), so
  conv and fc load from a `backbones.Classifier` checkpoint of the same backbone. With
  `detach_box` the box head reads the features through `stop_gradient`: the backbone learns
  from the classification loss only and the box loss trains the box layers (the lecture's
  recipe: a classification network, then a regression head trained on its features).
  """
  conv: nn.Module
  fc: nn.Module
  num_classes: int
  roi_size: int
  num_slots: int = 1
  coord_dim: int = 4
  per_class: bool = False
  box_head_at: str = "fc"
  box_fc_features: Sequence[int] = (256,)
  detach_box: bool = False
  pool5: tuple[int, int, int] | None = None
  dense_fc: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> tuple[Array, Array]:
    f = self.conv(x, train=train)
    if self.pool5 is not None:
      f = backbones.max_pool(f, *self.pool5)
    if self.dense_fc:
      f = backbones.adaptive_avg_pool(f, self.roi_size)
    h = self.fc(f, train=train)
    k, c = self.num_slots, self.num_classes
    logits = nn.Dense(k * c, dtype=self.dtype, name="cls_head")(h)
    # detach_box: the lecture's "train the regression head only": the box loss trains its own
    # layers on the classification features, never the shared backbone.
    sg = jax.lax.stop_gradient if self.detach_box else (lambda a: a)
    if self.box_head_at == "fc":
      hb = sg(h)
    elif self.box_head_at == "conv":
      if self.dense_fc:
        fb = sg(f)
      else:   # ResNet: conv features at any size; pool to roi_size for the Dense layers
        fb = backbones.adaptive_avg_pool(sg(f), self.roi_size)
      hb = backbones.DenseHead(tuple(self.box_fc_features), self.roi_size, dropout_rate=0.0,
                               dtype=self.dtype, name="box_fc")(fb, train=train)
    else:
      raise ValueError(f"box_head_at: expected 'fc' or 'conv', got {self.box_head_at!r}")
    g = c if self.per_class else 1
    coords = nn.Dense(k * g * self.coord_dim, dtype=self.dtype, name="box_head")(hb)
    b = x.shape[0]
    return (logits.astype(jnp.float32).reshape(b, k, c),
            coords.astype(jnp.float32).reshape(b, k, g, self.coord_dim))


# ----------------------------------------------------------------------------- targets


def slot_targets(boxes: Array, labels: Array, mask: Array, image_size: Array, *,
                 num_slots: int, targets: str = "boxes") -> dict[str, Array]:
  """The K slot targets of one image: real objects ordered by box centre (x, then y).

  Args:
    boxes: f32[M, 4] (x1, y1, x2, y2) pixels; labels: i32[M]; mask: bool[M] True = real.
    image_size: i32[2] (height, width).
    num_slots: K (static); objects beyond the K-th are dropped, missing ones masked.
    targets: "boxes" (D = 4) or "points" (the box centres, D = 2).
  Returns:
    {"coords": f32[K, D] fractions of the image size, "labels": i32[K], "mask": bool[K]}.
  """
  checks.check_boxes("boxes", boxes)
  checks.check_mask("mask", mask, "boxes", boxes.shape[:1])
  if targets not in TARGETS:
    raise ValueError(f"targets: expected one of {sorted(TARGETS)}, got {targets!r}")
  m = boxes.shape[0]
  b = boxes.astype(jnp.float32)
  h = image_size[0].astype(jnp.float32)
  w = image_size[1].astype(jnp.float32)
  cx, cy = 0.5 * (b[:, 0] + b[:, 2]), 0.5 * (b[:, 1] + b[:, 3])
  order = jnp.lexsort((cy, cx, ~mask))            # real first, then by centre x, then y
  if num_slots > m:
    order = jnp.concatenate([order, jnp.zeros((num_slots - m,), order.dtype)])
  order = order[:num_slots]
  slot_mask = mask[order] & (jnp.arange(num_slots) < m)
  scale = jnp.stack([w, h, w, h])
  if targets == "boxes":
    coords = b[order] / scale
  else:
    coords = jnp.stack([cx[order] / w, cy[order] / h], axis=-1)
  coords = jnp.where(slot_mask[:, None], coords, 0.0)
  return {"coords": coords, "labels": jnp.where(slot_mask, labels[order], 0).astype(jnp.int32),
          "mask": slot_mask}


def coords_to_boxes(coords: Array, image_size: Array) -> Array:
  """Coordinate codes (fractions of the image size) -> pixel boxes, as they are (not ordered
  or clipped; the `box` loss term's `decode`).

  Args:
    coords: f32[..., D] (x1, y1, x2, y2) (D = 4) or a point (x, y) (D = 2, a zero-size box).
    image_size: i32 or f32[..., 2] (height, width), broadcastable to coords' leading axes.
  Returns:
    f32[..., 4] (x1, y1, x2, y2) pixels.
  """
  c = coords.astype(jnp.float32)
  if c.shape[-1] == 2:
    c = jnp.concatenate([c, c], -1)
  hw = jnp.asarray(image_size).astype(jnp.float32)
  return c * jnp.stack([hw[..., 1], hw[..., 0], hw[..., 1], hw[..., 0]], -1)


def decode_slots(logits: Array, coords: Array, image_size: Array) -> dict[str, Array]:
  """One image's K slots -> detections: argmax class, its probability and its box in pixels.

  Args:
    logits: f32[K, C]; coords: f32[K, G, D] (D = 4 boxes, 2 points); image_size: i32[2].
  Returns:
    boxes f32[K, 4] (points give zero-size boxes at the point), scores f32[K], labels i32[K],
    valid bool[K] (all True).
  """
  probs = jax.nn.softmax(logits, -1)
  labels = jnp.argmax(probs, -1).astype(jnp.int32)
  scores = jnp.max(probs, -1)
  group = labels if coords.shape[1] > 1 else jnp.zeros_like(labels)
  c = jnp.take_along_axis(coords, group[:, None, None], axis=1)[:, 0]         # [K, D]
  boxes = coords_to_boxes(c, image_size)
  h = image_size[0].astype(jnp.float32)
  w = image_size[1].astype(jnp.float32)
  x1y1 = jnp.minimum(boxes[:, :2], boxes[:, 2:])
  x2y2 = jnp.maximum(boxes[:, :2], boxes[:, 2:])
  boxes = clip_boxes(jnp.concatenate([x1y1, x2y2], -1), h, w)
  return {"boxes": boxes, "scores": scores, "labels": labels,
          "valid": jnp.ones(labels.shape, bool)}


# ----------------------------------------------------------------------------- host metrics


def _iou_f64(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Aligned IoU of f64[N, 4] boxes (no +1)."""
  lt = np.maximum(a[:, :2], b[:, :2])
  rb = np.minimum(a[:, 2:], b[:, 2:])
  inter = np.prod(np.maximum(rb - lt, 0.0), axis=1)
  area = lambda x: np.prod(np.maximum(x[:, 2:] - x[:, :2], 0.0), axis=1)
  union = area(a) + area(b) - inter
  return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def _slot_order(boxes: np.ndarray) -> np.ndarray:
  cx = 0.5 * (boxes[:, 0] + boxes[:, 2])
  cy = 0.5 * (boxes[:, 1] + boxes[:, 3])
  return np.lexsort((cy, cx))


LOCALIZATION_METRIC_NAMES = ("accuracy", "loc_accuracy", "loc_error", "mean_iou")


def localization_metrics(gts: Sequence[Mapping[str, Any]], dets: Sequence[Mapping[str, Any]],
                         *, iou_threshold: float = 0.5) -> dict[str, float]:
  """Classification accuracy and the ILSVRC localization criterion of slot predictions.

  Slot k of an image (detection k, in slot order) is compared with the image's k-th real object
  in centre order (x, then y); slots without an object are not scored.

  Args:
    gts: per-image {"boxes": f32[n, 4], "labels": i32[n]} (jaxdet.eval.detections format).
    dets: per-image {"boxes": f32[K, 4], "labels": i32[K], ...} in slot order.
    iou_threshold: the localization criterion's IoU (ILSVRC: 0.5).
  Returns:
    {"accuracy": right class, "loc_accuracy": right class and IoU >= iou_threshold,
     "mean_iou": of the box with the ground truth, "loc_error": 1 - loc_accuracy}, fractions
    of the scored slots (0 when none).
  """
  if len(gts) != len(dets):
    raise ValueError(f"dets: expected {len(gts)} images to match gts, got {len(dets)}")
  right, loc, ious = [], [], []
  for g, d in zip(gts, dets):
    gb = np.asarray(g["boxes"], np.float64).reshape(-1, 4)
    gl = np.asarray(g["labels"]).reshape(-1)
    order = _slot_order(gb)
    db = np.asarray(d["boxes"], np.float64).reshape(-1, 4)
    dl = np.asarray(d["labels"]).reshape(-1)
    n = min(len(order), len(dl))
    gb, gl = gb[order[:n]], gl[order[:n]]
    iou = _iou_f64(db[:n], gb)
    ok = dl[:n] == gl
    right += list(ok)
    loc += list(ok & (iou >= iou_threshold))
    ious += list(iou)
  count = max(len(right), 1)
  acc, locacc = float(np.sum(right)) / count, float(np.sum(loc)) / count
  return {"accuracy": acc, "loc_accuracy": locacc, "loc_error": 1.0 - locacc,
          "mean_iou": float(np.sum(ious)) / count}


# ----------------------------------------------------------------------------- system


@dataclasses.dataclass(frozen=True)
class Extras:
  """`System.extras` of localization: its settings and its network (flax module)."""
  settings: Settings
  network: LocalizationNet


def make_network(m: Settings, dtype: Any = jnp.float32) -> LocalizationNet:
  """The network of validated settings `m` (`Settings.from_config(config)`)."""
  parts = backbones.get_backbone(m.backbone, dtype=jnp.dtype(dtype), **m.backbone_kw)
  return LocalizationNet(parts.conv.clone(), parts.fc.clone(), m.num_classes, parts.roi_size,
                         m.num_slots, TARGETS[m.targets], m.per_class, m.box_head_at,
                         tuple(m.box_fc_features), m.detach_box, parts.pool5, parts.dense_fc,
                         dtype=jnp.dtype(dtype))


def build_system(config: Any) -> System:
  """The "localization" System from an experiment config: `Settings.from_config(config)` and
  `config.compute_dtype`."""
  m = Settings.from_config(config)
  dtype = jnp.dtype(config.get("compute_dtype", "float32"))
  net = make_network(m, dtype)
  mutable = ["batch_stats"] if not net.dense_fc else False
  slots = functools.partial(slot_targets, num_slots=m.num_slots, targets=m.targets)

  @jax.jit
  def fresh(rng, batch):
    x = backbones.normalize_images(batch["image"], dtype)
    return dict(net.init({"params": rng}, x, train=False))

  def init(rng, batch):   # conv + fc from ImageNet weights or a classify run, as the papers
    return init_from.start_backbone(fresh(rng, batch), backbone=m.backbone,
                                    backbone_kw=m.backbone_kw, pretrained=m.pretrained,
                                    init_from=m.init_from)

  def loss(variables, batch, rng):
    x = backbones.normalize_images(batch["image"], dtype)
    out = net.apply(variables, x, train=True, rngs={"dropout": rng}, mutable=mutable)
    (logits, coords), new_state = out if mutable else (out, {})
    targets = jax.vmap(slots)(batch["boxes"], batch["labels"], batch["box_mask"],
                              batch["image_size"])
    sizes = jnp.repeat(batch["image_size"], m.num_slots, axis=0)       # [B * K, 2] slot rows
    decode = functools.partial(coords_to_boxes, image_size=sizes)
    value, metrics = losses.localization_loss(logits, coords, targets, terms=m.loss,
                                              decode=decode)
    return value, metrics, dict(new_state)

  def predict(variables, batch):
    x = backbones.normalize_images(batch["image"], dtype)
    logits, coords = net.apply(variables, x, train=False)
    return jax.vmap(decode_slots)(logits, coords, batch["image_size"])

  return System(name="localization", num_classes=m.num_classes, init=init, loss=loss,
                predict=predict, extras=Extras(settings=m, network=net),
                eval_metrics=localization_metrics, eval_metric_names=LOCALIZATION_METRIC_NAMES)
