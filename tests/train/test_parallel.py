"""Data parallelism: 4 simulated CPU devices give the parameters of 1 device (subprocess)."""

import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def test_shard_map_and_pmap_match_one_device():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, os.path.join(HERE, "parallel_check.py")], env=env,
                        capture_output=True, text=True, timeout=300,
                        cwd=os.path.dirname(os.path.dirname(HERE)))
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  assert out["devices"] == 4
  assert out["moved"] > 1e-3            # training changed the parameters
  assert out["shard_map"] < 1e-5, out   # Adam steps of lr 0.01: float32 reduction order only
  assert out["pmap"] < 1e-5, out
