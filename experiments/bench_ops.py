"""Times jaxdet's ops (box IoU, NMS, RoI pool, RoI align) against torchvision's on the same inputs.

  python -m experiments.bench_ops [--small | --tiny] [--only iou,nms,roi] [--repeats R]
                                 [--out FILE.json]

Compile time is excluded from the op times (a warm-up call, `jax.block_until_ready`, the median
of R repeats) and reported in its own column. Where torch and torchvision import, torchvision.ops
runs on the same inputs in the same process (on CUDA when available, synchronised around each
call), the table gives the jaxdet/torchvision time ratio, and the outputs are compared: NMS must
pick exactly the same boxes, IoU and RoI outputs must agree to a tolerance.

Sizes (full): NMS over 6000 and 20000 RPN-like overlapping boxes in a 600x1000 image (threshold
0.7, every survivor returned, as torchvision does; and the Faster R-CNN training setting of 2000
outputs); RoI pool / align of 8 images x 2000 RoIs from a 38x63x512 feature map (VGG16 conv5 of a
600x1000 image, spatial scale 1/16) to 7x7, float32 and bfloat16. `--small` shrinks everything
for a quick CPU run, `--tiny` is for the smoke test.
"""

from __future__ import annotations

import argparse
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from experiments.benchlib import machine_info, time_jax, time_torch
from jaxdet import files
from jaxdet.ops.boxes import box_iou
from jaxdet.ops.nms import nms

IMAGE_HW = (600, 1000)
SPATIAL_SCALE = 1.0 / 16
NMS_THRESHOLD = 0.7

SIZES = {
    "full": dict(iou=[(20000, 100), (2000, 2000)], nms=[(6000, None), (20000, None),
                                                        (20000, 2000)],
                 images=8, rois=2000, channels=512, feature_hw=(38, 63), output=7, repeats=5),
    "small": dict(iou=[(2000, 100)], nms=[(1000, None), (3000, None), (3000, 300)],
                  images=2, rois=256, channels=64, feature_hw=(38, 63), output=7, repeats=3),
    "tiny": dict(iou=[(50, 10)], nms=[(100, None), (100, 20)], images=2, rois=8, channels=4,
                 feature_hw=(10, 12), output=3, repeats=1),
}


# --- inputs -------------------------------------------------------------------------------------

def rpn_like_boxes(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
  """f32[n, 4] proposals crowding around a few objects (jittered copies, 20% background) and
  f32[n] scores, in a 600x1000 image: the heavy overlap NMS meets after an RPN."""
  h, w = IMAGE_HW
  k = 40
  centre = rng.uniform([0.1 * w, 0.1 * h], [0.9 * w, 0.9 * h], (k, 2))
  size = np.exp(rng.uniform(np.log(24), np.log(400), (k, 2)))
  which = rng.integers(0, k, n)
  c = centre[which] + rng.normal(0, 0.15, (n, 2)) * size[which]
  s = size[which] * np.exp(rng.normal(0, 0.2, (n, 2)))
  background = rng.random(n) < 0.2
  c[background] = rng.uniform([0, 0], [w, h], (background.sum(), 2))
  s[background] = np.exp(rng.uniform(np.log(16), np.log(300), (background.sum(), 2)))
  boxes = np.concatenate([c - s / 2, c + s / 2], axis=1)
  boxes = np.clip(boxes, 0, [w, h, w, h]).astype(np.float32)
  # Distinct scores: torchvision's sort is not stable, so ties could reorder its picks.
  scores = ((rng.permutation(n) + 0.5) / n).astype(np.float32)
  return boxes, scores


def random_rois(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
  """f32[..., 4] RoIs in the 600x1000 image, 16 to 500 pixels a side."""
  h, w = IMAGE_HW
  wh = np.exp(rng.uniform(np.log(16), np.log(500), shape + (2,)))
  xy = rng.uniform(0, 1, shape + (2,)) * (np.array([w, h]) - wh)
  return np.concatenate([xy, xy + wh], axis=-1).astype(np.float32)


# --- timing -------------------------------------------------------------------------------------

def timed_jax(row: dict[str, Any], fn: Callable, args: tuple, repeats: int) -> Any:
  """Times fn(*args) on device-placed args into row: "jax_s" the median seconds per call,
  "compile_s" the first call's seconds minus the median; returns the output."""
  t = time_jax(fn, jax.device_put(args), repeats)
  row["jax_s"], row["compile_s"] = t.median_s, max(t.first_s - t.median_s, 0.0)
  return t.out


def timed_torch(row: dict[str, Any], torch: Any, fn: Callable, args: tuple, repeats: int) -> Any:
  """Times fn(*args) under torch.no_grad into row["torch_s"] (median seconds per call, CUDA
  synchronised around every call); returns the output."""
  with torch.no_grad():
    t = time_torch(torch, fn, args, repeats)
  row["torch_s"] = t.median_s
  return t.out


# --- torchvision --------------------------------------------------------------------------------

def import_torchvision() -> tuple[Any, Any]:
  try:
    import torch           # pylint: disable=import-outside-toplevel
    import torchvision     # pylint: disable=import-outside-toplevel
  except ImportError:
    return None, None
  return torch, torchvision


# --- the benchmarks -----------------------------------------------------------------------------

def bench_iou(rng, sizes, repeats, torch, tv, device):
  rows = []
  for n, m in sizes["iou"]:
    a = random_rois(rng, (n,))
    b = random_rois(rng, (m,))
    row = dict(op="box_iou", size=f"{n}x{m}", dtype="float32")
    out = timed_jax(row, jax.jit(box_iou), (a, b), repeats)
    if tv is not None:
      ta, tb = torch.from_numpy(a).to(device), torch.from_numpy(b).to(device)
      ref = timed_torch(row, torch, tv.ops.box_iou, (ta, tb), repeats)
      err = float(np.max(np.abs(np.asarray(out) - ref.cpu().numpy())))
      row["agree"] = f"max|diff| {err:.1e}"
      row["ok"] = err < 1e-5
    rows.append(row)
  return rows


def bench_nms(rng, sizes, repeats, torch, tv, device):
  rows = []
  for n, max_output in sizes["nms"]:
    boxes, scores = rpn_like_boxes(rng, n)
    k = n if max_output is None else max_output
    fn = jax.jit(functools.partial(nms, iou_threshold=NMS_THRESHOLD, max_output=k))
    row = dict(op="nms", size=f"{n} boxes -> {'all' if max_output is None else k}",
               dtype="float32")
    idx, valid = timed_jax(row, fn, (boxes, scores), repeats)
    picks = np.asarray(idx)[np.asarray(valid)]
    row["picked"] = int(len(picks))
    if tv is not None:
      tb, ts = torch.from_numpy(boxes).to(device), torch.from_numpy(scores).to(device)
      tv_nms = functools.partial(tv.ops.nms, iou_threshold=NMS_THRESHOLD)
      keep = timed_torch(row, torch, tv_nms, (tb, ts), repeats)
      keep = keep.cpu().numpy()[:k]
      same = len(keep) == len(picks) and bool(np.all(keep == picks))
      row["agree"] = "same picks" if same else (
          f"DIFFERENT: {len(picks)} vs {len(keep)} picks, first difference at "
          f"{int(np.argmax(np.resize(keep, len(picks)) != picks))}")
      row["ok"] = same
    rows.append(row)
  return rows


def bench_roi(rng, sizes, repeats, torch, tv, device):
  try:
    from jaxdet.ops.roi_pool import roi_align, roi_pool   # pylint: disable=import-outside-toplevel
  except ImportError as e:
    print(f"(roi_pool/roi_align skipped: {e})")
    return []
  b, r, c, o = sizes["images"], sizes["rois"], sizes["channels"], sizes["output"]
  fh, fw = sizes["feature_hw"]
  features = rng.standard_normal((b, fh, fw, c)).astype(np.float32)
  rois = random_rois(rng, (b, r))
  cases = [
      ("roi_pool", {}, functools.partial(roi_pool, output_size=o, spatial_scale=SPATIAL_SCALE)),
      ("roi_align", dict(sampling_ratio=2),
       functools.partial(roi_align, output_size=o, spatial_scale=SPATIAL_SCALE,
                         sampling_ratio=2)),
      ("roi_align", dict(sampling_ratio=-1),
       functools.partial(roi_align, output_size=o, spatial_scale=SPATIAL_SCALE,
                         sampling_ratio=-1)),
  ]
  if tv is not None:
    t_rois = torch.from_numpy(np.concatenate(
        [np.repeat(np.arange(b, dtype=np.float32), r)[:, None], rois.reshape(b * r, 4)], 1))
    t_rois = t_rois.to(device)
    t_feat32 = torch.from_numpy(features.transpose(0, 3, 1, 2).copy()).to(device)
  rows = []
  for name, extra, op in cases:
    reference = None
    for dtype in ("float32", "bfloat16"):
      if extra.get("sampling_ratio") == -1 and dtype == "bfloat16":
        continue
      row = dict(op=name + "".join(f" sr={v}" for v in extra.values()),
                 size=f"{b}x{r} rois {o}x{o}, {fh}x{fw}x{c}", dtype=dtype)
      feats = jnp.asarray(features, getattr(jnp, dtype))
      fn = jax.jit(jax.vmap(op))
      out = timed_jax(row, fn, (feats, rois), repeats)
      out = np.asarray(out.astype(jnp.float32)).reshape(b * r, o, o, c).transpose(0, 3, 1, 2)
      if tv is not None:
        t_op = getattr(tv.ops, name)
        call = functools.partial(t_op, output_size=(o, o), spatial_scale=SPATIAL_SCALE, **extra)
        t_feat = t_feat32.to(getattr(torch, dtype))
        try:
          t_out = timed_torch(row, torch, call, (t_feat, t_rois.to(t_feat.dtype)), repeats)
        except (RuntimeError, NotImplementedError) as e:      # e.g. a dtype the kernel does not support
          row["agree"] = f"torchvision: {str(e).splitlines()[0][:60]}"
          t_out = None
        if dtype == "float32" and t_out is not None:
          reference = t_out.float().cpu().numpy()
        if reference is not None:
          err = float(np.max(np.abs(out - reference)))
          tol = 1e-4 if dtype == "float32" else 0.1
          row["agree"] = f"max|diff| {err:.1e} vs tv f32" + ("" if err <= tol else " TOO LARGE")
          row["ok"] = err <= tol
      rows.append(row)
  return rows


# --- report -------------------------------------------------------------------------------------

def format_table(rows: list[dict[str, Any]]) -> str:
  head = ["op", "size", "dtype", "jaxdet ms", "compile s", "torchvision ms", "jax/tv", "agreement"]
  lines = []
  for r in rows:
    tv_ms = r.get("torch_s")
    lines.append([
        r["op"], r["size"], r["dtype"], f"{1e3 * r['jax_s']:.3f}", f"{r['compile_s']:.2f}",
        "-" if tv_ms is None else f"{1e3 * tv_ms:.3f}",
        "-" if tv_ms is None else f"{r['jax_s'] / tv_ms:.2f}",
        r.get("agree", "-") + (f" ({r['picked']} picked)" if "picked" in r else "")])
  widths = [max(len(h), *(len(l[i]) for l in lines)) for i, h in enumerate(head)]
  fmt = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"
  out = [fmt(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
  return "\n".join(out + [fmt(l) for l in lines])


BENCHES = {"iou": bench_iou, "nms": bench_nms, "roi": bench_roi}


def run(size: str = "full", repeats: int | None = None, seed: int = 0,
        only: tuple[str, ...] = tuple(BENCHES), verbose: bool = False) -> dict[str, Any]:
  """Runs the benchmarks named in `only`; returns {"info": {...}, "size": size, "rows": [...]}."""
  sizes = SIZES[size]
  repeats = repeats or sizes["repeats"]
  torch, tv = import_torchvision()
  device = None
  if torch is not None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
  rng = np.random.default_rng(seed)
  rows = []
  for name in only:
    new = BENCHES[name](rng, sizes, repeats, torch, tv, device)
    if verbose:
      for row in new:
        print(f"  measured {row['op']} {row['size']} {row['dtype']}", flush=True)
    rows += new
  return {"info": machine_info(torch, tv), "size": size, "repeats": repeats, "rows": rows}


def main(argv: list[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  group = parser.add_mutually_exclusive_group()
  group.add_argument("--small", action="store_true", help="smaller sizes, a quick CPU run")
  group.add_argument("--tiny", action="store_true", help="toy sizes, for the smoke test")
  parser.add_argument("--repeats", type=int, default=None, help="timed calls per op")
  parser.add_argument("--out", default=None, help="also write the results to this JSON file")
  parser.add_argument("--only", default=",".join(BENCHES),
                      help=f"comma-separated subset of {','.join(BENCHES)}")
  args = parser.parse_args(argv)
  size = "tiny" if args.tiny else "small" if args.small else "full"
  only = tuple(args.only.split(","))
  unknown = set(only) - set(BENCHES)
  if unknown:
    parser.error(f"--only: unknown benchmark(s) {sorted(unknown)}, expected some of "
                 f"{sorted(BENCHES)}")
  result = run(size, args.repeats, only=only, verbose=True)
  for key, value in result["info"].items():
    print(f"{key}: {value}")
  print(f"sizes: {size}, median of {result['repeats']} repeats, compile time excluded\n")
  print(format_table(result["rows"]))
  if args.out:
    files.write_json(args.out, result)
  bad = [r["op"] + " " + r["size"] for r in result["rows"] if r.get("ok") is False]
  if bad:
    print("\nOUTPUTS DISAGREE:", "; ".join(bad))
  return result


if __name__ == "__main__":
  main()
