"""Faults in jaxdet.losses: NaN under a False mask, out-of-range labels.

Every masked loss must give, for inputs holding NaN (or inf) where the mask is False, the value
and the gradients (wrt predictions) of the same loss on the sliced, unmasked-only input. Labels
outside [0, C) are a precondition of the losses (not checked on the normal path, no host sync);
`losses.check_labels` under `jax.experimental.checkify` catches them, jitted.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify

from jaxdet import losses
from jaxdet.models import yolo

NAN, INF = float("nan"), float("inf")


def _assert_masked_equals_sliced(fn, preds, others, mask, *, reduce_axes=None):
  """fn(preds, *others, mask) summed == fn on the rows where mask is True; grads equal too.

  `mask` is bool[R]: rows of axis 0; masked rows of preds and others hold garbage.
  """
  keep = np.flatnonzero(mask)
  def total(p, *o, m):
    return jnp.sum(fn(p, *o, m))
  value, grad = jax.jit(jax.value_and_grad(functools.partial(total, m=mask)))(preds, *others)
  sliced = [x[keep] for x in others]
  want_value, want_grad = jax.jit(jax.value_and_grad(functools.partial(total, m=mask[keep])))(
      preds[keep], *sliced)
  assert np.isfinite(value) and np.isfinite(np.asarray(grad)).all(), (value, grad)
  np.testing.assert_allclose(value, want_value, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(grad)[keep], want_grad, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(grad)[~mask], 0.0)


@pytest.fixture
def rows(rng):
  """Predictions and targets f32[6, 4] with NaN / inf in rows 1, 3 and 4, masked out."""
  p = rng.normal(size=(6, 4)).astype(np.float32)
  t = rng.normal(size=(6, 4)).astype(np.float32)
  mask = np.array([True, False, True, False, False, True])
  p[1] = NAN
  t[3] = INF
  t[4] = NAN
  p[4, 0] = -INF
  return p, t, mask


@pytest.mark.parametrize("beta", [1.0, 0.0])
def test_smooth_l1_and_l2_nan_under_false_mask(rows, beta):
  p, t, mask = rows
  _assert_masked_equals_sliced(
      lambda p, t, m: losses.smooth_l1(p, t, m[:, None], beta=beta), p, [t], mask)
  _assert_masked_equals_sliced(lambda p, t, m: losses.l2(p, t, m[:, None]), p, [t], mask)


def test_sigmoid_bce_and_softmax_ce_nan_under_false_mask(rows, rng):
  p, t, mask = rows
  targets = np.where(np.isfinite(t), (t > 0).astype(np.float32), t)
  _assert_masked_equals_sliced(
      lambda p, t, m: losses.sigmoid_binary_cross_entropy(p, t, m[:, None]), p, [targets], mask)
  labels = rng.integers(0, 4, size=6).astype(np.int32)
  labels[~mask] = 99                          # masked labels may hold anything
  _assert_masked_equals_sliced(
      lambda p, l, m: losses.softmax_cross_entropy(p, l, m), p, [labels], mask)


def test_giou_loss_nan_boxes_under_false_mask(rng):
  xy = rng.uniform(0, 50, size=(2, 6, 2))
  wh = rng.uniform(1, 40, size=(2, 6, 2))
  pred, target = np.concatenate([xy, xy + wh], -1).astype(np.float32)
  mask = np.array([True, False, True, False, True, False])
  pred[1] = [NAN, 0, 3, 3]
  target[3] = [0, 0, INF, INF]
  target[5, 2] = NAN
  _assert_masked_equals_sliced(losses.giou_loss, pred, [target], mask)


def test_fast_rcnn_and_rpn_losses_nan_under_false_mask(rng):
  r, c = 6, 3
  logits = rng.normal(size=(r, c + 1)).astype(np.float32)
  deltas = rng.normal(size=(r, c, 4)).astype(np.float32)
  labels = np.array([1, 0, 2, 3, 0, 1], np.int32)
  targets = rng.normal(size=(r, 4)).astype(np.float32)
  xy = rng.uniform(0, 50, size=(r, 2))
  rois = np.concatenate([xy, xy + rng.uniform(5, 30, size=(r, 2))], -1).astype(np.float32)
  mask = np.array([True, False, True, True, False, True])
  logits[1] = NAN
  deltas[4] = NAN
  labels[4] = 77
  targets[[1, 4]] = NAN
  rois[1] = NAN
  keep = np.flatnonzero(mask)
  for box_loss in ("smooth_l1", "giou"):
    def loss(lg, dl, m, lb, tg, ro):
      return losses.fast_rcnn_loss(lg, dl, lb, tg, m, rois=ro, stds=(0.1, 0.1, 0.2, 0.2),
                                   box_term=losses.TERMS["box"][box_loss])[0]
    value, grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(
        logits, deltas, mask, labels, targets, rois)
    want, want_grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(
        logits[keep], deltas[keep], mask[keep], labels[keep], targets[keep], rois[keep])
    np.testing.assert_allclose(value, want, rtol=1e-5)
    for g, w in zip(grads, want_grads):
      assert np.isfinite(np.asarray(g)).all(), box_loss
      np.testing.assert_allclose(np.asarray(g)[keep], w, rtol=1e-5, atol=1e-6)
      np.testing.assert_array_equal(np.asarray(g)[~mask], 0.0)
  # The RPN: unsampled anchors hold NaN logits, deltas and targets.
  obj = (rng.random((1, r)) < 0.5).astype(np.float32)
  rpn_logits, rpn_deltas = logits[None, :, 0].copy(), deltas[None, :, 0].copy()
  rpn_targets = {"objectness": np.where(mask[None], obj, NAN), "box": targets[None]}
  def rpn(lg, dl, m, tg):
    anchors = jnp.tile(jnp.asarray([[0.0, 0.0, 8.0, 8.0]]), (lg.shape[1], 1))
    return losses.rpn_loss(lg, dl, tg, m, anchors=anchors)[0]
  value, grads = jax.jit(jax.value_and_grad(rpn, argnums=(0, 1)))(
      rpn_logits, rpn_deltas, mask[None], rpn_targets)
  sliced = {k: v[:, keep] for k, v in rpn_targets.items()}
  want, want_grads = jax.jit(jax.value_and_grad(rpn, argnums=(0, 1)))(
      rpn_logits[:, keep], rpn_deltas[:, keep], mask[None, keep], sliced)
  np.testing.assert_allclose(value, want, rtol=1e-5)
  for g, w in zip(grads, want_grads):
    assert np.isfinite(np.asarray(g)).all()
    np.testing.assert_allclose(np.asarray(g)[:, keep], w, rtol=1e-5, atol=1e-6)


def test_yolo_loss_nan_targets_in_cells_without_objects(rng):
  n, s, b, c = 2, 3, 2, 4
  preds = rng.normal(size=(n, s, s, 5 * b + c)).astype(np.float32)
  box = rng.uniform(0.1, 0.9, size=(n, s, s, 4)).astype(np.float32)
  labels = rng.integers(0, c, size=(n, s, s)).astype(np.int32)
  mask = rng.random((n, s, s)) < 0.5
  mask[0, 0, 0], mask[1, 2, 2] = True, False
  clean = {"box": np.where(mask[..., None], box, 0.0), "labels": np.where(mask, labels, 0),
           "mask": mask}
  clean.update(jax.vmap(functools.partial(yolo.assign_predictors, num_boxes=b))(preds, clean))
  garbage = dict(clean, box=box.copy(), labels=np.where(mask, labels, -5),
                 iou=np.where(clean["responsible"], clean["iou"], NAN))
  garbage["box"][1, 2, 2] = NAN
  garbage["box"][~mask & (rng.random((n, s, s)) < 0.5)] = INF
  decode = functools.partial(yolo.predictor_boxes, grid_size=s)
  loss = lambda p, t: losses.yolo_loss(p, t, mask, num_boxes=b, terms=yolo.Loss(),  # noqa: E731
                                       decode=decode)[0]
  run = jax.jit(jax.value_and_grad(loss))
  value, grad = run(preds, garbage)
  # Reference: the same targets with garbage replaced by zeros (values that must not matter).
  want, want_grad = run(preds, clean)
  assert np.isfinite(value) and np.isfinite(np.asarray(grad)).all()
  np.testing.assert_allclose(value, want, rtol=1e-6)
  np.testing.assert_allclose(grad, want_grad, rtol=1e-6, atol=1e-7)


# --- out-of-range labels: a precondition, checkable with checkify ------------------------------


def test_check_labels_catches_out_of_range_labels_under_jit():
  logits = jnp.zeros((4, 3))
  mask = jnp.array([True, True, False, True])

  def checked_ce(logits, labels, mask):
    losses.check_labels(labels, logits.shape[-1], mask, name="labels")
    return losses.softmax_cross_entropy(logits, labels, mask)

  run = jax.jit(checkify.checkify(checked_ce))
  err, _ = run(logits, jnp.array([0, 2, 99, 1]), mask)          # garbage only where masked
  err.throw()
  for bad in ([0, 3, 0, 1], [-1, 0, 0, 0]):
    err, _ = run(logits, jnp.array(bad), mask)
    with pytest.raises(checkify.JaxRuntimeError, match=r"labels: .* outside \[0, 3\)"):
      err.throw()
  # No mask: every label counts.
  err, _ = jax.jit(checkify.checkify(lambda l: losses.check_labels(l, 3)))(jnp.array([0, 3]))
  with pytest.raises(checkify.JaxRuntimeError, match="labels"):
    err.throw()


def test_checked_runs_a_loss_under_checkify_for_fast_rcnn_and_yolo():
  # Fast R-CNN: labels in [0, C] over C + 1 columns (0 = background).
  r, c = 4, 2
  args = dict(cls_logits=jnp.zeros((r, c + 1)), box_deltas=jnp.zeros((r, c, 4)),
              box_targets=jnp.zeros((r, 4)), rois=jnp.tile(jnp.array([[0., 0, 8, 8]]), (r, 1)))
  mask = jnp.array([True, True, True, False])
  fast = losses.checked(
      lambda labels: losses.fast_rcnn_loss(labels=labels, mask=mask, **args)[0],
      lambda labels: losses.check_labels(labels, c + 1, mask, name="labels"))
  fast(jnp.array([0, 1, 2, 9]))                                  # padding holds garbage: fine
  with pytest.raises(checkify.JaxRuntimeError, match=r"labels: label 3 .* outside \[0, 3\)"):
    fast(jnp.array([0, 3, 2, 0]))
  # YOLO's targets: an out-of-range class would give an all-zero one-hot class target.
  boxes = jnp.array([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]])
  box_mask = jnp.array([True, True])
  encode = lambda labels: yolo.encode_targets(boxes, labels, box_mask, grid_size=4,  # noqa
                                              image_size=(32, 32), num_classes=3)
  targets = losses.checked(encode, lambda labels: losses.check_labels(labels, 3, box_mask))
  out = targets(jnp.array([1, 2]))
  np.testing.assert_array_equal(np.asarray(out["labels"])[np.asarray(out["mask"])], [1, 2])
  with pytest.raises(checkify.JaxRuntimeError, match="outside"):
    targets(jnp.array([1, 3]))
