"""Faster R-CNN (Ren et al., NIPS 2015): a Region Proposal Network on the shared conv features,
otherwise Fast R-CNN.

One backbone conv pass gives the feature map; the RPN head (`jaxdet.models.rpn.RPNHead`) scores
the anchors of every cell and the proposal layer (`rpn.propose`, inside the jitted step, no
host round trip) turns them into a fixed number of proposals; the Fast R-CNN second stage
(`jaxdet.models.fast_rcnn`: RoI max pooling, fc layers, softmax + class-specific boxes, its
RoI sampling and multi-task loss) classifies them. Parts:

* `FasterRCNNNet`: `fast_rcnn.FastRCNNNet` plus the RPN head (and, for step 2 of the 4-step
  training, a separate proposal network).
* `build_system(config)`: the System. `config.model.stage` picks what the loss trains:
    "joint"          approximate joint training: RPN loss + Fast R-CNN loss in one step, no
                     gradient through the proposal coordinates (stop_gradient);
    "1_rpn"          4-step alternating training, step 1: the RPN (and the conv layers);
    "2_fast_rcnn"    step 2: Fast R-CNN (its own conv layers) on the proposals of the step-1
                     RPN, kept frozen as `params["proposal_conv"]`, `params["proposal_rpn"]`;
    "3_rpn"          step 3: the RPN's own layers, on the step-2 conv layers kept frozen;
    "4_fast_rcnn"    step 4: the Fast R-CNN fc layers and heads, shared conv and RPN frozen.
  The schedule itself (the four steps in order, each in its own workdir subfolder, each
  resumable, each starting from the previous steps' parameters) is orchestration above the
  model: `jaxdet.train.alternating.train_alternating`.

Classes: as Fast R-CNN (background is softmax class 0 internally; detections carry 0..C-1).
"""

from __future__ import annotations

import functools
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from jaxdet import checks, global_batch
from jaxdet import losses
from jaxdet.models import backbones
from jaxdet.models.settings import merge_settings
from jaxdet.models import fast_rcnn
from jaxdet.models import rpn as rpn_lib
from jaxdet.ops import box_coder
from jaxdet.ops import boxes as box_ops
from jaxdet.ops.nms import multiclass_nms
from jaxdet.system import System
from jaxdet.models import init_from as init_from_lib

Array = jax.Array

STAGES = ("joint", "1_rpn", "2_fast_rcnn", "3_rpn", "4_fast_rcnn")
# config.model.stage naming the whole 4-step schedule (run by jaxdet.train.alternating); the
# detector it leaves is the network of its last step.
ALTERNATING = "alternating"

_FAST_KEYS = ("num_classes", "backbone", "backbone_kw", "pretrained", "init_from", "frozen",
              "dropout_rate", "sampler", "box_stds", "loss", "svd_ranks", "predict")

MODEL_DEFAULTS: dict[str, Any] = {
    **{k: fast_rcnn.MODEL_DEFAULTS[k] for k in _FAST_KEYS},
    "stage": "joint",                     # one of STAGES, or ALTERNATING (all four steps)
    "alternating_steps": (),              # ALTERNATING: training steps of the 4 steps in
                                          # order; () = config.train.num_steps each
    "rpn_channels": 512,                  # the RPN's 3x3 conv (VGG16: 512)
    "anchor_scales": (128.0, 256.0, 512.0),
    "anchor_ratios": (0.5, 1.0, 2.0),
    "rpn_targets": dict(rpn_lib.TARGET_DEFAULTS),
    "rpn_proposals": {k: dict(v) for k, v in rpn_lib.PROPOSAL_DEFAULTS.items()},
    "rpn_loss": {"box_weight": 1.0, "beta": 1.0 / 9.0},
}
# The second stage trains on 128 RoIs per image in the paper (batch 2 x 128).
MODEL_DEFAULTS["sampler"] = {**MODEL_DEFAULTS["sampler"], "rois_per_image": 128}


def model_config(config: Any) -> dict[str, Any]:
  """config.model over `MODEL_DEFAULTS` (unknown keys raise); top-level num_classes wins."""
  model = config["model"] if "model" in config else {}
  cfg = merge_settings(MODEL_DEFAULTS, model, "config.model")
  if config.get("num_classes") is not None:
    cfg["num_classes"] = int(config["num_classes"])
  if cfg["stage"] not in STAGES + (ALTERNATING,):
    raise ValueError(f"config.model.stage: expected one of {STAGES + (ALTERNATING,)}, "
                     f"got {cfg['stage']!r}")
  steps = tuple(cfg["alternating_steps"])
  if steps and (len(steps) != len(STAGES) - 1 or not all(
      isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in steps)):
    raise ValueError(f"config.model.alternating_steps: expected () or {len(STAGES) - 1} "
                     f"positive ints (steps of {STAGES[1:]}), got {cfg['alternating_steps']!r}")
  return cfg


class FasterRCNNNet(fast_rcnn.FastRCNNNet):
  """`FastRCNNNet` (conv, RoI pool, fc, cls_score, bbox_pred) plus the RPN head.

  Parameters: those of FastRCNNNet, "rpn" (the RPN head), and with `separate_proposals` a
  second conv part "proposal_conv" and head "proposal_rpn" (step 2 of the 4-step training).

  Attributes (besides FastRCNNNet's):
    num_anchors: k; rpn_channels: the RPN's 3x3 conv width.
    separate_proposals: proposals come from a network of their own.
    proposal_conv: that network's conv module (a clone of `conv`), or None.
  """
  num_anchors: int = 9
  rpn_channels: int = 512
  proposal_conv: nn.Module | None = None

  def setup(self):
    super().setup()
    self.rpn = rpn_lib.RPNHead(self.num_anchors, self.rpn_channels, self.dtype)
    if self.proposal_conv is not None:
      self.proposal_rpn = rpn_lib.RPNHead(self.num_anchors, self.rpn_channels, self.dtype)

  def rpn_outputs(self, features: Array) -> tuple[Array, Array]:
    """features f[B, h, w, C'] -> (logits f32[B, A], deltas f32[B, A, 4]), A = h * w * k."""
    return self.rpn(features)

  def proposal_outputs(self, images: Array, features: Array) -> tuple[Array, Array]:
    """The RPN outputs proposals are drawn from: the separate network's (on the images) when
    there is one, else the RPN head's on the shared features."""
    if self.proposal_conv is None:
      return self.rpn(features)
    return self.proposal_rpn(self.proposal_conv(images, train=False))

  def __call__(self, images: Array, rois: Array, roi_mask: Array, train: bool = False):
    """Touches every parameter (for init): returns Fast R-CNN's (logits, deltas) and the
    proposal network's RPN outputs."""
    features = self.features(images, train)
    out = self.rpn(features)
    if self.proposal_conv is not None:
      out = self.proposal_outputs(images, features)
    pooled = self.pool(features, rois, roi_mask)
    b, r = rois.shape[:2]
    logits, deltas = self.head(pooled.reshape(b * r, *pooled.shape[2:]), train)
    return logits.reshape(b, r, -1), deltas.reshape(b, r, self.num_classes, 4), out


def make_network(cfg: Mapping[str, Any], dtype: Any = jnp.float32
                 ) -> tuple[FasterRCNNNet, backbones.BackboneParts]:
  """The network of a resolved model config and its backbone's parts."""
  kw = dict(cfg.get("backbone_kw", {}))
  if cfg["backbone"] != "resnet50":
    kw.setdefault("dropout_rate", float(cfg["dropout_rate"]))
  parts = backbones.get_backbone(cfg["backbone"], dtype=dtype, **kw)
  k = len(tuple(cfg["anchor_scales"])) * len(tuple(cfg["anchor_ratios"]))
  separate = cfg["stage"] == "2_fast_rcnn"
  net = FasterRCNNNet(parts.conv.clone(), parts.fc.clone(), int(cfg["num_classes"]),
                      parts.stride, parts.roi_size, dtype=dtype, num_anchors=k,
                      rpn_channels=int(cfg["rpn_channels"]),
                      proposal_conv=parts.conv.clone() if separate else None)
  return net, parts


# Which top-level parameter groups each stage trains (the rest stay at their values).
_TRAINED = {
    "joint": ("conv", "fc", "cls_score", "bbox_pred", "rpn"),
    "1_rpn": ("conv", "rpn"),
    "2_fast_rcnn": ("conv", "fc", "cls_score", "bbox_pred"),
    "3_rpn": ("rpn",),
    "4_fast_rcnn": ("fc", "cls_score", "bbox_pred"),
}


def _param_labels(stage: str, frozen_conv: tuple[str, ...]):
  trained = _TRAINED[stage]

  def labels(params):
    flat = traverse_util.flatten_dict(params)
    out = {}
    for k in flat:
      ok = k[0] in trained and not (k[0] == "conv" and k[1] in frozen_conv)
      out[k] = "train" if ok else "frozen"
    return traverse_util.unflatten_dict(out)
  return labels


def _settings(cfg: Mapping[str, Any], mode: str) -> dict[str, Any]:
  return rpn_lib.proposal_settings({"proposals": cfg["rpn_proposals"]}, mode)


def build_system(config: Any, *, init_params: Mapping[str, Any] | None = None) -> System:
  """The Faster R-CNN System from an experiment config.

  Reads `config.model` (keys and defaults: `MODEL_DEFAULTS`) and `config.compute_dtype`.

  Args:
    config: the experiment config.
    init_params: parameters to start from (a previous stage of the 4-step training): every
      top-level group present here replaces the freshly initialised one.
  Returns:
    the System; extras: "network", "backbone", "model_config", "anchors" (features ->
    f32[A, 4]), "proposals" (variables, batch -> rpn proposals dict, test settings),
    "conv" / "propose" / "detect" (the three parts of `predict`, for timing), "stage".
  """
  cfg = model_config(config)
  if cfg["stage"] == ALTERNATING:
    raise ValueError(f"config.model.stage: {ALTERNATING!r} names the 4-step schedule "
                     f"(jaxdet.train.alternating), not one network; build one "
                     f"of {STAGES}")
  dtype = jnp.dtype(config.get("compute_dtype", "float32"))
  net, parts = make_network(cfg, dtype)
  c, stage = int(cfg["num_classes"]), cfg["stage"]
  checks.check_positive("config.model.num_classes", c)
  smp, loss_cfg, pred_cfg = cfg["sampler"], cfg["loss"], cfg["predict"]
  stds = tuple(float(s) for s in cfg["box_stds"])
  losses.resolve_loss(loss_cfg["box_loss"], losses.BOX_DELTA_LOSSES)
  sampler = functools.partial(
      fast_rcnn.sample_rois, rois_per_image=int(smp["rois_per_image"]),
      fg_fraction=float(smp["fg_fraction"]), fg_iou=float(smp["fg_iou"]),
      bg_iou_high=float(smp["bg_iou_high"]), bg_iou_low=float(smp["bg_iou_low"]),
      add_gt=bool(smp["add_gt"]), stds=stds)
  rpn_m = {"anchor_scales": cfg["anchor_scales"], "anchor_ratios": cfg["anchor_ratios"],
           "targets": cfg["rpn_targets"]}
  train_props, test_props = _settings(cfg, "train"), _settings(cfg, "test")
  rpn_loss_cfg = {"box_weight": float(cfg["rpn_loss"]["box_weight"]),
                  "beta": float(cfg["rpn_loss"]["beta"])}
  use_rpn_loss = stage in ("joint", "1_rpn", "3_rpn")
  use_det_loss = stage in ("joint", "2_fast_rcnn", "4_fast_rcnn")

  def anchors_of(features):
    return rpn_lib.feature_anchors(features, parts.stride, rpn_m)

  _init = fast_rcnn.make_initializer(net, dtype)

  def init(rng, batch):
    variables = fast_rcnn.load_backbone_weights(_init(rng, batch["image"]), cfg)
    params = dict(variables["params"])
    if (cfg["pretrained"] or cfg["init_from"]) and "proposal_conv" in params:
      params["proposal_conv"] = params["conv"]
    if init_params is not None:
      for key, value in init_params.items():
        if key in params:
          params[key] = jax.tree.map(jnp.asarray, value)
    return {**variables, "params": params}

  def forward(module, x, batch, key, train):
    """The training forward pass inside one apply: RPN, proposals, RoI sampling, heads."""
    features = module.features(x, train)
    b = x.shape[0]
    key_rpn, key_roi = jax.random.split(key)
    value, metrics = jnp.zeros((), jnp.float32), {}
    anchors = anchors_of(features)
    if use_rpn_loss:
      logits, deltas = module.rpn_outputs(features)
      t = rpn_lib.rpn_targets(key_rpn, anchors, batch, rpn_m)
      value, metrics = losses.rpn_loss(logits, deltas, t, t["sampled"], **rpn_loss_cfg)
    if use_det_loss:
      p_logits, p_deltas = module.proposal_outputs(x, features)
      props = rpn_lib.propose_batch(jax.lax.stop_gradient(p_logits),
                                    jax.lax.stop_gradient(p_deltas), anchors,
                                    batch["image_size"], **train_props)
      keys = global_batch.example_keys(key_roi, b)
      s = jax.vmap(sampler)(keys, props["boxes"], props["valid"], batch["boxes"],
                            batch["labels"], batch["box_mask"])
      pooled = module.pool(features, s["rois"], s["valid"])
      r = s["rois"].shape[1]
      cls_logits, box_deltas = module.head(pooled.reshape(b * r, *pooled.shape[2:]), train)
      flat = lambda a: a.reshape(b * r, *a.shape[2:])   # noqa: E731
      det, det_metrics = losses.fast_rcnn_loss(
          cls_logits, box_deltas, flat(s["labels"]), flat(s["targets"]), flat(s["valid"]),
          rois=flat(s["rois"]), stds=stds, box_loss=loss_cfg["box_loss"],
          box_weight=float(loss_cfg["box_weight"]))
      det_metrics["fast_rcnn/fg_iou"] = losses.masked_mean(s["iou"],
                                                           s["valid"] & (s["labels"] > 0))
      det_metrics["rpn/proposals"] = jnp.mean(jnp.sum(props["valid"], 1).astype(jnp.float32))
      value = value + det
      metrics = {**metrics, **det_metrics}
    return value, metrics

  def loss(variables, batch, rng):
    x = backbones.normalize_images(batch["image"], dtype)
    key, drop = jax.random.split(rng)
    mutable = ["batch_stats"] if "batch_stats" in variables else False
    out = nn.apply(functools.partial(forward, train=True), net, mutable=mutable)(
        variables, x, batch, key, rngs={"dropout": drop})
    (value, metrics), new_state = out if mutable else (out, {})
    return value, metrics, dict(new_state)

  # --- inference, in three parts (conv / proposals / region-wise), and as one -----------------

  def conv(variables, batch):
    x = backbones.normalize_images(batch["image"], dtype)
    return net.apply(variables, x, method=FasterRCNNNet.features)

  def propose(variables, features, image_size):
    logits, deltas = net.apply(variables, features, method=FasterRCNNNet.rpn_outputs)
    return rpn_lib.propose_batch(logits, deltas, anchors_of(features), image_size,
                                 **test_props)

  def detect(variables, features, props, image_size):
    b, p = props["boxes"].shape[:2]
    pooled = net.apply(variables, features, props["boxes"], props["valid"],
                       method=FasterRCNNNet.pool)
    logits, deltas = net.apply(variables, pooled.reshape(b * p, *pooled.shape[2:]),
                               method=FasterRCNNNet.head)
    scores = jax.nn.softmax(logits, axis=-1).reshape(b, p, c + 1)
    boxes = box_coder.decode_boxes(deltas.reshape(b, p, c, 4), props["boxes"][:, :, None, :],
                                   stds=stds)                                 # [B, P, C, 4]
    size = image_size.astype(jnp.float32)
    boxes = jax.vmap(box_ops.clip_boxes)(boxes, size[:, 0], size[:, 1])
    post = functools.partial(
        multiclass_nms, iou_threshold=float(pred_cfg["iou_threshold"]),
        max_output=int(pred_cfg["max_detections"]),
        score_threshold=float(pred_cfg["score_threshold"]),
        pre_nms_topk=int(pred_cfg["pre_nms_topk"]) or None)
    return jax.vmap(lambda bx, sc, m: post(bx, sc[:, 1:], mask=m))(boxes, scores,
                                                                    props["valid"])

  def proposals(variables, batch):
    return propose(variables, conv(variables, batch), batch["image_size"])

  def predict(variables, batch):
    features = conv(variables, batch)
    props = propose(variables, features, batch["image_size"])
    return detect(variables, features, props, batch["image_size"])

  init_from_lib.check_frozen_loaded(cfg["frozen"], pretrained=cfg["pretrained"],
                                    init_from=cfg["init_from"])
  return System(name="faster_rcnn", num_classes=c, init=init, loss=loss, predict=predict,
                extras={"network": net, "backbone": parts, "model_config": cfg,
                        "anchors": anchors_of, "proposals": proposals, "conv": conv,
                        "propose": propose, "detect": detect, "stage": stage},
                param_labels=_param_labels(stage, tuple(cfg["frozen"])))
