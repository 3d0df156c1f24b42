"""The contract between a detector and the training, evaluation and experiment machinery.

A detector is a `System`: pure, jittable functions over a batch dict. The training loop,
the data-parallel wrappers, checkpointing, evaluation and the experiment scripts see nothing
else, so a new detector (or a researcher's variant with another loss) plugs in without
touching them. Systems are found by name through the one explicit dict `SYSTEMS` in
`jaxdet.systems` (name -> `build(config) -> System`).

Batch (every array has a leading batch axis B; shapes static under jit):
  image:         u8[B, H, W, 3] RGB pixels (models normalise internally), NHWC
  image_size:    i32[B, 2] (height, width) of the real pixels; the rest is padding
  boxes:         f32[B, M, 4] ground truth (x1, y1, x2, y2) pixels, M = max_boxes
  labels:        i32[B, M] classes 0..C-1 (a model needing background adds it internally)
  box_mask:      bool[B, M] True = real box; the only truth about padding
  difficult:     bool[B, M] (optional) VOC "difficult", ignored by evaluation
  proposals:     f32[B, P, 4] (optional) precomputed region proposals (selective search)
  proposal_mask: bool[B, P] (optional)
  image_id:      i32[B] (optional)

Detections (what `predict` returns; fixed capacity K):
  boxes f32[B, K, 4], scores f32[B, K], labels i32[B, K], valid bool[B, K]
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax

Array = jax.Array
Batch = Mapping[str, Array]
Variables = Mapping[str, Any]   # {"params": ..., optionally "batch_stats": ...}


@dataclasses.dataclass(frozen=True)
class System:
  """A detector as the machinery sees it.

  Attributes:
    name: the key of this system in `jaxdet.systems.SYSTEMS`.
    num_classes: C, the number of object classes (background excluded).
    init: (rng, batch) -> variables.
    loss: (variables, batch, rng) -> (loss f32[], metrics {name: f32[]}, new_model_state),
      in training mode; new_model_state holds the updated non-parameter collections
      (e.g. {"batch_stats": ...}) and is {} for models without any.
      Global-batch contract: under data parallelism (jaxdet.train.parallel) the loss runs on
      each device's slice of the global batch inside the axis "data", and train_step averages
      its gradients over the devices; the update must equal that of one device at the whole
      batch. So `rng` (the step's key) is the same on every device and per-example
      randomness comes from `jaxdet.global_batch.example_keys(rng, local_batch)` (the
      example's global index); every mean over a varying count (sampled RoIs, anchors, object
      slots) divides by `jaxdet.global_batch.normaliser(count)` (or uses its `masked_mean`),
      not by the local count; BatchNorm and dropout come from jaxdet.models.backbones
      (`batch_norm`, `Dropout`), which take statistics over, and draw masks by row of, the
      global batch. Means over images (fixed count per device) need nothing. Outside the axis
      these helpers are the one-device computation, so the signature has no axis argument.
    predict: (variables, batch) -> Detections dict (see module docstring), in eval mode.
    extras: the system's own parts for experiments and tools: a frozen dataclass defined in
      the detector's module (e.g. `fast_rcnn.Extras`, with its `settings`, `network` and
      callables such as `truncated_svd`), read by attribute; None when it has none.
    eval_metrics: optional host function (gts, dets) -> {name: float} whose scores evaluation
      adds to VOC/COCO (e.g. the localization accuracy of the ILSVRC criterion).
    eval_metric_names: the names `eval_metrics` returns, so that a run can check
      `checkpoint.best_metric` before its first step (jaxdet.train.preflight).
    param_labels: optional params -> pytree of the same structure with "train" or "frozen"
      at each leaf; the optimizer (jaxdet.train.optim, via optax.multi_transform) leaves
      "frozen" parameters at their values (e.g. the first conv layers of a pretrained
      backbone, as in the papers). None = train everything.
  """
  name: str
  num_classes: int
  init: Callable[[Array, Batch], Variables]
  loss: Callable[[Variables, Batch, Array], tuple[Array, dict[str, Array], dict[str, Any]]]
  predict: Callable[[Variables, Batch], dict[str, Array]]
  extras: Any = None
  param_labels: Callable[[Any], Any] | None = None
  eval_metrics: Callable[[Any, Any], dict[str, float]] | None = None
  eval_metric_names: tuple[str, ...] = ()
