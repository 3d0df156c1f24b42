"""RoI max pooling (Fast R-CNN) and RoI align (Mask R-CNN) for one image, static shapes.

Both follow torchvision's kernels exactly (`torchvision.ops.roi_pool`, `torchvision.ops.roi_align`)
and are written for accelerators: no per-RoI Python loops, no data-dependent shapes, no scatter
in RoI align's backward pass. Features are NHWC for one image; batch with `jax.vmap`.

RoI align. Bilinear interpolation is separable and so is the sampling grid, so the average over
a bin's `gh x gw` samples is `Ay[p, h] * Ax[q, w]`, with `Ay[p, h]` the mean over the bin's `gh`
row samples of their interpolation weight on row `h` (likewise `Ax`). Each RoI's output is then
`Ay f Ax^T` per channel: two matrix products (einsum), linear in the features, whose transpose
(the gradient) is again two matrix products. With `sampling_ratio <= 0` the number of samples
`gh = ceil(roi_h / oh)` depends on the data; only samples inside `[-1, H]` carry weight, they are
spaced `bin_h / gh >= bin_h / (bin_h + 1)` apart, and a bin holds at most `H + 2` of them (at most
`gh <= H + 1` when `bin_h <= H + 1`, and fewer than `H + 2` spacings fit in `[-1, H]` otherwise).
So a static window of `H + 4` samples, started just before the bin's first sample inside the
map, holds every sample that counts: exact for every RoI, however large, with no cap (the
window costs only in building the small [R, oh, H + 4, H] weights, not in the products).
Memory: the product contracting one axis first leaves an intermediate of ow * H * C (or
oh * W * C) values per RoI, several times the output, so RoIs are processed in chunks
(`lax.map`) of at most `_ALIGN_CHUNK_ELEMENTS` intermediate values per image. FLOPs per RoI:
2 C (ow H W + oh ow H) (about 19 MFLOP at 7x7 on a 38x63x512 map): dense work that matrix units
do well, in exchange for no gathers and no scatter.

RoI max pooling. Bins are integer rectangles (Caffe rounding). A 2-D sparse table of the feature
map (max over `2^k x 2^l` blocks, `log2 H x log2 W` levels) answers each bin's max with four
overlapping block look-ups (max is idempotent), so the work is four gathers of a channel vector
per output cell, independent of the RoI size; the table holds (floor(log2 H) + 1)
(floor(log2 W) + 1) H W C values (36 copies of a 38x63 map). The gradient reaches the bin's
argmax, the first in row-major order among tied maxima (as torchvision's), through a custom
VJP: under differentiation the forward pass finds each bin's max and argmax by two separable
masked reductions instead (along the bin's columns, then its rows; about R ow H W C fused
compare-selects, nothing of that size stored) and keeps the argmax, and the backward pass is one
scatter-add into the map. (Differentiating the table instead carried the cotangent back through
its 36 copies of the map and every level's max: in the paper Faster R-CNN train step, batch 2
with 128 RoIs each, 12 GB of the CPU compiler's count of bytes accessed for RoI pooling, 0.9 GB
now.)

Padding and non-finite rois. A roi is used when its mask entry is True and its four coordinates
are finite; any other roi (padding, or NaN / inf coordinates) comes out as zeros and is replaced
by a harmless box before any arithmetic (double `where`), so its garbage reaches neither the
values nor the gradients (of the features or of the other rois). The feature map must be
non-empty (height and width > 0): an empty map is a ValueError.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxdet import checks
from jaxdet.ops.boxes import finite_box_mask

# Elements of one image's per-chunk intermediate in `roi_align` (4 bytes each in float32).
_ALIGN_CHUNK_ELEMENTS = 1 << 24


def _output_size(output_size: int | Sequence[int]) -> tuple[int, int]:
  """Normalises `output_size` (int or (oh, ow)) to a pair of positive Python ints."""
  size = (output_size, output_size) if isinstance(output_size, (int, np.integer)) else output_size
  ok = (isinstance(size, (tuple, list)) and len(size) == 2
        and all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) for s in size))
  if not ok:
    raise TypeError(f"output_size: expected an int or a pair of ints (oh, ow), got "
                    f"{output_size!r}")
  checks.check_positive("output_size", tuple(int(s) for s in size))
  return int(size[0]), int(size[1])


def _check_inputs(features, rois, spatial_scale, mask) -> None:
  checks.check_array("features", features, ndim=3, dtype_kind="f")
  checks.check_spatial_size("features", features)
  checks.check_boxes("rois", rois)
  checks.check_positive("spatial_scale", spatial_scale)
  if mask is not None:
    checks.check_mask("mask", mask, "rois", rois.shape[:1])


def _caffe_round(x: jax.Array) -> jax.Array:
  """C's `round`: halves away from zero (jnp.round rounds halves to even)."""
  return jnp.sign(x) * jnp.floor(jnp.abs(x) + 0.5)


def _divide(x: jax.Array, n: int) -> jax.Array:
  """x / n, correctly rounded like the kernels' float division.

  XLA rewrites a division by a constant into a multiplication by its reciprocal, which can be
  one ulp off and so move an integer bin edge (ceil(7 * (3 / 7)) = 4); a divisor computed from
  the data keeps the true division.
  """
  return x / (x * 0.0 + jnp.float32(n))


def _floor_log2(n: jax.Array) -> jax.Array:
  """floor(log2(n)) for int32 n >= 1."""
  return 31 - lax.clz(n.astype(jnp.int32))


def _pool_bins(start: jax.Array, end: jax.Array, pooled: int, size: int):
  """Integer bin edges of torchvision's roi_pool along one axis.

  Args:
    start, end: f32[R] roi start/end on the feature map (already scaled, not yet rounded).
    pooled: number of bins.
    size: the feature map's extent along this axis.
  Returns:
    lo, hi: i32[R, pooled] bin [lo, hi) clipped to [0, size].
  """
  start = _caffe_round(start)
  end = _caffe_round(end)
  length = jnp.maximum(end - start + 1.0, 1.0)                         # [R]
  bin_size = _divide(length, pooled)                                   # [R]
  p = jnp.arange(pooled, dtype=jnp.float32)                            # [P]
  lo = jnp.floor(p[None] * bin_size[:, None]) + start[:, None]         # [R, P]
  hi = jnp.ceil((p[None] + 1.0) * bin_size[:, None]) + start[:, None]  # [R, P]
  lo = jnp.clip(lo, 0, size).astype(jnp.int32)
  hi = jnp.clip(hi, 0, size).astype(jnp.int32)
  return lo, hi


def _used_rois(rois: jax.Array, mask: jax.Array | None) -> jax.Array:
  """bool[R]: the rois that are real (mask True) and finite; the others give zeros."""
  used = finite_box_mask(rois)
  return used if mask is None else used & mask


def _sparse_table(features: jax.Array) -> jax.Array:
  """Block maxima: table[l, k, h, w] = max f[h : h + 2^k, w : w + 2^l] (edge-padded).

  Args:
    features: [H, W, C].
  Returns:
    [Lw, Lh, H, W, C] with Lh = floor(log2 H) + 1, Lw = floor(log2 W) + 1.
  """
  def levels(x, axis):
    n = x.shape[axis]
    out = [x]
    for k in range(1, n.bit_length()):
      s = 1 << (k - 1)
      prev = out[-1]
      tail = lax.slice_in_dim(prev, n - 1, n, axis=axis)
      shifted = jnp.concatenate(
          [lax.slice_in_dim(prev, s, n, axis=axis)] + [tail] * s, axis=axis)
      out.append(jnp.maximum(prev, shifted))
    return jnp.stack(out)

  rows = levels(features, axis=0)                                      # [Lh, H, W, C]
  return levels(rows, axis=2)                                          # [Lw, Lh, H, W, C]


def roi_pool(features: jax.Array, rois: jax.Array, output_size: int | Sequence[int],
             spatial_scale: float, *, mask: jax.Array | None = None) -> jax.Array:
  """RoI max pooling of Fast R-CNN, with the bin rounding of the original Caffe layer.

  The semantics of `torchvision.ops.roi_pool`: roi start/end = round(coord * spatial_scale)
  (halves away from zero), roi size = max(end - start + 1, 1), bin [floor(p * size / oh),
  ceil((p + 1) * size / oh)) + start clipped to the map; an empty bin gives 0.

  Args:
    features: f[H, W, C] feature map of one image (float32 or bfloat16), H, W > 0.
    rois: f32[R, 4] (x1, y1, x2, y2) in image pixels; a non-finite roi is treated as padding.
    output_size: oh or (oh, ow), the pooled grid.
    spatial_scale: feature-map pixels per image pixel (e.g. 1/16).
    mask: bool[R] (optional), True = real roi; padded rois give zeros.
  Returns:
    [R, oh, ow, C] in features' dtype. Differentiable in features (the gradient of each output
    goes to its bin's argmax); rois get no gradient (the bins are integers).
  """
  _check_inputs(features, rois, spatial_scale, mask)
  oh, ow = _output_size(output_size)
  height, width, _ = features.shape
  used = _used_rois(rois, mask)                                        # [R]
  boxes = jnp.where(used[:, None], lax.stop_gradient(rois).astype(jnp.float32), 0.0)
  boxes = boxes * jnp.float32(spatial_scale)
  h_lo, h_hi = _pool_bins(boxes[:, 1], boxes[:, 3], oh, height)        # [R, oh]
  w_lo, w_hi = _pool_bins(boxes[:, 0], boxes[:, 2], ow, width)         # [R, ow]

  num_lh = height.bit_length()                                         # Lh = floor(log2 H) + 1

  def corners(lo, hi):
    """Level and the two block starts covering [lo, hi) (clamped for empty bins)."""
    n = jnp.maximum(hi - lo, 1)
    k = _floor_log2(n)
    a = jnp.minimum(lo, hi - 1)
    b = hi - (1 << k)
    return k, jnp.clip(a, 0, None), jnp.clip(b, 0, None)

  kh, ha, hb = corners(h_lo, h_hi)                                     # [R, oh] each
  kw, wa, wb = corners(w_lo, w_hi)                                     # [R, ow] each
  level = (kw[:, None, :] * num_lh + kh[:, :, None]) * height          # [R, oh, ow]

  def flat(h, w):
    return (level + h[:, :, None]) * width + w[:, None, :]             # [R, oh, ow]

  rows = jnp.stack([flat(ha, wa), flat(ha, wb), flat(hb, wa), flat(hb, wb)])  # [4, R, oh, ow]
  keep = (h_hi > h_lo)[:, :, None] & (w_hi > w_lo)[:, None, :]         # [R, oh, ow]
  keep = keep & used[:, None, None]
  bins = (h_lo, h_hi, w_lo, w_hi)
  return _pool_table_max((height, width), features, rows, keep, bins)


def _masked_max_first(x: jax.Array, inside: jax.Array, axis: int
                      ) -> tuple[jax.Array, jax.Array]:
  """(max, i32 first position of the max) of x along `axis` over the positions where `inside`
  (broadcast against x; -inf elsewhere): one variadic reduction, so that the masked input
  is fused into it and never stored. NaN counts as the maximum, as in jnp.maximum."""
  x = jnp.where(inside, x, -jnp.inf)
  index = lax.broadcasted_iota(jnp.int32, x.shape, axis)

  def pick(a, b):
    (va, ia), (vb, ib) = a, b
    a_first = ia <= ib
    take_a = ((va > vb) | ((va == vb) & a_first)
              | (jnp.isnan(va) & (~jnp.isnan(vb) | a_first)))
    return jnp.where(take_a, va, vb), jnp.where(take_a, ia, ib)

  init = (jnp.array(-jnp.inf, x.dtype), jnp.array(np.iinfo(np.int32).max, jnp.int32))
  return lax.reduce((x, index), init, pick, (axis,))


def _bin_max_argmax(features: jax.Array, h_lo, h_hi, w_lo, w_hi
                    ) -> tuple[jax.Array, jax.Array]:
  """Each bin's max and the flat position h * W + w of its first maximum in row-major order
  (torchvision's argmax), per channel: (f32[R, oh, ow, C], i32[R, oh, ow, C]); -inf and a
  position inside the bin (or its first row / column) for empty bins.

  Separable masked reductions, no table: first along each row within the bin's columns, then
  along the bin's rows, so ties go to the smallest row and, within it, the smallest column.
  Work R (ow H W + oh ow H) C compare-selects (fused into the reductions; ~1 G for 128 RoIs at
  7 x 7 on a 37 x 62 x 512 map), memory traffic about R ow H C values.
  """
  height, width, _ = features.shape
  in_w = (jnp.arange(width) >= w_lo[..., None]) & (jnp.arange(width) < w_hi[..., None])
  in_h = (jnp.arange(height) >= h_lo[..., None]) & (jnp.arange(height) < h_hi[..., None])
  f = features.astype(jnp.float32)
  # Along the columns: [R, ow, H, W, C] (never stored) -> [R, ow, H, C].
  row_max, col = _masked_max_first(f[None, None], in_w[:, :, None, :, None], axis=3)
  col = jnp.clip(col, w_lo[:, :, None, None], jnp.maximum(w_hi - 1, w_lo)[:, :, None, None])
  # Along the rows: [R, oh, ow, H, C] -> [R, oh, ow, C].
  out, row = _masked_max_first(row_max[:, None], in_h[:, :, None, :, None], axis=3)
  row = jnp.clip(row, h_lo[:, :, None, None], jnp.maximum(h_hi - 1, h_lo)[:, :, None, None])
  col = jnp.take_along_axis(col[:, None], row[:, :, :, None, :], axis=3)[:, :, :, 0]
  return out, row * width + col


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _pool_table_max(size: tuple[int, int], features: jax.Array, rows: jax.Array,
                    keep: jax.Array, bins: tuple[jax.Array, ...]) -> jax.Array:
  """The max of four sparse-table blocks per output cell.

  Args:
    size: (H, W), static.
    features: f[H, W, C].
    rows: i32[4, R, oh, ow] rows of the flattened table [Lw * Lh * H * W, C] whose blocks
      cover each bin.
    keep: bool[R, oh, ow] cells that are real (the others are 0).
    bins: (h_lo, h_hi i32[R, oh], w_lo, w_hi i32[R, ow]) the bins, for the argmax.
  Returns:
    [R, oh, ow, C] in features' dtype.

  The gradient (custom VJP) goes to the argmax: under differentiation the forward pass finds
  each cell's max and argmax without the table (`_bin_max_argmax`; the argmax, i32[R, oh, ow,
  C], is kept) and the backward pass is one scatter-add of the cells' cotangents into the map,
  accumulated in float32.
  """
  del bins
  table = _sparse_table(features).reshape(-1, features.shape[-1])     # [Lw*Lh*H*W, C]
  look = lambda r: jnp.take(table, r, axis=0, mode="clip")             # [R, oh, ow, C]
  out = jnp.maximum(jnp.maximum(look(rows[0]), look(rows[1])),
                    jnp.maximum(look(rows[2]), look(rows[3])))
  return jnp.where(keep[..., None], out, jnp.zeros((), features.dtype))


def _pool_table_max_fwd(size, features, rows, keep, bins):
  """Under differentiation the table is not built: the bins' max and argmax directly."""
  del size, rows
  out, argmax = _bin_max_argmax(features, *bins)                       # [R, oh, ow, C] each
  out = jnp.where(keep[..., None], out.astype(features.dtype), jnp.zeros((), features.dtype))
  return out, (argmax, keep)


def _pool_table_max_bwd(size, residuals, g):
  """g [R, oh, ow, C] -> (d features [H, W, C], None...): each kept cell's cotangent added
  at its argmax, in float32."""
  argmax, keep = residuals                                             # i32[R, oh, ow, C]
  height, width = size
  channels, dtype = g.shape[-1], g.dtype                               # features' dtype
  g = jnp.where(keep[..., None], g.astype(jnp.float32), 0.0)
  grad = jnp.zeros((height * width, channels), jnp.float32)
  grad = grad.at[argmax, jnp.arange(channels)].add(g, mode="drop")
  return grad.reshape(height, width, channels).astype(dtype), None, None, None


_pool_table_max.defvjp(_pool_table_max_fwd, _pool_table_max_bwd)


def _align_weights(start: jax.Array, length: jax.Array, pooled: int, size: int,
                   sampling_ratio: int) -> jax.Array:
  """RoI align's interpolation matrix along one axis, averaged over the bin's samples.

  Sample i of bin p sits at start + p * bin + (i + 0.5) * bin / g (torchvision's expression
  order, float32), with g = sampling_ratio or ceil(length / pooled); samples outside [-1, size]
  weigh 0, the rest are clamped to [0, size - 1] and interpolated linearly.

  Args:
    start: f32[R] roi start on the feature map (offset already applied).
    length: f32[R] roi extent on the feature map (min 1 already applied when not aligned).
    pooled: number of bins.
    size: the feature map's extent along this axis.
    sampling_ratio: samples per bin along this axis, or <= 0 for adaptive.
  Returns:
    f32[R, pooled, size]: row p holds the mean over the bin's g samples of their weights on
    each pixel (all zeros when g <= 0).
  """
  bin_size = _divide(length, pooled)                                   # [R]
  p = jnp.arange(pooled, dtype=jnp.float32)
  bin_start = start[:, None] + p[None] * bin_size[:, None]             # [R, P]
  if sampling_ratio > 0:
    grid = jnp.full_like(length, sampling_ratio, dtype=jnp.int32)      # [R]
    num = sampling_ratio
    first = jnp.zeros_like(bin_start, dtype=jnp.int32)                 # [R, P]
  else:
    grid = jnp.ceil(bin_size).astype(jnp.int32)                       # [R]
    num = size + 4   # every sample inside [-1, size] of one bin fits (see the module doc)
    step = lax.stop_gradient(bin_size / jnp.maximum(grid, 1).astype(jnp.float32))
    step = jnp.where(step > 0, step, 1.0)
    first_inside = jnp.ceil((-1.0 - lax.stop_gradient(bin_start)) / step[:, None] - 0.5)
    first = jnp.clip(first_inside, 0, size + 4.0 + grid[:, None]).astype(jnp.int32) - 1
  grid_f = jnp.maximum(grid, 1).astype(jnp.float32)[:, None, None]     # [R, 1, 1]
  i = first[:, :, None] + jnp.arange(num, dtype=jnp.int32)             # [R, P, S]
  used = (i >= 0) & (i < grid[:, None, None])                          # [R, P, S]
  y = (bin_start[:, :, None]
       + (i.astype(jnp.float32) + 0.5) * bin_size[:, None, None] / grid_f)
  used = used & (y >= -1.0) & (y <= jnp.float32(size))
  y = jnp.clip(y, 0.0, jnp.float32(size - 1))
  pix = jnp.arange(size, dtype=jnp.float32)
  tent = jnp.maximum(1.0 - jnp.abs(y[..., None] - pix), 0.0)           # [R, P, S, size]
  tent = jnp.where(used[..., None], tent, 0.0)
  # The sum over the samples as a product with ones, not a reduction: XLA CPU (jaxlib 0.10.2)
  # fuses a reduction feeding the interpolation matmul into one YNNPACK fusion, which computes
  # garbage (1e30, NaN) when the features are a splat constant (a flat image closed over by a
  # jitted function); the product leaves no reduction to fuse. Same values (exact f32 sum).
  total = jnp.einsum("rpsh,s->rph", tent, jnp.ones((num,), jnp.float32),
                     precision=lax.Precision.HIGHEST)                   # [R, P, size]
  return total / grid_f                                                # [R, P, size]


def roi_align(features: jax.Array, rois: jax.Array, output_size: int | Sequence[int],
              spatial_scale: float, sampling_ratio: int = -1, aligned: bool = False, *,
              mask: jax.Array | None = None,
              precision: lax.Precision | str | None = None) -> jax.Array:
  """RoI align (Mask R-CNN): bilinear samples averaged over each bin, exactly as torchvision.

  The semantics of `torchvision.ops.roi_align`: coordinates scaled by spatial_scale (minus 0.5
  when aligned), roi size at least 1 when not aligned, g = sampling_ratio samples per bin and
  axis (or ceil(roi size / bins) when sampling_ratio <= 0), samples outside [-1, H] count as
  zero, samples clamped into the map, the sum divided by the number of samples. Exact for every
  roi: the data-dependent sample count is handled in static shapes (see the module doc).

  Args:
    features: f[H, W, C] feature map of one image (float32 or bfloat16), H, W > 0.
    rois: f32[R, 4] (x1, y1, x2, y2) in image pixels; a non-finite roi is treated as padding.
    output_size: oh or (oh, ow), the pooled grid.
    spatial_scale: feature-map pixels per image pixel (e.g. 1/16).
    sampling_ratio: samples per bin along each axis; <= 0 for adaptive.
    aligned: shift the rois by -0.5 feature pixels (pixel centres at half-integers).
    mask: bool[R] (optional), True = real roi; padded rois give zeros.
    precision: of the two matrix products; default HIGHEST for float32 features (accuracy of
      float32 on GPUs/TPUs; pass "default" to allow TF32) and DEFAULT for bfloat16.
  Returns:
    [R, oh, ow, C] in features' dtype. Linear in features (the gradient is the transpose, two
    matrix products); differentiable in rois through the sample positions.
  """
  _check_inputs(features, rois, spatial_scale, mask)
  oh, ow = _output_size(output_size)
  if not isinstance(sampling_ratio, (int, np.integer)) or isinstance(sampling_ratio, bool):
    raise TypeError(f"sampling_ratio: expected an int, got {sampling_ratio!r}")
  sampling_ratio = int(sampling_ratio)
  if precision is None:
    precision = lax.Precision.HIGHEST if features.dtype == jnp.float32 else lax.Precision.DEFAULT
  height, width, channels = features.shape
  num_rois = rois.shape[0]

  offset = 0.5 if aligned else 0.0
  valid = _used_rois(rois, mask)                                       # [R]
  boxes = jnp.where(valid[:, None], rois.astype(jnp.float32),
                    jnp.asarray([0.0, 0.0, 1.0, 1.0], jnp.float32))    # padding: a harmless box
  boxes = boxes * jnp.float32(spatial_scale) - jnp.float32(offset)

  # Contract the axis that leaves the smaller intermediate work first (static choice).
  x_first = ow * height * (width + oh) <= oh * width * (height + ow)
  per_roi = (ow * height if x_first else oh * width) * channels
  chunk = int(max(1, min(num_rois, _ALIGN_CHUNK_ELEMENTS // per_roi)))
  num_chunks = -(-num_rois // chunk)
  pad = num_chunks * chunk - num_rois

  def one_chunk(args):
    b, v = args                                                        # [n, 4], [n]
    length_w = b[:, 2] - b[:, 0]
    length_h = b[:, 3] - b[:, 1]
    if not aligned:
      length_w = jnp.maximum(length_w, 1.0)
      length_h = jnp.maximum(length_h, 1.0)
    ay = _align_weights(b[:, 1], length_h, oh, height, sampling_ratio)   # [n, oh, H]
    ax = _align_weights(b[:, 0], length_w, ow, width, sampling_ratio)    # [n, ow, W]
    ay = jnp.where(v[:, None, None], ay, 0.0).astype(features.dtype)
    ax = ax.astype(features.dtype)
    # Both products are plain (batched) matrix products on contiguous operands: the big
    # intermediate t is never transposed, the small weights are broadcast instead.
    dot = functools.partial(jnp.einsum, precision=precision)
    if x_first:
      t = dot("nqw,whc->nqhc", ax, jnp.swapaxes(features, 0, 1))         # [n, ow, H, C]
      ay = jnp.broadcast_to(ay[:, None], (ay.shape[0], ow, oh, height))  # [n, ow, oh, H]
      out = dot("nqph,nqhc->nqpc", ay, t).swapaxes(1, 2)                 # [n, oh, ow, C]
    else:
      t = dot("nph,hwc->npwc", ay, features)                             # [n, oh, W, C]
      ax = jnp.broadcast_to(ax[:, None], (ax.shape[0], oh, ow, width))   # [n, oh, ow, W]
      out = dot("npqw,npwc->npqc", ax, t)                                # [n, oh, ow, C]
    return out.astype(features.dtype)                                  # [n, oh, ow, C]

  if num_chunks == 1:
    return one_chunk((boxes, valid))
  boxes = jnp.pad(boxes, ((0, pad), (0, 0))).reshape(num_chunks, chunk, 4)
  valid = jnp.pad(valid, (0, pad)).reshape(num_chunks, chunk)
  out = lax.map(one_chunk, (boxes, valid))                             # [chunks, n, oh, ow, C]
  return out.reshape(num_chunks * chunk, oh, ow, channels)[:num_rois]
