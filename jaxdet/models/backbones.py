"""Backbones: a tiny CPU net, AlexNet (and OverFeat-fast / ZF shapes), VGG16 and ResNet-50.

Every region-based detector splits its network at the RoI pooling point, so each backbone comes
in parts (`BackboneParts`, from `get_backbone(name)`):

  conv: images f[B, H, W, 3] (normalised, see `normalize_images`) -> features
        f[B, H/stride, W/stride, out_channels] at stride 16 (tiny: 8 or 16):
        VGG16 conv5_3 without pool5, AlexNet conv5 before its last max-pool, ResNet-50 through
        layer3 (C4, 1024 channels).
  fc:   pooled regions f[N, roi_size, roi_size, out_channels] -> f[N, fc_dim]:
        VGG16 fc6 -> fc7 (7x7 in, 4096), AlexNet fc6 -> fc7 (6x6 in, 4096), ResNet-50 layer4 +
        global average pool (14x14 in, 2048), tiny its small fc head.
  the classification network: `Classifier` (conv -> pool5 -> adaptive average pool to
        roi_size -> fc -> linear to num_classes), built by `classifier(parts, num_classes)`.

Layouts are NHWC; parameters are float32 and computation runs in each module's `dtype` field
(bfloat16 on accelerators). Modules take `train: bool` in `__call__`: it turns on dropout (which
then needs a "dropout" rng) and batch-statistics BatchNorm. Layer names and shapes follow
torchvision (AlexNet, VGG16, ResNet-50), so `jaxdet.models.torch_weights` can load its weights.

OverFeat runs the fc layers as convolutions: `classifier(parts, n, as_conv=True)` is the same
network with Dense layers replaced by convolutions, and `fc_to_conv_params` reshapes trained
Dense weights into its kernels, so the network slides densely over inputs of any size.

Pooling helpers (`max_pool`, `adaptive_avg_pool`, `global_avg_pool`) are pure functions.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdet import checks, global_batch

Array = jax.Array
Dtype = Any

# torchvision's ImageNet statistics, RGB, for pixels scaled to [0, 1].
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# He (Kaiming) normal (untruncated) with fan_out, as torchvision initialises VGG and ResNet convs.
_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


# ----------------------------------------------------------------------------- pure helpers


def normalize_images(images: Array, dtype: Dtype = jnp.float32) -> Array:
  """Scales RGB pixels to [0, 1] and standardises them with the ImageNet mean and std.

  Args:
    images: u8[B, H, W, 3] RGB pixels 0..255 (any integer or float dtype holding that range).
    dtype: the compute dtype of the result.
  Returns:
    dtype[B, H, W, 3]: (images / 255 - mean) / std, computed in float32, then cast.
  """
  checks.check_array("images", images, ndim=4, last_dim=3, dtype_kind="uif")
  x = jnp.asarray(images, jnp.float32) / 255.0
  x = (x - jnp.asarray(IMAGENET_MEAN, jnp.float32)) / jnp.asarray(IMAGENET_STD, jnp.float32)
  return x.astype(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _block_max_pool(x: Array, k: int) -> Array:
  """Max over non-overlapping k x k blocks (floor mode): f[B, H, W, C] -> f[B, H//k, W//k, C].

  The forward is XLA's reduce_window; the backward is elementwise (each block's maxima get
  the block's gradient, shared equally among exactly tied maxima; torch gives it to the first),
  instead of reduce_window's select-and-scatter, which moved 10 GB per VGG16 Faster R-CNN train
  step on CPU (experiments/cost_table.py --breakdown). Ties after a ReLU are zeros, whose
  gradient the ReLU stops anyway.
  """
  return nn.max_pool(x, (k, k), (k, k), padding="VALID")


def _block_max_pool_fwd(x: Array, k: int) -> tuple[Array, tuple[Array, Array]]:
  y = _block_max_pool(x, k)
  return y, (x, y)


def _block_max_pool_bwd(k: int, res: tuple[Array, Array], g: Array) -> tuple[Array]:
  x, y = res
  b, h, w, c = x.shape
  ho, wo = y.shape[1:3]
  blocks = x[:, :ho * k, :wo * k].reshape(b, ho, k, wo, k, c)
  hit = blocks == y[:, :, None, :, None, :]                              # [B, ho, k, wo, k, C]
  share = g / jnp.sum(hit, axis=(2, 4), dtype=g.dtype)                   # [B, ho, wo, C]
  dx = jnp.where(hit, share[:, :, None, :, None, :], 0).reshape(b, ho * k, wo * k, c)
  return (jnp.pad(dx, ((0, 0), (0, h - ho * k), (0, w - wo * k), (0, 0))),)


_block_max_pool.defvjp(_block_max_pool_fwd, _block_max_pool_bwd)


def max_pool(x: Array, window: int, stride: int, padding: int = 0) -> Array:
  """Max pooling as torch.nn.MaxPool2d(window, stride, padding) (floor mode, -inf padding).

  Args:
    x: f[B, H, W, C].
  Returns:
    f[B, (H + 2p - window) // stride + 1, (W + 2p - window) // stride + 1, C].
  """
  checks.check_array("x", x, ndim=4)
  if window == stride and padding == 0:
    return _block_max_pool(x, window)
  pad = ((padding, padding), (padding, padding))
  return nn.max_pool(x, (window, window), (stride, stride), padding=pad)


def _adaptive_matrix(n_in: int, n_out: int) -> np.ndarray:
  """f64[n_out, n_in]: row i averages torch's adaptive bin [floor(i n / m), ceil((i+1) n / m))."""
  m = np.zeros((n_out, n_in))
  for i in range(n_out):
    start = (i * n_in) // n_out
    end = -((-(i + 1) * n_in) // n_out)
    m[i, start:end] = 1.0 / (end - start)
  return m


def adaptive_avg_pool(x: Array, size: int) -> Array:
  """Average pooling to a fixed size, as torch.nn.AdaptiveAvgPool2d(size).

  Output cell (i, j) averages rows [floor(i H / s), ceil((i + 1) H / s)) and the same for
  columns, so inputs smaller than `size` are replicated. Computed as two small matrix products
  (static shapes, no gathers); the identity when the input is already size x size.

  Args:
    x: f[B, H, W, C].
    size: s, the output height and width.
  Returns:
    f[B, s, s, C] in x's dtype.
  """
  checks.check_array("x", x, ndim=4)
  checks.check_positive("size", size)
  _, h, w, _ = x.shape
  if h == size and w == size:
    return x
  mh = jnp.asarray(_adaptive_matrix(h, size), x.dtype)
  mw = jnp.asarray(_adaptive_matrix(w, size), x.dtype)
  return jnp.einsum("oh,bhwc,pw->bopc", mh, x, mw)


def global_avg_pool(x: Array) -> Array:
  """f[B, H, W, C] -> f[B, C], the mean over all positions."""
  checks.check_array("x", x, ndim=4)
  return jnp.mean(x, axis=(1, 2))


def _check_images(name: str, x: Array) -> None:
  """x must be f[B, H, W, 3] of a floating dtype (bfloat16 included)."""
  checks.check_array(name, x, ndim=4, last_dim=3, dtype_kind="f")


def _pad(p: int) -> tuple[tuple[int, int], tuple[int, int]]:
  """Symmetric explicit padding (as torch; "SAME" would pad asymmetrically at stride 2)."""
  return ((p, p), (p, p))


# ----------------------------------------------------------------------------- global-batch layers


class Dropout(nn.Module):
  """Dropout whose mask does not depend on how the batch is split over devices.

  Row i of x (the leading axis: images, or RoIs / windows in example-major order) draws its
  mask from fold_in(key, global row), the key from the "dropout" rng stream (the same on
  every device); see jaxdet.global_batch. Kept entries are scaled by 1 / (1 - rate), as
  flax's nn.Dropout.
  """
  rate: float

  @nn.compact
  def __call__(self, x: Array, *, deterministic: bool) -> Array:
    if deterministic or self.rate == 0.0:
      return x
    keep = 1.0 - self.rate
    keys = global_batch.example_keys(self.make_rng("dropout"), x.shape[0])
    mask = jax.vmap(lambda k: jax.random.bernoulli(k, keep, x.shape[1:]))(keys)
    return jnp.where(mask, x / keep, jnp.zeros_like(x))


def batch_norm(*, train: bool, dtype: Dtype, **kw) -> nn.BatchNorm:
  """nn.BatchNorm (momentum 0.9 unless given) with statistics over the global batch: under
  the data axis it averages them across devices (jaxdet.global_batch.bound_axis)."""
  kw.setdefault("momentum", 0.9)
  return nn.BatchNorm(use_running_average=not train, dtype=dtype,
                      axis_name=global_batch.bound_axis() if train else None, **kw)


# ----------------------------------------------------------------------------- fc parts


class DenseHead(nn.Module):
  """The fc part of AlexNet-style networks: Dense layers with ReLU and dropout.

  Maps pooled regions f[N, roi_size, roi_size, C] to f[N, features[-1]]; the input is flattened
  in (H, W, C) order. Layers are named fc6, fc7, ... as in the papers.

  With `as_conv=True` the same layers are convolutions (OverFeat): fc6 a roi_size x roi_size
  VALID convolution, the rest 1x1, mapping f[N, H, W, C] (H, W >= roi_size) to
  f[N, H - roi_size + 1, W - roi_size + 1, features[-1]]; see `fc_to_conv_params`.

  Attributes:
    features: widths of the Dense layers (e.g. (4096, 4096)).
    roi_size: the input's height and width.
    dropout_rate: dropout probability, applied when `train=True`.
    dropout_before: torchvision AlexNet puts dropout before each Dense layer; VGG after each
      ReLU (the default).
    as_conv: run the layers as convolutions.
    dtype: compute dtype.
  """
  features: Sequence[int]
  roi_size: int
  dropout_rate: float = 0.5
  dropout_before: bool = False
  as_conv: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    r = self.roi_size
    if self.as_conv:
      checks.check_array("x", x, ndim=4)
      if x.shape[1] < r or x.shape[2] < r:
        raise ValueError(f"x: expected height and width >= roi_size {r}, got shape {x.shape}")
    else:
      checks.check_array("x", x, ndim=4, shape=(None, r, r, None))
      x = x.reshape(x.shape[0], -1)
    drop = functools.partial(Dropout(self.dropout_rate), deterministic=not train)
    for i, width in enumerate(self.features):
      name = f"fc{6 + i}"
      if self.dropout_before:
        x = drop(x)
      if self.as_conv:
        k = (r, r) if i == 0 else (1, 1)
        x = nn.Conv(width, k, padding="VALID", dtype=self.dtype, name=name)(x)
      else:
        x = nn.Dense(width, dtype=self.dtype, name=name)(x)
      x = nn.relu(x)
      if not self.dropout_before:
        x = drop(x)
    return x


# ----------------------------------------------------------------------------- tiny net


class TinyConv(nn.Module):
  """A small conv net for CPU experiments on 64-128 px images.

  A 3x3 stride-2 stem convolution, then for each further width a 2x2 max pool (while the
  stride is below `stride`) and a 3x3 convolution, each followed by ReLU. With the default
  widths (16, 32, 64, 128): about 16 M multiply-adds for a 128x128 image at stride 16.

  Attributes:
    widths: channels of the convolutions; the last is out_channels.
    stride: 8 or 16 (any power of two 2..2**len(widths)).
    dtype: compute dtype.
  """
  widths: Sequence[int] = (16, 32, 64, 128)
  stride: int = 16
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    """f[B, H, W, 3] -> f[B, ceil(H / stride), ceil(W / stride), widths[-1]] (H, W even)."""
    _check_images("x", x)
    pools = int(round(math.log2(self.stride))) - 1
    conv = lambda w, name: nn.Conv(w, (3, 3), padding=_pad(1), dtype=self.dtype,
                                   kernel_init=_conv_init, name=name)
    x = nn.relu(nn.Conv(self.widths[0], (3, 3), (2, 2), padding=_pad(1), dtype=self.dtype,
                        kernel_init=_conv_init, name="conv1")(x))
    for i, width in enumerate(self.widths[1:]):
      if i < pools:
        x = max_pool(x, 2, 2)
      x = nn.relu(conv(width, f"conv{i + 2}")(x))
    return x


# ----------------------------------------------------------------------------- AlexNet family


class ConvSpec(NamedTuple):
  """One conv layer (+ ReLU), optionally followed by a max pool (window, stride, padding)."""
  features: int
  kernel: int
  stride: int = 1
  padding: int = 0
  pool: tuple[int, int, int] | None = None


# torchvision alexnet: features[0..10] (pool5 = MaxPool2d(3, 2) follows conv5), fc 9216->4096.
ALEXNET_CONVS = (ConvSpec(64, 11, 4, 2, (3, 2, 0)), ConvSpec(192, 5, 1, 2, (3, 2, 0)),
                 ConvSpec(384, 3, 1, 1), ConvSpec(256, 3, 1, 1), ConvSpec(256, 3, 1, 1))
# OverFeat "fast" (Sermanet et al. 2014, table 1): valid conv1/conv2, 2x2 pools, fc 3072, 4096.
OVERFEAT_FAST_CONVS = (ConvSpec(96, 11, 4, 0, (2, 2, 0)), ConvSpec(256, 5, 1, 0, (2, 2, 0)),
                       ConvSpec(512, 3, 1, 1), ConvSpec(1024, 3, 1, 1), ConvSpec(1024, 3, 1, 1))
# ZF net (Zeiler & Fergus 2014) as in the Fast/Faster R-CNN ZF models (LRN left out).
ZF_CONVS = (ConvSpec(96, 7, 2, 3, (3, 2, 1)), ConvSpec(256, 5, 2, 2, (3, 2, 1)),
            ConvSpec(384, 3, 1, 1), ConvSpec(384, 3, 1, 1), ConvSpec(256, 3, 1, 1))


class AlexNetConv(nn.Module):
  """AlexNet-style conv part: conv1..convN (+ ReLU, + their pools), without pool5.

  Attributes:
    convs: the layers (see `ConvSpec`); named conv1, conv2, ...
    dtype: compute dtype.
  """
  convs: Sequence[ConvSpec] = ALEXNET_CONVS
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    """f[B, H, W, 3] -> f[B, ~H/16, ~W/16, convs[-1].features]."""
    _check_images("x", x)
    for i, c in enumerate(self.convs):
      x = nn.Conv(c.features, (c.kernel, c.kernel), (c.stride, c.stride), padding=_pad(c.padding),
                  dtype=self.dtype, kernel_init=_conv_init, name=f"conv{i + 1}")(x)
      x = nn.relu(x)
      if c.pool is not None:
        x = max_pool(x, *c.pool)
    return x


# ----------------------------------------------------------------------------- VGG16

VGG16_STAGES = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))


class VGGConv(nn.Module):
  """VGG conv part: 3x3 convolutions (pad 1) + ReLU, 2x2 max pools between stages, no pool5.

  Layers are named conv{stage}_{i} (conv1_1 ... conv5_3).

  Attributes:
    stages: channels of each stage's convolutions (VGG16 by default).
    dtype: compute dtype.
  """
  stages: Sequence[Sequence[int]] = VGG16_STAGES
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    """f[B, H, W, 3] -> f[B, H // 16, W // 16, 512] (conv5_3 after ReLU)."""
    _check_images("x", x)
    for s, widths in enumerate(self.stages):
      if s > 0:
        x = max_pool(x, 2, 2)
      for i, width in enumerate(widths):
        x = nn.Conv(width, (3, 3), padding=_pad(1), dtype=self.dtype, kernel_init=_conv_init,
                    name=f"conv{s + 1}_{i + 1}")(x)
        x = nn.relu(x)
    return x


# ----------------------------------------------------------------------------- ResNet-50


class FrozenBatchNorm(nn.Module):
  """BatchNorm with fixed statistics and affine parameters (detection fine-tuning).

  Same variables as `nn.BatchNorm` (params scale, bias; batch_stats mean, var), so weights load
  the same way; y = (x - mean) / sqrt(var + eps) * scale + bias with no gradient to any of them.
  """
  epsilon: float = 1e-5
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    mean = self.variable("batch_stats", "mean", jnp.zeros, (c,), jnp.float32).value
    var = self.variable("batch_stats", "var", jnp.ones, (c,), jnp.float32).value
    mul = jax.lax.stop_gradient(scale * jax.lax.rsqrt(var + self.epsilon))
    add = jax.lax.stop_gradient(bias) - jax.lax.stop_gradient(mean) * mul
    return x * mul.astype(self.dtype) + add.astype(self.dtype)


def _norm(frozen: bool, train: bool, dtype: Dtype, name: str) -> nn.Module:
  if frozen:
    return FrozenBatchNorm(dtype=dtype, name=name)
  # torch momentum 0.1 (weight of the new batch) is flax momentum 0.9.
  return batch_norm(train=train, momentum=0.9, epsilon=1e-5, dtype=dtype, name=name)


class Bottleneck(nn.Module):
  """torchvision's ResNet v1.5 bottleneck: 1x1, 3x3 (carrying the stride), 1x1 (4x width)."""
  width: int
  stride: int = 1
  downsample: bool = False
  frozen_bn: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    conv = lambda f, k, s, p, name: nn.Conv(f, (k, k), (s, s), padding=_pad(p), use_bias=False,
                                            dtype=self.dtype, kernel_init=_conv_init, name=name)
    norm = lambda name: _norm(self.frozen_bn, train, self.dtype, name)
    y = nn.relu(norm("bn1")(conv(self.width, 1, 1, 0, "conv1")(x)))
    y = nn.relu(norm("bn2")(conv(self.width, 3, self.stride, 1, "conv2")(y)))
    y = norm("bn3")(conv(4 * self.width, 1, 1, 0, "conv3")(y))
    if self.downsample:
      x = norm("downsample_bn")(conv(4 * self.width, 1, self.stride, 0, "downsample_conv")(x))
    return nn.relu(y + x)


def _stage(x: Array, index: int, blocks: int, width: int, stride: int, frozen_bn: bool,
           dtype: Dtype, train: bool) -> Array:
  """torchvision's layer{index}: `blocks` bottlenecks, the first with stride and projection."""
  for j in range(blocks):
    x = Bottleneck(width, stride if j == 0 else 1, downsample=j == 0, frozen_bn=frozen_bn,
                   dtype=dtype, name=f"layer{index}_{j}")(x, train=train)
  return x


class ResNetConv(nn.Module):
  """ResNet conv part: stem (7x7/2 conv, BN, ReLU, 3x3/2 max pool), layer1..layer3 (C4).

  Attributes:
    blocks: bottlenecks per stage (ResNet-50: (3, 4, 6, 3); the last is the fc part's).
    widths: bottleneck widths per stage (output channels are 4x).
    frozen_bn: use `FrozenBatchNorm` (fixed statistics and affine) whatever `train` says.
    dtype: compute dtype.
  """
  blocks: Sequence[int] = (3, 4, 6, 3)
  widths: Sequence[int] = (64, 128, 256, 512)
  frozen_bn: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    """f[B, H, W, 3] -> f[B, ~H/16, ~W/16, 4 * widths[2]] (1024 for ResNet-50)."""
    _check_images("x", x)
    x = nn.Conv(self.widths[0], (7, 7), (2, 2), padding=_pad(3), use_bias=False,
                dtype=self.dtype, kernel_init=_conv_init, name="conv1")(x)
    x = nn.relu(_norm(self.frozen_bn, train, self.dtype, "bn1")(x))
    x = max_pool(x, 3, 2, 1)
    for i in range(3):
      x = _stage(x, i + 1, self.blocks[i], self.widths[i], 1 if i == 0 else 2, self.frozen_bn,
                 self.dtype, train)
    return x


class ResNetHead(nn.Module):
  """ResNet fc part: layer4 (stride 2) and global average pooling.

  f[N, H, W, 4 * widths[2]] -> f[N, 4 * widths[3]] (2048 for ResNet-50); any H, W (RoI pooling
  uses 14 x 14, giving 7 x 7 before the average). No dropout, as torchvision's ResNet.
  """
  blocks: Sequence[int] = (3, 4, 6, 3)
  widths: Sequence[int] = (64, 128, 256, 512)
  frozen_bn: bool = False
  as_conv: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    if self.as_conv:
      raise ValueError("as_conv: ResNet's fc part is already convolutional up to its global "
                       "average pool; fc-to-conv conversion applies to Dense fc parts only")
    checks.check_array("x", x, ndim=4, last_dim=4 * self.widths[2])
    x = _stage(x, 4, self.blocks[3], self.widths[3], 2, self.frozen_bn, self.dtype, train)
    return global_avg_pool(x)


# ----------------------------------------------------------------------------- YOLO's 20 layers

# YOLO v1 (Redmon et al. 2016, figure 3): the 20 conv layers pretrained on ImageNet (with an
# average pool and one fc layer), 448 -> 14 x 14 x 1024 (stride 32). (kernel, features, stride)
# or "M" (2 x 2 max pool); the detector adds 4 conv layers and 2 fc layers (jaxdet.models.yolo).
YOLO20_LAYERS = (
    (7, 64, 2), "M",
    (3, 192, 1), "M",
    (1, 128, 1), (3, 256, 1), (1, 256, 1), (3, 512, 1), "M",
    *((1, 256, 1), (3, 512, 1)) * 4, (1, 512, 1), (3, 1024, 1), "M",
    *((1, 512, 1), (3, 1024, 1)) * 2,
)


class DarknetConv(nn.Module):
  """YOLO v1's conv layers: SAME-padded convolutions + leaky ReLU (0.1), 2 x 2 max pools.

  Layers are named conv1, conv2, ... Attributes: layers ((kernel, features, stride) or "M");
  dtype.
  """
  layers: Sequence[Any] = YOLO20_LAYERS
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    """f[B, H, W, 3] -> f[B, H / 32, W / 32, 1024] (the 20 layers)."""
    _check_images("x", x)
    i = 0
    for spec in self.layers:
      if spec == "M":
        x = max_pool(x, 2, 2)
        continue
      k, features, stride = spec
      i += 1
      x = nn.Conv(features, (k, k), (stride, stride), padding="SAME", dtype=self.dtype,
                  name=f"conv{i}")(x)
      x = nn.leaky_relu(x, 0.1)
    return x


class GlobalAvgPool(nn.Module):
  """The fc part of YOLO's pretraining network: an average pool over the whole map (no
  parameters): f[N, h, w, C] -> f[N, C]."""

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    return global_avg_pool(x)


# ----------------------------------------------------------------------------- parts, registry


class BackboneParts(NamedTuple):
  """A backbone split at the RoI pooling point.

  Attributes:
    conv: module, (images f[B, H, W, 3], train) -> f[B, H/stride, W/stride, out_channels].
    fc: module, (regions f[N, roi_size, roi_size, out_channels], train) -> f[N, fc_dim].
    stride: the conv features' stride in pixels.
    out_channels: channels of the conv features.
    roi_size: the fc part's input height and width (the RoI pool's output size).
    fc_dim: width of the fc part's output.
    pool5: (window, stride, padding) of the max pool between conv and fc in the classification
      network (VGG16's and AlexNet's pool5; RoI pooling replaces it in detectors), or None.
    dense_fc: True when the fc part is Dense layers (input must be roi_size x roi_size;
      convertible to convolutions with `fc_to_conv_params`).
  """
  conv: nn.Module
  fc: nn.Module
  stride: int
  out_channels: int
  roi_size: int
  fc_dim: int
  pool5: tuple[int, int, int] | None
  dense_fc: bool


def tiny(*, dtype: Dtype = jnp.float32, widths: Sequence[int] = (16, 32, 64, 128),
         stride: int = 16, fc_features: Sequence[int] = (256, 256), roi_size: int = 4,
         dropout_rate: float = 0.5) -> BackboneParts:
  """The tiny CPU net (`TinyConv`) with a Dense fc head of `fc_features` on roi_size^2 cells."""
  widths, fc_features = tuple(widths), tuple(fc_features)
  if stride not in [2 ** k for k in range(1, len(widths) + 1)]:
    raise ValueError(f"stride: expected a power of two in [2, {2 ** len(widths)}] for "
                     f"{len(widths)} widths, got {stride!r}")
  return BackboneParts(
      conv=TinyConv(widths, stride, dtype=dtype),
      fc=DenseHead(fc_features, roi_size, dropout_rate, dtype=dtype),
      stride=stride, out_channels=widths[-1], roi_size=roi_size, fc_dim=fc_features[-1],
      pool5=None, dense_fc=True)


def alexnet(*, dtype: Dtype = jnp.float32, convs: Sequence[ConvSpec] = ALEXNET_CONVS,
            pool5: tuple[int, int, int] = (3, 2, 0), fc_features: Sequence[int] = (4096, 4096),
            roi_size: int = 6, dropout_rate: float = 0.5) -> BackboneParts:
  """torchvision's AlexNet (or another AlexNet-shaped net via `convs`, `pool5`, `fc_features`)."""
  convs = tuple(ConvSpec(*c) for c in convs)
  stride = math.prod(c.stride * (c.pool[1] if c.pool else 1) for c in convs)
  return BackboneParts(
      conv=AlexNetConv(convs, dtype=dtype),
      fc=DenseHead(tuple(fc_features), roi_size, dropout_rate, dropout_before=True, dtype=dtype),
      stride=stride, out_channels=convs[-1].features, roi_size=roi_size,
      fc_dim=tuple(fc_features)[-1], pool5=tuple(pool5), dense_fc=True)


def overfeat_fast(*, dtype: Dtype = jnp.float32, **kw) -> BackboneParts:
  """OverFeat's fast model: 231x231 input, conv5 1024 x 12 x 12, pool5 6 x 6, fc 3072, 4096."""
  kw = {"convs": OVERFEAT_FAST_CONVS, "pool5": (2, 2, 0), "fc_features": (3072, 4096), **kw}
  return alexnet(dtype=dtype, **kw)


def zf(*, dtype: Dtype = jnp.float32, **kw) -> BackboneParts:
  """ZF net shapes (Fast/Faster R-CNN's ZF): 7x7/2 conv1, 5x5/2 conv2, pool5 3x3/2 pad 1."""
  kw = {"convs": ZF_CONVS, "pool5": (3, 2, 1), **kw}
  return alexnet(dtype=dtype, **kw)


def vgg16(*, dtype: Dtype = jnp.float32, stages: Sequence[Sequence[int]] = VGG16_STAGES,
          fc_features: Sequence[int] = (4096, 4096), roi_size: int = 7,
          dropout_rate: float = 0.5) -> BackboneParts:
  """torchvision's vgg16 (no batch norm): conv5_3 at stride 16, pool5, fc6, fc7 on 7x7x512."""
  stages = tuple(tuple(s) for s in stages)
  return BackboneParts(
      conv=VGGConv(stages, dtype=dtype),
      fc=DenseHead(tuple(fc_features), roi_size, dropout_rate, dtype=dtype),
      stride=2 ** (len(stages) - 1), out_channels=stages[-1][-1], roi_size=roi_size,
      fc_dim=tuple(fc_features)[-1], pool5=(2, 2, 0), dense_fc=True)


def resnet50(*, dtype: Dtype = jnp.float32, blocks: Sequence[int] = (3, 4, 6, 3),
             widths: Sequence[int] = (64, 128, 256, 512), frozen_bn: bool = False,
             roi_size: int = 14) -> BackboneParts:
  """torchvision's resnet50: C4 (layer3, 1024 ch, stride 16) | layer4 + average pool (2048)."""
  blocks, widths = tuple(blocks), tuple(widths)
  return BackboneParts(
      conv=ResNetConv(blocks, widths, frozen_bn, dtype=dtype),
      fc=ResNetHead(blocks, widths, frozen_bn, dtype=dtype),
      stride=16, out_channels=4 * widths[2], roi_size=roi_size, fc_dim=4 * widths[3],
      pool5=None, dense_fc=False)


def yolo20(*, dtype: Dtype = jnp.float32, layers: Sequence[Any] = YOLO20_LAYERS
           ) -> BackboneParts:
  """YOLO v1's 20 pretrained conv layers (stride 32, 1024 channels); as a classifier (the
  paper's ImageNet pretraining at 224): conv -> global average pool -> linear. No
  torchvision weights exist: pretrain it with the classify system (experiments/configs/
  classify.py, backbone "yolo20")."""
  layers = tuple(tuple(s) if s != "M" else s for s in layers)
  stride = math.prod(2 if s == "M" else s[2] for s in layers)
  width = [s for s in layers if s != "M"][-1][1]
  return BackboneParts(conv=DarknetConv(layers, dtype=dtype), fc=GlobalAvgPool(),
                       stride=stride, out_channels=width, roi_size=7, fc_dim=width,
                       pool5=None, dense_fc=False)


BACKBONES: dict[str, Callable[..., BackboneParts]] = {
    "tiny": tiny,
    "alexnet": alexnet,
    "overfeat_fast": overfeat_fast,
    "zf": zf,
    "vgg16": vgg16,
    "resnet50": resnet50,
    "yolo20": yolo20,
}


def get_backbone(name: str, *, dtype: Dtype = jnp.float32, **kw) -> BackboneParts:
  """The parts of backbone `name` (a key of `BACKBONES`); `kw` go to its constructor."""
  if name not in BACKBONES:
    raise ValueError(f"name: expected one of {sorted(BACKBONES)}, got {name!r}")
  return BACKBONES[name](dtype=dtype, **kw)


# ----------------------------------------------------------------------------- classifier


class Classifier(nn.Module):
  """The classification network of a backbone: conv -> pool5 -> adaptive pool -> fc -> linear.

  Built by `classifier(parts, num_classes)`. Parameters: {"conv": ..., "fc": ..., "head":
  {"kernel", "bias"}} (+ "batch_stats" for ResNet).

  With `as_conv=True` (OverFeat) the fc part runs as convolutions, the head is a 1x1 conv and
  there is no adaptive pooling: images f[B, H, W, 3] -> logits f[B, h, w, num_classes], one per
  window of the training input size, windows `stride * pool5 stride` pixels apart.
  Otherwise images f[B, H, W, 3] -> logits f[B, num_classes].
  """
  conv: nn.Module
  fc: nn.Module
  num_classes: int
  roi_size: int
  pool5: tuple[int, int, int] | None = None
  dense_fc: bool = True
  as_conv: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    f = self.conv(x, train=train)
    if self.pool5 is not None:
      f = max_pool(f, *self.pool5)
    if self.as_conv:
      h = self.fc(f, train=train)
      return nn.Conv(self.num_classes, (1, 1), dtype=self.dtype, name="head")(h)
    if self.dense_fc:
      f = adaptive_avg_pool(f, self.roi_size)
    h = self.fc(f, train=train)
    return nn.Dense(self.num_classes, dtype=self.dtype, name="head")(h)


def classifier(parts: BackboneParts, num_classes: int, *, as_conv: bool = False) -> Classifier:
  """The `Classifier` over `parts`; `as_conv=True` gives the dense (OverFeat) form."""
  checks.check_positive("num_classes", num_classes)
  if as_conv and not parts.dense_fc:
    raise ValueError("as_conv: this backbone's fc part has no Dense layers to run as "
                     "convolutions (dense_fc=False)")
  fc = parts.fc.clone(as_conv=True) if as_conv else parts.fc.clone()
  return Classifier(parts.conv.clone(), fc, num_classes, parts.roi_size, parts.pool5,
                    parts.dense_fc, as_conv, dtype=parts.conv.dtype)


def _fc_index(name: str) -> int:
  return int(name[2:]) if name.startswith("fc") and name[2:].isdigit() else -1


def fc_to_conv_params(params: dict, *, roi_size: int) -> dict:
  """Reshapes a Dense fc part's weights into the kernels of its convolutional form.

  Kernel layout: Dense kernels are (in, out) with the first layer's `in` flattened in (H, W, C)
  order; conv kernels are HWIO. So fc6 (roi*roi*C, D) -> (roi, roi, C, D) by a plain reshape,
  and later layers (D_in, D_out) -> (1, 1, D_in, D_out); biases are unchanged.

  Args:
    params: a `Classifier`'s params {"conv", "fc": {"fc6", "fc7", ...}, "head"} (the head
      becomes a 1x1 conv), or a `DenseHead`'s params {"fc6", "fc7", ...} alone.
    roi_size: the fc part's input size.
  Returns:
    The same tree for `classifier(parts, n, as_conv=True)` (or `DenseHead(as_conv=True)`).
  """
  checks.check_positive("roi_size", roi_size)
  if "fc" in params:
    out = dict(params)
    out["fc"] = fc_to_conv_params(params["fc"], roi_size=roi_size)
    if "head" in params:
      k = params["head"]["kernel"]
      out["head"] = {**params["head"], "kernel": k.reshape(1, 1, *k.shape)}
    return out
  names = sorted((n for n in params if _fc_index(n) >= 0), key=_fc_index)
  if not names or len(names) != len(params):
    raise ValueError(f"params: expected a Classifier's params or fc layers named fc6, fc7, ..., "
                     f"got keys {sorted(params)}")
  out = {}
  for i, name in enumerate(names):
    k = params[name]["kernel"]
    if k.ndim != 2:
      raise ValueError(f"params[{name!r}]['kernel']: expected a Dense kernel (in, out), got "
                       f"shape {tuple(k.shape)}")
    if i == 0:
      if k.shape[0] % (roi_size * roi_size):
        raise ValueError(f"params[{name!r}]['kernel']: input size {k.shape[0]} is not a "
                         f"multiple of roi_size^2 = {roi_size * roi_size}")
      k = k.reshape(roi_size, roi_size, k.shape[0] // (roi_size * roi_size), k.shape[1])
    else:
      k = k.reshape(1, 1, *k.shape)
    out[name] = {**params[name], "kernel": k}
  return out
