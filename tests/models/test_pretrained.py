"""Every detector starts from ImageNet weights given as a local torchvision state dict
(`config.model.pretrained`), or from a classify run (`config.model.init_from`; YOLO's own 20
layers). The state dicts here are random arrays under torchvision's key names and layouts
(torch is not needed: saved as .npz), for narrow nets of the same layout; the check is
independent of jaxdet.models.torch_weights: conv kernels are torch's (O, I, kH, kW) transposed,
and fc6 applied to a feature map equals torch's fc6 on the same map flattened in (C, H, W) order.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdet.models import backbones
from jaxdet.systems import build_system
from jaxdet.models import init_from

# Narrow nets with torchvision's layouts (backbone_kw of the configs below).
VGG_KW = {"stages": ((4, 4), (8, 8), (8, 8, 8), (8, 8, 8), (8, 8, 8)),
          "fc_features": (16, 16)}
ALEX_KW = {"convs": ((8, 11, 4, 2, (3, 2, 0)), (12, 5, 1, 2, (3, 2, 0)), (16, 3, 1, 1, None),
                     (12, 3, 1, 1, None), (12, 3, 1, 1, None)),
           "fc_features": (16, 16)}
# torchvision's module indices: vgg16 features (cfg "D") and classifier; alexnet likewise.
VGG_CONVS = {"conv1_1": 0, "conv1_2": 2, "conv2_1": 5, "conv2_2": 7, "conv3_1": 10,
             "conv3_2": 12, "conv3_3": 14, "conv4_1": 17, "conv4_2": 19, "conv4_3": 21,
             "conv5_1": 24, "conv5_2": 26, "conv5_3": 28}
VGG_FC = {"fc6": 0, "fc7": 3, "head": 6}
ALEX_CONVS = {"conv1": 0, "conv2": 3, "conv3": 6, "conv4": 8, "conv5": 10}
ALEX_FC = {"fc6": 1, "fc7": 4, "head": 6}


def _state_dict(rng, convs, fcs, pool, classes):
  """A torchvision-format state dict of random weights: convs [(features index, out
  channels, kernel side)], the classifier indices of the 3 fc layers (widths 16, 16, classes)
  and the side of the last pooled map; returns (state dict, its (C, H, W))."""
  sd, cin = {}, 3
  for i, w, k in convs:
    sd[f"features.{i}.weight"] = rng.normal(size=(w, cin, k, k)).astype(np.float32) * 0.1
    sd[f"features.{i}.bias"] = rng.normal(size=(w,)).astype(np.float32)
    cin = w
  dims = [cin * pool * pool, 16, 16, classes]
  for i, (a, b) in zip(fcs, zip(dims[:-1], dims[1:])):
    sd[f"classifier.{i}.weight"] = rng.normal(size=(b, a)).astype(np.float32) * 0.1
    sd[f"classifier.{i}.bias"] = rng.normal(size=(b,)).astype(np.float32)
  return sd, (cin, pool, pool)


def _vgg_state_dict(rng, classes=10):
  widths = [w for stage in VGG_KW["stages"] for w in stage]
  convs = [(i, w, 3) for i, w in zip(VGG_CONVS.values(), widths)]
  return _state_dict(rng, convs, VGG_FC.values(), 7, classes)


def _alexnet_state_dict(rng, classes=10):
  convs = [(i, spec[0], spec[1]) for i, spec in zip(ALEX_CONVS.values(), ALEX_KW["convs"])]
  return _state_dict(rng, convs, ALEX_FC.values(), 6, classes)


def _check_loaded(params, sd, convs, fc, chw, rng):
  for name, i in convs.items():
    w = sd[f"features.{i}.weight"]
    np.testing.assert_array_equal(params["conv"][name]["kernel"], w.transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(params["conv"][name]["bias"], sd[f"features.{i}.bias"])
  c, h, w = chw
  x = rng.normal(size=(c, h, w)).astype(np.float32)
  torch_fc6 = sd[f"classifier.{fc['fc6']}.weight"] @ x.reshape(-1)
  ours = x.transpose(1, 2, 0).reshape(-1) @ np.asarray(params["fc"]["fc6"]["kernel"])
  np.testing.assert_allclose(ours, torch_fc6, rtol=1e-4, atol=1e-4)
  np.testing.assert_array_equal(params["fc"]["fc7"]["kernel"],
                                sd[f"classifier.{fc['fc7']}.weight"].T)


def _save(tmp_path, sd, name):
  path = tmp_path / f"{name}.npz"
  np.savez(path, **sd)
  return str(path)


def _batch(h, w, b=1, boxes=4, proposals=None):
  batch = {"image": jnp.zeros((b, h, w, 3), jnp.uint8),
           "image_size": jnp.tile(jnp.int32([[h, w]]), (b, 1)),
           "boxes": jnp.tile(jnp.float32([[4, 4, w / 2, h / 2]]), (b, boxes, 1)),
           "labels": jnp.zeros((b, boxes), jnp.int32),
           "box_mask": jnp.ones((b, boxes), bool)}
  if proposals:
    batch["proposals"] = jnp.tile(jnp.float32([[2, 2, w / 2, h / 2]]), (b, proposals, 1))
    batch["proposal_mask"] = jnp.ones((b, proposals), bool)
  return batch


def _config(system, model, num_classes=3):
  return {"system": system, "num_classes": num_classes, "compute_dtype": "float32",
          "model": model}


CASES = {
    # system: (backbone, model overrides, image H, W)
    "localization": ("vgg16", {"box_fc_features": (8,)}, 224, 224),
    "overfeat": ("alexnet", {}, 224, 224),   # windows: the same init (models.overfeat.build)
    "rcnn": ("vgg16", {"input_size": 224, "context": 16}, 224, 224),
    "fast_rcnn": ("vgg16", {"frozen": ("conv1_1", "conv1_2")}, 224, 224),
    "faster_rcnn": ("vgg16", {"frozen": ("conv1_1",), "rpn_channels": 8,
                              "anchor_scales": (32.0, 64.0)}, 224, 224),
}


@pytest.mark.parametrize("system", sorted(CASES))
def test_every_detector_starts_from_torchvision_weights(system, tmp_path, rng):
  backbone, extra, h, w = CASES[system]
  kw, make_sd, convs, fc = ((VGG_KW, _vgg_state_dict, VGG_CONVS, VGG_FC) if backbone == "vgg16"
                            else (ALEX_KW, _alexnet_state_dict, ALEX_CONVS, ALEX_FC))
  sd, chw = make_sd(rng)
  model = {"backbone": backbone, "backbone_kw": kw, "pretrained": _save(tmp_path, sd, backbone),
           **extra}
  sys_ = build_system(system, _config(system, model))
  variables = sys_.init(jax.random.PRNGKey(0), _batch(h, w, proposals=8))
  _check_loaded(variables["params"], sd, convs, fc, chw, rng)
  # Another seed changes the detector's own layers only: the backbone is the file's.
  other = sys_.init(jax.random.PRNGKey(1), _batch(h, w, proposals=8))["params"]
  own = [k for k in variables["params"] if k not in ("conv", "fc")]
  assert own and any(not np.allclose(a, b) for k in own for a, b in zip(
      jax.tree_util.tree_leaves(variables["params"][k]), jax.tree_util.tree_leaves(other[k])))


def test_pretrained_file_of_another_shape_is_an_error_naming_the_parameter(tmp_path, rng):
  sd, _ = _vgg_state_dict(rng)
  sd["features.0.weight"] = sd["features.0.weight"][:2]
  model = {"backbone": "vgg16", "backbone_kw": VGG_KW, "pretrained": _save(tmp_path, sd, "bad")}
  system = build_system("windows", _config("windows", model))
  with pytest.raises(ValueError, match="features.0.weight"):
    system.init(jax.random.PRNGKey(0), _batch(224, 224))


def test_pretrained_needs_a_torchvision_backbone():
  with pytest.raises(ValueError, match="torchvision weights exist.*init_from"):
    init_from.start_backbone({"params": {}}, backbone="overfeat_fast", pretrained="/x.npz")


def test_freezing_layers_that_were_not_loaded_is_an_error():
  for system in ("fast_rcnn", "faster_rcnn"):
    model = {"backbone": "vgg16", "backbone_kw": VGG_KW, "frozen": ("conv1_1",)}
    with pytest.raises(ValueError, match=r"frozen: \['conv1_1'\] would stay at their random"):
      build_system(system, _config(system, model))


# A narrow yolo20 (the same kinds of layers: stride 32) for YOLO's own ImageNet start.
YOLO20_KW = {"layers": ((3, 8, 2), "M", (3, 8, 1), "M", (1, 8, 1), (3, 16, 1), "M", "M")}


def test_yolo_starts_from_a_classify_run_of_its_own_20_layers(monkeypatch):
  """classify (backbone yolo20) -> yolo paper variant (backbone yolo20) via init_from: the
  classify run's "conv" is YOLO's first layers; the paper's last 4 conv layers stay fresh."""
  cls = build_system("classify", _config("classify", {
      "backbone": "yolo20", "backbone_kw": YOLO20_KW, "input_size": 64}, num_classes=5))
  cls_params = cls.init(jax.random.PRNGKey(3), _batch(64, 64))["params"]
  assert sorted(cls_params) == ["conv", "head"]   # conv -> average pool -> linear
  monkeypatch.setattr(init_from, "read_params",
                      lambda workdir, step=None: (cls_params, {"system": "classify"}))
  model = {"variant": "paper", "num_classes": 3, "grid_size": 2, "head": "conv", "fc_dim": 8,
           "backbone": "yolo20", "backbone_kw": YOLO20_KW, "init_from": "RUN"}
  yolo = build_system("yolo", _config("yolo", model))
  params = yolo.init(jax.random.PRNGKey(0), _batch(128, 128))["params"]
  jax.tree_util.tree_map(np.testing.assert_array_equal, params["conv"], cls_params["conv"])
  assert params["Conv_0"]["kernel"].shape == (3, 3, 16, 1024)   # the paper's last 4 layers
  out = jax.eval_shape(functools.partial(yolo.predict, {"params": params}), _batch(128, 128))
  assert out["boxes"].shape[0] == 1


def test_yolo_vgg16_starts_from_torchvision_weights(tmp_path, rng):
  sd, chw = _vgg_state_dict(rng)
  model = {"variant": "paper", "num_classes": 3, "grid_size": 2, "head": "conv", "fc_dim": 8,
           "backbone": "vgg16", "backbone_kw": VGG_KW, "pretrained": _save(tmp_path, sd, "v")}
  yolo = build_system("yolo", _config("yolo", model))
  params = yolo.init(jax.random.PRNGKey(0), _batch(128, 128))["params"]
  for name, i in VGG_CONVS.items():
    np.testing.assert_array_equal(params["conv"][name]["kernel"],
                                  sd[f"features.{i}.weight"].transpose(2, 3, 1, 0))
  assert "fc" not in params   # YOLO keeps VGG16's conv layers only
