"""R-CNN's multi-stage training and evaluation, each stage resumable (run from experiments.train).

R-CNN does not train by one gradient loss, so `experiments.train` hands a config with
system "rcnn" to `train_and_evaluate` here, which runs, skipping every stage whose output
already exists in the workdir:

  0. proposals   the selective search cache of the train and test splits (computed by the data
                 source, resumable shard by shard; jaxdet.proposals.selective_search)
     pretrain    when `config.pretrain` holds a classify config (the cpu preset) and
                 `config.model.init_from` is "": classification pretraining of the backbone on
                 object crops (the "classify" system, ordinary training loop) in
                 workdir/pretrain; fine-tuning starts its conv and fc layers from there
                 (jaxdet.models.init_from), as the paper starts from ImageNet weights
  1. finetune    the ordinary training loop (jaxdet.train.loop) on the (C+1)-way region
                 classifier, in workdir/finetune (orbax checkpoints: resumes mid-run);
                 its eval.json scores the fine-tuned softmax
  2. features    fc7 of every train proposal and gt box, pool5 of those with IoU >= 0.6:
                 workdir/stages/features_train.npz
  3. svm         per-class SVMs with hard negative mining: workdir/stages/svm.npz
  4. bbox_reg    per-class ridge box regressors: workdir/stages/bbox_reg.npz
  5. evaluation  VOC07 mAP of the SVM scores with and without box regression: workdir/eval.json

Every stage file is written to a temporary file and renamed, so an interrupted stage is redone,
never half-read. Delete a stage's file (and the later ones) to redo it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import Any

import jax
import numpy as np

from jaxdet import files

log = logging.getLogger(__name__)

STAGE_FILES = {"features": "features_train.npz", "svm": "svm.npz", "bbox_reg": "bbox_reg.npz"}


class _Clock:
  """Wall and process CPU seconds (all threads, plus finished child processes such as the
  selective search workers) since construction; `record(timings, name)` stores both."""

  def __init__(self):
    self.wall, self.cpu = time.perf_counter(), _cpu_seconds()

  def record(self, timings: dict[str, float], name: str) -> None:
    timings[f"{name}_s"] = time.perf_counter() - self.wall
    timings[f"{name}_cpu_s"] = _cpu_seconds() - self.cpu


def _cpu_seconds() -> float:
  t = os.times()
  return t.user + t.system + t.children_user + t.children_system


def _load_npz(path: str) -> dict[str, np.ndarray]:
  with np.load(path) as z:
    return {k: z[k] for k in z.files}


def _stage_path(workdir: str, stage: str) -> str:
  return os.path.join(workdir, "stages", STAGE_FILES[stage])


def _loader(config: Any, split: str, train: bool = False):
  from jaxdet.data.pipeline import make_loader
  return make_loader(config.data, split, batch_size=int(config.eval.batch_size),
                     seed=int(config.seed), train=train)


# The model keys that define the fine-tuned network: only these identify its checkpoints, so
# changing a later stage's settings (svm, bbox_reg, predict) reuses the fine-tuned network;
# `loss` (the fine-tuning loss term) is among them.
FINETUNE_KEYS = ("backbone", "backbone_kw", "input_size", "context", "fg_iou", "batch_rois",
                 "fg_fraction", "init_from", "loss")


def finetune_config(config: Any) -> Any:
  """A copy of `config` whose model section holds only FINETUNE_KEYS."""
  import copy
  ft = config.copy_and_resolve_references() if hasattr(config, "copy_and_resolve_references") \
      else copy.deepcopy(config)
  model = ft["model"].to_dict() if hasattr(ft["model"], "to_dict") else dict(ft["model"])
  if hasattr(ft, "unlock"):
    ft.unlock()
  ft["model"] = {k: model[k] for k in FINETUNE_KEYS if k in model}
  return ft


def _finished(run_dir: str, num_steps: int) -> bool:
  """A training loop run is finished when its eval.json is of the last step."""
  path = os.path.join(run_dir, "eval.json")
  if not os.path.exists(path):
    return False
  with open(path) as f:
    return json.load(f).get("step") == int(num_steps)


def uses_pretraining(config: Any) -> bool:
  """Whether the stages pretrain the backbone (config.pretrain set, model.init_from empty)."""
  pre = config.get("pretrain") or {}
  return bool(pre.get("system")) and not config.model.get("init_from")


def pretrained_run(config: Any, workdir: str) -> str:
  """Stage 0b: classification pretraining in workdir/pretrain (resuming) unless finished.

  Returns:
    The pretraining run's workdir, or "" when the config does not pretrain.
  """
  if not uses_pretraining(config):
    return ""
  from jaxdet.train import loop
  pre = config.pretrain
  if pre.system != "classify":
    raise ValueError(f"config.pretrain.system: expected 'classify', got {pre.system!r}")
  run_dir = os.path.join(workdir, "pretrain")
  if not _finished(run_dir, int(pre.train.num_steps)):
    loop.train_and_evaluate(pre, run_dir)
  return run_dir


def _init_from_run(system: Any, run_dir: str) -> Any:
  """`system` whose init takes conv and fc from the run in `run_dir` (jaxdet.models.init_from)."""
  from jaxdet.models import init_from

  def init(rng, batch):
    variables = dict(system.init(rng, batch))
    variables["params"] = init_from.load_into(variables["params"], run_dir)
    return variables
  return dataclasses.replace(system, init=init)


def finetuned_params(config: Any, workdir: str, system: Any) -> Any:
  """Stage 1: fine-tune (resuming) unless finished; returns the fine-tuned params.

  With pretraining (see `uses_pretraining`), runs stage 0b first and fine-tunes from it.
  """
  from jaxdet.train import loop, setup
  pretrain_dir = pretrained_run(config, workdir)
  config = finetune_config(config)
  if pretrain_dir:   # identifies the fine-tuned network's checkpoints (workdir-relative)
    config["model"]["init_from"] = "<workdir>/pretrain"
  ft_dir = os.path.join(workdir, "finetune")
  if not _finished(ft_dir, int(config.train.num_steps)):
    ft_system = _init_from_run(system, pretrain_dir) if pretrain_dir else system
    loop.train_and_evaluate(config, ft_dir, system=ft_system)
  state = loop.restore_for_inference(config, ft_dir, system, setup.peek(_loader(config, "train")))
  return state.params


def extract_features(config: Any, system: Any, params: Any) -> dict[str, np.ndarray]:
  """Stage 2: per-region features of the whole train split (no augmentation)."""
  m = system.extras.settings
  features = system.extras.features
  keep_keys = ("fc7", "overlaps", "is_gt", "gt_class")
  svm_parts = {k: [] for k in keep_keys}
  reg_parts = {k: [] for k in ("pool5", "rois", "gt_box", "gt_class")}
  for batch in _loader(config, "train"):
    real = np.asarray(batch.pop("example_mask"))
    out = jax.device_get(features(params, batch))
    rows = np.asarray(out["mask"]) & real[:, None]                       # [B, R]
    for k in keep_keys:
      svm_parts[k].append(np.asarray(out[k])[rows])
    reg_rows = rows & (np.asarray(out["max_iou"]) >= m.bbox_reg.iou)
    reg_parts["pool5"].append(np.asarray(out["pool5"])[reg_rows])
    reg_parts["rois"].append(np.asarray(out["rois"])[reg_rows])
    reg_parts["gt_box"].append(np.asarray(out["gt_box"])[reg_rows])
    reg_parts["gt_class"].append(np.asarray(out["gt_class"])[reg_rows])
  out = {k: np.concatenate(v) for k, v in svm_parts.items()}
  out["fc7"] = out["fc7"].astype(np.float16)                             # halves the cache
  out["overlaps"] = out["overlaps"].astype(np.float16)
  out.update({f"reg_{k}": np.concatenate(v) for k, v in reg_parts.items()})
  return out


def stage_variables(config: Any, workdir: str, system: Any, params: Any,
                    timings: dict[str, float] | None = None) -> dict[str, Any]:
  """Stages 2-4 (each skipped when its file exists); returns {"params", "rcnn"}."""
  from jaxdet.models import rcnn
  m, c = system.extras.settings, system.num_classes
  timings = {} if timings is None else timings
  path = _stage_path(workdir, "features")
  if not os.path.exists(path):
    clock = _Clock()
    files.save_npz(path, extract_features(config, system, params))
    clock.record(timings, "features")
  feats = _load_npz(path)
  path = _stage_path(workdir, "svm")
  if not os.path.exists(path):
    clock = _Clock()
    svm = rcnn.train_svms(feats["fc7"], feats["overlaps"], feats["is_gt"], feats["gt_class"],
                          c, m.svm, seed=int(config.seed), log=log.info)
    files.save_npz(path, svm)
    clock.record(timings, "svm")
  svm = _load_npz(path)
  path = _stage_path(workdir, "bbox_reg")
  if not os.path.exists(path):
    clock = _Clock()
    reg = rcnn.train_bbox_regressors(feats["reg_pool5"], feats["reg_rois"], feats["reg_gt_box"],
                                     feats["reg_gt_class"], c, m.bbox_reg)
    files.save_npz(path, reg)
    clock.record(timings, "bbox_reg")
  reg = _load_npz(path)
  stage = {"svm_w": svm["svm_w"], "svm_b": svm["svm_b"], "fc7_scale": svm["fc7_scale"],
           "reg_w": reg["reg_w"], "reg_b": reg["reg_b"], "pool5_scale": reg["pool5_scale"]}
  return {"params": params, "rcnn": jax.tree_util.tree_map(np.asarray, stage)}


def inference_variables(config: Any, workdir: str, system: Any, batch: Any) -> dict[str, Any]:
  """{"params", "rcnn"} of a trained workdir (all stages done), restored for inference with
  `batch` giving the shapes (jaxdet.detector: detection on new images)."""
  from jaxdet.train import loop
  missing = [s for s in STAGE_FILES if not os.path.exists(_stage_path(workdir, s))]
  if missing:
    raise FileNotFoundError(f"workdir: stage {missing[0]!r} missing "
                            f"({_stage_path(workdir, missing[0])}); train first with "
                            f"python -m experiments.train --workdir {workdir}")
  ft = finetune_config(config)
  if uses_pretraining(config):
    ft["model"]["init_from"] = "<workdir>/pretrain"
  params = loop.restore_for_inference(ft, os.path.join(workdir, "finetune"), system,
                                      batch).params
  return stage_variables(config, workdir, system, params)


def _score(config: Any, system: Any, variables: Any, dump: str | None = None
           ) -> dict[str, float]:
  from jaxdet.train.evaluate import evaluate_variables
  loader = _loader(config, str(config.eval.split))
  with_reg = evaluate_variables(system.extras.predict_with_bbox_reg, variables, loader,
                                system.num_classes, dump=dump)
  without = evaluate_variables(system.extras.predict_without_bbox_reg, variables, loader,
                               system.num_classes)
  out = dict(with_reg)
  out.update({f"{k}_no_bbox_reg": v for k, v in without.items()})
  return out


def _write_eval(workdir: str, step: int, scores: dict[str, float]) -> None:
  from jaxdet.train.loop import write_eval_json
  write_eval_json(workdir, step, scores)


def train_and_evaluate(config: Any, workdir: str) -> dict[str, float]:
  """Runs every stage not yet done in `workdir`; writes and returns the final scores."""
  from jaxdet.train import setup
  os.makedirs(workdir, exist_ok=True)
  system = setup.system_from_config(config)
  timings: dict[str, float] = {}
  clock = _Clock()
  for split in ("train", str(config.eval.split)):   # stage 0: the proposal caches
    _loader(config, split).close()
  clock.record(timings, "proposals")
  clock = _Clock()
  pretrained_run(config, workdir)
  clock.record(timings, "pretrain")
  clock = _Clock()
  params = finetuned_params(config, workdir, system)
  clock.record(timings, "finetune")
  variables = stage_variables(config, workdir, system, params, timings)
  clock = _Clock()
  scores = _score(config, system, variables)
  clock.record(timings, "evaluation")
  with open(os.path.join(workdir, "finetune", "eval.json")) as f:
    softmax = json.load(f)
  scores["voc07_map_finetuned_softmax"] = float(softmax["voc07_map"])
  scores.update({f"stage_{k}": v for k, v in timings.items()})
  _write_eval(workdir, int(config.train.num_steps), scores)
  return scores


def evaluate(config: Any, workdir: str, dump: str | None = None) -> dict[str, float]:
  """Scores a trained workdir (all stages done) on config.eval.split; writes eval.json (and
  with `dump` the detections with box regression as JSON Lines)."""
  from jaxdet.train import setup
  system = setup.system_from_config(config)
  for stage in STAGE_FILES:
    if not os.path.exists(_stage_path(workdir, stage)):
      raise FileNotFoundError(f"workdir: stage {stage!r} missing ({_stage_path(workdir, stage)});"
                              f" train first with python -m experiments.train --workdir {workdir}")
  params = finetuned_params(config, workdir, system)
  scores = _score(config, system, stage_variables(config, workdir, system, params), dump)
  _write_eval(workdir, int(config.train.num_steps), scores)
  return scores
