"""The training core: optimizer and schedule, train_step, compilation, determinism, logs."""

import glob
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from compiles import run_counting_compiles
from toy_system import build_system, make_toy_loader, toy_batch, toy_config

from jaxdet.system import System
from jaxdet.train import loop, optim, setup
from jaxdet.train.state import create_train_state
from jaxdet.train.writers import read_metrics


def _ref_lr(step, lr, boundaries, factor, warmup, warmup_factor):
  """The papers' step schedule with linear warm-up, in plain Python."""
  if step < warmup:
    start = lr * warmup_factor
    return start + (lr - start) * step / warmup
  return lr * factor ** sum(step >= b for b in boundaries)


def test_step_schedule_with_warmup_matches_reference():
  cfg = {"learning_rate": 0.02, "schedule": "step", "decay_steps": (6, 9), "decay_factor": 0.1,
         "warmup_steps": 4, "warmup_factor": 0.25}
  schedule = optim.make_schedule(cfg, 12)
  for step in range(12):
    np.testing.assert_allclose(float(schedule(step)),
                               _ref_lr(step, 0.02, (6, 9), 0.1, 4, 0.25), rtol=1e-6)


def test_sgd_momentum_weight_decay_clipping_match_numpy(rng):
  cfg = {"name": "sgd", "learning_rate": 0.1, "momentum": 0.9, "weight_decay": 0.01,
         "schedule": "constant", "grad_clip_norm": 0.5}
  tx, _ = optim.make_optimizer(cfg, 10)
  params = {"kernel": rng.normal(size=(3, 2)).astype(np.float32),
            "bias": rng.normal(size=(2,)).astype(np.float32)}
  ref = {k: v.astype(np.float64) for k, v in params.items()}
  trace = {k: np.zeros_like(v) for k, v in ref.items()}
  opt_state = tx.init(params)
  for _ in range(3):
    grads = {k: rng.normal(size=v.shape).astype(np.float32) for k, v in params.items()}
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    g = {k: v.astype(np.float64) for k, v in grads.items()}
    norm = np.sqrt(sum((v ** 2).sum() for v in g.values()))
    g = {k: v * min(1.0, 0.5 / norm) for k, v in g.items()}     # clip the raw gradient
    g["kernel"] = g["kernel"] + 0.01 * ref["kernel"]             # decay kernels only
    for k in ref:
      trace[k] = g[k] + 0.9 * trace[k]
      ref[k] = ref[k] - 0.1 * trace[k]
  for k in ref:
    np.testing.assert_allclose(params[k], ref[k], rtol=1e-5, atol=1e-6)


def test_bad_optimizer_names_fail_clearly():
  with pytest.raises(ValueError, match="optimizer.name: expected 'sgd', 'adam' or 'adamw'"):
    optim.make_optimizer({"name": "rmsprop", "learning_rate": 0.1}, 10)
  with pytest.raises(ValueError, match="optimizer.schedule"):
    optim.make_schedule({"learning_rate": 0.1, "schedule": "poly"}, 10)


def test_frozen_parameters_stay_and_others_move():
  config = toy_config()
  base = build_system(config)
  def labels(params):
    return {k: jax.tree_util.tree_map(lambda _: "frozen" if k == "Conv_0" else "train", v)
            for k, v in params.items()}
  system = System(base.name, base.num_classes, base.init, base.loss, base.predict,
                  param_labels=labels)
  batch = toy_batch(0, 0, 4)
  state, rng, _ = setup.init_state(config, system, batch)
  new, metrics = jax.jit(loop.make_steps(system)[0])(state, batch, rng)
  p0, p1 = state.params, new.params
  np.testing.assert_array_equal(p1["Conv_0"]["kernel"], p0["Conv_0"]["kernel"])
  assert np.abs(p1["Dense_0"]["kernel"] - p0["Dense_0"]["kernel"]).max() > 0
  assert np.isfinite(metrics["loss"]) and int(new.step) == 1


def test_non_float32_params_are_rejected():
  config = toy_config(compute_dtype="bfloat16")
  base = build_system(config)
  def init(rng, batch):
    v = base.init(rng, batch)
    return jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), v)
  system = System(base.name, base.num_classes, init, base.loss, base.predict)
  with pytest.raises(ValueError, match="params: expected float32 parameters.*bfloat16"):
    create_train_state(system, optax.sgd(0.1), jax.random.PRNGKey(0), toy_batch(0, 0, 2))


def test_bfloat16_compute_keeps_float32_params():
  config = toy_config(compute_dtype="bfloat16")
  system = build_system(config)
  batch = toy_batch(0, 0, 4)
  state, rng, _ = setup.init_state(config, system, batch)
  step = loop.make_steps(system)[0]
  jaxpr = str(jax.make_jaxpr(step)(state, batch, rng))
  assert "conv_general_dilated" in jaxpr and "bf16" in jaxpr
  new, metrics = jax.jit(step)(state, batch, rng)
  dtypes = {x.dtype for x in jax.tree_util.tree_leaves(new.params)}
  assert dtypes == {jnp.dtype(jnp.float32)}
  assert metrics["loss"].dtype == jnp.float32 and np.isfinite(metrics["loss"])


def test_train_step_compiles_once_over_object_counts():
  config = toy_config()
  system = build_system(config)
  loader = make_toy_loader(config.data, "train", batch_size=4, seed=0, train=True)
  batches = [next(loader) for _ in range(4)]
  counts = {int(b["box_mask"].sum()) for b in batches}
  assert len(counts) > 1            # the batches hold different numbers of objects
  state, rng, _ = setup.init_state(config, system, batches[0])
  runner = loop.make_runner(system, "shard_map")
  n_step, _ = run_counting_compiles(runner, state, rng, batches)
  assert n_step == 1


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
  """Two runs with the same seed and config, one with another seed (shared by tests)."""
  config = toy_config(**{"train.num_steps": 4, "train.log_every": 2, "eval.every_steps": 2,
                         "checkpoint.every_steps": 1, "checkpoint.keep": 1,
                         "checkpoint.best_metric": "images_per_s", "eval.batch_size": 4,
                         "train.batch_size": 4})
  out = {}
  for name, seed in (("a", 0), ("b", 0), ("c", 1)):
    config.seed = seed
    workdir = str(tmp_path_factory.mktemp(name))
    state = loop.train_and_evaluate(config, workdir, system=build_system(config),
                                    make_loader=make_toy_loader)
    out[name] = (state, workdir)
  return out


def test_same_seed_gives_bitwise_identical_params(two_runs):
  a, b, c = (jax.tree_util.tree_leaves(two_runs[k][0].params) for k in "abc")
  for x, y in zip(a, b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert any(np.abs(np.asarray(x) - np.asarray(z)).max() > 0 for x, z in zip(a, c))


def test_logs_and_checkpoints_kept(two_runs):
  state, workdir = two_runs["a"]
  lines = read_metrics(workdir)
  train = [m for m in lines if m["split"] == "train"]
  evals = [m for m in lines if m["split"] == "eval"]
  assert [m["step"] for m in train] == [2, 4]
  for m in train:
    assert {"loss", "learning_rate", "images_per_s", "grad_norm"} <= set(m)
    assert np.isfinite(m["loss"]) and m["learning_rate"] == pytest.approx(0.01)
  assert [m["step"] for m in evals] == [2, 4]
  for m in evals:
    assert {"voc07_map", "coco_AP", "coco_AP50", "coco_AP75", "images_per_s"} <= set(m)
  assert glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents.*"))
  with open(os.path.join(workdir, "eval.json")) as f:
    assert json.load(f)["step"] == 4
  # keep = 1 latest, plus the best eval step by images_per_s
  best = max(evals, key=lambda m: m["images_per_s"])["step"]
  kept = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
  assert kept == sorted({4, best})


def test_imports_without_optional_packages():
  import subprocess
  import sys
  code = ("import sys\n"
          "for m in ('ml_collections', 'tensorboardX', 'tqdm', 'tensorflow_datasets', "
          "'pycocotools'):\n  sys.modules[m] = None\n"
          "import jaxdet.train, jaxdet.train.loop, jaxdet.train.checkpoint\n"
          "w = jaxdet.train.writers.MetricWriter(sys.argv[1])\n"
          "w.write(1, {'loss': 1.0})\n"
          "p = jaxdet.train.writers.Progress(2)\np.update(1, 0.5, 10.0)\n")
  import tempfile
  with tempfile.TemporaryDirectory() as d:
    proc = subprocess.run([sys.executable, "-W", "ignore", "-c", code, d], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "step 1/2 loss 0.5000" in proc.stderr
