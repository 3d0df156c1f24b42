"""Backbones: shapes and strides (abstractly for the big nets), pooling helpers against NumPy
loops, dtypes, dropout/BatchNorm modes, and the fc-to-conv (OverFeat) equivalence."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdet.models import backbones as bb


def abstract_init(module, *shape):
  x = jax.ShapeDtypeStruct(shape, jnp.float32)
  return jax.eval_shape(module.init, jax.random.key(0), x)


def abstract_apply(module, variables, *shape):
  x = jax.ShapeDtypeStruct(shape, jnp.float32)
  return jax.eval_shape(module.apply, variables, x)


# ----------------------------------------------------------------------------- pure helpers


def test_normalize_images_matches_numpy(rng):
  images = rng.integers(0, 256, size=(2, 5, 4, 3), dtype=np.uint8)
  ref = (images / 255.0 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
  out = bb.normalize_images(images)
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-6)
  assert bb.normalize_images(images, jnp.bfloat16).dtype == jnp.bfloat16
  with pytest.raises(ValueError, match="images: expected last dimension 3"):
    bb.normalize_images(images[..., :2])


@pytest.mark.parametrize("size", [3, 5])
def test_adaptive_avg_pool_matches_torch_bins(rng, size):
  x = rng.normal(size=(2, 4, 7, 3)).astype(np.float32)
  ref = np.zeros((2, size, size, 3))
  for i in range(size):                              # torch: [floor(i n / s), ceil((i+1) n / s))
    for j in range(size):
      r0, r1 = int(np.floor(i * 4 / size)), int(np.ceil((i + 1) * 4 / size))
      c0, c1 = int(np.floor(j * 7 / size)), int(np.ceil((j + 1) * 7 / size))
      ref[:, i, j] = x[:, r0:r1, c0:c1].astype(np.float64).mean(axis=(1, 2))
  out = jax.jit(bb.adaptive_avg_pool, static_argnums=1)(x, size)
  np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-6)


def test_max_pool_pads_with_minus_infinity(rng):
  x = rng.normal(size=(1, 5, 6, 2)).astype(np.float32) - 10.0   # all negative
  out = np.asarray(bb.max_pool(x, 3, 2, 1))
  assert out.shape == (1, 3, 3, 2)
  for i in range(3):
    for j in range(3):
      r0, c0 = max(2 * i - 1, 0), max(2 * j - 1, 0)
      np.testing.assert_array_equal(out[0, i, j], x[0, r0:2 * i + 2, c0:2 * j + 2].max((0, 1)))


# ----------------------------------------------------------------------------- shapes

# name, kwargs, [(input size, conv feature size)]
SHAPES = [
    ("tiny", {}, [(64, 4), (128, 8)]),
    ("tiny", {"stride": 8}, [(64, 8), (96, 12)]),
    ("alexnet", {}, [(224, 13), (227, 13)]),
    ("overfeat_fast", {}, [(231, 12), (263, 14)]),
    ("zf", {}, [(224, 14), (160, 10)]),
    ("vgg16", {}, [(224, 14), (160, 10)]),
    ("resnet50", {}, [(224, 14), (160, 10)]),
]


@pytest.mark.parametrize("name,kw,sizes", SHAPES, ids=[f"{s[0]}{s[1]}" for s in SHAPES])
def test_shapes_and_strides(name, kw, sizes):
  parts = bb.get_backbone(name, dtype=jnp.bfloat16, **kw)
  conv_vars = abstract_init(parts.conv, 2, sizes[0][0], sizes[0][0], 3)
  for size, feat in sizes:
    out = abstract_apply(parts.conv, conv_vars, 2, size, size + parts.stride, 3)
    # `stride` more pixels of width give one more feature column.
    assert out.shape == (2, feat, feat + 1, parts.out_channels), (size, out.shape)
    assert out.dtype == jnp.bfloat16
  r = parts.roi_size
  fc_vars = abstract_init(parts.fc, 3, r, r, parts.out_channels)
  out = abstract_apply(parts.fc, fc_vars, 3, r, r, parts.out_channels)
  assert out.shape == (3, parts.fc_dim) and out.dtype == jnp.bfloat16
  model = bb.classifier(parts, 7)
  variables = abstract_init(model, 2, sizes[0][0], sizes[0][0], 3)
  assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(variables))
  out = abstract_apply(model, variables, 2, sizes[1][0], sizes[1][0], 3)
  assert out.shape == (2, 7) and out.dtype == jnp.bfloat16


def test_paper_shapes():
  """Layer sizes from the papers: AlexNet fc6 9216 -> 4096, VGG16 fc6 25088, OverFeat-fast
  fc6 1024 x 6 x 6 -> 3072, ResNet-50 C4 1024 / layer4 2048 and 25.6 M parameters."""
  def params(name):
    model = bb.classifier(bb.get_backbone(name), 1000)
    return abstract_init(model, 1, 224, 224, 3)["params"]
  assert params("alexnet")["fc"]["fc6"]["kernel"].shape == (9216, 4096)
  assert params("vgg16")["fc"]["fc6"]["kernel"].shape == (25088, 4096)
  assert params("overfeat_fast")["fc"]["fc6"]["kernel"].shape == (36864, 3072)
  count = lambda t: sum(int(np.prod(v.shape)) for v in jax.tree.leaves(t))
  assert count(params("resnet50")) == 25_557_032     # torchvision resnet50
  assert count(params("vgg16")) == 138_357_544       # torchvision vgg16
  assert count(params("alexnet")) == 61_100_840      # torchvision alexnet


# ----------------------------------------------------------------------------- tiny, for real


def test_tiny_forward_dtype_dropout_and_jit(rng):
  parts = bb.get_backbone("tiny", dtype=jnp.bfloat16)
  model = bb.classifier(parts, 5)
  images = rng.integers(0, 256, size=(2, 64, 64, 3), dtype=np.uint8)
  x = bb.normalize_images(images, jnp.bfloat16)
  variables = jax.jit(model.init)(jax.random.key(0), x)
  assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(variables))
  apply = jax.jit(model.apply, static_argnames="train")
  out = apply(variables, x)
  assert out.shape == (2, 5) and out.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(apply(variables, x), np.float32),
                                np.asarray(out, np.float32))
  d1 = apply(variables, x, train=True, rngs={"dropout": jax.random.key(1)})
  d2 = apply(variables, x, train=True, rngs={"dropout": jax.random.key(2)})
  assert not np.array_equal(np.asarray(d1, np.float32), np.asarray(d2, np.float32))
  model32 = bb.classifier(bb.get_backbone("tiny"), 5)   # same params, float32 compute
  loss = lambda p: jnp.sum(model32.apply({"params": p}, x.astype(jnp.float32)))
  grads = jax.jit(jax.grad(loss))(variables["params"])
  assert all(g.dtype == jnp.float32 and np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))


def test_small_resnet_batchnorm_modes(rng):
  kw = dict(blocks=(1, 1, 1, 1), widths=(4, 4, 8, 8))
  x = jnp.asarray(rng.normal(size=(2, 32, 32, 3)), jnp.float32)
  model = bb.classifier(bb.get_backbone("resnet50", **kw), 3)
  frozen = bb.classifier(bb.get_backbone("resnet50", frozen_bn=True, **kw), 3)
  # Random variables drawn on the host (compiling ResNet's many initialisers is slow on CPU).
  shapes = abstract_init(model, *x.shape)
  draw = lambda path, s: (rng.uniform(0.5, 1.5, s.shape) if path[-1].key in ("var", "scale")
                          else rng.normal(size=s.shape) * (0.3 if len(s.shape) == 4 else 0.1))
  variables = jax.tree.map(lambda v: jnp.asarray(v, jnp.float32),
                           jax.tree_util.tree_map_with_path(draw, shapes))
  stats = variables["batch_stats"]

  @jax.jit
  def run(variables):
    train = model.apply(variables, x, train=True, mutable=["batch_stats"])
    loss = lambda p: (lambda o: (jnp.sum(o[0] ** 2), o))(
        frozen.apply({**variables, "params": p}, x, train=True, mutable=["batch_stats"]))
    grads, f_train = jax.grad(loss, has_aux=True)(variables["params"])
    return train, f_train, grads

  (out, state), (f_out, f_state), grads = run(variables)
  changed = jax.tree.map(lambda a, b: not np.allclose(a, b), state["batch_stats"], stats)
  assert all(jax.tree.leaves(changed))               # batch statistics update in training
  jax.tree.map(np.testing.assert_array_equal, f_state["batch_stats"], stats)   # frozen: not
  assert not np.allclose(f_out, out)                 # frozen uses running, not batch, stats
  assert np.all(grads["conv"]["bn1"]["scale"] == 0) and np.all(grads["fc"]["layer4_0"]["bn3"][
      "bias"] == 0)
  assert np.any(grads["conv"]["conv1"]["kernel"] != 0)


# ----------------------------------------------------------------------------- fc as conv


@pytest.mark.parametrize("name,kw,train_size,big_size", [
    ("tiny", {}, 64, 96),
    ("overfeat_fast", dict(convs=((6, 11, 4, 0, (2, 2, 0)), (8, 5, 1, 0, (2, 2, 0)),
                                  (8, 3, 1, 1), (8, 3, 1, 1), (8, 3, 1, 1)),
                           fc_features=(12, 10)), 231, 263),
])
def test_fc_to_conv_matches_fc_and_slides(rng, name, kw, train_size, big_size):
  parts = bb.get_backbone(name, **kw)
  dense = bb.classifier(parts, 4)
  dense_conv = bb.classifier(parts, 4, as_conv=True)
  x = jnp.asarray(rng.normal(size=(1, train_size, train_size, 3)), jnp.float32)
  big = jnp.asarray(rng.normal(size=(1, big_size, big_size + 16, 3)), jnp.float32)
  variables = jax.jit(dense.init)(jax.random.key(0), x)
  params = variables["params"]
  conv_params = bb.fc_to_conv_params(params, roi_size=parts.roi_size)
  r = parts.roi_size

  @jax.jit
  def run(params, conv_params):
    feats = parts.conv.apply({"params": params["conv"]}, big)
    if parts.pool5 is not None:
      feats = bb.max_pool(feats, *parts.pool5)
    out = dense_conv.apply({"params": conv_params}, big)
    # The Dense network on every roi x roi window of the big input's pooled features.
    windows = jnp.stack([feats[0, i:i + r, j:j + r] for i in range(out.shape[1])
                         for j in range(out.shape[2])])
    head = (parts.fc.apply({"params": params["fc"]}, windows) @ params["head"]["kernel"]
            + params["head"]["bias"])
    return (dense.apply({"params": params}, x), dense_conv.apply({"params": conv_params}, x),
            out, head.reshape(out.shape))

  ref, out_small, out, windows_ref = run(params, conv_params)
  assert out_small.shape == (1, 1, 1, 4)
  np.testing.assert_allclose(out_small[:, 0, 0], ref, rtol=1e-4, atol=1e-4)
  assert out.shape[1] > 1 and out.shape[2] > 1
  np.testing.assert_allclose(out, windows_ref, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- errors


def test_errors():
  with pytest.raises(ValueError, match="name: expected one of"):
    bb.get_backbone("googlenet")
  with pytest.raises(ValueError, match="stride: expected a power of two"):
    bb.get_backbone("tiny", stride=12)
  parts = bb.get_backbone("tiny")
  with pytest.raises(ValueError, match=r"x: expected shape \(\?, 4, 4, \?\)"):
    abstract_init(parts.fc, 2, 5, 5, 128)
  with pytest.raises(ValueError, match="as_conv"):
    bb.classifier(bb.get_backbone("resnet50"), 3, as_conv=True)
  with pytest.raises(ValueError, match="params: expected a Classifier's params"):
    bb.fc_to_conv_params({"dense": {}}, roi_size=4)
  with pytest.raises(ValueError, match="not a multiple of roi_size"):
    bb.fc_to_conv_params({"fc6": {"kernel": np.zeros((10, 2))}}, roi_size=4)


@pytest.mark.parametrize("shape, window", [((2, 9, 7, 3), 2), ((1, 12, 10, 2), 3), ((1, 4, 4, 1), 4)])
def test_non_overlapping_max_pool_equals_the_windowed_max_in_value_and_gradient(rng, shape, window):
  """The reshape form (window == stride, no padding) against float64 NumPy: floor mode drops
  the last rows/columns; without ties the gradient goes to each window's maximum."""
  x = rng.standard_normal(shape).astype(np.float32)
  b, h, w, c = shape
  ho, wo = h // window, w // window
  want = np.zeros((b, ho, wo, c))
  grad = np.zeros(shape)
  for i in range(ho):
    for j in range(wo):
      patch = x[:, i * window:(i + 1) * window, j * window:(j + 1) * window].astype(np.float64)
      want[:, i, j] = patch.max(axis=(1, 2))
      flat = patch.reshape(b, window * window, c).argmax(1)            # [B, C]
      for n in range(b):
        for ch in range(c):
          di, dj = divmod(int(flat[n, ch]), window)
          grad[n, i * window + di, j * window + dj, ch] = 1.0
  np.testing.assert_array_equal(np.asarray(bb.max_pool(jnp.asarray(x), window, window)), want)
  g = jax.grad(lambda v: jnp.sum(bb.max_pool(v, window, window)))(jnp.asarray(x))
  np.testing.assert_array_equal(np.asarray(g), grad)


def test_non_overlapping_max_pool_shares_the_gradient_of_tied_maxima():
  """A block of equal values: each gets 1/k^2 of the block's gradient (the sum is kept)."""
  x = jnp.zeros((1, 5, 4, 2), jnp.float32)
  g = np.asarray(jax.grad(lambda v: jnp.sum(3.0 * bb.max_pool(v, 2, 2)))(x))
  np.testing.assert_allclose(g[:, :4], 0.75)
  np.testing.assert_array_equal(g[:, 4], 0.0)        # the dropped row (floor mode)
