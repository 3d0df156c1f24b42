"""Atomic file writes: a reader (or a run killed mid-write) never sees a half-written file.

Each writer writes to a temporary file in the destination's folder, then renames it over the
destination (`os.replace`, atomic on POSIX file systems); on any error the temporary file is
removed and the destination is left as it was. The file gets the mode a plain `open(path, "w")`
would give it: the existing file's mode, or 0o666 less the process umask for a new file.

JSON is strict (RFC 8259): NaN and infinities are written as null, never as the bare `NaN` /
`Infinity` that Python's json module emits by default and other readers reject.
"""

from __future__ import annotations

import json
import math
import os
import stat
import tempfile
from typing import Any, BinaryIO, Callable, Mapping

import numpy as np


def atomic_write(path: str, write: Callable[[BinaryIO], None], suffix: str = ".tmp") -> None:
  """Calls write(f) on a binary temporary file beside `path`, then renames it to `path`.
  The folder is created if missing."""
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  mode = file_mode(path)
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp_", suffix=suffix)
  try:
    os.fchmod(fd, mode)            # mkstemp makes 0o600 files
    with os.fdopen(fd, "wb") as f:
      write(f)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def umask() -> int:
  """The process's file mode creation mask (read without changing it where /proc allows)."""
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("Umask:"):
          return int(line.split()[1], 8)
  except OSError:
    pass
  mask = os.umask(0o022)           # elsewhere: the only portable way is to set and restore
  os.umask(mask)
  return mask


def file_mode(path: str) -> int:
  """The permission bits `open(path, "w")` would leave: those of the existing file, else
  0o666 & ~umask."""
  try:
    return stat.S_IMODE(os.stat(path).st_mode)
  except FileNotFoundError:
    return 0o666 & ~umask()


def finite_json(obj: Any) -> Any:
  """`obj` with every non-finite float (NaN, +-inf; Python, NumPy or 0-d arrays) as None and
  NumPy scalars as Python numbers, so that `json.dumps(..., allow_nan=False)` accepts it."""
  if isinstance(obj, Mapping):
    return {k: finite_json(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [finite_json(v) for v in obj]
  if isinstance(obj, (np.ndarray, np.generic)) and np.ndim(obj) == 0:
    obj = obj.item()
  if isinstance(obj, float) and not math.isfinite(obj):
    return None
  return obj


def dumps(obj: Any, indent: int | None = None) -> str:
  """Strict JSON text of `obj` (non-finite floats as null; see `finite_json`)."""
  return json.dumps(finite_json(obj), indent=indent, allow_nan=False)


def write_json(path: str, obj: Any, indent: int = 1) -> None:
  """`obj` as strict JSON at `path` (NaN and infinities as null), atomically."""
  atomic_write(path, lambda f: f.write(dumps(obj, indent=indent).encode()), ".json")


def save_npz(path: str, arrays: Mapping[str, Any]) -> None:
  """`arrays` (name -> array) as an uncompressed .npz at `path`, atomically."""
  atomic_write(path, lambda f: np.savez(f, **{k: np.asarray(v) for k, v in arrays.items()}),
               ".npz")
