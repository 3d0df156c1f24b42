"""jaxdet: the classic object-detection lineage as jitted, static-shaped JAX programs.

Localization as regression, OverFeat sliding windows, selective search + R-CNN, Fast R-CNN,
Faster R-CNN and YOLO v1. Conventions (see README): boxes are float32 (x1, y1, x2, y2) in
absolute pixels; variable counts are padded to a fixed size with a boolean mask.
"""

__version__ = "0.1.0"

# Before JAX starts: CPU results that do not depend on the core count (see jaxdet/xla_flags.py).
from jaxdet import xla_flags as _xla_flags  # noqa: E402,F401


def __getattr__(name):
  """`jaxdet.Detector` (jaxdet.detector), imported on first use so `import jaxdet` stays light."""
  if name == "Detector":
    from jaxdet.detector import Detector
    return Detector
  raise AttributeError(f"module 'jaxdet' has no attribute {name!r}")
