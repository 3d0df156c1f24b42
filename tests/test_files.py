"""jaxdet.files: atomic writes leave either the old file or the whole new one, never a part."""

import json
import os

import numpy as np
import pytest

from jaxdet import files


def test_json_and_npz_round_trip(tmp_path, rng):
  path = str(tmp_path / "sub" / "a.json")          # the folder is created
  files.write_json(path, {"x": [1, 2.5], "y": "z"})
  with open(path) as f:
    assert json.load(f) == {"x": [1, 2.5], "y": "z"}
  arrays = {"a": rng.normal(size=(3, 4)), "b": np.arange(5)}
  files.save_npz(str(tmp_path / "b.npz"), arrays)
  with np.load(tmp_path / "b.npz") as got:
    assert set(got.files) == {"a", "b"}
    np.testing.assert_array_equal(got["a"], arrays["a"])


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
  path = str(tmp_path / "a.json")
  files.write_json(path, {"old": True})

  def half_then_fail(f):
    f.write(b'{"new": ')
    raise OSError("disk full")

  with pytest.raises(OSError, match="disk full"):
    files.atomic_write(path, half_then_fail)
  with open(path) as f:
    assert json.load(f) == {"old": True}
  assert os.listdir(tmp_path) == ["a.json"]
  with pytest.raises(TypeError):                   # not JSON: nothing is written either
    files.write_json(path, {"bad": object()})
  assert os.listdir(tmp_path) == ["a.json"]
