"""OverFeat: a window classifier + box regressor whose fc layers run densely as convolutions.

One network (`WindowNet`) serves two systems:

* "windows" (the brute-force baseline, `jaxdet.models.windows`): classify every sliding window
  of several image scales into background + C classes; each window's own box is the detection;
  per-class NMS.
* "overfeat" (Sermanet et al. 2014, this module's `build_system`): the same classifier plus a
  per-class box regressor predicting, in each window, the object's box; boxes from every window
  and scale are mapped back to the image and merged by OverFeat's greedy merging
  (`jaxdet.ops.windows.merge_boxes`).

Background is class 0 of the window classifier: object class c of the data is class c + 1
(the R-CNN family's convention); detections carry the data's classes 0..C-1.

Training (both systems): from each image `sampling.num_windows` windows are cropped and warped
to the network's input size `window` (RoI align on the pixels). train_windows "jitter"
(`sample_windows`, `label_windows`): half around ground-truth objects with jittered centre and
size, half uniformly (square, or rectangular with aspect_ratios other than (1.0,)), labelled
with the class of the ground-truth box of highest IoU when IoU >= pos_iou, background when
< neg_iou, ignored in between. train_windows "grid" (`sample_grid_windows`): drawn from the very
windows scored at test time (`dense_grid`), labelled as anchors are (an object's best window is
positive too). The regressor learns, on windows with IoU >= sampling.box_iou, the matched
object's box coded relative to the window (box_coding "window": `encode_in_window`; "deltas":
R-CNN's) with the loss term `loss.box`; the classifier with `loss.cls`
(`jaxdet.losses.window_classifier_loss`).

Test time: the fc layers become convolutions (`to_conv_params`, the same weights reshaped), so
one pass over an image resized by s gives class scores and boxes for every window of size
`window / s` at a step of `step / s` pixels (`jaxdet.ops.windows.window_grid`); resized by
(sy, sx), windows `window / sx` wide and `window / sy` high (scales x aspect_ratios,
`jaxdet.ops.windows.window_scales`). OverFeat's boxes are merged (`overfeat_detections`).

The module follows the detector anatomy: settings, network, box coding, targets, loss, dense
inference and post-processing, system.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdet import checks, global_batch, losses
from jaxdet.models import backbones
from jaxdet.models import init_from
from jaxdet.models import settings
from jaxdet.ops import box_coder
from jaxdet.ops import windows as win
from jaxdet.ops.boxes import box_iou, clip_boxes
from jaxdet.ops.matching import match_boxes
from jaxdet.system import System

Array = jax.Array


# ----------------------------------------------------------------------------- settings


def _check_range(name: str, value: float, lo: float, hi: float) -> None:
  if not lo <= value <= hi:
    raise ValueError(f"{name}: expected a value in [{lo}, {hi}], got {value!r}")


@dataclasses.dataclass(frozen=True)
class WindowSampling(settings.Settings):
  """`model.sampling`: the training windows of both window systems (`window_targets`)."""
  train_windows: str = "jitter"  # "jitter": sample_windows around objects and at random;
                                 # "grid": drawn from the test-time windows (sample_grid_windows)
  num_windows: int = 16          # training windows per image
  pos_iou: float = 0.5           # best IoU >= this: the object's class
  neg_iou: float = 0.3           # best IoU < this: background; in between ignored
  jitter: float = 0.2            # "jitter": relative size / shift jitter of object windows
  grid_shares: tuple = (0.375, 0.25)   # "grid": the shares of positive and hard negatives
  context: int = 0               # crops carry this many feature cells of surroundings on each
                                 # side (backbones without pool5)

  def validate(self, where: str) -> None:
    if self.train_windows not in ("jitter", "grid"):
      raise ValueError(f"{where}.train_windows: expected 'jitter' or 'grid', got "
                       f"{self.train_windows!r}")
    checks.check_positive(f"{where}.num_windows", self.num_windows)
    _check_range(f"{where}.pos_iou", self.pos_iou, 0.0, 1.0)
    _check_range(f"{where}.neg_iou", self.neg_iou, 0.0, self.pos_iou)
    checks.check_positive(f"{where}.jitter", self.jitter, allow_zero=True)
    if len(self.grid_shares) != 2 or sum(self.grid_shares) > 1.0:
      raise ValueError(f"{where}.grid_shares: expected two shares (positives, hard negatives) "
                       f"summing to at most 1, got {self.grid_shares!r}")
    checks.check_positive(f"{where}.grid_shares", self.grid_shares, allow_zero=True)
    checks.check_positive(f"{where}.context", self.context, allow_zero=True)


@dataclasses.dataclass(frozen=True)
class WindowSettings(settings.Settings):
  """What both window systems share: the backbone, its start and the window shapes."""
  num_classes: int = 6           # C (background excluded; the classifier has C + 1 outputs)
  backbone: str = "tiny"         # a key of jaxdet.models.backbones.BACKBONES (dense_fc)
  backbone_kw: dict = dataclasses.field(default_factory=lambda: {
      "stride": 8, "widths": (16, 32, 64, 64), "fc_features": (128, 128), "roi_size": 4,
      "dropout_rate": 0.3})
  pretrained: str = ""           # a local torchvision weights file of the backbone (ImageNet)
  init_from: str = ""            # a finished classify run's workdir: conv + fc start from its
                                 # latest checkpoint (jaxdet.models.init_from); "" = scratch
  scales: tuple = (1.5, 1.0, 0.7, 0.5)   # test-time resize factors (window sizes)
  aspect_ratios: tuple = (1.0,)  # window width / height; scales x aspect ratios test windows
                                 # (jaxdet.ops.windows.window_scales), trained on windows of
                                 # these aspects (rectangular unless (1.0,))
  sampling: WindowSampling = WindowSampling()

  def validate(self, where: str) -> None:
    checks.check_positive(f"{where}.num_classes", self.num_classes)
    for name in ("scales", "aspect_ratios"):
      value = getattr(self, name)
      if not value:
        raise ValueError(f"{where}.{name}: expected at least one value, got {value!r}")
      checks.check_positive(f"{where}.{name}", value)


@dataclasses.dataclass(frozen=True)
class Sampling(WindowSampling):
  """OverFeat's `model.sampling`: the windows' and, for the regressor, box_iou."""
  box_iou: float = 0.4           # windows of best IoU >= this regress the object's box

  def validate(self, where: str) -> None:
    super().validate(where)
    checks.check_fraction(f"{where}.box_iou", self.box_iou, open_low=True)


@dataclasses.dataclass(frozen=True)
class Predict(settings.Settings):
  """OverFeat's `model.predict`: the greedy merging of the regressed boxes."""
  score_threshold: float = 0.05  # (window, class) pairs below this probability are dropped
  pre_merge_topk: int = 128      # candidates entering the merge
  merge_threshold: float = 0.6   # merge while match_score <= this (jaxdet.ops.windows)
  max_detections: int = 50

  def validate(self, where: str) -> None:
    _check_range(f"{where}.score_threshold", self.score_threshold, 0.0, 1.0)
    checks.check_positive(f"{where}.pre_merge_topk", self.pre_merge_topk)
    checks.check_positive(f"{where}.merge_threshold", self.merge_threshold, allow_zero=True)
    checks.check_positive(f"{where}.max_detections", self.max_detections)


@dataclasses.dataclass(frozen=True)
class Loss(settings.LossSettings):
  """OverFeat's `model.loss`: the window classifier and the box regressor."""
  TERMS = {"cls": "class", "box": "box"}
  cls: str = "softmax_cross_entropy"
  cls_weight: float = 1.0
  box: str = "l2"                # OverFeat's L2 on window coordinates ("smooth_l1" for deltas)
  box_weight: float = 1.0


@dataclasses.dataclass(frozen=True)
class Settings(WindowSettings):
  """The "overfeat" system's settings (`config.model`)."""
  box_coding: str = "window"     # "window" (OverFeat's, fractions of the window) | "deltas"
                                 # (R-CNN's); `encode_window_boxes`
  sampling: Sampling = Sampling()
  predict: Predict = Predict()
  loss: Loss = Loss()

  def validate(self, where: str) -> None:
    super().validate(where)
    if self.box_coding not in BOX_CODINGS:
      raise ValueError(f"{where}.box_coding: expected one of {BOX_CODINGS}, got "
                       f"{self.box_coding!r}")


# ----------------------------------------------------------------------------- network


class WindowNet(nn.Module):
  """Conv part -> (pool5) -> fc part -> class head (C + 1, background first) and box head.

  Dense form (`as_conv=False`): windows f[N, window, window, 3] -> (logits f[N, C + 1],
  boxes f[N, C, 4] or None). Convolutional form (`as_conv=True`): images f[B, H, W, 3] ->
  (logits f[B, h, w, C + 1], boxes f[B, h, w, C, 4] or None), one output per window.
  Logit 0 is background, logit c + 1 object class c; boxes[..., c, :] are class c's codes
  (per-class boxes, box_head=True; none without).

  Parameters {"conv", "fc", "cls_head", "box_head"}; `to_conv_params` maps the dense form's
  to the convolutional form's.
  """
  conv: nn.Module
  fc: nn.Module
  num_classes: int
  box_head: bool = False
  pool5: tuple[int, int, int] | None = None
  as_conv: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False,
               context: int = 0) -> tuple[Array, Array | None]:
    """context (dense form): the input holds `context` feature cells of surroundings on each
    side of the window (windows f[N, window + 2 context stride, ...]); they feed the conv part
    (as neighbouring pixels feed the dense map at test time) and are cut before the fc part."""
    f = self.conv(x, train=train)
    if context:
      f = f[:, context:f.shape[1] - context, context:f.shape[2] - context]
    if self.pool5 is not None:
      f = backbones.max_pool(f, *self.pool5)
    h = self.fc(f, train=train)
    if self.as_conv:
      head = lambda n, name: nn.Conv(n, (1, 1), dtype=self.dtype, name=name)
    else:
      head = lambda n, name: nn.Dense(n, dtype=self.dtype, name=name)
    logits = head(self.num_classes + 1, "cls_head")(h).astype(jnp.float32)
    if not self.box_head:
      return logits, None
    boxes = head(4 * self.num_classes, "box_head")(h).astype(jnp.float32)
    return logits, boxes.reshape(*boxes.shape[:-1], self.num_classes, 4)


def make_network(parts: backbones.BackboneParts, num_classes: int, box_head: bool, *,
                 as_conv: bool = False) -> WindowNet:
  """The `WindowNet` over backbone parts (their fc part must be Dense layers)."""
  checks.check_positive("num_classes", num_classes)
  if not parts.dense_fc:
    raise ValueError("backbone: OverFeat needs a Dense fc part to run as convolutions "
                     "(dense_fc=True: tiny, alexnet, overfeat_fast, zf, vgg16)")
  fc = parts.fc.clone(as_conv=as_conv)
  return WindowNet(parts.conv.clone(), fc, num_classes, bool(box_head), parts.pool5, as_conv,
                   dtype=parts.conv.dtype)


def to_conv_params(params: Mapping[str, Any], *, roi_size: int) -> dict[str, Any]:
  """A dense-form `WindowNet`'s params -> its convolutional form's (the same weights reshaped).

  fc6 (roi * roi * C, D) -> (roi, roi, C, D); later fc layers and both heads (D, n) ->
  (1, 1, D, n); biases and the conv part unchanged.
  """
  out = dict(params)
  out["fc"] = backbones.fc_to_conv_params(params["fc"], roi_size=roi_size)
  for name in ("cls_head", "box_head"):
    if name in params:
      k = params[name]["kernel"]
      out[name] = {**params[name], "kernel": k.reshape(1, 1, *k.shape)}
  return out


def _fc_input_size(parts: backbones.BackboneParts, size: int) -> int:
  """Height of the fc part's input (conv, then pool5) for a size x size image (shapes only)."""
  x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  f = jax.eval_shape(lambda x: parts.conv.init_with_output(jax.random.PRNGKey(0), x)[0], x)
  h = f.shape[1]
  if parts.pool5 is not None:
    w, s, p = parts.pool5
    h = (h + 2 * p - w) // s + 1
  return h


def network_geometry(parts: backbones.BackboneParts) -> tuple[int, int]:
  """(window, step) in pixels: the training input size and the dense output stride.

  The window is the input size at which the fc part reads exactly roi_size x roi_size cells
  (checked by tracing the conv part's shapes): roi_size * stride without pool5 when that fits
  (same-padded nets: tiny, VGG16), otherwise the smallest size that gives roi_size (valid or
  partly padded convolutions: OverFeat-fast 231, torchvision AlexNet 223). The step is
  stride * pool5 stride.
  """
  step = parts.stride * (parts.pool5[1] if parts.pool5 is not None else 1)
  if parts.pool5 is None:
    guess = parts.roi_size * parts.stride
  else:
    w, s, p = parts.pool5
    guess = parts.stride * ((parts.roi_size - 1) * s + w - 2 * p)
  r = parts.roi_size
  if _fc_input_size(parts, guess) == r:
    return guess, step
  lo, hi = 1, max(2 * guess, 64)
  while _fc_input_size(parts, hi) < r:
    hi *= 2
  while lo < hi:   # the smallest size whose fc input is >= roi_size (monotone in size)
    mid = (lo + hi) // 2
    try:
      ok = _fc_input_size(parts, mid) >= r
    except Exception:   # too small for a valid convolution or pool
      ok = False
    lo, hi = (lo, mid) if ok else (mid + 1, hi)
  return lo, step


# ----------------------------------------------------------------------------- box coding


BOX_CODINGS = ("window", "deltas")
DELTA_WEIGHTS = (10.0, 10.0, 5.0, 5.0)   # R-CNN's deltas / stds (0.1, 0.1, 0.2, 0.2)


def _check_coding(box_coding: str) -> None:
  if box_coding not in BOX_CODINGS:
    raise ValueError(f"box_coding: expected one of {BOX_CODINGS}, got {box_coding!r}")


def encode_window_boxes(boxes: Array, windows: Array, box_coding: str = "window") -> Array:
  """Regression targets of boxes in their windows.

  Args:
    boxes: f32[..., 4] (x1, y1, x2, y2) pixels; windows: f32[..., 4] (broadcastable).
    box_coding: "window": OverFeat's, each coordinate as a fraction of the window from its
      top-left corner (`jaxdet.ops.windows.encode_in_window`; OverFeat learns it
      with L2); "deltas":
      R-CNN's (dx, dy, log dw, log dh) relative to the window, times DELTA_WEIGHTS
      (`jaxdet.ops.box_coder.encode_boxes`; R-CNN's smooth L1). The loss is `loss.box`.
  Returns:
    f32[..., 4] codes.
  """
  _check_coding(box_coding)
  if box_coding == "window":
    return win.encode_in_window(boxes, windows)
  return box_coder.encode_boxes(boxes, windows, weights=DELTA_WEIGHTS)


def decode_window_boxes(codes: Array, windows: Array, box_coding: str = "window") -> Array:
  """Inverse of `encode_window_boxes`: codes f32[..., 4] -> boxes f32[..., 4] pixels."""
  _check_coding(box_coding)
  if box_coding == "window":
    return win.decode_in_window(codes, windows)
  return box_coder.decode_boxes(codes, windows, weights=DELTA_WEIGHTS)


# ----------------------------------------------------------------------------- targets


def sample_windows(key: Array, gt_boxes: Array, gt_mask: Array, image_size: Array, *,
                   num_windows: int, min_side: float, object_fraction: float = 0.5,
                   jitter: float = 0.2,
                   aspect_range: tuple[float, float] = (1.0, 1.0)) -> Array:
  """Training windows for one image: around objects and uniformly at random.

  Square windows by default; with aspect_range (lo, hi) != (1, 1) rectangular ones, for the
  anisotropic test scales (`jaxdet.ops.windows.window_scales`): each is cropped and warped to the
  square network input, as R-CNN warps its regions.

  Args:
    key: PRNG key.
    gt_boxes: f32[M, 4] (x1, y1, x2, y2) pixels; gt_mask: bool[M] True = real.
    image_size: i32[2] (height, width) of the real pixels.
    num_windows: S (static).
    min_side: the smallest window side of the random windows, pixels.
    object_fraction: the share of windows placed around a random real object (none if the image
      has no object): square windows: side = longer object side * U(1 - jitter, 1 + 2 jitter);
      rectangular ones: width and height = the object's, each times its own
      U(1 - jitter, 1 + 2 jitter); the centre moved by U(-jitter, jitter) * (width, height).
    jitter: the relative jitter of object windows.
    aspect_range: (lo, hi), the window width / height of the uniform windows is log-uniform in
      [lo, hi] (their area that of a square of side U(min_side, min(H, W)), each side then
      capped at the image's); lo = hi = 1: square windows everywhere (the object windows too).
  Returns:
    f32[S, 4] (x1, y1, x2, y2) pixels, inside the image (random ones) or around objects.
  """
  checks.check_boxes("gt_boxes", gt_boxes)
  checks.check_mask("gt_mask", gt_mask, "gt_boxes", gt_boxes.shape[:1])
  h = image_size[0].astype(jnp.float32)
  w = image_size[1].astype(jnp.float32)
  k_obj, k_side, k_shift, k_rand, k_pos = jax.random.split(key, 5)
  k_aspect = jax.random.fold_in(key, 1)
  lo, hi = (float(a) for a in aspect_range)
  checks.check_positive("aspect_range", (lo, hi))
  if lo > hi:
    raise ValueError(f"aspect_range: expected lo <= hi, got {aspect_range!r}")
  square = lo == hi == 1.0
  s = num_windows
  # Around objects.
  logits = jnp.where(gt_mask, 0.0, -jnp.inf)
  pick = jax.random.categorical(k_obj, jnp.where(gt_mask.any(), logits, 0.0), shape=(s,))
  g = gt_boxes[pick].astype(jnp.float32)                                    # [S, 4]
  centre = 0.5 * (g[:, :2] + g[:, 2:])
  if square:
    side = jnp.max(g[:, 2:] - g[:, :2], axis=-1) * jax.random.uniform(
        k_side, (s,), minval=1.0 - jitter, maxval=1.0 + 2 * jitter)
    size = jnp.stack([side, side], axis=-1)                                 # [S, 2] (w, h)
  else:
    size = (g[:, 2:] - g[:, :2]) * jax.random.uniform(
        k_side, (s, 2), minval=1.0 - jitter, maxval=1.0 + 2 * jitter)       # [S, 2]
  centre = centre + size * jax.random.uniform(k_shift, (s, 2), minval=-jitter, maxval=jitter)
  around = jnp.concatenate([centre - 0.5 * size, centre + 0.5 * size], -1)
  # Uniform.
  max_side = jnp.maximum(jnp.minimum(h, w), min_side)
  rside = jax.random.uniform(k_rand, (s,), minval=min_side, maxval=max_side)
  log_a = jax.random.uniform(k_aspect, (s,), minval=np.log(lo), maxval=np.log(hi))
  rw = jnp.minimum(rside * jnp.exp(0.5 * log_a), w)                         # [S]
  rh = jnp.minimum(rside * jnp.exp(-0.5 * log_a), h)
  u = jax.random.uniform(k_pos, (s, 2))
  x1 = u[:, 0] * jnp.maximum(w - rw, 0.0)
  y1 = u[:, 1] * jnp.maximum(h - rh, 0.0)
  uniform = jnp.stack([x1, y1, x1 + rw, y1 + rh], axis=-1)
  use_obj = (jnp.arange(s) < round(object_fraction * s)) & gt_mask.any()
  return jnp.where(use_obj[:, None], around, uniform)


def dense_grid(conv_net: WindowNet, image_hw: Sequence[int], scales: Sequence[Any], *,
              window: int, step: int) -> Array:
  """Every window `dense_windows` scores on an image of size image_hw (static), in its order.

  Returns:
    f32[N, 4] (x1, y1, x2, y2) pixels, the concatenation over scales of `window_grid`.
  """
  h, w = (int(v) for v in image_hw)
  grids = []
  for scale in scales:
    sy, sx = win.scale_pair("scale", scale)
    nh, nw = max(1, int(round(h * sy))), max(1, int(round(w * sx)))
    x = jax.ShapeDtypeStruct((1, nh, nw, 3), jnp.float32)
    logits = jax.eval_shape(lambda x: conv_net.init_with_output(jax.random.PRNGKey(0), x)[0][0],
                            x)
    grids.append(win.window_grid(logits.shape[1:3], step, window, (nh / h, nw / w)))
  return jnp.concatenate(grids, 0)


def sample_grid_windows(key: Array, grid: Array, gt_boxes: Array, gt_labels: Array,
                        gt_mask: Array, image_size: Array, *, num_windows: int, pos_iou: float,
                        neg_iou: float, hard_iou: float = 0.1,
                        shares: tuple[float, float] = (0.375, 0.25)) -> dict[str, Array]:
  """Training windows drawn from the test-time grid itself, labelled as anchors are.

  Each grid window inside the real image is positive (its best object's class) when its IoU
  with that object is >= pos_iou or it is an object's best window (`match_boxes`
  allow_low_quality), background when < neg_iou, ignored in between. Drawn: shares[0] of
  num_windows among the positives, shares[1] among the hard negatives (best IoU in
  [hard_iou, neg_iou): windows partly on an object), the rest among all negatives, each
  uniformly (round(share * num_windows) windows); a share with too few
  candidates is labelled -1 (ignored) in its unfilled slots. So the classifier learns to rank
  exactly the windows it scores at test time, the best-placed one above its neighbours.

  Args:
    key: PRNG key; grid: f32[N, 4] (`dense_grid`); gt_boxes f32[M, 4], gt_labels i32[M] in
      [0, C), gt_mask bool[M]; image_size i32[2] (height, width) of the real pixels.
  Returns:
    {"windows": f32[S, 4], "labels": i32[S] in {-1, 0..C} (0 background, c + 1 object class
     c, -1 ignored), "iou": f32[S] best IoU (0 in unfilled slots), "matched": f32[S, 4] the
     best object's box (zeros without one), "matched_class": i32[S] its class in [0, C) (0
     without one)}.
  """
  checks.check_boxes("grid", grid)
  s = num_windows
  inside = ((grid[:, 2] <= image_size[1].astype(jnp.float32) + 1e-3)
            & (grid[:, 3] <= image_size[0].astype(jnp.float32) + 1e-3))
  iou = box_iou(grid, gt_boxes.astype(jnp.float32))                          # [N, M]
  matched_gt, max_iou, lab = match_boxes(iou, gt_mask, high=pos_iou, low=neg_iou,
                                         allow_low_quality=True, row_mask=inside)
  n_pos, n_hard = round(shares[0] * s), round(shares[1] * s)
  if n_pos + n_hard > s:
    raise ValueError(f"shares: expected shares summing to at most 1, got {shares!r}")
  shares = ((lab == 1, n_pos), ((lab == 0) & (max_iou >= hard_iou), n_hard),
            (lab == 0, s - n_pos - n_hard))
  idx, ok = [], []
  for k, (eligible, count) in zip(jax.random.split(key, 3), shares):
    u = jnp.where(eligible, jax.random.uniform(k, eligible.shape), -1.0)
    score, rows = jax.lax.top_k(u, count)
    idx.append(rows)
    ok.append(score >= 0)
  idx, ok = jnp.concatenate(idx), jnp.concatenate(ok)                       # [S]
  has_gt = gt_mask.any()
  obj_cls = jnp.where(has_gt, gt_labels[matched_gt[idx]].astype(jnp.int32), 0)
  cls = jnp.where(lab[idx] == 1, obj_cls + 1, 0)
  return {"windows": grid[idx], "labels": jnp.where(ok, cls, -1),
          "iou": jnp.where(ok, max_iou[idx], 0.0),
          "matched": jnp.where(has_gt, gt_boxes[matched_gt[idx]].astype(jnp.float32), 0.0),
          "matched_class": obj_cls}


def label_windows(windows: Array, gt_boxes: Array, gt_labels: Array, gt_mask: Array, *,
                  pos_iou: float, neg_iou: float) -> dict[str, Array]:
  """Class targets of windows: the best-overlapping object's class, background or ignored.

  Args:
    windows: f32[S, 4]; gt_boxes f32[M, 4]; gt_labels i32[M] in [0, C); gt_mask bool[M].
    pos_iou: IoU >= this with the best object: that object's class c, labelled c + 1.
    neg_iou: best IoU < this: background (label 0); in between: ignored (label -1).
  Returns:
    {"labels": i32[S] in {-1, 0..C}, "iou": f32[S] best IoU (0 without objects),
     "matched": f32[S, 4] the best object's box (zeros without objects),
     "matched_class": i32[S] the best object's class in [0, C) (0 without objects)}.
  """
  best, best_iou, lab = match_boxes(box_iou(windows, gt_boxes), gt_mask, high=pos_iou,
                                    low=neg_iou)                              # [S] each
  has_gt = gt_mask.any()
  obj_cls = jnp.where(has_gt, gt_labels[best].astype(jnp.int32), 0)
  cls = jnp.where(lab == 1, obj_cls + 1, jnp.where(lab == 0, 0, -1))
  matched = jnp.where(has_gt, gt_boxes[best].astype(jnp.float32), 0.0)
  return {"labels": cls, "iou": best_iou, "matched": matched, "matched_class": obj_cls}


def window_targets(key: Array, gt_boxes: Array, gt_labels: Array, gt_mask: Array,
                   image_size: Array, *, sampling: WindowSampling, grid: Array | None,
                   min_side: float, aspect_range: tuple[float, float]) -> dict[str, Array]:
  """The training windows of one image and their targets (vmap over the batch).

  Args:
    key: PRNG key; gt_boxes f32[M, 4], gt_labels i32[M] in [0, C), gt_mask bool[M];
      image_size i32[2] (height, width) of the real pixels.
    sampling: `model.sampling`; train_windows "jitter" (`sample_windows`, `label_windows`) or
      "grid" (`sample_grid_windows` over `grid`).
    grid: f32[N, 4] the test-time windows (`dense_grid`), for "grid"; None for "jitter".
    min_side, aspect_range: the uniform windows of "jitter" (`sample_windows`).
  Returns:
    {"windows": f32[S, 4] pixels, "labels": i32[S] in {-1, 0..C} (0 background, c + 1 object
     class c, -1 ignored), "iou": f32[S] best IoU, "matched": f32[S, 4] the best object's box,
     "matched_class": i32[S] its class (the box regressor's class)}.
  """
  if sampling.train_windows == "grid":
    return sample_grid_windows(key, grid, gt_boxes, gt_labels, gt_mask, image_size,
                               num_windows=sampling.num_windows, pos_iou=sampling.pos_iou,
                               neg_iou=sampling.neg_iou, shares=tuple(sampling.grid_shares))
  windows = sample_windows(key, gt_boxes, gt_mask, image_size, num_windows=sampling.num_windows,
                           min_side=min_side, jitter=sampling.jitter, aspect_range=aspect_range)
  labelled = label_windows(windows, gt_boxes, gt_labels, gt_mask, pos_iou=sampling.pos_iou,
                           neg_iou=sampling.neg_iou)
  return {"windows": windows, **labelled}


def crop_with_context(image: Array, windows: Array, *, window: int, context: int,
                      stride: int) -> Array:
  """The network inputs of one image's training windows: each cropped with `context` feature
  cells (context * stride network pixels) of its surroundings on each side and warped to
  window + 2 context stride pixels (`WindowNet` cuts the extra cells before its fc part).

  Args:
    image: [H, W, 3] pixels; windows: f32[S, 4] (x1, y1, x2, y2) pixels.
  Returns:
    f32[S, size, size, 3] pixels, size = window + 2 context stride.
  """
  pad = context * stride                                                    # network pixels
  grow = jnp.tile(windows[..., 2:] - windows[..., :2], 2) * (pad / window)  # [S, 4]
  outer = windows + jnp.array([-1.0, -1.0, 1.0, 1.0]) * grow
  return win.crop_windows(image, outer, window + 2 * pad)


# ----------------------------------------------------------------------------- loss


def window_loss(extras: "Extras", variables: Any, batch: Mapping[str, Array], rng: Array, *,
                prefix: str) -> tuple[Array, dict[str, Array], dict[str, Any]]:
  """The training loss of a window system on sampled windows of a batch of images.

  Targets (`window_targets`, vmapped), crops (`crop_with_context`), the dense-form network,
  then `jaxdet.losses.window_classifier_loss`: the term `loss.cls` and, with a box head,
  `loss.box` on the codes of the matched object's class (`box_coding`) in the windows of IoU
  >= sampling.box_iou, each weighted.

  Returns:
    (loss f32[], metrics {"loss/cls", ("loss/box"), "<prefix>/accuracy",
    "<prefix>/positive_fraction"} (the loss terms weighted: they add up to the loss), {}).
  """
  s, net = extras.settings, extras.network
  k_sample, k_drop = jax.random.split(rng)
  b = batch["image"].shape[0]
  grid = None
  if s.sampling.train_windows == "grid":
    grid = dense_grid(extras.conv_network, batch["image"].shape[1:3], extras.scales,
                      window=extras.window, step=extras.step)
  aspects = tuple(float(a) for a in s.aspect_ratios)
  targets = jax.vmap(functools.partial(
      window_targets, sampling=s.sampling, grid=grid,
      min_side=extras.window / max(max(p) for p in extras.scales),
      aspect_range=(min(aspects), max(aspects))))(
          global_batch.example_keys(k_sample, b), batch["boxes"], batch["labels"],
          batch["box_mask"], batch["image_size"])
  context = s.sampling.context
  crops = jax.vmap(functools.partial(crop_with_context, window=extras.window, context=context,
                                     stride=extras.step))(batch["image"], targets["windows"])
  x = backbones.normalize_images(crops.reshape(-1, *crops.shape[2:]), net.dtype)
  logits, codes = net.apply(variables, x, train=True, context=context,
                            rngs={"dropout": k_drop})
  flat = lambda name: targets[name].reshape(-1, *targets[name].shape[2:])
  kw = {}
  if codes is not None:
    windows = flat("windows")                                               # [B S, 4]
    kw = dict(box_codes=codes, box_targets=encode_window_boxes(
                  flat("matched"), windows, s.box_coding),
              box_class=flat("matched_class"), box_mask=flat("iou") >= s.sampling.box_iou,
              box_fn=s.loss.fn("box"), box_weight=s.loss.weight("box"),
              decode=lambda c: decode_window_boxes(c, windows, s.box_coding))
  total, metrics = losses.window_classifier_loss(
      logits, flat("labels"), cls_fn=s.loss.fn("cls"), cls_weight=s.loss.weight("cls"),
      prefix=prefix, **kw)
  return total, metrics, {}


# ----------------------------------------------------------------------------- dense inference


def resize_images(images: Array, scale: Any) -> tuple[Array, tuple[float, float]]:
  """Bilinear resize of u8/f[B, H, W, 3] by s or (sy, sx) -> (f32[B, h, w, 3], (h/H, w/W))."""
  b, h, w, c = images.shape
  sy, sx = win.scale_pair("scale", scale)
  nh, nw = max(1, int(round(h * sy))), max(1, int(round(w * sx)))
  x = images.astype(jnp.float32)
  if (nh, nw) != (h, w):
    x = jax.image.resize(x, (b, nh, nw, c), "linear", antialias=False)
  return x, (nh / h, nw / w)


def dense_windows(conv_net: WindowNet, conv_params: Any, images: Array, scales: Sequence[Any],
                  *, window: int, step: int, box_coding: str = "window") -> dict[str, Array]:
  """Class probabilities and boxes of every window at every scale, in image pixels.

  Args:
    conv_net: a `WindowNet` with as_conv=True; conv_params its variables (`to_conv_params`).
    images: u8[B, H, W, 3].
    scales: resize factors s (square windows of side window / s) or pairs (sy, sx) (windows
      window / sx wide, window / sy high: `jaxdet.ops.windows.window_scales`), static; each
      needs the resized image >= window.
    window, step: `network_geometry` of the net.
    box_coding: how the box head codes boxes (`decode_window_boxes`).
  Returns:
    {"windows": f32[N, 4] every window's box (N summed over scales, row-major per scale),
     "probs": f32[B, N, C + 1] softmax (column 0 background, c + 1 object class c),
     "boxes": f32[B, N, C, 4] regressed boxes of each class in image pixels (absent without a
     box head)}.
  """
  checks.check_array("images", images, ndim=4, last_dim=3)
  wins, probs, boxes = [], [], []
  for s in scales:
    x, (sy, sx) = resize_images(images, s)
    if min(x.shape[1:3]) < window:
      raise ValueError(f"scales: scale {s} resizes {images.shape[1:3]} below the window "
                       f"{window}; use larger scales")
    logits, codes = conv_net.apply(conv_params, backbones.normalize_images(x, conv_net.dtype))
    b, h, w, _ = logits.shape
    grid = win.window_grid((h, w), step, window, (sy, sx))                 # [h w, 4]
    wins.append(grid)
    probs.append(jax.nn.softmax(logits, -1).reshape(b, h * w, -1))
    if codes is not None:
      codes = codes.reshape(b, h * w, codes.shape[-2], 4)
      boxes.append(decode_window_boxes(codes, grid[None, :, None, :], box_coding))
  out = {"windows": jnp.concatenate(wins, 0), "probs": jnp.concatenate(probs, 1)}
  if boxes:
    out["boxes"] = jnp.concatenate(boxes, 1)
  return out


def explicit_windows(dense_net: WindowNet, params: Any, images: Array, windows: Array, *,
                     window: int, chunk: int = 256,
                     box_coding: str = "window") -> dict[str, Array]:
  """The brute-force counterpart of `dense_windows`: crop every window, run the dense-form net.

  Args:
    dense_net: a `WindowNet` with as_conv=False; params its variables.
    images: u8[B, H, W, 3]; windows: f32[N, 4] image boxes (e.g. `dense_windows`'s "windows").
    window: the network input size; chunk: crops per forward pass; box_coding: as in
      `dense_windows`.
  Returns:
    {"probs": f32[B, N, C + 1], "boxes": f32[B, N, C, 4] (absent without a box head)}.
  """
  n = windows.shape[0]
  pad = (-n) % chunk
  padded = jnp.concatenate([windows, jnp.tile(windows[:1], (pad, 1))], 0)

  def one_image(image):
    def one_chunk(w):
      crops = win.crop_windows(image, w, window)
      logits, codes = dense_net.apply(params, backbones.normalize_images(crops, dense_net.dtype))
      return jax.nn.softmax(logits, -1), (codes if codes is not None else jnp.zeros((0,)))
    probs, codes = jax.lax.map(one_chunk, padded.reshape(-1, chunk, 4))
    probs = probs.reshape(-1, probs.shape[-1])[:n]
    if dense_net.box_head:
      codes = codes.reshape(-1, *codes.shape[2:])[:n]
      return probs, decode_window_boxes(codes, windows[:, None, :], box_coding)
    return probs, None

  probs, boxes = jax.lax.map(one_image, images)
  out = {"probs": probs}
  if boxes is not None:
    out["boxes"] = boxes
  return out


# ----------------------------------------------------------------------------- post-processing


def overfeat_detections(probs: Array, boxes: Array, image_size: Array, *, pre_merge_topk: int,
                        score_threshold: float, merge_threshold: float,
                        max_detections: int) -> dict[str, Array]:
  """OverFeat's post-processing for one image: best (window, class) boxes, greedy merging.

  The pre_merge_topk best (window, class) pairs by class probability with probability >=
  score_threshold each contribute that class's regressed box; boxes are clipped to the image
  and merged per class (`merge_boxes`, scores summed).

  Args:
    probs: f32[N, C + 1] (column 0 background, c + 1 object class c); boxes: f32[N, C, 4]
      image pixels, per class; image_size: i32[2].
  Returns:
    Detections of one image: boxes f32[K, 4], scores f32[K] (summed support), labels i32[K]
    in [0, C) (the data's classes), valid bool[K], K = max_detections.
  """
  n, c1 = probs.shape
  c = c1 - 1
  checks.check_array("boxes", boxes, shape=(n, c, 4), dtype_kind="f")
  k = min(pre_merge_topk, n * c)
  flat = probs[:, 1:].reshape(-1)                                          # [N C]
  scores, idx = jax.lax.top_k(flat, k)
  window, cls = idx // c, (idx % c).astype(jnp.int32)
  cand = clip_boxes(boxes[window, cls], image_size[0], image_size[1])
  merged = win.merge_boxes(cand, scores, cls, scores >= score_threshold,
                           threshold=merge_threshold)
  take = lambda x: x[:max_detections] if k >= max_detections else jnp.concatenate(
      [x, jnp.zeros((max_detections - k, *x.shape[1:]), x.dtype)])
  return {key: take(merged[key]) for key in ("boxes", "scores", "labels", "valid")}


def predict(extras: "Extras", variables: Any, batch: Mapping[str, Array]) -> dict[str, Array]:
  """OverFeat's detections of a batch: `dense_windows`, then `overfeat_detections` per image."""
  s = extras.settings
  dense = dense_windows(extras.conv_network, conv_variables(extras, variables), batch["image"],
                        extras.scales, window=extras.window, step=extras.step,
                        box_coding=s.box_coding)
  post = functools.partial(overfeat_detections, pre_merge_topk=s.predict.pre_merge_topk,
                           score_threshold=s.predict.score_threshold,
                           merge_threshold=s.predict.merge_threshold,
                           max_detections=s.predict.max_detections)
  return jax.vmap(post)(dense["probs"], dense["boxes"], batch["image_size"])


# ----------------------------------------------------------------------------- system


@dataclasses.dataclass(frozen=True)
class Extras:
  """The parts of a window system ("overfeat" or "windows") for experiments and tests.

  Attributes:
    settings: the system's settings (`Settings` or `jaxdet.models.windows.Settings`).
    network: the dense-form `WindowNet` (training windows f[N, window, window, 3]).
    conv_network: its convolutional form (whole images; `to_conv_params` of the same params).
    window, step: `network_geometry` (input size and dense output stride, pixels).
    scales: the test-time resize factors, pairs (sy, sx) (`jaxdet.ops.windows.window_scales`).
    roi_size: the fc part's input side in feature cells (`to_conv_params`).
  """
  settings: WindowSettings
  network: WindowNet
  conv_network: WindowNet
  window: int
  step: int
  scales: tuple[tuple[float, float], ...]
  roi_size: int


def make_extras(s: WindowSettings, *, box_head: bool, compute_dtype: Any = "float32",
                where: str = "config.model") -> Extras:
  """The networks and window geometry of settings `s` (with or without a box head)."""
  parts = backbones.get_backbone(s.backbone, dtype=jnp.dtype(compute_dtype),
                                 **dict(s.backbone_kw))
  if s.sampling.context and parts.pool5 is not None:
    raise ValueError(f"{where}.sampling.context: needs a backbone without pool5 (tiny); "
                     f"{s.backbone!r} has pool5, use context 0")
  window, step = network_geometry(parts)
  scales = win.window_scales(tuple(float(v) for v in s.scales),
                             tuple(float(a) for a in s.aspect_ratios))
  return Extras(settings=s, network=make_network(parts, s.num_classes, box_head),
                conv_network=make_network(parts, s.num_classes, box_head, as_conv=True),
                window=window, step=step, scales=scales, roi_size=parts.roi_size)


def conv_variables(extras: Extras, variables: Any) -> dict[str, Any]:
  """The variables of `extras.conv_network` from those of `extras.network`."""
  return {**variables, "params": to_conv_params(variables["params"], roi_size=extras.roi_size)}


def init_variables(extras: Extras, rng: Array, batch: Any = None) -> dict[str, Any]:
  """Fresh variables of the dense-form network, its backbone (conv, fc) from `pretrained`
  and/or `init_from` (the papers' and the lecture's recipe: a classification network, then
  fine-tuning). Only conv and fc are copied (`init_from.DEFAULT_KEYS`): the classifier's
  C + 1 outputs (background first) and the box head start fresh."""
  del batch
  s, w = extras.settings, extras.window
  variables = dict(extras.network.init({"params": rng},
                                       jnp.zeros((1, w, w, 3), extras.network.dtype),
                                       train=False))
  return init_from.start_backbone(variables, backbone=s.backbone, backbone_kw=s.backbone_kw,
                                  pretrained=s.pretrained, init_from=s.init_from)


def build_system(config: Any) -> System:
  """The "overfeat" System (dense multi-scale windows, box regression, greedy merging)."""
  s = Settings.from_config(config)
  extras = make_extras(s, box_head=True, compute_dtype=config.get("compute_dtype", "float32"))
  return System(name="overfeat", num_classes=s.num_classes,
                init=functools.partial(init_variables, extras),
                loss=functools.partial(window_loss, extras, prefix="overfeat"),
                predict=functools.partial(predict, extras), extras=extras)
