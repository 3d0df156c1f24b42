"""Evaluation: run `predict` over an eval loader, score VOC07 mAP@0.5 and COCO AP on the host.

The eval loader gives fixed-shape batches whose "example_mask" bool[B] marks real images (the
last batch is padded); only those are scored.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import jax
import numpy as np

# The metrics evaluate_variables reports for every system; a system's own
# (System.extras["eval_metrics"]) add the names of its extras["eval_metric_names"].
METRIC_NAMES = ("voc07_map", "coco_AP", "coco_AP50", "coco_AP75", "images_per_s", "num_images")


def predict_dataset(predict: Callable[[Any, Any], Any], variables: Any, loader: Any, *,
                    max_batches: int = -1) -> tuple[list, list, float, int]:
  """Detections and ground truth of every real image of `loader`.

  Args:
    predict: a System's predict, (variables, batch) -> Detections dict.
    variables: {"params": ..., **model_state}.
    loader: an iterable of batches with "example_mask" (finite, e.g. train=False).
    max_batches: stop after this many batches (-1 = all).
  Returns:
    (gts, dets, seconds, num_images): per-image dicts (jaxdet.eval.detections format), the
    wall time of the predict calls (compilation excluded) and the number of images scored.
  """
  from jaxdet.eval.detections import unbatch_detections, unbatch_ground_truth
  jitted = jax.jit(predict)
  compiled: dict[Any, Any] = {}
  gts, dets, seconds, count = [], [], 0.0, 0
  for i, batch in enumerate(loader):
    if 0 <= max_batches <= i:
      break
    real = np.asarray(batch.get("example_mask", np.ones(len(batch["image"]), bool)))
    inputs = {k: v for k, v in batch.items() if k != "example_mask"}
    shapes = jax.tree_util.tree_map(lambda x: (np.shape(x), np.asarray(x).dtype.str), inputs)
    key = str(shapes)
    if key not in compiled:
      compiled[key] = jitted.lower(variables, inputs).compile()
    start = time.perf_counter()
    out = jax.block_until_ready(compiled[key](variables, inputs))
    seconds += time.perf_counter() - start
    out = jax.device_get(out)
    dets += [d for d, r in zip(unbatch_detections(out), real) if r]
    gts += [g for g, r in zip(unbatch_ground_truth(batch), real) if r]
    count += int(real.sum())
  return gts, dets, seconds, count


def score(gts: list, dets: list, num_classes: int) -> dict[str, float]:
  """VOC07 11-point mAP@0.5 and COCO AP, AP50, AP75 of per-image detections."""
  from jaxdet.eval.coco import coco_evaluate
  from jaxdet.eval.voc import voc_evaluate
  voc = voc_evaluate(gts, dets, num_classes, use_07_metric=True)
  coco = coco_evaluate(gts, dets, num_classes)
  return {"voc07_map": float(voc["map"]), "coco_AP": float(coco["AP"]),
          "coco_AP50": float(coco["AP50"]), "coco_AP75": float(coco["AP75"])}


def evaluate_variables(predict: Callable[[Any, Any], Any], variables: Any, loader: Any,
                       num_classes: int, *, max_batches: int = -1,
                       extra_metrics: Callable[[list, list], dict[str, float]] | None = None
                       ) -> dict[str, float]:
  """Scores of `variables` on the loader's images, with throughput.

  Args:
    extra_metrics: a system's own host-side scores `(gts, dets) -> {name: float}` (its
      `System.extras["eval_metrics"]`, e.g. localization accuracy), added to the result.
  Returns:
    {"voc07_map", "coco_AP", "coco_AP50", "coco_AP75", "images_per_s", "num_images"}
    plus the names `extra_metrics` returns.
  """
  gts, dets, seconds, count = predict_dataset(predict, variables, loader,
                                              max_batches=max_batches)
  if count == 0:
    raise ValueError("eval loader: expected at least one real image (example_mask), got none")
  metrics = score(gts, dets, num_classes)
  if extra_metrics is not None:
    metrics.update({k: float(v) for k, v in extra_metrics(gts, dets).items()})
  metrics["images_per_s"] = count / max(seconds, 1e-9)
  metrics["num_images"] = float(count)
  return metrics
