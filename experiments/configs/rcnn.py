r"""R-CNN (Girshick et al. 2014): selective search, warped regions, CNN, SVMs, box regression.

  python -m experiments.train --config experiments/configs/rcnn.py:cpu --workdir /tmp/rcnn
  python -m experiments.evaluate --config experiments/configs/rcnn.py:cpu --workdir /tmp/rcnn
  python -m experiments.train --config experiments/configs/rcnn.py:paper --workdir /tmp/rcnn_voc

Training runs in stages (experiments/rcnn_stages.py), each resumable, each output saved
atomically in the workdir: proposals (the on-disk selective search cache of each split),
pretraining (cpu preset: the classify system of `config.pretrain` in workdir/pretrain),
fine-tuning (workdir/finetune, the ordinary training loop and its checkpoints), features
(workdir/stages/features_train.npz), SVMs with hard negative mining (stages/svm.npz), box
regression (stages/bbox_reg.npz), then evaluation with and without box regression (eval.json).

Presets:
  cpu:   the synthetic shapes (192 train / 256 test 128 px images), selective search fast mode
         (at most 256 proposals). As in the paper the backbone is pretrained for
         classification, then fine-tuned: the tiny net (widths 16-32-64-64, stride 8, fc
         128-128, dropout 0.3) of experiments/configs/classify.py:cpu, 600 Adam steps on 32 px
         object crops, gives the conv and fc layers (jaxdet.models.init_from); fine-tuning on
         32 x 32 warped regions (context 2 px, the paper's 16/227 ratio) as a 7-way classifier,
         128 regions per step (32 fg / 96 bg) from 4 images, 600 steps of Adam (lr 5e-4,
         cosine, weight decay 1e-4: faster than SGD at this length); SVMs and ridge as paper.
         Measured (seed 0, `time python -m experiments.train --config
         experiments/configs/rcnn.py:cpu --workdir W --config.data.proposals.cache_root=W_p`,
         proposals computed afresh): VOC07 mAP@0.5 0.801 with box regression, 0.791 without,
         fine-tuned softmax alone 0.800 (COCO AP 0.635 / 0.613). Time: 118 s of process CPU
         (user+sys, every stage: proposals 16, pretraining 45, fine-tuning 42, features 4,
         SVMs 2, box regression 2, evaluation 6), 4.5 min wall on a heavily loaded 2-core
         machine (not yet timed on an idle one: expected about 2 minutes on 2 idle cores,
         wall being at most about the CPU time when nothing else runs).
         Before pretraining (the same network from scratch, 300 SGD steps on 48 px regions)
         it reached 0.35.
  paper: VOC 2007 trainval/test, selective search quality mode (2000 proposals), VGG16 on
         224 x 224 regions with 16 px context, bfloat16; SGD lr 1e-3 (the paper's fine-tuning
         rate), batch 128 regions (32 fg / 96 bg); SVM C = 1e-3, positive weight 2; ridge
         lambda 1000. The backbone starts from ImageNet: torchvision's vgg16 weights
         (`--config.model.pretrained=/path/vgg16.pth|.npz`, jaxdet.models.torch_weights;
         the paper's VGG16 "O-Net" row, table 3; its AlexNet "T-Net" with
         --config.model.backbone=alexnet --config.model.input_size=223, the smallest input
         that gives AlexNet's 6 x 6 pool5, torchvision's AlexNet standing in for CaffeNet:
         64 conv1 filters instead of 96, no LRN, no grouped convolutions).
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
