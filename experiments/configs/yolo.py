r"""YOLO v1 (Redmon et al. 2016): detection as one regression over an S x S grid.

  python -m experiments.train --config experiments/configs/classify.py:cpu --workdir /tmp/cls
  python -m experiments.train --config experiments/configs/yolo.py:cpu --workdir /tmp/yolo \
      --config.model.init_from=/tmp/cls
  python -m experiments.evaluate --config experiments/configs/yolo.py:cpu --workdir /tmp/yolo \
      --config.model.init_from=/tmp/cls

Presets (loss: the paper's eq. 3, terms coord/obj/noobj/cls, weights 5/1/0.5/1; change a term
with e.g. --config.model.loss.coord=giou or a "package.module:function" path):
  cpu:   the synthetic shapes at 128 x 128, S = 8, B = 2, batch 16 x 1300 steps, each generated
         image seen once. Departures, for a short schedule on 2 CPU cores: the lecture's tiny
         backbone (4 conv, started from the classify cpu run) + 3 new conv layers instead of
         20 + 4; batch norm after the new layers, no dropout; the hidden fc (512) and output
         layers applied per cell as 1 x 1 convolutions (head "conv", as YOLO v2); Adam (lr 2e-3,
         coupled L2 5e-4, warm-up 100 steps, cosine) instead of SGD; horizontal flips only.
  paper: the paper's network (24 conv + 2 fc, 448 x 448, S = 7, B = 2, C = 20) on VOC 2007
         trainval, bfloat16; the first 20 conv layers (backbone "yolo20") from a classify run
         at 224 px (classify.py:paper with --config.model.backbone=yolo20
         --config.model.input_size=224, then --config.model.init_from=<that run>), or the
         paper's "YOLO VGG-16": --config.model.backbone=vgg16 --config.model.pretrained=FILE.
         SGD momentum 0.9, weight decay 5e-4, lr 1e-3 -> 1e-2 warm-up then / 10 twice, dropout
         0.5, scale/translate 20%, exposure/saturation 1.5x. Departure: VOC 2007 only (the
         paper: 2007 + 2012, ~135 epochs at batch 64).
Measured results: BENCHMARKS.md.
"""

from __future__ import annotations

from experiments.configs import common


def get_config(preset: str = "cpu"):
  config = common.base_config(preset)
  cpu = preset == "cpu"
  config.system = "yolo"
  config.model = {
      "variant": "tiny" if cpu else "paper",
      "backbone": "" if cpu else "yolo20",   # paper: the pretrainable first 20 conv layers
      "num_classes": 6 if cpu else 20,
      "grid_size": 8 if cpu else 7,
      "num_boxes": 2,
      "fc_dim": 0,                      # the variant's: 512 (tiny, small), 4096 (paper)
      "head": "conv" if cpu else "fc",  # cpu: the fc layers per cell (see Measured)
      "dropout_rate": 0.0 if cpu else 0.5,
      "batch_norm": cpu,
      # variant "tiny": the backbone of experiments/configs/classify.py:cpu (the same kw)
      "backbone_kw": {"stride": 8, "widths": (16, 32, 64, 64), "fc_features": (128, 128),
                      "roi_size": 4, "dropout_rate": 0.3} if cpu else {},
      "init_from": "",                  # a finished classify run of the backbone (cpu: the
                                        # lecture's; paper: classify.py:paper, backbone yolo20)
      "pretrained": "",                 # paper with backbone vgg16: torchvision weights file
      "loss": {"coord": "l2", "coord_weight": 5.0, "obj": "squared_error", "obj_weight": 1.0,
               "noobj": "squared_error", "noobj_weight": 0.5,
               "cls": "squared_error_onehot", "cls_weight": 1.0},
      "predict": {"score_threshold": 0.005, "iou_threshold": 0.5, "max_detections": 100,
                  "pre_nms_topk": 0},
  }
  config.data.resize.mode = "square"
  config.data.resize.square_size = 128 if cpu else 448
  config.data.augment.hflip = True
  config.data.augment.scale_translate = 0.0 if cpu else 0.2
  config.data.augment.hsv = 1.0 if cpu else 1.5
  if cpu:
    config.data.num_train = 20_800       # = batch x steps: each generated image seen once

  config.train.batch_size = 16 if cpu else 64
  config.train.num_steps = 1300 if cpu else 40_000
  config.train.log_every = 50 if cpu else 100
  steps = config.train.num_steps
  opt = config.optimizer
  opt.weight_decay = 5e-4               # cpu: coupled L2, added to the gradient before Adam
  if cpu:
    opt.name = "adam"
    opt.learning_rate = 2e-3
    opt.schedule = "cosine"
    opt.warmup_steps = 100
    opt.warmup_factor = 0.1
  else:
    opt.name = "sgd"
    opt.momentum = 0.9
    opt.learning_rate = 1e-2
    opt.schedule = "step"
    opt.warmup_steps = steps // 15
    opt.warmup_factor = 0.1              # 1e-3 -> 1e-2
    opt.decay_steps = (int(steps * 0.75), int(steps * 0.9))
    opt.decay_factor = 0.1
  config.eval.every_steps = 0 if cpu else 5_000   # cpu: only the final evaluation
  return common.finalize(config)
