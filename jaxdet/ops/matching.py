"""Matching anchors or proposals to ground truth by IoU: {1 positive, 0 negative, -1 ignore}.

The rule of Fast/Faster R-CNN (and torchvision's `Matcher`): a row (anchor or proposal) takes the
ground-truth box it overlaps most; it is positive when that IoU >= `high`, negative when
`negative_floor` <= IoU < `low` (Fast R-CNN's background interval [0.1, 0.5), Faster R-CNN's RPN
[0, 0.3)) and ignored otherwise. IoU values and thresholds are compared in float32.

Non-finite boxes never match: `jaxdet.ops.boxes.box_iou` gives them IoU 0 with every box, so a
non-finite ground-truth box is never the match of a positive row (also not by the low-quality
rule, which needs an IoU > 0), and an IoU entry that is itself not finite (a user's overlap
function) counts as no overlap. A row whose own box is not finite has max_iou 0: pass
`row_mask=jaxdet.ops.boxes.finite_box_mask(rows)` to ignore it rather than call it negative.
"""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp

from jaxdet import checks


def match_boxes(iou: jax.Array, gt_mask: jax.Array, *, high: float, low: float,
                negative_floor: float = 0.0, allow_low_quality: bool = False,
                row_mask: jax.Array | None = None
                ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Assigns every row its best ground-truth box and a training label.

  Args:
    iou: f32[N, M] IoU of N anchors/proposals (rows) with M ground-truth boxes (columns);
      non-finite entries count as no overlap (never matched).
    gt_mask: bool[M], True = real ground truth; padded columns never match.
    high: IoU at or above which a row is positive.
    low: IoU below which a row is negative (low <= high; low == high leaves nothing ignored).
    negative_floor: rows whose best IoU is below this are ignored rather than negative.
    allow_low_quality: also make positive, for each real gt whose best IoU over the valid rows
      is > 0, every row attaining that best IoU (ties included). As in torchvision's
      `Matcher.set_low_quality_matches_`, py-faster-rcnn and Detectron, such a row keeps its own
      best gt as `matched_gt` (which is this gt unless the row overlaps another gt more).
    row_mask: bool[N] or None; False rows are labelled -1, take no part in the low-quality
      matches, and get matched_gt 0 and max_iou 0.
  Returns:
    matched_gt: i32[N] index of the best real gt for each row (0 where there is none);
    max_iou: f32[N] its IoU (0 where there is no real gt);
    labels: i32[N] in {1, 0, -1}. With no real gt every valid row has max_iou 0, so it is
      negative when negative_floor <= 0.
  """
  checks.check_array("iou", iou, ndim=2, dtype_kind="f")
  n, m = iou.shape
  checks.check_mask("gt_mask", gt_mask, "the columns of iou", (m,))
  if row_mask is not None:
    checks.check_mask("row_mask", row_mask, "the rows of iou", (n,))
  for name, value in (("high", high), ("low", low), ("negative_floor", negative_floor)):
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
      raise TypeError(f"{name}: expected a number, got {value!r}")
  if not negative_floor <= low <= high:
    raise ValueError(f"low: expected negative_floor <= low <= high, got negative_floor "
                     f"{negative_floor!r}, low {low!r}, high {high!r}")

  valid_row = jnp.ones((n,), bool) if row_mask is None else row_mask
  iou = jnp.asarray(iou, jnp.float32)
  pair_ok = valid_row[:, None] & gt_mask[None, :]                    # [N, M]
  has_gt = jnp.any(pair_ok, axis=1)                                  # [N]
  pair_ok = pair_ok & jnp.isfinite(iou)                              # non-finite: no overlap
  q = jnp.where(pair_ok, iou, -jnp.inf)                              # [N, M]
  if m == 0:
    matched_gt = jnp.zeros((n,), jnp.int32)
    best = jnp.zeros((n,), jnp.float32)
  else:
    matched_gt = jnp.argmax(q, axis=1).astype(jnp.int32)           # [N]
    best = jnp.max(q, axis=1)                                       # [N]
  matched_gt = jnp.where(has_gt, matched_gt, 0)
  max_iou = jnp.where(has_gt & (best > -jnp.inf), best, 0.0)        # all non-finite: 0

  labels = jnp.where(max_iou >= high, 1, jnp.where(
      (max_iou >= negative_floor) & (max_iou < low), 0, -1))
  if allow_low_quality and m > 0:
    best_per_gt = jnp.max(q, axis=0)                                # [M]
    is_best = (q == best_per_gt[None, :]) & (best_per_gt > 0.0)[None, :] & pair_ok  # [N, M]
    labels = jnp.where(jnp.any(is_best, axis=1), 1, labels)
  labels = jnp.where(valid_row, labels, -1).astype(jnp.int32)
  return matched_gt, max_iou, labels
