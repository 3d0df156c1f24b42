"""Faster R-CNN's 4-step alternating training (Ren et al., NIPS 2015, section 3.2): the schedule.

`config.model.stage = "alternating"` names the whole schedule; each step is one network of
`jaxdet.models.faster_rcnn` (`config.model.stage` = one of its STAGES[1:]) trained by the
ordinary loop in its own workdir subfolder:

    1_rpn        the RPN and the conv layers;
    2_fast_rcnn  Fast R-CNN (its own conv layers) on the proposals of the frozen step-1 RPN;
    3_rpn        the RPN's own layers on the step-2 conv layers, kept frozen;
    4_fast_rcnn  the Fast R-CNN fc layers and heads; shared conv layers and RPN frozen.

This is orchestration above the model (the model never imports the training loop):
`train_alternating` runs the steps in order, each resumable, each starting from the previous
steps' parameters (`stage_init`); `detector_run` names the run the schedule leaves (the last
step's config and folder), which evaluation and detection read.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
from typing import Any, Mapping

import jax

from jaxdet.models import faster_rcnn
from jaxdet.models.faster_rcnn import ALTERNATING, STAGES
from jaxdet.train import loop, preflight, setup

log = logging.getLogger(__name__)


def step_config(config: Any, stage: str, num_steps: int | None = None) -> Any:
  """A copy of the experiment config `config` (a ConfigDict) for one step of the 4-step
  schedule: model.stage = `stage` and no schedule in model (so that the step's checkpoint
  fingerprint is its network's alone); with `num_steps`, that training length, the optimizer's
  warm-up and decay boundaries scaled by num_steps / config.train.num_steps."""
  cfg = copy.deepcopy(config)
  with cfg.unlocked() if hasattr(cfg, "unlocked") else contextlib.nullcontext():
    cfg.model.stage = stage
    cfg.model.alternating_steps = ()
    if num_steps is not None:
      ratio = int(num_steps) / int(cfg.train.num_steps)
      cfg.train.num_steps = int(num_steps)
      cfg.optimizer.decay_steps = tuple(int(round(d * ratio))
                                        for d in cfg.optimizer.decay_steps)
      cfg.optimizer.warmup_steps = int(round(cfg.optimizer.warmup_steps * ratio))
  return cfg


def detector_run(config: Any, workdir: str) -> tuple[Any, str]:
  """(config, workdir) of the detector a training run of `config` in `workdir` leaves: for
  ALTERNATING its last step's (`step_config`, workdir/<step>), else the two unchanged."""
  if faster_rcnn.Settings.from_config(config).stage != ALTERNATING:
    return config, workdir
  return step_config(config, STAGES[-1]), os.path.join(workdir, STAGES[-1])


def stage_init(stage: str, done: Mapping[str, Mapping[str, Any]]) -> dict[str, Any] | None:
  """The parameters a step starts from (`faster_rcnn.build_system(init_params=...)`), given
  `done`: {finished step: its final params}; None for step 1."""
  if stage == "2_fast_rcnn":   # its own conv (fresh or pretrained); proposals from step 1
    p1 = done["1_rpn"]
    return {"proposal_conv": p1["conv"], "proposal_rpn": p1["rpn"]}
  if stage == "3_rpn":         # step-2 conv (frozen), RPN head from step 1
    p2 = done["2_fast_rcnn"]
    return {"conv": p2["conv"], "fc": p2["fc"], "cls_score": p2["cls_score"],
            "bbox_pred": p2["bbox_pred"], "rpn": done["1_rpn"]["rpn"]}
  if stage == "4_fast_rcnn":   # everything from step 3; trains the Fast R-CNN layers only
    return dict(done["3_rpn"])
  return None


def train_alternating(config: Any, workdir: str, *, make_loader: Any = None,
                      steps: Mapping[str, int] | None = None) -> dict[str, Any]:
  """The paper's 4-step alternating training, each step in workdir/<stage>, each resumable.

  Step i trains with `config.model.stage` = the i-th of STAGES[1:] for `steps[stage]` steps
  (default: config.model.alternating_steps, then config.train.num_steps; see `step_config`)
  through `jaxdet.train.train_and_evaluate`, so an interrupted step resumes from its own
  checkpoints and a finished one (its eval.json at the last step) is not run again; its final
  parameters are read back from its checkpoint.

  Returns:
    {stage: the eval metrics of that step}; the last one is the detector's.
  """
  if preflight.num_seeds(config) != 1:   # each step starts from the previous one's parameters
    raise ValueError(f"train.num_seeds: the 4-step alternating training trains one seed at a "
                     f"time, got {config.train.num_seeds!r}; set --config.train.num_seeds=1 "
                     f"and run one process per --config.seed")
  if steps is None:
    steps = dict(zip(STAGES[1:], faster_rcnn.Settings.from_config(config).alternating_steps))
  done: dict[str, Any] = {}
  results: dict[str, Any] = {}
  for stage in STAGES[1:]:
    cfg = step_config(config, stage, steps.get(stage))
    system = faster_rcnn.build_system(cfg, init_params=stage_init(stage, done))
    stage_dir = os.path.join(workdir, stage)
    eval_path = os.path.join(stage_dir, "eval.json")
    finished = False
    if os.path.exists(eval_path):
      with open(eval_path) as f:
        metrics = json.load(f)
      finished = int(metrics.get("step", -1)) == int(cfg.train.num_steps)
    mk = setup.default_make_loader() if make_loader is None else make_loader
    if finished:
      log.info("stage %s already finished in %s", stage, stage_dir)
      batch = setup.peek(mk(cfg.data, "train", batch_size=int(cfg.train.batch_size),
                            seed=int(cfg.seed), train=True))
      state = loop.restore_for_inference(cfg, stage_dir, system, batch)
    else:
      log.info("alternating training: stage %s in %s", stage, stage_dir)
      state = loop.train_and_evaluate(cfg, stage_dir, system=system, make_loader=mk)
      with open(eval_path) as f:
        metrics = json.load(f)
    done[stage] = jax.device_get(state.params)
    results[stage] = metrics
  return results
