"""Checkpoints with orbax: the training state, the run's PRNG key, the data iterator position.

A checkpoint directory holds one subdirectory per saved step with three items:
  state:  the TrainState's arrays (step, params, opt_state, model_state) and the PRNG key;
  loader: the data loader's `get_state()` (JSON), so a resumed run sees the same batches;
  meta:   {"system", "fingerprint", "model"} identifying the model the state belongs to (and
          "num_seeds" when the state holds several stacked replicas, train.num_seeds > 1), and
          {"arrays": {path: [dtype, shape, sha256]}, "loader_sha256"}: digests of what was saved.
orbax writes each step to a temporary directory and renames it when complete, so a run killed
mid-save leaves the previous checkpoints intact.

What is kept: the last `keep` finished steps and the best one by an eval metric (scores are
recorded in DIR/scores.json, also for a step evaluated after it was saved). Old steps are
deleted only once `keep` newer ones are finished, so the newest good checkpoint is never
deleted; a state with a NaN or an infinity is never saved.

What is restored is verified: every array against its digest, the loader state against its
own. A step that cannot be read or does not match (bad bytes, a truncated or missing file, an
empty JSON item) is set aside, moved (never deleted) to DIR_corrupt/<step>, with a warning that
names it, and the next older step is tried; if no step is good, one error says so.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
from typing import Any, Mapping

import flax
import jax
import numpy as np

from jaxdet import files
from jaxdet.train.state import TrainState
from jaxdet.train.step import NonFiniteError

log = logging.getLogger(__name__)


class CheckpointMismatchError(ValueError):
  """A checkpoint belongs to another system, model config or state structure."""


class CorruptCheckpointError(RuntimeError):
  """A checkpoint cannot be read or its contents differ from the digests saved with it."""


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


def _is_key(x: Any) -> bool:
  return jax.dtypes.issubdtype(getattr(x, "dtype", np.float32), jax.dtypes.prng_key)


def host_array(x: Any) -> np.ndarray:
  """One host copy of a leaf: a typed PRNG key as its key data, a replicated global array
  (several hosts) through this host's copy."""
  if _is_key(x):
    x = jax.random.key_data(x)
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    x = x.addressable_data(0)
  return np.asarray(x)


def _spec(x: Any) -> list[Any]:
  """[dtype, shape] of a leaf as saved (typed keys as key data), without copying it."""
  if _is_key(x):
    x = jax.eval_shape(jax.random.key_data, x)
  return [np.dtype(x.dtype).str, [int(d) for d in x.shape]]


def array_digests(tree: Any, *, finite: str = "") -> dict[str, list[Any]]:
  """{leaf path: [dtype, shape, sha256 of the bytes]} of every leaf of `tree` (host copies).

  finite: when given (what to call the tree in the error), every floating-point leaf must be
    free of NaN and infinities, else NonFiniteError names the first that is not.
  """
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    a = np.asarray(host_array(leaf), order="C")    # (ascontiguousarray makes 0-d 1-d)
    name = jax.tree_util.keystr(path)
    if finite and jax.dtypes.issubdtype(a.dtype, np.inexact) and not np.isfinite(a).all():
      raise NonFiniteError(f"{finite}: {name} holds {int((~np.isfinite(a)).sum())} non-finite "
                           f"values; a non-finite state is never saved")
    out[name] = [a.dtype.str, list(a.shape),
                 hashlib.sha256(a.reshape(-1).view(np.uint8)).hexdigest()]
  return out


def _json_digest(obj: Any) -> str:
  return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def _root_cause(e: BaseException) -> str:
  """The innermost cause's first line, short (TensorStore errors carry pages of spec)."""
  while e.__cause__ is not None or (e.__context__ is not None and not e.__suppress_context__):
    e = e.__cause__ or e.__context__
  text = str(e).strip().splitlines()[0] if str(e).strip() else ""
  text = text.split(" [tensorstore_spec")[0]
  text = text if len(text) <= 300 else text[:300] + "..."
  return f"{type(e).__name__}: {text}"


def _quiet_failed_reads() -> None:
  """Drops, for the rest of the process, the echoes of a failed orbax restore: its other
  reads finish into an event loop already closed and each reports "Event loop is closed" or
  the read error again as an unraisable exception (pages of TensorStore spec), during the
  restore and after it. Every other unraisable exception still goes to the previous hook."""
  previous = sys.unraisablehook
  if getattr(previous, "jaxdet_quiet", False):
    return

  def hook(unraisable):
    text = str(unraisable.exc_value)
    if text == "Event loop is closed" or "error while reading array index" in text:
      return
    previous(unraisable)

  hook.jaxdet_quiet = True
  sys.unraisablehook = hook


class Checkpoints:
  """Saves and restores (TrainState, rng, loader state) under `directory`.

  Args:
    directory: where the step subdirectories go (created if missing, unless read_only).
    meta: {"system": name, "model": model-defining config dict, optionally "num_seeds": N > 1
      replicas stacked in the state}; stored with every checkpoint and compared on restore.
    keep: how many of the latest checkpoints to keep (at least the newest is always kept).
    best_metric: an eval metric name; the checkpoint with the best value is kept as well
      ("" = none).
    best_mode: "max" or "min".
    read_only: only restore (evaluation, detection): nothing is created, saved, deleted or
      moved; a corrupt step is skipped with a warning.
  """

  def __init__(self, directory: str, meta: Mapping[str, Any], *, keep: int = 3,
               best_metric: str = "", best_mode: str = "max", read_only: bool = False):
    import orbax.checkpoint as ocp
    self._ocp = ocp
    self.meta = {"system": meta["system"], "model": meta.get("model", {}),
                 "fingerprint": fingerprint(meta)}
    if int(meta.get("num_seeds", 1)) != 1:
      self.meta["num_seeds"] = int(meta["num_seeds"])
    if best_metric and best_mode not in ("max", "min"):
      raise ValueError(f"checkpoint.best_mode: expected 'max' or 'min', got {best_mode!r}")
    self.directory = os.path.abspath(str(directory))
    self.keep, self.best_metric, self.best_mode = max(int(keep), 1), best_metric, best_mode
    self.read_only = read_only
    self.scores_path = os.path.join(self.directory, "scores.json")
    # Retention is ours (_prune), so orbax keeps every step it writes.
    options = ocp.CheckpointManagerOptions(create=not read_only,
                                           cleanup_tmp_directories=not read_only)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=("state", "loader", "meta"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def best_step(self) -> int | None:
    """The existing step with the best recorded finite `best_metric` (None: none recorded)."""
    if not self.best_metric:
      return None
    steps = set(self.manager.all_steps())
    scored = [(v, s) for s, v in self._read_scores().items()
              if s in steps and v is not None and np.isfinite(v)]
    if not scored:
      return None
    sign = 1.0 if self.best_mode == "max" else -1.0
    return max(scored, key=lambda vs: (sign * vs[0], vs[1]))[1]

  def _read_scores(self) -> dict[int, float | None]:
    """{step: best_metric value} from DIR/scores.json (empty if absent or unreadable)."""
    try:
      with open(self.scores_path) as f:
        return {int(s): v for s, v in json.load(f).items()}
    except (OSError, ValueError, TypeError):
      return {}

  def record_scores(self, step: int, metrics: Mapping[str, float]) -> None:
    """Records the eval `metrics` of checkpoint `step` for choosing the best one."""
    if not self.best_metric or self.read_only:
      return
    if self.best_metric not in metrics:
      raise ValueError(f"checkpoint.best_metric: {self.best_metric!r} is not among the eval "
                       f"metrics {sorted(metrics)}")
    if jax.process_index() == 0:
      steps = set(self.manager.all_steps()) | {int(step)}
      scores = {s: v for s, v in self._read_scores().items() if s in steps}
      scores[int(step)] = float(metrics[self.best_metric])
      files.write_json(self.scores_path, {str(s): v for s, v in sorted(scores.items())})

  def save(self, state: TrainState, rng: jax.Array, loader_state: Any,
           metrics: Mapping[str, float] | None = None) -> None:
    """Saves at step `state.step` (asynchronously; `wait()` blocks until written).

    Raises:
      NonFiniteError: the state holds a NaN or an infinity (nothing is saved).
    """
    if self.read_only:
      raise ValueError(f"checkpoints {self.directory}: opened read-only, cannot save")
    ocp = self._ocp
    step = int(state.step)
    # a raw u32 key as a host array: a process-local jax.Array cannot be saved by several
    # processes (typed keys, jax.random.key, are saved as they are)
    if not jax.dtypes.issubdtype(getattr(rng, "dtype", np.uint32), jax.dtypes.prng_key):
      rng = np.asarray(rng)
    tree = {"state": flax.serialization.to_state_dict(state), "rng": rng}
    if metrics is not None and self.best_metric and self.best_metric not in metrics:
      raise ValueError(f"checkpoint.best_metric: {self.best_metric!r} is not among the eval "
                       f"metrics {sorted(metrics)}")
    meta = {**self.meta, "arrays": array_digests(tree, finite=f"checkpoint step {step}"),
            "loader_sha256": _json_digest(loader_state)}
    self.manager.wait_until_finished()
    self._prune()          # among finished steps only: `keep` of them stay while this one saves
    self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(tree),
                                                    loader=ocp.args.JsonSave(loader_state),
                                                    meta=ocp.args.JsonSave(meta)))
    if metrics is not None:
      self.record_scores(step, metrics)

  def _prune(self) -> None:
    """Deletes finished steps beyond the latest `keep`, never the best one."""
    if self.read_only:
      return
    steps = sorted(self.manager.all_steps())
    kept = set(steps[-self.keep:]) | {self.best_step()}
    for step in steps:
      if step not in kept:
        self.manager.delete(step)

  def _read_meta(self, step: int) -> dict[str, Any]:
    ocp = self._ocp
    try:
      saved = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
      saved = dict(saved["meta"])
      if "system" not in saved or "fingerprint" not in saved:
        raise KeyError(f"'system' and 'fingerprint' expected, got keys {sorted(saved)}")
    except Exception as e:   # noqa: BLE001 (whatever orbax raises on a damaged item)
      raise CorruptCheckpointError(f"checkpoint {self.directory}/{step}: its meta item cannot "
                                   f"be read ({_root_cause(e)})") from e
    return saved

  def check_meta(self, step: int, saved: Mapping[str, Any] | None = None) -> None:
    """Raises CheckpointMismatchError if checkpoint `step` belongs to another model."""
    saved = self._read_meta(step) if saved is None else saved
    if saved["system"] != self.meta["system"] or saved["fingerprint"] != self.meta["fingerprint"]:
      diff = _diff({"system": saved["system"], "model": saved.get("model", {}),
                    "train.num_seeds": saved.get("num_seeds", 1)},
                   {"system": self.meta["system"], "model": self.meta["model"],
                    "train.num_seeds": self.meta.get("num_seeds", 1)})
      raise CheckpointMismatchError(
          f"checkpoint {self.directory}/{step}: it was written for another model "
          f"(system {saved['system']!r}, fingerprint {saved['fingerprint']}) than the one "
          f"configured (system {self.meta['system']!r}, fingerprint "
          f"{self.meta['fingerprint']}); differences: {'; '.join(diff) or 'none listed'}. "
          f"Use another --workdir or the matching config.")

  def _restore_step(self, step: int, state: TrainState, rng: jax.Array
                    ) -> tuple[TrainState, jax.Array, Any]:
    """Restores and verifies one step (CorruptCheckpointError / CheckpointMismatchError)."""
    ocp = self._ocp
    saved = self._read_meta(step)
    self.check_meta(step, saved)
    where = f"checkpoint {self.directory}/{step}"
    template = {"state": flax.serialization.to_state_dict(state), "rng": rng}
    arrays = saved.get("arrays")      # None: written before digests were kept
    if arrays is not None:
      _check_structure(where, arrays, template)
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, template)
    if jax.process_count() > 1:   # whole arrays, replicated over every process's devices
      abstract = jax.tree_util.tree_map(_replicated_struct, abstract)
    try:
      loader_state = self.manager.restore(step, args=ocp.args.Composite(
          loader=ocp.args.JsonRestore()))["loader"]
    except Exception as e:   # noqa: BLE001
      raise CorruptCheckpointError(f"{where}: its loader item (JSON) cannot be read "
                                   f"({_root_cause(e)})") from e
    state_dir = os.path.join(self.directory, str(step), "state")
    if (os.path.isdir(os.path.join(state_dir, "ocdbt.process_0"))
        and not os.path.exists(os.path.join(state_dir, "manifest.ocdbt"))):
      raise CorruptCheckpointError(f"{where}: state/manifest.ocdbt, the index of its arrays, "
                                   f"is missing")
    _quiet_failed_reads()
    try:
      tree = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract)))["state"]
    except Exception as e:   # noqa: BLE001
      if arrays is None:
        raise CheckpointMismatchError(
            f"{where}: its arrays do not fit the configured training state (another optimizer "
            f"or model?): {_root_cause(e)}") from e
      raise CorruptCheckpointError(f"{where}: its arrays cannot be read "
                                   f"({_root_cause(e)})") from e
    if arrays is not None:
      got = array_digests(tree)
      bad = [k for k in arrays if got.get(k) != arrays[k]]
      if bad:
        raise CorruptCheckpointError(f"{where}: {len(bad)} arrays differ from the digests "
                                     f"saved with them: {', '.join(bad[:3])}")
      if saved.get("loader_sha256") not in (None, _json_digest(loader_state)):
        raise CorruptCheckpointError(f"{where}: the loader state differs from its digest")
    _check_shapes(abstract, tree, step)
    restored = flax.serialization.from_state_dict(state, tree["state"])
    return restored, tree["rng"], loader_state

  def _set_aside(self, step: int) -> str:
    """Moves step `step` to DIR_corrupt/<step>[-n] (never deleted); returns where."""
    folder = self.directory + "_corrupt"
    dest = os.path.join(folder, str(step))
    n = 0
    while os.path.exists(dest):
      n += 1
      dest = os.path.join(folder, f"{step}-{n}")
    if jax.process_index() == 0:
      os.makedirs(folder, exist_ok=True)
      os.replace(os.path.join(self.directory, str(step)), dest)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices(f"jaxdet set aside checkpoint {step}")
    self.manager.reload()        # orbax caches its list of steps
    return dest

  def restore(self, state: TrainState, rng: jax.Array, step: int | None = None
              ) -> tuple[TrainState, jax.Array, Any] | None:
    """Restores checkpoint `step` (default: the newest good one) into the structure of `state`.

    With `step` None, a corrupt step is set aside (read-only: skipped) with a warning and the
    next older one is tried.

    Returns:
      (state, rng, loader_state), or None when there is no checkpoint.
    Raises:
      CheckpointMismatchError: the checkpoint belongs to another system or model config, or
        its arrays do not fit `state` (e.g. another optimizer).
      CorruptCheckpointError: `step` is corrupt, or (step None) every checkpoint is.
    """
    if step is not None:
      return self._restore_step(step, state, rng)
    bad = []
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        return self._restore_step(step, state, rng)
      except CorruptCheckpointError as e:
        if self.read_only:
          log.warning("%s; skipping it (read-only), trying the previous step", e)
          bad.append(f"{step} (left in place)")
        else:
          dest = self._set_aside(step)
          log.warning("%s; moved it to %s, trying the previous step", e, dest)
          bad.append(f"{step} (moved to {dest})")
    if bad:
      fresh = "" if self.read_only else " Rerunning starts from step 0."
      raise CorruptCheckpointError(f"checkpoints {self.directory}: no good checkpoint, every "
                                   f"step is corrupt: {', '.join(bad)}.{fresh}")
    return None

  def wait(self) -> None:
    """Blocks until the pending save is written, then deletes steps no longer kept."""
    self.manager.wait_until_finished()
    self._prune()

  def close(self) -> None:
    self.wait()
    # orbax cleans old temporary folders in a thread started at construction; a process that
    # exits right after (e.g. on an error) must not leave it running into interpreter shutdown.
    await_cleanup = getattr(self.manager, "_maybe_await_cleanup_tmp_directory", None)
    if await_cleanup is not None:
      await_cleanup()
    self.manager.close()


def _check_structure(where: str, arrays: Mapping[str, Any], template: Any) -> None:
  """CheckpointMismatchError when the saved leaves (paths, dtypes, shapes) are not those of
  `template` (another optimizer or model)."""
  want = {jax.tree_util.keystr(p): _spec(x)
          for p, x in jax.tree_util.tree_flatten_with_path(template)[0]}
  for key in sorted(set(want) | set(arrays)):
    have = arrays[key][:2] if key in arrays else None
    if have != want.get(key):
      raise CheckpointMismatchError(
          f"{where}: its arrays do not fit the configured training state (another optimizer or "
          f"model?): {key} is {have} in the checkpoint, the configured state expects "
          f"{want.get(key)} ([dtype, shape]; None = absent)")


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
