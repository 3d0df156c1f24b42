"""Trains a system, evaluating at intervals and checkpointing; run again to resume.

    python -m experiments.train --config experiments/configs/<system>.py[:cpu|paper] \
        --workdir DIR [--config.key=value ...]

DIR receives config.json (the resolved config), checkpoints/, metrics.jsonl, tensorboard/ and
eval.json (the final scores).
Several processes (hosts): pass --multihost to every process (jax.distributed.initialize()
reads the cluster from SLURM / Open MPI / Kubernetes, or take --coordinator_address,
--num_processes, --process_id); the same code then trains over all processes' devices.
README.md, "Several devices and hosts", has the commands.
"""

from __future__ import annotations

import json
import sys

from experiments.configs import common


def define_flags(fv) -> None:
  from absl import flags
  flags.DEFINE_string("workdir", None, "checkpoints, logs and eval.json go here", flag_values=fv)


def main(argv: list[str]) -> dict:
  config, flags = common.parse_flags(argv, define_flags)
  if not flags.workdir:
    raise ValueError("--workdir: expected a directory for checkpoints and logs")
  import jax
  common.initialize_distributed(flags)
  if jax.process_index() == 0:   # what Detector.from_workdir / experiments.detect read
    from jaxdet.detector import save_config
    save_config(config, flags.workdir)
  multi_stage = config.system == "rcnn" or (config.system == "faster_rcnn"
                                            and config.model.get("stage") == "alternating")
  if multi_stage and config.train.get("num_seeds", 1) != 1:
    raise ValueError(f"train.num_seeds: the multi-stage training of {config.system!r} trains "
                     f"one seed at a time, got {config.train.num_seeds!r}; set "
                     f"--config.train.num_seeds=1 and run one process per --config.seed")
  if config.system == "rcnn":   # multi-stage training (SVMs, box regression), not one loss
    from experiments import rcnn_stages
    scores = rcnn_stages.train_and_evaluate(config, flags.workdir)
    print(json.dumps(scores))
    return scores
  if config.system == "faster_rcnn" and config.model.get("stage") == "alternating":
    from jaxdet.train import alternating   # the paper's 4-step schedule, one folder a step
    scores = alternating.train_alternating(config, flags.workdir)
    print(json.dumps(scores))
    return scores
  from jaxdet.train.loop import train_and_evaluate
  state = train_and_evaluate(config, flags.workdir)
  with open(f"{flags.workdir}/eval.json") as f:
    scores = json.load(f)
  if jax.process_index() == 0:
    print(f"step {int(state.step)}: " + json.dumps(scores))
  return scores


if __name__ == "__main__":
  main(sys.argv)
