r"""Classification pretraining on object crops (the backbone the window detectors start from).

    python -m experiments.train --config experiments/configs/classify.py:cpu --workdir /tmp/cls

cpu: the tiny net of windows.py / overfeat.py on 32 px crops of the synthetic shapes.
paper: ImageNet (ILSVRC 2012, 1000 classes) through `tfds.data_source("imagenet2012")` (prepare
it once with `tfds build imagenet2012 --file_format=array_record --manual_dir=...`), OverFeat-fast
(the windows and OverFeat papers' net, which has no public weights) on 231 px crops: each image
is one object, its central square (jaxdet.data.tfds.decode_imagenet), resized so the shorter
side is 256 (longer <= 512), cropped square around that box with scale and position jitter
0.15 (the usual random crop) and flipped; SGD lr 0.01 momentum 0.9, batch 128 as OverFeat.
Departures: no colour augmentation or multi-view testing; 1 crop at evaluation.
YOLO's pretraining network instead (its first 20 conv layers, an average pool and a linear
layer, at 224 px; then yolo.py:paper with --config.model.init_from=<this run>):
    python -m experiments.train --config experiments/configs/classify.py:paper --workdir /tmp/y20 \
        --config.model.backbone=yolo20 --config.model.input_size=224
"""

from experiments.configs import common


def get_config(preset: str = "cpu"):
  config = common.base_config(preset)
  config.system = "classify"
  if preset == "cpu":
    config.model = {
        "backbone": "tiny",
        "backbone_kw": {"stride": 8, "widths": (16, 32, 64, 64), "fc_features": (128, 128),
                        "roi_size": 4, "dropout_rate": 0.3},
        "input_size": 32, "context": 1.2, "jitter": 0.15,
        "loss": {"cls": "softmax_cross_entropy", "cls_weight": 1.0},
    }
    config.train.num_steps = 600
    config.train.batch_size = 16
    config.eval.every_steps = 300
    config.checkpoint.every_steps = 300
    config.optimizer.name = "adam"
    config.optimizer.learning_rate = 2e-3
    config.optimizer.weight_decay = 1e-4
    config.optimizer.schedule = "cosine"
  else:
    config.num_classes = 1000
    config.model = {"backbone": "overfeat_fast", "backbone_kw": {}, "input_size": 231,
                    "context": 1.0, "jitter": 0.15}
    config.data.name = "imagenet2012"
    config.data.max_boxes = 1             # one object per image: its central square
    config.data.resize.mode = "shorter_side"
    config.data.resize.min_sizes = (256,)
    config.data.resize.max_size = 512
    config.data.augment.hflip = True
    config.train.batch_size = 128
    config.train.num_steps = 450_000      # ~45 epochs of 1.28 M images
    config.eval.every_steps = 50_000
    config.checkpoint.every_steps = 10_000
    config.checkpoint.best_metric = "accuracy"
    config.optimizer.learning_rate = 0.01
    config.optimizer.decay_steps = (300_000, 400_000)
  return common.finalize(config)
