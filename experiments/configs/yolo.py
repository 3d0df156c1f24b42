r"""YOLO v1 (Redmon et al. 2016): detection as one regression over an S x S grid.

  python -m experiments.train --config experiments/configs/yolo.py:cpu --workdir /tmp/yolo
  python -m experiments.train --config experiments/configs/yolo.py:paper --workdir /tmp/yolo_voc

Presets:
  cpu:   the small network (7 conv + 2 fc) on the synthetic shapes resized to 64 x 64, S = 4,
         B = 2; batch 32, 3000 steps over 96000 distinct generated images (each seen once).
         Departures from the paper, all for a short from-scratch schedule on 2 CPU cores:
         * network: 7 conv layers (widths 16-128) instead of 24 (64-1024), fc 512 instead of
           4096, first conv 5 x 5 stride 2 (the paper's: 7 x 7 stride 2), last conv map 4 x 4
           (stride 16) = S x S as in the paper (7 x 7 at 448);
         * input 64 x 64 (the 128-pixel images halved; objects 10-29 pixels) and S = 4: a
           training step costs a quarter of one at 128 pixels, and each of the S x S cells'
           fc outputs sees an object 4x more often than at S = 8 (collisions of two object
           centres in one cell drop the later object, as in the paper);
         * batch normalisation after each conv (YOLO v2 added it), no ImageNet pretraining;
         * no dropout and no scale / translation augmentation: the procedural training set is
           made as large as the schedule (data.num_train = 96000), so no image repeats and
           nothing is memorised; the paper's regularisers only slow the fit (see Measured);
         * Adam (lr 1e-3, coupled L2 5e-4, linear warm-up over 100 steps, cosine decay) instead
           of SGD with momentum, warm-up and step decay;
         * augmentation: horizontal flips only (the paper also scales and translates by up to
           20% and jitters exposure and saturation by up to 1.5x).
         Measured (seed 0, shared 2-core machine under load 15-20; CPU = user + sys of train):
           python -m experiments.train --config experiments/configs/yolo.py:cpu --workdir W
           python -m experiments.evaluate --config experiments/configs/yolo.py:cpu --workdir W
         VOC07 mAP@0.5 on the 256 synthetic test images / on the first 256 training images:
         * this preset (batch 32, num_train 96000): test 0.256 (COCO AP50 0.236), train 0.257;
           242 s CPU, 324 s wall;
         * batch 16, num_train 2048 (the old preset): test 0.075, train 0.67 (memorised);
           180 s CPU, 429 s wall;
         * batch 16, num_train 48000: test 0.171, train 0.181; 152 s CPU, 214 s wall;
         * batch 16, num_train 48000, dropout 0.5, scale_translate 0.2: test 0.075; 176 s CPU;
         * the same at 96 x 96, S = 6, 1500 steps: test 0.061; 173 s CPU, 435 s wall.
         Train and test now agree: the gap is gone and the model UNDER-fits (its class loss
         stays near chance after 3000 steps); still far BELOW the lecture's 0.7 target. A step
         at batch 32 costs about as much as at batch 16 (fixed per-step overhead), so more
         images per step is the cheapest lever; next: longer schedules or larger batches.
  paper: the paper's network (24 conv + 2 fc, 448 x 448, S = 7, B = 2, C = 20) on VOC 2007,
         bfloat16. The paper pretrained the first 20 conv layers on ImageNet at 224 and
         trained ~135 epochs on VOC 2007+2012 with batch 64; this preset trains from scratch on
         VOC 2007 trainval.

Recipe of the paper preset (paper, section 2.2): SGD momentum 0.9, weight decay 5e-4; the
learning rate rises linearly from 1e-3 to 1e-2 over the first epochs, then is divided by 10
twice; dropout 0.5 after the first fc layer; augmentation: random scaling and translation of up
to 20% of the image size, exposure and saturation up to 1.5x in HSV (and horizontal flips).
Loss weights (both presets): lambda_coord = 5, lambda_noobj = 0.5.
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
      "grid_size": 4 if cpu else 7,
      "num_boxes": 2,
      "fc_dim": 0,                      # the variant's: 512 (small), 4096 (paper)
      "dropout_rate": 0.0 if cpu else 0.5,
      "batch_norm": cpu,
      "loss": {"lambda_coord": 5.0, "lambda_noobj": 0.5, "lambda_obj": 1.0,
               "lambda_class": 1.0},
      "predict": {"score_threshold": 0.005, "iou_threshold": 0.5, "max_detections": 100,
                  "pre_nms_topk": 0},
  }
  config.data.resize.mode = "square"
  config.data.resize.square_size = 64 if cpu else 448
  config.data.augment.hflip = True
  config.data.augment.scale_translate = 0.0 if cpu else 0.2
  config.data.augment.hsv = 1.0 if cpu else 1.5
  if cpu:
    config.data.num_train = 96_000       # = batch x steps: each generated image seen once

  config.train.batch_size = 32 if cpu else 64
  config.train.num_steps = 3000 if cpu else 40_000
  config.train.log_every = 50 if cpu else 100
  steps = config.train.num_steps
  opt = config.optimizer
  opt.weight_decay = 5e-4               # cpu: coupled L2, added to the gradient before Adam
  if cpu:
    opt.name = "adam"
    opt.learning_rate = 1e-3
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
