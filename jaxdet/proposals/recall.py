"""Proposal recall: the fraction of ground-truth boxes covered by the top-k proposals.

Recall at IoU t with k proposals = (number of real ground-truth boxes whose best IoU with the
first k proposals of their image is >= t) / (number of real ground-truth boxes), pooled over
all images (as in Hosang et al. 2015 and the selective search paper). It bounds the recall of
every detector that classifies these proposals. Host-side NumPy (float64), one image at a time.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from jaxdet import checks

DEFAULT_TOP_K = (100, 500, 2000)
DEFAULT_IOUS = (0.5, 0.7)


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """f64[N, M] IoU of boxes a f[N, 4] and b f[M, 4] (x1, y1, x2, y2) pixels (0 for empty)."""
  a, b = np.asarray(a, np.float64).reshape(-1, 4), np.asarray(b, np.float64).reshape(-1, 4)
  lt = np.maximum(a[:, None, :2], b[None, :, :2])
  rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
  inter = np.prod(np.clip(rb - lt, 0, None), axis=-1)
  area = lambda x: np.prod(np.clip(x[:, 2:] - x[:, :2], 0, None), axis=-1)
  union = area(a)[:, None] + area(b)[None, :] - inter
  return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def best_overlaps(gt_boxes: np.ndarray, proposals: np.ndarray, proposal_mask: np.ndarray,
                  top_k: Sequence[int]) -> np.ndarray:
  """f64[len(top_k), G]: each gt box's best IoU with the first k real proposals of its image.

  Args:
    gt_boxes: f[G, 4] real ground-truth boxes of one image.
    proposals: f[P, 4] in ranking order; proposal_mask: bool[P] (True = real).
    top_k: the k values.
  """
  proposals = np.asarray(proposals).reshape(-1, 4)[np.asarray(proposal_mask, bool)]
  iou = iou_matrix(gt_boxes, proposals)                                   # [G, P']
  out = np.zeros((len(top_k), len(iou)))
  for i, k in enumerate(top_k):
    if iou.shape[1] and k > 0:
      out[i] = iou[:, :k].max(axis=1)
  return out


def proposal_recall(gt_boxes: Sequence[np.ndarray], proposals: Sequence[np.ndarray],
                    proposal_masks: Sequence[np.ndarray], *,
                    top_k: Sequence[int] = DEFAULT_TOP_K,
                    ious: Sequence[float] = DEFAULT_IOUS) -> dict[str, float]:
  """Recall of the ground truth by the top-k proposals, pooled over images.

  Args:
    gt_boxes: per image f[G_i, 4] real ground-truth boxes (x1, y1, x2, y2) pixels.
    proposals: per image f[P, 4] proposals in ranking order (the same pixels).
    proposal_masks: per image bool[P].
    top_k: numbers of proposals.
    ious: IoU thresholds.
  Returns:
    {"recall@{k}_iou{t}": float, "mean_proposals": float, "num_gt": float}; recall is 0 when
    there is no ground truth.
  """
  if not len(gt_boxes) == len(proposals) == len(proposal_masks):
    raise ValueError(f"proposals: expected one entry per image of gt_boxes ({len(gt_boxes)}), "
                     f"got {len(proposals)} proposals and {len(proposal_masks)} masks")
  for k in top_k:
    checks.check_positive("top_k", int(k))
  best = [best_overlaps(g, p, m, top_k) for g, p, m in zip(gt_boxes, proposals, proposal_masks)]
  best = np.concatenate(best, axis=1) if best else np.zeros((len(top_k), 0))
  num_gt = best.shape[1]
  out = {}
  for i, k in enumerate(top_k):
    for t in ious:
      hit = float(np.sum(best[i] >= t))
      out[f"recall@{k}_iou{t:g}"] = hit / num_gt if num_gt else 0.0
  out["mean_proposals"] = float(np.mean([np.sum(m) for m in proposal_masks])) if len(
      proposal_masks) else 0.0
  out["num_gt"] = float(num_gt)
  return out
