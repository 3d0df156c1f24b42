"""experiments.lecture8: a --fast run on the cheapest system, its files, table and resumption."""

import json
import os
import shutil
import time

import pytest

from experiments import lecture8

BROKEN = lecture8.Stage("not_a_system", "A detector whose stage raises (it has no config)")


@pytest.fixture(scope="module")
def fast_run(tmp_path_factory):
  """One --fast run of localization plus a stage that fails; then a second run."""
  out = str(tmp_path_factory.mktemp("lecture8"))
  stages = lecture8.STAGES
  lecture8.STAGES = stages + (BROKEN,)
  try:
    first = lecture8.run(out, only="localization,not_a_system", fast=True)
    marker = os.path.join(out, "work", "localization", lecture8.MARKER)
    stamp = os.path.getmtime(marker)
    start = time.perf_counter()
    second = lecture8.run(out, only="localization,not_a_system", fast=True)
    second_s = time.perf_counter() - start
  finally:
    lecture8.STAGES = stages
  return out, first, second, second_s, marker, stamp


def test_fast_run_writes_every_output(fast_run):
  out, _, second, _, _, _ = fast_run
  for name in ("lecture8.md", "lecture8.json", "speedups.png"):
    assert os.path.getsize(os.path.join(out, name)) > 0, name
  for i in range(lecture8.NUM_DRAWN):
    assert os.path.getsize(os.path.join(out, "detections", f"localization_{i}.png")) > 0
  with open(os.path.join(out, "lecture8.json")) as f:
    saved = json.load(f)
  assert saved["columns"] == list(lecture8.COLUMNS)
  row = {r["system"]: r for r in saved["rows"]}["localization"]
  assert 0.0 <= row["voc07_map"] <= 1.0 and 0.0 <= row["coco_AP"] <= 1.0
  assert row["test_s"] > 0 and row["test_with_proposals_s"] == row["test_s"]
  assert row["num_proposals"] is None
  assert row["train_wall_s"] > 0 and row["train_cpu_s"] > 0 and row["num_steps"] == 2
  assert row["detections"] == [f"detections/localization_{i}.png"
                               for i in range(lecture8.NUM_DRAWN)]
  assert second["rows"] == saved["rows"]


def test_table_has_the_lecture_columns_and_marks_failed_stages(fast_run):
  out, first, _, _, _, _ = fast_run
  with open(os.path.join(out, "lecture8.md")) as f:
    lines = f.read().splitlines()
  header = next(line for line in lines if line.startswith("| detector"))
  assert [c.strip() for c in header.strip("|").split("|")] == list(lecture8.COLUMNS)
  rows = [line for line in lines if line.startswith("| ") and line is not header]
  body = [r for r in rows if not r.startswith("| detector")]
  assert len(body) == 2
  assert all(len(r.strip("|").split("|")) == len(lecture8.COLUMNS) for r in body)
  failed = next(r for r in body if "not_a_system" in r)
  assert ("not available: failed: ModuleNotFoundError: No module named "
          "'experiments.configs.not_a_system'") in failed
  row = {r["system"]: r for r in first["rows"]}["not_a_system"]
  assert row["not_available"].startswith("failed: ModuleNotFoundError")
  assert "speedup" not in {r["system"]: r for r in first["rows"]}["localization"]   # no R-CNN


def test_second_run_reuses_finished_stages(fast_run):
  _, first, second, second_s, marker, stamp = fast_run
  assert os.path.getmtime(marker) == stamp
  loc = [r for r in second["rows"] if r["system"] == "localization"][0]
  assert loc["reused"] is True
  assert [r for r in first["rows"] if r["system"] == "localization"][0]["reused"] is False
  assert loc["test_s"] == [r for r in first["rows"] if r["system"] == "localization"][0]["test_s"]
  assert second_s < 30   # no training, no timing: only the table, the JSON and the chart


def test_a_stage_finished_with_another_config_is_trained_again(fast_run, tmp_path):
  out = str(tmp_path / "copy")
  shutil.copytree(fast_run[0], out)
  marker = os.path.join(out, "work", "localization", lecture8.MARKER)
  with open(marker) as f:
    done = json.load(f)
  with open(marker, "w") as f:
    json.dump({**done, "fingerprint": "0123456789abcdef"}, f)
  result = lecture8.run(out, only="localization", fast=True)
  assert result["rows"][0]["reused"] is False
  stale = os.path.join(out, "work", "localization.stale-0123456789abcdef")
  with open(os.path.join(stale, lecture8.MARKER)) as f:
    assert json.load(f)["fingerprint"] == "0123456789abcdef"
  with open(marker) as f:
    assert json.load(f)["fingerprint"] == done["fingerprint"]


def test_speedups_are_ratios_of_test_times_to_rcnn():
  stages = [s for s in lecture8.STAGES if s.system in ("rcnn", "fast_rcnn", "yolo")]
  def result(test_s):
    return {"test_s_per_image": test_s, "eval": {"voc07_map": 0.5, "coco_AP": 0.3},
            "train_wall_s": 1.0, "train_cpu_s": 2.0, "num_steps": 3, "compile_s": 0.1,
            "detections": [], "reused": False}
  results = {"rcnn": {**result(8.0), "num_proposals": 212.0}, "fast_rcnn": result(0.25),
             "yolo": result(0.02)}
  ss = {"s_per_image": 1.75}
  rows = {r["system"]: r for r in lecture8.make_rows(stages, results, {}, ss)}
  assert rows["fast_rcnn"]["speedup"] == pytest.approx(8.0 / 0.25)
  assert rows["fast_rcnn"]["speedup_with_proposals"] == pytest.approx(9.75 / 2.0)
  assert rows["yolo"]["speedup_with_proposals"] == pytest.approx(9.75 / 0.02)
  assert rows["rcnn"]["speedup"] == pytest.approx(1.0)
  assert "1.75 (selective search, 212/img scored)" in lecture8.format_table(list(rows.values()),
                                                                              ss)
  no_ss = {r["system"]: r for r in lecture8.make_rows(
      stages, results, {}, {"s_per_image": None, "reason": "no ximgproc"})}
  assert no_ss["rcnn"]["test_with_proposals_s"] is None
  assert "speedup_with_proposals" not in no_ss["yolo"]
  assert "not measured: no ximgproc" in lecture8.format_table(list(no_ss.values()),
                                                              {"reason": "no ximgproc"})


def test_only_rejects_unknown_names():
  with pytest.raises(ValueError, match=r"--only: unknown system\(s\) \['yolov9'\]"):
    lecture8.select("localization,yolov9")


def test_pretraining_is_a_line_under_the_table_not_a_row():
  stages = [lecture8.Stage("classify", "Classification pretraining", detector=False),
            lecture8.Stage("rcnn", "R-CNN", init_from="classify"),
            lecture8.Stage("yolo", "YOLO v1", init_from="classify/sub"),
            lecture8.Stage("localization", "Localization")]
  done = {"classify": {"eval": {"accuracy": 0.9123}, "train_wall_s": 12.4, "train_cpu_s": 20.6}}
  lines = lecture8.pretraining_lines(stages, done, {})
  assert len(lines) == 1
  assert "accuracy 0.912" in lines[0] and "12 s wall / 21 s CPU" in lines[0]
  assert "start rcnn, yolo." in lines[0]
  lines = lecture8.pretraining_lines(stages, {}, {"classify": "failed: OSError: disk full"})
  assert lines == ["Classification pretraining (`classify`): not available: failed: OSError: "
                   "disk full"]
  rows = lecture8.make_rows(stages, {}, {"rcnn": "x", "yolo": "y", "localization": "z"},
                            {"s_per_image": None})
  assert [r["system"] for r in rows] == ["rcnn", "yolo", "localization"]
