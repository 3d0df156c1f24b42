"""The experiment entry points and the own-data snippet, run in-process on the toy system."""

import json
import os
import sys

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "train"))

from experiments import bench_train, detect, evaluate, own_data_example, train  # noqa: E402
from experiments.configs import common  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = f"--config={os.path.join(ROOT, 'tests', 'train', 'toy_config.py')}"


@pytest.fixture(autouse=True)
def toy_registered(monkeypatch):
  """Registers the test-only toy system for the duration of a test."""
  from jaxdet import systems
  monkeypatch.setitem(systems.SYSTEMS, "toy", "toy_system:build_system")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  from jaxdet import systems
  systems.SYSTEMS["toy"] = "toy_system:build_system"
  workdir = str(tmp_path_factory.mktemp("run"))
  scores = train.main(["train", CONFIG, "--workdir", workdir, "--config.train.num_steps=4"])
  return workdir, scores


def test_train_writes_scores_and_resumes(trained):
  workdir, scores = trained
  assert scores["step"] == 4
  assert {"voc07_map", "coco_AP", "coco_AP50", "coco_AP75", "images_per_s"} <= set(scores)
  assert 0.0 <= scores["voc07_map"] <= 1.0
  # run again with a longer schedule: it resumes at step 4 instead of starting over
  again = train.main(["train", CONFIG, "--workdir", workdir, "--config.train.num_steps=6"])
  assert again["step"] == 6
  steps = [json.loads(line)["step"] for line in open(os.path.join(workdir, "metrics.jsonl"))
           if json.loads(line)["split"] == "train"]
  assert steps == [2, 4, 6]


def test_evaluate_writes_eval_json(trained):
  workdir, _ = trained
  scores = evaluate.main(["evaluate", CONFIG, "--workdir", workdir])
  with open(os.path.join(workdir, "eval.json")) as f:
    saved = json.load(f)
  assert saved["voc07_map"] == pytest.approx(scores["voc07_map"])
  assert saved["num_images"] == 6 and saved["images_per_s"] > 0


def test_detect_draws_on_images(trained, tmp_path, rng):
  workdir, _ = trained
  paths = []
  for name, shape in (("a.png", (40, 30, 3)), ("b.jpg", (32, 32, 3))):
    Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8)).save(tmp_path / name)
    paths.append(str(tmp_path / name))
  out = tmp_path / "out"
  written = detect.main(["detect", CONFIG, "--workdir", workdir, "--images", *paths,
                         "--out", str(out), "--draw", "--score_threshold=0"])["drawn"]
  assert [os.path.basename(p) for p in written] == ["a.png", "b.png"]
  assert np.asarray(Image.open(written[0])).shape == (40, 30, 3)


def test_bench_train_reports_rates():
  result = bench_train.main(["bench", CONFIG, "--steps=2"])
  assert result["steps_per_s"] > 0 and result["images_per_s"] > 0
  assert result["compile_plus_first_step_s"] > 0


def test_unknown_config_key_names_nearest():
  with pytest.raises(ValueError, match=r"unknown key 'train\.batchsize'.*train\.batch_size"):
    common.parse_flags(["train", CONFIG, "--config.train.batchsize=3"])
  with pytest.raises(ValueError, match=r"unknown key 'optimizer\.lr'.*"):
    common.parse_flags(["train", CONFIG, "--config.optimizer.lr=0.1"])


def test_own_data_snippet(tmp_path):
  import toy_config
  config = toy_config.get_config()
  config.unlock()
  config.train.num_steps = 3
  config.eval.every_steps = 0
  scores = own_data_example.train_on_own_data(
      config, str(tmp_path), own_data_example.make_examples(12, 0),
      own_data_example.make_examples(5, 1), ["square", "bar"])
  assert scores["num_images"] == 5 and 0.0 <= scores["voc07_map"] <= 1.0


def test_gpu_benchmarks_script_rejects_an_unknown_part(tmp_path):
  import subprocess
  done = subprocess.run(["bash", "experiments/gpu_benchmarks.sh", "c", str(tmp_path)],
                        capture_output=True, text=True, cwd=os.path.dirname(
                            os.path.dirname(os.path.abspath(__file__))))
  assert done.returncode == 2 and "expected a, b or small, got 'c'" in done.stderr
