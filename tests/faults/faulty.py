"""Faults for the fault tests: loaders that poison chosen batches of the toy system (its loss
terms are named as every detector's: loss/box, loss/cls), and ways to damage a checkpoint on
disk the way disks and users do."""

from __future__ import annotations

import glob
import os
import shutil
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "train"))

from toy_system import ToyLoader, toy_config  # noqa: E402


class PoisonedLoader(ToyLoader):
  """A toy train loader whose batches number `bad` (0-based) have NaN boxes: their box loss
  (only it) is NaN. Batch i is used by step i + 1 of a fresh run."""

  def __init__(self, *args, bad=(), **kw):
    super().__init__(*args, **kw)
    self.bad = set(bad)

  def __next__(self):
    index = self.index
    batch = super().__next__()
    if self.train and index in self.bad:
      batch["boxes"] = np.full_like(batch["boxes"], np.nan)
    return batch


def poisoned_loader(bad):
  """A make_loader (jaxdet.data.pipeline.make_loader's signature) poisoning batches `bad`."""
  def make(data_config, split, *, batch_size, seed, train, examples=None):
    del data_config, split, examples
    return PoisonedLoader(batch_size, seed, train, bad=bad, num_classes=3)
  return make


def config(**overrides):
  """A small toy run: batch 4, logs and checkpoints every step, no evaluation but the final."""
  base = {"train.num_steps": 3, "train.batch_size": 4, "train.log_every": 1,
          "checkpoint.every_steps": 1, "eval.every_steps": 0, "eval.batch_size": 4,
          "checkpoint.best_metric": ""}
  return toy_config(**{**base, **overrides})


def steps(workdir) -> list[int]:
  """The finished checkpoint steps in workdir/checkpoints."""
  folder = os.path.join(str(workdir), "checkpoints")
  return sorted(int(d) for d in os.listdir(folder) if d.isdigit()) if os.path.isdir(folder) else []


def _data_files(step_dir: str) -> list[str]:
  """The array data files of a step's state item (OCDBT: state/**/d/*). Which of them the
  manifest still refers to varies from run to run, so damage is done to all."""
  return sorted(glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True))


def damage(step_dir: str, kind: str) -> None:
  """Damages a checkpoint step folder in place.

  kind: "bytes" (random bytes over all but the first and last 8 bytes of every array data
    file), "truncated" (those files cut to half), "swapped" (the arrays replaced by the
    previous step's: readable, but other values), "manifest" (state/manifest.ocdbt deleted),
    "loader_json" / "meta_json" (that JSON item emptied).
  """
  g = np.random.default_rng(0)
  if kind in ("bytes", "truncated"):
    for path in _data_files(step_dir):
      with open(path, "rb") as f:
        data = bytearray(f.read())
      n = len(data)
      if kind == "truncated":
        data = data[:n // 2]
      elif n > 16:
        data[8:n - 8] = g.integers(0, 256, n - 16, dtype=np.uint8).tobytes()
      with open(path, "wb") as f:
        f.write(bytes(data))
  elif kind == "swapped":
    previous = os.path.join(os.path.dirname(step_dir), str(int(os.path.basename(step_dir)) - 1))
    shutil.rmtree(os.path.join(step_dir, "state"))
    shutil.copytree(os.path.join(previous, "state"), os.path.join(step_dir, "state"))
  elif kind == "manifest":
    os.remove(os.path.join(step_dir, "state", "manifest.ocdbt"))
  elif kind in ("loader_json", "meta_json"):
    open(os.path.join(step_dir, kind.split("_")[0], "metadata"), "w").close()
  else:
    raise ValueError(f"kind: unknown damage {kind!r}")

