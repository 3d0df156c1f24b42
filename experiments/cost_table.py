r"""XLA's compiled cost of each paper-scale system's `predict` (batch 1) and train step beside
the papers' essential multiply-adds, the roofline time on an H100 and an H200, and where the
bytes of a train step go.

    python -m experiments.cost_table [--programs predict,train] [--only rcnn,fast_rcnn]
        [--out table.md] [--cache /tmp/jaxdet_cost]
    python -m experiments.cost_table --breakdown faster_rcnn [--out breakdown.md]

For each paper preset: `jax.jit(fn).lower(...).compile().cost_analysis()` (flops, bytes
accessed) at the preset's true shapes (VOC-sized mock data through the tfds path, as
experiments.check_presets; proposals are random boxes at the preset's capacity; only shapes
reach the compiler), compiled for this machine's backend, nothing run. Programs:

  predict: `System.predict` on one image.
  train: the step the training loop runs (jaxdet.train.loop.make_runner: the guarded train
    step under shard_map, state donated) on the preset's batch (config.train.batch_size), its
    state abstract (jax.eval_shape of init and of the optimizer's init).

Columns:
  essential: the papers' multiply-adds of the network (VGG16 conv at 600 x 1000, 183 G; its fc
    layers and heads, 0.120 G per RoI; the RPN at 37 x 62, 5.5 G; R-CNN's warped 224 px VGG16
    crop, 15.45 G; YOLO v1 at 448, 20 G). predict: the brief's figures for one image (R-CNN:
    2000 crops, 30.9 T; Fast R-CNN with 2000 RoIs, 423 G, 248 G with truncated SVD; Faster
    R-CNN with 300 RoIs, 225 G; YOLO, 20 G). train: 3 x the forward multiply-adds of the
    batch (the backward pass computes the gradients of activations and of weights, each as
    much work as the forward), at the training counts (R-CNN: 128 crops per step; Fast R-CNN
    64 RoIs and Faster R-CNN 128 RoIs per image; every parameter's gradient, as jaxdet
    computes them: frozen layers get set-to-zero updates but their gradient is computed).
  ratio: compiled flops / (2 x essential) (a multiply-add is 2 flops): ~1 when XLA's graph
    does the papers' work, more where jaxdet computes extra, less where a loop body is
    counted once.
  roofline: max(flops / 989e12, bytes / HBM bandwidth) seconds, dense bf16 peak of both the
    H100 SXM (3.35 TB/s) and the H200 (4.8 TB/s): a lower bound, not a measurement.

Loops: XLA's cost analysis counts a while-loop body once. The script reads the compiled HLO
and lists the while loops (with XLA's known trip counts) and whether any convolution or dot
sits in a body; R-CNN's predict chunks (a lax.map) are compiled as one chunk of all 2000
regions (model.chunk = 2000) so that none does. NMS, proposal selection and box merging are
while loops whose flops are negligible beside the networks' (counted once: a lower bound).

Bytes are the CPU compiler's count (per fused operation: operands read plus results written):
bfloat16 convolutions are upcast to float32 there, with layout copies, and max pooling's
gradient is lowered through index arrays; a GPU's fusion and cuDNN kernels differ.
`--breakdown SYSTEM` groups the train step's bytes by the part of the program each operation
comes from (the flax method and forward / backward, from XLA's op metadata).
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import os
import pathlib
import re
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from experiments import check_presets as cp

PEAK_FLOPS = 989e12    # dense bf16 FLOP/s, H100 SXM and H200
H100_BYTES = 3.35e12   # HBM bytes/s
H200_BYTES = 4.8e12

# Essential multiply-adds of the networks' parts (forward, one image / region / RoI).
VGG16_CONV = 183e9                                     # conv1_1..conv5_3 at 600 x 1000
VGG16_FC_PER_ROI = 25088 * 4096 + 4096 * 4096 + 4096 * (21 + 84)   # fc6, fc7, both heads
RPN = 37 * 62 * (9 * 512 * 512 + 512 * (18 + 36))      # 3x3 conv + 1x1 heads, 37 x 62 map
VGG16_224 = 30.9e12 / 2000                             # one warped 224 px crop
YOLO_448 = 20e9

# row name -> (config, overrides of config.model, essential multiply-adds, what it counts)
ROWS = {
    "rcnn": ("rcnn", {"chunk": 2000}, 30.9e12, "2000 warped 224 px crops through VGG16"),
    "fast_rcnn": ("fast_rcnn", {}, 423e9, "VGG16 conv at 600 x 1000 + fc on 2000 RoIs"),
    "fast_rcnn_svd": ("fast_rcnn", {}, 248e9, "the same, fc6/fc7 truncated SVD 1024 / 256"),
    "faster_rcnn": ("faster_rcnn", {}, 225e9, "VGG16 conv + RPN + fc on 300 RoIs"),
    "yolo": ("yolo", {}, 20e9, "24 conv + 2 fc at 448"),
    "vgg16_conv": ("fast_rcnn", {}, 183e9, "VGG16 conv1_1..conv5_3 at 600 x 1000"),
}

# train rows: name -> (config, overrides of config.model, essential multiply-adds of the step
# (3 x forward, the preset's batch), what it counts)
TRAIN_ROWS = {
    "rcnn": ("rcnn", {}, 3 * 128 * VGG16_224, "128 warped 224 px crops (2 images) through VGG16"),
    "fast_rcnn": ("fast_rcnn", {}, 3 * 2 * (VGG16_CONV + 64 * VGG16_FC_PER_ROI),
                  "2 images: VGG16 conv at 600 x 1000 + fc on 64 RoIs each"),
    "faster_rcnn": ("faster_rcnn", {}, 3 * 2 * (VGG16_CONV + RPN + 128 * VGG16_FC_PER_ROI),
                    "2 images: VGG16 conv + RPN + fc on 128 RoIs each"),
    "yolo": ("yolo", {}, 3 * 64 * YOLO_448, "64 images: 24 conv + 2 fc at 448"),
}
PROGRAMS = ("predict", "train")


def compiled_cost(fn, *args, jitted: bool = False) -> dict[str, Any]:
  """{"flops", "bytes", "compile_s", "hlo"} of `jax.jit(fn)` (or of `fn` itself when already
  jitted) compiled for these argument shapes (not run); "hlo": the optimized HLO text."""
  t = time.perf_counter()
  compiled = (fn if jitted else jax.jit(fn)).lower(*args).compile()
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):   # older jax: one dict per computation
    cost = cost[0]
  return {"flops": float(cost.get("flops", 0.0)),
          "bytes": float(cost.get("bytes accessed", 0.0)),
          "compile_s": time.perf_counter() - t, "hlo": compiled.as_text()}


def abstract(tree: Any) -> Any:
  """Every array leaf as a jax.ShapeDtypeStruct (what the compiler needs of it)."""
  return jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(np.shape(x), getattr(x, "dtype", np.asarray(x).dtype)),
      tree)


def roofline(flops: float, nbytes: float, bandwidth: float) -> float:
  """Seconds: max(flops / peak, bytes / bandwidth)."""
  return max(flops / PEAK_FLOPS, nbytes / bandwidth)


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
  return _result("predict", row, batch, essential, what, cost)


def _result(program: str, row: str, batch: dict[str, Any], essential: float, what: str,
            cost: dict[str, Any]) -> dict[str, Any]:
  """One table row: the cost, its ratio to the essential work, rooflines and loops."""
  loops = hlo_loops(cost["hlo"])
  return {"program": program, "row": row, "batch": int(batch["image"].shape[0]),
          "shape": tuple(int(s) for s in batch["image"].shape[1:3]), "what": what,
          "essential_macs": essential, "flops": cost["flops"], "bytes": cost["bytes"],
          "compile_s": cost["compile_s"], "ratio": cost["flops"] / (2 * essential),
          "h100_s": roofline(cost["flops"], cost["bytes"], H100_BYTES),
          "h200_s": roofline(cost["flops"], cost["bytes"], H200_BYTES),
          "loops": len(loops), "loop_trips": sorted({n for n, _ in loops if n}),
          "loops_with_matmuls": sum(m for _, m in loops)}


def train_cost(row: str, preset: str = "paper", batch_size: int | None = None,
               keep_hlo: bool = False) -> dict[str, Any]:
  """The compiled cost of one TRAIN_ROWS entry's train step (the loop's step, abstract state)
  at the preset's batch (or `batch_size`)."""
  from jaxdet.train import loop, setup
  from jaxdet.train.step import init_guard
  name, overrides, essential, what = TRAIN_ROWS[row]
  config = cp.load_config(name, preset)
  for k, v in overrides.items():
    config.model[k] = v
  system = setup.system_from_config(config)
  bs = int(batch_size or config.train.batch_size)
  batch = abstract(cp._model_batch(cp.preset_batch(config, train=True, batch_size=bs)))  # pylint: disable=protected-access
  state = cp.abstract_state(config, system, batch, batch_size=bs)
  runner = loop.make_runner(system, on_nonfinite=str(config.train.get("on_nonfinite", "stop")))
  cost = compiled_cost(runner.step, (state, abstract(init_guard())), batch,
                       jax.ShapeDtypeStruct((2,), jnp.uint32), jitted=True)
  if batch_size is not None and bs != int(config.train.batch_size):
    essential = essential * bs / int(config.train.batch_size)
  result = _result("train", row, batch, essential, what, cost)
  if keep_hlo:
    result["hlo"] = cost["hlo"]
  return result


# --- Reading the compiled HLO ----------------------------------------------------------------

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
                "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8}
_SHAPE = re.compile(r"\b(" + "|".join(_DTYPE_BYTES) + r")\[([0-9,]*)\]")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%(\S+) = (.*?) ([\w\-]+)\((.*)$")
_FREE = {"parameter", "constant", "tuple", "get-tuple-element", "bitcast", "call", "while",
         "conditional", "after-all", "partition-id", "replica-id"}


def shape_bytes(shape: str) -> int:
  """Bytes of an HLO shape string (a tuple's arrays summed): "f32[2,3]{1,0}" -> 24."""
  total = 0
  for dtype, dims in _SHAPE.findall(shape):
    total += _DTYPE_BYTES[dtype] * int(np.prod([int(d) for d in dims.split(",") if d]))
  return total


def parse_hlo(text: str) -> tuple[dict[str, list[tuple[str, str, str, str]]], str]:
  """({computation: [(name, shape, opcode, rest of the line)]}, entry computation name)."""
  comps, current, entry = {}, None, ""
  for line in text.splitlines():
    if line and not line[0].isspace() and line.rstrip().endswith("{"):
      m = re.match(r"^(ENTRY )?%(\S+)", line)
      if m:
        current = m.group(2)
        comps[current] = []
        entry = current if m.group(1) else entry
      continue
    m = _INSTRUCTION.match(line)
    if m and current is not None:
      comps[current].append(m.groups())
  return comps, entry


def _operands(opcode: str, rest: str) -> list[str]:
  args = rest.split("), kind=", 1)[0] if opcode == "fusion" else rest.split(")", 1)[0]
  return re.findall(r"%([\w.\-]+)", args)


def hlo_loops(text: str) -> list[tuple[int | None, bool]]:
  """The while loops of the compiled program: (XLA's known trip count or None, whether a
  convolution or dot runs in its body, fused or not)."""
  comps, _ = parse_hlo(text)

  def has_matmul(comp, seen):
    for _, _, opcode, rest in comps.get(comp, []):
      if opcode in ("convolution", "dot"):
        return True
      for called in re.findall(r"(?:calls|body|condition|to_apply)=%([\w.\-]+)", rest):
        if called not in seen and has_matmul(called, seen | {called}):
          return True
    return False

  loops = []
  for instructions in comps.values():
    for _, _, opcode, rest in instructions:
      if opcode == "while":
        body = re.search(r"body=%([\w.\-]+)", rest).group(1)
        trips = re.search(r'"known_trip_count":\{"n":"(\d+)"', rest)
        loops.append((int(trips.group(1)) if trips else None, has_matmul(body, {body})))
  return loops


def hlo_traffic(text: str) -> list[dict[str, Any]]:
  """Bytes each operation of the compiled program moves, as XLA's cost analysis counts them
  (operands read + results written, per fused operation; while bodies once per known trip):
  [{"name", "opcode", "shape", "bytes", "op_name"}]. op_name is XLA's metadata (the JAX
  primitive's name stack); an operation without one (layout copies, converts, index arrays
  the compiler made) takes its first named consumer's, else its first named operand's."""
  comps, entry = parse_hlo(text)
  out = []

  def meta(rest):
    m = re.search(r'op_name="([^"]*)"', rest)
    return m.group(1) if m else ""

  def walk(comp, trips):
    shapes = {name: shape for name, shape, _, _ in comps[comp]}
    rows, users = {}, collections.defaultdict(list)
    for name, shape, opcode, rest in comps[comp]:
      ops = _operands(opcode, rest)
      for o in ops:
        users[o].append(name)
      if opcode == "while":
        n = re.search(r'"known_trip_count":\{"n":"(\d+)"', rest)
        walk(re.search(r"body=%([\w.\-]+)", rest).group(1), trips * (int(n.group(1)) if n else 1))
      elif opcode in ("call", "conditional"):
        for called in re.findall(r"(?:to_apply|branch_computations=\{|calls)=?%([\w.\-]+)",
                                 rest):
          walk(called, trips)
      name_stack = meta(rest)
      if not name_stack and opcode == "fusion":   # the fused computation's own metadata
        called = re.search(r"calls=%([\w.\-]+)", rest)
        for instruction in reversed(comps.get(called.group(1), []) if called else []):
          name_stack = meta(instruction[3])
          if name_stack:
            break
      rows[name] = {"name": name, "opcode": opcode, "shape": shape, "op_name": name_stack,
                    "operands": ops, "free": opcode in _FREE,
                    "bytes": trips * (shape_bytes(shape)
                                      + sum(shape_bytes(shapes.get(o, "")) for o in ops))}
    # Names for the compiler's own copies, converts and index arrays: their consumers' first
    # (through tuples), then their operands'.
    for source in (lambda r: users[r["name"]], lambda r: r["operands"]):
      for _ in range(8):
        for r in rows.values():
          if not r["op_name"]:
            r["op_name"] = next((rows[n]["op_name"] for n in source(r)
                                 if n in rows and rows[n]["op_name"]), "")
    out.extend(r for r in rows.values() if not r["free"])

  walk(entry, 1)
  return out


_METHOD = re.compile(r"(transpose\()?jvp\((\w+)\.(\w+)\)")


def program_part(op_name: str) -> str:
  """The part of a train step an operation belongs to, from its name stack: "<flax method>
  forward|backward", "other forward/backward" (targets, proposals, NMS, sampling, losses),
  or "update" (optimizer, non-finite guard, gradient norm: parameter-sized)."""
  name = re.sub(r"^(jit\(\w+\)/)+", "", op_name)
  m = _METHOD.search(name)
  if m:
    return f"{m.group(3)} {'backward' if m.group(1) else 'forward'}"
  if name.startswith("transpose("):
    return "other backward"
  if "jvp(" in name:
    return "other forward"
  return "update (optimizer, guard, gradient norm)" if name else "unattributed"


def breakdown(text: str, num_images: int) -> list[dict[str, Any]]:
  """Bytes by program part, largest first: [{"part", "bytes", "per_image", "top": the
  three biggest operations "opcode shape primitive GB"}]."""
  parts = collections.defaultdict(list)
  for r in hlo_traffic(text):
    parts[program_part(r["op_name"])].append(r)
  rows = []
  for part, ops in parts.items():
    total = sum(r["bytes"] for r in ops)
    by_primitive = collections.Counter()
    for r in ops:
      by_primitive[r["op_name"].rsplit("/", 1)[-1] or r["opcode"]] += r["bytes"]
    rows.append({"part": part, "bytes": total, "per_image": total / num_images,
                 "top": [f"{k} {v / 1e9:.2f}" for k, v in by_primitive.most_common(3)]})
  return sorted(rows, key=lambda r: -r["bytes"])


def format_breakdown(rows: Sequence[dict[str, Any]], xla_bytes: float) -> str:
  total = sum(r["bytes"] for r in rows)
  lines = [f"Bytes counted here {total / 1e9:,.2f} GB (XLA's cost analysis: "
           f"{xla_bytes / 1e9:,.2f} GB).", "",
           "| part of the step | GB | GB per image | share | biggest primitives (GB) |",
           "|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['part']} | {r['bytes'] / 1e9:,.2f} | {r['per_image'] / 1e9:,.2f} | "
                 f"{100 * r['bytes'] / total:.0f}% | {', '.join(r['top'])} |")
  return "\n".join(lines)


def _loops_note(r: dict[str, Any]) -> str:
  if not r["loops"]:
    return "no loops"
  trips = f" (trips {', '.join(map(str, r['loop_trips']))})" if r["loop_trips"] else ""
  nets = (f", {r['loops_with_matmuls']} with a conv/dot in the body: counted once"
          if r["loops_with_matmuls"] else ", none with a conv/dot")
  return f"{r['loops']} while loops{trips}{nets}"


def format_table(results: Sequence[dict[str, Any]]) -> str:
  lines = ["| program | system | batch x image | essential MACs | compiled GFLOP | "
           "GB accessed | GB / image | compiled / (2 x essential) | H100 roofline ms / image | "
           "H200 roofline ms / image | counts | loops |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in results:
    b = r["batch"]
    lines.append(
        f"| {r['program']} | {r['row']} | {b} x {r['shape'][0]}x{r['shape'][1]} | "
        f"{r['essential_macs'] / 1e9:,.0f} G | {r['flops'] / 1e9:,.1f} | {r['bytes'] / 1e9:,.2f} "
        f"| {r['bytes'] / 1e9 / b:,.2f} | {r['ratio']:.2f} | {1e3 * r['h100_s'] / b:.3f} | "
        f"{1e3 * r['h200_s'] / b:.3f} | {r['what']} | {_loops_note(r)} |")
  return "\n".join(lines)


def code_fingerprint() -> str:
  """A hash of jaxdet's and the configs' sources and the jax version: cached costs are
  reused only for the code that produced them."""
  root = pathlib.Path(__file__).resolve().parent.parent
  h = hashlib.sha256(f"{jax.__version__} {jax.default_backend()}".encode())
  for path in sorted([*root.glob("jaxdet/**/*.py"), *root.glob("experiments/configs/*.py"),
                      pathlib.Path(__file__).resolve()]):
    h.update(path.read_bytes())
  return h.hexdigest()[:16]


def cached(cache_dir: str, key: str, compute) -> dict[str, Any]:
  """compute() once per key and code fingerprint; the result (JSON) and the HLO text (a
  file beside it) kept in cache_dir ("" for none)."""
  if not cache_dir:
    return compute()
  os.makedirs(cache_dir, exist_ok=True)
  stem = os.path.join(cache_dir, f"{key}-{code_fingerprint()}")
  if os.path.exists(stem + ".json"):
    with open(stem + ".json") as f:
      result = json.load(f)
    if os.path.exists(stem + ".hlo"):
      result["hlo"] = pathlib.Path(stem + ".hlo").read_text()
    result["cached"] = True
    return result
  result = compute()
  if "hlo" in result:
    pathlib.Path(stem + ".hlo").write_text(result["hlo"])
  with open(stem + ".json", "w") as f:
    json.dump({k: v for k, v in result.items() if k != "hlo"}, f)
  return result


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--programs", default="predict",
                      help=f"comma-separated, of {', '.join(PROGRAMS)}")
  parser.add_argument("--only", default="", help=f"comma-separated rows of {list(ROWS)} "
                      f"(predict) and {list(TRAIN_ROWS)} (train)")
  parser.add_argument("--breakdown", default="", help=f"a system of {list(TRAIN_ROWS)}: its "
                      f"train step's bytes by part of the program (instead of the table)")
  parser.add_argument("--preset", default="paper", help="config preset (paper; cpu for tests)")
  parser.add_argument("--batch", type=int, default=0, help="train batch (default: preset's)")
  parser.add_argument("--cache", default="/tmp/jaxdet_cost",
                      help="folder of compiled costs (per code version); '' for none")
  parser.add_argument("--out", default="", help="also write the markdown here")
  args = parser.parse_args(argv)
  programs = [p for p in args.programs.split(",") if p]
  if sorted(set(programs) - set(PROGRAMS)):
    raise SystemExit(f"--programs: expected some of {', '.join(PROGRAMS)}, got "
                     f"{args.programs!r}")
  if args.breakdown and args.breakdown not in TRAIN_ROWS:
    raise SystemExit(f"--breakdown: unknown system {args.breakdown!r}; known: "
                     f"{', '.join(TRAIN_ROWS)}")
  only = [r for r in args.only.split(",") if r]
  unknown = sorted(set(only) - set(ROWS) - set(TRAIN_ROWS))
  if unknown:
    raise SystemExit(f"--only: unknown rows {unknown}; known: "
                     f"{', '.join(dict.fromkeys([*ROWS, *TRAIN_ROWS]))}")
  print(f"jax {jax.__version__}, backend {jax.default_backend()}", flush=True)
  batch = args.batch or None
  tag = f"{args.preset}-b{args.batch}"
  results = []
  with cp.mock_tfds(num=max(8, 2 * (args.batch or 64))):
    if args.breakdown:
      r = cached(args.cache, f"train-{args.breakdown}-{tag}",
                 lambda: train_cost(args.breakdown, args.preset, batch, keep_hlo=True))
      text = format_breakdown(breakdown(r["hlo"], r["batch"]), r["bytes"])
      text = (f"{args.breakdown} train step, batch {r['batch']} x {r['shape'][0]}x"
              f"{r['shape'][1]}: {r['flops'] / 1e9:,.1f} GFLOP, {r['bytes'] / 1e9:,.2f} GB "
              f"accessed (XLA).\n" + text)
      results.append(r)
    else:
      for program in programs:
        names = [r for r in (only or (ROWS if program == "predict" else TRAIN_ROWS))
                 if r in (ROWS if program == "predict" else TRAIN_ROWS)]
        for row in names:
          if program == "predict":
            r = cached(args.cache, f"predict-{row}-{args.preset}",
                       lambda row=row: row_cost(row))
          else:
            r = cached(args.cache, f"train-{row}-{tag}",
                       lambda row=row: train_cost(row, args.preset, batch, keep_hlo=True))
          results.append(r)
          print(f"{program} {row}: {r['flops'] / 1e9:.1f} GFLOP, {r['bytes'] / 1e9:.2f} GB, "
                f"ratio {r['ratio']:.2f}, compile {r['compile_s']:.1f} s"
                f"{' (cached)' if r.get('cached') else ''}", flush=True)
      text = format_table(results)
  print(text)
  if args.out:
    from jaxdet import files
    files.atomic_write(args.out, lambda f: f.write((text + "\n").encode()))
  return results


if __name__ == "__main__":
  main()
