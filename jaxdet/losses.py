"""Pure loss functions, float32 throughout.

Two layers:

* generic pieces, reused by every detector. Each returns per-element losses (no reduction) so the
  caller chooses the normaliser; entries outside the optional `mask` are exactly 0 and have zero,
  finite gradients whatever garbage (padding labels, degenerate boxes) they hold:
    `masked_mean`, `masked_sum`              reductions that respect a padding mask
    `smooth_l1(pred, target, beta)`          Fast R-CNN's robust box regression loss
    `l2(pred, target)`                       squared error
    `softmax_cross_entropy(logits, labels)`  integer labels
    `sigmoid_binary_cross_entropy(logits, targets)`
    `giou_loss(pred_boxes, target_boxes)`    1 - generalised IoU of aligned boxes
* detector losses with the signature `(predictions, targets, mask, ...) -> (loss f32[], metrics)`,
  where every weight is a keyword argument (a config value) and every term of the loss appears
  in the metrics: `yolo_loss`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxdet import checks
from jaxdet.ops import boxes

Array = jax.Array


def _apply_mask(values: Array, mask: Array | None, name: str = "mask") -> Array:
  """Zeroes `values` where `mask` (broadcastable to values) is False; `where`, not a product."""
  if mask is None:
    return values
  checks.check_array(name, mask, dtype_kind="b")
  return jnp.where(mask, values, 0.0)


def masked_sum(values: Array, mask: Array | None = None, *, axis=None) -> Array:
  """Sum of `values` over `axis` counting only entries where `mask` is True.

  Args:
    values: f32[...] per-element losses.
    mask: bool, broadcastable to `values.shape`; None = every entry counts.
    axis: axes to reduce (None = all).
  Returns:
    f32 with `axis` reduced.
  """
  checks.check_array("values", values, dtype_kind="f")
  return jnp.sum(_apply_mask(values.astype(jnp.float32), mask), axis=axis)


def masked_mean(values: Array, mask: Array | None = None, *, axis=None) -> Array:
  """Mean of `values` over the entries where `mask` is True; 0 when no entry is.

  Args:
    values: f32[...] per-element losses.
    mask: bool, broadcastable to `values.shape`; None = plain mean. The count of entries is
      taken after broadcasting, so a mask bool[N, 1] against values f32[N, 4] counts 4 per row.
    axis: axes to reduce (None = all).
  Returns:
    f32 with `axis` reduced: sum(values[mask]) / max(count(mask), 1).
  """
  checks.check_array("values", values, dtype_kind="f")
  if mask is None:
    mask = jnp.ones((), bool)
  checks.check_array("mask", mask, dtype_kind="b")
  full = jnp.broadcast_to(mask, jnp.broadcast_shapes(mask.shape, values.shape))
  total = masked_sum(values, full, axis=axis)
  count = jnp.sum(full, axis=axis).astype(jnp.float32)
  return total / jnp.maximum(count, 1.0)


def smooth_l1(predictions: Array, targets: Array, mask: Array | None = None, *,
              beta: float = 1.0) -> Array:
  """Smooth L1 (Huber / beta) loss per element, as in Fast R-CNN (beta = 1).

  loss(d) = 0.5 d^2 / beta if |d| < beta else |d| - 0.5 beta, with d = prediction - target;
  beta = 0 gives the L1 loss (with gradient 0 at d = 0).

  Args:
    predictions: f32[...], e.g. box deltas f32[N, 4].
    targets: f32[...] of the same shape.
    mask: bool broadcastable to the shape (e.g. bool[N, 1] for positives); None = all.
    beta: the transition point, >= 0.
  Returns:
    f32[...] per element, 0 outside the mask. Sum over the coordinate axis yourself.
  """
  checks.check_array("predictions", predictions, dtype_kind="f")
  checks.check_array("targets", targets, dtype_kind="f", shape=predictions.shape)
  checks.check_positive("beta", beta, allow_zero=True)
  d = predictions.astype(jnp.float32) - targets.astype(jnp.float32)
  ad = jnp.abs(d)
  if beta == 0:
    loss = ad
  else:
    loss = jnp.where(ad < beta, 0.5 * d * d / beta, ad - 0.5 * beta)
  return _apply_mask(loss, mask)


def l2(predictions: Array, targets: Array, mask: Array | None = None) -> Array:
  """Squared error (prediction - target)^2 per element (no 1/2 factor).

  Args:
    predictions: f32[...]; targets: f32[...] of the same shape; mask: bool broadcastable.
  Returns:
    f32[...], 0 outside the mask.
  """
  checks.check_array("predictions", predictions, dtype_kind="f")
  checks.check_array("targets", targets, dtype_kind="f", shape=predictions.shape)
  d = predictions.astype(jnp.float32) - targets.astype(jnp.float32)
  return _apply_mask(d * d, mask)


def softmax_cross_entropy(logits: Array, labels: Array, mask: Array | None = None) -> Array:
  """Softmax cross-entropy with integer labels, per example.

  Args:
    logits: f32[..., K] unnormalised scores over K classes.
    labels: int[...] in [0, K); entries outside the mask may hold anything (e.g. -1 padding).
    mask: bool[...] (the shape of `labels`); None = all real.
  Returns:
    f32[...]: -log softmax(logits)[label], 0 where masked out.
  """
  checks.check_array("logits", logits, ndim=range(1, 9), dtype_kind="f")
  checks.check_array("labels", labels, dtype_kind="iu", shape=logits.shape[:-1])
  if mask is not None:
    checks.check_mask("mask", mask, "labels", labels.shape)
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  safe = jnp.clip(labels, 0, logits.shape[-1] - 1)
  nll = -jnp.take_along_axis(logp, safe[..., None].astype(jnp.int32), axis=-1)[..., 0]
  return _apply_mask(nll, mask)


def sigmoid_binary_cross_entropy(logits: Array, targets: Array,
                                 mask: Array | None = None) -> Array:
  """Binary cross-entropy of sigmoid(logits) against targets in [0, 1], per element.

  Computed stably as max(x, 0) - x t + log(1 + exp(-|x|)).

  Args:
    logits: f32[...]; targets: f32[...] of the same shape (0/1 or soft); mask: bool broadcastable.
  Returns:
    f32[...], 0 where masked out.
  """
  checks.check_array("logits", logits, dtype_kind="f")
  checks.check_array("targets", targets, dtype_kind="fb", shape=logits.shape)
  x = logits.astype(jnp.float32)
  t = targets.astype(jnp.float32)
  loss = jnp.maximum(x, 0.0) - x * t + jnp.log1p(jnp.exp(-jnp.abs(x)))
  return _apply_mask(loss, mask)


def giou_loss(pred_boxes: Array, target_boxes: Array, mask: Array | None = None) -> Array:
  """1 - generalised IoU (Rezatofighi et al. 2019) of aligned box pairs, per pair.

  GIoU = IoU - (|C| - |A u B|) / |C| with C the smallest box enclosing A and B; the loss lies in
  [0, 2] and has a gradient even for disjoint boxes. Degenerate pairs (empty union or enclosure)
  count IoU and the enclosure term as 0, with finite gradients.

  Args:
    pred_boxes: f32[..., 4] (x1, y1, x2, y2) pixels.
    target_boxes: f32[..., 4] of the same shape.
    mask: bool[...] (the shape without the last axis); None = all real.
  Returns:
    f32[...], 0 where masked out.
  """
  checks.check_boxes("pred_boxes", pred_boxes, ndim=range(1, 8))
  checks.check_array("target_boxes", target_boxes, dtype_kind="f", shape=pred_boxes.shape)
  if mask is not None:
    checks.check_mask("mask", mask, "pred_boxes[..., 0]", pred_boxes.shape[:-1])
  giou = boxes.elementwise_generalized_box_iou(pred_boxes, target_boxes)   # [...]
  return _apply_mask(1.0 - giou, mask)


# ---------------------------------------------------------------------------------------------
# YOLO v1


def _safe_sqrt(x: Array) -> Array:
  """sqrt(max(x, 0)) with a finite (zero) gradient at and below 0."""
  pos = x > 0.0
  return jnp.where(pos, jnp.sqrt(jnp.where(pos, x, 1.0)), 0.0)


def yolo_loss(predictions: Array, targets: dict[str, Array], mask: Array, *, num_boxes: int,
              lambda_coord: float = 5.0, lambda_noobj: float = 0.5, lambda_obj: float = 1.0,
              lambda_class: float = 1.0) -> tuple[Array, dict[str, Array]]:
  """The YOLO v1 sum-squared loss (Redmon et al. 2016, eq. 3), summed per image, batch mean.

    lambda_coord sum_ij 1obj_ij [(x_i - x^_i)^2 + (y_i - y^_i)^2]
  + lambda_coord sum_ij 1obj_ij [(sqrt w_i - sqrt w^_i)^2 + (sqrt h_i - sqrt h^_i)^2]
  + lambda_obj   sum_ij 1obj_ij (C_ij - IoU_ij)^2
  + lambda_noobj sum_ij (1 - 1obj_ij) C_ij^2
  + lambda_class sum_i 1obj_i sum_c (p_i(c) - p^_i(c))^2

  i runs over the S x S cells, j over the B predictors of a cell. 1obj_i: cell i holds an object
  centre (`mask`). 1obj_ij: predictor j is "responsible" for that object: of the B predicted
  boxes of the cell, the one with the highest current IoU with the target; ties go to the lowest
  j, except that when no predictor overlaps the target (every IoU is 0) the one whose
  (cx, cy, w, h) lies closest in squared distance is chosen, as darknet does. 1noobj_ij is the
  complement of 1obj_ij, so the non-responsible predictors of an object's cell are pushed to
  confidence 0 as well. The confidence target IoU_ij and the choice of responsible predictor are
  constants (`stop_gradient`).

  Layout of the last axis of `predictions` (the network's raw, linear outputs), per cell:
  B x (x, y, sqrt w, sqrt h, confidence), then C class probabilities. x, y: the box centre as an
  offset inside the cell, in cell units [0, 1]; sqrt w, sqrt h: square roots of the box width
  and height as fractions of the image width and height. Predicting the square roots (as darknet
  does) makes the (sqrt w, sqrt h) term an ordinary squared error with gradients finite at
  w, h = 0; the predicted box for the IoU has w = (sqrt w)^2.

  Args:
    predictions: f[N, S, S, 5B + C] raw network outputs (any float dtype; computed in f32).
    targets: {"box": f32[N, S, S, 4] (x, y, w, h) of the cell's object in the units above,
      "classes": f32[N, S, S, C] target class probabilities (one-hot)}; values in cells
      without objects are ignored.
    mask: bool[N, S, S] True where a cell holds an object centre.
    num_boxes: B, the predictors per cell.
    lambda_coord, lambda_noobj, lambda_obj, lambda_class: the term weights (paper: 5, 0.5, 1, 1).
  Returns:
    loss: f32[], the weighted sum of the terms, per-image sums averaged over the batch.
    metrics: {"loss/xy", "loss/wh", "loss/obj", "loss/noobj", "loss/class"} the weighted terms
      (they add up to the loss), "yolo/iou" the mean IoU of the responsible predictors,
      "yolo/objects" the mean number of object cells per image.
  """
  checks.check_array("predictions", predictions, ndim=4, dtype_kind="f")
  n, s = predictions.shape[:2]
  checks.check_array("predictions", predictions, shape=(None, s, s, None))  # square S x S
  if not isinstance(num_boxes, int) or num_boxes < 1:
    raise ValueError(f"num_boxes: expected a positive int, got {num_boxes!r}")
  for name, value in (("lambda_coord", lambda_coord), ("lambda_noobj", lambda_noobj),
                      ("lambda_obj", lambda_obj), ("lambda_class", lambda_class)):
    checks.check_positive(name, value, allow_zero=True)
  if not isinstance(targets, dict) or not {"box", "classes"} <= set(targets):
    raise ValueError(f"targets: expected a dict with 'box' and 'classes', got {targets!r}"[:200])
  checks.check_array("targets['box']", targets["box"], dtype_kind="f", shape=(n, s, s, 4))
  checks.check_array("targets['classes']", targets["classes"], ndim=4, dtype_kind="f",
                     shape=(n, s, s, None))
  c = targets["classes"].shape[-1]
  checks.check_array("predictions", predictions, last_dim=5 * num_boxes + c)  # 5B + C
  checks.check_mask("mask", mask, "predictions[..., 0]", (n, s, s))

  p = predictions.astype(jnp.float32)
  pb = p[..., :5 * num_boxes].reshape(n, s, s, num_boxes, 5)         # [N, S, S, B, 5]
  p_cls = p[..., 5 * num_boxes:]                                      # [N, S, S, C]
  t_box = targets["box"].astype(jnp.float32)                          # [N, S, S, 4]
  t_cls = targets["classes"].astype(jnp.float32)                      # [N, S, S, C]
  obj = mask                                                          # [N, S, S]

  # Boxes as (cx, cy, w, h) in image fractions relative to the cell's corner (the cell offset
  # is common to both boxes and cancels in the IoU).
  pred_cxcywh = jnp.concatenate([pb[..., :2] / s, jnp.square(pb[..., 2:4])], -1)  # [N,S,S,B,4]
  t_cxcywh = jnp.concatenate([t_box[..., :2] / s, t_box[..., 2:]], -1)[..., None, :]  # [N,S,S,1,4]
  iou = jax.lax.stop_gradient(boxes.elementwise_box_iou(
      boxes.cxcywh_to_xyxy(pred_cxcywh), boxes.cxcywh_to_xyxy(t_cxcywh)))  # [N, S, S, B]
  dist = jax.lax.stop_gradient(jnp.sum(jnp.square(pred_cxcywh - t_cxcywh), -1))  # [N, S, S, B]
  any_overlap = jnp.any(iou > 0.0, axis=-1, keepdims=True)            # [N, S, S, 1]
  best = jnp.argmax(jnp.where(any_overlap, iou, -dist), axis=-1)      # [N, S, S]
  resp = jax.nn.one_hot(best, num_boxes, dtype=bool) & obj[..., None]  # [N, S, S, B]

  t_sqrt_wh = _safe_sqrt(t_box[..., None, 2:])                        # [N, S, S, 1, 2]
  xy = jnp.sum(jnp.square(pb[..., :2] - t_box[..., None, :2]), -1)    # [N, S, S, B]
  wh = jnp.sum(jnp.square(pb[..., 2:4] - t_sqrt_wh), -1)              # [N, S, S, B]
  conf = pb[..., 4]                                                   # [N, S, S, B]
  per_image = lambda x: jnp.sum(x, axis=tuple(range(1, x.ndim)))      # noqa: E731
  terms = {
      "loss/xy": lambda_coord * per_image(jnp.where(resp, xy, 0.0)),
      "loss/wh": lambda_coord * per_image(jnp.where(resp, wh, 0.0)),
      "loss/obj": lambda_obj * per_image(jnp.where(resp, jnp.square(conf - iou), 0.0)),
      "loss/noobj": lambda_noobj * per_image(jnp.where(resp, 0.0, jnp.square(conf))),
      "loss/class": lambda_class * per_image(
          jnp.where(obj[..., None], jnp.square(p_cls - t_cls), 0.0)),
  }
  terms = {k: jnp.mean(v) for k, v in terms.items()}                  # batch mean of image sums
  loss = sum(terms.values())
  metrics = dict(terms)
  metrics["yolo/iou"] = masked_mean(iou, resp)
  metrics["yolo/objects"] = jnp.mean(jnp.sum(obj, axis=(1, 2)).astype(jnp.float32))
  return loss, metrics
