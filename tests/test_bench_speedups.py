"""experiments.bench_speedups --small: every row measured or marked, files written, ratios right."""

import json
import os
import sys

import numpy as np
import pytest

from experiments import bench_speedups


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("bench_speedups"))
  result = bench_speedups.main(["--small", "--out", out, "--repeats", "1"])
  return out, result


def test_writes_json_table_and_chart(small_run):
  out, result = small_run
  with open(os.path.join(out, "bench_speedups.json")) as f:
    assert json.load(f)["rows"] == json.loads(json.dumps(result["rows"]))
  assert os.path.getsize(os.path.join(out, "speedups.png")) > 0
  with open(os.path.join(out, "bench_speedups.md")) as f:
    lines = f.read().splitlines()
  header = next(line for line in lines if line.startswith("| detector"))
  assert [c.strip() for c in header.strip("|").split("|")] == list(bench_speedups.COLUMNS)
  body = [line for line in lines if line.startswith("| ") and line != header]
  assert [line.split("|")[1].strip() for line in body] == [t for _, t in bench_speedups.ROWS]
  assert all(len(line.strip("|").split("|")) == len(bench_speedups.COLUMNS) for line in body)


def test_rows_are_measured_or_say_why_not(small_run):
  _, result = small_run
  rows = {r["system"]: r for r in result["rows"]}
  assert set(rows) == {k for k, _ in bench_speedups.ROWS}
  for row in rows.values():
    if "not_available" in row:
      assert row["not_available"]
      continue
    assert row["test_s"] > 0 and row["gflops_per_image"] > 0
  assert "test_s" in rows["rcnn"] and "test_s" in rows["yolo"]
  ref = rows["rcnn"]
  for row in rows.values():
    if "test_s" in row:
      assert row["speedup"] == pytest.approx(ref["test_s"] / row["test_s"])
  ss = result["selective_search"]
  if ss["s_per_image"] is None:
    assert "ximgproc" in ss["reason"] and rows["rcnn"]["test_with_proposals_s"] is None
  else:
    assert rows["rcnn"]["test_with_proposals_s"] == pytest.approx(ref["test_s"] + ss["s_per_image"])
    assert rows["yolo"]["test_with_proposals_s"] == rows["yolo"]["test_s"]


def test_torchvision_twins_timed_or_reason_given(small_run):
  _, result = small_run
  tv = result["torchvision"]
  assert tv["reason"]   # the small setting has no VGG16 twins (or torch is missing)
  assert all("torchvision_s" not in r for r in result["rows"])


def test_does_not_import_ml_collections():
  import subprocess
  code = ("import sys; sys.modules['ml_collections'] = None; "
          "import experiments.bench_speedups, jaxdet.models.rcnn, jaxdet.models.fast_rcnn, "
          "jaxdet.models.faster_rcnn, jaxdet.models.yolo")
  subprocess.run([sys.executable, "-c", code], check=True, cwd=os.path.dirname(
      os.path.dirname(os.path.abspath(__file__))))


def test_random_proposals_lie_inside_the_image(rng):
  boxes = bench_speedups.random_proposals(rng, 500, 60, 100)
  assert boxes.shape == (500, 4) and boxes.dtype == np.float32
  assert np.all(boxes[:, 0] >= 0) and np.all(boxes[:, 1] >= 0)
  assert np.all(boxes[:, 2] <= 100 + 1e-4) and np.all(boxes[:, 3] <= 60 + 1e-4)
  assert np.all(boxes[:, 2] - boxes[:, 0] >= 16 - 1e-4)
  assert np.all(boxes[:, 3] - boxes[:, 1] >= 16 - 1e-4)
