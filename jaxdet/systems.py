"""The one explicit table of detectors: name -> build(config) -> jaxdet.system.System.

Each entry is imported lazily so that importing jaxdet does not build every model.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

from jaxdet.system import System

# name -> "module:function"; the function takes the experiment config and returns a System.
SYSTEMS: dict[str, str] = {
    "localization": "jaxdet.models.localization:build_system",
    "overfeat": "jaxdet.models.overfeat:build_system",
    "windows": "jaxdet.models.windows:build_system",
    "classify": "jaxdet.models.classify:build_system",
    "fast_rcnn": "jaxdet.models.fast_rcnn:build_system",
    "faster_rcnn": "jaxdet.models.faster_rcnn:build_system",
    "rcnn": "jaxdet.models.rcnn:build_system",
    "yolo": "jaxdet.models.yolo:build_system",
}


def build_system(name: str, config: Any) -> System:
  """Builds the named detector from its config; unknown names list the known ones."""
  if name not in SYSTEMS:
    raise ValueError(f"system: unknown name {name!r}; known systems: {sorted(SYSTEMS)}")
  module, fn = SYSTEMS[name].split(":")
  build: Callable[[Any], System] = getattr(importlib.import_module(module), fn)
  return build(config)
