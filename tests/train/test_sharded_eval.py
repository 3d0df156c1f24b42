"""Sharded evaluation: 4 simulated CPU devices score as one device does (subprocess)."""

import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def test_sharded_evaluation_equals_one_device():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, os.path.join(HERE, "sharded_eval_check.py")], env=env,
                        capture_output=True, text=True, timeout=300,
                        cwd=os.path.dirname(os.path.dirname(HERE)))
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  assert out["devices"] == 4
  assert out["images"] == [9, 9, 9, 9], out   # 2 batches of 6, the last half padding
  assert out["same_lists"] and out["diff"] < 1e-5, out
  assert 0.0 < out["one"]["coco_AP"] < 1.0, out   # a score that can differ
  for key in ("voc07_map", "coco_AP", "num_images"):
    assert abs(out["one"][key] - out["sharded"][key]) < 1e-9, out
