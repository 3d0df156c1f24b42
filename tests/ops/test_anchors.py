"""jaxdet.ops.anchors: shapes, areas, ratios, order and the border mask, against loops in NumPy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdet.ops import anchors as A


def test_base_anchors_areas_ratios_centres_and_order(rng):
  scales = tuple(rng.uniform(8, 300, 3))
  ratios = tuple(rng.uniform(0.3, 3.0, 4))
  base = np.asarray(A.base_anchors(scales, ratios), np.float64)
  assert base.shape == (12, 4) and A.base_anchors(scales, ratios).dtype == jnp.float32
  w, h = base[:, 2] - base[:, 0], base[:, 3] - base[:, 1]
  # Ratio-major, scale-minor, as py-faster-rcnn's generate_anchors enumerates them.
  want_s = np.tile(scales, len(ratios))
  want_r = np.repeat(ratios, len(scales))
  np.testing.assert_allclose(w * h, want_s ** 2, rtol=1e-5)
  np.testing.assert_allclose(h / w, want_r, rtol=1e-5)
  np.testing.assert_allclose(base[:, :2] + base[:, 2:], 0.0, atol=1e-4)   # centred at (0, 0)
  # The classic Faster R-CNN set: 9 anchors, square ones of side 128, 256, 512.
  classic = np.asarray(A.base_anchors((128, 256, 512), (0.5, 1.0, 2.0)))
  np.testing.assert_allclose(classic[3:6], [[-64, -64, 64, 64], [-128, -128, 128, 128],
                                            [-256, -256, 256, 256]])


def ref_grid(base, fh, fw, sy, sx):
  out = []
  for y in range(fh):
    for x in range(fw):
      for b in base:
        cx, cy = (x + 0.5) * sx, (y + 0.5) * sy
        out.append([cx + b[0], cy + b[1], cx + b[2], cy + b[3]])
  return np.array(out).reshape(-1, 4)


@pytest.mark.parametrize("feature_size,stride", [((3, 5), 16), ((4, 2), (8.0, 12.0))])
def test_grid_anchors_match_loop_reference(feature_size, stride):
  base = A.base_anchors((32, 64), (0.5, 1.0, 2.0))
  fh, fw = feature_size
  sy, sx = stride if isinstance(stride, tuple) else (stride, stride)
  got = A.grid_anchors(base, feature_size, stride)
  assert got.shape == (fh * fw * 6, 4) and got.dtype == jnp.float32
  np.testing.assert_allclose(got, ref_grid(np.asarray(base, np.float64), fh, fw, sy, sx),
                             atol=1e-4)
  # The same under jit with the base anchors traced.
  jitted = jax.jit(A.grid_anchors, static_argnums=(1, 2))(base, feature_size, stride)
  np.testing.assert_allclose(jitted, got, atol=1e-5)


def test_grid_anchors_line_up_with_a_reshaped_conv_output():
  fh, fw, stride = 3, 4, 16
  base = A.base_anchors((40,), (0.5, 1.0, 2.0))
  num_a = base.shape[0]
  # A fake NHWC head output [fh, fw, A * 3] holding (y, x, a) for every anchor slot.
  yy, xx, aa = np.meshgrid(np.arange(fh), np.arange(fw), np.arange(num_a), indexing="ij")
  head = np.stack([yy, xx, aa], -1).reshape(fh, fw, num_a * 3)
  rows = head.reshape(fh, fw, num_a, 3).reshape(-1, 3)
  anchors = np.asarray(A.grid_anchors(base, (fh, fw), stride))
  centres = (anchors[:, :2] + anchors[:, 2:]) / 2
  np.testing.assert_allclose(centres, (rows[:, 1::-1] + 0.5) * stride, atol=1e-4)
  np.testing.assert_allclose(anchors - np.tile(centres, 2), np.asarray(base)[rows[:, 2]],
                             atol=1e-4)


def test_anchors_inside_mask_matches_reference_under_vmap(rng):
  anchors = A.grid_anchors(A.base_anchors((24, 48), (0.5, 1.0, 2.0)), (4, 5), 10)
  sizes = rng.uniform(30, 70, (3, 2))
  a = np.asarray(anchors, np.float64)
  for border in (0, 7.5):
    f = jax.jit(jax.vmap(lambda s: A.anchors_inside_mask(anchors, s[0], s[1], border)))
    got = np.asarray(f(jnp.asarray(sizes, jnp.float32)))
    for i, (h, w) in enumerate(sizes):
      want = np.array([b[0] >= -border and b[1] >= -border and b[2] <= w + border
                       and b[3] <= h + border for b in a])
      np.testing.assert_array_equal(got[i], want)
  # An anchor exactly on the border is inside.
  edge = jnp.array([[0.0, 0.0, 20.0, 10.0], [0.0, -0.5, 20.0, 10.0]])
  np.testing.assert_array_equal(A.anchors_inside_mask(edge, 10, 20), [True, False])


def test_bad_arguments_raise():
  with pytest.raises(ValueError, match="ratios: expected values > 0"):
    A.base_anchors((32,), (0.5, 0.0))
  with pytest.raises(ValueError, match="scales, ratios: expected non-empty"):
    A.base_anchors((), (1.0,))
  base = A.base_anchors((32,), (1.0,))
  with pytest.raises(ValueError, match="feature_size: expected a pair of ints"):
    A.grid_anchors(base, (3.5, 4), 16)
  with pytest.raises(ValueError, match="stride: expected values > 0"):
    A.grid_anchors(base, (3, 4), 0)
  with pytest.raises(ValueError, match="base: expected last dimension 4"):
    A.grid_anchors(jnp.zeros((3, 2)), (3, 4), 16)
  with pytest.raises(ValueError, match="allowed_border: expected values >= 0"):
    A.anchors_inside_mask(base, 10, 10, allowed_border=-1)
