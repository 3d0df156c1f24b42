"""Evaluation: run `predict` over an eval loader, score VOC07 mAP@0.5 and COCO AP on the host.

The eval loader gives fixed-shape batches whose "example_mask" bool[B] marks real images (the
last batch is padded); only those are scored. Scoring happens in the ORIGINAL images' pixels,
as the official tools score: detections are mapped back by the batch's per-image sizes
(`jaxdet.detector.to_original_pixels`, the code path of detection on new images), and the
ground truth is the dataset's own when its source has `ground_truth(i)` (tfds VOC / COCO: COCO's
crowd regions and annotation areas, VOC's difficult flags), else the batch's mapped back.
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
    (gts, dets, seconds, num_images): per-image dicts (jaxdet.eval.detections format) in the
    original images' pixels, each detection dict also with "image_id" (the dataset's) and
    "size" (height, width) of the original image; the wall time of the predict calls
    (compilation excluded) and the number of images scored.
  """
  from jaxdet.detector import to_original_pixels
  from jaxdet.eval.detections import unbatch_detections, unbatch_ground_truth
  annotated = annotated_source(loader)
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
    batch_dets = to_original_pixels(unbatch_detections(out), batch)
    batch_gts = to_original_pixels(unbatch_ground_truth(batch), batch)
    sizes = batch.get("orig_size", batch.get("image_size"))    # [B, 2] original (h, w)
    if sizes is None:                                           # no resize recorded
      sizes = np.tile(np.shape(batch["image"])[1:3], (len(real), 1))
    for i in np.flatnonzero(real):
      image_id = int(batch["image_id"][i]) if "image_id" in batch else count
      if annotated is not None:
        batch_gts[i] = _dataset_gt(annotated, count, image_id)
      dets.append({**batch_dets[i], "image_id": image_id,
                   "size": tuple(int(v) for v in sizes[i])})
      gts.append(batch_gts[i])
      count += 1
  return gts, dets, seconds, count


def annotated_source(loader: Any) -> Any:
  """The dataset source under `loader` (through wrappers' `_source`) that has
  `ground_truth(i)`, or None."""
  source = getattr(loader, "source", None)
  while source is not None and not hasattr(source, "ground_truth"):
    source = getattr(source, "_source", None)
  return source


def _dataset_gt(source: Any, index: int, image_id: int) -> dict[str, Any]:
  """Example `index`'s ground truth from the dataset (original pixels), checked to be the
  image the batch holds."""
  gt = source.ground_truth(index)
  if int(gt.get("image_id", image_id)) != image_id:
    raise ValueError(f"loader: image {index} of the evaluation pass has image_id {image_id}, "
                     f"its dataset ground truth {gt['image_id']}: the loader is not in "
                     f"source order")
  return {k: v for k, v in gt.items() if k != "image_id"}


def write_detections(path: str, dets: list, class_names: Any = None) -> str:
  """Writes per-image detections (predict_dataset's) as JSON Lines, one image a line:
  {"image_id", "height", "width", "detections": [{"box": [x1, y1, x2, y2] original pixels,
  "score", "label", "class"}]}; returns the path."""
  from jaxdet.detector import write_jsonl
  results = []
  for d in dets:
    labels = np.asarray(d["labels"])
    names = [class_names[int(c)] if class_names is not None else str(int(c)) for c in labels]
    h, w = d.get("size", (0, 0))
    results.append({"path": None, "image_id": d.get("image_id"), "height": h, "width": w,
                    "boxes": d["boxes"], "scores": d["scores"], "labels": labels,
                    "class_names": names})
  return write_jsonl(path, results)


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
                       extra_metrics: Callable[[list, list], dict[str, float]] | None = None,
                       dump: str | None = None) -> dict[str, float]:
  """Scores of `variables` on the loader's images, with throughput.

  Args:
    extra_metrics: a system's own host-side scores `(gts, dets) -> {name: float}` (its
      `System.extras["eval_metrics"]`, e.g. localization accuracy), added to the result.
    dump: also write the detections to this JSON Lines file (`write_detections`).
  Returns:
    {"voc07_map", "coco_AP", "coco_AP50", "coco_AP75", "images_per_s", "num_images"}
    plus the names `extra_metrics` returns.
  """
  gts, dets, seconds, count = predict_dataset(predict, variables, loader,
                                              max_batches=max_batches)
  if count == 0:
    raise ValueError("eval loader: expected at least one real image (example_mask), got none")
  if dump:
    write_detections(dump, dets, getattr(getattr(loader, "source", None), "class_names", None))
  metrics = score(gts, dets, num_classes)
  if extra_metrics is not None:
    metrics.update({k: float(v) for k, v in extra_metrics(gts, dets).items()})
  metrics["images_per_s"] = count / max(seconds, 1e-9)
  metrics["num_images"] = float(count)
  return metrics
