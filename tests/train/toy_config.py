# A test-only config for the toy system of tests/train/toy_system.py (register "toy" first):
#   python -m experiments.train --config tests/train/toy_config.py --workdir /tmp/toy
"""Toy system on small synthetic images: seconds on a CPU."""

from experiments.configs import common


def get_config(preset="cpu"):
  config = common.base_config(preset)
  config.system = "toy"
  config.model = {"features": 8, "batch_norm": True}
  config.data.image_size = (32, 32)
  config.data.num_train = 32
  config.data.num_test = 6
  config.data.prefetch = 0
  config.data.num_workers = 1
  config.train.batch_size = 4
  config.train.num_steps = 4
  config.train.log_every = 2
  config.eval.batch_size = 4
  config.eval.every_steps = 2
  config.checkpoint.every_steps = 2
  return common.finalize(config)
