r"""The lecture's speedup table at the papers' scale: R-CNN, Fast R-CNN, Faster R-CNN, YOLO v1.

    python -m experiments.bench_speedups [--small] [--out DIR] [--repeats R]

Full (default; an accelerator): VGG16 on 600 x 1000 images in bfloat16, C = 20, random-init
weights (timing does not depend on them):
  * R-CNN: 2000 proposals, each warped to 224 x 224 (16 px context) through VGG16, SVM scores,
    box regression, per-class NMS (`jaxdet.models.rcnn`);
  * Fast R-CNN: conv5 once, RoI max pooling of 2000 proposals, fc6/fc7, heads, NMS, with and
    without truncated SVD (ranks 1024, 256) (`jaxdet.models.fast_rcnn`);
  * Faster R-CNN: RPN (anchors 128, 256, 512 x 0.5, 1, 2; 6000 -> NMS 0.7 -> 300 proposals),
    then the Fast R-CNN head (`jaxdet.models.faster_rcnn`);
  * YOLO v1: the paper's network at 448 x 448 (`experiments.bench_yolo.run`).
Each row is the system's own jitted `predict` on one image already on the device (median of R
synchronised calls, compilation excluded). Test time with proposals adds selective search
("fast" mode, as in R-CNN) timed on this machine's CPU on a synthetic 600 x 1000 image; where
cv2.ximgproc does not import, that column says so. FLOPs per image: XLA's cost analysis of the
compiled predict (R-CNN: of one chunk of regions through the network times the number of
chunks, since XLA counts a loop body once); the fraction of peak divides the achieved FLOP/s by
the device's dense bfloat16 peak (`experiments.benchlib.PEAK_FLOPS`).

Where torch and torchvision import, the same pipelines built from torchvision are timed in the
same run (bfloat16 autocast on CUDA, float32 on CPU): R-CNN = roi_align warp + vgg16; Fast
R-CNN = vgg16 features + torchvision.ops.roi_pool + fc6/fc7 + heads; Faster R-CNN =
torchvision.models.detection.FasterRCNN with the same backbone, anchors, proposal counts and
RoI max pooling. The table shows jaxdet / torchvision time ratios.

`--small`: a CPU run in about a minute for tests (the tiny backbone, 128 x 192 images,
64 proposals, the small YOLO at 128 x 128).

Needs only jax, flax, optax, numpy and matplotlib (no ml_collections: configs are plain dicts);
torch, torchvision and cv2.ximgproc are optional.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import traceback
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from experiments import bench_yolo, benchlib
from jaxdet import files

# The papers' K40 figures (test seconds per image; R-CNN and Fast R-CNN with VGG16, Faster
# R-CNN with VGG16 and its RPN), as the lecture shows them.
PAPER = {
    "rcnn": {"test_s": 47.0, "test_with_proposals_s": 50.0, "speedup": 1.0,
             "speedup_with_proposals": 1.0},
    "fast_rcnn": {"test_s": 0.32, "test_with_proposals_s": 2.0, "speedup": 146.0,
                  "speedup_with_proposals": 25.0},
    "faster_rcnn": {"test_s": None, "test_with_proposals_s": 0.2, "speedup": None,
                    "speedup_with_proposals": 250.0},
}

SETTINGS = {
    "full": {"backbone": "vgg16", "backbone_kw": {}, "image": (600, 1000), "proposals": 2000,
             "rcnn_input": 224, "rcnn_context": 16, "rcnn_chunk": 256, "svd_ranks": (1024, 256),
             "anchor_scales": (128.0, 256.0, 512.0), "rpn_pre": 6000, "rpn_post": 300,
             "rpn_channels": 512, "rpn_min_size": 16.0, "num_classes": 20, "dtype": "bfloat16",
             "yolo": "full", "repeats": 10},
    "small": {"backbone": "tiny",
              "backbone_kw": {"stride": 16, "widths": (16, 32, 64, 128),
                              "fc_features": (256, 256), "roi_size": 4},
              "image": (128, 192), "proposals": 64, "rcnn_input": 48, "rcnn_context": 3,
              "rcnn_chunk": 64, "svd_ranks": (128, 64), "anchor_scales": (16.0, 32.0, 64.0),
              "rpn_pre": 600, "rpn_post": 32, "rpn_channels": 64, "rpn_min_size": 4.0,
              "num_classes": 6, "dtype": "float32", "yolo": "small", "repeats": 3},
}

ROWS = (("rcnn", "R-CNN"), ("fast_rcnn", "Fast R-CNN"), ("fast_rcnn_svd", "Fast R-CNN + SVD"),
        ("faster_rcnn", "Faster R-CNN"), ("yolo", "YOLO v1"))


# ----------------------------------------------------------------------------- inputs


def random_proposals(rng: np.random.Generator, n: int, height: int, width: int) -> np.ndarray:
  """f32[n, 4] boxes (x1, y1, x2, y2) inside a height x width image, sides 16 px .. the image."""
  side_w = rng.uniform(16, width, n)
  side_h = rng.uniform(16, height, n)
  x1 = rng.uniform(0, width - side_w)
  y1 = rng.uniform(0, height - side_h)
  return np.stack([x1, y1, x1 + side_w, y1 + side_h], axis=1).astype(np.float32)


def test_batch(s: dict[str, Any], seed: int = 0) -> dict[str, Any]:
  """One synthetic image of the setting's size with `proposals` random boxes, on the device."""
  from jaxdet.data import pipeline
  h, w = s["image"]
  cfg = pipeline.default_data_config()
  cfg.update(image_size=(h, w), num_test=1, max_objects=4)
  image = pipeline.make_source(cfg, "test")[0]["image"]
  props = random_proposals(np.random.default_rng(seed), s["proposals"], h, w)
  return {"image": jnp.asarray(image[None]), "image_size": jnp.asarray([[h, w]], jnp.int32),
          "proposals": jnp.asarray(props[None]),
          "proposal_mask": jnp.ones((1, s["proposals"]), bool)}


def selective_search_seconds(image: np.ndarray, repeats: int) -> dict[str, Any]:
  """Median seconds of OpenCV selective search ("fast" mode) on `image`, or why not."""
  try:
    from cv2 import ximgproc  # noqa: F401
  except ImportError:
    return {"s_per_image": None, "reason": "cv2.ximgproc (opencv-contrib) does not import"}
  from jaxdet.proposals.selective_search import selective_search
  times, count = [], 0
  for _ in range(repeats):
    start = time.perf_counter()
    _, mask = selective_search(image, mode="fast", max_proposals=2000)
    times.append(time.perf_counter() - start)
    count = int(mask.sum())
  return {"s_per_image": statistics.median(times), "mode": "fast", "proposals": count,
          "image_shape": list(image.shape), "cpu_count": os.cpu_count(), "reason": ""}


# ----------------------------------------------------------------------------- jaxdet rows


def _config(s: dict[str, Any], model: dict[str, Any]) -> dict[str, Any]:
  return {"compute_dtype": s["dtype"], "num_classes": s["num_classes"],
          "model": {"backbone": s["backbone"], "backbone_kw": dict(s["backbone_kw"]), **model}}


def _cast(variables: Any, dtype: str) -> Any:
  """Deployed weights: floating leaves in the compute dtype (the master copy is float32)."""
  return jax.tree.map(lambda p: p.astype(dtype) if jnp.issubdtype(p.dtype, jnp.floating)
                      else p, variables)


def _rcnn(s: dict[str, Any], batch: dict[str, Any], repeats: int) -> dict[str, Any]:
  from jaxdet.models import rcnn
  config = _config(s, {"input_size": s["rcnn_input"], "context": s["rcnn_context"],
                       "chunk": s["rcnn_chunk"]})
  system = rcnn.build_system(config)
  variables = dict(system.init(jax.random.key(0), batch))
  net, m = system.extras.network, system.extras.settings
  size = m.input_size
  regions = jnp.zeros((m.chunk, size, size, 3), s["dtype"])
  out = jax.eval_shape(lambda p, x: net.apply({"params": p}, x), variables["params"], regions)
  variables["rcnn"] = rcnn.empty_stage_variables(system.num_classes, out["fc7"].shape[-1],
                                                 out["pool5"].shape[-1])
  variables = _cast(variables, s["dtype"])
  timing = benchlib.time_jax(jax.jit(system.predict), (variables, batch), repeats)
  chunk = benchlib.xla_flops(lambda p, x: net.apply({"params": p}, x),
                               (variables["params"], regions))
  chunks = -(-s["proposals"] // m.chunk)
  return {"test_s": timing.median_s, "compile_s": timing.first_s,
          "flops": chunk * chunks if chunk else None}


def _fast_rcnn(s: dict[str, Any], batch: dict[str, Any], repeats: int) -> list[dict[str, Any]]:
  from jaxdet.models import fast_rcnn
  config = _config(s, {"proposals": "batch", "svd_ranks": tuple(s["svd_ranks"])})
  system = fast_rcnn.build_system(config)
  variables = system.init(jax.random.key(0), batch)
  rows = []
  for svd in (False, True):
    v = system.extras.truncated_svd(variables) if svd else variables
    v = _cast(v, s["dtype"])
    predict = jax.jit(system.predict)
    timing = benchlib.time_jax(predict, (v, batch), repeats)
    rows.append({"test_s": timing.median_s, "compile_s": timing.first_s,
                 "flops": benchlib.xla_flops(system.predict, (v, batch))})
  return rows


def _faster_rcnn(s: dict[str, Any], batch: dict[str, Any], repeats: int) -> dict[str, Any]:
  from jaxdet.models import faster_rcnn
  props = {"pre_nms_topk": s["rpn_pre"], "post_nms_topk": s["rpn_post"], "nms_threshold": 0.7,
           "min_size": s["rpn_min_size"]}
  config = _config(s, {"anchor_scales": tuple(s["anchor_scales"]),
                       "rpn_channels": s["rpn_channels"],
                       "rpn_proposals": {"train": dict(props), "test": dict(props)}})
  system = faster_rcnn.build_system(config)
  images = {"image": batch["image"], "image_size": batch["image_size"]}
  variables = _cast(system.init(jax.random.key(0), images), s["dtype"])
  timing = benchlib.time_jax(jax.jit(system.predict), (variables, images), repeats)
  return {"test_s": timing.median_s, "compile_s": timing.first_s,
          "flops": benchlib.xla_flops(system.predict, (variables, images))}


def _yolo(s: dict[str, Any], repeats: int) -> dict[str, Any]:
  r = bench_yolo.run(s["yolo"], batch_sizes=(1,), repeats=repeats)
  row = r["rows"][0]
  return {"test_s": row["latency_ms"] / 1e3, "compile_s": row["compile_s"],
          "flops": r["gflops_per_image_analytic"] * 1e9,
          "note": f"{r['image']}x{r['image']} input"}


# ----------------------------------------------------------------------------- torchvision


def torchvision_rows(s: dict[str, Any], batch: dict[str, Any], repeats: int
                     ) -> dict[str, Any]:
  """Test seconds per image of the torchvision-built twins, or {"reason": why not}."""
  try:
    import torch
    import torchvision
    from torchvision.ops import roi_align, roi_pool
  except ImportError as e:
    return {"reason": f"torch/torchvision do not import ({e.name})"}
  if s["backbone"] != "vgg16":
    return {"reason": "torchvision twins are built for VGG16 only (full setting)"}
  dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
  amp = dev.type == "cuda"
  torch.manual_seed(0)
  from experiments import torch_twins
  c = s["num_classes"]
  vgg = torchvision.models.vgg16(weights=None).to(dev).eval()   # R-CNN: the whole network
  parts = torch_twins.vgg16_parts(torch, torchvision, c, dev)   # Fast / Faster R-CNN
  conv5, fc, cls, bbox = (parts[k].eval() for k in ("conv5", "fc", "cls", "bbox"))
  h, w = s["image"]
  image = torch.as_tensor(np.asarray(batch["image"][0]), device=dev).permute(2, 0, 1)
  image = image.float().div(255.0)[None]                      # [1, 3, H, W]
  props = torch.as_tensor(np.asarray(batch["proposals"][0]), device=dev)
  rois = torch.cat([torch.zeros(len(props), 1, device=dev), props], dim=1)
  size, ctx = s["rcnn_input"], s["rcnn_context"]

  def warp_boxes():
    # R-CNN's context padding: dilate each box so that `ctx` pixels of the warped region
    # surround it (jaxdet.ops.crop_resize does the same with its `context`).
    scale = size / (size - 2 * ctx)
    cx, cy = (rois[:, 1] + rois[:, 3]) / 2, (rois[:, 2] + rois[:, 4]) / 2
    bw, bh = (rois[:, 3] - rois[:, 1]) * scale, (rois[:, 4] - rois[:, 2]) * scale
    return torch.stack([rois[:, 0], cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], 1)

  dilated = warp_boxes()

  def rcnn():
    outs = []
    for i in range(0, len(dilated), s["rcnn_chunk"]):
      warped = roi_align(image, dilated[i:i + s["rcnn_chunk"]], (size, size), 1.0, 2, True)
      f = vgg.avgpool(vgg.features(warped))
      outs.append(cls(fc(torch.flatten(f, 1))))
    return torch.cat(outs)

  def fast():
    f = conv5(image)
    pooled = roi_pool(f, rois, (7, 7), 1.0 / 16)
    hidden = fc(torch.flatten(pooled, 1))
    return cls(hidden), bbox(hidden)

  faster = torch_twins.faster_rcnn(
      torch, torchvision, parts, num_classes=c, image_hw=(h, w),
      anchor_scales=s["anchor_scales"], rpn_pre_test=s["rpn_pre"], rpn_post_test=s["rpn_post"],
      device=dev).eval()

  def timed(fn) -> float:
    def call():
      with torch.inference_mode(), torch.autocast(dev.type, torch.bfloat16, enabled=amp):
        return fn()
    return benchlib.time_torch(torch, call, (), repeats).median_s

  return {"device": str(dev), "dtype": "bfloat16 autocast" if amp else "float32",
          "torch": torch.__version__, "torchvision": torchvision.__version__,
          "rcnn": timed(rcnn), "fast_rcnn": timed(fast),
          "faster_rcnn": timed(lambda: faster([image[0]])), "reason": ""}


# ----------------------------------------------------------------------------- run


def _safe(name: str, fn: Callable[[], Any]) -> Any:
  """fn(), or {"not_available": reason} when the system's module is not there yet or fails
  (the traceback goes to stderr; the other rows are still measured)."""
  try:
    return fn()
  except ModuleNotFoundError as e:
    if e.name and e.name.startswith("jaxdet.models"):
      return {"not_available": f"{e.name} does not exist yet"}
    raise
  except Exception as e:   # noqa: BLE001  (one broken system must not stop the table)
    traceback.print_exc()
    return {"not_available": f"{name} failed: {type(e).__name__}: "
                             f"{str(e).splitlines()[0][:160]}"}


def run(size: str = "full", repeats: int | None = None, seed: int = 0) -> dict[str, Any]:
  """Times every row of the setting; returns the figures (`format_table` prints them)."""
  s = SETTINGS[size]
  repeats = repeats or s["repeats"]
  batch = test_batch(s, seed)
  device = jax.devices()[0]
  peak = benchlib.peak_flops(device, "bfloat16")
  ss = selective_search_seconds(np.asarray(batch["image"][0]), 3 if size == "full" else 1)
  measured: dict[str, Any] = {"rcnn": _safe("rcnn", lambda: _rcnn(s, batch, repeats))}
  fast = _safe("fast_rcnn", lambda: _fast_rcnn(s, batch, repeats))
  if isinstance(fast, dict):
    measured["fast_rcnn"] = measured["fast_rcnn_svd"] = fast
  else:
    measured["fast_rcnn"], measured["fast_rcnn_svd"] = fast
  measured["faster_rcnn"] = _safe("faster_rcnn", lambda: _faster_rcnn(s, batch, repeats))
  measured["yolo"] = _safe("yolo", lambda: _yolo(s, repeats))
  torch_times = torchvision_rows(s, batch, repeats)
  rows = []
  for key, title in ROWS:
    m = dict(measured[key])
    row = {"system": key, "detector": title, **m}
    if "not_available" in m:
      rows.append(row)
      continue
    uses_ss = key in ("rcnn", "fast_rcnn", "fast_rcnn_svd")
    ss_s = ss["s_per_image"] if uses_ss else 0.0
    row["proposal_s"] = ss_s
    row["test_with_proposals_s"] = None if ss_s is None else m["test_s"] + ss_s
    if m.get("flops"):
      row["gflops_per_image"] = m["flops"] / 1e9
      row["tflops_per_s"] = m["flops"] / m["test_s"] / 1e12
      row["fraction_of_peak"] = m["flops"] / m["test_s"] / peak if peak else None
    twin = torch_times.get(key)   # no twin for the SVD variant nor YOLO
    if twin is not None:
      row["torchvision_s"] = twin
      row["jaxdet_over_torchvision"] = m["test_s"] / twin
    row["paper"] = PAPER.get(key)
    rows.append(row)
  ref = next((r for r in rows if r["system"] == "rcnn" and "test_s" in r), None)
  for row in rows:
    if ref is None or "test_s" not in row:
      continue
    row["speedup"] = ref["test_s"] / row["test_s"]
    if ref.get("test_with_proposals_s") and row.get("test_with_proposals_s"):
      row["speedup_with_proposals"] = ref["test_with_proposals_s"] / row["test_with_proposals_s"]
  return {"setting": size, "image": list(s["image"]), "backbone": s["backbone"],
          "proposals": s["proposals"], "dtype": s["dtype"], "repeats": repeats,
          "device": benchlib.device_name(device),
          "peak_bf16_tflops": peak / 1e12 if peak else None, **benchlib.versions(),
          "selective_search": ss,
          "torchvision": torch_times, "rows": rows}


def _fmt(v: Any, fmt: str, suffix: str = "") -> str:
  return "-" if v is None else format(v, fmt) + suffix


def _s(v: float | None) -> str:
  if v is None:
    return "-"
  return f"{v * 1e3:.1f} ms" if v < 1 else f"{v:.2f} s"


COLUMNS = ("detector", "test/img excl. proposals", "test/img incl. proposals",
           "speedup (excl. / incl.)", "paper K40 (excl. / incl.; speedup)", "GFLOPs/img",
           "of bf16 peak", "torchvision", "jaxdet / torchvision")


def format_table(result: dict[str, Any]) -> str:
  """The lecture's table as markdown, the papers' K40 numbers beside ours."""
  ss = result["selective_search"]
  head = (f"{result['backbone']} {result['image'][0]}x{result['image'][1]}, "
          f"{result['proposals']} proposals, {result['dtype']} on {result['device']}; "
          f"selective search on this CPU: "
          + (f"{ss['s_per_image']:.2f} s/img" if ss.get("s_per_image") is not None
             else f"not timed ({ss['reason']})")
          + "; torchvision: " + (f"{result['torchvision'].get('device')} "
                                 f"{result['torchvision'].get('dtype')}"
                                 if not result["torchvision"].get("reason")
                                 else result["torchvision"]["reason"]))
  lines = [head, "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
  for r in result["rows"]:
    if "not_available" in r:
      cells = [r["detector"], f"not available: {r['not_available']}"]
      cells += [""] * (len(COLUMNS) - len(cells))
    else:
      p = r.get("paper")
      paper = "-" if not p else (f"{_s(p['test_s'])} / {_s(p['test_with_proposals_s'])}; "
                                 f"{_fmt(p['speedup'], '.0f', 'x')} / "
                                 f"{_fmt(p['speedup_with_proposals'], '.0f', 'x')}")
      cells = [r["detector"], _s(r["test_s"]), _s(r.get("test_with_proposals_s")),
               f"{_fmt(r.get('speedup'), '.1f', 'x')} / "
               f"{_fmt(r.get('speedup_with_proposals'), '.1f', 'x')}", paper,
               _fmt(r.get("gflops_per_image"), ".1f"),
               _fmt(None if r.get("fraction_of_peak") is None else 100 * r["fraction_of_peak"],
                    ".1f", "%"),
               _s(r.get("torchvision_s")), _fmt(r.get("jaxdet_over_torchvision"), ".2f")]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def plot(result: dict[str, Any], path: str) -> str:
  """Bars of test time per image (log scale), jaxdet excl./incl. proposals and torchvision."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  rows = [r for r in result["rows"] if "test_s" in r]
  x = np.arange(len(rows))
  fig, ax = plt.subplots(figsize=(8, 4))
  series = (("test_s", "jaxdet excl. proposals"), ("test_with_proposals_s", "jaxdet incl. proposals"),
            ("torchvision_s", "torchvision excl. proposals"))
  for i, (key, label) in enumerate(series):
    ax.bar(x + (i - 1) * 0.27, [r.get(key) or 0.0 for r in rows], 0.27, label=label)
  ax.set_xticks(x, [r["detector"] for r in rows], rotation=15)
  ax.set_yscale("log")
  ax.set_ylabel("test seconds per image")
  ax.set_title(f"{result['backbone']} {result['image'][0]}x{result['image'][1]} on "
               f"{result['device']}")
  ax.legend(fontsize=8)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def main(argv: list[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--small", action="store_true", help="a quick CPU run (tiny backbone)")
  parser.add_argument("--out", default="out/bench_speedups", help="JSON and chart go here")
  parser.add_argument("--repeats", type=int, default=None, help="timed calls per row")
  args = parser.parse_args(argv)
  result = run("small" if args.small else "full", args.repeats)
  table = format_table(result)
  print(table)
  os.makedirs(args.out, exist_ok=True)
  files.write_json(os.path.join(args.out, "bench_speedups.json"), result)
  with open(os.path.join(args.out, "bench_speedups.md"), "w") as f:
    f.write(table + "\n")
  plot(result, os.path.join(args.out, "speedups.png"))
  return result


if __name__ == "__main__":
  main(sys.argv[1:])
