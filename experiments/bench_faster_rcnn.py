"""Faster R-CNN speed: test time per image (conv / proposals / region-wise), inference and
training images/s, against torchvision's FasterRCNN assembled the same way when torch imports.

  python -m experiments.bench_faster_rcnn [--small] [--batch 4] [--train-batch 2]
      [--repeats R] [--no-torch] [--out FILE.json]

Full (default, for a GPU): the paper's set-up: VGG16 (conv1_1 .. conv5_3 at stride 16, fc6 and
fc7 4096), 600 x 1000 images, anchors 128, 256, 512 x ratios 0.5, 1, 2, RPN 6000 -> NMS 0.7 ->
300 proposals at test (12000 -> 2000 in training, 256 anchors and 128 RoIs per image sampled),
RoI max pooling 7 x 7, 21 classes, bfloat16 compute (float32 box math and parameters).
`--small`: the cpu preset (tiny backbone, 128 x 128, 100 proposals), float32.

What is timed (medians of R synchronised calls, compilation excluded and reported):
  conv:        normalisation and the backbone conv layers;
  proposals:   the RPN head and the proposal layer (decode, clip, min size, top-k, NMS, top-k);
  region-wise: RoI pooling, fc6/fc7, both heads, decoding, per-class NMS (0.3) to 100
               detections;
each part jitted on its own (batch 1), plus the whole `predict` in one program (batch 1 = the
test time per image, and batch `--batch` for images/s) and one optimizer step of approximate
joint training (SGD momentum, batch `--train-batch`) for training images/s.
Paper (K40, VGG16): 198 ms per image = 141 conv + 10 proposals + 47 region-wise.

torchvision: `torchvision.models.detection.FasterRCNN` with the same VGG16 conv part
(features[:-1]), AnchorGenerator(((128, 256, 512),), ((0.5, 1, 2),)), rpn_pre/post_nms_top_n
6000/300 test and 12000/2000 train, RoIPool(7, 1/16), a two-layer 4096 fc head and 21 classes,
min_size 600 / max_size 1000 (its own normalisation and resize are part of its time),
bfloat16 by torch.autocast. Random weights on both sides (speed does not depend on them,
except through the number of boxes NMS keeps: both keep their fixed caps in practice).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from typing import Any

import jax
import numpy as np

from experiments import benchlib
from jaxdet import files
from jaxdet.models import faster_rcnn
from jaxdet.train import optim, state as state_lib, step as step_lib

SETTINGS = {
    "full": dict(backbone="vgg16", height=600, width=1000, classes=20, dtype="bfloat16",
                 repeats=20, batch=4, train_batch=2),
    "small": dict(backbone="tiny", height=128, width=128, classes=6, dtype="float32",
                  repeats=5, batch=8, train_batch=8),
}


def model_config(size: str, dtype: str) -> dict[str, Any]:
  """The experiment config the benchmark builds its System from."""
  from experiments.configs import faster_rcnn as cfg_lib
  config = cfg_lib.get_config("cpu" if size == "small" else "paper")
  model = config.model.to_dict()
  model["num_classes"] = SETTINGS[size]["classes"]
  if not model.get("pretrained") and not model.get("init_from"):
    model["frozen"] = ()   # random weights: nothing loaded to keep frozen (same cost)
  return {"model": model, "compute_dtype": dtype}


def random_batch(rng: np.random.Generator, b: int, h: int, w: int, c: int,
                 m: int = 8) -> dict[str, np.ndarray]:
  xy = rng.uniform(0, [w * 0.6, h * 0.6], size=(b, m, 2))
  wh = rng.uniform(0.1, 0.4, size=(b, m, 2)) * [w, h]
  boxes = np.concatenate([xy, xy + wh], -1).astype(np.float32)
  return {"image": rng.integers(0, 256, size=(b, h, w, 3), dtype=np.uint8),
          "image_size": np.tile(np.array([[h, w]], np.int32), (b, 1)),
          "boxes": boxes, "labels": rng.integers(0, c, size=(b, m)).astype(np.int32),
          "box_mask": np.ones((b, m), bool)}


def bench_jax(size: str, s: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
  system = faster_rcnn.build_system(model_config(size, s["dtype"]))
  h, w, c, repeats = s["height"], s["width"], s["classes"], s["repeats"]
  one = jax.device_put(random_batch(rng, 1, h, w, c))
  variables = system.init(jax.random.PRNGKey(0), one)
  ex = system.extras
  conv = jax.jit(ex.conv)
  propose = jax.jit(ex.propose)
  detect = jax.jit(ex.detect)
  feats = conv(variables, one)
  props = propose(variables, feats, one["image_size"])
  out: dict[str, Any] = {}
  for name, fn, args in (("conv", conv, (variables, one)),
                         ("proposals", propose, (variables, feats, one["image_size"])),
                         ("region", detect, (variables, feats, props, one["image_size"]))):
    out[f"{name}_ms"] = 1e3 * benchlib.time_jax(fn, args, repeats).median_s
  predict = jax.jit(system.predict)
  timing = benchlib.time_jax(predict, (variables, one), repeats)
  out["predict_ms_per_image"] = 1e3 * timing.median_s
  out["predict_compile_s"] = timing.first_s
  many = jax.device_put(random_batch(rng, s["batch"], h, w, c))
  out["infer_images_per_s"] = s["batch"] / benchlib.time_jax(predict, (variables, many),
                                                             repeats).median_s
  tx, _ = optim.make_optimizer({"name": "sgd", "learning_rate": 1e-3, "momentum": 0.9,
                                "weight_decay": 5e-4}, 1000, param_labels=system.param_labels)
  tb = jax.device_put(random_batch(rng, s["train_batch"], h, w, c))
  state, key = state_lib.create_train_state(system, tx, jax.random.PRNGKey(1), tb)
  step = jax.jit(lambda st, b, k: step_lib.train_step(st, b, k, loss_fn=system.loss))
  start = time.perf_counter()
  state, _ = jax.block_until_ready(step(state, tb, key))
  out["train_compile_s"] = time.perf_counter() - start
  times = []
  for _ in range(max(3, repeats // 2)):
    start = time.perf_counter()
    state, _ = jax.block_until_ready(step(state, tb, key))
    times.append(time.perf_counter() - start)
  out["train_images_per_s"] = s["train_batch"] / statistics.median(times)
  return out


def torch_model(s: dict[str, Any]):
  """torchvision's FasterRCNN with the same parts (experiments.torch_twins), or None where
  torch is missing."""
  try:
    import torch            # pylint: disable=import-outside-toplevel
    import torchvision      # pylint: disable=import-outside-toplevel
  except ImportError:
    return None
  from experiments import torch_twins
  device = "cuda" if torch.cuda.is_available() else "cpu"
  parts = torch_twins.vgg16_parts(torch, torchvision, s["classes"], device)
  model = torch_twins.faster_rcnn(
      torch, torchvision, parts, num_classes=s["classes"], image_hw=(s["height"], s["width"]),
      anchor_scales=(128, 256, 512), rpn_pre_test=6000, rpn_post_test=300, device=device)
  return model, device, torch


def bench_torch(s: dict[str, Any], rng: np.random.Generator) -> dict[str, Any] | None:
  if s["backbone"] != "vgg16":
    return {"skipped": "the tiny backbone has no torchvision counterpart"}
  made = torch_model(s)
  if made is None:
    return None
  model, device, torch = made
  h, w, c = s["height"], s["width"], s["classes"]
  bf16 = s["dtype"] == "bfloat16"
  autocast = (lambda: torch.autocast(device, dtype=torch.bfloat16)) if bf16 else (
      lambda: torch.autocast(device, enabled=False))

  def images(b):
    return [torch.rand(3, h, w, device=device) for _ in range(b)]

  def timed(fn, n):
    return benchlib.time_torch(torch, fn, (), n).median_s

  out = {}
  model.eval()
  with torch.no_grad(), autocast():
    x1, xb = images(1), images(s["batch"])
    out["predict_ms_per_image"] = 1e3 * timed(lambda: model(x1), s["repeats"])
    out["infer_images_per_s"] = s["batch"] / timed(lambda: model(xb), s["repeats"])
  model.train()
  opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)
  batch = random_batch(rng, s["train_batch"], h, w, c)
  xt = images(s["train_batch"])
  targets = [{"boxes": torch.from_numpy(batch["boxes"][i]).to(device),
              "labels": torch.from_numpy(batch["labels"][i] + 1).long().to(device)}
             for i in range(s["train_batch"])]

  def train_step():
    with autocast():
      loss = sum(model(xt, targets).values())
    opt.zero_grad()
    loss.backward()
    opt.step()

  out["train_images_per_s"] = s["train_batch"] / timed(train_step, max(3, s["repeats"] // 2))
  return out


def run(size: str = "full", *, batch: int | None = None, train_batch: int | None = None,
        repeats: int | None = None, use_torch: bool = True, seed: int = 0) -> dict[str, Any]:
  s = dict(SETTINGS[size])
  for key, value in (("batch", batch), ("train_batch", train_batch), ("repeats", repeats)):
    if value:
      s[key] = int(value)
  rng = np.random.default_rng(seed)
  result = {"setting": size, **s, "device": benchlib.device_kind(),
            "platform": platform.platform(), "jaxdet": bench_jax(size, s, rng)}
  result["torchvision"] = bench_torch(s, rng) if use_torch else None
  return result


def format_table(r: dict[str, Any]) -> str:
  j, t = r["jaxdet"], r["torchvision"]
  lines = [f"Faster R-CNN, {r['height']}x{r['width']}, {r['dtype']}, {r['device']}",
           f"  test time per image: {j['predict_ms_per_image']:.1f} ms (one program); parts "
           f"conv {j['conv_ms']:.1f} + proposals {j['proposals_ms']:.1f} + region-wise "
           f"{j['region_ms']:.1f} = "
           f"{j['conv_ms'] + j['proposals_ms'] + j['region_ms']:.1f} ms "
           f"(paper K40: 141 + 10 + 47 = 198)",
           f"  inference: {j['infer_images_per_s']:.2f} images/s at batch {r['batch']}",
           f"  training:  {j['train_images_per_s']:.2f} images/s at batch {r['train_batch']}",
           f"  compile: predict {j['predict_compile_s']:.1f} s, train step "
           f"{j['train_compile_s']:.1f} s"]
  if t is None:
    lines.append("  torchvision: not measured (torch does not import, or --no-torch)")
  elif "skipped" in t:
    lines.append(f"  torchvision: not measured ({t['skipped']})")
  else:
    lines += [f"  torchvision FasterRCNN: {t['predict_ms_per_image']:.1f} ms per image, "
              f"inference {t['infer_images_per_s']:.2f} images/s, training "
              f"{t['train_images_per_s']:.2f} images/s",
              f"  speed-up: inference x{j['infer_images_per_s'] / t['infer_images_per_s']:.2f},"
              f" training x{j['train_images_per_s'] / t['train_images_per_s']:.2f}"]
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--small", action="store_true", help="the cpu preset at 128 x 128")
  p.add_argument("--batch", type=int, default=0, help="inference batch for images/s")
  p.add_argument("--train-batch", type=int, default=0, help="training batch")
  p.add_argument("--repeats", type=int, default=0)
  p.add_argument("--no-torch", action="store_true")
  p.add_argument("--out", default="", help="write the figures as JSON here")
  args = p.parse_args(argv)
  result = run("small" if args.small else "full", batch=args.batch,
               train_batch=args.train_batch, repeats=args.repeats,
               use_torch=not args.no_torch)
  print(format_table(result))
  if args.out:
    files.write_json(args.out, result)
  return result


if __name__ == "__main__":
  main(sys.argv[1:])
