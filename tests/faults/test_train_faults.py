"""The training loop when things go wrong: NaN, a failing final evaluation, a resumed log,
a bad step count, an evaluation that cannot write its result."""

import json
import os
import shutil

import jax
import numpy as np
import pytest

import faulty
from toy_system import build_system, make_toy_loader

from jaxdet import files
from jaxdet.train import loop, setup
from jaxdet.train.writers import read_metrics


def _strict(path):
  """The lines of a JSON-lines file, parsed strictly (a bare NaN/Infinity is an error)."""
  def reject(name):
    raise ValueError(f"{path}: non-standard JSON constant {name}")
  with open(path) as f:
    return [json.loads(line, parse_constant=reject) for line in f if line.strip()]


def _restore(config, workdir, system):
  ckpt = setup.open_checkpoints(config, str(workdir), system, read_only=True)
  state, rng, _ = setup.init_state(config, system, make_toy_loader(
      None, "train", batch_size=4, seed=0, train=True).__next__())
  try:
    return ckpt.restore(state, rng)[0]
  finally:
    ckpt.close()


def _finite(tree):
  return all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(tree))


def test_nan_learning_rate_stops_and_keeps_every_good_checkpoint(tmp_path):
  """The reported case: a rerun with learning_rate=nan wrote NaN checkpoints and retention
  deleted the good ones; it ended with an unrelated error."""
  good = faulty.config(**{"checkpoint.keep": 2})
  system = build_system(good)
  loop.train_and_evaluate(good, str(tmp_path), system=system, make_loader=make_toy_loader)
  assert faulty.steps(tmp_path) == [2, 3]
  bad = faulty.config(**{"checkpoint.keep": 2, "train.num_steps": 6,
                         "optimizer.learning_rate": float("nan")})
  with pytest.raises(FloatingPointError, match=r"step 4: .*updated parameters.*learning rate "
                                               r"at that step: nan"):
    loop.train_and_evaluate(bad, str(tmp_path), system=system, make_loader=make_toy_loader)
  assert faulty.steps(tmp_path) == [2, 3]
  state = _restore(good, tmp_path, system)
  assert int(state.step) == 3 and _finite(state.params)
  lines = _strict(tmp_path / "metrics.jsonl")
  step4 = [m for m in lines if m["step"] == 4 and m["split"] == "train"]
  assert len(step4) == 1 and step4[0]["learning_rate"] is None   # NaN logged as null


def test_nan_loss_term_stops_naming_the_step_and_the_term(tmp_path):
  # no log before the end: the checkpoint after step 3 is where the loop reads the guard
  config = faulty.config(**{"train.num_steps": 6, "train.log_every": 100})
  system = build_system(config)
  with pytest.raises(FloatingPointError) as err:
    loop.train_and_evaluate(config, str(tmp_path), system=system,
                            make_loader=faulty.poisoned_loader({2}))
  message = str(err.value)
  assert "step 3:" in message and "loss/box = nan" in message, message
  assert "loss/cls" not in message and "on_nonfinite" in message, message
  assert faulty.steps(tmp_path) == [1, 2]                # nothing saved from step 3 on
  assert _finite(_restore(config, tmp_path, system).params)


def test_skip_drops_exactly_the_bad_updates(tmp_path):
  config = faulty.config(**{"train.num_steps": 5, "train.on_nonfinite": "skip",
                            "train.max_consecutive_skips": 3})
  system = build_system(config)
  state = loop.train_and_evaluate(config, str(tmp_path), system=system,
                                  make_loader=faulty.poisoned_loader({1, 2}))
  assert int(state.step) == 5
  train = [m for m in read_metrics(str(tmp_path)) if m["split"] == "train"]
  assert [m["skipped_steps"] for m in train] == [0, 1, 2, 2, 2]
  # the reference: the plain step applied to the good batches only (0, 3, 4)
  make = faulty.poisoned_loader({1, 2})
  batches = list(zip(range(5), make(None, "train", batch_size=4, seed=0, train=True)))
  ref, rng, _ = setup.init_state(config, system, batches[0][1])
  step = jax.jit(loop.make_steps(system)[0])
  for i, batch in batches:
    if i not in (1, 2):
      ref, _ = step(ref, batch, rng)
  for got, want in zip(jax.tree_util.tree_leaves(state.params),
                       jax.tree_util.tree_leaves(ref.params)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-7)


def test_skip_stops_after_too_many_in_a_row(tmp_path):
  config = faulty.config(**{"train.num_steps": 8, "train.on_nonfinite": "skip",
                            "train.max_consecutive_skips": 2})
  system = build_system(config)
  with pytest.raises(FloatingPointError, match=r"step 4: 2 non-finite steps in a row.*"
                                               r"loss/box = nan"):
    loop.train_and_evaluate(config, str(tmp_path), system=system,
                            make_loader=faulty.poisoned_loader(set(range(2, 8))))
  assert faulty.steps(tmp_path) == [1, 2, 3]             # 3: a skipped step, still finite
  assert _finite(_restore(config, tmp_path, system).params)


@pytest.mark.parametrize("num_steps", [-5, 0])
def test_nonpositive_num_steps_is_an_error(tmp_path, num_steps):
  config = faulty.config(**{"train.num_steps": num_steps})
  with pytest.raises(ValueError, match=rf"train\.num_steps: .*got {num_steps}"):
    loop.train_and_evaluate(config, str(tmp_path), system=build_system(config),
                            make_loader=make_toy_loader)
  assert not os.path.exists(tmp_path / "eval.json")


def test_final_state_is_saved_before_the_final_evaluation(tmp_path):
  config = faulty.config(**{"checkpoint.every_steps": 100})

  def eval_fails(data_config, split, *, batch_size, seed, train, examples=None):
    if not train:
      raise RuntimeError("eval data unavailable")
    return make_toy_loader(data_config, split, batch_size=batch_size, seed=seed, train=True)

  system = build_system(config)
  with pytest.raises(RuntimeError, match="eval data unavailable"):
    loop.train_and_evaluate(config, str(tmp_path), system=system, make_loader=eval_fails)
  assert faulty.steps(tmp_path) == [3]
  state = loop.train_and_evaluate(config, str(tmp_path), system=system,
                                  make_loader=make_toy_loader)   # only evaluates
  assert int(state.step) == 3
  with open(tmp_path / "eval.json") as f:
    assert json.load(f)["step"] == 3


def test_resumed_and_rerun_logs_repeat_no_step(tmp_path):
  config = faulty.config(**{"train.num_steps": 4, "checkpoint.every_steps": 2})
  system = build_system(config)
  run = lambda: loop.train_and_evaluate(config, str(tmp_path), system=system,
                                        make_loader=make_toy_loader)
  run()
  shutil.rmtree(tmp_path / "checkpoints" / "4")   # killed after logging step 4, before its save
  run()                                           # resumes from 2
  run()                                           # finished: evaluates step 4 again
  lines = _strict(tmp_path / "metrics.jsonl")
  assert [m["step"] for m in lines if m["split"] == "train"] == [1, 2, 3, 4]
  assert [m["step"] for m in lines if m["split"] == "eval"] == [4]
  mask = os.umask(0)
  os.umask(mask)
  assert os.stat(tmp_path / "eval.json").st_mode & 0o777 == 0o666 & ~mask


def test_evaluate_prints_scores_and_a_failed_write_names_the_path(tmp_path, monkeypatch, capsys):
  config = faulty.config(**{"train.num_steps": 1})
  system = build_system(config)
  loop.train_and_evaluate(config, str(tmp_path), system=system, make_loader=make_toy_loader)
  before = sorted(os.path.join(d, n) for d, ds, fs in os.walk(tmp_path) for n in ds + fs)
  capsys.readouterr()

  def read_only(path, write, suffix=".tmp"):
    raise PermissionError(13, "Permission denied", path)

  monkeypatch.setattr(files, "atomic_write", read_only)
  with pytest.raises(OSError, match=r"eval\.json: cannot write .*eval\.json.*voc07_map"):
    loop.evaluate(config, str(tmp_path), system=system, make_loader=make_toy_loader)
  assert "voc07_map" in capsys.readouterr().out
  after = sorted(os.path.join(d, n) for d, ds, fs in os.walk(tmp_path) for n in ds + fs)
  assert after == before                                  # evaluation reads only
