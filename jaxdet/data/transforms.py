"""Resizing and augmentation that move boxes with the pixels, on one example at a time (NumPy).

An example is a dict with "image" u8[h, w, 3] (real pixels only, no padding), "boxes" f32[N, 4]
(x1, y1, x2, y2) pixels, "labels" i32[N], optionally "difficult" bool[N], optionally region
proposals "proposals" f32[P, 4] with "proposal_mask" bool[P] (moved exactly like "boxes"; a
fixed capacity P, so proposals clipped to nothing are masked out rather than dropped), plus
bookkeeping that
the transforms keep up to date: "scale" (resize factor from the original image) and
"orig_size" (height, width) of the original image. Transforms return a new dict and never
modify their input.

Geometry: pixel (row r, column c) covers the continuous square [c, c+1) x [r, r+1). A resize
from w to w' columns maps x to x * w' / w (what PIL and OpenCV do with half-pixel centres), a
horizontal flip of a width-w image maps x to w - x, and an integer translation adds the offset,
so boxes keep covering exactly the pixels they covered.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from PIL import Image

Example = dict[str, Any]


def _replace(example: Mapping[str, Any], **updates) -> Example:
  out = dict(example)
  out.update(updates)
  return out


def _filter_boxes(example: Example, keep: np.ndarray) -> Example:
  """Keeps the boxes (and their per-box fields) where keep bool[N] is True."""
  out = dict(example)
  for key in ("boxes", "labels", "difficult"):
    if key in out and out[key] is not None:
      out[key] = np.asarray(out[key])[keep]
  return out


def _map_proposals(example: Mapping[str, Any], out: Example,
                   fn: Callable[[np.ndarray], np.ndarray]) -> Example:
  """Moves the optional "proposals" f32[P, 4] (padded, with "proposal_mask" bool[P]) by the same
  box mapping `fn` as "boxes"; padded rows stay zero. Returns `out` (updated in place)."""
  if example.get("proposals") is None:
    return out
  props = np.asarray(example["proposals"], np.float32).reshape(-1, 4)
  mask = np.asarray(example.get("proposal_mask", np.ones(len(props), bool)), bool)
  out["proposals"] = np.where(mask[:, None], fn(props), 0.0).astype(np.float32)
  out["proposal_mask"] = mask
  return out


def shorter_side_size(height: int, width: int, min_size: int, max_size: int
                      ) -> tuple[int, int]:
  """(new_h, new_w) with the shorter side `min_size` unless the longer would exceed `max_size`.

  The Fast/Faster R-CNN rule: scale s = min(min_size / shorter, max_size / longer).
  """
  s = min(min_size / min(height, width), max_size / max(height, width))
  return max(1, int(round(height * s))), max(1, int(round(width * s)))


def resize(example: Mapping[str, Any], size: Sequence[int]) -> Example:
  """Resizes the image to size (new_h, new_w) (bilinear) and scales the boxes with it."""
  image = example["image"]
  h, w = image.shape[:2]
  nh, nw = int(size[0]), int(size[1])
  if (nh, nw) == (h, w):
    return dict(example)
  resized = np.asarray(Image.fromarray(image).resize((nw, nh), Image.BILINEAR))
  sx, sy = nw / w, nh / h
  boxes = np.asarray(example["boxes"], np.float32) * np.float32([sx, sy, sx, sy])
  scale = float(example.get("scale", 1.0)) * math.sqrt(sx * sy)
  orig = example.get("orig_size", (h, w))
  out = _replace(example, image=resized, boxes=boxes, scale=scale, orig_size=tuple(orig))
  return _map_proposals(example, out, lambda p: p * np.float32([sx, sy, sx, sy]))


def resize_shorter_side(example: Mapping[str, Any], min_size: int, max_size: int) -> Example:
  """Resize keeping the aspect ratio: shorter side `min_size`, longer at most `max_size`."""
  h, w = example["image"].shape[:2]
  return resize(example, shorter_side_size(h, w, min_size, max_size))


def hflip(example: Mapping[str, Any]) -> Example:
  """Mirrors the image left-right; a box [x1, x2] becomes [w - x2, w - x1]."""
  image = example["image"]
  w = image.shape[1]
  boxes = np.asarray(example["boxes"], np.float32)
  flipped = np.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], axis=1)
  out = _replace(example, image=np.ascontiguousarray(image[:, ::-1]),
                 boxes=flipped.reshape(-1, 4))
  return _map_proposals(example, out, lambda p: np.stack(
      [w - p[:, 2], p[:, 1], w - p[:, 0], p[:, 3]], axis=1))


def clip_and_drop(example: Mapping[str, Any], min_extent: float = 1.0) -> Example:
  """Clips boxes to the image and drops those thinner than `min_extent` pixels afterwards."""
  h, w = example["image"].shape[:2]
  boxes = np.asarray(example["boxes"], np.float32).reshape(-1, 4)
  boxes = np.clip(boxes, 0.0, np.float32([w, h, w, h]))
  keep = ((boxes[:, 2] - boxes[:, 0]) >= min_extent) & ((boxes[:, 3] - boxes[:, 1]) >= min_extent)
  out = _filter_boxes(_replace(example, boxes=boxes), keep)
  if example.get("proposals") is not None:   # clipped; thinner ones are masked out, not dropped
    out = _map_proposals(example, out, lambda p: np.clip(p, 0.0, np.float32([w, h, w, h])))
    p = out["proposals"]
    out["proposal_mask"] = out["proposal_mask"] & ((p[:, 2] - p[:, 0]) >= min_extent) & (
        (p[:, 3] - p[:, 1]) >= min_extent)
    out["proposals"] = np.where(out["proposal_mask"][:, None], p, 0.0).astype(np.float32)
  return out


def scale_translate(example: Mapping[str, Any], rng: np.random.Generator,
                    max_fraction: float = 0.2, fill: int = 0) -> Example:
  """YOLO's augmentation: random scaling and translation of up to `max_fraction` of the size.

  The image is resized by s ~ U[1 - f, 1 + f], shifted by integer offsets up to f * size in
  each direction, and cropped or padded (with `fill`) back to its original size. Boxes move
  with the pixels, are clipped to the image and dropped when less than a pixel remains.
  """
  image = example["image"]
  h, w = image.shape[:2]
  s = rng.uniform(1 - max_fraction, 1 + max_fraction)
  tx = int(round(rng.uniform(-max_fraction, max_fraction) * w))
  ty = int(round(rng.uniform(-max_fraction, max_fraction) * h))
  scaled = resize(example, (max(1, round(h * s)), max(1, round(w * s))))
  src = scaled["image"]
  sh, sw = src.shape[:2]
  out = np.full((h, w, 3), fill, np.uint8)
  # Destination rows/columns [ty, ty + sh) intersected with [0, h), likewise for columns.
  y0, y1, x0, x1 = max(ty, 0), min(ty + sh, h), max(tx, 0), min(tx + sw, w)
  if y1 > y0 and x1 > x0:
    out[y0:y1, x0:x1] = src[y0 - ty:y1 - ty, x0 - tx:x1 - tx]
  boxes = scaled["boxes"] + np.float32([tx, ty, tx, ty])
  moved = _map_proposals(scaled, _replace(scaled, image=out, boxes=boxes),
                         lambda p: p + np.float32([tx, ty, tx, ty]))
  moved["scale"] = example.get("scale", 1.0)   # a crop, not a resize of the whole image
  return clip_and_drop(moved)


def hsv_jitter(example: Mapping[str, Any], rng: np.random.Generator,
               max_factor: float = 1.5) -> Example:
  """YOLO's colour augmentation: exposure (V) and saturation (S) each scaled by a random factor
  in [1 / max_factor, max_factor] (log-uniform), hue unchanged, computed exactly in HSV terms:
  with V = max(r, g, b), scaling S by f maps each channel c to V - f (V - c) (S clipped to 1);
  scaling V by g multiplies every channel by g (V clipped to 255, S and hue kept).
  """
  log_m = math.log(max_factor)
  f_sat = math.exp(rng.uniform(-log_m, log_m))
  f_val = math.exp(rng.uniform(-log_m, log_m))
  # Each output channel depends only on (V, c): tabulate the 256 x 256 values once per image.
  v = np.arange(256, dtype=np.float32)[:, None]            # V = max(r, g, b)
  c = np.arange(256, dtype=np.float32)[None, :]            # one channel, c <= V
  x = np.maximum(v - f_sat * (v - c), 0.0)                 # saturation; clipped at S = 1
  x = x * np.minimum(f_val, 255.0 / np.maximum(v, 1e-6))   # exposure; V clipped at 255
  table = np.clip(np.rint(x), 0, 255).astype(np.uint8).ravel()      # [V * 256 + c]
  image = example["image"]
  vmax = np.maximum(np.maximum(image[..., 0], image[..., 1]), image[..., 2])
  index = (vmax.astype(np.uint16) << 8)[..., None] | image
  return _replace(example, image=table[index])


def choose_bucket(height: int, width: int, buckets: Sequence[Sequence[int]]
                  ) -> tuple[int, int]:
  """The smallest (by area) bucket (H, W) with H >= height and W >= width.

  Raises:
    ValueError: no bucket fits; the message names the config key to change.
  """
  fits = [(int(bh), int(bw)) for bh, bw in buckets if bh >= height and bw >= width]
  if not fits:
    raise ValueError(f"buckets: no shape bucket in {list(map(tuple, buckets))} fits a "
                     f"{height}x{width} (height x width) image; add a larger (H, W) to the "
                     f"data config's `buckets` or change `resize`")
  return min(fits, key=lambda hw: (hw[0] * hw[1], hw))


def default_buckets(data_config: Mapping[str, Any]) -> list[tuple[int, int]]:
  """Shape buckets implied by the resize config when `buckets` is not given.

  shorter_side: (S, M), (M, S), (M, M) with S the largest min size and M the max size
  (landscape, portrait, and mixed batches); square: (size, size); none: (image_size).
  """
  r = data_config["resize"]
  mode = r["mode"]
  if mode == "shorter_side":
    s, m = max(int(x) for x in r["min_sizes"]), int(r["max_size"])
    return [(s, m), (m, s), (m, m)]
  if mode == "square":
    return [(int(r["square_size"]),) * 2]
  if mode == "none":
    return [tuple(int(x) for x in data_config["image_size"])]
  raise ValueError(f"resize.mode: expected 'shorter_side', 'square' or 'none', got {mode!r}")


def make_transform(data_config: Mapping[str, Any], train: bool
                   ) -> Callable[[Mapping[str, Any], np.random.Generator], Example]:
  """The per-example transform of a data config: (example, rng) -> example.

  Training: resize (a random min size from `resize.min_sizes` in "shorter_side" mode), then
  the enabled augmentations in the order hflip (p = 0.5), scale_translate, hsv.
  Evaluation: resize only (`resize.test_min_size`, default the first of `min_sizes`).
  """
  r = data_config["resize"]
  mode = r["mode"]
  aug = data_config.get("augment", {}) or {}
  min_sizes = [int(x) for x in r.get("min_sizes", ())]
  test_min = r.get("test_min_size") or (min_sizes[0] if min_sizes else None)
  if mode not in ("shorter_side", "square", "none"):
    raise ValueError(f"resize.mode: expected 'shorter_side', 'square' or 'none', got {mode!r}")
  if mode == "shorter_side" and not min_sizes:
    raise ValueError("resize.min_sizes: expected at least one size for mode 'shorter_side'")

  def transform(example: Mapping[str, Any], rng: np.random.Generator) -> Example:
    ex = dict(example)
    ex.setdefault("orig_size", tuple(ex["image"].shape[:2]))
    ex.setdefault("scale", 1.0)
    if mode == "shorter_side":
      s = int(min_sizes[rng.integers(len(min_sizes))]) if train else int(test_min)
      ex = resize_shorter_side(ex, s, int(r["max_size"]))
    elif mode == "square":
      ex = resize(ex, (int(r["square_size"]),) * 2)
    if train:
      if aug.get("hflip", False) and rng.random() < 0.5:
        ex = hflip(ex)
      if float(aug.get("scale_translate", 0.0) or 0.0) > 0:
        ex = scale_translate(ex, rng, float(aug["scale_translate"]))
      if float(aug.get("hsv", 1.0) or 1.0) > 1:
        ex = hsv_jitter(ex, rng, float(aug["hsv"]))
    ex["image_size"] = tuple(ex["image"].shape[:2])
    return ex

  return transform
