r"""The lecture in one command: every detector of lecture 8 trained, scored and timed side by side.

    python -m experiments.lecture8 [--out out/lecture8] [--only yolo,fast_rcnn] [--fast]

For each stage of `STAGES` (the lecture's order), on the synthetic shapes with the system's cpu
preset: train (jaxdet.train.train_and_evaluate, or the system's own stage driver for R-CNN) in
OUT/work/<system>, evaluate (VOC07 mAP@0.5 and COCO AP on the test split), time test per image
(the jitted `predict` on one image, compilation excluded) without and with proposals
(selective search timed on this CPU for the systems that take it), and draw the detections of
a few test images into OUT/detections/<system>_<i>.png. Then the lecture's table goes to stdout,
OUT/lecture8.md and OUT/lecture8.json, and a bar chart of test time per image to
OUT/speedups.png.

Resumable: a stage's results are written atomically to OUT/work/<system>/lecture8_stage.json
when it is finished, and a second run reuses them (a stage interrupted while training resumes
from its last checkpoint). A finished stage whose config has changed since (a new preset) is
moved aside to OUT/work/<system>.stale-<fingerprint> and trained again. A stage that raises
shows up in the table as "not available: failed: <error>" (its traceback goes to stderr), is
not marked finished, and the run goes on with the next stage.

`--fast` trains each system for a few steps on a few images (a smoke run of the harness; the
scores mean nothing). Training time is wall-clock and CPU time (all threads of this process and
its child processes, e.g. selective search workers), so that a run on a busy machine can still
be compared with one on an idle machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib
import json
import os
import platform
import shutil
import statistics
import sys
import time
import traceback
from typing import Any, Callable, Sequence

import numpy as np

from jaxdet import files

MARKER = "lecture8_stage.json"       # a finished stage's results, in its workdir
NUM_DRAWN = 3                        # test images drawn per system
TIMED_IMAGES = 5                     # test images the per-image test time is the median over
TIMED_REPEATS = 3                    # calls per timed image
SS_IMAGES = 5                        # test images selective search is timed on
DRAW_ZOOM = 3                        # drawn test images are upscaled by this factor


@dataclasses.dataclass(frozen=True)
class Stage:
  """One detector of the lecture and how the harness trains and tests it.

  Attributes:
    system: the key in jaxdet.systems.SYSTEMS; its config is experiments/configs/<system>.py.
    title: the lecture's name for it.
    proposals: where its region proposals come from at test time: "none" (no proposals),
      "selective_search" (computed outside the network: timed on this CPU and added to the
      test time with proposals), "rpn" (inside the network, already in `predict`).
    driver: "module:function" (config, workdir) -> None that trains the system resumably and
      writes workdir/eval.json; "" = jaxdet.train.train_and_evaluate.
    variables: "module:function" (config, workdir, system, batch) -> the variables `predict`
      runs with after training; "" = the latest checkpoint (restore_for_inference).
    init_from: a folder under OUT/work holding a finished classification-pretraining run
      whose conv and fc layers start this system (config.model.init_from); "" = none. The
      lecture's detectors start from a backbone pretrained for classification.
    detector: False for a stage that only trains (the shared classification pretraining):
      no detections, no row in the table, its time and accuracy in a line under it.
  """
  system: str
  title: str
  proposals: str = "none"
  driver: str = ""
  variables: str = ""
  init_from: str = ""
  detector: bool = True


STAGES: tuple[Stage, ...] = (
    # The lecture's first step: a classification network (here on object crops, in the papers
    # on ImageNet), whose conv and fc layers start the detectors that share its backbone.
    Stage("classify", "Classification pretraining on object crops", detector=False),
    Stage("localization", "Localization as regression (single object)"),
    Stage("windows", "Sliding windows (brute force)", init_from="classify"),
    Stage("overfeat", "OverFeat (dense windows + box merging)", init_from="classify"),
    Stage("rcnn", "R-CNN", "selective_search", driver="experiments.rcnn_stages:train_and_evaluate",
          variables="experiments.lecture8:rcnn_variables", init_from="classify"),
    Stage("fast_rcnn", "Fast R-CNN", "selective_search", init_from="classify"),
    Stage("faster_rcnn", "Faster R-CNN", "rpn", init_from="classify"),
    Stage("yolo", "YOLO v1", init_from="classify"),
)
REFERENCE = "rcnn"                   # speedups are against this stage

COLUMNS = ("detector", "system", "VOC07 mAP@0.5", "COCO AP", "train time (wall / CPU)",
           "test s/img excl. proposals", "proposals s/img", "test s/img incl. proposals",
           "speedup vs R-CNN (excl. / incl.)")


# ----------------------------------------------------------------------------- stages


def _resolve(spec: str) -> Callable[..., Any]:
  module, fn = spec.split(":")
  return getattr(importlib.import_module(module), fn)


def rcnn_variables(config: Any, workdir: str, system: Any, batch: Any) -> Any:
  """R-CNN's test variables: the fine-tuned network plus the SVMs and box regressors."""
  from experiments import rcnn_stages
  del batch
  params = rcnn_stages.finetuned_params(config, workdir, system)
  return rcnn_stages.stage_variables(config, workdir, system, params)


def stage_config(stage: Stage, out: str, fast: bool) -> Any:
  """The stage's cpu preset; with `fast`, a few steps on a few images (a smoke run).

  Selective search caches (R-CNN, and Fast R-CNN when it reads proposals from the batch) go
  to OUT/proposals, so that a run keeps everything it computes under OUT.
  """
  config = importlib.import_module(f"experiments.configs.{stage.system}").get_config("cpu")
  if config.data.get("proposals"):
    config.data.proposals.cache_root = os.path.abspath(os.path.join(out, "proposals"))
  if stage.init_from:
    source = os.path.abspath(os.path.join(out, "work", stage.init_from))
    if not os.path.isdir(source):
      raise FileNotFoundError(f"{stage.system}: starts from the pretrained backbone in {source}, "
                              f"which does not exist: run the stage that makes it first (without "
                              f"--only, or with --only {stage.init_from.split('/')[0]},"
                              f"{stage.system})")
    config.model.init_from = source
  if fast:
    config.train.num_steps = 2
    config.train.batch_size = 2
    config.train.log_every = 1
    config.eval.every_steps = 0
    config.eval.batch_size = 2
    config.eval.max_batches = -1
    config.checkpoint.every_steps = 0
    config.data.num_train = 8
    config.data.num_test = 4
    pretrain = config.get("pretrain")
    if pretrain is not None and pretrain.get("train") is not None:
      pretrain.train.num_steps = 2     # e.g. R-CNN's classification pretraining stage
      pretrain.train.batch_size = 2
      pretrain.data.num_train = 8
      pretrain.data.num_test = 4
  return config


def cpu_seconds() -> float:
  """CPU seconds (user + system) of this process and its finished children, e.g. the
  selective-search worker processes."""
  import resource
  return sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                               resource.getrusage(resource.RUSAGE_CHILDREN)))


def fingerprint(config: Any) -> str:
  """A short hash of the config (a finished stage is reused only for the same config); the
  proposal cache's and the pretrained backbone's folders are left out, so that OUT can be moved."""
  d = config.to_dict() if hasattr(config, "to_dict") else json.loads(json.dumps(config))
  d.get("data", {}).get("proposals", {}).pop("cache_root", None)
  d.get("model", {}).pop("init_from", None)
  return hashlib.sha1(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def read_json(path: str) -> Any | None:
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def _train(stage: Stage, config: Any, workdir: str) -> dict[str, Any]:
  """Runs the stage's trainer (resuming); returns eval.json with wall and CPU seconds."""
  resumed = os.path.isdir(os.path.join(workdir, "checkpoints"))
  wall, cpu = time.perf_counter(), cpu_seconds()
  if stage.driver:
    _resolve(stage.driver)(config, workdir)
  else:
    from jaxdet.train.loop import train_and_evaluate
    train_and_evaluate(config, workdir)
  wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
  scores = read_json(os.path.join(workdir, "eval.json"))
  if scores is None:
    raise RuntimeError(f"{stage.system}: training finished without {workdir}/eval.json")
  return {"eval": scores, "train_wall_s": wall, "train_cpu_s": cpu, "resumed": resumed}


def _test_batches(config: Any, count: int) -> list[dict[str, np.ndarray]]:
  """The first `count` test images, one per batch, as evaluation sees them."""
  from jaxdet.data.pipeline import make_loader
  loader = make_loader(config.data, config.eval.split, batch_size=1, seed=int(config.seed),
                       train=False)
  batches = []
  for batch in loader:
    if len(batches) == count:
      break
    batches.append({k: np.asarray(v) for k, v in batch.items() if k != "example_mask"})
  return batches


def _load_variables(stage: Stage, config: Any, workdir: str, system: Any, batch: Any) -> Any:
  if stage.variables:
    return _resolve(stage.variables)(config, workdir, system, batch)
  from jaxdet.train.loop import restore_for_inference
  return restore_for_inference(config, workdir, system, batch).variables


def proposal_count(stage: Stage, config: Any, system: Any, batch: Any) -> float | None:
  """Region proposals `predict` scores per image: the batch's (selective search), the grid's
  (Fast R-CNN's cpu preset) or the RPN's test capacity; None for systems without proposals."""
  if "proposal_mask" in batch:
    return float(np.asarray(batch["proposal_mask"]).sum(axis=-1).mean())
  model = config.get("model", {})
  if stage.system == "fast_rcnn" and model.get("proposals") == "grid":
    _, mask = system.extras.proposals(batch)
    return float(np.asarray(mask).sum(axis=-1).mean())
  if stage.proposals == "rpn" and "rpn_proposals" in model:
    return float(model["rpn_proposals"]["test"]["post_nms_topk"])
  return None


def _test(stage: Stage, config: Any, workdir: str, out: str) -> dict[str, Any]:
  """Test seconds per image (median; compilation excluded) and the drawn detections."""
  import jax
  from jaxdet.data.pipeline import make_source
  from jaxdet.eval.detections import unbatch_detections
  from jaxdet.eval.draw import draw_detections, save_image
  from jaxdet.train import setup
  system = setup.system_from_config(config)
  batches = _test_batches(config, max(TIMED_IMAGES, NUM_DRAWN))
  variables = _load_variables(stage, config, workdir, system, batches[0])
  predict = jax.jit(system.predict)
  start = time.perf_counter()
  jax.block_until_ready(predict(variables, batches[0]))
  compile_s = time.perf_counter() - start
  times, drawn, counts = [], [], []
  names = list(make_source(config.data, "test").class_names)
  for i, batch in enumerate(batches):
    counts.append(proposal_count(stage, config, system, batch))
    for _ in range(TIMED_REPEATS):
      start = time.perf_counter()
      det = jax.block_until_ready(predict(variables, batch))
      times.append(time.perf_counter() - start)
    if i < NUM_DRAWN:
      det = unbatch_detections(jax.device_get(det))[0]
      h, w = (int(v) for v in batch["image_size"][0])
      zoom = DRAW_ZOOM   # nearest-neighbour upscaling, so that the tags stay legible
      image = np.repeat(np.repeat(batch["image"][0, :h, :w], zoom, 0), zoom, 1)
      real = batch["box_mask"][0]
      # The best detections (scores of 0.3 or more), at most two more than the objects: the
      # picture stays readable for systems whose scores are not probabilities (OverFeat's
      # merged boxes carry summed scores).
      top = np.argsort(-np.asarray(det["scores"]), kind="stable")[:int(real.sum()) + 2]
      picture = draw_detections(image, det["boxes"][top] * zoom, det["labels"][top],
                                det["scores"][top], class_names=names, score_threshold=0.3,
                                gt_boxes=batch["boxes"][0][real] * zoom,
                                gt_labels=batch["labels"][0][real])
      path = os.path.join(out, "detections", f"{stage.system}_{i}.png")
      drawn.append(os.path.relpath(str(save_image(path, picture)), out))
  return {"test_s_per_image": statistics.median(times), "compile_s": compile_s,
          "detections": drawn,
          "num_proposals": None if counts[0] is None else float(np.mean(counts))}


def run_stage(stage: Stage, out: str, *, fast: bool) -> dict[str, Any]:
  """Trains, scores, times and draws one stage in OUT/work/<system>, or reuses its results."""
  config = stage_config(stage, out, fast)
  workdir = os.path.join(out, "work", stage.system)
  marker = os.path.join(workdir, MARKER)
  fp = fingerprint(config)
  done = read_json(marker)
  if done is not None and done.get("fingerprint") == fp:
    return {**done, "reused": True}
  if done is not None:   # the preset changed since: keep the old run aside, train afresh
    stale = f"{workdir}.stale-{done.get('fingerprint')}"
    print(f"{stage.system}: its config changed since {workdir} was finished; moved to {stale}",
          file=sys.stderr)
    if os.path.exists(stale):
      shutil.rmtree(stale)
    os.replace(workdir, stale)
  result = {"system": stage.system, "fingerprint": fp, "fast": fast,
            "num_steps": int(config.train.num_steps), "batch_size": int(config.train.batch_size)}
  result.update(_train(stage, config, workdir))
  if stage.detector:
    result.update(_test(stage, config, workdir, out))
  if stage.system == "fast_rcnn":
    result["trained_proposals"] = str(config.model.get("proposals", ""))
  files.write_json(marker, result)
  return {**result, "reused": False}


# ----------------------------------------------------------------------------- proposals


def selective_search_seconds(out: str, fast: bool) -> dict[str, Any]:
  """Selective search ("fast" mode, up to 2000 boxes) seconds per synthetic test image on this
  CPU (median over a few images; cached in OUT/selective_search.json), or why it is missing."""
  path = os.path.join(out, "selective_search.json")
  cached = read_json(path)
  if cached is not None:
    return cached
  try:
    from cv2 import ximgproc  # noqa: F401
  except ImportError:
    return {"s_per_image": None, "reason": "cv2.ximgproc (opencv-contrib) does not import"}
  from jaxdet.data.pipeline import default_data_config, make_source
  from jaxdet.proposals.selective_search import selective_search
  source = make_source(default_data_config(), "test")
  times, counts = [], []
  for i in range(2 if fast else SS_IMAGES):
    image = source[i]["image"]
    start = time.perf_counter()
    _, mask = selective_search(image, mode="fast", max_proposals=2000)
    times.append(time.perf_counter() - start)
    counts.append(int(mask.sum()))
  result = {"s_per_image": statistics.median(times), "mode": "fast",
            "image_shape": list(image.shape), "mean_proposals": float(np.mean(counts)),
            "reason": ""}
  files.write_json(path, result)
  return result


# ----------------------------------------------------------------------------- the table


def make_rows(stages: Sequence[Stage], results: dict[str, dict[str, Any]],
              missing: dict[str, str], ss: dict[str, Any]) -> list[dict[str, Any]]:
  """One row per stage: scores, times, the proposal cost and speedups against R-CNN."""
  rows = []
  for stage in stages:
    if not stage.detector:
      continue
    row: dict[str, Any] = {"system": stage.system, "detector": stage.title,
                           "proposals": stage.proposals}
    if stage.system in missing:
      row["not_available"] = missing[stage.system]
      rows.append(row)
      continue
    r = results[stage.system]
    test = r["test_s_per_image"]
    proposal_s = 0.0 if stage.proposals != "selective_search" else ss.get("s_per_image")
    row.update(voc07_map=r["eval"].get("voc07_map"), coco_AP=r["eval"].get("coco_AP"),
               train_wall_s=r["train_wall_s"], train_cpu_s=r["train_cpu_s"],
               num_steps=r["num_steps"], test_s=test, proposal_s=proposal_s,
               test_with_proposals_s=None if proposal_s is None else test + proposal_s,
               num_proposals=r.get("num_proposals"),
               compile_s=r["compile_s"], detections=r["detections"], reused=r["reused"],
               resumed=r.get("resumed", False))
    if r.get("trained_proposals") == "grid":
      row["note"] = ("the cpu preset trains and scores on a fixed grid of boxes (the count "
                     "shown), not selective search; the proposals column adds selective search "
                     "timed on this CPU, as in the paper's pipeline")
    rows.append(row)
  ref = next((r for r in rows if r["system"] == REFERENCE and "test_s" in r), None)
  for row in rows:
    if ref is None or "test_s" not in row:
      continue
    row["speedup"] = ref["test_s"] / row["test_s"]
    if ref["test_with_proposals_s"] and row["test_with_proposals_s"]:
      row["speedup_with_proposals"] = ref["test_with_proposals_s"] / row["test_with_proposals_s"]
  return rows


def pretraining_lines(stages: Sequence[Stage], results: dict[str, dict[str, Any]],
                      missing: dict[str, str]) -> list[str]:
  """A line per training-only stage: its accuracy, time and the stages it starts."""
  lines = []
  for stage in stages:
    r = results.get(stage.system)
    if stage.detector:
      continue
    if r is None:
      lines.append(f"{stage.title} (`{stage.system}`): not available: "
                   f"{missing.get(stage.system, 'not run')}")
      continue
    users = [s.system for s in stages if s.init_from.split("/")[0] == stage.system]
    acc = r["eval"].get("accuracy")
    lines.append(f"{stage.title} (`{stage.system}`): accuracy "
                 f"{_num(acc, '.3f')} on the test objects, trained in "
                 f"{r['train_wall_s']:.0f} s wall / {r['train_cpu_s']:.0f} s CPU; its conv and "
                 f"fc layers start {', '.join(users) or 'no stage'}.")
  return lines


def _num(value: Any, fmt: str) -> str:
  return "-" if value is None else format(value, fmt)


def _seconds(s: float | None) -> str:
  if s is None:
    return "-"
  return f"{s:.4f}" if s < 1 else f"{s:.2f}"


def format_table(rows: Sequence[dict[str, Any]], ss: dict[str, Any]) -> str:
  """The lecture's table in markdown."""
  lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
  for r in rows:
    if "not_available" in r:
      cells = [r["detector"], r["system"], f"not available: {r['not_available']}"]
      cells += [""] * (len(COLUMNS) - len(cells))
    else:
      n = r.get("num_proposals")
      count = "" if n is None else f", {n:.0f}/img scored"
      if r["proposals"] == "selective_search":
        prop = (_seconds(r["proposal_s"]) + f" (selective search{count})"
                if r["proposal_s"] is not None else f"not measured: {ss.get('reason')}")
      else:
        prop = f"0 (RPN in the network{count})" if r["proposals"] == "rpn" else "0 (none)"
      speed = " / ".join(_num(r.get(k), ".1f") + ("x" if r.get(k) is not None else "")
                         for k in ("speedup", "speedup_with_proposals"))
      cells = [r["detector"] + (" *" if r.get("note") else ""), r["system"],
               _num(r["voc07_map"], ".3f"), _num(r["coco_AP"], ".3f"),
               f"{r['train_wall_s']:.0f} s / {r['train_cpu_s']:.0f} s", _seconds(r["test_s"]),
               prop, _seconds(r["test_with_proposals_s"]), speed]
    lines.append("| " + " | ".join(cells) + " |")
  notes = [f"* {r['system']}: {r['note']}" for r in rows if r.get("note")]
  return "\n".join(lines + ([""] + notes if notes else []))


def machine() -> dict[str, Any]:
  import jax
  load = os.getloadavg() if hasattr(os, "getloadavg") else None
  return {"platform": platform.platform(), "python": platform.python_version(),
          "jax": jax.__version__, "devices": [str(d) for d in jax.devices()],
          "cpu_count": os.cpu_count(), "load_average": load}


def plot(rows: Sequence[dict[str, Any]], path: str) -> str:
  """A bar chart of test seconds per image (log scale), without and with proposals."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  done = [r for r in rows if "test_s" in r]
  fig, ax = plt.subplots(figsize=(max(4.0, 1.3 * len(done) + 2), 4))
  x = np.arange(len(done))
  excl = [r["test_s"] for r in done]
  incl = [r["test_with_proposals_s"] or 0.0 for r in done]
  ax.bar(x - 0.2, excl, 0.4, label="excl. proposals")
  ax.bar(x + 0.2, incl, 0.4, label="incl. proposals")
  for i, r in enumerate(done):
    if r.get("speedup") is not None:
      ax.annotate(f"{r['speedup']:.3g}x", (i - 0.2, excl[i]), ha="center", va="bottom",
                  fontsize=8)
  ax.set_xticks(x, [r["system"] for r in done], rotation=20)
  ax.set_yscale("log")
  ax.set_ylabel("test seconds per image")
  ax.set_title("Test time per image on this CPU\n(speedup vs R-CNN above the bars)",
               fontsize=10)
  ax.legend()
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


# ----------------------------------------------------------------------------- main


def select(only: str | None) -> list[Stage]:
  """The stages named in `only` (comma separated, in the lecture's order), or all of them."""
  if not only:
    return list(STAGES)
  names = [n.strip() for n in only.split(",") if n.strip()]
  known = [s.system for s in STAGES]
  unknown = [n for n in names if n not in known]
  if unknown:
    raise ValueError(f"--only: unknown system(s) {unknown}; known: {known}")
  return [s for s in STAGES if s.system in names]


def run(out: str = "out/lecture8", only: str | None = None, fast: bool = False
        ) -> dict[str, Any]:
  """Runs (or reuses) every selected stage and writes the table, JSON, chart and detections."""
  stages = select(only)
  missing: dict[str, str] = {}   # system -> why it failed
  results: dict[str, dict[str, Any]] = {}
  try:
    from tqdm import tqdm
    bar = tqdm(stages, desc="lecture 8", unit="stage", file=sys.stderr, position=0)
  except ImportError:
    bar = stages
  ss = {"s_per_image": None, "reason": "no stage uses selective search"}
  if any(s.proposals == "selective_search" for s in stages):
    ss = selective_search_seconds(out, fast)
  for stage in bar:
    if hasattr(bar, "set_postfix_str"):
      bar.set_postfix_str(stage.system)
    try:
      results[stage.system] = run_stage(stage, out, fast=fast)
    except Exception as e:   # noqa: BLE001  (one broken system must not stop the lecture)
      traceback.print_exc()
      missing[stage.system] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
  rows = make_rows(stages, results, missing, ss)
  pretraining = pretraining_lines(stages, results, missing)
  table = "\n\n".join([format_table(rows, ss)] + pretraining)
  info = machine()
  command = "python -m experiments.lecture8 " + " ".join(
      [f"--out {out}"] + ([f"--only {only}"] if only else []) + (["--fast"] if fast else []))
  header = (f"Lecture 8 on the synthetic shapes (cpu presets{', --fast' if fast else ''}): "
            f"`{command}`\n\nMachine: {info['platform']}, {info['cpu_count']} CPUs, load "
            f"average {info['load_average']}, jax {info['jax']} on {info['devices'][0]}. "
            f"Selective search: "
            + (f"{ss['s_per_image']:.3f} s per {ss.get('image_shape')} image ({ss.get('mode')} "
               f"mode, {ss.get('mean_proposals', 0):.0f} boxes on average)"
               if ss.get("s_per_image") is not None else f"not timed ({ss.get('reason')})")
            + ". Test time: the jitted predict on one image, median, compilation excluded.\n")
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "lecture8.md"), "w") as f:
    f.write(header + "\n" + table + "\n")
  summary = {"command": command, "fast": fast, "machine": info, "selective_search": ss,
             "columns": list(COLUMNS), "rows": rows, "pretraining": pretraining,
             "missing": missing}
  files.write_json(os.path.join(out, "lecture8.json"), summary)
  plot(rows, os.path.join(out, "speedups.png"))
  print(table)
  return summary


def main(argv: list[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="out/lecture8", help="results and work directories")
  parser.add_argument("--only", default=None, help="comma-separated systems, e.g. yolo,rcnn")
  parser.add_argument("--fast", action="store_true", help="a few steps on a few images")
  args = parser.parse_args(argv)
  return run(args.out, args.only, args.fast)


if __name__ == "__main__":
  main(sys.argv[1:])
