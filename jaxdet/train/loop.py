"""The training loop: `train_and_evaluate(config, workdir)` trains, evaluates, checkpoints.

Run again on the same workdir, it resumes from the latest checkpoint: parameters, optimizer
state, step, PRNG key and the data iterator position, so an interrupted run ends with the
same parameters as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import time
from typing import Any, Callable

import jax

from jaxdet import files
from jaxdet.system import System
from jaxdet.train import parallel, setup
from jaxdet.train.evaluate import evaluate_variables
from jaxdet.train.state import TrainState
from jaxdet.train.step import make_steps
from jaxdet.train.writers import MetricWriter, Progress

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Runner:
  """One jitted data-parallel step and how to move state and batches to and from it."""
  step: Callable[[Any, Any, Any], tuple[Any, Any]]   # (state, batch, rng) -> (state, metrics)
  put_state: Callable[[Any], Any]
  put_batch: Callable[[Any], Any]
  put_rng: Callable[[Any], Any]
  get_state: Callable[[Any], TrainState]              # back to one host-side copy


def make_runner(system: System, mode: str = "shard_map", *, donate: bool = True) -> Runner:
  """The data-parallel step over all devices: mode "shard_map" (a mesh) or "pmap"."""
  train_step, _ = make_steps(system)
  if mode == "shard_map":
    mesh = parallel.data_mesh()
    replicate = functools.partial(parallel.replicate_on, mesh=mesh)
    return Runner(parallel.shard_map_step(train_step, mesh, donate=donate), replicate,
                  lambda b: parallel.shard_batch(b, mesh), replicate, lambda s: s)
  if mode == "pmap":
    return Runner(parallel.pmap_step(train_step, donate=donate), parallel.put_replicated,
                  parallel.split_for_pmap, parallel.put_replicated, parallel.unreplicate)
  raise ValueError(f"train.parallel: expected 'shard_map' or 'pmap', got {mode!r}")


def _make(make_loader, config: Any, split: str, *, batch_size: int, seed: int, train: bool,
          data: tuple[Any, Any]) -> Any:
  """make_loader(...), passing one's own (examples, class_names) when given; with several
  processes, each loads its part of every global batch (shard; the same seed and order)."""
  examples, class_names = data
  kw = {} if examples is None else {"examples": examples, "class_names": class_names}
  if jax.process_count() > 1:
    kw["shard"] = (jax.process_index(), jax.process_count())
  return make_loader(config.data, split, batch_size=batch_size, seed=seed, train=train, **kw)


def _eval(config: Any, system: System, state: TrainState, make_loader, data,
          max_batches: int) -> dict[str, float]:
  # sharded over every device: the eval batch rounded up to a multiple of them (the padding
  # is masked out of the scores)
  d = jax.device_count()
  loader = _make(make_loader, config, config.eval.split,
                 batch_size=-(-int(config.eval.batch_size) // d) * d,
                 seed=int(config.seed), train=False, data=data)
  return evaluate_variables(system.predict, state.variables, loader, system.num_classes,
                            max_batches=max_batches,
                            extra_metrics=system.extras.get("eval_metrics"))


def _due(step: int, every: int) -> bool:
  return every > 0 and step % every == 0


def train_and_evaluate(config: Any, workdir: str, *, system: System | None = None,
                       make_loader: Callable[..., Any] | None = None, examples: Any = None,
                       eval_examples: Any = None, class_names: Any = None) -> TrainState:
  """Trains `config.system` for `config.train.num_steps` steps in `workdir`, resuming.

  Args:
    config: an experiment config (experiments/configs/common.py lists the sections).
    workdir: checkpoints/, metrics.jsonl, tensorboard/ and eval.json go here.
    system: the detector; default: built from `config.system` via jaxdet.systems.
    make_loader: default jaxdet.data.pipeline.make_loader.
    examples, eval_examples, class_names: one's own data for the train and eval loaders:
      lists of {"image", "boxes", "labels"} dicts (set config.data.name = "examples" and
      config.num_classes = len(class_names)); None = the dataset of `config.data`.
  Returns:
    The final TrainState (one host-side copy). The final eval metrics are in workdir/eval.json.
  """
  system = setup.system_from_config(config) if system is None else system
  make_loader = setup.default_make_loader() if make_loader is None else make_loader
  num_devices = jax.device_count()
  batch_size = int(config.train.batch_size)
  parallel.check_batch_divisible(batch_size, num_devices)
  loader = _make(make_loader, config, "train", batch_size=batch_size, seed=int(config.seed),
                 train=True, data=(examples, class_names))
  eval_data = (eval_examples, class_names)
  state, rng, schedule = setup.init_state(config, system, setup.peek(loader))
  ckpt = setup.open_checkpoints(config, workdir, system)
  restored = ckpt.restore(state, rng)
  if restored is not None:
    state, rng, loader_state = restored
    loader.set_state(loader_state)
    log.info("resuming from step %d of %s", int(state.step), workdir)
  leader = jax.process_index() == 0
  writer = MetricWriter(workdir, enabled=leader)
  runner = make_runner(system, str(config.train.get("parallel", "shard_map")))
  state = _run(config, system, runner, state, rng, loader, schedule, ckpt, writer,
               make_loader, eval_data, leader)
  final = _eval(config, system, state, make_loader, eval_data, -1)
  writer.write(int(state.step), final, split="eval")
  if ckpt.latest_step() != int(state.step):
    ckpt.save(state, rng, loader.get_state(), final)
  ckpt.wait()
  ckpt.close()
  writer.close()
  if leader:
    write_eval_json(workdir, int(state.step), final)
  return state


def _run(config, system, runner, state, rng, loader, schedule, ckpt, writer, make_loader,
         eval_data, leader) -> TrainState:
  """The step loop from state.step to config.train.num_steps; returns a host-side state."""
  num_steps, start = int(config.train.num_steps), int(state.step)
  log_every, batch_size = int(config.train.log_every), int(config.train.batch_size)
  eval_every = int(config.eval.every_steps)
  ckpt_every = int(config.checkpoint.every_steps)
  progress = Progress(num_steps, start, enabled=leader)
  device_state, device_rng = runner.put_state(state), runner.put_rng(rng)
  it = iter(loader)
  tick, tick_step = time.perf_counter(), start
  for step in range(start + 1, num_steps + 1):
    batch = runner.put_batch(next(it))
    device_state, metrics = runner.step(device_state, batch, device_rng)
    if _due(step, log_every) or step == num_steps:
      metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
      now = time.perf_counter()
      metrics["images_per_s"] = (step - tick_step) * batch_size / (now - tick)
      metrics["learning_rate"] = float(schedule(step - 1))
      writer.write(step, metrics)
      progress.update(step, metrics["loss"], metrics["images_per_s"])
      tick, tick_step = time.perf_counter(), step
    if step == num_steps:
      break   # the final eval and save follow in train_and_evaluate
    if _due(step, eval_every) or _due(step, ckpt_every):
      state = runner.get_state(device_state)
      scores = None
      if _due(step, eval_every):
        scores = _eval(config, system, state, make_loader, eval_data,
                       int(config.eval.max_batches))
        writer.write(step, scores, split="eval")
      ckpt.save(state, rng, loader.get_state(), scores)
  progress.close()
  return runner.get_state(device_state)


def write_eval_json(workdir: str, step: int, metrics: dict[str, float]) -> str:
  """Writes {"step", **metrics} to workdir/eval.json; returns its path."""
  path = os.path.join(workdir, "eval.json")
  files.write_json(path, {"step": step, **{k: float(v) for k, v in metrics.items()}},
                   indent=2)
  return path


def restore_for_inference(config: Any, workdir: str, system: System, batch: Any
                          ) -> TrainState:
  """The latest checkpoint of `workdir` as a host-side TrainState (for evaluation)."""
  state, rng, _ = setup.init_state(config, system, batch)
  ckpt = setup.open_checkpoints(config, workdir, system)
  restored = ckpt.restore(state, rng)
  ckpt.close()
  if restored is None:
    raise FileNotFoundError(f"workdir: no checkpoint under {workdir}/checkpoints; train first "
                            f"with python -m experiments.train --workdir {workdir}")
  return restored[0]


def evaluate(config: Any, workdir: str, *, system: System | None = None,
             make_loader: Callable[..., Any] | None = None, examples: Any = None,
             class_names: Any = None) -> dict[str, float]:
  """Scores the latest checkpoint of `workdir` on `config.eval.split`; writes eval.json.

  Returns:
    {"voc07_map", "coco_AP", "coco_AP50", "coco_AP75", "images_per_s", "num_images"}.
  """
  system = setup.system_from_config(config) if system is None else system
  make_loader = setup.default_make_loader() if make_loader is None else make_loader
  loader = _make(make_loader, config, config.eval.split, batch_size=int(config.eval.batch_size),
                 seed=int(config.seed), train=False, data=(examples, class_names))
  state = restore_for_inference(config, workdir, system, setup.peek(loader))
  metrics = evaluate_variables(system.predict, state.variables, loader, system.num_classes,
                               extra_metrics=system.extras.get("eval_metrics"))
  write_eval_json(workdir, int(state.step), metrics)
  return metrics
