r"""Localization as regression: class head + box head (L2) on one backbone, single objects.

    python -m experiments.train --config experiments/configs/localization.py:cpu --workdir /tmp/loc
    python -m experiments.evaluate --config experiments/configs/localization.py:cpu --workdir /tmp/loc

Variants (overrides): --config.model.box_head_at=conv (box head after the last conv layer),
--config.model.per_class=True (one box per class), --config.model.num_slots=K with
--config.data.name=synthetic --config.data.min_objects=K --config.data.max_objects=K
(K boxes per image), --config.model.targets=points (K keypoints: the object centres).
Reported: accuracy and the ILSVRC localization criterion (right class, IoU >= 0.5), besides
VOC07 mAP of the one detection per image.

paper preset: VOC 2007 images squashed to 224 x 224, VGG16 from ImageNet (the VGG paper's
localization net is VGG16 itself; torchvision's weights stand in for the authors' Caffe ones,
which differ in training details only), per-class boxes after fc7 (the lecture's "regression
head after the fc layers"), bfloat16:
    python -m experiments.train --config experiments/configs/localization.py:paper --workdir W \
        --config.model.pretrained=/path/vgg16.npz

cpu preset, the lecture's recipe in one run: the class loss trains the backbone; the box head
(its own fc layer on the last conv features) trains on those features through a stop_gradient
(detach_box), like a regression head attached to a classification network. With the box loss
reaching the shared layers (detach_box=False) the class loss sat at chance (ln 6) for the first
~800 steps (accuracy 0.61 after 1500 steps). Adam, lr 2e-3 with a linear warm-up over 100
steps from 2e-4 (Adam's first steps are large while its moment estimates are young), cosine
decay; 32768 synthetic training images (rendered on the fly, ~0.3 ms each), so no image is seen
twice.
Measured with the first command above (1000 steps, batch 32, seed 0; identical numbers in two
runs): accuracy 0.980, localization accuracy (right class, IoU >= 0.5) 0.922, mean IoU 0.705,
VOC07 mAP@0.5 0.892, COCO AP 0.400 on the 256 test images. Training + final evaluation: 63 s of
process CPU time (user 62.4 + sys 1.0), 212 s wall on a 2-core machine loaded ~12 by other jobs
(81 s CPU, 693 s wall at load ~19); on 2 idle cores expect well under a minute of wall.
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
