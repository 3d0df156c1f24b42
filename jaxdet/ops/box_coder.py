"""Box regression targets: boxes <-> deltas relative to anchors (R-CNN, Fast/Faster R-CNN).

For a box g and an anchor (or proposal) a, with centres x1 + w/2 (continuous, no +1):

  dx = (gx - ax) / aw,  dy = (gy - ay) / ah,  dw = log(gw / aw),  dh = log(gh / ah)

then one of two equivalent normalisations:

* `weights=(wx, wy, ww, wh)` (torchvision's BoxCoder): deltas are multiplied by the weights,
  e.g. (1, 1, 1, 1) for the RPN and (10, 10, 5, 5) for the Fast R-CNN head;
* `means`, `stds` (py-faster-rcnn's BBOX_NORMALIZE_TARGETS): deltas become (d - means) / stds,
  e.g. stds (0.1, 0.1, 0.2, 0.2), which equals weights (10, 10, 5, 5).

Widths and heights are floored at `MIN_SIZE` pixels before the division and log, so degenerate
anchors or boxes (zero area, x2 < x1) give finite values and gradients.
"""

from __future__ import annotations

import math
import numbers
from typing import Sequence

import jax
import jax.numpy as jnp

from jaxdet import checks

MIN_SIZE = 1e-6   # pixels; the floor of widths and heights in encode and decode
DEFAULT_CLAMP = math.log(1000.0 / 16)   # torchvision's bbox_xform_clip

_ANY_RANK = range(1, 8)
_ZEROS = (0.0, 0.0, 0.0, 0.0)
_ONES = (1.0, 1.0, 1.0, 1.0)


def _normalisation(weights: Sequence[float] | None, means: Sequence[float],
                   stds: Sequence[float]) -> tuple[jax.Array, jax.Array]:
  """Returns (shift f32[4], scale f32[4]) such that normalised = (d - shift) * scale."""
  for name, value in (("weights", weights), ("means", means), ("stds", stds)):
    if value is None:
      continue
    if (not isinstance(value, (tuple, list)) or len(value) != 4
        or not all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in value)):
      raise ValueError(f"{name}: expected a tuple of 4 numbers (x, y, w, h), got {value!r}")
  checks.check_positive("stds", tuple(stds))
  if weights is not None:
    checks.check_positive("weights", tuple(weights))
    if tuple(means) != _ZEROS or tuple(stds) != _ONES:
      raise ValueError(f"weights: give either weights or means/stds, not both; got weights "
                       f"{weights!r}, means {means!r}, stds {stds!r}")
    return jnp.zeros(4, jnp.float32), jnp.asarray(weights, jnp.float32)
  return jnp.asarray(means, jnp.float32), 1.0 / jnp.asarray(stds, jnp.float32)


def _centre_size(boxes: jax.Array) -> tuple[jax.Array, jax.Array]:
  """boxes f32[..., 4] -> (centres f32[..., 2], sizes f32[..., 2] floored at MIN_SIZE)."""
  size = boxes[..., 2:] - boxes[..., :2]                     # [..., 2]
  centre = boxes[..., :2] + 0.5 * size                       # [..., 2]
  return centre, jnp.maximum(size, MIN_SIZE)


def encode_boxes(boxes: jax.Array, anchors: jax.Array, *,
                 weights: Sequence[float] | None = None,
                 means: Sequence[float] = _ZEROS,
                 stds: Sequence[float] = _ONES) -> jax.Array:
  """Regression targets of `boxes` relative to `anchors`.

  Args:
    boxes: f32[..., 4] (x1, y1, x2, y2) pixels, the targets (e.g. matched ground truth).
    anchors: f32[..., 4] (x1, y1, x2, y2) pixels, the same shape (or broadcastable).
    weights: (wx, wy, ww, wh) multipliers (torchvision), or None.
    means, stds: (x, y, w, h) normalisation (d - means) / stds (py-faster-rcnn); give either
      these or `weights`.
  Returns:
    f32[..., 4] deltas (dx, dy, dw, dh), normalised.
  """
  checks.check_boxes("boxes", boxes, ndim=_ANY_RANK)
  checks.check_boxes("anchors", anchors, ndim=_ANY_RANK)
  shift, scale = _normalisation(weights, means, stds)
  g_c, g_s = _centre_size(jnp.asarray(boxes, jnp.float32))
  a_c, a_s = _centre_size(jnp.asarray(anchors, jnp.float32))
  deltas = jnp.concatenate([(g_c - a_c) / a_s, jnp.log(g_s / a_s)], axis=-1)   # [..., 4]
  return (deltas - shift) * scale


def decode_boxes(deltas: jax.Array, anchors: jax.Array, *,
                 weights: Sequence[float] | None = None,
                 means: Sequence[float] = _ZEROS,
                 stds: Sequence[float] = _ONES,
                 clamp: float | None = DEFAULT_CLAMP) -> jax.Array:
  """Boxes from regression deltas relative to `anchors`; the inverse of `encode_boxes`.

  Args:
    deltas: f32[..., 4] (dx, dy, dw, dh), normalised as `encode_boxes` made them.
    anchors: f32[..., 4] (x1, y1, x2, y2) pixels, the same shape (or broadcastable).
    weights, means, stds: the normalisation used in `encode_boxes`.
    clamp: dw and dh (after undoing the normalisation) are clamped from above at this value
      before exp, so a box grows at most exp(clamp) times its anchor; None for no clamp.
  Returns:
    f32[..., 4] (x1, y1, x2, y2) pixels (not clipped to the image).
  """
  checks.check_boxes("deltas", deltas, ndim=_ANY_RANK)
  checks.check_boxes("anchors", anchors, ndim=_ANY_RANK)
  shift, scale = _normalisation(weights, means, stds)
  d = jnp.asarray(deltas, jnp.float32) / scale + shift     # [..., 4]
  a_c, a_s = _centre_size(jnp.asarray(anchors, jnp.float32))
  dwh = d[..., 2:] if clamp is None else jnp.minimum(d[..., 2:], clamp)
  centre = a_c + d[..., :2] * a_s                          # [..., 2]
  size = jnp.exp(dwh) * a_s                                # [..., 2]
  return jnp.concatenate([centre - 0.5 * size, centre + 0.5 * size], axis=-1)
