"""A system's own host-side scores (System.eval_metrics) reach the evaluation result."""

import numpy as np

from jaxdet.train.evaluate import evaluate_variables


def _batches(rng, n_batches=2, batch_size=3, max_boxes=2):
  for _ in range(n_batches):
    xy = rng.uniform(0, 20, (batch_size, max_boxes, 2)).astype(np.float32)
    boxes = np.concatenate([xy, xy + rng.uniform(2, 10, xy.shape).astype(np.float32)], -1)
    yield {"image": np.zeros((batch_size, 32, 32, 3), np.uint8),
           "boxes": boxes, "labels": rng.integers(0, 2, (batch_size, max_boxes)).astype(np.int32),
           "box_mask": rng.random((batch_size, max_boxes)) < 0.7,
           "example_mask": np.array([True] * (batch_size - 1) + [False])}


def _predict_ground_truth(variables, batch):
  """Detections equal to the ground truth: a perfect detector."""
  del variables
  return {"boxes": batch["boxes"], "scores": batch["box_mask"].astype(np.float32),
          "labels": batch["labels"], "valid": batch["box_mask"]}


def test_extra_metrics_are_added_and_see_the_real_images(rng):
  batches = list(_batches(rng))
  seen = {}

  def count_boxes(gts, dets):
    seen["images"] = len(gts)
    return {"num_gt_boxes": sum(len(g["boxes"]) for g in gts),
            "num_dets": sum(len(d["boxes"]) for d in dets)}

  metrics = evaluate_variables(_predict_ground_truth, {}, batches, 2,
                               extra_metrics=count_boxes)
  real = [b["box_mask"][b["example_mask"]] for b in batches]
  expected = int(sum(m.sum() for m in real))
  assert seen["images"] == sum(int(b["example_mask"].sum()) for b in batches)
  assert metrics["num_gt_boxes"] == expected and metrics["num_dets"] == expected
  assert metrics["voc07_map"] == 1.0
  plain = evaluate_variables(_predict_ground_truth, {}, batches, 2)
  assert "num_gt_boxes" not in plain and plain["voc07_map"] == metrics["voc07_map"]
