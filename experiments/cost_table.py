r"""XLA's compiled cost of each paper-scale system's `predict` (batch 1) beside the papers'
essential multiply-adds, and the roofline time on an H200.

    python -m experiments.cost_table [--only rcnn,fast_rcnn] [--out table.md]

For each paper preset: `jax.jit(predict).lower(variables, batch).compile().cost_analysis()`
(flops, bytes accessed) on one image of the preset's true shape (VOC-sized mock data through
the tfds path, as experiments.check_presets; proposals are random boxes at the preset's
capacity), compiled for this machine's backend, nothing run. Columns:

  essential: the papers' multiply-adds of the network (the brief's figures: VGG16 conv at
    600 x 1000, 183 G; R-CNN's 2000 warped 224 px VGG16 crops, 30.9 T; Fast R-CNN with 2000
    RoIs, 423 G, 248 G with truncated SVD; Faster R-CNN with 300 RoIs, 225 G; YOLO v1 at 448,
    20 G).
  ratio: compiled flops / (2 x essential) (a multiply-add is 2 flops): ~1 when XLA's graph
    does the papers' work, more where jaxdet computes extra (e.g. padded buckets, all-class
    box heads), less where a loop body is counted once.
  roofline: max(flops / 989e12, bytes / 4.8e12) seconds, the H200's dense bf16 peak and HBM
    bandwidth: a lower bound, not a measurement.

Loops: XLA's cost analysis counts a while-loop body once. R-CNN's region chunks (a lax.map)
are therefore compiled here as one chunk of all 2000 regions (model.chunk = 2000), so every
region is counted; NMS and box merging are while loops too, but their FLOPs are negligible
beside the networks' (counted once: a lower bound for them).

On the CPU backend bfloat16 convolutions may be upcast, which changes bytes, not flops.
"""

from __future__ import annotations

import argparse
import time
from typing import Any, Sequence

import jax
import numpy as np

from experiments import check_presets as cp

H200_FLOPS = 989e12    # dense bf16 FLOP/s
H200_BYTES = 4.8e12    # HBM bytes/s

# row name -> (config, overrides of config.model, essential multiply-adds, what it counts)
ROWS = {
    "rcnn": ("rcnn", {"chunk": 2000}, 30.9e12, "2000 warped 224 px crops through VGG16"),
    "fast_rcnn": ("fast_rcnn", {}, 423e9, "VGG16 conv at 600 x 1000 + fc on 2000 RoIs"),
    "fast_rcnn_svd": ("fast_rcnn", {}, 248e9, "the same, fc6/fc7 truncated SVD 1024 / 256"),
    "faster_rcnn": ("faster_rcnn", {}, 225e9, "VGG16 conv + RPN + fc on 300 RoIs"),
    "yolo": ("yolo", {}, 20e9, "24 conv + 2 fc at 448"),
    "vgg16_conv": ("fast_rcnn", {}, 183e9, "VGG16 conv1_1..conv5_3 at 600 x 1000"),
}


def compiled_cost(fn, *args) -> dict[str, float]:
  """{"flops", "bytes"} of `jax.jit(fn)` compiled for these argument shapes (not run)."""
  t = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):   # older jax: one dict per computation
    cost = cost[0]
  return {"flops": float(cost.get("flops", 0.0)),
          "bytes": float(cost.get("bytes accessed", 0.0)),
          "compile_s": time.perf_counter() - t}


def row_cost(row: str) -> dict[str, Any]:
  """The compiled cost of one ROWS entry (batch 1, the preset's shapes)."""
  from jaxdet.train import setup
  name, overrides, essential, what = ROWS[row]
  config = cp.load_config(name, "paper")
  for k, v in overrides.items():
    config.model[k] = v
  system = setup.system_from_config(config)
  batch = cp._model_batch(cp.preset_batch(config, train=False, batch_size=1))  # pylint: disable=protected-access
  variables = jax.eval_shape(system.init, jax.random.PRNGKey(0), batch)
  if row == "fast_rcnn_svd":
    variables = jax.eval_shape(system.extras.truncated_svd, variables)
  if row == "vgg16_conv":
    parts = system.extras.backbone
    from jaxdet.models import backbones
    fn = lambda p, image: parts.conv.apply(
        {"params": p}, backbones.normalize_images(image, parts.conv.dtype))
    cost = compiled_cost(fn, variables["params"]["conv"], batch["image"])
  else:
    cost = compiled_cost(system.predict, variables, batch)
  roofline = max(cost["flops"] / H200_FLOPS, cost["bytes"] / H200_BYTES)
  return {"row": row, "shape": tuple(batch["image"].shape[1:3]), "what": what,
          "essential_macs": essential, **cost,
          "ratio": cost["flops"] / (2 * essential), "roofline_s": roofline}


def format_table(results: Sequence[dict[str, Any]]) -> str:
  lines = ["| system | image | essential MACs | compiled GFLOP | GB accessed | "
           "compiled / (2 x essential) | H200 roofline ms | counts |",
           "|---|---|---|---|---|---|---|---|"]
  for r in results:
    lines.append(
        f"| {r['row']} | {r['shape'][0]}x{r['shape'][1]} | {r['essential_macs'] / 1e9:,.0f} G "
        f"| {r['flops'] / 1e9:,.1f} | {r['bytes'] / 1e9:,.2f} | {r['ratio']:.2f} | "
        f"{1e3 * r['roofline_s']:.3f} | {r['what']} |")
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--only", default="", help=f"comma-separated rows of {list(ROWS)}")
  parser.add_argument("--out", default="", help="also write the markdown table here")
  args = parser.parse_args(argv)
  rows = [r for r in args.only.split(",") if r] or list(ROWS)
  unknown = sorted(set(rows) - set(ROWS))
  if unknown:
    raise SystemExit(f"--only: unknown rows {unknown}; known: {', '.join(ROWS)}")
  print(f"jax {jax.__version__}, backend {jax.default_backend()}", flush=True)
  results = []
  with cp.mock_tfds(num=4):
    for row in rows:
      r = row_cost(row)
      results.append(r)
      print(f"{row}: {r['flops'] / 1e9:.1f} GFLOP, {r['bytes'] / 1e9:.2f} GB, ratio "
            f"{r['ratio']:.2f}, compile {r['compile_s']:.1f} s", flush=True)
  table = format_table(results)
  print(table)
  if args.out:
    from jaxdet import files
    files.atomic_write(args.out, lambda f: f.write((table + "\n").encode()))
  return results


if __name__ == "__main__":
  main()
