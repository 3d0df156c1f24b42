"""The training state: parameters, optimizer state, model state and step.

One pytree carries everything a step changes; a checkpoint of it, the run's PRNG key and the
data iterator position is a complete description of where training stands. With several seeds
(train.num_seeds > 1) it carries N replicas stacked along a leading axis
(`create_seeded_train_state`), checkpointed as it is.
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from jaxdet.system import Batch, System


@flax.struct.dataclass
class TrainState:
  """Everything a train step reads and writes.

  Attributes:
    step: i32[] the number of optimizer updates done so far.
    params: float32 parameters (the master copy; compute may run in bfloat16).
    opt_state: the optax state of `tx`.
    model_state: non-parameter collections, e.g. {"batch_stats": ...}; {} for models without.
    tx: the optimizer (static: not a pytree leaf, not checkpointed).
  """
  step: jax.Array
  params: Any
  opt_state: Any
  model_state: Any
  tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)

  @property
  def variables(self) -> dict[str, Any]:
    """{"params": ..., **model_state}: what `System.loss` and `System.predict` take."""
    return {"params": self.params, **self.model_state}


def check_float32_params(params: Any) -> None:
  """Parameters must be float32 (the master copy); raises ValueError naming the first other."""
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    dtype = jnp.dtype(leaf.dtype)
    if jnp.issubdtype(dtype, jnp.floating) and dtype != jnp.float32:   # bf16 is kind "V"
      raise ValueError(f"params: expected float32 parameters (compute dtype is set on the "
                       f"model), got {dtype} at {jax.tree_util.keystr(path)}")


def create_train_state(system: System, tx: optax.GradientTransformation, rng: jax.Array,
                       batch: Batch) -> tuple[TrainState, jax.Array]:
  """Initialises the model on `batch` (only its shapes matter) and the optimizer.

  Args:
    system: the detector.
    tx: the optimizer (see `jaxdet.train.optim.make_optimizer`).
    rng: u32[2] PRNG key; split into the init key and the run's base key.
    batch: one batch of the shapes training will use.
  Returns:
    (state, run_rng): a TrainState at step 0 with float32 parameters, and the run's base key
    u32[2] that `train_step` takes (step `s` uses `fold_in(run_rng, s)`, so the key never
    changes and a resumed run reproduces the same randomness).
  """
  init_rng, run_rng = jax.random.split(rng)
  variables = dict(system.init(init_rng, batch))
  if "params" not in variables:
    raise ValueError(f"system.init: expected a dict with a 'params' entry, got keys "
                     f"{sorted(variables)}")
  params = variables.pop("params")
  check_float32_params(params)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params,
                     opt_state=tx.init(params), model_state=variables, tx=tx)
  return state, run_rng


def create_seeded_train_state(system: System, tx: optax.GradientTransformation,
                              rngs: list[jax.Array], batch: Batch
                              ) -> tuple[TrainState, jax.Array]:
  """N replicas of `create_train_state`, one per key, stacked along a leading seed axis.

  Replica i is exactly `create_train_state(system, tx, rngs[i], batch)`: each is initialised by
  the same eager `system.init` call as a one-seed run (so host-side loading such as
  `config.model.init_from` / `pretrained` works unchanged: every replica starts from the same
  loaded weights, the rest from its own key), then the replicas are stacked.

  Args:
    rngs: N u32[2] PRNG keys (seed config.seed + i for replica i).
  Returns:
    (state, run_rngs): params, opt_state and model_state with a leading axis N, `step` i32[]
    shared by all; run_rngs u32[N, 2] the replicas' base keys (`create_train_state`'s).
  """
  states, keys = zip(*(create_train_state(system, tx, rng, batch) for rng in rngs))
  stack = lambda *xs: jnp.stack(xs)
  return states[0].replace(params=jax.tree_util.tree_map(stack, *(s.params for s in states)),
                           opt_state=jax.tree_util.tree_map(stack,
                                                            *(s.opt_state for s in states)),
                           model_state=jax.tree_util.tree_map(
                               stack, *(s.model_state for s in states))), jnp.stack(keys)


def select_replica(state: TrainState, index: int) -> TrainState:
  """Replica `index` of a stacked state (`create_seeded_train_state`) as a one-seed state."""
  take = lambda tree: jax.tree_util.tree_map(lambda x: x[index], tree)
  return state.replace(params=take(state.params), opt_state=take(state.opt_state),
                       model_state=take(state.model_state))
