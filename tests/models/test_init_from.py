"""jaxdet.models.init_from: a detector's backbone taken from a finished classify run's checkpoint."""

import jax
import numpy as np
import optax
import pytest

from jaxdet.models import classify, rcnn
from jaxdet.models import init_from
from jaxdet.train.checkpoint import Checkpoints
from jaxdet.train.state import create_train_state

BACKBONE_KW = {"widths": (4, 8), "stride": 4, "fc_features": (8, 8), "roi_size": 2}


def _classify_run(tmp_path, rng):
  """A classify 'run' whose checkpoint holds random (non-initial) parameters."""
  config = {"model": {"backbone": "tiny", "backbone_kw": BACKBONE_KW, "input_size": 16},
            "num_classes": 3}
  system = classify.build_system(config)
  state, key = create_train_state(system, optax.sgd(0.1), jax.random.PRNGKey(0), {})
  params = jax.tree_util.tree_map(
      lambda p: rng.normal(size=p.shape).astype(np.float32), state.params)
  state = state.replace(params=params)
  ckpt = Checkpoints(str(tmp_path / "checkpoints"), {"system": "classify",
                                                     "model": config["model"]})
  ckpt.save(state, key, {})
  ckpt.wait()
  ckpt.close()
  return params


def _rcnn(widths, workdir):
  kw = {**BACKBONE_KW, "widths": widths}
  return rcnn.build_system({"model": {"backbone": "tiny", "backbone_kw": kw, "input_size": 16,
                                      "init_from": workdir}, "num_classes": 3})


def test_rcnn_init_takes_conv_and_fc_from_the_run(tmp_path, rng):
  saved = _classify_run(tmp_path, rng)
  key = jax.random.PRNGKey(1)
  fresh = _rcnn((4, 8), "").init(key, {})["params"]
  loaded = _rcnn((4, 8), str(tmp_path)).init(key, {})["params"]
  for part in ("conv", "fc"):
    for path, leaf in jax.tree_util.tree_flatten_with_path(loaded[part])[0]:
      want = dict(jax.tree_util.tree_flatten_with_path(saved[part])[0])[path]
      np.testing.assert_array_equal(np.asarray(leaf), want)
      assert np.asarray(leaf).dtype == np.float32
  # The detector's own classifier keeps its fresh initialisation.
  np.testing.assert_array_equal(np.asarray(loaded["cls"]["kernel"]),
                                np.asarray(fresh["cls"]["kernel"]))
  assert set(loaded) == set(fresh)


def test_mismatched_backbone_is_an_error(tmp_path, rng):
  _classify_run(tmp_path, rng)
  with pytest.raises(ValueError, match=r"conv.*conv2.*shape .*classify"):
    _rcnn((4, 16), str(tmp_path)).init(jax.random.PRNGKey(0), {})


def test_missing_run_and_missing_part_are_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="no checkpoints"):
    init_from.read_params(str(tmp_path / "nowhere"))
  params = {"conv": {"w": np.zeros(2)}, "fc": {"w": np.zeros(2)}}
  with pytest.raises(ValueError, match="source has no parameters 'fc'"):
    init_from.copy_subtrees(params, {"conv": {"w": np.ones(2)}})
  with pytest.raises(ValueError, match=r"conv\['v'\] is missing in the network"):
    init_from.copy_subtrees(params, {"conv": {"w": np.ones(2), "v": np.ones(2)},
                                     "fc": {"w": np.ones(2)}})


def test_fast_rcnn_init_takes_conv_and_fc_from_the_run(tmp_path, rng):
  """Fast R-CNN (and Faster R-CNN, through the same fast_rcnn.load_backbone_weights) start from
  the classify run's conv and fc; their heads keep the fresh initialisation."""
  from jaxdet.models import fast_rcnn
  saved = _classify_run(tmp_path, rng)
  batch = {"image": np.zeros((1, 16, 16, 3), np.uint8)}

  def build(workdir):
    return fast_rcnn.build_system({"num_classes": 3, "model": {
        "backbone": "tiny", "backbone_kw": BACKBONE_KW, "proposals": "grid",
        "init_from": workdir}})

  key = jax.random.PRNGKey(1)
  fresh = build("").init(key, batch)["params"]
  loaded = build(str(tmp_path)).init(key, batch)["params"]
  for part in ("conv", "fc"):
    want = dict(jax.tree_util.tree_flatten_with_path(saved[part])[0])
    for path, leaf in jax.tree_util.tree_flatten_with_path(loaded[part])[0]:
      np.testing.assert_array_equal(np.asarray(leaf), want[path])
  others = set(fresh) - {"conv", "fc"}
  assert others and set(loaded) == set(fresh)
  for name in others:
    jax.tree_util.tree_map(np.testing.assert_array_equal, loaded[name], fresh[name])
