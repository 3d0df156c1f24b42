"""A model's settings: a frozen dataclass of options with defaults, merged once from config.model.

Every detector module starts with its `Settings` (the anatomy of `../shared/design.md`):

    @dataclasses.dataclass(frozen=True)
    class Predict(settings.Settings):
      score_threshold: float = 0.01
      max_detections: int = 100

    @dataclasses.dataclass(frozen=True)
    class Loss(settings.LossSettings):
      TERMS = {"cls": "class", "box": "box"}      # term -> kind (jaxdet.losses.TERM_KINDS)
      cls: str = "softmax_cross_entropy"
      cls_weight: float = 1.0
      box: str = "smooth_l1"
      box_weight: float = 1.0

    @dataclasses.dataclass(frozen=True)
    class Settings(settings.Settings):
      num_classes: int = 6
      backbone: str = "tiny"
      predict: Predict = Predict()                 # a nested section
      loss: Loss = Loss()

      def validate(self, where):                   # optional: value checks naming the key
        checks.check_positive(f"{where}.num_classes", self.num_classes)

    m = Settings.from_config(config)               # the one merge (config.model, num_classes)

`from_config` / `merge` take a ConfigDict, dict or None; an unknown key, or a value of the
wrong type, raises naming its path (e.g. "config.model.predict.max_detectons"). Values are
normalised once: lists become tuples, ints given for float fields become floats, dict-valued
fields (e.g. `backbone_kw`) become plain dicts taken whole (not merged key by key).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Mapping, TypeVar

from jaxdet import checks

S = TypeVar("S", bound="Settings")


def _plain(value: Any) -> Any:
  """ConfigDict / FrozenConfigDict / mapping -> dict, lists -> tuples, recursively."""
  if hasattr(value, "to_dict"):
    value = value.to_dict()
  if isinstance(value, Mapping):
    return {k: _plain(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return tuple(_plain(v) for v in value)
  return value


def _coerce(default: Any, value: Any, where: str) -> Any:
  """`value` as the type of `default` (the field's default), or a TypeError naming `where`."""
  value = _plain(value)
  if default is None:
    return value
  wrong = None
  if isinstance(default, bool):
    wrong = not isinstance(value, bool)
  elif isinstance(default, int):
    wrong = isinstance(value, bool) or not isinstance(value, int)
  elif isinstance(default, float):
    wrong = isinstance(value, bool) or not isinstance(value, (int, float))
    if not wrong:
      value = float(value)
  elif isinstance(default, str):
    wrong = not isinstance(value, str)
  elif isinstance(default, tuple):
    wrong = not isinstance(value, tuple)
  elif isinstance(default, dict):
    wrong = not isinstance(value, dict)
  if wrong:
    raise TypeError(f"{where}: expected {type(default).__name__} (like the default "
                    f"{default!r}), got {value!r} ({type(value).__name__})")
  return value


@dataclasses.dataclass(frozen=True)
class Settings:
  """Base of every settings dataclass (see the module docstring). Subclasses are frozen
  dataclasses whose fields all have defaults; a field whose default is a Settings instance is
  a nested section, merged key by key."""

  def validate(self, where: str) -> None:
    """Checks values beyond their types; raises ValueError naming `where.<key>`. Called by
    `merge` on every section, nested ones first. Default: nothing to check."""
    del where

  @classmethod
  def merge(cls: type[S], given: Any = None, where: str = "config.model", *,
            base: S | None = None) -> S:
    """The one merge: `given` (ConfigDict, dict, None or an instance of cls) over the defaults.

    Args:
      given: the user's values for some of the fields (nested sections as dicts).
      where: the section's path, for error messages.
      base: the instance whose values are the defaults (default: the class's); a nested
        section is merged over the instance its field holds by default, so a field declared
        `sampler: Sampler = Sampler(rois_per_image=128)` keeps 128 when a config sets
        another key of the section.
    Returns:
      a validated instance of cls.
    Raises:
      ValueError for an unknown key (listing the known ones) or a bad value; TypeError for a
      value of the wrong type.
    """
    if isinstance(given, cls):
      given = dataclasses.asdict(given)
    given = _plain(given) if given is not None else {}
    if not isinstance(given, dict):
      raise TypeError(f"{where}: expected a section (dict or ConfigDict), got {given!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(given) - set(fields))
    if unknown:
      raise ValueError(f"{where}: unknown keys {unknown}; expected some of {sorted(fields)}")
    values = {}
    for name, f in fields.items():
      if base is not None:
        default = getattr(base, name)
      else:
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
      if name not in given:
        values[name] = default
      elif isinstance(default, Settings):
        values[name] = type(default).merge(given[name], f"{where}.{name}", base=default)
      else:
        values[name] = _coerce(default, given[name], f"{where}.{name}")
    out = cls(**values)
    out.validate(where)
    return out

  @classmethod
  def from_config(cls: type[S], config: Any, where: str = "config.model") -> S:
    """The settings of an experiment config: `config.model` merged over the defaults; a
    top-level `config.num_classes` (always set by experiments.configs.common) wins over
    `config.model.num_classes` when the settings have that field."""
    given = _plain(config["model"]) if "model" in config else {}
    given = dict(given or {})
    names = {f.name for f in dataclasses.fields(cls)}
    if "num_classes" in names and config.get("num_classes") is not None:
      given["num_classes"] = int(config["num_classes"])
    return cls.merge(given, where)

  def to_dict(self) -> dict[str, Any]:
    """A plain nested dict of every value (for config.json and reports)."""
    return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class LossSettings(Settings):
  """A `model.loss` section: for each term of a system's loss, the function (a name in
  `jaxdet.losses.TERMS[kind]` or a "package.module:function" path) and `<term>_weight`.

  Subclasses set the ClassVar `TERMS = {term: kind}` and declare, for each term, the fields
  `<term>: str` and `<term>_weight: float`; they may add other fields (e.g. `rpn_beta`).
  Validation resolves every term once, so a typo or a bad path fails before the first step.
  """
  TERMS: ClassVar[Mapping[str, str]] = {}

  def validate(self, where: str) -> None:
    from jaxdet import losses   # losses imports no model; settings is imported by models
    for term, kind in self.TERMS.items():
      losses.resolve_term(getattr(self, term), kind, where=f"{where}.{term}")
      weight = getattr(self, f"{term}_weight")
      if not weight >= 0.0:
        raise ValueError(f"{where}.{term}_weight: expected a weight >= 0, got {weight!r}")

  def fn(self, term: str):
    """The resolved function of `term`."""
    from jaxdet import losses
    if term not in self.TERMS:
      raise KeyError(f"loss term {term!r}: expected one of {sorted(self.TERMS)}")
    return losses.resolve_term(getattr(self, term), self.TERMS[term])

  def weight(self, term: str) -> float:
    """The weight of `term` (`<term>_weight`)."""
    return float(getattr(self, f"{term}_weight"))


@dataclasses.dataclass(frozen=True)
class ClassLoss(LossSettings):
  """A `model.loss` of one "class" term, `cls` (softmax cross-entropy by default): the loss of
  the systems that only classify (classify's crops, R-CNN's fine-tuning, the window
  classifier)."""
  TERMS: ClassVar[Mapping[str, str]] = {"cls": "class"}
  cls: str = "softmax_cross_entropy"
  cls_weight: float = 1.0


@dataclasses.dataclass(frozen=True)
class NMSPredict(Settings):
  """`model.predict` of a system whose post-processing is per-class NMS to a fixed capacity
  (`jaxdet.ops.nms.multiclass_nms`); systems set their own defaults on the field, e.g.
  `predict: NMSPredict = NMSPredict(score_threshold=0.005, iou_threshold=0.5)`."""
  score_threshold: float = 0.01
  iou_threshold: float = 0.3
  max_detections: int = 100
  pre_nms_topk: int = 0        # 0 = every (box, class) pair enters NMS

  def validate(self, where: str) -> None:
    checks.check_fraction(f"{where}.iou_threshold", self.iou_threshold)
    if self.max_detections < 1:
      raise ValueError(f"{where}.max_detections: expected a positive int, got "
                       f"{self.max_detections!r}")
    if self.pre_nms_topk < 0:
      raise ValueError(f"{where}.pre_nms_topk: expected an int >= 0 (0 = all), got "
                       f"{self.pre_nms_topk!r}")
