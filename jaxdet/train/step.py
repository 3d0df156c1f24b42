"""Pure train and eval steps, parametrised by a detector's loss and predict functions.

`train_step` is one function for every detector and every device layout: the data-parallel
wrappers (jaxdet.train.parallel) run it per device with `axis_name` set, which averages the
gradients, model state and metrics across devices.

`guarded_train_step` is the step the loop runs: `train_step` plus a guard against non-finite
numbers. It carries a small guard (a dict of arrays) beside the state; a step whose loss,
metrics, gradient norm or updated state holds a NaN or an infinity is not applied, and the
guard keeps the first such step and its metrics on the device until the loop reads them at
its next log, evaluation or checkpoint (no host round trip per step).

Several seeds in one program (`train.num_seeds` = N > 1): the state holds N independent
replicas, parameters, optimizer state, model state and the run's key stacked along a leading
seed axis (jaxdet.train.state.create_seeded_train_state); `seeds_train_step` is `train_step`
vmapped over that axis, with the batch and the step count shared. The seed axis is a vmap
inside the step; the data axis (jaxdet.train.parallel) stays outside, around it.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
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
    (new state, metrics {name: f32[]}) with "loss", "grad_norm" and "update_norm" (the norm of
    the optimizer's update, learning rate included) among the metrics.
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
  metrics["update_norm"] = global_norm(updates)
  params = optax.apply_updates(state.params, updates)
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                            model_state=model_state if model_state else state.model_state)
  return new_state, metrics


def seeds_train_step(state: TrainState, batch: Batch, rng: jax.Array, *, loss_fn: LossFn,
                     axis_name: str | None = None
                     ) -> tuple[TrainState, dict[str, jax.Array]]:
  """`train_step` of N replicas at once: vmapped over the leading seed axis.

  Args:
    state: a stacked TrainState: params, opt_state and model_state with a leading axis N,
      `step` i32[] shared (jaxdet.train.state.create_seeded_train_state).
    batch: as for `train_step`; every replica sees the same batch.
    rng: u32[N, 2] (or key[N]) the replicas' base keys.
    loss_fn, axis_name: as for `train_step` (the device axis is outside the seed vmap, which
      is unnamed, so the loss's jaxdet.global_batch helpers see only the data axis).
  Returns:
    (new stacked state, metrics {name: f32[N]}): replica i's update is `train_step`'s on
    replica i's state and key.
  """
  axes = state.replace(step=None, params=0, opt_state=0, model_state=0)
  step = functools.partial(train_step, loss_fn=loss_fn, axis_name=axis_name)
  return jax.vmap(step, in_axes=(axes, None, 0), out_axes=(axes, 0))(state, batch, rng)


class NonFiniteError(FloatingPointError):
  """Training produced a NaN or an infinity (loss, gradients or state), or a state to be
  saved holds one."""


NONFINITE_POLICIES = ("stop", "skip")
MAX_GUARD_METRICS = 64   # the metrics of a bad step kept in the guard (sorted by name)


def init_guard() -> dict[str, np.ndarray]:
  """The guard at the start of a run (or after a resume): nothing non-finite seen yet.

  Returns:
    {"bad_step": i32[] the first step whose update was refused for good (0 = none; under
       "skip", the step that made `max_consecutive_skips` skips in a row),
     "bad_metrics": f32[MAX_GUARD_METRICS] that step's metrics in sorted-name order (zero pad:
       a NaN pad would compare unequal to itself when several processes place the guard),
     "bad_update": bool[] whether the updated state (not only the loss) was non-finite there,
     "skipped": i32[] updates skipped so far ("skip"), "in_a_row": i32[] the current run of
       skips, "bad_seed": i32[] with several seeds, the first replica that was non-finite at
       bad_step (its metrics are bad_metrics); 0 with one}.
  """
  return {"bad_step": np.zeros((), np.int32),     # NumPy: placing it compiles nothing
          "bad_metrics": np.zeros((MAX_GUARD_METRICS,), np.float32),
          "bad_update": np.zeros((), bool), "skipped": np.zeros((), np.int32),
          "in_a_row": np.zeros((), np.int32), "bad_seed": np.zeros((), np.int32)}


def all_finite(tree: Any) -> jax.Array:
  """bool[]: every floating-point leaf of `tree` is free of NaN and infinities."""
  leaves = [x for x in jax.tree_util.tree_leaves(tree)
            if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)]
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves] or [jnp.bool_(True)]))


def guarded_train_step(carry: tuple[TrainState, dict[str, jax.Array]], batch: Batch,
                       rng: jax.Array, *, loss_fn: LossFn, policy: str = "stop",
                       max_consecutive_skips: int = 10, axis_name: str | None = None,
                       num_seeds: int = 1
                       ) -> tuple[tuple[TrainState, dict[str, jax.Array]], dict[str, jax.Array]]:
  """`train_step` that never applies a non-finite update.

  A step is bad when any metric (the loss, its `loss/...` terms, grad_norm and update_norm,
  so any NaN or inf gradient or update) or the updated model state (batch statistics) is not
  finite; the updated parameters and optimizer state then are finite too (see the comment in
  the body). The bad update is dropped inside
  the step (a select, no host round trip):
    policy "stop": the state stays as it was before the first bad step, step count included,
      and stays so for every later step; the guard records the step and its metrics, and the
      loop stops with an error at its next check.
    policy "skip": the step counts (state.step advances) but parameters, optimizer state and
      model state stay; metrics["skipped_steps"] counts the skips. The `max_consecutive_skips`th
      skip in a row is recorded in the guard as under "stop" (and nothing is applied after it).

  Several seeds (num_seeds > 1; `seeds_train_step`): the step is bad when any replica's is,
  and then no replica is updated (so under "skip" the replicas stay in step but are no longer
  independent runs); the guard records the first bad replica (bad_seed) and its metrics.

  Args:
    carry: (state, guard); guard from `init_guard`.
    batch, rng, loss_fn, axis_name: as for `train_step` (the checks run on the averaged
      values, so every device decides alike); with num_seeds > 1 as for `seeds_train_step`.
    num_seeds: 1 (`train_step`) or N > 1 replicas stacked along a leading axis.
  Returns:
    ((state, guard), metrics): metrics as `train_step`'s (with several seeds each the mean
    over the replicas), plus "skipped_steps" under "skip".
  """
  if policy not in NONFINITE_POLICIES:
    raise ValueError(f"train.on_nonfinite: expected one of {NONFINITE_POLICIES}, got {policy!r}")
  state, guard = carry
  seeded = num_seeds > 1
  step = seeds_train_step if seeded else train_step
  new_state, metrics = step(state, batch, rng, loss_fn=loss_fn, axis_name=axis_name)
  names = sorted(metrics)[:MAX_GUARD_METRICS]
  # The updated parameters and optimizer state are finite whenever the gradients and the
  # update are (finite grad_norm and update_norm, both metrics; the optimizers of
  # jaxdet.train.optim keep finite moments of finite gradients), so besides the metrics only
  # the model state (batch statistics of the forward pass) is checked here:
  # checking every parameter and moment again, and selecting between two whole states, moved
  # 4.9 GB per step of VGG16 Faster R-CNN (experiments/cost_table.py --breakdown). Checkpoints
  # check every leaf before writing (jaxdet.train.checkpoint).
  updated = (metrics["update_norm"], new_state.model_state)
  if seeded:   # per replica [N], then the first bad one's record
    update_each = jax.vmap(all_finite)(updated)
    ok_each = jax.vmap(all_finite)(metrics) & update_each
    bad_seed = jnp.argmin(ok_each).astype(jnp.int32)   # the first False (0 when all are ok)
    values = jnp.stack([metrics[k][bad_seed] for k in names])
    update_ok, ok = update_each[bad_seed], jnp.all(ok_each)
    metrics = {k: v.mean(0) for k, v in metrics.items()}
  else:
    bad_seed = jnp.zeros((), jnp.int32)
    values = jnp.stack([metrics[k] for k in names])
    update_ok = all_finite(updated)
    ok = all_finite(metrics) & update_ok
  in_a_row = jnp.where(ok, 0, guard["in_a_row"] + 1)
  tripped = jnp.logical_not(ok) if policy == "stop" else in_a_row >= max_consecutive_skips
  first = tripped & (guard["bad_step"] == 0)
  apply = ok & (guard["bad_step"] == 0)
  keep = lambda new, old: jax.lax.cond(apply, lambda n, o: n, lambda n, o: o, new, old)  # noqa: E731
  state = state.replace(
      step=state.step + 1 if policy == "skip" else jnp.where(apply, new_state.step, state.step),
      params=keep(new_state.params, state.params),
      opt_state=keep(new_state.opt_state, state.opt_state),
      model_state=keep(new_state.model_state, state.model_state))
  padded = jnp.zeros((MAX_GUARD_METRICS,), jnp.float32).at[:len(names)].set(values)
  guard = {"bad_step": jnp.where(first, new_state.step, guard["bad_step"]),
           "bad_metrics": jnp.where(first, padded, guard["bad_metrics"]),
           "bad_update": jnp.where(first, jnp.logical_not(update_ok), guard["bad_update"]),
           "skipped": guard["skipped"] + jnp.logical_not(ok).astype(jnp.int32),
           "in_a_row": in_a_row,
           "bad_seed": jnp.where(first, bad_seed, guard["bad_seed"])}
  if policy == "skip":
    metrics = {**metrics, "skipped_steps": guard["skipped"].astype(jnp.float32)}
  return (state, guard), metrics


def guard_report(guard: Any, metric_names: Any) -> dict[str, Any] | None:
  """What a host-side copy of the guard says: None when every step so far was finite, else
  {"step": the bad step, "nonfinite": {metric name: value} of that step's non-finite metrics,
  "bad_update": whether the updated state was non-finite, "skipped": total skips,
  "seed": the first non-finite replica (several seeds; 0 with one)}.

  metric_names: the step's metric names (keys of `train_step`'s metrics; extra ones such as
    "skipped_steps" are ignored as the step ignores them).
  """
  step = int(guard["bad_step"])
  if step == 0:
    return None
  names = sorted(set(metric_names) - {"skipped_steps"})[:MAX_GUARD_METRICS]
  values = [float(v) for v in guard["bad_metrics"][:len(names)]]
  return {"step": step, "bad_update": bool(guard["bad_update"]),
          "skipped": int(guard["skipped"]), "seed": int(guard.get("bad_seed", 0)),
          "nonfinite": {k: v for k, v in zip(names, values) if not math.isfinite(v)}}


def eval_step(variables: Any, batch: Batch, *, predict_fn: PredictFn) -> dict[str, jax.Array]:
  """The detector's detections for a batch: boxes f32[B, K, 4], scores, labels, valid."""
  return predict_fn(variables, batch)


def make_guarded_step(system: System, policy: str = "stop", max_consecutive_skips: int = 10,
                      num_seeds: int = 1) -> Callable[..., Any]:
  """`guarded_train_step` bound to a System's loss: `(carry, batch, rng, *, axis_name=None)`;
  num_seeds > 1: the state is a stacked one of that many replicas (`seeds_train_step`)."""
  if policy not in NONFINITE_POLICIES:
    raise ValueError(f"train.on_nonfinite: expected one of {NONFINITE_POLICIES}, got {policy!r}")
  if int(max_consecutive_skips) < 1:
    raise ValueError(f"train.max_consecutive_skips: expected a positive count, got "
                     f"{max_consecutive_skips!r}")
  return functools.partial(guarded_train_step, loss_fn=system.loss, policy=policy,
                           max_consecutive_skips=int(max_consecutive_skips),
                           num_seeds=int(num_seeds))


def make_steps(system: System) -> tuple[Callable[..., Any], Callable[..., Any]]:
  """(train_step, eval_step) bound to a System's loss and predict functions.

  The bound train step has the signature `(state, batch, rng, *, axis_name=None)`; the bound
  eval step `(variables, batch)`.
  """
  return (functools.partial(train_step, loss_fn=system.loss),
          functools.partial(eval_step, predict_fn=system.predict))
