"""Runs a check script of tests/train in a subprocess with 4 simulated CPU devices (XLA_FLAGS
must be set before JAX starts, so not in the test process) and returns its JSON result."""

import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def run_on_four_devices(script: str, *args: str, timeout: int = 300) -> dict:
  """The last stdout line of `python tests/train/<script> args...` as JSON."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, os.path.join(HERE, script), *args], env=env,
                        capture_output=True, text=True, timeout=timeout,
                        cwd=os.path.dirname(os.path.dirname(HERE)))
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])
