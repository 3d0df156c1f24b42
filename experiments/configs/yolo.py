r"""YOLO v1 (Redmon et al. 2016): detection as one regression over an S x S grid.

  python -m experiments.train --config experiments/configs/yolo.py:cpu --workdir /tmp/yolo
  python -m experiments.train --config experiments/configs/yolo.py:paper --workdir /tmp/yolo_voc

Presets:
  cpu:   the small network (7 conv + 2 fc, 128 x 128 input, S = 7, B = 2) on the synthetic
         shapes; minutes on 2 CPU cores. Batch normalisation after each conv (not in the paper)
         lets it train from scratch with the paper's SGD recipe at this scale.
  paper: the paper's network (24 conv + 2 fc, 448 x 448, S = 7, B = 2, C = 20) on VOC 2007,
         bfloat16. The paper pretrained the first 20 conv layers on ImageNet at 224 and
         trained ~135 epochs on VOC 2007+2012 with batch 64; this preset trains from scratch on
         VOC 2007 trainval.

Recipe (paper, section 2.2), scaled to each preset: SGD momentum 0.9, weight decay 5e-4; the
learning rate rises linearly from 1e-3 to 1e-2 over the first epochs, then is divided by 10
twice; dropout 0.5 after the first fc layer; augmentation: random scaling and translation of up
to 20% of the image size, exposure and saturation up to 1.5x in HSV (and horizontal flips).
Loss weights: lambda_coord = 5, lambda_noobj = 0.5.
"""

from __future__ import annotations

from experiments.configs import common


def get_config(preset: str = "cpu"):
  config = common.base_config(preset)
  cpu = preset == "cpu"
  config.system = "yolo"
  config.model = {
      "variant": "small" if cpu else "paper",
      "num_classes": 6 if cpu else 20,
      "grid_size": 7,
      "num_boxes": 2,
      "fc_dim": 0,                      # the variant's: 512 (small), 4096 (paper)
      "dropout_rate": 0.5,
      "batch_norm": cpu,
      "loss": {"lambda_coord": 5.0, "lambda_noobj": 0.5, "lambda_obj": 1.0,
               "lambda_class": 1.0},
      "predict": {"score_threshold": 0.005, "iou_threshold": 0.5, "max_detections": 100,
                  "pre_nms_topk": 0},
  }
  config.data.resize.mode = "square"
  config.data.resize.square_size = 128 if cpu else 448
  config.data.augment.hflip = True
  config.data.augment.scale_translate = 0.2
  config.data.augment.hsv = 1.5

  config.train.batch_size = 32 if cpu else 64
  config.train.num_steps = 1500 if cpu else 40_000
  config.train.log_every = 50 if cpu else 100
  steps = config.train.num_steps
  opt = config.optimizer
  opt.name = "sgd"
  opt.momentum = 0.9
  opt.weight_decay = 5e-4
  opt.learning_rate = 1e-2
  opt.schedule = "step"
  opt.warmup_steps = steps // 15
  opt.warmup_factor = 0.1              # 1e-3 -> 1e-2
  opt.decay_steps = (int(steps * 0.75), int(steps * 0.9))
  opt.decay_factor = 0.1
  opt.grad_clip_norm = 10.0 if cpu else 0.0
  config.eval.every_steps = 500 if cpu else 5_000
  return common.finalize(config)
