"""A model's settings: the defaults of its module updated by an experiment's config.model."""

from __future__ import annotations

from typing import Any, Mapping

# Dict-valued settings passed on whole to a constructor (not merged key by key).
OPAQUE_KEYS = ("backbone_kw",)


def merge_settings(defaults: Mapping[str, Any], given: Any, where: str) -> dict[str, Any]:
  """`given` (a ConfigDict, dict or None) over `defaults`, recursively into dict-valued
  settings (except OPAQUE_KEYS, taken as given); an unknown key raises, naming its path.

  Args:
    defaults: {name: default}; a dict default is a nested section.
    given: the user's values for some of those names.
    where: the section's path for error messages, e.g. "config.model".
  Returns:
    a plain nested dict with every default key.
  """
  given = dict(given.items()) if given is not None else {}
  unknown = sorted(set(given) - set(defaults))
  if unknown:
    raise ValueError(f"{where}: unknown keys {unknown}; expected some of {sorted(defaults)}")
  out = {}
  for key, default in defaults.items():
    value = given.get(key, default)
    if key in OPAQUE_KEYS:
      value = dict(value.items()) if value is not None else {}
    elif isinstance(default, dict):
      value = merge_settings(default, value, f"{where}.{key}")
    out[key] = value
  return out
