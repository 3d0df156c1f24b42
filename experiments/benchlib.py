"""Shared pieces of the benchmark scripts: timing, FLOP counts, peak FLOP/s, machine info.

Imports only jax, numpy and the standard library; torch is passed in by the caller (the
scripts import it where it is installed), so every script still runs without it.

Timing conventions (all times in seconds, `time.perf_counter`):
  * `time_jax` / `time_torch`: one warm-up call (compilation included, timed as `first_s`),
    then `repeats` calls each synchronised on its own; `median_s` and `best_s` of those.
  * `time_pipelined`: calls issued back to back with one synchronisation at the end
    (throughput with asynchronous dispatch), for images/s of a steady stream.
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable, NamedTuple

import jax

# Dense (no sparsity) peak FLOP/s by device kind and compute dtype, from the vendors' sheets.
PEAK_FLOPS = {
    "NVIDIA H100 80GB HBM3": {"bfloat16": 989e12, "float32": 67e12},     # SXM
    "NVIDIA H100 PCIe": {"bfloat16": 756e12, "float32": 51e12},
    "NVIDIA H100 NVL": {"bfloat16": 835e12, "float32": 60e12},
    "NVIDIA H200": {"bfloat16": 989e12, "float32": 67e12},
    "NVIDIA A100-SXM4-80GB": {"bfloat16": 312e12, "float32": 19.5e12},
    "NVIDIA A100-SXM4-40GB": {"bfloat16": 312e12, "float32": 19.5e12},
    "NVIDIA L4": {"bfloat16": 121e12, "float32": 30e12},
    "TPU v4": {"bfloat16": 275e12},
    "TPU v5 lite": {"bfloat16": 197e12},
    "TPU v5": {"bfloat16": 459e12},
}


class Timing(NamedTuple):
  """first_s: seconds of the warm-up call (compilation included on its first use);
  median_s, best_s: median and minimum seconds of the timed calls; out: the warm-up's output."""
  first_s: float
  median_s: float
  best_s: float
  out: Any


def _timed_calls(call: Callable[[], Any], sync: Callable[[Any], Any], repeats: int) -> Timing:
  start = time.perf_counter()
  out = call()
  sync(out)
  first = time.perf_counter() - start
  times = []
  for _ in range(repeats):
    sync(None)
    start = time.perf_counter()
    sync(call())
    times.append(time.perf_counter() - start)
  return Timing(first, statistics.median(times), min(times), out)


def time_jax(fn: Callable, args: tuple = (), repeats: int = 5) -> Timing:
  """Times `fn(*args)` (a jitted function): the first call, then `repeats` calls each ended by
  `jax.block_until_ready`. Returns Timing(first_s, median_s, best_s, out)."""
  return _timed_calls(lambda: fn(*args),
                      lambda out: out if out is None else jax.block_until_ready(out), repeats)


def torch_sync(torch: Any) -> Callable[[], None]:
  """`torch.cuda.synchronize` where CUDA is available, else a no-op."""
  return torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)


def time_torch(torch: Any, fn: Callable, args: tuple = (), repeats: int = 5) -> Timing:
  """Times `fn(*args)` with torch (the module passed in): a warm-up call, then `repeats`
  calls with CUDA synchronised before and after each (no-op on CPU). Gradient mode is the
  caller's (wrap in `torch.no_grad()` for inference). Returns Timing(first_s, median_s,
  best_s, out)."""
  sync = torch_sync(torch)
  return _timed_calls(lambda: fn(*args), lambda _: sync(), repeats)


def time_pipelined(fn: Callable[[], Any], sync: Callable[[Any], Any],
                   iters: int) -> tuple[float, float]:
  """(seconds of the first call, mean seconds per call) of `fn()`: after the first call and
  one more warm-up, `iters` calls are issued back to back and `sync(last output)` waits once."""
  start = time.perf_counter()
  sync(fn())
  first = time.perf_counter() - start
  sync(fn())
  start = time.perf_counter()
  for _ in range(iters):
    out = fn()
  sync(out)
  return first, (time.perf_counter() - start) / iters


def xla_flops(fn: Callable, args: tuple) -> float | None:
  """FLOPs of one call of `fn(*args)` by XLA's cost analysis of the compiled function; None
  where the backend gives no cost analysis. (A loop body is counted once.)"""
  try:
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
  except Exception:   # noqa: BLE001  (backends without cost analysis)
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  return float(cost["flops"]) if cost and "flops" in cost else None


def peak_flops(device: Any, dtype: str) -> float | None:
  """Dense peak FLOP/s of `device` (a jax Device) for `dtype` ("bfloat16", "float32") from
  PEAK_FLOPS, matching the device kind exactly or by prefix; None when unknown (CPUs)."""
  kind = getattr(device, "device_kind", "")
  if kind in PEAK_FLOPS:
    return PEAK_FLOPS[kind].get(dtype)
  for name, peaks in PEAK_FLOPS.items():   # e.g. "NVIDIA H200 NVL" -> "NVIDIA H200"
    if kind.startswith(name):
      return peaks.get(dtype)
  return None


def device_kind(device: Any = None) -> str:
  """The device kind of `device` (default: the first jax device), e.g. "NVIDIA H100 80GB HBM3"."""
  device = device or jax.devices()[0]
  return str(getattr(device, "device_kind", ""))


def device_name(device: Any = None) -> str:
  """"platform (device kind)" of `device` (default: the first jax device), e.g. "gpu (NVIDIA
  H100 80GB HBM3)", "cpu (cpu)"."""
  device = device or jax.devices()[0]
  return f"{device.platform} ({device_kind(device)})"


def versions() -> dict[str, str]:
  """{"jax": jax version, "python": Python version}."""
  return {"jax": jax.__version__, "python": platform.python_version()}


def machine_info(torch: Any = None, tv: Any = None) -> dict[str, str]:
  """Where the figures come from, as strings: {"date", "machine" (host, OS, CPU count),
  "jax" (version on device), "python", "torch" (torch and torchvision versions and device, or
  why not)}. `torch`, `tv`: the imported modules, or None."""
  info = {
      "date": datetime.datetime.now().isoformat(timespec="seconds"),
      "machine": f"{platform.node()} {platform.platform()} {platform.processor()}, "
                 f"{os.cpu_count()} CPUs",
      "jax": f"{jax.__version__} on {device_name()}",
      "python": sys.version.split()[0],
  }
  if torch is not None:
    where = (f"cuda ({torch.cuda.get_device_name()})" if torch.cuda.is_available() else "cpu")
    info["torch"] = f"torch {torch.__version__}, torchvision {tv.__version__} on {where}"
  else:
    info["torch"] = "not installed: no torchvision comparison"
  return info
