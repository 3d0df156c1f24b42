"""The synthetic dataset: determinism, tight boxes, label ranges, empty images."""

import numpy as np
import pytest

from jaxdet.data import batching, pipeline
from jaxdet.data.synthetic import CLASS_NAMES, SyntheticDetection


def test_same_seed_same_pixels_in_any_order():
  a = SyntheticDetection(12, image_size=(64, 80), max_objects=4, seed=3)
  b = SyntheticDetection(12, image_size=(64, 80), max_objects=4, seed=3)
  forward = [a[i] for i in range(12)]
  backward = [b[i] for i in reversed(range(12))][::-1]
  for x, y in zip(forward, backward):
    np.testing.assert_array_equal(x["image"], y["image"])
    np.testing.assert_array_equal(x["boxes"], y["boxes"])
    np.testing.assert_array_equal(x["labels"], y["labels"])
    assert x["image_id"] == y["image_id"]
  other_seed = SyntheticDetection(12, image_size=(64, 80), seed=4)[5]["image"]
  other_split = SyntheticDetection(12, image_size=(64, 80), seed=3, split="test")[5]["image"]
  assert not np.array_equal(forward[5]["image"], other_seed)
  assert not np.array_equal(forward[5]["image"], other_split)


def test_shapes_dtypes_labels_in_range_and_empty_images():
  ds = SyntheticDetection(64, image_size=(48, 64), min_objects=0, max_objects=3, seed=0)
  counts = []
  for i in range(len(ds)):
    ex = ds[i]
    assert ex["image"].shape == (48, 64, 3) and ex["image"].dtype == np.uint8
    assert ex["boxes"].dtype == np.float32 and ex["boxes"].shape == (len(ex["labels"]), 4)
    assert ex["labels"].dtype == np.int32
    assert np.all((ex["labels"] >= 0) & (ex["labels"] < len(CLASS_NAMES)))
    b = ex["boxes"]
    assert np.all((b[:, 0] >= 0) & (b[:, 1] >= 0) & (b[:, 2] <= 64) & (b[:, 3] <= 48))
    assert np.all((b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1]))
    counts.append(len(ex["labels"]))
  assert min(counts) == 0 and max(counts) <= 3
  assert len(set(np.concatenate([ds[i]["labels"] for i in range(64)]).tolist())) == 6
  # An image without objects passes validation and batching.
  empty = ds[counts.index(0)]
  ex = pipeline.validate_example(empty, len(CLASS_NAMES))
  batch = batching.collate([ex], max_boxes=4)
  assert not batch["box_mask"].any() and batch["example_mask"].all()
  with pytest.raises(IndexError):
    ds[64]


def test_boxes_tight_around_drawn_pixels_of_unoccluded_shapes():
  """Without noise each object is a flat colour: the pixels of that exact colour around an
  object that no other box touches must fill out exactly its box."""
  ds = SyntheticDetection(40, image_size=(64, 64), max_objects=3, seed=11, noise=0.0)
  checked = 0
  for i in range(len(ds)):
    ex = ds[i]
    img, boxes = ex["image"].astype(np.int32), ex["boxes"].astype(int)
    for j, (x1, y1, x2, y2) in enumerate(boxes):
      others = np.delete(boxes, j, axis=0)
      m = 2   # margin around the box that must contain no pixel of the object's colour
      overlap = ((others[:, 0] < x2 + m) & (others[:, 2] > x1 - m)
                 & (others[:, 1] < y2 + m) & (others[:, 3] > y1 - m))
      if overlap.any():
        continue
      inside = img[y1:y2, x1:x2].reshape(-1, 3)
      colours, count = np.unique(inside, axis=0, return_counts=True)
      colour = colours[np.argmax(count)]
      r0, c0 = max(y1 - m, 0), max(x1 - m, 0)
      region = img[r0:y2 + m, c0:x2 + m]
      rows, cols = np.nonzero(np.all(region == colour, axis=-1))
      got = [c0 + cols.min(), r0 + rows.min(), c0 + cols.max() + 1, r0 + rows.max() + 1]
      assert got == [x1, y1, x2, y2], (i, j)
      checked += 1
  assert checked >= 20


def test_single_object():
  ds = SyntheticDetection(16, image_size=(64, 64), seed=2, single_object=True)
  areas = []
  for i in range(16):
    ex = ds[i]
    assert len(ex["labels"]) == 1
    b = ex["boxes"][0]
    areas.append((b[2] - b[0]) * (b[3] - b[1]))
  assert np.median(areas) > 0.15 * 64 * 64


def test_bad_arguments():
  with pytest.raises(ValueError, match="min_objects"):
    SyntheticDetection(4, min_objects=3, max_objects=2)
  with pytest.raises(ValueError, match="image_size"):
    SyntheticDetection(4, image_size=(8, 8))
