"""Detection by classifying sliding windows (the brute-force baseline), as a System.

The window classifier of `jaxdet.models.overfeat` (C classes + background) without a box head:
every window of several image scales, evaluated densely with the fc layers run as
convolutions, is a detection of its own box with its class probabilities; per-class NMS keeps
the best. See `jaxdet.models.overfeat` for training and the window geometry.
"""

from __future__ import annotations

from typing import Any

from jaxdet.models import overfeat
from jaxdet.system import System


def build_system(config: Any) -> System:
  """The "windows" System from an experiment config (keys: overfeat.MODEL_DEFAULTS)."""
  return overfeat.build(config, mode="windows")
