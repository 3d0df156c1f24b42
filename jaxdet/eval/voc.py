"""PASCAL VOC average precision, after py-faster-rcnn's `voc_eval.py` (host side, NumPy float64).

Semantics, per class, as in `voc_eval.py`:
  * detections of the class from all images are sorted by descending score (a stable sort: ties
    keep image order, then detection order; the original's quicksort leaves ties unspecified);
  * each detection is compared with the ground truth of its image and class; it takes the gt of
    maximum IoU (the first on ties) and counts only if that IoU is > `iou_threshold`;
  * if that gt is "difficult" the detection is neither a true nor a false positive;
  * otherwise it is a true positive if the gt is not yet matched (and matches it), else a false
    positive; a detection below the threshold (or in an image without gt of its class) is false;
  * recall = TP / (number of non-difficult gts), precision = TP / max(TP + FP, eps), and
    `voc_ap` turns the curves into AP (11-point for VOC2007, area for VOC2010+).

Difference from the original: IoU uses jaxdet's continuous coordinates (width = x2 - x1),
not VOC's inclusive integer pixels (width = x2 - x1 + 1). A class without non-difficult ground
truth gets AP nan (the original divides by zero) and is left out of the mean.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from jaxdet import checks
from jaxdet.eval import detections as det_lib

# The recall thresholds of the VOC2007 11-point metric exactly as voc_eval.py builds them
# (np.arange's floats, e.g. 0.30000000000000004, so recall 0.3 does not reach the 0.3 point).
_VOC07_RECALLS = np.arange(0.0, 1.1, 0.1)


def voc_ap(recall: Any, precision: Any, use_07_metric: bool = True) -> float:
  """Average precision from a precision/recall curve (py-faster-rcnn's `voc_ap`).

  Args:
    recall: f[N] recall after each detection, in descending score order (non-decreasing).
    precision: f[N] precision after each detection.
    use_07_metric: True: the VOC2007 11-point metric, the mean over t in {0, 0.1, ..., 1} of the
      largest precision at recall >= t (0 if none). False (VOC2010+): the area under the
      precision envelope (precision made non-increasing from the right), summed where recall
      changes, with the curve closed by (0, 0) and (1, 0).
  Returns:
    AP as a Python float (0 for empty curves).
  """
  recall = np.asarray(recall, np.float64)
  precision = np.asarray(precision, np.float64)
  checks.check_array("recall", recall, ndim=1)
  checks.check_array("precision", precision, ndim=1)
  checks.check_same_size("recall", recall, "precision", precision)
  if use_07_metric:
    reached = recall[None, :] >= _VOC07_RECALLS[:, None]                # [11, N]
    best = np.where(reached, precision[None, :], -np.inf).max(axis=1, initial=-np.inf)
    return float(np.sum(np.where(reached.any(axis=1), best, 0.0) / 11.0))
  mrec = np.concatenate(([0.0], recall, [1.0]))                         # [N + 2]
  mpre = np.concatenate(([0.0], precision, [0.0]))                      # [N + 2]
  mpre = np.maximum.accumulate(mpre[::-1])[::-1]                        # envelope
  i = np.flatnonzero(mrec[1:] != mrec[:-1])                             # recall steps
  return float(np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1]))


def voc_evaluate(gts: Sequence[Mapping[str, Any]], dets: Sequence[Mapping[str, Any]],
                 num_classes: int, *, iou_threshold: float = 0.5,
                 use_07_metric: bool = True) -> dict[str, Any]:
  """VOC detection AP per class and mAP (see the module docstring for the exact semantics).

  Args:
    gts: one dict per image: boxes f32[N, 4] (x1, y1, x2, y2) pixels, labels i32[N] in
      [0, num_classes), optional difficult bool[N] ("iscrowd" is not used).
    dets: one dict per image, same order: boxes f32[K, 4], scores f32[K], labels i32[K].
    num_classes: C.
    iou_threshold: a detection needs IoU > this with its best gt.
    use_07_metric: the VOC2007 11-point AP (True) or the VOC2010+ area AP (False).
  Returns:
    {"ap": f64[C] (nan for a class without non-difficult gt), "map": the mean AP over the
     classes with gt (nan if none)}.
  Raises:
    ValueError / TypeError for malformed inputs or labels outside [0, num_classes).
  """
  det_lib.check_eval_inputs(gts, dets, num_classes)
  checks.check_positive("iou_threshold", float(iou_threshold), allow_zero=True)
  gt_img, gt_box, gt_lab, gt_diff = _flatten_gts(gts)
  dt_img, dt_box, dt_lab, dt_score = _flatten_dets(dets)
  ap = np.full((num_classes,), np.nan)
  for c in range(num_classes):
    g, d = gt_lab == c, dt_lab == c
    tp, fp, npos = _match_class(gt_img[g], gt_box[g], gt_diff[g], dt_img[d], dt_box[d],
                                dt_score[d], len(gts), iou_threshold)
    if npos == 0:
      continue
    tp, fp = np.cumsum(tp), np.cumsum(fp)
    recall = tp / float(npos)
    precision = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    ap[c] = voc_ap(recall, precision, use_07_metric)
  has_gt = ~np.isnan(ap)
  mean = float(np.mean(ap[has_gt])) if has_gt.any() else float("nan")
  return {"ap": ap, "map": mean}


def _flatten_gts(gts):
  """Concatenates per-image gts -> image i64[N], boxes f64[N, 4], labels i64[N], difficult[N]."""
  img = np.concatenate([np.full(len(g["labels"]), i) for i, g in enumerate(gts)] + [[]])
  box = np.concatenate([np.asarray(g["boxes"], np.float64).reshape(-1, 4) for g in gts]
                       + [np.zeros((0, 4))])
  lab = np.concatenate([np.asarray(g["labels"]) for g in gts] + [[]])
  diff = np.concatenate([det_lib.gt_flag(g, "difficult") for g in gts] + [np.zeros(0, bool)])
  return img.astype(np.int64), box, lab.astype(np.int64), diff


def _flatten_dets(dets):
  """Concatenates per-image detections -> image i64[K], boxes f64[K, 4], labels, scores f64[K]."""
  img = np.concatenate([np.full(len(d["labels"]), i) for i, d in enumerate(dets)] + [[]])
  box = np.concatenate([np.asarray(d["boxes"], np.float64).reshape(-1, 4) for d in dets]
                       + [np.zeros((0, 4))])
  lab = np.concatenate([np.asarray(d["labels"]) for d in dets] + [[]])
  score = np.concatenate([np.asarray(d["scores"], np.float64) for d in dets] + [[]])
  return img.astype(np.int64), box, lab.astype(np.int64), score


def _match_class(gt_img, gt_box, gt_diff, dt_img, dt_box, dt_score, num_images, iou_threshold):
  """TP/FP flags of one class's detections in descending score order.

  Returns:
    (tp f64[K], fp f64[K], npos): a detection matching a difficult gt has tp = fp = 0; npos is
    the number of non-difficult gts.
  """
  npos = int(np.sum(~gt_diff))
  if len(gt_img) == 0:                                               # every detection is false
    return np.zeros(len(dt_img)), np.ones(len(dt_img)), npos
  order = np.argsort(-dt_score, kind="stable")                       # [K]
  dt_img, dt_box = dt_img[order], dt_box[order]
  rank, width = det_lib.group_ranks(gt_img, num_images)
  pad_box = np.zeros((num_images, width, 4))                         # [I, G, 4]
  pad_diff = np.zeros((num_images, width), bool)                     # [I, G]
  pad_ok = np.zeros((num_images, width), bool)                       # [I, G]
  pad_box[gt_img, rank], pad_diff[gt_img, rank], pad_ok[gt_img, rank] = gt_box, gt_diff, True
  iou = det_lib.iou_f64(dt_box[:, None, :], pad_box[dt_img])[:, 0, :]   # [K, G]
  iou = np.where(pad_ok[dt_img], iou, -np.inf)                       # [K, G]
  best = iou.argmax(axis=1)                                          # [K] first max
  best_iou = iou.max(axis=1)                                         # [K]
  hit = best_iou > iou_threshold                                     # [K]
  hit_difficult = hit & pad_diff[dt_img, best]                       # [K] neither TP nor FP
  claim = np.flatnonzero(hit & ~hit_difficult)                       # TP candidates, in order
  _, first = np.unique(dt_img[claim] * max(width, 1) + best[claim], return_index=True)
  tp = np.zeros(len(dt_img))
  tp[claim[first]] = 1.0                                             # first claim of each gt
  fp = np.where(hit_difficult, 0.0, 1.0 - tp)
  return tp, fp, npos
