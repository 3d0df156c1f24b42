"""COCO box AP and AR with the semantics of pycocotools' `COCOeval` (iouType "bbox"), in NumPy.

Our own vectorised implementation (pycocotools is only the tests' reference; jaxdet does not
import it). For every (image, class) pair, as `COCOeval.evaluate`:
  * detections are sorted by descending score (stable) and cut to the largest max_dets;
  * IoU is float64; for a crowd gt the union is the detection's area;
  * a gt is ignored if it is a crowd or its area lies outside the area range (ranges are
    all [0, 1e10], small [0, 32^2], medium [32^2, 96^2], large [96^2, 1e10]; ends inclusive);
  * at each IoU threshold t in .5:.05:.95 each detection, in score order, takes the available
    gt (not yet matched, or a crowd, which matches any number) with the largest IoU >= t
    (the last on ties), preferring non-ignored gts: an ignored gt is taken only when no
    non-ignored gt qualifies; a detection matched to an ignored gt is ignored, and so is an
    unmatched detection whose area lies outside the range.
Then, as `COCOeval.accumulate`, per class, area range and max_dets m: the first m detections of
every image, sorted by score over all images, give precision/recall curves; precision is made
non-increasing and read at 101 recall points (0 beyond the last recall); a class without
non-ignored gt is undefined (-1). `COCOeval.summarize` averages the defined entries.

Areas: a gt's optional "area" (COCO's annotation area, the mask's, which pycocotools uses for
the area ranges), else its box area; a detection's area is its box area (as `loadRes`).
Boxes are jaxdet's (x1, y1, x2, y2) absolute pixels; they become COCO's (x, y, w, h) only in
`gts_to_coco_json`/`dets_to_coco_json`, which also take the dataset's image and category ids.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from jaxdet import checks
from jaxdet.eval import detections as det_lib

# Exactly pycocotools' Params.setDetParams values (linspace, not arange, as COCOeval notes).
IOU_THRESHOLDS = np.linspace(.5, 0.95, int(np.round((0.95 - .5) / .05)) + 1, endpoint=True)
RECALL_THRESHOLDS = np.linspace(.0, 1.00, int(np.round((1.00 - .0) / .01)) + 1, endpoint=True)
AREA_RANGES = np.array([[0 ** 2, 1e5 ** 2], [0 ** 2, 32 ** 2], [32 ** 2, 96 ** 2],
                        [96 ** 2, 1e5 ** 2]])              # [A, 2]: all, small, medium, large
AREA_NAMES = ("", "s", "m", "l")

# Elements of the largest temporary array per chunk of (image, class) pairs in the matching.
_CHUNK_ELEMENTS = 1 << 22


def coco_evaluate(gts: Sequence[Mapping[str, Any]], dets: Sequence[Mapping[str, Any]],
                  num_classes: int, *, max_dets: Sequence[int] = (1, 10, 100)) -> dict[str, Any]:
  """COCO bbox metrics equal to pycocotools' `COCOeval.summarize()` stats.

  Args:
    gts: one dict per image: boxes f32[N, 4] (x1, y1, x2, y2) pixels, labels i32[N] in
      [0, num_classes), optional iscrowd bool[N] (ignore regions, matched by IoA), optional
      area f[N] (the annotation's area; default the box area) ("difficult" is not used).
    dets: one dict per image, same order: boxes f32[K, 4], scores f32[K], labels i32[K].
    num_classes: C; every class is evaluated, a class without gt is undefined.
    max_dets: increasing detections-per-image limits, M >= 1; AP and the per-area AR use the
      last (pycocotools' maxDets[2]).
  Returns:
    {"AP": AP at IoU .50:.95, "AP50", "AP75", "APs", "APm", "APl" (small, medium, large),
     "AR{m}" for each m in max_dets, "ARs", "ARm", "ARl": Python floats, -1 where undefined
     (no class has non-ignored gt in that area range);
     "ap_per_class": f64[C] AP at .50:.95 of each class (-1 undefined);
     "precision": f64[T=10, R=101, C, A=4, M], "recall": f64[T, C, A, M] (as COCOeval.eval)}.
  """
  det_lib.check_eval_inputs(gts, dets, num_classes)
  max_dets = tuple(int(m) for m in max_dets)
  checks.check_positive("max_dets", max_dets)
  if not max_dets or list(max_dets) != sorted(set(max_dets)):
    raise ValueError(f"max_dets: expected strictly increasing limits, got {max_dets}")
  gt = _flatten(gts, num_classes, is_gt=True)
  dt = _flatten(dets, num_classes, is_gt=False)
  dt = _sort_and_cut(dt, max_dets[-1])
  dt_matched, dt_ignored = _match(gt, dt)                           # [A, T, K] each
  precision, recall = _accumulate(gt, dt, dt_matched, dt_ignored, num_classes, max_dets)
  return _summarize(precision, recall, max_dets)


def _flatten(items, num_classes, *, is_gt):
  """Concatenates per-image dicts into flat float64 arrays with their (image, class) pair key."""
  n = [len(np.asarray(x["labels"])) for x in items]
  image = np.repeat(np.arange(len(items)), n)                                   # [N]
  label = np.concatenate([np.asarray(x["labels"], np.int64) for x in items] + [[]])
  box = np.concatenate([np.asarray(x["boxes"], np.float64).reshape(-1, 4) for x in items]
                       + [np.zeros((0, 4))])                                     # [N, 4]
  label = label.astype(np.int64)
  area = (box[:, 2] - box[:, 0]) * (box[:, 3] - box[:, 1])
  if is_gt and any("area" in x for x in items):
    area = np.concatenate([_gt_area(x, i) for i, x in enumerate(items)] + [np.zeros(0)])
  out = {"image": image, "label": label, "box": box, "pair": image * num_classes + label,
         "area": area}
  if is_gt:
    out["crowd"] = np.concatenate([det_lib.gt_flag(x, "iscrowd") for x in items]
                                  + [np.zeros(0, bool)])
  else:
    out["score"] = np.concatenate([np.asarray(x["scores"], np.float64) for x in items] + [[]])
  return out


def _gt_area(gt, index):
  """f64[N] the annotation areas of one image's gt ("area"), else the box areas."""
  box = np.asarray(gt["boxes"], np.float64).reshape(-1, 4)
  if "area" not in gt:
    return (box[:, 2] - box[:, 0]) * (box[:, 3] - box[:, 1])
  area = np.asarray(gt["area"], np.float64).reshape(-1)
  if len(area) != len(box):
    raise ValueError(f"gts[{index}]['area']: expected one area per box ({len(box)}), got "
                     f"{len(area)}")
  return area


def _sort_and_cut(dt, max_det):
  """Orders detections by (pair, descending score, input order); keeps the first max_det."""
  order = np.lexsort((np.arange(len(dt["score"])), -dt["score"], dt["pair"]))
  dt = {k: v[order] for k, v in dt.items()}
  _, start = np.unique(dt["pair"], return_index=True)
  first = np.zeros(len(dt["pair"]), np.int64)
  first[start] = start
  rank = np.arange(len(first)) - np.maximum.accumulate(first)       # position in its pair
  keep = rank < max_det
  dt = {k: v[keep] for k, v in dt.items()}
  dt["rank"] = rank[keep]
  return dt


def _area_outside(area):
  """bool[A, N]: area outside each of the A area ranges (COCO's ends are inclusive)."""
  return (area[None, :] < AREA_RANGES[:, :1]) | (area[None, :] > AREA_RANGES[:, 1:])


def _match(gt, dt):
  """Greedy matching at every area range and IoU threshold.

  Returns:
    (matched, ignored): bool[A, T, K] for the detections of `dt` (in its order).
  """
  num_a, num_t = len(AREA_RANGES), len(IOU_THRESHOLDS)
  matched = np.zeros((num_a, num_t, len(dt["pair"])), bool)
  ignored = np.zeros((num_a, num_t, len(dt["pair"])), bool)
  pairs = np.intersect1d(gt["pair"], dt["pair"])                   # pairs with gt and dets
  if len(pairs) == 0:
    ignored[...] = _area_outside(dt["area"])[:, None, :]
    return matched, ignored
  num_gt = np.bincount(np.searchsorted(pairs, gt["pair"][np.isin(gt["pair"], pairs)]),
                       minlength=len(pairs))
  num_dt = np.bincount(np.searchsorted(pairs, dt["pair"][np.isin(dt["pair"], pairs)]),
                       minlength=len(pairs))
  by_size = np.lexsort((num_dt, num_gt))                            # similar sizes together
  start = 0
  while start < len(pairs):                                         # chunks of pairs
    stop, g_max, d_max = start, 0, 0
    while stop < len(pairs):
      g, d = max(g_max, num_gt[by_size[stop]]), max(d_max, num_dt[by_size[stop]])
      if stop > start and (stop - start + 1) * g * max(d, num_a * num_t) > _CHUNK_ELEMENTS:
        break
      g_max, d_max, stop = g, d, stop + 1
    chunk = np.sort(pairs[by_size[start:stop]])
    _match_chunk(gt, dt, chunk, matched, ignored)
    start = stop
  in_pairs = np.isin(dt["pair"], pairs)
  ignored[..., ~in_pairs] = _area_outside(dt["area"][~in_pairs])[:, None, :]
  return matched, ignored


def _match_chunk(gt, dt, chunk, matched, ignored):
  """Matches the (image, class) pairs `chunk` (sorted keys); writes into matched / ignored."""
  g_sel = np.flatnonzero(np.isin(gt["pair"], chunk))                # gts of the chunk
  d_sel = np.flatnonzero(np.isin(dt["pair"], chunk))                # dets, sorted per pair
  num_p = len(chunk)
  d_pair = np.searchsorted(chunk, dt["pair"][d_sel])
  # Slots ordered by descending detection count: at step d only the first pairs take part.
  d_count = np.bincount(d_pair, minlength=num_p)                   # [P]
  slot = np.empty(num_p, np.int64)
  slot[np.argsort(-d_count, kind="stable")] = np.arange(num_p)
  d_pair = slot[d_pair]
  g_pair = slot[np.searchsorted(chunk, gt["pair"][g_sel])]
  active = np.sort(d_count)[::-1]                                   # [P] dets per slot
  g_rank, num_g = det_lib.group_ranks(g_pair, num_p)                # gts in input order
  d_rank, num_d = dt["rank"][d_sel], int(dt["rank"][d_sel].max()) + 1
  gt_box = np.zeros((num_p, num_g, 4))                              # [P, G, 4]
  gt_area = np.zeros((num_p, num_g))                                # [P, G]
  gt_crowd = np.zeros((num_p, num_g), bool)                         # [P, G]
  gt_ok = np.zeros((num_p, num_g), bool)                            # [P, G] real gt
  gt_box[g_pair, g_rank] = gt["box"][g_sel]
  gt_area[g_pair, g_rank] = gt["area"][g_sel]
  gt_crowd[g_pair, g_rank] = gt["crowd"][g_sel]
  gt_ok[g_pair, g_rank] = True
  dt_box = np.zeros((num_p, num_d, 4))                              # [P, D, 4]
  dt_box[d_pair, d_rank] = dt["box"][d_sel]
  iou = det_lib.iou_f64(dt_box, gt_box, gt_crowd)                   # [P, D, G]
  gt_ignore = gt_crowd[None] | _area_outside(gt_area.reshape(-1)).reshape(-1, num_p, num_g)
  thresholds = IOU_THRESHOLDS[None, :, None, None]                  # [1, T, 1, 1]
  shape = (len(AREA_RANGES), len(IOU_THRESHOLDS), num_p)
  taken = np.zeros(shape + (num_g,), bool)                          # [A, T, P, G]
  chunk_matched = np.zeros(shape + (num_d,), bool)                  # [A, T, P, D]
  chunk_ignored = np.zeros(shape + (num_d,), bool)                  # [A, T, P, D]
  for d in range(num_d):                                            # detections in score order
    p = int(np.sum(active > d))                                     # pairs with a d-th det
    iou_d = iou[:p, d, :]                                           # [p, G]
    crowd, ignore = gt_crowd[:p], gt_ignore[:, None, :p]            # [p, G], [A, 1, p, G]
    ok = gt_ok[:p] & (~taken[:, :, :p] | crowd) & (iou_d >= thresholds)   # [A, T, p, G]
    regular = ok & ~ignore                                          # [A, T, p, G]
    any_regular = regular.any(-1)                                   # [A, T, p]
    any_ok = ok.any(-1)                                             # [A, T, p]
    pool = np.where(any_regular[..., None], regular, ok & ignore)   # [A, T, p, G]
    score = np.where(pool, iou_d, -1.0)                             # [A, T, p, G]
    best = num_g - 1 - np.argmax(score[..., ::-1], axis=-1)         # last maximum
    chunk_matched[:, :, :p, d] = any_ok
    chunk_ignored[:, :, :p, d] = any_ok & ~any_regular
    taken[:, :, :p] |= any_ok[..., None] & (np.arange(num_g) == best[..., None])
  outside = _area_outside(dt["area"][d_sel])                       # [A, n]
  m = chunk_matched[:, :, d_pair, d_rank]                           # [A, T, n]
  matched[:, :, d_sel] = m
  ignored[:, :, d_sel] = chunk_ignored[:, :, d_pair, d_rank] | (~m & outside[:, None, :])


def _accumulate(gt, dt, dt_matched, dt_ignored, num_classes, max_dets):
  """Precision f64[T, R, C, A, M] and recall f64[T, C, A, M] as COCOeval.accumulate."""
  num_t, num_r, num_a = len(IOU_THRESHOLDS), len(RECALL_THRESHOLDS), len(AREA_RANGES)
  precision = -np.ones((num_t, num_r, num_classes, num_a, len(max_dets)))
  recall = -np.ones((num_t, num_classes, num_a, len(max_dets)))
  regular = ~gt["crowd"][None] & ~_area_outside(gt["area"])         # [A, N]
  num_pos = np.stack([np.bincount(gt["label"][r], minlength=num_classes)
                      for r in regular], axis=1)                     # [C, A]
  for k in np.flatnonzero(num_pos.sum(1) > 0):
    sel = np.flatnonzero(dt["label"] == k)
    # Scores over all images, ties in image order then per-image rank (COCOeval's mergesort).
    sel = sel[np.lexsort((dt["rank"][sel], dt["image"][sel], -dt["score"][sel]))]
    for m, max_det in enumerate(max_dets):
      keep = sel[dt["rank"][sel] < max_det]
      hit, skip = dt_matched[:, :, keep], dt_ignored[:, :, keep]    # [A, T, n]
      tp = np.cumsum(hit & ~skip, axis=-1, dtype=np.float64)        # [A, T, n]
      fp = np.cumsum(~hit & ~skip, axis=-1, dtype=np.float64)       # [A, T, n]
      for a in np.flatnonzero(num_pos[k] > 0):
        if len(keep) == 0:
          precision[:, :, k, a, m], recall[:, k, a, m] = 0.0, 0.0
          continue
        rc = tp[a] / num_pos[k, a]                                  # [T, n]
        pr = tp[a] / (fp[a] + tp[a] + np.spacing(1))                # [T, n]
        pr = np.maximum.accumulate(pr[:, ::-1], axis=1)[:, ::-1]    # envelope
        recall[:, k, a, m] = rc[:, -1]
        for t in range(num_t):
          idx = np.searchsorted(rc[t], RECALL_THRESHOLDS, side="left")   # [R]
          reached = idx < len(keep)                                 # 0 beyond the last recall
          precision[t, :, k, a, m] = np.where(reached, pr[t][np.minimum(idx, len(keep) - 1)], 0.0)
  return precision, recall


def _mean_defined(x: np.ndarray) -> float:
  defined = x[x > -1]
  return float(np.mean(defined)) if defined.size else -1.0


def _summarize(precision, recall, max_dets):
  """The COCOeval.summarize() stats from precision [T, R, C, A, M] and recall [T, C, A, M]."""
  last = len(max_dets) - 1
  t50 = np.flatnonzero(IOU_THRESHOLDS == .5)
  t75 = np.flatnonzero(IOU_THRESHOLDS == .75)
  out = {"AP": _mean_defined(precision[:, :, :, 0, last]),
         "AP50": _mean_defined(precision[t50][:, :, :, 0, last]),
         "AP75": _mean_defined(precision[t75][:, :, :, 0, last])}
  for a in (1, 2, 3):
    out["AP" + AREA_NAMES[a]] = _mean_defined(precision[:, :, :, a, last])
  for m, max_det in enumerate(max_dets):
    out[f"AR{max_det}"] = _mean_defined(recall[:, :, 0, m])
  for a in (1, 2, 3):
    out["AR" + AREA_NAMES[a]] = _mean_defined(recall[:, :, a, last])
  out["ap_per_class"] = np.array([_mean_defined(precision[:, :, k, 0, last])
                                  for k in range(precision.shape[2])])
  out["precision"], out["recall"] = precision, recall
  return out


def gts_to_coco_json(gts: Sequence[Mapping[str, Any]], num_classes: int, *,
                     class_names: Sequence[str] | None = None,
                     image_ids: Sequence[int] | None = None,
                     category_ids: Sequence[int] | None = None) -> dict[str, Any]:
  """Ground truth as a COCO dataset dict (what `pycocotools.coco.COCO` reads).

  Image i gets id image_ids[i] (default i + 1), class c category id category_ids[c] (default
  c + 1), annotations ids 1, 2, ... in input order; boxes become [x, y, w, h] (float64), area
  the gt's "area" when given (else w * h), iscrowd from the optional flag.
  """
  names = class_names if class_names is not None else [str(c) for c in range(num_classes)]
  if len(names) != num_classes:
    raise ValueError(f"class_names: expected {num_classes} names, got {len(names)}")
  image_ids = _ids("image_ids", image_ids, len(gts))
  category_ids = _ids("category_ids", category_ids, num_classes)
  annotations = []
  for i, gt in enumerate(gts):
    crowd = det_lib.gt_flag(gt, "iscrowd")
    area = _gt_area(gt, i)
    for box, label, is_crowd, a in zip(np.asarray(gt["boxes"], np.float64), gt["labels"],
                                       crowd, area):
      annotations.append({"id": len(annotations) + 1, "image_id": image_ids[i],
                          "category_id": category_ids[int(label)], "bbox": _xywh(box),
                          "area": float(a), "iscrowd": int(is_crowd)})
  return {"images": [{"id": i} for i in image_ids],
          "annotations": annotations,
          "categories": [{"id": category_ids[c], "name": names[c]} for c in range(num_classes)]}


def dets_to_coco_json(dets: Sequence[Mapping[str, Any]], *,
                      image_ids: Sequence[int] | None = None,
                      category_ids: Sequence[int] | None = None) -> list[dict[str, Any]]:
  """Detections as a COCO results list (what `COCO.loadRes` reads).

  Args:
    dets: one dict per image: boxes f32[K, 4] (x1, y1, x2, y2) pixels (of the images the ids
      name: for COCO's own ids, the original images), scores f32[K], labels i32[K].
    image_ids: the dataset's id of each image (default i + 1).
    category_ids: the dataset's category id of each label c (default c + 1; COCO 2017:
      jaxdet.data.tfds.COCO_CATEGORY_IDS).
  Returns:
    [{"image_id", "category_id", "bbox": [x, y, w, h], "score"}].
  """
  image_ids = _ids("image_ids", image_ids, len(dets))
  num_labels = 1 + max([int(np.max(d["labels"], initial=-1)) for d in dets] + [-1])
  if category_ids is not None and len(category_ids) < num_labels:
    raise ValueError(f"category_ids: expected an id for each label up to {num_labels - 1}, "
                     f"got {len(category_ids)} ids")
  out = []
  for i, det in enumerate(dets):
    for box, score, label in zip(np.asarray(det["boxes"], np.float64), det["scores"],
                                 det["labels"]):
      cat = int(label) + 1 if category_ids is None else int(category_ids[int(label)])
      out.append({"image_id": image_ids[i], "category_id": cat, "bbox": _xywh(box),
                  "score": float(score)})
  return out


def _ids(name: str, ids: Sequence[int] | None, n: int) -> list[int]:
  """ids as Python ints (default 1..n); an error naming `name` unless there are n."""
  if ids is None:
    return list(range(1, n + 1))
  ids = [int(i) for i in ids]
  if len(ids) != n:
    raise ValueError(f"{name}: expected {n} ids, got {len(ids)}")
  return ids


def _xywh(box: np.ndarray) -> list[float]:
  x1, y1, x2, y2 = (float(v) for v in box)
  return [x1, y1, x2 - x1, y2 - y1]
