"""Padding an image's variable number of boxes to `max_boxes`, and stacking examples into a batch.

A batch is a dict of NumPy arrays with a leading batch axis B (keys as in `jaxdet.system`):
  image:        u8[B, H, W, 3] pixels; H, W the batch's shape bucket (zero padding bottom/right)
  image_size:   i32[B, 2] (height, width) of the real pixels of each image
  boxes:        f32[B, M, 4] (x1, y1, x2, y2) pixels, M = max_boxes, zeros where padded
  labels:       i32[B, M] classes 0..C-1, 0 where padded
  box_mask:     bool[B, M] True = real box
  difficult:    bool[B, M] VOC "difficult" flag (False where not given)
  image_id:     i32[B] the dataset's id of each image (-1 for padding examples)
  index:        i32[B] (evaluation batches) each example's index in its source (-1 padding)
  example_mask: bool[B] False for the padding examples that fill the last evaluation batch
  scale:        f32[B] resize factor from the original image (new = scale * original)
  orig_size:    i32[B, 2] (height, width) of the original image; boxes map back to it exactly
                with the per-axis factors orig_size / (image_size of the resized image)
  proposals:    f32[B, P, 4] (only when the examples carry "proposals") region proposals,
                pixels of the resized image, zeros where padded
  proposal_mask: bool[B, P] (with proposals) True = real proposal
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from jaxdet import checks

BOX_POLICIES = ("error", "keep_largest")


def pad_boxes(boxes: np.ndarray, labels: np.ndarray, max_boxes: int, *,
              policy: str = "error", example_id: Any = None,
              difficult: np.ndarray | None = None
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """Pads one image's boxes to a fixed count.

  Args:
    boxes: f32[N, 4] (x1, y1, x2, y2) pixels.
    labels: i32[N] classes.
    max_boxes: M, the fixed capacity.
    policy: what to do when N > M: "error" raises; "keep_largest" keeps the M largest boxes
      by area (in their original order).
    example_id: named in the error message.
    difficult: bool[N] (optional) VOC difficult flags, padded alongside.
  Returns:
    (boxes f32[M, 4], labels i32[M], box_mask bool[M], difficult bool[M]); padded entries are
    zero / False.
  Raises:
    ValueError: N > M with policy "error"; the message says how to raise `max_boxes` or
      choose another policy.
  """
  boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
  labels = np.asarray(labels)
  checks.check_array("labels", labels, ndim=1, dtype_kind="iu")
  checks.check_same_size("boxes", boxes, "labels", labels)
  checks.check_positive("max_boxes", max_boxes)
  if policy not in BOX_POLICIES:
    raise ValueError(f"policy: expected one of {BOX_POLICIES}, got {policy!r}")
  difficult = (np.zeros(len(labels), bool) if difficult is None
               else np.asarray(difficult, bool).reshape(-1))
  checks.check_same_size("boxes", boxes, "difficult", difficult)
  n = len(labels)
  if n > max_boxes:
    if policy == "error":
      where = "" if example_id is None else f" (example {example_id})"
      raise ValueError(
          f"boxes{where}: {n} boxes exceed max_boxes={max_boxes}. Raise the data config's "
          f"`max_boxes` to at least {n}, or set `box_policy='keep_largest'` to keep the "
          f"{max_boxes} largest boxes.")
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    keep = np.sort(np.argsort(-area, kind="stable")[:max_boxes])
    boxes, labels, difficult, n = boxes[keep], labels[keep], difficult[keep], max_boxes
  out_boxes = np.zeros((max_boxes, 4), np.float32)
  out_labels = np.zeros((max_boxes,), np.int32)
  mask = np.zeros((max_boxes,), bool)
  out_difficult = np.zeros((max_boxes,), bool)
  out_boxes[:n], out_labels[:n], mask[:n], out_difficult[:n] = boxes, labels, True, difficult
  return out_boxes, out_labels, mask, out_difficult


def collate(examples: Sequence[Mapping[str, Any]], max_boxes: int, *, policy: str = "error",
            image_shape: Sequence[int] | None = None) -> dict[str, np.ndarray]:
  """Stacks examples into a fixed-shape batch (see the module docstring for the keys).

  Args:
    examples: dicts with "image" u8[h, w, 3], "boxes" f32[N, 4], "labels" i32[N] and
      optionally "difficult" bool[N], "image_id" int, "image_size" (h, w) of the real pixels
      (default: the image's shape), "scale" float (default 1), "orig_size" (h, w) (default:
      image_size / scale), "example_mask" bool (default True), "index" int (the example's
      index in its source; given by any example, the batch has "index" i32[B], -1 elsewhere).
    max_boxes: M, boxes per image after padding.
    policy: see `pad_boxes`.
    image_shape: (H, W) of the batch; images are zero padded at the bottom and right.
      Default: the largest height and width among the examples.
  Returns:
    the batch dict.
  """
  if not examples:
    raise ValueError("examples: expected at least one example, got an empty sequence")
  if image_shape is None:
    image_shape = (max(e["image"].shape[0] for e in examples),
                   max(e["image"].shape[1] for e in examples))
  hh, ww = (int(s) for s in image_shape)
  b = len(examples)
  batch = {
      "image": np.zeros((b, hh, ww, 3), np.uint8),
      "image_size": np.zeros((b, 2), np.int32),
      "boxes": np.zeros((b, max_boxes, 4), np.float32),
      "labels": np.zeros((b, max_boxes), np.int32),
      "box_mask": np.zeros((b, max_boxes), bool),
      "difficult": np.zeros((b, max_boxes), bool),
      "image_id": np.zeros((b,), np.int32),
      "example_mask": np.zeros((b,), bool),
      "scale": np.zeros((b,), np.float32),
      "orig_size": np.zeros((b, 2), np.int32),
  }
  for i, ex in enumerate(examples):
    image = ex["image"]
    eid = ex.get("image_id")
    checks.check_array("image", image, ndim=3, last_dim=3, dtype_kind="u")
    h, w = image.shape[:2]
    if h > hh or w > ww:
      where = "" if eid is None else f" (example {eid})"
      raise ValueError(f"image{where}: shape {h}x{w} does not fit the batch shape {hh}x{ww}")
    batch["image"][i, :h, :w] = image
    size = ex.get("image_size", (h, w))
    scale = float(ex.get("scale", 1.0))
    batch["image_size"][i] = size
    batch["scale"][i] = scale
    batch["orig_size"][i] = ex.get("orig_size", np.round(np.asarray(size) / scale))
    batch["image_id"][i] = -1 if eid is None else int(eid)
    batch["example_mask"][i] = bool(ex.get("example_mask", True))
    (batch["boxes"][i], batch["labels"][i], batch["box_mask"][i],
     batch["difficult"][i]) = pad_boxes(ex["boxes"], ex["labels"], max_boxes, policy=policy,
                                        example_id=eid, difficult=ex.get("difficult"))
  if any("index" in ex for ex in examples):   # evaluation: each example's index in its source
    batch["index"] = np.asarray([int(ex.get("index", -1)) for ex in examples], np.int32)
  with_props = [ex for ex in examples if ex.get("proposals") is not None]
  if with_props:   # a fixed capacity P; examples without proposals (batch padding) get none
    p = np.asarray(with_props[0]["proposals"]).reshape(-1, 4).shape[0]
    batch["proposals"] = np.zeros((b, p, 4), np.float32)
    batch["proposal_mask"] = np.zeros((b, p), bool)
    for i, ex in enumerate(examples):
      if ex.get("proposals") is None:
        continue
      props = np.asarray(ex["proposals"], np.float32).reshape(-1, 4)
      if len(props) != p:
        raise ValueError(f"proposals (example {ex.get('image_id')}): expected the batch's "
                         f"capacity of {p} (padded) proposals, got {len(props)}")
      batch["proposals"][i] = props
      batch["proposal_mask"][i] = np.asarray(ex.get("proposal_mask", np.ones(p, bool)), bool)
  return batch


def aspect_grouped_order(order: np.ndarray, landscape: np.ndarray, batch_size: int
                         ) -> np.ndarray:
  """An epoch's example order rearranged so that batches are all-landscape or all-portrait.

  Consecutive runs of `batch_size` in the result hold examples of one orientation, so every
  such batch fits a landscape (S, M) or portrait (M, S) shape bucket, never the square (M, M)
  one; the leftovers of both orientations (fewer than a batch each) come last, and only that
  batch mixes them. Batches appear in the order of their first example in `order`, so a
  shuffled `order` gives shuffled batches, and the result is a pure function of its inputs (a
  Loader's (epoch, position) state keeps its meaning).

  Args:
    order: i[N] an epoch's order of example indices (a permutation of 0..N-1).
    landscape: bool[N] per example index: True when its image is at least as wide as tall.
    batch_size: B.
  Returns:
    i[N] the same indices, grouped.
  """
  order = np.asarray(order)
  landscape = np.asarray(landscape, bool)
  checks.check_positive("batch_size", batch_size)
  if landscape.shape != (len(order),):
    raise ValueError(f"landscape: expected one flag per example ({len(order)}), got shape "
                     f"{landscape.shape}")
  chunks, rest = [], []
  for flag in (True, False):
    idx = np.flatnonzero(landscape[order] == flag)          # positions in `order`
    full = len(idx) // batch_size * batch_size
    chunks += [idx[i:i + batch_size] for i in range(0, full, batch_size)]
    rest.append(idx[full:])
  chunks.sort(key=lambda c: c[0])
  return order[np.concatenate(chunks + rest).astype(int)]
