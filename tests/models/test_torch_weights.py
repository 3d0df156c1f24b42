"""torchvision state dict -> jaxdet variables, checked against float64 NumPy forward passes
written in torch's NCHW semantics (no torch needed), and against torchvision itself when
torch is importable."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpy.lib.stride_tricks import sliding_window_view

from jaxdet.models import backbones as bb
from jaxdet.models import torch_weights as tw

# ----------------------------------------------------------------------------- NCHW references


def np_conv(x, w, b=None, stride=1, pad=0):
  """torch.nn.functional.conv2d: x f64[N, C, H, W], w [O, C, kh, kw] (cross-correlation)."""
  x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
  win = sliding_window_view(x, w.shape[2:], axis=(2, 3))[:, :, ::stride, ::stride]
  y = np.einsum("nchwij,ocij->nohw", win, w)
  return y if b is None else y + b[:, None, None]


def np_max_pool(x, k, s, p=0):
  x = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)), constant_values=-np.inf)
  return sliding_window_view(x, (k, k), axis=(2, 3))[:, :, ::s, ::s].max(axis=(-1, -2))


def np_adaptive_avg(x, size):
  """torch AdaptiveAvgPool2d: bin i spans [floor(i H / s), ceil((i + 1) H / s))."""
  n, c, h, w = x.shape
  out = np.zeros((n, c, size, size))
  for i in range(size):
    for j in range(size):
      r0, r1 = (i * h) // size, -(-((i + 1) * h) // size)
      c0, c1 = (j * w) // size, -(-((j + 1) * w) // size)
      out[:, :, i, j] = x[:, :, r0:r1, c0:c1].mean(axis=(2, 3))
  return out


def np_bn(x, sd, p):
  m, v = sd[f"{p}.running_mean"], sd[f"{p}.running_var"]
  g, b = sd[f"{p}.weight"], sd[f"{p}.bias"]
  return ((x - m[:, None, None]) / np.sqrt(v[:, None, None] + 1e-5) * g[:, None, None]
          + b[:, None, None])


relu = lambda x: np.maximum(x, 0)


def np_dense_classifier(x, sd, lin_idx):
  """torchvision's classifier: flatten (C, H, W), linear+relu per lin_idx[:-1], linear."""
  h = x.reshape(x.shape[0], -1)
  for k, i in enumerate(lin_idx):
    h = h @ sd[f"classifier.{i}.weight"].T + sd[f"classifier.{i}.bias"]
    if k < len(lin_idx) - 1:
      h = relu(h)
  return h


def random_state_dict(rng, arch, num_classes, **kw):
  """A state dict in torch layouts with the key set and shapes convert_state_dict expects,
  derived here from torch's shape rules (O, I, kh, kw) / (out, in) independently of it."""
  parts = bb.get_backbone(arch, **kw)
  model = bb.classifier(parts, num_classes)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3))))
  entries = tw._ENTRIES[arch](parts)
  sd = {}
  for prefix, (path, kind) in entries.items():
    node = shapes["params"]
    for k in path:
      node = node[k]
    if kind == "bn":
      c = node["scale"].shape[0]
      sd[f"{prefix}.weight"] = rng.uniform(0.5, 1.5, c)
      sd[f"{prefix}.bias"] = rng.normal(size=c) * 0.1
      sd[f"{prefix}.running_mean"] = rng.normal(size=c) * 0.1
      sd[f"{prefix}.running_var"] = rng.uniform(0.5, 1.5, c)
      sd[f"{prefix}.num_batches_tracked"] = np.array(7)
      continue
    ks = node["kernel"].shape
    tshape = (ks[3], ks[2], ks[0], ks[1]) if len(ks) == 4 else (ks[1], ks[0])
    fan_in = np.prod(tshape[1:])
    sd[f"{prefix}.weight"] = rng.normal(size=tshape) * np.sqrt(2.0 / fan_in)
    if "bias" in node:
      sd[f"{prefix}.bias"] = rng.normal(size=tshape[0]) * 0.1
  return sd


def run_ours(arch, sd, x_nchw, **kw):
  variables = tw.convert_state_dict(arch, sd, **kw)
  model = bb.classifier(bb.get_backbone(arch, **kw), variables["params"]["head"]["bias"].shape[0])
  x = jnp.asarray(x_nchw.transpose(0, 2, 3, 1), jnp.float32)
  return np.asarray(jax.jit(model.apply)(variables, x), np.float64)


# ----------------------------------------------------------------------------- layer layouts


def test_conv_layout_matches_direct_loop(rng):
  w = rng.normal(size=(3, 2, 3, 3))                  # O, I, kh, kw
  b = rng.normal(size=3)
  x = rng.normal(size=(1, 2, 7, 6))                  # N, C, H, W
  stride, pad = 2, 1
  xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
  oh, ow = (7 + 2 * pad - 3) // stride + 1, (6 + 2 * pad - 3) // stride + 1
  ref = np.zeros((1, 3, oh, ow))
  for o in range(3):
    for i in range(oh):
      for j in range(ow):
        patch = xp[0, :, i * stride:i * stride + 3, j * stride:j * stride + 3]
        ref[0, o, i, j] = np.sum(patch * w[o]) + b[o]
  conv = bb.nn.Conv(3, (3, 3), (stride, stride), padding=((pad, pad), (pad, pad)))
  params = {"params": {"kernel": tw.conv_weight_to_flax(w), "bias": b}}
  ours = conv.apply(params, jnp.asarray(x.transpose(0, 2, 3, 1), jnp.float32))
  np.testing.assert_allclose(np.asarray(ours).transpose(0, 3, 1, 2), ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np_conv(x, w, b, stride, pad), ref, rtol=1e-12)


def test_first_fc_flattening_order(rng):
  c, h, w, out = 3, 2, 4, 5
  weight = rng.normal(size=(out, c * h * w))
  x_chw = rng.normal(size=(c, h, w))
  ref = weight @ x_chw.reshape(-1)                   # torch.flatten over (C, H, W)
  kernel = tw.linear_weight_to_flax(weight, (c, h, w))
  ours = x_chw.transpose(1, 2, 0).reshape(-1) @ kernel
  np.testing.assert_allclose(ours, ref, rtol=1e-12)
  np.testing.assert_array_equal(tw.linear_weight_to_flax(weight), weight.T)


# ----------------------------------------------------------------------------- whole networks
SMALL_ALEXNET = dict(
    convs=((8, 11, 4, 2, (3, 2, 0)), (12, 5, 1, 2, (3, 2, 0)), (16, 3, 1, 1), (12, 3, 1, 1),
           (12, 3, 1, 1)),
    fc_features=(20, 24))
SMALL_VGG = dict(stages=((4,), (6, 6), (8,), (8, 8), (8,)), fc_features=(16, 12))
SMALL_RESNET = dict(blocks=(1, 2, 1, 1), widths=(4, 4, 8, 8))


def test_alexnet_layout_matches_numpy_forward(rng):
  sd = random_state_dict(rng, "alexnet", 5, **SMALL_ALEXNET)
  x = rng.normal(size=(2, 3, 99, 99))
  h = x
  for i, spec in zip((0, 3, 6, 8, 10), SMALL_ALEXNET["convs"]):
    s, p, pool = (tuple(spec) + (None,))[2:5]
    h = relu(np_conv(h, sd[f"features.{i}.weight"], sd[f"features.{i}.bias"], s, p))
    if pool:
      h = np_max_pool(h, *pool)
  h = np_max_pool(h, 3, 2)                           # features.12, torchvision's pool5
  h = np_adaptive_avg(h, 6)                          # 2x2 -> 6x6 (replication)
  ref = np_dense_classifier(h, sd, (1, 4, 6))
  np.testing.assert_allclose(run_ours("alexnet", sd, x, **SMALL_ALEXNET), ref, rtol=1e-4,
                             atol=1e-4)


def test_vgg_layout_matches_numpy_forward(rng):
  sd = random_state_dict(rng, "vgg16", 3, **SMALL_VGG)
  x = rng.normal(size=(1, 3, 64, 80))
  h, i = x, 0
  for s, widths in enumerate(SMALL_VGG["stages"]):
    for _ in widths:
      h = relu(np_conv(h, sd[f"features.{i}.weight"], sd[f"features.{i}.bias"], 1, 1))
      i += 2
    h = np_max_pool(h, 2, 2)                         # torchvision: M after every stage
    i += 1
  h = np_adaptive_avg(h, 7)
  ref = np_dense_classifier(h, sd, (0, 3, 6))
  np.testing.assert_allclose(run_ours("vgg16", sd, x, **SMALL_VGG), ref, rtol=1e-4, atol=1e-4)


def test_resnet_layout_matches_numpy_forward(rng):
  sd = random_state_dict(rng, "resnet50", 4, **SMALL_RESNET)
  x = rng.normal(size=(1, 3, 64, 48))
  h = relu(np_bn(np_conv(x, sd["conv1.weight"], None, 2, 3), sd, "bn1"))
  h = np_max_pool(h, 3, 2, 1)
  for li, n in enumerate(SMALL_RESNET["blocks"]):
    for j in range(n):
      p, s = f"layer{li + 1}.{j}", (2 if li > 0 and j == 0 else 1)
      y = relu(np_bn(np_conv(h, sd[f"{p}.conv1.weight"]), sd, f"{p}.bn1"))
      y = relu(np_bn(np_conv(y, sd[f"{p}.conv2.weight"], None, s, 1), sd, f"{p}.bn2"))
      y = np_bn(np_conv(y, sd[f"{p}.conv3.weight"]), sd, f"{p}.bn3")
      if j == 0:
        h = np_bn(np_conv(h, sd[f"{p}.downsample.0.weight"], None, s), sd, f"{p}.downsample.1")
      h = relu(y + h)
  ref = h.mean(axis=(2, 3)) @ sd["fc.weight"].T + sd["fc.bias"]
  np.testing.assert_allclose(run_ours("resnet50", sd, x, **SMALL_RESNET), ref, rtol=1e-4,
                             atol=1e-4)
  frozen = run_ours("resnet50", sd, x, frozen_bn=True, **SMALL_RESNET)
  np.testing.assert_allclose(frozen, ref, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- errors, files


def test_mismatches_name_the_key_and_shapes(rng):
  sd = random_state_dict(rng, "alexnet", 5, **SMALL_ALEXNET)
  bad = dict(sd)
  del bad["features.3.bias"]
  with pytest.raises(ValueError, match=r"missing keys \['features.3.bias'\]"):
    tw.convert_state_dict("alexnet", bad, **SMALL_ALEXNET)
  bad = {**sd, "features.99.weight": np.zeros(3)}
  with pytest.raises(ValueError, match=r"unexpected keys \['features.99.weight'\]"):
    tw.convert_state_dict("alexnet", bad, **SMALL_ALEXNET)
  bad = {**sd, "features.6.weight": np.zeros((16, 12, 5, 5))}
  with pytest.raises(ValueError, match=r"features.6.weight.*\(16, 12, 5, 5\).*\(16, 12, 3, 3\)"):
    tw.convert_state_dict("alexnet", bad, **SMALL_ALEXNET)
  with pytest.raises(ValueError, match="arch"):
    tw.convert_state_dict("googlenet", sd)
  # Full-size layouts reject a small net's weights with the first mismatching key.
  with pytest.raises(ValueError, match=r"features.0.weight.*\(8, 3, 11, 11\).*\(64, 3, 11, 11\)"):
    tw.convert_state_dict("alexnet", sd)


def test_npz_round_trip_and_missing_file(rng, tmp_path):
  sd = {"a.weight": rng.normal(size=(2, 3)).astype(np.float32), "a.num": np.array(3)}
  path = tmp_path / "w.npz"
  tw.save_state_dict_npz(sd, path)
  back = tw.load_state_dict(path)
  assert sorted(back) == sorted(sd)
  for k in sd:
    np.testing.assert_array_equal(back[k], sd[k])
  with pytest.raises(FileNotFoundError, match="never downloaded"):
    tw.load_state_dict(tmp_path / "nope.pth")


def test_pth_without_torch_says_how_to_convert(tmp_path):
  try:
    import torch  # noqa: F401
    pytest.skip("torch is importable here")
  except ImportError:
    pass
  path = tmp_path / "w.pth"
  path.write_bytes(b"not read")
  with pytest.raises(ImportError, match="save_state_dict_npz"):
    tw.load_state_dict(path)


# ----------------------------------------------------------------------------- torchvision


@pytest.mark.parametrize("arch", ["alexnet", "vgg16", "resnet50"])
def test_matches_torchvision(arch, tmp_path):
  torch = pytest.importorskip("torch")
  torchvision = pytest.importorskip("torchvision")
  torch.manual_seed(0)
  net = getattr(torchvision.models, arch)(weights=None, num_classes=10).eval()
  with torch.no_grad():
    for m in net.modules():                          # non-trivial BatchNorm statistics
      if isinstance(m, torch.nn.BatchNorm2d):
        m.running_mean.uniform_(-0.1, 0.1)
        m.running_var.uniform_(0.5, 1.5)
        m.weight.uniform_(0.5, 1.5)
  path = tmp_path / f"{arch}.pth"
  torch.save(net.state_dict(), path)
  npz = tmp_path / f"{arch}.npz"
  tw.save_state_dict_npz(path, npz)
  variables = tw.load_torchvision_weights(arch, npz)
  x = np.random.default_rng(0).normal(size=(2, 3, 80, 96)).astype(np.float32)
  with torch.no_grad():
    ref = net(torch.from_numpy(x)).numpy()
  model = bb.classifier(bb.get_backbone(arch), 10)
  ours = np.asarray(model.apply(variables, jnp.asarray(x.transpose(0, 2, 3, 1))))
  scale = np.abs(ref).max()
  np.testing.assert_allclose(ours / scale, ref / scale, atol=1e-4)
