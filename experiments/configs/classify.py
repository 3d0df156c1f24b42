r"""Classification pretraining on object crops (the backbone the window detectors start from).

    python -m experiments.train --config experiments/configs/classify.py:cpu --workdir /tmp/cls

cpu: the tiny net of windows.py / overfeat.py on 32 px crops of the synthetic shapes.
paper: OverFeat-fast on 231 px crops of VOC objects (ImageNet-style pretraining; ImageNet itself
through tfds would need a classification source in jaxdet.data).
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
    config.model = {"backbone": "overfeat_fast", "backbone_kw": {}, "input_size": 231,
                    "context": 1.2, "jitter": 0.15}
    config.optimizer.learning_rate = 0.01
    config.optimizer.decay_steps = (30_000,)
  return common.finalize(config)
