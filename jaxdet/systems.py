"""The one explicit table of detectors: name -> build(config) -> jaxdet.system.System.

Each entry is imported lazily so that importing jaxdet does not build every model.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

from jaxdet.system import System

# name -> "module:function"; the function takes the experiment config and returns a System.
SYSTEMS: dict[str, str] = {
}


def build_system(name: str, config: Any) -> System:
  """Builds the named detector from its config; unknown names list the known ones."""
  if name not in SYSTEMS:
    raise ValueError(f"system: unknown name {name!r}; known systems: {sorted(SYSTEMS)}")
  module, fn = SYSTEMS[name].split(":")
  build: Callable[[Any], System] = getattr(importlib.import_module(module), fn)
  return build(config)
