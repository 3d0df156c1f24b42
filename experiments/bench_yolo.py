"""YOLO v1 test-time speed: images/s at batch 1 and 64, latency at batch 1, share of peak FLOP/s.

  python -m experiments.bench_yolo [--small] [--batch-sizes 1,64] [--dtype bfloat16]
      [--repeats R] [--out FILE.json]

What is timed: the System's jitted `predict` on u8 images already on the device: normalisation,
the network, decoding, class-specific confidences, threshold and per-class NMS down to 100
fixed-size detections per image (the post-processing is included). The network alone is timed
too, to show the post-processing's share. Compilation is excluded (a warm-up call) and reported;
each figure is the median of R calls, each synchronised with `jax.block_until_ready`. Parameters
are cast to the compute dtype once, as a deployed model would be (the master copy is float32).

FLOPs per image: counted analytically (2 per multiply-add of the conv and fc layers,
`jaxdet.models.yolo.conv_flops`) and by XLA's cost analysis of the compiled network; the share
of peak uses the analytic count and the device's dense peak for the compute dtype (a table by
device kind in `experiments.benchlib`; unknown devices, and CPUs, just report FLOP/s).

Full (default): the paper's network (24 conv + 2 fc, 448x448, S=7, B=2, C=20), bfloat16.
`--small`: the CPU network of the cpu preset (7 conv, 128x128, S=7, B=2, C=6), float32, for a
quick run on a laptop.
Paper reference: 45 images/s on a Titan X (YOLO), 155 for Fast YOLO.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from experiments import benchlib
from jaxdet import files
from jaxdet.models import yolo
from jaxdet.models.backbones import normalize_images

SETTINGS = {
    "full": dict(variant="paper", image=448, grid=7, boxes=2, classes=20, dtype="bfloat16",
                 repeats=20),
    "small": dict(variant="small", image=128, grid=7, boxes=2, classes=6, dtype="float32",
                  repeats=5),
}


def run(size: str = "full", batch_sizes: tuple[int, ...] = (1, 64), dtype: str | None = None,
        repeats: int | None = None, seed: int = 0) -> dict[str, Any]:
  """Benchmarks one setting; returns the figures (also printed as a table by `main`)."""
  s = SETTINGS[size]
  dtype = dtype or s["dtype"]
  repeats = repeats or s["repeats"]
  config = {"compute_dtype": dtype,
            "model": {"variant": s["variant"], "grid_size": s["grid"], "num_boxes": s["boxes"],
                      "num_classes": s["classes"],
                      "predict": {"score_threshold": 0.005, "iou_threshold": 0.5,
                                  "max_detections": 100, "pre_nms_topk": 0}}}
  system = yolo.build_system(config)
  net = system.extras.network
  layers, fc_dim, _ = yolo.VARIANTS[s["variant"]]
  out_dim = s["grid"] ** 2 * (5 * s["boxes"] + s["classes"])
  flops_analytic = yolo.conv_flops(layers, s["image"], fc_dim, out_dim)
  device = jax.devices()[0]
  peak = benchlib.peak_flops(device, dtype)
  rng = np.random.default_rng(seed)

  variables = None
  rows = []
  for b in batch_sizes:
    hw = s["image"]
    batch = {"image": jnp.asarray(rng.integers(0, 256, (b, hw, hw, 3)), jnp.uint8),
             "image_size": jnp.full((b, 2), hw, jnp.int32)}
    if variables is None:
      variables = system.init(jax.random.key(seed), batch)
      variables = jax.tree.map(lambda p: p.astype(dtype), variables)   # deployed weights
    predict = jax.jit(system.predict)
    network = jax.jit(lambda v, x: net.apply(v, normalize_images(x, dtype), train=False))
    timing = benchlib.time_jax(predict, (variables, batch), repeats)
    compile_s, t_all = timing.first_s, timing.median_s
    t_net = benchlib.time_jax(network, (variables, batch["image"]), repeats).median_s
    xla = benchlib.xla_flops(network, (variables, batch["image"]))
    achieved = flops_analytic * b / t_all
    rows.append({
        "batch": b,
        "images_per_s": b / t_all,
        "latency_ms": 1e3 * t_all,
        "network_only_ms": 1e3 * t_net,
        "postprocess_share": max(t_all - t_net, 0.0) / t_all,
        "compile_s": compile_s,
        "tflops_per_s": achieved / 1e12,
        "fraction_of_peak": achieved / peak if peak else None,
        "xla_gflops_per_image": xla / b / 1e9 if xla else None,
    })
  return {
      "setting": size, "variant": s["variant"], "image": s["image"], "S": s["grid"],
      "B": s["boxes"], "C": s["classes"], "dtype": dtype, "repeats": repeats,
      "gflops_per_image_analytic": flops_analytic / 1e9,
      "device": f"{benchlib.device_name(device)}, {jax.device_count()} device(s)",
      "peak_tflops": peak / 1e12 if peak else None,
      **benchlib.versions(),
      "rows": rows,
  }


def format_table(result: dict[str, Any]) -> str:
  head = (f"YOLO v1 {result['variant']} {result['image']}x{result['image']} S={result['S']} "
          f"B={result['B']} C={result['C']} {result['dtype']} on {result['device']}; "
          f"{result['gflops_per_image_analytic']:.2f} GFLOPs/image (analytic)"
          + (f", peak {result['peak_tflops']:.0f} TFLOP/s" if result["peak_tflops"] else ""))
  lines = [head, "batch  images/s  latency ms  network ms  post share  TFLOP/s  of peak  "
                 "XLA GFLOPs/img  compile s"]
  for r in result["rows"]:
    peak = f"{100 * r['fraction_of_peak']:6.1f}%" if r["fraction_of_peak"] is not None else "     -"
    xla = f"{r['xla_gflops_per_image']:14.2f}" if r["xla_gflops_per_image"] else "             -"
    lines.append(f"{r['batch']:5d}  {r['images_per_s']:8.1f}  {r['latency_ms']:10.2f}  "
                 f"{r['network_only_ms']:10.2f}  {100 * r['postprocess_share']:9.1f}%  "
                 f"{r['tflops_per_s']:7.3f}  {peak}  {xla}  {r['compile_s']:9.1f}")
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--small", action="store_true", help="the CPU network, a quick run")
  parser.add_argument("--batch-sizes", default="1,64", help="comma-separated batch sizes")
  parser.add_argument("--dtype", default=None, help="compute dtype (default: the setting's)")
  parser.add_argument("--repeats", type=int, default=None, help="timed calls per figure")
  parser.add_argument("--out", default=None, help="also write the results to this JSON file")
  args = parser.parse_args(argv)
  batch_sizes = tuple(int(b) for b in args.batch_sizes.split(","))
  result = run("small" if args.small else "full", batch_sizes, args.dtype, args.repeats)
  print(format_table(result))
  if args.out:
    files.write_json(args.out, result)
  return result


if __name__ == "__main__":
  main(sys.argv[1:])
