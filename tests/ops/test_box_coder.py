"""jaxdet.ops.box_coder against a float64 NumPy reference of the R-CNN parameterisation."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdet.ops import box_coder as C


def random_boxes(rng, shape, max_side=80.0):
  xy = rng.uniform(-20, 200, shape + (2,))
  wh = rng.uniform(2.0, max_side, shape + (2,))
  return np.concatenate([xy, xy + wh], axis=-1)


def ref_encode(g, a):
  """R-CNN appendix C: t = ((gx - ax) / aw, (gy - ay) / ah, log(gw / aw), log(gh / ah))."""
  gw, gh = g[..., 2] - g[..., 0], g[..., 3] - g[..., 1]
  aw, ah = a[..., 2] - a[..., 0], a[..., 3] - a[..., 1]
  gx, gy = g[..., 0] + gw / 2, g[..., 1] + gh / 2
  ax, ay = a[..., 0] + aw / 2, a[..., 1] + ah / 2
  return np.stack([(gx - ax) / aw, (gy - ay) / ah, np.log(gw / aw), np.log(gh / ah)], -1)


def ref_decode(d, a, clamp):
  aw, ah = a[..., 2] - a[..., 0], a[..., 3] - a[..., 1]
  ax, ay = a[..., 0] + aw / 2, a[..., 1] + ah / 2
  x, y = ax + d[..., 0] * aw, ay + d[..., 1] * ah
  w = aw * np.exp(np.minimum(d[..., 2], clamp))
  h = ah * np.exp(np.minimum(d[..., 3], clamp))
  return np.stack([x - w / 2, y - h / 2, x + w / 2, y + h / 2], -1)


def test_encode_and_decode_match_reference_with_each_normalisation(rng):
  g = random_boxes(rng, (2, 6))
  a = random_boxes(rng, (2, 6))
  raw = ref_encode(g, a)
  gj, aj = jnp.asarray(g, jnp.float32), jnp.asarray(a, jnp.float32)
  tol = dict(rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(C.encode_boxes(gj, aj), raw, **tol)

  weights = (10.0, 10.0, 5.0, 5.0)
  np.testing.assert_allclose(C.encode_boxes(gj, aj, weights=weights), raw * weights, **tol)
  means, stds = (0.1, -0.2, 0.05, 0.0), (0.1, 0.1, 0.2, 0.2)
  normalised = (raw - means) / np.asarray(stds)
  np.testing.assert_allclose(C.encode_boxes(gj, aj, means=means, stds=stds), normalised, **tol)
  # torchvision's weights (10, 10, 5, 5) are py-faster-rcnn's stds (0.1, 0.1, 0.2, 0.2).
  np.testing.assert_allclose(C.encode_boxes(gj, aj, weights=weights),
                             C.encode_boxes(gj, aj, stds=stds), **tol)

  d = rng.normal(0, 1.5, (2, 6, 4))
  clamp = math.log(1000 / 16)
  want = ref_decode(d, a, clamp)
  dj = jnp.asarray(d, jnp.float32)
  np.testing.assert_allclose(C.decode_boxes(dj, aj), want, rtol=1e-4, atol=1e-3)
  np.testing.assert_allclose(C.decode_boxes(dj * np.asarray(weights), aj, weights=weights),
                             want, rtol=1e-4, atol=1e-3)
  np.testing.assert_allclose(
      C.decode_boxes(jnp.asarray((d - means) / np.asarray(stds), jnp.float32), aj,
                     means=means, stds=stds), want, rtol=1e-4, atol=1e-3)


def test_round_trip_under_jit_and_vmap(rng):
  g = random_boxes(rng, (3, 5))
  a = random_boxes(rng, (3, 5))
  kw = dict(means=(0.0, 0.1, 0.0, -0.1), stds=(0.1, 0.1, 0.2, 0.2))
  f = jax.jit(jax.vmap(lambda gg, aa: C.decode_boxes(C.encode_boxes(gg, aa, **kw), aa,
                                                     clamp=None, **kw)))
  np.testing.assert_allclose(f(jnp.asarray(g, jnp.float32), jnp.asarray(a, jnp.float32)), g,
                             rtol=1e-4, atol=2e-3)


def test_decode_clamps_growth(rng):
  a = jnp.asarray(random_boxes(rng, (4,)), jnp.float32)
  d = jnp.array([[0, 0, 20.0, 20.0]] * 4, jnp.float32)
  wh = lambda b: np.asarray(b[:, 2:] - b[:, :2])
  np.testing.assert_allclose(wh(C.decode_boxes(d, a)), wh(a) * 1000 / 16, rtol=1e-4)
  np.testing.assert_allclose(wh(C.decode_boxes(d, a, clamp=1.0)), wh(a) * math.e, rtol=1e-4)


def test_finite_values_and_gradients_for_degenerate_boxes():
  anchors = jnp.array([[0, 0, 0, 0], [5, 5, 5, 9], [8, 8, 4, 4], [0, 0, 16, 16]], jnp.float32)
  boxes = jnp.array([[1, 1, 1, 1], [0, 0, 10, 10], [3, 3, 3, 3], [9, 9, 2, 2]], jnp.float32)
  deltas = jnp.array([[0, 0, 0, 0], [1e3, -1e3, 1e3, -1e3], [0, 0, -1e3, 50], [1, 1, 1, 1]],
                     jnp.float32)

  def both(b, a, d):
    return (C.encode_boxes(b, a, weights=(10, 10, 5, 5)).sum()
            + C.decode_boxes(d, a, weights=(10, 10, 5, 5)).sum())

  value, grads = jax.jit(jax.value_and_grad(both, argnums=(0, 1, 2)))(boxes, anchors, deltas)
  assert np.isfinite(value)
  for g in grads:
    assert np.all(np.isfinite(g))


def test_bad_arguments_raise():
  b = jnp.zeros((3, 4))
  with pytest.raises(ValueError, match="weights: give either weights or means/stds"):
    C.encode_boxes(b, b, weights=(1, 1, 1, 1), stds=(0.1, 0.1, 0.2, 0.2))
  with pytest.raises(ValueError, match="stds: expected values > 0"):
    C.decode_boxes(b, b, stds=(0.1, 0.0, 0.2, 0.2))
  with pytest.raises(ValueError, match="weights: expected a tuple of 4 numbers"):
    C.encode_boxes(b, b, weights=(10, 10, 5))
  with pytest.raises(ValueError, match="anchors: expected last dimension 4"):
    C.encode_boxes(b, jnp.zeros((3, 2)))
  with pytest.raises(TypeError, match="deltas: expected a floating dtype"):
    C.decode_boxes(jnp.zeros((3, 4), jnp.int32), b)
