"""The embedded default dataset: coloured shapes on textured backgrounds, rendered with NumPy.

Every image is a pure function of (seed, split, index), so the dataset needs no files, no
network and no storage, and any example can be read in any order. The class of an object is
its shape; its colour is drawn independently of the class, so a detector must learn shape.

Classes (index: name): 0 rectangle, 1 ellipse, 2 triangle, 3 cross, 4 diamond, 5 ring.

Rendering:
  * background: a smooth random colour field (bilinear upsampling of a coarse random grid)
    plus per-pixel Gaussian noise over the whole image (objects included);
  * objects: flat colours from a palette with jitter, random sizes and aspect ratios,
    triangles in four orientations; each object lies entirely inside the image;
  * occlusion: later objects are drawn over earlier ones and an object's box stays the
    extent of its whole shape; a new object that would hide more than `max_occlusion` of an
    earlier one is not drawn (another placement is tried), so every labelled object stays
    mostly visible and no unlabelled fragments remain.
Boxes are the tight pixel extent of each shape's mask: (min column, min row, max column + 1,
max row + 1), continuous coordinates, no +1 convention.
"""

from __future__ import annotations

import zlib
from typing import Any, Sequence

import numpy as np
from PIL import Image
from scipy import special

from jaxdet import checks

CLASS_NAMES = ("rectangle", "ellipse", "triangle", "cross", "diamond", "ring")

# Saturated object colours (RGB); each draw jitters them a little.
_PALETTE = np.array([
    [220, 40, 40], [40, 180, 60], [50, 80, 220], [235, 200, 40], [200, 60, 200],
    [40, 200, 210], [245, 130, 30], [250, 250, 250], [20, 20, 20]], np.float32)


# Standard normal quantiles at 256 evenly spaced probabilities: a random byte indexes this table
# to give (quantised) Gaussian noise ten times faster than Generator.normal.
_NORMAL_LUT = special.ndtri((np.arange(256) + 0.5) / 256).astype(np.float32)


def _split_code(split: str) -> int:
  return zlib.crc32(split.encode("utf-8"))


def _shape_mask(kind: int, u: np.ndarray, v: np.ndarray, rng: np.random.Generator
                ) -> np.ndarray:
  """Mask of shape `kind` on normalised coordinates u, v (the shape fills [-1, 1]^2).

  Args:
    kind: class index into CLASS_NAMES.
    u: f32[h, w] (x - cx) / half_width at pixel centres.
    v: f32[h, w] (y - cy) / half_height at pixel centres.
  Returns:
    bool[h, w].
  """
  if kind == 0:    # rectangle
    return (np.abs(u) <= 1) & (np.abs(v) <= 1)
  if kind == 1:    # ellipse
    return u * u + v * v <= 1
  if kind == 2:    # isosceles triangle, apex pointing up, down, left or right
    o = rng.integers(4)
    a, b = (u, v) if o < 2 else (v, u)
    b = b if o % 2 == 0 else -b
    return (b <= 1) & (np.abs(a) <= (b + 1) / 2)
  if kind == 3:    # cross (plus sign)
    t = rng.uniform(0.25, 0.4)
    au, av = np.abs(u), np.abs(v)
    return ((au <= t) & (av <= 1)) | ((av <= t) & (au <= 1))
  if kind == 4:    # diamond
    return np.abs(u) + np.abs(v) <= 1
  if kind == 5:    # ring
    r2 = u * u + v * v
    t = rng.uniform(0.45, 0.65)
    return (r2 <= 1) & (r2 >= t * t)
  raise ValueError(f"kind: expected a class index in [0, {len(CLASS_NAMES)}), got {kind}")


def _background(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
  """A smooth random colour field f32[h, w, 3] in [0, 255] (muted colours): a coarse random
  grid upsampled bilinearly (PIL, no BLAS: multithreaded BLAS stalls on a busy host)."""
  gh, gw = 2 + int(rng.integers(2, 7)), 2 + int(rng.integers(2, 7))
  base = rng.uniform(60, 190, size=3)
  grid = base + rng.normal(0, rng.uniform(10, 45), size=(gh, gw, 3))
  grid = Image.fromarray(np.clip(np.rint(grid), 0, 255).astype(np.uint8))
  return np.asarray(grid.resize((w, h), Image.BILINEAR), dtype=np.float32)


class SyntheticDetection:
  """Random-access synthetic detection dataset.

  `ds[i]` -> {"image": u8[H, W, 3], "boxes": f32[N, 4] (x1, y1, x2, y2) pixels,
  "labels": i32[N] in [0, num_classes), "image_id": int (= i)}, with 0 <= N <= max_objects.

  Args:
    num_examples: length of the dataset.
    image_size: (H, W) of every image.
    min_objects / max_objects: the number of objects per image is drawn uniformly from
      [min_objects, max_objects] (placements that fail the occlusion rule may leave fewer).
    seed: dataset seed; `(seed, split, index)` determine each example.
    split: any string ("train", "test", ...); different splits give different images.
    single_object: exactly one, larger object per image (localization as regression).
    min_size / max_size: object extent as a fraction of min(H, W) (defaults: 0.15-0.45,
      or 0.35-0.85 for single_object).
    max_occlusion: the largest fraction of an object later objects may cover.
    noise: standard deviation of the per-pixel Gaussian noise (0-255 scale).
    num_classes: use only the first `num_classes` shape classes.
  """

  def __init__(self, num_examples: int, *, image_size: Sequence[int] = (128, 128),
               min_objects: int = 0, max_objects: int = 4, seed: int = 0,
               split: str = "train", single_object: bool = False,
               min_size: float | None = None, max_size: float | None = None,
               max_occlusion: float = 0.5, noise: float = 8.0,
               num_classes: int = len(CLASS_NAMES)):
    checks.check_positive("num_examples", int(num_examples), allow_zero=True)
    h, w = (int(s) for s in image_size)
    checks.check_positive("image_size", (h, w))
    if min(h, w) < 16:
      raise ValueError(f"image_size: expected at least 16x16 pixels, got {(h, w)}")
    if single_object:
      min_objects = max_objects = 1
    if not 0 <= min_objects <= max_objects:
      raise ValueError(f"min_objects, max_objects: expected 0 <= min_objects <= max_objects, "
                       f"got {min_objects}, {max_objects}")
    if not 1 <= num_classes <= len(CLASS_NAMES):
      raise ValueError(f"num_classes: expected 1..{len(CLASS_NAMES)}, got {num_classes}")
    lo, hi = (0.35, 0.85) if single_object else (0.15, 0.45)
    self.min_size = lo if min_size is None else float(min_size)
    self.max_size = hi if max_size is None else float(max_size)
    if not 0 < self.min_size <= self.max_size <= 1:
      raise ValueError(f"min_size, max_size: expected 0 < min_size <= max_size <= 1, got "
                       f"{self.min_size}, {self.max_size}")
    self.num_examples = int(num_examples)
    self.image_size = (h, w)
    self.min_objects, self.max_objects = int(min_objects), int(max_objects)
    self.seed, self.split, self.single_object = int(seed), str(split), bool(single_object)
    self.max_occlusion, self.noise = float(max_occlusion), float(noise)
    self.num_classes = int(num_classes)
    self.class_names = CLASS_NAMES[:num_classes]

  def __len__(self) -> int:
    return self.num_examples

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index)
    if index < 0:
      index += self.num_examples
    if not 0 <= index < self.num_examples:
      raise IndexError(f"index {index} out of range for {self.num_examples} examples")
    rng = np.random.default_rng([self.seed, _split_code(self.split), index])
    image, boxes, labels = self._render(rng)
    return {"image": image, "boxes": boxes, "labels": labels, "image_id": index}

  def _render(self, rng: np.random.Generator):
    h, w = self.image_size
    canvas = _background(h, w, rng)                         # f32[h, w, 3]
    owner = np.full((h, w), -1, np.int32)                   # top object at each pixel
    n_target = int(rng.integers(self.min_objects, self.max_objects + 1))
    boxes, labels, areas, visible = [], [], [], []
    side = min(h, w)
    attempts = 0
    while len(labels) < n_target and attempts < 8 * max(n_target, 1):
      attempts += 1
      kind = int(rng.integers(self.num_classes))
      ext = rng.uniform(self.min_size, self.max_size) * side      # the longer extent
      aspect = np.exp(rng.uniform(-0.5, 0.5))
      bw, bh = ext * min(aspect, 1.0), ext * min(1.0 / aspect, 1.0)
      bw, bh = max(bw, 8.0), max(bh, 8.0)
      cx = rng.uniform(bw / 2, w - bw / 2)
      cy = rng.uniform(bh / 2, h - bh / 2)
      x0, x1 = int(np.floor(cx - bw / 2)), int(np.ceil(cx + bw / 2))
      y0, y1 = int(np.floor(cy - bh / 2)), int(np.ceil(cy + bh / 2))
      x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
      u = ((np.arange(x0, x1, dtype=np.float32) + 0.5 - cx) / (bw / 2))[None, :]
      v = ((np.arange(y0, y1, dtype=np.float32) + 0.5 - cy) / (bh / 2))[:, None]
      u, v = np.broadcast_to(u, (y1 - y0, x1 - x0)), np.broadcast_to(v, (y1 - y0, x1 - x0))
      mask = _shape_mask(kind, u, v, rng)
      if not mask.any():
        continue
      # Occlusion rule: no earlier object may lose more than max_occlusion of its area.
      win = owner[y0:y1, x0:x1]
      if labels:
        covered = np.bincount(win[mask] + 1, minlength=len(labels) + 1)[1:]
        if np.any(np.asarray(visible) - covered < (1 - self.max_occlusion) * np.asarray(areas)):
          continue
        visible = list(np.asarray(visible) - covered)
      rows = np.flatnonzero(mask.any(axis=1))
      cols = np.flatnonzero(mask.any(axis=0))
      boxes.append([x0 + cols[0], y0 + rows[0], x0 + cols[-1] + 1, y0 + rows[-1] + 1])
      labels.append(kind)
      areas.append(int(mask.sum()))
      visible.append(areas[-1])
      colour = _PALETTE[rng.integers(len(_PALETTE))] + rng.normal(0, 12, 3)
      canvas[y0:y1, x0:x1][mask] = colour
      win[mask] = len(labels) - 1
    noise_bytes = np.frombuffer(rng.bytes(canvas.size), np.uint8).reshape(canvas.shape)
    canvas += (self.noise * _NORMAL_LUT)[noise_bytes]
    image = np.clip(canvas, 0, 255).astype(np.uint8)
    return (image, np.asarray(boxes, np.float32).reshape(-1, 4),
            np.asarray(labels, np.int32))
