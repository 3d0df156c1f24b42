"""Fast R-CNN: sampling against a NumPy reference, SVD, masks, multi-scale, one train step."""

import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdet.models import fast_rcnn
from jaxdet.models import init_from
from jaxdet.train import optim, state as state_lib, step as step_lib

C = 3
STDS = (0.1, 0.1, 0.2, 0.2)
TINY = {"stride": 16, "widths": (4, 8, 8, 16), "fc_features": (32, 24), "roi_size": 3}


def _config(**model):
  base = {"backbone": "tiny", "backbone_kw": TINY, "num_classes": C, "proposals": "batch"}
  return {"model": {**base, **model}}


def _iou64(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  area = lambda x: np.clip(x[:, 2] - x[:, 0], 0, None) * np.clip(x[:, 3] - x[:, 1], 0, None)
  lt = np.maximum(a[:, None, :2], b[None, :, :2])
  rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
  inter = np.prod(np.clip(rb - lt, 0, None), -1)
  union = area(a)[:, None] + area(b)[None] - inter
  return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def _scene(rng, n_gt=3, m=5, p=40, size=64):
  """gt boxes padded to m, proposals: jittered ground truth plus random boxes, padded."""
  xy = rng.uniform(0, size * 0.5, (n_gt, 2))
  gt = np.concatenate([xy, xy + rng.uniform(12, size * 0.5, (n_gt, 2))], 1)
  gt_boxes = np.zeros((m, 4), np.float32)
  gt_boxes[:n_gt] = gt
  gt_mask = np.arange(m) < n_gt
  labels = np.full(m, -1, np.int32)
  labels[:n_gt] = rng.integers(0, C, n_gt)
  k = p // 2
  jit = gt[rng.integers(0, n_gt, k)] + rng.normal(0, 4, (k, 4))
  rxy = rng.uniform(0, size * 0.7, (p - k, 2))
  rnd = np.concatenate([rxy, rxy + rng.uniform(4, size * 0.4, (p - k, 2))], 1)
  props = np.concatenate([jit, rnd]).astype(np.float32)
  props[:, 2:] = np.maximum(props[:, 2:], props[:, :2] + 1)
  props = np.clip(props, 0, size).astype(np.float32)
  pmask = rng.random(p) < 0.9
  return gt_boxes, labels, gt_mask, props, pmask


def _batch(rng, b=2, size=64, p=40):
  scenes = [_scene(rng, n_gt=1 + i, size=size, p=p) for i in range(b)]
  stack = lambda i: np.stack([s[i] for s in scenes])   # noqa: E731
  return {"image": jnp.asarray(rng.integers(0, 256, (b, size, size, 3)), jnp.uint8),
          "image_size": jnp.full((b, 2), size, jnp.int32),
          "boxes": jnp.asarray(stack(0)), "labels": jnp.asarray(stack(1)),
          "box_mask": jnp.asarray(stack(2)), "proposals": jnp.asarray(stack(3)),
          "proposal_mask": jnp.asarray(stack(4))}


# --- sampling -----------------------------------------------------------------------------------

def test_sampling_fractions_iou_ranges_labels_and_targets(rng):
  gt, labels, gt_mask, props, pmask = _scene(rng, p=120)
  r = 32
  fn = jax.jit(lambda k: fast_rcnn.sample_rois(
      k, jnp.asarray(props), jnp.asarray(pmask), jnp.asarray(gt), jnp.asarray(labels),
      jnp.asarray(gt_mask), rois_per_image=r, fg_fraction=0.25, stds=STDS))
  cand = np.concatenate([props, gt])
  cand_mask = np.concatenate([pmask, gt_mask])
  iou = _iou64(cand, gt[gt_mask])                             # [N, G] real gt only
  best = iou.max(1)
  n_fg = int(((best >= 0.5) & cand_mask).sum())
  n_bg = int(((best >= 0.1) & (best < 0.5) & cand_mask).sum())
  seen = set()
  for seed in range(3):
    s = {k: np.asarray(v) for k, v in fn(jax.random.key(seed)).items()}
    valid, lab = s["valid"], s["labels"]
    fg = valid & (lab > 0)
    assert fg.sum() == min(n_fg, r // 4)
    assert valid.sum() == min(n_fg, r // 4) + min(n_bg, r - fg.sum())
    rois_iou = _iou64(s["rois"], gt[gt_mask])                 # [R, G]
    rbest = rois_iou.max(1)
    assert (rbest[fg] >= 0.5 - 1e-6).all()
    bg = valid & (lab == 0)
    assert ((rbest[bg] >= 0.1 - 1e-6) & (rbest[bg] < 0.5 + 1e-6)).all()
    np.testing.assert_allclose(s["iou"][valid], rbest[valid], atol=1e-5)
    # Class = the best-overlapping gt's label + 1; targets = its normalised deltas.
    match = rois_iou.argmax(1)
    np.testing.assert_array_equal(lab[fg], labels[gt_mask][match[fg]] + 1)
    g, a = gt[gt_mask][match[fg]].astype(np.float64), s["rois"][fg].astype(np.float64)
    aw, ah = a[:, 2] - a[:, 0], a[:, 3] - a[:, 1]
    gw, gh = g[:, 2] - g[:, 0], g[:, 3] - g[:, 1]
    want = np.stack([((g[:, 0] + gw / 2) - (a[:, 0] + aw / 2)) / aw,
                     ((g[:, 1] + gh / 2) - (a[:, 1] + ah / 2)) / ah,
                     np.log(gw / aw), np.log(gh / ah)], 1) / np.asarray(STDS)
    np.testing.assert_allclose(s["targets"][fg], want, rtol=1e-4, atol=1e-4)
    assert not s["targets"][~fg].any()
    # Only real candidates are drawn, each at most once.
    keys = {tuple(np.round(x, 4)) for x in s["rois"][valid]}
    assert len(keys) <= valid.sum()
    seen |= {tuple(np.round(x, 4)) for x in s["rois"][fg]}
  assert len(seen) > min(n_fg, r // 4) or n_fg <= r // 4   # different draws per key


# --- system: one train step, finite gradients, frozen layers, loss swap by config ---------------

def _one_step(config, batch):
  system = fast_rcnn.build_system(config)
  variables = system.init(jax.random.key(0), batch)
  tx, _ = optim.make_optimizer({"name": "sgd", "learning_rate": 0.01, "momentum": 0.9,
                             "weight_decay": 5e-4, "schedule": "constant"}, 10,
                            param_labels=system.param_labels)
  st, _ = state_lib.create_train_state(system, tx, jax.random.key(0), batch)
  step = jax.jit(step_lib.make_steps(system)[0])
  new, metrics = step(st, batch, jax.random.key(1))
  return system, variables, st, new, metrics


def test_one_train_step_degenerate_inputs_frozen_layers_and_loss_swap(rng, tmp_path,
                                                                     monkeypatch):
  pkg = tmp_path / "myfrcn"
  pkg.mkdir()
  (pkg / "__init__.py").write_text("")
  (pkg / "losses.py").write_text(textwrap.dedent("""
      import jax.numpy as jnp
      CALLS = []

      def half_l2(predictions, targets, mask, *, decode):
        CALLS.append(predictions.shape)
        return jnp.where(mask, 0.5 * jnp.sum((predictions - targets) ** 2, -1), 0.0)
  """))
  monkeypatch.syspath_prepend(str(tmp_path))
  batch = _batch(rng)
  # Degenerate inputs: an image without objects, zero-area and out-of-image proposals.
  batch["box_mask"] = batch["box_mask"].at[0].set(False)
  batch["proposals"] = batch["proposals"].at[1, :3].set(
      jnp.asarray([[5, 5, 5, 5], [70, 70, 90, 90], [30, 10, 20, 40]], jnp.float32))
  # Frozen layers must be loaded from somewhere: a stand-in classify run's conv + fc.
  source = fast_rcnn.build_system(_config()).init(jax.random.key(5), batch)["params"]
  monkeypatch.setattr(init_from, "read_params", lambda workdir, step=None: (source, {}))
  config = _config(frozen=("conv1",), init_from="RUN",
                   loss={"box": "myfrcn.losses:half_l2", "box_weight": 1.0})
  system, _, st, new, metrics = _one_step(config, batch)
  import myfrcn.losses
  assert myfrcn.losses.CALLS, "the configured box loss was not used"
  assert np.isfinite(float(metrics["loss"])) and np.isfinite(float(metrics["grad_norm"]))
  assert float(metrics["grad_norm"]) > 0
  np.testing.assert_allclose(float(metrics["loss"]),
                             float(metrics["loss/cls"]) + float(metrics["loss/box"]), rtol=1e-5)
  for leaf in jax.tree_util.tree_leaves(new.params):
    assert np.isfinite(np.asarray(leaf)).all()
  old_c, new_c = st.params["conv"], new.params["conv"]
  np.testing.assert_array_equal(old_c["conv1"]["kernel"], new_c["conv1"]["kernel"])
  assert np.abs(np.asarray(old_c["conv2"]["kernel"] - new_c["conv2"]["kernel"])).max() > 0
  assert np.abs(np.asarray(st.params["bbox_pred"]["kernel"]
                           - new.params["bbox_pred"]["kernel"])).max() > 0
  # The swapped loss is what the System computes: value equals half L2 on the same sample.
  _, m2, _ = system.loss({"params": st.params}, batch, step_lib.step_rng(
      jax.random.key(1), st.step))
  np.testing.assert_allclose(float(m2["loss/box"]), float(metrics["loss/box"]), rtol=1e-5)
  with pytest.raises(ValueError, match="unknown conv layers"):
    fast_rcnn.build_system(_config(frozen=("conv9",), init_from="RUN")).param_labels(st.params)
  with pytest.raises(ValueError, match=r"config.model.sampler: unknown keys \['rois'\]"):
    fast_rcnn.build_system(_config(sampler={"rois": 3}))
  with pytest.raises(ValueError, match="config.model.proposals: expected 'batch' or 'grid'"):
    fast_rcnn.build_system(_config(proposals="ss"))
  with pytest.raises(ValueError, match="config.model.sampler: expected 0 <= bg_iou_low"):
    fast_rcnn.build_system(_config(sampler={"bg_iou_low": 0.6}))


# --- inference: masked vs sliced proposals, SVD, multi-scale ------------------------------------

@pytest.fixture(scope="module")
def trained_like():
  """A system and variables with non-trivial heads (random, larger than at init)."""
  rng = np.random.default_rng(0)
  batch = _batch(rng, b=1, p=24)
  system = fast_rcnn.build_system(_config())
  variables = system.init(jax.random.key(0), batch)
  params = jax.tree_util.tree_map(lambda x: x, variables["params"])
  for name in ("cls_score", "bbox_pred"):
    k = params[name]["kernel"]
    params[name] = {**params[name], "kernel": jnp.asarray(
        rng.normal(0, 0.3, k.shape), jnp.float32)}
  return system, {**variables, "params": params}, batch


def test_masked_proposals_equal_sliced(trained_like):
  system, variables, batch = trained_like
  score = jax.jit(system.extras.score_proposals)
  m = np.asarray(batch["proposal_mask"][0])
  s_full, b_full, _ = score(variables, batch)
  sliced = {**batch, "proposals": batch["proposals"][:, m],
            "proposal_mask": batch["proposal_mask"][:, m]}
  s_cut, b_cut, _ = score(variables, sliced)
  np.testing.assert_allclose(np.asarray(s_full)[0, m], np.asarray(s_cut)[0], rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_allclose(np.asarray(b_full)[0, m], np.asarray(b_cut)[0], rtol=1e-5,
                             atol=1e-4)
  # Scores are distributions; boxes stay inside the image.
  np.testing.assert_allclose(np.asarray(s_full).sum(-1), 1.0, rtol=1e-5)
  assert (np.asarray(b_full) >= 0).all() and (np.asarray(b_full) <= 64).all()
  # Detections: padded proposals never appear (their boxes are not among the real ones').
  dets_full = jax.jit(system.predict)(variables, batch)
  real = np.asarray(b_cut)[0].reshape(-1, 4)
  got = np.asarray(dets_full["boxes"])[0][np.asarray(dets_full["valid"])[0]]
  assert all(np.abs(real - g).sum(1).min() < 1e-3 for g in got)
  assert dets_full["valid"].shape == (1, 100) and bool(dets_full["valid"].any())
  assert int(np.asarray(dets_full["labels"]).max()) < C


def test_truncated_svd_approximates_fc_and_is_exact_at_full_rank(trained_like, rng):
  system, variables, batch = trained_like
  net = system.extras.network
  fc = variables["params"]["fc"]
  pooled = jnp.asarray(rng.normal(size=(20, 3, 3, 16)), jnp.float32)
  want = net.apply(variables, pooled, method=type(net).head)       # the module's fc + heads
  full = fast_rcnn.truncated_svd(variables, (32, 24))               # min(in, out) for both
  got = system.extras.head(full, pooled)
  for a, b in zip(got, want):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
  # Rank t: u @ v is the best rank-t approximation of the kernel (Eckart-Young, float64 SVD).
  t = (5, 3)
  low = fast_rcnn.truncated_svd(variables, t)["params"]["fc"]
  for (name, rank) in zip(("fc6", "fc7"), t):
    k = np.asarray(fc[name]["kernel"], np.float64)
    u, s, vt = np.linalg.svd(k, full_matrices=False)
    best = (u[:, :rank] * s[:rank]) @ vt[:rank]
    prod = np.asarray(low[name]["u"], np.float64) @ np.asarray(low[name]["v"], np.float64)
    np.testing.assert_allclose(prod, best, atol=1e-4)
    assert low[name]["u"].shape == (k.shape[0], rank) and low[name]["v"].shape == (rank,
                                                                                    k.shape[1])
  # The fc output error shrinks as the rank grows.
  ref = fast_rcnn.factored_fc(fc, pooled)
  errs = [float(jnp.abs(fast_rcnn.factored_fc(
      fast_rcnn.truncated_svd(variables, r)["params"]["fc"], pooled) - ref).mean())
      for r in ((2, 2), (8, 8), (32, 24))]
  assert errs[0] > errs[1] > errs[2] and errs[2] < 1e-5
  # score_proposals (and so predict) runs factored params through the same `head`.
  s_svd, _, _ = system.extras.score_proposals(full, batch)
  s_ref, _, _ = system.extras.score_proposals(variables, batch)
  np.testing.assert_allclose(np.asarray(s_svd), np.asarray(s_ref), rtol=1e-4, atol=1e-5)
  with pytest.raises(ValueError, match="rank 99 of fc6"):
    fast_rcnn.truncated_svd(variables, (99,))


def test_multiscale_reduces_to_single_scale_when_every_roi_picks_scale_one(trained_like):
  system, variables, batch = trained_like
  ms = fast_rcnn.build_system(_config(test_scales=(1.0, 1.5), ms_target_size=0.0))
  s1, b1, _ = system.extras.score_proposals(variables, batch)
  s2, b2, _ = ms.extras.score_proposals(variables, batch)
  np.testing.assert_allclose(np.asarray(s2), np.asarray(s1), rtol=1e-5, atol=1e-6)
  # A huge target sends every RoI to the 1.5x level: results change.
  big = fast_rcnn.build_system(_config(test_scales=(1.0, 1.5), ms_target_size=1e6))
  s3, _, _ = big.extras.score_proposals(variables, batch)
  assert np.abs(np.asarray(s3) - np.asarray(s1)).max() > 1e-4


def test_grid_proposals_cover_the_image_and_respect_image_size():
  boxes, mask = fast_rcnn.grid_proposals(jnp.asarray([40, 64]), (64, 64), scales=(16.0,),
                                         ratios=(1.0,), stride=16)
  boxes, mask = np.asarray(boxes), np.asarray(mask)
  assert boxes.shape == (16, 4)
  assert (boxes[:, [0, 2]] <= 64).all() and (boxes[:, [1, 3]] <= 40).all()
  centres_y = (np.arange(4) + 0.5) * 16
  np.testing.assert_array_equal(mask.reshape(4, 4), np.repeat(centres_y < 40, 4).reshape(4, 4))
  with pytest.raises(ValueError, match="proposals"):
    fast_rcnn.build_system(_config()).loss(
        {}, {"image": jnp.zeros((1, 32, 32, 3), jnp.uint8),
             "image_size": jnp.full((1, 2), 32)}, jax.random.key(0))


# --- loss terms by config ---------------------------------------------------------------------

# term -> the user-style term of tests/custom_terms.py that is twice its default.
DOUBLED = {"cls": "custom_terms:doubled_class", "box": "custom_terms:doubled_box"}


@pytest.fixture(scope="module")
def default_loss():
  """The default system's loss on one batch: (batch, variables, key, total, metrics)."""
  batch = _batch(np.random.default_rng(1), b=2, p=24)
  system = fast_rcnn.build_system(_config())
  variables = system.init(jax.random.key(0), batch)
  key = jax.random.key(3)
  total, metrics, _ = jax.jit(system.loss)(variables, batch, key)
  return batch, variables, key, total, metrics


@pytest.mark.parametrize("term", sorted(DOUBLED))
def test_a_term_given_by_dotted_path_is_the_one_trained_with(default_loss, term):
  import custom_terms
  batch, variables, key, want_total, want = default_loss
  system = fast_rcnn.build_system(_config(loss={term: DOUBLED[term]}))
  custom_terms.assert_doubled(lambda: jax.jit(system.loss)(variables, batch, key), term,
                              DOUBLED[term], want_total, want, ("cls", "box"))


@pytest.mark.parametrize("term", sorted(DOUBLED))
@pytest.mark.parametrize("spec,error", [("no_such_loss", "unknown"),
                                        ("custom_terms:no_such_fn", "no function"),
                                        ("no_such_pkg.mod:fn", "cannot import")])
def test_an_unknown_term_fails_at_build_naming_the_key(term, spec, error):
  with pytest.raises(ValueError, match=rf"config\.model\.loss\.{term}: .*{error}"):
    fast_rcnn.build_system(_config(loss={term: spec}))
