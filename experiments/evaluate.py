"""Scores the latest checkpoint of a workdir and writes DIR/eval.json.

    python -m experiments.evaluate --config experiments/configs/<system>.py[:preset] \
        --workdir DIR

eval.json: VOC07 mAP@0.5 (voc07_map), COCO AP / AP50 / AP75 and images/s of the predict
function (compilation excluded) over `config.eval.split`, scored in the original images'
pixels. The scores are printed first, so a workdir that cannot be written to (eval.json fails,
naming its path) still shows them. --dump FILE also writes the detections as JSON Lines (one
image a line: image_id, height, width, detections [{box [x1, y1, x2, y2] original pixels,
score, label, class}]).
"""

from __future__ import annotations

import sys

from experiments.configs import common
from jaxdet import files


def define_flags(fv) -> None:
  from absl import flags
  flags.DEFINE_string("workdir", None, "the training run's directory", flag_values=fv)
  flags.DEFINE_string("dump", None, "also write the detections to this JSON Lines file",
                      flag_values=fv)


def main(argv: list[str]) -> dict:
  config, flags = common.parse_flags(argv, define_flags)
  if not flags.workdir:
    raise ValueError("--workdir: expected the training run's directory")
  workdir = flags.workdir
  if config.system == "rcnn":   # SVMs and box regressors live beside the checkpoints
    from experiments.rcnn_stages import evaluate
  else:
    from jaxdet.train.loop import evaluate   # prints the scores itself, before eval.json
  if config.system == "faster_rcnn":   # 4-step training: the detector is its last step's
    from jaxdet.train import alternating
    config, workdir = alternating.detector_run(config, workdir)
  scores = evaluate(config, workdir, dump=flags.dump)
  if config.system == "rcnn":
    print(files.dumps(scores))
  return scores


if __name__ == "__main__":
  main(sys.argv)
