"""Proposal recall against a plain loop over ground truth and proposals."""

import numpy as np
import pytest

from jaxdet.proposals import recall


def _iou(a, b):
  ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
  iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
  inter = ix * iy
  union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
  return inter / union if union > 0 else 0.0


def _boxes(rng, n):
  xy = rng.uniform(0, 50, size=(n, 2))
  return np.concatenate([xy, xy + rng.uniform(2, 30, size=(n, 2))], 1)


def test_recall_matches_loop(rng):
  gts, props, masks = [], [], []
  for i in range(4):
    gts.append(_boxes(rng, i))                          # image 0 has no ground truth
    p = _boxes(rng, 40)
    p[:5] = gts[-1][:1].repeat(5, 0) + rng.normal(0, 2, (5, 4)) if i else p[:5]
    m = np.arange(40) < 30 + i
    props.append(p.astype(np.float32))
    masks.append(m)
  top_k, ious = (3, 10, 100), (0.5, 0.7)
  out = recall.proposal_recall(gts, props, masks, top_k=top_k, ious=ious)
  total = sum(len(g) for g in gts)
  for k in top_k:
    for t in ious:
      hit = 0
      for g, p, m in zip(gts, props, masks):
        real = [b for b, keep in zip(p, m) if keep][:k]
        hit += sum(max([_iou(gb, pb) for pb in real] or [0.0]) >= t for gb in g)
      assert out[f"recall@{k}_iou{t:g}"] == pytest.approx(hit / total)
  assert out["num_gt"] == total
  assert out["mean_proposals"] == pytest.approx(np.mean([m.sum() for m in masks]))
  assert out["recall@3_iou0.5"] <= out["recall@10_iou0.5"] <= out["recall@100_iou0.5"]


def test_mismatched_lengths_named():
  with pytest.raises(ValueError, match="proposals"):
    recall.proposal_recall([np.zeros((1, 4))], [], [])
