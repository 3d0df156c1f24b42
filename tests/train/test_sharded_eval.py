"""Sharded evaluation: 4 simulated CPU devices score as one device does (subprocess)."""

from four_devices import run_on_four_devices


def test_sharded_evaluation_equals_one_device():
  out = run_on_four_devices("sharded_eval_check.py")
  assert out["devices"] == 4
  assert out["images"] == [9, 9, 9, 9], out   # 2 batches of 6, the last half padding
  assert out["same_lists"] and out["diff"] < 1e-5, out
  assert 0.0 < out["one"]["coco_AP"] < 1.0, out   # a score that can differ
  for key in ("voc07_map", "coco_AP", "num_images"):
    assert abs(out["one"][key] - out["sharded"][key]) < 1e-9, out
