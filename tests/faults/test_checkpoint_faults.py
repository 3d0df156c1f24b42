"""Checkpoints when things go wrong: damaged steps, a NaN state, retention across a resume,
a workdir without checkpoints."""

import logging
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

import faulty
from toy_system import build_system, make_toy_loader, toy_batch

from jaxdet.train import loop, setup
from jaxdet.train.checkpoint import Checkpoints

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A finished 3-step toy run with checkpoints 1, 2, 3 (copy it before damaging it)."""
  config = faulty.config()
  workdir = str(tmp_path_factory.mktemp("trained"))
  loop.train_and_evaluate(config, workdir, system=build_system(config), make_loader=make_toy_loader)
  assert faulty.steps(workdir) == [1, 2, 3]
  return config, workdir


def _copy(trained, tmp_path):
  config, workdir = trained
  dest = str(tmp_path / "run")
  shutil.copytree(workdir, dest)
  return config, dest


def _template(config, system):
  return setup.init_state(config, system, toy_batch(0, 0, 4))[:2]


def _open(config, workdir, system, **kw):
  return setup.open_checkpoints(config, workdir, system, **kw)


def _leaves(state):
  return [np.asarray(x) for x in jax.tree_util.tree_leaves((state.params, state.opt_state))]


@pytest.mark.parametrize("kind", ["bytes", "truncated", "swapped", "manifest", "loader_json",
                                  "meta_json"])
def test_damaged_latest_step_is_set_aside_and_the_previous_restored(trained, tmp_path, kind,
                                                                    caplog):
  config, workdir = _copy(trained, tmp_path)
  system = build_system(config)
  state, rng = _template(config, system)
  ckpt = _open(config, workdir, system)
  want = ckpt.restore(state, rng, step=2)[0]              # step 2 as saved, before damage
  ckpt.close()
  faulty.damage(os.path.join(workdir, "checkpoints", "3"), kind)
  ckpt = _open(config, workdir, system)
  with caplog.at_level(logging.WARNING):
    got = ckpt.restore(state, rng)
  ckpt.close()
  assert int(got[0].step) == 2 and got[2] == {"index": 2}
  for a, b in zip(_leaves(got[0]), _leaves(want)):
    np.testing.assert_array_equal(a, b)
  assert faulty.steps(workdir) == [1, 2]
  aside = os.path.join(workdir, "checkpoints_corrupt", "3")
  assert os.path.isdir(aside)                             # moved, not deleted
  assert any(f"checkpoints/3" in r.getMessage() and aside in r.getMessage()
             for r in caplog.records), [r.getMessage() for r in caplog.records]


def test_training_resumes_from_the_newest_good_step(trained, tmp_path):
  config, workdir = _copy(trained, tmp_path)
  faulty.damage(os.path.join(workdir, "checkpoints", "3"), "truncated")
  longer = faulty.config(**{"train.num_steps": 4})
  state = loop.train_and_evaluate(longer, workdir, system=build_system(longer),
                                  make_loader=make_toy_loader)
  assert int(state.step) == 4 and faulty.steps(workdir) == [2, 3, 4]
  reference = faulty.config(**{"train.num_steps": 4})
  ref = loop.train_and_evaluate(reference, str(tmp_path / "ref"), system=build_system(reference),
                                make_loader=make_toy_loader)
  for a, b in zip(_leaves(state), _leaves(ref)):
    np.testing.assert_array_equal(a, b)                   # steps 3, 4 redone exactly


def test_no_good_step_is_one_clear_error(trained, tmp_path):
  config, workdir = _copy(trained, tmp_path)
  for step in (1, 2, 3):
    faulty.damage(os.path.join(workdir, "checkpoints", str(step)), "loader_json")
  system = build_system(config)
  ckpt = _open(config, workdir, system)
  with pytest.raises(RuntimeError, match=r"no good checkpoint.*3 \(moved to .*1 \(moved to"):
    ckpt.restore(*_template(config, system))
  ckpt.close()
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints_corrupt"))) == ["1", "2", "3"]


def test_a_nonfinite_state_is_never_saved(tmp_path):
  config = faulty.config()
  system = build_system(config)
  state, rng = _template(config, system)
  params = jax.tree_util.tree_map(lambda x: x.at[(0,) * x.ndim].set(np.nan), state.params)
  ckpt = _open(config, str(tmp_path), system)
  with pytest.raises(FloatingPointError, match=r"params.*non-finite"):
    ckpt.save(state.replace(params=params, step=state.step + 1), rng, {"index": 1})
  ckpt.close()
  assert faulty.steps(tmp_path) == []


def test_retention_keeps_the_best_step_across_a_resume(tmp_path):
  """keep = 1 plus the best by "m": the best step survives a restart of the run."""
  config = faulty.config(**{"checkpoint.keep": 1, "checkpoint.best_metric": "m"})
  system = build_system(config)
  state, rng = _template(config, system)
  scores = {1: 0.1, 2: 0.9, 3: 0.2, 4: 0.3, 5: 0.0, 6: 0.1}
  for steps in ((1, 2, 3, 4), (5, 6)):                    # two processes of one run
    ckpt = _open(config, str(tmp_path), system)
    for step in steps:
      ckpt.save(state.replace(step=np.int32(step)), rng, {"index": step}, {"m": scores[step]})
    ckpt.close()
  assert faulty.steps(tmp_path) == [2, 6]


def test_inference_without_checkpoints_is_one_clear_error(tmp_path):
  workdir = tmp_path / "never_trained"
  code = ("import sys; sys.path.insert(0, sys.argv[2])\n"
          "from toy_system import build_system, toy_batch, toy_config\n"
          "from jaxdet.train import loop\n"
          "config = toy_config()\n"
          "try:\n"
          "  loop.restore_for_inference(config, sys.argv[1], build_system(config), toy_batch(0, 0, 2))\n"
          "except FileNotFoundError as e:\n"
          "  print('ERROR', e)\n")
  proc = subprocess.run([sys.executable, "-c", code, str(workdir),
                         os.path.join(ROOT, "tests", "train")], capture_output=True, text=True,
                        timeout=300, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT})
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f"ERROR workdir: no checkpoint under {workdir}/checkpoints" in proc.stdout
  assert "experiments.train" in proc.stdout
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  assert not os.path.exists(workdir)                      # nothing created
