"""YOLO v1 (Redmon et al., "You Only Look Once", CVPR 2016): detection as one regression.

One network maps the whole image to an S x S x (5B + C) tensor: for each grid cell, B boxes
(x, y, sqrt w, sqrt h, confidence) and C class probabilities Pr(class | object). Parts, in
the order of the module:

* `Settings` (with its `Loss` and `Predict` sections): every option of `config.model`.
* `YOLONet`: the network (conv layers with leaky ReLU 0.1, max pooling, two fc layers with
  dropout between them, linear outputs); `PAPER_LAYERS` (24 conv, 448 x 448 input, S = 7),
  `SMALL_LAYERS` (7 conv, 128 x 128 input, for the CPU) and the "tiny" variant: the lecture's
  shared tiny backbone (`jaxdet.models.backbones.get_backbone("tiny")`, pretrained for
  classification by a classify run and loaded by `config.model.init_from`, as the paper
  pretrains its first 20 conv layers on ImageNet) followed by `TINY_LAYERS`.
* `encode_targets`: ground-truth boxes -> per-cell targets; `assign_predictors`: the
  responsible predictor of each object cell and its IoU (one image each; vmap them).
* `jaxdet.losses.yolo_loss`: the paper's sum-squared loss as four named terms (`coord`, `obj`,
  `noobj`, `cls`), each a function chosen in `config.model.loss` with its weight.
* `decode_predictions` / `postprocess`: raw grid -> boxes, class-specific confidences
  Pr(class | object) * confidence, threshold, per-class NMS, fixed-size detections.
* `build_system(config)`: the `jaxdet.system.System` the machinery trains and evaluates;
  `System.extras` is an `Extras` (settings, network).

Output layout of the last axis, per cell: B x (x, y, sqrt w, sqrt h, confidence), then the C
class probabilities. x, y: the box centre's offset inside its cell, in cell units [0, 1];
sqrt w, sqrt h: square roots of the box size as fractions of the image width and height. The
grid covers the whole network input (H x W pixels), images are resized (not padded) to it.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdet import checks
from jaxdet import losses
from jaxdet.models import backbones
from jaxdet.models.backbones import normalize_images
from jaxdet.models import init_from
from jaxdet.models import settings
from jaxdet.ops import boxes as box_ops
from jaxdet.ops.nms import multiclass_nms
from jaxdet.system import System

Array = jax.Array


# --- settings -----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Loss(settings.LossSettings):
  """`config.model.loss`: the terms of the paper's eq. 3 (defaults: the paper's weights).

  coord ("box"): the responsible predictors' (x, y, sqrt w, sqrt h) codes against the
    object's; "l2" (the paper's two coordinate lines); `decode` gives their boxes in the
    cell's frame (centres relative to the cell's corner, image fractions), so "giou" works.
  obj ("binary"): the responsible predictors' confidences against their IoU with the object.
  noobj ("binary"): every other predictor's confidence against 0.
  cls ("class"): the class outputs of object cells against the one-hot class.
  """
  TERMS = {"coord": "box", "obj": "binary", "noobj": "binary", "cls": "class"}
  coord: str = "l2"
  coord_weight: float = 5.0          # lambda_coord
  obj: str = "squared_error"
  obj_weight: float = 1.0
  noobj: str = "squared_error"
  noobj_weight: float = 0.5          # lambda_noobj
  cls: str = "squared_error_onehot"
  cls_weight: float = 1.0


@dataclasses.dataclass(frozen=True)
class Settings(settings.Settings):
  """`config.model` of YOLO v1 (a top-level `config.num_classes` wins over `num_classes`)."""
  variant: str = "small"             # a key of VARIANTS: "paper" (24 conv, 448), "small" (CPU)
                                     # or "tiny" (the lecture's pretrained tiny backbone, CPU)
  num_classes: int = 6               # C
  grid_size: int = 7                 # S
  num_boxes: int = 2                 # B
  fc_dim: int = 0                    # hidden fc width; 0 = the variant's (paper 4096)
  dropout_rate: float = 0.5
  head: str = "fc"                   # "fc" (the paper) or "conv" (the fc layers per cell)
  batch_norm: bool = False           # not in the paper (after the variant's own conv layers)
  backbone: str = ""                 # "" = the variant's (tiny: "tiny"; paper, small: none);
                                     # paper: "yolo20" or "vgg16" (PAPER_HEAD_LAYERS)
  backbone_kw: dict = dataclasses.field(                    # get_backbone(backbone, **kw)
      default_factory=lambda: dict(TINY_BACKBONE_KW))
  pretrained: str = ""               # a local torchvision weights file of the backbone (vgg16)
  init_from: str = ""                # a finished classify run's workdir whose "conv" starts
                                     # the backbone (jaxdet.models.init_from); "" = scratch
  loss: Loss = Loss()
  predict: settings.NMSPredict = settings.NMSPredict(   # per-class NMS (`postprocess`)
      score_threshold=0.005, iou_threshold=0.5)

  def validate(self, where: str) -> None:
    if self.variant not in VARIANTS:
      raise ValueError(f"{where}.variant: expected one of {sorted(VARIANTS)}, "
                       f"got {self.variant!r}")
    for key in ("num_classes", "grid_size", "num_boxes"):
      if getattr(self, key) < 1:
        raise ValueError(f"{where}.{key}: expected a positive int, got {getattr(self, key)!r}")
    checks.check_positive(f"{where}.fc_dim", self.fc_dim, allow_zero=True)
    checks.check_fraction(f"{where}.dropout_rate", self.dropout_rate, open_high=True)
    if self.head not in ("fc", "conv"):
      raise ValueError(f"{where}.head: expected 'fc' or 'conv', got {self.head!r}")
    if self.backbone and self.variant not in ("paper",) + tuple(VARIANT_BACKBONES):
      raise ValueError(f"{where}.backbone: variant {self.variant!r} takes no backbone; "
                       f"use variant 'paper' (or 'tiny')")
    if (self.init_from or self.pretrained) and self.backbone_name is None:
      raise ValueError(f"{where}.init_from: variant {self.variant!r} has no pretrainable "
                       f"backbone; use one of {sorted(VARIANT_BACKBONES)}, or variant 'paper' "
                       f"with {where}.backbone 'yolo20' or 'vgg16'")

  @property
  def backbone_name(self) -> str | None:
    """The backbone the network starts with (a key of backbones.BACKBONES), None = none."""
    return self.backbone or VARIANT_BACKBONES.get(self.variant)


# --- the network --------------------------------------------------------------------------------

# A conv layer is (kernel size, features, stride); "M" is 2 x 2 max pooling with stride 2.
LayerSpec = Any

# Figure 3 of the paper: 24 convolutional layers; 448 -> 7 x 7 x 1024.
PAPER_LAYERS: tuple[LayerSpec, ...] = (
    (7, 64, 2), "M",
    (3, 192, 1), "M",
    (1, 128, 1), (3, 256, 1), (1, 256, 1), (3, 512, 1), "M",
    *((1, 256, 1), (3, 512, 1)) * 4, (1, 512, 1), (3, 1024, 1), "M",
    *((1, 512, 1), (3, 1024, 1)) * 2, (3, 1024, 1), (3, 1024, 2),
    (3, 1024, 1), (3, 1024, 1),
)
PAPER_FC = 4096

# The same pattern scaled down for the CPU: 7 conv layers; 128 -> 8 x 8 x 128 (stride 16, so
# that, as in the paper, the last conv map is S x S for S = 8 at 128 pixels). Like the paper's
# first layer (7 x 7, stride 2), the first conv strides by 2: full-resolution layers dominate
# the cost of a narrow network on the CPU, and a stride-1 first layer made it 3.6x slower.
SMALL_LAYERS: tuple[LayerSpec, ...] = (
    (5, 16, 2), "M",
    (3, 32, 1), "M",
    (3, 64, 1),
    (1, 32, 1), (3, 64, 1), "M",
    (1, 64, 1), (3, 128, 1),
)
SMALL_FC = 512

# The lecture's shared CPU backbone: the conv part of the classify cpu preset's network
# (experiments/configs/classify.py:cpu; 4 conv layers, stride 8, 64 channels), then 3 new conv
# layers, as the paper adds 4 conv layers on top of its pretrained 20:
# 128 -> 16 x 16 x 64 -> 8 x 8 x 128 (S = 8 at 128 pixels).
TINY_BACKBONE_KW = {"stride": 8, "widths": (16, 32, 64, 64), "fc_features": (128, 128),
                    "roi_size": 4, "dropout_rate": 0.3}
TINY_LAYERS: tuple[LayerSpec, ...] = ((3, 128, 1), "M", (3, 128, 1), (3, 128, 1))
TINY_FC = 512

VARIANTS = {
    # name: (conv layers, fc width, default input size)
    "paper": (PAPER_LAYERS, PAPER_FC, 448),
    "small": (SMALL_LAYERS, SMALL_FC, 128),
    "tiny": (TINY_LAYERS, TINY_FC, 128),
}
# Variants whose conv layers follow a pretrainable backbone (a key of backbones.BACKBONES,
# built with config.model.backbone_kw); conv_flops counts the variant's own layers only.
VARIANT_BACKBONES = {"tiny": "tiny"}
# Variant "paper" on a backbone (config.model.backbone): the backbone's conv part replaces the
# first 20 layers, max pools bring it to stride 32, then the paper's last 4 conv layers. With
# "yolo20" (backbones.yolo20: the paper's own 20 layers, pretrained by a classify run) this is
# exactly the paper's network; "vgg16" (torchvision ImageNet weights via model.pretrained) is
# the paper's "YOLO VGG-16" (section 4.1, table 1).
PAPER_HEAD_LAYERS = PAPER_LAYERS[-4:]
assert PAPER_LAYERS[:-4] == backbones.YOLO20_LAYERS


def backbone_layers(variant: str, stride: int) -> tuple[LayerSpec, ...]:
  """The variant's own conv layers after a backbone of `stride` (see PAPER_HEAD_LAYERS)."""
  if variant != "paper":
    return VARIANTS[variant][0]
  if stride > 32 or 32 % stride:
    raise ValueError(f"config.model.backbone: variant 'paper' needs a backbone of stride "
                     f"dividing 32, got stride {stride}")
  return ("M",) * ((32 // stride).bit_length() - 1) + PAPER_HEAD_LAYERS


def _check_layers(layers: Sequence[LayerSpec]) -> None:
  for i, spec in enumerate(layers):
    ok = spec == "M" or (isinstance(spec, tuple) and len(spec) == 3
                         and all(isinstance(v, int) and v > 0 for v in spec))
    if not ok:
      raise ValueError(f"layers[{i}]: expected (kernel, features, stride) positive ints or "
                       f"'M', got {spec!r}")


def conv_flops(layers: Sequence[LayerSpec], image_size: int, fc_dim: int,
               out_dim: int) -> int:
  """Multiply-add FLOPs (2 per MAC) of one image through the network's conv and fc layers.

  Args:
    layers: the conv layer specs; image_size: the square input side in pixels;
    fc_dim: the hidden fc width; out_dim: S * S * (5B + C).
  Returns:
    FLOPs per image (pooling, activations and biases not counted).
  """
  size, cin, flops = image_size, 3, 0
  for spec in layers:
    if spec == "M":
      size //= 2
      continue
    k, cout, stride = spec
    size = -(-size // stride)                   # SAME padding
    flops += 2 * k * k * cin * cout * size * size
    cin = cout
  flat = size * size * cin
  return flops + 2 * flat * fc_dim + 2 * fc_dim * out_dim


class YOLONet(nn.Module):
  """The YOLO v1 network: images -> raw S x S x (5B + C) predictions.

  Parameters: "conv" (the backbone, when given), Conv_i (and BatchNorm_i) for `layers`,
  Dense_0 (hidden fc), Dense_1 (output).

  Head "fc" (the paper): the last conv map is flattened, the hidden fc layer sees the whole
  image and the output layer is reshaped to S x S x (5B + C). Head "conv": the same two
  layers applied to each cell of an S x S last conv map alone (1 x 1 convolutions, as YOLO v2
  does; same parameter names), so that all cells share their weights.

  Attributes:
    num_classes: C.
    grid_size: S.
    num_boxes: B.
    layers: conv layer specs ((kernel, features, stride) or "M" for 2 x 2 max pooling).
    fc_dim: width of the hidden fully connected layer.
    dropout_rate: dropout after the hidden fc layer (paper: 0.5).
    batch_norm: batch normalisation after each conv (not in the paper; YOLO v2 added it).
    head: "fc" (the paper) or "conv" (per cell; the last conv map must be S x S).
    conv: an optional backbone conv part (images, train) -> features run before `layers`
      (e.g. `get_backbone("tiny").conv`); its parameters are named "conv", as in the
      classification network, so that `jaxdet.models.init_from` loads them.
    dtype: computation dtype (parameters stay float32); outputs are float32.
  """
  num_classes: int
  grid_size: int = 7
  num_boxes: int = 2
  layers: Sequence[LayerSpec] = PAPER_LAYERS
  fc_dim: int = PAPER_FC
  dropout_rate: float = 0.5
  batch_norm: bool = False
  conv: nn.Module | None = None
  head: str = "fc"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, *, train: bool) -> Array:
    """x: f[N, H, W, 3] normalised images -> f32[N, S, S, 5B + C]."""
    act = functools.partial(nn.leaky_relu, negative_slope=0.1)
    x = x.astype(self.dtype)
    if self.conv is not None:
      x = self.conv(x, train=train)
    for spec in self.layers:
      if spec == "M":
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
        continue
      k, features, stride = spec
      x = nn.Conv(features, (k, k), strides=(stride, stride), padding="SAME",
                  use_bias=not self.batch_norm, dtype=self.dtype)(x)
      if self.batch_norm:
        x = backbones.batch_norm(train=train, dtype=self.dtype)(x)
      x = act(x)
    s, d = self.grid_size, 5 * self.num_boxes + self.num_classes
    if self.head == "conv":
      if x.shape[1:3] != (s, s):
        raise ValueError(f"head 'conv': the last conv map is {x.shape[1]} x {x.shape[2]}, "
                         f"expected S x S = {s} x {s}")
      x = act(nn.Conv(self.fc_dim, (1, 1), dtype=self.dtype, name="Dense_0")(x))
      x = backbones.Dropout(self.dropout_rate)(x, deterministic=not train)
      x = nn.Conv(d, (1, 1), dtype=self.dtype, name="Dense_1")(x)
      return x.astype(jnp.float32)
    x = x.reshape(x.shape[0], -1)
    x = act(nn.Dense(self.fc_dim, dtype=self.dtype)(x))
    x = backbones.Dropout(self.dropout_rate)(x, deterministic=not train)
    x = nn.Dense(s * s * d, dtype=self.dtype)(x)
    return x.reshape(x.shape[0], s, s, d).astype(jnp.float32)


def encode_targets(boxes: Array, labels: Array, mask: Array, *, grid_size: int,
                   image_size: tuple[int, int], num_classes: int) -> dict[str, Array]:
  """Assigns each object to the grid cell holding its centre (one image; vmap for a batch).

  Two objects in one cell: the first one (lowest index among the real objects) wins and the
  others are dropped, as darknet's `fill_truth_region` does (YOLO v1 predicts one class set per
  cell). Centres on or beyond the image border go to the nearest border cell.

  Precondition: labels in [0, C) where the mask is True. Not checked here (no host sync on the
  normal path): an out-of-range label would give its cell an all-zero class vector. Data entry
  checks labels (`jaxdet.checks.check_label_values`); on the device, opt in with
  `jaxdet.losses.check_labels(labels, C, mask)` under checkify (`jaxdet.losses.checked`).

  Args:
    boxes: f32[M, 4] (x1, y1, x2, y2) pixels of the network input.
    labels: int[M] classes 0..C-1 (padding entries may hold anything).
    mask: bool[M] True = real object.
    grid_size: S.
    image_size: (height, width) of the network input in pixels (static).
    num_classes: C.
  Returns:
    {"box": f32[S, S, 4] (x, y, w, h): x, y the centre's offset inside the cell in cell units,
       w, h fractions of the image width and height (0 in cells without an object),
     "labels": i32[S, S] class of the cell's object (0 elsewhere),
     "mask": bool[S, S] True where a cell holds an object,
     "index": i32[S, S] index into the M objects of the cell's object (0 elsewhere)}.
  """
  checks.check_boxes("boxes", boxes)
  checks.check_array("labels", labels, ndim=1, dtype_kind="iu")
  checks.check_same_size("boxes", boxes, "labels", labels)
  checks.check_mask("mask", mask, "labels", labels.shape)
  checks.check_positive("grid_size", grid_size)
  checks.check_positive("num_classes", num_classes)
  s = grid_size
  h, w = image_size
  b = boxes.astype(jnp.float32)
  cxcywh = box_ops.xyxy_to_cxcywh(b)                                      # [M, 4]
  gx = cxcywh[:, 0] / w * s                                               # [M] grid units
  gy = cxcywh[:, 1] / h * s
  col = jnp.clip(jnp.floor(gx), 0, s - 1)                                 # [M]
  row = jnp.clip(jnp.floor(gy), 0, s - 1)
  per_object = jnp.stack([gx - col, gy - row, cxcywh[:, 2] / w, cxcywh[:, 3] / h], -1)  # [M, 4]
  cell = (row * s + col).astype(jnp.int32)                                # [M]
  hits = (cell[:, None] == jnp.arange(s * s)[None, :]) & mask[:, None]    # [M, S*S]
  has = jnp.any(hits, axis=0)                                             # [S*S]
  first = jnp.argmax(hits, axis=0).astype(jnp.int32)                      # [S*S] first True
  box = jnp.where(has[:, None], per_object[first], 0.0)                   # [S*S, 4]
  cell_labels = jnp.where(has, labels[first], 0).astype(jnp.int32)       # [S*S]
  return {"box": box.reshape(s, s, 4), "labels": cell_labels.reshape(s, s),
          "mask": has.reshape(s, s), "index": jnp.where(has, first, 0).reshape(s, s)}


def predictor_boxes(codes: Array, grid_size: int) -> Array:
  """(x, y, sqrt w, sqrt h) codes -> boxes in the frame of their cell (one term's `decode`).

  Args:
    codes: f32[..., 4] x, y the centre's offset inside the cell in cell units, sqrt w, sqrt h
      square roots of the size as fractions of the image.
    grid_size: S.
  Returns:
    f32[..., 4] (x1, y1, x2, y2) in image fractions, relative to the cell's top-left corner
    (the cell offset is common to a predictor and its object, so IoUs are those of the image).
  """
  return box_ops.cxcywh_to_xyxy(_predictor_cxcywh(codes, grid_size))


def _predictor_cxcywh(codes: Array, grid_size: int) -> Array:
  """(x, y, sqrt w, sqrt h) codes f32[..., 4] -> (cx, cy, w, h) in the cell's frame."""
  return jnp.concatenate([codes[..., :2] / grid_size, jnp.square(codes[..., 2:4])], -1)


def assign_predictors(predictions: Array, targets: dict[str, Array], *,
                      num_boxes: int) -> dict[str, Array]:
  """The predictor "responsible" for each object cell, and its IoU (one image; vmap it).

  Of the B predicted boxes of an object's cell, the one with the highest current IoU with the
  object; ties go to the lowest index, except that when no predictor overlaps the object
  (every IoU is 0) the one whose (cx, cy, w, h) lies closest in squared distance is chosen, as
  darknet does. Both are constants of the loss (`stop_gradient`): the IoU is the target of the
  `obj` term, responsibility the mask of the `coord` and `obj` terms (the others: `noobj`).

  Args:
    predictions: f32[S, S, 5B + C] raw network outputs (layout in the module docstring).
    targets: `encode_targets` of the image ("box" (x, y, w, h) and "mask" are read; boxes of
      cells without an object are ignored, NaN included).
    num_boxes: B.
  Returns:
    {"responsible": bool[S, S, B] (False in cells without an object),
     "iou": f32[S, S, B] each predictor's IoU with its cell's object (0 without one)}.
  """
  checks.check_array("predictions", predictions, ndim=3, dtype_kind="f")
  s = predictions.shape[0]
  checks.check_array("targets['box']", targets["box"], dtype_kind="f", shape=(s, s, 4))
  checks.check_mask("targets['mask']", targets["mask"], "predictions[..., 0]", (s, s))
  obj = targets["mask"]                                                   # [S, S]
  p = jax.lax.stop_gradient(predictions.astype(jnp.float32))
  codes = p[..., :5 * num_boxes].reshape(s, s, num_boxes, 5)[..., :4]    # [S, S, B, 4]
  t_box = jnp.where(obj[..., None], targets["box"].astype(jnp.float32), 0.0)  # [S, S, 4]
  t_cxcywh = jnp.concatenate([t_box[..., :2] / s, t_box[..., 2:]], -1)[..., None, :]
  pred = _predictor_cxcywh(codes, s)                                      # [S, S, B, 4]
  iou = box_ops.elementwise_box_iou(box_ops.cxcywh_to_xyxy(pred),
                                    box_ops.cxcywh_to_xyxy(t_cxcywh))     # [S, S, B]
  dist = jnp.sum(jnp.square(pred - t_cxcywh), -1)                         # [S, S, B]
  any_overlap = jnp.any(iou > 0.0, axis=-1, keepdims=True)                # [S, S, 1]
  best = jnp.argmax(jnp.where(any_overlap, iou, -dist), axis=-1)          # [S, S]
  resp = jax.nn.one_hot(best, num_boxes, dtype=bool) & obj[..., None]    # [S, S, B]
  return {"responsible": resp, "iou": jnp.where(obj[..., None], iou, 0.0)}


def decode_predictions(predictions: Array, *, num_boxes: int,
                       image_size: tuple[int, int]) -> tuple[Array, Array]:
  """Raw grid -> boxes and class-specific confidences (one image; vmap for a batch).

  Args:
    predictions: f32[S, S, 5B + C] raw network outputs (layout in the module docstring).
    num_boxes: B.
    image_size: (height, width) of the network input in pixels (static).
  Returns:
    boxes: f32[S * S * B, 4] (x1, y1, x2, y2) pixels, ordered by (row, column, predictor);
      not clipped.
    scores: f32[S * S * B, C] Pr(class | object) * confidence of each box.
  """
  checks.check_array("predictions", predictions, ndim=3, dtype_kind="f")
  s = predictions.shape[0]
  checks.check_array("predictions", predictions, shape=(s, s, None))
  c = predictions.shape[-1] - 5 * num_boxes
  if c < 1:
    raise ValueError(f"predictions: expected last dimension 5B + C > {5 * num_boxes} for "
                     f"B={num_boxes}, got shape {tuple(predictions.shape)}")
  h, w = image_size
  p = predictions.astype(jnp.float32)
  pb = p[..., :5 * num_boxes].reshape(s, s, num_boxes, 5)                 # [S, S, B, 5]
  cls = p[..., 5 * num_boxes:]                                            # [S, S, C]
  col = jnp.arange(s, dtype=jnp.float32)[None, :, None]                   # [1, S, 1]
  row = jnp.arange(s, dtype=jnp.float32)[:, None, None]                   # [S, 1, 1]
  cx = (col + pb[..., 0]) / s * w                                         # [S, S, B]
  cy = (row + pb[..., 1]) / s * h
  bw = jnp.square(pb[..., 2]) * w
  bh = jnp.square(pb[..., 3]) * h
  boxes = box_ops.cxcywh_to_xyxy(jnp.stack([cx, cy, bw, bh], -1))         # [S, S, B, 4]
  scores = cls[:, :, None, :] * pb[..., 4:5]                              # [S, S, B, C]
  return boxes.reshape(-1, 4), scores.reshape(-1, c)


def postprocess(predictions: Array, image_size_hw: Array, *, num_boxes: int,
                input_size: tuple[int, int], score_threshold: float, iou_threshold: float,
                max_detections: int, pre_nms_topk: int | None = None) -> dict[str, Array]:
  """Raw grid -> fixed-size detections for one image (vmap for a batch).

  Class-specific confidences below `score_threshold` are dropped, boxes are clipped to the
  real pixels, then per-class NMS keeps the `max_detections` best.

  Args:
    predictions: f32[S, S, 5B + C].
    image_size_hw: i32[2] (height, width) of the real pixels (boxes are clipped to it).
    num_boxes: B. input_size: (height, width) of the network input (static).
    score_threshold, iou_threshold, max_detections, pre_nms_topk: see
      `jaxdet.ops.nms.multiclass_nms`.
  Returns:
    {boxes f32[K, 4], scores f32[K], labels i32[K], valid bool[K]}, K = max_detections.
  """
  boxes, scores = decode_predictions(predictions, num_boxes=num_boxes, image_size=input_size)
  boxes = box_ops.clip_boxes(boxes, image_size_hw[0], image_size_hw[1])
  return multiclass_nms(boxes, scores, iou_threshold=iou_threshold,
                        max_output=max_detections, score_threshold=score_threshold,
                        pre_nms_topk=pre_nms_topk)




# --- the System ---------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Extras:
  """`System.extras` of YOLO: its settings and its network (flax module)."""
  settings: Settings
  network: YOLONet


def make_network(m: Settings, dtype: Any = jnp.float32) -> YOLONet:
  """The network of validated settings `m` (`Settings.from_config(config)`)."""
  layers, fc_dim, _ = VARIANTS[m.variant]
  _check_layers(layers)
  conv = None
  if m.backbone_name is not None:
    parts = backbones.get_backbone(m.backbone_name, dtype=jnp.dtype(dtype), **m.backbone_kw)
    conv, layers = parts.conv, backbone_layers(m.variant, parts.stride)
  return YOLONet(num_classes=m.num_classes, grid_size=m.grid_size, num_boxes=m.num_boxes,
                 layers=layers, fc_dim=m.fc_dim or fc_dim, dropout_rate=m.dropout_rate,
                 batch_norm=m.batch_norm, conv=conv, head=m.head, dtype=jnp.dtype(dtype))


def loss_targets(predictions: Array, batch: dict[str, Array], *, num_boxes: int,
                 num_classes: int) -> dict[str, Array]:
  """The targets of `jaxdet.losses.yolo_loss` for a batch: `encode_targets` of each image's
  ground truth and `assign_predictors` of its predictions f32[N, S, S, 5B + C], vmapped."""
  checks.check_array("batch['image']", batch["image"], ndim=4, last_dim=3)
  encode = functools.partial(encode_targets, grid_size=predictions.shape[1],
                             image_size=tuple(batch["image"].shape[1:3]),
                             num_classes=num_classes)
  targets = jax.vmap(encode)(batch["boxes"], batch["labels"], batch["box_mask"])
  assign = jax.vmap(functools.partial(assign_predictors, num_boxes=num_boxes))
  return {**targets, **assign(predictions, targets)}


def build_system(config: Any) -> System:
  """The YOLO v1 System from an experiment config: `Settings.from_config(config)` and
  `config.compute_dtype`. Images are resized to the network input (the grid covers it all);
  the input size is the batch's static image shape."""
  m = Settings.from_config(config)
  dtype = jnp.dtype(config.get("compute_dtype", "float32"))
  net = make_network(m, dtype)
  mutable = ["batch_stats"] if m.batch_norm else False
  decode = functools.partial(predictor_boxes, grid_size=m.grid_size)

  @jax.jit
  def fresh(rng, images):   # jitted: one compilation instead of one per op
    return dict(net.init({"params": rng}, normalize_images(images, dtype), train=False))

  def init(rng, batch):   # the paper's recipe: conv layers pretrained for classification
    return init_from.start_backbone(fresh(rng, batch["image"]), backbone=m.backbone_name or "",
                                    backbone_kw=m.backbone_kw, pretrained=m.pretrained,
                                    init_from=m.init_from, keys=("conv",))

  def loss(variables, batch, rng):
    out = net.apply(variables, normalize_images(batch["image"], dtype), train=True,
                    rngs={"dropout": rng}, mutable=mutable)
    preds, new_state = out if mutable else (out, {})
    targets = loss_targets(preds, batch, num_boxes=m.num_boxes, num_classes=m.num_classes)
    value, metrics = losses.yolo_loss(preds, targets, targets["mask"], num_boxes=m.num_boxes,
                                      terms=m.loss, decode=decode)
    return value, metrics, dict(new_state)

  def predict(variables, batch):
    checks.check_array("batch['image']", batch["image"], ndim=4, last_dim=3)
    preds = net.apply(variables, normalize_images(batch["image"], dtype), train=False)
    p = m.predict
    post = functools.partial(
        postprocess, num_boxes=m.num_boxes, input_size=tuple(batch["image"].shape[1:3]),
        score_threshold=p.score_threshold, iou_threshold=p.iou_threshold,
        max_detections=p.max_detections, pre_nms_topk=p.pre_nms_topk or None)
    return jax.vmap(post)(preds, batch["image_size"])

  return System(name="yolo", num_classes=m.num_classes, init=init, loss=loss, predict=predict,
                extras=Extras(settings=m, network=net))
