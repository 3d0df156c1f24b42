"""Evaluation: run `predict` over an eval loader, score VOC07 mAP@0.5 and COCO AP on the host.

The eval loader gives fixed-shape batches whose "example_mask" bool[B] marks real images (the
last batch is padded); only those are scored. Scoring happens in the ORIGINAL images' pixels,
as the official tools score: detections are mapped back by the batch's per-image sizes
(`jaxdet.detector.to_original_pixels`, the code path of detection on new images), and the
ground truth is the dataset's own when its source has `ground_truth(i)` (tfds VOC / COCO: COCO's
crowd regions and annotation areas, VOC's difficult flags), looked up by the batch's "index"
(the example's index in the source), else the batch's mapped back.

Sharded: every device (of every process) predicts its share of each batch (the batch split
along axis 0 over the mesh "data", variables replicated); detections and ground truth are
gathered to the processes, process 0 scores them and shares the scores with the others, so
each process returns the same numbers, equal to one-device evaluation. With several
processes each one's loader yields its part of every global batch (Loader's `shard`).

Several seeds (train.num_seeds = N > 1; variables stacked along a leading axis): one pass over
the data with `predict` vmapped over the replicas, each replica scored on its own, and every
score reported as (`seed_summary`) NAME = the mean over the replicas, NAME/std = their sample
standard deviation (ddof=1), NAME/seed{i} = replica i's (seed config.seed + i); images_per_s
(of the N-replica predict) and num_images are reported once.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Callable

import jax
import numpy as np

from jaxdet.train import parallel

# The metrics evaluate_variables reports for every system; a system's own
# (System.eval_metrics) add the names of its System.eval_metric_names.
METRIC_NAMES = ("voc07_map", "coco_AP", "coco_AP50", "coco_AP75", "images_per_s", "num_images")

# What scoring needs of a batch besides the detections (gathered from every process).
_GT_KEYS = ("boxes", "labels", "box_mask", "difficult", "iscrowd", "example_mask", "image_id",
            "index", "image_size", "orig_size", "scale")


def _pad_to(batch: dict[str, np.ndarray], multiple: int) -> dict[str, np.ndarray]:
  """Pads a host batch along axis 0 to a multiple of `multiple` with copies of its first
  example marked example_mask False (so every device gets an equal share)."""
  n = len(batch["image"])
  extra = -n % multiple
  if not extra:
    return batch
  out = {k: np.concatenate([np.asarray(v), np.repeat(np.asarray(v)[:1], extra, 0)])
         for k, v in batch.items()}
  out["example_mask"][n:] = False
  return out


def predict_dataset(predict: Callable[[Any, Any], Any], variables: Any, loader: Any, *,
                    max_batches: int = -1, mesh: Any = None, num_seeds: int = 1
                    ) -> tuple[list, list, float, int]:
  """Detections and ground truth of every real image of `loader`, over all devices.

  Args:
    predict: a System's predict, (variables, batch) -> Detections dict.
    variables: {"params": ..., **model_state} (host arrays or replicated on the mesh).
    loader: an iterable of batches with "example_mask" (finite, e.g. train=False); with
      several processes, this process's part of every global batch.
    max_batches: stop after this many batches (-1 = all).
    mesh: the devices to predict on (default: parallel.data_mesh(), every device of every
      process); each process's batch is padded to a multiple of its devices.
    num_seeds: 1: `variables` is one model's. N > 1: N replicas stacked along a leading axis
      of every leaf (train.num_seeds), predicted at once by `predict` vmapped over them.
  Returns:
    (gts, dets, seconds, num_images): per-image dicts (jaxdet.eval.detections format) in the
    original images' pixels, each detection dict also with "image_id" (the dataset's) and
    "size" (height, width) of the original image, of the whole split on process 0 (empty
    lists on the others); with num_seeds > 1, dets is a list of N such lists (replica i's at i);
    the wall time of the predict calls (compilation excluded) and the number of images scored
    (on every process).
  """
  from jax.experimental import multihost_utils
  from jax.sharding import NamedSharding, PartitionSpec as P
  from jaxdet.detector import to_original_pixels
  from jaxdet.eval.detections import unbatch_detections, unbatch_ground_truth
  annotated = annotated_source(loader)
  mesh = parallel.data_mesh() if mesh is None else mesh
  local_devices = sum(d.process_index == jax.process_index() for d in mesh.devices.flat)
  variables = parallel.replicate_on(variables, mesh)
  if num_seeds == 1:
    jitted = jax.jit(predict, out_shardings=NamedSharding(mesh, P(parallel.AXIS)))
  else:   # [N, B, ...]: replicas along axis 0, the batch split over the devices
    jitted = jax.jit(jax.vmap(predict, in_axes=(0, None)),
                     out_shardings=NamedSharding(mesh, P(None, parallel.AXIS)))
  seeds = [None] if num_seeds == 1 else list(range(num_seeds))
  compiled: dict[Any, Any] = {}
  leader = jax.process_index() == 0
  gts, seconds, count = [], 0.0, 0
  dets: list[list] = [[] for _ in seeds]
  for i, batch in enumerate(loader):
    if 0 <= max_batches <= i:
      break
    batch = dict(batch)
    batch.setdefault("example_mask", np.ones(len(batch["image"]), bool))
    batch = _pad_to({k: np.asarray(v) for k, v in batch.items()}, local_devices)
    inputs = parallel.shard_batch(
        {k: v for k, v in batch.items() if k not in ("example_mask", "index")}, mesh)
    key = str(jax.tree_util.tree_map(lambda x: (x.shape, x.dtype.str), inputs))
    if key not in compiled:
      compiled[key] = jitted.lower(variables, inputs).compile()
    start = time.perf_counter()
    out = jax.block_until_ready(compiled[key](variables, inputs))
    seconds += time.perf_counter() - start
    out = multihost_utils.process_allgather(out, tiled=True)   # the global batch, host side
    gt = multihost_utils.process_allgather({k: v for k, v in batch.items() if k in _GT_KEYS},
                                           tiled=True)
    real = np.asarray(gt["example_mask"])
    if leader:
      batch_dets = [to_original_pixels(unbatch_detections(
          out if s is None else jax.tree_util.tree_map(lambda x, s=s: x[s], out)), gt)
                    for s in seeds]
      batch_gts = to_original_pixels(unbatch_ground_truth(gt), gt)
      sizes = gt.get("orig_size", gt.get("image_size"))    # [B, 2] original (h, w)
      if sizes is None:                                     # no resize recorded
        sizes = np.tile(np.shape(batch["image"])[1:3], (len(real), 1))
      for j in np.flatnonzero(real):
        image_id = int(gt["image_id"][j]) if "image_id" in gt else count
        if annotated is not None:
          index = int(gt["index"][j]) if "index" in gt else count
          batch_gts[j] = _dataset_gt(annotated, index, image_id)
        for seed_dets, replica in zip(dets, batch_dets):
          seed_dets.append({**replica[j], "image_id": image_id,
                            "size": tuple(int(v) for v in sizes[j])})
        gts.append(batch_gts[j])
        count += 1
    else:
      count += int(real.sum())
  return gts, dets[0] if num_seeds == 1 else dets, seconds, count


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
    raise ValueError(f"loader: example {index} of the source has image_id {gt['image_id']}, "
                     f"the batch's image {image_id}: the batch's 'index' does not point at "
                     f"its example")
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


def share_from_leader(value: Any) -> Any:
  """Process 0's JSON-serialisable `value`, on every process (the value itself on one)."""
  if jax.process_count() == 1:
    return value
  from jax.experimental import multihost_utils
  data = np.frombuffer(json.dumps(value).encode(), np.uint8) if jax.process_index() == 0 \
      else np.zeros(0, np.uint8)
  size = int(multihost_utils.broadcast_one_to_all(np.int32(len(data))))
  if len(data) != size:   # the other processes receive into zeros of the leader's size
    data = np.zeros(size, np.uint8)
  data = np.asarray(multihost_utils.broadcast_one_to_all(data))
  return json.loads(data.astype(np.uint8).tobytes().decode())


def score(gts: list, dets: list, num_classes: int) -> dict[str, float]:
  """VOC07 11-point mAP@0.5 and COCO AP, AP50, AP75 of per-image detections."""
  from jaxdet.eval.coco import coco_evaluate
  from jaxdet.eval.voc import voc_evaluate
  voc = voc_evaluate(gts, dets, num_classes, use_07_metric=True)
  coco = coco_evaluate(gts, dets, num_classes)
  return {"voc07_map": float(voc["map"]), "coco_AP": float(coco["AP"]),
          "coco_AP50": float(coco["AP50"]), "coco_AP75": float(coco["AP75"])}


def seed_summary(per_seed: list[dict[str, float]]) -> dict[str, float]:
  """The scores of N replicas as one dict: for each name, NAME = the mean over the replicas,
  NAME/std = their sample standard deviation (ddof=1; 0 for N = 1), NAME/seed{i} = replica
  i's. A non-finite score of any replica makes the mean and std non-finite."""
  out = {}
  for name in per_seed[0]:
    values = np.asarray([float(m[name]) for m in per_seed], np.float64)
    out[name] = float(values.mean())
    out[f"{name}/std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
    out.update({f"{name}/seed{i}": float(v) for i, v in enumerate(values)})
  return out


def seed_path(path: str, seed: int) -> str:
  """PATH.jsonl -> PATH.seed{seed}.jsonl: where replica `seed`'s detections are dumped."""
  stem, ext = os.path.splitext(path)
  return f"{stem}.seed{seed}{ext}"


def evaluate_variables(predict: Callable[[Any, Any], Any], variables: Any, loader: Any,
                       num_classes: int, *, max_batches: int = -1,
                       extra_metrics: Callable[[list, list], dict[str, float]] | None = None,
                       dump: str | None = None, mesh: Any = None,
                       num_seeds: int = 1) -> dict[str, float]:
  """Scores of `variables` on the loader's images, with throughput.

  Args:
    extra_metrics: a system's own host-side scores `(gts, dets) -> {name: float}` (its
      `System.eval_metrics`, e.g. localization accuracy), added to the result.
    dump: also write the detections to this JSON Lines file (`write_detections`; process 0);
      with num_seeds > 1, replica i's to `seed_path(dump, i)`.
    mesh: the devices to predict on (default: every device of every process).
    num_seeds: 1: one model. N > 1: `variables` holds N replicas stacked along a leading axis
      (train.num_seeds); each is scored and the scores summarised by `seed_summary`.
  Returns:
    {"voc07_map", "coco_AP", "coco_AP50", "coco_AP75", "images_per_s", "num_images"}
    plus the names `extra_metrics` returns; with num_seeds > 1 each score (not images_per_s,
    num_images) as NAME (mean), NAME/std and NAME/seed{i}.
  """
  gts, dets, seconds, count = predict_dataset(predict, variables, loader,
                                              max_batches=max_batches, mesh=mesh,
                                              num_seeds=num_seeds)
  if count == 0:
    raise ValueError("eval loader: expected at least one real image (example_mask), got none")
  metrics = None
  if jax.process_index() == 0:   # scores the gathered detections, shares them
    names = getattr(getattr(loader, "source", None), "class_names", None)
    per_seed = []
    for i, replica in enumerate([dets] if num_seeds == 1 else dets):
      if dump:
        write_detections(dump if num_seeds == 1 else seed_path(dump, i), replica, names)
      scores = score(gts, replica, num_classes)
      if extra_metrics is not None:
        scores.update({k: float(v) for k, v in extra_metrics(gts, replica).items()})
      per_seed.append(scores)
    metrics = per_seed[0] if num_seeds == 1 else seed_summary(per_seed)
  metrics = share_from_leader(metrics)
  metrics["images_per_s"] = count / max(seconds, 1e-9)
  metrics["num_images"] = float(count)
  return metrics
