"""Global batch semantics: a step over 4 devices is the step of 1 device at the global batch,
for every detector (subprocess with 4 simulated CPU devices); the batch rules."""

import pytest
from four_devices import run_on_four_devices

from jaxdet.train import optim, parallel

SYSTEMS = ("classify", "localization", "windows", "overfeat", "rcnn", "fast_rcnn",
           "faster_rcnn", "yolo")


@pytest.fixture(scope="module")
def four_devices():
  """One subprocess computes every system: 2 plain SGD steps on 1 device, shard_map and
  pmap (tests/train/global_semantics_check.py)."""
  return run_on_four_devices("global_semantics_check.py", timeout=1500)


@pytest.mark.xdist_group("four_devices")   # one worker computes the fixture (pyproject: loadgroup)
@pytest.mark.parametrize("name", SYSTEMS)
def test_four_devices_update_as_one_device(four_devices, name):
  assert four_devices["devices"] == 4
  out = four_devices[name]
  assert out["moved"] > 1e-4, out   # the steps changed the parameters
  for mode in ("shard_map", "pmap"):
    # float32 reassociation of the cross-device sums only: with plain SGD (the check script)
    # measured at most 2e-8 for every system, against moves of 7e-4..3e-2; per-device keys,
    # normalisers and BatchNorm gave up to 1e-2 (with Adam, whose m / sqrt(v) magnifies the
    # reassociation in parameters whose gradients nearly cancel, up to 3% of the move)
    assert out[mode] < max(1e-6, 1e-3 * out["moved"]), (name, out)
    assert out.get(mode + "_model_state", 0.0) < 1e-5, (name, out)   # BatchNorm statistics


def test_indivisible_batch_names_both_numbers_and_the_fix():
  with pytest.raises(ValueError) as e:
    parallel.check_batch_divisible(2, 8)
  msg = str(e.value)
  assert "train.batch_size" in msg and "2" in msg and "8 devices" in msg
  assert "--config.train.batch_size=8" in msg
  parallel.check_batch_divisible(16, 8)


def test_linear_lr_scaling_follows_the_global_batch():
  cfg = {"learning_rate": 0.01, "lr_scaling": "linear", "reference_batch": 2}
  assert optim.base_lr(cfg, 16) == pytest.approx(0.08)
  assert float(optim.make_schedule(cfg, 10, 16)(0)) == pytest.approx(0.08)
  assert optim.base_lr({"learning_rate": 0.01}, 16) == 0.01   # "none", the default
  with pytest.raises(ValueError, match="optimizer.reference_batch"):
    optim.base_lr({"learning_rate": 0.01, "lr_scaling": "linear"}, 16)
  with pytest.raises(ValueError, match="optimizer.lr_scaling"):
    optim.base_lr({"learning_rate": 0.01, "lr_scaling": "sqrt"}, 16)


def test_presets_state_their_reference_batch():
  from experiments.configs import fast_rcnn, yolo
  assert fast_rcnn.get_config("paper").optimizer.reference_batch == 2    # Girshick 2015
  assert yolo.get_config("paper").optimizer.reference_batch == 64        # Redmon 2016
  assert yolo.get_config("paper").optimizer.lr_scaling == "none"
