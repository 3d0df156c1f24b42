"""Augmentation properties: boxes move with pixels exactly."""

import colorsys

import numpy as np
import pytest

from jaxdet.data import transforms


def _block_example(rng, h=40, w=56, n=2):
  """Black image with n white rectangles on integer pixel edges; boxes are their extents."""
  image = np.zeros((h, w, 3), np.uint8)
  boxes = []
  for _ in range(n):
    x1, y1 = int(rng.integers(0, w - 8)), int(rng.integers(0, h - 8))
    x2, y2 = int(rng.integers(x1 + 4, w + 1)), int(rng.integers(y1 + 4, h + 1))
    boxes.append([x1, y1, x2, y2])
  return image, np.asarray(boxes, np.float32)


def _extent(mask):
  rows, cols = np.nonzero(mask)
  return np.float32([cols.min(), rows.min(), cols.max() + 1, rows.max() + 1])


def _single(rng, h=40, w=56):
  image, boxes = _block_example(rng, h, w, n=1)
  x1, y1, x2, y2 = boxes[0].astype(int)
  image[y1:y2, x1:x2] = 255
  return {"image": image, "boxes": boxes, "labels": np.zeros(1, np.int32)}


def test_hflip_box_covers_flipped_pixels_and_twice_is_identity(rng):
  ex = _single(rng)
  f = transforms.hflip(ex)
  np.testing.assert_array_equal(_extent(f["image"][..., 0] > 0), f["boxes"][0])
  np.testing.assert_array_equal(f["image"], ex["image"][:, ::-1])
  ff = transforms.hflip(f)
  np.testing.assert_array_equal(ff["image"], ex["image"])
  np.testing.assert_array_equal(ff["boxes"], ex["boxes"])


def test_resize_keeps_box_pixel_alignment(rng):
  ex = _single(rng)
  up = transforms.resize(ex, (80, 112))             # exactly 2x: edges land on pixel edges
  np.testing.assert_array_equal(_extent(up["image"][..., 0] >= 128), up["boxes"][0])
  np.testing.assert_allclose(up["boxes"], ex["boxes"] * 2)
  assert up["scale"] == pytest.approx(2.0)
  odd = transforms.resize(ex, (53, 71))             # non-integer factors: within a pixel
  np.testing.assert_allclose(_extent(odd["image"][..., 0] >= 128), odd["boxes"][0], atol=1.0)


def test_shorter_side_size_rule():
  # Reference: s = min(S / shorter, M / longer), sizes rounded.
  for (h, w), (s, m) in [((375, 500), (600, 1000)), ((500, 333), (600, 1000)),
                         ((200, 1000), (600, 1000)), ((448, 448), (448, 448))]:
    scale = min(s / min(h, w), m / max(h, w))
    assert transforms.shorter_side_size(h, w, s, m) == (round(h * scale), round(w * scale))
  nh, nw = transforms.shorter_side_size(375, 500, 600, 1000)
  assert min(nh, nw) == 600 and max(nh, nw) <= 1000


def test_scale_translate_moves_boxes_with_pixels(rng):
  for seed in range(6):
    ex = _single(rng)
    out = transforms.scale_translate(ex, np.random.default_rng(seed), 0.2)
    assert out["image"].shape == ex["image"].shape
    visible = out["image"][..., 0] >= 128
    if len(out["boxes"]) == 0:        # moved out of the image: at most a sliver remains
      assert visible.sum() <= max(ex["image"].shape)
      continue
    b = out["boxes"][0]
    assert np.all(b >= 0) and b[2] <= 56 and b[3] <= 40
    np.testing.assert_allclose(_extent(visible), b, atol=1.0)


def test_clip_and_drop():
  ex = {"image": np.zeros((10, 20, 3), np.uint8),
        "boxes": np.float32([[-5, -5, 5, 5], [19.5, 2, 30, 8], [2, 2, 4, 4]]),
        "labels": np.int32([0, 1, 2]), "difficult": np.array([False, True, False])}
  out = transforms.clip_and_drop(ex)
  np.testing.assert_array_equal(out["boxes"], [[0, 0, 5, 5], [2, 2, 4, 4]])
  assert out["labels"].tolist() == [0, 2] and out["difficult"].tolist() == [False, False]


def test_hsv_jitter_scales_saturation_and_value_keeps_hue(rng):
  image = rng.integers(30, 200, (12, 12, 3)).astype(np.uint8)
  ex = {"image": image, "boxes": np.zeros((0, 4), np.float32), "labels": np.zeros(0, np.int32)}
  out = transforms.hsv_jitter(ex, rng, 1.5)["image"]
  before = np.array([colorsys.rgb_to_hsv(*(p / 255.0)) for p in image.reshape(-1, 3)])
  after = np.array([colorsys.rgb_to_hsv(*(p / 255.0)) for p in out.reshape(-1, 3)])
  ok = (before[:, 1] > 0.3) & (after[:, 1] < 0.99) & (after[:, 2] < 0.99) & (after[:, 1] > 0.1)
  assert ok.sum() > 20
  dh = np.abs(before[ok, 0] - after[ok, 0])
  assert np.all(np.minimum(dh, 1 - dh) < 0.03)             # hue kept (up to u8 rounding)
  s_ratio = after[ok, 1] / before[ok, 1]
  v_ratio = after[ok, 2] / before[ok, 2]
  assert np.ptp(s_ratio) < 0.1 and np.ptp(v_ratio) < 0.05  # one factor for the image
  for r in (np.median(s_ratio), np.median(v_ratio)):
    assert 1 / 1.5 - 0.03 <= r <= 1.5 + 0.03
  same = transforms.hsv_jitter(ex, rng, 1.0)["image"]
  np.testing.assert_array_equal(same, image)


def test_choose_bucket():
  buckets = [(600, 1000), (1000, 600), (1000, 1000)]
  assert transforms.choose_bucket(600, 800, buckets) == (600, 1000)
  assert transforms.choose_bucket(900, 600, buckets) == (1000, 600)
  assert transforms.choose_bucket(700, 700, buckets) == (1000, 1000)
  with pytest.raises(ValueError, match="buckets"):
    transforms.choose_bucket(1200, 10, buckets)
