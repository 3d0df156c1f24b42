r"""Localization as regression: class head + box head (L2) on one backbone, single objects.

    python -m experiments.train --config experiments/configs/localization.py:cpu --workdir /tmp/loc
    python -m experiments.evaluate --config experiments/configs/localization.py:cpu --workdir /tmp/loc

Variants (overrides): --config.model.box_head_at=conv (box head after the last conv layer),
--config.model.per_class=True (one box per class), --config.model.num_slots=K with
--config.data.name=synthetic --config.data.min_objects=K --config.data.max_objects=K
(K boxes per image), --config.model.targets=points (K keypoints: the object centres),
--config.model.loss.box=giou (or smooth_l1, l1, a "package.module:function" path).
Loss: cls (softmax cross-entropy) + 10 x box (L2 on coordinates as fractions of the image).
Reported: accuracy and the ILSVRC localization criterion (right class, IoU >= 0.5), besides
VOC07 mAP of the one detection per image.

paper: VOC 2007 squashed to 224 x 224, VGG16 from torchvision's ImageNet weights (standing in
for the VGG paper's Caffe ones), per-class boxes after fc7, bfloat16:
    python -m experiments.train --config experiments/configs/localization.py:paper --workdir W \
        --config.model.pretrained=/path/vgg16.npz
cpu: the lecture's recipe in one run: the class loss trains the tiny backbone; the box head (its
own fc layer on the last conv features) trains on those features through a stop_gradient
(detach_box). Adam, lr 2e-3, warm-up 100 steps, cosine; 32768 synthetic images (none seen
twice), 64 x 64, batch 32 x 1000 steps. Measured results: BENCHMARKS.md.
"""

from experiments.configs import common


def get_config(preset: str = "cpu"):
  config = common.base_config(preset)
  config.system = "localization"
  if preset == "cpu":
    config.model = {
        "backbone": "tiny",
        "backbone_kw": {"stride": 16, "widths": (16, 32, 64, 128), "fc_features": (256, 256),
                        "roi_size": 4, "dropout_rate": 0.3},
        "num_slots": 1, "targets": "boxes", "per_class": False, "box_head_at": "conv",
        "box_fc_features": (256,), "detach_box": True,
        "loss": {"cls": "softmax_cross_entropy", "cls_weight": 1.0, "box": "l2",
                 "box_weight": 10.0},
    }
    config.data.name = "synthetic_single"
    config.data.num_train = 32768
    config.data.image_size = (64, 64)
    config.data.max_boxes = 4
    config.train.num_steps = 1000
    config.train.batch_size = 32
    config.eval.every_steps = 0        # each evaluation compiles predict: only the final one
    config.checkpoint.every_steps = 500
    config.optimizer.name = "adam"
    config.optimizer.learning_rate = 2e-3
    config.optimizer.warmup_steps = 100
    config.optimizer.warmup_factor = 0.1
    config.optimizer.weight_decay = 1e-4
    config.optimizer.schedule = "cosine"
  else:
    # ILSVRC-style: VGG16, 224 x 224 inputs, one box per class after the last fc layer.
    config.model = {
        "backbone": "vgg16", "backbone_kw": {},
        "pretrained": "",   # a local torchvision vgg16 weights file (ImageNet)
        "num_slots": 1, "targets": "boxes", "per_class": True, "box_head_at": "fc",
        "box_fc_features": (4096,), "detach_box": False,
        "loss": {"cls": "softmax_cross_entropy", "cls_weight": 1.0, "box": "l2",
                 "box_weight": 10.0},
    }
    config.data.resize.mode = "square"
    config.data.resize.square_size = 224
    config.optimizer.learning_rate = 0.001
    config.optimizer.decay_steps = (30_000,)
  return common.finalize(config)
