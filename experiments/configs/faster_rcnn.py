r"""Faster R-CNN (Ren et al. 2015): a Region Proposal Network on the shared conv features.

  python -m experiments.train --config experiments/configs/classify.py:cpu --workdir /tmp/cls
  python -m experiments.train --config experiments/configs/faster_rcnn.py:cpu --workdir /tmp/frcnn \
      --config.model.init_from=/tmp/cls        # evaluate: experiments.evaluate, same flags
  python -m experiments.train --config experiments/configs/faster_rcnn.py:paper --workdir /tmp/v
  # the 4-step alternating training (steps in /tmp/alt/<step>, each resumable):
  python -m experiments.train --config experiments/configs/faster_rcnn.py:cpu \
      --workdir /tmp/alt --config.model.stage=alternating

cpu:   classify.py:cpu's tiny backbone (stride 8) from that run (`model.init_from`), 128 px
       synthetic shapes, anchors scaled to the image (16, 32, 64 x 0.5, 1, 2), proposals
       600 -> 128 (train) / 100 (test), 64 RoIs with background IoU from 0, approximate joint
       training, 1200 steps of 8 images, SGD lr 2e-2 with grad clipping; minutes on 2 cores.
paper: VGG16 (ImageNet weights from `model.pretrained`, conv1_1..conv2_2 frozen), shorter side
       600 (longer <= 1000), anchors 128, 256, 512 at stride 16; RPN 256 anchors (half
       positive, IoU 0.7 / 0.3), proposals 12000 -> 2000 / 6000 -> 300; 128 RoIs per image;
       batch 2, SGD lr 1e-3 for 50k steps then 1e-4 for 20k, bfloat16 (py-faster-rcnn end2end).
Stages (model.stage): "joint" (approximate joint training), "alternating" (the 4 steps of
`jaxdet.train.alternating`, `model.alternating_steps` each), or one step alone. Loss terms:
model.loss.cls, box, rpn_objectness, rpn_box (names of jaxdet.losses.TERMS or dotted paths),
weights model.loss.<term>_weight.
"""

from __future__ import annotations

from experiments.configs import common


def get_config(preset: str = "cpu"):
  config = common.base_config(preset)
  cpu = preset == "cpu"
  config.system = "faster_rcnn"
  config.model = {
      "num_classes": config.num_classes,
      "stage": "joint",              # "alternating": the paper's 4-step training instead
      # steps 1-4 of "alternating" (paper: py-faster-rcnn's alt_opt VOC schedule)
      "alternating_steps": (600, 600, 300, 300) if cpu else (80_000, 40_000, 80_000, 40_000),
      "backbone": "tiny" if cpu else "vgg16",
      "backbone_kw": {"stride": 8, "widths": (16, 32, 64, 64),
                      "fc_features": (128, 128), "roi_size": 4} if cpu else {},
      "pretrained": "",              # paper: a torchvision vgg16 weights file
      "init_from": "",               # a finished classify run (same backbone): conv + fc
      "frozen": () if cpu else ("conv1_1", "conv1_2", "conv2_1", "conv2_2"),
      "dropout_rate": 0.0 if cpu else 0.5,
      "rpn_channels": 128 if cpu else 512,
      "anchor_scales": (16.0, 32.0, 64.0) if cpu else (128.0, 256.0, 512.0),
      "anchor_ratios": (0.5, 1.0, 2.0),
      "rpn_targets": {"pos_iou": 0.7, "neg_iou": 0.3, "num_samples": 256,
                      "positive_fraction": 0.5, "allowed_border": 0.0},
      "rpn_proposals": {
          "train": {"pre_nms_topk": 600 if cpu else 12000,
                    "post_nms_topk": 128 if cpu else 2000, "nms_threshold": 0.7,
                    "min_size": 4.0 if cpu else 16.0},
          "test": {"pre_nms_topk": 600 if cpu else 6000, "post_nms_topk": 100 if cpu else 300,
                   "nms_threshold": 0.7, "min_size": 4.0 if cpu else 16.0}},
      "sampler": {"rois_per_image": 64 if cpu else 128, "fg_fraction": 0.25, "fg_iou": 0.5,
                  "bg_iou_high": 0.5, "bg_iou_low": 0.0 if cpu else 0.1, "add_gt": True},
      "loss": {"cls": "softmax_cross_entropy", "cls_weight": 1.0,
               "box": "smooth_l1", "box_weight": 1.0,
               "rpn_objectness": "sigmoid_binary_cross_entropy",
               "rpn_objectness_weight": 1.0,
               "rpn_box": "smooth_l1_rpn", "rpn_box_weight": 1.0},
      "predict": {"score_threshold": 0.01 if cpu else 0.05, "iou_threshold": 0.3,
                  "max_detections": 100, "pre_nms_topk": 0},
  }
  if not cpu:
    config.data.resize.mode = "shorter_side"
    config.data.resize.min_sizes = (600,)
    config.data.resize.max_size = 1000
    config.data.group_by_aspect = True   # batches fit 600 x 1000 or 1000 x 600, not 1000 x 1000
  config.data.augment.hflip = True

  config.train.batch_size = 8 if cpu else 2
  config.train.num_steps = 1200 if cpu else 70_000
  config.train.log_every = 50 if cpu else 100
  steps = config.train.num_steps
  opt = config.optimizer
  opt.name = "sgd"
  opt.momentum = 0.9
  opt.weight_decay = 1e-4 if cpu else 5e-4
  opt.learning_rate = 2e-2 if cpu else 1e-3
  opt.schedule = "step"
  opt.warmup_steps = 50 if cpu else 0
  opt.decay_steps = (int(steps * 0.8),) if cpu else (50_000,)
  opt.decay_factor = 0.1
  opt.grad_clip_norm = 10.0 if cpu else 0.0
  config.eval.every_steps = 0 if cpu else 10_000
  return common.finalize(config)
