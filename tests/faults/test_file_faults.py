"""Files the runs write: strict JSON (no bare NaN), the modes a plain open() would give, a
metrics log cut back to the step a run resumes from."""

import json
import math
import os

import numpy as np
import pytest

from jaxdet import files
from jaxdet.train.writers import MetricWriter, read_metrics


def _strict_load(path):
  def reject(name):
    raise ValueError(f"non-standard JSON constant {name}")
  with open(path) as f:
    return json.load(f, parse_constant=reject)


@pytest.fixture
def umask():
  """Sets the process umask for the test and restores it after."""
  old = os.umask(0o022)
  yield lambda mask: os.umask(mask)
  os.umask(old)


def test_json_is_strict_nonfinite_becomes_null(tmp_path):
  path = str(tmp_path / "a.json")
  files.write_json(path, {"nan": float("nan"), "inf": [1.0, float("inf")], "ok": 0.5,
                          "nested": {"neg": -float("inf")}})
  assert _strict_load(path) == {"nan": None, "inf": [1.0, None], "ok": 0.5,
                                "nested": {"neg": None}}


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_new_files_get_the_mode_open_would_give(tmp_path, umask, mask):
  umask(mask)
  files.write_json(str(tmp_path / "a.json"), {"x": 1})
  files.save_npz(str(tmp_path / "b.npz"), {"x": np.arange(3)})
  with open(tmp_path / "plain", "w"):
    pass
  want = os.stat(tmp_path / "plain").st_mode & 0o777
  assert want == 0o666 & ~mask
  for name in ("a.json", "b.npz"):
    assert os.stat(tmp_path / name).st_mode & 0o777 == want, name


def test_rewriting_keeps_the_existing_mode(tmp_path, umask):
  path = tmp_path / "a.json"
  files.write_json(str(path), {"x": 1})
  os.chmod(path, 0o640)
  files.write_json(str(path), {"x": 2})
  assert os.stat(path).st_mode & 0o777 == 0o640 and _strict_load(path) == {"x": 2}


def test_metric_lines_are_strict_json(tmp_path):
  writer = MetricWriter(str(tmp_path))
  writer.write(1, {"loss": float("nan"), "grad_norm": float("inf"), "lr": 0.1})
  writer.close()
  with open(tmp_path / "metrics.jsonl") as f:
    line = f.read()
  assert "NaN" not in line and "Infinity" not in line
  (record,) = read_metrics(str(tmp_path))
  assert record == {"step": 1, "split": "train", "loss": None, "grad_norm": None, "lr": 0.1}


def test_truncate_drops_later_and_torn_lines(tmp_path):
  writer = MetricWriter(str(tmp_path))
  for step in (1, 2, 3, 4):
    writer.write(step, {"loss": 1.0 / step})
  writer.write(2, {"map": 0.5}, split="eval")
  writer.write(4, {"map": 0.6}, split="eval")
  with open(writer.path, "a") as f:
    f.write('{"step": 5, "split": "tr')              # a run killed mid-line
  assert writer.truncate(2) == 4
  got = [(m["step"], m["split"]) for m in read_metrics(str(tmp_path))]
  assert got == [(1, "train"), (2, "train"), (2, "eval")]
  assert writer.truncate(2, keep_eval_at_step=False) == 1   # that step is evaluated again
  assert [(m["step"], m["split"]) for m in read_metrics(str(tmp_path))] == [(1, "train"),
                                                                          (2, "train")]
  writer.write(3, {"loss": math.pi})
  assert [m["step"] for m in read_metrics(str(tmp_path))] == [1, 2, 3]
  writer.close()
