r"""OverFeat: dense multi-scale windows, per-class box regression and greedy box merging.

    python -m experiments.train --config experiments/configs/overfeat.py:cpu --workdir /tmp/overfeat

The window classifier of windows.py plus a box regressor (L2 on window-relative boxes); at test
time the fc layers run as convolutions over each scale, every window's box is mapped back to the
image, and boxes of the same class are merged (OverFeat section 4.3). Scored with VOC07 mAP.

cpu preset, measured on the 256 synthetic test images (not yet at the lecture's 0.7): VOC07
mAP@0.5 0.35, COCO AP 0.14 after 800 steps. The regressor stays coarse (training L2 of the
window-relative box ~0.08: about 0.15 window sides per coordinate), and merging averages those
boxes. Tried, not better: pos_iou 0.6 / neg_iou 0.4 with Adam warm-up and 65536 fresh images,
1500 steps 0.32 (239 s process CPU); conv + fc from the classify preset (init_from), 800 steps
0.22; at test, score_threshold 0.3 or merge_threshold 0.4 / 0.8 change mAP by < 0.03.
"""

from experiments.configs import common
from experiments.configs import windows


def get_config(preset: str = "cpu"):
  config = common.base_config(preset)
  config.system = "overfeat"
  model = windows.model_config(preset)
  model.update({
      "box_head": "per_class",     # "per_class" | "agnostic"
      "box_iou": 0.4,              # windows regressing a box: best IoU >= this
      "box_weight": 1.0,
      "box_coding": "window",      # "window" (OverFeat's, L2) | "deltas" (R-CNN's, smooth L1)
      "post_process": "merge",     # "merge" (OverFeat 4.3) | "nms" (per-class, iou_threshold)
      "pre_merge_topk": 128,
      "merge_threshold": 0.6,
      "score_threshold": 0.1,
  })
  config.model = model
  if preset == "cpu":
    config.train.num_steps = 1500
    config.train.batch_size = 16
    config.eval.every_steps = 500
    config.checkpoint.every_steps = 500
    config.optimizer.name = "adam"
    config.optimizer.learning_rate = 2e-3
    config.optimizer.weight_decay = 1e-4
    config.optimizer.schedule = "cosine"
  else:
    config.data.resize.mode = "min_size"
    config.data.resize.min_sizes = (480,)
    config.data.resize.max_size = 800
    config.optimizer.learning_rate = 0.01
    config.optimizer.decay_steps = (30_000,)
  return common.finalize(config)
