"""Faults in jaxdet.ops: non-finite boxes, NaN under a False mask, empty feature maps.

Each test is a reported fault: NMS picking a NaN box, IoU of a NaN box being 0 only by accident
(with NaN gradients for its partners), a NaN roi under a False mask poisoning the feature
gradient of RoI align, and roi ops on a 0 x 0 map failing with ZeroDivisionError / IndexError.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdet.ops import boxes as B
from jaxdet.ops import windows
from jaxdet.ops.crop_resize import batch_crop_and_resize, crop_and_resize
from jaxdet.ops.matching import match_boxes
from jaxdet.ops.nms import batched_nms, multiclass_nms, nms
from jaxdet.ops.roi_pool import roi_align, roi_pool

NAN, INF = float("nan"), float("inf")


def _picked(indices, valid):
  return [int(i) for i, v in zip(np.asarray(indices), np.asarray(valid)) if v]


# --- NMS never picks a non-finite box or score -----------------------------------------------


def test_nms_never_picks_non_finite_boxes_or_scores():
  boxes = np.array([[0, 0, 10, 10], [NAN, 0, 10, 10], [20, 20, 30, 30], [0, 0, INF, 10],
                    [40, 40, 50, 50], [60, 60, 70, 70], [80, 80, 90, 90]], np.float32)
  scores = np.array([0.5, 0.99, 0.4, 0.98, INF, -INF, 0.3], np.float32)
  idx, valid = jax.jit(lambda b, s: nms(b, s, 0.5, 7))(boxes, scores)
  # The finite boxes with finite scores, by score; a non-finite box or score is never a pick.
  assert _picked(idx, valid) == [0, 2, 6]
  classes = np.array([0, 1, 0, 1, 0, 1, 1], np.int32)
  idx, valid = jax.jit(lambda b, s, c: batched_nms(b, s, c, 0.5, 7))(boxes, scores, classes)
  assert _picked(idx, valid) == [0, 2, 6]
  # Per-class boxes: a NaN box of one class does not stop the finite box of another.
  per_class = np.stack([boxes, boxes[[1, 0, 2, 3, 4, 5, 6]]], axis=1)       # [7, 2, 4]
  out = jax.jit(lambda b, s: multiclass_nms(b, s, iou_threshold=0.5, max_output=14,
                                            score_threshold=-1e9))(
      per_class, np.stack([scores, scores], axis=1))
  got = np.asarray(out["boxes"])[np.asarray(out["valid"])]
  assert np.isfinite(got).all() and np.isfinite(np.asarray(out["scores"])).all()
  assert len(got) == 6      # boxes 0, 2, 6 of class 0; boxes 1 (= box 0), 2, 6 of class 1


def test_nms_non_finite_box_does_not_suppress_or_get_suppressed():
  # A NaN box overlaps nothing: the finite boxes behind it survive exactly as without it.
  boxes = np.array([[0, 0, 10, 10], [0, 0, NAN, 10], [1, 1, 10, 10]], np.float32)
  scores = np.array([0.5, 0.9, 0.4], np.float32)
  run = jax.jit(lambda b, s: nms(b, s, 0.5, 3))
  with_nan = _picked(*run(boxes, scores))
  without = _picked(*run(boxes[[0, 2]], scores[[0, 2]]))
  assert with_nan == [[0, 2][i] for i in without] == [0]


# --- IoU with a non-finite box is 0, with finite gradients for its partner -----------------


def test_box_iou_of_non_finite_box_is_zero_with_finite_gradients():
  a = np.array([[0, 0, 10, 10], [5, 5, 15, 15]], np.float32)
  b = np.array([[2, 2, 12, 12], [NAN, 0, 4, 4], [0, 0, INF, INF], [-INF, 0, 3, 3]], np.float32)
  for fn in (B.box_iou, B.generalized_box_iou):
    value_and_grad = jax.jit(jax.value_and_grad(lambda a, b: jnp.sum(fn(a, b) * np.arange(
        1.0, 1.0 + b.shape[0]))))
    got = np.asarray(jax.jit(fn)(a, b))
    assert np.isfinite(got).all()
    np.testing.assert_array_equal(got[:, 1:], 0.0)
    np.testing.assert_allclose(got[:, :1], np.asarray(jax.jit(fn)(a, b[:1])), rtol=1e-6)
    value, grad = value_and_grad(a, b)
    want_value, want_grad = value_and_grad(a, b[:1])
    np.testing.assert_allclose(value, want_value, rtol=1e-6)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-6)
  for fn in (B.elementwise_box_iou, B.elementwise_generalized_box_iou):
    pair = np.broadcast_to(a[:1], b.shape)
    got = np.asarray(jax.jit(fn)(pair, b))
    np.testing.assert_array_equal(got[1:], 0.0)
    grad = np.asarray(jax.jit(jax.grad(lambda p: jnp.sum(fn(p, b))))(pair))
    assert np.isfinite(grad).all()
    np.testing.assert_array_equal(grad[1:], 0.0)
  np.testing.assert_array_equal(B.finite_box_mask(b), [True, False, False, False])


def test_matching_never_matches_non_finite_iou_or_boxes():
  # A non-finite gt box is never the matched gt of a positive row, even with low-quality
  # matches; an IoU matrix with NaN entries (e.g. from a user's own overlap) counts them as
  # no overlap.
  rows = np.array([[0, 0, 10, 10], [20, 20, 30, 30]], np.float32)
  gt = np.array([[NAN, 0, 10, 10], [20, 20, 30, 31]], np.float32)
  matched, max_iou, labels = match_boxes(B.box_iou(rows, gt), np.array([True, True]),
                                         high=0.5, low=0.3, allow_low_quality=True)
  np.testing.assert_array_equal(labels, [0, 1])
  assert int(matched[1]) == 1 and np.isfinite(np.asarray(max_iou)).all()
  iou = np.array([[NAN, 0.2], [0.9, NAN]], np.float32)
  matched, max_iou, labels = match_boxes(iou, np.array([True, True]), high=0.5, low=0.3,
                                         allow_low_quality=True)
  np.testing.assert_array_equal(matched, [1, 0])
  np.testing.assert_allclose(max_iou, [0.2, 0.9])
  np.testing.assert_array_equal(labels, [1, 1])   # row 0 is gt 1's best row (low quality)


def test_merge_boxes_drops_non_finite_boxes():
  boxes = np.array([[0, 0, 10, 10], [NAN, 0, 10, 10], [1, 0, 11, 10]], np.float32)
  out = windows.merge_boxes(boxes, np.array([0.5, 0.9, 0.4], np.float32),
                            np.zeros(3, np.int32), np.ones(3, bool), threshold=0.6)
  got = np.asarray(out["boxes"])[np.asarray(out["valid"])]
  assert np.isfinite(got).all()
  np.testing.assert_allclose(got, [[0.5, 0, 10.5, 10]])
  np.testing.assert_allclose(np.asarray(out["scores"])[np.asarray(out["valid"])], [0.9])


# --- masked NaN rois: gradients finite and equal to the sliced input's ---------------------


def test_roi_ops_nan_roi_under_false_mask_leaves_gradients_of_the_sliced_input(rng):
  f = rng.normal(size=(6, 7, 3)).astype(np.float32)
  rois = np.array([[1, 1, 9, 8], [NAN, 2, 5, 6], [2, 3, 12, 10], [0, INF, 4, 4]], np.float32)
  mask = np.array([True, False, True, False])
  keep = mask.nonzero()[0]
  ops = {
      "roi_align": lambda f, r, m: roi_align(f, r, 2, 0.5, mask=m),
      "roi_align_aligned": lambda f, r, m: roi_align(f, r, 3, 0.5, 2, True, mask=m),
      "roi_pool": lambda f, r, m: roi_pool(f, r, 2, 0.5, mask=m),
      "crop_and_resize": lambda f, r, m: crop_and_resize(f, r, (3, 4), mask=m),
  }
  for name, op in ops.items():
    shape = jax.eval_shape(lambda f, r: op(f, r, None), f, rois[keep]).shape
    weights = rng.normal(size=shape).astype(np.float32)
    def masked(f, r, op=op):
      out = op(f, r, mask)
      return jnp.sum(out[keep] * weights), out
    def sliced(f, r, op=op):
      return jnp.sum(op(f, r, None) * weights)
    (value, out), (gf, gr) = jax.jit(jax.value_and_grad(masked, argnums=(0, 1), has_aux=True))(
        f, rois)
    want, (want_f, want_r) = jax.jit(jax.value_and_grad(sliced, argnums=(0, 1)))(f, rois[keep])
    assert np.isfinite(value), name
    assert np.isfinite(gf).all() and np.isfinite(gr).all(), name
    np.testing.assert_allclose(value, want, rtol=1e-5, atol=1e-5, err_msg=name)
    np.testing.assert_allclose(gf, want_f, rtol=1e-5, atol=1e-5, err_msg=name)
    np.testing.assert_allclose(gr[keep], want_r, rtol=1e-4, atol=1e-4, err_msg=name)
    np.testing.assert_array_equal(gr[~mask], 0.0)
    np.testing.assert_array_equal(np.asarray(out)[~mask], 0.0)   # masked rows: the fill (0)


def test_roi_ops_non_finite_roi_without_mask_is_treated_as_padding(rng):
  f = rng.normal(size=(6, 7, 3)).astype(np.float32)
  rois = np.array([[1, 1, 9, 8], [NAN, 2, 5, 6]], np.float32)
  for op in (lambda f, r: roi_align(f, r, 2, 0.5), lambda f, r: roi_pool(f, r, 2, 0.5),
             lambda f, r: crop_and_resize(f, r, (3, 3))):
    run = jax.jit(jax.value_and_grad(lambda f, r, op=op: jnp.sum(op(f, r)), has_aux=False))
    out = np.asarray(jax.jit(op)(f, rois))
    np.testing.assert_array_equal(out[1], 0.0)
    (value, grad), (want, want_grad) = run(f, rois), run(f, rois[:1])
    np.testing.assert_allclose(value, want, rtol=1e-5)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=1e-6)


def test_roi_align_jitted_against_a_closed_over_flat_map_equals_eager():
  # A flat image closed over by a jitted function is a splat constant to XLA; XLA CPU's YNNPACK
  # fusion (jaxlib 0.10.2) computed garbage for RoI align's matmul against it (the OverFeat
  # system's training crops: an infinite loss and non-finite gradients).
  features = jnp.full((32, 32, 1), 100.0, jnp.float32)
  rois = jnp.tile(jnp.array([[1.0, 2.0, 29.0, 31.0]]), (4, 1))
  for args in ((32, 1.0, 2, True), (32, 1.0)):
    want = roi_align(features, rois, *args)
    got = jax.jit(lambda r, args=args: roi_align(features, r, *args))(rois)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    np.testing.assert_allclose(got, 100.0, rtol=1e-5)


# --- empty feature maps: a clear ValueError -------------------------------------------------


@pytest.mark.parametrize("shape", [(0, 0, 3), (0, 5, 3), (5, 0, 3)])
def test_roi_ops_on_empty_feature_map_raise_value_error(shape):
  rois = jnp.array([[0.0, 0.0, 4.0, 4.0]])
  for name, call in (("features", lambda: roi_pool(jnp.zeros(shape), rois, 2, 1.0)),
                     ("features", lambda: roi_align(jnp.zeros(shape), rois, 2, 1.0)),
                     ("features", lambda: roi_align(jnp.zeros(shape), rois, 2, 1.0, 2, True)),
                     ("image", lambda: crop_and_resize(jnp.zeros(shape), rois, (2, 2))),
                     ("images", lambda: batch_crop_and_resize(jnp.zeros((1,) + shape),
                                                              rois[None], (2, 2))),
                     ("image", lambda: windows.crop_windows(jnp.zeros(shape), rois, 4))):
    with pytest.raises(ValueError, match=rf"{name}: expected a non-empty .*height and width "
                                         rf".*got .*{shape[0]}, {shape[1]}"):
      call()
