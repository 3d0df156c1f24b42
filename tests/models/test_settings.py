"""The one merge of config.model into a detector's frozen Settings dataclass."""

import dataclasses

import ml_collections
import pytest

from jaxdet import losses
from jaxdet.models import settings as settings_lib


@dataclasses.dataclass(frozen=True)
class _Predict(settings_lib.Settings):
  score_threshold: float = 0.05
  max_detections: int = 100

  def validate(self, where):
    if not 0.0 <= self.score_threshold <= 1.0:
      raise ValueError(f"{where}.score_threshold: expected a value in [0, 1], "
                       f"got {self.score_threshold}")


@dataclasses.dataclass(frozen=True)
class _Loss(settings_lib.LossSettings):
  TERMS = {"cls": "class", "box": "box"}
  cls: str = "softmax_cross_entropy"
  cls_weight: float = 1.0
  box: str = "smooth_l1"
  box_weight: float = 1.0


@dataclasses.dataclass(frozen=True)
class _Settings(settings_lib.Settings):
  num_classes: int = 6
  backbone_kw: dict = dataclasses.field(default_factory=dict)
  scales: tuple = (1.0,)
  frozen: bool = False
  predict: _Predict = _Predict()
  loss: _Loss = _Loss()


def test_dataclass_merge_nested_sections_types_and_num_classes():
  config = ml_collections.ConfigDict({
      "num_classes": 3,
      "model": {"num_classes": 9, "scales": [0.5, 1.0], "backbone_kw": {"widths": [4, 8]},
                "predict": {"max_detections": 7, "score_threshold": 0}, "loss": {"box": "giou"}}})
  s = _Settings.from_config(config)
  assert s.num_classes == 3                       # the top-level key wins
  assert s.scales == (0.5, 1.0) and s.backbone_kw == {"widths": (4, 8)}
  assert s.predict == _Predict(score_threshold=0.0, max_detections=7)
  assert isinstance(s.predict.score_threshold, float)
  assert s.loss.fn("box") is losses.box_giou and s.loss.fn("cls") is losses.softmax_cross_entropy
  assert s.loss.weight("cls") == 1.0
  with pytest.raises(dataclasses.FrozenInstanceError):
    s.num_classes = 4
  assert _Settings.merge(s) == s and _Settings.merge(None) == _Settings()


@pytest.mark.parametrize("given, match", [
    ({"predict": {"max_detectons": 1}}, r"config.model.predict: unknown keys \['max_detectons'\]"),
    ({"sclaes": (1.0,)}, r"config.model: unknown keys \['sclaes'\]"),
    ({"predict": {"score_threshold": 2.0}}, r"config.model.predict.score_threshold: expected"),
    ({"loss": {"box": "gio"}}, r"config.model.loss.box: unknown box loss 'gio'"),
    ({"loss": {"cls": "no_such_module_x:fn"}}, r"config.model.loss.cls: cannot import module"),
    ({"loss": {"cls": "jaxdet.losses:no_such_fn"}}, r"config.model.loss.cls: module .* has no"),
    ({"loss": {"box_weight": -1.0}}, r"config.model.loss.box_weight: expected a weight >= 0"),
])
def test_dataclass_merge_errors_name_the_key(given, match):
  with pytest.raises(ValueError, match=match):
    _Settings.merge(given)


@pytest.mark.parametrize("given, match", [
    ({"num_classes": 2.5}, r"config.model.num_classes: expected int"),
    ({"frozen": 1}, r"config.model.frozen: expected bool"),
    ({"predict": {"max_detections": "7"}}, r"config.model.predict.max_detections: expected int"),
    ({"scales": 1.0}, r"config.model.scales: expected tuple"),
])
def test_dataclass_merge_type_errors_name_the_key(given, match):
  with pytest.raises(TypeError, match=match):
    _Settings.merge(given)


def test_a_term_given_by_dotted_path_resolves_to_that_function():
  s = _Settings.merge({"loss": {"cls": "jaxdet.losses:softmax_focal"}})
  assert s.loss.fn("cls") is losses.softmax_focal


@dataclasses.dataclass(frozen=True)
class _Wide(settings_lib.Settings):
  predict: _Predict = _Predict(max_detections=300)   # another default instance of the section


def test_a_partly_given_section_merges_over_its_fields_default_instance():
  s = _Wide.merge({"predict": {"score_threshold": 0.5}})
  assert s.predict == _Predict(score_threshold=0.5, max_detections=300)
