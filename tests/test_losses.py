"""jaxdet.losses against float64 NumPy references written from the papers' formulas."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdet import losses
from jaxdet.models import yolo


# --- generic pieces -----------------------------------------------------------------------------

def test_masked_mean_and_sum(rng):
  x = rng.normal(size=(5, 4)).astype(np.float32)
  m = rng.random((5, 1)) < 0.5
  m[0] = True
  full = np.broadcast_to(m, x.shape)
  np.testing.assert_allclose(losses.masked_mean(jnp.asarray(x), jnp.asarray(m)),
                             x[full].astype(np.float64).mean(), rtol=1e-5)
  np.testing.assert_allclose(losses.masked_sum(jnp.asarray(x), jnp.asarray(m), axis=1),
                             np.where(full, x, 0).sum(1), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(losses.masked_mean(jnp.asarray(x), None, axis=0), x.mean(0),
                             rtol=1e-5, atol=1e-6)
  # No real entry: 0, not NaN; garbage (inf) under the mask does not leak into value or gradient.
  x_bad = jnp.asarray(x).at[1].set(jnp.inf)
  none = jnp.zeros((5, 1), bool)
  assert float(losses.masked_mean(x_bad, none)) == 0.0
  g = jax.grad(lambda v: losses.masked_mean(v, none.at[0].set(True)))(x_bad)
  assert np.isfinite(np.asarray(g)).all()


def _smooth_l1_ref(d, beta):
  ad = np.abs(d)
  if beta == 0:
    return ad
  return np.where(ad < beta, 0.5 * d * d / beta, ad - 0.5 * beta)


@pytest.mark.parametrize("beta", [1.0, 1 / 9, 0.0])
def test_smooth_l1_and_l2(rng, beta):
  p = rng.normal(size=(6, 4)).astype(np.float32)
  t = rng.normal(size=(6, 4)).astype(np.float32)
  m = rng.random((6, 1)) < 0.6
  d = p.astype(np.float64) - t
  got = losses.smooth_l1(jnp.asarray(p), jnp.asarray(t), jnp.asarray(m), beta=beta)
  np.testing.assert_allclose(got, np.where(m, _smooth_l1_ref(d, beta), 0), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(losses.l2(jnp.asarray(p), jnp.asarray(t)), d * d, rtol=1e-5,
                             atol=1e-6)
  # Continuity at |d| = beta and zero, finite gradient at d = 0.
  g = jax.grad(lambda v: losses.smooth_l1(v, jnp.zeros(3), beta=beta).sum())(jnp.zeros(3))
  assert np.isfinite(np.asarray(g)).all()


def test_softmax_cross_entropy(rng):
  logits = rng.normal(size=(2, 5, 4)).astype(np.float32) * 3
  labels = rng.integers(0, 4, size=(2, 5)).astype(np.int32)
  mask = rng.random((2, 5)) < 0.7
  labels[~mask] = -1                                    # padding labels are garbage
  z = logits.astype(np.float64)
  logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
  ref = np.zeros((2, 5))
  for i, j in zip(*np.nonzero(mask)):
    ref[i, j] = -logp[i, j, labels[i, j]]
  got = losses.softmax_cross_entropy(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(mask))
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
  # Jitted and masked out entries get zero gradient.
  g = jax.jit(jax.grad(lambda l: losses.softmax_cross_entropy(l, labels, mask).sum()))(logits)
  assert np.all(np.asarray(g)[~mask] == 0)


def test_sigmoid_binary_cross_entropy(rng):
  x = (rng.normal(size=(7,)) * 10).astype(np.float32)     # large logits: stability matters
  t = rng.random(7).astype(np.float32)
  xd = x.astype(np.float64)
  ref = -(t * np.log(1 / (1 + np.exp(-xd))) + (1 - t) * np.log(1 / (1 + np.exp(xd))))
  got = losses.sigmoid_binary_cross_entropy(jnp.asarray(x), jnp.asarray(t))
  np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)
  big = losses.sigmoid_binary_cross_entropy(jnp.array([100.0, -100.0]), jnp.array([0.0, 1.0]))
  np.testing.assert_allclose(big, [100.0, 100.0], rtol=1e-6)


def _giou_ref(a, b):
  out = np.zeros(len(a))
  for k, (p, q) in enumerate(zip(a.astype(np.float64), b.astype(np.float64))):
    area = lambda r: max(r[2] - r[0], 0) * max(r[3] - r[1], 0)  # noqa: E731
    iw = max(min(p[2], q[2]) - max(p[0], q[0]), 0)
    ih = max(min(p[3], q[3]) - max(p[1], q[1]), 0)
    inter = iw * ih
    union = area(p) + area(q) - inter
    hull = (max(p[2], q[2]) - min(p[0], q[0])) * (max(p[3], q[3]) - min(p[1], q[1]))
    iou = inter / union if union > 0 else 0.0
    out[k] = 1 - (iou - ((hull - union) / hull if hull > 0 else 0.0))
  return out


def test_giou_loss(rng):
  xy = rng.uniform(0, 50, size=(2, 8, 2))
  wh = rng.uniform(1, 40, size=(2, 8, 2))
  bx = np.concatenate([xy, xy + wh], -1).astype(np.float32)       # [2, 8, 4]: pred, target
  bx[1, 0] = bx[0, 0]                                             # identical -> 0
  bx[0, 1, 2:] = bx[0, 1, :2]                                     # degenerate predicted box
  bx[:, 2] = [10, 10, 10, 10]                                     # both degenerate
  got = losses.giou_loss(jnp.asarray(bx[0]), jnp.asarray(bx[1]))
  np.testing.assert_allclose(got, _giou_ref(bx[0], bx[1]), rtol=1e-5, atol=1e-5)
  assert abs(float(got[0])) < 1e-6 and np.all((np.asarray(got) >= -1e-6) & (np.asarray(got) <= 2))
  g = jax.grad(lambda p: losses.giou_loss(p, jnp.asarray(bx[1])).sum())(jnp.asarray(bx[0]))
  assert np.isfinite(np.asarray(g)).all()


def test_generic_errors():
  with pytest.raises(ValueError, match="targets: expected shape"):
    losses.l2(jnp.zeros((3, 4)), jnp.zeros((3, 2)))
  with pytest.raises(ValueError, match="beta: expected values >= 0"):
    losses.smooth_l1(jnp.zeros(3), jnp.zeros(3), beta=-1.0)
  with pytest.raises(TypeError, match="labels: expected a signed integer or unsigned"):
    losses.softmax_cross_entropy(jnp.zeros((3, 4)), jnp.zeros(3))
  with pytest.raises(ValueError, match="mask: expected a bool mask of shape"):
    losses.softmax_cross_entropy(jnp.zeros((3, 4)), jnp.zeros(3, jnp.int32), jnp.ones(4, bool))
  with pytest.raises(TypeError, match="mask: expected a bool"):
    losses.masked_mean(jnp.zeros(3), jnp.ones(3))


# --- YOLO v1 ------------------------------------------------------------------------------------

def _yolo_loss_ref(pred, t_box, t_cls, mask, B, lc, ln, lo, lk):
  """The paper's equation 3 by direct loops over images, cells and predictors, in float64."""
  pred = pred.astype(np.float64)
  n, s = pred.shape[:2]
  terms = dict(xy=0.0, wh=0.0, obj=0.0, noobj=0.0, cls=0.0)

  def iou(a, b):                               # (cx, cy, w, h)
    ix = max(min(a[0] + a[2] / 2, b[0] + b[2] / 2) - max(a[0] - a[2] / 2, b[0] - b[2] / 2), 0)
    iy = max(min(a[1] + a[3] / 2, b[1] + b[3] / 2) - max(a[1] - a[3] / 2, b[1] - b[3] / 2), 0)
    union = a[2] * a[3] + b[2] * b[3] - ix * iy
    return ix * iy / union if union > 0 else 0.0

  for k in range(n):
    for r in range(s):
      for c in range(s):
        cell = pred[k, r, c]
        tb = t_box[k, r, c].astype(np.float64)
        # Both boxes in image fractions, centres relative to the cell's corner.
        t_img = np.array([tb[0] / s, tb[1] / s, tb[2], tb[3]])
        responsible = -1
        if mask[k, r, c]:
          ious, dists = [], []
          for j in range(B):
            x, y, sw, sh = cell[5 * j:5 * j + 4]
            p_img = np.array([x / s, y / s, sw * sw, sh * sh])
            ious.append(iou(p_img, t_img))
            dists.append(((p_img - t_img) ** 2).sum())
          responsible = int(np.argmax(ious)) if max(ious) > 0 else int(np.argmin(dists))
          x, y, sw, sh, conf = cell[5 * responsible:5 * responsible + 5]
          terms["xy"] += lc * ((x - tb[0]) ** 2 + (y - tb[1]) ** 2)
          terms["wh"] += lc * ((sw - np.sqrt(tb[2])) ** 2 + (sh - np.sqrt(tb[3])) ** 2)
          terms["obj"] += lo * (conf - ious[responsible]) ** 2
          for q in range(t_cls.shape[-1]):
            terms["cls"] += lk * (cell[5 * B + q] - t_cls[k, r, c, q]) ** 2
        for j in range(B):
          if j != responsible:
            terms["noobj"] += ln * cell[5 * j + 4] ** 2
  return {key: v / n for key, v in terms.items()}


def _random_yolo_inputs(rng, n=2, s=3, B=2, C=3):
  pred = rng.normal(size=(n, s, s, 5 * B + C)).astype(np.float32)
  box_params = pred[..., :5 * B].reshape(n, s, s, B, 5)
  box_params[..., :2] = rng.uniform(0, 1, size=(n, s, s, B, 2))
  box_params[..., 2:4] = rng.uniform(0.05, 0.8, size=(n, s, s, B, 2))
  # Some cells whose predictors all lie far away: the zero-IoU tie-break rule is exercised.
  far = rng.random((n, s, s)) < 0.3
  box_params[far, :, 0] += rng.uniform(3, 6, size=(far.sum(), B))
  pred[..., :5 * B] = box_params.reshape(n, s, s, 5 * B)
  t_box = np.concatenate([rng.uniform(0, 1, size=(n, s, s, 2)),
                          rng.uniform(0.01, 0.6, size=(n, s, s, 2))], -1).astype(np.float32)
  t_cls = np.eye(C, dtype=np.float32)[rng.integers(0, C, size=(n, s, s))]
  mask = rng.random((n, s, s)) < 0.5
  mask[0, 0, 0] = far[0, 0, 0] = True
  return pred, t_box, t_cls, mask


def _yolo_loss(pred, t_box, t_cls, mask, loss=None, B=2):
  """jaxdet's YOLO loss as the system computes it: the detector's target assignment
  (`yolo.assign_predictors`), then `losses.yolo_loss` with the terms of `loss` (a yolo.Loss)."""
  s = pred.shape[1]
  t = {"box": jnp.asarray(t_box), "labels": jnp.argmax(jnp.asarray(t_cls), -1).astype(jnp.int32),
       "mask": jnp.asarray(mask)}
  t.update(jax.vmap(functools.partial(yolo.assign_predictors, num_boxes=B))(jnp.asarray(pred), t))
  return losses.yolo_loss(pred, t, t["mask"], num_boxes=B, terms=loss or yolo.Loss(),
                          decode=functools.partial(yolo.predictor_boxes, grid_size=s))


def test_yolo_loss_matches_loop_reference(rng):
  pred, t_box, t_cls, mask = _random_yolo_inputs(rng)
  weights = dict(coord_weight=rng.uniform(1, 6), noobj_weight=rng.uniform(0.1, 1),
                 obj_weight=rng.uniform(0.5, 2), cls_weight=rng.uniform(0.5, 2))
  loss, metrics = jax.jit(lambda *a: _yolo_loss(*a, loss=yolo.Loss(**weights)))(
      pred, t_box, t_cls, mask)
  ref = _yolo_loss_ref(pred, t_box, t_cls, mask, 2, weights["coord_weight"],
                       weights["noobj_weight"], weights["obj_weight"], weights["cls_weight"])
  ref["coord"] = ref.pop("xy") + ref.pop("wh")     # the paper's two coordinate lines
  assert {k for k in metrics if k.startswith("loss/")} == {f"loss/{k}" for k in ref}
  for key in ref:
    np.testing.assert_allclose(metrics[f"loss/{key}"], ref[key], rtol=1e-4, atol=1e-5,
                               err_msg=key)
  np.testing.assert_allclose(loss, sum(ref.values()), rtol=1e-4)
  np.testing.assert_allclose(metrics["yolo/objects"], mask.sum() / 2, rtol=1e-6)
  # The default terms (l2, squared errors, weights 5, 1, 0.5, 1) are the paper's eq. 3.
  loss_default, m_default = _yolo_loss(pred, t_box, t_cls, mask)
  ref = _yolo_loss_ref(pred, t_box, t_cls, mask, 2, 5.0, 0.5, 1.0, 1.0)
  np.testing.assert_allclose(loss_default, sum(ref.values()), rtol=1e-4)
  np.testing.assert_allclose(m_default["loss/coord"], ref["xy"] + ref["wh"], rtol=1e-4)


def test_yolo_loss_gradients_finite_at_zero_size_and_empty_images(rng):
  pred, t_box, t_cls, mask = _random_yolo_inputs(rng)
  pred = pred.copy()
  pred.reshape(*pred.shape[:3], -1)[..., 2:4] = 0.0     # predictor 0: sqrt w = sqrt h = 0
  t_box[..., 2:] = 0.0                                  # zero-size targets
  mask[1] = False                                       # an image without objects
  for loss in (yolo.Loss(), yolo.Loss(coord="giou")):
    grad_fn = jax.grad(lambda p, m: _yolo_loss(p, t_box, t_cls, m, loss=loss)[0])
    g = grad_fn(jnp.asarray(pred), jnp.asarray(mask))
    assert np.isfinite(np.asarray(g)).all()
    assert np.abs(np.asarray(g)).sum() > 0
    g_empty = grad_fn(jnp.asarray(pred), jnp.zeros_like(mask))
    assert np.isfinite(np.asarray(g_empty)).all()
  # Empty images: only the no-object confidence term remains.
  _, m = _yolo_loss(pred, t_box, t_cls, np.zeros_like(mask))
  conf = pred[..., :10].reshape(2, 3, 3, 2, 5)[..., 4].astype(np.float64)
  np.testing.assert_allclose(m["loss/noobj"], 0.5 * (conf ** 2).sum() / 2, rtol=1e-5)
  assert float(m["loss/coord"] + m["loss/obj"] + m["loss/cls"]) == 0.0


def test_yolo_loss_errors():
  pred = jnp.zeros((1, 3, 3, 13))
  bad = jnp.zeros((1, 3, 3, 10))                          # 5B + C with C = 0
  tgt = {"box": jnp.zeros((1, 3, 3, 4)), "labels": jnp.zeros((1, 3, 3), jnp.int32),
         "responsible": jnp.zeros((1, 3, 3, 2), bool), "iou": jnp.zeros((1, 3, 3, 2))}
  mask = jnp.zeros((1, 3, 3), bool)
  kw = dict(terms=yolo.Loss(), decode=functools.partial(yolo.predictor_boxes, grid_size=3))
  with pytest.raises(ValueError, match="predictions: expected last dimension 5B"):
    losses.yolo_loss(bad, tgt, mask, num_boxes=2, **kw)
  with pytest.raises(ValueError, match=r"predictions: expected shape \(\?, 3, 3, \?\)"):
    losses.yolo_loss(jnp.zeros((1, 3, 4, 13)), tgt, mask, num_boxes=2, **kw)
  with pytest.raises(ValueError, match="num_boxes: expected a positive int"):
    losses.yolo_loss(pred, tgt, mask, num_boxes=0, **kw)
  with pytest.raises(ValueError, match=r"targets\['responsible'\]: expected shape"):
    losses.yolo_loss(pred, tgt, mask, num_boxes=1, **kw)
  with pytest.raises(TypeError, match="mask: expected a bool"):
    losses.yolo_loss(pred, tgt, mask.astype(jnp.float32), num_boxes=2, **kw)
  with pytest.raises(ValueError, match="targets: expected a dict"):
    losses.yolo_loss(pred, {"box": tgt["box"]}, mask, num_boxes=2, **kw)
