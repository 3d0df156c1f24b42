r"""Fast R-CNN (Girshick 2015): one conv pass, RoI max pooling, softmax + smooth L1, end to end.

    python -m experiments.train --config experiments/configs/classify.py:cpu --workdir /tmp/cls
    python -m experiments.train --config experiments/configs/fast_rcnn.py:cpu --workdir /tmp/frcn \
        --config.model.init_from=/tmp/cls
    python -m experiments.evaluate --config experiments/configs/fast_rcnn.py:cpu --workdir /tmp/frcn \
        --config.model.init_from=/tmp/cls
    python -m experiments.train --config experiments/configs/fast_rcnn.py:paper \
        --workdir /tmp/frcn_voc --config.model.pretrained=/path/vgg16.pth

Presets:
  cpu:   R-CNN's cpu setting, so that the lecture compares like with like: the synthetic
         shapes (192 train / 256 test 128 px images, horizontal flips), selective search fast
         mode (at most 256 proposals per image) attached to batches by the data pipeline
         (`data.proposals`, the same on-disk cache as R-CNN's), and the tiny backbone of
         experiments/configs/classify.py:cpu (widths 16-32-64-64, stride 8, 4 x 4 RoI max
         pooling, fc 128-128, dropout 0.3), started from that classification run as the paper
         starts from ImageNet: `--config.model.init_from=<classify workdir>` (in the lecture,
         R-CNN's pretraining run, the same config). 8 images x 64 RoIs per step (25% fg,
         bg IoU [0.1, 0.5) as the paper; bg_iou_low 0.0 fell to 0.45), 800 steps of Adam
         (lr 1e-3, 100 warm-up steps, cosine, weight decay 1e-4: at this length Adam trains
         much faster than the paper's SGD), truncated SVD ranks (32, 16).
         Measured (seed 0, `time python -m experiments.train --config
         experiments/configs/fast_rcnn.py:cpu --workdir W --config.model.init_from=CLS` after
         `python -m experiments.train --config experiments/configs/classify.py:cpu
         --workdir CLS`, proposals cached): VOC07 mAP@0.5 0.766 at step 800 (0.741 at 400),
         COCO AP 0.566; with truncated SVD (32, 16) 0.771 (fc parameters 148 k -> 41 k;
         (16, 8): 0.748), scored by `python -m experiments.bench_fast_rcnn --workdir W
         --set model.init_from=CLS`. Time: 142 s of process CPU (user+sys, compilation and
         evaluation included; the classify pretraining is 54 s more, shared with R-CNN in
         the lecture; selective search of the 256 images about 16 s, also shared), 9.8 min
         wall on a heavily loaded 2-core machine (load ~20; expected under 2.5 minutes on 2
         idle cores). From scratch (no init_from) it reaches only 0.65 after 1200 steps.
  paper: VGG16 (conv1_1..conv2_2 frozen, as in the paper; ImageNet weights from a torchvision
         file via `model.pretrained`), images rescaled to shorter side 600 (longer <= 1000),
         horizontal flips, N = 2 images x 64 RoIs per minibatch, SGD lr 1e-3 (x 0.1 after 30k
         of 40k iterations), momentum 0.9, weight decay 5e-4, bfloat16 compute; proposals
         from the batch (selective search, up to 2000 per image). Truncated SVD ranks
         (1024, 256) for fc6, fc7 (`System.extras["truncated_svd"]`). Without a weights
         file (`model.pretrained` or `model.init_from`) the frozen layers would stay random:
         an error (or --config.model.frozen="()" to train them all). Training batches are
         grouped by aspect ratio (`data.group_by_aspect`): 600 x 1000 or 1000 x 600.

Loss swap without editing jaxdet: --config.model.loss.box_loss=l2 (or giou, or
"package.module:function" with the signature of jaxdet.losses.box_delta_smooth_l1).
Multi-scale testing: --config.model.test_scales="(0.75, 1.0, 1.25)" (paper: shorter sides
480, 576, 688, 864, 1200 with ms_target_size 224).
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
