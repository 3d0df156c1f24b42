"""jaxdet's XLA flags: CPU results that do not depend on how many cores the process may use."""

import os
import subprocess
import sys

import pytest

from jaxdet import xla_flags

# One gradient of the classify system's cpu preset (its bias gradients are large fused
# reductions), printed as a hash of every leaf; run pinned to one core or on all cores.
SCRIPT = r"""
import hashlib, os, sys
if sys.argv[1] == "one":
  os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
import jaxdet   # first, as a user's script would: sets the flags before JAX starts
import jax, numpy as np
from experiments.configs import classify
from jaxdet.data.pipeline import make_loader
from jaxdet.train import setup
config = classify.get_config("cpu")
system = setup.system_from_config(config)
loader = make_loader(config.data, "train", batch_size=int(config.train.batch_size), seed=0, train=True)
batch = {k: v for k, v in next(iter(loader)).items() if k != "example_mask"}
variables = system.init(jax.random.PRNGKey(0), batch)
loss = lambda p: system.loss({**variables, "params": p}, batch, jax.random.PRNGKey(1))[0]
grads = jax.jit(jax.grad(loss))(variables["params"])
data = b"".join(np.asarray(x).tobytes() for x in jax.tree_util.tree_leaves(grads))
print("independent", jaxdet.xla_flags.core_count_independent())
print("hash", hashlib.sha256(data).hexdigest())
"""


def test_set_default_flags_appends_and_respects_the_users_choice():
  env = {}
  assert xla_flags.set_default_flags(env, "0.10.2")
  assert env["XLA_FLAGS"] == xla_flags.YNN_OFF
  env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
  assert xla_flags.set_default_flags(env, "0.11.2")
  assert env["XLA_FLAGS"].split() == ["--xla_force_host_platform_device_count=4",
                                      xla_flags.YNN_OFF]
  own = {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=reduce"}
  assert not xla_flags.set_default_flags(own, "0.10.2")
  assert own["XLA_FLAGS"] == "--xla_cpu_experimental_ynn_fusion_type=reduce"
  assert not xla_flags.set_default_flags({"JAXDET_XLA_FLAGS": "0"}, "0.10.2")
  unknown = {}
  assert not xla_flags.set_default_flags(unknown, "0.12.0") and "XLA_FLAGS" not in unknown


def _run(cores: str) -> str:
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["JAX_PLATFORMS"] = "cpu"
  out = subprocess.run([sys.executable, "-c", SCRIPT, cores], capture_output=True, text=True,
                       env=env, timeout=600, cwd=os.path.dirname(os.path.dirname(__file__)))
  assert out.returncode == 0, out.stderr[-3000:]
  lines = dict(line.split(" ", 1) for line in out.stdout.splitlines() if " " in line)
  assert lines["independent"] == "True"
  return lines["hash"]


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs at least 2 cores")
def test_gradients_do_not_depend_on_the_core_count():
  # Without the flag (XLA's YNNPACK reductions) the two hashes differ on jaxlib 0.10.2 (the
  # bias gradients); with every YNNPACK fusion off they differ too (the conv kernels').
  assert _run("one") == _run("all")
