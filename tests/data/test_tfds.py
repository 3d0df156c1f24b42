"""VOC and COCO through tfds.data_source: conversion, decoding, mocking, the not-prepared error.

VOC runs through `tfds.testing.mock_data` (which drives `tfds.data_source` with random
examples of the real feature schema). COCO cannot: in tensorflow-datasets 4.9 the COCO builder
code imports TensorFlow to describe its features, so mock_data fails without TensorFlow; its
decoder is tested on hand-made tfds-like examples and the data source is replaced by a list.
"""

import functools
from unittest import mock

import numpy as np
import pytest

from jaxdet.data import pipeline
from jaxdet.data import tfds as tfds_lib

tfds = pytest.importorskip("tensorflow_datasets")


def _voc_like(bbox, labels, difficult, h=375, w=500, filename="000005.jpg"):
  return {"image": np.full((h, w, 3), 7, np.uint8), "image/filename": filename,
          "objects": {"bbox": np.float32(bbox).reshape(-1, 4),
                      "label": np.int64(labels), "is_difficult": np.bool_(difficult),
                      "is_truncated": np.zeros(len(labels), bool),
                      "pose": np.zeros(len(labels), np.int64)},
          "labels": np.int64(labels), "labels_no_difficult": np.int64(labels)}


def test_box_conversion_hand_made():
  # A VOC annotation <xmin>48</xmin><ymin>240</ymin><xmax>195</xmax><ymax>371</ymax> in a
  # 500x375 image; tfds stores ((ymin-1)/h, (xmin-1)/w, ymax/h, xmax/w).
  h, w = 375, 500
  bbox = [[239 / h, 47 / w, 371 / h, 195 / w]]
  got = tfds_lib.normalized_yxyx_to_xyxy(np.float32(bbox), h, w)
  np.testing.assert_allclose(got, [[47, 239, 195, 371]], rtol=1e-6)
  ex = tfds_lib.decode_voc(_voc_like(bbox, [11], [True]), index=3)
  np.testing.assert_allclose(ex["boxes"], [[47, 239, 195, 371]], rtol=1e-6)
  assert ex["labels"].tolist() == [11] and ex["labels"].dtype == np.int32
  assert ex["difficult"].tolist() == [True] and ex["image_id"] == 5
  assert tfds_lib.decode_voc(_voc_like(bbox, [1], [0], filename="2008_000123.jpg"),
                             0)["image_id"] == 2008000123


def test_coco_decoding_keeps_crowd_out_of_targets():
  h, w = 40, 80
  example = {
      "image": np.zeros((h, w, 3), np.uint8), "image/filename": "x.jpg", "image/id": 139,
      "objects": {"bbox": np.float32([[0.1, 0.2, 0.5, 0.6], [0, 0, 1, 1],
                                      [0.3, 0.3, 0.3, 0.4]]),
                  "label": np.int64([0, 5, 2]), "is_crowd": np.bool_([False, True, False]),
                  "area": np.int64([1, 2, 3]), "id": np.int64([1, 2, 3])}}
  ex = tfds_lib.decode_coco(example, 0)
  np.testing.assert_allclose(ex["boxes"], [[16, 4, 48, 20]], rtol=1e-6)
  assert ex["labels"].tolist() == [0] and ex["image_id"] == 139
  np.testing.assert_allclose(ex["crowd_boxes"], [[0, 0, 80, 40]])
  assert ex["crowd_labels"].tolist() == [5]
  assert len(tfds_lib.COCO_CLASS_NAMES) == len(tfds_lib.COCO_CATEGORY_IDS) == 80
  assert len(set(tfds_lib.COCO_CATEGORY_IDS)) == 80 and max(tfds_lib.COCO_CATEGORY_IDS) == 90


def test_coco_source_with_minimal_mock(monkeypatch):
  examples = [{"image": np.zeros((30, 50, 3), np.uint8), "image/filename": "a.jpg",
               "image/id": 1000 + i,
               "objects": {"bbox": np.float32([[0, 0, 0.5, 0.5]] * (i + 1)),
                           "label": np.int64([i] * (i + 1)),
                           "is_crowd": np.bool_([False] * i + [True]),
                           "area": np.zeros(i + 1, np.int64), "id": np.zeros(i + 1, np.int64)}}
              for i in range(3)]
  opened = {}

  def fake_open(tfds_name, version, split, data_dir):
    opened.update(name=tfds_name, version=version, split=split)
    return examples
  monkeypatch.setattr(tfds_lib, "open_data_source", fake_open)
  cfg = pipeline.default_data_config()
  cfg.update(name="coco2017", max_boxes=4, num_test=2)
  src = pipeline.make_source(cfg, "test")
  assert opened == {"name": "coco/2017", "version": "1.1.0", "split": "validation"}
  assert len(src) == 2 and src.num_classes == 80
  ex = src[1]
  assert ex["image_id"] == 1001 and len(ex["labels"]) == 1 and len(ex["crowd_boxes"]) == 1


def test_voc_through_mock_data_random_examples():
  """Random examples of the real VOC schema (sequence lengths made consistent)."""
  from tensorflow_datasets.testing import mocking
  init = mocking.RandomFakeGenerator.__init__
  consistent = functools.partialmethod(init, constant_dynamic_shape=True)
  with mock.patch.object(mocking.RandomFakeGenerator, "__init__", consistent), \
      tfds.testing.mock_data(num_examples=4):
    src = tfds_lib.TfdsDetection("voc2007", "train")
    raw = tfds.data_source("voc/2007", split="train+validation")
    assert len(src) == 4 and src.class_names == tfds_lib.VOC_CLASS_NAMES
    for i in range(4):
      ex, r = src[i], raw[i]
      h, w = r["image"].shape[:2]
      assert ex["image"].dtype == np.uint8 and ex["image"].shape == (h, w, 3)
      yx = np.asarray(r["objects"]["bbox"], np.float64)
      want = np.stack([yx[:, 1] * w, yx[:, 0] * h, yx[:, 3] * w, yx[:, 2] * h], 1)
      np.testing.assert_allclose(ex["boxes"], want, rtol=1e-6)
      assert np.all((ex["labels"] >= 0) & (ex["labels"] < 20))
      np.testing.assert_array_equal(ex["difficult"], r["objects"]["is_difficult"])
    # Random boxes have ymin > ymax somewhere: validation where data enters names the example.
    cfg = pipeline.default_data_config()
    cfg.update(name="voc2007", max_boxes=16)
    with pytest.raises(ValueError, match=r"boxes \(example \d\)"):
      for i in range(4):
        pipeline.make_source(cfg, "train")[i]


def test_voc_loader_through_mock_data_hand_made_examples(rng):
  examples = []
  for i in range(5):
    h, w = (int(rng.integers(40, 80)), int(rng.integers(40, 80)))
    y1, x1 = rng.uniform(0, 0.5, 2)
    bbox = [[y1, x1, y1 + 0.4, x1 + 0.3]]
    examples.append(_voc_like(bbox, [i], [i % 2 == 0], h=h, w=w, filename=f"{i + 10:06d}.jpg"))

  def as_data_source(self, split, decoders=None, deserialize_method=None, **kwargs):
    return examples
  with tfds.testing.mock_data(as_data_source_fn=as_data_source):
    cfg = pipeline.default_data_config()
    cfg.update(name="voc2007", max_boxes=3, prefetch=0)
    cfg["resize"] = {"mode": "shorter_side", "min_sizes": (48,), "max_size": 80}
    loader = pipeline.make_loader(cfg, "test", batch_size=4, seed=0, train=False)
    batches = list(loader)
  assert [b["image"].shape[0] for b in batches] == [4, 4]
  ids = np.concatenate([b["image_id"] for b in batches])
  assert ids.tolist() == [10, 11, 12, 13, 14, -1, -1, -1]
  for b in batches:
    assert b["image"].shape[1:3] in [(48, 80), (80, 48), (80, 80)]
    for j in np.flatnonzero(b["example_mask"]):
      ex = examples[b["image_id"][j] - 10]
      h, w = ex["image"].shape[:2]
      s = min(48 / min(h, w), 80 / max(h, w))
      assert b["image_size"][j].tolist() == [round(h * s), round(w * s)]
      assert b["orig_size"][j].tolist() == [h, w]
      yx = ex["objects"]["bbox"][0]
      want = [yx[1] * round(w * s), yx[0] * round(h * s), yx[3] * round(w * s),
              yx[2] * round(h * s)]
      np.testing.assert_allclose(b["boxes"][j, 0], want, rtol=1e-5)
      assert b["difficult"][j, 0] == (b["image_id"][j] % 2 == 0)


def test_not_prepared_error_says_how_to_prepare(tmp_path):
  with pytest.raises(tfds_lib.DatasetNotPreparedError, match=r"tfds build voc/2007"):
    tfds_lib.TfdsDetection("voc2007", "test", data_dir=str(tmp_path))
  with pytest.raises(tfds_lib.DatasetNotPreparedError, match=r"tfds build coco/2017"):
    tfds_lib.TfdsDetection("coco2017", "test", data_dir=str(tmp_path))
