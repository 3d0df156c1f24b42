"""Crop-and-resize: R-CNN's warp of each region to the network's fixed input size.

R-CNN (Girshick et al. 2014, appendix A) warps every proposal, whatever its aspect ratio, to
the CNN's input size after dilating it so that, at the warped size, there are exactly `context`
(p = 16) pixels of image context around the original box. Parts of the dilated box outside the
image are filled with the image mean (zero after mean subtraction: `fill=0` on normalised
images).

Sampling convention (the half-pixel centres of jaxdet.data.transforms): output pixel (i, j) of
an out_h x out_w warp of box (x1, y1, x2, y2) samples the image at the continuous point

  x = x1 + (j + 0.5) (x2 - x1) / out_w,   y = y1 + (i + 0.5) (y2 - y1) / out_h,

by bilinear interpolation between the pixel centres (c + 0.5, r + 0.5); a point in the outer
half pixel of the image takes the border pixel's value (as OpenCV/PIL resizing does), and a point
outside [0, width] x [0, height] takes `fill`. So warping the whole image box to the image's own
size returns the image exactly.

Implemented with four gathers per output pixel (no [out, H, W] interpolation matrices), so its
memory is that of the output, O(N out_h out_w C), at any image size.

A box is used when its mask entry is True and its coordinates are finite; any other box comes
out as `fill` and is replaced by a harmless box before the arithmetic (double `where`), so it
passes no NaN to the gradients. The image must be non-empty (height and width > 0).
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp

from jaxdet import checks
from jaxdet.ops.boxes import finite_box_mask


def dilate_boxes(boxes: jax.Array, context: float, out_size: Sequence[int]) -> jax.Array:
  """Dilates boxes so that warping to out_size leaves `context` pixels of context on each side.

  A box of width w warped to out_w columns with p context pixels on each side covers
  out_w - 2p columns, so the dilated width is w * out_w / (out_w - 2p) (same for heights),
  keeping the centre.

  Args:
    boxes: f32[..., 4] (x1, y1, x2, y2) pixels.
    context: p, context pixels at the warped size (R-CNN: 16); 0 leaves boxes unchanged.
    out_size: (out_h, out_w) the warped size; requires 2p < out_h and 2p < out_w.
  Returns:
    f32[..., 4] dilated boxes (x1, y1, x2, y2), not clipped to the image.
  """
  checks.check_boxes("boxes", boxes, ndim=range(1, 8))
  checks.check_positive("context", context, allow_zero=True)
  oh, ow = (int(s) for s in out_size)
  checks.check_positive("out_size", (oh, ow))
  if 2 * context >= min(oh, ow):
    raise ValueError(f"context: expected 2 * context < min(out_size) = {min(oh, ow)}, "
                     f"got {context!r}")
  b = jnp.asarray(boxes, jnp.float32)
  centre = 0.5 * (b[..., :2] + b[..., 2:])                           # [..., 2]
  half = 0.5 * (b[..., 2:] - b[..., :2])                             # [..., 2]
  factor = jnp.asarray([ow / (ow - 2.0 * context), oh / (oh - 2.0 * context)], jnp.float32)
  half = half * factor
  return jnp.concatenate([centre - half, centre + half], axis=-1)


def _axis_taps(lo: jax.Array, hi: jax.Array, n_out: int, size: jax.Array, n_pixels: int):
  """Bilinear taps along one axis for one box.

  Args:
    lo, hi: f32[] the box's extent on this axis (pixels).
    n_out: output samples along the axis.
    size: f32[] the real image extent on this axis (pixels; <= n_pixels).
    n_pixels: the array's extent on this axis.
  Returns:
    (i0 i32[n_out], i1 i32[n_out], w1 f32[n_out] weight of i1, inside bool[n_out]).
  """
  t = (jnp.arange(n_out, dtype=jnp.float32) + 0.5) / n_out           # [n_out]
  pos = lo + t * (hi - lo)                                           # [n_out] continuous
  inside = (pos >= 0.0) & (pos <= size)
  last = jnp.maximum(size - 1.0, 0.0)
  p = jnp.clip(pos - 0.5, 0.0, last)                                 # pixel-index space
  i0 = jnp.floor(p)
  w1 = p - i0
  i0 = i0.astype(jnp.int32)
  i1 = jnp.minimum(i0 + 1, last.astype(jnp.int32))
  return (jnp.clip(i0, 0, n_pixels - 1), jnp.clip(i1, 0, n_pixels - 1), w1, inside)


def _warp_one(image: jax.Array, box: jax.Array, out_h: int, out_w: int, height: jax.Array,
              width: jax.Array, fill: float) -> jax.Array:
  """image f[H, W, C], box f32[4] -> f32[out_h, out_w, C]."""
  hh, ww = image.shape[:2]
  y0, y1, wy, in_y = _axis_taps(box[1], box[3], out_h, height, hh)   # [out_h] each
  x0, x1, wx, in_x = _axis_taps(box[0], box[2], out_w, width, ww)    # [out_w] each
  img = jnp.asarray(image).astype(jnp.float32)
  g = lambda yi, xi: img[yi[:, None], xi[None, :]]                   # [out_h, out_w, C]
  wy_, wx_ = wy[:, None, None], wx[None, :, None]
  top = g(y0, x0) * (1.0 - wx_) + g(y0, x1) * wx_
  bottom = g(y1, x0) * (1.0 - wx_) + g(y1, x1) * wx_
  out = top * (1.0 - wy_) + bottom * wy_                             # [out_h, out_w, C]
  inside = (in_y[:, None] & in_x[None, :])[..., None]
  return jnp.where(inside, out, jnp.float32(fill))


def crop_and_resize(image: jax.Array, boxes: jax.Array, out_size: Sequence[int], *,
                    context: float = 0.0, image_size: Any = None, fill: float = 0.0,
                    mask: jax.Array | None = None, dtype: Any = jnp.float32) -> jax.Array:
  """Warps each box of one image to out_size (bilinear), optionally dilated for context.

  Args:
    image: f[H, W, C] (any real dtype; e.g. normalised pixels), NHWC without the batch axis;
      H, W > 0.
    boxes: f32[N, 4] (x1, y1, x2, y2) pixels of `image`; non-finite boxes are treated as
      padding.
    out_size: (out_h, out_w), static.
    context: p, pixels of context at the warped size (R-CNN: 16), see `dilate_boxes`.
    image_size: (height, width) of the real pixels (Python numbers or a traced i32[2]); the
      rest of the array is padding, treated as outside the image. None: the array's size.
    fill: the value of samples outside the image (0 = the mean of normalised images).
    mask: bool[N] or None; False rows (padding) come out as `fill`.
    dtype: the result's dtype (interpolation runs in float32).
  Returns:
    dtype[N, out_h, out_w, C].
  """
  checks.check_array("image", image, ndim=3, dtype_kind="uif")
  checks.check_spatial_size("image", image, "image")
  checks.check_boxes("boxes", boxes, ndim=2)
  if mask is not None:
    checks.check_mask("mask", mask, "boxes", boxes.shape[:1])
  oh, ow = (int(s) for s in out_size)
  checks.check_positive("out_size", (oh, ow))
  used = finite_box_mask(boxes) if mask is None else finite_box_mask(boxes) & mask   # [N]
  b = jnp.where(used[:, None], jnp.asarray(boxes, jnp.float32),
                jnp.asarray([0.0, 0.0, 1.0, 1.0], jnp.float32))       # padding: a harmless box
  if context:
    b = dilate_boxes(b, context, (oh, ow))
  if image_size is None:
    height, width = jnp.float32(image.shape[0]), jnp.float32(image.shape[1])
  else:
    size = jnp.asarray(image_size, jnp.float32)
    height, width = size[0], size[1]
  out = jax.vmap(lambda box: _warp_one(image, box, oh, ow, height, width, fill))(b)
  out = jnp.where(used[:, None, None, None], out, jnp.float32(fill))
  return out.astype(dtype)


def batch_crop_and_resize(images: jax.Array, boxes: jax.Array, out_size: Sequence[int], *,
                          context: float = 0.0, image_size: jax.Array | None = None,
                          fill: float = 0.0, mask: jax.Array | None = None,
                          dtype: Any = jnp.float32) -> jax.Array:
  """`crop_and_resize` over a batch: images f[B, H, W, C], boxes f32[B, N, 4],
  image_size i32[B, 2] or None, mask bool[B, N] or None -> dtype[B, N, out_h, out_w, C]."""
  checks.check_array("images", images, ndim=4, dtype_kind="uif")
  checks.check_spatial_size("images", images, "image", axes=(1, 2))
  checks.check_boxes("boxes", boxes, ndim=3)
  checks.check_same_size("images", images, "boxes", boxes)
  if image_size is None:
    image_size = jnp.broadcast_to(jnp.asarray(images.shape[1:3], jnp.int32),
                                  (images.shape[0], 2))
  if mask is None:
    mask = jnp.ones(boxes.shape[:2], bool)
  fn = lambda im, bx, sz, m: crop_and_resize(im, bx, out_size, context=context, image_size=sz,
                                             fill=fill, mask=m, dtype=dtype)
  return jax.vmap(fn)(images, boxes, image_size, mask)
