r"""Fast R-CNN (Girshick 2015): one conv pass, RoI max pooling, softmax + smooth L1, end to end.

  python -m experiments.train --config experiments/configs/classify.py:cpu --workdir /tmp/cls
  python -m experiments.train --config experiments/configs/fast_rcnn.py:cpu --workdir /tmp/frcn \
      --config.model.init_from=/tmp/cls        # evaluate: experiments.evaluate, same flags
  python -m experiments.train --config experiments/configs/fast_rcnn.py:paper \
      --workdir /tmp/frcn_voc --config.model.pretrained=/path/vgg16.pth

cpu:   R-CNN's cpu setting, to compare like with like: synthetic shapes (128 px), selective
       search fast mode (<= 256 proposals, `data.proposals`), R-CNN's tiny backbone (stride 8,
       4 x 4 RoI pooling, fc 128-128, dropout 0.3) started from classify.py:cpu
       (`model.init_from`); 8 images x 64 RoIs, 800 steps of Adam (lr 1e-3, cosine) instead
       of the paper's SGD (faster at this length); truncated SVD ranks (32, 16).
paper: VGG16 (conv1_1..conv2_2 frozen, ImageNet weights from `model.pretrained`), shorter side
       600 (longer <= 1000, batches grouped by aspect ratio), flips, 2 images x 64 RoIs, SGD lr
       1e-3 (x 0.1 after 30k of 40k), momentum 0.9, weight decay 5e-4, bfloat16, selective
       search (<= 2000), truncated SVD (1024, 256) via `System.extras.truncated_svd`.
Loss terms: --config.model.loss.box=giou (or l1, l2, "package.module:function", a "box" term
of jaxdet.losses), likewise loss.cls; weights loss.<term>_weight. Multi-scale testing:
--config.model.test_scales="(0.75, 1.0, 1.25)" (paper: 5 scales, ms_target_size 224).
"""


from experiments.configs import common


def get_config(preset: str = "cpu"):
  config = common.base_config(preset)
  cpu = preset == "cpu"
  config.system = "fast_rcnn"
  config.model = {
      "backbone": "tiny" if cpu else "vgg16",
      # cpu: R-CNN's tiny backbone (experiments/configs/classify.py:cpu), stride 8
      "backbone_kw": ({"stride": 8, "widths": (16, 32, 64, 64), "fc_features": (128, 128),
                       "roi_size": 4, "dropout_rate": 0.3} if cpu else {}),
      "pretrained": "",
      "init_from": "",
      "frozen": () if cpu else ("conv1_1", "conv1_2", "conv2_1", "conv2_2"),
      "dropout_rate": 0.3 if cpu else 0.5,
      "proposals": "batch",
      "grid": {"scales": (24.0, 40.0, 64.0), "ratios": (0.5, 1.0, 2.0), "stride": 8},
      "sampler": {"rois_per_image": 64, "fg_fraction": 0.25, "fg_iou": 0.5,
                  "bg_iou_high": 0.5, "bg_iou_low": 0.1, "add_gt": True},
      "box_stds": (0.1, 0.1, 0.2, 0.2),
      "loss": {"cls": "softmax_cross_entropy", "cls_weight": 1.0,
               "box": "smooth_l1", "box_weight": 1.0},
      "svd_ranks": (32, 16) if cpu else (1024, 256),
      "test_scales": (1.0,),
      "ms_target_size": 64.0 if cpu else 224.0,
      "predict": {"score_threshold": 0.01, "iou_threshold": 0.3, "max_detections": 100,
                  "pre_nms_topk": 0},
  }
  common.selective_search_data(config)   # the same proposals and images as R-CNN's
  if cpu:
    config.train.batch_size = 8
    config.train.num_steps = 800
    config.train.log_every = 100
    config.eval.every_steps = 400
    config.checkpoint.every_steps = 400
    opt = config.optimizer
    opt.name = "adam"
    opt.learning_rate = 1e-3
    opt.weight_decay = 1e-4
    opt.schedule = "cosine"
    opt.warmup_steps = 100
  else:
    config.data.resize.mode = "shorter_side"
    config.data.resize.min_sizes = (600,)
    config.data.resize.max_size = 1000
    config.data.group_by_aspect = True   # batches fit 600 x 1000 or 1000 x 600, not 1000 x 1000
    config.data.augment.hflip = True
    config.train.batch_size = 2
    config.train.num_steps = 40_000
    opt = config.optimizer
    opt.name = "sgd"
    opt.learning_rate = 1e-3
    opt.momentum = 0.9
    opt.weight_decay = 5e-4
    opt.schedule = "step"
    opt.decay_steps = (30_000,)
    opt.decay_factor = 0.1
  return common.finalize(config)
