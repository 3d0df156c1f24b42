"""YOLO v1: target encoding, decoding and post-processing against NumPy loops; the network."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxdet import losses
from jaxdet.models import classify, yolo
from jaxdet.train.checkpoint import Checkpoints
from jaxdet.train.state import create_train_state


def _random_boxes(rng, n, m, h, w):
  xy = rng.uniform(0, 1, size=(n, m, 2)) * [w, h]
  wh = rng.uniform(0, 0.5, size=(n, m, 2)) * [w, h]
  return np.concatenate([xy, np.minimum(xy + wh, [w, h])], -1).astype(np.float32)


def _encode_ref(boxes, labels, mask, s, h, w, c):
  """Plain loop over objects in index order; the first real object in a cell wins."""
  box = np.zeros((s, s, 4))
  cls = np.zeros((s, s), np.int32)
  has = np.zeros((s, s), bool)
  for b, lab, real in zip(boxes.astype(np.float64), labels, mask):
    if not real:
      continue
    cx, cy = (b[0] + b[2]) / 2 / w * s, (b[1] + b[3]) / 2 / h * s
    col, row = min(int(cx), s - 1), min(int(cy), s - 1)
    if has[row, col]:
      continue
    has[row, col] = True
    box[row, col] = [cx - col, cy - row, (b[2] - b[0]) / w, (b[3] - b[1]) / h]
    cls[row, col] = lab
  return box, cls, has


def test_encode_targets_matches_loop(rng):
  n, m, s, h, w, c = 2, 9, 3, 60, 90, 4
  boxes = _random_boxes(rng, n, m, h, w)
  boxes[0, 0] = [80, 50, 90, 60]                 # centre inside the last cell
  boxes[0, 1] = [90, 60, 90, 60]                 # zero-size box on the far corner: last cell
  labels = rng.integers(0, c, size=(n, m)).astype(np.int32)
  mask = rng.random((n, m)) < 0.8
  mask[0, :2] = [False, True]
  labels[~mask] = -1
  enc = jax.jit(jax.vmap(functools.partial(yolo.encode_targets, grid_size=s, image_size=(h, w),
                                           num_classes=c)))(boxes, labels, mask)
  for k in range(n):
    box, cls, has = _encode_ref(boxes[k], labels[k], mask[k], s, h, w, c)
    np.testing.assert_array_equal(enc["mask"][k], has)
    np.testing.assert_allclose(enc["box"][k], box, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(enc["labels"][k], cls)
  assert bool(enc["mask"][0, 2, 2]) and abs(float(enc["box"][0, 2, 2, 0]) - 1.0) < 1e-5


def test_loss_ignores_masked_objects_padded_vs_sliced(rng):
  s, h, w, c = 4, 64, 64, 3
  real = 3
  boxes = _random_boxes(rng, 1, 6, h, w)
  boxes[0, real:] = np.nan                       # padding holds garbage
  labels = np.full((1, 6), -7, np.int32)
  labels[0, :real] = rng.integers(0, c, size=real)
  mask = np.arange(6)[None] < real
  pred = rng.normal(size=(1, s, s, 10 + c)).astype(np.float32)

  def loss(bx, lb, mk):
    batch = {"image": jnp.zeros((1, h, w, 3), jnp.uint8), "boxes": bx, "labels": lb,
             "box_mask": mk}
    t = yolo.loss_targets(pred, batch, num_boxes=2, num_classes=c)
    return losses.yolo_loss(pred, t, t["mask"], num_boxes=2, terms=yolo.Loss(),
                            decode=functools.partial(yolo.predictor_boxes, grid_size=s))[0]

  loss = jax.jit(loss)
  padded = loss(boxes, labels, mask)
  sliced = loss(boxes[:, :real], labels[:, :real], mask[:, :real])
  assert np.isfinite(float(padded))
  np.testing.assert_allclose(padded, sliced, rtol=1e-6)


def _decode_ref(pred, b, h, w):
  s = pred.shape[0]
  out_boxes, out_scores = [], []
  for r in range(s):
    for col in range(s):
      for j in range(b):
        x, y, sw, sh, conf = pred[r, col, 5 * j:5 * j + 5].astype(np.float64)
        cx, cy = (col + x) / s * w, (r + y) / s * h
        bw, bh = sw * sw * w, sh * sh * h
        out_boxes.append([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2])
        out_scores.append(pred[r, col, 5 * b:].astype(np.float64) * conf)
  return np.array(out_boxes), np.array(out_scores)


def _iou(a, b):
  iw = max(min(a[2], b[2]) - max(a[0], b[0]), 0)
  ih = max(min(a[3], b[3]) - max(a[1], b[1]), 0)
  union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - iw * ih
  return iw * ih / union if union > 0 else 0.0


def test_decode_and_postprocess_match_numpy(rng):
  s, b, c, h, w = 3, 2, 3, 48, 72
  pred = rng.uniform(0, 1, size=(2, s, s, 5 * b + c)).astype(np.float32)
  boxes, scores = jax.vmap(functools.partial(yolo.decode_predictions, num_boxes=b,
                                             image_size=(h, w)))(pred)
  for k in range(2):
    ref_boxes, ref_scores = _decode_ref(pred[k], b, h, w)
    np.testing.assert_allclose(boxes[k], ref_boxes, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(scores[k], ref_scores, rtol=1e-5, atol=1e-6)

  # Post-processing: threshold, clip to the real pixels, greedy NMS per class, top K by score.
  thr, iou_thr, k_out = 0.2, 0.4, 12
  size_hw = np.array([[h, w], [40, 60]], np.int32)
  dets = jax.jit(jax.vmap(functools.partial(
      yolo.postprocess, num_boxes=b, input_size=(h, w), score_threshold=thr,
      iou_threshold=iou_thr, max_detections=k_out)))(pred, size_hw)
  for k in range(2):
    ref_boxes, ref_scores = _decode_ref(pred[k], b, h, w)
    ref_boxes = np.clip(ref_boxes, 0, [size_hw[k, 1], size_hw[k, 0]] * 2)
    kept = []
    for cls in range(c):
      order = [i for i in np.argsort(-ref_scores[:, cls], kind="stable")
               if ref_scores[i, cls] >= thr]
      chosen = []
      for i in order:
        if all(_iou(ref_boxes[i], ref_boxes[j]) <= iou_thr for j in chosen):
          chosen.append(i)
      kept += [(ref_scores[i, cls], cls, i) for i in chosen]
    kept = sorted(kept, key=lambda t: -t[0])[:k_out]
    valid = np.asarray(dets["valid"][k])
    assert valid.sum() == len(kept)
    np.testing.assert_allclose(dets["scores"][k][valid], [t[0] for t in kept], rtol=1e-5)
    np.testing.assert_array_equal(dets["labels"][k][valid], [t[1] for t in kept])
    np.testing.assert_allclose(dets["boxes"][k][valid], ref_boxes[[t[2] for t in kept]],
                               rtol=1e-5, atol=1e-4)


def test_paper_network_layout_and_flops():
  net = yolo.YOLONet(num_classes=20)              # the paper: 24 conv, 2 fc, S=7, B=2
  x = jax.ShapeDtypeStruct((1, 448, 448, 3), jnp.float32)
  variables = jax.eval_shape(lambda x: net.init(jax.random.key(0), x, train=False), x)
  params = variables["params"]
  assert sum(k.startswith("Conv_") for k in params) == 24
  assert sum(k.startswith("Dense_") for k in params) == 2
  assert params["Dense_0"]["kernel"].shape == (7 * 7 * 1024, 4096)
  out = jax.eval_shape(lambda v, x: net.apply(v, x, train=False), variables, x)
  assert out.shape == (1, 7, 7, 30) and out.dtype == jnp.float32
  # Analytic FLOPs: the conv layers' 2 * k * k * c_in * c_out * H_out * W_out, counted again
  # here from the parameter shapes and the known feature-map sizes of the paper's Figure 3.
  sizes = [224, 112] + [56] * 4 + [28] * 10 + [14] * 5 + [7] * 3
  flops = sum(2 * np.prod(params[f"Conv_{i}"]["kernel"].shape) * sz * sz
              for i, sz in enumerate(sizes))
  flops += 2 * (7 * 7 * 1024 * 4096 + 4096 * 1470)
  assert yolo.conv_flops(yolo.PAPER_LAYERS, 448, 4096, 1470) == flops
  assert 38e9 < flops < 42e9


def test_system_train_and_predict(rng):
  config = {"compute_dtype": "float32",
            "model": {"variant": "small", "num_classes": 3, "grid_size": 4, "batch_norm": True,
                      "predict": {"max_detections": 7, "score_threshold": 0.0}}}
  system = yolo.build_system(config)
  n, m, size = 2, 5, 64
  boxes = _random_boxes(rng, n, m, size, size)
  batch = {"image": jnp.asarray(rng.integers(0, 256, (n, size, size, 3)), jnp.uint8),
           "image_size": jnp.full((n, 2), size, jnp.int32),
           "boxes": jnp.asarray(boxes), "labels": jnp.asarray(rng.integers(0, 3, (n, m)),
                                                             jnp.int32),
           "box_mask": jnp.asarray(rng.random((n, m)) < 0.7)}
  variables = system.init(jax.random.key(0), batch)
  assert set(variables) == {"params", "batch_stats"}
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables["params"]))

  def objective(params):
    loss, metrics, state = system.loss({**variables, "params": params}, batch,
                                       jax.random.key(1))
    return loss, (metrics, state)

  (loss, (metrics, state)), grads = jax.jit(jax.value_and_grad(objective, has_aux=True))(
      variables["params"])
  assert np.isfinite(float(loss)) and set(state) == {"batch_stats"}
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
  assert {k for k in metrics if k.startswith("loss/")} == {
      "loss/coord", "loss/obj", "loss/noobj", "loss/cls"}
  assert {"yolo/iou", "yolo/objects"} <= set(metrics)
  np.testing.assert_allclose(sum(metrics[k] for k in metrics if k.startswith("loss/")), loss,
                             rtol=1e-5)
  dets = jax.jit(system.predict)(variables, batch)
  assert dets["boxes"].shape == (n, 7, 4) and dets["valid"].shape == (n, 7)
  assert dets["labels"].dtype == jnp.int32 and dets["scores"].dtype == jnp.float32
  assert float(dets["boxes"].max()) <= size and float(dets["boxes"].min()) >= 0


def test_errors():
  with pytest.raises(ValueError, match=r"config.model: unknown keys \['grid'\]"):
    yolo.build_system({"model": {"grid": 7}})
  with pytest.raises(ValueError, match="config.model.variant: expected one of"):
    yolo.build_system({"model": {"variant": "huge"}})
  with pytest.raises(ValueError, match="config.model.grid_size: expected a positive int"):
    yolo.build_system({"model": {"grid_size": 0}})
  with pytest.raises(ValueError, match=r"config.model.loss: unknown keys \['lambda_coord'\]"):
    yolo.build_system({"model": {"loss": {"lambda_coord": 5.0}}})   # now coord_weight
  with pytest.raises(ValueError, match=r"config.model.loss.noobj_weight: expected a weight >= 0"):
    yolo.build_system({"model": {"loss": {"noobj_weight": -0.5}}})
  with pytest.raises(ValueError, match=r"config.model.loss.cls: unknown class loss 'l2'"):
    yolo.build_system({"model": {"loss": {"cls": "l2"}}})
  with pytest.raises(ValueError, match="config.model.predict.max_detections"):
    yolo.build_system({"model": {"predict": {"max_detections": 0}}})
  with pytest.raises(ValueError, match="config.model.dropout_rate"):
    yolo.build_system({"model": {"dropout_rate": 1.0}})
  with pytest.raises(ValueError, match="labels: expected 3 entries on axis 0"):
    yolo.encode_targets(jnp.zeros((3, 4)), jnp.zeros(2, jnp.int32), jnp.ones(2, bool),
                        grid_size=7, image_size=(448, 448), num_classes=2)
  with pytest.raises(ValueError, match="layers"):
    yolo._check_layers(((3, 16, 1), "P"))
  with pytest.raises(ValueError, match="predictions: expected last dimension 5B"):
    yolo.decode_predictions(jnp.zeros((7, 7, 10)), num_boxes=2, image_size=(448, 448))


def test_config_presets_build():
  from experiments.configs import yolo as yolo_config
  for preset, classes, layers in [("cpu", 6, yolo.VARIANTS["tiny"][0]),
                                  ("paper", 20, yolo.PAPER_HEAD_LAYERS)]:
    config = yolo_config.get_config(preset)
    system = yolo.build_system(config)
    assert system.name == "yolo" and system.num_classes == classes
    assert system.extras.network.layers == layers
    assert system.extras.settings == yolo.Settings.from_config(config)
    assert system.extras.settings.loss == yolo.Loss()   # the presets train the paper's loss
  # paper: the pretrainable 20 layers (backbone yolo20) + the last 4 = the paper's 24
  net = yolo.build_system(yolo_config.get_config("paper")).extras.network
  assert tuple(net.conv.layers) + tuple(net.layers) == yolo.PAPER_LAYERS
  assert yolo.build_system({"num_classes": 4, "model": {}}).num_classes == 4


# A small tiny backbone (stride 4: 16 px -> 4 x 4 x 8, then TINY_LAYERS -> 2 x 2 x 128, S = 2).
TINY_KW = {"widths": (4, 8), "stride": 4, "fc_features": (8, 8), "roi_size": 2}


def _classify_run(tmp_path, rng):
  """A finished classify 'run' whose checkpoint holds random (non-initial) parameters."""
  config = {"model": {"backbone": "tiny", "backbone_kw": TINY_KW, "input_size": 16},
            "num_classes": 3}
  state, key = create_train_state(classify.build_system(config), optax.sgd(0.1),
                                  jax.random.key(0), {})
  params = jax.tree_util.tree_map(lambda p: rng.normal(size=p.shape).astype(np.float32),
                                  state.params)
  ckpt = Checkpoints(str(tmp_path / "checkpoints"), {"system": "classify",
                                                     "model": config["model"]})
  ckpt.save(state.replace(params=params), key, {})
  ckpt.wait()
  ckpt.close()
  return params


def _tiny_system(widths, init_from="", head="fc", loss=None):
  return yolo.build_system({"model": {
      "variant": "tiny", "num_classes": 3, "grid_size": 2, "fc_dim": 16, "batch_norm": True,
      "head": head, "backbone_kw": {**TINY_KW, "widths": widths}, "init_from": init_from,
      "loss": loss or {}}})


def _tiny_batch(rng, n=2, size=16, m=3):
  boxes = _random_boxes(rng, n, m, size, size)
  boxes[..., 2:] = np.maximum(boxes[..., 2:], boxes[..., :2] + 2.0)   # no empty boxes
  return {"image": jnp.asarray(rng.integers(0, 256, (n, size, size, 3)), jnp.uint8),
          "image_size": jnp.full((n, 2), size, jnp.int32), "boxes": jnp.asarray(boxes),
          "labels": jnp.asarray(rng.integers(0, 3, (n, m)), jnp.int32),
          "box_mask": jnp.ones((n, m), bool)}


@functools.lru_cache(maxsize=None)
def _builtin_loss():
  """A batch, variables and the loss of the tiny system with the built-in terms (computed once
  for the parametrized test below)."""
  batch = _tiny_batch(np.random.default_rng(0))
  system = _tiny_system((4, 8))
  variables = system.init(jax.random.key(0), batch)
  return batch, variables, jax.jit(system.loss)(variables, batch, jax.random.key(1))


@pytest.mark.parametrize("term, custom", [
    ("coord", "doubled_box_l2"), ("obj", "doubled_squared_error"),
    ("noobj", "doubled_squared_error"), ("cls", "doubled_squared_error_onehot")])
def test_loss_term_given_by_dotted_path_is_the_one_trained_with(term, custom):
  batch, variables, (want, want_m, _) = _builtin_loss()
  mine = _tiny_system((4, 8), loss={term: f"custom_terms:{custom}"})
  got, got_m, _ = jax.jit(mine.loss)(variables, batch, jax.random.key(1))
  assert float(want_m[f"loss/{term}"]) > 0
  np.testing.assert_allclose(got_m[f"loss/{term}"], 2 * want_m[f"loss/{term}"], rtol=1e-5)
  np.testing.assert_allclose(got - want, want_m[f"loss/{term}"], rtol=1e-5,
                             atol=1e-6 * float(want))
  for other in {"coord", "obj", "noobj", "cls"} - {term}:
    np.testing.assert_allclose(got_m[f"loss/{other}"], want_m[f"loss/{other}"], rtol=1e-6)


def test_giou_coord_term_trains_with_finite_gradients(rng):
  batch = _tiny_batch(rng)
  system = _tiny_system((4, 8), loss={"coord": "giou", "coord_weight": 1.0})
  variables = system.init(jax.random.key(0), batch)

  def objective(params):
    loss, metrics, _ = system.loss({**variables, "params": params}, batch, jax.random.key(1))
    return loss, metrics

  (loss, metrics), grads = jax.jit(jax.value_and_grad(objective, has_aux=True))(
      variables["params"])
  assert np.isfinite(float(loss)) and 0.0 < float(metrics["loss/coord"])
  # 1 - GIoU lies in [0, 2] per responsible predictor: per image at most 2 x its objects.
  assert float(metrics["loss/coord"]) <= 2.0 * float(metrics["yolo/objects"])
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
  assert np.abs(np.asarray(grads["Dense_1"]["kernel"])).sum() > 0


def test_tiny_variant_loads_the_classify_conv(tmp_path, rng):
  saved = _classify_run(tmp_path, rng)
  batch = {"image": jnp.asarray(rng.integers(0, 256, (2, 16, 16, 3)), jnp.uint8)}
  fresh = _tiny_system((4, 8)).init(jax.random.key(1), batch)
  system = _tiny_system((4, 8), str(tmp_path))
  variables = system.init(jax.random.key(1), batch)
  params = variables["params"]
  assert set(params) == set(fresh["params"]) and set(params["conv"]) == {"conv1", "conv2"}
  flat = lambda t: dict(jax.tree_util.tree_flatten_with_path(t)[0])  # noqa: E731
  for path, leaf in flat(params["conv"]).items():
    np.testing.assert_array_equal(np.asarray(leaf), flat(saved["conv"])[path])
    assert np.asarray(leaf).dtype == np.float32
  # YOLO's own layers keep their fresh initialisation.
  for name in ("Conv_0", "Dense_0", "Dense_1"):
    np.testing.assert_array_equal(np.asarray(params[name]["kernel"]),
                                  np.asarray(fresh["params"][name]["kernel"]))
  out = system.extras.network.apply(variables, jnp.zeros((2, 16, 16, 3)), train=False)
  assert out.shape == (2, 2, 2, 5 * 2 + 3) and out.dtype == jnp.float32


def test_conv_head_is_the_fc_layers_applied_per_cell(rng):
  """Head "conv": cell (i, j)'s outputs are Dense_1(leaky(Dense_0(its own features)))."""
  net = _tiny_system((4, 8), head="conv").extras.network
  x = jnp.asarray(rng.normal(size=(2, 16, 16, 3)), jnp.float32)
  variables = net.init(jax.random.key(0), x, train=False)
  out, inter = net.apply(variables, x, train=False, capture_intermediates=True)
  assert out.shape == (2, 2, 2, 13) and out.dtype == jnp.float32
  f = np.asarray(inter["intermediates"]["BatchNorm_2"]["__call__"][0], np.float64)
  leaky = lambda v: np.where(v > 0, v, 0.1 * v)  # noqa: E731
  p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), variables["params"])
  hidden = leaky(leaky(f) @ p["Dense_0"]["kernel"][0, 0] + p["Dense_0"]["bias"])
  want = hidden @ p["Dense_1"]["kernel"][0, 0] + p["Dense_1"]["bias"]     # [2, 2, 2, 13]
  np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-5)
  with pytest.raises(ValueError, match="config.model.head: expected 'fc' or 'conv'"):
    _tiny_system((4, 8), head="dense")


def test_tiny_variant_rejects_a_mismatching_run(tmp_path, rng):
  _classify_run(tmp_path, rng)
  batch = {"image": jnp.zeros((1, 16, 16, 3), jnp.uint8)}
  with pytest.raises(ValueError, match=r"init_from: parameter conv.*conv2.*shape .*classify"):
    _tiny_system((4, 16), str(tmp_path)).init(jax.random.key(0), batch)
  with pytest.raises(ValueError, match="config.model.init_from: variant 'small' has no"):
    yolo.build_system({"model": {"variant": "small", "init_from": str(tmp_path)}})
