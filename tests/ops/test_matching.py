"""jaxdet.ops.matching against a plain loop written from torchvision's Matcher semantics."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdet.ops import matching as Mt


def ref_match(iou, gt_mask, row_mask, high, low, floor, allow_low_quality):
  """One row at a time; the low-quality rule as Matcher.set_low_quality_matches_.

  IoU and thresholds are float32 values (compared exactly, as the op compares them).
  """
  high, low, floor = (float(np.float32(t)) for t in (high, low, floor))
  n, m = iou.shape
  real = [j for j in range(m) if gt_mask[j]]
  matched, best, labels = np.zeros(n, int), np.zeros(n), np.full(n, -1)
  for i in range(n):
    if not row_mask[i]:
      continue
    if real:
      j = max(real, key=lambda c: (iou[i, c], -c))          # the first of the best
      matched[i], best[i] = j, iou[i, j]
    if best[i] >= high:
      labels[i] = 1
    elif floor <= best[i] < low:
      labels[i] = 0
  if allow_low_quality:
    rows = [i for i in range(n) if row_mask[i]]
    for j in real:
      top = max((iou[i, j] for i in rows), default=0.0)
      if top > 0:
        for i in rows:
          if iou[i, j] == top:
            labels[i] = 1
  return matched, best, labels


def random_iou(rng, n, m):
  """IoU-like f32[n, m] on a 0.05 grid (plenty of ties), with an all-zero column."""
  iou = rng.integers(0, 21, (n, m)) / 20.0
  iou[:, rng.integers(0, m)] = 0.0
  return iou.astype(np.float32)


CONFIGS = [dict(high=0.7, low=0.3, negative_floor=0.0, allow_low_quality=True),   # RPN
           dict(high=0.5, low=0.5, negative_floor=0.1, allow_low_quality=False)]  # Fast R-CNN


@pytest.mark.parametrize("cfg", CONFIGS, ids=["rpn", "fast_rcnn"])
def test_matches_loop_reference_under_jit_and_vmap(rng, cfg):
  b, n, m = 3, 11, 5
  iou = np.stack([random_iou(rng, n, m) for _ in range(b)])
  gt_mask = rng.random((b, m)) < 0.6
  gt_mask[0] = False                                        # an image without ground truth
  row_mask = rng.random((b, n)) < 0.8
  f = jax.jit(jax.vmap(functools.partial(Mt.match_boxes, **cfg)))
  matched, best, labels = f(jnp.asarray(iou), jnp.asarray(gt_mask),
                            row_mask=jnp.asarray(row_mask))
  assert matched.dtype == jnp.int32 and labels.dtype == jnp.int32 and best.dtype == jnp.float32
  for k in range(b):
    want = ref_match(iou[k].astype(np.float64), gt_mask[k], row_mask[k], cfg["high"],
                     cfg["low"], cfg["negative_floor"], cfg["allow_low_quality"])
    np.testing.assert_array_equal(matched[k], want[0])
    np.testing.assert_allclose(best[k], want[1], atol=1e-7)
    np.testing.assert_array_equal(labels[k], want[2])
    if gt_mask[k].any():                                    # valid rows never match padding
      assert np.all(gt_mask[k][np.asarray(matched[k])[row_mask[k]]])
  # Without ground truth every valid row is negative (or ignored below a positive floor).
  expect = 0 if cfg["negative_floor"] <= 0 else -1
  np.testing.assert_array_equal(labels[0], np.where(row_mask[0], expect, -1))
  np.testing.assert_array_equal(matched[0], 0)


def test_masked_equals_sliced(rng):
  n, m, real = 9, 6, 4
  iou = random_iou(rng, n, m)
  iou[:, real:] = 1.0                                       # padded columns that would match
  rows = rng.random(n) < 0.7
  iou[~rows] = 1.0                                          # invalid rows that would match
  cfg = CONFIGS[0]
  gt_mask = np.arange(m) < real
  masked = Mt.match_boxes(jnp.asarray(iou), jnp.asarray(gt_mask), row_mask=jnp.asarray(rows),
                          **cfg)
  sliced = Mt.match_boxes(jnp.asarray(iou[rows][:, :real]), jnp.ones(real, bool), **cfg)
  for got, want in zip(masked, sliced):
    np.testing.assert_array_equal(np.asarray(got)[rows], want)
  np.testing.assert_array_equal(np.asarray(masked[2])[~rows], -1)


def test_low_quality_ties_and_kept_best_match():
  # gt 0's best IoU 0.4 is reached by rows 0 and 2 (a tie): both become positive. Row 1's best
  # for gt 1 is 0.2, but row 1 overlaps gt 0 more (0.3): positive, matched to gt 0 as in
  # torchvision. gt 2 has best IoU 0: it makes nothing positive.
  iou = jnp.array([[0.4, 0.1, 0.0], [0.3, 0.2, 0.0], [0.4, 0.0, 0.0], [0.1, 0.1, 0.0]])
  matched, best, labels = Mt.match_boxes(iou, jnp.ones(3, bool), high=0.7, low=0.3,
                                         allow_low_quality=True)
  np.testing.assert_array_equal(labels, [1, 1, 1, 0])
  np.testing.assert_array_equal(matched, [0, 0, 0, 0])
  np.testing.assert_allclose(best, [0.4, 0.3, 0.4, 0.1])
  _, _, plain = Mt.match_boxes(iou, jnp.ones(3, bool), high=0.7, low=0.3)
  np.testing.assert_array_equal(plain, [-1, -1, -1, 0])


def test_no_columns_at_all():
  matched, best, labels = Mt.match_boxes(jnp.zeros((4, 0)), jnp.zeros(0, bool), high=0.7,
                                         low=0.3, allow_low_quality=True)
  np.testing.assert_array_equal(labels, 0)
  np.testing.assert_array_equal(matched, 0)
  np.testing.assert_array_equal(best, 0.0)


def test_bad_arguments_raise():
  iou, mask = jnp.zeros((4, 3)), jnp.ones(3, bool)
  with pytest.raises(ValueError, match="low: expected negative_floor <= low <= high"):
    Mt.match_boxes(iou, mask, high=0.3, low=0.7)
  with pytest.raises(ValueError, match="gt_mask: expected a bool mask of shape \\(3,\\)"):
    Mt.match_boxes(iou, jnp.ones(4, bool), high=0.7, low=0.3)
  with pytest.raises(TypeError, match="gt_mask: expected a bool dtype"):
    Mt.match_boxes(iou, jnp.ones(3, jnp.int32), high=0.7, low=0.3)
  with pytest.raises(ValueError, match="row_mask: expected a bool mask of shape \\(4,\\)"):
    Mt.match_boxes(iou, mask, high=0.7, low=0.3, row_mask=jnp.ones(3, bool))
  with pytest.raises(ValueError, match="iou: expected rank 2"):
    Mt.match_boxes(jnp.zeros(4), mask, high=0.7, low=0.3)
