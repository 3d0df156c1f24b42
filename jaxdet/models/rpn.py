"""Region Proposal Network (Ren et al., "Faster R-CNN", NIPS 2015), section 3.1.

A small network slides over the shared conv feature map: a 3x3 convolution (512 channels for
VGG16) with ReLU, then two sibling 1x1 convolutions giving, at every feature cell, k objectness
logits and 4k box deltas for the k anchors of that cell. Parts:

* `RPNHead`: the network (features -> per-anchor logits and deltas).
* `rpn_anchors`: the anchors of a feature map, in the (y, x, a) order of the head's outputs
  (`jaxdet.ops.anchors` documents it).
* `anchor_targets`: training labels of one image's anchors: positive at IoU >= 0.7 with a
  ground-truth box or the best anchor of a box, negative below 0.3, the rest and the anchors
  crossing the image border ignored; a balanced minibatch of 256 (up to half positive); box
  regression targets of the positives.
* `propose`: the proposal layer of one image: decode, clip to the image, drop tiny boxes, keep the
  best `pre_nms_topk` by objectness, NMS at 0.7, keep the best `post_nms_topk`; fixed-size output
  with a validity mask. `propose_batch` vmaps it.
* `jaxdet.losses.rpn_loss`: objectness term + lambda * box term (on the positives), the terms
  named by Faster R-CNN's `config.model.loss.rpn_objectness` / `.rpn_box`.
* Settings sections `Targets` (anchor labelling and sampling) and `ProposalLayer` (one mode of
  the proposal layer; `Proposals` holds both, each with the paper's defaults of its mode), composed into `jaxdet.models.faster_rcnn.Settings`;
  `batch_targets`: `anchor_targets` of a batch under a `Targets` section.

Objectness is one sigmoid logit per anchor (as torchvision), equivalent to the paper's two-way
softmax. Box deltas use `jaxdet.ops.box_coder` with the RPN weights (1, 1, 1, 1).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdet import checks, global_batch
from jaxdet.models import settings
from jaxdet.ops import anchors as anchor_ops
from jaxdet.ops import box_coder
from jaxdet.ops import boxes as box_ops
from jaxdet.ops import matching, sampling
from jaxdet.ops.nms import nms as greedy_nms

Array = jax.Array

RPN_WEIGHTS = (1.0, 1.0, 1.0, 1.0)   # box coder weights of the RPN deltas


# --- settings (the paper's, section 3.3 and the py-faster-rcnn configs) ----------------------


@dataclasses.dataclass(frozen=True)
class Targets(settings.Settings):
  """Anchor labelling and the balanced minibatch of `anchor_targets`."""
  pos_iou: float = 0.7
  neg_iou: float = 0.3
  num_samples: int = 256
  positive_fraction: float = 0.5
  allowed_border: float = 0.0

  def validate(self, where: str) -> None:
    if not 0.0 <= self.neg_iou <= self.pos_iou <= 1.0:
      raise ValueError(f"{where}: expected 0 <= neg_iou <= pos_iou <= 1, got neg_iou "
                       f"{self.neg_iou}, pos_iou {self.pos_iou}")
    checks.check_positive(f"{where}.num_samples", self.num_samples)
    checks.check_fraction(f"{where}.positive_fraction", self.positive_fraction)


@dataclasses.dataclass(frozen=True)
class ProposalLayer(settings.Settings):
  """One mode of the proposal layer (`propose`'s keyword arguments); defaults: training's."""
  pre_nms_topk: int = 12000
  post_nms_topk: int = 2000
  nms_threshold: float = 0.7
  min_size: float = 16.0

  def validate(self, where: str) -> None:
    checks.check_positive(f"{where}.pre_nms_topk", self.pre_nms_topk)
    checks.check_positive(f"{where}.post_nms_topk", self.post_nms_topk)
    checks.check_positive(f"{where}.min_size", self.min_size, allow_zero=True)
    checks.check_fraction(f"{where}.nms_threshold", self.nms_threshold)

  def kwargs(self) -> dict[str, Any]:
    """The keyword arguments of `propose` / `propose_batch`."""
    return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Proposals(settings.Settings):
  """The proposal layer's two modes."""
  train: ProposalLayer = ProposalLayer()              # paper: 12000 -> NMS 0.7 -> 2000
  test: ProposalLayer = ProposalLayer(pre_nms_topk=6000, post_nms_topk=300)   # -> 300


# --- network --------------------------------------------------------------------------------


class RPNHead(nn.Module):
  """The RPN's sliding network: 3x3 conv + ReLU, sibling 1x1 convs for objectness and deltas.

  Weights are drawn from N(0, 0.01^2) and biases start at 0 (section 3.3).

  Attributes:
    num_anchors: k, anchors per feature cell.
    channels: width of the 3x3 conv (512 for VGG16, 256 for ZF).
    dtype: compute dtype; outputs are float32.
  """
  num_anchors: int
  channels: int = 512
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, features: Array) -> tuple[Array, Array]:
    """features f[B, fh, fw, C] -> (logits f32[B, fh*fw*k], deltas f32[B, fh*fw*k, 4]).

    Rows are in (y, x, a) order, matching `rpn_anchors`.
    """
    checks.check_array("features", features, ndim=4, dtype_kind="f")
    init = nn.initializers.normal(0.01)
    b, fh, fw, _ = features.shape
    k = self.num_anchors
    x = nn.relu(nn.Conv(self.channels, (3, 3), padding=((1, 1), (1, 1)), kernel_init=init,
                        dtype=self.dtype, name="conv")(features.astype(self.dtype)))
    logits = nn.Conv(k, (1, 1), kernel_init=init, dtype=self.dtype, name="objectness")(x)
    deltas = nn.Conv(4 * k, (1, 1), kernel_init=init, dtype=self.dtype, name="deltas")(x)
    return (logits.astype(jnp.float32).reshape(b, fh * fw * k),
            deltas.astype(jnp.float32).reshape(b, fh * fw * k, 4))


def rpn_anchors(feature_size: tuple[int, int], stride: int, scales: Sequence[float],
                ratios: Sequence[float]) -> Array:
  """Anchors f32[fh * fw * k, 4] (x1, y1, x2, y2) pixels in the head's (y, x, a) order.

  k = len(ratios) * len(scales) (ratio-major); the paper: scales (128, 256, 512), ratios
  (0.5, 1, 2) at stride 16.
  """
  return anchor_ops.grid_anchors(anchor_ops.base_anchors(scales, ratios), feature_size, stride)


# --- anchor targets -------------------------------------------------------------------------


def anchor_targets(key: Array, anchors: Array, gt_boxes: Array, gt_mask: Array,
                   image_size_hw: Array, *, pos_iou: float = 0.7, neg_iou: float = 0.3,
                   num_samples: int = 256, positive_fraction: float = 0.5,
                   allowed_border: float = 0.0,
                   weights: Sequence[float] = RPN_WEIGHTS) -> dict[str, Array]:
  """Training targets of one image's anchors (vmap for a batch).

  An anchor inside the image (up to `allowed_border` pixels) is positive when its IoU with some
  ground-truth box is >= pos_iou or it has the highest IoU of a box (ties included, IoU > 0),
  negative when its best IoU is < neg_iou, ignored otherwise; anchors crossing the border are
  ignored. Then `num_samples` anchors are drawn: up to num_samples * positive_fraction
  positives, negatives for the rest (`jaxdet.ops.sampling.balanced_sample_mask`).

  Args:
    key: PRNG key of the sampling.
    anchors: f32[N, 4] (x1, y1, x2, y2) pixels.
    gt_boxes: f32[M, 4] ground truth pixels; gt_mask: bool[M] True = real.
    image_size_hw: i32[2] (height, width) of the real pixels.
    pos_iou, neg_iou, num_samples, positive_fraction, allowed_border: the paper's 0.7, 0.3,
      256, 0.5, 0.
    weights: box coder weights of the deltas.
  Returns:
    {"labels": i32[N] {1, 0, -1} before sampling,
     "objectness": f32[N] 1 for positives, 0 otherwise,
     "sampled": bool[N] the drawn minibatch (positives and negatives),
     "positive": bool[N] the drawn positives (the rows of the box loss),
     "box": f32[N, 4] deltas of the matched gt (zeros where not positive)}.
  """
  checks.check_boxes("anchors", anchors)
  checks.check_boxes("gt_boxes", gt_boxes)
  checks.check_mask("gt_mask", gt_mask, "gt_boxes", gt_boxes.shape[:1])
  checks.check_array("image_size_hw", image_size_hw, shape=(2,), dtype_kind="iuf")
  inside = anchor_ops.anchors_inside_mask(anchors, image_size_hw[0], image_size_hw[1],
                                          allowed_border)                       # [N]
  iou = box_ops.box_iou(anchors, gt_boxes)                                      # [N, M]
  matched, _, labels = matching.match_boxes(
      iou, gt_mask, high=pos_iou, low=neg_iou, allow_low_quality=True, row_mask=inside)
  pos, neg = sampling.balanced_sample_mask(key, labels, num_samples, positive_fraction)
  if gt_boxes.shape[0] == 0:
    target_boxes = jnp.asarray(anchors, jnp.float32)
  else:
    target_boxes = jnp.asarray(gt_boxes, jnp.float32)[matched]                 # [N, 4]
  box = box_coder.encode_boxes(target_boxes, anchors, weights=tuple(weights))   # [N, 4]
  box = jnp.where(pos[:, None], box, 0.0)
  return {"labels": labels, "objectness": pos.astype(jnp.float32), "sampled": pos | neg,
          "positive": pos, "box": box}


# --- proposal layer -------------------------------------------------------------------------


def propose(logits: Array, deltas: Array, anchors: Array, image_size_hw: Array, *,
            pre_nms_topk: int, post_nms_topk: int, nms_threshold: float = 0.7,
            min_size: float = 16.0, weights: Sequence[float] = RPN_WEIGHTS,
            anchor_mask: Array | None = None) -> dict[str, Array]:
  """The proposal layer of one image (vmap for a batch; see `propose_batch`).

  py-faster-rcnn's order: decode every anchor's deltas, clip the boxes to the real pixels, drop
  boxes with a side < min_size, keep the pre_nms_topk best by objectness, greedy NMS at
  nms_threshold (`jaxdet.ops.nms.nms`), keep the post_nms_topk best. No gradient flows out.

  Args:
    logits: f32[N] objectness logits; deltas: f32[N, 4]; anchors: f32[N, 4] pixels.
    image_size_hw: i32[2] (height, width) of the real pixels.
    pre_nms_topk, post_nms_topk: static counts (paper: 12000 / 2000 train, 6000 / 300 test).
    nms_threshold: IoU above which a lower-scoring box is discarded.
    min_size: smallest side kept, pixels of the network input.
    weights: box coder weights of the deltas.
    anchor_mask: bool[N] or None; False anchors never become proposals.
  Returns:
    {"boxes": f32[K, 4] pixels, "scores": f32[K] sigmoid objectness, "valid": bool[K]},
    K = post_nms_topk, best first; padding (valid False) holds zeros.
  """
  checks.check_array("logits", logits, ndim=1, dtype_kind="f")
  checks.check_boxes("deltas", deltas)
  checks.check_boxes("anchors", anchors)
  checks.check_same_size("logits", logits, "deltas", deltas)
  checks.check_same_size("logits", logits, "anchors", anchors)
  checks.check_array("image_size_hw", image_size_hw, shape=(2,), dtype_kind="iuf")
  if anchor_mask is not None:
    checks.check_mask("anchor_mask", anchor_mask, "logits", logits.shape)
  for name, v in (("pre_nms_topk", pre_nms_topk), ("post_nms_topk", post_nms_topk)):
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
      raise ValueError(f"{name}: expected a positive int, got {v!r}")
  logits = jax.lax.stop_gradient(jnp.asarray(logits, jnp.float32))
  deltas = jax.lax.stop_gradient(jnp.asarray(deltas, jnp.float32))
  n = logits.shape[0]
  boxes = box_coder.decode_boxes(deltas, anchors, weights=tuple(weights))      # [N, 4]
  boxes = box_ops.clip_boxes(boxes, image_size_hw[0], image_size_hw[1])
  keep = box_ops.small_box_mask(boxes, min_size) & ~jnp.isnan(logits)          # [N]
  if anchor_mask is not None:
    keep = keep & anchor_mask
  pre = min(pre_nms_topk, n)
  ranked = jnp.where(keep, logits, -jnp.inf)
  top_scores, top = jax.lax.top_k(ranked, pre)                                 # [pre] each
  top_boxes = boxes[top]                                                       # [pre, 4]
  idx, valid = greedy_nms(top_boxes, top_scores, nms_threshold, post_nms_topk,
                          mask=keep[top])
  out_boxes = jnp.where(valid[:, None], top_boxes[idx], 0.0)
  out_scores = jnp.where(valid, jax.nn.sigmoid(top_scores[idx]), 0.0)
  return {"boxes": out_boxes, "scores": out_scores, "valid": valid}


def propose_batch(logits: Array, deltas: Array, anchors: Array, image_size: Array,
                  **settings) -> dict[str, Array]:
  """`propose` over a batch: logits f32[B, N], deltas f32[B, N, 4], anchors f32[N, 4] shared,
  image_size i32[B, 2] -> boxes f32[B, K, 4], scores f32[B, K], valid bool[B, K]."""
  checks.check_array("logits", logits, ndim=2, dtype_kind="f")
  checks.check_array("image_size", image_size, ndim=2, last_dim=2)
  fn = functools.partial(propose, **settings)
  return jax.vmap(fn, in_axes=(0, 0, None, 0))(logits, deltas, anchors, image_size)


# --- a batch -------------------------------------------------------------------------------


def batch_targets(key: Array, anchors: Array, batch: Any, targets: Targets) -> dict[str, Array]:
  """`anchor_targets` of a batch (one key per image, by its global index): every entry gains a
  leading B axis."""
  fn = functools.partial(anchor_targets, pos_iou=targets.pos_iou, neg_iou=targets.neg_iou,
                         num_samples=targets.num_samples,
                         positive_fraction=targets.positive_fraction,
                         allowed_border=targets.allowed_border)
  keys = global_batch.example_keys(key, batch["boxes"].shape[0])
  return jax.vmap(fn, in_axes=(0, None, 0, 0, 0))(keys, anchors, batch["boxes"],
                                                   batch["box_mask"], batch["image_size"])
