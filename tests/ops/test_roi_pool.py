"""roi_pool and roi_align against float64 loop references of torchvision's CPU kernels.

The references follow torchvision/csrc/ops/cpu/roi_pool_kernel.cpp and roi_align_kernel.cpp
(roi_align_common.h) line by line, NCHW loops turned into HWC loops. Coordinates are computed in
float32 as the kernels do for float32 inputs (bin edges are integers that rounding can move);
values are pooled and summed in float64.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdet.ops.roi_pool import roi_align, roi_pool

F = np.float32


def _c_round(x):
  return F(math.copysign(math.floor(abs(x) + 0.5), x))


def ref_roi_pool(features, rois, oh, ow, scale):
  """Returns (out f64[R, oh, ow, C], argmax i64[R, oh, ow, C] flat h * W + w or -1)."""
  f = np.asarray(features, np.float64)
  height, width, channels = f.shape
  out = np.zeros((len(rois), oh, ow, channels))
  arg = np.full((len(rois), oh, ow, channels), -1)
  for n, roi in enumerate(np.asarray(rois, F)):
    sw, sh, ew, eh = (int(_c_round(F(c) * F(scale))) for c in roi)
    rw, rh = max(ew - sw + 1, 1), max(eh - sh + 1, 1)
    bh, bw = F(rh) / F(oh), F(rw) / F(ow)
    for ph in range(oh):
      for pw in range(ow):
        hs = min(max(int(np.floor(F(ph) * bh)) + sh, 0), height)
        he = min(max(int(np.ceil(F(ph + 1) * bh)) + sh, 0), height)
        ws = min(max(int(np.floor(F(pw) * bw)) + sw, 0), width)
        we = min(max(int(np.ceil(F(pw + 1) * bw)) + sw, 0), width)
        if he <= hs or we <= ws:
          continue
        for c in range(channels):
          best, where = -np.inf, -1
          for h in range(hs, he):
            for w in range(ws, we):
              if f[h, w, c] > best:
                best, where = f[h, w, c], h * width + w
          out[n, ph, pw, c], arg[n, ph, pw, c] = best, where
  return out, arg


def ref_roi_align_matrix(shape, rois, oh, ow, scale, sampling_ratio, aligned):
  """The roi_align kernel as a matrix M f64[R * oh * ow, H * W]: out[., c] = M @ f[., c]."""
  height, width = shape
  mat = np.zeros((len(rois), oh, ow, height * width))
  off = F(0.5) if aligned else F(0.0)
  for n, roi in enumerate(np.asarray(rois, F)):
    sw, sh, ew, eh = (F(c) * F(scale) - off for c in roi)
    rw, rh = F(ew - sw), F(eh - sh)
    if not aligned:
      rw, rh = max(rw, F(1)), max(rh, F(1))
    bh, bw = F(rh / F(oh)), F(rw / F(ow))
    gh = sampling_ratio if sampling_ratio > 0 else int(np.ceil(F(rh / F(oh))))
    gw = sampling_ratio if sampling_ratio > 0 else int(np.ceil(F(rw / F(ow))))
    count = max(gh * gw, 1)
    for ph in range(oh):
      for pw in range(ow):
        for iy in range(gh):
          yy = F(sh + F(ph) * bh) + F(F(F(iy) + F(0.5)) * bh) / F(gh)
          for ix in range(gw):
            xx = F(sw + F(pw) * bw) + F(F(F(ix) + F(0.5)) * bw) / F(gw)
            y, x = float(yy), float(xx)
            if not (-1.0 <= y <= height and -1.0 <= x <= width):
              continue
            y, x = max(y, 0.0), max(x, 0.0)
            yl, xl = int(y), int(x)
            if yl >= height - 1:
              yh = yl = height - 1
              y = float(yl)
            else:
              yh = yl + 1
            if xl >= width - 1:
              xh = xl = width - 1
              x = float(xl)
            else:
              xh = xl + 1
            ly, lx = y - yl, x - xl
            hy, hx = 1.0 - ly, 1.0 - lx
            m = mat[n, ph, pw]
            m[yl * width + xl] += hy * hx / count
            m[yl * width + xh] += hy * lx / count
            m[yh * width + xl] += ly * hx / count
            m[yh * width + xh] += ly * lx / count
  return mat.reshape(-1, height * width)


def ref_roi_align(features, rois, oh, ow, scale, sampling_ratio, aligned):
  f = np.asarray(features, np.float64)
  height, width, channels = f.shape
  mat = ref_roi_align_matrix((height, width), rois, oh, ow, scale, sampling_ratio, aligned)
  return (mat @ f.reshape(-1, channels)).reshape(len(rois), oh, ow, channels), mat


def random_rois(rng, n, image_h, image_w):
  """A mix: inside the image, partly outside, tiny, degenerate (x2 < x1), huge."""
  cx = rng.uniform(-0.2, 1.2, n) * image_w
  cy = rng.uniform(-0.2, 1.2, n) * image_h
  kind = rng.integers(0, 4, n)
  scale = np.choose(kind, [rng.uniform(0.5, 4, n), rng.uniform(4, 4 + 0.6 * image_w, n),
                           rng.uniform(image_w, 6 * image_w, n), rng.uniform(-3, 0.5, n)])
  w = scale * rng.uniform(0.5, 1.5, n)
  h = scale * rng.uniform(0.5, 1.5, n)
  return np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1).astype(np.float32)


def distinct_features(rng, shape):
  """Random features without ties (a permutation of spaced values)."""
  n = int(np.prod(shape))
  return (rng.permutation(n).reshape(shape) / n * 4 - 2).astype(np.float32)


@pytest.mark.parametrize("height,width,channels,oh,ow,scale", [
    (9, 13, 3, 3, 2, 0.5),
    (20, 7, 2, 7, 7, 0.25),
])
def test_roi_pool_matches_reference_and_routes_gradient(rng, height, width, channels, oh, ow,
                                                        scale):
  f = distinct_features(rng, (height, width, channels))
  rois = random_rois(rng, 24, height / scale, width / scale)
  # Halves after scaling: C round goes away from zero.
  rois[:3] = np.array([[1, 3, 5, 9], [-1, -3, 3, 1], [5, 5, 5, 5]], np.float32) / scale / 2
  want, arg = ref_roi_pool(f, rois, oh, ow, scale)
  fn = jax.jit(lambda f, r: roi_pool(f, r, (oh, ow), scale))
  got = fn(f, rois)
  assert got.shape == (24, oh, ow, channels) and got.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(got, np.float64), want)

  g = rng.normal(size=want.shape)
  grad = jax.jit(jax.grad(lambda f: jnp.sum(fn(f, rois) * g)))(f)
  want_grad = np.zeros((height * width, channels))
  for idx in np.ndindex(*arg.shape):
    if arg[idx] >= 0:
      want_grad[arg[idx], idx[-1]] += g[idx]
  np.testing.assert_allclose(np.asarray(grad).reshape(-1, channels), want_grad, atol=1e-5)


def test_roi_pool_tied_maxima_give_the_gradient_to_the_first_in_row_major_order(rng):
  # Three levels only: most bins hold several maxima; torchvision routes each bin's gradient
  # to the first of them in row-major order, whole; so must jaxdet, in float32 and bfloat16.
  height, width, channels, scale = 11, 9, 3, 0.5
  f = rng.integers(0, 3, (height, width, channels)).astype(np.float32)
  rois = random_rois(rng, 16, height / scale, width / scale)
  want, arg = ref_roi_pool(f, rois, 3, 3, scale)
  g = rng.normal(size=want.shape)
  want_grad = np.zeros((height * width, channels))
  for idx in np.ndindex(*arg.shape):
    if arg[idx] >= 0:
      want_grad[arg[idx], idx[-1]] += g[idx]
  for dtype, atol in ((jnp.float32, 1e-5), (jnp.bfloat16, 0.02)):
    fn = lambda f: roi_pool(f, rois, 3, scale)
    got, vjp = jax.vjp(fn, jnp.asarray(f, dtype))
    np.testing.assert_array_equal(np.asarray(got, np.float64), want)
    (grad,) = vjp(jnp.asarray(g, dtype))
    assert grad.dtype == dtype
    np.testing.assert_allclose(np.asarray(grad, np.float64).reshape(-1, channels), want_grad,
                               atol=atol, rtol=0.01)


@pytest.mark.parametrize("sampling_ratio,aligned", [(-1, False), (-1, True), (2, False),
                                                    (2, True)])
def test_roi_align_matches_reference_and_gradient_is_transpose(rng, sampling_ratio, aligned):
  height, width, channels, oh, ow, scale = 11, 8, 3, 3, 4, 0.5
  f = rng.normal(size=(height, width, channels)).astype(np.float32)
  rois = random_rois(rng, 20, height / scale, width / scale)
  want, mat = ref_roi_align(f, rois, oh, ow, scale, sampling_ratio, aligned)
  fn = jax.jit(lambda f, r: roi_align(f, r, (oh, ow), scale, sampling_ratio, aligned))
  got = fn(f, rois)
  assert got.shape == (20, oh, ow, channels) and got.dtype == jnp.float32
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)

  g = rng.normal(size=want.shape)
  _, vjp = jax.vjp(lambda f: fn(f, rois), f)
  want_grad = (mat.T @ g.reshape(-1, channels)).reshape(f.shape)
  np.testing.assert_allclose(vjp(jnp.asarray(g, jnp.float32))[0], want_grad, atol=2e-5,
                             rtol=1e-5)


def test_vmap_over_images_masked_vs_sliced_and_chunked(rng, monkeypatch):
  # A wide map, so roi_align contracts x first (the other order is covered above).
  batch, height, width, channels, oh, ow, scale = 2, 6, 20, 3, 2, 2, 0.5
  f = rng.normal(size=(batch, height, width, channels)).astype(np.float32)
  rois = np.stack([random_rois(rng, 7, height / scale, width / scale) for _ in range(batch)])
  mask = np.array([[True] * 5 + [False] * 2, [True] * 3 + [False] * 4])
  pool = jax.jit(jax.vmap(lambda f, r, m: roi_pool(f, r, 2, scale, mask=m)))
  align = jax.jit(jax.vmap(lambda f, r, m: roi_align(f, r, 2, scale, mask=m)))
  got_pool, got_align = pool(f, rois, mask), align(f, rois, mask)
  for b, n in enumerate(mask.sum(1)):
    want_pool, _ = ref_roi_pool(f[b], rois[b, :n], oh, ow, scale)
    want_align, _ = ref_roi_align(f[b], rois[b, :n], oh, ow, scale, -1, False)
    np.testing.assert_array_equal(np.asarray(got_pool[b, :n], np.float64), want_pool)
    np.testing.assert_allclose(got_align[b, :n], want_align, atol=2e-5, rtol=1e-5)
    np.testing.assert_array_equal(got_pool[b, n:], 0.0)
    np.testing.assert_array_equal(got_align[b, n:], 0.0)
  # Masked equals sliced (image 0); masked rois pass no gradient back.
  n = int(mask[0].sum())
  sliced = jax.jit(lambda f, r: (roi_pool(f, r, 2, scale), roi_align(f, r, 2, scale)))
  sliced_pool, sliced_align = sliced(f[0], rois[0, :n])
  np.testing.assert_array_equal(got_pool[0, :n], sliced_pool)
  np.testing.assert_allclose(got_align[0, :n], sliced_align, atol=1e-6)
  none = np.zeros_like(mask)
  grad = jax.jit(jax.grad(lambda f: jnp.sum(align(f, rois, none)) + jnp.sum(
      pool(f, rois, none))))(f)
  np.testing.assert_array_equal(grad, 0.0)
  # Chunked over rois (lax.map with a padded last chunk) equals one chunk.
  import jaxdet.ops.roi_pool as roi_pool_module
  monkeypatch.setattr(roi_pool_module, "_ALIGN_CHUNK_ELEMENTS", 3 * ow * height * channels)
  chunked = jax.jit(lambda f, r, m: roi_align(f, r, 2, scale, mask=m))(f[0], rois[0], mask[0])
  np.testing.assert_allclose(chunked, got_align[0], atol=1e-6)


def test_bfloat16_close_to_float32(rng):
  height, width, channels, scale = 10, 12, 4, 0.5
  f = rng.normal(size=(height, width, channels)).astype(np.float32)
  rois = random_rois(rng, 12, height / scale, width / scale)
  both = jax.jit(lambda f, r: (roi_pool(f, r, 3, scale), roi_align(f, r, 3, scale)))
  for got, want in zip(both(jnp.asarray(f, jnp.bfloat16), rois), both(f, rois)):
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=0.05, rtol=0.02)


def test_gradients_finite_on_degenerate_rois(rng):
  f = rng.normal(size=(5, 6, 2)).astype(np.float32)
  rois = np.array([[2, 2, 2, 2], [3, 3, 1, 1], [-50, -50, -40, -40], [0, 0, 1e4, 1e4],
                   [1.5, 1, 1.5, 4]], np.float32)
  for aligned in (False, True):
    def loss(f, r):
      return (jnp.sum(roi_align(f, r, 2, 1.0, aligned=aligned) ** 2)
              + jnp.sum(roi_pool(f, r, 2, 1.0) ** 2))
    gf, gr = jax.jit(jax.grad(loss, argnums=(0, 1)))(f, rois)
    assert np.isfinite(gf).all() and np.isfinite(gr).all()


def test_bad_inputs_raise_clear_errors():
  f = jnp.zeros((4, 5, 2))
  rois = jnp.zeros((3, 4))
  for op in (roi_pool, roi_align):
    with pytest.raises(ValueError, match="features: expected rank 3"):
      op(jnp.zeros((1, 4, 5, 2)), rois, 2, 1.0)
    with pytest.raises(TypeError, match="features: expected a floating dtype"):
      op(jnp.zeros((4, 5, 2), jnp.int32), rois, 2, 1.0)
    with pytest.raises(ValueError, match="rois: expected last dimension 4"):
      op(f, jnp.zeros((3, 5)), 2, 1.0)
    with pytest.raises(ValueError, match="output_size: expected values > 0"):
      op(f, rois, (2, 0), 1.0)
    with pytest.raises(TypeError, match="output_size: expected an int or a pair"):
      op(f, rois, (2, 2, 2), 1.0)
    with pytest.raises(ValueError, match="spatial_scale: expected values > 0"):
      op(f, rois, 2, -0.5)
    with pytest.raises(ValueError, match="mask: expected a bool mask of shape \\(3,\\)"):
      op(f, rois, 2, 1.0, mask=jnp.ones((4,), bool))
  with pytest.raises(TypeError, match="sampling_ratio: expected an int"):
    roi_align(f, rois, 2, 1.0, sampling_ratio=2.0)
