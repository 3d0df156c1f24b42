"""Drawing detections: only pixels at box edges (and tags) change; PNGs round-trip."""

import numpy as np
import pytest
from PIL import Image

from jaxdet.eval import draw


def _band(height, width, rect, line_width):
  """bool[H, W]: pixels of the inclusive rectangle (c0, r0, c1, r1) within line_width of its border."""
  c0, r0, c1, r1 = rect
  rows, cols = np.mgrid[:height, :width]
  inside = (cols >= c0) & (cols <= c1) & (rows >= r0) & (rows <= r1)
  inner = ((cols >= c0 + line_width) & (cols <= c1 - line_width)
           & (rows >= r0 + line_width) & (rows <= r1 - line_width))
  return inside & ~inner


def _changed(a, b):
  return np.any(a != b, axis=-1)


def test_integer_box_changes_exactly_its_outline():
  """Box (10, 20, 50, 60) covers pixel columns 10..49 and rows 20..59 (pixel centres inside);
  a 2-pixel outline changes exactly the 2 outer rings of that rectangle."""
  image = np.full((80, 70, 3), 30, np.uint8)
  before = image.copy()
  out = draw.draw_detections(image, np.array([[10, 20, 50, 60]], np.float32),
                             np.array([3], np.int32), show_labels=False, line_width=2)
  assert out.shape == image.shape and out.dtype == np.uint8
  np.testing.assert_array_equal(image, before)                    # input untouched
  np.testing.assert_array_equal(_changed(out, image), _band(80, 70, (10, 20, 49, 59), 2))
  assert np.all(out[20, 10:50] == draw.class_color(3))


def test_float_boxes_and_tags_stay_near_the_boxes(rng):
  h, w = 120, 160
  image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
  boxes = np.array([[20.3, 40.6, 90.2, 110.7], [60.5, 5.2, 150.9, 50.4]], np.float32)
  out = draw.draw_detections(image, boxes, np.array([0, 1], np.int32),
                             np.array([0.93, 0.4], np.float32), class_names=["person", "dog"],
                             line_width=3)
  changed = _changed(out, image)
  allowed = np.zeros((h, w), bool)
  for x1, y1, x2, y2 in boxes:
    # The outline: within 3 px inside the continuous edges, give or take the rounding pixel.
    allowed |= _band(h, w, (int(x1) - 1, int(y1) - 1, int(x2) + 1, int(y2) + 1), 5)
    # The tag: a text strip at the top-left corner, above or just inside the box.
    allowed[max(int(y1) - 25, 0):int(y1) + 25, int(x1) - 1:int(x1) + 110] = True
    # Every pixel on the middle of the top and left edges is drawn (the top row of the
    # second box lies under the first box's tag, drawn later, so test below the tags).
    c0, r0, c1, r1 = draw.box_pixels((x1, y1, x2, y2), h, w)
    assert changed[r0 + 1, c0 + 1:c1 - 1].all() and changed[r0 + 25:r1 - 1, c0 + 1].all()
  assert not changed[~allowed].any()
  assert changed[allowed].mean() < 0.6                           # interiors stay untouched


def test_valid_threshold_and_gt_style():
  image = np.zeros((40, 40, 3), np.uint8)
  boxes = np.array([[5, 5, 30, 30], [10, 10, 20, 20]], np.float32)
  labels = np.array([0, 1], np.int32)
  scores = np.array([0.2, 0.9], np.float32)
  out = draw.draw_detections(image, boxes, labels, scores, valid=np.array([True, False]),
                             score_threshold=0.5)
  np.testing.assert_array_equal(out, image)                       # both filtered out
  out = draw.draw_detections(image, boxes[:0], labels[:0], gt_boxes=boxes[:1])
  changed = _changed(out, image)
  ring = _band(40, 40, (5, 5, 29, 29), 1)
  assert not changed[~ring].any()                                 # 1-pixel dashed outline
  assert 0.3 < changed[ring].mean() < 0.8                         # dashes, not a solid line
  assert np.all(out[5, 5] == 255)                                 # white without gt labels


def test_save_image_writes_a_readable_png(tmp_path, rng):
  image = rng.integers(0, 256, (9, 13, 3), dtype=np.uint8)
  path = draw.save_image(tmp_path / "a" / "b" / "detections.png", image)
  with Image.open(path) as png:
    assert png.format == "PNG"
    np.testing.assert_array_equal(np.asarray(png.convert("RGB")), image)


def test_bad_inputs():
  boxes = np.zeros((1, 4), np.float32)
  labels = np.zeros(1, np.int32)
  with pytest.raises(TypeError, match="image: expected dtype uint8"):
    draw.draw_detections(np.zeros((4, 4, 3), np.uint16), boxes, labels)
  with pytest.raises(ValueError, match="image: expected rank 3"):
    draw.draw_detections(np.zeros((4, 4), np.uint8), boxes, labels)
  with pytest.raises(ValueError, match="image: expected last dimension 3"):
    draw.save_image("unused.png", np.zeros((4, 4, 4), np.uint8))
  with pytest.raises(ValueError, match="labels: expected 1 entries"):
    draw.draw_detections(np.zeros((4, 4, 3), np.uint8), boxes, labels[:0])
  with pytest.raises(ValueError, match="valid: expected a bool mask of shape"):
    draw.draw_detections(np.zeros((4, 4, 3), np.uint8), boxes, labels, valid=np.ones(2, bool))
