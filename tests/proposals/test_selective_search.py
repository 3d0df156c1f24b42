"""Selective search wrapper against raw OpenCV output; the cache: parallel, resumable, checked."""

import os

import cv2
import numpy as np
import pytest

from jaxdet.data import synthetic
from jaxdet.proposals import selective_search as ss


class _Source:
  """A small picklable source of synthetic images (64 px keeps selective search fast)."""

  def __init__(self, n):
    self.ds = synthetic.SyntheticDetection(n, image_size=(64, 80), max_objects=2, seed=3)

  def __len__(self):
    return len(self.ds)

  def __getitem__(self, i):
    return self.ds[i]


def _opencv_boxes(image, quality, seed=0):
  import ctypes
  cv2.setRNGSeed(seed)
  ctypes.CDLL(None).srand(seed)   # OpenCV ranks with C rand()
  s = cv2.ximgproc.segmentation.createSelectiveSearchSegmentation()
  s.setBaseImage(cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
  s.switchToSelectiveSearchQuality() if quality else s.switchToSelectiveSearchFast()
  r = s.process().astype(np.float64)
  return np.stack([r[:, 0], r[:, 1], r[:, 0] + r[:, 2], r[:, 1] + r[:, 3]], 1)


@pytest.mark.parametrize("mode", ["fast", "quality"])
def test_matches_opencv_and_pads(mode):
  image = _Source(1)[0]["image"]
  ref = _opencv_boxes(image, mode == "quality")
  cap = len(ref) + 7
  boxes, mask = ss.selective_search(image, mode=mode, max_proposals=cap)
  assert boxes.shape == (cap, 4) and boxes.dtype == np.float32 and mask.dtype == bool
  assert mask.sum() == len(ref) and not mask[len(ref):].any()
  np.testing.assert_allclose(boxes[:len(ref)], ref)
  np.testing.assert_array_equal(boxes[len(ref):], 0)
  # truncation keeps OpenCV's ranking order
  few, few_mask = ss.selective_search(image, mode=mode, max_proposals=5)
  assert few_mask.all()
  np.testing.assert_allclose(few, ref[:5])
  h, w = image.shape[:2]
  assert (boxes[mask, 2] <= w).all() and (boxes[mask, 3] <= h).all() and (boxes >= 0).all()


def test_bad_inputs_named():
  with pytest.raises(ValueError, match="mode"):
    ss.selective_search(np.zeros((8, 8, 3), np.uint8), mode="slow")
  with pytest.raises(ValueError, match="image"):
    ss.selective_search(np.zeros((8, 8), np.uint8))


def test_cache_parallel_equals_serial_and_resumes(tmp_path):
  src = _Source(5)
  serial = [ss.selective_search(src[i]["image"], max_proposals=64) for i in range(5)]
  d = str(tmp_path / "cache")
  ss.compute_proposals(src, d, max_proposals=64, shard_size=2, num_workers=2, progress=False)
  boxes, mask = ss.load_proposals(d)
  assert boxes.shape == (5, 64, 4)
  for i in range(5):
    np.testing.assert_array_equal(boxes[i], serial[i][0])
    np.testing.assert_array_equal(mask[i], serial[i][1])
  # an interrupted run: one shard missing; loading names it, computing again finishes it
  os.remove(os.path.join(d, "shard_00001.npz"))
  stamp = os.path.getmtime(os.path.join(d, "shard_00000.npz"))
  with pytest.raises(FileNotFoundError, match="shard_00001"):
    ss.load_proposals(d)
  ss.compute_proposals(src, d, max_proposals=64, shard_size=2, num_workers=1, progress=False)
  assert os.path.getmtime(os.path.join(d, "shard_00000.npz")) == stamp   # not recomputed
  again, again_mask = ss.load_proposals(d)
  np.testing.assert_array_equal(again, boxes)
  np.testing.assert_array_equal(again_mask, mask)
  assert not [f for f in os.listdir(d) if f.startswith(".tmp_")]
  with pytest.raises(ValueError, match="other|made with"):
    ss.compute_proposals(src, d, max_proposals=32, shard_size=2, num_workers=1, progress=False)
