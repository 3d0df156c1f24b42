"""Anchors (Faster R-CNN's reference boxes): a base set per location, tiled over a feature map.

Order conventions, which the RPN head relies on:

* `base_anchors(scales, ratios)` is ratio-major, scale-minor, as py-faster-rcnn's
  generate_anchors: anchor `a = i_ratio * len(scales) + i_scale`.
* `grid_anchors(base, (fh, fw), stride)` is flattened in (y, x, a) row-major order: anchor
  `(y * fw + x) * A + a` sits at feature cell (y, x) with base anchor a. A conv output of shape
  [fh, fw, A * k] (NHWC, one image) reshaped to [fh, fw, A, k] and then to [fh * fw * A, k]
  lines up with it row for row.
"""

from __future__ import annotations

import numbers
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxdet import checks


def base_anchors(scales: Sequence[float], ratios: Sequence[float]) -> jax.Array:
  """Anchors of every (ratio, scale) pair, centred at (0, 0).

  Args:
    scales: side lengths in pixels, e.g. (128, 256, 512); an anchor's area is scale**2.
    ratios: aspect ratios h / w, e.g. (0.5, 1, 2).
  Returns:
    f32[A, 4] (x1, y1, x2, y2) with A = len(ratios) * len(scales), ratio-major: w = s / sqrt(r),
    h = s * sqrt(r), box (-w/2, -h/2, w/2, h/2).
  """
  scales, ratios = tuple(scales), tuple(ratios)
  if not scales or not ratios:
    raise ValueError(f"scales, ratios: expected non-empty tuples, got scales {scales!r}, "
                     f"ratios {ratios!r}")
  checks.check_positive("scales", scales)
  checks.check_positive("ratios", ratios)
  r = np.asarray(ratios, np.float64)[:, None]              # [R, 1]
  s = np.asarray(scales, np.float64)[None, :]              # [1, S]
  half_w = (s / np.sqrt(r) / 2).reshape(-1)                # [R * S]
  half_h = (s * np.sqrt(r) / 2).reshape(-1)                # [R * S]
  return jnp.asarray(np.stack([-half_w, -half_h, half_w, half_h], axis=-1), jnp.float32)


def _pair(name: str, value: Any) -> tuple[Any, Any]:
  if isinstance(value, (tuple, list)):
    if len(value) != 2:
      raise ValueError(f"{name}: expected a number or a pair (y, x), got {value!r}")
    return tuple(value)
  return value, value


def grid_anchors(base: jax.Array, feature_size: tuple[int, int],
                 stride: float | tuple[float, float]) -> jax.Array:
  """Tiles base anchors over a feature map.

  Args:
    base: f32[A, 4] anchors centred at (0, 0) (see `base_anchors`).
    feature_size: (fh, fw), the feature map's height and width (static ints).
    stride: pixels per feature cell, a number or (stride_y, stride_x).
  Returns:
    f32[fh * fw * A, 4] (x1, y1, x2, y2) pixels, centred at ((x + 0.5) * stride_x,
    (y + 0.5) * stride_y), flattened in (y, x, a) row-major order (see the module docstring).
  """
  checks.check_boxes("base", base)
  fh, fw = _pair("feature_size", feature_size)
  for v in (fh, fw):
    if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 0:
      raise ValueError(f"feature_size: expected a pair of ints >= 0 (fh, fw), "
                       f"got {feature_size!r}")
  sy, sx = _pair("stride", stride)
  checks.check_positive("stride", (sy, sx))
  cy = (jnp.arange(fh, dtype=jnp.float32) + 0.5) * sy       # [fh]
  cx = (jnp.arange(fw, dtype=jnp.float32) + 0.5) * sx       # [fw]
  cy, cx = jnp.meshgrid(cy, cx, indexing="ij")              # [fh, fw] each
  shifts = jnp.stack([cx, cy, cx, cy], axis=-1)             # [fh, fw, 4]
  anchors = shifts[:, :, None, :] + jnp.asarray(base, jnp.float32)[None, None]  # [fh, fw, A, 4]
  return anchors.reshape(-1, 4)


def anchors_inside_mask(anchors: jax.Array, height: Any, width: Any,
                        allowed_border: float = 0) -> jax.Array:
  """True for anchors lying inside the image, up to `allowed_border` pixels beyond each side.

  Faster R-CNN ignores the anchors that cross the image border while training the RPN.

  Args:
    anchors: f32[N, 4] (x1, y1, x2, y2) pixels.
    height, width: the image size in pixels (Python numbers or traced scalars).
    allowed_border: pixels an anchor may extend beyond the image (>= 0).
  Returns:
    bool[N]: x1 >= -border, y1 >= -border, x2 <= width + border, y2 <= height + border.
  """
  checks.check_boxes("anchors", anchors)
  if not isinstance(allowed_border, numbers.Real):
    raise TypeError(f"allowed_border: expected a number, got {allowed_border!r}")
  checks.check_positive("allowed_border", allowed_border, allow_zero=True)
  a = jnp.asarray(anchors, jnp.float32)
  b = float(allowed_border)
  return ((a[:, 0] >= -b) & (a[:, 1] >= -b) & (a[:, 2] <= width + b)
          & (a[:, 3] <= height + b))
