"""Several seeds in one program (train.num_seeds): each replica is the one-seed run of its
seed, evaluation reports mean / std / per-seed scores, the stacked state checkpoints and
resumes, a non-finite replica is named, bad values fail before the first step, one compile."""

import dataclasses
import json
import logging
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from compiles import run_counting_compiles
from four_devices import run_on_four_devices
from toy_system import build_system, make_toy_loader, toy_batch, toy_config

from jaxdet.train import loop, preflight, setup
from jaxdet.train.checkpoint import CheckpointMismatchError
from jaxdet.train.evaluate import METRIC_NAMES, evaluate_variables, seed_path
from jaxdet.train.step import NonFiniteError
from jaxdet.train.writers import read_metrics

pytestmark = pytest.mark.xdist_group("seeds")   # one worker computes the module's fixture

SCORES = [m for m in METRIC_NAMES if m not in ("images_per_s", "num_images")]


def same_data(data_config, split, *, batch_size, seed, train, examples=None):
  """make_toy_loader with seed 0's images and order whatever config.seed is: a one-seed run
  of seed i then sees the batches the replicas of a run with config.seed = 0 see."""
  del seed, examples
  return make_toy_loader(data_config, split, batch_size=batch_size, seed=0, train=train)


def config(**kw):
  """4 steps of batch 4 with batch norm (model state) and a warm-up, eval and checkpoint at
  steps 2 and 4."""
  return toy_config(**{"train.num_steps": 4, "train.batch_size": 4, "train.log_every": 2,
                       "eval.every_steps": 2, "checkpoint.every_steps": 2,
                       "eval.batch_size": 4, "model.batch_norm": True,
                       "optimizer.warmup_steps": 2, **kw})


def train(cfg, workdir, system=None):
  return loop.train_and_evaluate(cfg, str(workdir), system=system or build_system(cfg),
                                 make_loader=same_data)


def replica(tree, i):
  return jax.tree_util.tree_map(lambda x: np.asarray(x)[i], tree)


def max_diff(a, b):
  return max(jax.tree_util.tree_leaves(jax.tree_util.tree_map(
      lambda x, y: float(np.max(np.abs(np.asarray(x) - np.asarray(y)))), a, b)))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """A run of 2 seeds and the one-seed runs of seeds 0 and 1 (eval and save at the end):
  {"seeds" / 0 / 1: (final state, workdir)}."""
  workdir = tmp_path_factory.mktemp("seeds")
  out = {"seeds": (train(config(**{"train.num_seeds": 2}), workdir), str(workdir))}
  for seed in (0, 1):
    workdir = tmp_path_factory.mktemp(f"seed{seed}")
    state = train(config(seed=seed, **{"eval.every_steps": 0, "checkpoint.every_steps": 0}),
                  workdir)
    out[seed] = state, str(workdir)
  return out


def tensorboard_tags(workdir):
  """The scalar tags of workdir/tensorboard's event files (TFRecords of Event protos)."""
  import glob
  import struct
  from tensorboardX.proto import event_pb2
  tags = set()
  for path in glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents.*")):
    with open(path, "rb") as f:
      data = f.read()
    pos = 0
    while pos < len(data):
      (n,) = struct.unpack("<Q", data[pos:pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + n])
      tags |= {v.tag for v in event.summary.value}
      pos += 12 + n + 4
  return tags


def test_each_replica_is_the_one_seed_run_of_its_seed(runs):
  stacked = runs["seeds"][0]
  assert int(stacked.step) == 4
  for i in (0, 1):
    single = runs[i][0]
    for part in ("params", "model_state", "opt_state"):   # model_state: batch statistics
      got, want = replica(getattr(stacked, part), i), getattr(single, part)
      assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
      assert max_diff(got, want) < 1e-6, (i, part)   # vmapped vs plain convs: rounding only
  assert max_diff(replica(stacked.params, 0), replica(stacked.params, 1)) > 1e-2
  # the logged training metrics are the means over the replicas
  logs = {k: [m for m in read_metrics(d) if m["split"] == "train" and m["step"] == 4][0]
          for k, d in ((0, runs[0][1]), (1, runs[1][1]), ("seeds", runs["seeds"][1]))}
  np.testing.assert_allclose(logs["seeds"]["loss"], (logs[0]["loss"] + logs[1]["loss"]) / 2,
                             rtol=1e-5)


def test_eval_reports_mean_std_and_each_seed_everywhere(runs):
  workdir = runs["seeds"][1]
  with open(os.path.join(workdir, "eval.json")) as f:
    final = json.load(f)
  evals = [m for m in read_metrics(workdir) if m["split"] == "eval"]
  assert [m["step"] for m in evals] == [2, 4]
  for name in SCORES:
    per_seed = [final[f"{name}/seed{i}"] for i in (0, 1)]
    assert final[name] == pytest.approx(np.mean(per_seed), abs=1e-12)
    assert final[f"{name}/std"] == pytest.approx(np.std(per_seed, ddof=1), abs=1e-12)
    for i in (0, 1):   # replica i's score is its one-seed run's
      with open(os.path.join(runs[i][1], "eval.json")) as f:
        assert per_seed[i] == pytest.approx(json.load(f)[name], abs=1e-6)
    assert {name, f"{name}/std", f"{name}/seed0", f"{name}/seed1"} <= set(evals[-1])
    assert f"{name}/seed2" not in final
  assert final["num_images"] == 6 and "num_images/std" not in final
  with open(os.path.join(workdir, "checkpoints", "scores.json")) as f:   # best_metric: mean
    assert json.load(f)["4"] == final["voc07_map"]
  tags = tensorboard_tags(workdir)
  assert {"eval/voc07_map", "eval/voc07_map/std", "eval/voc07_map/seed1", "train/loss"} <= tags


def _shifted(variables, batch):
  """Detections = the ground truth moved right by variables["shift"] pixels."""
  return {"boxes": batch["boxes"] + jnp.asarray([1.0, 0, 1, 0]) * variables["shift"],
          "scores": batch["box_mask"].astype(jnp.float32), "labels": batch["labels"],
          "valid": batch["box_mask"]}


def test_evaluate_variables_scores_each_replica(tmp_path):
  batches = [toy_batch(i, 3, 3, size=32) for i in range(2)]
  for b in batches:
    b["example_mask"] = np.array([True, True, False])
  shifts = np.array([0.0, 1.5, 4.0], np.float32)
  mean_x1 = lambda gts, dets: {"mean_x1": float(np.mean(np.concatenate(
      [d["boxes"][:, 0] for d in dets])))}
  got = evaluate_variables(_shifted, {"shift": shifts}, batches, 3, num_seeds=3,
                           extra_metrics=mean_x1, dump=str(tmp_path / "dets.jsonl"))
  alone = [evaluate_variables(_shifted, {"shift": s}, batches, 3, extra_metrics=mean_x1)
           for s in shifts]
  for name in SCORES + ["mean_x1"]:
    per_seed = [got[f"{name}/seed{i}"] for i in range(3)]
    np.testing.assert_allclose(per_seed, [a[name] for a in alone], rtol=1e-6, err_msg=name)
    np.testing.assert_allclose(got[name], np.mean(per_seed), rtol=1e-12)
    np.testing.assert_allclose(got[f"{name}/std"], np.std(per_seed, ddof=1), rtol=1e-12)
  assert len(set(got[f"coco_AP/seed{i}"] for i in range(3))) == 3   # the replicas differ
  for i, s in enumerate(shifts):
    with open(seed_path(str(tmp_path / "dets.jsonl"), i)) as f:
      first = json.loads(f.readline())
    assert first["detections"][0]["box"][0] == pytest.approx(
        float(batches[0]["boxes"][0, 0, 0] + s))


def test_resume_of_several_seeds_equals_the_uninterrupted_run(runs, tmp_path):
  cfg = config(**{"train.num_seeds": 2})
  train(config(**{"train.num_seeds": 2, "train.num_steps": 2}), tmp_path)
  resumed = train(cfg, tmp_path)   # restores step 2 (digests verified), trains 3 and 4
  reference = runs["seeds"][0]
  for part in ("params", "model_state", "opt_state"):
    for a, b in zip(jax.tree_util.tree_leaves(getattr(resumed, part)),
                    jax.tree_util.tree_leaves(getattr(reference, part))):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_restore_with_another_seed_count_fails_naming_it(runs):
  cfg = config(**{"train.num_seeds": 3})
  with pytest.raises(CheckpointMismatchError, match=r"train\.num_seeds: checkpoint 2, now 3"):
    loop.restore_all_seeds(cfg, runs["seeds"][1], build_system(cfg), toy_batch(0, 0, 4))


def test_inference_picks_replica_zero_by_default_and_says_so(runs, caplog):
  cfg, workdir = config(**{"train.num_seeds": 2}), runs["seeds"][1]
  batch, stacked = toy_batch(0, 0, 4), runs["seeds"][0]
  with caplog.at_level(logging.WARNING):
    first = loop.restore_for_inference(cfg, workdir, build_system(cfg), batch)
  assert "using replica 0" in caplog.text
  assert max_diff(first.params, replica(stacked.params, 0)) == 0
  second = loop.restore_for_inference(cfg, workdir, build_system(cfg), batch, replica=1)
  assert max_diff(second.params, replica(stacked.params, 1)) == 0
  with pytest.raises(ValueError, match=r"replica: expected an int in \[0, 2\).*got 2"):
    loop.restore_for_inference(cfg, workdir, build_system(cfg), batch, replica=2)


def _one_bad_replica(cfg, bad):
  """The toy system with a parameter "marker" drawn from the init key; the loss is NaN for
  the replica `bad` of seeds 0 and 1 (whose marker lies on its side of the midpoint)."""
  base = build_system(cfg)
  marks = [float(jax.random.uniform(jax.random.split(jax.random.PRNGKey(s))[0]))
           for s in (0, 1)]
  mid, side = sum(marks) / 2, np.sign(marks[bad] - sum(marks) / 2)

  def init(rng, batch):
    variables = dict(base.init(rng, batch))
    variables["params"] = {**variables["params"], "marker": jax.random.uniform(rng)}
    return variables

  def loss(variables, batch, rng):
    params = dict(variables["params"])
    marker = params.pop("marker")
    total, metrics, state = base.loss({**variables, "params": params}, batch, rng)
    return jnp.where(side * (marker - mid) > 0, jnp.nan, total), metrics, state

  return dataclasses.replace(base, init=init, loss=loss)


def test_a_nonfinite_replica_stops_the_run_naming_it(tmp_path):
  cfg = config(**{"train.num_seeds": 2, "train.log_every": 1, "checkpoint.every_steps": 1})
  with pytest.raises(NonFiniteError) as err:
    train(cfg, tmp_path, _one_bad_replica(cfg, 1))
  message = str(err.value)
  assert "step 1:" in message and "loss = nan" in message, message
  assert "replica 1 of train.num_seeds=2, seed 1" in message, message
  ckpts = os.path.join(tmp_path, "checkpoints")
  assert not [d for d in os.listdir(ckpts) if d.isdigit()]   # nothing saved


@pytest.mark.parametrize("value", [0, -1, True, "2", 1.5])
def test_num_seeds_must_be_a_positive_int(value, tmp_path):
  cfg = config()
  cfg.train = ml_collections.ConfigDict({**cfg.train.to_dict(), "num_seeds": value})
  with pytest.raises(ValueError, match=r"train\.num_seeds: expected an integer >= 1, got"):
    train(cfg, tmp_path)
  assert not os.listdir(tmp_path)   # failed before anything was written


def test_the_seeded_step_compiles_once_and_logs_scalars():
  cfg = config(**{"train.num_seeds": 3})
  system = build_system(cfg)
  loader = make_toy_loader(cfg.data, "train", batch_size=4, seed=0, train=True)
  batches = [next(loader) for _ in range(3)]
  assert len({int(b["box_mask"].sum()) for b in batches}) > 1   # other object counts
  state, rng, _ = setup.init_state(cfg, system, batches[0])
  assert rng.shape == (3, 2) and state.step.shape == ()
  runner = loop.make_runner(system, num_seeds=preflight.num_seeds(cfg))
  n_step, metrics = run_counting_compiles(runner, state, rng, batches)
  assert n_step == 1
  assert {np.shape(v) for v in metrics.values()} == {()}


def test_several_seeds_on_four_devices_match_one_seed_runs():
  out = run_on_four_devices("seeds_check.py")
  assert out["devices"] == 4 and out["moved"] > 1e-2, out
  assert out["shard_map"] < 1e-6 and out["pmap"] < 1e-6, out
  assert out["shard_map_metric_shapes"] == out["pmap_metric_shapes"] == [[]], out


@pytest.mark.parametrize("args", [["--config=experiments/configs/rcnn.py"],
                                  ["--config=experiments/configs/faster_rcnn.py",
                                   "--config.model.stage=alternating"]])
def test_multi_stage_pipelines_refuse_several_seeds(args, tmp_path):
  from experiments import train as train_script
  with pytest.raises(ValueError, match=r"train\.num_seeds: the multi-stage training"):
    train_script.main(["train", *args, "--workdir", str(tmp_path),
                       "--config.train.num_seeds=2"])
