"""Where training reports go: DIR/metrics.jsonl, TensorBoard event files, a progress bar.

tensorboardX and tqdm are imported lazily and are optional: without them, only metrics.jsonl
is written and progress is printed as plain lines. metrics.jsonl is strict JSON, one object a
line: a non-finite value is written as null.
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings
from typing import Any, Mapping

from jaxdet import files


class MetricWriter:
  """Appends {"step", "split", **scalars} lines to DIR/metrics.jsonl and to TensorBoard.

  Args:
    workdir: the run's directory; TensorBoard files go to workdir/tensorboard.
    enabled: False on non-leader hosts (nothing is written).
  """

  def __init__(self, workdir: str, *, enabled: bool = True):
    self.enabled = enabled
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    try:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
    except ImportError:
      warnings.warn("tensorboardX is not installed: writing only metrics.jsonl")

  def write(self, step: int, scalars: Mapping[str, Any], split: str = "train") -> None:
    """Writes one line of scalars (NumPy/JAX scalars are converted to float)."""
    if not self.enabled:
      return
    values = {k: float(v) for k, v in scalars.items()}
    with open(self.path, "a") as f:
      f.write(files.dumps({"step": int(step), "split": split, **values}) + "\n")
    if self._tb is not None:
      for k, v in values.items():
        self._tb.add_scalar(f"{split}/{k}", v, int(step))
      self._tb.flush()

  def truncate(self, step: int, *, keep_eval_at_step: bool = True) -> int:
    """Drops the lines of metrics.jsonl written after `step` (and a torn last line), so that a
    run resumed from checkpoint `step` logs no step twice; returns how many were dropped.

    keep_eval_at_step: False also drops the eval lines at `step` itself (the resumed run
      evaluates that step again: a finished run's final evaluation).
    """
    if not self.enabled or not os.path.exists(self.path):
      return 0
    with open(self.path) as f:
      lines = [line for line in f if line.strip()]
    kept = [line for line in lines if _keep(line, step, keep_eval_at_step)]
    if len(kept) != len(lines):
      files.atomic_write(self.path, lambda f: f.write("".join(kept).encode()), ".jsonl")
    return len(lines) - len(kept)

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def _keep(line: str, step: int, keep_eval_at_step: bool) -> bool:
  """Whether a metrics.jsonl line survives a resume from `step` (unreadable lines do not)."""
  try:
    record = json.loads(line)
    at = int(record["step"])
  except (ValueError, KeyError, TypeError):
    return False
  return at < step or (at == step and (keep_eval_at_step or record.get("split") != "eval"))


def read_metrics(workdir: str) -> list[dict[str, Any]]:
  """The lines of DIR/metrics.jsonl as dicts (empty if absent)."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


class Progress:
  """A progress bar over training steps showing step, loss, images/s and the ETA."""

  def __init__(self, total: int, initial: int = 0, *, enabled: bool = True):
    self.total, self.step, self.enabled = total, initial, enabled
    self._bar = None
    self._start = time.perf_counter()
    if enabled:
      try:
        from tqdm import tqdm
        self._bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True,
                         file=sys.stderr)
      except ImportError:
        pass

  def update(self, step: int, loss: float, images_per_s: float) -> None:
    """Moves the bar to `step` and shows the latest loss and throughput."""
    if not self.enabled:
      return
    if self._bar is not None:
      self._bar.update(step - self.step)
      self._bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{images_per_s:.1f}")
    else:
      done = max(step - self.step, 1)
      eta = (self.total - step) * (time.perf_counter() - self._start) / done
      print(f"step {step}/{self.total} loss {loss:.4f} {images_per_s:.1f} img/s "
            f"eta {eta:.0f}s", file=sys.stderr, flush=True)
      self._start, self.step = time.perf_counter(), step
      return
    self.step = step

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
