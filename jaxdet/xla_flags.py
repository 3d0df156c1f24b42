"""XLA flags jaxdet sets before JAX starts: CPU results that do not depend on the core count.

XLA:CPU (jaxlib 0.10, 0.11) hands some fused reductions to YNNPACK, which splits a reduction
into as many partial sums as the process has threads. The summation order, and so the last bits
of every bias gradient and batch-norm statistic, then depend on how many cores the process may
use: a run pinned to one core and the same run on two cores diverge within a few steps (the
lecture's YOLO stage scored 0.813 VOC07 mAP on one core and 0.743 on two, from bitwise-equal
batches). With YNNPACK's reduction fusions off (`--xla_cpu_experimental_ynn_fusion_type=-reduce`)
XLA's own reductions are used, whose order is fixed; YNNPACK keeps the convolutions and dots,
whose results do not depend on the thread count. (Turning every YNNPACK fusion off, an empty
list, is not enough: the convolutions then go to Eigen, whose kernel gradients do depend on it.)

jaxdet appends that flag to XLA_FLAGS when it is imported, unless XLA_FLAGS already names
`xla_cpu_experimental_ynn_fusion_type` (a user's own choice wins), or JAXDET_XLA_FLAGS=0 is set,
or jaxlib is not 0.10 or 0.11 (the versions whose flag syntax is known; on a newer one check
`tests/test_xla_flags.py` and extend `KNOWN_JAXLIB`).
The flag only reaches XLA if jaxdet is imported before JAX creates its first backend; otherwise
it has no effect and `core_count_independent()` says so. GPU and TPU numerics are untouched.
"""

from __future__ import annotations

import os
import sys

YNN_FLAG = "xla_cpu_experimental_ynn_fusion_type"
YNN_OFF = f"--{YNN_FLAG}=-reduce"
KNOWN_JAXLIB = ("0.10.", "0.11.")


def _jaxlib_version() -> str:
  from importlib import metadata
  try:
    return metadata.version("jaxlib")
  except metadata.PackageNotFoundError:
    return ""


def set_default_flags(environ: dict[str, str] | None = None, jaxlib_version: str | None = None
                      ) -> bool:
  """Appends `YNN_OFF` to XLA_FLAGS unless the user set the flag, opted out
  (JAXDET_XLA_FLAGS=0) or jaxlib's version is not known; True if it was appended."""
  environ = os.environ if environ is None else environ
  version = _jaxlib_version() if jaxlib_version is None else jaxlib_version
  flags = environ.get("XLA_FLAGS", "")
  if (YNN_FLAG in flags or environ.get("JAXDET_XLA_FLAGS") == "0"
      or not version.startswith(KNOWN_JAXLIB)):
    return False
  environ["XLA_FLAGS"] = f"{flags} {YNN_OFF}".strip()
  return True


def _backends_started() -> bool:
  """Whether JAX has created its backends (after which XLA_FLAGS is no longer read)."""
  if "jax" not in sys.modules:
    return False
  try:
    from jax._src import xla_bridge
    return bool(getattr(xla_bridge, "_backends", {}))
  except Exception:   # a JAX without that private name: assume the flags were read
    return True


def core_count_independent() -> bool:
  """True if this process's XLA:CPU reductions do not depend on the core count: the flag is
  in XLA_FLAGS (`YNN_OFF`), and was there before JAX started its backends."""
  return f" {YNN_OFF} " in f" {os.environ.get('XLA_FLAGS', '')} " and _FLAGS_BEFORE_BACKENDS


_FLAGS_BEFORE_BACKENDS = not _backends_started()
if _FLAGS_BEFORE_BACKENDS:
  set_default_flags()
