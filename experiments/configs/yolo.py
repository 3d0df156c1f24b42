r"""YOLO v1 (Redmon et al. 2016): detection as one regression over an S x S grid.

  python -m experiments.train --config experiments/configs/classify.py:cpu --workdir /tmp/cls
  python -m experiments.train --config experiments/configs/yolo.py:cpu --workdir /tmp/yolo \
      --config.model.init_from=/tmp/cls
  python -m experiments.evaluate --config experiments/configs/yolo.py:cpu --workdir /tmp/yolo \
      --config.model.init_from=/tmp/cls
  python -m experiments.train --config experiments/configs/yolo.py:paper --workdir /tmp/yolo_voc

Presets:
  cpu:   the "tiny" variant: the lecture's shared tiny backbone (4 conv layers, widths 16-64,
         stride 8; experiments/configs/classify.py:cpu), started from that classification run
         (`--config.model.init_from=<classify workdir>`; in the lecture, R-CNN's pretraining
         run) as the paper starts its first 20 conv layers from ImageNet, then 3 new conv layers
         (3 x 3 x 128, a 2 x 2 max pool after the first; batch norm, leaky ReLU 0.1) and the two
         fc layers (hidden 512, leaky ReLU; output 5B + C) applied to each cell; the synthetic
         shapes at their own 128 x 128 pixels, S = 8 (the last conv map: 8 x 8), B = 2;
         batch 16, 1300 steps over 20800 distinct generated images (each seen once).
         Departures from the paper, all for a short schedule on 2 CPU cores:
         * network: 4 pretrained + 3 new conv layers (widths 16-128) instead of 20 + 4
           (64-1024); the hidden fc layer (512 instead of 4096) and the output layer run on
           each cell's 128 features alone, shared by all cells (`model.head = "conv"`, 1 x 1
           convolutions, as YOLO v2), instead of on the whole flattened map (the paper's fc);
         * pretraining on 32 px object crops (objects ~27 px; here 19-58 px) for 600 steps;
         * batch normalisation after the new conv layers (YOLO v2 added it), no dropout;
         * Adam (lr 2e-3, coupled L2 5e-4, linear warm-up over 100 steps, cosine decay) instead
           of SGD with momentum, warm-up and step decay;
         * augmentation: horizontal flips only (the paper also scales and translates by up to
           20% and jitters exposure and saturation by up to 1.5x); the procedural training set
           is as large as the schedule, so no image repeats.
         Measured (seed 0; CPU = user + sys of the train command under /usr/bin/time, pinned to
         one core of a 2-core machine shared with other runs, load 5-7, which inflates sys):
           python -m experiments.train --config experiments/configs/yolo.py:cpu --workdir W \
               --config.model.init_from=out/lecture8/work/classify [overrides below]
           python -m experiments.evaluate --config experiments/configs/yolo.py:cpu --workdir W \
               --config.model.init_from=out/lecture8/work/classify
         VOC07 mAP@0.5 on the 256 synthetic test images:
         * this preset (1300 steps, num_train 20800): 0.774 (COCO AP50 0.800, AP 0.374);
           175 s CPU (145 user + 31 sys); seed 1: 0.766 (COCO AP50 0.789, AP 0.357); 173 s CPU;
         * 1000 steps (num_train 16000): 0.736 (COCO AP50 0.760, AP 0.324); 131 s CPU (109
           user + 22 sys), 143 s wall; seed 1 (--config.seed=1): 0.753; 130 s CPU; in the
           lecture run on both cores (unpinned): 0.712, 146 s CPU, hence the longer preset;
         * the paper's fc head (the 8 x 8 x 128 map flattened -> 512 -> 8 x 8 x 16; head "fc"),
           1300 steps: 0.030; 195 s CPU; its class term stayed at chance (0.86 per
           object at step 1200) and its mean IoU at 0.52 (4.7 M fc weights, against 74 k per
           cell);
         * lr 1e-3, 1300 steps: 0.705 (COCO AP50 0.718, AP 0.301); 182 s CPU; the class
           term per object at step 1200: 0.34 (lr 2e-3: 0.28; chance 0.83);
         * lr 1e-3, 1000 steps (num_train 16000): 0.623; 142 s CPU;
         * lr 1e-3, one new conv layer (3 x 3 x 128 + pool) instead of 3, 1000 steps: 0.236;
           115 s CPU; the class term (per object ~0.59 at the end vs 0.42 with 3 layers; 0.83
           at chance) learns much more slowly: the pretrained features alone hold little class
           evidence at an object's cell (a linear probe on the frozen conv features around the
           object's centre cell: 63% class accuracy at 128 px, 36% at 64 px; chance 17%);
         * lr 1e-3, one new conv layer, 64 x 64, S = 4, batch 32 x 1500 (num_train 48000): paper
           fc head 0.162 (122 s CPU), per-cell head 0.222 (113 s CPU); at 64 px the objects
           (10-29 px) are smaller than in the crops the backbone was pretrained on;
         * lr 1e-3, one new conv layer, 96 x 96, S = 6, fc head, batch 32 x 1500: 0.279;
           235 s CPU.
         Not tried: the fc head at a lower learning rate, freezing the pretrained layers or a
         lower learning rate for them, scale / exposure augmentation.
         The previous preset, the 7-conv "small" variant from scratch (64 x 64, S = 4, batch
         norm, fc head, batch 32 x 3000 over 96000 images): 0.256 (train 0.257), 242 s CPU;
         its class term stayed near chance. Its earlier variants: batch 16 over 2048 images
         0.075 (train 0.67, memorised; 180 s); batch 16 over 48000 images 0.171 (152 s); the
         same with dropout 0.5 and scale/translate 0.2: 0.075 (176 s); 96 x 96, S = 6, 1500
         steps: 0.061 (173 s).
  paper: the paper's network (24 conv + 2 fc, 448 x 448, S = 7, B = 2, C = 20) on VOC 2007,
         bfloat16: its first 20 conv layers are the "yolo20" backbone
         (jaxdet.models.backbones.yolo20), pretrained on ImageNet at 224 as in the paper by
         the classify system, then loaded with model.init_from:
           python -m experiments.train --config experiments/configs/classify.py:paper \
               --workdir /tmp/y20 --config.model.backbone=yolo20 --config.model.input_size=224
           python -m experiments.train --config experiments/configs/yolo.py:paper \
               --workdir /tmp/yolo_voc --config.model.init_from=/tmp/y20
         No public weights exist for these 20 layers (darknet's are in its own format). The
         documented alternative, the paper's "YOLO VGG-16" (table 1), starts from torchvision:
           --config.model.backbone=vgg16 --config.model.pretrained=/path/vgg16.npz
         (VGG16's conv5_3, a 2 x 2 max pool, then the paper's last 4 conv layers). The paper
         trained ~135 epochs on VOC 2007+2012 with batch 64; this preset uses VOC 2007
         trainval.

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
