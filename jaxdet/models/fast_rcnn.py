"""Fast R-CNN (Girshick, "Fast R-CNN", ICCV 2015): one conv pass, RoI pooling, multi-task loss.

The whole image goes through the backbone's conv layers once (stride 16); each region proposal
is max-pooled from the feature map to roi_size x roi_size (`jaxdet.ops.roi_pool.roi_pool`,
vmapped over images), passed through the backbone's fc layers, and two sibling heads give
(C + 1)-way softmax scores and class-specific box deltas. Parts:

* `FastRCNNNet`: the network (`features`, `head`, `predictor` methods; `__call__` runs all).
* `sample_rois`: hierarchical sampling for one image: match proposals (plus the ground truth)
  to ground truth by IoU, draw `rois_per_image` RoIs with at most 25% foreground (IoU >= 0.5)
  and background IoU in [0.1, 0.5), encode normalised box targets (means 0, stds
  (0.1, 0.1, 0.2, 0.2)).
* `jaxdet.losses.fast_rcnn_loss`: log loss + lambda * box loss (smooth L1 unless the config
  names another: "l2", "giou" or "package.module:function").
* `score_proposals` (via `build_system(...).extras`): softmax scores and class-specific boxes
  of every proposal, at one scale or over an image pyramid (each RoI pooled at the scale where
  its area is closest to `ms_target_size`^2 pixels, as in the paper); `predict`: per-class NMS
  (0.3) and the best `max_detections`.
* `truncated_svd`: the post-training transform of fc6, fc7, ... into two thinner layers each
  (W ~ U_t S_t V_t^T), which `predict` runs as such.
* `build_system(config)`: the `jaxdet.system.System`.

Classes: background is class 0 of the softmax internally; object class c of the data is
softmax class c + 1. Box deltas exist for the C object classes only (f[N, C, 4]); detections
carry the data's labels 0..C-1.

Proposals: `model.proposals = "batch"` reads the batch's `proposals` f32[B, P, 4] and
`proposal_mask` bool[B, P] (selective search, attached by the data pipeline); `"grid"` uses a
fixed multi-scale grid of boxes (sliding windows: `grid.scales` x `grid.ratios` every
`grid.stride` pixels, clipped to each image), which needs no precomputation.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxdet import checks, global_batch
from jaxdet import losses
from jaxdet.models import backbones
from jaxdet.models.settings import merge_settings
from jaxdet.ops import anchors as anchor_ops
from jaxdet.ops import box_coder
from jaxdet.ops import boxes as box_ops
from jaxdet.ops import matching, sampling
from jaxdet.ops.nms import multiclass_nms
from jaxdet.ops.roi_pool import roi_pool
from jaxdet.system import System
from jaxdet.models import init_from as init_from_lib

Array = jax.Array

MODEL_DEFAULTS: dict[str, Any] = {
    "num_classes": 6,            # C (background excluded)
    "backbone": "tiny",          # a key of jaxdet.models.backbones.BACKBONES
    "backbone_kw": {},           # keyword arguments of its constructor
    "pretrained": "",            # a torchvision weights file (jaxdet.models.torch_weights)
    "init_from": "",             # a finished classify run's workdir: conv + fc from its latest
                                 # checkpoint (jaxdet.models.init_from); "" = none
    "frozen": (),                # conv layer names kept at their values (VGG16: conv1_1..conv2_2)
    "dropout_rate": 0.5,
    "proposals": "batch",        # "batch" (batch["proposals"]) | "grid"
    "grid": {"scales": (24.0, 40.0, 64.0), "ratios": (0.5, 1.0, 2.0), "stride": 8},
    "sampler": {"rois_per_image": 64, "fg_fraction": 0.25, "fg_iou": 0.5,
                "bg_iou_high": 0.5, "bg_iou_low": 0.1, "add_gt": True},
    "box_stds": (0.1, 0.1, 0.2, 0.2),
    "loss": {"box_loss": "smooth_l1", "box_weight": 1.0},
    "svd_ranks": (0, 0),         # truncated_svd ranks of fc6, fc7, ... (0 = keep the layer)
    "test_scales": (1.0,),       # image pyramid factors of the batch image (1.0: single scale)
    "ms_target_size": 224.0,     # multi-scale: pool each RoI where its side is closest to this
    "predict": {"score_threshold": 0.01, "iou_threshold": 0.3, "max_detections": 100,
                "pre_nms_topk": 0},   # 0 = every (proposal, class) pair enters NMS
}


def model_config(config: Any) -> dict[str, Any]:
  """The model section of an experiment config over `MODEL_DEFAULTS` (a top-level
  `config.num_classes` wins over `config.model.num_classes`)."""
  model = config["model"] if "model" in config else {}
  cfg = merge_settings(MODEL_DEFAULTS, model, "config.model")
  if config.get("num_classes") is not None:
    cfg["num_classes"] = int(config["num_classes"])
  if cfg["proposals"] not in ("batch", "grid"):
    raise ValueError(f"config.model.proposals: expected 'batch' or 'grid', got "
                     f"{cfg['proposals']!r}")
  return cfg


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

  def __call__(self, images: Array, rois: Array, roi_mask: Array,
               train: bool = False) -> tuple[Array, Array]:
    """images f[B, H, W, 3] (normalised), rois f32[B, R, 4], roi_mask bool[B, R] ->
    (logits f32[B, R, C + 1], deltas f32[B, R, C, 4])."""
    pooled = self.pool(self.features(images, train), rois, roi_mask)
    b, r = rois.shape[:2]
    logits, deltas = self.head(pooled.reshape(b * r, *pooled.shape[2:]), train)
    return logits.reshape(b, r, -1), deltas.reshape(b, r, self.num_classes, 4)


def make_network(cfg: Mapping[str, Any], dtype: Any = jnp.float32
                 ) -> tuple[FastRCNNNet, backbones.BackboneParts]:
  """The network of a model config (see `MODEL_DEFAULTS`) and its backbone's parts."""
  kw = dict(cfg.get("backbone_kw", {}))
  if cfg.get("dropout_rate") is not None and cfg["backbone"] != "resnet50":
    kw.setdefault("dropout_rate", float(cfg["dropout_rate"]))
  parts = backbones.get_backbone(cfg["backbone"], dtype=dtype, **kw)
  net = FastRCNNNet(parts.conv.clone(), parts.fc.clone(), int(cfg["num_classes"]),
                    parts.stride, parts.roi_size, dtype=dtype)
  return net, parts


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


# ----------------------------------------------------------------------------- system


def _resize(images: Array, factor: float) -> tuple[Array, float]:
  """Bilinear resize of f[B, H, W, 3] by `factor` (static); returns (images, exact factor)."""
  if factor == 1.0:
    return images, 1.0
  b, h, w, c = images.shape
  nh = max(1, int(round(h * factor)))
  nw = max(1, int(round(w * factor)))
  out = jax.image.resize(images.astype(jnp.float32), (b, nh, nw, c), "linear", antialias=False)
  return out.astype(images.dtype), nh / h


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


def make_initializer(net: nn.Module, dtype: Any) -> Callable[[jax.Array, jax.Array], dict]:
  """Jitted (rng, images u8[B, H, W, 3]) -> variables of a RoI network called as
  net(x, rois f32[B, R, 4], roi_mask bool[B, R]) (Fast R-CNN's, and Faster R-CNN's subclass)."""
  @jax.jit
  def init(rng, images):
    x = backbones.normalize_images(images, dtype)
    rois = jnp.tile(jnp.asarray([[0.0, 0.0, 16.0, 16.0]]), (x.shape[0], 1, 1))
    return dict(net.init({"params": rng}, x, rois, jnp.ones(rois.shape[:2], bool)))
  return init


def load_backbone_weights(variables: dict, cfg: Mapping[str, Any]) -> dict:
  """Replaces the "conv" and "fc" params (and the backbone's other collections, e.g. ResNet's
  batch_stats) by those of cfg["pretrained"] (a local torchvision state dict) and/or of the
  finished classification run cfg["init_from"]; either may be empty
  (jaxdet.models.init_from.start_backbone)."""
  from jaxdet.models import init_from
  return init_from.start_backbone(variables, backbone=cfg["backbone"],
                                  backbone_kw=cfg["backbone_kw"], pretrained=cfg["pretrained"],
                                  init_from=cfg["init_from"])


def build_system(config: Any) -> System:
  """The Fast R-CNN System from an experiment config.

  Reads `config.model` (keys and defaults: `MODEL_DEFAULTS`) and `config.compute_dtype`.
  With `model.init_from` (a finished classify run's workdir, the same backbone), `init` takes
  the conv and fc layers from that run's latest checkpoint (jaxdet.models.init_from).
  extras: "network" (FastRCNNNet), "backbone" (BackboneParts), "model_config",
  "sample_rois" (one image; vmap it), "proposals" (batch -> (f32[B, P, 4], bool[B, P])),
  "score_proposals" (variables, batch -> scores f32[B, P, C + 1], boxes f32[B, P, C, 4],
  mask bool[B, P]), "truncated_svd" (variables, ranks=config's svd_ranks -> variables).
  """
  cfg = model_config(config)
  dtype = jnp.dtype(config.get("compute_dtype", "float32"))
  net, parts = make_network(cfg, dtype)
  c = int(cfg["num_classes"])
  checks.check_positive("config.model.num_classes", c)
  smp, loss_cfg, pred_cfg = cfg["sampler"], cfg["loss"], cfg["predict"]
  stds = tuple(float(s) for s in cfg["box_stds"])
  scales = tuple(float(s) for s in cfg["test_scales"])
  checks.check_positive("config.model.test_scales", scales)
  losses.resolve_loss(loss_cfg["box_loss"], losses.BOX_DELTA_LOSSES)   # fail early on typos
  sampler = functools.partial(
      sample_rois, rois_per_image=int(smp["rois_per_image"]),
      fg_fraction=float(smp["fg_fraction"]), fg_iou=float(smp["fg_iou"]),
      bg_iou_high=float(smp["bg_iou_high"]), bg_iou_low=float(smp["bg_iou_low"]),
      add_gt=bool(smp["add_gt"]), stds=stds)
  grid_cfg = cfg["grid"]

  def get_proposals(batch):
    checks.check_array("batch['image']", batch["image"], ndim=4, last_dim=3)
    if cfg["proposals"] == "grid":
      fn = functools.partial(grid_proposals, shape=tuple(batch["image"].shape[1:3]),
                             scales=grid_cfg["scales"], ratios=grid_cfg["ratios"],
                             stride=int(grid_cfg["stride"]))
      return jax.vmap(fn)(batch["image_size"])
    if "proposals" not in batch or "proposal_mask" not in batch:
      raise ValueError("batch: config.model.proposals = 'batch' needs 'proposals' f32[B, P, 4] "
                       "and 'proposal_mask' bool[B, P] (selective search through the data "
                       "pipeline), or set config.model.proposals = 'grid'")
    p, m = batch["proposals"], batch["proposal_mask"]
    checks.check_boxes("batch['proposals']", p, ndim=3)
    checks.check_mask("batch['proposal_mask']", m, "batch['proposals']", p.shape[:2])
    return p.astype(jnp.float32), m

  _init = make_initializer(net, dtype)

  def init(rng, batch):
    return load_backbone_weights(_init(rng, batch["image"]), cfg)

  def loss(variables, batch, rng):
    x = backbones.normalize_images(batch["image"], dtype)
    props, pmask = get_proposals(batch)
    b = x.shape[0]
    k_sample, k_drop = jax.random.split(rng)
    s = jax.vmap(sampler)(global_batch.example_keys(k_sample, b), props, pmask,
                          batch["boxes"], batch["labels"], batch["box_mask"])
    mutable = ["batch_stats"] if "batch_stats" in variables else False
    out = net.apply(variables, x, s["rois"], s["valid"], train=True,
                    rngs={"dropout": k_drop}, mutable=mutable)
    (logits, deltas), new_state = out if mutable else (out, {})
    r = s["rois"].shape[1]
    flat = lambda a: a.reshape(b * r, *a.shape[2:])   # noqa: E731
    value, metrics = losses.fast_rcnn_loss(
        flat(logits), flat(deltas), flat(s["labels"]), flat(s["targets"]), flat(s["valid"]),
        rois=flat(s["rois"]), stds=stds, box_loss=loss_cfg["box_loss"],
        box_weight=float(loss_cfg["box_weight"]))
    metrics["fast_rcnn/fg_iou"] = losses.masked_mean(s["iou"], s["valid"] & (s["labels"] > 0))
    return value, metrics, dict(new_state)

  def head(variables, pooled):
    """pooled f[N, r, r, C'] -> (logits, deltas); runs SVD-factored fc layers as such."""
    params = variables["params"]
    if is_factored(params):
      if not parts.dense_fc:
        raise ValueError("truncated SVD applies to Dense fc parts only")
      hidden = factored_fc(params["fc"], pooled, dtype)
      return net.apply(variables, hidden, method=FastRCNNNet.predictor)
    return net.apply(variables, pooled, method=FastRCNNNet.head)

  def score_proposals(variables, batch):
    x = backbones.normalize_images(batch["image"], dtype)
    props, pmask = get_proposals(batch)
    b, p = props.shape[:2]
    side = jnp.sqrt(box_ops.box_area(props))                              # [B, P]
    pooled = None
    best = None
    for level, factor in enumerate(scales):
      xs, exact = _resize(x, factor)
      feats = net.apply(variables, xs, method=FastRCNNNet.features)
      level_pool = net.apply(variables, feats, props * exact, pmask, exact,
                             method=FastRCNNNet.pool)                     # [B, P, r, r, C']
      if pooled is None:
        pooled, best = level_pool, jnp.abs(side * exact - cfg["ms_target_size"])
        continue
      dist = jnp.abs(side * exact - cfg["ms_target_size"])                # [B, P]
      take = dist < best
      pooled = jnp.where(take[..., None, None, None], level_pool, pooled)
      best = jnp.where(take, dist, best)
    logits, deltas = head(variables, pooled.reshape(b * p, *pooled.shape[2:]))
    scores = jax.nn.softmax(logits, axis=-1).reshape(b, p, c + 1)
    deltas = deltas.reshape(b, p, c, 4)
    boxes = box_coder.decode_boxes(deltas, props[:, :, None, :], stds=stds)  # [B, P, C, 4]
    size = batch["image_size"].astype(jnp.float32)
    boxes = jax.vmap(box_ops.clip_boxes)(boxes, size[:, 0], size[:, 1])
    return scores, boxes, pmask

  def predict(variables, batch):
    scores, boxes, pmask = score_proposals(variables, batch)
    post = functools.partial(
        multiclass_nms, iou_threshold=float(pred_cfg["iou_threshold"]),
        max_output=int(pred_cfg["max_detections"]),
        score_threshold=float(pred_cfg["score_threshold"]),
        pre_nms_topk=int(pred_cfg["pre_nms_topk"]) or None)
    return jax.vmap(lambda bx, sc, m: post(bx, sc[:, 1:], mask=m))(boxes, scores, pmask)

  def svd(variables, ranks=None):
    return truncated_svd(variables, cfg["svd_ranks"] if ranks is None else ranks)

  init_from_lib.check_frozen_loaded(cfg["frozen"], pretrained=cfg["pretrained"],
                                    init_from=cfg["init_from"])
  return System(name="fast_rcnn", num_classes=c, init=init, loss=loss, predict=predict,
                extras={"network": net, "backbone": parts, "model_config": cfg,
                        "sample_rois": sampler, "proposals": get_proposals,
                        "score_proposals": score_proposals, "head": head,
                        "truncated_svd": svd},
                param_labels=_frozen_labels(cfg["frozen"]))
