"""R-CNN pieces against scikit-learn (liblinear SVM, ridge) and float64 loop references."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdet.models import rcnn


def _svm_problem(rng, n=120, d=6):
  x = rng.normal(size=(n, d)).astype(np.float32)
  y = np.where(x @ rng.normal(size=d) + 0.3 * rng.normal(size=n) > 0, 1.0, -1.0)
  x = np.concatenate([x, np.full((n, 1), 10.0, np.float32)], 1)     # bias feature (liblinear -B)
  cost = np.where(y > 0, 0.02, 0.01).astype(np.float32)
  return x, y.astype(np.float32), cost


def _objective(w, x, y, cost):
  w, x = np.asarray(w, np.float64), np.asarray(x, np.float64)
  return 0.5 * w @ w + np.sum(cost * np.maximum(0, 1 - y * (x @ w)) ** 2)


def test_svm_solver_matches_liblinear(rng):
  from sklearn.svm import LinearSVC
  x, y, cost = _svm_problem(rng)
  w = np.asarray(rcnn.svm_solve(jnp.asarray(x), jnp.asarray(y), jnp.asarray(cost), steps=20))
  ref = LinearSVC(C=0.02, loss="squared_hinge", fit_intercept=False, tol=1e-8,
                  max_iter=100_000).fit(x, y > 0, sample_weight=cost / 0.02).coef_[0]
  assert _objective(w, x, y, cost) <= _objective(ref, x, y, cost) * (1 + 1e-4)
  np.testing.assert_allclose(w, ref, rtol=2e-3, atol=2e-3)
  # padding rows (cost 0) change nothing; the vmapped all-classes solver equals one class
  xp = np.concatenate([x, rng.normal(size=(5, x.shape[1])).astype(np.float32)])
  idx0 = np.arange(len(xp), dtype=np.int32)
  y0 = np.concatenate([y, np.ones(5)]).astype(np.float32)
  c0 = np.concatenate([cost, np.zeros(5)]).astype(np.float32)
  perm = rng.permutation(len(xp))
  both = np.asarray(rcnn.svm_solve_classes(
      jnp.asarray(xp), jnp.asarray(np.stack([idx0, idx0[perm]])), jnp.asarray(np.stack([y0, y0[perm]])),
      jnp.asarray(np.stack([c0, c0[perm]])), jnp.zeros((2, x.shape[1])), steps=20))
  np.testing.assert_allclose(both[0], w, rtol=1e-3, atol=1e-4)
  np.testing.assert_allclose(both[1], w, rtol=1e-3, atol=1e-4)


def test_ridge_matches_sklearn(rng):
  from sklearn.linear_model import Ridge
  x = rng.normal(size=(50, 5))
  t = x @ rng.normal(size=(5, 4)) + rng.normal(size=(1, 4)) + 0.1 * rng.normal(size=(50, 4))
  cls = rng.integers(0, 3, 50)
  weight = (cls[None] == np.arange(3)[:, None]).astype(np.float32)
  w, b = rcnn.ridge_classes(jnp.asarray(x, jnp.float32), jnp.asarray(t, jnp.float32),
                            jnp.asarray(weight), jnp.float32(2.5))
  for c in range(3):
    ref = Ridge(alpha=2.5).fit(x[cls == c], t[cls == c])
    np.testing.assert_allclose(np.asarray(w[c]), ref.coef_.T, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(np.asarray(b[c]), ref.intercept_, rtol=1e-3, atol=1e-4)


def test_hard_negative_mining_separates_and_agrees_with_liblinear(rng):
  c, n_img = 2, 40
  # Class centres at distance 6 from the origin, where the negatives (unit normal) lie: the
  # classes are separable with a margin whatever the draw (a random centre could land near 0).
  centres = rng.normal(size=(c, 8))
  centres *= 6.0 / np.linalg.norm(centres, axis=1, keepdims=True)
  fc7, ov, is_gt, gt_class = [], [], [], []
  for i in range(n_img):                       # per image: one gt, 30 proposals
    k = i % c
    fc7.append(centres[k] + 0.3 * rng.normal(size=8)); ov.append(np.eye(c)[k]); is_gt.append(True)
    gt_class.append(k)
    for _ in range(30):
      fc7.append(rng.normal(size=8)); o = np.zeros(c); o[k] = rng.uniform(0, 0.29)
      ov.append(o); is_gt.append(False); gt_class.append(0)
  fc7, ov = np.asarray(fc7, np.float32), np.asarray(ov, np.float32)
  is_gt, gt_class = np.asarray(is_gt), np.asarray(gt_class, np.int32)
  cfg = rcnn.Svm(cache_size=200, rounds=6, C=0.01)
  out = rcnn.train_svms(fc7, ov, is_gt, gt_class, c, cfg)
  scores = fc7 @ out["svm_w"] + out["svm_b"]
  for k in range(c):
    assert scores[is_gt & (gt_class == k), k].min() > scores[~is_gt, k].max()
  assert out["rounds"] >= 2 and (out["cache"] <= 200).all()
  lib = rcnn.train_svms(fc7, ov, is_gt, gt_class, c, dataclasses.replace(cfg, solver="liblinear"))
  np.testing.assert_allclose(lib["svm_w"], out["svm_w"], rtol=0.05, atol=0.02)


def test_region_targets_match_loop(rng):
  props = np.concatenate([xy := rng.uniform(0, 40, (20, 2)), xy + rng.uniform(4, 20, (20, 2))], 1)
  gt = np.array([[5, 5, 20, 25], [30, 10, 50, 30], [0, 0, 0, 0]], np.float32)
  labels = np.array([2, 4, 0], np.int32)
  gm = np.array([True, True, False])
  pm = np.arange(20) < 17
  t = rcnn.region_targets(jnp.asarray(props, jnp.float32), jnp.asarray(pm), jnp.asarray(gt),
                          jnp.asarray(labels), jnp.asarray(gm), 0.5)
  from jaxdet.proposals.recall import iou_matrix
  rois = np.concatenate([props, gt])
  iou = iou_matrix(rois, gt[:2])
  for r in range(len(rois)):
    real = pm[r] if r < 20 else gm[r - 20]
    assert bool(t["mask"][r]) == real
    if not real:
      continue
    best = int(np.argmax(iou[r]))
    want = labels[best] + 1 if iou[r, best] >= 0.5 else 0
    assert int(t["class"][r]) == want
    assert float(t["max_iou"][r]) == pytest.approx(iou[r, best], abs=1e-5)
  ov = np.asarray(rcnn.class_overlaps(jnp.asarray(rois, jnp.float32), jnp.asarray(gt),
                                      jnp.asarray(labels), jnp.asarray(gm), 5))
  np.testing.assert_allclose(ov[:, 2], iou[:, 0], atol=1e-5)
  np.testing.assert_allclose(ov[:, 4], iou[:, 1], atol=1e-5)
  np.testing.assert_array_equal(ov[:, [0, 1, 3]], 0)


def test_detect_scores_regresses_and_masks(rng):
  r, f, d, c = 6, 3, 4, 2
  rois = np.array([[10, 10, 30, 40], [50, 50, 70, 60], [0, 0, 20, 20], [60, 5, 90, 25],
                   [10, 60, 40, 90], [11, 11, 29, 39]], np.float32)
  mask = np.array([True, True, True, True, True, False])
  outputs = {"fc7": rng.normal(size=(r, f)).astype(np.float32),
             "pool5": rng.normal(size=(r, d)).astype(np.float32),
             "logits": np.zeros((r, c + 1), np.float32)}
  stage = {"svm_w": rng.normal(size=(f, c)).astype(np.float32),
           "svm_b": rng.normal(size=c).astype(np.float32), "fc7_scale": np.float32(1.0),
           "reg_w": 0.1 * rng.normal(size=(c, d, 4)).astype(np.float32),
           "reg_b": np.zeros((c, 4), np.float32), "pool5_scale": np.float32(1.0)}
  pred = rcnn.Predict(score_threshold=-100.0, max_detections=20)
  out = jax.jit(lambda o, s: rcnn.detect(o, rois, mask, jnp.array([100, 100]), s, c, pred,
                                         True))(outputs, stage)
  scores = outputs["fc7"] @ stage["svm_w"] + stage["svm_b"]
  best = np.unravel_index(np.argmax(np.where(mask[:, None], scores, -np.inf)), scores.shape)
  assert float(out["scores"][0]) == pytest.approx(scores[best], rel=1e-5)
  assert int(out["labels"][0]) == best[1]
  # float64 reference of R-CNN's box transform (appendix C)
  dl = outputs["pool5"][best[0]].astype(np.float64) @ stage["reg_w"][best[1]]
  x1, y1, x2, y2 = rois[best[0]].astype(np.float64)
  pw, ph, px, py = x2 - x1, y2 - y1, x1 + (x2 - x1) / 2, y1 + (y2 - y1) / 2
  gx, gy, gw, gh = px + pw * dl[0], py + ph * dl[1], pw * np.exp(dl[2]), ph * np.exp(dl[3])
  ref = np.clip([gx - gw / 2, gy - gh / 2, gx + gw / 2, gy + gh / 2], 0, 100)
  np.testing.assert_allclose(np.asarray(out["boxes"][0]), ref, rtol=1e-5, atol=1e-4)
  # Without regression the boxes are the rois, no two real ones overlapping > 0.3: all 10 real
  # (box, class) pairs survive NMS (regressed boxes may come to overlap, so not checked there)...
  no_reg = rcnn.detect(outputs, rois, mask, jnp.array([100, 100]), stage, c, pred, False)
  assert int(no_reg["valid"].sum()) == 10
  # ...and the masked proposal (a near copy of roi 0) never appears
  kept = np.asarray(no_reg["boxes"])[np.asarray(no_reg["valid"])]
  assert not np.any(np.all(np.isclose(kept, rois[5]), axis=1))


def _tiny_config(**model):
  return {"num_classes": 3, "compute_dtype": "float32",
          "model": {"input_size": 16, "context": 1, "chunk": 16, "batch_rois": 16,
                    "backbone_kw": {"widths": (4, 8), "stride": 4, "fc_features": (8,),
                                    "roi_size": 2}, **model}}


def _batch(rng, b=2, p=10):
  xy = rng.uniform(0, 20, (b, p, 2))
  props = np.concatenate([xy, xy + rng.uniform(0, 10, (b, p, 2))], -1).astype(np.float32)
  props[0, 3] = [5, 5, 5, 5]                                      # degenerate proposal
  return {"image": rng.integers(0, 255, (b, 32, 32, 3), dtype=np.uint8),
          "image_size": np.array([[32, 32], [24, 30]], np.int32), "proposals": props,
          "proposal_mask": np.arange(p)[None].repeat(b, 0) < 8, "boxes": props[:, :3],
          "labels": rng.integers(0, 3, (b, 3)).astype(np.int32),
          "box_mask": np.array([[True, True, False], [False, False, False]])}


def test_system_loss_finite_gradients_and_predict_shapes(rng):
  system = rcnn.build_system(_tiny_config())
  batch = _batch(rng)
  b = batch["image"].shape[0]
  variables = system.init(jax.random.PRNGKey(0), batch)
  grads, metrics = jax.jit(jax.grad(lambda v: system.loss({"params": v}, batch,
                                                          jax.random.PRNGKey(1))[:2],
                                    has_aux=True))(variables["params"])
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree_util.tree_leaves(grads))
  assert 0 < float(metrics["rcnn/fg_fraction"]) <= 0.25 + 1e-6
  dets = system.predict(variables, batch)
  assert dets["boxes"].shape == (b, 100, 4) and dets["valid"].dtype == bool
  with pytest.raises(ValueError, match="proposals"):
    system.predict(variables, {k: v for k, v in batch.items() if k != "proposals"})


def test_finetuning_loss_is_the_configured_term(rng):
  """A function given by dotted path is the fine-tuning loss: twice the built-in's value."""
  batch, key = _batch(rng), jax.random.PRNGKey(1)
  ref = rcnn.build_system(_tiny_config())
  custom = rcnn.build_system(_tiny_config(loss={"cls": "custom_terms:doubled_class"}))
  variables = ref.init(jax.random.PRNGKey(0), batch)
  total_ref, m_ref, _ = jax.jit(ref.loss)(variables, batch, key)
  total, m, _ = jax.jit(custom.loss)(variables, batch, key)
  assert float(m_ref["loss/cls"]) > 0
  np.testing.assert_allclose(float(m["loss/cls"]), 2 * float(m_ref["loss/cls"]), rtol=1e-5)
  np.testing.assert_allclose(float(total) - float(total_ref),
                             float(m["loss/cls"]) - float(m_ref["loss/cls"]), rtol=1e-5)
  np.testing.assert_allclose(float(total_ref), float(m_ref["loss/cls"]), rtol=1e-6)


def test_settings_merge_validate_and_name_keys():
  s = rcnn.Settings.from_config(_tiny_config(svm={"C": 0.01}, loss={"cls_weight": 2}))
  assert (s.num_classes, s.svm.C, s.svm.rounds, s.loss.cls_weight) == (3, 0.01, 4, 2.0)
  with pytest.raises(ValueError, match=r"config\.model\.svm\.solver"):
    rcnn.Settings.from_config(_tiny_config(svm={"solver": "sgd"}))
  with pytest.raises(ValueError, match=r"config\.model\.predict.*nms_thresh"):
    rcnn.Settings.from_config(_tiny_config(predict={"nms_thresh": 0.3}))
  with pytest.raises(ValueError, match=r"config\.model\.loss\.cls"):
    rcnn.Settings.from_config(_tiny_config(loss={"cls": "hinge"}))
  with pytest.raises(ValueError, match=r"config\.model\.fg_fraction"):
    rcnn.Settings.from_config(_tiny_config(fg_fraction=1.5))
  with pytest.raises(ValueError, match=r"config\.num_classes"):
    rcnn.Settings.from_config({"model": {}})


def test_cpu_preset_pretrains_a_backbone_the_finetuning_network_can_take():
  from experiments import rcnn_stages
  from experiments.configs import rcnn as rcnn_config
  from jaxdet.models import backbones
  config = rcnn_config.get_config("cpu")
  assert rcnn_stages.uses_pretraining(config)
  # The classify run's Classifier and R-CNN's network share the conv and fc parameter shapes.
  pre = config.pretrain.model
  net = backbones.classifier(backbones.get_backbone(pre.backbone, **pre.backbone_kw.to_dict()),
                             config.num_classes)
  s = int(config.model.input_size)
  shapes = lambda tree: jax.tree_util.tree_map(lambda a: a.shape, tree)
  cls_params = jax.eval_shape(lambda: net.init(jax.random.PRNGKey(0), jnp.zeros((1, s, s, 3))))
  rcnn_params = jax.eval_shape(lambda: rcnn.build_system(config).init(jax.random.PRNGKey(0), {}))
  for part in ("conv", "fc"):
    assert shapes(cls_params["params"][part]) == shapes(rcnn_params["params"][part])
  # An explicit init_from replaces the pretraining stage; the paper preset has none.
  config.unlock()
  config.model.init_from = "/some/classify/run"
  assert not rcnn_stages.uses_pretraining(config)
  assert not rcnn_stages.uses_pretraining(rcnn_config.get_config("paper"))
