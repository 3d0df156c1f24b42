"""Box geometry: conversions, area, clipping, IoU. Boxes are f32[..., 4] (x1, y1, x2, y2) pixels."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxdet import checks


def box_area(boxes: jax.Array) -> jax.Array:
  """Area of boxes f32[..., 4] -> f32[...]; boxes with x2 < x1 or y2 < y1 have area 0."""
  checks.check_boxes("boxes", boxes, ndim=range(1, 8))
  w = jnp.maximum(boxes[..., 2] - boxes[..., 0], 0.0)
  h = jnp.maximum(boxes[..., 3] - boxes[..., 1], 0.0)
  return w * h


def box_iou(a: jax.Array, b: jax.Array) -> jax.Array:
  """Pairwise intersection over union.

  Args:
    a: f32[N, 4] (x1, y1, x2, y2) pixels.
    b: f32[M, 4] (x1, y1, x2, y2) pixels.
  Returns:
    f32[N, M] in [0, 1]; 0 where the union is empty (degenerate boxes), with finite gradients.
  """
  checks.check_boxes("a", a)
  checks.check_boxes("b", b)
  a = a.astype(jnp.float32)
  b = b.astype(jnp.float32)
  lt = jnp.maximum(a[:, None, :2], b[None, :, :2])          # [N, M, 2]
  rb = jnp.minimum(a[:, None, 2:], b[None, :, 2:])          # [N, M, 2]
  wh = jnp.maximum(rb - lt, 0.0)                            # [N, M, 2]
  inter = wh[..., 0] * wh[..., 1]                           # [N, M]
  union = box_area(a)[:, None] + box_area(b)[None, :] - inter
  ok = union > 0.0
  return jnp.where(ok, inter / jnp.where(ok, union, 1.0), 0.0)
