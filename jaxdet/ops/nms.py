"""Non-maximum suppression with static shapes: exact greedy picks, blocked for speed.

The textbook greedy algorithm (torchvision.ops.nms semantics): sort the candidates by score,
descending, ties broken by the lower index; keep the best remaining box; discard every remaining
box whose IoU with it is > `iou_threshold`; repeat. The picks here are exactly those, in pick
order, computed without an N x N IoU matrix and with few sequential steps:

1. one sort puts the candidates (mask True, score >= score_threshold, finite score and box) first,
   by score descending, index ascending;
2. the sorted boxes are cut into blocks of about `block_size`; a `while_loop` visits the blocks in
   order and stops as soon as `max_output` boxes are kept or the candidates run out;
3. a block is first suppressed against all boxes kept so far (one [block, max_output] IoU, fully
   parallel), then resolved within itself: `alive[i] = not any(alive[j] and IoU[j, i] > t, j < i)`
   iterated from "all alive" to its fixed point. Entry i is final after i iterations at most, so
   the fixed point is unique and is the greedy answer; in practice a handful of iterations;
4. the block's survivors are appended to a fixed-size buffer of kept boxes.

Memory is O(block_size * (block_size + max_output)); work is O(N * max_output).

Padding convention of every function here: outputs have a fixed capacity K = `max_output`;
`valid` is True for the first `count` entries and False after; padded entries hold index 0
(and zero boxes, scores and labels in `multiclass_nms`).

Non-finite inputs are invalid: a box with a NaN or infinite coordinate, or a NaN or +-inf score,
is never a candidate, so never a pick; and its IoU with any box is 0 (`jaxdet.ops.boxes`), so it
suppresses nothing.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxdet import checks
from jaxdet.ops.boxes import box_iou

DEFAULT_BLOCK_SIZE = 1024


# --- argument checks ----------------------------------------------------------------------------

def _check_int(name: str, value: Any, *, allow_none: bool = False) -> None:
  if value is None and allow_none:
    return
  if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
    raise TypeError(f"{name}: expected a Python int, got {value!r}")
  checks.check_positive(name, int(value))


def _check_threshold(name: str, value: Any, low: float, high: float) -> None:
  """A number (or 0-d array) in [low, high]; traced scalars are checked for rank only."""
  if hasattr(value, "shape"):
    checks.check_array(name, value, ndim=0, dtype_kind="fiu")
    if isinstance(value, jax.core.Tracer):
      return
    value = value.item()
  if not isinstance(value, (int, float, np.integer, np.floating)) or isinstance(value, bool):
    raise TypeError(f"{name}: expected a number, got {value!r}")
  if not low <= value <= high:
    raise ValueError(f"{name}: expected a value in [{low}, {high}], got {value!r}")


def _check_common(boxes, scores, iou_threshold, max_output, mask, score_threshold,
                  pre_nms_topk, block_size) -> None:
  checks.check_boxes("boxes", boxes)
  checks.check_array("scores", scores, ndim=1, dtype_kind="f")
  checks.check_same_size("boxes", boxes, "scores", scores)
  if mask is not None:
    checks.check_mask("mask", mask, "scores", scores.shape)
  _check_threshold("iou_threshold", iou_threshold, 0.0, 1.0)
  if score_threshold is not None:
    _check_threshold("score_threshold", score_threshold, -math.inf, math.inf)
  _check_int("max_output", max_output)
  _check_int("pre_nms_topk", pre_nms_topk, allow_none=True)
  _check_int("block_size", block_size)


# --- the blocked greedy core --------------------------------------------------------------------

def _sort_candidates(scores: jax.Array, candidate: jax.Array) -> jax.Array:
  """Order i32[N]: candidates first, by score descending, then by index ascending."""
  n = scores.shape[0]
  s = scores.astype(jnp.float32)
  neg = jnp.where(s == 0.0, 0.0, -s)            # -0.0 and 0.0 tie, as in float comparison
  neg = jnp.where(candidate, neg, 0.0)          # non-candidates: no NaN in the key
  iota = jnp.arange(n, dtype=jnp.int32)
  _, _, order = jax.lax.sort((~candidate, neg, iota), num_keys=3)
  return order


def _block_layout(n: int, block_size: int) -> tuple[int, int]:
  """(number of blocks, block length): balanced blocks of at most ~block_size, multiple of 8."""
  num_blocks = max(1, -(-n // block_size))
  length = -(-n // num_blocks)
  length = -(-length // 8) * 8
  return num_blocks, length


def _suppresses(a, b, a_cls, b_cls, iou_threshold):
  """bool[A, B]: box a_i would discard box b_j (IoU > threshold, same class if classes given)."""
  s = box_iou(a, b) > iou_threshold
  if a_cls is not None:
    s = s & (a_cls[:, None] == b_cls[None, :])
  return s


def _greedy_sorted(boxes, classes, num_candidates, iou_threshold, capacity, block_size):
  """Greedy NMS on boxes already sorted by priority.

  Args:
    boxes: f32[N, 4] in pick priority order; the first `num_candidates` may be picked.
    classes: i32[N] or None; boxes of different classes never suppress each other.
    num_candidates: i32[] number of leading entries that are candidates.
    iou_threshold: discard a box when its IoU with a kept one is > this.
    capacity: K, stop after K picks.
    block_size: the largest block processed in parallel.
  Returns:
    positions i32[K] (into the sorted order) of the picks in pick order, 0 where padded;
    count i32[] number of picks (<= K).
  """
  n = boxes.shape[0]
  num_blocks, length = _block_layout(n, block_size)
  pad = num_blocks * length - n
  boxes = jnp.pad(boxes, ((0, pad), (0, 0)))
  if classes is not None:
    classes = jnp.pad(classes, (0, pad))
  rank = jnp.arange(length, dtype=jnp.int32)
  earlier = rank[None, :] < rank[:, None]                      # [L, L] [i, j]: j before i
  slot = jnp.arange(capacity, dtype=jnp.int32)

  def block_body(state):
    b, count, kept_boxes, kept_cls, kept_pos = state
    start = b * length
    blk = jax.lax.dynamic_slice_in_dim(boxes, start, length)   # [L, 4]
    blk_cls = (None if classes is None
               else jax.lax.dynamic_slice_in_dim(classes, start, length))
    alive0 = start + rank < num_candidates                     # [L]
    # Against every box kept by earlier blocks, all at once (reductions run along rows).
    by_kept = _suppresses(blk, kept_boxes, blk_cls, kept_cls, iou_threshold)   # [L, K]
    by_kept = jnp.any(by_kept & (slot < count)[None, :], axis=1)
    alive0 = alive0 & ~by_kept
    # Within the block: the fixed point of alive = alive0 & ~any_j<i(alive[j] & S[i, j]).
    s = _suppresses(blk, blk, blk_cls, blk_cls, iou_threshold) & earlier     # [L, L]
    s = s & alive0[None, :]

    def step(alive):
      return alive0 & ~jnp.any(s & alive[None, :], axis=1)

    def fix_cond(carry):
      return carry[1]

    def fix_body(carry):
      alive, _ = carry
      new = step(step(alive))                                  # two steps per loop trip
      return new, jnp.any(new != alive)

    alive, _ = jax.lax.while_loop(fix_cond, fix_body, (alive0, jnp.array(True)))
    # Append the survivors to the kept buffer, in order; overflow beyond K is dropped.
    dest = count + jnp.cumsum(alive, dtype=jnp.int32) - 1
    dest = jnp.where(alive, dest, capacity)
    kept_boxes = kept_boxes.at[dest].set(blk, mode="drop")
    if kept_cls is not None:
      kept_cls = kept_cls.at[dest].set(blk_cls, mode="drop")
    kept_pos = kept_pos.at[dest].set(start + rank, mode="drop")
    count = count + jnp.sum(alive, dtype=jnp.int32)
    return b + 1, count, kept_boxes, kept_cls, kept_pos

  needed_blocks = (num_candidates + length - 1) // length

  def block_cond(state):
    b, count = state[0], state[1]
    return (b < needed_blocks) & (count < capacity)

  init = (jnp.array(0, jnp.int32), jnp.array(0, jnp.int32),
          jnp.zeros((capacity, 4), jnp.float32),
          None if classes is None else jnp.zeros((capacity,), jnp.int32),
          jnp.zeros((capacity,), jnp.int32))
  _, count, _, _, kept_pos = jax.lax.while_loop(block_cond, block_body, init)
  return kept_pos, jnp.minimum(count, capacity)


def _nms_impl(boxes, scores, classes, iou_threshold, max_output, mask, score_threshold,
              pre_nms_topk, block_size):
  """Shared body of `nms` and `batched_nms` (arguments already checked)."""
  n = boxes.shape[0]
  scores = scores.astype(jnp.float32)
  candidate = jnp.isfinite(scores) & jnp.all(jnp.isfinite(boxes), axis=-1)   # see module doc
  if mask is not None:
    candidate = candidate & mask
  if score_threshold is not None:
    candidate = candidate & (scores >= score_threshold)
  order = _sort_candidates(scores, candidate)                 # [N]
  num_candidates = jnp.sum(candidate, dtype=jnp.int32)
  if pre_nms_topk is not None and pre_nms_topk < n:
    order = order[:pre_nms_topk]
    num_candidates = jnp.minimum(num_candidates, pre_nms_topk)
  # Selection is piecewise constant: no gradient flows through it (callers gather afterwards).
  sorted_boxes = jax.lax.stop_gradient(boxes.astype(jnp.float32))[order]
  sorted_cls = None if classes is None else classes.astype(jnp.int32)[order]
  if order.shape[0] == 0:                                       # nothing to pick, ever
    return jnp.zeros((max_output,), jnp.int32), jnp.zeros((max_output,), bool)
  capacity = min(max_output, order.shape[0])
  pos, count = _greedy_sorted(sorted_boxes, sorted_cls, num_candidates, iou_threshold,
                              capacity, block_size)
  valid = jnp.arange(capacity) < count
  indices = jnp.where(valid, order[pos], 0)
  pad = max_output - capacity
  return (jnp.pad(indices, (0, pad)).astype(jnp.int32), jnp.pad(valid, (0, pad)))


# --- public API ---------------------------------------------------------------------------------

def nms(boxes: jax.Array, scores: jax.Array, iou_threshold: float, max_output: int, *,
        mask: jax.Array | None = None, score_threshold: float | None = None,
        pre_nms_topk: int | None = None,
        block_size: int = DEFAULT_BLOCK_SIZE) -> tuple[jax.Array, jax.Array]:
  """Greedy non-maximum suppression of one image's boxes (torchvision.ops.nms semantics).

  Args:
    boxes: f32[N, 4] (x1, y1, x2, y2) pixels. A box with x2 < x1 or y2 < y1 has area 0, so its IoU
      with any box is 0: it never suppresses nor is suppressed. A box with a non-finite
      coordinate is never picked and suppresses nothing.
    scores: f32[N]; higher is better. Ties are broken by the lower index. Non-finite scores
      (NaN, +-inf) are never picked.
    iou_threshold: in [0, 1]; a box is discarded when its IoU with a kept box is > this.
    max_output: K, the fixed number of outputs (static).
    mask: bool[N] or None; False = padding, never picked.
    score_threshold: boxes with score < this are never picked (None: no threshold).
    pre_nms_topk: only the pre_nms_topk best-scoring candidates enter NMS (static; None: all).
    block_size: boxes processed in parallel per sequential step; a speed knob (static), the
      picks do not depend on it.
  Returns:
    indices: i32[K] into boxes, the picks in pick order (descending score); 0 where padded.
    valid: bool[K]; True for the picks, False for padding (which comes last).
  """
  _check_common(boxes, scores, iou_threshold, max_output, mask, score_threshold, pre_nms_topk,
                block_size)
  return _nms_impl(boxes, scores, None, iou_threshold, max_output, mask, score_threshold,
                   pre_nms_topk, block_size)


def batched_nms(boxes: jax.Array, scores: jax.Array, classes: jax.Array, iou_threshold: float,
                max_output: int, *, mask: jax.Array | None = None,
                score_threshold: float | None = None, pre_nms_topk: int | None = None,
                block_size: int = DEFAULT_BLOCK_SIZE) -> tuple[jax.Array, jax.Array]:
  """NMS independently per class (torchvision.ops.batched_nms semantics), one pass for all.

  Boxes of different classes never suppress each other. No coordinate-offset trick: the result is
  exactly the union of per-class greedy NMS, sorted by score descending (ties: lower index).

  Args:
    boxes: f32[N, 4] (x1, y1, x2, y2) pixels; non-finite boxes are never picked (as in `nms`).
    scores: f32[N]; non-finite scores are never picked.
    classes: i32[N] class (or any group id) of each box.
    iou_threshold, max_output, mask, score_threshold, pre_nms_topk, block_size: as in `nms`;
      pre_nms_topk counts candidates over all classes.
  Returns:
    indices i32[K] (0 where padded) and valid bool[K], K = max_output: the best max_output of all
    per-class picks, by score.
  """
  _check_common(boxes, scores, iou_threshold, max_output, mask, score_threshold, pre_nms_topk,
                block_size)
  checks.check_array("classes", classes, ndim=1, dtype_kind="iu")
  checks.check_same_size("boxes", boxes, "classes", classes)
  return _nms_impl(boxes, scores, classes, iou_threshold, max_output, mask, score_threshold,
                   pre_nms_topk, block_size)


def multiclass_nms(boxes: jax.Array, scores: jax.Array, *, iou_threshold: float,
                   max_output: int, score_threshold: float = 0.0,
                   pre_nms_topk: int | None = None, mask: jax.Array | None = None,
                   block_size: int = DEFAULT_BLOCK_SIZE) -> dict[str, jax.Array]:
  """Test-time post-processing of a detector: per-class NMS, then the best detections overall.

  Every (box, class) pair with a finite score >= score_threshold and a finite box is a
  candidate; NMS runs per class
  (as `batched_nms`), and the max_output best picks over all classes by score are returned
  (Fast R-CNN, Faster R-CNN, YOLO).

  Args:
    boxes: f32[N, C, 4] class-specific boxes, or f32[N, 4] shared by all classes; (x1, y1, x2, y2)
      pixels.
    scores: f32[N, C] per-class scores (no background column: drop it before calling).
    iou_threshold: in [0, 1], per-class NMS threshold (IoU > this is discarded).
    max_output: K, detections returned (static).
    score_threshold: pairs with score < this are dropped before NMS.
    pre_nms_topk: only the pre_nms_topk best (box, class) pairs enter NMS (static; None: all).
    mask: bool[N] (per box) or bool[N, C] (per pair), False = padding; or None.
    block_size: as in `nms`.
  Returns:
    dict with boxes f32[K, 4], scores f32[K], labels i32[K] (0..C-1), valid bool[K]; sorted by
    score descending (ties: lower box index, then lower class); padded entries (valid False)
    hold zeros.
  """
  checks.check_array("scores", scores, ndim=2, dtype_kind="f")
  n, c = scores.shape
  checks.check_boxes("boxes", boxes, ndim=(2, 3))
  checks.check_same_size("scores", scores, "boxes", boxes)
  if boxes.ndim == 3:
    checks.check_array("boxes", boxes, shape=(n, c, 4))
  if mask is not None:
    checks.check_array("mask", mask, ndim=(1, 2), dtype_kind="b")
    checks.check_mask("mask", mask, "scores", scores.shape[:mask.ndim])
  flat_scores = scores.reshape(n * c)
  flat_boxes = (jnp.broadcast_to(boxes[:, None, :], (n, c, 4)) if boxes.ndim == 2
                else boxes).reshape(n * c, 4)
  flat_labels = jnp.broadcast_to(jnp.arange(c, dtype=jnp.int32), (n, c)).reshape(n * c)
  flat_mask = None
  if mask is not None:
    flat_mask = (jnp.broadcast_to(mask[:, None], (n, c)) if mask.ndim == 1 else mask)
    flat_mask = flat_mask.reshape(n * c)
  _check_common(flat_boxes, flat_scores, iou_threshold, max_output, flat_mask, score_threshold,
                pre_nms_topk, block_size)
  idx, valid = _nms_impl(flat_boxes, flat_scores, flat_labels, iou_threshold, max_output,
                         flat_mask, score_threshold, pre_nms_topk, block_size)
  if n * c == 0:
    zeros = jnp.zeros((max_output,), jnp.float32)
    return {"boxes": jnp.zeros((max_output, 4), jnp.float32), "scores": zeros,
            "labels": jnp.zeros((max_output,), jnp.int32), "valid": valid}
  pick = lambda x: jnp.where(valid.reshape(valid.shape + (1,) * (x.ndim - 1)), x[idx], 0)
  return {"boxes": pick(flat_boxes.astype(jnp.float32)),
          "scores": pick(flat_scores.astype(jnp.float32)),
          "labels": pick(flat_labels),
          "valid": valid}
