"""Atomic file writes: a reader (or a run killed mid-write) never sees a half-written file.

Each writer writes to a temporary file in the destination's folder, then renames it over the
destination (`os.replace`, atomic on POSIX file systems); on any error the temporary file is
removed and the destination is left as it was.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any, BinaryIO, Callable, Mapping

import numpy as np


def atomic_write(path: str, write: Callable[[BinaryIO], None], suffix: str = ".tmp") -> None:
  """Calls write(f) on a binary temporary file beside `path`, then renames it to `path`.
  The folder is created if missing."""
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp_", suffix=suffix)
  try:
    with os.fdopen(fd, "wb") as f:
      write(f)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def write_json(path: str, obj: Any, indent: int = 1) -> None:
  """`obj` as JSON at `path`, atomically."""
  atomic_write(path, lambda f: f.write(json.dumps(obj, indent=indent).encode()), ".json")


def save_npz(path: str, arrays: Mapping[str, Any]) -> None:
  """`arrays` (name -> array) as an uncompressed .npz at `path`, atomically."""
  atomic_write(path, lambda f: np.savez(f, **{k: np.asarray(v) for k, v in arrays.items()}),
               ".npz")
