"""crop_and_resize against a float64 loop reference and OpenCV's bilinear resize."""

import cv2
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdet.ops import crop_resize


def _reference(image, box, out_h, out_w, height, width, fill, context):
  """float64 loop over output pixels, written from the documented semantics."""
  image = np.asarray(image, np.float64)
  x1, y1, x2, y2 = np.asarray(box, np.float64)
  if context:
    cx, cy, hw, hh = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) / 2, (y2 - y1) / 2
    hw *= out_w / (out_w - 2 * context)
    hh *= out_h / (out_h - 2 * context)
    x1, x2, y1, y2 = cx - hw, cx + hw, cy - hh, cy + hh
  out = np.zeros((out_h, out_w, image.shape[2]))
  for i in range(out_h):
    for j in range(out_w):
      y = y1 + (i + 0.5) * (y2 - y1) / out_h
      x = x1 + (j + 0.5) * (x2 - x1) / out_w
      if not (0 <= y <= height and 0 <= x <= width):
        out[i, j] = fill
        continue
      py = min(max(y - 0.5, 0.0), height - 1)
      px = min(max(x - 0.5, 0.0), width - 1)
      r0, c0 = int(np.floor(py)), int(np.floor(px))
      r1, c1 = min(r0 + 1, height - 1), min(c0 + 1, width - 1)
      a, b = py - r0, px - c0
      out[i, j] = ((1 - a) * (1 - b) * image[r0, c0] + (1 - a) * b * image[r0, c1]
                   + a * (1 - b) * image[r1, c0] + a * b * image[r1, c1])
  return out


def _random_boxes(rng, n, h, w):
  xy = rng.uniform(-10, [w + 5, h + 5], size=(n, 2))
  wh = rng.uniform(0.5, [w / 1.5, h / 1.5], size=(n, 2))
  return np.concatenate([xy, xy + wh], 1).astype(np.float32)


def test_matches_loop_reference_with_context_padding_and_mask(rng):
  image = rng.uniform(-2, 2, size=(2, 23, 31, 3)).astype(np.float32)
  boxes = np.stack([_random_boxes(rng, 6, 20, 27) for _ in range(2)])
  sizes = np.array([[23, 31], [20, 27]], np.int32)    # the second image has padding
  mask = np.ones((2, 6), bool)
  mask[1, 4:] = False
  fn = jax.jit(lambda im, b, s, m: crop_resize.batch_crop_and_resize(
      im, b, (9, 7), context=2.0, image_size=s, fill=0.25, mask=m))
  out = np.asarray(fn(image, boxes, sizes, mask))
  assert out.shape == (2, 6, 9, 7, 3)
  for bi in range(2):
    for k in range(6):
      if not mask[bi, k]:
        np.testing.assert_array_equal(out[bi, k], 0.25)
        continue
      ref = _reference(image[bi], boxes[bi, k], 9, 7, sizes[bi, 0], sizes[bi, 1], 0.25, 2.0)
      np.testing.assert_allclose(out[bi, k], ref, atol=2e-5)
  # masked rows vs the sliced call
  sliced = crop_resize.crop_and_resize(image[1], boxes[1, :4], (9, 7), context=2.0,
                                       image_size=sizes[1], fill=0.25)
  np.testing.assert_allclose(out[1, :4], sliced, atol=1e-5)


def test_whole_image_equals_opencv_resize(rng):
  image = rng.uniform(0, 255, size=(17, 26, 3)).astype(np.float32)
  whole = jnp.array([[0.0, 0.0, 26.0, 17.0]])
  for oh, ow in ((40, 33), (17, 26)):     # up-sampling, and the identity
    out = jax.jit(lambda im: crop_resize.crop_and_resize(im, whole, (oh, ow)))(image)
    ref = cv2.resize(image, (ow, oh), interpolation=cv2.INTER_LINEAR)
    np.testing.assert_allclose(np.asarray(out[0]), ref, atol=1e-3)
  np.testing.assert_allclose(np.asarray(out[0]), image, atol=1e-3)


def test_dilation_leaves_context_pixels():
  boxes = jnp.array([[10.0, 20.0, 50.0, 40.0]])
  d = np.asarray(crop_resize.dilate_boxes(boxes, 16, (227, 227)))[0]
  # the original box spans exactly 227 - 32 output pixels of the dilated box
  np.testing.assert_allclose((40.0 / (d[2] - d[0])) * 227, 227 - 32, rtol=1e-5)
  np.testing.assert_allclose((20.0 / (d[3] - d[1])) * 227, 227 - 32, rtol=1e-5)
  np.testing.assert_allclose([(d[0] + d[2]) / 2, (d[1] + d[3]) / 2], [30.0, 30.0])


def test_gradients_finite_on_degenerate_boxes(rng):
  image = jnp.asarray(rng.normal(size=(12, 12, 3)), jnp.float32)
  boxes = jnp.array([[3.0, 3.0, 3.0, 3.0], [5.0, 6.0, 2.0, 1.0], [-50, -50, -40, -40.0]])
  g = jax.grad(lambda im: crop_resize.crop_and_resize(im, boxes, (4, 4), context=1).sum())(image)
  assert np.all(np.isfinite(np.asarray(g)))


def test_bad_inputs_named():
  with pytest.raises(ValueError, match="boxes"):
    crop_resize.crop_and_resize(jnp.zeros((8, 8, 3)), jnp.zeros((3, 5)), (4, 4))
  with pytest.raises(ValueError, match="context"):
    crop_resize.crop_and_resize(jnp.zeros((8, 8, 3)), jnp.zeros((3, 4)), (4, 4), context=2)
  with pytest.raises(ValueError, match="mask"):
    crop_resize.crop_and_resize(jnp.zeros((8, 8, 3)), jnp.zeros((3, 4)), (4, 4),
                                mask=jnp.ones((2,), bool))
