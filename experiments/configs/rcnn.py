r"""R-CNN (Girshick et al. 2014): selective search, warped regions, CNN, SVMs, box regression.

  python -m experiments.train --config experiments/configs/rcnn.py:cpu --workdir /tmp/rcnn
  python -m experiments.evaluate --config experiments/configs/rcnn.py:cpu --workdir /tmp/rcnn
  python -m experiments.train --config experiments/configs/rcnn.py:paper --workdir /tmp/rcnn_voc

Training runs in resumable stages (experiments/rcnn_stages.py): proposals, pretraining (cpu),
fine-tuning (the training loop), features, SVMs with hard negative mining, box regression,
evaluation with and without box regression (workdir/eval.json). Results: BENCHMARKS.md.

Presets:
  cpu:   synthetic shapes (192 train / 256 test 128 px images), selective search fast mode
         (<= 256 proposals); the tiny backbone pretrained by experiments/configs/classify.py:cpu
         on object crops (as the paper starts from ImageNet), fine-tuned on 32 px warped regions
         (context 2 px, the paper's 16/227) as a 7-way classifier, 128 regions (32 fg) from 4
         images, 600 steps of Adam (lr 5e-4, cosine; the paper: SGD); SVMs and ridge as paper.
  paper: VOC 2007, selective search quality mode (2000 proposals), VGG16 (torchvision ImageNet
         weights: --config.model.pretrained=/path/vgg16.pth) on 224 px regions, 16 px
         context, bfloat16; SGD lr 1e-3, 128 regions (32 fg); SVM C 1e-3, positive weight 2;
         ridge lambda 1000. AlexNet ("T-Net"): --config.model.backbone=alexnet
         --config.model.input_size=223 (torchvision's AlexNet for CaffeNet: no LRN, no groups).
SVMs: liblinear's squared hinge by Newton steps (paper: the L1 hinge). Fine-tuning loss swap:
--config.model.loss.cls=softmax_focal (or "package.module:function", a "class" term).
"""

from __future__ import annotations

import ml_collections

from experiments.configs import classify, common


def get_config(preset: str = "cpu"):
  config = common.base_config(preset)
  cpu = preset == "cpu"
  config.system = "rcnn"
  # cpu: classification pretraining of the backbone on object crops (stage "pretrain");
  # paper: none here (ImageNet weights via jaxdet.models.torch_weights).
  config.pretrain = classify.get_config("cpu") if cpu else ml_collections.ConfigDict(
      {"system": ""})
  if cpu:   # evaluated once, at the end; only the final checkpoint is needed
    config.pretrain.eval.every_steps = 0
    config.pretrain.checkpoint.every_steps = 0
  config.model = {
      "backbone": "tiny" if cpu else "vgg16",
      "backbone_kw": config.pretrain.model.backbone_kw.to_dict() if cpu else {},
      "input_size": 32 if cpu else 224,
      "context": 2 if cpu else 16,
      "pretrained": "",   # paper: a local torchvision vgg16 weights file (ImageNet)
      "init_from": "",
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
      "loss": {"cls": "softmax_cross_entropy", "cls_weight": 1.0},
  }
  common.selective_search_data(config)
  if not cpu:
    config.data.resize.mode = "none"   # R-CNN warps regions of the original image
    config.data.buckets = ((500, 500),)
  config.train.batch_size = 4 if cpu else 2
  config.train.num_steps = 600 if cpu else 40_000
  config.train.log_every = 50 if cpu else 100
  opt = config.optimizer
  if cpu:
    opt.name = "adam"
    opt.learning_rate = 5e-4
    opt.weight_decay = 1e-4
    opt.schedule = "cosine"
  else:
    opt.name = "sgd"
    opt.momentum = 0.9
    opt.weight_decay = 5e-4
    opt.learning_rate = 1e-3
    opt.schedule = "step"
    opt.decay_steps = (int(config.train.num_steps * 0.75),)
    opt.decay_factor = 0.1
  config.eval.every_steps = 0
  config.eval.batch_size = 8 if cpu else 1
  config.checkpoint.every_steps = 300 if cpu else 5_000
  config.checkpoint.best_metric = ""
  return common.finalize(config)
