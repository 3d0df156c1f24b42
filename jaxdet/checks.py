"""Argument checks shared by every public jaxdet function.

One place for the errors a user sees: each names the argument, what was expected and what came
(shape, dtype, value range). Two kinds:

* trace-time checks (`check_array`, `check_boxes`, `check_same_size`, `check_mask`,
  `check_positive`): look only at shapes and dtypes, so they are safe inside `jax.jit` and
  raise while tracing;
* host-side value checks (`check_image`, `check_box_values`, `check_label_values`): look
  at the numbers (NaN, x2 < x1, labels out of range) of NumPy arrays where data enters
  jaxdet; the box and label checks also take the concatenated boxes of many examples with
  the example of each (`owner`), to check a whole dataset in one vectorised pass.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax.numpy as jnp
import numpy as np


def _describe(x: Any) -> str:
  shape = getattr(x, "shape", None)
  dtype = getattr(x, "dtype", None)
  if shape is None:
    return f"{type(x).__name__} {x!r}"[:120]
  return f"array of shape {tuple(shape)} and dtype {dtype}"


def _dtype_kind(dtype: Any) -> str:
  """NumPy's dtype kind, with bfloat16 and the other ml_dtypes floats counted as "f"."""
  if jnp.issubdtype(dtype, jnp.floating):
    return "f"
  return np.dtype(dtype).kind


def check_array(name: str, x: Any, *, ndim: int | Sequence[int] | None = None,
                last_dim: int | None = None, dtype_kind: str | None = None,
                shape: Sequence[int | None] | None = None) -> None:
  """Checks rank, last dimension, dtype kind and shape of an array (trace-time safe).

  Args:
    name: the argument's name, as the user wrote it.
    x: a NumPy or JAX array (or tracer).
    ndim: the allowed rank or ranks.
    last_dim: the required size of the last axis.
    dtype_kind: allowed NumPy dtype kinds, e.g. "f" (floating), "iu" (integers), "b" (bool).
    shape: the required shape; None entries match any size.
  Raises:
    TypeError: `x` is not an array or has the wrong dtype kind.
    ValueError: wrong rank, last dimension or shape.
  """
  if not hasattr(x, "shape") or not hasattr(x, "dtype"):
    raise TypeError(f"{name}: expected an array, got {_describe(x)}")
  if ndim is not None:
    allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
    if x.ndim not in allowed:
      want = " or ".join(str(a) for a in allowed)
      raise ValueError(f"{name}: expected rank {want}, got {_describe(x)}")
  if last_dim is not None and (x.ndim == 0 or x.shape[-1] != last_dim):
    raise ValueError(f"{name}: expected last dimension {last_dim}, got {_describe(x)}")
  if dtype_kind is not None and _dtype_kind(x.dtype) not in dtype_kind:
    kinds = {"f": "floating", "i": "signed integer", "u": "unsigned integer", "b": "bool"}
    want = " or ".join(kinds.get(k, k) for k in dtype_kind)
    raise TypeError(f"{name}: expected a {want} dtype, got {_describe(x)}")
  if shape is not None:
    ok = len(shape) == x.ndim and all(s is None or s == d for s, d in zip(shape, x.shape))
    if not ok:
      want = "(" + ", ".join("?" if s is None else str(s) for s in shape) + ")"
      raise ValueError(f"{name}: expected shape {want}, got {_describe(x)}")


def check_boxes(name: str, boxes: Any, *, ndim: int | Sequence[int] = 2) -> None:
  """Boxes must be a floating array `[..., 4]` of the given rank (trace-time safe)."""
  check_array(name, boxes, ndim=ndim, last_dim=4, dtype_kind="f")


def check_same_size(name_a: str, a: Any, name_b: str, b: Any, axis_a: int = 0,
                    axis_b: int = 0) -> None:
  """`a.shape[axis_a]` must equal `b.shape[axis_b]` (trace-time safe)."""
  if a.shape[axis_a] != b.shape[axis_b]:
    raise ValueError(
        f"{name_b}: expected {a.shape[axis_a]} entries on axis {axis_b} to match {name_a} "
        f"{tuple(a.shape)}, got {_describe(b)}")


def check_mask(name: str, mask: Any, like_name: str, like_shape: Sequence[int]) -> None:
  """A padding mask must be bool with the given shape (trace-time safe)."""
  check_array(name, mask, dtype_kind="b")
  if tuple(mask.shape) != tuple(like_shape):
    raise ValueError(f"{name}: expected a bool mask of shape {tuple(like_shape)} to match "
                     f"{like_name}, got {_describe(mask)}")


def check_positive(name: str, value: Any, *, allow_zero: bool = False) -> None:
  """A Python number, or every entry of a tuple of numbers, must be > 0 (>= 0 if allowed)."""
  values = value if isinstance(value, (tuple, list)) else (value,)
  for v in values:
    if not isinstance(v, (int, float, np.integer, np.floating)) or isinstance(v, bool):
      raise TypeError(f"{name}: expected a number or a tuple of numbers, got {value!r}")
    if (v < 0) if allow_zero else (v <= 0):
      bound = ">= 0" if allow_zero else "> 0"
      raise ValueError(f"{name}: expected values {bound}, got {value!r}")


def check_fraction(name: str, value: Any, *, open_low: bool = False,
                   open_high: bool = False) -> None:
  """A number in [0, 1] (the bounds open where asked: (0, 1], [0, 1)), e.g. an IoU threshold,
  a fraction or a dropout rate; otherwise a ValueError naming `name`, the interval and the
  value."""
  low = 0.0 < value if open_low else 0.0 <= value
  high = value < 1.0 if open_high else value <= 1.0
  if not (low and high):
    interval = f"{'(' if open_low else '['}0, 1{')' if open_high else ']'}"
    raise ValueError(f"{name}: expected a value in {interval}, got {value!r}")


def check_spatial_size(name: str, x: Any, what: str = "feature map", *,
                       axes: Sequence[int] = (0, 1)) -> None:
  """An image or feature map must have height and width > 0 on `axes` (trace-time safe)."""
  if any(x.shape[a] == 0 for a in axes):
    raise ValueError(f"{name}: expected a non-empty {what} (height and width > 0), "
                     f"got {_describe(x)}")


def check_image(name: str, image: Any, *, example_id: Any = None) -> None:
  """Host-side: an image must be u8[H, W, 3] RGB (grey u8[H, W] or [H, W, 1] too), H, W > 0.

  Raises:
    TypeError (not uint8) / ValueError (wrong rank, channels or an empty side) naming the
    argument and the example.
  """
  where = "" if example_id is None else f" (example {example_id})"
  dtype, shape = getattr(image, "dtype", None), tuple(np.shape(image))
  if dtype != np.uint8:
    raise TypeError(f"{name}{where}: expected uint8 RGB pixels, got dtype {dtype} and shape "
                    f"{shape}")
  if len(shape) == 2:
    shape = shape + (1,)
  if len(shape) != 3 or shape[-1] not in (1, 3) or shape[0] == 0 or shape[1] == 0:
    raise ValueError(f"{name}{where}: expected shape (H, W, 3) with H, W > 0, got "
                     f"{tuple(np.shape(image))}")


def _first_bad(problems: list[tuple[np.ndarray, str]]) -> tuple[int, str] | None:
  """(index, reason) of the first entry with any problem (the first reason that applies)."""
  bad = np.zeros(len(problems[0][0]), bool)
  for mask, _ in problems:
    bad |= mask
  if not bad.any():
    return None
  i = int(np.argmax(bad))
  return i, next(reason for mask, reason in problems if mask[i])


def _where(i: int, example_id: Any, owner: np.ndarray | None) -> tuple[str, int]:
  """(" (example ...)", index within the example) of entry i for the error message."""
  if owner is None:
    return ("" if example_id is None else f" (example {example_id})"), i
  k = int(owner[i])
  j = int(np.sum(owner[:i] == k))
  return f" (example {k if example_id is None else example_id[k]})", j


def check_box_values(name: str, boxes: np.ndarray, *, height: Any = None, width: Any = None,
                     example_id: Any = None, owner: np.ndarray | None = None,
                     allow_empty: bool = True) -> None:
  """Host-side: boxes f32[N, 4] must be finite with x1 <= x2, y1 <= y2 (and inside the image).

  Checks many examples at once when their boxes are concatenated and `owner` says whose each
  box is (one vectorised pass; the error names the first offending box).

  Args:
    height, width: the image size; with `owner`, also per-box arrays f[N] (each box's image).
    example_id: named in the error: the example's id, or with `owner` a sequence of
      per-example ids indexed by `owner`.
    owner: int[N] (optional) the example of each box; the error then gives the box's index
      within its example.
    allow_empty: False makes boxes of zero width or height an error too.
  Raises:
    ValueError naming the argument, the example and the first offending box.
  """
  boxes = np.asarray(boxes)
  check_boxes(name, boxes, ndim=2)
  if not len(boxes):
    return
  x1, y1, x2, y2 = (boxes[:, k] for k in range(4))
  problems = [(~np.all(np.isfinite(boxes), axis=1), "is not finite"),
              ((x2 < x1) | (y2 < y1),
               "has x2 < x1 or y2 < y1 (format is x1, y1, x2, y2 in pixels)")]
  if not allow_empty:
    problems.append(((x2 <= x1) | (y2 <= y1), "has zero area"))
  if height is not None and width is not None:
    tol = 1e-3
    problems.append(((x1 < -tol) | (y1 < -tol) | (x2 > np.asarray(width) + tol)
                     | (y2 > np.asarray(height) + tol), "outside"))
  first = _first_bad(problems)
  if first is None:
    return
  i, reason = first
  where, j = _where(i, example_id, owner)
  if reason == "outside":
    h, w = (v[i] if np.ndim(v) else v for v in (height, width))
    raise ValueError(f"{name}{where}: box {j} {boxes[i].tolist()} lies outside the "
                     f"{h}x{w} (height x width) image")
  raise ValueError(f"{name}{where}: box {j} {reason}: {boxes[i].tolist()}")


def check_label_values(name: str, labels: np.ndarray, num_classes: int, *,
                       example_id: Any = None, owner: np.ndarray | None = None,
                       hint: str = "") -> None:
  """Host-side: integer labels must lie in [0, num_classes).

  Args:
    example_id, owner: as for `check_box_values` (labels of many examples concatenated).
    hint: appended to the error (e.g. how to fix the class list).
  """
  labels = np.asarray(labels)
  check_array(name, labels, ndim=1, dtype_kind="iu")
  bad = (labels < 0) | (labels >= num_classes)
  if bad.any():
    i = int(np.argmax(bad))
    where, j = _where(i, example_id, owner)
    raise ValueError(f"{name}{where}: label {int(labels[i])} at index {j} is outside "
                     f"[0, {num_classes}) for {num_classes} classes{hint}")
