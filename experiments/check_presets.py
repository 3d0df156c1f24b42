r"""Every system's paper preset, run for real: config, tfds data path, loader, buckets, init,
one train step and one predict, at the preset's true shapes, on VOC-sized mock data.

    python -m experiments.check_presets                       # every paper preset, batch 1
    python -m experiments.check_presets --only yolo,fast_rcnn --steps 2 --batch 0

The data are VOC 2007 through jaxdet's tfds path (`jaxdet.data.tfds.TfdsDetection` decoding
tfds's VOC schema) with `tfds.data_source` replaced by a list of mock examples of the real
VOC image sizes (500 x 375 landscape, 333 x 500 portrait, 500 x 500, 1-20 objects), and the
classify preset's ImageNet through the same path (`imagenet2012`, mock images of ImageNet's
sizes). Selective search (R-CNN, Fast R-CNN) is replaced by random boxes at the preset's
capacity (2000), since the point is the network's cost, not the proposals'.

Printed per preset: the batch shape, the time of the first step (compilation included), the
time per later step, the time of the first predict (compilation included), and the peak
resident memory (resource.getrusage maxrss) of the process that ran it: each preset runs in a
process of its own. `--batch 0` uses the
preset's own batch size (YOLO: 64 images of 448 x 448); the default, 1, keeps a 2-core run
short. No GPU is needed; on an accelerator the same command measures it.

`trace(config)` is the cheap half (jax.eval_shape of init, train step and predict: no
compilation), used by tests/test_presets.py for every config x preset.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import importlib
import resource
import subprocess
import sys
import time
from typing import Any, Iterator, Sequence
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np

CONFIGS = ("classify", "localization", "windows", "overfeat", "rcnn", "fast_rcnn",
           "faster_rcnn", "yolo")
PRESETS = ("cpu", "paper")
# (height, width) of VOC 2007 images: most are 500 x 375 or 375 x 500 (333 x 500 too); a few
# are square or narrower.
VOC_SIZES = ((375, 500), (500, 333), (333, 500), (500, 375), (500, 500), (281, 500))
# ImageNet images vary; these are typical.
IMAGENET_SIZES = ((375, 500), (500, 333), (333, 500), (256, 256))


def voc_tfds_example(rng: np.random.Generator, height: int, width: int, index: int,
                     num_objects: int) -> dict[str, Any]:
  """One example in tfds's VOC schema (what `tfds.data_source("voc/2007")[i]` returns):
  random pixels, `num_objects` random boxes as normalised (ymin, xmin, ymax, xmax)."""
  y1 = rng.uniform(0, 0.8, num_objects)
  x1 = rng.uniform(0, 0.8, num_objects)
  y2 = np.minimum(y1 + rng.uniform(0.05, 0.6, num_objects), 1.0)
  x2 = np.minimum(x1 + rng.uniform(0.05, 0.6, num_objects), 1.0)
  labels = rng.integers(0, 20, num_objects)
  return {"image": rng.integers(0, 256, (height, width, 3), dtype=np.uint8),
          "image/filename": f"{index:06d}.jpg",
          "objects": {"bbox": np.stack([y1, x1, y2, x2], 1).astype(np.float32),
                      "label": labels.astype(np.int64),
                      "is_difficult": np.zeros(num_objects, bool),
                      "is_truncated": np.zeros(num_objects, bool),
                      "pose": np.zeros(num_objects, np.int64)},
          "labels": np.unique(labels).astype(np.int64),
          "labels_no_difficult": np.unique(labels).astype(np.int64)}


def imagenet_tfds_example(rng: np.random.Generator, height: int, width: int, index: int
                          ) -> dict[str, Any]:
  """One example in tfds's imagenet2012 schema: image, label, file name."""
  return {"image": rng.integers(0, 256, (height, width, 3), dtype=np.uint8),
          "label": np.int64(rng.integers(0, 1000)),
          "file_name": f"n01440764_{index}.JPEG"}


def mock_examples(tfds_name: str, num: int, seed: int = 0) -> list[dict[str, Any]]:
  """`num` mock examples of a tfds dataset ("voc/2007", "voc/2012" or "imagenet2012") at its
  real image sizes (cycling through VOC_SIZES / IMAGENET_SIZES), 1-20 objects for VOC."""
  rng = np.random.default_rng(seed)
  if tfds_name.startswith("imagenet"):
    return [imagenet_tfds_example(rng, *IMAGENET_SIZES[i % len(IMAGENET_SIZES)], i)
            for i in range(num)]
  if not tfds_name.startswith("voc"):
    raise ValueError(f"tfds_name: expected 'voc/...' or 'imagenet2012', got {tfds_name!r}")
  return [voc_tfds_example(rng, *VOC_SIZES[i % len(VOC_SIZES)], i,
                           int(rng.integers(1, 21))) for i in range(num)]


def random_proposals(source, data_config, split):
  """Stands in for `pipeline.attach_proposals`: `max_proposals` random boxes per image (the
  preset's capacity), so that a check needs no selective search."""
  from jaxdet.data import pipeline
  p = int(data_config["proposals"]["max_proposals"])
  rng = np.random.default_rng(1)
  boxes = np.zeros((len(source), p, 4), np.float32)
  for i in range(len(source)):
    h, w = source[i]["image"].shape[:2]
    xy = rng.uniform(0, 1, (p, 2)) * 0.8
    wh = rng.uniform(0.05, 0.5, (p, 2))
    boxes[i] = np.concatenate([xy, np.minimum(xy + wh, 1.0)], 1) * np.float32([w, h, w, h])
  return pipeline.ProposalSource(source, boxes, np.ones((len(source), p), bool))


@contextlib.contextmanager
def mock_tfds(num: int = 8, seed: int = 0) -> Iterator[None]:
  """Within: `tfds.data_source` of VOC / ImageNet is a list of `num` mock examples of real
  image sizes (the rest of the tfds path, decoding included, is jaxdet's own), and selective
  search proposals are random boxes (`random_proposals`)."""
  from jaxdet.data import pipeline
  from jaxdet.data import tfds as tfds_lib

  def open_source(tfds_name, version, split, data_dir):
    del version, data_dir
    return mock_examples(tfds_name, num, seed + (split != "train"))

  with mock.patch.object(tfds_lib, "open_data_source", open_source), \
      mock.patch.object(pipeline, "attach_proposals", random_proposals):
    yield


def load_config(name: str, preset: str):
  """experiments/configs/<name>.py's config of `preset`, unlocked copy, loader threads off.

  Without a weights file (model.pretrained / model.init_from empty) layers the preset keeps
  frozen would stay random, which jaxdet refuses; here they train instead (model.frozen = ()),
  which changes neither shapes nor cost of the forward pass.
  """
  module = importlib.import_module(f"experiments.configs.{name}")
  config = module.get_config(preset).copy_and_resolve_references()
  config.unlock()
  config.data.prefetch = 0
  config.data.num_workers = 1
  model = config.model
  if model.get("frozen") and not model.get("pretrained") and not model.get("init_from"):
    model.frozen = ()
  return config


def preset_batch(config, *, train: bool, batch_size: int | None = None) -> dict[str, np.ndarray]:
  """The first batch of the preset's loader ("train" or the eval split), as training sees it."""
  from jaxdet.data import pipeline
  bs = int(batch_size or (config.train.batch_size if train else config.eval.batch_size))
  split = "train" if train else str(config.eval.split)
  loader = pipeline.make_loader(config.data, split, batch_size=bs, seed=int(config.seed),
                                train=train)
  try:
    return next(iter(loader))
  finally:
    loader.close()


def _model_batch(batch: dict[str, Any]) -> dict[str, Any]:
  return {k: v for k, v in batch.items() if k != "example_mask"}


def abstract_state(config, system, batch, batch_size: int | None = None):
  """The TrainState of `system` at step 0 as shapes only (eval_shape of init and of the
  optimizer's init; nothing is computed): what tracing and compiling a train step need.
  `batch_size` is the optimizer's (learning-rate scaling), default the config's."""
  from jaxdet.train import optim
  from jaxdet.train.state import TrainState
  tx, _ = optim.make_optimizer(config.optimizer, int(config.train.num_steps),
                               param_labels=system.param_labels,
                               batch_size=int(batch_size or config.train.batch_size))
  variables = dict(jax.eval_shape(system.init, jax.random.PRNGKey(0), batch))
  params = variables.pop("params")
  return TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params,
                    opt_state=jax.eval_shape(tx.init, params), model_state=variables, tx=tx)


def trace(config, *, batch_size: int | None = None, test_batch_size: int | None = None
          ) -> dict[str, Any]:
  """Shapes of init, one train step and predict at the preset's true shapes (eval_shape; no
  compilation); `test_batch_size` (default batch_size) for predict: 1 gives a single image's
  own bucket. Returns {"train_batch": image shape, "test_batch": ..., "params": count,
  "loss": ShapeDtypeStruct, "detections": {key: ShapeDtypeStruct}}."""
  from jaxdet.train import setup
  from jaxdet.train.step import make_steps
  system = setup.system_from_config(config)
  train_batch = _model_batch(preset_batch(config, train=True, batch_size=batch_size))
  test_batch = _model_batch(preset_batch(config, train=False,
                                         batch_size=test_batch_size or batch_size))
  state = abstract_state(config, system, train_batch)
  params, variables = state.params, state.model_state
  train_step, eval_step = make_steps(system)
  _, metrics = jax.eval_shape(train_step, state, train_batch, jax.random.PRNGKey(0))
  dets = jax.eval_shape(eval_step, {"params": params, **variables}, test_batch)
  return {"train_batch": train_batch["image"].shape, "test_batch": test_batch["image"].shape,
          "params": sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(params)),
          "loss": metrics["loss"], "detections": dets}


def peak_rss_mib() -> float:
  """Peak resident memory of this process so far (ru_maxrss, KiB on Linux), MiB."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_preset(config, *, steps: int = 1, batch_size: int | None = 1) -> dict[str, Any]:
  """Compiles and runs `steps` train steps and one predict of a preset on this machine.

  Returns {"train_batch", "test_batch": image shapes, "first_step_s" (compilation included),
  "step_s" (mean of the later steps, None with steps == 1), "predict_first_s",
  "loss", "num_detections", "peak_rss_mib"}.
  """
  from jaxdet.train import setup
  from jaxdet.train.step import make_steps
  system = setup.system_from_config(config)
  train_batch = _model_batch(preset_batch(config, train=True, batch_size=batch_size))
  test_batch = _model_batch(preset_batch(config, train=False, batch_size=batch_size))
  state, rng, _ = setup.init_state(config, system, train_batch)
  train_step, eval_step = make_steps(system)
  step = jax.jit(train_step)
  times = []
  for _ in range(max(1, steps)):
    t = time.perf_counter()
    state, metrics = step(state, train_batch, rng)
    loss = float(jax.block_until_ready(metrics["loss"]))
    times.append(time.perf_counter() - t)
  predict = jax.jit(eval_step)
  t = time.perf_counter()
  dets = jax.block_until_ready(predict(state.variables, test_batch))
  predict_s = time.perf_counter() - t
  return {"train_batch": train_batch["image"].shape, "test_batch": test_batch["image"].shape,
          "first_step_s": times[0],
          "step_s": float(np.mean(times[1:])) if len(times) > 1 else None,
          "predict_first_s": predict_s, "loss": loss,
          "num_detections": int(np.sum(np.asarray(dets["valid"]))),
          "peak_rss_mib": peak_rss_mib()}


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--only", default="", help="comma-separated config names (default all)")
  parser.add_argument("--preset", default="paper", choices=PRESETS)
  parser.add_argument("--steps", type=int, default=1, help="train steps per preset")
  parser.add_argument("--batch", type=int, default=1,
                      help="images per batch; 0 = the preset's own batch sizes")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="config override (Python literal), e.g. model.chunk=32; repeatable")
  parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  names = [n for n in args.only.split(",") if n] or list(CONFIGS)
  unknown = sorted(set(names) - set(CONFIGS))
  if unknown:
    raise SystemExit(f"--only: unknown configs {unknown}; known: {', '.join(CONFIGS)}")
  if not args.child:
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, preset {args.preset}, "
          f"batch {args.batch or 'preset'}, steps {args.steps}")
    print(f"{'config':<12} {'train batch':<20} {'test batch':<20} {'1st step s':>10} "
          f"{'step s':>8} {'predict s':>9} {'loss':>9} {'peak MiB':>9}", flush=True)
  if len(names) > 1:   # one process per preset: its own peak memory
    for name in names:
      subprocess.run([sys.executable, "-m", "experiments.check_presets", "--only", name,
                      "--preset", args.preset, "--steps", str(args.steps),
                      "--batch", str(args.batch), "--child",
                      *[f"--set={s}" for s in args.set]], check=True)
    return
  with mock_tfds(num=max(8, 2 * (args.batch or 64))):
    for name in names:
      config = load_config(name, args.preset)
      for item in args.set:
        key, value = item.split("=", 1)
        *path, leaf = key.split(".")
        section = config
        for k in path:
          section = section[k]
        section[leaf] = ast.literal_eval(value)
      r = run_preset(config, steps=args.steps, batch_size=args.batch or None)
      step_s = "-" if r["step_s"] is None else f"{r['step_s']:.2f}"
      print(f"{name:<12} {str(r['train_batch']):<20} {str(r['test_batch']):<20} "
            f"{r['first_step_s']:>10.2f} {step_s:>8} {r['predict_first_s']:>9.2f} "
            f"{r['loss']:>9.4g} {r['peak_rss_mib']:>9.0f}", flush=True)


if __name__ == "__main__":
  main()
