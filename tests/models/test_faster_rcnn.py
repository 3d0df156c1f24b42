"""Faster R-CNN: one jitted train step (one compile for any number of objects, finite on empty
images), detections, the stages of the 4-step alternating training, no gradient through
proposals."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from jaxdet.models import fast_rcnn, faster_rcnn
from jaxdet.train import alternating, optim, state as state_lib, step as step_lib

SMALL = {
    "num_classes": 3, "backbone": "tiny",
    "backbone_kw": {"stride": 8, "widths": (8, 8, 16), "fc_features": (32,), "roi_size": 2},
    "dropout_rate": 0.0, "rpn_channels": 16, "anchor_scales": (16.0, 32.0),
    "anchor_ratios": (1.0,),
    "rpn_targets": {"num_samples": 32},
    "rpn_proposals": {"train": {"pre_nms_topk": 64, "post_nms_topk": 16, "min_size": 2.0},
                      "test": {"pre_nms_topk": 64, "post_nms_topk": 8, "min_size": 2.0}},
    "sampler": {"rois_per_image": 8},
    "predict": {"max_detections": 5},
}


def _config(**model):
  return {"model": {**SMALL, **model}, "compute_dtype": "float32"}


def _batch(rng, real_per_image, size=32, m=4):
  b = len(real_per_image)
  boxes = np.zeros((b, m, 4), np.float32)
  mask = np.zeros((b, m), bool)
  for i, real in enumerate(real_per_image):
    xy = rng.uniform(0, size - 14, size=(real, 2))
    boxes[i, :real] = np.concatenate([xy, xy + rng.uniform(6, 14, size=(real, 2))], 1)
    mask[i, :real] = True
  return {"image": rng.integers(0, 256, size=(b, size, size, 3), dtype=np.uint8),
          "image_size": np.full((b, 2), size, np.int32),
          "boxes": boxes, "labels": rng.integers(0, 3, size=(b, m)).astype(np.int32),
          "box_mask": mask}


def test_joint_train_step_compiles_once_and_predicts(rng):
  system = faster_rcnn.build_system(_config())
  tx, _ = optim.make_optimizer({"name": "sgd", "learning_rate": 0.01}, 10,
                               param_labels=system.param_labels)
  first = _batch(rng, [2, 1])
  state, key = state_lib.create_train_state(system, tx, jax.random.PRNGKey(0), first)
  traces = []

  def counted(state, batch, key):
    traces.append(1)
    return step_lib.train_step(state, batch, key, loss_fn=system.loss)

  step = jax.jit(counted)
  before = state.params
  for counts in ([2, 1], [0, 0], [4, 3]):          # includes images without objects
    state, metrics = step(state, _batch(rng, counts), key)
    values = {k: float(v) for k, v in metrics.items()}
    assert all(np.isfinite(v) for v in values.values()), values
    assert {"loss/rpn_objectness", "loss/rpn_box", "loss/cls", "loss/box"} <= set(values)
    terms = sum(values[k] for k in ("loss/rpn_objectness", "loss/rpn_box", "loss/cls",
                                    "loss/box"))
    np.testing.assert_allclose(values["loss"], terms, rtol=1e-5)
  assert len(traces) == 1
  assert int(state.step) == 3
  moved = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))), before,
                       state.params)
  assert moved["rpn"]["conv"]["kernel"] and moved["conv"]["conv1"]["kernel"]
  assert moved["cls_score"]["kernel"]
  det = jax.jit(system.predict)(state.variables, first)
  assert det["boxes"].shape == (2, 5, 4) and det["labels"].shape == (2, 5)
  assert np.all(np.asarray(det["labels"])[np.asarray(det["valid"])] < 3)


def test_alternating_stages_train_the_paper_parts_and_chain_params(rng):
  batch = _batch(rng, [1])
  labels = {}
  params = {}
  for stage in faster_rcnn.STAGES[1:]:
    init = alternating.stage_init(stage, params)
    system = faster_rcnn.build_system(_config(stage=stage), init_params=init)
    variables = system.init(jax.random.PRNGKey(len(params)), batch)
    params[stage] = variables["params"]
    flat = traverse_util.flatten_dict(system.param_labels(variables["params"]))
    labels[stage] = {k[0] for k, v in flat.items() if v == "train"}
  assert labels["1_rpn"] == {"conv", "rpn"}
  assert labels["2_fast_rcnn"] == {"conv", "fc", "cls_score", "bbox_pred"}
  assert labels["3_rpn"] == {"rpn"}
  assert labels["4_fast_rcnn"] == {"fc", "cls_score", "bbox_pred"}
  same = lambda a, b: all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a),   # noqa
                                                                 jax.tree.leaves(b)))
  # Step 2 draws proposals from the step-1 network; step 3 shares the step-2 conv layers and
  # starts from the step-1 RPN; step 4 starts from step 3.
  assert same(params["2_fast_rcnn"]["proposal_conv"], params["1_rpn"]["conv"])
  assert same(params["2_fast_rcnn"]["proposal_rpn"], params["1_rpn"]["rpn"])
  assert same(params["3_rpn"]["conv"], params["2_fast_rcnn"]["conv"])
  assert same(params["3_rpn"]["rpn"], params["1_rpn"]["rpn"])
  assert same(params["4_fast_rcnn"], params["3_rpn"])
  # Step 4's loss (Fast R-CNN on RPN proposals) sends no gradient to the RPN through the
  # proposal coordinates (as approximate joint training), and finite ones elsewhere.
  grads = jax.jit(jax.grad(lambda p: system.loss({"params": p}, batch,
                                                 jax.random.PRNGKey(2))[0]))(params[stage])
  flat = traverse_util.flatten_dict(grads)
  assert all(np.all(np.asarray(g) == 0) for k, g in flat.items() if k[0] == "rpn")
  assert all(np.all(np.isfinite(np.asarray(g))) for g in flat.values())
  assert any(np.any(np.asarray(g) != 0) for k, g in flat.items() if k[0] == "fc")


def test_config_errors_name_the_key():
  with pytest.raises(ValueError, match="stage"):
    faster_rcnn.build_system(_config(stage="5_rpn"))
  with pytest.raises(ValueError, match="rpn_chanels"):
    faster_rcnn.build_system(_config(rpn_chanels=3))
  with pytest.raises(ValueError, match=r"config.model.rpn_targets: expected 0 <= neg_iou"):
    faster_rcnn.build_system(_config(rpn_targets={"neg_iou": 0.8}))
  with pytest.raises(TypeError, match=r"config.model.rpn_proposals.test.post_nms_topk"):
    faster_rcnn.build_system(_config(rpn_proposals={"test": {"post_nms_topk": 2.5}}))


def test_settings_compose_the_fast_rcnn_sections_with_their_own_defaults():
  s = faster_rcnn.Settings.from_config(_config(sampler={"fg_fraction": 0.5},
                                               rpn_proposals={"test": {"min_size": 1.0}}))
  assert isinstance(s.sampler, fast_rcnn.Sampler) and isinstance(s.predict, fast_rcnn.Predict)
  assert isinstance(s.loss, fast_rcnn.Loss)
  # Faster R-CNN's sampler keeps its 128 RoIs when another key is given (paper: 2 x 128) ...
  assert faster_rcnn.Settings.from_config({"model": {"sampler": {"fg_fraction": 0.5}}}
                                          ).sampler.rois_per_image == 128
  assert s.sampler.fg_fraction == 0.5 and s.sampler.rois_per_image == 128
  # ... and the test proposal layer its own (6000 -> 300).
  t = faster_rcnn.Settings.from_config({"model": {"rpn_proposals": {"test": {"min_size": 1.0}}}})
  assert (t.rpn_proposals.test.pre_nms_topk, t.rpn_proposals.test.post_nms_topk,
          t.rpn_proposals.train.post_nms_topk) == (6000, 300, 2000)


def test_alternating_schedule_config():
  # "alternating" names the 4-step schedule: it is valid config, not a network.
  cfg = faster_rcnn.Settings.from_config(_config(stage="alternating",
                                                 alternating_steps=(4, 3, 2, 1)))
  assert cfg.alternating_steps == (4, 3, 2, 1)
  with pytest.raises(ValueError, match="alternating.*not one network"):
    faster_rcnn.build_system(_config(stage="alternating"))
  with pytest.raises(ValueError, match="alternating_steps.*got \\(4, 3\\)"):
    faster_rcnn.Settings.from_config(_config(alternating_steps=(4, 3)))
  with pytest.raises(ValueError, match="alternating_steps"):
    faster_rcnn.Settings.from_config(_config(alternating_steps=(4, 3, 0, 1)))
  import ml_collections
  config = ml_collections.ConfigDict(_config(stage="alternating", alternating_steps=(4, 3, 2, 1)))
  final, workdir = alternating.detector_run(config, "/w")
  assert (final.model.stage, tuple(final.model.alternating_steps)) == ("4_fast_rcnn", ())
  assert workdir == "/w/4_fast_rcnn" and config.model.stage == "alternating"
  joint = ml_collections.ConfigDict(_config())
  assert alternating.detector_run(joint, "/w") == (joint, "/w")


def test_train_alternating_runs_each_step_for_its_steps(monkeypatch, tmp_path, rng):
  """The driver: each step in its own folder for its own number of steps, the schedule scaled,
  params chained from step to step; a second call trains nothing and restores each step."""
  import json
  import os
  import types
  import ml_collections
  from jaxdet.train import loop, setup
  trained, restored = [], []

  def params_of(system):
    return system.init(jax.random.PRNGKey(0), _batch(rng, [1]))["params"]

  def fake_train(cfg, workdir, *, system, make_loader):
    trained.append((cfg.model.stage, int(cfg.train.num_steps),
                    tuple(cfg.optimizer.decay_steps), int(cfg.optimizer.warmup_steps),
                    tuple(cfg.model.alternating_steps)))
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "eval.json"), "w") as f:
      json.dump({"step": int(cfg.train.num_steps), "voc07_map": 0.5}, f)
    return types.SimpleNamespace(params=params_of(system))

  def fake_restore(cfg, workdir, system, batch):
    restored.append(cfg.model.stage)
    return types.SimpleNamespace(params=params_of(system))

  monkeypatch.setattr(loop, "train_and_evaluate", fake_train)
  monkeypatch.setattr(loop, "restore_for_inference", fake_restore)
  monkeypatch.setattr(setup, "peek", lambda loader: None)
  config = ml_collections.ConfigDict({
      "model": {**SMALL, "stage": "alternating", "alternating_steps": (40, 20, 40, 20)},
      "compute_dtype": "float32", "seed": 0, "data": {},
      "train": {"num_steps": 80, "batch_size": 2},
      "optimizer": {"decay_steps": (60,), "warmup_steps": 8}})
  loader = lambda *a, **k: None   # noqa: E731
  results = alternating.train_alternating(config, str(tmp_path), make_loader=loader)
  assert trained == [("1_rpn", 40, (30,), 4, ()), ("2_fast_rcnn", 20, (15,), 2, ()),
                     ("3_rpn", 40, (30,), 4, ()), ("4_fast_rcnn", 20, (15,), 2, ())]
  assert list(results) == list(faster_rcnn.STAGES[1:])
  assert sorted(os.listdir(tmp_path)) == sorted(faster_rcnn.STAGES[1:])
  again = alternating.train_alternating(config, str(tmp_path), make_loader=loader)
  assert len(trained) == 4 and restored == list(faster_rcnn.STAGES[1:])
  assert again == results


# --- loss terms by config ---------------------------------------------------------------------

# term -> the user-style term of tests/custom_terms.py that is twice its default.
DOUBLED = {"cls": "custom_terms:doubled_class", "box": "custom_terms:doubled_box",
           "rpn_objectness": "custom_terms:doubled_binary",
           "rpn_box": "custom_terms:doubled_box"}
# rpn_box's default is smooth L1 with beta 1/9, doubled_box is twice beta 1: compared with the
# system trained with "smooth_l1" there.
BUILT_IN = {"rpn_box": "smooth_l1"}


@pytest.fixture(scope="module")
def joint_batch():
  """A batch, variables with heads far from their (near-zero) initialisation, a key."""
  rng = np.random.default_rng(1)
  batch = _batch(rng, [2, 1])
  system = faster_rcnn.build_system(_config())
  variables = system.init(jax.random.PRNGKey(0), batch)
  flat = traverse_util.flatten_dict(variables["params"])
  for k in flat:
    if k[0] in ("bbox_pred", "rpn") and k[-1] == "kernel":
      flat[k] = jnp.asarray(rng.normal(0, 0.3, flat[k].shape), jnp.float32)
  variables = {**variables, "params": traverse_util.unflatten_dict(flat)}
  key = jax.random.PRNGKey(3)
  cache = {}

  def built_in(term):
    """(total, metrics) of the system trained with the built-in `term` doubles (one compile
    for all the terms whose built-in is the default)."""
    loss = {term: BUILT_IN[term]} if term in BUILT_IN else {}
    name = str(sorted(loss.items()))
    if name not in cache:
      cache[name] = jax.jit(faster_rcnn.build_system(_config(loss=loss)).loss)(
          variables, batch, key)[:2]
    return cache[name]
  return batch, variables, key, built_in


@pytest.mark.parametrize("term", sorted(DOUBLED))
def test_a_term_given_by_dotted_path_is_the_one_trained_with(joint_batch, term):
  import custom_terms
  batch, variables, key, built_in = joint_batch
  want_total, want = built_in(term)
  system = faster_rcnn.build_system(_config(loss={term: DOUBLED[term]}))
  custom_terms.assert_doubled(lambda: jax.jit(system.loss)(variables, batch, key), term,
                              DOUBLED[term], want_total, want, sorted(DOUBLED))


@pytest.mark.parametrize("term", sorted(DOUBLED))
@pytest.mark.parametrize("spec,error", [("no_such_loss", "unknown"),
                                        ("custom_terms:no_such_fn", "no function")])
def test_an_unknown_term_fails_at_build_naming_the_key(term, spec, error):
  with pytest.raises(ValueError, match=rf"config\.model\.loss\.{term}: .*{error}"):
    faster_rcnn.build_system(_config(loss={term: spec}))
  with pytest.raises(ValueError, match=rf"config\.model\.loss\.{term}_weight"):
    faster_rcnn.build_system(_config(loss={f"{term}_weight": -1.0}))
