r"""Detection by classifying sliding windows (the brute-force baseline), VOC07 mAP.

    python -m experiments.train --config experiments/configs/windows.py:cpu --workdir /tmp/windows

A window classifier (C classes + background) trained on windows sampled from the images, run
densely at several scales with its fc layers as convolutions; each window is a detection of
its own box; per-class NMS. Presets: cpu (tiny net, 32 px windows, synthetic shapes), paper
(AlexNet windows on VOC 2007).

paper preset (windows.py and overfeat.py): VOC 2007, images rescaled to shorter side 480
(longer <= 800), 223 px windows (the smallest input at which AlexNet's fc6 reads 6 x 6 pool5
cells; jaxdet.models.overfeat.network_geometry) 32 px apart at 5 scales, bfloat16. The start
is ImageNet: OverFeat's own fast network has no public weights, so torchvision's AlexNet
stands in (`--config.model.pretrained=/path/alexnet.pth|.npz`, jaxdet.models.torch_weights).
It departs from OverFeat-fast in its first layers (11 x 11 / 4 conv with padding 2 and 64
filters, 3 x 3 / 2 overlapping pools, instead of valid convolutions with 96 filters and 2 x 2
pools; 256 conv5 filters instead of 1024; fc6 4096 instead of 3072). OverFeat-fast itself:
`--config.model.backbone=overfeat_fast --config.model.init_from=<classify.py:paper run>` (231
px windows).
    python -m experiments.train --config experiments/configs/windows.py:paper --workdir W \
        --config.model.pretrained=/path/alexnet.npz

cpu preset (since this revision): rectangular windows, scales (1.5, 1.0, 0.7, 0.5) x
aspect_ratios (0.67, 1, 1.5) (anisotropic resizing: the best window has IoU >= 0.7 with 78% of
the test objects instead of 48%), training windows drawn from that test-time grid with
anchor-style labels (train_windows "grid": IoU >= 0.6 or an object's best window: its class;
< 0.45 background; 3/8 positives, 1/4 hard negatives of IoU >= 0.1), each cropped with one
feature cell (8 px at the network's scale) of surroundings (context 1: the classifier sees what
the dense map's features see at test time), conv + fc from the classify cpu run
(model.init_from; lecture8 Stage init_from="classify"), Adam 1e-3 cosine, 600 steps x 16
images x 16 windows: VOC07 mAP 0.745 (AP75 0.098), 158 s CPU; 420 steps: 0.674 (119 s).

Measured on the 256 synthetic test images (process CPU user+sys of the train command on one
core, final test eval included, eval.every_steps=0; machine shared with other work, so test
images/s are rough: the 12 window grids cost about 3x the previous 4 at test time):

  variant                                                     VOC07   AP75   CPU s
  previous preset (square, jitter windows, pos 0.5 / neg 0.3,  0.54   0.03    190
    1500 steps, lr 2e-3; lecture run)
  rect, jitter windows, pos 0.6 / neg 0.4, 1000 steps          0.455  0.045   123
  rect, jitter 0.3, pos 0.7 / neg 0.5                          0.176  0.028   129
  rect, jitter 0.3, soft_labels, pos 0.8 / neg 0.4             0.377  0.037   122
  rect, grid windows, pos 0.6 / neg 0.45, scratch, 1000 steps  0.527  0.045   125
    same checkpoint, test sizes (1.3, 0.9, 0.6)                0.555 (test-time only)
    same checkpoint, sizes (1.2, 0.8, 0.55) / (1.25, 0.75)     0.496 / 0.518
    same checkpoint, NMS 0.2 / 0.45 (0.3 in the preset)        0.523 / 0.494
    same checkpoint, class-agnostic NMS 0.3 / 0.5              0.502 / 0.453
    same checkpoint, on 256 training images                    0.583
  grid + init_from, lr 1e-3, 800 steps (context 0)             0.527  0.023   111
    same, grid_shares (0.25, 0.5)                              0.522  0.020   107
  this preset: same + context 1, 600 steps (two runs sharing   0.745  0.098   158
    the core)
  the same, 420 steps                                          0.674  0.076   119
  scales (1.3, 0.9, 0.6) in training and test, scratch, lr     0.509  0.041   110
    2e-3, 900 steps

    python -m experiments.train --config experiments/configs/windows.py:cpu --workdir W \
        --config.model.init_from=CLASSIFY_RUN
    (variants: --config.model.KEY=VALUE, --config.train.num_steps, ...)

Before context (the runs above it): for each test object, the best-scoring window over it
(IoU > 0.2) has IoU >= 0.5
for 72% (previous preset), 73% (rect, jitter), 78% (rect, grid). The classifier now limits: of
the 300 best detections on 128 test images (grid run), 42% are correct; 1/3 of the rest are
confident detections of the wrong class on windows partly over an object (parts of a
rectangle, diamond or triangle look alike), 1/6 background, 1/6 badly placed windows; crops
with context let the classifier see the rest of the object.
Earlier: 7 square scales 0.53; pos_iou 0.6 / neg_iou 0.4 with warm-up and 65536 fresh images
0.44 (236 s); square windows from the classify run, 800 steps at lr 2e-3 0.42 (115 s).
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
        "aspect_ratios": (0.67, 1.0, 1.5),  # window width / height, each at every scale
        "jitter": 0.2,                    # train_windows "jitter" only
        "pos_iou": 0.6, "neg_iou": 0.45, "soft_labels": False,
        "train_windows": "grid",          # drawn from the test-time windows (anchor-style)
        "grid_shares": (0.375, 0.25),     # grid: positive and hard negative shares
        "context": 1,                     # feature cells of surroundings in training crops
        "score_threshold": 0.05, "iou_threshold": 0.3, "max_detections": 50,
        "init_from": "",   # a finished classify run (same backbone): conv + fc start from it
    }
  return {
      # torchvision's AlexNet stands in for OverFeat-fast, whose ImageNet weights were never
      # published (see the module docstring)
      "backbone": "alexnet",
      "backbone_kw": {},
      "pretrained": "",   # a local torchvision alexnet weights file (.pth / .npz)
      "num_windows": 32,
      # shorter sides 240..672 px of a 480 px image: every scale keeps it above the window
      "scales": (0.5, 0.7, 1.0, 1.4),
      "aspect_ratios": (1.0,),
      "jitter": 0.2,
      "pos_iou": 0.5, "neg_iou": 0.3, "soft_labels": False,
      "train_windows": "jitter",
      "grid_shares": (0.375, 0.25),
      "context": 0,
      "score_threshold": 0.05, "iou_threshold": 0.3, "max_detections": 100,
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
  return common.finalize(window_config(preset, "windows"))
