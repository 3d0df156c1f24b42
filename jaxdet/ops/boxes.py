"""Box geometry: conversions, area, clipping, IoU and GIoU.

Boxes are f32[..., 4] (x1, y1, x2, y2) in absolute pixels, continuous coordinates, no +1: a box's
width is x2 - x1. Every function works on one image (vmap for a batch), computes in float32 and
has finite gradients for degenerate boxes (zero area, x2 < x1): divisions use the double-`where`
pattern, and a box with x2 < x1 or y2 < y1 has area 0.

Non-finite boxes (any coordinate NaN or +-inf) overlap nothing: their IoU and GIoU with every
box are 0, explicitly (`finite_box_mask`), and their coordinates are replaced before the
arithmetic, so they pass no NaN into the gradients of the boxes they are paired with. IoU 0
is not "valid": an op that selects or matches boxes (NMS, matching, merging) must also treat a
non-finite box as invalid, never as a pick or a match.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxdet import checks

_ANY_RANK = range(1, 8)


def _f32(boxes: jax.Array) -> jax.Array:
  return jnp.asarray(boxes).astype(jnp.float32)


def _safe_div(num: jax.Array, den: jax.Array) -> jax.Array:
  """num / den where den > 0, else 0; finite gradients either way (double `where`)."""
  ok = den > 0.0
  return jnp.where(ok, num / jnp.where(ok, den, 1.0), 0.0)


# --- format conversions -------------------------------------------------------------------------

def xyxy_to_xywh(boxes: jax.Array) -> jax.Array:
  """(x1, y1, x2, y2) -> (x1, y1, w, h) (COCO's format); boxes f32[..., 4] -> f32[..., 4]."""
  checks.check_boxes("boxes", boxes, ndim=_ANY_RANK)
  b = _f32(boxes)
  return jnp.concatenate([b[..., :2], b[..., 2:] - b[..., :2]], axis=-1)


def xywh_to_xyxy(boxes: jax.Array) -> jax.Array:
  """(x1, y1, w, h) -> (x1, y1, x2, y2); boxes f32[..., 4] -> f32[..., 4]."""
  checks.check_boxes("boxes", boxes, ndim=_ANY_RANK)
  b = _f32(boxes)
  return jnp.concatenate([b[..., :2], b[..., :2] + b[..., 2:]], axis=-1)


def xyxy_to_cxcywh(boxes: jax.Array) -> jax.Array:
  """(x1, y1, x2, y2) -> (centre x, centre y, w, h); boxes f32[..., 4] -> f32[..., 4]."""
  checks.check_boxes("boxes", boxes, ndim=_ANY_RANK)
  b = _f32(boxes)
  wh = b[..., 2:] - b[..., :2]
  return jnp.concatenate([b[..., :2] + 0.5 * wh, wh], axis=-1)


def cxcywh_to_xyxy(boxes: jax.Array) -> jax.Array:
  """(centre x, centre y, w, h) -> (x1, y1, x2, y2); boxes f32[..., 4] -> f32[..., 4]."""
  checks.check_boxes("boxes", boxes, ndim=_ANY_RANK)
  b = _f32(boxes)
  half = 0.5 * b[..., 2:]
  return jnp.concatenate([b[..., :2] - half, b[..., :2] + half], axis=-1)


def yxyx_normalized_to_xyxy(boxes: jax.Array, height: Any, width: Any) -> jax.Array:
  """tfds's (ymin, xmin, ymax, xmax) in [0, 1] -> (x1, y1, x2, y2) pixels of an image.

  Args:
    boxes: f32[..., 4] (ymin, xmin, ymax, xmax), fractions of the image height and width.
    height, width: the image size in pixels (Python numbers or traced scalars).
  Returns:
    f32[..., 4] (x1, y1, x2, y2) pixels.
  """
  checks.check_boxes("boxes", boxes, ndim=_ANY_RANK)
  b = _f32(boxes)
  scale = jnp.stack([jnp.asarray(width, jnp.float32), jnp.asarray(height, jnp.float32)] * 2)
  return b[..., jnp.array([1, 0, 3, 2])] * scale


def xyxy_to_yxyx_normalized(boxes: jax.Array, height: Any, width: Any) -> jax.Array:
  """(x1, y1, x2, y2) pixels -> tfds's (ymin, xmin, ymax, xmax) fractions of the image size.

  Args:
    boxes: f32[..., 4] (x1, y1, x2, y2) pixels.
    height, width: the image size in pixels (Python numbers or traced scalars), > 0.
  Returns:
    f32[..., 4] (ymin, xmin, ymax, xmax) in [0, 1] for boxes inside the image.
  """
  checks.check_boxes("boxes", boxes, ndim=_ANY_RANK)
  b = _f32(boxes)
  scale = jnp.stack([jnp.asarray(height, jnp.float32), jnp.asarray(width, jnp.float32)] * 2)
  return b[..., jnp.array([1, 0, 3, 2])] / scale


# --- clipping and filtering ---------------------------------------------------------------------

def clip_boxes(boxes: jax.Array, height: Any, width: Any) -> jax.Array:
  """Clips boxes to the image: x into [0, width], y into [0, height].

  Args:
    boxes: f32[..., 4] (x1, y1, x2, y2) pixels.
    height, width: the image size in pixels (Python numbers or traced scalars).
  Returns:
    f32[..., 4] clipped boxes (a box wholly outside becomes a zero-area box on the border).
  """
  checks.check_boxes("boxes", boxes, ndim=_ANY_RANK)
  b = _f32(boxes)
  hi = jnp.stack([jnp.asarray(width, jnp.float32), jnp.asarray(height, jnp.float32)] * 2)
  return jnp.clip(b, 0.0, hi)


def small_box_mask(boxes: jax.Array, min_size: Any) -> jax.Array:
  """The boxes to keep: True where width >= min_size and height >= min_size.

  Args:
    boxes: f32[..., 4] (x1, y1, x2, y2) pixels.
    min_size: the smallest side length kept, pixels (a number or a traced scalar).
  Returns:
    bool[...].
  """
  checks.check_boxes("boxes", boxes, ndim=_ANY_RANK)
  b = _f32(boxes)
  w = b[..., 2] - b[..., 0]
  h = b[..., 3] - b[..., 1]
  return (w >= min_size) & (h >= min_size)


# --- area and overlap ---------------------------------------------------------------------------

def finite_box_mask(boxes: jax.Array) -> jax.Array:
  """True for boxes whose four coordinates are all finite; boxes f32[..., 4] -> bool[...]."""
  checks.check_boxes("boxes", boxes, ndim=_ANY_RANK)
  return jnp.all(jnp.isfinite(jnp.asarray(boxes)), axis=-1)


_SAFE_BOX = (0.0, 0.0, 1.0, 1.0)


def _finite_pair(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Broadcast boxes a, b f32[..., 4] -> (a', b', ok bool[...]): non-finite boxes replaced by
  a harmless box (double `where`: no NaN reaches the arithmetic or its gradient), ok False
  for the pairs where either box is not finite."""
  fa = jnp.all(jnp.isfinite(a), axis=-1)
  fb = jnp.all(jnp.isfinite(b), axis=-1)
  safe = jnp.asarray(_SAFE_BOX, jnp.float32)
  a = jnp.where(fa[..., None], a, safe)
  b = jnp.where(fb[..., None], b, safe)
  return a, b, fa & fb


def box_area(boxes: jax.Array) -> jax.Array:
  """Area of boxes f32[..., 4] -> f32[...]; boxes with x2 < x1 or y2 < y1 have area 0."""
  checks.check_boxes("boxes", boxes, ndim=_ANY_RANK)
  boxes = _f32(boxes)
  w = jnp.maximum(boxes[..., 2] - boxes[..., 0], 0.0)
  h = jnp.maximum(boxes[..., 3] - boxes[..., 1], 0.0)
  return w * h


def _overlap(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Broadcast boxes a, b f32[..., 4] -> (intersection, union, enclosing area), each f32[...]."""
  lt = jnp.maximum(a[..., :2], b[..., :2])                 # [..., 2]
  rb = jnp.minimum(a[..., 2:], b[..., 2:])                 # [..., 2]
  wh = jnp.maximum(rb - lt, 0.0)                           # [..., 2]
  inter = wh[..., 0] * wh[..., 1]                          # [...]
  union = box_area(a) + box_area(b) - inter                # [...]
  enc_lt = jnp.minimum(a[..., :2], b[..., :2])             # [..., 2]
  enc_rb = jnp.maximum(a[..., 2:], b[..., 2:])             # [..., 2]
  enc_wh = jnp.maximum(enc_rb - enc_lt, 0.0)               # [..., 2]
  enclosing = enc_wh[..., 0] * enc_wh[..., 1]              # [...]
  return inter, union, enclosing


def _giou(inter: jax.Array, union: jax.Array, enclosing: jax.Array) -> jax.Array:
  # The enclosing box contains the union, so enclosing >= union and GIoU <= IoU, GIoU >= -1.
  return _safe_div(inter, union) - _safe_div(enclosing - union, enclosing)


def box_iou(a: jax.Array, b: jax.Array) -> jax.Array:
  """Pairwise intersection over union.

  Args:
    a: f32[N, 4] (x1, y1, x2, y2) pixels.
    b: f32[M, 4] (x1, y1, x2, y2) pixels.
  Returns:
    f32[N, M] in [0, 1]; 0 where the union is empty (degenerate boxes) and where either box is
    not finite (see the module doc), with finite gradients.
  """
  checks.check_boxes("a", a)
  checks.check_boxes("b", b)
  a, b, ok = _finite_pair(_f32(a)[:, None, :], _f32(b)[None, :, :])     # ok [N, M]
  inter, union, _ = _overlap(a, b)                                       # [N, M] each
  return jnp.where(ok, _safe_div(inter, union), 0.0)


def generalized_box_iou(a: jax.Array, b: jax.Array) -> jax.Array:
  """Pairwise generalized IoU (Rezatofighi et al. 2019): IoU - |C \\ (A u B)| / |C|.

  C is the smallest box enclosing both.

  Args:
    a: f32[N, 4] (x1, y1, x2, y2) pixels.
    b: f32[M, 4] (x1, y1, x2, y2) pixels.
  Returns:
    f32[N, M] in [-1, 1], <= IoU; a term whose denominator is 0 (degenerate boxes) counts as 0,
    and so does a pair with a non-finite box (GIoU 0), with finite gradients.
  """
  checks.check_boxes("a", a)
  checks.check_boxes("b", b)
  a, b, ok = _finite_pair(_f32(a)[:, None, :], _f32(b)[None, :, :])
  return jnp.where(ok, _giou(*_overlap(a, b)), 0.0)


def _check_pair(a: jax.Array, b: jax.Array) -> None:
  checks.check_boxes("a", a, ndim=_ANY_RANK)
  checks.check_boxes("b", b, ndim=_ANY_RANK)
  try:
    jnp.broadcast_shapes(a.shape, b.shape)
  except ValueError:
    raise ValueError(f"b: expected a shape that broadcasts with a {tuple(a.shape)}, got "
                     f"shape {tuple(b.shape)}") from None


def elementwise_box_iou(a: jax.Array, b: jax.Array) -> jax.Array:
  """IoU of corresponding boxes.

  Args:
    a: f32[..., 4] (x1, y1, x2, y2) pixels.
    b: f32[..., 4], the same shape as `a` (or one that broadcasts with it).
  Returns:
    f32[...] in [0, 1]; 0 where the union is empty or a box is not finite, with finite
    gradients.
  """
  _check_pair(a, b)
  a, b, ok = _finite_pair(_f32(a), _f32(b))
  inter, union, _ = _overlap(a, b)
  return jnp.where(ok, _safe_div(inter, union), 0.0)


def elementwise_generalized_box_iou(a: jax.Array, b: jax.Array) -> jax.Array:
  """Generalized IoU of corresponding boxes (see `generalized_box_iou`).

  Args:
    a: f32[..., 4] (x1, y1, x2, y2) pixels.
    b: f32[..., 4], the same shape as `a` (or one that broadcasts with it).
  Returns:
    f32[...] in [-1, 1], with finite gradients for degenerate boxes; 0 where a box is not
    finite.
  """
  _check_pair(a, b)
  a, b, ok = _finite_pair(_f32(a), _f32(b))
  return jnp.where(ok, _giou(*_overlap(a, b)), 0.0)
