"""Fast R-CNN speed: test time per image (conv / RoI pool / fc breakdown, with and without
truncated SVD), the ratio to R-CNN in the same run, and train images/s against a
torchvision-composed Fast R-CNN of the same configuration when torch imports.

  python -m experiments.bench_fast_rcnn [--small] [--dtype bfloat16] [--proposals 2000]
      [--repeats R] [--train-steps N] [--out FILE.json]
  python -m experiments.bench_fast_rcnn --workdir /tmp/frcn \
      [--config experiments/configs/fast_rcnn.py:cpu] [--set KEY=VALUE ...]
      # VOC07 mAP of a trained run's checkpoint with and without truncated SVD

Full (default, for a GPU): VGG16 (conv5_3, stride 16), one 600 x 1000 image, 2000 proposals,
C = 20, bfloat16 compute, SVD ranks (1024, 256) for fc6, fc7, as in the paper's table 4.
`--small`: the cpu preset's network (experiments/configs/fast_rcnn.py:cpu: tiny backbone,
128 x 128, its selective-search capacity of proposals, C = 6, float32).

What is timed (each figure the median of R calls after a warm-up, synchronised with
`jax.block_until_ready`; parameters cast once to the compute dtype, as a deployed model):
  conv:  normalisation + the backbone's conv layers over the whole image;
  roi:   RoI max pooling of every proposal (`jaxdet.ops.roi_pool`);
  fc:    fc6, fc7 and the two sibling heads on every proposal (plain or SVD-factored);
  total: the System's jitted `predict`: all of the above, softmax, class-specific box decoding,
         per-class NMS 0.3 and the top 100 detections (one XLA program).
R-CNN in the same run: `jaxdet.models.rcnn`'s test path when that module exists is NOT assumed
(its API is another module's); the baseline here is R-CNN's test-time computation itself:
each proposal dilated by 16 pixels of context, warped to 224 x 224 (`jaxdet.ops.crop_resize`,
bilinear) and classified by the whole VGG16 (conv, pool5, fc6, fc7, a C + 1 linear layer
standing in for the SVMs), in chunks of `--rcnn-chunk` crops (`lax.map`); NMS and box
regression are left out (they favour R-CNN). Paper: 146x (213x with SVD) at test time.
Train images/s: the System's jitted train step (hierarchical sampling of 64 RoIs per image from
the proposals, the multi-task loss, SGD momentum), batches of 2 images; torchvision's version
(VGG16 features without pool5, `torchvision.ops.roi_pool` 7x7 at 1/16, fc6, fc7, the same heads,
cross-entropy + smooth L1, SGD momentum, bf16 autocast) gets its 2 x 64 RoIs pre-sampled, so its
figure excludes sampling.
"""

from __future__ import annotations

import argparse
import importlib.util
import platform
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments import benchlib
from jaxdet import files
from jaxdet.models import backbones, fast_rcnn
from jaxdet.ops.crop_resize import crop_and_resize
from jaxdet.train import state as state_lib
from jaxdet.train import step as step_lib


def _cast(tree: Any, dtype: Any) -> Any:
  return jax.tree_util.tree_map(
      lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def _random_boxes(rng: np.random.Generator, n: int, h: int, w: int, lo: float) -> np.ndarray:
  """n boxes f32[n, 4] inside the h x w image with sides in [lo, 0.6 * side] pixels."""
  size = np.asarray([w, h], np.float64)
  wh = rng.uniform(lo, 0.6 * size, (n, 2))
  xy = rng.uniform(0, 1, (n, 2)) * (size - wh)
  return np.concatenate([xy, xy + wh], 1).astype(np.float32)


def settings(small: bool, dtype: str, proposals: int | None) -> dict[str, Any]:
  if small:   # the network of experiments/configs/fast_rcnn.py:cpu
    from experiments.configs import fast_rcnn as fast_rcnn_config
    cpu = fast_rcnn_config.get_config("cpu")
    model = {"backbone": cpu.model.backbone, "backbone_kw": cpu.model.backbone_kw.to_dict(),
             "num_classes": int(cpu.num_classes), "svd_ranks": tuple(cpu.model.svd_ranks)}
    return {"model": model, "size": tuple(cpu.data.image_size),
            "proposals": proposals or int(cpu.data.proposals.max_proposals),
            "dtype": dtype or "float32", "crop": 64}
  model = {"backbone": "vgg16", "backbone_kw": {}, "num_classes": 20,
           "svd_ranks": (1024, 256)}
  return {"model": model, "size": (600, 1000), "proposals": proposals or 2000,
          "dtype": dtype or "bfloat16", "crop": 224}


def make_batch(rng: np.random.Generator, b: int, size: tuple[int, int], p: int, c: int,
               m: int = 8) -> dict[str, jax.Array]:
  h, w = size
  gt = np.stack([_random_boxes(rng, m, h, w, 0.1 * min(h, w)) for _ in range(b)])
  props = np.stack([_random_boxes(rng, p, h, w, 0.05 * min(h, w)) for _ in range(b)])
  # Half the proposals near the ground truth, as selective search's would be.
  k = p // 2
  near = gt[:, rng.integers(0, m, k)] + rng.normal(0, 0.05 * min(h, w), (b, k, 4))
  props[:, :k] = np.clip(np.sort(near.reshape(b, k, 2, 2), axis=2).reshape(b, k, 4), 0,
                         [w, h, w, h])
  return {"image": jnp.asarray(rng.integers(0, 256, (b, h, w, 3)), jnp.uint8),
          "image_size": jnp.asarray(np.tile([h, w], (b, 1)), jnp.int32),
          "boxes": jnp.asarray(gt), "labels": jnp.asarray(rng.integers(0, c, (b, m)), jnp.int32),
          "box_mask": jnp.ones((b, m), bool), "proposals": jnp.asarray(props),
          "proposal_mask": jnp.ones((b, p), bool)}


def bench_test(system, variables, batch, repeats: int, dtype) -> dict[str, float]:
  """Per-image seconds of the stages and of predict, for the given variables."""
  net = system.extras.network
  cls = type(net)
  conv = jax.jit(lambda v, im: net.apply(
      v, backbones.normalize_images(im, dtype), method=cls.features))
  pool = jax.jit(lambda v, f, p, m: net.apply(v, f, p, m, method=cls.pool))
  head = jax.jit(lambda v, x: system.extras.head(v, x.reshape(-1, *x.shape[2:])))
  predict = jax.jit(system.predict)
  feats = conv(variables, batch["image"])
  pooled = pool(variables, feats, batch["proposals"], batch["proposal_mask"])
  out = {}
  for name, fn in (("conv", lambda: conv(variables, batch["image"])),
                   ("roi", lambda: pool(variables, feats, batch["proposals"],
                                        batch["proposal_mask"])),
                   ("fc", lambda: head(variables, pooled)),
                   ("total", lambda: predict(variables, batch))):
    timing = benchlib.time_jax(fn, (), repeats)
    out[name] = timing.median_s
    out[f"{name}_first_call"] = timing.first_s
  return out


def bench_rcnn(parts, num_classes: int, batch, crop: int, chunk: int, repeats: int,
               dtype) -> dict[str, float]:
  """R-CNN's test-time computation on the same image and proposals (see module doc)."""
  clf = backbones.classifier(parts, num_classes + 1)
  v = clf.init(jax.random.key(0), jnp.zeros((1, crop, crop, 3), dtype))
  v = _cast(v, dtype)
  image, boxes = batch["image"][0], batch["proposals"][0]
  p = boxes.shape[0]
  chunk = min(chunk, p)
  pad = -p % chunk
  boxes = jnp.concatenate([boxes, jnp.zeros((pad, 4), boxes.dtype)])

  @jax.jit
  def forward(v, image, boxes):
    x = backbones.normalize_images(image[None], dtype)[0]
    def one(b):
      crops = crop_and_resize(x, b, (crop, crop), context=16.0, dtype=dtype)
      return jax.nn.softmax(clf.apply(v, crops).astype(jnp.float32), -1)
    return jax.lax.map(one, boxes.reshape(-1, chunk, 4)).reshape(-1, num_classes + 1)[:p]

  timing = benchlib.time_jax(forward, (v, image, boxes), repeats)
  return {"total": timing.median_s, "total_first_call": timing.first_s, "chunk": chunk}


def bench_train(system, batch, steps: int) -> dict[str, float]:
  tx = optax.sgd(1e-3, momentum=0.9)
  state, run_rng = state_lib.create_train_state(system, tx, jax.random.key(0), batch)
  step = jax.jit(step_lib.make_steps(system)[0], donate_argnums=0)
  t0 = time.perf_counter()
  state, metrics = step(state, batch, run_rng)
  jax.block_until_ready(metrics)
  first = time.perf_counter() - t0
  t0 = time.perf_counter()
  for _ in range(steps):
    state, metrics = step(state, batch, run_rng)
  jax.block_until_ready(metrics)
  dt = (time.perf_counter() - t0) / steps
  return {"step_s": dt, "images_per_s": batch["image"].shape[0] / dt, "first_call": first,
          "loss": float(metrics["loss"])}


def bench_torch(small: bool, batch, num_classes: int, steps: int) -> dict[str, Any]:
  """The same Fast R-CNN composed from torchvision (see module doc); None without torch."""
  try:
    import torch
    import torchvision
    from torchvision.ops import roi_pool
  except ImportError as e:
    return {"skipped": f"torch/torchvision not importable ({e})"}
  dev = "cuda" if torch.cuda.is_available() else "cpu"
  if small:
    return {"skipped": "the tiny backbone has no torchvision counterpart"}
  from experiments import torch_twins
  parts = torch_twins.vgg16_parts(torch, torchvision, num_classes, dev)
  model = torch.nn.ModuleDict({"features": parts["conv5"], "fc": parts["fc"],
                               "cls": parts["cls"], "box": parts["bbox"]}).to(dev)
  model = model.to(memory_format=torch.channels_last)
  opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)
  b = batch["image"].shape[0]
  rng = np.random.default_rng(0)
  images = torch.tensor(np.asarray(batch["image"]), device=dev).permute(0, 3, 1, 2).float()
  images = (images / 255.0).contiguous(memory_format=torch.channels_last)
  rois = []
  for i in range(b):
    idx = rng.choice(batch["proposals"].shape[1], 64, replace=False)
    r = torch.tensor(np.asarray(batch["proposals"][i])[idx], device=dev)
    rois.append(torch.cat([torch.full((64, 1), float(i), device=dev), r], 1))
  rois = torch.cat(rois)
  labels = torch.tensor(rng.integers(0, num_classes + 1, len(rois)), device=dev)
  targets = torch.randn(len(rois), 4, device=dev)

  def step():
    opt.zero_grad(set_to_none=True)
    with torch.autocast(dev, dtype=torch.bfloat16):
      f = model["features"](images)
      # float32, as torchvision's CUDA autocast rule for roi_pool does (its CPU kernel has no
      # bfloat16 and CPU autocast has no such rule)
      p = roi_pool(f.float(), rois, (7, 7), 1.0 / 16)
      h = model["fc"](p.flatten(1))
      logits, deltas = model["cls"](h), model["box"](h).view(-1, num_classes, 4)
    fg = labels > 0
    sel = deltas[fg, (labels[fg] - 1)].float()
    loss = (torch.nn.functional.cross_entropy(logits.float(), labels)
            + torch.nn.functional.smooth_l1_loss(sel, targets[fg], reduction="sum")
            / len(rois))
    loss.backward()
    opt.step()
    return loss

  def sync():
    if dev == "cuda":
      torch.cuda.synchronize()

  for _ in range(2):
    step()
  sync()
  t0 = time.perf_counter()
  for _ in range(steps):
    step()
  sync()
  dt = (time.perf_counter() - t0) / steps
  return {"step_s": dt, "images_per_s": b / dt, "device": dev, "torch": torch.__version__}


def _override(config: Any, assignment: str) -> None:
  """Sets "a.b.c=value" on a config (value: a Python literal, else the string)."""
  import ast
  key, sep, text = assignment.partition("=")
  if not sep:
    raise ValueError(f"--set: expected KEY=VALUE, got {assignment!r}")
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    value = text
  *path, leaf = key.split(".")
  node = config
  for part in path:
    node = node[part]
  node[leaf] = value


def svd_map(config_path: str, workdir: str, ranks: tuple[int, ...] | None = None,
            overrides: tuple[str, ...] = ()) -> dict[str, Any]:
  """VOC07 mAP@0.5 / COCO AP of a trained run's latest checkpoint on its config's eval split,
  with the plain fc layers and with their truncated SVD (the config's `svd_ranks`, or `ranks`).

  Args:
    config_path: "experiments/configs/fast_rcnn.py[:preset]" (the run's config).
    workdir: the run's --workdir.
    overrides: "key=value" settings the run was trained with (e.g. "model.init_from=/tmp/cls",
      "data.proposals.cache_root=/tmp/p").
  Returns:
    {"svd_ranks", "plain": scores, "svd": scores, "fc_params": (plain, factored)}.
  """
  from jaxdet.train import loop, setup
  from jaxdet.train.evaluate import evaluate_variables
  path, _, preset = config_path.partition(":")
  spec = importlib.util.spec_from_file_location("fast_rcnn_run_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(preset or "cpu")
  for assignment in overrides:
    _override(config, assignment)
  system = setup.system_from_config(config)
  make_loader = setup.default_make_loader()

  def loader():
    return make_loader(config.data, config.eval.split, batch_size=int(config.eval.batch_size),
                       seed=int(config.seed), train=False)

  variables = loop.restore_for_inference(config, workdir, system,
                                         setup.peek(loader())).variables
  ranks = tuple(config.model.svd_ranks) if ranks is None else tuple(ranks)
  factored = system.extras.truncated_svd(variables, ranks)
  count = lambda v: sum(int(np.size(a)) for a in jax.tree_util.tree_leaves(  # noqa: E731
      v["params"]["fc"]))
  out = {"svd_ranks": ranks, "fc_params": (count(variables), count(factored))}
  for name, v in (("plain", variables), ("svd", factored)):
    out[name] = evaluate_variables(system.predict, v, loader(), system.num_classes)
  return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--small", action="store_true")
  ap.add_argument("--dtype", default=None)
  ap.add_argument("--proposals", type=int, default=None)
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--train-steps", type=int, default=10)
  ap.add_argument("--rcnn-chunk", type=int, default=100)
  ap.add_argument("--no-train", action="store_true")
  ap.add_argument("--out", default="")
  ap.add_argument("--workdir", default="",
                  help="a trained run: score its checkpoint with and without truncated SVD "
                       "(--config) instead of timing")
  ap.add_argument("--config", default="experiments/configs/fast_rcnn.py:cpu")
  ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                  help="with --workdir: a config setting the run was trained with")
  ap.add_argument("--ranks", default="",
                  help="with --workdir: SVD ranks of fc6, fc7, e.g. 32,16 (default: the config's)")
  args = ap.parse_args(argv)
  if args.workdir:
    ranks = tuple(int(t) for t in args.ranks.split(",")) if args.ranks else None
    report = svd_map(args.config, args.workdir, ranks, overrides=tuple(args.set))
    for name in ("plain", "svd"):
      m = report[name]
      print(f"{name:6s} VOC07 mAP@0.5 {m['voc07_map']:.4f}  COCO AP {m['coco_AP']:.4f}  "
            f"({int(m['num_images'])} images)")
    print(f"svd ranks {report['svd_ranks']}: fc parameters {report['fc_params'][0]} -> "
          f"{report['fc_params'][1]}")
    if args.out:
      files.write_json(args.out, report)
    return report
  s = settings(args.small, args.dtype, args.proposals)
  dtype = jnp.dtype(s["dtype"])
  c = s["model"]["num_classes"]
  config = {"model": {**s["model"], "proposals": "batch"}, "compute_dtype": s["dtype"]}
  system = fast_rcnn.build_system(config)
  rng = np.random.default_rng(0)
  batch1 = make_batch(rng, 1, s["size"], s["proposals"], c)
  variables = system.init(jax.random.key(0), batch1)
  svd_vars = system.extras.truncated_svd(variables)
  plain, svd = _cast(variables, dtype), _cast(svd_vars, dtype)

  report: dict[str, Any] = {
      "device": benchlib.device_kind(), "platform": platform.platform(),
      "backbone": s["model"]["backbone"], "image": s["size"], "proposals": s["proposals"],
      "dtype": s["dtype"], "svd_ranks": s["model"]["svd_ranks"],
      "rcnn_module_present": importlib.util.find_spec("jaxdet.models.rcnn") is not None}
  report["fast_rcnn"] = bench_test(system, plain, batch1, args.repeats, dtype)
  report["fast_rcnn_svd"] = bench_test(system, svd, batch1, args.repeats, dtype)
  report["rcnn"] = bench_rcnn(system.extras.backbone, c, batch1, s["crop"], args.rcnn_chunk,
                              max(1, args.repeats // 2), dtype)
  r = report["rcnn"]["total"]
  report["speedup_vs_rcnn"] = r / report["fast_rcnn"]["total"]
  report["speedup_vs_rcnn_svd"] = r / report["fast_rcnn_svd"]["total"]
  if not args.no_train:
    batch2 = make_batch(rng, 2, s["size"], s["proposals"], c)
    report["train"] = bench_train(system, batch2, args.train_steps)
    report["train_torch"] = bench_torch(args.small, batch2, c, args.train_steps)
    if "images_per_s" in report["train_torch"]:
      report["train_ratio_vs_torch"] = (report["train"]["images_per_s"]
                                        / report["train_torch"]["images_per_s"])

  print(f"device {report['device']}, {s['model']['backbone']} {s['size']}, "
        f"{s['proposals']} proposals, {s['dtype']}")
  for key in ("fast_rcnn", "fast_rcnn_svd"):
    t = report[key]
    print(f"{key:14s} ms/image: conv {1e3 * t['conv']:8.2f}  roi {1e3 * t['roi']:8.2f}  "
          f"fc {1e3 * t['fc']:8.2f}  total (predict) {1e3 * t['total']:8.2f}")
  print(f"rcnn           ms/image: warp + CNN {1e3 * r:10.1f}")
  print(f"speedup vs R-CNN: {report['speedup_vs_rcnn']:.1f}x, "
        f"with SVD {report['speedup_vs_rcnn_svd']:.1f}x (paper: 146x, 213x)")
  if "train" in report:
    print(f"train: {report['train']['images_per_s']:.2f} images/s "
          f"(step {1e3 * report['train']['step_s']:.1f} ms); torchvision: "
          f"{report['train_torch']}")
  if args.out:
    files.write_json(args.out, report)
  return report


if __name__ == "__main__":
  main(sys.argv[1:])
