"""Smoke test of experiments.bench_ops at toy sizes, with and without a torchvision to compare to.

The torchvision stand-in wraps NumPy arrays and answers with jaxdet's own ops in torchvision's
layouts (NCHW features, [K, 5] rois with the image index first): it checks the benchmark's
plumbing (layouts, dtypes, agreement checks), not the ops, which tests/ops/ compare against
independent references.
"""

import contextlib
import functools
import json
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import bench_ops
from jaxdet.ops import roi_pool as jax_roi
from jaxdet.ops.boxes import box_iou


class FakeTensor:
  """The few torch.Tensor methods the benchmark uses, over a NumPy array."""

  def __init__(self, array):
    self.a = np.asarray(array)

  @property
  def dtype(self):
    return self.a.dtype

  def to(self, target):
    if isinstance(target, str):                                # a device
      return self
    return FakeTensor(self.a.astype(target))

  def float(self):
    return FakeTensor(self.a.astype(np.float32))

  def cpu(self):
    return self

  def numpy(self):
    return self.a


def _per_image(op, features, rois, **kw):
  """torchvision layout -> jaxdet, vmapped over images -> torchvision layout."""
  feats = features.a.transpose(0, 2, 3, 1)                       # NCHW -> NHWC
  b = feats.shape[0]
  boxes = rois.a[:, 1:].astype(np.float32).reshape(b, -1, 4)     # equal counts, image-major
  assert (rois.a[:, 0].reshape(b, -1) == np.arange(b)[:, None]).all()
  out = jax.jit(jax.vmap(functools.partial(op, **kw)))(feats, boxes)
  out = np.asarray(out).reshape((-1,) + out.shape[2:])
  return FakeTensor(out.transpose(0, 3, 1, 2))                   # [K, oh, ow, C] -> [K, C, oh, ow]


def _numpy_nms(boxes, scores, iou_threshold):
  """Greedy NMS in float64 NumPy: indices of the picks, best first."""
  boxes, scores = boxes.a.astype(np.float64), scores.a
  area = np.prod(np.maximum(boxes[:, 2:] - boxes[:, :2], 0), axis=1)
  removed = np.zeros(len(scores), bool)
  keep = []
  for i in sorted(range(len(scores)), key=lambda i: (-scores[i], i)):
    if not removed[i]:
      keep.append(i)
      wh = np.maximum(np.minimum(boxes[i, 2:], boxes[:, 2:]) - np.maximum(boxes[i, :2],
                                                                          boxes[:, :2]), 0)
      inter = wh[:, 0] * wh[:, 1]
      union = area[i] + area - inter
      removed |= np.where(union > 0, inter / np.where(union > 0, union, 1), 0) > iou_threshold
  return FakeTensor(np.array(keep, np.int64))


def fake_torch_modules():
  torch = types.ModuleType("torch")
  torch.__version__ = "fake"
  torch.float32, torch.bfloat16 = np.dtype(np.float32), np.dtype(jnp.bfloat16)
  torch.from_numpy = FakeTensor
  torch.device = lambda name: name
  torch.no_grad = contextlib.nullcontext
  torch.cuda = types.SimpleNamespace(is_available=lambda: False)
  ops = types.SimpleNamespace(
      box_iou=lambda a, b: FakeTensor(jax.jit(box_iou)(a.a, b.a)),
      nms=_numpy_nms,
      roi_pool=lambda x, r, output_size, spatial_scale: _per_image(
          jax_roi.roi_pool, x, r, output_size=output_size, spatial_scale=spatial_scale),
      roi_align=lambda x, r, **kw: _per_image(jax_roi.roi_align, x, r, **kw))
  torchvision = types.ModuleType("torchvision")
  torchvision.__version__ = "fake"
  torchvision.ops = ops
  return torch, torchvision


def test_bench_ops_tiny_with_fake_torchvision(monkeypatch, tmp_path, capsys):
  torch, torchvision = fake_torch_modules()
  monkeypatch.setitem(sys.modules, "torch", torch)
  monkeypatch.setitem(sys.modules, "torchvision", torchvision)
  out_file = tmp_path / "bench.json"
  result = bench_ops.main(["--tiny", "--out", str(out_file)])
  printed = capsys.readouterr().out
  ops = {r["op"].split()[0] for r in result["rows"]}
  assert ops == {"box_iou", "nms", "roi_pool", "roi_align"}
  for row in result["rows"]:
    assert row["jax_s"] > 0 and row["torch_s"] > 0, row
    assert row["ok"], row
  assert "jaxdet ms" in printed and "same picks" in printed and "jax: " in printed
  assert "DISAGREE" not in printed
  assert json.loads(out_file.read_text())["rows"][0]["op"] == "box_iou"


def test_bench_ops_without_torch(monkeypatch):
  monkeypatch.setitem(sys.modules, "torch", None)                # import torch raises
  assert bench_ops.import_torchvision() == (None, None)
  assert "not installed" in bench_ops.machine_info(None, None)["torch"]
