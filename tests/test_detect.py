"""Detection on new images: jaxdet.Detector and experiments.detect on the toy system (trained 2
steps), Fast R-CNN with its selective search proposals, COCO output loaded by pycocotools."""

import contextlib
import io
import json
import os
import sys

import jax
import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "train"))

from experiments import detect, evaluate, train  # noqa: E402
from jaxdet import detector as det_lib  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = f"--config={os.path.join(ROOT, 'tests', 'train', 'toy_config.py')}"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  from jaxdet import systems
  systems.SYSTEMS["toy"] = "toy_system:build_system"
  out = str(tmp_path_factory.mktemp("run"))
  train.main(["train", CONFIG, "--workdir", out, "--config.train.num_steps=2",
              "--config.eval.every_steps=0", "--config.checkpoint.every_steps=0"])
  return out


@pytest.fixture(scope="module")
def images(tmp_path_factory):
  """A folder with a grey PNG, an RGBA PNG in a subfolder and a JPEG rotated by EXIF."""
  root = tmp_path_factory.mktemp("images")
  rng = np.random.default_rng(0)
  Image.fromarray(rng.integers(0, 255, (40, 30), dtype=np.uint8)).save(root / "grey.png")
  (root / "sub").mkdir()
  Image.fromarray(rng.integers(0, 255, (20, 50, 4), dtype=np.uint8)).save(root / "sub" / "a.png")
  exif = Image.Exif()
  exif[0x0112] = 6                        # orientation: rotate 90 degrees clockwise to view
  Image.fromarray(rng.integers(0, 255, (24, 36, 3), dtype=np.uint8)).save(
      root / "rot.jpg", exif=exif.tobytes())
  (root / "notes.txt").write_text("not an image")
  return root


def test_find_images_files_folders_globs(images):
  found = det_lib.find_images([str(images)])
  assert [os.path.relpath(p, images) for p in found] == ["grey.png", "rot.jpg", "sub/a.png"]
  assert det_lib.find_images([str(images / "*.png"), str(images / "grey.png")]) == [
      str(images / "grey.png")]
  assert len(det_lib.find_images(str(images / "**" / "*.png"))) == 2
  with pytest.raises(FileNotFoundError, match="missing"):
    det_lib.find_images([str(images / "missing.png")])


def test_load_image_modes_and_exif(images):
  assert det_lib.load_image(str(images / "grey.png")).shape == (40, 30, 3)
  assert det_lib.load_image(str(images / "sub" / "a.png")).shape == (20, 50, 3)
  assert det_lib.load_image(str(images / "rot.jpg")).shape == (36, 24, 3)   # EXIF applied
  assert det_lib.load_image(np.zeros((5, 7), np.uint8)).shape == (5, 7, 3)
  with pytest.raises(TypeError, match="uint8"):
    det_lib.load_image(np.zeros((5, 7, 3), np.float32))


def test_detector_boxes_in_original_pixels(workdir, images):
  from jaxdet.data import transforms
  det = det_lib.Detector.from_workdir(workdir)          # config from workdir/config.json
  assert os.path.exists(os.path.join(workdir, "config.json"))
  path = str(images / "rot.jpg")
  result = det(path)
  assert (result["height"], result["width"]) == (36, 24) and result["path"] == path
  # reference: resize by hand to the trained size, predict, scale by the per-axis factors
  image = det_lib.load_image(path)
  ex = transforms.resize({"image": image, "boxes": np.zeros((0, 4), np.float32)}, (32, 32))
  batch = {"image": ex["image"][None], "image_size": np.int32([[32, 32]])}
  out = jax.device_get(det.predict(det.variables, batch))
  want = np.asarray(out["boxes"][0], np.float64) * [24 / 32, 36 / 32, 24 / 32, 36 / 32]
  want = np.clip(want, 0, [24, 36, 24, 36])
  np.testing.assert_allclose(result["boxes"], want, rtol=1e-5, atol=1e-4)
  assert result["class_names"] == [det.class_names[int(c)] for c in result["labels"]]
  many = det([str(images)], batch_size=2)
  assert [(r["height"], r["width"]) for r in many] == [(40, 30), (36, 24), (20, 50)]
  np.testing.assert_allclose(many[1]["boxes"], result["boxes"], atol=1e-4)


def test_detect_cli_jsonl_and_drawings(workdir, images, tmp_path):
  out = tmp_path / "out"
  result = detect.main(["detect", "--workdir", workdir, "--images", str(images),
                        str(images / "*.png"), "--out", str(out), "--draw",
                        "--score_threshold=0"])
  lines = [json.loads(x) for x in open(result["detections"])]
  assert [os.path.basename(x["path"]) for x in lines] == ["grey.png", "rot.jpg", "a.png"]
  assert [(x["height"], x["width"]) for x in lines] == [(40, 30), (36, 24), (20, 50)]
  for x in lines:
    for d in x["detections"]:
      assert set(d) == {"box", "score", "label", "class"}
      x1, y1, x2, y2 = d["box"]
      assert 0 <= min(x1, x2) and max(x1, x2) <= x["width"] and max(y1, y2) <= x["height"]
  assert np.asarray(Image.open(result["drawn"][1])).shape == (36, 24, 3)


def test_detect_cli_coco_results_load_in_pycocotools(workdir, images, tmp_path):
  pytest.importorskip("pycocotools")
  from pycocotools.coco import COCO
  names = det_lib.class_names(det_lib.load_config(workdir))
  ann = {"images": [{"id": 71, "file_name": "grey.png"}, {"id": 72, "file_name": "rot.jpg"},
                    {"id": 73, "file_name": "sub/a.png"}],
         "categories": [{"id": 10 + 3 * i, "name": n} for i, n in enumerate(names)],
         "annotations": []}
  ann_path = tmp_path / "instances.json"
  ann_path.write_text(json.dumps(ann))
  result = detect.main(["detect", CONFIG, "--workdir", workdir, "--images", str(images),
                        "--format", "coco", "--annotations", str(ann_path),
                        "--out", str(tmp_path)])
  results = json.load(open(result["detections"]))
  assert {r["image_id"] for r in results} == {71, 72, 73}
  assert {r["category_id"] for r in results} <= {10 + 3 * i for i in range(len(names))}
  with contextlib.redirect_stdout(io.StringIO()):
    gt = COCO()
    gt.dataset = ann
    gt.createIndex()
    loaded = gt.loadRes(result["detections"])
  assert len(loaded.anns) == len(results)
  jsonl = [json.loads(x) for x in open(detect.main(
      ["detect", "--workdir", workdir, "--images", str(images), "--out", str(tmp_path)]
  )["detections"])]
  for r in results:   # the COCO bbox is the JSONL box as (x, y, w, h), same pixels
    line = jsonl[[71, 72, 73].index(r["image_id"])]
    x1, y1, x2, y2 = line["detections"][0]["box"]
    np.testing.assert_allclose(r["bbox"], [x1, y1, x2 - x1, y2 - y1], atol=0.02)


def test_coco_ids_default_to_official_ids_for_coco2017():
  import ml_collections
  from jaxdet.data import tfds as tfds_lib
  config = ml_collections.ConfigDict({"data": {"name": "coco2017"}})
  images, cats = det_lib.coco_ids(config, tfds_lib.COCO_CLASS_NAMES, ["a.jpg", "b.jpg"])
  assert images == [1, 2] and cats == list(tfds_lib.COCO_CATEGORY_IDS)
  with pytest.raises(ValueError, match="no category named"):
    det_lib.coco_ids(config, ["zebra", "unicorn"], ["a"], annotations=_write_ann())


def _write_ann():
  import tempfile
  f = tempfile.NamedTemporaryFile("w", suffix=".json", delete=False)
  json.dump({"images": [], "categories": [{"id": 24, "name": "zebra"}]}, f)
  f.close()
  return f.name


def test_evaluate_dump_writes_detections(workdir, tmp_path):
  dump = tmp_path / "dets.jsonl"
  scores = evaluate.main(["evaluate", CONFIG, "--workdir", workdir, "--dump", str(dump)])
  lines = [json.loads(x) for x in open(dump)]
  assert len(lines) == scores["num_images"] == 6
  assert [x["image_id"] for x in lines] == list(range(6))
  assert all((x["height"], x["width"]) == (32, 32) for x in lines)


def test_fast_rcnn_detects_with_selective_search_proposals(images, tmp_path):
  """A proposal-based system runs on new images: proposals computed (and cached) per image."""
  pytest.importorskip("cv2")
  from experiments.configs import fast_rcnn
  from jaxdet.train import setup
  config = fast_rcnn.get_config("cpu")
  config.unlock()
  config.data.proposals.max_proposals = 16
  config.data.proposals.cache_root = str(tmp_path / "cache")
  config.data.proposals.num_workers = 1
  config.data.image_size = (48, 48)
  config.data.prefetch = 0
  system = setup.system_from_config(config)
  variables = system.init(jax.random.PRNGKey(0), det_lib.example_batch(config))
  det = det_lib.Detector(config, variables, system=system)
  results = det([str(images)])
  assert [(r["height"], r["width"]) for r in results] == [(40, 30), (36, 24), (20, 50)]
  caches = [d for d, _, names in os.walk(tmp_path / "cache") if "meta.json" in names]
  assert len(caches) == 1 and os.path.basename(caches[0]).startswith("detect_fast_3")
  for r in results:
    assert np.all(r["boxes"] >= 0) and np.all(r["boxes"][:, 2] <= r["width"] + 1e-3)


def test_rcnn_from_workdir_uses_its_svms_and_proposals(images, tmp_path):
  """R-CNN (stages: fine-tuning, SVMs, box regressors; pretraining off) trained a few steps
  detects on new images: Detector.from_workdir restores every stage."""
  pytest.importorskip("cv2")
  workdir = str(tmp_path / "rcnn")
  train.main(["train", "--config=" + os.path.join(ROOT, "experiments", "configs", "rcnn.py"),
              "--workdir", workdir, "--config.pretrain.system=", "--config.data.num_train=8",
              "--config.data.num_test=2", "--config.data.proposals.max_proposals=16",
              f"--config.data.proposals.cache_root={tmp_path / 'cache'}",
              "--config.data.proposals.num_workers=1", "--config.train.num_steps=2",
              "--config.data.prefetch=0", "--config.data.image_size=(64,64)"])
  det = det_lib.Detector.from_workdir(workdir)
  assert set(det.variables) == {"params", "rcnn"}
  results = det([str(images)], min_score=-1e9)
  assert [(r["height"], r["width"]) for r in results] == [(40, 30), (36, 24), (20, 50)]
  assert sum(len(r["boxes"]) for r in results) > 0
  for r in results:
    assert np.all(r["boxes"][:, 2] <= r["width"] + 1e-3)
    assert np.all(r["boxes"][:, 3] <= r["height"] + 1e-3)
