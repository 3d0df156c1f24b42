"""jaxdet.ops re-exports its ops without hiding any submodule."""

import importlib
import types

import jaxdet.ops


def test_submodules_are_not_shadowed_and_exports_resolve():
  for name in ("nms", "roi_pool", "boxes", "box_coder", "anchors", "matching", "sampling"):
    module = importlib.import_module(f"jaxdet.ops.{name}")
    assert isinstance(getattr(jaxdet.ops, name), types.ModuleType), name
    assert getattr(jaxdet.ops, name) is module
  for name in jaxdet.ops.__all__:
    assert callable(getattr(jaxdet.ops, name)), name
  assert callable(jaxdet.ops.nms.nms) and callable(jaxdet.ops.roi_pool.roi_pool)
