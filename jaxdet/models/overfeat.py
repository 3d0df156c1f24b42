"""OverFeat: a window classifier + box regressor whose fc layers run densely as convolutions.

One network (`WindowNet`) serves two systems:

* "windows" (the brute-force baseline, `jaxdet.models.windows`): classify every sliding window
  of several image scales into C classes + background; each window's own box is the detection;
  per-class NMS.
* "overfeat" (Sermanet et al. 2014): the same classifier plus a box regressor (per class or
  class-agnostic) predicting, in each window, the object's box; boxes from every window and
  scale are mapped back to the image and merged by OverFeat's greedy merging
  (`jaxdet.ops.windows.merge_boxes`).

Training (both systems): from each image `num_windows` windows are cropped and warped to the
network's input size `window` (RoI align on the pixels). train_windows "jitter"
(`sample_windows`): half around ground-truth objects with jittered centre and size, half
uniformly (square, or rectangular with aspect_ratios other than (1.0,)), labelled with the class
of the ground-truth box of highest IoU when IoU >= pos_iou, background (index C) when < neg_iou,
ignored in between (or soft IoU targets, soft_labels). train_windows "grid"
(`sample_grid_windows`): drawn from the very windows scored at test time (`dense_grid`),
labelled as anchors are (an object's best window is positive too). The regressor learns, on
windows with IoU >= box_iou, the matched box coded relative to the window (box_coding "window":
`encode_in_window`, L2; "deltas": R-CNN's, smooth L1).

Test time: the fc layers become convolutions (`to_conv_params`, the same weights reshaped), so
one pass over an image resized by s gives class scores and boxes for every window of size
`window / s` at a step of `step / s` pixels (`jaxdet.ops.windows.window_grid`); resized by
(sy, sx), windows `window / sx` wide and `window / sy` high (scales x aspect_ratios,
`jaxdet.ops.windows.window_scales`). OverFeat's boxes are merged (post_process "merge") or
go through per-class NMS ("nms").
"""

from __future__ import annotations

import functools
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdet import checks, global_batch, losses
from jaxdet.models import backbones
from jaxdet.models.settings import merge_settings
from jaxdet.ops import box_coder
from jaxdet.ops import windows as win
from jaxdet.ops.nms import multiclass_nms
from jaxdet.ops.boxes import box_iou, clip_boxes
from jaxdet.ops.matching import match_boxes
from jaxdet.system import System
from jaxdet.models import init_from

Array = jax.Array


class WindowNet(nn.Module):
  """Conv part -> (pool5) -> fc part -> class head (C + 1, background last) and box head.

  Dense form (`as_conv=False`): windows f[N, window, window, 3] -> (logits f[N, C + 1],
  boxes f[N, G, 4] or None). Convolutional form (`as_conv=True`): images f[B, H, W, 3] ->
  (logits f[B, h, w, C + 1], boxes f[B, h, w, G, 4] or None), one output per window.
  G = C for per-class boxes, 1 for class-agnostic ones, 0 for no box head.

  Parameters {"conv", "fc", "cls_head", "box_head"}; `to_conv_params` maps the dense form's
  to the convolutional form's.
  """
  conv: nn.Module
  fc: nn.Module
  num_classes: int
  box_groups: int = 0
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
    if not self.box_groups:
      return logits, None
    boxes = head(4 * self.box_groups, "box_head")(h).astype(jnp.float32)
    return logits, boxes.reshape(*boxes.shape[:-1], self.box_groups, 4)


def make_network(parts: backbones.BackboneParts, num_classes: int, box_groups: int, *,
                 as_conv: bool = False) -> WindowNet:
  """The `WindowNet` over backbone parts (their fc part must be Dense layers)."""
  checks.check_positive("num_classes", num_classes)
  if not parts.dense_fc:
    raise ValueError("backbone: OverFeat needs a Dense fc part to run as convolutions "
                     "(dense_fc=True: tiny, alexnet, overfeat_fast, zf, vgg16)")
  fc = parts.fc.clone(as_conv=as_conv)
  return WindowNet(parts.conv.clone(), fc, num_classes, box_groups, parts.pool5, as_conv,
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
      top-left corner (`jaxdet.ops.windows.encode_in_window`, learnt with L2); "deltas":
      R-CNN's (dx, dy, log dw, log dh) relative to the window, times DELTA_WEIGHTS
      (`jaxdet.ops.box_coder.encode_boxes`, learnt with smooth L1).
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


# ----------------------------------------------------------------------------- training windows


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
                        gt_mask: Array, image_size: Array, *, num_windows: int, num_classes: int,
                        pos_iou: float, neg_iou: float, hard_iou: float = 0.1,
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
    key: PRNG key; grid: f32[N, 4] (`dense_grid`); gt_boxes f32[M, 4], gt_labels i32[M],
      gt_mask bool[M]; image_size i32[2] (height, width) of the real pixels.
  Returns:
    {"windows": f32[S, 4], "labels": i32[S] in {-1, 0..C} (C = background),
     "iou": f32[S] best IoU (0 in unfilled slots), "matched": f32[S, 4] the best object's box
     (zeros without one)}.
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
  cls = jnp.where(lab[idx] == 1, gt_labels[matched_gt[idx]].astype(jnp.int32), num_classes)
  has_gt = gt_mask.any()
  return {"windows": grid[idx], "labels": jnp.where(ok, cls, -1),
          "iou": jnp.where(ok, max_iou[idx], 0.0),
          "matched": jnp.where(has_gt, gt_boxes[matched_gt[idx]].astype(jnp.float32), 0.0)}


def label_windows(windows: Array, gt_boxes: Array, gt_labels: Array, gt_mask: Array, *,
                  num_classes: int, pos_iou: float, neg_iou: float) -> dict[str, Array]:
  """Class targets of windows: the best-overlapping object's class, background or ignored.

  Args:
    windows: f32[S, 4]; gt_boxes f32[M, 4]; gt_labels i32[M] in [0, C); gt_mask bool[M].
    num_classes: C; background is label C.
    pos_iou: IoU >= this with the best object: that object's class.
    neg_iou: best IoU < this: background; in between: ignored (label -1).
  Returns:
    {"labels": i32[S] in {-1, 0..C}, "iou": f32[S] best IoU (0 without objects),
     "matched": f32[S, 4] the best object's box (zeros without objects),
     "object_class": i32[S] the best object's class (C without objects)}.
  """
  best, best_iou, lab = match_boxes(box_iou(windows, gt_boxes), gt_mask, high=pos_iou,
                                    low=neg_iou)                              # [S] each
  has_gt = gt_mask.any()
  obj_cls = jnp.where(has_gt, gt_labels[best].astype(jnp.int32), num_classes)
  cls = jnp.where(lab == 1, obj_cls, jnp.where(lab == 0, num_classes, -1))
  matched = jnp.where(has_gt, gt_boxes[best].astype(jnp.float32), 0.0)
  return {"labels": cls, "iou": best_iou, "matched": matched, "object_class": obj_cls}


def window_loss(net: WindowNet, variables: Any, batch: Mapping[str, Array], rng: Array, *,
                window: int, num_windows: int, min_side: float, pos_iou: float,
                neg_iou: float, box_iou_min: float, box_weight: float,
                aspect_range: tuple[float, float] = (1.0, 1.0), jitter: float = 0.2,
                box_coding: str = "window", soft_labels: bool = False,
                grid: Array | None = None, grid_shares: tuple[float, float] = (0.375, 0.25),
                context: int = 0, stride: int = 8, mutable: Any = False) -> tuple[Array, dict[str, Array], Any]:
  """The training loss of a dense-form `WindowNet` on sampled windows of a batch of images.

  loss = mean softmax CE over non-ignored windows + box_weight * mean over regression windows
  of the coordinates' summed loss (of the matched class for per-class boxes): squared error of
  the window-relative box (box_coding "window") or smooth L1 (beta 1) of the weighted deltas
  ("deltas"). Windows: `sample_windows` (aspect_range, jitter).

  soft_labels: instead of ignoring windows of best IoU in [neg_iou, pos_iou), every window's
  class target is soft: t = clip((IoU - neg_iou) / (pos_iou - neg_iou), 0, 1) on the best
  object's class and 1 - t on background (CE = t CE(object) + (1 - t) CE(background)), so the
  class probability rises with the window's overlap and the best-placed window scores highest.

  grid: f32[N, 4] the test-time windows (`dense_grid`): training windows are drawn from them
  (`sample_grid_windows`, anchor-style labels, in grid_shares) instead of `sample_windows`.

  context: each window is cropped with `context` cells (context * stride network pixels) of
  its surroundings on each side, as the dense map's features see them at test time; the net
  cuts them before its fc part (needs no pool5).

  Returns:
    (loss f32[], metrics {"loss/class", "loss/box", "window_accuracy", "positive_fraction"},
    new model state).
  """
  k_sample, k_drop = jax.random.split(rng)
  b = batch["image"].shape[0]
  keys = global_batch.example_keys(k_sample, b)
  if grid is None:
    sample = functools.partial(sample_windows, num_windows=num_windows, min_side=min_side,
                               jitter=jitter, aspect_range=aspect_range)
    wins = jax.vmap(sample)(keys, batch["boxes"], batch["box_mask"], batch["image_size"])
    labelled = jax.vmap(functools.partial(
        label_windows, num_classes=net.num_classes, pos_iou=pos_iou, neg_iou=neg_iou))(
            wins, batch["boxes"], batch["labels"], batch["box_mask"])
  else:
    labelled = jax.vmap(functools.partial(
        sample_grid_windows, grid=grid, num_windows=num_windows, num_classes=net.num_classes,
        pos_iou=pos_iou, neg_iou=neg_iou, shares=tuple(grid_shares)))(keys, gt_boxes=batch["boxes"],
                                           gt_labels=batch["labels"], gt_mask=batch["box_mask"],
                                           image_size=batch["image_size"])
    wins = labelled["windows"]
  pad = context * stride                                                    # network pixels
  size = window + 2 * pad
  grow = jnp.tile(wins[..., 2:] - wins[..., :2], 2) * (pad / window)       # [B, S, 4]
  outer = wins + jnp.array([-1.0, -1.0, 1.0, 1.0]) * grow
  crops = jax.vmap(functools.partial(win.crop_windows, size=size))(batch["image"], outer)
  crops = crops.reshape(b * num_windows, size, size, 3)
  x = backbones.normalize_images(crops, net.dtype)
  out = net.apply(variables, x, train=True, context=context, rngs={"dropout": k_drop},
                  mutable=mutable)
  (logits, boxes), new_state = out if mutable else (out, {})
  labels = labelled["labels"].reshape(-1)
  keep = labels >= 0
  if soft_labels:
    if grid is not None:
      raise ValueError("soft_labels: not with grid training windows (their labels are the "
                       "anchor-style ones of sample_grid_windows)")
    t = jnp.clip((labelled["iou"].reshape(-1) - neg_iou) / (pos_iou - neg_iou), 0.0, 1.0)
    obj = labelled["object_class"].reshape(-1)
    bg = jnp.full_like(obj, net.num_classes)
    ce = jnp.mean(t * losses.softmax_cross_entropy(logits, obj)
                  + (1.0 - t) * losses.softmax_cross_entropy(logits, bg))
  else:
    ce = global_batch.masked_mean(losses.softmax_cross_entropy(logits, labels, keep), keep)
  acc = losses.masked_mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32), keep)
  metrics = {"loss/class": ce, "window_accuracy": acc,
             "positive_fraction": jnp.mean((labels >= 0) & (labels < net.num_classes))}
  total = ce
  if boxes is not None:
    target = encode_window_boxes(labelled["matched"], wins, box_coding).reshape(-1, 4)
    gt_cls = jnp.clip(labels, 0, net.num_classes - 1)
    group = gt_cls if boxes.shape[1] > 1 else jnp.zeros_like(gt_cls)
    pred = jnp.take_along_axis(boxes, group[:, None, None], axis=1)[:, 0]   # [N, 4]
    reg = labelled["iou"].reshape(-1) >= box_iou_min
    if box_coding == "window":
      per_window = jnp.sum(losses.l2(pred, target, reg[:, None]), axis=-1)
    else:
      per_window = jnp.sum(losses.smooth_l1(pred, target, reg[:, None], beta=1.0), axis=-1)
    box_loss = global_batch.masked_mean(per_window, reg)
    metrics["loss/box"] = box_loss
    total = total + box_weight * box_loss
  return total, metrics, dict(new_state)


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
     "probs": f32[B, N, C + 1] softmax (background last),
     "boxes": f32[B, N, G, 4] regressed boxes in image pixels (absent without a box head)}.
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
    {"probs": f32[B, N, C + 1], "boxes": f32[B, N, G, 4] (absent without a box head)}.
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
    if dense_net.box_groups:
      codes = codes.reshape(-1, *codes.shape[2:])[:n]
      return probs, decode_window_boxes(codes, windows[:, None, :], box_coding)
    return probs, None

  probs, boxes = jax.lax.map(one_image, images)
  out = {"probs": probs}
  if boxes is not None:
    out["boxes"] = boxes
  return out


def windows_detections(windows: Array, probs: Array, image_size: Array, *, iou_threshold: float,
                       score_threshold: float, max_detections: int) -> dict[str, Array]:
  """The brute-force detector's post-processing for one image: window boxes, per-class NMS.

  Also OverFeat's alternative to merging (post_process "nms"): its regressed boxes, per-class NMS.

  Args:
    windows: f32[N, 4] every window's box, or regressed boxes f32[N, C, 4] (one per class);
    probs: f32[N, C + 1] (background last); image_size: i32[2].
  Returns:
    Detections of one image (boxes f32[K, 4] clipped to the image, scores, labels, valid).
  """
  boxes = clip_boxes(windows, image_size[0], image_size[1])
  return multiclass_nms(boxes, probs[:, :-1], iou_threshold=iou_threshold,
                                max_output=max_detections, score_threshold=score_threshold)


def overfeat_detections(probs: Array, boxes: Array, image_size: Array, *, pre_merge_topk: int,
                        score_threshold: float, merge_threshold: float,
                        max_detections: int) -> dict[str, Array]:
  """OverFeat's post-processing for one image: best (window, class) boxes, greedy merging.

  The pre_merge_topk best (window, class) pairs by class probability with probability >=
  score_threshold each contribute that class's regressed box (or the shared box); boxes are
  clipped to the image and merged per class (`merge_boxes`, scores summed).

  Args:
    probs: f32[N, C + 1] (background last); boxes: f32[N, G, 4] image pixels (G = C or 1);
    image_size: i32[2].
  Returns:
    Detections of one image: boxes f32[K, 4], scores f32[K] (summed support), labels i32[K],
    valid bool[K], K = max_detections.
  """
  n, c1 = probs.shape
  c = c1 - 1
  k = min(pre_merge_topk, n * c)
  flat = probs[:, :c].reshape(-1)                                          # [N C]
  scores, idx = jax.lax.top_k(flat, k)
  window, cls = idx // c, (idx % c).astype(jnp.int32)
  group = cls if boxes.shape[1] > 1 else jnp.zeros_like(cls)
  cand = clip_boxes(boxes[window, group], image_size[0], image_size[1])
  merged = win.merge_boxes(cand, scores, cls, scores >= score_threshold,
                           threshold=merge_threshold)
  take = lambda x: x[:max_detections] if k >= max_detections else jnp.concatenate(
      [x, jnp.zeros((max_detections - k, *x.shape[1:]), x.dtype)])
  return {key: take(merged[key]) for key in ("boxes", "scores", "labels", "valid")}


# ----------------------------------------------------------------------------- system


MODEL_DEFAULTS: dict[str, Any] = {
    "backbone": "tiny",
    "backbone_kw": {"stride": 8, "widths": (16, 32, 64, 64), "fc_features": (128, 128),
                    "roi_size": 4, "dropout_rate": 0.3},
    "box_head": "per_class",       # "per_class" | "agnostic" | "none"
    "num_windows": 16,             # training windows per image
    "pos_iou": 0.5, "neg_iou": 0.3, "box_iou": 0.4,
    "train_windows": "jitter",     # "jitter": sample_windows around objects and at random;
                                   # "grid": drawn from the test-time windows (sample_grid_windows)
    "grid_shares": (0.375, 0.25),  # grid: the shares of positive and hard negative windows
    "context": 0,                  # training crops carry this many feature cells of surroundings
                                   # on each side (window_loss; no pool5 backbones)
    "soft_labels": False,          # class target t = clip((IoU - neg) / (pos - neg), 0, 1), the
                                   # rest background (window_loss); False: hard, in-between ignored
    "box_weight": 1.0,
    "box_coding": "window",        # "window" (OverFeat's, L2) | "deltas" (R-CNN's, smooth L1)
    "jitter": 0.2,                 # training windows around objects: relative size / shift jitter
    "scales": (1.5, 1.0, 0.7, 0.5),
    "aspect_ratios": (1.0,),       # window width / height; scales x aspect ratios test windows
                                   # (jaxdet.ops.windows.window_scales), trained on windows of
                                   # these aspects (rectangular unless (1.0,))
    "score_threshold": 0.05,
    "iou_threshold": 0.3,          # windows: per-class NMS
    "pre_merge_topk": 128,         # overfeat: candidates entering the merge
    "merge_threshold": 0.6,        # overfeat: merge while match_score <= this
    "post_process": "merge",       # overfeat: "merge" (the paper's) | "nms" (per-class NMS of
                                   # the regressed boxes at iou_threshold)
    "max_detections": 50,
    "pretrained": "",              # a local torchvision weights file of the backbone (ImageNet)
    "init_from": "",               # a finished classify run's workdir: conv + fc start from its
                                   # latest checkpoint (jaxdet.models.init_from); "" = scratch
}


def model_settings(config: Any) -> dict[str, Any]:
  """MODEL_DEFAULTS updated by config.model (unknown keys are an error)."""
  model = config["model"] if "model" in config else {}
  given = {k: v for k, v in model.items() if k != "num_classes"}   # config.num_classes wins
  return merge_settings(MODEL_DEFAULTS, given, "config.model")


def build(config: Any, *, mode: str) -> System:
  """The "overfeat" (mode "overfeat") or "windows" (mode "windows") System from a config."""
  if mode not in ("overfeat", "windows"):
    raise ValueError(f"mode: expected 'overfeat' or 'windows', got {mode!r}")
  m = model_settings(config)
  c = int(config["num_classes"])
  dtype = jnp.dtype(config.get("compute_dtype", "float32"))
  parts = backbones.get_backbone(m["backbone"], dtype=dtype, **dict(m["backbone_kw"]))
  window, step = network_geometry(parts)
  if mode == "windows":
    groups = 0
  else:
    groups = {"per_class": c, "agnostic": 1, "none": 0}[m["box_head"]]
  net = make_network(parts, c, groups)
  conv_net = make_network(parts, c, groups, as_conv=True)
  _check_coding(m["box_coding"])
  if m["post_process"] not in ("merge", "nms"):
    raise ValueError(f"config.model.post_process: expected 'merge' or 'nms', got "
                     f"{m['post_process']!r}")
  if int(m["context"]) and parts.pool5 is not None:
    raise ValueError("config.model.context: needs a backbone without pool5 (tiny)")
  if m["train_windows"] not in ("jitter", "grid"):
    raise ValueError(f"config.model.train_windows: expected 'jitter' or 'grid', got "
                     f"{m['train_windows']!r}")
  aspects = tuple(float(a) for a in m["aspect_ratios"])
  scales = win.window_scales(tuple(float(s) for s in m["scales"]), aspects)
  aspect_range = (min(aspects), max(aspects))

  @jax.jit
  def fresh(rng):
    return dict(net.init({"params": rng}, jnp.zeros((1, window, window, 3), dtype), train=False))

  def init(rng, batch):
    del batch
    variables = fresh(rng)
    # the papers' and the lecture's recipe: a classification network, then fine-tuning
    return init_from.start_backbone(variables, backbone=m["backbone"],
                                    backbone_kw=m["backbone_kw"], pretrained=m["pretrained"],
                                    init_from=m["init_from"])

  def loss(variables, batch, rng):
    grid = None
    if m["train_windows"] == "grid":
      grid = dense_grid(conv_net, batch["image"].shape[1:3], scales, window=window, step=step)
    return window_loss(net, variables, batch, rng, window=window,
                       num_windows=int(m["num_windows"]),
                       min_side=window / max(max(p) for p in scales),
                       pos_iou=m["pos_iou"], neg_iou=m["neg_iou"], box_iou_min=m["box_iou"],
                       box_weight=m["box_weight"], aspect_range=aspect_range,
                       jitter=float(m["jitter"]), box_coding=m["box_coding"],
                       soft_labels=bool(m["soft_labels"]), grid=grid,
                       grid_shares=tuple(float(v) for v in m["grid_shares"]),
                       context=int(m["context"]), stride=step)

  def predict(variables, batch):
    conv_vars = {**variables, "params": to_conv_params(variables["params"],
                                                       roi_size=parts.roi_size)}
    dense = dense_windows(conv_net, conv_vars, batch["image"], scales, window=window, step=step,
                          box_coding=m["box_coding"])
    nms_post = functools.partial(windows_detections, iou_threshold=m["iou_threshold"],
                                 score_threshold=m["score_threshold"],
                                 max_detections=int(m["max_detections"]))
    if mode == "windows" or "boxes" not in dense:
      return jax.vmap(functools.partial(nms_post, dense["windows"]))(dense["probs"],
                                                                      batch["image_size"])
    if m["post_process"] == "nms":
      boxes = dense["boxes"]
      boxes = boxes[:, :, 0] if boxes.shape[2] == 1 else boxes              # [B, N, (C,) 4]
      return jax.vmap(nms_post)(boxes, dense["probs"], batch["image_size"])
    post = functools.partial(overfeat_detections, pre_merge_topk=int(m["pre_merge_topk"]),
                             score_threshold=m["score_threshold"],
                             merge_threshold=m["merge_threshold"],
                             max_detections=int(m["max_detections"]))
    return jax.vmap(post)(dense["probs"], dense["boxes"], batch["image_size"])

  return System(name=mode, num_classes=c, init=init, loss=loss, predict=predict,
                extras={"network": net, "conv_network": conv_net, "window": window,
                        "step": step, "scales": scales, "roi_size": parts.roi_size})


def build_system(config: Any) -> System:
  """The OverFeat System (dense multi-scale windows, box regression, greedy merging)."""
  return build(config, mode="overfeat")
