"""Checks before a run's first step: every mistake knowable then fails the run then.

A multi-hour run must not fail after training (or, worse, train on wrong labels) because of
something that could have been seen before step 1: a mistyped metric name, a class count that
does not match the data, a bad example of one's own data, an empty evaluation split. The
training loop calls `check_train` and evaluation `check_evaluate` first; each error names the
config key (or argument), the value and the fix.

What is checked (README, "Mistakes caught before the first step"):
  config: train.num_steps >= 1; train.num_seeds a whole number >= 1; train.batch_size >= 1 and divisible by the device (and host)
    count; train.log_every, eval.every_steps, checkpoint.every_steps >= 0; train.parallel;
    eval.batch_size >= 1; eval.max_batches -1 or >= 1; eval.split; checkpoint.keep >= 1;
    checkpoint.best_mode; checkpoint.best_metric among the system's eval metric names.
  data (when the loader is jaxdet.data.pipeline's): per split, jaxdet.data.pipeline.check_split
    (box and resize settings, the split exists and is not empty, the dataset's class count is
    the model's num_classes, one's own examples all valid); examples passed without
    data.name "examples", or data.name "examples" without them.
"""

from __future__ import annotations

import difflib
import logging
from typing import Any, Callable

import jax

from jaxdet.system import System
from jaxdet.train import parallel
from jaxdet.train.evaluate import METRIC_NAMES

log = logging.getLogger(__name__)


def eval_metric_names(system: System) -> tuple[str, ...] | None:
  """The names of the metrics evaluation reports for `system`.

  Returns:
    jaxdet.train.evaluate.METRIC_NAMES plus the system's `eval_metric_names`; None when the
    system has `eval_metrics` but does not declare their names (then the names are known only
    after an evaluation).
  """
  if system.eval_metrics is not None and not system.eval_metric_names:
    return None
  return tuple(METRIC_NAMES) + tuple(system.eval_metric_names)


def _whole(key: str, value: Any, minimum: int, fix: str = "") -> int:
  """`value` as an int; it must be a whole number >= minimum (bools and strings are not)."""
  ok = (isinstance(value, (int, float)) and not isinstance(value, bool)
        and float(value).is_integer() and value >= minimum)
  if not ok:
    fix = fix or f"set --config.{key}=N with N >= {minimum}"
    raise ValueError(f"{key}: expected an integer >= {minimum}, got {value!r}; {fix}")
  return int(value)


def _one_of(key: str, value: Any, allowed: tuple[str, ...]) -> None:
  if value not in allowed:
    raise ValueError(f"{key}: expected one of {allowed}, got {value!r}; set "
                     f"--config.{key}={allowed[0]}")


def num_seeds(config: Any) -> int:
  """config.train.num_seeds (1 when the config has none): the replicas trained at once, a
  whole number >= 1 (a bool, a string or 0 is an error naming the key)."""
  return _whole("train.num_seeds", config.train.get("num_seeds", 1), 1,
                "set --config.train.num_seeds=N with N >= 1 (1 = one run, the default)")


def check_best_metric(metric: str, system: System) -> None:
  """checkpoint.best_metric must be "" or a metric evaluation reports for `system`."""
  names = eval_metric_names(system)
  if not metric or names is None or metric in names:
    return
  near = difflib.get_close_matches(metric, names, n=1)
  guess = f"did you mean {near[0]!r}? " if near else ""
  raise ValueError(
      f"checkpoint.best_metric: {metric!r} is not an eval metric of system {system.name!r}; "
      f"{guess}valid names: {', '.join(names)} (or '' to keep only the last checkpoints); set "
      f"--config.checkpoint.best_metric={near[0] if near else names[0]}")


def check_config(config: Any, system: System) -> None:
  """The train, eval and checkpoint sections of a training run's config."""
  train, ev, ck = config.train, config.eval, config.checkpoint
  _whole("train.num_steps", train.num_steps, 1)
  num_seeds(config)
  batch = _whole("train.batch_size", train.batch_size, 1)
  parallel.check_batch_divisible(batch, jax.device_count())
  if batch % jax.process_count():
    raise ValueError(f"train.batch_size: expected a multiple of the {jax.process_count()} "
                     f"hosts, got {batch}")
  _whole("train.log_every", train.log_every, 0, "0 logs only the last step")
  _one_of("train.parallel", train.get("parallel", "shard_map"), ("shard_map", "pmap"))
  check_eval_config(config)
  _whole("eval.every_steps", ev.every_steps, 0, "0 evaluates only at the end")
  _whole("checkpoint.every_steps", ck.every_steps, 0, "0 saves only at the end")
  _whole("checkpoint.keep", ck.keep, 1)
  _one_of("checkpoint.best_mode", ck.get("best_mode", "max"), ("max", "min"))
  check_best_metric(str(ck.get("best_metric", "")), system)


def check_eval_config(config: Any) -> None:
  """The eval section: batch size, max_batches and split."""
  ev = config.eval
  _whole("eval.batch_size", ev.batch_size, 1)
  max_batches = ev.get("max_batches", -1)
  if max_batches != -1:
    _whole("eval.max_batches", max_batches, 1, "-1 evaluates the whole split")
  if not isinstance(ev.split, str) or not ev.split:
    raise ValueError(f"eval.split: expected a split name such as 'test', got {ev.split!r}")


def _uses_pipeline(make_loader: Callable[..., Any] | None) -> bool:
  from jaxdet.data import pipeline
  return make_loader is None or make_loader is pipeline.make_loader


def check_data(config: Any, system: System, splits: list[tuple[str, Any, str, bool]],
               class_names: Any) -> None:
  """Each split's data (jaxdet.data.pipeline.check_split) against the system's classes.

  Args:
    splits: (split, examples or None, the examples' argument name, train) of each split read.
  """
  from jaxdet.data import pipeline
  data = config.data
  for split, examples, arg, train in splits:
    if examples is not None and data.name != "examples":
      raise ValueError(f"{arg}: given, but config.data.name is {data.name!r}, which would "
                       f"ignore them; set config.data.name = 'examples'")
    pipeline.check_split(data, split, num_classes=system.num_classes, train=train,
                         examples=examples, class_names=class_names, examples_name=arg)


def check_train(config: Any, system: System, make_loader: Callable[..., Any] | None = None, *,
                examples: Any = None, eval_examples: Any = None, class_names: Any = None
                ) -> None:
  """Everything a training run (jaxdet.train.loop.train_and_evaluate) can know before step 1.

  Args:
    config: the experiment config.
    system: the System to be trained.
    make_loader: the run's loader factory; the data checks run only for
      jaxdet.data.pipeline.make_loader (None), whose data config they understand.
    examples, eval_examples, class_names: one's own data, as passed to train_and_evaluate.
  Raises:
    ValueError / TypeError naming the config key or argument, the value and the fix.
  """
  check_config(config, system)
  if _uses_pipeline(make_loader):
    check_data(config, system, [("train", examples, "examples", True),
                                (config.eval.split, eval_examples, "eval_examples", False)],
               class_names)
  log.info("preflight: config and data checked")


def check_evaluate(config: Any, system: System, make_loader: Callable[..., Any] | None = None,
                   *, examples: Any = None, class_names: Any = None) -> None:
  """What jaxdet.train.loop.evaluate can know before restoring and predicting: the eval config
  and the eval split's data (as check_train)."""
  check_eval_config(config)
  if _uses_pipeline(make_loader):
    check_data(config, system, [(config.eval.split, examples, "examples", False)], class_names)
