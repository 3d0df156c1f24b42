"""Evaluation: run `predict` over an eval loader, score VOC07 mAP@0.5 and COCO AP on the host.

The eval loader gives fixed-shape batches whose "example_mask" bool[B] marks real images (the
last batch is padded); only those are scored.

Sharded: every device (of every process) predicts its share of each batch (the batch split
along axis 0 over the mesh "data", variables replicated); detections and ground truth are
gathered to the processes, process 0 scores them and shares the scores with the others, so
each process returns the same numbers, equal to one-device evaluation. With several
processes each one's loader yields its part of every global batch (Loader's `shard`).
"""

from __future__ import annotations

import json
import time
from typing import Any, Callable

import jax
import numpy as np

from jaxdet.train import parallel

_GT_KEYS = ("boxes", "labels", "box_mask", "difficult", "iscrowd", "example_mask")


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
                    max_batches: int = -1, mesh: Any = None) -> tuple[list, list, float, int]:
  """Detections and ground truth of every real image of `loader`, over all devices.

  Args:
    predict: a System's predict, (variables, batch) -> Detections dict.
    variables: {"params": ..., **model_state} (host arrays or replicated on the mesh).
    loader: an iterable of batches with "example_mask" (finite, e.g. train=False); with
      several processes, this process's part of every global batch.
    max_batches: stop after this many batches (-1 = all).
    mesh: the devices to predict on (default: parallel.data_mesh(), every device of every
      process); each process's batch is padded to a multiple of its devices.
  Returns:
    (gts, dets, seconds, num_images): per-image dicts (jaxdet.eval.detections format) of the
    whole split on process 0 (empty lists on the others), the wall time of the predict calls
    (compilation excluded) and the number of images scored (on every process).
  """
  from jax.experimental import multihost_utils
  from jax.sharding import NamedSharding, PartitionSpec as P
  from jaxdet.eval.detections import unbatch_detections, unbatch_ground_truth
  mesh = parallel.data_mesh() if mesh is None else mesh
  local_devices = sum(d.process_index == jax.process_index() for d in mesh.devices.flat)
  variables = parallel.replicate_on(variables, mesh)
  jitted = jax.jit(predict, out_shardings=NamedSharding(mesh, P(parallel.AXIS)))
  compiled: dict[Any, Any] = {}
  leader = jax.process_index() == 0
  gts, dets, seconds, count = [], [], 0.0, 0
  for i, batch in enumerate(loader):
    if 0 <= max_batches <= i:
      break
    batch = dict(batch)
    batch.setdefault("example_mask", np.ones(len(batch["image"]), bool))
    batch = _pad_to({k: np.asarray(v) for k, v in batch.items()}, local_devices)
    inputs = parallel.shard_batch({k: v for k, v in batch.items() if k != "example_mask"}, mesh)
    key = str(jax.tree_util.tree_map(lambda x: (x.shape, x.dtype.str), inputs))
    if key not in compiled:
      compiled[key] = jitted.lower(variables, inputs).compile()
    start = time.perf_counter()
    out = jax.block_until_ready(compiled[key](variables, inputs))
    seconds += time.perf_counter() - start
    out = multihost_utils.process_allgather(out, tiled=True)   # the global batch, host side
    gt = multihost_utils.process_allgather({k: v for k, v in batch.items() if k in _GT_KEYS},
                                           tiled=True)
    real = np.asarray(gt.pop("example_mask"))
    if leader:
      dets += [d for d, r in zip(unbatch_detections(out), real) if r]
      gts += [g for g, r in zip(unbatch_ground_truth(gt), real) if r]
    count += int(real.sum())
  return gts, dets, seconds, count


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


def evaluate_variables(predict: Callable[[Any, Any], Any], variables: Any, loader: Any,
                       num_classes: int, *, max_batches: int = -1,
                       extra_metrics: Callable[[list, list], dict[str, float]] | None = None,
                       mesh: Any = None) -> dict[str, float]:
  """Scores of `variables` on the loader's images, with throughput.

  Args:
    extra_metrics: a system's own host-side scores `(gts, dets) -> {name: float}` (its
      `System.extras["eval_metrics"]`, e.g. localization accuracy), added to the result.
    mesh: the devices to predict on (default: every device of every process).
  Returns:
    {"voc07_map", "coco_AP", "coco_AP50", "coco_AP75", "images_per_s", "num_images"}
    plus the names `extra_metrics` returns.
  """
  gts, dets, seconds, count = predict_dataset(predict, variables, loader,
                                              max_batches=max_batches, mesh=mesh)
  if count == 0:
    raise ValueError("eval loader: expected at least one real image (example_mask), got none")
  metrics = None
  if jax.process_index() == 0:   # scores the gathered detections, shares them
    metrics = score(gts, dets, num_classes)
    if extra_metrics is not None:
      metrics.update({k: float(v) for k, v in extra_metrics(gts, dets).items()})
  metrics = share_from_leader(metrics)
  metrics["images_per_s"] = count / max(seconds, 1e-9)
  metrics["num_images"] = float(count)
  return metrics
