"""Per-image detections and ground truth on the host: unbatching, checking, float64 IoU.

Evaluation works on Python lists with one dict of NumPy arrays per image (variable counts, no
padding), boxes f32[N, 4] (x1, y1, x2, y2) absolute pixels, continuous coordinates, no +1:

  ground truth: {"boxes": f32[N, 4], "labels": i32[N], optional "difficult": bool[N],
                 optional "iscrowd": bool[N]}
  detections:   {"boxes": f32[K, 4], "scores": f32[K], "labels": i32[K]}

`unbatch_detections` and `unbatch_ground_truth` turn the padded batches of `jaxdet.system`
(a leading batch axis, a boolean mask) into such lists.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from jaxdet import checks

_GT_OPTIONAL = ("difficult", "iscrowd")


def unbatch_detections(dets: Mapping[str, Any]) -> list[dict[str, np.ndarray]]:
  """Splits a padded batch of detections into one dict per image, dropping invalid slots.

  Args:
    dets: a `System.predict` output: boxes f32[B, K, 4] (x1, y1, x2, y2) pixels, scores
      f32[B, K], labels i32[B, K], valid bool[B, K] (True = a real detection). JAX or NumPy.
  Returns:
    B dicts {"boxes": f32[k, 4], "scores": f32[k], "labels": i32[k]}, k = valid[b].sum(),
    in slot order.
  """
  for key in ("boxes", "scores", "labels", "valid"):
    if key not in dets:
      raise ValueError(f"dets: expected a dict with key {key!r}, got keys {sorted(dets)}")
  boxes = np.asarray(dets["boxes"])
  scores = np.asarray(dets["scores"])
  labels = np.asarray(dets["labels"])
  valid = np.asarray(dets["valid"])
  checks.check_array("dets['scores']", scores, ndim=2, dtype_kind="f")
  checks.check_array("dets['boxes']", boxes, dtype_kind="f", shape=(*scores.shape, 4))
  checks.check_array("dets['labels']", labels, dtype_kind="iu", shape=scores.shape)
  checks.check_mask("dets['valid']", valid, "dets['scores']", scores.shape)
  return [{"boxes": boxes[b][valid[b]].astype(np.float32),
           "scores": scores[b][valid[b]].astype(np.float32),
           "labels": labels[b][valid[b]].astype(np.int32)} for b in range(len(valid))]


def unbatch_ground_truth(batch: Mapping[str, Any]) -> list[dict[str, np.ndarray]]:
  """Splits a padded batch's ground truth into one dict per image, dropping padding.

  Args:
    batch: a `jaxdet.system` batch: boxes f32[B, M, 4] (x1, y1, x2, y2) pixels, labels i32[B, M],
      box_mask bool[B, M] (True = real), optional difficult / iscrowd bool[B, M].
  Returns:
    B dicts {"boxes": f32[n, 4], "labels": i32[n]} (plus "difficult" / "iscrowd" bool[n] when
    the batch has them), n = box_mask[b].sum().
  """
  for key in ("boxes", "labels", "box_mask"):
    if key not in batch:
      raise ValueError(f"batch: expected a dict with key {key!r}, got keys {sorted(batch)}")
  boxes = np.asarray(batch["boxes"])
  labels = np.asarray(batch["labels"])
  mask = np.asarray(batch["box_mask"])
  checks.check_array("batch['labels']", labels, ndim=2, dtype_kind="iu")
  checks.check_array("batch['boxes']", boxes, dtype_kind="f", shape=(*labels.shape, 4))
  checks.check_mask("batch['box_mask']", mask, "batch['labels']", labels.shape)
  extra = {}
  for key in _GT_OPTIONAL:
    if key in batch:
      extra[key] = np.asarray(batch[key])
      checks.check_mask(f"batch[{key!r}]", extra[key], "batch['labels']", labels.shape)
  out = []
  for b in range(len(mask)):
    gt = {"boxes": boxes[b][mask[b]].astype(np.float32),
          "labels": labels[b][mask[b]].astype(np.int32)}
    gt.update({key: value[b][mask[b]] for key, value in extra.items()})
    out.append(gt)
  return out


def check_eval_inputs(gts: Sequence[Mapping[str, Any]], dets: Sequence[Mapping[str, Any]],
                      num_classes: int) -> None:
  """Host-side checks of evaluation inputs (see the module docstring for the format).

  Raises:
    ValueError: lists of different lengths, missing keys, mismatched sizes, non-finite boxes or
      scores, inverted ground-truth boxes (inverted detections are allowed and match nothing;
      their negative area lies outside every COCO area range), or a label outside [0, num_classes) (naming the argument, the image index
      and the label).
    TypeError: wrong dtypes.
  """
  if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)):
    raise TypeError(f"num_classes: expected an int, got {num_classes!r}")
  checks.check_positive("num_classes", int(num_classes))
  for name, items in (("gts", gts), ("dets", dets)):
    if isinstance(items, Mapping) or not isinstance(items, Sequence):
      raise TypeError(f"{name}: expected a list with one dict per image, got "
                      f"{type(items).__name__} (use unbatch_detections / unbatch_ground_truth "
                      f"for padded batches)")
  if len(gts) != len(dets):
    raise ValueError(f"dets: expected one entry per image, {len(gts)} to match gts, got "
                     f"{len(dets)}")
  for i, (gt, det) in enumerate(zip(gts, dets)):
    _check_one(f"gts[{i}]", gt, ("boxes", "labels"), num_classes)
    _check_one(f"dets[{i}]", det, ("boxes", "scores", "labels"), num_classes)


def _check_one(name: str, item: Mapping[str, Any], keys: Sequence[str], num_classes: int) -> None:
  if not isinstance(item, Mapping) or any(k not in item for k in keys):
    got = sorted(item) if isinstance(item, Mapping) else type(item).__name__
    raise ValueError(f"{name}: expected a dict with keys {list(keys)}, got {got}")
  boxes = np.asarray(item["boxes"])
  if "scores" in keys:   # a detection with x2 < x1 or y2 < y1 is allowed: it matches nothing
    checks.check_boxes(f"{name}['boxes']", boxes)
    if not np.all(np.isfinite(boxes)):
      i = int(np.argwhere(~np.isfinite(boxes))[0, 0])
      raise ValueError(f"{name}['boxes']: box {i} is not finite: {boxes[i].tolist()}")
  else:
    checks.check_box_values(f"{name}['boxes']", boxes)
  labels = np.asarray(item["labels"])
  checks.check_array(f"{name}['labels']", labels, ndim=1, dtype_kind="iu")
  checks.check_same_size(f"{name}['boxes']", boxes, f"{name}['labels']", labels)
  checks.check_label_values(f"{name}['labels']", labels, num_classes)
  if "scores" in keys:
    scores = np.asarray(item["scores"])
    checks.check_array(f"{name}['scores']", scores, ndim=1, dtype_kind="f")
    checks.check_same_size(f"{name}['boxes']", boxes, f"{name}['scores']", scores)
    if not np.all(np.isfinite(scores)):
      raise ValueError(f"{name}['scores']: expected finite scores, got {scores.tolist()[:8]}")
  else:
    for key in _GT_OPTIONAL:
      if key in item:
        checks.check_mask(f"{name}[{key!r}]", np.asarray(item[key]), f"{name}['labels']",
                          labels.shape)


def gt_flag(gt: Mapping[str, Any], key: str) -> np.ndarray:
  """The optional bool[N] flag `key` ("difficult" or "iscrowd") of one image; False if absent."""
  n = len(np.asarray(gt["labels"]))
  return np.asarray(gt[key], bool) if key in gt else np.zeros((n,), bool)


def iou_f64(dt: np.ndarray, gt: np.ndarray, crowd: np.ndarray | None = None) -> np.ndarray:
  """Pairwise IoU in float64, continuous coordinates (no +1), broadcasting over leading axes.

  Args:
    dt: f[..., D, 4] (x1, y1, x2, y2) pixels.
    gt: f[..., G, 4] (x1, y1, x2, y2) pixels.
    crowd: optional bool[..., G]; for a crowd gt the union is the detection's area (COCO).
  Returns:
    f64[..., D, G]; 0 where the intersection is empty (also for degenerate boxes).
  """
  dt = np.asarray(dt, np.float64)[..., :, None, :]             # [..., D, 1, 4]
  gt = np.asarray(gt, np.float64)[..., None, :, :]             # [..., 1, G, 4]
  w = np.minimum(dt[..., 2], gt[..., 2]) - np.maximum(dt[..., 0], gt[..., 0])  # [..., D, G]
  h = np.minimum(dt[..., 3], gt[..., 3]) - np.maximum(dt[..., 1], gt[..., 1])  # [..., D, G]
  inter = np.where((w > 0) & (h > 0), w * h, 0.0)              # [..., D, G]
  dt_area = (dt[..., 2] - dt[..., 0]) * (dt[..., 3] - dt[..., 1])  # [..., D, 1]
  gt_area = (gt[..., 2] - gt[..., 0]) * (gt[..., 3] - gt[..., 1])  # [..., 1, G]
  union = dt_area + gt_area - inter                            # [..., D, G]
  if crowd is not None:
    union = np.where(np.asarray(crowd, bool)[..., None, :], dt_area, union)
  ok = inter > 0
  return np.where(ok, inter / np.where(ok, union, 1.0), 0.0)


def group_ranks(group: np.ndarray, num_groups: int) -> tuple[np.ndarray, int]:
  """Position of every element inside its group, in order of appearance.

  Args:
    group: i[n] group index of each element, in [0, num_groups).
    num_groups: G.
  Returns:
    (rank i64[n], width): rank[i] = how many earlier elements share group[i]; width = the largest
    group size (0 when n = 0), so `padded[group, rank] = values` fills a [G, width] array.
  """
  group = np.asarray(group, np.int64)
  counts = np.bincount(group, minlength=num_groups)                  # [G]
  starts = np.cumsum(counts) - counts                                # [G]
  order = np.argsort(group, kind="stable")                           # [n]
  rank = np.empty_like(group)
  rank[order] = np.arange(len(group)) - starts[group[order]]
  return rank, int(counts.max(initial=0))
