"""COCO box metrics against pycocotools' COCOeval on the same random ground truth and detections."""

import contextlib
import io

import numpy as np
import pytest

from jaxdet.eval import coco

pycocotools = pytest.importorskip("pycocotools")
from pycocotools.coco import COCO  # noqa: E402
from pycocotools.cocoeval import COCOeval  # noqa: E402

STAT_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm",
             "ARl")


def _random_boxes(rng, n, size=500):
  """Boxes with sides log-uniform in [6, 300] px: all three COCO area ranges occur."""
  wh = np.exp(rng.uniform(np.log(6), np.log(300), (n, 2)))
  xy = rng.uniform(0, size, (n, 2))
  return np.concatenate([xy, xy + wh], 1).astype(np.float32)


def _random_case(rng, num_images, num_classes, max_gt=8, max_det=25):
  """Ground truth (15% crowds; every 5th image empty; class C-1 never in gt) and detections
  (70% jittered copies of gts, with a label right 80% of the time; every 7th image none)."""
  gts, dets = [], []
  for i in range(num_images):
    n = int(rng.integers(1, max_gt)) if i % 5 else 0
    boxes = _random_boxes(rng, n)
    labels = rng.integers(0, num_classes - 1, n).astype(np.int32)
    gts.append({"boxes": boxes, "labels": labels, "iscrowd": rng.random(n) < 0.15})
    k = int(rng.integers(0, max_det)) if i % 7 != 3 else 0
    src = rng.integers(0, max(n, 1), k)
    dboxes = _random_boxes(rng, k)
    if n:
      near = boxes[src] + rng.normal(0, 0.05, (k, 4)).astype(np.float32) * (
          boxes[src, 2:] - boxes[src, :2]).repeat(2, 1)
      dboxes = np.where((rng.random(k) < 0.7)[:, None], near, dboxes)
      dboxes = np.concatenate([np.minimum(dboxes[:, :2], dboxes[:, 2:]),
                               np.maximum(dboxes[:, :2], dboxes[:, 2:])], 1)
    right = labels[src] if n else rng.integers(0, num_classes, k)
    dlabels = np.where(rng.random(k) < 0.8, right, rng.integers(0, num_classes, k))
    dets.append({"boxes": dboxes.astype(np.float32), "scores": rng.random(k).astype(np.float32),
                 "labels": dlabels.astype(np.int32)})
  return gts, dets


def _pycocotools(gts, dets, num_classes, max_dets=(1, 10, 100)):
  with contextlib.redirect_stdout(io.StringIO()):
    ground_truth = COCO()
    ground_truth.dataset = coco.gts_to_coco_json(gts, num_classes)
    ground_truth.createIndex()
    results = ground_truth.loadRes(coco.dets_to_coco_json(dets))
    evaluator = COCOeval(ground_truth, results, "bbox")
    evaluator.params.maxDets = list(max_dets)
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
  return evaluator


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_coco_matches_pycocotools(seed):
  rng = np.random.default_rng(seed)
  gts, dets = _random_case(rng, num_images=30, num_classes=4)
  if seed == 2:            # ties: scores on a coarse grid, duplicated gts (equal IoUs)
    for d in dets:
      d["scores"] = np.round(d["scores"] * 4).astype(np.float32) / 4
    for g in gts:
      if len(g["labels"]) > 1:
        g["boxes"][1], g["labels"][1] = g["boxes"][0], g["labels"][0]
  if seed == 1:            # inverted detections (x2 < x1, y2 < y1) match nothing
    for d in dets[:6]:
      d["boxes"][:2] = d["boxes"][:2, [2, 3, 0, 1]]
  ref = _pycocotools(gts, dets, 4)
  got = coco.coco_evaluate(gts, dets, 4)
  np.testing.assert_allclose([got[k] for k in STAT_KEYS], ref.stats, rtol=0, atol=1e-6)
  np.testing.assert_allclose(got["precision"], ref.eval["precision"], rtol=0, atol=1e-6)
  np.testing.assert_allclose(got["recall"], ref.eval["recall"], rtol=0, atol=1e-6)
  assert all(got[k] > 0 for k in ("APs", "APm", "APl"))          # every area range populated
  assert got["ap_per_class"][3] == -1 and np.all(got["ap_per_class"][:3] > 0)
  assert np.all(ref.eval["precision"][:, :, 3] == -1)             # class 3: no gt in either


def test_coco_max_dets_truncation_matches_pycocotools():
  rng = np.random.default_rng(3)
  gts, dets = _random_case(rng, num_images=12, num_classes=3, max_det=40)
  max_dets = (1, 3, 5)
  ref = _pycocotools(gts, dets, 3, max_dets)
  got = coco.coco_evaluate(gts, dets, 3, max_dets=max_dets)
  np.testing.assert_allclose(got["precision"], ref.eval["precision"], rtol=0, atol=1e-6)
  np.testing.assert_allclose(got["recall"], ref.eval["recall"], rtol=0, atol=1e-6)
  # pycocotools' stats[0] hard-codes maxDets=100 (so -1 here); ours uses the last limit.
  p = ref.eval["precision"][:, :, :, 0, 2]
  assert got["AP"] == pytest.approx(np.mean(p[p > -1]), abs=1e-6)
  np.testing.assert_allclose([got[k] for k in ("AP50", "AP75", "APs", "APm", "APl", "AR1", "AR3",
                                               "AR5", "ARs", "ARm", "ARl")],
                             ref.stats[1:], rtol=0, atol=1e-6)


def test_coco_perfect_and_empty_detections():
  """Detections equal to the non-crowd gts (distinct scores): every AP and AR is 1 where a
  class has gt, -1 for a class without; no detections at all: 0 (pycocotools cannot load an
  empty result list, so these are checked as properties)."""
  rng = np.random.default_rng(4)
  gts, _ = _random_case(rng, num_images=10, num_classes=3)
  dets = []
  for g in gts:
    real = ~g["iscrowd"]
    dets.append({"boxes": g["boxes"][real], "labels": g["labels"][real],
                 "scores": rng.random(int(real.sum())).astype(np.float32)})
  got = coco.coco_evaluate(gts, dets, 3)
  for key in STAT_KEYS:
    assert got[key] == 1.0 or (key == "AR1" and 0 < got[key] < 1), key
  np.testing.assert_array_equal(got["ap_per_class"], [1, 1, -1])
  none = [{"boxes": np.zeros((0, 4), np.float32), "scores": np.zeros(0, np.float32),
           "labels": np.zeros(0, np.int32)} for _ in gts]
  got = coco.coco_evaluate(gts, none, 3)
  assert all(got[k] == 0.0 for k in STAT_KEYS)
  got = coco.coco_evaluate(none, none, 3)   # `none` as ground truth: labels and boxes, no gt
  assert all(got[k] == -1.0 for k in STAT_KEYS)


def test_coco_json_converters():
  gts = [{"boxes": np.array([[1.5, 2, 11.5, 7]], np.float32), "labels": np.array([2], np.int32),
          "iscrowd": np.array([True])},
         {"boxes": np.zeros((0, 4), np.float32), "labels": np.zeros(0, np.int32)}]
  dets = [{"boxes": np.zeros((0, 4), np.float32), "scores": np.zeros(0, np.float32),
           "labels": np.zeros(0, np.int32)},
          {"boxes": np.array([[0, 1, 3, 5]], np.float32), "scores": np.array([0.25], np.float32),
           "labels": np.array([0], np.int32)}]
  dataset = coco.gts_to_coco_json(gts, 3, class_names=["a", "b", "c"])
  assert dataset["images"] == [{"id": 1}, {"id": 2}]
  assert dataset["categories"][2] == {"id": 3, "name": "c"}
  assert dataset["annotations"] == [{"id": 1, "image_id": 1, "category_id": 3,
                                     "bbox": [1.5, 2.0, 10.0, 5.0], "area": 50.0, "iscrowd": 1}]
  assert coco.dets_to_coco_json(dets) == [{"image_id": 2, "category_id": 1,
                                           "bbox": [0.0, 1.0, 3.0, 4.0], "score": 0.25}]


def test_coco_bad_inputs():
  gts = [{"boxes": np.zeros((1, 4), np.float32), "labels": np.array([4], np.int32)}]
  dets = [{"boxes": np.zeros((0, 4), np.float32), "scores": np.zeros(0, np.float32),
           "labels": np.zeros(0, np.int32)}]
  with pytest.raises(ValueError, match=r"gts\[0\]\['labels'\]: label 4 at index 0 is outside \[0, 3\)"):
    coco.coco_evaluate(gts, dets, 3)
  with pytest.raises(ValueError, match="dets: expected one entry per image, 1 to match gts, got 2"):
    coco.coco_evaluate(gts, dets * 2, 5)
  with pytest.raises(ValueError, match="max_dets: expected strictly increasing"):
    coco.coco_evaluate(gts, dets, 5, max_dets=(10, 1))
  with pytest.raises(ValueError, match=r"dets\[0\]\['scores'\]: expected 1 entries"):
    coco.coco_evaluate(gts, [{**dets[0], "boxes": np.zeros((1, 4), np.float32),
                              "labels": np.zeros(1, np.int32)}], 5)


def test_coco_equal_iou_goes_to_the_later_gt():
  """gts A = (0, 0, 10, 10), B = (5, 0, 15, 10); detection d1 = (2.5, 0, 12.5, 10) (score .9)
  has IoU 75 / 125 = 0.6 with both; COCOeval keeps the last best gt, B, so d2 = A's box (score
  .8, IoU 1 with A, 1/3 with B) still matches A: at IoU .5 both are true positives (AP50 = 1).
  Taking the first best gt would leave d2 a false positive."""
  gts = [{"boxes": np.array([[0, 0, 10, 10], [5, 0, 15, 10]], np.float32),
          "labels": np.zeros(2, np.int32)}]
  dets = [{"boxes": np.array([[2.5, 0, 12.5, 10], [0, 0, 10, 10]], np.float32),
           "scores": np.array([0.9, 0.8], np.float32), "labels": np.zeros(2, np.int32)}]
  got = coco.coco_evaluate(gts, dets, 1)
  assert got["AP50"] == 1.0
  ref = _pycocotools(gts, dets, 1)
  np.testing.assert_allclose([got[k] for k in STAT_KEYS], ref.stats, rtol=0, atol=1e-6)
