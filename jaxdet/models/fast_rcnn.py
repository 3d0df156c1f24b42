"""Fast R-CNN (Girshick, "Fast R-CNN", ICCV 2015): one conv pass, RoI pooling, multi-task loss.

The whole image goes through the backbone's conv layers once (stride 16); each region proposal
is max-pooled from the feature map to roi_size x roi_size (`jaxdet.ops.roi_pool.roi_pool`,
vmapped over images), passed through the backbone's fc layers, and two sibling heads give
(C + 1)-way class scores and class-specific box deltas. In the order of every detector:

1. `Settings` (sections `Sampler`, `Grid`, `Predict`, `Loss`), from `config.model`. The
   second-stage part (`SecondStage`: backbone, sampler, box coding, loss, predict) is shared
   with Faster R-CNN (`jaxdet.models.faster_rcnn`), which composes it.
2. `FastRCNNNet`: the network (`features`, `pool`, `head`, `predictor`, `roi_outputs`).
3. Targets: `sample_rois`, the hierarchical sampling of one image: match proposals (plus the
   ground truth) to ground truth by IoU, draw `rois_per_image` RoIs with at most 25%
   foreground (IoU >= 0.5) and background IoU in [0.1, 0.5), encode normalised box targets
   (means 0, stds (0.1, 0.1, 0.2, 0.2)); `sample_batch` over a batch. Proposals:
   `batch_proposals` (`model.proposals = "batch"`: the batch's `proposals` f32[B, P, 4] and
   `proposal_mask` bool[B, P], e.g. selective search; `"grid"`: `grid_proposals`, a fixed
   multi-scale grid of boxes, `grid.scales` x `grid.ratios` every `grid.stride` pixels).
4. Loss: `second_stage_loss`, the terms `loss/cls` (`config.model.loss.cls`, softmax
   cross-entropy) and `loss/box` (`config.model.loss.box`, smooth L1), by
   `jaxdet.losses.fast_rcnn_loss`; diagnostics `fast_rcnn/...`.
5. Post-processing: `score_boxes` (softmax scores, class-specific boxes decoded and clipped)
   and `postprocess` (per-class NMS 0.3, the best `max_detections`); `make_scorer` scores
   every proposal at one scale or over an image pyramid (each RoI pooled at the scale where
   its side is closest to `ms_target_size` pixels, as in the paper). `truncated_svd`: the
   post-training transform of fc6, fc7, ... into two thinner layers each (W ~ U_t S_t V_t^T),
   which `predict` runs as such (`make_head`).
6. `build_system(config)`: the `jaxdet.system.System`, with `Extras`.

Classes: background is class 0 of the softmax internally; object class c of the data is
softmax class c + 1. Box deltas exist for the C object classes only (f[N, C, 4]); detections
carry the data's labels 0..C-1.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from jaxdet import checks, global_batch
from jaxdet import losses
from jaxdet.models import backbones
from jaxdet.models import init_from as init_from_lib
from jaxdet.models import settings
from jaxdet.ops import anchors as anchor_ops
from jaxdet.ops import box_coder
from jaxdet.ops import boxes as box_ops
from jaxdet.ops import matching, sampling
from jaxdet.ops.nms import multiclass_nms
from jaxdet.ops.roi_pool import roi_pool
from jaxdet.system import System

Array = jax.Array

# ----------------------------------------------------------------------------- settings


@dataclasses.dataclass(frozen=True)
class Sampler(settings.Settings):
  """The RoI minibatch of one image (`sample_rois`), paper section 2.3."""
  rois_per_image: int = 64
  fg_fraction: float = 0.25
  fg_iou: float = 0.5
  bg_iou_high: float = 0.5
  bg_iou_low: float = 0.1
  add_gt: bool = True

  def validate(self, where: str) -> None:
    checks.check_positive(f"{where}.rois_per_image", self.rois_per_image)
    checks.check_fraction(f"{where}.fg_fraction", self.fg_fraction)
    checks.check_fraction(f"{where}.fg_iou", self.fg_iou)
    if not 0.0 <= self.bg_iou_low <= self.bg_iou_high <= 1.0:
      raise ValueError(f"{where}: expected 0 <= bg_iou_low <= bg_iou_high <= 1, got "
                       f"bg_iou_low {self.bg_iou_low}, bg_iou_high {self.bg_iou_high}")


@dataclasses.dataclass(frozen=True)
class Grid(settings.Settings):
  """`model.proposals = "grid"`: boxes of `scales` (pixels) x `ratios` (h / w) every `stride`."""
  scales: tuple = (24.0, 40.0, 64.0)
  ratios: tuple = (0.5, 1.0, 2.0)
  stride: int = 8

  def validate(self, where: str) -> None:
    checks.check_positive(f"{where}.scales", self.scales)
    checks.check_positive(f"{where}.ratios", self.ratios)
    checks.check_positive(f"{where}.stride", self.stride)


Predict = settings.NMSPredict   # test-time post-processing (`postprocess`): per-class NMS 0.3


@dataclasses.dataclass(frozen=True)
class Loss(settings.LossSettings):
  """The second stage's terms (`jaxdet.losses.fast_rcnn_loss`); the defaults are the paper's
  log loss and smooth L1 (lambda = 1)."""
  TERMS = {"cls": "class", "box": "box"}
  cls: str = "softmax_cross_entropy"
  cls_weight: float = 1.0
  box: str = "smooth_l1"
  box_weight: float = 1.0


@dataclasses.dataclass(frozen=True)
class SecondStage(settings.Settings):
  """The settings Fast and Faster R-CNN share: backbone, RoI sampling, box coding, the loss
  and post-processing."""
  num_classes: int = 6         # C (background excluded)
  backbone: str = "tiny"       # a key of jaxdet.models.backbones.BACKBONES
  backbone_kw: dict = dataclasses.field(default_factory=dict)   # its constructor's keywords
  pretrained: str = ""         # a torchvision weights file (jaxdet.models.torch_weights)
  init_from: str = ""          # a finished classify run's workdir: conv + fc from its latest
                               # checkpoint (jaxdet.models.init_from); "" = none
  frozen: tuple = ()           # conv layer names kept at their values (VGG16: conv1_1..conv2_2)
  dropout_rate: float = 0.5    # of the fc part (not ResNet-50's)
  sampler: Sampler = Sampler()
  box_stds: tuple = (0.1, 0.1, 0.2, 0.2)
  loss: Loss = Loss()
  predict: Predict = Predict()

  def validate(self, where: str) -> None:
    checks.check_positive(f"{where}.num_classes", self.num_classes)
    if len(self.box_stds) != 4:
      raise ValueError(f"{where}.box_stds: expected 4 numbers, got {self.box_stds!r}")
    checks.check_positive(f"{where}.box_stds", self.box_stds)
    checks.check_fraction(f"{where}.dropout_rate", self.dropout_rate, open_high=True)

  @property
  def stds(self) -> tuple[float, ...]:
    return tuple(float(s) for s in self.box_stds)


@dataclasses.dataclass(frozen=True)
class Settings(SecondStage):
  """Fast R-CNN's settings: the second stage, where proposals come from, truncated SVD and
  multi-scale testing."""
  proposals: str = "batch"     # "batch" (batch["proposals"]) | "grid"
  grid: Grid = Grid()
  svd_ranks: tuple = (0, 0)    # truncated_svd ranks of fc6, fc7, ... (0 = keep the layer)
  test_scales: tuple = (1.0,)  # image pyramid factors of the batch image (1.0: single scale)
  ms_target_size: float = 224.0   # multi-scale: pool each RoI where its side is closest

  def validate(self, where: str) -> None:
    super().validate(where)
    if self.proposals not in ("batch", "grid"):
      raise ValueError(f"{where}.proposals: expected 'batch' or 'grid', got "
                       f"{self.proposals!r}")
    checks.check_positive(f"{where}.svd_ranks", self.svd_ranks, allow_zero=True)
    checks.check_positive(f"{where}.test_scales", self.test_scales)


# ----------------------------------------------------------------------------- network


class FastRCNNNet(nn.Module):
  """Backbone conv part, RoI max pooling, backbone fc part, and the two sibling heads.

  Parameters: {"conv": backbone conv, "fc": {"fc6", "fc7", ...}, "cls_score": Dense(C + 1),
  "bbox_pred": Dense(4 C)}; the heads are initialised N(0, 0.01^2) and N(0, 0.001^2) as in the
  paper.

  Attributes:
    conv: the backbone's conv module (images -> features at `stride`).
    fc: the backbone's fc module (f[N, roi_size, roi_size, C'] -> f[N, D]).
    num_classes: C.
    stride: the conv features' stride in pixels.
    roi_size: the RoI pooling output size.
    dtype: compute dtype of the heads (the backbone modules carry their own).
  """
  conv: nn.Module
  fc: nn.Module
  num_classes: int
  stride: int
  roi_size: int
  dtype: Any = jnp.float32

  def setup(self):
    c = self.num_classes
    self.cls_score = nn.Dense(c + 1, dtype=self.dtype,
                              kernel_init=nn.initializers.normal(0.01))
    self.bbox_pred = nn.Dense(4 * c, dtype=self.dtype,
                              kernel_init=nn.initializers.normal(0.001))

  def features(self, images: Array, train: bool = False) -> Array:
    """Normalised images f[B, H, W, 3] -> conv features f[B, H/stride, W/stride, C']."""
    return self.conv(images, train=train)

  def pool(self, features: Array, rois: Array, roi_mask: Array,
           scale: float = 1.0) -> Array:
    """RoI max pooling per image: features f[B, h, w, C'], rois f32[B, R, 4] pixels of the
    image (the pyramid level `scale` times the batch image), roi_mask bool[B, R]
    -> f[B, R, roi_size, roi_size, C'] (zeros where masked)."""
    fn = functools.partial(roi_pool, output_size=self.roi_size,
                           spatial_scale=scale / self.stride)
    return jax.vmap(lambda f, r, m: fn(f, r, mask=m))(features, rois, roi_mask)

  def predictor(self, hidden: Array) -> tuple[Array, Array]:
    """fc output f[N, D] -> (logits f32[N, C + 1], deltas f32[N, C, 4])."""
    logits = self.cls_score(hidden).astype(jnp.float32)
    deltas = self.bbox_pred(hidden).astype(jnp.float32)
    return logits, deltas.reshape(hidden.shape[0], self.num_classes, 4)

  def head(self, pooled: Array, train: bool = False) -> tuple[Array, Array]:
    """Pooled regions f[N, roi_size, roi_size, C'] -> (logits, deltas) as `predictor`."""
    return self.predictor(self.fc(pooled, train=train))

  def roi_outputs(self, features: Array, rois: Array, roi_mask: Array,
                  train: bool = False) -> tuple[Array, Array]:
    """The second stage on given RoIs: features f[B, h, w, C'], rois f32[B, R, 4] pixels,
    roi_mask bool[B, R] -> (logits f32[B, R, C + 1], deltas f32[B, R, C, 4])."""
    pooled = self.pool(features, rois, roi_mask)
    b, r = rois.shape[:2]
    logits, deltas = self.head(pooled.reshape(b * r, *pooled.shape[2:]), train)
    return logits.reshape(b, r, -1), deltas.reshape(b, r, self.num_classes, 4)

  def __call__(self, images: Array, rois: Array, roi_mask: Array,
               train: bool = False) -> tuple[Array, Array]:
    """images f[B, H, W, 3] (normalised), rois f32[B, R, 4], roi_mask bool[B, R] ->
    (logits f32[B, R, C + 1], deltas f32[B, R, C, 4])."""
    return self.roi_outputs(self.features(images, train), rois, roi_mask, train)


def backbone_parts(s: SecondStage, dtype: Any) -> backbones.BackboneParts:
  """The backbone of the settings (its dropout is `s.dropout_rate` unless `backbone_kw` sets
  one; ResNet-50 has none)."""
  kw = dict(s.backbone_kw)
  if s.backbone != "resnet50":
    kw.setdefault("dropout_rate", float(s.dropout_rate))
  return backbones.get_backbone(s.backbone, dtype=dtype, **kw)


def make_network(s: Settings, dtype: Any = jnp.float32
                 ) -> tuple[FastRCNNNet, backbones.BackboneParts]:
  """The network of the settings and its backbone's parts."""
  parts = backbone_parts(s, dtype)
  net = FastRCNNNet(parts.conv.clone(), parts.fc.clone(), s.num_classes, parts.stride,
                    parts.roi_size, dtype=dtype)
  return net, parts


def make_initializer(net: nn.Module, dtype: Any) -> Callable[[jax.Array, jax.Array], dict]:
  """Jitted (rng, images u8[B, H, W, 3]) -> variables of a RoI network called as
  net(x, rois f32[B, R, 4], roi_mask bool[B, R]) (Fast R-CNN's, and Faster R-CNN's subclass)."""
  @jax.jit
  def init(rng, images):
    x = backbones.normalize_images(images, dtype)
    rois = jnp.tile(jnp.asarray([[0.0, 0.0, 16.0, 16.0]]), (x.shape[0], 1, 1))
    return dict(net.init({"params": rng}, x, rois, jnp.ones(rois.shape[:2], bool)))
  return init


def load_backbone_weights(variables: dict, s: SecondStage) -> dict:
  """Replaces the "conv" and "fc" params (and the backbone's other collections, e.g. ResNet's
  batch_stats) by those of `s.pretrained` (a local torchvision state dict) and/or of the
  finished classification run `s.init_from`; either may be empty
  (jaxdet.models.init_from.start_backbone)."""
  return init_from_lib.start_backbone(variables, backbone=s.backbone,
                                      backbone_kw=s.backbone_kw, pretrained=s.pretrained,
                                      init_from=s.init_from)


# ----------------------------------------------------------------------------- sampling


def sample_rois(key: Array, proposals: Array, proposal_mask: Array, gt_boxes: Array,
                gt_labels: Array, gt_mask: Array, *, rois_per_image: int = 64,
                fg_fraction: float = 0.25, fg_iou: float = 0.5, bg_iou_high: float = 0.5,
                bg_iou_low: float = 0.1, add_gt: bool = True,
                stds: Sequence[float] = (0.1, 0.1, 0.2, 0.2)) -> dict[str, Array]:
  """Fast R-CNN's RoI minibatch of one image (section 2.3, "Mini-batch sampling").

  Candidates are the proposals (and the real ground-truth boxes when `add_gt`, as in the
  paper's training set-up). Each takes its best-overlapping ground truth: foreground when
  IoU >= fg_iou, background when bg_iou_low <= IoU < bg_iou_high, ignored otherwise. At most
  floor(rois_per_image * fg_fraction) foreground RoIs are drawn uniformly, background fills the
  rest (`jaxdet.ops.sampling.sample_balanced`); too few candidates leave padding.

  Args:
    key: PRNG key.
    proposals: f32[P, 4] (x1, y1, x2, y2) pixels; proposal_mask: bool[P].
    gt_boxes: f32[M, 4]; gt_labels: int[M] in [0, C); gt_mask: bool[M].
    rois_per_image: R, the minibatch size per image (static).
    fg_fraction, fg_iou, bg_iou_high, bg_iou_low: the sampling rule.
    add_gt: add the ground-truth boxes to the candidates.
    stds: the normalisation of the box targets (means 0).
  Returns:
    {"rois": f32[R, 4], "labels": i32[R] (0 background, c + 1 object class c),
     "targets": f32[R, 4] normalised deltas of the matched gt (0 for background),
     "valid": bool[R], "iou": f32[R] each RoI's best IoU with the ground truth}.
  """
  checks.check_boxes("proposals", proposals)
  checks.check_mask("proposal_mask", proposal_mask, "proposals", proposals.shape[:1])
  checks.check_boxes("gt_boxes", gt_boxes)
  checks.check_array("gt_labels", gt_labels, dtype_kind="iu", shape=gt_boxes.shape[:1])
  checks.check_mask("gt_mask", gt_mask, "gt_boxes", gt_boxes.shape[:1])
  cand = jax.lax.stop_gradient(proposals.astype(jnp.float32))
  cand_mask = proposal_mask
  if add_gt:
    cand = jnp.concatenate([cand, gt_boxes.astype(jnp.float32)])          # [P + M, 4]
    cand_mask = jnp.concatenate([proposal_mask, gt_mask])                 # [P + M]
  iou = box_ops.box_iou(cand, gt_boxes)                                   # [N, M]
  matched, max_iou, labels = matching.match_boxes(
      iou, gt_mask, high=fg_iou, low=bg_iou_high, negative_floor=bg_iou_low,
      row_mask=cand_mask)                                                 # [N] each
  idx, valid, is_fg = sampling.sample_balanced(key, labels, rois_per_image, fg_fraction)
  rois = cand[idx]                                                        # [R, 4]
  gt_idx = matched[idx]                                                   # [R]
  fg = valid & is_fg
  cls = jnp.where(fg, gt_labels.astype(jnp.int32)[gt_idx] + 1, 0)
  targets = box_coder.encode_boxes(gt_boxes.astype(jnp.float32)[gt_idx], rois,
                                   stds=tuple(stds))
  targets = jnp.where(fg[:, None], targets, 0.0)
  return {"rois": rois, "labels": cls.astype(jnp.int32), "targets": targets, "valid": valid,
          "iou": jnp.where(valid, max_iou[idx], 0.0)}


def roi_sampler(s: SecondStage) -> Callable[..., dict[str, Array]]:
  """`sample_rois` of one image with the settings' sampler and box coding."""
  return functools.partial(sample_rois, **dataclasses.asdict(s.sampler), stds=s.stds)


def sample_batch(sampler: Callable, key: Array, proposals: Array, proposal_mask: Array,
                 batch: Mapping[str, Array]) -> dict[str, Array]:
  """`sampler` (a `roi_sampler`) over a batch, one key per image by its global index:
  proposals f32[B, P, 4], proposal_mask bool[B, P] -> `sample_rois`'s entries with a leading
  B axis."""
  keys = global_batch.example_keys(key, proposals.shape[0])
  return jax.vmap(sampler)(keys, proposals, proposal_mask, batch["boxes"], batch["labels"],
                           batch["box_mask"])


# ----------------------------------------------------------------------------- proposals


def grid_proposals(image_size: Array, shape: tuple[int, int], *, scales: Sequence[float],
                   ratios: Sequence[float], stride: int) -> tuple[Array, Array]:
  """A fixed multi-scale grid of boxes for one image (sliding windows as proposals).

  Args:
    image_size: i32[2] (height, width) of the real pixels.
    shape: (H, W) of the (padded) batch image, static.
    scales, ratios: box sides (pixels) and aspect ratios h / w (`ops.anchors.base_anchors`).
    stride: pixels between box centres.
  Returns:
    (boxes f32[P, 4] clipped to the real image, mask bool[P] True where the box's centre lies
    in the real image), P = ceil(H / stride) * ceil(W / stride) * len(scales) * len(ratios).
  """
  h, w = shape
  base = anchor_ops.base_anchors(tuple(scales), tuple(ratios))
  grid = anchor_ops.grid_anchors(base, (-(-h // stride), -(-w // stride)), stride)
  size = image_size.astype(jnp.float32)
  centre = 0.5 * (grid[:, :2] + grid[:, 2:])
  mask = (centre[:, 0] < size[1]) & (centre[:, 1] < size[0])
  return box_ops.clip_boxes(grid, size[0], size[1]), mask


def batch_proposals(s: Settings, batch: Mapping[str, Array]) -> tuple[Array, Array]:
  """The proposals of a batch: (f32[B, P, 4], bool[B, P]), from the batch or the grid."""
  checks.check_array("batch['image']", batch["image"], ndim=4, last_dim=3)
  if s.proposals == "grid":
    fn = functools.partial(grid_proposals, shape=tuple(batch["image"].shape[1:3]),
                           scales=s.grid.scales, ratios=s.grid.ratios, stride=s.grid.stride)
    return jax.vmap(fn)(batch["image_size"])
  if "proposals" not in batch or "proposal_mask" not in batch:
    raise ValueError("batch: config.model.proposals = 'batch' needs 'proposals' f32[B, P, 4] "
                     "and 'proposal_mask' bool[B, P] (selective search through the data "
                     "pipeline), or set config.model.proposals = 'grid'")
  p, m = batch["proposals"], batch["proposal_mask"]
  checks.check_boxes("batch['proposals']", p, ndim=3)
  checks.check_mask("batch['proposal_mask']", m, "batch['proposals']", p.shape[:2])
  return p.astype(jnp.float32), m


# ----------------------------------------------------------------------------- truncated SVD


def _fc_names(fc_params: Mapping[str, Any]) -> list[str]:
  names = [n for n in fc_params if n.startswith("fc") and n[2:].isdigit()]
  if len(names) != len(fc_params) or not names:
    raise ValueError(f"params['fc']: expected Dense layers fc6, fc7, ..., got "
                     f"{sorted(fc_params)}")
  return sorted(names, key=lambda n: int(n[2:]))


def truncated_svd(variables: Mapping[str, Any], ranks: Sequence[int]) -> dict[str, Any]:
  """Fast R-CNN's truncated SVD (section 3.1) of the fc layers, a post-training transform.

  A Dense kernel W f32[u, v] (x @ W + b) becomes W ~ (U_t S_t) V_t^T: a layer f32[u, t] without
  bias followed by f32[t, v] with the bias, u v -> t (u + v) parameters. The layer's params
  {"kernel", "bias"} become {"u": U_t S_t, "v": V_t^T, "bias"}; `predict` runs either form.

  Args:
    variables: {"params": {"fc": {"fc6": {"kernel", "bias"}, ...}, ...}, ...}.
    ranks: t for fc6, fc7, ... in order (paper VGG16: 1024, 256); 0 keeps the layer.
  Returns:
    New variables (the input is unchanged). At t = min(u, v) the product is W up to rounding.
  """
  params = variables["params"]
  if "fc" not in params:
    raise ValueError(f"variables: expected params with an 'fc' part, got {sorted(params)}")
  fc = dict(params["fc"])
  names = _fc_names(fc)
  ranks = tuple(int(t) for t in ranks)
  if len(ranks) > len(names):
    raise ValueError(f"ranks: expected at most {len(names)} ranks for {names}, got {ranks}")
  for name, t in zip(names, ranks):
    if t == 0:
      continue
    layer = fc[name]
    if "kernel" not in layer:
      raise ValueError(f"params['fc'][{name!r}]: already factored (keys {sorted(layer)})")
    k = jnp.asarray(layer["kernel"], jnp.float32)
    if not 0 < t <= min(k.shape):
      raise ValueError(f"ranks: rank {t} of {name} must lie in [1, {min(k.shape)}] for its "
                       f"kernel of shape {tuple(k.shape)}")
    u, s, vt = jnp.linalg.svd(k, full_matrices=False)
    fc[name] = {"u": u[:, :t] * s[:t], "v": vt[:t], "bias": layer["bias"]}
  return {**variables, "params": {**params, "fc": fc}}


def is_factored(params: Mapping[str, Any]) -> bool:
  """True when some fc layer of `params` holds truncated-SVD factors."""
  return any("u" in layer for layer in params.get("fc", {}).values())


def factored_fc(fc_params: Mapping[str, Any], x: Array, dtype: Any = jnp.float32) -> Array:
  """The Dense fc part at test time (no dropout), with plain or SVD-factored layers.

  x f[N, roi, roi, C'] (flattened in (H, W, C) order as `DenseHead`) -> f[N, D]; each layer is
  relu(x @ kernel + bias) or relu((x @ u) @ v + bias), computed in `dtype`.
  """
  x = x.reshape(x.shape[0], -1).astype(dtype)
  for name in _fc_names(fc_params):
    p = fc_params[name]
    if "u" in p:
      x = (x @ p["u"].astype(dtype)) @ p["v"].astype(dtype)
    else:
      x = x @ p["kernel"].astype(dtype)
    x = nn.relu(x + p["bias"].astype(dtype))
  return x


# ----------------------------------------------------------------------------- loss


def second_stage_loss(logits: Array, deltas: Array, samples: Mapping[str, Array],
                      s: SecondStage) -> tuple[Array, dict[str, Array]]:
  """The terms `loss/cls` and `loss/box` of the sampled RoIs (`jaxdet.losses.fast_rcnn_loss`
  with the settings' terms and weights) and the diagnostic `fast_rcnn/fg_iou`.

  Args:
    logits: f32[B, R, C + 1]; deltas: f32[B, R, C, 4] (`FastRCNNNet.roi_outputs`).
    samples: `sample_batch`'s {"rois", "labels", "targets", "valid", "iou"}, each [B, R, ...].
    s: the settings.
  Returns:
    (loss f32[], metrics).
  """
  flat = lambda a: a.reshape(-1, *a.shape[2:])   # noqa: E731
  value, metrics = losses.fast_rcnn_loss(
      flat(logits), flat(deltas), flat(samples["labels"]), flat(samples["targets"]),
      flat(samples["valid"]), rois=flat(samples["rois"]), stds=s.stds,
      cls_term=s.loss.fn("cls"), cls_weight=s.loss.weight("cls"),
      box_term=s.loss.fn("box"), box_weight=s.loss.weight("box"))
  metrics["fast_rcnn/fg_iou"] = losses.masked_mean(
      samples["iou"], samples["valid"] & (samples["labels"] > 0))
  return value, metrics


def make_loss(s: Settings, net: FastRCNNNet, dtype: Any) -> Callable:
  """System.loss: (variables, batch, rng) -> (loss, metrics, new_model_state)."""
  sampler = roi_sampler(s)

  def loss(variables, batch, rng):
    x = backbones.normalize_images(batch["image"], dtype)
    props, pmask = batch_proposals(s, batch)
    k_sample, k_drop = jax.random.split(rng)
    samples = sample_batch(sampler, k_sample, props, pmask, batch)
    mutable = ["batch_stats"] if "batch_stats" in variables else False
    out = net.apply(variables, x, samples["rois"], samples["valid"], train=True,
                    rngs={"dropout": k_drop}, mutable=mutable)
    (logits, deltas), new_state = out if mutable else (out, {})
    value, metrics = second_stage_loss(logits, deltas, samples, s)
    return value, metrics, dict(new_state)
  return loss


# ----------------------------------------------------------------------------- post-processing


def score_boxes(logits: Array, deltas: Array, rois: Array, image_size: Array,
                stds: Sequence[float]) -> tuple[Array, Array]:
  """Class scores and class-specific boxes of RoIs.

  Args:
    logits: f32[B * P, C + 1]; deltas: f32[B * P, C, 4] (the head's, RoIs flattened).
    rois: f32[B, P, 4] pixels; image_size: i32[B, 2] (height, width) of the real pixels.
    stds: the box coding's.
  Returns:
    scores f32[B, P, C + 1] (softmax, column 0 = background), boxes f32[B, P, C, 4] decoded
    about the RoIs and clipped to the real pixels.
  """
  b, p = rois.shape[:2]
  c = deltas.shape[-2]
  scores = jax.nn.softmax(logits, axis=-1).reshape(b, p, c + 1)
  boxes = box_coder.decode_boxes(deltas.reshape(b, p, c, 4), rois[:, :, None, :],
                                 stds=tuple(stds))                       # [B, P, C, 4]
  size = image_size.astype(jnp.float32)
  return scores, jax.vmap(box_ops.clip_boxes)(boxes, size[:, 0], size[:, 1])


def postprocess(scores: Array, boxes: Array, mask: Array, p: Predict) -> dict[str, Array]:
  """Detections of a batch: per-class NMS and the best `p.max_detections`.

  scores f32[B, P, C + 1], boxes f32[B, P, C, 4], mask bool[B, P] -> {"boxes", "scores",
  "labels" (0..C-1), "valid"}, each [B, K, ...].
  """
  post = functools.partial(multiclass_nms, iou_threshold=p.iou_threshold,
                           max_output=p.max_detections, score_threshold=p.score_threshold,
                           pre_nms_topk=p.pre_nms_topk or None)
  return jax.vmap(lambda bx, sc, m: post(bx, sc[:, 1:], mask=m))(boxes, scores, mask)


def make_head(net: FastRCNNNet, parts: backbones.BackboneParts, dtype: Any) -> Callable:
  """(variables, pooled f[N, r, r, C']) -> (logits, deltas); runs SVD-factored fc layers
  (`truncated_svd`) as such."""
  def head(variables, pooled):
    params = variables["params"]
    if is_factored(params):
      if not parts.dense_fc:
        raise ValueError("truncated SVD applies to Dense fc parts only")
      hidden = factored_fc(params["fc"], pooled, dtype)
      return net.apply(variables, hidden, method=FastRCNNNet.predictor)
    return net.apply(variables, pooled, method=FastRCNNNet.head)
  return head


def _resize(images: Array, factor: float) -> tuple[Array, float]:
  """Bilinear resize of f[B, H, W, 3] by `factor` (static); returns (images, exact factor)."""
  if factor == 1.0:
    return images, 1.0
  b, h, w, c = images.shape
  nh = max(1, int(round(h * factor)))
  nw = max(1, int(round(w * factor)))
  out = jax.image.resize(images.astype(jnp.float32), (b, nh, nw, c), "linear", antialias=False)
  return out.astype(images.dtype), nh / h


def make_scorer(s: Settings, net: FastRCNNNet, head: Callable, dtype: Any) -> Callable:
  """(variables, batch) -> (scores f32[B, P, C + 1], boxes f32[B, P, C, 4], mask bool[B, P])
  of every proposal, at `s.test_scales` (each RoI pooled at the level where its side is
  closest to `s.ms_target_size`)."""
  def score_proposals(variables, batch):
    x = backbones.normalize_images(batch["image"], dtype)
    props, pmask = batch_proposals(s, batch)
    b, p = props.shape[:2]
    side = jnp.sqrt(box_ops.box_area(props))                              # [B, P]
    pooled = best = None
    for factor in s.test_scales:
      xs, exact = _resize(x, float(factor))
      feats = net.apply(variables, xs, method=FastRCNNNet.features)
      level_pool = net.apply(variables, feats, props * exact, pmask, exact,
                             method=FastRCNNNet.pool)                     # [B, P, r, r, C']
      dist = jnp.abs(side * exact - s.ms_target_size)                     # [B, P]
      if pooled is None:
        pooled, best = level_pool, dist
        continue
      take = dist < best
      pooled = jnp.where(take[..., None, None, None], level_pool, pooled)
      best = jnp.where(take, dist, best)
    logits, deltas = head(variables, pooled.reshape(b * p, *pooled.shape[2:]))
    scores, boxes = score_boxes(logits, deltas, props, batch["image_size"], s.stds)
    return scores, boxes, pmask
  return score_proposals


# ----------------------------------------------------------------------------- system


def _frozen_labels(frozen: Sequence[str]):
  frozen = tuple(frozen)

  def labels(params):
    conv = set(params.get("conv", {}))
    missing = sorted(set(frozen) - conv)
    if missing:
      raise ValueError(f"config.model.frozen: unknown conv layers {missing}; the backbone has "
                       f"{sorted(conv)}")
    flat = traverse_util.flatten_dict(params)
    out = {k: "frozen" if k[0] == "conv" and k[1] in frozen else "train" for k in flat}
    return traverse_util.unflatten_dict(out)
  return labels if frozen else None


@dataclasses.dataclass(frozen=True)
class Extras:
  """Fast R-CNN's parts for experiments and tools (`System.extras`).

  Attributes:
    settings: the merged `Settings`.
    network: the `FastRCNNNet`; backbone: its `BackboneParts`.
    sample_rois: `sample_rois` of one image with the settings (vmap it).
    proposals: batch -> (f32[B, P, 4], bool[B, P]) (`batch_proposals`).
    score_proposals: (variables, batch) -> (scores f32[B, P, C + 1], boxes f32[B, P, C, 4],
      mask bool[B, P]) (`make_scorer`).
    head: (variables, pooled f[N, r, r, C']) -> (logits, deltas), SVD-factored or not.
    truncated_svd: (variables, ranks=settings.svd_ranks) -> variables (`truncated_svd`).
  """
  settings: Settings
  network: FastRCNNNet
  backbone: backbones.BackboneParts
  sample_rois: Callable
  proposals: Callable
  score_proposals: Callable
  head: Callable
  truncated_svd: Callable


def build_system(config: Any) -> System:
  """The Fast R-CNN System from an experiment config (`config.model`: `Settings`;
  `config.compute_dtype`). With `model.init_from` (a finished classify run's workdir, the same
  backbone), `init` takes the conv and fc layers from that run's latest checkpoint."""
  s = Settings.from_config(config)
  init_from_lib.check_frozen_loaded(s.frozen, pretrained=s.pretrained, init_from=s.init_from)
  dtype = jnp.dtype(config.get("compute_dtype", "float32"))
  net, parts = make_network(s, dtype)
  initializer = make_initializer(net, dtype)
  head = make_head(net, parts, dtype)
  score_proposals = make_scorer(s, net, head, dtype)

  def init(rng, batch):
    return load_backbone_weights(initializer(rng, batch["image"]), s)

  def predict(variables, batch):
    return postprocess(*score_proposals(variables, batch), s.predict)

  def svd(variables, ranks=None):
    return truncated_svd(variables, s.svd_ranks if ranks is None else ranks)

  extras = Extras(settings=s, network=net, backbone=parts, sample_rois=roi_sampler(s),
                  proposals=functools.partial(batch_proposals, s),
                  score_proposals=score_proposals, head=head, truncated_svd=svd)
  return System(name="fast_rcnn", num_classes=s.num_classes, init=init,
                loss=make_loss(s, net, dtype), predict=predict, extras=extras,
                param_labels=_frozen_labels(s.frozen))
