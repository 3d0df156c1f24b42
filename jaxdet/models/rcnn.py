"""R-CNN (Girshick et al. 2014): warp every proposal, CNN features, per-class SVMs, box regression.

The pipeline, one piece per function (the multi-stage training driver that runs them in order,
resumably, is experiments/rcnn_stages.py):

1. Fine-tuning (`build_system(...).loss`, `finetune_loss`): the classification backbone becomes
   a (C+1)-way classifier on warped regions (class 0 = background, classes 1..C the objects),
   trained with one loss term, `model.loss.cls` (a "class" term of jaxdet.losses, default
   softmax cross-entropy; metric `loss/cls`; diagnostics `rcnn/accuracy`, `rcnn/fg_fraction`).
   Regions are
   the image's proposals plus its ground-truth boxes; IoU >= `fg_iou` (0.5) with a ground-truth
   box makes a region that box's class, the rest are background. Each minibatch holds
   `batch_rois` (128) regions, a quarter foreground (32 fg / 96 bg), drawn in equal shares
   from the batch's images. Regions are dilated by `context` pixels at the warped size (16 at
   227) and warped to `input_size` (jaxdet.ops.crop_resize).
2. Features (`extract_features`): for every proposal and ground-truth box of the training set,
   fc7 (the fc part's output, for the SVMs) and pool5 (the conv output pooled to the fc
   part's input, for box regression), with the region's IoU against each class's ground truth.
3. SVMs (`train_svms`): one binary linear SVM per class on fc7 features scaled to mean norm 20;
   positives are the class's ground-truth boxes, negatives the proposals with IoU < 0.3 with
   every box of that class. Hard negative mining keeps a fixed-capacity cache of negatives per
   class: every round adds the negatives scoring above -1 (margin violators, hardest first) and
   drops the easy ones (below -1.2), then retrains, until no negative is added. The solver
   (`svm_solve`) minimises liblinear's L2-regularised squared-hinge objective with a constant
   bias feature (LinearSVC with `intercept_scaling`) by Newton steps, vmapped over classes:
   all classes train at once. (The original used liblinear's L1-loss hinge, `-s 3`; the
   squared hinge is its smooth sibling, liblinear `-s 1`/`-s 2`.) `solver="liblinear"` runs
   scikit-learn's LinearSVC instead.
4. Box regression (`train_bbox_regressors`): per class, ridge regression (lambda 1000) from
   pool5 features (scaled to mean norm 20) to the R-CNN deltas (dx, dy, dw, dh) of the
   ground-truth box, on regions with IoU >= 0.6; closed form, vmapped over classes, intercept
   not penalised.
5. Test (`build_system(...).predict`, `detect`): score every proposal with every SVM (or, before the SVMs
   exist, with the fine-tuned softmax), regress each class's boxes, clip, per-class NMS at 0.3.

Variables: {"params": the network}, and after training the stages {"rcnn": {"svm_w" f32[F, C],
"svm_b" f32[C], "fc7_scale" f32[], "reg_w" f32[C, D, 4], "reg_b" f32[C, 4], "pool5_scale"
f32[]}} (zeros for the regressors when they are not trained yet).

The options (defaults, validation) are `Settings`, merged once from `config.model`; the SVMs'
and the regressors' live in its `svm` and `bbox_reg` sections (closed-form stages, not loss
terms). `build_system(config).extras` is an `Extras`.
"""

from __future__ import annotations


import dataclasses
import functools
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdet import checks, global_batch, losses
from jaxdet.models import backbones, init_from, settings
from jaxdet.ops import box_coder, boxes as box_ops, crop_resize, matching, sampling
from jaxdet.ops.nms import multiclass_nms
from jaxdet.system import System

Array = jax.Array


# ----------------------------------------------------------------------------- settings


@dataclasses.dataclass(frozen=True)
class Svm(settings.Settings):
  """`model.svm`: the per-class linear SVMs and their hard negative mining (stage 3)."""
  C: float = 1e-3                  # liblinear's C (cost of a margin violation)
  pos_weight: float = 2.0          # positives' cost is C * pos_weight
  bias_mult: float = 10.0          # the constant bias feature (liblinear -B)
  neg_iou: float = 0.3             # negatives: proposals with IoU < this with every box
  feat_norm: float = 20.0          # fc7 scaled to this mean norm
  cache_size: int = 4096           # negatives kept per class
  rounds: int = 4                  # mining rounds at most
  newton_steps: int = 15           # per round ("newton" solver)
  hard_threshold: float = -1.0001  # a negative scoring above this is added
  easy_threshold: float = -1.2     # a cached negative scoring below this is dropped
  solver: str = "newton"           # "newton" (svm_solve, all classes at once) or "liblinear"

  def validate(self, where):
    checks.check_positive(f"{where}.C", self.C)
    checks.check_positive(f"{where}.pos_weight", self.pos_weight)
    checks.check_positive(f"{where}.feat_norm", self.feat_norm)
    for key in ("cache_size", "rounds", "newton_steps"):
      checks.check_positive(f"{where}.{key}", getattr(self, key))
    checks.check_fraction(f"{where}.neg_iou", self.neg_iou, open_low=True)
    if self.solver not in ("newton", "liblinear"):
      raise ValueError(f"{where}.solver: expected 'newton' or 'liblinear', got {self.solver!r}")


@dataclasses.dataclass(frozen=True)
class BboxReg(settings.Settings):
  """`model.bbox_reg`: the per-class ridge box regressors (stage 4) and their use at test."""
  iou: float = 0.6                 # trained on regions with IoU >= this
  ridge_lambda: float = 1000.0
  feat_norm: float = 20.0          # pool5 scaled to this mean norm
  apply: bool = True               # `predict` regresses the boxes

  def validate(self, where):
    checks.check_fraction(f"{where}.iou", self.iou, open_low=True)
    checks.check_positive(f"{where}.ridge_lambda", self.ridge_lambda, allow_zero=True)
    checks.check_positive(f"{where}.feat_norm", self.feat_norm)


@dataclasses.dataclass(frozen=True)
class Predict(settings.Settings):
  """`model.predict`: test-time scoring and per-class NMS."""
  nms_iou: float = 0.3
  max_detections: int = 100
  score_threshold: float = -1.5    # on the SVM scores (the softmax before SVMs: 0)
  pre_nms_topk: int = 2000         # (proposal, class) pairs into NMS; 0 = all

  def validate(self, where):
    checks.check_fraction(f"{where}.nms_iou", self.nms_iou, open_low=True)
    checks.check_positive(f"{where}.max_detections", self.max_detections)
    checks.check_positive(f"{where}.pre_nms_topk", self.pre_nms_topk, allow_zero=True)


Loss = settings.ClassLoss   # `model.loss`: the fine-tuning loss, one "class" term over the C + 1 region classes


@dataclasses.dataclass(frozen=True)
class Settings(settings.Settings):
  """R-CNN's options (`config.model`; `num_classes` from the top-level `config.num_classes`)."""
  num_classes: int = 0             # C object classes (the classifier has C + 1, 0 = background)
  backbone: str = "tiny"           # a key of jaxdet.models.backbones.BACKBONES
  backbone_kw: dict = dataclasses.field(default_factory=dict)   # its constructor's keywords
  input_size: int = 64             # warped region side (AlexNet 227, VGG16 224)
  context: float = 4.0             # context pixels at the warped size (paper: 16 at 227)
  fg_iou: float = 0.5              # fine-tuning: IoU >= this is foreground
  batch_rois: int = 128            # fine-tuning regions per minibatch
  fg_fraction: float = 0.25        # 32 of 128
  chunk: int = 256                 # regions per CNN call at test / feature extraction
  pretrained: str = ""             # a local torchvision weights file of the backbone (ImageNet)
  init_from: str = ""              # a finished classify run's workdir: start conv + fc from its
                                   # latest checkpoint (jaxdet.models.init_from); "" = scratch
  svm: Svm = Svm()
  bbox_reg: BboxReg = BboxReg()
  predict: Predict = Predict()
  loss: Loss = Loss()

  def validate(self, where):
    if self.num_classes < 1:
      raise ValueError(f"config.num_classes: expected C >= 1 object classes, got "
                       f"{self.num_classes!r}")
    if self.backbone not in backbones.BACKBONES:
      raise ValueError(f"{where}.backbone: expected one of {sorted(backbones.BACKBONES)}, got "
                       f"{self.backbone!r}")
    for key in ("input_size", "batch_rois", "chunk"):
      checks.check_positive(f"{where}.{key}", getattr(self, key))
    checks.check_positive(f"{where}.context", self.context, allow_zero=True)
    checks.check_fraction(f"{where}.fg_iou", self.fg_iou, open_low=True)
    checks.check_fraction(f"{where}.fg_fraction", self.fg_fraction, open_low=True)


# ----------------------------------------------------------------------------- network


class RCNNNet(nn.Module):
  """The network on warped regions: conv -> pool5 -> fc (fc6, fc7) -> (C+1)-way classifier.

  Attributes:
    conv, fc: the backbone's parts (jaxdet.models.backbones.BackboneParts).
    num_classes: C object classes; the classifier has C + 1 outputs, 0 = background.
    roi_size, pool5, dense_fc: the backbone's (see BackboneParts).
    dtype: compute dtype.
  """
  conv: nn.Module
  fc: nn.Module
  num_classes: int
  roi_size: int
  pool5: tuple[int, int, int] | None = None
  dense_fc: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, regions: Array, train: bool = False) -> dict[str, Array]:
    """regions f[N, S, S, 3] normalised -> {"pool5" f32[N, D], "fc7" f32[N, F],
    "logits" f32[N, C + 1]}."""
    f = self.conv(regions, train=train)
    if self.pool5 is not None:
      f = backbones.max_pool(f, *self.pool5)
    if self.dense_fc:
      f = backbones.adaptive_avg_pool(f, self.roi_size)
      pool5 = f.reshape(f.shape[0], -1)
    else:
      pool5 = backbones.global_avg_pool(f)
    h = self.fc(f, train=train)
    logits = nn.Dense(self.num_classes + 1, dtype=self.dtype, name="cls")(h)
    return {"pool5": pool5.astype(jnp.float32), "fc7": h.astype(jnp.float32),
            "logits": logits.astype(jnp.float32)}



def make_network(s: Settings, dtype: Any) -> RCNNNet:
  """The network of settings `s` (backbone, backbone_kw, num_classes) in compute `dtype`."""
  parts = backbones.get_backbone(s.backbone, dtype=dtype, **dict(s.backbone_kw))
  return RCNNNet(parts.conv.clone(), parts.fc.clone(), s.num_classes, parts.roi_size,
                 parts.pool5, parts.dense_fc, dtype)


def warp_regions(images: Array, image_size: Array, rois: Array, mask: Array, s: Settings,
                 dtype: Any) -> Array:
  """u8[B, H, W, 3] images, rois f32[B, R, 4] -> normalised warped regions [B, R, S, S, 3]
  (S = s.input_size, with s.context pixels of context)."""
  x = backbones.normalize_images(images, jnp.float32)
  size = (s.input_size, s.input_size)
  return crop_resize.batch_crop_and_resize(x, rois, size, context=float(s.context),
                                           image_size=image_size, fill=0.0, mask=mask,
                                           dtype=dtype)


def region_features(net: RCNNNet, params: Any, images: Array, image_size: Array, rois: Array,
                    mask: Array, s: Settings, dtype: Any) -> dict[str, Array]:
  """The network's outputs for every region of every image, in chunks of `s.chunk` regions.

  Args:
    images: u8[B, H, W, 3]; image_size: i32[B, 2]; rois: f32[B, R, 4]; mask: bool[B, R].
  Returns:
    {"pool5" f32[B, R, D], "fc7" f32[B, R, F], "logits" f32[B, R, C + 1]}.
  """
  b, r = rois.shape[:2]
  chunk = max(1, min(s.chunk, r))
  pad = -r % chunk
  rois_p = jnp.pad(rois, ((0, 0), (0, pad), (0, 0)))
  mask_p = jnp.pad(mask, ((0, 0), (0, pad)))
  x = backbones.normalize_images(images, jnp.float32)
  size = (s.input_size, s.input_size)

  def one_chunk(args):
    bx, mk = args                                                       # [B, chunk, 4]
    warped = crop_resize.batch_crop_and_resize(x, bx, size, context=float(s.context),
                                               image_size=image_size, mask=mk, dtype=dtype)
    out = net.apply({"params": params}, warped.reshape((-1,) + warped.shape[2:]), train=False)
    return jax.tree_util.tree_map(lambda t: t.reshape((b, chunk) + t.shape[1:]), out)

  n = (r + pad) // chunk
  split = lambda t: jnp.moveaxis(t.reshape((b, n, chunk) + t.shape[2:]), 1, 0)
  outs = jax.lax.map(one_chunk, (split(rois_p), split(mask_p)))        # [n, B, chunk, ...]
  return jax.tree_util.tree_map(
      lambda t: jnp.moveaxis(t, 0, 1).reshape((b, n * chunk) + t.shape[3:])[:, :r], outs)


# ----------------------------------------------------------------------------- targets


def region_targets(proposals: Array, proposal_mask: Array, gt_boxes: Array, gt_labels: Array,
                   gt_mask: Array, fg_iou: float) -> dict[str, Array]:
  """One image's regions (proposals, then ground truth) and their fine-tuning targets.

  Args:
    proposals: f32[P, 4] pixels; proposal_mask: bool[P].
    gt_boxes: f32[M, 4]; gt_labels: i32[M] in 0..C-1; gt_mask: bool[M].
    fg_iou: IoU at or above which a region takes its best ground truth's class.
  Returns:
    {"rois" f32[P+M, 4], "mask" bool[P+M], "is_gt" bool[P+M], "class" i32[P+M] in 0..C
    (0 = background), "max_iou" f32[P+M], "gt_box" f32[P+M, 4] the best ground truth}.
  """
  rois = jnp.concatenate([proposals, gt_boxes], axis=0).astype(jnp.float32)
  mask = jnp.concatenate([proposal_mask, gt_mask], axis=0)
  is_gt = jnp.concatenate([jnp.zeros_like(proposal_mask), gt_mask], axis=0)
  iou = box_ops.box_iou(rois, gt_boxes)                                 # [R, M]
  matched, max_iou, labels = matching.match_boxes(iou, gt_mask, high=fg_iou, low=fg_iou,
                                                  row_mask=mask)
  cls = jnp.where(labels == 1, gt_labels[matched] + 1, 0).astype(jnp.int32)
  return {"rois": rois, "mask": mask, "is_gt": is_gt, "class": cls, "max_iou": max_iou,
          "gt_box": gt_boxes[matched]}


def class_overlaps(rois: Array, gt_boxes: Array, gt_labels: Array, gt_mask: Array,
                   num_classes: int) -> Array:
  """f32[R, C]: each region's best IoU with the ground truth of each class (0 if none)."""
  iou = box_ops.box_iou(rois, gt_boxes)                                 # [R, M]
  onehot = jax.nn.one_hot(gt_labels, num_classes, dtype=bool) & gt_mask[:, None]   # [M, C]
  return jnp.max(jnp.where(onehot[None], iou[:, :, None], 0.0), axis=1, initial=0.0)



def sample_regions(key: Array, targets: Mapping[str, Array], per_image: int,
                   fg_fraction: float) -> tuple[Array, Array, Array]:
  """One image's fine-tuning minibatch from its `region_targets`: `per_image` regions, at most
  a `fg_fraction` of them foreground, the rest background (jaxdet.ops.sampling).

  Returns:
    (rois f32[S, 4], classes i32[S] in 0..C (0 = background), valid bool[S]), S = per_image.
  """
  labels = jnp.where(targets["mask"], jnp.where(targets["class"] > 0, 1, 0), -1)   # [R]
  idx, valid, _ = sampling.sample_balanced(key, labels, per_image, fg_fraction)   # [S]
  return targets["rois"][idx], targets["class"][idx], valid


def batch_region_targets(batch: Mapping[str, Array], fg_iou: float) -> dict[str, Array]:
  """`region_targets` of every image of the batch: each entry with a leading [B] axis."""
  return jax.vmap(lambda p, pm, g, l, gm: region_targets(p, pm, g, l, gm, fg_iou))(
      batch["proposals"], batch["proposal_mask"], batch["boxes"], batch["labels"],
      batch["box_mask"])


# ----------------------------------------------------------------------------- loss


def _check_batch(batch: Mapping[str, Array]) -> None:
  for key in ("proposals", "proposal_mask"):
    if key not in batch:
      raise ValueError(f"batch[{key!r}]: R-CNN needs precomputed proposals; set the data "
                       f"config's proposals section (see experiments/configs/rcnn.py)")
  checks.check_boxes("batch['proposals']", batch["proposals"], ndim=3)
  checks.check_mask("batch['proposal_mask']", batch["proposal_mask"], "batch['proposals']",
                    batch["proposals"].shape[:2])


def finetune_loss(net: RCNNNet, s: Settings, dtype: Any, variables: Any,
                  batch: Mapping[str, Array], rng: Array
                  ) -> tuple[Array, dict[str, Array], dict[str, Any]]:
  """The fine-tuning loss (System.loss): the (C+1)-way term `cls` on sampled warped regions.

  Each image gives `s.batch_rois / global batch` regions (`sample_regions`, keys by the
  image's global index); the term's per-region losses are averaged over the global batch's
  real regions and weighted by `s.loss.cls_weight`.

  Returns:
    (loss f32[], {"loss/cls", "rcnn/accuracy", "rcnn/fg_fraction"}, {}).
  """
  _check_batch(batch)
  b = batch["image"].shape[0]
  per_image = max(1, s.batch_rois // (b * global_batch.num_shards()))
  t = batch_region_targets(batch, s.fg_iou)
  keys = global_batch.example_keys(jax.random.fold_in(rng, 1), b)
  rois, cls, valid = jax.vmap(lambda k, ti: sample_regions(k, ti, per_image, s.fg_fraction))(
      keys, t)                                                          # [B, S, 4], [B, S]
  warped = warp_regions(batch["image"], batch["image_size"], rois, valid, s, dtype)
  out = net.apply({"params": variables["params"]}, warped.reshape((-1,) + warped.shape[2:]),
                  train=True, rngs={"dropout": rng})
  logits = out["logits"].reshape(cls.shape + (-1,))                     # [B, S, C + 1]
  per_region = s.loss.fn("cls")(logits.reshape((cls.size, -1)), cls.reshape(-1),
                                valid.reshape(-1)).reshape(cls.shape)    # [B, S]
  cls_loss = s.loss.weight("cls") * global_batch.masked_mean(per_region, valid)
  acc = losses.masked_mean((jnp.argmax(logits, -1) == cls).astype(jnp.float32), valid)
  fg = losses.masked_mean((cls > 0).astype(jnp.float32), valid)
  return cls_loss, {"loss/cls": cls_loss, "rcnn/accuracy": acc, "rcnn/fg_fraction": fg}, {}


# ----------------------------------------------------------------------------- SVMs (stage 3)


def _svm_objective(w: Array, x: Array, y: Array, cost: Array) -> Array:
  margin = jnp.maximum(1.0 - y * (x @ w), 0.0)
  return 0.5 * jnp.dot(w, w) + jnp.sum(cost * margin * margin)


def svm_solve(x: Array, y: Array, cost: Array, *, steps: int = 15, w0: Array | None = None
              ) -> Array:
  """One L2-regularised squared-hinge linear SVM (liblinear's primal), by Newton's method.

  Minimises 0.5 |w|^2 + sum_i cost_i max(0, 1 - y_i w.x_i)^2 (a bias is a constant feature
  of x, regularised like the rest, as liblinear's -B). Each step solves the generalised
  Newton system (I + 2 X_A^T diag(cost_A) X_A) d = -grad over the margin violators A and
  takes the best of 12 halving step sizes (exact search over a piecewise quadratic's grid).

  Args:
    x: f32[N, D] features (rows with cost 0 take no part: padding).
    y: f32[N] labels +1 / -1.
    cost: f32[N] per-example C (0 for padding).
    steps: Newton steps (static).
    w0: f32[D] the start (warm start from the previous mining round), default zeros.
  Returns:
    w f32[D].
  """
  checks.check_array("x", x, ndim=2, dtype_kind="f")
  checks.check_array("y", y, shape=(x.shape[0],), dtype_kind="f")
  checks.check_array("cost", cost, shape=(x.shape[0],), dtype_kind="f")
  x, y, cost = (jnp.asarray(a, jnp.float32) for a in (x, y, cost))
  d = x.shape[1]
  w = jnp.zeros((d,), jnp.float32) if w0 is None else jnp.asarray(w0, jnp.float32)
  ts = 0.5 ** jnp.arange(12, dtype=jnp.float32)                          # [T]

  def step(w, _):
    viol = (1.0 - y * (x @ w)) > 0                                        # [N]
    c = jnp.where(viol, cost, 0.0)
    grad = w - 2.0 * x.T @ (c * y * (1.0 - y * (x @ w)))                  # [D]
    hess = jnp.eye(d, dtype=jnp.float32) + 2.0 * (x * c[:, None]).T @ x   # [D, D]
    direction = -jnp.linalg.solve(hess, grad)
    xw, xd = x @ w, x @ direction                                         # [N]
    cand_w2 = (jnp.dot(w, w) + 2 * ts * jnp.dot(w, direction)
               + ts ** 2 * jnp.dot(direction, direction))                 # [T]
    marg = jnp.maximum(1.0 - y[None] * (xw[None] + ts[:, None] * xd[None]), 0.0)   # [T, N]
    cand = 0.5 * cand_w2 + jnp.sum(cost[None] * marg * marg, axis=1)     # [T]
    best = jnp.argmin(cand)
    better = cand[best] < _svm_objective(w, x, y, cost)
    return jnp.where(better, w + ts[best] * direction, w), None

  w, _ = jax.lax.scan(step, w, None, length=steps)
  return w


@functools.partial(jax.jit, static_argnames=("steps",))
def svm_solve_classes(x: Array, index: Array, y: Array, cost: Array, w0: Array, *,
                      steps: int) -> Array:
  """All classes at once: `svm_solve` vmapped over C.

  Args:
    x: f32[N, D] the feature pool (bias column included).
    index: i32[C, A] rows of x in each class's training set; y f32[C, A]; cost f32[C, A]
      (0 = empty slot); w0 f32[C, D].
  Returns:
    f32[C, D].
  """
  return jax.vmap(lambda i, yy, cc, w: svm_solve(x[i], yy, cc, steps=steps, w0=w))(
      index, y, cost, w0)


def _liblinear(x: np.ndarray, y: np.ndarray, cost: np.ndarray) -> np.ndarray:
  """The same objective through scikit-learn's LinearSVC (liblinear), no intercept of its own."""
  from sklearn.svm import LinearSVC
  keep = cost > 0
  c_max = float(cost[keep].max())
  clf = LinearSVC(C=c_max, loss="squared_hinge", fit_intercept=False, tol=1e-6,
                  max_iter=10000)
  clf.fit(x[keep], y[keep] > 0, sample_weight=cost[keep] / c_max)
  return clf.coef_[0].astype(np.float32)



def train_svms(fc7: np.ndarray, overlaps: np.ndarray, is_gt: np.ndarray, gt_class: np.ndarray,
               num_classes: int, svm: Svm, *, seed: int = 0,
               log: Callable[[str], None] | None = None) -> dict[str, np.ndarray]:
  """Per-class linear SVMs with hard negative mining (host driver around `svm_solve_classes`).

  Args:
    fc7: f[N, F] features of every training region (proposals and ground truth).
    overlaps: f[N, C] each region's best IoU with its image's ground truth of each class.
    is_gt: bool[N] the region is a ground-truth box; gt_class: i32[N] its class (0..C-1).
    num_classes: C.
    svm: the settings (`Settings.svm`).
  Returns:
    {"svm_w" f32[F, C], "svm_b" f32[C], "fc7_scale" f32[], "rounds" i32[], "cache" i32[C]}.
  """
  fc7 = np.asarray(fc7, np.float32)
  n, f = fc7.shape
  scale = float(svm.feat_norm) / max(float(np.mean(np.linalg.norm(fc7, axis=1))), 1e-12)
  bias = float(svm.bias_mult)
  x = np.concatenate([fc7 * scale, np.full((n, 1), bias, np.float32)], axis=1)   # [N, F+1]
  cap = int(svm.cache_size)
  pos = [np.flatnonzero(is_gt & (gt_class == c)) for c in range(num_classes)]
  neg = [np.flatnonzero(~is_gt & (overlaps[:, c] < float(svm.neg_iou)))
         for c in range(num_classes)]
  rng = np.random.default_rng(seed)
  # Round 0: w = 0 scores every negative 0 > -1, so all are "hard"; start from a random draw.
  cache = [rng.permutation(nn_)[:cap] for nn_ in neg]
  w = np.zeros((num_classes, f + 1), np.float32)
  a = max(len(p) for p in pos) + cap
  x_dev = jnp.asarray(x)
  rounds = 0
  for rounds in range(1, int(svm.rounds) + 1):
    index = np.zeros((num_classes, a), np.int32)
    y = np.zeros((num_classes, a), np.float32)
    cost = np.zeros((num_classes, a), np.float32)
    for c in range(num_classes):
      rows = np.concatenate([pos[c], cache[c]])
      index[c, :len(rows)] = rows
      y[c, :len(rows)] = np.where(np.arange(len(rows)) < len(pos[c]), 1.0, -1.0)
      cost[c, :len(rows)] = np.where(y[c, :len(rows)] > 0,
                                     float(svm.C) * float(svm.pos_weight), float(svm.C))
    if svm.solver == "liblinear":
      w = np.stack([_liblinear(x[index[c]], y[c], cost[c]) for c in range(num_classes)])
    else:
      w = np.asarray(svm_solve_classes(x_dev, jnp.asarray(index), jnp.asarray(y),
                                       jnp.asarray(cost), jnp.asarray(w),
                                       steps=int(svm.newton_steps)))
    added = 0
    for c in range(num_classes):
      scores = x[neg[c]] @ w[c]                                           # [n_neg]
      in_cache = np.isin(neg[c], cache[c])
      kept = cache[c][scores[np.searchsorted(neg[c], cache[c])]
                      >= float(svm.easy_threshold)]
      hard = (scores > float(svm.hard_threshold)) & ~in_cache
      order = np.argsort(-scores[hard], kind="stable")
      new = neg[c][hard][order][:max(cap - len(kept), 0)]
      added += len(new)
      cache[c] = np.sort(np.concatenate([kept, new]))
    if log is not None:
      log(f"svm round {rounds}: added {added} hard negatives; cache sizes "
          f"{[len(k) for k in cache]}")
    if added == 0:
      break
  return {"svm_w": (w[:, :f].T * scale).astype(np.float32),
          "svm_b": (w[:, f] * bias).astype(np.float32),
          "fc7_scale": np.float32(1.0), "rounds": np.int32(rounds),
          "cache": np.asarray([len(k) for k in cache], np.int32)}



# ----------------------------------------------------------------------------- box regression
# (stage 4)


@jax.jit
def ridge_classes(x: Array, t: Array, weight: Array, lam: Array) -> tuple[Array, Array]:
  """Closed-form ridge regression per class, intercept not penalised; vmapped over classes.

  Minimises sum_i weight_ci |t_i - x_i W_c - b_c|^2 + lam |W_c|^2 for each class c.

  Args:
    x: f32[N, D] features; t: f32[N, K] targets; weight: f32[C, N] (0/1 masks: class c's
      training regions); lam: f32[] the ridge penalty.
  Returns:
    (W f32[C, D, K], b f32[C, K]).
  """
  x = jnp.asarray(x, jnp.float32)
  t = jnp.asarray(t, jnp.float32)
  d = x.shape[1]

  def one(wc):
    total = jnp.maximum(jnp.sum(wc), 1.0)
    mx = (wc @ x) / total                                                 # [D]
    mt = (wc @ t) / total                                                 # [K]
    xc, tc = x - mx, t - mt
    a = (xc * wc[:, None]).T @ xc + lam * jnp.eye(d, dtype=jnp.float32)  # [D, D]
    w = jnp.linalg.solve(a, (xc * wc[:, None]).T @ tc)                    # [D, K]
    return w, mt - mx @ w

  return jax.vmap(one)(jnp.asarray(weight, jnp.float32))


def train_bbox_regressors(pool5: np.ndarray, rois: np.ndarray, gt_boxes: np.ndarray,
                          classes: np.ndarray, num_classes: int, reg: BboxReg
                          ) -> dict[str, np.ndarray]:
  """Class-specific ridge box regressors (R-CNN appendix C).

  Args:
    pool5: f[N, D] pool5 features of the training regions with IoU >= reg.iou.
    rois: f32[N, 4] those regions; gt_boxes: f32[N, 4] their best ground truth;
    classes: i32[N] that ground truth's class (0..C-1).
    reg: the settings (`Settings.bbox_reg`: ridge_lambda, feat_norm).
  Returns:
    {"reg_w" f32[C, D, 4], "reg_b" f32[C, 4], "pool5_scale" f32[], "count" i32[C]}; deltas
    are jaxdet.ops.box_coder's (dx, dy, dw, dh) without normalisation.
  """
  pool5 = np.asarray(pool5, np.float32)
  scale = float(reg.feat_norm) / max(float(np.mean(np.linalg.norm(pool5, axis=1)))
                                        if len(pool5) else 0.0, 1e-12)
  targets = np.asarray(box_coder.encode_boxes(jnp.asarray(gt_boxes, jnp.float32),
                                              jnp.asarray(rois, jnp.float32)))
  weight = (np.asarray(classes)[None, :] == np.arange(num_classes)[:, None]).astype(np.float32)
  w, b = ridge_classes(pool5 * scale, targets, weight, jnp.float32(reg.ridge_lambda))
  return {"reg_w": np.asarray(w) * scale, "reg_b": np.asarray(b),
          "pool5_scale": np.float32(1.0), "count": weight.sum(1).astype(np.int32)}


def empty_stage_variables(num_classes: int, fc_dim: int, pool5_dim: int) -> dict[str, Any]:
  """The "rcnn" collection before the SVMs and regressors exist (zeros)."""
  return {"svm_w": jnp.zeros((fc_dim, num_classes)), "svm_b": jnp.zeros((num_classes,)),
          "fc7_scale": jnp.float32(1.0), "reg_w": jnp.zeros((num_classes, pool5_dim, 4)),
          "reg_b": jnp.zeros((num_classes, 4)), "pool5_scale": jnp.float32(1.0)}



# ----------------------------------------------------------------------------- post-processing


def detect(outputs: Mapping[str, Array], rois: Array, mask: Array, image_size: Array,
           stage: Mapping[str, Array] | None, num_classes: int, pred: Predict,
           use_bbox_reg: bool) -> dict[str, Array]:
  """One image's detections from its regions' network outputs.

  Args:
    outputs: {"pool5" f32[R, D], "fc7" f32[R, F], "logits" f32[R, C + 1]}.
    rois: f32[R, 4]; mask: bool[R]; image_size: i32[2] (height, width).
    stage: the "rcnn" collection (SVMs, regressors) or None (softmax scores, no regression).
  Returns:
    Detections: boxes f32[K, 4], scores f32[K], labels i32[K], valid bool[K].
  """
  if stage is None:
    scores = jax.nn.softmax(outputs["logits"], axis=-1)[:, 1:]          # [R, C]
    threshold = 0.0
  else:
    scores = (outputs["fc7"] * stage["fc7_scale"]) @ stage["svm_w"] + stage["svm_b"]
    threshold = float(pred.score_threshold)
  boxes = jnp.broadcast_to(rois[:, None, :], (rois.shape[0], num_classes, 4))
  if stage is not None and use_bbox_reg:
    feats = outputs["pool5"] * stage["pool5_scale"]
    deltas = jnp.einsum("rd,cdk->rck", feats, stage["reg_w"]) + stage["reg_b"][None]
    boxes = box_coder.decode_boxes(deltas, boxes)
  boxes = box_ops.clip_boxes(boxes, image_size[0], image_size[1])
  topk = int(pred.pre_nms_topk) or None
  if topk is not None and topk >= scores.size:
    topk = None
  return multiclass_nms(boxes, scores, iou_threshold=float(pred.nms_iou),
                        max_output=int(pred.max_detections), score_threshold=threshold,
                        pre_nms_topk=topk, mask=mask)



def predict_detections(net: RCNNNet, s: Settings, dtype: Any, variables: Any,
                       batch: Mapping[str, Array], *, use_bbox_reg: bool) -> dict[str, Array]:
  """System.predict: every proposal through the network, `detect` per image. Scores are the
  SVMs' when `variables` has the "rcnn" collection, else the fine-tuned softmax's."""
  _check_batch(batch)
  out = region_features(net, variables["params"], batch["image"], batch["image_size"],
                        batch["proposals"], batch["proposal_mask"], s, dtype)
  stage = variables.get("rcnn")
  fn = lambda o, r, mk, sz: detect(o, r, mk, sz, stage, s.num_classes, s.predict, use_bbox_reg)
  return jax.vmap(fn)(out, batch["proposals"], batch["proposal_mask"], batch["image_size"])


def stage_features(net: RCNNNet, s: Settings, dtype: Any, params: Any,
                   batch: Mapping[str, Array]) -> dict[str, Array]:
  """Per-region outputs and targets of every proposal and gt box (stage 2, feature extraction).

  Returns:
    `region_features` and `region_targets` of the regions (proposals, then ground truth), with
    "overlaps" f32[B, R, C] (`class_overlaps`) and "gt_class" i32[B, R] (0..C-1).
  """
  _check_batch(batch)
  t = batch_region_targets(batch, s.fg_iou)
  out = region_features(net, params, batch["image"], batch["image_size"], t["rois"], t["mask"],
                        s, dtype)
  ov = jax.vmap(lambda r, g, l, gm: class_overlaps(r, g, l, gm, s.num_classes))(
      t["rois"], batch["boxes"], batch["labels"], batch["box_mask"])
  gt_class = jnp.where(t["class"] > 0, t["class"] - 1, 0)
  return {**out, **t, "overlaps": ov, "gt_class": gt_class}


def init_variables(net: RCNNNet, s: Settings, dtype: Any, rng: Array, batch: Any) -> dict:
  """System.init: fresh {"params"}, conv and fc from `s.pretrained` / `s.init_from` if set."""
  del batch
  x = jnp.zeros((1, s.input_size, s.input_size, 3), dtype)
  params = net.init({"params": rng}, x, train=False)["params"]
  return init_from.start_backbone({"params": params}, backbone=s.backbone,
                                  backbone_kw=s.backbone_kw, pretrained=s.pretrained,
                                  init_from=s.init_from)


# ----------------------------------------------------------------------------- system


@dataclasses.dataclass(frozen=True)
class Extras:
  """R-CNN's parts for the training stages (experiments/rcnn_stages.py), benchmarks and tools.

  Attributes:
    settings: the merged `Settings`.
    network: the `RCNNNet`.
    features: jitted (params, batch) -> `stage_features` (stage 2).
    predict_with_bbox_reg, predict_without_bbox_reg: (variables, batch) -> detections, with
      and without the box regressors whatever `settings.bbox_reg.apply` says.
  """
  settings: Settings
  network: RCNNNet
  features: Callable[[Any, Mapping[str, Array]], dict[str, Array]]
  predict_with_bbox_reg: Callable[[Any, Mapping[str, Array]], dict[str, Array]]
  predict_without_bbox_reg: Callable[[Any, Mapping[str, Array]], dict[str, Array]]


def build_system(config: Any) -> System:
  """The R-CNN System from `config.model` (`Settings`), `config.num_classes` and
  `config.compute_dtype`. Batches must carry "proposals" and "proposal_mask"."""
  s = Settings.from_config(config)
  dtype = jnp.dtype(config.get("compute_dtype", "float32"))
  net = make_network(s, dtype)
  parts = (net, s, dtype)
  predict = lambda reg: functools.partial(predict_detections, *parts, use_bbox_reg=reg)
  features = jax.jit(functools.partial(stage_features, *parts))
  extras = Extras(settings=s, network=net, features=features,
                  predict_with_bbox_reg=predict(True), predict_without_bbox_reg=predict(False))
  return System(name="rcnn", num_classes=s.num_classes,
                init=functools.partial(init_variables, *parts),
                loss=functools.partial(finetune_loss, *parts),
                predict=predict(s.bbox_reg.apply), extras=extras)
