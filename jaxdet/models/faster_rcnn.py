"""Faster R-CNN (Ren et al., NIPS 2015): a Region Proposal Network on the shared conv features,
otherwise Fast R-CNN.

One backbone conv pass gives the feature map; the RPN head (`jaxdet.models.rpn.RPNHead`) scores
the anchors of every cell and the proposal layer (`rpn.propose`, inside the jitted step, no
host round trip) turns them into a fixed number of proposals; the Fast R-CNN second stage
(`jaxdet.models.fast_rcnn`: RoI max pooling, fc layers, softmax + class-specific boxes, its
RoI sampling and multi-task loss) classifies them. Parts:

1. `Settings`: Fast R-CNN's second-stage settings (`fast_rcnn.SecondStage`: backbone, RoI
   `Sampler` with 128 RoIs per image, box coding, `Predict`), the RPN's (`rpn.Targets`,
   `rpn.Proposals`, anchors), the training stage, and `Loss`: Fast R-CNN's terms `cls`, `box`
   plus `rpn_objectness` (sigmoid binary cross-entropy) and `rpn_box` (smooth L1, beta 1/9).
2. `FasterRCNNNet`: `fast_rcnn.FastRCNNNet` plus the RPN head (and, for step 2 of the 4-step
   training, a separate proposal network).
3. Targets: `rpn.batch_targets` (anchors), `fast_rcnn.sample_batch` (RoIs).
4. Loss: `rpn_loss_terms` (`loss/rpn_objectness`, `loss/rpn_box`, `rpn/...`) and Fast
   R-CNN's `fast_rcnn.second_stage_loss` (`loss/cls`, `loss/box`, `fast_rcnn/...`), in
   `make_loss`.
5. Post-processing: `make_inference`: conv / proposals / region-wise (Fast R-CNN's
   `score_boxes` and `postprocess`).
6. `build_system(config)`: the System. `config.model.stage` picks what the loss trains:
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

import dataclasses
import functools
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from jaxdet import checks, losses
from jaxdet.models import backbones
from jaxdet.models import fast_rcnn
from jaxdet.models import init_from as init_from_lib
from jaxdet.models import rpn as rpn_lib
from jaxdet.system import System

Array = jax.Array

STAGES = ("joint", "1_rpn", "2_fast_rcnn", "3_rpn", "4_fast_rcnn")
# config.model.stage naming the whole 4-step schedule (run by jaxdet.train.alternating); the
# detector it leaves is the network of its last step.
ALTERNATING = "alternating"

# ----------------------------------------------------------------------------- settings


@dataclasses.dataclass(frozen=True)
class Loss(fast_rcnn.Loss):
  """Fast R-CNN's terms and the RPN's (`jaxdet.losses.rpn_loss`)."""
  TERMS = {**fast_rcnn.Loss.TERMS, "rpn_objectness": "binary", "rpn_box": "box"}
  rpn_objectness: str = "sigmoid_binary_cross_entropy"
  rpn_objectness_weight: float = 1.0
  rpn_box: str = "smooth_l1_rpn"     # beta 1/9: py-faster-rcnn's sigma 3
  rpn_box_weight: float = 1.0


@dataclasses.dataclass(frozen=True)
class Settings(fast_rcnn.SecondStage):
  """Faster R-CNN's settings: Fast R-CNN's second stage, the RPN, and the training stage."""
  sampler: fast_rcnn.Sampler = fast_rcnn.Sampler(rois_per_image=128)   # paper: batch 2 x 128
  loss: Loss = Loss()
  stage: str = "joint"               # one of STAGES, or ALTERNATING (all four steps)
  alternating_steps: tuple = ()      # ALTERNATING: training steps of the 4 steps in order;
                                     # () = config.train.num_steps each
  rpn_channels: int = 512            # the RPN's 3x3 conv (VGG16: 512)
  anchor_scales: tuple = (128.0, 256.0, 512.0)
  anchor_ratios: tuple = (0.5, 1.0, 2.0)
  rpn_targets: rpn_lib.Targets = rpn_lib.Targets()
  rpn_proposals: rpn_lib.Proposals = rpn_lib.Proposals()

  def validate(self, where: str) -> None:
    super().validate(where)
    if self.stage not in STAGES + (ALTERNATING,):
      raise ValueError(f"{where}.stage: expected one of {STAGES + (ALTERNATING,)}, "
                       f"got {self.stage!r}")
    steps = self.alternating_steps
    if steps and (len(steps) != len(STAGES) - 1 or not all(
        isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in steps)):
      raise ValueError(f"{where}.alternating_steps: expected () or {len(STAGES) - 1} "
                       f"positive ints (steps of {STAGES[1:]}), got {steps!r}")
    checks.check_positive(f"{where}.rpn_channels", self.rpn_channels)
    checks.check_positive(f"{where}.anchor_scales", self.anchor_scales)
    checks.check_positive(f"{where}.anchor_ratios", self.anchor_ratios)


# ----------------------------------------------------------------------------- network

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
    return (*self.roi_outputs(features, rois, roi_mask, train), out)


def make_network(s: Settings, dtype: Any = jnp.float32
                 ) -> tuple[FasterRCNNNet, backbones.BackboneParts]:
  """The network of the settings and its backbone's parts."""
  parts = fast_rcnn.backbone_parts(s, dtype)
  separate = s.stage == "2_fast_rcnn"
  net = FasterRCNNNet(parts.conv.clone(), parts.fc.clone(), s.num_classes, parts.stride,
                      parts.roi_size, dtype=dtype,
                      num_anchors=len(s.anchor_scales) * len(s.anchor_ratios),
                      rpn_channels=s.rpn_channels,
                      proposal_conv=parts.conv.clone() if separate else None)
  return net, parts


def anchors_of(s: Settings, stride: int, features: Array) -> Array:
  """The anchors f32[fh * fw * k, 4] of a feature map f[B, fh, fw, C'] (static shape)."""
  return rpn_lib.rpn_anchors(tuple(features.shape[1:3]), stride,
                             tuple(float(a) for a in s.anchor_scales),
                             tuple(float(a) for a in s.anchor_ratios))


def make_init(s: Settings, net: FasterRCNNNet, dtype: Any,
              init_params: Mapping[str, Any] | None) -> Callable:
  """System.init: fresh parameters, the backbone's loaded weights (also as the separate
  proposal network's start), then every top-level group of `init_params`."""
  initializer = fast_rcnn.make_initializer(net, dtype)

  def init(rng, batch):
    variables = fast_rcnn.load_backbone_weights(initializer(rng, batch["image"]), s)
    params = dict(variables["params"])
    if (s.pretrained or s.init_from) and "proposal_conv" in params:
      params["proposal_conv"] = params["conv"]
    for key, value in (init_params or {}).items():
      if key in params:
        params[key] = jax.tree.map(jnp.asarray, value)
    return {**variables, "params": params}
  return init


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


# ----------------------------------------------------------------------------- loss


def rpn_loss_terms(s: Settings, logits: Array, deltas: Array, anchors: Array,
                   targets: Mapping[str, Array]) -> tuple[Array, dict[str, Array]]:
  """The RPN's terms `loss/rpn_objectness` and `loss/rpn_box` (`jaxdet.losses.rpn_loss` with
  the settings' terms and weights) on the sampled anchors of `rpn.batch_targets`."""
  return losses.rpn_loss(
      logits, deltas, targets, targets["sampled"], anchors=anchors,
      weights=rpn_lib.RPN_WEIGHTS,
      objectness_term=s.loss.fn("rpn_objectness"),
      objectness_weight=s.loss.weight("rpn_objectness"),
      box_term=s.loss.fn("rpn_box"), box_weight=s.loss.weight("rpn_box"))


def make_loss(s: Settings, net: FasterRCNNNet, stride: int, dtype: Any) -> Callable:
  """System.loss of the stage: the RPN's terms (stages joint, 1_rpn, 3_rpn) and/or Fast
  R-CNN's on RoIs sampled from the proposals (joint, 2_fast_rcnn, 4_fast_rcnn), with no
  gradient through the proposal coordinates."""
  sampler = fast_rcnn.roi_sampler(s)
  train_props = s.rpn_proposals.train.kwargs()
  use_rpn = s.stage in ("joint", "1_rpn", "3_rpn")
  use_det = s.stage in ("joint", "2_fast_rcnn", "4_fast_rcnn")

  def forward(module, x, batch, key, train):
    """The training forward pass inside one apply: RPN, proposals, RoI sampling, heads."""
    features = module.features(x, train)
    key_rpn, key_roi = jax.random.split(key)
    value, metrics = jnp.zeros((), jnp.float32), {}
    anchors = anchors_of(s, stride, features)
    if use_rpn:
      logits, deltas = module.rpn_outputs(features)
      targets = rpn_lib.batch_targets(key_rpn, anchors, batch, s.rpn_targets)
      value, metrics = rpn_loss_terms(s, logits, deltas, anchors, targets)
    if use_det:
      p_logits, p_deltas = module.proposal_outputs(x, features)
      props = rpn_lib.propose_batch(jax.lax.stop_gradient(p_logits),
                                    jax.lax.stop_gradient(p_deltas), anchors,
                                    batch["image_size"], **train_props)
      samples = fast_rcnn.sample_batch(sampler, key_roi, props["boxes"], props["valid"], batch)
      logits, deltas = module.roi_outputs(features, samples["rois"], samples["valid"], train)
      det, det_metrics = fast_rcnn.second_stage_loss(logits, deltas, samples, s)
      det_metrics["rpn/proposals"] = jnp.mean(jnp.sum(props["valid"], 1).astype(jnp.float32))
      value, metrics = value + det, {**metrics, **det_metrics}
    return value, metrics

  def loss(variables, batch, rng):
    x = backbones.normalize_images(batch["image"], dtype)
    key, drop = jax.random.split(rng)
    mutable = ["batch_stats"] if "batch_stats" in variables else False
    out = nn.apply(functools.partial(forward, train=True), net, mutable=mutable)(
        variables, x, batch, key, rngs={"dropout": drop})
    (value, metrics), new_state = out if mutable else (out, {})
    return value, metrics, dict(new_state)
  return loss


# ----------------------------------------------------------------------------- inference


@dataclasses.dataclass(frozen=True)
class Extras:
  """Faster R-CNN's parts for experiments and tools (`System.extras`); `predict` is
  detect(conv, propose(conv)).

  Attributes:
    settings: the merged `Settings`.
    network: the `FasterRCNNNet`; backbone: its `BackboneParts`.
    anchors: features f[B, fh, fw, C'] -> f32[A, 4].
    conv: (variables, batch) -> features (normalisation and the backbone's conv layers).
    propose: (variables, features, image_size) -> the RPN's proposals {"boxes", "scores",
      "valid"} with the test settings.
    detect: (variables, features, proposals, image_size) -> detections (the region-wise
      part: RoI pooling, fc, heads, decoding, per-class NMS).
    proposals: (variables, batch) -> propose(conv(batch)).
  """
  settings: Settings
  network: FasterRCNNNet
  backbone: backbones.BackboneParts
  anchors: Callable
  conv: Callable
  propose: Callable
  detect: Callable
  proposals: Callable


def make_inference(s: Settings, net: FasterRCNNNet, parts: backbones.BackboneParts,
                   dtype: Any) -> Extras:
  """The inference parts (conv / proposals / region-wise), as `Extras`."""
  test_props = s.rpn_proposals.test.kwargs()
  anchors = functools.partial(anchors_of, s, parts.stride)
  head = fast_rcnn.make_head(net, parts, dtype)

  def conv(variables, batch):
    x = backbones.normalize_images(batch["image"], dtype)
    return net.apply(variables, x, method=FasterRCNNNet.features)

  def propose(variables, features, image_size):
    logits, deltas = net.apply(variables, features, method=FasterRCNNNet.rpn_outputs)
    return rpn_lib.propose_batch(logits, deltas, anchors(features), image_size, **test_props)

  def detect(variables, features, props, image_size):
    b, p = props["boxes"].shape[:2]
    pooled = net.apply(variables, features, props["boxes"], props["valid"],
                       method=FasterRCNNNet.pool)
    logits, deltas = head(variables, pooled.reshape(b * p, *pooled.shape[2:]))
    scores, boxes = fast_rcnn.score_boxes(logits, deltas, props["boxes"], image_size, s.stds)
    return fast_rcnn.postprocess(scores, boxes, props["valid"], s.predict)

  def proposals(variables, batch):
    return propose(variables, conv(variables, batch), batch["image_size"])

  return Extras(settings=s, network=net, backbone=parts, anchors=anchors, conv=conv,
                propose=propose, detect=detect, proposals=proposals)


# ----------------------------------------------------------------------------- system


def build_system(config: Any, *, init_params: Mapping[str, Any] | None = None) -> System:
  """The Faster R-CNN System from an experiment config (`config.model`: `Settings`;
  `config.compute_dtype`).

  Args:
    config: the experiment config.
    init_params: parameters to start from (a previous stage of the 4-step training): every
      top-level group present here replaces the freshly initialised one.
  Returns:
    the System, with `Extras`.
  """
  s = Settings.from_config(config)
  if s.stage == ALTERNATING:
    raise ValueError(f"config.model.stage: {ALTERNATING!r} names the 4-step schedule "
                     f"(jaxdet.train.alternating), not one network; build one of {STAGES}")
  init_from_lib.check_frozen_loaded(s.frozen, pretrained=s.pretrained, init_from=s.init_from)
  dtype = jnp.dtype(config.get("compute_dtype", "float32"))
  net, parts = make_network(s, dtype)
  ex = make_inference(s, net, parts, dtype)

  def predict(variables, batch):
    features = ex.conv(variables, batch)
    props = ex.propose(variables, features, batch["image_size"])
    return ex.detect(variables, features, props, batch["image_size"])

  return System(name="faster_rcnn", num_classes=s.num_classes,
                init=make_init(s, net, dtype, init_params),
                loss=make_loss(s, net, parts.stride, dtype), predict=predict, extras=ex,
                param_labels=_param_labels(s.stage, s.frozen))
