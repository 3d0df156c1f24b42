"""OverFeat: a window classifier + box regressor whose fc layers run densely as convolutions.

One network (`WindowNet`) serves two systems:

* "windows" (the brute-force baseline, `jaxdet.models.windows`): classify every sliding window
  of several image scales into C classes + background; each window's own box is the detection;
  per-class NMS.
* "overfeat" (Sermanet et al. 2014): the same classifier plus a box regressor (per class or
  class-agnostic) predicting, in each window, the object's box; boxes from every window and
  scale are mapped back to the image and merged by OverFeat's greedy merging
  (`jaxdet.ops.windows.merge_boxes`).

Training (both systems): from each image `num_windows` square windows are sampled (half around
ground-truth objects with jittered centre and size, half uniformly), cropped and resized to the
network's input size `window` (RoI align on the pixels), labelled with the class of the
ground-truth box of highest IoU when IoU >= pos_iou, background (index C) when < neg_iou,
ignored in between; the regressor learns, on windows with IoU >= box_iou, the matched box coded
relative to the window (`encode_in_window`), with an L2 loss.

Test time: the fc layers become convolutions (`to_conv_params`, the same weights reshaped), so
one pass over an image resized by s gives class scores and boxes for every window of size
`window / s` at a step of `step / s` pixels (`jaxdet.ops.windows.window_grid`).
"""

from __future__ import annotations

import functools
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdet import checks, losses
from jaxdet.models import backbones
from jaxdet.ops import windows as win
from jaxdet.ops.nms import multiclass_nms
from jaxdet.ops.boxes import box_iou, clip_boxes
from jaxdet.system import System
from jaxdet.train import init_from

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
  def __call__(self, x: Array, train: bool = False) -> tuple[Array, Array | None]:
    f = self.conv(x, train=train)
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


def network_geometry(parts: backbones.BackboneParts) -> tuple[int, int]:
  """(window, step) in pixels: the training input size and the dense output stride.

  Without pool5 the fc part reads roi_size x roi_size conv cells: window = roi_size * stride.
  With pool5 (window w, stride s, padding p) it reads roi_size pooled cells:
  window = stride * ((roi_size - 1) * s + w - 2 p), step = stride * s.
  """
  if parts.pool5 is None:
    return parts.roi_size * parts.stride, parts.stride
  w, s, p = parts.pool5
  return parts.stride * ((parts.roi_size - 1) * s + w - 2 * p), parts.stride * s


# ----------------------------------------------------------------------------- training windows


def sample_windows(key: Array, gt_boxes: Array, gt_mask: Array, image_size: Array, *,
                   num_windows: int, min_side: float, object_fraction: float = 0.5,
                   jitter: float = 0.2) -> Array:
  """Square training windows for one image: around objects and uniformly at random.

  Args:
    key: PRNG key.
    gt_boxes: f32[M, 4] (x1, y1, x2, y2) pixels; gt_mask: bool[M] True = real.
    image_size: i32[2] (height, width) of the real pixels.
    num_windows: S (static).
    min_side: the smallest window side of the random windows, pixels.
    object_fraction: the share of windows placed around a random real object (none if the image
      has no object): side = longer object side * U(1, 1 + jitter) ... U(1 - jitter, 1 + 2 jitter)
      and the centre moved by U(-jitter, jitter) * side.
    jitter: the relative jitter of object windows.
  Returns:
    f32[S, 4] (x1, y1, x2, y2) pixels, inside the image (random ones) or around objects.
  """
  checks.check_boxes("gt_boxes", gt_boxes)
  checks.check_mask("gt_mask", gt_mask, "gt_boxes", gt_boxes.shape[:1])
  h = image_size[0].astype(jnp.float32)
  w = image_size[1].astype(jnp.float32)
  k_obj, k_side, k_shift, k_rand, k_pos = jax.random.split(key, 5)
  s = num_windows
  # Around objects.
  logits = jnp.where(gt_mask, 0.0, -jnp.inf)
  pick = jax.random.categorical(k_obj, jnp.where(gt_mask.any(), logits, 0.0), shape=(s,))
  g = gt_boxes[pick].astype(jnp.float32)                                    # [S, 4]
  centre = 0.5 * (g[:, :2] + g[:, 2:])
  side = jnp.max(g[:, 2:] - g[:, :2], axis=-1) * jax.random.uniform(
      k_side, (s,), minval=1.0 - jitter, maxval=1.0 + 2 * jitter)
  centre = centre + side[:, None] * jax.random.uniform(k_shift, (s, 2), minval=-jitter,
                                                       maxval=jitter)
  around = jnp.concatenate([centre - 0.5 * side[:, None], centre + 0.5 * side[:, None]], -1)
  # Uniform.
  max_side = jnp.maximum(jnp.minimum(h, w), min_side)
  rside = jax.random.uniform(k_rand, (s,), minval=min_side, maxval=max_side)
  u = jax.random.uniform(k_pos, (s, 2))
  x1 = u[:, 0] * jnp.maximum(w - rside, 0.0)
  y1 = u[:, 1] * jnp.maximum(h - rside, 0.0)
  uniform = jnp.stack([x1, y1, x1 + rside, y1 + rside], axis=-1)
  use_obj = (jnp.arange(s) < round(object_fraction * s)) & gt_mask.any()
  return jnp.where(use_obj[:, None], around, uniform)


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
     "matched": f32[S, 4] the best object's box (zeros without objects)}.
  """
  iou = jnp.where(gt_mask[None, :], box_iou(windows, gt_boxes), -1.0)      # [S, M]
  best = jnp.argmax(iou, axis=1)
  best_iou = jnp.maximum(jnp.max(iou, axis=1), 0.0)
  cls = jnp.where(best_iou >= pos_iou, gt_labels[best].astype(jnp.int32), -1)
  cls = jnp.where(best_iou < neg_iou, num_classes, cls)
  matched = jnp.where(gt_mask.any(), gt_boxes[best].astype(jnp.float32), 0.0)
  return {"labels": cls, "iou": best_iou, "matched": matched}


def window_loss(net: WindowNet, variables: Any, batch: Mapping[str, Array], rng: Array, *,
                window: int, num_windows: int, min_side: float, pos_iou: float,
                neg_iou: float, box_iou_min: float, box_weight: float,
                mutable: Any = False) -> tuple[Array, dict[str, Array], Any]:
  """The training loss of a dense-form `WindowNet` on sampled windows of a batch of images.

  loss = mean softmax CE over non-ignored windows + box_weight * mean over regression windows
  of the summed squared error of the window-relative box (of the matched class for per-class
  boxes).

  Returns:
    (loss f32[], metrics {"loss/class", "loss/box", "window_accuracy", "positive_fraction"},
    new model state).
  """
  k_sample, k_drop = jax.random.split(rng)
  b = batch["image"].shape[0]
  keys = jax.random.split(k_sample, b)
  sample = functools.partial(sample_windows, num_windows=num_windows, min_side=min_side)
  wins = jax.vmap(sample)(keys, batch["boxes"], batch["box_mask"], batch["image_size"])
  labelled = jax.vmap(functools.partial(
      label_windows, num_classes=net.num_classes, pos_iou=pos_iou, neg_iou=neg_iou))(
          wins, batch["boxes"], batch["labels"], batch["box_mask"])
  crops = jax.vmap(functools.partial(win.crop_windows, size=window))(batch["image"], wins)
  crops = crops.reshape(b * num_windows, window, window, 3)
  x = backbones.normalize_images(crops, net.dtype)
  out = net.apply(variables, x, train=True, rngs={"dropout": k_drop}, mutable=mutable)
  (logits, boxes), new_state = out if mutable else (out, {})
  labels = labelled["labels"].reshape(-1)
  keep = labels >= 0
  ce = losses.masked_mean(losses.softmax_cross_entropy(logits, labels, keep), keep)
  acc = losses.masked_mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32), keep)
  metrics = {"loss/class": ce, "window_accuracy": acc,
             "positive_fraction": jnp.mean((labels >= 0) & (labels < net.num_classes))}
  total = ce
  if boxes is not None:
    target = win.encode_in_window(labelled["matched"], wins).reshape(-1, 4)
    gt_cls = jnp.clip(labels, 0, net.num_classes - 1)
    group = gt_cls if boxes.shape[1] > 1 else jnp.zeros_like(gt_cls)
    pred = jnp.take_along_axis(boxes, group[:, None, None], axis=1)[:, 0]   # [N, 4]
    reg = labelled["iou"].reshape(-1) >= box_iou_min
    per_window = jnp.sum(losses.l2(pred, target, reg[:, None]), axis=-1)
    box_loss = losses.masked_mean(per_window, reg)
    metrics["loss/box"] = box_loss
    total = total + box_weight * box_loss
  return total, metrics, dict(new_state)


# ----------------------------------------------------------------------------- dense inference


def resize_images(images: Array, scale: float) -> tuple[Array, tuple[float, float]]:
  """Bilinear resize of u8/f[B, H, W, 3] by `scale` -> (f32[B, h, w, 3], (sy, sx) = h/H, w/W)."""
  b, h, w, c = images.shape
  nh, nw = max(1, int(round(h * scale))), max(1, int(round(w * scale)))
  x = images.astype(jnp.float32)
  if (nh, nw) != (h, w):
    x = jax.image.resize(x, (b, nh, nw, c), "linear", antialias=False)
  return x, (nh / h, nw / w)


def dense_windows(conv_net: WindowNet, conv_params: Any, images: Array, scales: Sequence[float],
                  *, window: int, step: int) -> dict[str, Array]:
  """Class probabilities and boxes of every window at every scale, in image pixels.

  Args:
    conv_net: a `WindowNet` with as_conv=True; conv_params its variables (`to_conv_params`).
    images: u8[B, H, W, 3].
    scales: resize factors (static); each needs the resized image >= window.
    window, step: `network_geometry` of the net.
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
      boxes.append(win.decode_in_window(codes, grid[None, :, None, :]))
  out = {"windows": jnp.concatenate(wins, 0), "probs": jnp.concatenate(probs, 1)}
  if boxes:
    out["boxes"] = jnp.concatenate(boxes, 1)
  return out


def explicit_windows(dense_net: WindowNet, params: Any, images: Array, windows: Array, *,
                     window: int, chunk: int = 256) -> dict[str, Array]:
  """The brute-force counterpart of `dense_windows`: crop every window, run the dense-form net.

  Args:
    dense_net: a `WindowNet` with as_conv=False; params its variables.
    images: u8[B, H, W, 3]; windows: f32[N, 4] image boxes (e.g. `dense_windows`'s "windows").
    window: the network input size; chunk: crops per forward pass.
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
      return probs, win.decode_in_window(codes, windows[:, None, :])
    return probs, None

  probs, boxes = jax.lax.map(one_image, images)
  out = {"probs": probs}
  if boxes is not None:
    out["boxes"] = boxes
  return out


def windows_detections(windows: Array, probs: Array, image_size: Array, *, iou_threshold: float,
                       score_threshold: float, max_detections: int) -> dict[str, Array]:
  """The brute-force detector's post-processing for one image: window boxes, per-class NMS.

  Args:
    windows: f32[N, 4]; probs: f32[N, C + 1] (background last); image_size: i32[2].
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
    "box_weight": 1.0,
    "scales": (1.5, 1.0, 0.7, 0.5),
    "score_threshold": 0.05,
    "iou_threshold": 0.3,          # windows: per-class NMS
    "pre_merge_topk": 128,         # overfeat: candidates entering the merge
    "merge_threshold": 0.6,        # overfeat: merge while match_score <= this
    "max_detections": 50,
    "init_from": "",               # a finished classify run's workdir: conv + fc start from its
                                   # latest checkpoint (jaxdet.train.init_from); "" = scratch
}


def model_settings(config: Any) -> dict[str, Any]:
  """MODEL_DEFAULTS updated by config.model (unknown keys are an error)."""
  model = config["model"] if "model" in config else {}
  model = model.to_dict() if hasattr(model, "to_dict") else dict(model)
  unknown = sorted(set(model) - set(MODEL_DEFAULTS) - {"num_classes"})
  if unknown:
    raise ValueError(f"config.model: unknown keys {unknown}; known: {sorted(MODEL_DEFAULTS)}")
  return {**MODEL_DEFAULTS, **model}


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
  scales = tuple(float(s) for s in m["scales"])

  @jax.jit
  def fresh(rng):
    return dict(net.init({"params": rng}, jnp.zeros((1, window, window, 3), dtype), train=False))

  def init(rng, batch):
    del batch
    variables = fresh(rng)
    if m["init_from"]:   # the lecture's recipe: a classification network, then fine-tuning
      variables["params"] = init_from.load_into(variables["params"], str(m["init_from"]))
    return variables

  def loss(variables, batch, rng):
    return window_loss(net, variables, batch, rng, window=window,
                       num_windows=int(m["num_windows"]), min_side=window / max(scales),
                       pos_iou=m["pos_iou"], neg_iou=m["neg_iou"], box_iou_min=m["box_iou"],
                       box_weight=m["box_weight"])

  def predict(variables, batch):
    conv_vars = {**variables, "params": to_conv_params(variables["params"],
                                                       roi_size=parts.roi_size)}
    dense = dense_windows(conv_net, conv_vars, batch["image"], scales, window=window, step=step)
    if mode == "windows" or "boxes" not in dense:
      post = functools.partial(windows_detections, dense["windows"],
                               iou_threshold=m["iou_threshold"],
                               score_threshold=m["score_threshold"],
                               max_detections=int(m["max_detections"]))
      return jax.vmap(post)(dense["probs"], batch["image_size"])
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
