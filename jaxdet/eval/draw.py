"""Drawing detections and ground truth on images (host side, Pillow), and saving PNGs."""

from __future__ import annotations

import colorsys
import os
import pathlib
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from jaxdet import checks

_GOLDEN = 0.618033988749895


def class_color(label: int) -> tuple[int, int, int]:
  """A bright RGB colour for class `label`; hues spread by the golden ratio, so neighbours differ."""
  r, g, b = colorsys.hsv_to_rgb((int(label) * _GOLDEN + 0.1) % 1.0, 0.75, 0.95)
  return int(round(r * 255)), int(round(g * 255)), int(round(b * 255))


def box_pixels(box: Sequence[float], height: int, width: int) -> tuple[int, int, int, int] | None:
  """The inclusive pixel rectangle (col0, row0, col1, row1) of a continuous box, or None.

  Pixel (row i, col j) covers [j, j + 1) x [i, i + 1); it belongs to the box when its centre
  (j + 0.5, i + 0.5) lies inside [x1, x2) x [y1, y2). Boxes thinner than a pixel keep one pixel;
  the rectangle is clipped to the image, None if nothing of it is visible.
  """
  x1, y1, x2, y2 = (float(v) for v in box)
  j0, i0 = int(np.ceil(x1 - 0.5)), int(np.ceil(y1 - 0.5))
  j1, i1 = max(int(np.ceil(x2 - 0.5)) - 1, j0), max(int(np.ceil(y2 - 0.5)) - 1, i0)
  if j1 < 0 or i1 < 0 or j0 >= width or i0 >= height:
    return None
  return max(j0, 0), max(i0, 0), min(j1, width - 1), min(i1, height - 1)


def draw_detections(image: Any, boxes: Any, labels: Any, scores: Any = None, *,
                    class_names: Sequence[str] | None = None, score_threshold: float = 0.0,
                    valid: Any = None, gt_boxes: Any = None, gt_labels: Any = None,
                    line_width: int = 2, show_labels: bool = True) -> np.ndarray:
  """Draws boxes with class-coloured outlines and "name 0.93" tags; returns a new image.

  Args:
    image: u8[H, W, 3] RGB (not modified).
    boxes: f32[K, 4] (x1, y1, x2, y2) pixels; the outline is `line_width` pixels drawn inside
      the box's pixel rectangle (see `box_pixels`).
    labels: i32[K] class ids (they pick the colour, and the name from `class_names`).
    scores: optional f32[K]; shown in the tag, and boxes below `score_threshold` are skipped.
    class_names: optional names indexed by class id; the id is shown without them.
    score_threshold: minimum score drawn (needs `scores`).
    valid: optional bool[K]; False slots (padding) are skipped.
    gt_boxes: optional f32[N, 4] ground truth, drawn first as dashed 1-pixel outlines without
      tags (white, or the class colour when `gt_labels` i32[N] is given).
    line_width: outline width of detections in pixels.
    show_labels: draw the tags (a filled box in the class colour above the box, inside it when
      there is no room above).
  Returns:
    u8[H, W, 3]: a copy of `image` with the drawing; the highest score is drawn last (on top).
  """
  image = np.asarray(image)
  checks.check_array("image", image, ndim=3, last_dim=3, dtype_kind="u")
  if image.dtype != np.uint8:
    raise TypeError(f"image: expected dtype uint8, got {image.dtype}")
  boxes = np.asarray(boxes)
  labels = np.asarray(labels)
  checks.check_boxes("boxes", boxes)
  checks.check_array("labels", labels, ndim=1, dtype_kind="iu")
  checks.check_same_size("boxes", boxes, "labels", labels)
  checks.check_positive("line_width", line_width)
  keep = np.ones(len(boxes), bool) & np.all(np.isfinite(boxes), axis=1)
  if valid is not None:
    valid = np.asarray(valid)
    checks.check_mask("valid", valid, "labels", labels.shape)
    keep &= valid
  if scores is not None:
    scores = np.asarray(scores)
    checks.check_array("scores", scores, ndim=1, dtype_kind="f")
    checks.check_same_size("boxes", boxes, "scores", scores)
    keep &= scores >= score_threshold
  height, width = image.shape[:2]
  pil = Image.fromarray(image, "RGB")
  draw = ImageDraw.Draw(pil)

  if gt_boxes is not None:
    gt_boxes = np.asarray(gt_boxes)
    checks.check_boxes("gt_boxes", gt_boxes)
    if gt_labels is not None:
      gt_labels = np.asarray(gt_labels)
      checks.check_array("gt_labels", gt_labels, ndim=1, dtype_kind="iu")
      checks.check_same_size("gt_boxes", gt_boxes, "gt_labels", gt_labels)
    for n, box in enumerate(gt_boxes):
      rect = box_pixels(box, height, width) if np.all(np.isfinite(box)) else None
      if rect is not None:
        color = (255, 255, 255) if gt_labels is None else class_color(gt_labels[n])
        _dashed_rectangle(draw, rect, color)

  order = np.flatnonzero(keep)
  if scores is not None:
    order = order[np.argsort(scores[order], kind="stable")]        # highest score on top
  font = ImageFont.load_default() if show_labels else None
  for k in order:
    rect = box_pixels(boxes[k], height, width)
    if rect is None:
      continue
    color = class_color(labels[k])
    draw.rectangle(rect, outline=color, width=line_width)
    if show_labels:
      name = (class_names[labels[k]] if class_names is not None and 0 <= labels[k] < len(class_names)
              else str(int(labels[k])))
      text = name if scores is None else f"{name} {float(scores[k]):.2f}"
      _tag(draw, font, rect, text, color)
  return np.asarray(pil, dtype=np.uint8).copy()


def _dashed_rectangle(draw, rect, color, dash: int = 4) -> None:
  """A 1-pixel dashed outline of the inclusive pixel rectangle (dashes of `dash` pixels)."""
  j0, i0, j1, i1 = rect
  for start in range(j0, j1 + 1, 2 * dash):
    end = min(start + dash - 1, j1)
    draw.line([(start, i0), (end, i0)], fill=color)
    draw.line([(start, i1), (end, i1)], fill=color)
  for start in range(i0, i1 + 1, 2 * dash):
    end = min(start + dash - 1, i1)
    draw.line([(j0, start), (j0, end)], fill=color)
    draw.line([(j1, start), (j1, end)], fill=color)


def _tag(draw, font, rect, text: str, color) -> None:
  """A filled label tag at the box's top-left corner: above the box, or inside at the top."""
  j0, i0, _, _ = rect
  left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
  tag_w, tag_h = right - left + 4, bottom - top + 2
  y = i0 - tag_h if i0 - tag_h >= 0 else i0
  draw.rectangle((j0, y, j0 + tag_w - 1, y + tag_h - 1), fill=color)
  luminance = 0.299 * color[0] + 0.587 * color[1] + 0.114 * color[2]
  ink = (0, 0, 0) if luminance > 140 else (255, 255, 255)
  draw.text((j0 + 2 - left, y + 1 - top), text, fill=ink, font=font)


def save_image(path: str | os.PathLike, image: Any) -> pathlib.Path:
  """Writes u8[H, W, 3] RGB `image` as a PNG at `path`, creating parent directories."""
  image = np.asarray(image)
  checks.check_array("image", image, ndim=3, last_dim=3, dtype_kind="u")
  if image.dtype != np.uint8:
    raise TypeError(f"image: expected dtype uint8, got {image.dtype}")
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(image, "RGB").save(path, format="PNG")
  return path
