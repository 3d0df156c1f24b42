"""VOC AP against hand-computed cases and a float64 loop port of py-faster-rcnn's voc_eval.

Also covers the shared per-image helpers of jaxdet.eval.detections (unbatching, input checks).
"""

import numpy as np
import pytest

from jaxdet.eval import detections, voc


def _gt(boxes, labels, difficult=None):
  gt = {"boxes": np.asarray(boxes, np.float32).reshape(-1, 4),
        "labels": np.asarray(labels, np.int32).reshape(-1)}
  if difficult is not None:
    gt["difficult"] = np.asarray(difficult, bool)
  return gt


def _det(boxes, scores, labels):
  return {"boxes": np.asarray(boxes, np.float32).reshape(-1, 4),
          "scores": np.asarray(scores, np.float32).reshape(-1),
          "labels": np.asarray(labels, np.int32).reshape(-1)}


# ---------------------------------------------------------------------------------------------
# Reference: voc_eval.py / voc_ap written as loops in float64, IoU without the +1.

def _ref_voc_ap(rec, prec, use_07_metric):
  if use_07_metric:
    ap = 0.0
    for t in np.arange(0.0, 1.1, 0.1):
      p = 0.0 if np.sum(rec >= t) == 0 else np.max(prec[rec >= t])
      ap = ap + p / 11.0
    return ap
  mrec = np.concatenate(([0.0], rec, [1.0]))
  mpre = np.concatenate(([0.0], prec, [0.0]))
  for i in range(mpre.size - 1, 0, -1):
    mpre[i - 1] = max(mpre[i - 1], mpre[i])
  i = np.where(mrec[1:] != mrec[:-1])[0]
  return np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1])


def _ref_voc_eval(gts, dets, c, ovthresh, use_07_metric):
  recs, npos = [], 0
  for g in gts:
    keep = g["labels"] == c
    diff = g.get("difficult", np.zeros(len(g["labels"]), bool))[keep]
    recs.append({"bbox": g["boxes"][keep].astype(float), "difficult": diff,
                 "det": [False] * int(keep.sum())})
    npos += int(np.sum(~diff))
  image_ids, conf, bbs = [], [], []
  for i, d in enumerate(dets):
    for b, s, l in zip(d["boxes"], d["scores"], d["labels"]):
      if l == c:
        image_ids.append(i)
        conf.append(float(s))
        bbs.append(b.astype(float))
  order = np.argsort(-np.array(conf), kind="stable")
  tp, fp = np.zeros(len(order)), np.zeros(len(order))
  for d, j in enumerate(order):
    r, bb = recs[image_ids[j]], bbs[j]
    ovmax, jmax = -np.inf, -1
    gtb = r["bbox"]
    if gtb.size > 0:
      iw = np.maximum(np.minimum(gtb[:, 2], bb[2]) - np.maximum(gtb[:, 0], bb[0]), 0.0)
      ih = np.maximum(np.minimum(gtb[:, 3], bb[3]) - np.maximum(gtb[:, 1], bb[1]), 0.0)
      inters = iw * ih
      uni = (bb[2] - bb[0]) * (bb[3] - bb[1]) + (gtb[:, 2] - gtb[:, 0]) * (gtb[:, 3] - gtb[:, 1]) - inters
      overlaps = inters / uni
      ovmax, jmax = np.max(overlaps), np.argmax(overlaps)
    if ovmax > ovthresh:
      if not r["difficult"][jmax]:
        if not r["det"][jmax]:
          tp[d] = 1.0
          r["det"][jmax] = True
        else:
          fp[d] = 1.0
    else:
      fp[d] = 1.0
  if npos == 0:
    return np.nan
  fp, tp = np.cumsum(fp), np.cumsum(tp)
  rec = tp / float(npos)
  prec = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
  return _ref_voc_ap(rec, prec, use_07_metric)


def _random_case(rng, num_images, num_classes):
  gts, dets = [], []
  for i in range(num_images):
    n = int(rng.integers(0, 6)) if i % 4 else 0                    # some images without gt
    xy = rng.uniform(0, 200, (n, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(5, 80, (n, 2))], 1)
    labels = rng.integers(0, num_classes - 1, n)                   # the last class has no gt
    gts.append(_gt(boxes, labels, rng.random(n) < 0.2))
    k = int(rng.integers(0, 10)) if i % 5 != 2 else 0              # some without detections
    src = rng.integers(0, max(n, 1), k)
    xy = rng.uniform(0, 200, (k, 2))
    dboxes = np.concatenate([xy, xy + rng.uniform(5, 80, (k, 2))], 1)
    if n:
      near = boxes[src] + rng.normal(0, 4, (k, 4))
      dboxes = np.where((rng.random(k) < 0.7)[:, None], near, dboxes)
      dboxes = np.concatenate([dboxes[:, :2].clip(max=dboxes[:, 2:]), dboxes[:, 2:]], 1)
    dlabels = np.where(rng.random(k) < 0.8, labels[src] if n else 0,
                       rng.integers(0, num_classes, k))
    dets.append(_det(dboxes, rng.random(k), dlabels))
  return gts, dets


# ---------------------------------------------------------------------------------------------

def test_voc_ap_hand_cases():
  """Curves from three detections (TP, FP, TP) against 2 gts:
  recall = [1/2, 1/2, 1], precision = [1, 1/2, 2/3].
  07: thresholds 0, .1, ..., .5 (6 points) see precision 1; .6, ..., 1 (5 points) only reach
      recall 1 with precision 2/3: AP = (6 + 5 * 2/3) / 11 = 28/33.
  area: envelope [1, 1, 2/3]; recall steps 0 -> 1/2 (precision 1) and 1/2 -> 1 (2/3):
      AP = 1/2 + 1/2 * 2/3 = 5/6.
  Recall exactly 0.3 misses voc_eval's np.arange threshold 0.30000000000000004: 3/11.
  """
  rec, prec = np.array([0.5, 0.5, 1.0]), np.array([1.0, 0.5, 2 / 3])
  assert voc.voc_ap(rec, prec, use_07_metric=True) == pytest.approx(28 / 33, abs=1e-12)
  assert voc.voc_ap(rec, prec, use_07_metric=False) == pytest.approx(5 / 6, abs=1e-12)
  assert voc.voc_ap([0.3], [1.0], use_07_metric=True) == pytest.approx(3 / 11, abs=1e-12)
  assert voc.voc_ap([], [], use_07_metric=True) == 0.0
  assert voc.voc_ap([], [], use_07_metric=False) == 0.0


def test_voc_evaluate_hand_case_two_gts_three_detections():
  """gts A = (0, 0, 10, 10), B = (20, 0, 30, 10) of class 0 in one image.
  Detections by score: .9 on A (TP), .8 on A again (A taken: FP), .7 on B (TP).
  tp = [1, 0, 1], fp = [0, 1, 0] -> recall [1/2, 1/2, 1], precision [1, 1/2, 2/3]:
  AP07 = 28/33, AP area = 5/6 (worked out in test_voc_ap_hand_cases). Class 1 has no gt: nan.
  """
  gts = [_gt([[0, 0, 10, 10], [20, 0, 30, 10]], [0, 0])]
  dets = [_det([[20, 0, 30, 10], [0, 0, 10, 10], [0, 0, 10, 10]], [0.7, 0.9, 0.8], [0, 0, 0])]
  r07 = voc.voc_evaluate(gts, dets, 2)
  r12 = voc.voc_evaluate(gts, dets, 2, use_07_metric=False)
  assert r07["ap"][0] == pytest.approx(28 / 33, abs=1e-12) and np.isnan(r07["ap"][1])
  assert r07["map"] == pytest.approx(28 / 33, abs=1e-12)
  assert r12["ap"][0] == pytest.approx(5 / 6, abs=1e-12) and r12["map"] == pytest.approx(5 / 6)


def test_voc_difficult_is_neither_tp_nor_fp():
  """gt A = (0, 0, 10, 10) normal, B = (20, 0, 30, 10) difficult.
  Detections by score: .9 on B (difficult: skipped), .8 at (50, 50, 60, 60) (FP), .7 on A (TP).
  tp = [0, 0, 1], fp = [0, 1, 0], npos = 1 -> recall [0, 0, 1], precision [0, 0, 1/2]:
  both metrics give 1/2. (B as a normal gt would give 28/33; the skipped detection as a FP 1/3.)
  A class whose only gt is difficult is nan and left out of the mean.
  """
  gts = [_gt([[0, 0, 10, 10], [20, 0, 30, 10], [0, 0, 5, 5]], [0, 0, 1], [False, True, True])]
  dets = [_det([[20, 0, 30, 10], [50, 50, 60, 60], [0, 0, 10, 10], [0, 0, 5, 5]],
               [0.9, 0.8, 0.7, 0.6], [0, 0, 0, 1])]
  for use_07 in (True, False):
    r = voc.voc_evaluate(gts, dets, 2, use_07_metric=use_07)
    assert r["ap"][0] == pytest.approx(0.5, abs=1e-12)
    assert np.isnan(r["ap"][1]) and r["map"] == pytest.approx(0.5, abs=1e-12)
  gts[0].pop("difficult")
  assert voc.voc_evaluate(gts, dets, 2)["ap"][0] == pytest.approx(28 / 33, abs=1e-12)


def test_voc_iou_threshold_is_strict_and_continuous():
  """Detection (0, 0, 10, 5) on gt (0, 0, 10, 10): continuous IoU = 50 / 100 = 0.5 exactly,
  not > 0.5, so a FP (AP 0); with threshold 0.49 a TP (AP 1). (VOC's +1 convention would give
  66 / 121 = 0.545 and a TP.)"""
  gts = [_gt([[0, 0, 10, 10]], [0])]
  dets = [_det([[0, 0, 10, 5]], [0.5], [0])]
  assert voc.voc_evaluate(gts, dets, 1)["map"] == 0.0
  assert voc.voc_evaluate(gts, dets, 1, iou_threshold=0.49)["map"] == 1.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_voc_evaluate_matches_loop_reference(seed):
  rng = np.random.default_rng(seed)
  gts, dets = _random_case(rng, num_images=24, num_classes=4)
  for use_07 in (True, False):
    for thr in (0.5, 0.7):
      got = voc.voc_evaluate(gts, dets, 4, iou_threshold=thr, use_07_metric=use_07)
      want = np.array([_ref_voc_eval(gts, dets, c, thr, use_07) for c in range(4)])
      np.testing.assert_allclose(got["ap"], want, rtol=0, atol=1e-12)
      assert np.isnan(got["ap"][3])
      assert got["map"] == pytest.approx(np.nanmean(want), abs=1e-12)
  assert 0 < np.nanmean(want) < 1       # the case is not trivial


def test_voc_no_detections_and_no_gt():
  gts = [_gt(np.zeros((0, 4)), []), _gt([[0, 0, 4, 4]], [1])]
  dets = [_det(np.zeros((0, 4)), [], []), _det(np.zeros((0, 4)), [], [])]
  r = voc.voc_evaluate(gts, dets, 2)
  assert np.isnan(r["ap"][0]) and r["ap"][1] == 0.0 and r["map"] == 0.0
  r = voc.voc_evaluate(gts[:1], dets[:1], 2)
  assert np.all(np.isnan(r["ap"])) and np.isnan(r["map"])


def test_voc_bad_inputs():
  gts = [_gt([[0, 0, 4, 4]], [0]), _gt([[0, 0, 4, 4], [1, 1, 3, 3]], [0, 5])]
  dets = [_det([[0, 0, 4, 4]], [0.5], [0]), _det(np.zeros((0, 4)), [], [])]
  with pytest.raises(ValueError, match=r"gts\[1\]\['labels'\]: label 5 at index 1 is outside"):
    voc.voc_evaluate(gts, dets, 3)
  gts[1]["labels"][1] = 1
  dets[0]["labels"][0] = -1
  with pytest.raises(ValueError, match=r"dets\[0\]\['labels'\]: label -1 at index 0"):
    voc.voc_evaluate(gts, dets, 3)
  dets[0]["labels"][0] = 0
  with pytest.raises(ValueError, match="dets: expected one entry per image, 2 to match gts, got 1"):
    voc.voc_evaluate(gts, dets[:1], 3)
  with pytest.raises(ValueError, match=r"gts\[0\]\['boxes'\].*x2 < x1"):
    voc.voc_evaluate([_gt([[4, 0, 0, 4]], [0])] + gts[1:], dets, 3)
  with pytest.raises(TypeError, match="gts: expected a list with one dict per image"):
    voc.voc_evaluate({"boxes": np.zeros((1, 2, 4))}, dets, 3)
  with pytest.raises(ValueError, match=r"gts\[0\]\['difficult'\]: expected a bool mask of shape"):
    voc.voc_evaluate([_gt([[0, 0, 4, 4]], [0], [True, False])] + gts[1:], dets, 3)


def test_unbatch_matches_slices_and_feeds_evaluation(rng):
  gts, dets = _random_case(rng, num_images=6, num_classes=3)
  b, m, k = len(gts), 7, 12
  batch = {"boxes": rng.uniform(0, 9, (b, m, 4)).astype(np.float32),    # garbage padding
           "labels": rng.integers(0, 9, (b, m)).astype(np.int32),
           "box_mask": np.zeros((b, m), bool), "difficult": rng.random((b, m)) < 0.5}
  out = {"boxes": rng.uniform(0, 9, (b, k, 4)).astype(np.float32),
         "scores": rng.random((b, k)).astype(np.float32),
         "labels": rng.integers(0, 9, (b, k)).astype(np.int32), "valid": np.zeros((b, k), bool)}
  for i, (g, d) in enumerate(zip(gts, dets)):
    slots = rng.permutation(m)[:len(g["labels"])]                       # real boxes anywhere
    slots.sort()
    batch["boxes"][i, slots], batch["labels"][i, slots] = g["boxes"], g["labels"]
    batch["difficult"][i, slots], batch["box_mask"][i, slots] = g["difficult"], True
    slots = np.sort(rng.permutation(k)[:len(d["labels"])])
    for key in ("boxes", "scores", "labels"):
      out[key][i, slots] = d[key]
    out["valid"][i, slots] = True
  got_gts = detections.unbatch_ground_truth(batch)
  got_dets = detections.unbatch_detections(out)
  for want, got in zip(gts + dets, got_gts + got_dets):
    assert sorted(want) == sorted(got)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])
      assert got[key].dtype == want[key].dtype
  np.testing.assert_array_equal(voc.voc_evaluate(got_gts, got_dets, 3)["ap"],
                                voc.voc_evaluate(gts, dets, 3)["ap"])
  with pytest.raises(ValueError, match=r"dets\['valid'\]: expected a bool mask of shape \(6, 12\)"):
    detections.unbatch_detections({**out, "valid": out["valid"][:, :3]})
  with pytest.raises(ValueError, match="batch: expected a dict with key 'box_mask'"):
    detections.unbatch_ground_truth({"boxes": batch["boxes"], "labels": batch["labels"]})
