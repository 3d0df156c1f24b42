"""OverFeat windows: fc-to-conv equivalence, dense vs per-window evaluation, training windows,
the loss against a float64 reference, background class 0, loss terms by config, init_from."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdet.models import backbones, overfeat, windows
from jaxdet.ops import windows as win

C = 3
KW = {"stride": 8, "widths": (8, 16, 16), "fc_features": (24, 16), "roi_size": 3,
      "dropout_rate": 0.0}


@pytest.fixture(scope="module")
def nets():
  parts = backbones.get_backbone("tiny", **KW)
  window, step = overfeat.network_geometry(parts)
  dense = overfeat.make_network(parts, C, True)
  conv = overfeat.make_network(parts, C, True, as_conv=True)
  params = dense.init(jax.random.PRNGKey(0), jnp.zeros((1, window, window, 3)))
  return parts, dense, conv, params, window, step


def test_geometry():
  assert overfeat.network_geometry(backbones.get_backbone("tiny", **KW)) == (24, 8)
  # OverFeat-fast (Sermanet et al. 2014, table 1): 231 x 231 inputs, pool5 6 x 6, step 32.
  assert overfeat.network_geometry(backbones.get_backbone("overfeat_fast")) == (231, 32)


@pytest.mark.parametrize("name,smallest", [("alexnet", True), ("overfeat_fast", True),
                                          ("zf", False), ("vgg16", False)])
def test_geometry_window_is_an_input_the_network_runs_at(name, smallest):
  """The dense network (Dense fc6 on exactly roi x roi cells) traces at the window size; for
  AlexNet and OverFeat-fast (whose first convolutions are not size-preserving) it is the
  smallest such size, so one pixel less fails."""
  parts = backbones.get_backbone(name)
  window, _ = overfeat.network_geometry(parts)
  net = overfeat.make_network(parts, C, True)
  shape = lambda n: jax.eval_shape(net.init, jax.random.PRNGKey(0),
                                   jax.ShapeDtypeStruct((1, n, n, 3), jnp.float32))
  logits = shape(window)["params"]["cls_head"]["kernel"]
  assert logits.shape[1] == C + 1
  if smallest:
    with pytest.raises(Exception):
      shape(window - 1)


def test_conv_form_equals_dense_form_at_window_size(nets, rng):
  parts, dense, conv, params, window, _ = nets
  x = jnp.asarray(rng.normal(size=(2, window, window, 3)), jnp.float32)
  logits, boxes = dense.apply(params, x)
  conv_params = overfeat.to_conv_params(params["params"], roi_size=parts.roi_size)
  clogits, cboxes = conv.apply({"params": conv_params}, x)
  assert clogits.shape == (2, 1, 1, C + 1) and cboxes.shape == (2, 1, 1, C, 4)
  np.testing.assert_allclose(clogits[:, 0, 0], logits, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(cboxes[:, 0, 0], boxes, rtol=1e-4, atol=1e-5)


def test_dense_map_equals_fc_network_on_every_window(nets, rng):
  """At a larger input each output cell is the fc network on one roi x roi window of features."""
  parts, dense, conv, params, _, _ = nets
  x = jnp.asarray(rng.normal(size=(1, 56, 72, 3)), jnp.float32)
  p = params["params"]
  conv_params = overfeat.to_conv_params(p, roi_size=parts.roi_size)
  clogits, cboxes = conv.apply({"params": conv_params}, x)
  feats = parts.conv.apply({"params": p["conv"]}, x)[0]                   # [h, w, ch]
  r = parts.roi_size
  hh, ww = feats.shape[0] - r + 1, feats.shape[1] - r + 1
  assert clogits.shape[1:3] == (hh, ww)
  slices = jnp.stack([feats[i:i + r, j:j + r] for i in range(hh) for j in range(ww)])
  h = np.asarray(parts.fc.apply({"params": p["fc"]}, slices), np.float64)   # Dense fc per window
  k = np.asarray(p["cls_head"]["kernel"], np.float64)
  want = h @ k + np.asarray(p["cls_head"]["bias"], np.float64)
  np.testing.assert_allclose(np.asarray(clogits[0]).reshape(-1, C + 1), want, rtol=1e-4,
                             atol=1e-4)
  kb = np.asarray(p["box_head"]["kernel"], np.float64)
  wantb = h @ kb + np.asarray(p["box_head"]["bias"], np.float64)
  np.testing.assert_allclose(np.asarray(cboxes[0]).reshape(-1, 4 * C), wantb, rtol=1e-4,
                             atol=1e-4)


def test_dense_windows_maps_boxes_to_image(nets, rng):
  parts, _, conv, params, window, step = nets
  conv_params = {"params": overfeat.to_conv_params(params["params"], roi_size=parts.roi_size)}
  images = jnp.asarray(rng.integers(0, 256, (2, 48, 64, 3)), jnp.uint8)
  scales = (1.0, 0.75)
  out = jax.jit(functools.partial(overfeat.dense_windows, conv, window=window, step=step,
                                  scales=scales))(conv_params, images)
  n = out["windows"].shape[0]
  assert out["probs"].shape == (2, n, C + 1) and out["boxes"].shape == (2, n, C, 4)
  np.testing.assert_allclose(np.asarray(out["probs"]).sum(-1), 1.0, rtol=1e-5)
  # Scale 1: the first cells are the windows of the unresized image, a step apart.
  first = np.asarray(out["windows"][:2])
  np.testing.assert_allclose(first, [[0, 0, window, window], [step, 0, step + window, window]])
  # Regressed boxes: the conv outputs decoded in each window, checked on the scale-1 cells.
  logits, codes = conv.apply(conv_params, backbones.normalize_images(images.astype(jnp.float32)))
  cells = codes.shape[1] * codes.shape[2]
  w64 = np.asarray(out["windows"][:cells], np.float64)
  c64 = np.asarray(codes, np.float64).reshape(2, cells, C, 4)
  size = np.tile(w64[:, 2:] - w64[:, :2], 2)[None, :, None]
  want = np.tile(w64[:, :2], 2)[None, :, None] + c64 * size
  np.testing.assert_allclose(out["boxes"][:, :cells], want, rtol=1e-4, atol=1e-3)
  with pytest.raises(ValueError, match="scales"):
    overfeat.dense_windows(conv, conv_params, images, (0.25,), window=window, step=step)


def test_explicit_windows_match_dense_where_crops_are_exact(rng):
  """With no conv padding a crop's features are a slice of the image's: identical outputs."""
  parts = backbones.get_backbone("tiny", **KW)
  dense = overfeat.make_network(parts, C, True)
  conv = overfeat.make_network(parts, C, True, as_conv=True)
  window, step = overfeat.network_geometry(parts)
  params = dense.init(jax.random.PRNGKey(1), jnp.zeros((1, window, window, 3)))
  conv_params = {"params": overfeat.to_conv_params(params["params"], roi_size=parts.roi_size)}
  # A constant image: padding is the only difference between a crop and the whole image, so
  # compare on windows away from the border (features far from any zero padding coincide).
  images = jnp.full((1, 64, 64, 3), 128, jnp.uint8)
  d = overfeat.dense_windows(conv, conv_params, images, (1.0,), window=window, step=step)
  e = overfeat.explicit_windows(dense, params, images, d["windows"], window=window, chunk=16)
  assert e["probs"].shape == d["probs"].shape and e["boxes"].shape == d["boxes"].shape
  np.testing.assert_allclose(np.asarray(e["probs"]).sum(-1), 1.0, rtol=1e-5)


def test_anisotropic_scale_dense_equals_explicit_rectangular_crops(rng):
  """A scale (sy, sx) makes the dense map's windows rectangular (window / sx by window / sy);
  each cell equals the dense-form net on the explicit crop of its window warped to the square
  input. Exact here: unpadded patchify convs (a crop's features are a slice of the image's)
  and an affine image (bilinear resizing and RoI-align sampling both reproduce it inside)."""
  convs = ((6, 2, 2, 0, None), (8, 2, 2, 0, None))                       # stride 4, no padding
  parts = backbones.get_backbone("alexnet", convs=convs, pool5=(1, 1, 0), fc_features=(12,),
                                 roi_size=3, dropout_rate=0.0)
  window, step = overfeat.network_geometry(parts)
  assert (window, step) == (12, 4)
  dense = overfeat.make_network(parts, C, True)
  conv = overfeat.make_network(parts, C, True, as_conv=True)
  params = dense.init(jax.random.PRNGKey(2), jnp.zeros((1, window, window, 3)))
  conv_params = {"params": overfeat.to_conv_params(params["params"], roi_size=parts.roi_size)}
  yy, xx = np.mgrid[0:40, 0:48].astype(np.float64)
  image = np.stack([2 * xx + 3, 3 * yy + 5, 100 + xx - yy], -1)          # affine, 3..239
  images = jnp.asarray(image[None], jnp.uint8)
  scale = (0.75, 0.5)                                                     # (sy, sx), shrinking
  for coding in ("window", "deltas"):
    d = overfeat.dense_windows(conv, conv_params, images, (scale,), window=window, step=step,
                               box_coding=coding)
    wins = np.asarray(d["windows"], np.float64)
    np.testing.assert_allclose(wins[:, 2] - wins[:, 0], window / scale[1], rtol=1e-6)
    np.testing.assert_allclose(wins[:, 3] - wins[:, 1], window / scale[0], rtol=1e-6)
    e = overfeat.explicit_windows(dense, params, images, d["windows"], window=window, chunk=8,
                                  box_coding=coding)
    # RoI align clamps samples above the first row / left of the first column (not affine).
    inner = (wins[:, 0] >= 1) & (wins[:, 1] >= 1)
    assert inner.sum() >= 6
    np.testing.assert_allclose(e["probs"][:, inner], d["probs"][:, inner], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(e["boxes"][:, inner], d["boxes"][:, inner], rtol=1e-4, atol=1e-3)


def test_context_crops_give_the_dense_map_cells():
  """context = 1: a window cropped with one feature cell (stride pixels) of surroundings on each
  side, its extra cells cut after the conv part, gives the dense map's output at that window
  (exact for unpadded patchify convs on an affine image, windows inside the image)."""
  convs = ((6, 2, 2, 0, None), (8, 2, 2, 0, None))                       # stride 4, no padding
  parts = backbones.get_backbone("alexnet", convs=convs, pool5=(1, 1, 0), fc_features=(12,),
                                 roi_size=3, dropout_rate=0.0)
  window, step = overfeat.network_geometry(parts)                         # 12, 4
  dense = overfeat.make_network(parts, C, True)
  conv = overfeat.make_network(parts, C, True, as_conv=True)
  params = dense.init(jax.random.PRNGKey(3), jnp.zeros((1, window, window, 3)))
  conv_params = {"params": overfeat.to_conv_params(params["params"], roi_size=parts.roi_size)}
  yy, xx = np.mgrid[0:64, 0:96].astype(np.float64)
  images = jnp.asarray(np.stack([2 * xx + 3, 3 * yy + 5, 100 + xx - yy], -1)[None], jnp.uint8)
  scale = (0.75, 0.5)
  d = overfeat.dense_windows(conv, conv_params, images, (scale,), window=window, step=step)
  wins = np.asarray(d["windows"], np.float64)
  pad = np.array([-1, -1, 1, 1]) * np.tile([step / scale[1], step / scale[0]], 2)   # one cell
  outer = wins + pad
  inner = (outer[:, 0] >= 1) & (outer[:, 1] >= 1) & (outer[:, 2] <= 95) & (outer[:, 3] <= 63)
  assert inner.sum() >= 2
  crops = win.crop_windows(images[0], jnp.asarray(outer[inner], jnp.float32), window + 2 * step)
  logits, boxes = dense.apply(params, backbones.normalize_images(crops), context=1)
  np.testing.assert_allclose(jax.nn.softmax(logits, -1), d["probs"][0, inner], rtol=1e-4,
                             atol=1e-5)
  codes = np.asarray(boxes)
  want = win.encode_in_window(d["boxes"][0, inner], jnp.asarray(wins[inner, None], jnp.float32))
  np.testing.assert_allclose(codes, want, rtol=1e-3, atol=1e-4)


def test_box_codings_against_reference(rng):
  """"window": fractions of the window; "deltas": R-CNN's, times (10, 10, 5, 5); both invert."""
  wins = np.concatenate([rng.uniform(0, 50, (16, 2)), rng.uniform(0, 50, (16, 2)) + 60], 1)
  wh = wins[:, 2:] - wins[:, :2]
  boxes = np.concatenate([wins[:, :2] + rng.uniform(-5, 5, (16, 2)),
                          wins[:, 2:] + rng.uniform(-5, 5, (16, 2))], 1)
  bwh = boxes[:, 2:] - boxes[:, :2]
  want = {"window": (boxes - np.tile(wins[:, :2], 2)) / np.tile(wh, 2),
          "deltas": np.concatenate([10 * ((boxes[:, :2] + bwh / 2) - (wins[:, :2] + wh / 2)) / wh,
                                    5 * np.log(bwh / wh)], 1)}
  for coding, ref in want.items():
    codes = overfeat.encode_window_boxes(jnp.asarray(boxes, jnp.float32),
                                         jnp.asarray(wins, jnp.float32), coding)
    np.testing.assert_allclose(codes, ref, rtol=1e-4, atol=1e-4)
    back = overfeat.decode_window_boxes(codes, jnp.asarray(wins, jnp.float32), coding)
    np.testing.assert_allclose(back, boxes, rtol=1e-4, atol=1e-3)
  with pytest.raises(ValueError, match="box_coding"):
    overfeat.encode_window_boxes(jnp.zeros((1, 4)), jnp.ones((1, 4)), "corners")


def _label64(windows, gt, labels, mask, pos, neg):
  """Reference labels (0 background, c + 1 object class c, -1 ignored), best IoU, best object."""
  out, best_iou, best_obj = [], [], []
  for w in windows:
    ious = [(_iou(w, g) if m else -1.0) for g, m in zip(gt, mask)]
    best = int(np.argmax(ious))
    iou = max(ious[best], 0.0)
    out.append(labels[best] + 1 if iou >= pos else (0 if iou < neg else -1))
    best_iou.append(iou)
    best_obj.append(best)
  return np.array(out), np.array(best_iou), np.array(best_obj)


def _iou(a, b):
  lt, rb = np.maximum(a[:2], b[:2]), np.minimum(a[2:], b[2:])
  inter = np.prod(np.maximum(rb - lt, 0))
  union = np.prod(a[2:] - a[:2]) + np.prod(b[2:] - b[:2]) - inter
  return inter / union


def test_training_windows(rng):
  gt = np.array([[10, 12, 40, 50], [60, 60, 100, 90], [0, 0, 0, 0]], np.float32)
  labels = np.array([2, 1, 0], np.int32)
  mask = np.array([True, True, False])
  key = jax.random.PRNGKey(int(rng.integers(1 << 30)))
  wins = overfeat.sample_windows(key, jnp.asarray(gt), jnp.asarray(mask), jnp.array([128, 128]),
                                 num_windows=32, min_side=20.0)
  wins = np.asarray(wins)
  side = wins[:, 2:] - wins[:, :2]
  np.testing.assert_allclose(side[:, 0], side[:, 1], rtol=1e-5)             # square
  rand = wins[16:]
  assert (rand[:, :2] >= -1e-4).all() and (rand[:, 2:] <= 128 + 1e-3).all()
  assert (side[16:, 0] >= 20 - 1e-4).all()
  got = overfeat.label_windows(jnp.asarray(wins), jnp.asarray(gt), jnp.asarray(labels),
                               jnp.asarray(mask), pos_iou=0.5, neg_iou=0.3)
  want, _, obj = _label64(wins.astype(np.float64), gt.astype(np.float64), labels, mask, 0.5, 0.3)
  np.testing.assert_array_equal(got["labels"], want)
  np.testing.assert_array_equal(got["matched_class"], labels[obj])
  assert (np.asarray(got["labels"])[:16] > 0).any()   # object windows find objects
  # No objects: every window is uniform and background.
  empty = overfeat.sample_windows(key, jnp.asarray(gt), jnp.zeros(3, bool), jnp.array([64, 96]),
                                  num_windows=8, min_side=20.0)
  lab = overfeat.label_windows(empty, jnp.asarray(gt), jnp.asarray(labels), jnp.zeros(3, bool),
                               pos_iou=0.5, neg_iou=0.3)
  np.testing.assert_array_equal(lab["labels"], 0)   # background
  assert (np.asarray(empty)[:, 2] <= 96 + 1e-3).all()


def test_rectangular_training_windows(rng):
  """aspect_range: uniform windows of log-uniform aspect, object windows follow the object's
  own width and height (each jittered by U(1 - j, 1 + 2 j), centre by U(-j, j))."""
  gt = np.array([[10, 12, 40, 72], [60, 60, 120, 90]], np.float32)       # aspects 0.5 and 2
  mask = np.array([True, True])
  key = jax.random.PRNGKey(int(rng.integers(1 << 30)))
  wins = np.asarray(overfeat.sample_windows(
      key, jnp.asarray(gt), jnp.asarray(mask), jnp.array([128, 128]), num_windows=64,
      min_side=20.0, jitter=0.2, aspect_range=(0.5, 2.0)), np.float64)
  size = wins[:, 2:] - wins[:, :2]
  aspect = size[:, 0] / size[:, 1]
  obj, uni = slice(0, 32), slice(32, 64)
  assert ((aspect[uni] >= 0.5 - 1e-4) & (aspect[uni] <= 2.0 + 1e-4)).all()
  assert aspect[uni].min() < 0.8 and aspect[uni].max() > 1.25              # not all square
  assert (wins[uni, :2] >= -1e-3).all() and (wins[uni, 2:] <= 128 + 1e-3).all()
  assert (np.sqrt(size[uni].prod(1)) >= 20 / 2 ** 0.25 - 1e-3).all()    # sides capped
  # Each object window is within the jitter of one of the two objects (sizes and centre).
  g = gt.astype(np.float64)
  gs, gc = g[:, 2:] - g[:, :2], (g[:, :2] + g[:, 2:]) / 2
  for w, s in zip(wins[obj], size[obj]):
    ratio = s[None] / gs                                                 # [2, 2]
    shift = ((w[:2] + w[2:]) / 2 - gc) / s[None]
    ok = ((ratio >= 0.8 - 1e-4) & (ratio <= 1.4 + 1e-4)).all(1) & (np.abs(shift) <= 0.2 + 1e-4
                                                                     ).all(1)
    assert ok.any(), (w, ratio, shift)
  with pytest.raises(ValueError, match="aspect_range"):
    overfeat.sample_windows(key, jnp.asarray(gt), jnp.asarray(mask), jnp.array([128, 128]),
                            num_windows=4, min_side=20.0, aspect_range=(2.0, 0.5))


def test_grid_training_windows(nets, rng):
  """dense_grid is dense_windows' window list; grid windows are labelled as anchors are (IoU >=
  pos or an object's best window: its class; < neg: background) and drawn in fixed shares."""
  parts, _, conv, params, window, step = nets
  conv_params = {"params": overfeat.to_conv_params(params["params"], roi_size=parts.roi_size)}
  scales = win.window_scales((1.0, 0.7), (0.67, 1.5))
  images = jnp.zeros((1, 64, 72, 3), jnp.uint8)
  grid = overfeat.dense_grid(conv, (64, 72), scales, window=window, step=step)
  d = overfeat.dense_windows(conv, conv_params, images, scales, window=window, step=step)
  np.testing.assert_allclose(grid, d["windows"], rtol=1e-6)
  gt = np.array([[5, 6, 30, 40], [40, 20, 70, 44], [0, 0, 0, 0]], np.float32)
  labels = np.array([2, 0, 1], np.int32)
  mask = np.array([True, True, False])
  key = jax.random.PRNGKey(int(rng.integers(1 << 30)))
  out = overfeat.sample_grid_windows(key, grid, jnp.asarray(gt), jnp.asarray(labels),
                                     jnp.asarray(mask), jnp.array([64, 72]), num_windows=16,
                                     pos_iou=0.6, neg_iou=0.45)
  g64 = np.asarray(grid, np.float64)
  iou = np.array([[_iou(w, b) for b in gt[:2].astype(np.float64)] for w in g64])   # [N, 2]
  best_of_gt = {int(np.argmax(iou[:, j])) for j in range(2)}
  wins = np.asarray(out["windows"], np.float64)
  lab = np.asarray(out["labels"])
  for w, l, v in zip(wins, lab, np.asarray(out["iou"])):
    if l < 0:
      assert v == 0                                                        # an unfilled slot
      continue
    row = int(np.flatnonzero(np.abs(g64 - w).max(1) < 1e-4)[0])            # a grid window
    best = iou[row].max()
    np.testing.assert_allclose(v, best, rtol=1e-4, atol=1e-6)
    if best >= 0.6 or row in best_of_gt:
      assert l == labels[int(np.argmax(iou[row]))] + 1                    # background is 0
    elif best < 0.45:
      assert l == 0
  pos, hard, rest = lab[:6], lab[6:10], lab[10:]                          # shares 3/8, 1/4, 3/8
  assert (pos >= 1).sum() >= 2 and ((pos >= 1) | (pos == -1)).all()
  assert (hard[hard >= 0] == 0).all() and (np.asarray(out["iou"])[6:10][hard >= 0] >= 0.1).all()
  assert (rest == 0).all()
  with pytest.raises(ValueError, match="shares"):
    overfeat.sample_grid_windows(key, grid, jnp.asarray(gt), jnp.asarray(labels),
                                 jnp.asarray(mask), jnp.array([64, 72]), num_windows=16,
                                 pos_iou=0.6, neg_iou=0.45, shares=(0.75, 0.5))


def test_system_loss_and_predict():
  config = {"num_classes": C, "model": {"backbone_kw": KW, "scales": (1.0, 0.8),
                                        "sampling": {"num_windows": 4},
                                        "predict": {"max_detections": 5, "pre_merge_topk": 16}}}
  system = overfeat.build_system(config)
  batch = {"image": jnp.full((2, 48, 48, 3), 100, jnp.uint8),
           "image_size": jnp.array([[48, 48], [48, 40]], jnp.int32),
           "boxes": jnp.array([[[4.0, 4.0, 30.0, 28.0], [0, 0, 0, 0]]] * 2),
           "labels": jnp.zeros((2, 2), jnp.int32),
           "box_mask": jnp.array([[True, False], [False, False]])}
  # Degenerate inputs on purpose: a flat image, an image without objects and a zero-size padding
  # box. Every key is fixed, so the windows drawn (and the result) are the same on every run.
  # The batch is an argument of the jitted gradient, as in training. (The non-finite gradient
  # once seen here came from a closed-over batch: the flat image became a splat constant and
  # XLA CPU's YNNPACK fusion, jaxlib 0.10.2, computed garbage crops in RoI align's matmul
  # against it; roi_align no longer gives it a reduction to fuse, see tests/faults.)
  variables = system.init(jax.random.PRNGKey(0), batch)
  grads = jax.jit(jax.grad(lambda v, b: system.loss(v, b, jax.random.PRNGKey(1))[0]))(
      variables, batch)
  bad = [jax.tree_util.keystr(path) for path, g in jax.tree_util.tree_leaves_with_path(grads)
         if not np.isfinite(np.asarray(g)).all()]
  _, metrics, _ = system.loss(variables, batch, jax.random.PRNGKey(1))
  assert not bad, f"non-finite gradients in {bad}; loss metrics {metrics}"
  assert {"loss/cls", "loss/box", "overfeat/accuracy", "overfeat/positive_fraction"} == set(metrics)
  dets = jax.jit(system.predict)(variables, batch)
  assert dets["boxes"].shape == (2, 5, 4) and dets["valid"].dtype == bool
  b = np.asarray(dets["boxes"])[1]
  assert (b[:, 2] <= 40 + 1e-3).all()   # clipped to the real width
  with pytest.raises(ValueError, match="unknown keys"):
    overfeat.build_system({"num_classes": C, "model": {"scale": (1.0,)}})


def test_windows_system_detections_are_windows_after_nms(rng):
  """The brute-force system: each detection is one grid window (clipped), scored by its class
  probability, with per-class NMS; no box head."""
  config = {"num_classes": C, "model": {"backbone_kw": KW, "scales": (1.0,),
                                        "sampling": {"num_windows": 4},
                                        "predict": {"max_detections": 6, "score_threshold": 0.0,
                                                    "iou_threshold": 0.3}}}
  system = windows.build_system(config)
  images = jnp.asarray(rng.integers(0, 256, (1, 48, 40, 3)), jnp.uint8)
  batch = {"image": images, "image_size": jnp.array([[48, 40]], jnp.int32),
           "boxes": jnp.array([[[4.0, 4.0, 30.0, 28.0]]]), "labels": jnp.zeros((1, 1), jnp.int32),
           "box_mask": jnp.array([[True]])}
  variables = system.init(jax.random.PRNGKey(0), batch)
  assert "box_head" not in variables["params"]
  dets = jax.jit(system.predict)(variables, batch)
  parts = backbones.get_backbone("tiny", **KW)
  conv = overfeat.make_network(parts, C, False, as_conv=True)
  conv_params = {"params": overfeat.to_conv_params(variables["params"], roi_size=parts.roi_size)}
  dense = overfeat.dense_windows(conv, conv_params, images, (1.0,), window=system.extras.window,
                                 step=system.extras.step)
  grid = np.asarray(dense["windows"], np.float64)
  probs = np.asarray(dense["probs"][0], np.float64)
  valid = np.asarray(dets["valid"][0])
  assert valid.any()
  for box, score, label in zip(np.asarray(dets["boxes"][0])[valid], np.asarray(
      dets["scores"][0])[valid], np.asarray(dets["labels"][0])[valid]):
    clipped = np.minimum(np.maximum(grid, 0), [40, 48, 40, 48])
    hit = np.flatnonzero(np.abs(clipped - box).max(1) < 1e-3)
    assert hit.size and np.isclose(probs[hit, label + 1], score, rtol=1e-4).any()
  # The best (window, class) pair is always kept first; class c is probability column c + 1.
  i, c = np.unravel_index(np.argmax(probs[:, 1:]), (len(grid), C))
  assert int(dets["labels"][0, 0]) == c
  np.testing.assert_allclose(dets["scores"][0, 0], probs[i, c + 1], rtol=1e-4)


# ----------------------------------------------------------------------------- loss, labels


def _batch(rng, b=2, size=64):
  """Noise images with objects in their top left 48 x 48 pixels (the second image's second box
  is padding)."""
  boxes = np.array([[[4, 6, 30, 28], [20, 18, 46, 44]], [[10, 4, 40, 30], [0, 0, 0, 0]]],
                   np.float32)[:b]
  return {"image": jnp.asarray(rng.integers(0, 256, (b, size, size, 3)), jnp.uint8),
          "image_size": jnp.full((b, 2), size, jnp.int32), "boxes": jnp.asarray(boxes),
          "labels": jnp.array([[2, 0], [1, 0]], jnp.int32)[:b],
          "box_mask": jnp.array([[True, True], [True, False]])[:b]}


def test_default_loss_equals_the_float64_reference(rng):
  """The default loss (train_windows "jitter", softmax CE + L2 of window-relative codes, weights
  1) is CE over the labelled windows + the summed squared error of the matched class's codes over
  the windows of IoU >= box_iou, each a mean over its windows: here with labels, IoUs and codes
  from float64 NumPy on the sampled windows (background class 0, object class c at c + 1).
  Unlike before, a regressing window whose class label is ignored (IoU in [box_iou, pos_iou))
  regresses its matched object's class, not class 0."""
  system = overfeat.build_system({"num_classes": C, "model": {
      "backbone_kw": KW, "scales": (1.0,), "sampling": {"num_windows": 16}}})
  batch = _batch(rng)
  variables = system.init(jax.random.PRNGKey(0), batch)
  key = jax.random.PRNGKey(5)   # fixed: windows of every kind (asserted below)
  loss, metrics, _ = jax.jit(system.loss)(variables, batch, key)
  ex, s = system.extras, system.extras.settings
  # The sampled windows (the loss's keys: split(key)[0] folded with each image's index).
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.split(key)[0], i))(jnp.arange(2))
  wins = jax.vmap(lambda k, b, m, hw: overfeat.sample_windows(
      k, b, m, hw, num_windows=16, min_side=ex.window / 1.0))(
          keys, batch["boxes"], batch["box_mask"], batch["image_size"])
  ce, sq, n_cls, n_box, all_labels = 0.0, 0.0, 0, 0, []
  for i in range(2):
    w = np.asarray(wins[i], np.float64)
    gt, lab, m = (np.asarray(batch[k][i]) for k in ("boxes", "labels", "box_mask"))
    labels, iou, obj = _label64(w, gt.astype(np.float64), lab, m, 0.5, 0.3)
    all_labels.append(labels)
    crops = win.crop_windows(batch["image"][i], wins[i], ex.window)
    logits, codes = ex.network.apply(variables, backbones.normalize_images(crops))
    logits, codes = np.asarray(logits, np.float64), np.asarray(codes, np.float64)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    for j in np.flatnonzero(labels >= 0):
      ce, n_cls = ce - logp[j, labels[j]], n_cls + 1
    target = (gt[obj].astype(np.float64) - np.tile(w[:, :2], 2)) / np.tile(w[:, 2:] - w[:, :2],
                                                                             2)
    for j in np.flatnonzero(iou >= 0.4):
      sq, n_box = sq + np.sum((codes[j, lab[obj[j]]] - target[j]) ** 2), n_box + 1
  all_labels = np.concatenate(all_labels)
  assert n_cls > 4 and n_box > 2 and (all_labels >= 1).any() and (all_labels == 0).any()
  np.testing.assert_allclose(metrics["loss/cls"], ce / n_cls, rtol=1e-4)
  np.testing.assert_allclose(metrics["loss/box"], sq / n_box, rtol=1e-4)
  np.testing.assert_allclose(loss, ce / n_cls + sq / n_box, rtol=1e-4)
  assert s.loss.box == "l2" and s.box_coding == "window"


SYSTEM_TERMS = [("overfeat", "cls", "custom_terms:doubled_class"),
                ("overfeat", "box", "custom_terms:doubled_box_l2"),
                ("windows", "cls", "custom_terms:doubled_class")]


@pytest.fixture(scope="module")
def built_in_losses():
  """name -> (model config, variables, batch, key, (loss, metrics)) of each system with its
  built-in terms (computed once per system)."""
  cache = {}

  def get(name):
    if name not in cache:
      build = {"overfeat": overfeat.build_system, "windows": windows.build_system}[name]
      model = {"backbone_kw": KW, "scales": (1.0,), "sampling": {"num_windows": 8}}
      system = build({"num_classes": C, "model": model})
      batch = _batch(np.random.default_rng(0))
      variables = system.init(jax.random.PRNGKey(0), batch)
      key = jax.random.PRNGKey(3)
      cache[name] = (build, model, variables, batch, key,
                     jax.jit(system.loss)(variables, batch, key)[:2])
    return cache[name]
  return get


@pytest.mark.parametrize("name,term,path", SYSTEM_TERMS)
def test_a_loss_term_given_by_dotted_path_is_the_one_trained_with(name, term, path,
                                                                   built_in_losses):
  import custom_terms
  build, model, variables, batch, key, (loss, metrics) = built_in_losses(name)
  custom = build({"num_classes": C, "model": {**model, "loss": {term: path}}})
  calls = custom_terms.CALLS.get(path.split(":")[1], 0)
  loss2, metrics2, _ = jax.jit(custom.loss)(variables, batch, key)
  assert custom_terms.CALLS[path.split(":")[1]] == calls + 1
  assert float(metrics[f"loss/{term}"]) > 0
  np.testing.assert_allclose(metrics2[f"loss/{term}"], 2 * metrics[f"loss/{term}"], rtol=1e-5)
  np.testing.assert_allclose(loss2 - loss, metrics[f"loss/{term}"], rtol=1e-4)
  assert set(metrics) == set(metrics2) and {f"{name}/accuracy", "loss/cls"} <= set(metrics)
  np.testing.assert_allclose(sum(v for k, v in metrics2.items() if k.startswith("loss/")), loss2,
                             rtol=1e-6)


def test_background_is_class_zero():
  """A window over nothing is labelled 0 and one on an object of class c is labelled c + 1; a
  detection's label is the data's class c (probability column c + 1), in both systems."""
  gt = jnp.array([[10.0, 10.0, 40.0, 40.0]])
  out = overfeat.label_windows(jnp.array([[60.0, 60.0, 90.0, 90.0], [10.0, 10.0, 40.0, 40.0]]),
                               gt, jnp.array([2]), jnp.array([True]), pos_iou=0.5, neg_iou=0.3)
  np.testing.assert_array_equal(out["labels"], [0, 3])
  np.testing.assert_array_equal(out["matched_class"], [2, 2])
  # Window 0: background; window 1: class 1 (column 2); window 2: class 0 (column 1).
  probs = jnp.array([[0.9, 0.05, 0.03, 0.02], [0.1, 0.1, 0.7, 0.1], [0.2, 0.6, 0.1, 0.1]])
  wins = jnp.array([[0.0, 0.0, 20.0, 20.0], [30.0, 30.0, 60.0, 60.0], [5.0, 40.0, 35.0, 70.0]])
  size = jnp.array([80, 80])
  d = windows.windows_detections(wins, probs, size, iou_threshold=0.3, score_threshold=0.5,
                                 max_detections=3)
  np.testing.assert_array_equal(d["valid"], [True, True, False])
  np.testing.assert_array_equal(d["labels"][:2], [1, 0])
  np.testing.assert_allclose(d["boxes"][:2], wins[1:], rtol=1e-6)
  boxes = jnp.broadcast_to(wins[:, None], (3, C, 4))
  d = overfeat.overfeat_detections(probs, boxes, size, pre_merge_topk=4, score_threshold=0.5,
                                   merge_threshold=0.0, max_detections=3)
  np.testing.assert_array_equal(d["valid"], [True, True, False])
  np.testing.assert_array_equal(d["labels"][:2], [1, 0])
  np.testing.assert_allclose(d["scores"][:2], [0.7, 0.6], rtol=1e-6)


def test_settings_errors_name_the_key():
  cases = [({"post_process": "nms"}, "unknown keys \\['post_process'\\]"),
           ({"box_head": "agnostic"}, "unknown keys \\['box_head'\\]"),
           ({"sampling": {"soft_labels": True}}, "sampling: unknown keys \\['soft_labels'\\]"),
           ({"box_weight": 2.0}, "unknown keys \\['box_weight'\\]"),
           ({"sampling": {"train_windows": "dense"}}, "config.model.sampling.train_windows"),
           ({"box_coding": "corners"}, "config.model.box_coding"),
           ({"sampling": {"pos_iou": 0.3, "neg_iou": 0.5}}, "config.model.sampling.neg_iou"),
           ({"loss": {"box": "l3"}}, "config.model.loss.box"),
           ({"backbone": "alexnet", "backbone_kw": {}, "sampling": {"context": 1}},
            "config.model.sampling.context: needs a backbone without pool5")]
  for model, match in cases:
    with pytest.raises(ValueError, match=match):
      overfeat.build_system({"num_classes": C, "model": model})
  with pytest.raises(ValueError, match="config.model.sampling: unknown keys \\['box_iou'\\]"):
    windows.build_system({"num_classes": C, "model": {"sampling": {"box_iou": 0.5}}})
  with pytest.raises(ValueError, match="config.model.loss: unknown keys \\['box'\\]"):
    windows.build_system({"num_classes": C, "model": {"loss": {"box": "l2"}}})


def test_init_from_a_classify_run_copies_conv_and_fc_only(monkeypatch, rng):
  """The classify run's head (C outputs, no background) is not copied: the window classifier's
  C + 1 outputs (background first) and the box head start fresh, so no class column moves.
  (The run's checkpoint is read by init_from.read_params, tests/models/test_init_from.py.)"""
  from jaxdet.models import classify, init_from
  model = {"backbone": "tiny", "backbone_kw": KW, "input_size": 24}
  source = classify.build_system({"num_classes": C, "model": model})
  shapes = jax.eval_shape(source.init, jax.random.PRNGKey(0), {})["params"]
  saved = jax.tree_util.tree_map(lambda p: rng.normal(size=p.shape).astype(np.float32), shapes)
  monkeypatch.setattr(init_from, "read_params",
                      lambda workdir: (saved, {"system": "classify", "model": model}))
  config = lambda run: {"num_classes": C, "model": {"backbone_kw": KW, "init_from": run}}
  fresh = overfeat.build_system(config("")).init(jax.random.PRNGKey(1))["params"]
  loaded = overfeat.build_system(config("/run")).init(jax.random.PRNGKey(1))["params"]
  for part in ("conv", "fc"):
    jax.tree_util.tree_map(np.testing.assert_array_equal, loaded[part], saved[part])
  for part in ("cls_head", "box_head"):
    jax.tree_util.tree_map(np.testing.assert_array_equal, loaded[part], fresh[part])
  assert loaded["cls_head"]["kernel"].shape[-1] == C + 1 == saved["head"]["kernel"].shape[-1] + 1
