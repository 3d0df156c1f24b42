"""The training loop: `train_and_evaluate(config, workdir)` trains, evaluates, checkpoints.

Run again on the same workdir, it resumes from the latest checkpoint: parameters, optimizer
state, step, PRNG key and the data iterator position, so an interrupted run ends with the
same parameters as an uninterrupted one.

When things go wrong: a step whose loss, gradients or updated state is not finite is never
applied (`train.on_nonfinite`: "stop" ends the run with an error naming the step and the
non-finite loss terms, "skip" drops the update and stops after `train.max_consecutive_skips`
in a row); nothing non-finite is saved; a corrupt latest checkpoint is set aside and the
newest good one restored (jaxdet.train.checkpoint); the final state is saved before the final
evaluation, so a failing evaluation loses no training.

Several seeds in one program (`train.num_seeds` = N > 1): N replicas, replica i from seed
config.seed + i, trained at once by one jitted step (jaxdet.train.step.seeds_train_step) on
the same batches (the data order is config.seed's); the logged training metrics are the means
over the replicas; every eval score is reported as NAME (the mean), NAME/std and NAME/seed{i}
(jaxdet.train.evaluate.seed_summary), and checkpoint.best_metric follows the mean. The stacked
state is checkpointed and resumed as one; a non-finite replica stops (or skips) the step of
all and the error names it.
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
from jaxdet.train import preflight
from jaxdet.train.evaluate import evaluate_variables
from jaxdet.train.state import TrainState, select_replica
from jaxdet.train.step import (NonFiniteError, guard_report, init_guard, make_guarded_step,
                               make_steps)  # noqa: F401 (make_steps: re-exported)
from jaxdet.train.writers import MetricWriter, Progress

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Runner:
  """One jitted data-parallel step and how to move state and batches to and from it.

  On the devices the state travels as a carry (TrainState, guard): the step is
  jaxdet.train.step.guarded_train_step, which refuses non-finite updates and records them in
  the guard.
  """
  step: Callable[[Any, Any, Any], tuple[Any, Any]]   # (carry, batch, rng) -> (carry, metrics
                                                      # {name: f32[]}, one copy)
  put_state: Callable[[Any], Any]                     # TrainState -> carry, with a fresh guard
  put_batch: Callable[[Any], Any]
  put_rng: Callable[[Any], Any]
  get_state: Callable[[Any], TrainState]              # carry -> one host-side copy of the state
  get_guard: Callable[[Any], Any]                     # carry -> one copy of the guard


def make_runner(system: System, mode: str = "shard_map", *, donate: bool = True,
                on_nonfinite: str = "stop", max_consecutive_skips: int = 10,
                num_seeds: int = 1) -> Runner:
  """The data-parallel step over all devices: mode "shard_map" (a mesh) or "pmap".

  on_nonfinite, max_consecutive_skips: what the step does with a non-finite update (config
    keys train.on_nonfinite and train.max_consecutive_skips; see guarded_train_step).
  num_seeds: train.num_seeds; > 1: the state holds that many stacked replicas, vmapped inside
    the step (the metrics are their means).
  """
  step = make_guarded_step(system, on_nonfinite, max_consecutive_skips, num_seeds)
  if mode == "shard_map":
    mesh = parallel.data_mesh()
    replicate = functools.partial(parallel.replicate_on, mesh=mesh)
    return Runner(parallel.shard_map_step(step, mesh, donate=donate),
                  lambda s: replicate((s, init_guard())),
                  lambda b: parallel.shard_batch(b, mesh), replicate,
                  lambda c: c[0], lambda c: c[1])
  if mode == "pmap":
    pmapped = parallel.pmap_step(step, donate=donate)

    def pmap_step(carry, batch, rng):   # metrics are averaged over the devices: one copy
      carry, metrics = pmapped(carry, batch, rng)
      return carry, parallel.unreplicate(metrics)

    return Runner(pmap_step,
                  lambda s: parallel.put_replicated((s, init_guard())),
                  parallel.split_for_pmap, parallel.put_replicated,
                  lambda c: parallel.unreplicate(c[0]), lambda c: parallel.unreplicate(c[1]))
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


def _eval(config: Any, system: System, state: TrainState, *, make_loader, data,
          max_batches: int) -> dict[str, float]:
  # sharded over every device: the eval batch rounded up to a multiple of them (the padding
  # is masked out of the scores)
  d = jax.device_count()
  loader = _make(make_loader, config, config.eval.split,
                 batch_size=-(-int(config.eval.batch_size) // d) * d,
                 seed=int(config.seed), train=False, data=data)
  return evaluate_variables(system.predict, state.variables, loader, system.num_classes,
                            max_batches=max_batches,
                            extra_metrics=system.eval_metrics, num_seeds=preflight.num_seeds(config))


def _due(step: int, every: int) -> bool:
  return every > 0 and step % every == 0


def _num_steps(config: Any) -> int:
  """config.train.num_steps, which must be a positive count."""
  num_steps = config.train.num_steps
  if isinstance(num_steps, bool) or int(num_steps) != num_steps or num_steps <= 0:
    raise ValueError(f"train.num_steps: expected a positive number of steps, got {num_steps!r}")
  return int(num_steps)


def _runner_from_config(config: Any, system: System) -> Runner:
  train = config.train
  return make_runner(system, str(train.get("parallel", "shard_map")),
                     on_nonfinite=str(train.get("on_nonfinite", "stop")),
                     max_consecutive_skips=train.get("max_consecutive_skips", 10),
                     num_seeds=preflight.num_seeds(config))


def nonfinite_message(report: dict[str, Any], config: Any, learning_rate: float,
                      last_checkpoint: int | None) -> str:
  """The error of a run stopped by the non-finite guard (`report`: step.guard_report's)."""
  step, policy = report["step"], str(config.train.get("on_nonfinite", "stop"))
  bad = report["nonfinite"]
  terms = {k: v for k, v in bad.items() if "loss" in k}   # loss, loss/<term>, ...
  others = {k: v for k, v in bad.items() if k not in terms and k != "update_norm"}
  show = lambda d: ", ".join(f"{k} = {v}" for k, v in sorted(d.items()))
  if terms:
    what = f"non-finite loss terms: {show(terms)}"
    what += f"; also {show(others)}" if others else ""
  elif others:
    what = f"finite loss, non-finite {show(others)} (NaN or inf gradients)"
  else:
    what = ("finite loss and gradients, but the updated parameters or optimizer state were not "
            f"(learning rate at that step: {learning_rate}; check the optimizer settings)")
  if policy == "skip":
    head = (f"step {step}: {int(config.train.get('max_consecutive_skips', 10))} non-finite "
            f"steps in a row were skipped (train.max_consecutive_skips; {report['skipped']} "
            f"skipped in all); the last: {what}")
  else:
    head = f"step {step}: the training went non-finite (train.on_nonfinite='stop'): {what}"
  n = preflight.num_seeds(config)
  if n > 1:
    seed = report.get("seed", 0)
    head += (f" (in replica {seed} of train.num_seeds={n}, seed {int(config.seed) + seed}: the "
             f"first non-finite one; no replica was updated)")
  saved = "none yet" if last_checkpoint is None else f"step {last_checkpoint}"
  return (f"{head}. That update was not applied and nothing non-finite was saved (the newest "
          f"checkpoint is {saved}). Lower optimizer.learning_rate, set "
          f"optimizer.grad_clip_norm, check the data, or set train.on_nonfinite='skip'.")


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
  preflight.check_train(config, system, make_loader, examples=examples,
                        eval_examples=eval_examples, class_names=class_names)
  num_steps = _num_steps(config)
  runner = _runner_from_config(config, system)
  num_devices = jax.device_count()
  batch_size = int(config.train.batch_size)
  parallel.check_batch_divisible(batch_size, num_devices)
  loader = _make(make_loader, config, "train", batch_size=batch_size, seed=int(config.seed),
                 train=True, data=(examples, class_names))
  eval_data = (eval_examples, class_names)
  state, rng, schedule = setup.init_state(config, system, setup.peek(loader))
  ckpt = setup.open_checkpoints(config, workdir, system)
  leader = jax.process_index() == 0
  writer = None
  try:
    restored = ckpt.restore(state, rng)
    if restored is not None:
      state, rng, loader_state = restored
      loader.set_state(loader_state)
      log.info("resuming from step %d of %s", int(state.step), workdir)
    writer = MetricWriter(workdir, enabled=leader)
    start = int(state.step)   # a finished run evaluates its last step again
    writer.truncate(start, keep_eval_at_step=start < num_steps)
    scores_of = functools.partial(_eval, config, system, make_loader=make_loader,
                                  data=eval_data)
    run = _Run(config=config, runner=runner, schedule=schedule, ckpt=ckpt, writer=writer,
               scores_of=scores_of, leader=leader)
    state = _run(run, state, rng, loader)
    step = int(state.step)
    if ckpt.latest_step() != step:
      ckpt.save(state, rng, loader.get_state())
    ckpt.wait()   # the trained state is on disk before the final evaluation
    final = scores_of(state, max_batches=-1)
    writer.write(step, final, split="eval")
    ckpt.record_scores(step, final)
    if leader:
      write_eval_json(workdir, step, final)
  finally:
    ckpt.close()
    if writer is not None:
      writer.close()
  return state


@dataclasses.dataclass(frozen=True)
class _Run:
  """What the step loop works with, fixed for a run.

  config: the experiment config; runner: the device wrapper (jaxdet.train.parallel); schedule:
  step -> learning rate; ckpt: the run's Checkpoints; writer: its MetricWriter; scores_of:
  (host state, *, max_batches) -> eval scores; leader: this process writes the logs.
  """
  config: Any
  runner: Runner
  schedule: Callable[[int], Any]
  ckpt: Any
  writer: MetricWriter
  scores_of: Callable[..., dict[str, float]]
  leader: bool


def _run(run: _Run, state: TrainState, rng: jax.Array, loader: Any) -> TrainState:
  """The step loop from state.step to config.train.num_steps; returns a host-side state.

  The guard of the non-finite check is read where the loop reads the device anyway: at each
  log, evaluation, checkpoint and at the end; a tripped guard raises NonFiniteError there,
  before anything is evaluated or saved.
  """
  config, runner, schedule, ckpt, writer = (run.config, run.runner, run.schedule, run.ckpt,
                                            run.writer)
  num_steps, start = int(config.train.num_steps), int(state.step)
  log_every, batch_size = int(config.train.log_every), int(config.train.batch_size)
  eval_every = int(config.eval.every_steps)
  ckpt_every = int(config.checkpoint.every_steps)
  progress = Progress(num_steps, start, enabled=run.leader)
  device_state, device_rng = runner.put_state(state), runner.put_rng(rng)
  it = iter(loader)
  tick, tick_step = time.perf_counter(), start

  def check(guard, names):
    report = guard_report(guard, names)
    if report is not None:
      progress.close()
      lr = float(schedule(report["step"] - 1))
      raise NonFiniteError(nonfinite_message(report, config, lr, ckpt.latest_step()))

  for step in range(start + 1, num_steps + 1):
    batch = runner.put_batch(next(it))
    device_state, metrics = runner.step(device_state, batch, device_rng)
    names = list(metrics)   # the step's metric names, which the guard's record follows
    if _due(step, log_every) or step == num_steps:
      metrics, guard = jax.device_get((metrics, runner.get_guard(device_state)))
      metrics = {k: float(v) for k, v in metrics.items()}
      now = time.perf_counter()
      metrics["images_per_s"] = (step - tick_step) * batch_size / (now - tick)
      metrics["learning_rate"] = float(schedule(step - 1))
      writer.write(step, metrics)
      progress.update(step, metrics["loss"], metrics["images_per_s"])
      tick, tick_step = time.perf_counter(), step
      check(guard, names)
    if step == num_steps:
      break   # the final save and eval follow in train_and_evaluate
    if _due(step, eval_every) or _due(step, ckpt_every):
      check(jax.device_get(runner.get_guard(device_state)), names)
      state = runner.get_state(device_state)
      scores = None
      if _due(step, eval_every):
        scores = run.scores_of(state, max_batches=int(config.eval.max_batches))
        writer.write(step, scores, split="eval")
      ckpt.save(state, rng, loader.get_state(), scores)
  progress.close()
  return runner.get_state(device_state)


def write_eval_json(workdir: str, step: int, metrics: dict[str, float]) -> str:
  """Writes {"step", **metrics} to workdir/eval.json (strict JSON: NaN as null); returns its
  path. A failed write raises OSError naming the path and carrying the scores."""
  path = os.path.join(workdir, "eval.json")
  record = {"step": step, **{k: float(v) for k, v in metrics.items()}}
  try:
    files.write_json(path, record, indent=2)
  except OSError as e:
    message = (f"eval.json: cannot write {path} ({e.strerror or e}); the scores were: "
               f"{files.dumps(record)}")
    raise (OSError(e.errno, message) if e.errno else OSError(message)) from e
  return path


def _no_checkpoint(workdir: str) -> FileNotFoundError:
  return FileNotFoundError(f"workdir: no checkpoint under {os.path.abspath(workdir)}/checkpoints;"
                           f" train first with python -m experiments.train --config ... "
                           f"--workdir {workdir}")


def restore_for_inference(config: Any, workdir: str, system: System, batch: Any, *,
                          replica: int | None = None) -> TrainState:
  """The newest good checkpoint of `workdir` as a host-side TrainState of one model (for
  evaluation, detection, export and the multi-stage pipelines).

  Reads only: creates, moves and deletes nothing (a corrupt step is skipped with a warning).
  Args:
    replica: which of the train.num_seeds > 1 replicas (seed config.seed + replica); None =
      replica 0, with a warning saying so. A one-seed run has only replica 0.
  Raises:
    FileNotFoundError: `workdir` holds no checkpoint (naming it and the train command).
    ValueError: `replica` is not one of the run's.
  """
  n = preflight.num_seeds(config)
  if replica is not None and (isinstance(replica, bool) or not isinstance(replica, int)
                              or not 0 <= replica < n):
    raise ValueError(f"replica: expected an int in [0, {n}) (the run's train.num_seeds={n} "
                     f"replicas), got {replica!r}")
  state = restore_all_seeds(config, workdir, system, batch)
  if n == 1:
    return state
  if replica is None:
    replica = 0
    log.warning("%s holds %d replicas (train.num_seeds); using replica 0 (seed %d); pass "
                "replica=i to choose another", workdir, n, int(config.seed))
  return select_replica(state, replica)


def restore_all_seeds(config: Any, workdir: str, system: System, batch: Any) -> TrainState:
  """`restore_for_inference`'s state as saved: with train.num_seeds > 1 every replica,
  stacked along a leading axis."""
  if not os.path.isdir(os.path.join(workdir, "checkpoints")):
    raise _no_checkpoint(workdir)
  state, rng, _ = setup.init_state(config, system, batch)
  ckpt = setup.open_checkpoints(config, workdir, system, read_only=True)
  try:
    restored = ckpt.restore(state, rng)
  finally:
    ckpt.close()
  if restored is None:
    raise _no_checkpoint(workdir)
  return restored[0]


def evaluate(config: Any, workdir: str, *, system: System | None = None,
             make_loader: Callable[..., Any] | None = None, examples: Any = None,
             class_names: Any = None, dump: str | None = None) -> dict[str, float]:
  """Scores the latest checkpoint of `workdir` on `config.eval.split`; prints the scores to
  stdout, then writes eval.json (and with `dump` the detections as JSON Lines,
  jaxdet.train.evaluate.write_detections).

  Returns:
    {"voc07_map", "coco_AP", "coco_AP50", "coco_AP75", "images_per_s", "num_images"}; with
    train.num_seeds > 1 every replica is scored, each score as NAME (the mean), NAME/std and
    NAME/seed{i} (jaxdet.train.evaluate.seed_summary; `dump` one file per replica).
  """
  system = setup.system_from_config(config) if system is None else system
  make_loader = setup.default_make_loader() if make_loader is None else make_loader
  preflight.check_evaluate(config, system, make_loader, examples=examples,
                           class_names=class_names)
  loader = _make(make_loader, config, config.eval.split, batch_size=int(config.eval.batch_size),
                 seed=int(config.seed), train=False, data=(examples, class_names))
  state = restore_all_seeds(config, workdir, system, setup.peek(loader))
  metrics = evaluate_variables(system.predict, state.variables, loader, system.num_classes,
                               extra_metrics=system.eval_metrics, dump=dump,
                               num_seeds=preflight.num_seeds(config))
  print(f"step {int(state.step)}: " + files.dumps(metrics), flush=True)   # before the write
  write_eval_json(workdir, int(state.step), metrics)
  return metrics
