"""NMS against a plain float64 NumPy greedy loop written from torchvision.ops.nms's semantics."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdet.ops.nms import batched_nms, multiclass_nms, nms


# --- float64 references -------------------------------------------------------------------------

def ref_iou(box, boxes):
  """IoU f64[M] of one box with boxes [M, 4]; area 0 for x2 < x1 or y2 < y1; 0 for empty union."""
  box = np.asarray(box, np.float64)
  boxes = np.asarray(boxes, np.float64)
  area = lambda b: np.maximum(b[..., 2] - b[..., 0], 0) * np.maximum(b[..., 3] - b[..., 1], 0)
  wh = np.maximum(np.minimum(box[2:], boxes[:, 2:]) - np.maximum(box[:2], boxes[:, :2]), 0)
  inter = wh[:, 0] * wh[:, 1]
  union = area(box) + area(boxes) - inter
  return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def ref_nms(boxes, scores, threshold, candidates=None):
  """Textbook greedy NMS: indices of the picks in pick order."""
  n = len(scores)
  candidates = np.ones(n, bool) if candidates is None else candidates
  order = sorted(np.flatnonzero(candidates), key=lambda i: (-scores[i], i))
  removed = np.zeros(n, bool)
  keep = []
  for i in order:
    if removed[i]:
      continue
    keep.append(int(i))
    removed |= ref_iou(boxes[i], boxes) > threshold
  return keep


def ref_batched_nms(boxes, scores, classes, threshold, candidates=None):
  """Per-class greedy NMS, the union sorted by score descending (ties: lower index)."""
  n = len(scores)
  candidates = np.ones(n, bool) if candidates is None else candidates
  keep = []
  for c in np.unique(classes):
    keep += ref_nms(boxes, scores, threshold, candidates & (classes == c))
  return sorted(keep, key=lambda i: (-scores[i], i))


# --- random inputs ------------------------------------------------------------------------------

def random_boxes(rng, n, *, clustered=False, size=100):
  """f32[n, 4] boxes with integer corners (so IoU ties at thresholds like 0.5 happen exactly)."""
  if clustered:   # RPN-like: jittered copies of a few objects, long suppression chains
    centres = rng.integers(10, size - 10, (max(1, n // 40), 2))
    c = centres[rng.integers(0, len(centres), n)] + rng.integers(-4, 5, (n, 2))
    half = rng.integers(2, 12, (n, 2))
    xy1, xy2 = c - half, c + half
  else:
    xy1 = rng.integers(0, size, (n, 2))
    xy2 = xy1 + rng.integers(1, size // 3, (n, 2))
  return np.concatenate([xy1, xy2], axis=1).astype(np.float32)


def random_scores(rng, n, levels=12):
  """f32[n] scores from a few levels: many exact ties."""
  return (rng.integers(0, levels, n) / levels).astype(np.float32)


def picks(indices, valid):
  indices, valid = np.asarray(indices), np.asarray(valid)
  assert indices.dtype == np.int32 and valid.dtype == bool
  k = int(valid.sum())
  assert valid[:k].all() and not valid[k:].any(), "valid entries must come first"
  assert (indices[k:] == 0).all(), "padded entries hold index 0"
  return indices[:k].tolist()


@functools.lru_cache(maxsize=None)
def jit_nms(max_output, block_size, **kw):
  """One compiled function per static configuration; the threshold is traced."""
  return jax.jit(lambda b, s, t, m: nms(b, s, t, max_output, mask=m, block_size=block_size,
                                        **kw))


THRESHOLDS = (0.0, 0.3, 0.5, 0.7, 1.0)


# --- nms ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("n, block_size", [(1, 1024), (37, 1024), (300, 64), (700, 128)])
def test_nms_matches_greedy_reference(rng, n, block_size):
  f = jit_nms(n, block_size)
  mask = np.ones(n, bool)
  for clustered in (False, True):
    boxes = random_boxes(rng, n, clustered=clustered)
    scores = random_scores(rng, n)
    for t in THRESHOLDS:
      got = picks(*f(boxes, scores, jnp.float32(t), mask))
      assert got == ref_nms(boxes, scores, t), (clustered, t)


def test_nms_exact_duplicates_and_ties(rng):
  boxes = np.repeat(random_boxes(rng, 6), 5, axis=0)          # each box 5 times
  scores = np.repeat(np.float32([0.5, 0.5, 0.9, 0.1, 0.9, 0.5]), 5)
  got = picks(*jit_nms(30, 8)(boxes, scores, jnp.float32(0.5), np.ones(30, bool)))
  assert got == ref_nms(boxes, scores, 0.5)


def test_nms_max_output_smaller_and_larger_than_survivors(rng):
  n = 200
  boxes, scores = random_boxes(rng, n, clustered=True), random_scores(rng, n)
  want = ref_nms(boxes, scores, 0.5)
  for k in (1, len(want), n + 50):
    idx, valid = jax.jit(lambda b, s: nms(b, s, 0.5, k, block_size=32))(boxes, scores)
    assert idx.shape == (k,) and valid.shape == (k,)
    assert picks(idx, valid) == want[:k]


def test_nms_masked_equals_sliced_and_score_threshold(rng):
  n = 300
  f = jit_nms(n, 64, score_threshold=0.5)
  boxes, scores = random_boxes(rng, n, clustered=True), random_scores(rng, n)
  mask = rng.random(n) < 0.6
  got = picks(*f(boxes, scores, jnp.float32(0.4), mask))
  keep_rows = np.flatnonzero(mask & (scores >= 0.5))
  sliced = ref_nms(boxes[keep_rows], scores[keep_rows], 0.4)
  assert got == keep_rows[sliced].tolist()
  # The same through the unmasked path, on the sliced arrays.
  g = jit_nms(len(keep_rows), 64)
  got_sliced = picks(*g(boxes[keep_rows], scores[keep_rows], jnp.float32(0.4),
                        np.ones(len(keep_rows), bool)))
  assert keep_rows[got_sliced].tolist() == got


def test_nms_pre_nms_topk(rng):
  n, k = 250, 90
  boxes, scores = random_boxes(rng, n), random_scores(rng, n)
  mask = rng.random(n) < 0.8
  f = jax.jit(lambda b, s, m: nms(b, s, 0.3, n, mask=m, pre_nms_topk=k, block_size=32))
  idx, valid = f(boxes, scores, mask)
  top = sorted(np.flatnonzero(mask), key=lambda i: (-scores[i], i))[:k]
  cand = np.zeros(n, bool)
  cand[top] = True
  assert picks(idx, valid) == ref_nms(boxes, scores, 0.3, cand)


def test_nms_vmap_over_images(rng):
  b, n = 3, 120
  boxes = np.stack([random_boxes(rng, n, clustered=True) for _ in range(b)])
  scores = rng.random((b, n)).astype(np.float32)
  mask = rng.random((b, n)) < 0.7
  mask[2] = False                                            # one image with nothing
  f = jax.jit(jax.vmap(lambda x, s, m: nms(x, s, 0.5, 50, mask=m, block_size=32)))
  idx, valid = f(boxes, scores, mask)
  assert idx.shape == (b, 50)
  for i in range(b):
    assert picks(idx[i], valid[i]) == ref_nms(boxes[i], scores[i], 0.5, mask[i])[:50]
  assert not np.asarray(valid[2]).any()


def test_nms_empty_and_all_masked():
  idx, valid = nms(jnp.zeros((0, 4)), jnp.zeros((0,)), 0.5, 5)
  assert idx.shape == (5,) and picks(idx, valid) == []
  idx, valid = jax.jit(lambda b, s, m: nms(b, s, 0.5, 3, mask=m))(
      jnp.ones((4, 4)), jnp.ones((4,)), jnp.zeros(4, bool))
  assert picks(idx, valid) == []


def test_nms_degenerate_boxes_and_nan_scores(rng):
  n = 40
  boxes = random_boxes(rng, n, clustered=True)
  boxes[:10, 2:] = boxes[:10, :2]                            # zero area
  boxes[10:20, 2] = boxes[10:20, 0] - 3                      # x2 < x1
  scores = random_scores(rng, n)
  scores[[3, 25]] = np.nan                                   # never picked
  got = picks(*jit_nms(n, 16)(boxes, scores, jnp.float32(0.3), np.ones(n, bool)))
  assert got == ref_nms(boxes, scores, 0.3, ~np.isnan(scores))
  assert set(range(20)) - {3} <= set(got)                    # degenerate: never suppressed


def test_nms_bad_input():
  b, s = jnp.zeros((5, 4)), jnp.zeros((5,))
  with pytest.raises(ValueError, match="boxes: expected last dimension 4"):
    nms(jnp.zeros((5, 3)), s, 0.5, 2)
  with pytest.raises(ValueError, match="scores: expected rank 1"):
    nms(b, jnp.zeros((5, 1)), 0.5, 2)
  with pytest.raises(ValueError, match="scores: expected 5 entries"):
    nms(b, jnp.zeros((6,)), 0.5, 2)
  with pytest.raises(TypeError, match="mask: expected a bool"):
    nms(b, s, 0.5, 2, mask=jnp.ones(5))
  with pytest.raises(ValueError, match=r"iou_threshold: expected a value in \[0.0, 1.0\]"):
    nms(b, s, 1.5, 2)
  with pytest.raises(TypeError, match="max_output: expected a Python int"):
    nms(b, s, 0.5, 2.0)
  with pytest.raises(ValueError, match="max_output: expected values > 0"):
    nms(b, s, 0.5, 0)
  with pytest.raises(TypeError, match="classes: expected a signed integer or unsigned"):
    batched_nms(b, s, jnp.zeros(5), 0.5, 2)
  with pytest.raises(ValueError, match=r"boxes: expected shape \(5, 3, 4\)"):
    multiclass_nms(jnp.zeros((5, 2, 4)), jnp.zeros((5, 3)), iou_threshold=0.5, max_output=4)
  with pytest.raises(ValueError, match="mask: expected a bool mask of shape"):
    multiclass_nms(b, jnp.zeros((5, 3)), iou_threshold=0.5, max_output=4,
                   mask=jnp.ones(4, bool))


# --- batched_nms and multiclass_nms -------------------------------------------------------------

def test_batched_nms_matches_per_class_loop(rng):
  n, k = 400, 150
  f = jax.jit(lambda b, s, c, m: batched_nms(b, s, c, 0.5, k, mask=m, block_size=64))
  for _ in range(2):
    boxes, scores = random_boxes(rng, n, clustered=True), random_scores(rng, n)
    classes = rng.integers(0, 4, n).astype(np.int32)
    mask = rng.random(n) < 0.8
    got = picks(*f(boxes, scores, classes, mask))
    assert got == ref_batched_nms(boxes, scores, classes, 0.5, mask)[:k]


def ref_multiclass(boxes, scores, threshold, k, score_threshold):
  """Per class greedy NMS of the pairs with score >= score_threshold, best k overall."""
  n, c = scores.shape
  dets = []
  for j in range(c):
    b = boxes if boxes.ndim == 2 else boxes[:, j]
    for i in ref_nms(b, scores[:, j], threshold, scores[:, j] >= score_threshold):
      dets.append((-scores[i, j], i * c + j, b[i], j))
  dets.sort(key=lambda d: d[:2])
  return dets[:k]


@pytest.mark.parametrize("shared", [True, False])
def test_multiclass_nms_matches_reference(rng, shared):
  n, c, k = 120, 5, 60
  f = jax.jit(functools.partial(multiclass_nms, iou_threshold=0.45, max_output=k,
                                score_threshold=0.25, block_size=128))
  if shared:
    boxes = random_boxes(rng, n, clustered=True)
  else:
    boxes = np.stack([random_boxes(rng, n, clustered=True) for _ in range(c)], axis=1)
  scores = random_scores(rng, n * c).reshape(n, c)
  out = f(jnp.asarray(boxes), jnp.asarray(scores))
  want = ref_multiclass(boxes, scores, 0.45, k, 0.25)
  m = len(want)
  assert np.asarray(out["valid"]).tolist() == [True] * m + [False] * (k - m)
  np.testing.assert_array_equal(out["scores"][:m], [-d[0] for d in want])
  np.testing.assert_array_equal(out["labels"][:m], [d[3] for d in want])
  np.testing.assert_array_equal(out["boxes"][:m], np.stack([d[2] for d in want]))
  assert not np.asarray(out["scores"][m:]).any() and not np.asarray(out["boxes"][m:]).any()


def test_multiclass_nms_mask_and_grad(rng):
  n, c = 30, 3
  boxes = random_boxes(rng, n)
  scores = rng.random((n, c)).astype(np.float32)
  mask = rng.random(n) < 0.5
  kw = dict(iou_threshold=0.5, max_output=20, score_threshold=0.1, block_size=64)
  f = jax.jit(functools.partial(multiclass_nms, **kw))
  masked = f(jnp.asarray(boxes), jnp.asarray(scores), mask=jnp.asarray(mask))
  sliced = f(jnp.asarray(boxes[mask]), jnp.asarray(scores[mask]))
  for key in ("boxes", "scores", "labels", "valid"):
    np.testing.assert_array_equal(masked[key], sliced[key])
  # Gradients flow to the picked scores and boxes, finite.
  def total(s, b):
    out = multiclass_nms(b, s, **kw)
    return jnp.sum(out["scores"]) + jnp.sum(out["boxes"])

  g = jax.jit(jax.grad(total, argnums=(0, 1)))(jnp.asarray(scores), jnp.asarray(boxes))
  assert all(np.isfinite(np.asarray(x)).all() for x in g)
