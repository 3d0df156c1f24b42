"""Box padding and collation."""

import numpy as np
import pytest

from jaxdet.data import batching


def _random_boxes(rng, n, size=100.0):
  xy = rng.uniform(0, size / 2, (n, 2))
  wh = rng.uniform(1, size / 2, (n, 2))
  return np.concatenate([xy, xy + wh], 1).astype(np.float32)


def test_pad_boxes_masked_equals_sliced(rng):
  boxes = _random_boxes(rng, 5)
  labels = rng.integers(0, 7, 5).astype(np.int32)
  difficult = rng.random(5) < 0.5
  b, l, m, d = batching.pad_boxes(boxes, labels, 8, difficult=difficult)
  assert b.shape == (8, 4) and b.dtype == np.float32 and l.dtype == np.int32
  assert m.tolist() == [True] * 5 + [False] * 3
  np.testing.assert_array_equal(b[m], boxes)
  np.testing.assert_array_equal(l[m], labels)
  np.testing.assert_array_equal(d[m], difficult)
  assert not b[~m].any() and not l[~m].any() and not d[~m].any()
  b, l, m, d = batching.pad_boxes(np.zeros((0, 4), np.float32), np.zeros(0, np.int32), 3)
  assert not m.any() and b.shape == (3, 4)


def test_pad_boxes_too_many(rng):
  boxes = _random_boxes(rng, 6)
  labels = np.arange(6, dtype=np.int32)
  with pytest.raises(ValueError, match=r"example 17.*6 boxes exceed max_boxes=4.*box_policy"):
    batching.pad_boxes(boxes, labels, 4, example_id=17)
  b, l, m, _ = batching.pad_boxes(boxes, labels, 4, policy="keep_largest")
  area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
  want = sorted(np.argsort(area)[::-1][:4].tolist())
  assert m.all() and l.tolist() == want
  np.testing.assert_array_equal(b, boxes[want])
  with pytest.raises(ValueError, match="policy"):
    batching.pad_boxes(boxes, labels, 4, policy="drop")


def test_collate_fixed_shapes(rng):
  examples = []
  for i, (h, w) in enumerate([(30, 40), (50, 20)]):
    examples.append({"image": rng.integers(0, 255, (h, w, 3), dtype=np.uint8),
                     "boxes": _random_boxes(rng, i + 1, size=20),
                     "labels": np.full(i + 1, i, np.int32), "image_id": 100 + i,
                     "scale": 0.5})
  batch = batching.collate(examples, 3, image_shape=(64, 64))
  assert batch["image"].shape == (2, 64, 64, 3)
  np.testing.assert_array_equal(batch["image"][1, :50, :20], examples[1]["image"])
  assert not batch["image"][1, 50:].any() and not batch["image"][1, :, 20:].any()
  assert batch["image_size"].tolist() == [[30, 40], [50, 20]]
  assert batch["orig_size"].tolist() == [[60, 80], [100, 40]]
  assert batch["box_mask"].sum(1).tolist() == [1, 2]
  assert batch["image_id"].tolist() == [100, 101]
  assert batch["example_mask"].all() and np.allclose(batch["scale"], 0.5)
  with pytest.raises(ValueError, match="example 101.*does not fit"):
    batching.collate(examples, 3, image_shape=(40, 40))
