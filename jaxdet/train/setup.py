"""The pieces a run is assembled from: system, loaders, optimizer, state, checkpoints.

Shared by the training loop, evaluation, detection and the benchmark, so each builds the
same state from the same config. Configs are ml_collections ConfigDicts or plain nested dicts
with the sections of experiments/configs/common.py.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import jax

from jaxdet.system import System
from jaxdet.train import optim, preflight
from jaxdet.train.checkpoint import Checkpoints
from jaxdet.train.state import TrainState, create_seeded_train_state, create_train_state

MakeLoader = Callable[..., Any]   # jaxdet.data.pipeline.make_loader's signature


def to_dict(section: Any) -> dict[str, Any]:
  """A config section as a plain dict (ConfigDicts have to_dict)."""
  return section.to_dict() if hasattr(section, "to_dict") else dict(section)


def system_from_config(config: Any) -> System:
  """The System named by `config.system`, built from the config (jaxdet.systems.SYSTEMS)."""
  from jaxdet.systems import build_system
  return build_system(config.system, config)


def default_make_loader() -> MakeLoader:
  from jaxdet.data.pipeline import make_loader
  return make_loader


def model_meta(config: Any, system: System) -> dict[str, Any]:
  """What identifies the model a checkpoint belongs to: system name, model config, classes,
  and the number of seeds when it is more than one (a one-seed meta is unchanged)."""
  meta = {"system": system.name,
          "model": {**to_dict(config.get("model", {})), "num_classes": system.num_classes}}
  n = preflight.num_seeds(config)
  return meta if n == 1 else {**meta, "num_seeds": n}


def open_checkpoints(config: Any, workdir: str, system: System, *,
                     read_only: bool = False) -> Checkpoints:
  """The run's checkpoints under workdir/checkpoints, configured by `config.checkpoint`
  (read_only: for evaluation; creates, saves and moves nothing)."""
  ck = config.checkpoint
  return Checkpoints(os.path.join(os.path.abspath(workdir), "checkpoints"),
                     model_meta(config, system), keep=int(ck.keep),
                     best_metric=str(ck.get("best_metric", "")),
                     best_mode=str(ck.get("best_mode", "max")), read_only=read_only)


def peek(loader: Any) -> dict[str, Any]:
  """The loader's next batch without consuming it (restores the loader's state)."""
  saved = loader.get_state()
  batch = next(iter(loader))
  loader.set_state(saved)
  return batch


def init_state(config: Any, system: System, batch: Any
               ) -> tuple[TrainState, jax.Array, optim.Schedule]:
  """A fresh TrainState at step 0, the run's PRNG key and the learning-rate schedule.

  With train.num_seeds = N > 1: N replicas stacked along a leading axis, replica i from seed
  config.seed + i (jaxdet.train.state.create_seeded_train_state), and keys u32[N, 2].
  """
  num_steps = int(config.train.num_steps)
  tx, schedule = optim.make_optimizer(config.optimizer, num_steps,
                                      param_labels=system.param_labels,
                                      batch_size=int(config.train.batch_size))
  batch = {k: v for k, v in batch.items() if k != "example_mask"}
  n, seed = preflight.num_seeds(config), int(config.seed)
  if n == 1:
    state, rng = create_train_state(system, tx, jax.random.PRNGKey(seed), batch)
  else:
    state, rng = create_seeded_train_state(
        system, tx, [jax.random.PRNGKey(seed + i) for i in range(n)], batch)
  return state, rng, schedule
