"""jaxdet.ops.windows against float64 NumPy loops: grids, window coding, match score, merging."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdet.ops import windows as win


def _iou64(a, b):
  lt = np.maximum(a[:2], b[:2])
  rb = np.minimum(a[2:], b[2:])
  inter = np.prod(np.maximum(rb - lt, 0.0))
  area = lambda x: max(x[2] - x[0], 0.0) * max(x[3] - x[1], 0.0)
  union = area(a) + area(b) - inter
  return inter / union if union > 0 else 0.0


def _match64(a, b):
  """The documented score, written from the formula: centre distance / mean side + 1 - IoU."""
  ca, cb = (a[:2] + a[2:]) / 2, (b[:2] + b[2:]) / 2
  mean_side = (max(a[2] - a[0], 0) + max(a[3] - a[1], 0) + max(b[2] - b[0], 0)
               + max(b[3] - b[1], 0)) / 4
  dist = np.hypot(*(ca - cb)) / mean_side if mean_side > 0 else 0.0
  return dist + 1.0 - _iou64(a, b)


def _merge64(boxes, scores, classes, mask, threshold):
  """OverFeat's greedy merge as a plain loop over live boxes (members averaged, scores summed)."""
  members = {i: [i] for i in range(len(boxes)) if mask[i]}
  cur = {i: boxes[i].astype(np.float64) for i in members}
  while True:
    best = None
    live = sorted(members)
    for x, i in enumerate(live):
      for j in live[x + 1:]:
        if classes[i] != classes[j]:
          continue
        s = _match64(cur[i], cur[j])
        if best is None or s < best[0]:
          best = (s, i, j)
    if best is None or best[0] > threshold:
      break
    _, i, j = best
    members[i] += members.pop(j)
    cur.pop(j)
    cur[i] = np.mean(boxes[members[i]].astype(np.float64), axis=0)
  out = sorted(((sum(scores[members[i]]), i) for i in members), key=lambda t: (-t[0], t[1]))
  return [(cur[i], s, classes[i], len(members[i])) for s, i in out]


def _clustered_boxes(rng, n, clusters=4):
  centres = rng.uniform(20, 100, (clusters, 2))
  sizes = rng.uniform(10, 40, (clusters, 2))
  k = rng.integers(clusters, size=n)
  c = centres[k] + rng.normal(0, 3, (n, 2))
  s = sizes[k] * rng.uniform(0.8, 1.2, (n, 2))
  return np.concatenate([c - s / 2, c + s / 2], 1).astype(np.float32)


def test_window_grid_against_loop(rng):
  h, w, step, window = 3, 5, 8, 32
  sy, sx = 0.75, 1.5
  got = np.asarray(win.window_grid((h, w), step, window, (sy, sx)))
  want = np.array([[j * step / sx, i * step / sy, j * step / sx + window / sx,
                    i * step / sy + window / sy] for i in range(h) for j in range(w)])
  np.testing.assert_allclose(got, want, rtol=1e-6)
  assert got.dtype == np.float32


def test_window_scales_give_windows_of_each_size_and_aspect():
  sizes, aspects, window = (1.5, 0.5), (0.5, 1.0, 2.0), 32
  pairs = win.window_scales(sizes, aspects)
  assert len(pairs) == 6 and all(isinstance(v, float) for p in pairs for v in p)
  for k, (sy, sx) in enumerate(pairs):
    s, a = sizes[k // 3], aspects[k % 3]                                  # size-major
    box = np.asarray(win.window_grid((1, 1), 8, window, (sy, sx)), np.float64)[0]
    w, h = box[2] - box[0], box[3] - box[1]
    np.testing.assert_allclose([w / h, w * h], [a, (window / s) ** 2], rtol=1e-6)
  assert win.window_scales((0.7,)) == ((0.7, 0.7),)
  with pytest.raises(ValueError, match="aspect_ratios"):
    win.window_scales((1.0,), (1.0, 0.0))
  with pytest.raises(TypeError, match="sizes"):
    win.window_scales(("1",))


def test_window_coding_round_trip_and_reference(rng):
  windows = np.concatenate([rng.uniform(0, 50, (7, 2)), rng.uniform(60, 120, (7, 2))], 1)
  boxes = rng.uniform(-10, 130, (7, 4)).astype(np.float32)
  codes = np.asarray(win.encode_in_window(jnp.asarray(boxes), jnp.asarray(windows, jnp.float32)))
  wsz = np.tile(windows[:, 2:] - windows[:, :2], 2)
  want = (boxes - np.tile(windows[:, :2], 2)) / wsz
  np.testing.assert_allclose(codes, want, rtol=1e-4, atol=1e-5)
  back = win.decode_in_window(jnp.asarray(codes), jnp.asarray(windows, jnp.float32))
  np.testing.assert_allclose(back, boxes, rtol=1e-4, atol=1e-3)
  own = win.encode_in_window(jnp.asarray(windows, jnp.float32), jnp.asarray(windows, jnp.float32))
  np.testing.assert_allclose(own, np.tile([0, 0, 1, 1], (7, 1)), atol=1e-6)


def test_encode_degenerate_window_is_finite():
  w = jnp.array([[5.0, 5.0, 5.0, 9.0]])
  g = jax.grad(lambda b: win.encode_in_window(b, w).sum())(jnp.array([[1.0, 2.0, 3.0, 4.0]]))
  assert np.all(np.isfinite(g))
  assert np.all(np.isfinite(win.encode_in_window(jnp.ones((1, 4)), w)))


def test_match_score_against_reference(rng):
  a = _clustered_boxes(rng, 9)
  b = _clustered_boxes(rng, 6)
  a[0] = a[1]   # identical pair: score 0 against itself
  got = np.asarray(win.match_score(jnp.asarray(a), jnp.asarray(b)))
  want = np.array([[_match64(x.astype(np.float64), y.astype(np.float64)) for y in b] for x in a])
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  self_score = np.asarray(win.match_score(jnp.asarray(a[:2]), jnp.asarray(a[:2])))
  np.testing.assert_allclose(np.diag(self_score), 0.0, atol=1e-6)


@pytest.mark.parametrize("threshold", [0.0, 0.8])
def test_merge_boxes_against_greedy_loop(rng, threshold):
  n = 24
  boxes = _clustered_boxes(rng, n)
  scores = rng.uniform(0.1, 1.0, n).astype(np.float32)
  classes = rng.integers(0, 2, n).astype(np.int32)
  mask = rng.uniform(size=n) > 0.2
  if threshold == 0.0:
    boxes[3] = boxes[5]   # an identical pair merges even at threshold 0
    classes[3] = classes[5]
    mask[3] = mask[5] = True
  out = jax.jit(lambda *a: win.merge_boxes(*a, threshold=threshold))(
      jnp.asarray(boxes), jnp.asarray(scores), jnp.asarray(classes), jnp.asarray(mask))
  want = _merge64(boxes, scores, classes, mask, threshold)
  k = len(want)
  valid = np.asarray(out["valid"])
  assert valid[:k].all() and not valid[k:].any()
  np.testing.assert_allclose(out["boxes"][:k], np.array([w[0] for w in want]), rtol=1e-4,
                             atol=1e-3)
  np.testing.assert_allclose(out["scores"][:k], [w[1] for w in want], rtol=1e-5)
  np.testing.assert_array_equal(out["labels"][:k], [w[2] for w in want])
  np.testing.assert_array_equal(out["counts"][:k], [w[3] for w in want])
  assert int(np.sum(out["counts"])) == int(mask.sum())
  np.testing.assert_array_equal(out["boxes"][k:], 0.0)


def test_merge_masked_equals_sliced(rng):
  n = 12
  boxes = _clustered_boxes(rng, n)
  scores = rng.uniform(0.1, 1.0, n).astype(np.float32)
  classes = np.zeros(n, np.int32)
  pad_boxes = np.concatenate([boxes, rng.uniform(0, 100, (5, 4)).astype(np.float32)])
  pad_scores = np.concatenate([scores, np.full(5, 9.0, np.float32)])
  mask = np.arange(n + 5) < n
  a = win.merge_boxes(jnp.asarray(boxes), jnp.asarray(scores), jnp.asarray(classes),
                      jnp.ones(n, bool), threshold=0.8)
  b = win.merge_boxes(jnp.asarray(pad_boxes), jnp.asarray(pad_scores),
                      jnp.zeros(n + 5, jnp.int32), jnp.asarray(mask), threshold=0.8)
  for key in ("boxes", "scores", "labels", "counts", "valid"):
    np.testing.assert_allclose(np.asarray(b[key])[:n], np.asarray(a[key]), rtol=1e-6)
  assert not np.asarray(b["valid"])[n:].any()


def test_crop_windows_reproduces_linear_images():
  yy, xx = np.mgrid[0:64, 0:64].astype(np.float32)
  image = np.stack([xx, yy, 2 * xx + yy], -1)
  windows = jnp.array([[8.0, 16.0, 40.0, 48.0], [10.0, 4.0, 26.0, 36.0]])
  crops = np.asarray(win.crop_windows(jnp.asarray(image), windows, 8))
  for w, crop in zip(np.asarray(windows), crops):
    # Bilinear sampling reproduces a linear image: bin centres of an 8 x 8 grid over the window.
    cx = w[0] + (np.arange(8) + 0.5) * (w[2] - w[0]) / 8 - 0.5
    cy = w[1] + (np.arange(8) + 0.5) * (w[3] - w[1]) / 8 - 0.5
    np.testing.assert_allclose(crop[..., 0], np.broadcast_to(cx[None, :], (8, 8)), atol=1e-3)
    np.testing.assert_allclose(crop[..., 1], np.broadcast_to(cy[:, None], (8, 8)), atol=1e-3)


def test_errors():
  with pytest.raises(ValueError, match="step"):
    win.window_grid((2, 2), 0, 32)
  with pytest.raises(ValueError, match="scale"):
    win.window_grid((2, 2), 8, 32, (1.0, 2.0, 3.0))
  with pytest.raises(ValueError, match="mask"):
    win.merge_boxes(jnp.zeros((3, 4)), jnp.zeros(3), jnp.zeros(3, jnp.int32), jnp.ones(4, bool),
                    threshold=0.5)
  with pytest.raises(ValueError, match="threshold"):
    win.merge_boxes(jnp.zeros((3, 4)), jnp.zeros(3), jnp.zeros(3, jnp.int32), jnp.ones(3, bool),
                    threshold=-1.0)
  with pytest.raises(ValueError, match="a: expected last dimension 4"):
    win.match_score(jnp.zeros((3, 5)), jnp.zeros((3, 4)))
