"""Kill-and-resume: a SIGKILLed run restarted from its workdir ends bitwise equal (CPU)."""

import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from toy_system import build_system, make_toy_loader, resume_config

from jaxdet.train.checkpoint import CheckpointMismatchError
from jaxdet.train.loop import train_and_evaluate

HERE = os.path.dirname(os.path.abspath(__file__))
NUM_STEPS = 8


def _flat(params):
  return {jax.tree_util.keystr(p): np.asarray(x)
          for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}


def _steps(workdir):
  ckpt = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(ckpt):
    return []
  return sorted(int(d) for d in os.listdir(ckpt) if d.isdigit())


def _run(workdir, delay_s):
  return subprocess.Popen([sys.executable, os.path.join(HERE, "run_toy.py"), str(workdir),
                           str(NUM_STEPS), str(delay_s)], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, cwd=os.path.dirname(os.path.dirname(HERE)))


@pytest.mark.slow
def test_sigkill_then_resume_equals_uninterrupted(tmp_path):
  config = resume_config(NUM_STEPS)
  reference = train_and_evaluate(config, str(tmp_path / "ref"), system=build_system(config),
                                 make_loader=make_toy_loader)
  workdir = tmp_path / "killed"
  proc = _run(workdir, 0.15)
  deadline = time.time() + 120
  while time.time() < deadline and not any(s >= 3 for s in _steps(workdir)):
    assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
    time.sleep(0.05)
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  saved = _steps(workdir)
  assert saved and 3 <= max(saved) < NUM_STEPS, saved          # killed mid-run
  proc = _run(workdir, 0.0)
  out = proc.communicate(timeout=180)[0].decode()
  assert proc.returncode == 0, out[-3000:]
  assert "resuming from step" in out, out[-3000:]
  resumed = dict(np.load(workdir / "final_params.npz"))
  expected = _flat(reference.params)
  assert sorted(resumed) == sorted(expected)
  for key, value in expected.items():
    np.testing.assert_array_equal(resumed[key], value, err_msg=key)


def test_restore_into_another_model_fails_clearly(tmp_path):
  config = resume_config(2)
  train_and_evaluate(config, str(tmp_path), system=build_system(config), make_loader=make_toy_loader)
  other = resume_config(2)
  other.model.features = 16
  with pytest.raises(CheckpointMismatchError, match=r"model\.features: checkpoint 8, now 16"):
    train_and_evaluate(other, str(tmp_path), system=build_system(other), make_loader=make_toy_loader)
  adam = resume_config(2)
  adam.optimizer.name = "adam"
  with pytest.raises(CheckpointMismatchError, match="do not fit the configured training state"):
    train_and_evaluate(adam, str(tmp_path), system=build_system(adam), make_loader=make_toy_loader)
