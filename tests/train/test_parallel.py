"""Data parallelism: 4 simulated CPU devices give the parameters of 1 device (subprocess)."""

from four_devices import run_on_four_devices


def test_shard_map_and_pmap_match_one_device():
  out = run_on_four_devices("parallel_check.py")
  assert out["devices"] == 4
  assert out["moved"] > 1e-3            # training changed the parameters
  assert out["shard_map"] < 1e-5, out   # Adam steps of lr 0.01: float32 reduction order only
  assert out["pmap"] < 1e-5, out
  # the loop logs float(metric): one scalar per metric under both wrappers, not one per device
  assert out["shard_map_metric_shapes"] == out["pmap_metric_shapes"] == [[]], out
