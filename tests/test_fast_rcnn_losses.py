"""jaxdet.losses.fast_rcnn_loss against a float64 NumPy reference of Girshick 2015, eq. 1 (the
default terms are the formula the loss had before terms became configurable)."""

import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdet import losses

STDS = (0.1, 0.1, 0.2, 0.2)


# --- float64 references written from the paper --------------------------------------------------

def _ref_smooth_l1(x):
  ax = np.abs(x)
  return np.where(ax < 1.0, 0.5 * x * x, ax - 0.5).sum(-1)


def _ref_l2(x):
  return (x * x).sum(-1)


def _ref_decode(d, rois):
  d = d * np.asarray(STDS)
  w, h = rois[:, 2] - rois[:, 0], rois[:, 3] - rois[:, 1]
  cx, cy = rois[:, 0] + 0.5 * w, rois[:, 1] + 0.5 * h
  pcx, pcy = cx + d[:, 0] * w, cy + d[:, 1] * h
  pw, ph = w * np.exp(d[:, 2]), h * np.exp(d[:, 3])
  return np.stack([pcx - pw / 2, pcy - ph / 2, pcx + pw / 2, pcy + ph / 2], -1)


def _ref_giou(a, b):
  area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])   # noqa: E731
  iw = np.clip(np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0]), 0, None)
  ih = np.clip(np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1]), 0, None)
  inter = iw * ih
  union = area(a) + area(b) - inter
  cw = np.maximum(a[:, 2], b[:, 2]) - np.minimum(a[:, 0], b[:, 0])
  ch = np.maximum(a[:, 3], b[:, 3]) - np.minimum(a[:, 1], b[:, 1])
  enclose = cw * ch
  return inter / union - (enclose - union) / enclose


def _ref_loss(logits, deltas, labels, targets, mask, rois, box_loss, weight, cls_weight=1.0):
  """L = mean over valid RoIs of [cls_weight (-log p(u)) + weight [u >= 1] L_loc(t^u, v)],
  float64."""
  logits, deltas, targets, rois = (np.asarray(a, np.float64)
                                   for a in (logits, deltas, targets, rois))
  total_cls = total_box = 0.0
  n = 0
  for r in np.flatnonzero(mask):
    u = labels[r]
    z = logits[r] - logits[r].max()
    total_cls += -(z[u] - np.log(np.exp(z).sum()))
    n += 1
    if u >= 1:
      t, v = deltas[r, u - 1][None], targets[r][None]
      if box_loss == "smooth_l1":
        total_box += _ref_smooth_l1(t - v)[0]
      elif box_loss == "l2":
        total_box += _ref_l2(t - v)[0]
      else:
        rr = rois[r][None]
        total_box += 1.0 - _ref_giou(_ref_decode(t, rr), _ref_decode(v, rr))[0]
  n = max(n, 1)
  cls, box = cls_weight * total_cls / n, weight * total_box / n
  return cls + box, cls, box


def _inputs(rng, r=24, c=5):
  logits = rng.normal(size=(r, c + 1)).astype(np.float32) * 2
  deltas = rng.normal(size=(r, c, 4)).astype(np.float32)
  deltas[:, :, :2] *= 3   # both sides of the smooth L1 transition
  labels = rng.integers(0, c + 1, size=r).astype(np.int32)
  targets = rng.normal(size=(r, 4)).astype(np.float32)
  xy = rng.uniform(0, 100, size=(r, 2))
  rois = np.concatenate([xy, xy + rng.uniform(5, 60, size=(r, 2))], 1).astype(np.float32)
  mask = rng.random(r) < 0.8
  mask[0] = True
  labels[~mask] = -1   # padding holds garbage labels
  return logits, deltas, labels, targets, mask, rois


@pytest.mark.parametrize("box_loss", ["default", "smooth_l1", "l2", "giou"])
def test_matches_float64_reference(rng, box_loss):
  """"default": the loss without term arguments is the paper's (log loss + smooth L1)."""
  logits, deltas, labels, targets, mask, rois = _inputs(rng)
  weight, cls_weight = (1.0, 1.0) if box_loss == "default" else (1.7, 0.6)
  terms = {} if box_loss == "default" else {
      "box_term": losses.TERMS["box"][box_loss], "box_weight": weight,
      "cls_term": losses.TERMS["class"]["softmax_cross_entropy"], "cls_weight": cls_weight}
  loss, metrics = losses.fast_rcnn_loss(
      jnp.asarray(logits), jnp.asarray(deltas), jnp.asarray(labels), jnp.asarray(targets),
      jnp.asarray(mask), rois=jnp.asarray(rois), stds=STDS, **terms)
  want, want_cls, want_box = _ref_loss(
      logits, deltas, labels, targets, mask, rois,
      "smooth_l1" if box_loss == "default" else box_loss, weight, cls_weight)
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)
  np.testing.assert_allclose(float(metrics["loss/cls"]), want_cls, rtol=1e-5)
  np.testing.assert_allclose(float(metrics["loss/box"]), want_box, rtol=1e-5, atol=1e-7)
  acc = (np.argmax(logits, -1) == labels)[mask].mean()
  np.testing.assert_allclose(float(metrics["fast_rcnn/accuracy"]), acc, rtol=1e-6)
  np.testing.assert_allclose(float(metrics["fast_rcnn/fg_fraction"]),
                             (labels[mask] >= 1).mean(), rtol=1e-6)


def test_masked_equals_sliced_jit_and_finite_gradients(rng):
  logits, deltas, labels, targets, mask, rois = _inputs(rng)
  # Garbage where masked: NaN targets, inverted zero-size RoIs.
  targets[~mask] = np.nan
  rois[~mask] = [5.0, 5.0, 5.0, 5.0]
  fn = jax.jit(lambda lg, d: losses.fast_rcnn_loss(
      lg, d, jnp.asarray(labels), jnp.asarray(targets), jnp.asarray(mask),
      rois=jnp.asarray(rois), box_term=losses.box_giou)[0])
  full = fn(jnp.asarray(logits), jnp.asarray(deltas))
  sliced, _ = losses.fast_rcnn_loss(
      jnp.asarray(logits[mask]), jnp.asarray(deltas[mask]), jnp.asarray(labels[mask]),
      jnp.asarray(targets[mask]), jnp.ones(mask.sum(), bool), rois=jnp.asarray(rois[mask]),
      box_term=losses.box_giou)
  np.testing.assert_allclose(float(full), float(sliced), rtol=1e-6)
  g = jax.grad(lambda lg, d: fn(lg, d), argnums=(0, 1))(jnp.asarray(logits), jnp.asarray(deltas))
  for x in g:
    assert np.isfinite(np.asarray(x)).all()
  # Only the target class's deltas of foreground RoIs get a gradient.
  gd = np.asarray(g[1])
  expect = np.zeros(gd.shape[:2], bool)
  for r in np.flatnonzero(mask & (labels >= 1)):
    expect[r, labels[r] - 1] = True
  assert not np.abs(gd[~expect]).any()
  # Degenerate deltas (huge dw) keep finite gradients under smooth L1 and GIoU.
  big = jnp.asarray(deltas).at[:, :, 2:].set(1e3)
  for name in ("smooth_l1", "giou"):
    gg = jax.grad(lambda d: losses.fast_rcnn_loss(
        jnp.asarray(logits), d, jnp.asarray(labels), jnp.nan_to_num(jnp.asarray(targets)),
        jnp.asarray(mask), rois=jnp.asarray(rois), box_term=losses.TERMS["box"][name])[0])(big)
    assert np.isfinite(np.asarray(gg)).all(), name


def test_box_term_swap_by_dotted_path(rng, tmp_path, monkeypatch):
  """A researcher's box term in their own package, named by a dotted path, without editing
  jaxdet; `decode` gives the boxes about the RoIs."""
  pkg = tmp_path / "mylosses"
  pkg.mkdir()
  (pkg / "__init__.py").write_text("")
  (pkg / "boxes.py").write_text(textwrap.dedent("""
      import jax.numpy as jnp

      def l1(predictions, targets, mask, *, decode):
        assert decode(predictions).shape == predictions.shape
        return jnp.where(mask, jnp.abs(predictions - targets).sum(-1), 0.0)
  """))
  monkeypatch.syspath_prepend(str(tmp_path))
  logits, deltas, labels, targets, mask, rois = _inputs(rng)
  term = losses.resolve_term("mylosses.boxes:l1", "box")
  loss, metrics = losses.fast_rcnn_loss(
      jnp.asarray(logits), jnp.asarray(deltas), jnp.asarray(labels), jnp.asarray(targets),
      jnp.asarray(mask), rois=jnp.asarray(rois), box_term=term)
  fg = mask & (labels >= 1)
  want = sum(np.abs(deltas[r, labels[r] - 1].astype(np.float64) - targets[r]).sum()
             for r in np.flatnonzero(fg)) / mask.sum()
  np.testing.assert_allclose(float(metrics["loss/box"]), want, rtol=1e-5)


def test_bad_inputs_are_named(rng):
  logits, deltas, labels, targets, mask, rois = (jnp.asarray(a) for a in _inputs(rng))
  with pytest.raises(ValueError, match="box_deltas"):
    losses.fast_rcnn_loss(logits, deltas[:, :2], labels, targets, mask, rois=rois)
  with pytest.raises(TypeError, match="mask"):
    losses.fast_rcnn_loss(logits, deltas, labels, targets, mask.astype(jnp.int32), rois=rois)
  with pytest.raises(ValueError, match="box_weight"):
    losses.fast_rcnn_loss(logits, deltas, labels, targets, mask, rois=rois, box_weight=-1.0)
