"""Mistakes knowable before a run's first step fail it then, naming the key, value and fix.

Each run test gives train_and_evaluate a System whose init and loss raise StepReached: a
check that happens only after training started (or not at all) lets StepReached through, so
the test fails; a preflight error is a ValueError raised before init.
"""

import dataclasses
import os
import sys

import numpy as np
import pytest

from experiments import own_data_example
from experiments.configs import localization
from jaxdet.data import pipeline
from jaxdet.train import loop, preflight, setup

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "train"))
from toy_system import set_keys  # noqa: E402


class StepReached(Exception):
  """Raised by the test systems' init/loss: the run got past the point of no return."""


def _unreached(*args, **kwargs):
  raise StepReached("the run initialised the model before failing")


def _config(**overrides):
  """The reporter's localization cpu config with tiny sizes, unlocked, overrides applied."""
  config = localization.get_config("cpu")
  config.unlock()
  config.data.num_train, config.data.num_test = 64, 8
  config.data.prefetch, config.data.num_workers = 0, 1
  config.train.batch_size, config.eval.batch_size = 4, 4
  return set_keys(config, overrides)


def _system(config):
  system = setup.system_from_config(config)
  return dataclasses.replace(system, init=_unreached, loss=_unreached)


def _train(config, workdir, **kw):
  return loop.train_and_evaluate(config, str(workdir), system=_system(config), **kw)


# ----------------------------------------------------------------------------- reported cases


def test_num_classes_below_the_datasets_fails_before_step_one(tmp_path):
  config = _config(num_classes=3)
  with pytest.raises(ValueError, match=r"num_classes: the dataset 'synthetic_single' has 6 "
                                       r"classes.*got num_classes=3.*--config.num_classes=6"):
    _train(config, tmp_path)
  assert not os.path.exists(tmp_path / "checkpoints")


def test_pipeline_sources_check_labels_against_num_classes(rng):
  cfg = pipeline.default_data_config()
  cfg.update(num_train=8, num_test=4, image_size=(32, 32), max_boxes=8, prefetch=0)
  with pytest.raises(ValueError, match=r"num_classes: the dataset 'synthetic' has 6"):
    pipeline.make_loader(cfg, "train", batch_size=2, seed=0, train=True, num_classes=3)
  loader = pipeline.make_loader(cfg, "train", batch_size=2, seed=0, train=True, num_classes=6)
  assert next(iter(loader))["labels"].max() < 6
  examples = own_data_example.make_examples(4, 0)
  ex_cfg = dict(cfg, name="examples", image_size=(64, 64))
  with pytest.raises(ValueError, match=r"num_classes: expected len\(class_names\) = 2"):
    pipeline.make_source(ex_cfg, "train", examples=examples, class_names=("a", "b"),
                         num_classes=3)


def test_mistyped_best_metric_lists_the_valid_names(tmp_path):
  config = _config(**{"checkpoint.best_metric": "voc_map"})
  with pytest.raises(ValueError, match=r"checkpoint.best_metric: 'voc_map'.*'voc07_map'.*"
                                       r"coco_AP50.*num_images.*loc_accuracy"):
    _train(config, tmp_path)
  _train_ok = _config(**{"checkpoint.best_metric": "loc_accuracy"})   # a system's own metric
  with pytest.raises(StepReached):
    _train(_train_ok, tmp_path)


def test_declared_metric_names_are_what_evaluation_reports(rng):
  """The names preflight accepts are the keys evaluate_variables and the systems' extra
  metric functions really return (computed here, not copied)."""
  import toy_system
  from jaxdet.models import classify
  from jaxdet.models.localization import LOCALIZATION_METRIC_NAMES, localization_metrics
  from jaxdet.train.evaluate import METRIC_NAMES, evaluate_variables
  config = toy_system.toy_config()
  system = toy_system.build_system(config)
  system = dataclasses.replace(system, eval_metrics=localization_metrics,
                                eval_metric_names=LOCALIZATION_METRIC_NAMES)
  batch = toy_system.toy_batch(0, 0, 4)
  variables = system.init(np.zeros(2, np.uint32), batch)
  loader = toy_system.ToyLoader(4, 0, train=False)
  scores = evaluate_variables(system.predict, variables, loader, system.num_classes,
                              extra_metrics=system.eval_metrics)
  assert sorted(scores) == sorted(preflight.eval_metric_names(system))
  assert set(METRIC_NAMES) < set(scores)
  gts = [{"boxes": np.float32([[0, 0, 4, 4]]), "labels": np.int32([1])}]
  dets = [{"boxes": np.float32([[0, 0, 4, 4]]), "labels": np.int32([1])}]
  assert tuple(classify.classification_metrics(gts, dets)) == ("accuracy",)
  cls_config = _config(system="classify")
  cls_config.model = {"backbone": "tiny"}
  assert preflight.eval_metric_names(setup.system_from_config(cls_config))[-1] == "accuracy"
  # A system with extra metrics but no declared names: best_metric cannot be checked early.
  undeclared = dataclasses.replace(system, eval_metric_names=())
  assert preflight.eval_metric_names(undeclared) is None
  preflight.check_best_metric("anything", undeclared)


def _own_config(**overrides):
  return _config(**{"data.name": "examples", "data.image_size": (64, 64), "num_classes": 2,
                    **overrides})


def _first_batch_ids(examples, config):
  """image_ids of the first training batch (a bad example elsewhere is drawn only later)."""
  loader = pipeline.make_loader(config.data, "train", batch_size=int(config.train.batch_size),
                                seed=int(config.seed), train=True, examples=examples,
                                class_names=("square", "bar"))
  return set(setup.peek(loader)["image_id"].tolist())


@pytest.mark.parametrize("eval_examples,match", [
    (None, r"eval_examples: data config name 'examples' needs the list of examples"),
    ([], r"eval_examples: expected a non-empty list"),
])
def test_own_data_without_eval_examples_fails_before_step_one(tmp_path, eval_examples, match):
  config = _own_config()
  with pytest.raises(ValueError, match=match):
    _train(config, tmp_path, examples=own_data_example.make_examples(8, 0),
           eval_examples=eval_examples, class_names=["square", "bar"])


def test_own_data_bad_eval_label_names_the_argument_and_index(tmp_path):
  config = _own_config()
  test = own_data_example.make_examples(8, 1)
  test[5] = dict(test[5], labels=np.int32([2]))
  with pytest.raises(ValueError, match=r"labels \(example 5, eval_examples\[5\]\): label 2 at "
                                       r"index 0 is outside \[0, 2\).*class_names has 2 names"):
    _train(config, tmp_path, examples=own_data_example.make_examples(8, 0),
           eval_examples=test, class_names=["square", "bar"])


def test_class_names_shorter_than_the_labels(tmp_path):
  config = _own_config(num_classes=1)
  train = own_data_example.make_examples(16, 0)
  for i in _first_batch_ids(train, config):   # the first batch alone would not show it
    train[i] = dict(train[i], labels=np.int32([0]))
  first = next(i for i, ex in enumerate(train) if ex["labels"][0] == 1)
  with pytest.raises(ValueError, match=rf"labels \(example {first}, examples\[{first}\]\): "
                                       r"label 1 .*class_names has 1 names: square"):
    _train(config, tmp_path, examples=train, eval_examples=own_data_example.make_examples(4, 1),
           class_names=["square"])


_BAD = {   # what is wrong -> (the example's replacement fields, the expected error)
    "nan": ({"boxes": np.float32([[1, 1, np.nan, 5]])}, r"box 0 is not finite"),
    "inverted": ({"boxes": np.float32([[9, 1, 3, 5]])}, r"box 0 has x2 < x1"),
    "outside": ({"boxes": np.float32([[40, 40, 70, 50]])}, r"box 0 .* lies outside the 64x64"),
    "zero_area": ({"boxes": np.float32([[4, 4, 4, 9]])}, r"box 0 has zero area"),
    "label": ({"labels": np.int32([7])}, r"label 7 at index 0 is outside \[0, 2\)"),
    "negative_label": ({"labels": np.int32([-1])}, r"label -1"),
    "float_labels": ({"labels": np.float32([1.0])}, r"labels \(example .*integer dtype"),
    "too_many": ({"boxes": np.float32([[1, 1, 5, 5]] * 9), "labels": np.zeros(9, np.int32)},
                 r"9 boxes exceed max_boxes=4.*box_policy"),
    "float_image": ({"image": np.zeros((64, 64, 3), np.float32)}, r"image .*uint8"),
    "rgba_image": ({"image": np.zeros((64, 64, 4), np.uint8)}, r"image .*\(H, W, 3\)"),
    "no_labels": ({"labels": None}, r"expected a dict with keys"),
}


@pytest.mark.parametrize("kind", sorted(_BAD))
def test_every_own_example_is_checked_before_step_one(tmp_path, kind):
  config = _own_config()
  train = own_data_example.make_examples(24, 0)
  k = max(set(range(24)) - _first_batch_ids(train, config))   # not in the first batch
  fields, match = _BAD[kind]
  train[k] = {key: v for key, v in {**train[k], **fields}.items() if v is not None}
  with pytest.raises((ValueError, TypeError), match=match) as error:
    _train(config, tmp_path, examples=train, eval_examples=own_data_example.make_examples(4, 1),
           class_names=["square", "bar"])
  assert f"(example {k}, examples[{k}])" in str(error.value)


def test_vectorised_check_reports_the_first_offending_example_and_box():
  examples = own_data_example.make_examples(12, 0)
  examples[7] = dict(examples[7], boxes=np.float32([[1, 1, 5, 5], [1, 1, 5, 5], [8, 1, 2, 5]]),
                     labels=np.int32([0, 0, 1]))
  examples[9] = dict(examples[9], boxes=np.float32([[1, 1, np.inf, 5]]))
  examples[3] = dict(examples[3], image_id=1003, boxes=np.float32([[0, 0, 65, 10]]))
  with pytest.raises(ValueError, match=r"boxes \(example 1003, examples\[3\]\): box 0 .*outside"):
    pipeline.validate_examples(examples, 2)
  examples[3] = dict(examples[3], boxes=np.float32([[0, 0, 64, 10]]))
  with pytest.raises(ValueError, match=r"boxes \(example 7, examples\[7\]\): box 2 has x2 < x1"):
    pipeline.validate_examples(examples, 2)
  # Images without boxes are normal.
  examples = own_data_example.make_examples(3, 0)
  examples[1] = dict(examples[1], boxes=np.zeros((0, 4), np.float32), labels=[])
  pipeline.validate_examples(examples, 2)


def test_own_images_larger_than_the_batch_shape(tmp_path):
  config = _own_config(**{"data.image_size": (32, 32)})
  with pytest.raises(ValueError, match=r"image \(example 0, examples\[0\]\): 64x64 .* "
                                       r"image_size to at least \(64, 64\)"):
    _train(config, tmp_path, examples=own_data_example.make_examples(8, 0),
           eval_examples=own_data_example.make_examples(4, 1), class_names=["square", "bar"])


def test_examples_given_for_another_dataset(tmp_path):
  with pytest.raises(ValueError, match=r"examples: given, but config.data.name is "
                                       r"'synthetic_single'"):
    _train(_config(), tmp_path, examples=own_data_example.make_examples(8, 0),
           class_names=["square", "bar"])


def test_evaluate_checks_its_examples_before_restoring(tmp_path):
  config = _own_config()
  test = own_data_example.make_examples(12, 1)
  test[10] = dict(test[10], labels=np.int32([5]))
  with pytest.raises(ValueError, match=r"labels \(example 10, examples\[10\]\): label 5"):
    loop.evaluate(config, str(tmp_path), system=_system(config), examples=test,
                  class_names=["square", "bar"])


# ----------------------------------------------------------------------------- config values


@pytest.mark.parametrize("key,value,match", [
    ("train.num_steps", 0, r"train.num_steps: expected an integer >= 1, got 0"),
    ("train.batch_size", 0, r"train.batch_size: expected an integer >= 1, got 0"),
    ("train.log_every", -1, r"train.log_every: expected an integer >= 0, got -1"),
    ("train.parallel", "pmapp", r"train.parallel: expected one of .*'pmapp'"),
    ("eval.batch_size", 0, r"eval.batch_size: expected an integer >= 1"),
    ("eval.max_batches", 0, r"eval.max_batches: expected an integer >= 1, got 0; -1"),
    ("eval.every_steps", -5, r"eval.every_steps: expected an integer >= 0, got -5"),
    ("eval.split", "", r"eval.split: expected a split name"),
    ("checkpoint.every_steps", -1, r"checkpoint.every_steps: expected an integer >= 0"),
    ("checkpoint.keep", 0, r"checkpoint.keep: expected an integer >= 1, got 0"),
    ("checkpoint.best_mode", "maximum", r"checkpoint.best_mode: expected one of"),
    ("data.num_test", 0, r"data.num_test: .* needs a positive size, got 0"),
    ("data.box_policy", "drop", r"data.box_policy: expected one of"),
])
def test_bad_config_value_fails_before_step_one(tmp_path, key, value, match):
  with pytest.raises(ValueError, match=match):
    _train(_config(**{key: value}), tmp_path)


def test_synthetic_objects_beyond_max_boxes(tmp_path):
  config = _config(**{"data.name": "synthetic", "data.min_objects": 3, "data.max_objects": 3,
                      "data.max_boxes": 2})
  with pytest.raises(ValueError, match=r"data.max_boxes: .*max_objects=3.*max_boxes=2"):
    _train(config, tmp_path)


def test_batch_not_divisible_by_devices(tmp_path, monkeypatch):
  monkeypatch.setattr(preflight.jax, "device_count", lambda: 4)
  with pytest.raises(ValueError, match=r"train.batch_size: the global batch of 6 does not "
                                       r"split over the 4 devices; set "
                                       r"--config.train.batch_size=8"):
    preflight.check_config(_config(**{"train.batch_size": 6}), _system(_config()))


def test_tfds_class_count_against_num_classes(monkeypatch, tmp_path):
  from jaxdet.data import tfds as tfds_lib
  examples = [{"image": np.zeros((30, 50, 3), np.uint8), "image/filename": f"{i}.jpg",
               "objects": {"bbox": np.float32([[0, 0, 0.5, 0.5]]), "label": np.int64([3]),
                           "is_difficult": np.bool_([False])}} for i in range(3)]
  monkeypatch.setattr(tfds_lib, "open_data_source", lambda *a, **k: examples)
  config = _config(**{"data.name": "voc2007", "data.num_train": 0, "data.num_test": 0,
                      "data.resize.mode": "square", "data.resize.square_size": 64})
  with pytest.raises(ValueError, match=r"num_classes: the dataset 'voc2007' has 20 classes.*"
                                       r"got num_classes=6.*--config.num_classes=20"):
    _train(config, tmp_path)

  class Info:   # a prepared dataset whose label feature disagrees with jaxdet's class list
    features = {"objects": {"label": type("L", (), {"num_classes": 21})()}}

  class Source(list):
    dataset_info = Info()
  monkeypatch.setattr(tfds_lib, "open_data_source", lambda *a, **k: Source(examples))
  with pytest.raises(ValueError, match=r"has 21 label classes \(its dataset_info\)"):
    _train(_config(**{"data.name": "voc2007", "num_classes": 20}), tmp_path)


def test_a_valid_run_passes_the_checks(tmp_path):
  """The checks reject nothing the shipped configs and the own-data example do."""
  with pytest.raises(StepReached):
    _train(_config(), tmp_path)
  with pytest.raises(StepReached):
    _train(_own_config(), tmp_path, examples=own_data_example.make_examples(8, 0),
           eval_examples=own_data_example.make_examples(4, 1), class_names=["square", "bar"])


@pytest.mark.parametrize("name", ["classify", "localization", "overfeat", "windows", "rcnn",
                                  "fast_rcnn", "faster_rcnn", "yolo"])
def test_shipped_configs_pass_the_checks(name):
  """Every system's cpu preset (config and synthetic data) and paper preset (config; its VOC
  data is not here) passes, as do R-CNN's pretraining and fine-tuning stages."""
  import importlib
  from experiments import rcnn_stages
  module = importlib.import_module(f"experiments.configs.{name}")
  config = module.get_config("cpu")
  preflight.check_train(config, setup.system_from_config(config))
  if name == "rcnn":
    for stage in (config.pretrain, rcnn_stages.finetune_config(config)):
      preflight.check_train(stage, setup.system_from_config(stage))
  paper = module.get_config("paper")
  if "pretrained" in paper.model:   # its frozen layers need the ImageNet file, not here
    paper.unlock()
    paper.model.pretrained = "/path/to/vgg16.pth"
  preflight.check_config(paper, setup.system_from_config(paper))
