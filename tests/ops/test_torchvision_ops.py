"""jaxdet.ops against torchvision's own ops (the reference library), on fresh random inputs.

Skipped where torch and torchvision do not import (CI installs neither; the float64 NumPy
references of the other op tests always run). torchvision works in NCHW with rois
(batch_index, x1, y1, x2, y2); jaxdet works per image in HWC, vmapped.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
tv_ops = pytest.importorskip("torchvision.ops")

import jax.numpy as jnp  # noqa: E402

from jaxdet.ops import box_coder, boxes, matching  # noqa: E402
from jaxdet.ops.nms import batched_nms, nms  # noqa: E402
from jaxdet.ops.roi_pool import roi_align, roi_pool  # noqa: E402


def random_boxes(rng, n, size=100.0, min_side=1.0, max_side=40.0):
  """f32[n, 4] (x1, y1, x2, y2) with continuous coordinates (no ties), clustered so that
  many pairs overlap."""
  centres = rng.uniform(0, size, (max(n // 8, 1), 2))[rng.integers(0, max(n // 8, 1), n)]
  centres = centres + rng.normal(0, 6, (n, 2))
  wh = rng.uniform(min_side, max_side, (n, 2))
  return np.concatenate([centres - wh / 2, centres + wh / 2], 1).astype(np.float32)


def to_torch(x):
  return torch.from_numpy(np.ascontiguousarray(x))


@pytest.mark.parametrize("iou_threshold", [0.3, 0.5, 0.7])
def test_nms_picks_equal_torchvision(rng, iou_threshold):
  b = random_boxes(rng, 300)
  s = rng.permutation(300).astype(np.float32) / 300   # distinct scores: the order is defined
  want = tv_ops.nms(to_torch(b), to_torch(s), iou_threshold).numpy()
  idx, valid = nms(jnp.asarray(b), jnp.asarray(s), iou_threshold, 300)
  np.testing.assert_array_equal(np.asarray(idx)[np.asarray(valid)], want)


def test_batched_nms_picks_equal_torchvision(rng):
  b = random_boxes(rng, 400)
  s = rng.permutation(400).astype(np.float32) / 400
  c = rng.integers(0, 5, 400).astype(np.int32)
  want = tv_ops.batched_nms(to_torch(b), to_torch(s), to_torch(c.astype(np.int64)), 0.5).numpy()
  idx, valid = batched_nms(jnp.asarray(b), jnp.asarray(s), jnp.asarray(c), 0.5, 400)
  np.testing.assert_array_equal(np.asarray(idx)[np.asarray(valid)], want)


def test_box_iou_and_giou_equal_torchvision(rng):
  a, b = random_boxes(rng, 40), random_boxes(rng, 30)
  np.testing.assert_allclose(np.asarray(boxes.box_iou(a, b)),
                             tv_ops.box_iou(to_torch(a), to_torch(b)).numpy(), atol=1e-6)
  np.testing.assert_allclose(np.asarray(boxes.generalized_box_iou(a, b)),
                             tv_ops.generalized_box_iou(to_torch(a), to_torch(b)).numpy(),
                             atol=1e-6)


def _rois(rng, n, height, width):
  """Image-pixel rois inside and across the border of a (height, width) image."""
  x = np.sort(rng.uniform(-20, width + 20, (n, 2)), 1)
  y = np.sort(rng.uniform(-20, height + 20, (n, 2)), 1)
  return np.stack([x[:, 0], y[:, 0], x[:, 1], y[:, 1]], 1).astype(np.float32)


def _torch_rois(rois, batch_index):
  return to_torch(np.concatenate([np.full((len(rois), 1), batch_index, np.float32), rois], 1))


@pytest.mark.parametrize("output_size, scale", [((7, 7), 1 / 16), ((3, 5), 0.5)])
def test_roi_pool_equals_torchvision(rng, output_size, scale):
  h, w, c = 12, 15, 3
  feats = rng.normal(size=(h, w, c)).astype(np.float32)
  rois = _rois(rng, 50, h / scale, w / scale)
  want = tv_ops.roi_pool(to_torch(feats.transpose(2, 0, 1)[None]), _torch_rois(rois, 0),
                         output_size, scale).numpy().transpose(0, 2, 3, 1)
  got = np.asarray(roi_pool(jnp.asarray(feats), jnp.asarray(rois), output_size, scale))
  np.testing.assert_array_equal(got, want)   # a max: exactly the same float


@pytest.mark.parametrize("sampling_ratio, aligned", [(-1, False), (2, True), (-1, True)])
def test_roi_align_equals_torchvision(rng, sampling_ratio, aligned):
  h, w, c, scale = 10, 13, 4, 0.25
  feats = rng.normal(size=(h, w, c)).astype(np.float32)
  rois = _rois(rng, 40, h / scale, w / scale)
  want = tv_ops.roi_align(to_torch(feats.transpose(2, 0, 1)[None]), _torch_rois(rois, 0),
                          (7, 7), scale, sampling_ratio, aligned).numpy().transpose(0, 2, 3, 1)
  got = np.asarray(roi_align(jnp.asarray(feats), jnp.asarray(rois), 7, scale,
                             sampling_ratio=sampling_ratio, aligned=aligned))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_box_coder_equals_torchvision(rng):
  from torchvision.models.detection._utils import BoxCoder
  weights = (10.0, 10.0, 5.0, 5.0)
  coder = BoxCoder(weights)
  anchors, gt = random_boxes(rng, 64, min_side=4), random_boxes(rng, 64, min_side=4)
  want = coder.encode_single(to_torch(gt), to_torch(anchors)).numpy()
  got = np.asarray(box_coder.encode_boxes(gt, anchors, weights=weights))
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  deltas = rng.normal(0, 1, (64, 4)).astype(np.float32)
  want = coder.decode_single(to_torch(deltas), to_torch(anchors)).numpy()
  got = np.asarray(box_coder.decode_boxes(deltas, anchors, weights=weights))
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3)


def test_matcher_equals_torchvision(rng):
  from torchvision.models.detection._utils import Matcher
  anchors, gt = random_boxes(rng, 200), random_boxes(rng, 6, min_side=10)
  iou = np.asarray(boxes.box_iou(anchors, gt))                 # [N, M]
  assert (iou.max(0) > 0).all()   # every gt overlaps some anchor (the low-quality rule's case)
  for allow in (False, True):
    want = Matcher(0.7, 0.3, allow_low_quality_matches=allow)(to_torch(iou.T)).numpy()
    gt_idx, _, labels = matching.match_boxes(jnp.asarray(iou), jnp.ones(6, bool), high=0.7,
                                             low=0.3, allow_low_quality=allow)
    gt_idx, labels = np.asarray(gt_idx), np.asarray(labels)
    # torchvision: gt index for matches, -1 below low, -2 between low and high.
    np.testing.assert_array_equal(np.where(labels == 1, gt_idx, np.where(labels == 0, -1, -2)),
                                  want)
