"""RPN: anchor targets, proposal layer and loss against float64 NumPy loop references."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdet import losses
from jaxdet.models import rpn

SCALES, RATIOS, STRIDE, FEAT = (16.0, 32.0, 64.0), (0.5, 1.0, 2.0), 8, (8, 8)
IMAGE = (64, 64)
CLAMP = math.log(1000.0 / 16)


def _anchors():
  return np.asarray(rpn.rpn_anchors(FEAT, STRIDE, SCALES, RATIOS), np.float64)


def _iou(a, b):
  """float64 IoU of two boxes (x1, y1, x2, y2), no +1."""
  iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
  ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
  inter = iw * ih
  union = (max(0.0, a[2] - a[0]) * max(0.0, a[3] - a[1])
           + max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1]) - inter)
  return inter / union if union > 0 else 0.0


def _random_gt(rng, m, real, h=IMAGE[0], w=IMAGE[1]):
  xy = rng.uniform(0, [w - 8, h - 8], size=(m, 2))
  wh = rng.uniform(6, 40, size=(m, 2))
  boxes = np.concatenate([xy, np.minimum(xy + wh, [w, h])], 1).astype(np.float32)
  mask = np.arange(m) < real
  boxes[~mask] = rng.uniform(-50, 50, size=(m - real, 4))   # garbage padding
  return boxes, mask


def _reference_labels(anchors, gt, height, width, pos=0.7, neg=0.3):
  """py-faster-rcnn's anchor_target_layer labels in float64, plus the anchors too close to a
  threshold or a tie to call (float32 may decide them either way)."""
  n = len(anchors)
  inside = ((anchors[:, 0] >= 0) & (anchors[:, 1] >= 0) & (anchors[:, 2] <= width)
            & (anchors[:, 3] <= height))
  iou = np.array([[_iou(a, g) for g in gt] for a in anchors]).reshape(n, len(gt))
  labels = -np.ones(n, np.int64)
  ambiguous = np.zeros(n, bool)
  matched = np.zeros(n, np.int64)
  for i in range(n):
    if not inside[i]:
      continue
    best = iou[i].max() if len(gt) else 0.0
    matched[i] = iou[i].argmax() if len(gt) else 0
    if best >= pos:
      labels[i] = 1
    elif best < neg:
      labels[i] = 0
    ambiguous[i] = min(abs(best - pos), abs(best - neg)) < 1e-5
  for j in range(len(gt)):
    col = np.where(inside, iou[:, j], -1.0)
    top = col.max()
    if top <= 0:
      continue
    labels[np.abs(col - top) <= 0.0] = 1
    ambiguous |= (np.abs(col - top) < 1e-5) & (col != top)
  return labels, matched, ambiguous


def _encode(g, a):
  aw, ah = a[2] - a[0], a[3] - a[1]
  gw, gh = g[2] - g[0], g[3] - g[1]
  return np.array([(g[0] + gw / 2 - a[0] - aw / 2) / aw, (g[1] + gh / 2 - a[1] - ah / 2) / ah,
                   np.log(gw / aw), np.log(gh / ah)])


def test_anchor_targets_match_float64_loop(rng):
  anchors = _anchors()
  for real in (3, 0):
    gt, mask = _random_gt(rng, 5, real)
    h, w = 56, 60
    key = jax.random.PRNGKey(int(rng.integers(1 << 30)))
    t = jax.jit(rpn.anchor_targets)(key, jnp.asarray(anchors, jnp.float32), gt, mask,
                                    jnp.array([h, w], jnp.int32))
    t = jax.tree.map(np.asarray, t)
    ref, matched, amb = _reference_labels(anchors, gt[mask].astype(np.float64), h, w)
    assert amb.sum() <= 3
    np.testing.assert_array_equal(t["labels"][~amb], ref[~amb])
    labels = t["labels"]
    # The balanced draw: a subset of each class, counts as py-faster-rcnn's.
    num_pos = min((labels == 1).sum(), 128)
    assert t["positive"].sum() == num_pos
    assert (t["sampled"] & ~t["positive"]).sum() == min((labels == 0).sum(), 256 - num_pos)
    assert np.all(labels[t["positive"]] == 1)
    assert np.all(labels[t["sampled"] & ~t["positive"]] == 0)
    np.testing.assert_array_equal(t["objectness"], t["positive"].astype(np.float32))
    # Box targets of the drawn positives, zeros elsewhere.
    real_gt = gt[mask].astype(np.float64)
    for i in np.flatnonzero(t["positive"]):
      np.testing.assert_allclose(t["box"][i], _encode(real_gt[matched[i]], anchors[i]),
                                 rtol=1e-4, atol=1e-4)
    assert np.all(t["box"][~t["positive"]] == 0)
    if real == 0:
      assert not t["positive"].any()
      assert t["sampled"].sum() == min(256, (ref == 0).sum())


def test_anchor_targets_masked_equals_sliced_and_compiles_once(rng):
  anchors = jnp.asarray(_anchors(), jnp.float32)
  traces = []

  @jax.jit
  def targets(key, gt, mask):
    traces.append(1)
    return rpn.anchor_targets(key, anchors, gt, mask, jnp.array(IMAGE, jnp.int32))

  key = jax.random.PRNGKey(3)
  for real in (1, 4, 0):
    gt, mask = _random_gt(rng, 6, real)
    padded = targets(key, gt, mask)
    sliced = rpn.anchor_targets(key, anchors, gt[:real], mask[:real],
                                jnp.array(IMAGE, jnp.int32))
    for k in padded:
      np.testing.assert_allclose(np.asarray(padded[k]), np.asarray(sliced[k]), atol=1e-6,
                                 err_msg=k)
  assert len(traces) == 1


def _decode(d, a):
  aw, ah = a[2] - a[0], a[3] - a[1]
  cx, cy = a[0] + aw / 2 + d[0] * aw, a[1] + ah / 2 + d[1] * ah
  w, h = np.exp(min(d[2], CLAMP)) * aw, np.exp(min(d[3], CLAMP)) * ah
  return np.array([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])


def _reference_propose(logits, deltas, anchors, height, width, pre, post, thr, min_size):
  """py-faster-rcnn's proposal layer in float64 loops."""
  boxes = np.array([_decode(d, a) for d, a in zip(deltas, anchors)])
  boxes = np.clip(boxes, 0, [width, height, width, height])
  keep = np.flatnonzero((boxes[:, 2] - boxes[:, 0] >= min_size)
                        & (boxes[:, 3] - boxes[:, 1] >= min_size))
  order = keep[np.argsort(-logits[keep], kind="stable")][:pre]
  picks = []
  for i in order:
    if all(_iou(boxes[i], boxes[j]) <= thr for j in picks):
      picks.append(i)
    if len(picks) == post:
      break
  return boxes[picks], 1 / (1 + np.exp(-logits[picks]))


def test_propose_matches_float64_loop(rng):
  anchors = _anchors()
  n = len(anchors)
  b = 2
  logits = rng.normal(size=(b, n)).astype(np.float32)
  deltas = (rng.normal(size=(b, n, 4)) * 0.3).astype(np.float32)
  sizes = np.array([[64, 64], [40, 50]], np.int32)
  kw = dict(pre_nms_topk=120, post_nms_topk=40, nms_threshold=0.7, min_size=4.0)
  out = jax.jit(lambda l, d, s: rpn.propose_batch(l, d, jnp.asarray(anchors, jnp.float32), s,
                                                  **kw))(logits, deltas, sizes)
  out = jax.tree.map(np.asarray, out)
  for i in range(b):
    boxes, scores = _reference_propose(logits[i].astype(np.float64),
                                       deltas[i].astype(np.float64), anchors, sizes[i, 0],
                                       sizes[i, 1], 120, 40, 0.7, 4.0)
    k = len(boxes)
    assert out["valid"][i].sum() == k
    assert np.all(out["valid"][i][:k])
    np.testing.assert_allclose(out["boxes"][i][:k], boxes, atol=2e-3)
    np.testing.assert_allclose(out["scores"][i][:k], scores, rtol=1e-5)
    assert np.all(out["boxes"][i][k:] == 0) and np.all(out["scores"][i][k:] == 0)
    # Inside the real pixels, big enough.
    bx = out["boxes"][i][:k]
    assert np.all(bx[:, 2] <= sizes[i, 1]) and np.all(bx[:, 3] <= sizes[i, 0])


def test_propose_empty_image_gives_no_proposals():
  anchors = jnp.asarray(_anchors(), jnp.float32)
  n = anchors.shape[0]
  out = rpn.propose(jnp.zeros((n,)), jnp.zeros((n, 4)), anchors, jnp.array([0, 0]),
                    pre_nms_topk=50, post_nms_topk=10, min_size=1.0)
  assert not np.asarray(out["valid"]).any()
  assert np.all(np.asarray(out["boxes"]) == 0)
  nan = rpn.propose(jnp.full((n,), jnp.nan), jnp.zeros((n, 4)), anchors, jnp.array([64, 64]),
                    pre_nms_topk=50, post_nms_topk=10, min_size=1.0)
  assert not np.asarray(nan["valid"]).any()


def _reference_rpn_loss(logits, deltas, obj, box, sampled, beta, weight):
  cls, reg, count = 0.0, 0.0, max(sampled.sum(), 1)
  for idx in zip(*np.nonzero(sampled)):
    x, t = logits[idx], obj[idx]
    cls += -(t * np.log(1 / (1 + np.exp(-x))) + (1 - t) * np.log(1 - 1 / (1 + np.exp(-x))))
    if t > 0.5:
      for d in deltas[idx] - box[idx]:
        reg += 0.5 * d * d / beta if abs(d) < beta else abs(d) - 0.5 * beta
  return cls / count + weight * reg / count


def test_rpn_loss_matches_reference_and_has_finite_gradients(rng):
  """The default terms (sigmoid binary cross-entropy, smooth L1 with beta 1/9) are the RPN loss
  as it was before its terms became configurable: the float64 reference."""
  b, n = 2, 50
  logits = rng.normal(size=(b, n)).astype(np.float32) * 3
  deltas = rng.normal(size=(b, n, 4)).astype(np.float32)
  box = rng.normal(size=(b, n, 4)).astype(np.float32)
  sampled = rng.random((b, n)) < 0.5
  obj = ((rng.random((b, n)) < 0.3) & sampled).astype(np.float32)
  targets = {"objectness": jnp.asarray(obj), "box": jnp.asarray(box)}
  anchors = jnp.tile(jnp.asarray([[0.0, 0.0, 16.0, 16.0]]), (n, 1))
  loss, metrics = losses.rpn_loss(jnp.asarray(logits), jnp.asarray(deltas), targets,
                                  jnp.asarray(sampled), anchors=anchors, box_weight=2.0)
  ref = _reference_rpn_loss(logits.astype(np.float64), deltas.astype(np.float64), obj,
                            box.astype(np.float64), sampled, 1 / 9, 2.0)
  np.testing.assert_allclose(float(loss), ref, rtol=1e-5)
  np.testing.assert_allclose(float(metrics["loss/rpn_objectness"] + metrics["loss/rpn_box"]),
                             float(loss), rtol=1e-6)
  # Nothing sampled, garbage in the unsampled entries: loss 0, gradients finite and zero.
  garbage = {"objectness": jnp.full((b, n), jnp.nan), "box": jnp.full((b, n, 4), jnp.inf)}
  f = lambda l, d: losses.rpn_loss(l, d, garbage, jnp.zeros((b, n), bool),  # noqa: E731
                                   anchors=anchors)[0]
  value, grads = jax.value_and_grad(f, argnums=(0, 1))(jnp.asarray(logits), jnp.asarray(deltas))
  assert float(value) == 0.0
  assert all(np.all(np.asarray(g) == 0) for g in grads)


def test_targets_with_degenerate_gt_give_finite_loss_gradients():
  anchors = jnp.asarray(_anchors(), jnp.float32)
  gt = jnp.array([[10.0, 10.0, 10.0, 30.0], [5.0, 5.0, 40.0, 40.0]])   # a zero-width box
  t = rpn.anchor_targets(jax.random.PRNGKey(0), anchors, gt, jnp.array([True, True]),
                         jnp.array(IMAGE))
  t = jax.tree.map(lambda x: x[None], t)
  n = anchors.shape[0]

  def f(logits, deltas):
    return losses.rpn_loss(logits, deltas, t, t["sampled"], anchors=anchors)[0]

  grads = jax.grad(f, argnums=(0, 1))(jnp.zeros((1, n)), jnp.zeros((1, n, 4)))
  assert all(np.all(np.isfinite(np.asarray(g))) for g in grads)


def test_head_shapes_order_and_errors():
  head = rpn.RPNHead(num_anchors=9, channels=8)
  x = jnp.ones((2, 3, 5, 4))
  variables = head.init(jax.random.PRNGKey(0), x)
  logits, deltas = head.apply(variables, x)
  assert logits.shape == (2, 3 * 5 * 9) and deltas.shape == (2, 3 * 5 * 9, 4)
  # Row (y * fw + x) * k + a is cell (y, x), anchor a: a change at one cell moves its k rows.
  x2 = x.at[:, 1, 2].set(5.0)
  l2, _ = head.apply(variables, x2)
  changed = np.flatnonzero(np.any(np.asarray(l2 != logits), axis=0))
  cell = 1 * 5 + 2
  assert set(range(cell * 9, cell * 9 + 9)) <= set(changed)
  with pytest.raises(ValueError, match="features"):
    head.apply(variables, jnp.ones((3, 5, 4)))
  with pytest.raises(ValueError, match="pre_nms_topk"):
    rpn.propose(jnp.zeros((4,)), jnp.zeros((4, 4)), jnp.zeros((4, 4)), jnp.array([8, 8]),
                pre_nms_topk=0, post_nms_topk=2)
  with pytest.raises(ValueError, match="deltas"):
    rpn.propose(jnp.zeros((4,)), jnp.zeros((5, 4)), jnp.zeros((4, 4)), jnp.array([8, 8]),
                pre_nms_topk=2, post_nms_topk=2)
  with pytest.raises(ValueError, match="gt_mask"):
    rpn.anchor_targets(jax.random.PRNGKey(0), jnp.zeros((4, 4)), jnp.zeros((2, 4)),
                       jnp.ones((3,), bool), jnp.array([8, 8]))
