"""experiments.export: the exported program runs in a fresh process without jaxdet's models and
gives the detector's detections; --help on every entry point prints its usage."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "train"))

from experiments import export, train  # noqa: E402
from jaxdet import detector as det_lib  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = f"--config={os.path.join(ROOT, 'tests', 'train', 'toy_config.py')}"

CONSUMER = """
import json, sys
import numpy as np
from jax import export
program = export.deserialize(bytearray(open(sys.argv[1], "rb").read()))
meta = json.load(open(sys.argv[1] + ".json"))
inputs = np.load(sys.argv[2])
out = program.call(*[inputs[x["name"]] for x in meta["inputs"]])
np.savez(sys.argv[3], **dict(zip(meta["outputs"], [np.asarray(o) for o in out])))
assert "jaxdet.models" not in sys.modules and "jaxdet" not in sys.modules, sorted(sys.modules)
print("ok")
"""


def test_exported_program_gives_the_same_detections(tmp_path):
  from jaxdet import systems
  systems.SYSTEMS["toy"] = "toy_system:build_system"
  workdir = str(tmp_path / "run")
  train.main(["train", CONFIG, "--workdir", workdir, "--config.train.num_steps=2",
              "--config.eval.every_steps=0", "--config.checkpoint.every_steps=0"])
  out = str(tmp_path / "toy.jax")
  meta = export.main(["export", "--workdir", workdir, "--out", out])
  assert meta["batch"] == "b" and meta["inputs"][0]["shape"] == ["b", 32, 32, 3]
  assert json.load(open(out + ".json"))["class_names"] == meta["class_names"]
  # three images of other sizes, prepared as the detector prepares them
  det = det_lib.Detector.from_workdir(workdir)
  rng = np.random.default_rng(0)
  images = [rng.integers(0, 255, s, dtype=np.uint8) for s in ((40, 30, 3), (20, 50, 3),
                                                              (32, 32, 3))]
  batch = next(iter(det_lib.make_batches(det.config, det_lib.ImageSource(images, ["x"]))))
  np.savez(tmp_path / "in.npz", image=batch["image"], image_size=batch["image_size"])
  env = {**os.environ, "PYTHONPATH": ""}
  done = subprocess.run([sys.executable, "-c", CONSUMER, out, str(tmp_path / "in.npz"),
                         str(tmp_path / "out.npz")], capture_output=True, text=True, env=env,
                        cwd=str(tmp_path))
  assert done.returncode == 0, done.stderr[-2000:]
  got = np.load(tmp_path / "out.npz")
  want = jax.device_get(det.predict(det.variables, {k: v for k, v in batch.items()
                                                    if k != "example_mask"}))
  for k in ("boxes", "scores", "labels", "valid"):
    np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-5)
  # and mapped back they are the Detector's detections
  mapped = det_lib.to_original_pixels([{"boxes": got["boxes"][i]} for i in range(3)], batch)
  for i, r in enumerate(det(images)):
    np.testing.assert_allclose(mapped[i]["boxes"], r["boxes"], atol=1e-4)


@pytest.mark.parametrize("module", ["train", "evaluate", "detect", "export", "bench_train",
                                    "rpn_recall", "lecture8"])
def test_help_prints_usage(module):
  done = subprocess.run([sys.executable, "-m", f"experiments.{module}", "--help"],
                        capture_output=True, text=True, cwd=ROOT)
  assert done.returncode == 0, done.stderr[-2000:]
  assert "usage" in done.stdout.lower()
  if module != "lecture8":   # argparse; the others parse --config through absl
    assert "--config" in done.stdout and "yolo" in done.stdout and "--show_config" in done.stdout
    assert "paper" in done.stdout


def test_show_config_prints_every_key():
  done = subprocess.run([sys.executable, "-m", "experiments.train", CONFIG, "--show_config",
                         "--config.train.num_steps=7"], capture_output=True, text=True, cwd=ROOT)
  assert done.returncode == 0, done.stderr[-2000:]
  assert "num_steps: 7" in done.stdout and "learning_rate" in done.stdout
