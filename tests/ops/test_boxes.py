"""jaxdet.ops.boxes against float64 NumPy references written from the definitions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdet.ops import boxes as B


def random_boxes(rng, shape, degenerate=0.0):
  """f64[*shape, 4] (x1, y1, x2, y2); a `degenerate` share has zero width/height or x2 < x1."""
  xy = rng.uniform(-10, 100, shape + (2,))
  wh = rng.uniform(0.5, 60, shape + (2,))
  if degenerate:
    kind = rng.integers(0, 4, shape)
    pick = rng.random(shape) < degenerate
    wh[..., 0] = np.where(pick & (kind == 0), 0.0, wh[..., 0])               # zero width
    wh[..., :] = np.where((pick & (kind == 1))[..., None], 0.0, wh)           # a point
    wh[..., 1] = np.where(pick & (kind == 2), -wh[..., 1], wh[..., 1])        # y2 < y1
  return np.concatenate([xy, xy + wh], axis=-1)


# --- references: one pair of boxes at a time, float64 --------------------------------------------

def ref_area(b):
  return max(b[2] - b[0], 0.0) * max(b[3] - b[1], 0.0)


def ref_iou_giou(a, b):
  iw = max(min(a[2], b[2]) - max(a[0], b[0]), 0.0)
  ih = max(min(a[3], b[3]) - max(a[1], b[1]), 0.0)
  inter = iw * ih
  union = ref_area(a) + ref_area(b) - inter
  cw = max(max(a[2], b[2]) - min(a[0], b[0]), 0.0)
  ch = max(max(a[3], b[3]) - min(a[1], b[1]), 0.0)
  enclosing = cw * ch
  iou = inter / union if union > 0 else 0.0
  giou = iou - ((enclosing - union) / enclosing if enclosing > 0 else 0.0)
  return iou, giou


def ref_pairwise(a, b):
  out = np.array([[ref_iou_giou(p, q) for q in b] for p in a]).reshape(len(a), len(b), 2)
  return out[..., 0], out[..., 1]


# --- conversions ----------------------------------------------------------------------------------

def test_conversions_match_definitions_and_round_trip(rng):
  b = random_boxes(rng, (2, 5))
  x1, y1, x2, y2 = np.moveaxis(b, -1, 0)
  w, h = x2 - x1, y2 - y1
  bj = jnp.asarray(b, jnp.float32)
  tol = dict(rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(B.xyxy_to_xywh(bj), np.stack([x1, y1, w, h], -1), **tol)
  np.testing.assert_allclose(B.xyxy_to_cxcywh(bj),
                             np.stack([x1 + w / 2, y1 + h / 2, w, h], -1), **tol)
  np.testing.assert_allclose(B.xywh_to_xyxy(B.xyxy_to_xywh(bj)), b, **tol)
  np.testing.assert_allclose(B.cxcywh_to_xyxy(B.xyxy_to_cxcywh(bj)), b, **tol)
  height, width = 120.0, 170.0
  normalized = np.stack([y1 / height, x1 / width, y2 / height, x2 / width], -1)
  np.testing.assert_allclose(B.xyxy_to_yxyx_normalized(bj, height, width), normalized,
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(
      B.yxyx_normalized_to_xyxy(jnp.asarray(normalized, jnp.float32), height, width), b, **tol)
  assert B.xyxy_to_xywh(bj).dtype == jnp.float32


def test_conversions_take_traced_image_sizes_under_jit_and_vmap(rng):
  b = random_boxes(rng, (3, 4))
  sizes = rng.uniform(50, 200, (3, 2))                     # (height, width) per image
  f = jax.jit(jax.vmap(lambda bb, s: B.yxyx_normalized_to_xyxy(
      B.xyxy_to_yxyx_normalized(bb, s[0], s[1]), s[0], s[1])))
  np.testing.assert_allclose(f(jnp.asarray(b, jnp.float32), jnp.asarray(sizes, jnp.float32)), b,
                             rtol=1e-5, atol=1e-4)


def test_clip_boxes_and_small_box_mask(rng):
  b = random_boxes(rng, (3, 7), degenerate=0.3)
  sizes = rng.uniform(20, 80, (3, 2))
  clip = jax.jit(jax.vmap(lambda bb, s: B.clip_boxes(bb, s[0], s[1])))
  got = clip(jnp.asarray(b, jnp.float32), jnp.asarray(sizes, jnp.float32))
  want = b.copy()
  for i, (h, w) in enumerate(sizes):
    want[i, :, 0::2] = np.minimum(np.maximum(b[i, :, 0::2], 0), w)
    want[i, :, 1::2] = np.minimum(np.maximum(b[i, :, 1::2], 0), h)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(B.clip_boxes(jnp.asarray(b[0], jnp.float32), 50, 60),
                             np.clip(b[0], 0, [60, 50, 60, 50]), rtol=1e-5, atol=1e-4)

  min_size = 10.0
  want_keep = ((b[..., 2] - b[..., 0]) >= min_size) & ((b[..., 3] - b[..., 1]) >= min_size)
  # Away from the threshold, float32 and float64 agree.
  safe = (np.abs(b[..., 2] - b[..., 0] - min_size) > 1e-3) & (
      np.abs(b[..., 3] - b[..., 1] - min_size) > 1e-3)
  got_keep = np.asarray(B.small_box_mask(jnp.asarray(b, jnp.float32), min_size))
  assert got_keep.dtype == bool and got_keep.shape == (3, 7)
  np.testing.assert_array_equal(got_keep[safe], want_keep[safe])
  edge = jnp.array([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 9.5, 20.0]])
  np.testing.assert_array_equal(B.small_box_mask(edge, 10.0), [True, False])


# --- IoU and GIoU --------------------------------------------------------------------------------

@pytest.mark.parametrize("n,m", [(1, 1), (7, 5)])
def test_pairwise_iou_and_giou_match_reference(rng, n, m):
  a = random_boxes(rng, (n,), degenerate=0.2)
  b = random_boxes(rng, (m,), degenerate=0.2)
  b[: min(n, m) // 2] = a[: min(n, m) // 2]                 # some identical pairs
  want_iou, want_giou = ref_pairwise(a, b)
  aj, bj = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
  iou, giou = B.box_iou(aj, bj), B.generalized_box_iou(aj, bj)
  assert iou.shape == (n, m) and giou.shape == (n, m)
  np.testing.assert_allclose(iou, want_iou, atol=2e-5)
  np.testing.assert_allclose(giou, want_giou, atol=2e-5)


def test_iou_properties(rng):
  a = jnp.asarray(random_boxes(rng, (9,), degenerate=0.2), jnp.float32)
  b = jnp.asarray(random_boxes(rng, (6,), degenerate=0.2), jnp.float32)
  both = jax.jit(lambda x, y: (B.box_iou(x, y), B.generalized_box_iou(x, y)))
  iou, giou = both(a, b)
  iou_t, giou_t = both(b, a)
  np.testing.assert_allclose(iou, iou_t.T, atol=1e-6)
  np.testing.assert_allclose(giou, giou_t.T, atol=1e-6)
  assert np.all((iou >= 0) & (iou <= 1))
  assert np.all((giou >= -1) & (giou <= 1))
  assert np.all(giou <= iou + 1e-6)
  # A box with positive area has IoU 1 and GIoU 1 with itself.
  real = np.asarray(B.box_area(a)) > 0
  self_iou, self_giou = both(a, a)
  np.testing.assert_allclose(np.diag(self_iou)[real], 1.0, atol=1e-6)
  np.testing.assert_allclose(np.diag(self_giou)[real], 1.0, atol=1e-6)
  # Scale invariance of both.
  scaled_iou, scaled_giou = both(3 * a, 3 * b)
  np.testing.assert_allclose(scaled_iou, iou, atol=1e-5)
  np.testing.assert_allclose(scaled_giou, giou, atol=1e-5)


def test_elementwise_matches_reference_under_jit_and_vmap(rng):
  a = random_boxes(rng, (3, 8), degenerate=0.2)
  b = random_boxes(rng, (3, 8), degenerate=0.2)
  b[:, :2] = a[:, :2]
  want = np.array([[ref_iou_giou(p, q) for p, q in zip(ra, rb)] for ra, rb in zip(a, b)])
  aj, bj = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
  f = jax.jit(lambda x, y: (B.elementwise_box_iou(x, y), B.elementwise_generalized_box_iou(x, y)))
  iou, giou = f(aj, bj)
  np.testing.assert_allclose(iou, want[..., 0], atol=2e-5)
  np.testing.assert_allclose(giou, want[..., 1], atol=2e-5)
  # vmap of the pairwise op over images, against the elementwise op on broadcast pairs.
  pair = jax.jit(jax.vmap(lambda x, y: (B.box_iou(x, y), B.generalized_box_iou(x, y))))
  piou, pgiou = pair(aj, bj)
  np.testing.assert_allclose(piou, B.elementwise_box_iou(aj[:, :, None], bj[:, None]),
                             atol=1e-6)
  np.testing.assert_allclose(pgiou, B.elementwise_generalized_box_iou(aj[:, :, None],
                                                                      bj[:, None]), atol=1e-6)


def test_gradients_are_finite_for_degenerate_boxes():
  a = jnp.array([[0, 0, 0, 0], [1, 1, 1, 5], [4, 4, 2, 2], [0, 0, 10, 10], [3, 3, 3, 3]],
                jnp.float32)
  b = jnp.array([[0, 0, 0, 0], [1, 1, 1, 5], [4, 4, 2, 2], [5, 5, 5, 5], [3, 3, 3, 3]],
                jnp.float32)
  fns = [lambda x, y: B.box_iou(x, y).sum(), lambda x, y: B.generalized_box_iou(x, y).sum(),
         lambda x, y: B.elementwise_box_iou(x, y).sum(),
         lambda x, y: B.elementwise_generalized_box_iou(x, y).sum(),
         lambda x, y: B.box_area(x).sum() + B.clip_boxes(y, 4.0, 4.0).sum()]
  # One compiled program for all of them (eager dispatch of each op is slow).
  results = jax.jit(lambda x, y: [jax.value_and_grad(f, argnums=(0, 1))(x, y) for f in fns])(a, b)
  for value, (ga, gb) in results:
    assert np.isfinite(value)
    assert np.all(np.isfinite(ga)) and np.all(np.isfinite(gb))


def test_bad_inputs_raise_clear_errors():
  good = jnp.zeros((3, 4))
  with pytest.raises(ValueError, match="a: expected last dimension 4"):
    B.box_iou(jnp.zeros((3, 5)), good)
  with pytest.raises(ValueError, match="b: expected rank 2"):
    B.generalized_box_iou(good, jnp.zeros((2, 3, 4)))
  with pytest.raises(TypeError, match="boxes: expected a floating dtype"):
    B.xyxy_to_xywh(jnp.zeros((3, 4), jnp.int32))
  with pytest.raises(ValueError, match="b: expected a shape that broadcasts"):
    B.elementwise_box_iou(good, jnp.zeros((2, 4)))
  with pytest.raises(ValueError, match="boxes: expected last dimension 4"):
    B.clip_boxes(jnp.zeros((3, 2)), 10, 10)
