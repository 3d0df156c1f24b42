"""Evaluation on a mock COCO split as the official tools score it: pycocotools' COCOeval on the
split's own annotations (original pixels, crowd regions, annotation areas, COCO's image and
category ids) against our evaluation of the same detections through the resizing Loader."""

import contextlib
import io

import jax.numpy as jnp
import numpy as np
import pytest

from jaxdet.data import pipeline
from jaxdet.data import tfds as tfds_lib
from jaxdet.eval import coco
from jaxdet.train.evaluate import predict_dataset

pytest.importorskip("pycocotools")
from pycocotools.coco import COCO  # noqa: E402
from pycocotools.cocoeval import COCOeval  # noqa: E402

SIZES = [(40, 60), (50, 30), (64, 64), (33, 47), (72, 40)]


def _records(rng):
  """tfds-like COCO records: images of several sizes, 2-6 objects of classes 0-2, about a
  quarter crowds, annotation areas unlike the box areas (all three COCO ranges occur)."""
  out = []
  for i, (h, w) in enumerate(SIZES):
    n = int(rng.integers(2, 7))
    y1x1 = rng.uniform(0, 0.6, (n, 2))
    y2x2 = np.minimum(y1x1 + rng.uniform(0.1, 0.4, (n, 2)), 1.0)
    out.append({"image": np.zeros((h, w, 3), np.uint8), "image/filename": f"{i}.jpg",
                "image/id": 500 + 7 * i,
                "objects": {"bbox": np.concatenate([y1x1, y2x2], 1).astype(np.float32),
                            "label": rng.integers(0, 3, n).astype(np.int64),
                            "is_crowd": rng.random(n) < 0.25,
                            "area": np.exp(rng.uniform(np.log(200), np.log(15000), n)),
                            "id": np.arange(n)}})
  return out


def _fake_predict(variables, batch):
  """Detections of the batch's (resized) gt boxes: every box exactly (score 0.9 - 0.1 j), a
  copy shifted by 10% of its size with the next class (score 0.5 + 0.05 j)."""
  del variables
  boxes, mask = batch["boxes"], batch["box_mask"]                     # [B, M, 4], [B, M]
  j = jnp.arange(boxes.shape[1], dtype=jnp.float32)
  wh = boxes[..., 2:] - boxes[..., :2]
  shifted = boxes + 0.1 * jnp.concatenate([wh, wh], -1)
  b = boxes.shape[0]
  scores = jnp.concatenate([jnp.broadcast_to(0.9 - 0.1 * j, mask.shape),
                            jnp.broadcast_to(0.5 + 0.05 * j, mask.shape)], 1)
  return {"boxes": jnp.concatenate([boxes, shifted], 1),
          "scores": scores.reshape(b, -1),
          "labels": jnp.concatenate([batch["labels"], (batch["labels"] + 1) % 3], 1),
          "valid": jnp.concatenate([mask, mask], 1)}


def _pycocotools_stats(records, results):
  """COCOeval stats on the records' own annotations (original pixels, COCO ids)."""
  images, anns = [], []
  for r in records:
    h, w = r["image"].shape[:2]
    images.append({"id": r["image/id"], "height": h, "width": w})
    o = r["objects"]
    for k in range(len(o["label"])):
      y1, x1, y2, x2 = (float(v) for v in o["bbox"][k])
      anns.append({"id": len(anns) + 1, "image_id": r["image/id"],
                   "category_id": tfds_lib.COCO_CATEGORY_IDS[int(o["label"][k])],
                   "bbox": [x1 * w, y1 * h, (x2 - x1) * w, (y2 - y1) * h],
                   "area": float(o["area"][k]), "iscrowd": int(o["is_crowd"][k])})
  cats = [{"id": i, "name": n} for i, n in zip(tfds_lib.COCO_CATEGORY_IDS,
                                                 tfds_lib.COCO_CLASS_NAMES)]
  with contextlib.redirect_stdout(io.StringIO()):
    gt = COCO()
    gt.dataset = {"images": images, "annotations": anns, "categories": cats}
    gt.createIndex()
    ev = COCOeval(gt, gt.loadRes(results), "bbox")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
  return ev.stats


def test_coco_scoring_in_original_pixels_matches_pycocotools(monkeypatch):
  records = _records(np.random.default_rng(0))
  monkeypatch.setattr(tfds_lib, "open_data_source", lambda *a, **k: records)
  cfg = pipeline.default_data_config("coco2017")
  cfg.update(num_test=len(records), max_boxes=8, prefetch=0, num_workers=1)
  cfg["resize"].update(min_sizes=(48,), max_size=80)           # every image is resized
  loader = pipeline.make_loader(cfg, "test", batch_size=2, seed=0, train=False)
  gts, dets, _, count = predict_dataset(_fake_predict, {}, loader)
  assert count == len(records)
  assert [d["image_id"] for d in dets] == [r["image/id"] for r in records]
  assert [d["size"] for d in dets] == SIZES
  # the exact copies of the non-crowd boxes come back at the annotation's original pixels
  for r, d in zip(records, dets):
    h, w = r["image"].shape[:2]
    o = r["objects"]
    want = tfds_lib.normalized_yxyx_to_xyxy(o["bbox"][~o["is_crowd"]], h, w)
    np.testing.assert_allclose(d["boxes"][:len(want)], want, atol=2e-3)
  ours = coco.coco_evaluate(gts, dets, 80)
  results = coco.dets_to_coco_json(dets, image_ids=[d["image_id"] for d in dets],
                                   category_ids=tfds_lib.COCO_CATEGORY_IDS)
  stats = _pycocotools_stats(records, results)
  keys = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
  np.testing.assert_allclose([ours[k] for k in keys], stats, atol=1e-9)
  assert 0 < ours["AP"] < 1 and ours["APs"] != ours["APl"]


def test_ground_truth_of_coco_keeps_crowds_and_areas():
  r = _records(np.random.default_rng(1))[0]
  gt = tfds_lib.ground_truth_coco(r, 0)
  assert gt["iscrowd"].tolist() == r["objects"]["is_crowd"].tolist()
  np.testing.assert_allclose(gt["area"], r["objects"]["area"])
  assert gt["image_id"] == 500 and len(gt["boxes"]) == len(r["objects"]["label"])


def test_coco_area_and_ids_in_json_writers():
  gts = [{"boxes": np.float32([[0, 0, 10, 10], [5, 5, 40, 40]]), "labels": np.int32([0, 1]),
          "iscrowd": np.bool_([False, True]), "area": np.float64([30.0, 900.0])}]
  dataset = coco.gts_to_coco_json(gts, 2, image_ids=[139], category_ids=[1, 3])
  assert [a["area"] for a in dataset["annotations"]] == [30.0, 900.0]
  assert [a["category_id"] for a in dataset["annotations"]] == [1, 3]
  assert dataset["images"] == [{"id": 139}]
  dets = [{"boxes": np.float32([[1, 2, 4, 8]]), "scores": np.float32([0.5]),
           "labels": np.int32([1])}]
  assert coco.dets_to_coco_json(dets, image_ids=[139], category_ids=[1, 3]) == [
      {"image_id": 139, "category_id": 3, "bbox": [1.0, 2.0, 3.0, 6.0], "score": 0.5}]
  with pytest.raises(ValueError, match="image_ids"):
    coco.dets_to_coco_json(dets, image_ids=[1, 2])


def test_voc_ground_truth_is_the_datasets_in_original_pixels(monkeypatch):
  """VOC through the resizing Loader: the scored gt is the annotation (original pixels,
  difficult flags); exact copies of the gt boxes score mAP 1."""
  rng = np.random.default_rng(3)
  records = []
  for i, (h, w) in enumerate(SIZES):
    n = int(rng.integers(1, 4))
    y1x1 = rng.uniform(0, 0.5, (n, 2))
    bbox = np.concatenate([y1x1, y1x1 + rng.uniform(0.2, 0.5, (n, 2))], 1).astype(np.float32)
    records.append({"image": np.zeros((h, w, 3), np.uint8), "image/filename": f"{i:06d}.jpg",
                    "objects": {"bbox": bbox, "label": rng.integers(0, 20, n),
                                "is_difficult": rng.random(n) < 0.3,
                                "is_truncated": np.zeros(n, bool), "pose": np.zeros(n)}})
  monkeypatch.setattr(tfds_lib, "open_data_source", lambda *a, **k: records)
  cfg = pipeline.default_data_config("voc2007")
  cfg.update(num_test=len(records), max_boxes=4, prefetch=0, num_workers=1)
  cfg["resize"].update(min_sizes=(100,), max_size=160)
  loader = pipeline.make_loader(cfg, "test", batch_size=2, seed=0, train=False)
  gts, dets, _, _ = predict_dataset(_fake_predict, {}, loader)
  for r, g in zip(records, gts):
    h, w = r["image"].shape[:2]
    np.testing.assert_array_equal(g["boxes"], tfds_lib.normalized_yxyx_to_xyxy(
        r["objects"]["bbox"], h, w))
    np.testing.assert_array_equal(g["difficult"], r["objects"]["is_difficult"])
  exact = [{k: d[k][:len(g["labels"])] for k in ("boxes", "scores", "labels")}
           for d, g in zip(dets, gts)]
  from jaxdet.eval.voc import voc_evaluate
  assert voc_evaluate(gts, exact, 20, use_07_metric=True)["map"] == pytest.approx(1.0)
