"""Optimizers and learning-rate schedules from the `optimizer` section of a config.

Config keys (see experiments/configs/common.py for defaults):
  name: "sgd" (momentum, coupled L2 weight decay as in Caffe), "adam" or "adamw".
  learning_rate: the base rate, for the global batch `reference_batch`.
  lr_scaling: how the rate follows the global batch (train.batch_size): "none" (the default:
    learning_rate whatever the batch) or "linear" (learning_rate * batch / reference_batch,
    the linear scaling rule of Goyal et al. 2017, "Accurate, Large Minibatch SGD"; pair it
    with warmup_steps for large batches). The rate the schedule starts from is `base_lr`.
  reference_batch: the global batch that learning_rate was tuned for (the paper presets: the
    paper's batch; experiments/configs/common.finalize sets 0 to the preset's batch).
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


def base_lr(cfg: Any, batch_size: int | None = None) -> float:
  """optimizer.learning_rate scaled to the global `batch_size` by optimizer.lr_scaling.

  Args:
    cfg: the optimizer config section.
    batch_size: the global batch (train.batch_size); needed for lr_scaling "linear".
  Raises:
    ValueError naming the key: an unknown lr_scaling, or "linear" without a positive
    reference_batch or batch_size.
  """
  lr = float(cfg.get("learning_rate"))
  checks.check_positive("optimizer.learning_rate", lr)
  rule = cfg.get("lr_scaling", "none")
  if rule == "none":
    return lr
  if rule != "linear":
    raise ValueError(f"optimizer.lr_scaling: expected 'none' or 'linear', got {rule!r}")
  ref = int(cfg.get("reference_batch", 0) or 0)
  if ref <= 0:
    raise ValueError(f"optimizer.reference_batch: lr_scaling 'linear' needs the global batch "
                     f"the learning rate was tuned for (a positive int), got {ref}")
  if batch_size is None or int(batch_size) <= 0:
    raise ValueError(f"batch_size: lr_scaling 'linear' needs the global batch size, got "
                     f"{batch_size!r}")
  return lr * int(batch_size) / ref


def make_schedule(cfg: Any, num_steps: int, batch_size: int | None = None) -> Schedule:
  """step -> learning rate, from the optimizer config (see module docstring); `batch_size`
  is the global batch for lr_scaling."""
  lr = base_lr(cfg, batch_size)
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
                   param_labels: Callable[[Any], Any] | None = None,
                   batch_size: int | None = None
                   ) -> tuple[optax.GradientTransformation, Schedule]:
  """The optax optimizer and its schedule.

  Args:
    cfg: the `optimizer` config section (a ConfigDict or dict; see module docstring).
    num_steps: the length of training (for the cosine schedule).
    param_labels: optional params -> pytree of labels; parameters labelled "frozen" get no
      updates (a System's `param_labels`, e.g. for layers kept at their pretrained values).
    batch_size: the global batch (train.batch_size), for lr_scaling "linear".
  Returns:
    (tx, schedule).
  """
  schedule = make_schedule(cfg, num_steps, batch_size)
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
