"""Pure train and eval steps, parametrised by a detector's loss and predict functions.

`train_step` is one function for every detector and every device layout: the data-parallel
wrappers (jaxdet.train.parallel) run it per device with `axis_name` set, which averages the
gradients, model state and metrics across devices.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from jaxdet.system import Batch, System
from jaxdet.train.state import TrainState

# (variables, batch, rng) -> (loss f32[], metrics {name: f32[]}, new_model_state)
LossFn = Callable[[Any, Batch, jax.Array], tuple[jax.Array, dict[str, jax.Array], Any]]
PredictFn = Callable[[Any, Batch], dict[str, jax.Array]]


def step_rng(rng: jax.Array, step: jax.Array, axis_name: str | None = None) -> jax.Array:
  """The key of one step: fold_in(rng, step), the same on every device.

  Never the device index: per-example randomness comes from the example's global index
  (jaxdet.global_batch.example_keys), so the step does not depend on the device count.
  `axis_name` is accepted for the wrappers' signature and unused.
  """
  del axis_name
  return jax.random.fold_in(rng, step)


def global_norm(tree: Any) -> jax.Array:
  """sqrt of the sum of squares of every leaf: f32[]."""
  leaves = jax.tree_util.tree_leaves(tree)
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves))


def train_step(state: TrainState, batch: Batch, rng: jax.Array, *, loss_fn: LossFn,
               axis_name: str | None = None) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer update.

  Args:
    state: the training state (float32 params).
    batch: this device's part of the batch (see jaxdet.system for keys and shapes).
    rng: u32[2] the run's base key; this step uses fold_in(rng, state.step) on every device.
    loss_fn: the detector's loss, (variables, batch, rng) -> (loss, metrics, model_state).
    axis_name: the device axis under shard_map/pmap, None on one device. Gradients, model
      state and metrics are averaged over it; with equal shards the update equals the
      one-device update on the whole batch, since losses use global normalisers, per-example
      keys and cross-device BatchNorm (jaxdet.global_batch; see jaxdet.system.System.loss).
  Returns:
    (new state, metrics {name: f32[]}) with "loss" and "grad_norm" among the metrics.
  """
  rng = step_rng(rng, state.step, axis_name)

  def objective(params):
    variables = {"params": params, **state.model_state}
    loss, metrics, new_model_state = loss_fn(variables, batch, rng)
    return loss.astype(jnp.float32), (metrics, new_model_state)

  (loss, (metrics, model_state)), grads = jax.value_and_grad(objective, has_aux=True)(
      state.params)
  metrics = {**metrics, "loss": loss}
  if axis_name is not None:
    grads, metrics, model_state = jax.lax.pmean((grads, metrics, model_state), axis_name)
  metrics = {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}
  metrics["grad_norm"] = global_norm(grads)
  updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                            model_state=model_state if model_state else state.model_state)
  return new_state, metrics


def eval_step(variables: Any, batch: Batch, *, predict_fn: PredictFn) -> dict[str, jax.Array]:
  """The detector's detections for a batch: boxes f32[B, K, 4], scores, labels, valid."""
  return predict_fn(variables, batch)


def make_steps(system: System) -> tuple[Callable[..., Any], Callable[..., Any]]:
  """(train_step, eval_step) bound to a System's loss and predict functions.

  The bound train step has the signature `(state, batch, rng, *, axis_name=None)`; the bound
  eval step `(variables, batch)`.
  """
  return (functools.partial(train_step, loss_fn=system.loss),
          functools.partial(eval_step, predict_fn=system.predict))
