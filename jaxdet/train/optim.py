"""Optimizers and learning-rate schedules from the `optimizer` section of a config.

Config keys (see experiments/configs/common.py for defaults):
  name: "sgd" (momentum, coupled L2 weight decay as in Caffe), "adam" or "adamw".
  learning_rate: the base rate.
  momentum, nesterov: SGD only.  b1, b2, eps: Adam/AdamW only.
  weight_decay: on kernels only (parameters of rank > 1); biases and norms are not decayed.
  schedule: "constant", "step" (multiply by `decay_factor` at each of `decay_steps`, the
    papers' schedule) or "cosine" (to 0 at `num_steps`).
  warmup_steps, warmup_factor: linear warm-up from `learning_rate * warmup_factor`.
  grad_clip_norm: clip the global gradient norm to this value (0 = off).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import optax

from jaxdet import checks

Schedule = Callable[[Any], Any]


def make_schedule(cfg: Any, num_steps: int) -> Schedule:
  """step -> learning rate, from the optimizer config (see module docstring)."""
  lr = float(cfg.get("learning_rate"))
  checks.check_positive("optimizer.learning_rate", lr)
  name = cfg.get("schedule", "constant")
  if name == "constant":
    main = optax.constant_schedule(lr)
  elif name == "step":
    factor = float(cfg.get("decay_factor", 0.1))
    main = optax.piecewise_constant_schedule(
        lr, {int(s): factor for s in cfg.get("decay_steps", ())})
  elif name == "cosine":
    main = optax.cosine_decay_schedule(lr, max(int(num_steps), 1))
  else:
    raise ValueError(f"optimizer.schedule: expected 'constant', 'step' or 'cosine', "
                     f"got {name!r}")
  warmup = int(cfg.get("warmup_steps", 0))
  if warmup <= 0:
    return main
  start = lr * float(cfg.get("warmup_factor", 0.0))
  # join_schedules hands the second schedule `step - warmup`; decay steps count from 0.
  return optax.join_schedules([optax.linear_schedule(start, lr, warmup),
                               lambda step: main(step + warmup)], [warmup])


def decay_mask(params: Any) -> Any:
  """True for kernels (rank > 1): the parameters weight decay applies to."""
  return jax.tree_util.tree_map(lambda p: p.ndim > 1, params)


def make_optimizer(cfg: Any, num_steps: int, *,
                   param_labels: Callable[[Any], Any] | None = None
                   ) -> tuple[optax.GradientTransformation, Schedule]:
  """The optax optimizer and its schedule.

  Args:
    cfg: the `optimizer` config section (a ConfigDict or dict; see module docstring).
    num_steps: the length of training (for the cosine schedule).
    param_labels: optional params -> pytree of labels; parameters labelled "frozen" get no
      updates (a System's `param_labels`, e.g. for layers kept at their pretrained values).
  Returns:
    (tx, schedule).
  """
  schedule = make_schedule(cfg, num_steps)
  name = cfg.get("name", "sgd")
  wd = float(cfg.get("weight_decay", 0.0))
  if name == "sgd":
    parts = [optax.add_decayed_weights(wd, mask=decay_mask)] if wd else []
    parts.append(optax.sgd(schedule, momentum=float(cfg.get("momentum", 0.9)) or None,
                           nesterov=bool(cfg.get("nesterov", False))))
  elif name in ("adam", "adamw"):
    kw = dict(b1=float(cfg.get("b1", 0.9)), b2=float(cfg.get("b2", 0.999)),
              eps=float(cfg.get("eps", 1e-8)))
    if name == "adamw":
      parts = [optax.adamw(schedule, weight_decay=wd, mask=decay_mask, **kw)]
    else:
      parts = ([optax.add_decayed_weights(wd, mask=decay_mask)] if wd else [])
      parts.append(optax.adam(schedule, **kw))
  else:
    raise ValueError(f"optimizer.name: expected 'sgd', 'adam' or 'adamw', got {name!r}")
  clip = float(cfg.get("grad_clip_norm", 0.0))
  if clip > 0:
    parts.insert(0, optax.clip_by_global_norm(clip))
  tx = optax.chain(*parts)
  if param_labels is not None:
    tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, param_labels)
  return tx, schedule
