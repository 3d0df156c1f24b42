r"""Detection by classifying sliding windows (the brute-force baseline), VOC07 mAP.

    python -m experiments.train --config experiments/configs/windows.py:cpu --workdir /tmp/windows \
        [--config.model.init_from=<classify.py:cpu run>]   (lecture8 starts it so)
    python -m experiments.train --config experiments/configs/windows.py:paper --workdir W \
        --config.model.pretrained=/path/alexnet.npz

A window classifier (background + C classes) trained on windows cropped from the images, run
densely at several scales with its fc layers as convolutions; each window is a detection of its
own box; per-class NMS (keys: jaxdet.models.windows.Settings).
cpu: tiny net, 32 px windows 8 px apart, scales (1.5, 1, 0.7, 0.5) x aspect ratios (0.67, 1,
1.5) (anisotropic resizing), training windows drawn from that test-time grid with anchor-style
labels (sampling.train_windows "grid"), crops with one feature cell of context, synthetic shapes.
paper (windows.py and overfeat.py): VOC 2007, shorter side 480, 223 px windows 32 px apart at 4
scales. Departures: torchvision's AlexNet stands in for OverFeat-fast (no public weights: 11 x 11
/ 4 conv with 64 filters and overlapping pools instead of 96 filters and 2 x 2 pools, 256 conv5
filters instead of 1024, fc6 4096 instead of 3072); OverFeat-fast itself:
--config.model.backbone=overfeat_fast --config.model.init_from=<classify.py:paper run> (231 px).
Measured results: BENCHMARKS.md.
"""

from experiments.configs import common


def model_config(preset: str) -> dict:
  """What windows and overfeat share: the network, its window shapes and training windows
  (keys: jaxdet.models.overfeat.WindowSettings)."""
  if preset == "cpu":
    return {
        "backbone": "tiny",
        "backbone_kw": {"stride": 8, "widths": (16, 32, 64, 64), "fc_features": (128, 128),
                        "roi_size": 4, "dropout_rate": 0.3},   # 32 px windows, step 8 px
        "scales": (1.5, 1.0, 0.7, 0.5),   # 32 px windows see objects of 21..64 px
        "aspect_ratios": (0.67, 1.0, 1.5),  # window width / height, each at every scale
        "sampling": {
            "train_windows": "grid",      # drawn from the test-time windows (anchor-style)
            "num_windows": 16,
            "pos_iou": 0.6, "neg_iou": 0.45,
            "grid_shares": (0.375, 0.25),   # positive and hard negative shares
            "context": 1,                 # feature cells of surroundings in training crops
        },
        "init_from": "",   # a finished classify run (same backbone): conv + fc start from it
    }
  return {
      # torchvision's AlexNet stands in for OverFeat-fast, whose ImageNet weights were never
      # published (see the module docstring)
      "backbone": "alexnet",
      "backbone_kw": {},
      "pretrained": "",   # a local torchvision alexnet weights file (.pth / .npz)
      # shorter sides 240..672 px of a 480 px image: every scale keeps it above the window
      "scales": (0.5, 0.7, 1.0, 1.4),
      "aspect_ratios": (1.0,),
      "sampling": {"train_windows": "jitter", "num_windows": 32, "jitter": 0.2,
                   "pos_iou": 0.5, "neg_iou": 0.3, "context": 0},
      "init_from": "",
  }


def window_config(preset: str, system: str):
  """The unlocked config of a window system ("windows" or "overfeat"): model_config(preset)
  and the schedule both systems train with."""
  config = common.base_config(preset)
  config.system = system
  config.model = model_config(preset)
  if preset == "cpu":
    config.train.num_steps = 600
    config.train.batch_size = 16
    config.eval.every_steps = 0
    config.checkpoint.every_steps = 500
    config.optimizer.name = "adam"
    config.optimizer.learning_rate = 1e-3
    config.optimizer.weight_decay = 1e-4
    config.optimizer.schedule = "cosine"
  else:
    config.data.resize.mode = "shorter_side"   # the window scales then rescale each image
    config.data.resize.min_sizes = (480,)
    config.data.resize.max_size = 800
    config.data.group_by_aspect = True         # no 800 x 800 batches of 480 x 800 images
    config.optimizer.learning_rate = 0.01
    config.optimizer.decay_steps = (30_000,)
  return config


def get_config(preset: str = "cpu"):
  config = window_config(preset, "windows")
  config.model.predict = {"score_threshold": 0.05, "iou_threshold": 0.3,   # per-class NMS
                          "max_detections": 50 if preset == "cpu" else 100}
  config.model.loss = {"cls": "softmax_cross_entropy", "cls_weight": 1.0}
  return common.finalize(config)
