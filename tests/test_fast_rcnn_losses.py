"""jaxdet.losses.fast_rcnn_loss against a float64 NumPy reference of Girshick 2015, eq. 1."""

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


def _ref_loss(logits, deltas, labels, targets, mask, rois, box_loss, weight):
  """L = mean over valid RoIs of [-log p(u) + weight [u >= 1] L_loc(t^u, v)], float64."""
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
  return total_cls / n + weight * total_box / n, total_cls / n, weight * total_box / n


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


@pytest.mark.parametrize("box_loss", ["smooth_l1", "l2", "giou"])
def test_matches_float64_reference(rng, box_loss):
  logits, deltas, labels, targets, mask, rois = _inputs(rng)
  weight = 1.7
  loss, metrics = losses.fast_rcnn_loss(
      jnp.asarray(logits), jnp.asarray(deltas), jnp.asarray(labels), jnp.asarray(targets),
      jnp.asarray(mask), rois=jnp.asarray(rois), stds=STDS, box_loss=box_loss,
      box_weight=weight)
  want, want_cls, want_box = _ref_loss(logits, deltas, labels, targets, mask, rois, box_loss,
                                       weight)
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
      rois=jnp.asarray(rois), box_loss="giou")[0])
  full = fn(jnp.asarray(logits), jnp.asarray(deltas))
  sliced, _ = losses.fast_rcnn_loss(
      jnp.asarray(logits[mask]), jnp.asarray(deltas[mask]), jnp.asarray(labels[mask]),
      jnp.asarray(targets[mask]), jnp.ones(mask.sum(), bool), rois=jnp.asarray(rois[mask]),
      box_loss="giou")
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
        jnp.asarray(mask), rois=jnp.asarray(rois), box_loss=name)[0])(big)
    assert np.isfinite(np.asarray(gg)).all(), name


def test_box_loss_swap_by_dotted_path(rng, tmp_path, monkeypatch):
  """A researcher's loss in their own package, named by config, without editing jaxdet."""
  pkg = tmp_path / "mylosses"
  pkg.mkdir()
  (pkg / "__init__.py").write_text("")
  (pkg / "boxes.py").write_text(textwrap.dedent("""
      import jax.numpy as jnp

      def l1(pred_deltas, target_deltas, mask, *, rois, stds):
        return jnp.where(mask, jnp.abs(pred_deltas - target_deltas).sum(-1), 0.0)
  """))
  monkeypatch.syspath_prepend(str(tmp_path))
  logits, deltas, labels, targets, mask, rois = _inputs(rng)
  loss, metrics = losses.fast_rcnn_loss(
      jnp.asarray(logits), jnp.asarray(deltas), jnp.asarray(labels), jnp.asarray(targets),
      jnp.asarray(mask), rois=jnp.asarray(rois), box_loss="mylosses.boxes:l1")
  fg = mask & (labels >= 1)
  want = sum(np.abs(deltas[r, labels[r] - 1].astype(np.float64) - targets[r]).sum()
             for r in np.flatnonzero(fg)) / mask.sum()
  np.testing.assert_allclose(float(metrics["loss/box"]), want, rtol=1e-5)
  assert losses.resolve_loss("mylosses.boxes:l1", losses.BOX_DELTA_LOSSES) is not None


def test_bad_inputs_are_named(rng):
  logits, deltas, labels, targets, mask, rois = (jnp.asarray(a) for a in _inputs(rng))
  with pytest.raises(ValueError, match="box_deltas"):
    losses.fast_rcnn_loss(logits, deltas[:, :2], labels, targets, mask, rois=rois)
  with pytest.raises(TypeError, match="mask"):
    losses.fast_rcnn_loss(logits, deltas, labels, targets, mask.astype(jnp.int32), rois=rois)
  with pytest.raises(ValueError, match="unknown name 'hubr'"):
    losses.fast_rcnn_loss(logits, deltas, labels, targets, mask, rois=rois, box_loss="hubr")
  with pytest.raises(ModuleNotFoundError):
    losses.fast_rcnn_loss(logits, deltas, labels, targets, mask, rois=rois,
                          box_loss="no_such_pkg.mod:fn")
