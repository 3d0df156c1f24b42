"""Checkpoints with orbax: the training state, the run's PRNG key, the data iterator position.

A checkpoint directory holds one subdirectory per saved step with three items:
  state:  the TrainState's arrays (step, params, opt_state, model_state) and the PRNG key;
  loader: the data loader's `get_state()` (JSON), so a resumed run sees the same batches;
  meta:   {"system", "fingerprint", "model"} identifying the model the state belongs to.
orbax writes each step to a temporary directory and renames it when complete, so a run killed
mid-save leaves the previous checkpoints intact. The last `keep` steps are kept, plus the best
one by an eval metric.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Mapping

import flax
import jax
import numpy as np

from jaxdet.train.state import TrainState


class CheckpointMismatchError(ValueError):
  """A checkpoint belongs to another system, model config or state structure."""


def fingerprint(model_part: Mapping[str, Any]) -> str:
  """A short stable hash of the JSON of the model-defining part of a config."""
  text = json.dumps(model_part, sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def _diff(a: Mapping[str, Any], b: Mapping[str, Any], prefix: str = "") -> list[str]:
  """Dotted keys whose values differ between two nested dicts."""
  out = []
  for key in sorted(set(a) | set(b)):
    va, vb = a.get(key, "<missing>"), b.get(key, "<missing>")
    if isinstance(va, Mapping) and isinstance(vb, Mapping):
      out += _diff(va, vb, f"{prefix}{key}.")
    elif json.dumps(va, default=str) != json.dumps(vb, default=str):
      out.append(f"{prefix}{key}: checkpoint {va!r}, now {vb!r}")
  return out


class Checkpoints:
  """Saves and restores (TrainState, rng, loader state) under `directory`.

  Args:
    directory: where the step subdirectories go (created if missing).
    meta: {"system": name, "model": model-defining config dict}; stored with every checkpoint
      and compared on restore.
    keep: how many of the latest checkpoints to keep.
    best_metric: an eval metric name; the checkpoint with the best value is kept as well
      ("" = none).
    best_mode: "max" or "min".
  """

  def __init__(self, directory: str, meta: Mapping[str, Any], *, keep: int = 3,
               best_metric: str = "", best_mode: str = "max"):
    import orbax.checkpoint as ocp
    self._ocp = ocp
    self.meta = {"system": meta["system"], "model": meta.get("model", {}),
                 "fingerprint": fingerprint(meta)}
    self.best_metric = best_metric
    policies = [ocp.checkpoint_managers.LatestN(keep)]
    if best_metric:
      if best_mode not in ("max", "min"):
        raise ValueError(f"checkpoint.best_mode: expected 'max' or 'min', got {best_mode!r}")
      policies.append(ocp.checkpoint_managers.BestN(
          get_metric_fn=lambda m: m[best_metric], reverse=best_mode == "min", n=1,
          keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
        cleanup_tmp_directories=True)
    self.manager = ocp.CheckpointManager(directory, options=options,
                                         item_names=("state", "loader", "meta"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def best_step(self) -> int | None:
    return self.manager.best_step() if self.best_metric else None

  def save(self, state: TrainState, rng: jax.Array, loader_state: Any,
           metrics: Mapping[str, float] | None = None) -> None:
    """Saves at step `state.step` (asynchronously; `wait()` blocks until written)."""
    ocp = self._ocp
    # a raw u32 key as a host array: a process-local jax.Array cannot be saved by several
    # processes (typed keys, jax.random.key, are saved as they are)
    if not jax.dtypes.issubdtype(getattr(rng, "dtype", np.uint32), jax.dtypes.prng_key):
      rng = np.asarray(rng)
    tree = {"state": flax.serialization.to_state_dict(state), "rng": rng}
    if metrics is not None and self.best_metric and self.best_metric not in metrics:
      raise ValueError(f"checkpoint.best_metric: {self.best_metric!r} is not among the eval "
                       f"metrics {sorted(metrics)}")
    self.manager.save(
        int(state.step), metrics=dict(metrics) if metrics is not None else None,
        args=ocp.args.Composite(state=ocp.args.StandardSave(tree),
                                loader=ocp.args.JsonSave(loader_state),
                                meta=ocp.args.JsonSave(self.meta)))

  def check_meta(self, step: int) -> None:
    """Raises CheckpointMismatchError if checkpoint `step` belongs to another model."""
    ocp = self._ocp
    saved = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    saved = saved["meta"]
    if saved["system"] != self.meta["system"] or saved["fingerprint"] != self.meta["fingerprint"]:
      diff = _diff({"system": saved["system"], "model": saved["model"]},
                   {"system": self.meta["system"], "model": self.meta["model"]})
      raise CheckpointMismatchError(
          f"checkpoint {self.manager.directory}/{step}: it was written for another model "
          f"(system {saved['system']!r}, fingerprint {saved['fingerprint']}) than the one "
          f"configured (system {self.meta['system']!r}, fingerprint "
          f"{self.meta['fingerprint']}); differences: {'; '.join(diff) or 'none listed'}. "
          f"Use another --workdir or the matching config.")

  def restore(self, state: TrainState, rng: jax.Array, step: int | None = None
              ) -> tuple[TrainState, jax.Array, Any] | None:
    """Restores checkpoint `step` (default: the latest) into the structure of `state`.

    Returns:
      (state, rng, loader_state), or None when there is no checkpoint.
    Raises:
      CheckpointMismatchError: the checkpoint belongs to another system or model config, or
        its arrays do not fit `state` (e.g. another optimizer).
    """
    ocp = self._ocp
    step = self.latest_step() if step is None else step
    if step is None:
      return None
    self.check_meta(step)
    template = {"state": flax.serialization.to_state_dict(state), "rng": rng}
    template = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, template)
    if jax.process_count() > 1:   # whole arrays, replicated over every process's devices
      template = jax.tree_util.tree_map(_replicated_struct, template)
    try:
      out = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(template), loader=ocp.args.JsonRestore()))
    except (ValueError, KeyError, TypeError) as e:
      raise CheckpointMismatchError(
          f"checkpoint {self.manager.directory}/{step}: its arrays do not fit the configured "
          f"training state (another optimizer or model?): {e}") from e
    tree = out["state"]
    _check_shapes(template, tree, step)
    restored = flax.serialization.from_state_dict(state, tree["state"])
    return restored, tree["rng"], out["loader"]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


def _replicated_struct(leaf: Any) -> jax.ShapeDtypeStruct:
  from jax.sharding import Mesh, NamedSharding, PartitionSpec
  mesh = Mesh(np.asarray(jax.devices()), ("data",))
  return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=NamedSharding(mesh, PartitionSpec()))


def _check_shapes(template: Any, tree: Any, step: int) -> None:
  flat_t = jax.tree_util.tree_flatten_with_path(template)[0]
  flat = dict(jax.tree_util.tree_flatten_with_path(tree)[0])
  for path, t in flat_t:
    got = flat.get(path)
    if got is None or tuple(np.shape(got)) != tuple(t.shape):
      raise CheckpointMismatchError(
          f"checkpoint step {step}: {jax.tree_util.keystr(path)} has shape "
          f"{None if got is None else tuple(np.shape(got))}, the configured state expects "
          f"{tuple(t.shape)}")
