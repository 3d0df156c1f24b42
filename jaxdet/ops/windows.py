"""Sliding windows: window grids, window-relative box coding, crops and OverFeat's box merging.

A network whose fc layers run as convolutions (OverFeat) turns an input of any size into a map of
outputs, one per window of its training input size. Output cell (i, j) of a map computed on an
image resized by (sy, sx) sees the window

    x1 = j * step / sx,  y1 = i * step / sy,  x2 = x1 + window / sx,  y2 = y1 + window / sy

in the original image's pixels (`window_grid`), `step` being the network's output stride (for
AlexNet-style nets conv stride x pool5 stride) and `window` its training input size.

Rectangular windows come from anisotropic resizing: a map computed on an image resized by
(sy, sx) sees windows of window / sx by window / sy pixels, aspect ratio (width / height) sy / sx
(`window_scales` makes the (sy, sx) pairs of given window sizes and aspect ratios).

Boxes regressed inside a window are coded relative to it (`encode_in_window`,
`decode_in_window`): each coordinate as a fraction of the window size from its top-left
corner, so a window's own box is (0, 0, 1, 1).

OverFeat's merging (Sermanet et al. 2014, section 4.3) greedily fuses the two best-matching boxes
of the same class until no pair matches well enough (`merge_boxes`). The paper's
match_score is "the sum of the distance between centers of the two bounding boxes and the
intersection area of the boxes"; we make both terms scale-free and lower-is-better:

    match_score(a, b) = |centre(a) - centre(b)| / mean side  +  (1 - IoU(a, b))

(mean side = the mean of the four side lengths of a and b), and merge while the best score is
<= `threshold`. box_merge averages the coordinates: a merged box is the mean of every box it
absorbed (the support-weighted average of the pair), and its score is the sum of their scores, so
boxes with much support win (the paper's "accumulate the detection confidence").

Every function works on one image (vmap for a batch), in float32, with static shapes.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxdet import checks
from jaxdet.ops.boxes import box_iou


def scale_pair(name: str, value: Any) -> tuple[Any, Any]:
  """A resize factor s or a pair (sy, sx) -> (sy, sx), each checked > 0."""
  values = tuple(value) if isinstance(value, (tuple, list)) else (value, value)
  if len(values) != 2:
    raise ValueError(f"{name}: expected a number or a pair, got {value!r}")
  checks.check_positive(name, values)
  return values


def window_grid(output_size: Sequence[int], step: int, window: int,
                scale: Any = 1.0) -> jax.Array:
  """The image boxes of every cell of a dense output map, row-major.

  Args:
    output_size: (h, w) of the output map (static ints).
    step: pixels between neighbouring windows in the resized image (the network's output stride).
    window: the window side in the resized image (the network's training input size).
    scale: s or (sy, sx), the resize factor of the image the map was computed on (resized size /
      original size); Python numbers.
  Returns:
    f32[h * w, 4] (x1, y1, x2, y2) in original-image pixels; cell (i, j) is row i * w + j.
  """
  h, w = (int(s) for s in output_size)
  if h < 0 or w < 0:
    raise ValueError(f"output_size: expected non-negative sizes, got {output_size!r}")
  checks.check_positive("step", step)
  checks.check_positive("window", window)
  sy, sx = scale_pair("scale", scale)
  ys = jnp.arange(h, dtype=jnp.float32) * (step / sy)
  xs = jnp.arange(w, dtype=jnp.float32) * (step / sx)
  y1 = jnp.broadcast_to(ys[:, None], (h, w)).reshape(-1)
  x1 = jnp.broadcast_to(xs[None, :], (h, w)).reshape(-1)
  return jnp.stack([x1, y1, x1 + window / sx, y1 + window / sy], axis=-1)


def window_scales(sizes: Sequence[float], aspect_ratios: Sequence[float] = (1.0,)
                  ) -> tuple[tuple[float, float], ...]:
  """The (sy, sx) resize factors giving windows of each size and aspect ratio (size-major).

  A window of the network's input side `window`, on an image resized by (sy, sx), is
  window / sx wide and window / sy high in the original image. For size factor s and aspect
  ratio a (width / height): sy = s * sqrt(a), sx = s / sqrt(a), so the window's area is that of
  the square window of scale s and its width / height is a.

  Args:
    sizes: resize factors s > 0 (the square windows' scales).
    aspect_ratios: window width / height, each > 0.
  Returns:
    len(sizes) * len(aspect_ratios) pairs (sy, sx) of Python floats.
  """
  sizes, aspect_ratios = tuple(sizes), tuple(aspect_ratios)
  checks.check_positive("sizes", sizes)
  checks.check_positive("aspect_ratios", aspect_ratios)
  return tuple((float(s * np.sqrt(a)), float(s / np.sqrt(a)))
               for s in sizes for a in aspect_ratios)


def _window_origin_size(windows: jax.Array) -> tuple[jax.Array, jax.Array]:
  w = windows.astype(jnp.float32)
  origin = jnp.concatenate([w[..., :2], w[..., :2]], axis=-1)            # [..., 4]
  size = w[..., 2:] - w[..., :2]
  size = jnp.concatenate([size, size], axis=-1)                          # [..., 4]
  return origin, size


def encode_in_window(boxes: jax.Array, windows: jax.Array) -> jax.Array:
  """Boxes as fractions of their windows: ((x1 - wx1) / ww, (y1 - wy1) / wh, ...).

  Args:
    boxes: f32[..., 4] (x1, y1, x2, y2) pixels.
    windows: f32[..., 4] (broadcastable), each of positive size.
  Returns:
    f32[..., 4]; a window's own box codes as (0, 0, 1, 1). Zero-size windows give 0.
  """
  checks.check_boxes("boxes", boxes, ndim=range(1, 8))
  checks.check_boxes("windows", windows, ndim=range(1, 8))
  origin, size = _window_origin_size(windows)
  ok = size > 0
  return jnp.where(ok, (boxes.astype(jnp.float32) - origin) / jnp.where(ok, size, 1.0), 0.0)


def decode_in_window(codes: jax.Array, windows: jax.Array) -> jax.Array:
  """Inverse of `encode_in_window`: codes f32[..., 4], windows f32[..., 4] -> boxes f32[..., 4]."""
  checks.check_array("codes", codes, last_dim=4, dtype_kind="f")
  checks.check_boxes("windows", windows, ndim=range(1, 8))
  origin, size = _window_origin_size(windows)
  return origin + codes.astype(jnp.float32) * size


def crop_windows(image: jax.Array, windows: jax.Array, size: int) -> jax.Array:
  """Crops and resizes image regions to size x size (bilinear, RoI align with 2x2 samples).

  Args:
    image: [H, W, 3] pixels (any real dtype), one image; H, W > 0.
    windows: f32[N, 4] (x1, y1, x2, y2) pixels; may extend past the image (zeros outside); a
      non-finite window gives zeros.
    size: the output side.
  Returns:
    f32[N, size, size, 3].
  """
  from jaxdet.ops.roi_pool import roi_align
  checks.check_array("image", image, ndim=3, last_dim=3)
  checks.check_spatial_size("image", image, "image")
  checks.check_boxes("windows", windows)
  return roi_align(image.astype(jnp.float32), windows.astype(jnp.float32), size, 1.0,
                   sampling_ratio=2, aligned=True)


# ----------------------------------------------------------------------------- merging


def match_score(a: jax.Array, b: jax.Array) -> jax.Array:
  """OverFeat's pairwise match score (lower = better match), scale-free (see the module doc).

  Args:
    a: f32[N, 4], b: f32[M, 4] (x1, y1, x2, y2) pixels.
  Returns:
    f32[N, M]: |centre distance| / mean side length + (1 - IoU).
  """
  checks.check_boxes("a", a)
  checks.check_boxes("b", b)
  a, b = a.astype(jnp.float32), b.astype(jnp.float32)
  ca = 0.5 * (a[:, :2] + a[:, 2:])                                        # [N, 2]
  cb = 0.5 * (b[:, :2] + b[:, 2:])                                        # [M, 2]
  d2 = jnp.sum(jnp.square(ca[:, None, :] - cb[None, :, :]), axis=-1)      # [N, M]
  side_a = jnp.sum(jnp.maximum(a[:, 2:] - a[:, :2], 0.0), axis=-1)        # [N]
  side_b = jnp.sum(jnp.maximum(b[:, 2:] - b[:, :2], 0.0), axis=-1)        # [M]
  mean_side = 0.25 * (side_a[:, None] + side_b[None, :])                  # [N, M]
  ok = (mean_side > 0) & (d2 > 0)
  dist = jnp.where(ok, jnp.sqrt(jnp.where(ok, d2, 1.0)) / jnp.where(ok, mean_side, 1.0), 0.0)
  return dist + (1.0 - box_iou(a, b))


def merge_boxes(boxes: jax.Array, scores: jax.Array, classes: jax.Array, mask: jax.Array, *,
                threshold: float) -> dict[str, jax.Array]:
  """OverFeat's greedy box merging, per class, with static shapes.

  Repeatedly: among valid pairs (i < j) of the same class take the pair with the lowest
  `match_score` (ties: the lowest i, then the lowest j); if it is > threshold stop; else slot i
  becomes the average of every box the two absorbed (weighted by their counts), with the sum of
  their scores, and slot j is dropped. At most N - 1 merges (a `while_loop`).

  Args:
    boxes: f32[N, 4] (x1, y1, x2, y2) pixels.
    scores: f32[N] confidences (>= 0).
    classes: i[N] class of each box; boxes of different classes never merge.
    mask: bool[N], False = padding. A box with a non-finite coordinate or score is padding
      too: never merged, never valid in the result.
    threshold: merge while the best match_score <= this (>= 0; 0 merges only identical boxes).
  Returns:
    dict boxes f32[N, 4], scores f32[N] (summed), labels i32[N], counts i32[N] (boxes absorbed),
    valid bool[N]; sorted by score descending, invalid slots last and zeroed.
  """
  checks.check_boxes("boxes", boxes)
  n = boxes.shape[0]
  checks.check_array("scores", scores, shape=(n,), dtype_kind="f")
  checks.check_array("classes", classes, shape=(n,), dtype_kind="iu")
  checks.check_mask("mask", mask, "scores", (n,))
  checks.check_positive("threshold", threshold, allow_zero=True)
  boxes = boxes.astype(jnp.float32)
  scores = scores.astype(jnp.float32)
  classes = classes.astype(jnp.int32)
  mask = mask & jnp.all(jnp.isfinite(boxes), axis=-1) & jnp.isfinite(scores)
  boxes = jnp.where(mask[:, None], boxes, 0.0)          # no NaN in the pairwise scores
  scores = jnp.where(mask, scores, 0.0)
  upper = jnp.triu(jnp.ones((n, n), bool), k=1)
  same = classes[:, None] == classes[None, :]

  def best_pair(state):
    b, _, _, v = state
    ok = upper & same & v[:, None] & v[None, :]
    m = jnp.where(ok, match_score(b, b), jnp.inf).reshape(-1)
    k = jnp.argmin(m)
    return k // n, k % n, m[k]

  def cond(state):
    if n < 2:
      return False
    return best_pair(state)[2] <= threshold

  def body(state):
    b, s, c, v = state
    i, j, _ = best_pair(state)
    wi, wj = c[i].astype(jnp.float32), c[j].astype(jnp.float32)
    merged = (wi * b[i] + wj * b[j]) / (wi + wj)
    b = b.at[i].set(merged)
    s = s.at[i].add(s[j])
    c = c.at[i].add(c[j])
    v = v.at[j].set(False)
    return b, s, c, v

  counts = mask.astype(jnp.int32)
  state = (boxes, scores, counts, mask)
  if n >= 2:
    state = jax.lax.while_loop(cond, body, state)
  b, s, c, v = state
  order = jnp.argsort(jnp.where(v, -s, jnp.inf), stable=True)
  v = v[order]
  zero = lambda x: jnp.where(v.reshape(v.shape + (1,) * (x.ndim - 1)), x, 0)
  return {"boxes": zero(b[order]), "scores": zero(s[order]), "labels": zero(classes[order]),
          "counts": zero(c[order]), "valid": v}
