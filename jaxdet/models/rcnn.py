"""R-CNN (Girshick et al. 2014): warp every proposal, CNN features, per-class SVMs, box regression.

The pipeline, one piece per function (the multi-stage training driver that runs them in order,
resumably, is experiments/rcnn_stages.py):

1. Fine-tuning (`build_system(...).loss`): the classification backbone becomes a (C+1)-way
   classifier on warped regions (class 0 = background, classes 1..C the objects). Regions are
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
5. Test (`build_system(...).predict`): score every proposal with every SVM (or, before the SVMs
   exist, with the fine-tuned softmax), regress each class's boxes, clip, per-class NMS at 0.3.

Variables: {"params": the network}, and after training the stages {"rcnn": {"svm_w" f32[F, C],
"svm_b" f32[C], "fc7_scale" f32[], "reg_w" f32[C, D, 4], "reg_b" f32[C, 4], "pool5_scale"
f32[]}} (zeros for the regressors when they are not trained yet).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdet import checks, global_batch, losses
from jaxdet.models import backbones
from jaxdet.models.settings import merge_settings
from jaxdet.ops import box_coder, boxes as box_ops, crop_resize, matching, sampling
from jaxdet.ops.nms import multiclass_nms
from jaxdet.system import System
from jaxdet.models import init_from

Array = jax.Array

MODEL_DEFAULTS: dict[str, Any] = {
    "backbone": "tiny",          # a key of jaxdet.models.backbones.BACKBONES
    "backbone_kw": {},           # keyword arguments of the backbone's constructor
    "input_size": 64,            # warped region side (AlexNet 227, VGG16 224)
    "context": 4,                # context pixels at the warped size (paper: 16 at 227)
    "fg_iou": 0.5,               # fine-tuning: IoU >= this is foreground
    "batch_rois": 128,           # fine-tuning regions per minibatch
    "fg_fraction": 0.25,         # 32 of 128
    "chunk": 256,                # regions per CNN call at test / feature extraction
    "pretrained": "",            # a local torchvision weights file of the backbone (ImageNet)
    "init_from": "",             # a finished classify run's workdir: start conv + fc from its
                                 # latest checkpoint (jaxdet.models.init_from); "" = from scratch
    "svm": {"C": 1e-3, "pos_weight": 2.0, "bias_mult": 10.0, "neg_iou": 0.3,
            "feat_norm": 20.0, "cache_size": 4096, "rounds": 4, "newton_steps": 15,
            "hard_threshold": -1.0001, "easy_threshold": -1.2, "solver": "newton"},
    "bbox_reg": {"iou": 0.6, "ridge_lambda": 1000.0, "feat_norm": 20.0, "apply": True},
    "predict": {"nms_iou": 0.3, "max_detections": 100, "score_threshold": -1.5,
                "pre_nms_topk": 2000},
}


def model_config(config: Any) -> dict[str, Any]:
  """`config.model` merged over MODEL_DEFAULTS (a plain dict)."""
  given = config["model"] if "model" in config else {}
  given = given.to_dict() if hasattr(given, "to_dict") else dict(given)
  return merge_settings(MODEL_DEFAULTS, given, "config.model")


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


def make_network(m: Mapping[str, Any], num_classes: int, dtype: Any) -> RCNNNet:
  parts = backbones.get_backbone(m["backbone"], dtype=dtype, **dict(m["backbone_kw"]))
  return RCNNNet(parts.conv.clone(), parts.fc.clone(), num_classes, parts.roi_size,
                 parts.pool5, parts.dense_fc, dtype)


# ----------------------------------------------------------------------------- regions


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


def warp_regions(images: Array, image_size: Array, rois: Array, mask: Array,
                 m: Mapping[str, Any], dtype: Any) -> Array:
  """u8[B, H, W, 3] images, rois f32[B, R, 4] -> normalised warped regions [B, R, S, S, 3]."""
  x = backbones.normalize_images(images, jnp.float32)
  s = int(m["input_size"])
  return crop_resize.batch_crop_and_resize(x, rois, (s, s), context=float(m["context"]),
                                           image_size=image_size, fill=0.0, mask=mask,
                                           dtype=dtype)


def region_features(net: RCNNNet, params: Any, images: Array, image_size: Array, rois: Array,
                    mask: Array, m: Mapping[str, Any], dtype: Any) -> dict[str, Array]:
  """The network's outputs for every region of every image, in chunks of `m["chunk"]` regions.

  Args:
    images: u8[B, H, W, 3]; image_size: i32[B, 2]; rois: f32[B, R, 4]; mask: bool[B, R].
  Returns:
    {"pool5" f32[B, R, D], "fc7" f32[B, R, F], "logits" f32[B, R, C + 1]}.
  """
  b, r = rois.shape[:2]
  chunk = max(1, min(int(m["chunk"]), r))
  pad = -r % chunk
  rois_p = jnp.pad(rois, ((0, 0), (0, pad), (0, 0)))
  mask_p = jnp.pad(mask, ((0, 0), (0, pad)))
  x = backbones.normalize_images(images, jnp.float32)
  s = int(m["input_size"])

  def one_chunk(args):
    bx, mk = args                                                       # [B, chunk, 4]
    warped = crop_resize.batch_crop_and_resize(x, bx, (s, s), context=float(m["context"]),
                                               image_size=image_size, mask=mk, dtype=dtype)
    out = net.apply({"params": params}, warped.reshape((-1,) + warped.shape[2:]), train=False)
    return jax.tree_util.tree_map(lambda t: t.reshape((b, chunk) + t.shape[1:]), out)

  n = (r + pad) // chunk
  split = lambda t: jnp.moveaxis(t.reshape((b, n, chunk) + t.shape[2:]), 1, 0)
  outs = jax.lax.map(one_chunk, (split(rois_p), split(mask_p)))        # [n, B, chunk, ...]
  return jax.tree_util.tree_map(
      lambda t: jnp.moveaxis(t, 0, 1).reshape((b, n * chunk) + t.shape[3:])[:, :r], outs)


# ----------------------------------------------------------------------------- SVMs


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
               num_classes: int, svm: Mapping[str, Any], *, seed: int = 0,
               log: Callable[[str], None] | None = None) -> dict[str, np.ndarray]:
  """Per-class linear SVMs with hard negative mining (host driver around `svm_solve_classes`).

  Args:
    fc7: f[N, F] features of every training region (proposals and ground truth).
    overlaps: f[N, C] each region's best IoU with its image's ground truth of each class.
    is_gt: bool[N] the region is a ground-truth box; gt_class: i32[N] its class (0..C-1).
    num_classes: C.
    svm: the config section (C, pos_weight, bias_mult, neg_iou, feat_norm, cache_size,
      rounds, newton_steps, hard_threshold, easy_threshold, solver).
  Returns:
    {"svm_w" f32[F, C], "svm_b" f32[C], "fc7_scale" f32[], "rounds" i32[], "cache" i32[C]}.
  """
  fc7 = np.asarray(fc7, np.float32)
  n, f = fc7.shape
  scale = float(svm["feat_norm"]) / max(float(np.mean(np.linalg.norm(fc7, axis=1))), 1e-12)
  bias = float(svm["bias_mult"])
  x = np.concatenate([fc7 * scale, np.full((n, 1), bias, np.float32)], axis=1)   # [N, F+1]
  cap = int(svm["cache_size"])
  pos = [np.flatnonzero(is_gt & (gt_class == c)) for c in range(num_classes)]
  neg = [np.flatnonzero(~is_gt & (overlaps[:, c] < float(svm["neg_iou"])))
         for c in range(num_classes)]
  rng = np.random.default_rng(seed)
  # Round 0: w = 0 scores every negative 0 > -1, so all are "hard"; start from a random draw.
  cache = [rng.permutation(nn_)[:cap] for nn_ in neg]
  w = np.zeros((num_classes, f + 1), np.float32)
  a = max(len(p) for p in pos) + cap
  x_dev = jnp.asarray(x)
  rounds = 0
  for rounds in range(1, int(svm["rounds"]) + 1):
    index = np.zeros((num_classes, a), np.int32)
    y = np.zeros((num_classes, a), np.float32)
    cost = np.zeros((num_classes, a), np.float32)
    for c in range(num_classes):
      rows = np.concatenate([pos[c], cache[c]])
      index[c, :len(rows)] = rows
      y[c, :len(rows)] = np.where(np.arange(len(rows)) < len(pos[c]), 1.0, -1.0)
      cost[c, :len(rows)] = np.where(y[c, :len(rows)] > 0,
                                     float(svm["C"]) * float(svm["pos_weight"]), float(svm["C"]))
    if svm["solver"] == "liblinear":
      w = np.stack([_liblinear(x[index[c]], y[c], cost[c]) for c in range(num_classes)])
    elif svm["solver"] == "newton":
      w = np.asarray(svm_solve_classes(x_dev, jnp.asarray(index), jnp.asarray(y),
                                       jnp.asarray(cost), jnp.asarray(w),
                                       steps=int(svm["newton_steps"])))
    else:
      raise ValueError(f"svm.solver: expected 'newton' or 'liblinear', got {svm['solver']!r}")
    added = 0
    for c in range(num_classes):
      scores = x[neg[c]] @ w[c]                                           # [n_neg]
      in_cache = np.isin(neg[c], cache[c])
      kept = cache[c][scores[np.searchsorted(neg[c], cache[c])]
                      >= float(svm["easy_threshold"])]
      hard = (scores > float(svm["hard_threshold"])) & ~in_cache
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
                          classes: np.ndarray, num_classes: int, reg: Mapping[str, Any]
                          ) -> dict[str, np.ndarray]:
  """Class-specific ridge box regressors (R-CNN appendix C).

  Args:
    pool5: f[N, D] pool5 features of the training regions with IoU >= reg["iou"].
    rois: f32[N, 4] those regions; gt_boxes: f32[N, 4] their best ground truth;
    classes: i32[N] that ground truth's class (0..C-1).
    reg: the config section (ridge_lambda, feat_norm).
  Returns:
    {"reg_w" f32[C, D, 4], "reg_b" f32[C, 4], "pool5_scale" f32[], "count" i32[C]}; deltas
    are jaxdet.ops.box_coder's (dx, dy, dw, dh) without normalisation.
  """
  pool5 = np.asarray(pool5, np.float32)
  scale = float(reg["feat_norm"]) / max(float(np.mean(np.linalg.norm(pool5, axis=1)))
                                        if len(pool5) else 0.0, 1e-12)
  targets = np.asarray(box_coder.encode_boxes(jnp.asarray(gt_boxes, jnp.float32),
                                              jnp.asarray(rois, jnp.float32)))
  weight = (np.asarray(classes)[None, :] == np.arange(num_classes)[:, None]).astype(np.float32)
  w, b = ridge_classes(pool5 * scale, targets, weight, jnp.float32(reg["ridge_lambda"]))
  return {"reg_w": np.asarray(w) * scale, "reg_b": np.asarray(b),
          "pool5_scale": np.float32(1.0), "count": weight.sum(1).astype(np.int32)}


def empty_stage_variables(num_classes: int, fc_dim: int, pool5_dim: int) -> dict[str, Any]:
  """The "rcnn" collection before the SVMs and regressors exist (zeros)."""
  return {"svm_w": jnp.zeros((fc_dim, num_classes)), "svm_b": jnp.zeros((num_classes,)),
          "fc7_scale": jnp.float32(1.0), "reg_w": jnp.zeros((num_classes, pool5_dim, 4)),
          "reg_b": jnp.zeros((num_classes, 4)), "pool5_scale": jnp.float32(1.0)}


# ----------------------------------------------------------------------------- system


def _check_batch(batch: Mapping[str, Array]) -> None:
  for key in ("proposals", "proposal_mask"):
    if key not in batch:
      raise ValueError(f"batch[{key!r}]: R-CNN needs precomputed proposals; set the data "
                       f"config's proposals section (see experiments/configs/rcnn.py)")
  checks.check_boxes("batch['proposals']", batch["proposals"], ndim=3)
  checks.check_mask("batch['proposal_mask']", batch["proposal_mask"], "batch['proposals']",
                    batch["proposals"].shape[:2])


def detect(outputs: Mapping[str, Array], rois: Array, mask: Array, image_size: Array,
           stage: Mapping[str, Array] | None, num_classes: int, pred: Mapping[str, Any],
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
    threshold = float(pred["score_threshold"])
  boxes = jnp.broadcast_to(rois[:, None, :], (rois.shape[0], num_classes, 4))
  if stage is not None and use_bbox_reg:
    feats = outputs["pool5"] * stage["pool5_scale"]
    deltas = jnp.einsum("rd,cdk->rck", feats, stage["reg_w"]) + stage["reg_b"][None]
    boxes = box_coder.decode_boxes(deltas, boxes)
  boxes = box_ops.clip_boxes(boxes, image_size[0], image_size[1])
  topk = int(pred["pre_nms_topk"]) or None
  if topk is not None and topk >= scores.size:
    topk = None
  return multiclass_nms(boxes, scores, iou_threshold=float(pred["nms_iou"]),
                            max_output=int(pred["max_detections"]), score_threshold=threshold,
                            pre_nms_topk=topk, mask=mask)


def build_system(config: Any) -> System:
  """The R-CNN System: fine-tuning loss and SVM (or softmax) scoring + box regression predict.

  Reads `config.model` (keys and defaults: MODEL_DEFAULTS), `config.num_classes` and
  `config.compute_dtype`. With `model.init_from` (a finished classify run's workdir), `init`
  takes the conv and fc layers from that run's latest checkpoint (jaxdet.models.init_from). Batches must carry "proposals" and "proposal_mask".
  extras: "network" (RCNNNet), "model" (the merged model config), "features" (jitted
  (params, batch) -> per-region outputs and targets for the training stages), and
  "predict_without_bbox_reg".
  """
  m = model_config(config)
  c = int(config["num_classes"])
  dtype = jnp.dtype(config.get("compute_dtype", "float32"))
  net = make_network(m, c, dtype)
  s = int(m["input_size"])

  def init(rng, batch):
    x = jnp.zeros((1, s, s, 3), dtype)
    params = net.init({"params": rng}, x, train=False)["params"]
    return init_from.start_backbone({"params": params}, backbone=m["backbone"],
                                    backbone_kw=m["backbone_kw"], pretrained=m["pretrained"],
                                    init_from=m["init_from"])

  def loss(variables, batch, rng):
    _check_batch(batch)
    b = batch["image"].shape[0]
    per_image = max(1, int(m["batch_rois"]) // (b * global_batch.num_shards()))
    t = jax.vmap(lambda p, pm, g, l, gm: region_targets(p, pm, g, l, gm, float(m["fg_iou"])))(
        batch["proposals"], batch["proposal_mask"], batch["boxes"], batch["labels"],
        batch["box_mask"])
    labels = jnp.where(t["mask"], jnp.where(t["class"] > 0, 1, 0), -1)      # [B, R]
    keys = global_batch.example_keys(jax.random.fold_in(rng, 1), b)
    idx, valid, _ = jax.vmap(lambda k, l: sampling.sample_balanced(
        k, l, per_image, float(m["fg_fraction"])))(keys, labels)           # [B, S]
    rois = jnp.take_along_axis(t["rois"], idx[..., None], axis=1)          # [B, S, 4]
    cls = jnp.take_along_axis(t["class"], idx, axis=1)                     # [B, S]
    warped = warp_regions(batch["image"], batch["image_size"], rois, valid, m, dtype)
    out = net.apply({"params": variables["params"]}, warped.reshape((-1, s, s, 3)), train=True,
                    rngs={"dropout": rng})
    logits = out["logits"].reshape((b, per_image, c + 1))
    ce = losses.softmax_cross_entropy(logits, cls, valid)
    value = global_batch.masked_mean(ce, valid)
    acc = losses.masked_mean((jnp.argmax(logits, -1) == cls).astype(jnp.float32), valid)
    fg = losses.masked_mean((cls > 0).astype(jnp.float32), valid)
    return value, {"cls_loss": value, "accuracy": acc, "fg_fraction": fg}, {}

  def outputs_for(params, batch):
    rois, mask = batch["proposals"], batch["proposal_mask"]
    return region_features(net, params, batch["image"], batch["image_size"], rois, mask, m,
                           dtype)

  def make_predict(use_bbox_reg: bool):
    def predict(variables, batch):
      _check_batch(batch)
      out = outputs_for(variables["params"], batch)
      stage = variables.get("rcnn")
      fn = lambda o, r, mk, sz: detect(o, r, mk, sz, stage, c, m["predict"], use_bbox_reg)
      return jax.vmap(fn)(out, batch["proposals"], batch["proposal_mask"],
                          batch["image_size"])
    return predict

  @jax.jit
  def features(params, batch):
    """Per-region outputs and targets of every proposal and gt box (feature extraction)."""
    _check_batch(batch)
    t = jax.vmap(lambda p, pm, g, l, gm: region_targets(p, pm, g, l, gm, float(m["fg_iou"])))(
        batch["proposals"], batch["proposal_mask"], batch["boxes"], batch["labels"],
        batch["box_mask"])
    out = region_features(net, params, batch["image"], batch["image_size"], t["rois"],
                          t["mask"], m, dtype)
    ov = jax.vmap(lambda r, g, l, gm: class_overlaps(r, g, l, gm, c))(
        t["rois"], batch["boxes"], batch["labels"], batch["box_mask"])
    gt_class = jnp.where(t["class"] > 0, t["class"] - 1, 0)
    return {**out, **t, "overlaps": ov, "gt_class": gt_class}

  return System(name="rcnn", num_classes=c, init=init, loss=loss,
                predict=make_predict(bool(m["bbox_reg"]["apply"])),
                extras={"network": net, "model": m, "features": features,
                        "predict_without_bbox_reg": make_predict(False),
                        "predict_with_bbox_reg": make_predict(True)})
