r"""R-CNN (Girshick et al. 2014): selective search, warped regions, CNN, SVMs, box regression.

  python -m experiments.train --config experiments/configs/rcnn.py:cpu --workdir /tmp/rcnn
  python -m experiments.evaluate --config experiments/configs/rcnn.py:cpu --workdir /tmp/rcnn
  python -m experiments.train --config experiments/configs/rcnn.py:paper --workdir /tmp/rcnn_voc

Training runs in stages (experiments/rcnn_stages.py), each resumable, each output saved
atomically in the workdir: proposals (the on-disk selective search cache of each split),
fine-tuning (workdir/finetune, the ordinary training loop and its checkpoints), features
(workdir/stages/features_train.npz), SVMs with hard negative mining (stages/svm.npz), box
regression (stages/bbox_reg.npz), then evaluation with and without box regression (eval.json).

Presets:
  cpu:   the synthetic shapes (128 px images), selective search fast mode (at most 256
         proposals), the tiny backbone on 48 x 48 warped regions (context 3 px, the paper's
         16/227 ratio), trained from scratch (no classification pretraining at this scale);
         a few minutes on 2 CPU cores.
  paper: VOC 2007 trainval/test, selective search quality mode (2000 proposals), VGG16 on
         224 x 224 regions with 16 px context, bfloat16; SGD lr 1e-3 (the paper's fine-tuning
         rate), batch 128 regions (32 fg / 96 bg); SVM C = 1e-3, positive weight 2; ridge
         lambda 1000. The backbone's ImageNet weights come from torchvision's vgg16 file via
         jaxdet.models.torch_weights (not loaded automatically here).
"""

from __future__ import annotations

import ml_collections

from experiments.configs import common


def get_config(preset: str = "cpu"):
  config = common.base_config(preset)
  cpu = preset == "cpu"
  config.system = "rcnn"
  config.model = {
      "backbone": "tiny" if cpu else "vgg16",
      "backbone_kw": ({"widths": (16, 32, 64), "stride": 8, "fc_features": (128, 128),
                       "roi_size": 4} if cpu else {}),
      "input_size": 48 if cpu else 224,
      "context": 3 if cpu else 16,
      "fg_iou": 0.5,
      "batch_rois": 128,
      "fg_fraction": 0.25,
      "chunk": 512 if cpu else 256,
      "svm": {"C": 1e-3, "pos_weight": 2.0, "bias_mult": 10.0, "neg_iou": 0.3,
              "feat_norm": 20.0, "cache_size": 4096 if cpu else 40_000, "rounds": 4,
              "newton_steps": 15, "hard_threshold": -1.0001, "easy_threshold": -1.2,
              "solver": "newton"},
      "bbox_reg": {"iou": 0.6, "ridge_lambda": 1000.0, "feat_norm": 20.0, "apply": True},
      "predict": {"nms_iou": 0.3, "max_detections": 100, "score_threshold": -1.5,
                  "pre_nms_topk": 2000},
  }
  config.data.proposals = ml_collections.ConfigDict({
      "max_proposals": 256 if cpu else 2000,
      "mode": "fast" if cpu else "quality",
      "cache_root": "",            # "" = ~/.cache/jaxdet/proposals
      "num_workers": 0,            # 0 = every core
  })
  if cpu:
    config.data.num_train = 192
    config.data.num_test = 64
    config.data.augment.hflip = True
  else:
    config.data.resize.mode = "none"   # R-CNN warps regions of the original image
    config.data.buckets = ((500, 500),)
  config.train.batch_size = 4 if cpu else 2
  config.train.num_steps = 300 if cpu else 40_000
  config.train.log_every = 50 if cpu else 100
  opt = config.optimizer
  opt.name = "sgd"
  opt.momentum = 0.9
  opt.weight_decay = 5e-4
  opt.learning_rate = 1e-2 if cpu else 1e-3
  opt.schedule = "step"
  opt.decay_steps = (int(config.train.num_steps * 0.75),)
  opt.decay_factor = 0.1
  config.eval.every_steps = 0
  config.eval.batch_size = 8 if cpu else 1
  config.checkpoint.every_steps = 100 if cpu else 5_000
  config.checkpoint.best_metric = ""
  return common.finalize(config)
