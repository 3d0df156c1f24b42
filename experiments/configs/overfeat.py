r"""OverFeat: dense multi-scale windows, per-class box regression and greedy box merging.

    python -m experiments.train --config experiments/configs/overfeat.py:cpu --workdir /tmp/overfeat \
        [--config.model.init_from=<classify.py:cpu run>]   (lecture8 starts it so)
    python -m experiments.train --config experiments/configs/overfeat.py:paper --workdir W \
        --config.model.pretrained=/path/alexnet.npz

The window classifier of windows.py plus a per-class box regressor; at test time the fc layers
run as convolutions over each scale, every window's box is mapped back to the image, and boxes
of the same class are merged (OverFeat section 4.3). Scored with VOC07 mAP (keys:
jaxdet.models.overfeat.Settings).
cpu: windows.py's cpu network and training windows; R-CNN's deltas (box_coding "deltas") with
smooth L1 (loss.box) at weight 0.3 on windows of IoU >= 0.45, merging at 0.7.
paper: windows.py's (VOC 2007, shorter side 480, torchvision's AlexNet standing in for
OverFeat-fast, whose weights were never published) plus OverFeat's window coding with L2 on
windows of IoU >= 0.4, merging at 0.6.
Departures from the paper (both presets): the box term is trained jointly with the classifier,
weighted (the paper trains the regressor on the classifier's frozen conv features); cpu also
regresses deltas with smooth L1 and trains on the test-time grid windows (anchor-style labels).
Measured results: BENCHMARKS.md.
"""

from experiments.configs import common
from experiments.configs import windows


def get_config(preset: str = "cpu"):
  config = windows.window_config(preset, "overfeat")   # the windows net and its schedule
  cpu = preset == "cpu"
  config.model.sampling.box_iou = 0.45 if cpu else 0.4   # windows regressing a box: IoU >= this
  config.model.box_coding = "deltas" if cpu else "window"   # R-CNN's | OverFeat's
  config.model.predict = {"score_threshold": 0.1, "pre_merge_topk": 128,
                          "merge_threshold": 0.7 if cpu else 0.6,   # OverFeat 4.3
                          "max_detections": 50 if cpu else 100}
  config.model.loss = {"cls": "softmax_cross_entropy", "cls_weight": 1.0,
                       "box": "smooth_l1" if cpu else "l2", "box_weight": 0.3 if cpu else 1.0}
  return common.finalize(config)
