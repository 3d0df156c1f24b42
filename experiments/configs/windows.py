r"""Detection by classifying sliding windows (the brute-force baseline), VOC07 mAP.

    python -m experiments.train --config experiments/configs/windows.py:cpu --workdir /tmp/windows

A window classifier (C classes + background) trained on windows sampled from the images, run
densely at several scales with its fc layers as convolutions; each window is a detection of
its own box; per-class NMS. Presets: cpu (tiny net, 32 px windows, synthetic shapes), paper
(OverFeat-fast windows on VOC 2007).

cpu preset, measured on the 256 synthetic test images (not yet at the lecture's 0.7): VOC07
mAP@0.5 0.54, COCO AP 0.16, AP75 0.03 after 1500 steps. The window grid is not the limit (the
4 scales hold a window with IoU >= 0.5 for 99.6% of the test objects, >= 0.7 for 48%); the
classifier's score does not single out the best-placed window. Tried, not better: 7 scales
(1.6 ... 0.5) at test 0.53; pos_iou 0.6 / neg_iou 0.4 with Adam warm-up (100 steps, lr 1e-3)
and 65536 fresh images 0.44 (0.48 with 7 scales; 236 s process CPU, 1650 s wall at load ~19);
starting conv + fc from the classify preset (init_from), 800 steps 0.42 (115 s CPU).
"""

from experiments.configs import common


def model_config(preset: str) -> dict:
  """The window network and its test-time settings (keys: jaxdet.models.overfeat)."""
  if preset == "cpu":
    return {
        "backbone": "tiny",
        "backbone_kw": {"stride": 8, "widths": (16, 32, 64, 64), "fc_features": (128, 128),
                        "roi_size": 4, "dropout_rate": 0.3},   # 32 px windows, step 8 px
        "num_windows": 16,
        "scales": (1.5, 1.0, 0.7, 0.5),   # 32 px windows see objects of 21..64 px
        "aspect_ratios": (1.0,),          # window width / height, each at every scale
        "jitter": 0.2,
        "pos_iou": 0.5, "neg_iou": 0.3, "soft_labels": False,
        "train_windows": "jitter",        # "grid": drawn from the test-time windows
        "score_threshold": 0.05, "iou_threshold": 0.3, "max_detections": 50,
        "init_from": "",   # a finished classify run (same backbone): conv + fc start from it
    }
  return {
      "backbone": "overfeat_fast",
      "backbone_kw": {},
      "num_windows": 32,
      "scales": (0.4, 0.55, 0.75, 1.0, 1.4),
      "aspect_ratios": (1.0,),
      "jitter": 0.2,
      "pos_iou": 0.5, "neg_iou": 0.3, "soft_labels": False,
      "train_windows": "jitter",
      "score_threshold": 0.05, "iou_threshold": 0.3, "max_detections": 100,
      "init_from": "",
  }


def get_config(preset: str = "cpu"):
  config = common.base_config(preset)
  config.system = "windows"
  config.model = model_config(preset)
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
