"""Localization as regression: slot targets, the loss, decoding and the ILSVRC metrics."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdet import losses
from jaxdet.models import localization as loc

C = 4


def _random_gt(rng, m=5, real=3, size=(60, 80)):
  h, w = size
  xy = rng.uniform(0, [w - 10, h - 10], (m, 2))
  wh = rng.uniform(4, 10, (m, 2))
  boxes = np.concatenate([xy, xy + wh], 1).astype(np.float32)
  mask = np.zeros(m, bool)
  mask[rng.choice(m, real, replace=False)] = True
  labels = rng.integers(0, C, m).astype(np.int32)
  return boxes, labels, mask, np.array([h, w], np.int32)


@pytest.mark.parametrize("targets", ["boxes", "points"])
def test_slot_targets_against_sorted_loop(rng, targets):
  boxes, labels, mask, size = _random_gt(rng)
  k = 4   # more slots than the 3 real objects
  got = loc.slot_targets(jnp.asarray(boxes), jnp.asarray(labels), jnp.asarray(mask),
                         jnp.asarray(size), num_slots=k, targets=targets)
  real = [i for i in range(len(boxes)) if mask[i]]
  centre = lambda i: ((boxes[i, 0] + boxes[i, 2]) / 2, (boxes[i, 1] + boxes[i, 3]) / 2)
  real.sort(key=lambda i: centre(i))
  h, w = size
  np.testing.assert_array_equal(got["mask"], [True] * 3 + [False])
  np.testing.assert_array_equal(got["labels"][:3], labels[real])
  for s, i in enumerate(real):
    if targets == "boxes":
      want = boxes[i].astype(np.float64) / [w, h, w, h]
    else:
      cx, cy = centre(i)
      want = np.array([cx / w, cy / h])
    np.testing.assert_allclose(got["coords"][s], want, rtol=1e-5)
  np.testing.assert_array_equal(got["coords"][3], 0.0)


def _loss(logits, coords, targets, loss=None, size=(60, 80)):
  """losses.localization_loss as the system calls it, images of `size` (height, width)."""
  rows = jnp.full((logits.shape[0] * logits.shape[1], 2), jnp.asarray(size))
  return losses.localization_loss(
      jnp.asarray(logits), jnp.asarray(coords), {k: jnp.asarray(v) for k, v in targets.items()},
      terms=loss or loc.Loss(), decode=functools.partial(loc.coords_to_boxes, image_size=rows))


def test_loss_against_reference(rng):
  b, k = 3, 2
  logits = rng.normal(size=(b, k, C)).astype(np.float32)
  coords = rng.uniform(size=(b, k, C, 4)).astype(np.float32)
  tl = rng.integers(0, C, (b, k)).astype(np.int32)
  tc = rng.uniform(size=(b, k, 4)).astype(np.float32)
  tm = np.array([[True, True], [True, False], [False, False]])
  targets = {"coords": tc, "labels": tl, "mask": tm}
  value, metrics = _loss(logits, coords, targets, loc.Loss(box_weight=2.5, cls_weight=0.5))
  ce, l2, right = [], [], []
  for i in range(b):
    for j in range(k):
      if not tm[i, j]:
        continue
      z = logits[i, j].astype(np.float64)
      logp = z - np.log(np.sum(np.exp(z - z.max()))) - z.max()
      ce.append(-logp[tl[i, j]])
      l2.append(np.sum((coords[i, j, tl[i, j]] - tc[i, j]) ** 2))
      right.append(np.argmax(z) == tl[i, j])
  assert {k for k in metrics if k.startswith("loss/")} == {"loss/cls", "loss/box"}
  np.testing.assert_allclose(metrics["loss/cls"], 0.5 * np.mean(ce), rtol=1e-5)
  np.testing.assert_allclose(metrics["loss/box"], 2.5 * np.mean(l2), rtol=1e-5)
  np.testing.assert_allclose(value, 0.5 * np.mean(ce) + 2.5 * np.mean(l2), rtol=1e-5)
  np.testing.assert_allclose(metrics["localization/accuracy"], np.mean(right), rtol=1e-6)
  # The defaults: cross-entropy + 10 x L2 (the loss the presets were measured with).
  value, _ = _loss(logits, coords, targets)
  np.testing.assert_allclose(value, np.mean(ce) + 10.0 * np.mean(l2), rtol=1e-5)
  # Class-agnostic coordinates (G = 1) use the one shared box.
  _, m1 = _loss(logits, coords[:, :, :1], targets)
  want = np.mean([np.sum((coords[i, j, 0] - tc[i, j]) ** 2) for i in range(b) for j in range(k)
                  if tm[i, j]])
  np.testing.assert_allclose(m1["loss/box"], 10.0 * want, rtol=1e-5)
  # GIoU on the decoded pixel boxes (60 x 80 images), against the float64 formula.
  order = lambda x: np.concatenate([np.minimum(x[..., :2], x[..., 2:]),  # noqa: E731
                                    np.maximum(x[..., :2], x[..., 2:]) + 0.05], -1)
  coords, tc = order(coords), order(tc)
  targets = {"coords": tc, "labels": tl, "mask": tm}
  _, mg = _loss(logits, coords, targets, loc.Loss(box="giou", box_weight=1.0))
  scale = np.array([80, 60, 80, 60], np.float64)
  giou = []
  for i, j in zip(*np.nonzero(tm)):
    p, t = coords[i, j, tl[i, j]].astype(np.float64) * scale, tc[i, j].astype(np.float64) * scale
    area = lambda x: max(x[2] - x[0], 0) * max(x[3] - x[1], 0)  # noqa: E731
    inter = area([max(p[0], t[0]), max(p[1], t[1]), min(p[2], t[2]), min(p[3], t[3])])
    union = area(p) + area(t) - inter
    hull = area([min(p[0], t[0]), min(p[1], t[1]), max(p[2], t[2]), max(p[3], t[3])])
    giou.append(1 - (inter / union - (hull - union) / hull))
  np.testing.assert_allclose(mg["loss/box"], np.mean(giou), rtol=1e-4)


def test_loss_all_masked_is_zero_with_finite_gradients():
  logits = jnp.zeros((2, 1, C))
  t = {"coords": jnp.full((2, 1, 4), jnp.nan), "labels": jnp.full((2, 1), -1, jnp.int32),
       "mask": jnp.zeros((2, 1), bool)}
  value, _ = _loss(logits, jnp.zeros((2, 1, 1, 4)), t)
  assert float(value) == 0.0
  g = jax.grad(lambda c: _loss(logits, c, t)[0])(jnp.full((2, 1, 1, 4), jnp.nan))
  assert np.all(np.isfinite(g))


def test_decode_slots_and_metrics():
  logits = jnp.array([[0.0, 5.0, 0.0, 0.0], [4.0, 0.0, 0.0, 0.0]])        # classes 1, 0
  coords = jnp.zeros((2, C, 4)).at[0, 1].set(jnp.array([0.1, 0.2, 0.5, 0.6])).at[1, 0].set(
      jnp.array([0.9, 0.1, 0.6, 0.3]))                                     # x2 < x1: reordered
  det = jax.jit(loc.decode_slots)(logits, coords, jnp.array([50, 100]))
  np.testing.assert_allclose(det["boxes"], [[10, 10, 50, 30], [60, 5, 90, 15]], rtol=1e-5)
  np.testing.assert_array_equal(det["labels"], [1, 0])
  np.testing.assert_allclose(det["scores"][0], np.exp(5) / (np.exp(5) + 3), rtol=1e-5)
  # Metrics: image 1 right class and IoU 1; image 2 right class, IoU 0.25; image 3 wrong class.
  gts = [{"boxes": np.array([[10, 10, 50, 30]], np.float32), "labels": np.array([1])},
         {"boxes": np.array([[0, 0, 20, 20]], np.float32), "labels": np.array([2])},
         {"boxes": np.array([[0, 0, 10, 10]], np.float32), "labels": np.array([3])}]
  dets = [{"boxes": np.array([[10, 10, 50, 30]], np.float32), "labels": np.array([1])},
          {"boxes": np.array([[0, 0, 10, 10]], np.float32), "labels": np.array([2])},
          {"boxes": np.array([[0, 0, 10, 10]], np.float32), "labels": np.array([0])}]
  m = loc.localization_metrics(gts, dets)
  np.testing.assert_allclose(m["accuracy"], 2 / 3)
  np.testing.assert_allclose(m["loc_accuracy"], 1 / 3)
  np.testing.assert_allclose(m["mean_iou"], (1 + 0.25 + 1) / 3)
  with pytest.raises(ValueError, match="dets"):
    loc.localization_metrics(gts, dets[:2])


@pytest.mark.parametrize("head_at", ["fc", "conv"])
def test_system_shapes_params_and_jit(head_at):
  kw = {"stride": 16, "widths": (8, 16, 16, 16), "fc_features": (32, 32), "roi_size": 2,
        "dropout_rate": 0.0}
  config = {"num_classes": C, "model": {"backbone_kw": kw, "num_slots": 2, "per_class": True,
                                        "box_head_at": head_at, "box_fc_features": (16,)}}
  system = loc.build_system(config)
  batch = {"image": jnp.full((2, 32, 32, 3), 90, jnp.uint8),
           "image_size": jnp.array([[32, 32], [32, 32]], jnp.int32),
           "boxes": jnp.array([[[2.0, 3.0, 20.0, 25.0], [0, 0, 0, 0]]] * 2),
           "labels": jnp.array([[1, 0], [2, 0]], jnp.int32),
           "box_mask": jnp.array([[True, False], [False, False]])}
  v = system.init(jax.random.PRNGKey(0), batch)
  p = v["params"]
  assert {"conv", "fc", "cls_head", "box_head"} <= set(p)
  assert ("box_fc" in p) == (head_at == "conv")
  assert p["box_head"]["kernel"].shape == (32 if head_at == "fc" else 16, 2 * C * 4)
  g = jax.jit(jax.grad(lambda v, b: system.loss(v, b, jax.random.PRNGKey(1))[0]))(v, batch)
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(g))
  dets = jax.jit(system.predict)(v, batch)
  assert dets["boxes"].shape == (2, 2, 4) and dets["valid"].all()
  assert system.eval_metrics is loc.localization_metrics


@pytest.mark.parametrize("detach", [False, True])
def test_detach_box_keeps_box_gradients_out_of_the_backbone(detach):
  kw = {"stride": 4, "widths": (8, 8), "fc_features": (8,), "roi_size": 2, "dropout_rate": 0.0}
  system = loc.build_system({"num_classes": C, "model": {"backbone_kw": kw, "detach_box": detach,
                                                         "box_head_at": "conv",
                                                         "box_fc_features": (8,)}})
  net = system.extras.network
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 32, 32, 3)), jnp.float32)
  v = net.init(jax.random.PRNGKey(0), x)
  g = jax.grad(lambda v: jnp.sum(net.apply(v, x)[1] ** 2))(v)["params"]   # box outputs only
  backbone = [np.abs(np.asarray(a)).max() for a in jax.tree_util.tree_leaves((g["conv"], g["fc"]))]
  assert (max(backbone) == 0.0) == detach
  assert max(np.abs(np.asarray(a)).max() for a in jax.tree_util.tree_leaves(g["box_fc"])) > 0


def test_config_errors():
  with pytest.raises(ValueError, match="unknown keys"):
    loc.build_system({"num_classes": C, "model": {"box_head": "fc"}})
  with pytest.raises(ValueError, match="config.model.targets: expected one of"):
    loc.build_system({"num_classes": C, "model": {"targets": "masks"}})
  with pytest.raises(ValueError, match=r"config.model: unknown keys \['box_weight'\]"):
    loc.build_system({"num_classes": C, "model": {"box_weight": 10.0}})   # now loss.box_weight
  with pytest.raises(ValueError, match="config.model.loss.box: 'giou' needs boxes"):
    loc.build_system({"num_classes": C, "model": {"targets": "points", "loss": {"box": "giou"}}})
  with pytest.raises(ValueError, match="config.model.box_head_at: expected 'fc' or 'conv'"):
    loc.build_system({"num_classes": C, "model": {"box_head_at": "fc8"}})
  with pytest.raises(ValueError, match="targets"):
    loc.slot_targets(jnp.zeros((2, 4)), jnp.zeros(2, jnp.int32), jnp.ones(2, bool),
                     jnp.array([8, 8]), num_slots=1, targets="masks")


KW = {"stride": 4, "widths": (8, 8), "fc_features": (8,), "roi_size": 2, "dropout_rate": 0.3}


def _batch(rng, n=2, size=16):
  xy = rng.uniform(0, size / 2, (n, 2, 2))
  boxes = np.concatenate([xy, xy + rng.uniform(3, size / 2, (n, 2, 2))], -1).astype(np.float32)
  return {"image": jnp.asarray(rng.integers(0, 256, (n, size, size, 3)), jnp.uint8),
          "image_size": jnp.full((n, 2), size, jnp.int32), "boxes": jnp.asarray(boxes),
          "labels": jnp.asarray(rng.integers(0, C, (n, 2)), jnp.int32),
          "box_mask": jnp.array([[True, True], [True, False]])}


MODEL = {"backbone_kw": KW, "num_slots": 2, "per_class": True, "box_fc_features": (8,)}


@functools.lru_cache(maxsize=None)
def _builtin_loss():
  """A batch, variables and the loss of a small system with the built-in terms (computed once
  for the parametrized test below)."""
  batch = _batch(np.random.default_rng(0))
  system = loc.build_system({"num_classes": C, "model": MODEL})
  variables = system.init(jax.random.PRNGKey(0), batch)
  return batch, variables, jax.jit(system.loss)(variables, batch, jax.random.PRNGKey(1))


@pytest.mark.parametrize("term, custom", [("cls", "doubled_class"), ("box", "doubled_box_l2")])
def test_loss_term_given_by_dotted_path_is_the_one_trained_with(term, custom):
  batch, variables, (want, want_m, _) = _builtin_loss()
  mine = loc.build_system({"num_classes": C, "model": {
      **MODEL, "loss": {term: f"custom_terms:{custom}"}}})
  got, got_m, _ = jax.jit(mine.loss)(variables, batch, jax.random.PRNGKey(1))
  assert float(want_m[f"loss/{term}"]) > 0
  np.testing.assert_allclose(got_m[f"loss/{term}"], 2 * want_m[f"loss/{term}"], rtol=1e-5)
  np.testing.assert_allclose(got - want, want_m[f"loss/{term}"], rtol=1e-5,
                             atol=1e-6 * float(want))
  other = ({"cls", "box"} - {term}).pop()
  np.testing.assert_allclose(got_m[f"loss/{other}"], want_m[f"loss/{other}"], rtol=1e-6)
  assert mine.extras.settings.loss.fn(term).__name__ == custom
