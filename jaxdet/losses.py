"""Pure loss functions, float32 throughout.

Three layers:

* generic pieces, reused by every detector. Each returns per-element losses (no reduction) so the
  caller chooses the normaliser; entries outside the optional `mask` are exactly 0 and have zero,
  finite gradients whatever garbage (padding labels, degenerate boxes) they hold:
    `masked_mean`, `masked_sum`              reductions that respect a padding mask
    `smooth_l1(pred, target, beta)`          Fast R-CNN's robust box regression loss
    `l2(pred, target)`                       squared error
    `softmax_cross_entropy(logits, labels)`  integer labels
    `sigmoid_binary_cross_entropy(logits, targets)`
    `giou_loss(pred_boxes, target_boxes)`    1 - generalised IoU of aligned boxes
* loss terms ("Loss terms" below): the functions `config.model.loss.<term>` names, of three
  kinds ("class", "binary", "box"), one signature each, found by `resolve_term` (a built-in
  name or a user's "package.module:function");
* detector losses (`window_classifier_loss`, `yolo_loss`, `classification_loss`,
  `localization_loss`, `fast_rcnn_loss`, `rpn_loss`): (predictions, targets, mask, terms...)
  -> (loss f32[], metrics), the weighted sum of the system's terms, each reported as
  `loss/<term>` (weighted; they add up to the loss).

Masked entries (double `where`). Every loss replaces its inputs by harmless values where the mask
is False *before* any arithmetic (`_sanitize`), not only its result after: a NaN or inf
prediction, target, logit or box under a False mask then gives exactly the value and the
gradients of the sliced, unmasked-only input. (Masking only the result would give a finite loss
whose gradient is 0 * NaN = NaN.)

Labels (a precondition). Integer class labels must lie in [0, K) wherever the mask is True;
this is checked where data enters jaxdet (`jaxdet.checks.check_label_values`), not inside the
losses: a value check there would need a host sync in every step. On the normal path an
out-of-range label is clamped silently (`softmax_cross_entropy`, `fast_rcnn_loss`) or gives an
all-zero one-hot target (YOLO's targets). To check it on the device, opt in with
`jax.experimental.checkify`: call `check_labels` in the function you transform, or wrap the
loss with `checked`, which runs it jitted under checkify and raises on a bad label:

    from jax.experimental import checkify
    def loss_fn(logits, labels, mask):
      losses.check_labels(labels, logits.shape[-1], mask)
      return losses.softmax_cross_entropy(logits, labels, mask)
    err, value = jax.jit(checkify.checkify(loss_fn))(logits, labels, mask)
    err.throw()                       # checkify.JaxRuntimeError naming the first bad label

    ce = losses.checked(losses.softmax_cross_entropy,
                        lambda logits, labels, mask: losses.check_labels(labels, K, mask))
    value = ce(logits, labels, mask)  # the same, in one call
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from jax.experimental import checkify

from jaxdet import checks, global_batch
from jaxdet.ops import boxes

Array = jax.Array


def _apply_mask(values: Array, mask: Array | None, name: str = "mask") -> Array:
  """Zeroes `values` where `mask` (broadcastable to values) is False; `where`, not a product."""
  if mask is None:
    return values
  checks.check_array(name, mask, dtype_kind="b")
  return jnp.where(mask, values, 0.0)


def _sanitize(x: Array, mask: Array | None, safe=0.0) -> Array:
  """`x` with `safe` where `mask` (broadcastable to x) is False: the first `where` of the
  double-`where` pattern, applied to a loss's inputs before any arithmetic."""
  if mask is None:
    return x
  return jnp.where(mask, x, jnp.asarray(safe, x.dtype))


def check_labels(labels: Array, num_classes: int, mask: Array | None = None, *,
                 name: str = "labels") -> None:
  """Checks on the device that labels lie in [0, num_classes) where `mask` is True (checkify).

  Opt-in: call it inside a function transformed by `jax.experimental.checkify.checkify` (or
  wrapped by `checked`); outside checkify, under `jax.jit`, `checkify.check` raises at trace
  time. No host sync until the caller's `err.throw()`.

  Args:
    labels: int[...] class labels.
    num_classes: K, the number of classes the labels index (e.g. C + 1 with a background).
    mask: bool[...] (the shape of `labels`) or None; labels where it is False are not checked.
    name: the argument's name in the error.
  Raises (through checkify's error, at `err.throw()`):
    checkify.JaxRuntimeError "<name>: label <l> at index <i> (flat) is outside [0, K) ...".
  """
  checks.check_array(name, labels, dtype_kind="iu")
  if mask is not None:
    checks.check_mask("mask", mask, name, labels.shape)
  if labels.size == 0:
    return
  bad = (labels < 0) | (labels >= num_classes)
  if mask is not None:
    bad = bad & mask
  flat = bad.reshape(-1)
  i = jnp.argmax(flat)
  checkify.check(~jnp.any(flat),
                 f"{name}: label {{label}} at index {{index}} (flat) is outside "
                 f"[0, {num_classes}) for {num_classes} classes",
                 label=labels.reshape(-1)[i], index=i)


def checked(fn: Callable, *arg_checks: Callable) -> Callable:
  """`fn`, jitted and run under checkify after `arg_checks` (e.g. `check_labels`); raises.

  Args:
    fn: a loss (or any jittable function).
    arg_checks: functions called with fn's arguments before fn, using `checkify.check`.
  Returns:
    A function with fn's signature that raises checkify.JaxRuntimeError when a check (or an
    index check of checkify's default set) fails; otherwise returns fn's result. It syncs with
    the host to raise: a debugging tool, not for the training step.
  """
  def body(*args, **kwargs):
    for check in arg_checks:
      check(*args, **kwargs)
    return fn(*args, **kwargs)

  run = jax.jit(checkify.checkify(body))

  def wrapper(*args, **kwargs):
    err, out = run(*args, **kwargs)
    err.throw()
    return out

  return wrapper


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
    f32[...] per element, 0 outside the mask (whatever predictions and targets hold there,
    NaN included, with zero gradients). Sum over the coordinate axis yourself.
  """
  checks.check_array("predictions", predictions, dtype_kind="f")
  checks.check_array("targets", targets, dtype_kind="f", shape=predictions.shape)
  checks.check_positive("beta", beta, allow_zero=True)
  d = (_sanitize(predictions.astype(jnp.float32), mask)
       - _sanitize(targets.astype(jnp.float32), mask))
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
    f32[...], 0 outside the mask (NaN there included, with zero gradients).
  """
  checks.check_array("predictions", predictions, dtype_kind="f")
  checks.check_array("targets", targets, dtype_kind="f", shape=predictions.shape)
  d = (_sanitize(predictions.astype(jnp.float32), mask)
       - _sanitize(targets.astype(jnp.float32), mask))
  return _apply_mask(d * d, mask)


def softmax_cross_entropy(logits: Array, labels: Array, mask: Array | None = None) -> Array:
  """Softmax cross-entropy with integer labels, per example.

  Precondition: labels in [0, K) where the mask is True. Not checked here (no host sync on the
  normal path): an out-of-range label is clamped to 0 or K - 1. Data entry checks it
  (`jaxdet.checks.check_label_values`); on the device, opt in with `check_labels` / `checked`
  (see the module doc).

  Args:
    logits: f32[..., K] unnormalised scores over K classes.
    labels: int[...] in [0, K); entries outside the mask may hold anything (e.g. -1 padding).
    mask: bool[...] (the shape of `labels`); None = all real.
  Returns:
    f32[...]: -log softmax(logits)[label], 0 where masked out (whatever the logits hold there,
    NaN included, with zero gradients).
  """
  checks.check_array("logits", logits, ndim=range(1, 9), dtype_kind="f")
  checks.check_array("labels", labels, dtype_kind="iu", shape=logits.shape[:-1])
  if mask is not None:
    checks.check_mask("mask", mask, "labels", labels.shape)
  logits = _sanitize(logits.astype(jnp.float32), None if mask is None else mask[..., None])
  logp = jax.nn.log_softmax(logits, axis=-1)
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
    f32[...], 0 where masked out (NaN there included, with zero gradients).
  """
  checks.check_array("logits", logits, dtype_kind="f")
  checks.check_array("targets", targets, dtype_kind="fb", shape=logits.shape)
  x = _sanitize(logits.astype(jnp.float32), mask)
  t = _sanitize(targets.astype(jnp.float32), mask)
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
    f32[...], 0 where masked out (whatever boxes, NaN included, with zero gradients). An
    unmasked pair with a non-finite box has GIoU 0 (`jaxdet.ops.boxes`), so loss 1.
  """
  checks.check_boxes("pred_boxes", pred_boxes, ndim=range(1, 8))
  checks.check_array("target_boxes", target_boxes, dtype_kind="f", shape=pred_boxes.shape)
  if mask is not None:
    checks.check_mask("mask", mask, "pred_boxes[..., 0]", pred_boxes.shape[:-1])
  box_mask = None if mask is None else mask[..., None]
  safe = jnp.asarray([0.0, 0.0, 1.0, 1.0], jnp.float32)
  pred_boxes = _sanitize(pred_boxes.astype(jnp.float32), box_mask, safe)
  target_boxes = _sanitize(target_boxes.astype(jnp.float32), box_mask, safe)
  giou = boxes.elementwise_generalized_box_iou(pred_boxes, target_boxes)   # [...]
  return _apply_mask(1.0 - giou, mask)


# ---------------------------------------------------------------------------------------------
# Loss terms: what `config.model.loss.<term>` names
#
# Every system's loss is a weighted sum of named terms (`loss/<term>` in the metrics); each term
# is a function of one of three kinds, chosen in the config by a name of TERMS[kind] or by a
# dotted path "package.module:function" to a function of the same signature (`resolve_term`).
# A term returns a per-element loss, 0 outside the mask (whatever the inputs hold there, NaN
# included, with zero gradients); the system reduces it (its own normaliser) and weights it by
# `config.model.loss.<term>_weight`. The signatures, one per kind:
#
#   "class":  fn(logits f32[N, K], labels i32[N], mask bool[N]) -> f32[N]
#             K-way classification; labels in [0, K) where the mask is True (background, when
#             the system has one, is class 0).
#   "binary": fn(predictions f32[N], targets f32[N], mask bool[N]) -> f32[N]
#             one score per element against a target in [0, 1] (RPN objectness as a logit,
#             YOLO's confidences as raw values).
#   "box":    fn(predictions f32[N, 4], targets f32[N, 4], mask bool[N], *, decode) -> f32[N]
#             the system's box codes (deltas, window-relative or cell-relative coordinates),
#             summed over the 4 coordinates; `decode(codes f32[N, 4]) -> f32[N, 4]` gives the
#             (x1, y1, x2, y2) boxes of codes (in any common frame), for losses on boxes (GIoU).


def softmax_focal(logits: Array, labels: Array, mask: Array | None = None, *,
                  gamma: float = 2.0) -> Array:
  """Focal loss (Lin et al. 2017) on the softmax: -(1 - p_y)^gamma log p_y, per example.

  Args and returns as `softmax_cross_entropy` (a "class" term).
  """
  nll = softmax_cross_entropy(logits, labels, mask)
  return _apply_mask(jnp.power(-jnp.expm1(-nll), gamma) * nll, mask)


def squared_error_onehot(logits: Array, labels: Array, mask: Array | None = None) -> Array:
  """sum_k (logits_k - [k == label])^2 per example: YOLO v1's class term (the outputs are
  regressed onto the one-hot class probabilities). A "class" term."""
  checks.check_array("logits", logits, ndim=range(1, 9), dtype_kind="f")
  checks.check_array("labels", labels, dtype_kind="iu", shape=logits.shape[:-1])
  onehot = jax.nn.one_hot(labels, logits.shape[-1], dtype=jnp.float32)
  row = None if mask is None else mask[..., None]
  return jnp.sum(l2(logits.astype(jnp.float32), onehot, row), axis=-1)


def sigmoid_focal(logits: Array, targets: Array, mask: Array | None = None, *,
                  alpha: float = 0.25, gamma: float = 2.0) -> Array:
  """RetinaNet's sigmoid focal loss (Lin et al. 2017, as torchvision.ops.sigmoid_focal_loss):
  alpha_t (1 - p_t)^gamma BCE, per element. A "binary" term (alpha < 0: no alpha weighting)."""
  ce = sigmoid_binary_cross_entropy(logits, targets, mask)
  p = jax.nn.sigmoid(_sanitize(logits.astype(jnp.float32), mask))
  t = _sanitize(targets.astype(jnp.float32), mask)
  p_t = p * t + (1.0 - p) * (1.0 - t)
  loss = ce * jnp.power(1.0 - p_t, gamma)
  if alpha >= 0:
    loss = (alpha * t + (1.0 - alpha) * (1.0 - t)) * loss
  return _apply_mask(loss, mask)


def squared_error(predictions: Array, targets: Array, mask: Array | None = None) -> Array:
  """(prediction - target)^2 per element: YOLO v1's confidence terms. A "binary" term."""
  return l2(predictions, targets, mask)


def box_smooth_l1(predictions: Array, targets: Array, mask: Array, *, decode=None) -> Array:
  """Smooth L1 (beta 1, Fast R-CNN) summed over the 4 codes, per box. A "box" term."""
  del decode
  return jnp.sum(smooth_l1(predictions, targets, mask[..., None], beta=1.0), axis=-1)


def box_smooth_l1_rpn(predictions: Array, targets: Array, mask: Array, *, decode=None
                      ) -> Array:
  """Smooth L1 with beta 1/9 (py-faster-rcnn's sigma 3 for the RPN, as torchvision) summed
  over the 4 codes, per box. A "box" term."""
  del decode
  return jnp.sum(smooth_l1(predictions, targets, mask[..., None], beta=1.0 / 9.0), axis=-1)


def box_l1(predictions: Array, targets: Array, mask: Array, *, decode=None) -> Array:
  """Absolute error summed over the 4 codes, per box. A "box" term."""
  del decode
  return jnp.sum(smooth_l1(predictions, targets, mask[..., None], beta=0.0), axis=-1)


def box_l2(predictions: Array, targets: Array, mask: Array, *, decode=None) -> Array:
  """Squared error summed over the 4 codes, per box (R-CNN's ridge objective, the
  localization-as-regression L2, YOLO's coordinates). A "box" term."""
  del decode
  return jnp.sum(l2(predictions, targets, mask[..., None]), axis=-1)


def box_giou(predictions: Array, targets: Array, mask: Array, *, decode) -> Array:
  """1 - GIoU of the boxes that the predicted and the target codes decode to; the target
  boxes are constants (`stop_gradient`). A "box" term."""
  row = mask[..., None]
  pred = decode(_sanitize(predictions.astype(jnp.float32), row))
  target = decode(jax.lax.stop_gradient(_sanitize(targets.astype(jnp.float32), row)))
  return giou_loss(pred, target, mask)


# kind -> {name: function}; the built-in choices of `config.model.loss.<term>`.
TERMS: dict[str, dict[str, Callable]] = {
    "class": {"softmax_cross_entropy": softmax_cross_entropy, "softmax_focal": softmax_focal,
              "squared_error_onehot": squared_error_onehot},
    "binary": {"sigmoid_binary_cross_entropy": sigmoid_binary_cross_entropy,
               "sigmoid_focal": sigmoid_focal, "squared_error": squared_error},
    "box": {"smooth_l1": box_smooth_l1, "smooth_l1_rpn": box_smooth_l1_rpn, "l1": box_l1,
            "l2": box_l2, "giou": box_giou},
}


def resolve_term(spec, kind: str, *, where: str = "loss") -> Callable:
  """The function of a loss term: a name of `TERMS[kind]`, a "package.module:function" path,
  or a callable (returned as is).

  Args:
    spec: the value of `config.model.loss.<term>`.
    kind: "class", "binary" or "box" (the signatures above).
    where: the config key, for error messages.
  Raises:
    ValueError for an unknown kind or name (listing the known names) or a path that does not
    resolve to a callable (naming the module or the attribute that is missing).
  """
  if kind not in TERMS:
    raise ValueError(f"{where}: unknown kind of loss term {kind!r}; expected one of "
                     f"{sorted(TERMS)}")
  if callable(spec):
    return spec
  if not isinstance(spec, str):
    raise TypeError(f"{where}: expected a name, a 'package.module:function' path or a "
                    f"callable, got {spec!r}")
  if spec in TERMS[kind]:
    return TERMS[kind][spec]
  if ":" not in spec:
    raise ValueError(f"{where}: unknown {kind} loss {spec!r}; expected one of "
                     f"{sorted(TERMS[kind])} or a 'package.module:function' path")
  import importlib
  module_name, fn_name = spec.split(":", 1)
  try:
    module = importlib.import_module(module_name)
  except ImportError as e:
    raise ValueError(f"{where}: cannot import module {module_name!r} of {spec!r}: {e}") from e
  fn = getattr(module, fn_name, None)
  if not callable(fn):
    raise ValueError(f"{where}: module {module_name!r} has no function {fn_name!r} "
                     f"(from {spec!r})")
  return fn


# ---------------------------------------------------------------------------------------------
# OverFeat and sliding windows


def window_classifier_loss(logits: Array, labels: Array, *,
                           cls_fn: Callable = softmax_cross_entropy, cls_weight: float = 1.0,
                           box_codes: Array | None = None,
                           box_targets: Array | None = None, box_class: Array | None = None,
                           box_mask: Array | None = None, box_fn: Callable = box_l2,
                           box_weight: float = 1.0, decode: Callable | None = None,
                           prefix: str = "overfeat") -> tuple[Array, dict[str, Array]]:
  """The loss of a window classifier (+ per-class box regressor) over N sampled windows.

    L = cls_weight mean_{labels >= 0} cls_fn(logits, labels)
        + box_weight mean_{box_mask} box_fn(codes of box_class, box_targets)

  each mean over the global batch (`jaxdet.global_batch.masked_mean`). The sliding-windows
  system has the class term only; OverFeat both.

  Args:
    logits: f32[N, C + 1] class scores, column 0 background.
    labels: i32[N] in {-1, 0..C}: 0 background, c + 1 object class c, -1 ignored.
    cls_fn: a "class" term (see "Loss terms").
    cls_weight: its weight.
    box_codes: f32[N, C, 4] per-class box codes, or None: no box term.
    box_targets: f32[N, 4] the codes of each window's matched object box.
    box_class: i32[N] in [0, C) the matched object's class, whose codes regress.
    box_mask: bool[N] the windows that regress (anything elsewhere, NaN included).
    box_fn: a "box" term; box_weight: its weight.
    decode: codes f32[N, 4] -> boxes f32[N, 4] (x1, y1, x2, y2) pixels in each window.
    prefix: the system's name in the diagnostics.
  Returns:
    (loss f32[], metrics {"loss/cls", "loss/box" (weighted: they add up to the loss),
    "<prefix>/accuracy" (argmax over the labelled windows), "<prefix>/positive_fraction"
    (windows labelled with an object class)}).
  """
  checks.check_array("logits", logits, ndim=2, dtype_kind="f")
  n, c1 = logits.shape
  checks.check_array("labels", labels, dtype_kind="iu", shape=(n,))
  labels = labels.astype(jnp.int32)
  keep = labels >= 0
  cls = cls_weight * global_batch.masked_mean(cls_fn(logits, labels, keep), keep)
  correct = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
  metrics = {"loss/cls": cls, f"{prefix}/accuracy": masked_mean(correct, keep),
             f"{prefix}/positive_fraction": jnp.mean((labels >= 1).astype(jnp.float32))}
  if box_codes is None:
    return cls, metrics
  checks.check_array("box_codes", box_codes, dtype_kind="f", shape=(n, c1 - 1, 4))
  checks.check_array("box_targets", box_targets, dtype_kind="f", shape=(n, 4))
  checks.check_array("box_class", box_class, dtype_kind="iu", shape=(n,))
  checks.check_mask("box_mask", box_mask, "labels", (n,))
  index = jnp.clip(box_class.astype(jnp.int32), 0, c1 - 2)
  pred = jnp.take_along_axis(box_codes.astype(jnp.float32), index[:, None, None], axis=1)[:, 0]
  # Rows outside the mask may hold anything: harmless values before any (user) term sees them.
  pred = jnp.where(box_mask[:, None], pred, 0.0)
  target = jnp.where(box_mask[:, None], box_targets.astype(jnp.float32), 0.0)
  box = box_weight * global_batch.masked_mean(box_fn(pred, target, box_mask, decode=decode),
                                              box_mask)
  metrics["loss/box"] = box
  return cls + box, metrics


# ---------------------------------------------------------------------------------------------
# YOLO v1


def _safe_sqrt(x: Array) -> Array:
  """sqrt(max(x, 0)) with a finite (zero) gradient at and below 0."""
  pos = x > 0.0
  return jnp.where(pos, jnp.sqrt(jnp.where(pos, x, 1.0)), 0.0)


YOLO_TERMS = ("coord", "obj", "noobj", "cls")


def yolo_loss(predictions: Array, targets: dict[str, Array], mask: Array, *, num_boxes: int,
              terms, decode: Callable[[Array], Array]) -> tuple[Array, dict[str, Array]]:
  """The YOLO v1 sum-squared loss (Redmon et al. 2016, eq. 3) as four weighted terms, each
  summed per image, then averaged over the batch. With the default terms (`yolo.Loss()`, the
  paper's: coord_weight = lambda_coord = 5, noobj_weight = lambda_noobj = 0.5, the others 1):

    coord: coord_weight sum_ij 1obj_ij [(x_i - x^_i)^2 + (y_i - y^_i)^2
                                        + (sqrt w_i - sqrt w^_i)^2 + (sqrt h_i - sqrt h^_i)^2]
    obj:   obj_weight   sum_ij 1obj_ij (C_ij - IoU_ij)^2
    noobj: noobj_weight sum_ij (1 - 1obj_ij) C_ij^2
    cls:   cls_weight   sum_i 1obj_i sum_c (p_i(c) - p^_i(c))^2

  i runs over the S x S cells, j over the B predictors of a cell. 1obj_i: cell i holds an object
  centre (`mask`); 1obj_ij: predictor j is "responsible" for it (`targets["responsible"]`, the
  detector's target assignment, `jaxdet.models.yolo.assign_predictors`); 1noobj_ij is its
  complement, so the non-responsible predictors of an object's cell are pushed to confidence 0
  as well. The rows each term sees: coord the (x, y, sqrt w, sqrt h) codes of every predictor
  against the object's (mask: responsible), obj and noobj the confidences (targets IoU and 0;
  masks responsible and not), cls the C class outputs of every cell (mask: object cells).

  Layout of the last axis of `predictions` (the network's raw, linear outputs), per cell:
  B x (x, y, sqrt w, sqrt h, confidence), then C class probabilities. x, y: the box centre as an
  offset inside the cell, in cell units [0, 1]; sqrt w, sqrt h: square roots of the box width
  and height as fractions of the image width and height. Predicting the square roots (as darknet
  does) makes the size an ordinary squared error with gradients finite at w, h = 0.

  Args:
    predictions: f[N, S, S, 5B + C] raw network outputs (any float dtype; computed in f32).
    targets: {"box": f32[N, S, S, 4] (x, y, w, h) of the cell's object in the units above,
      "labels": int[N, S, S] its class, "responsible": bool[N, S, S, B], "iou": f32[N, S, S, B]
      the obj term's targets (constants)}; values in cells without objects are ignored (NaN
      included: replaced before use, zero gradients).
    mask: bool[N, S, S] True where a cell holds an object centre.
    num_boxes: B, the predictors per cell.
    terms: the system's loss settings (`jaxdet.models.yolo.Loss`): `terms.fn(term)` the
      function and `terms.weight(term)` the weight of each term of YOLO_TERMS.
    decode: (x, y, sqrt w, sqrt h) codes f32[..., 4] -> their boxes (x1, y1, x2, y2) in the
      cell's frame (`jaxdet.models.yolo.predictor_boxes`), for the coord term.
  Returns:
    loss: f32[], the weighted sum of the terms.
    metrics: {"loss/coord", "loss/obj", "loss/noobj", "loss/cls"} the weighted terms (they add
      up to the loss), "yolo/iou" the mean IoU of the responsible predictors, "yolo/objects"
      the mean number of object cells per image.
  """
  checks.check_array("predictions", predictions, ndim=4, dtype_kind="f")
  n, s = predictions.shape[:2]
  checks.check_array("predictions", predictions, shape=(None, s, s, None))  # square S x S
  if not isinstance(num_boxes, int) or num_boxes < 1:
    raise ValueError(f"num_boxes: expected a positive int, got {num_boxes!r}")
  keys = {"box", "labels", "responsible", "iou"}
  if not isinstance(targets, dict) or not keys <= set(targets):
    raise ValueError(f"targets: expected a dict with {sorted(keys)}, got {targets!r}"[:200])
  b = num_boxes
  checks.check_array("targets['box']", targets["box"], dtype_kind="f", shape=(n, s, s, 4))
  checks.check_array("targets['labels']", targets["labels"], dtype_kind="iu", shape=(n, s, s))
  checks.check_array("targets['responsible']", targets["responsible"], dtype_kind="b",
                     shape=(n, s, s, b))
  checks.check_array("targets['iou']", targets["iou"], dtype_kind="f", shape=(n, s, s, b))
  if predictions.shape[-1] <= 5 * b:
    raise ValueError(f"predictions: expected last dimension 5B + C > {5 * b} for B={b}, got "
                     f"shape {tuple(predictions.shape)}")
  c = predictions.shape[-1] - 5 * b
  checks.check_mask("mask", mask, "predictions[..., 0]", (n, s, s))

  p = predictions.astype(jnp.float32)
  pb = p[..., :5 * b].reshape(n, s, s, b, 5)                            # [N, S, S, B, 5]
  obj = mask                                                            # [N, S, S]
  resp = targets["responsible"] & obj[..., None]                        # [N, S, S, B]
  t_box = _sanitize(targets["box"].astype(jnp.float32), obj[..., None])  # [N, S, S, 4]
  t_codes = jnp.concatenate([t_box[..., :2], _safe_sqrt(t_box[..., 2:])], -1)
  t_codes = jnp.broadcast_to(t_codes[..., None, :], pb[..., :4].shape)  # [N, S, S, B, 4]
  iou = jax.lax.stop_gradient(_sanitize(targets["iou"].astype(jnp.float32), resp))
  labels = jnp.where(obj, targets["labels"], 0).astype(jnp.int32)       # [N, S, S]
  conf = pb[..., 4].reshape(-1)                                         # [N*S*S*B]
  rows = resp.reshape(-1)                                               # [N*S*S*B]
  per_element = {
      "coord": terms.fn("coord")(pb[..., :4].reshape(-1, 4), t_codes.reshape(-1, 4), rows,
                                 decode=decode),
      "obj": terms.fn("obj")(conf, iou.reshape(-1), rows),
      "noobj": terms.fn("noobj")(conf, jnp.zeros_like(conf), ~rows),
      "cls": terms.fn("cls")(p[..., 5 * b:].reshape(-1, c), labels.reshape(-1), obj.reshape(-1)),
  }
  metrics = {}
  for term in YOLO_TERMS:   # per-image sums, batch mean (a fixed count: global as it is)
    per_image = jnp.sum(per_element[term].astype(jnp.float32).reshape(n, -1), axis=1)
    metrics[f"loss/{term}"] = terms.weight(term) * jnp.mean(per_image)
  loss = sum(metrics[f"loss/{term}"] for term in YOLO_TERMS)
  metrics["yolo/iou"] = masked_mean(iou, resp)
  metrics["yolo/objects"] = jnp.mean(jnp.sum(obj, axis=(1, 2)).astype(jnp.float32))
  return loss, metrics


# ---------------------------------------------------------------------------------------------
# Classification (pretraining on object crops) and localization as regression


def classification_loss(logits: Array, labels: Array, mask: Array, *, terms,
                        system: str = "classify") -> tuple[Array, dict[str, Array]]:
  """The `cls` term of a classifier, averaged over the real examples of the global batch.

  Args:
    logits: f[N, K] class scores; labels: int[N] in [0, K) where the mask is True;
    mask: bool[N] True = a real example (object crop, slot).
    terms: the system's loss settings: `terms.fn("cls")` a "class" term (default
      `softmax_cross_entropy`), `terms.weight("cls")` its weight.
    system: the prefix of the diagnostic metric.
  Returns:
    loss f32[]; metrics {"loss/cls" (the weighted term = the loss), "<system>/accuracy" (argmax
    = label, over real examples)}.
  """
  checks.check_array("logits", logits, ndim=2, dtype_kind="f")
  checks.check_array("labels", labels, dtype_kind="iu", shape=logits.shape[:1])
  checks.check_mask("mask", mask, "labels", labels.shape)
  labels = jnp.where(mask, labels, 0).astype(jnp.int32)
  per_example = terms.fn("cls")(logits.astype(jnp.float32), labels, mask)     # [N]
  cls = terms.weight("cls") * global_batch.masked_mean(per_example, mask)
  correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
  return cls, {"loss/cls": cls, f"{system}/accuracy": masked_mean(correct, mask)}


def localization_loss(logits: Array, coords: Array, targets: dict[str, Array], *, terms,
                      decode: Callable[[Array], Array]) -> tuple[Array, dict[str, Array]]:
  """Localization as regression: a `cls` term on each slot's class and a `box` term on the
  coordinates of its true class (or the shared ones), each averaged over the real slots of the
  global batch and weighted; the loss is their sum. Defaults (`localization.Loss()`): softmax
  cross-entropy and L2 (the squared error summed over the coordinates) with weights 1 and 10.

  Args:
    logits: f32[B, K, C] class scores of K slots; coords: f32[B, K, G, D] coordinate codes
      (G = C per class or 1 shared; D = 4 a box, 2 a point).
    targets: `localization.slot_targets` batched: coords f32[B, K, D], labels int[B, K],
      mask bool[B, K] (slots without an object are ignored, NaN included).
    terms: the system's loss settings (`jaxdet.models.localization.Loss`): `terms.fn(term)`
      and `terms.weight(term)` for "cls" (a "class" term) and "box" (a "box" term, given the
      codes f32[B * K, D]).
    decode: codes f32[B * K, D] (slot-major rows) -> boxes f32[B * K, 4] (x1, y1, x2, y2)
      pixels, for box terms on boxes (GIoU).
  Returns:
    loss f32[]; metrics {"loss/cls", "loss/box" (weighted; they add up to the loss),
    "localization/accuracy"}.
  """
  checks.check_array("logits", logits, ndim=3, dtype_kind="f")
  checks.check_array("coords", coords, ndim=4, dtype_kind="f")
  b, k, c = logits.shape
  d = coords.shape[-1]
  mask = targets["mask"]
  checks.check_mask("targets['mask']", mask, "logits[..., 0]", (b, k))
  checks.check_array("targets['coords']", targets["coords"], dtype_kind="f", shape=(b, k, d))
  labels = jnp.where(mask, targets["labels"], 0).astype(jnp.int32)          # [B, K]
  cls, metrics = classification_loss(logits.reshape(b * k, c), labels.reshape(-1),
                                     mask.reshape(-1), terms=terms, system="localization")
  group = labels if coords.shape[2] > 1 else jnp.zeros_like(labels)
  pred = jnp.take_along_axis(coords, group[..., None, None], axis=2)[:, :, 0]   # [B, K, D]
  per_slot = terms.fn("box")(pred.reshape(-1, d).astype(jnp.float32),
                             targets["coords"].reshape(-1, d).astype(jnp.float32),
                             mask.reshape(-1), decode=decode)                    # [B * K]
  box = terms.weight("box") * global_batch.masked_mean(per_slot.reshape(b, k), mask)
  metrics["loss/box"] = box
  return cls + box, metrics


# ---------------------------------------------------------------------------------------------
# Fast R-CNN
#
# Its two terms are "class" and "box" terms (see "Loss terms"), chosen by the system from
# `config.model.loss.cls` / `.box`. Box codes are the normalised (dx, dy, dw, dh) of
# `jaxdet.ops.box_coder` relative to the RoIs (means 0, stds as given); the box term's `decode`
# maps them to boxes about the RoIs with that coder, so a loss on boxes (GIoU) needs nothing
# else.


def fast_rcnn_loss(cls_logits: Array, box_deltas: Array, labels: Array, box_targets: Array,
                   mask: Array, *, rois: Array, stds=(0.1, 0.1, 0.2, 0.2),
                   cls_term: Callable = softmax_cross_entropy, cls_weight: float = 1.0,
                   box_term: Callable = box_smooth_l1, box_weight: float = 1.0
                   ) -> tuple[Array, dict[str, Array]]:
  """Fast R-CNN's multi-task loss (Girshick 2015, eq. 1) over a minibatch of sampled RoIs.

    L = mean_r [ w_cls L_cls(p_r, u_r) + w_box [u_r >= 1] L_loc(t_r^{u_r}, v_r) ]

  over the R' valid RoIs r (mask True): u_r the true class (0 = background), p_r the C + 1
  class scores, t_r^u the predicted deltas of class u, v_r the regression target; L_cls the
  class term (softmax cross-entropy by default), L_loc the box term (smooth L1 by default).
  As in the paper's Caffe code (and torchvision's fastrcnn_loss), the box term sums over the
  foreground RoIs and divides by all R' RoIs; R' is the global count (jaxdet.global_batch).

  Args:
    cls_logits: f[R, C + 1] class scores, column 0 = background.
    box_deltas: f[R, C, 4] class-specific deltas for the C object classes (no background).
    labels: int[R] in [0, C] (0 = background, c + 1 = object class c); anything where masked.
      Precondition, not checked here (no host sync): an out-of-range label where the mask is
      True is clamped silently. Data entry checks labels; on the device opt in with
      `check_labels(labels, C + 1, mask)` under checkify (`checked`, see the module doc).
    box_targets: f32[R, 4] normalised deltas of each RoI's matched ground truth (used where
      labels >= 1).
    mask: bool[R] True = a sampled RoI (False = padding of the fixed-size minibatch).
    rois: f32[R, 4] (x1, y1, x2, y2) pixels, the RoIs (the box term's `decode` is about them).
    stds: the (x, y, w, h) normalisation of the deltas.
    cls_term: a "class" term (`TERMS["class"]`, or a user function of that signature).
    cls_weight: its weight.
    box_term: a "box" term (`TERMS["box"]`, or a user function of that signature).
    box_weight: lambda.
  Returns:
    loss f32[]; metrics {"loss/cls", "loss/box" (weighted; they add up to the loss),
    "fast_rcnn/accuracy" (over valid RoIs), "fast_rcnn/fg_fraction", "fast_rcnn/num_rois"}.
  """
  from jaxdet.ops import box_coder
  checks.check_array("cls_logits", cls_logits, ndim=2, dtype_kind="f")
  r, c1 = cls_logits.shape
  if c1 < 2:
    raise ValueError(f"cls_logits: expected C + 1 >= 2 columns (background first), got "
                     f"{tuple(cls_logits.shape)}")
  checks.check_array("box_deltas", box_deltas, dtype_kind="f", shape=(r, c1 - 1, 4))
  checks.check_array("labels", labels, dtype_kind="iu", shape=(r,))
  checks.check_array("box_targets", box_targets, dtype_kind="f", shape=(r, 4))
  checks.check_mask("mask", mask, "labels", (r,))
  checks.check_boxes("rois", rois)
  checks.check_same_size("labels", labels, "rois", rois)
  checks.check_positive("cls_weight", cls_weight, allow_zero=True)
  checks.check_positive("box_weight", box_weight, allow_zero=True)

  labels = labels.astype(jnp.int32)
  fg = mask & (labels >= 1)                                                 # [R]
  count = global_batch.normaliser(jnp.sum(mask))   # global over the data axis
  cls = jnp.sum(jnp.where(mask, cls_term(cls_logits.astype(jnp.float32), labels, mask),
                          0.0)) / count
  cls_index = jnp.clip(labels - 1, 0, c1 - 2)                               # [R]
  pred = jnp.take_along_axis(box_deltas.astype(jnp.float32),
                             cls_index[:, None, None], axis=1)[:, 0]        # [R, 4]
  # Rows outside the foreground may hold anything (NaN predictions or targets, empty RoIs):
  # replace them by harmless values so that no NaN reaches a gradient through the box term,
  # whichever (user) term it is (double `where`).
  pred = jnp.where(fg[:, None], pred, 0.0)
  safe_targets = jnp.where(fg[:, None], box_targets.astype(jnp.float32), 0.0)
  safe_rois = jnp.where(fg[:, None], rois.astype(jnp.float32),
                        jnp.asarray([0.0, 0.0, 1.0, 1.0], jnp.float32))
  decode = lambda d: box_coder.decode_boxes(d, safe_rois, stds=tuple(stds))  # noqa: E731
  box = box_term(pred, safe_targets, fg, decode=decode)                     # [R]
  box = jnp.sum(jnp.where(fg, box, 0.0)) / count
  correct = jnp.argmax(cls_logits, axis=-1) == labels
  metrics = {
      "loss/cls": cls_weight * cls,
      "loss/box": box_weight * box,
      "fast_rcnn/accuracy": masked_mean(correct.astype(jnp.float32), mask),
      "fast_rcnn/fg_fraction": jnp.sum(fg) / count,
      "fast_rcnn/num_rois": jnp.sum(mask).astype(jnp.float32),
  }
  return metrics["loss/cls"] + metrics["loss/box"], metrics


# ---------------------------------------------------------------------------------------------
# Faster R-CNN's Region Proposal Network


def rpn_loss(logits: Array, deltas: Array, targets: dict[str, Array], mask: Array, *,
             anchors: Array, weights=(1.0, 1.0, 1.0, 1.0),
             objectness_term: Callable = sigmoid_binary_cross_entropy,
             objectness_weight: float = 1.0, box_term: Callable = box_smooth_l1_rpn,
             box_weight: float = 1.0) -> tuple[Array, dict[str, Array]]:
  """The RPN loss (Ren et al. 2015, eq. 1): objectness term + lambda * box term.

    L = w_obj 1/N_cls sum_i L_cls(p_i, p*_i) + lambda 1/N_cls sum_i p*_i L_reg(t_i, t*_i)

  over the sampled anchors i of the whole batch, N_cls their (global) number. L_cls is a
  "binary" term of one logit per anchor (sigmoid binary cross-entropy by default); L_reg a
  "box" term on the positives (smooth L1 with beta 1/9 by default: py-faster-rcnn's sigma = 3),
  its `decode` giving boxes about the anchors. Normalising both terms by N_cls (as
  py-faster-rcnn and torchvision do) and lambda = 1 matches the paper's N_reg ~ 2400 locations
  with lambda = 10.

  Args:
    logits: f[B, N] objectness logits.
    deltas: f[B, N, 4] predicted box deltas.
    targets: {"objectness": f32[B, N] 1 positive / 0 negative, "box": f32[B, N, 4] target
      deltas (read at positives only)}.
    mask: bool[B, N], the sampled anchors (positives and negatives).
    anchors: f32[N, 4] (x1, y1, x2, y2) pixels, shared by the images.
    weights: the box coder weights of the deltas.
    objectness_term: a "binary" term; objectness_weight its weight.
    box_term: a "box" term; box_weight lambda.
  Returns:
    loss f32[]; metrics {"loss/rpn_objectness", "loss/rpn_box"} (the weighted terms, adding up
    to the loss), "rpn/accuracy" over the sampled anchors, "rpn/positives" per image.
  """
  from jaxdet.ops import box_coder
  checks.check_array("logits", logits, ndim=2, dtype_kind="f")
  checks.check_array("deltas", deltas, dtype_kind="f", shape=logits.shape + (4,))
  if not isinstance(targets, dict) or not {"objectness", "box"} <= set(targets):
    raise ValueError(f"targets: expected a dict with 'objectness' and 'box', "
                     f"got {targets!r}"[:200])
  checks.check_array("targets['objectness']", targets["objectness"], dtype_kind="fb",
                     shape=logits.shape)
  checks.check_array("targets['box']", targets["box"], dtype_kind="f", shape=deltas.shape)
  checks.check_mask("mask", mask, "logits", logits.shape)
  checks.check_boxes("anchors", anchors)
  checks.check_same_size("logits", logits, "anchors", anchors, axis_a=1)
  checks.check_positive("objectness_weight", objectness_weight, allow_zero=True)
  checks.check_positive("box_weight", box_weight, allow_zero=True)
  b, n = logits.shape
  # Unsampled entries may hold anything (NaN included): zeroed before use, so that their
  # gradients are 0, not 0 * NaN.
  obj = jnp.where(mask, targets["objectness"].astype(jnp.float32), 0.0)   # [B, N]
  positive = mask & (obj > 0.5)                                           # [B, N]
  box = jnp.where(positive[..., None], targets["box"].astype(jnp.float32), 0.0)
  count = global_batch.normaliser(jnp.sum(mask))   # global over the data axis
  flat_anchors = jnp.broadcast_to(anchors.astype(jnp.float32), (b, n, 4)).reshape(b * n, 4)
  decode = lambda d: box_coder.decode_boxes(d, flat_anchors,  # noqa: E731
                                            weights=tuple(weights))
  cls = objectness_term(logits.astype(jnp.float32).reshape(b * n), obj.reshape(b * n),
                        mask.reshape(b * n))
  cls = jnp.sum(jnp.where(mask.reshape(b * n), cls, 0.0)) / count
  reg = box_term(deltas.astype(jnp.float32).reshape(b * n, 4), box.reshape(b * n, 4),
                 positive.reshape(b * n), decode=decode)
  reg = jnp.sum(jnp.where(positive.reshape(b * n), reg, 0.0)) / count
  correct = (logits.astype(jnp.float32) > 0.0) == positive
  metrics = {"loss/rpn_objectness": objectness_weight * cls, "loss/rpn_box": box_weight * reg,
             "rpn/accuracy": masked_mean(correct.astype(jnp.float32), mask),
             "rpn/positives": jnp.mean(jnp.sum(positive, axis=1).astype(jnp.float32))}
  return metrics["loss/rpn_objectness"] + metrics["loss/rpn_box"], metrics
