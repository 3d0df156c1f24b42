"""Classification pretraining on object crops: the backbone's classifier, as a System.

Each ground-truth object of an image is cropped (a square around its box, jittered in size and
position while training) and resized to `input_size` pixels; the backbone's `Classifier`
(`jaxdet.models.backbones.classifier`) learns its class with a softmax cross-entropy (the
`cls` term of `config.model.loss`, `Loss`; `jaxdet.losses.classification_loss`). Its
parameters {"conv", "fc", "head"} carry the conv and fc weights the detectors start from.

`predict` classifies the crops of the ground-truth boxes: one detection per real object (its
own box, the argmax class, the class probability), so `classification_metrics` (also
`System.eval_metrics`) reads the accuracy off the detections; VOC mAP over these
detections measures classification given perfect boxes.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdet import checks, global_batch, losses
from jaxdet.models import backbones
from jaxdet.models import settings
from jaxdet.ops import windows as win
from jaxdet.system import System

Array = jax.Array


Loss = settings.ClassLoss   # `config.model.loss` (`jaxdet.losses.classification_loss`): the crop's class


@dataclasses.dataclass(frozen=True)
class Settings(settings.Settings):
  """`config.model` of classification pretraining (a top-level `config.num_classes` wins)."""
  num_classes: int = 6
  backbone: str = "tiny"
  backbone_kw: dict = dataclasses.field(default_factory=lambda: {
      "stride": 8, "widths": (16, 32, 64, 64), "fc_features": (128, 128), "roi_size": 4,
      "dropout_rate": 0.3})
  input_size: int = 32               # crop side, pixels
  context: float = 1.2               # crop side / longer box side
  jitter: float = 0.15               # crop scale and position jitter while training
  loss: Loss = Loss()

  def validate(self, where: str) -> None:
    checks.check_positive(f"{where}.num_classes", self.num_classes)
    checks.check_positive(f"{where}.input_size", self.input_size)
    checks.check_positive(f"{where}.context", self.context)
    checks.check_fraction(f"{where}.jitter", self.jitter, open_high=True)


def object_crops(key: Array | None, boxes: Array, *, context: float = 1.2,
                 jitter: float = 0.0) -> Array:
  """Square windows around boxes: side = longer side * context (* U(1 - j, 1 + j)), centre
  shifted by U(-j, j) * side / 2 when `key` is given.

  Args:
    key: PRNG key or None (no jitter).
    boxes: f32[M, 4] (x1, y1, x2, y2) pixels.
  Returns:
    f32[M, 4] square windows.
  """
  b = boxes.astype(jnp.float32)
  centre = 0.5 * (b[:, :2] + b[:, 2:])
  side = jnp.maximum(jnp.max(b[:, 2:] - b[:, :2], axis=-1), 1.0) * context
  if key is not None and jitter > 0:
    k1, k2 = jax.random.split(key)
    side = side * jax.random.uniform(k1, side.shape, minval=1 - jitter, maxval=1 + jitter)
    centre = centre + 0.5 * side[:, None] * jax.random.uniform(k2, centre.shape,
                                                               minval=-jitter, maxval=jitter)
  half = 0.5 * side[:, None]
  return jnp.concatenate([centre - half, centre + half], -1)


def classification_metrics(gts: Sequence[Mapping[str, Any]], dets: Sequence[Mapping[str, Any]]
                           ) -> dict[str, float]:
  """{"accuracy"}: the share of real objects whose detection (same order) has their class."""
  right = total = 0
  for g, d in zip(gts, dets):
    gl, dl = np.asarray(g["labels"]).reshape(-1), np.asarray(d["labels"]).reshape(-1)
    if len(gl) != len(dl):
      raise ValueError(f"dets: expected one detection per real object ({len(gl)}), got "
                       f"{len(dl)}")
    right += int(np.sum(gl == dl))
    total += len(gl)
  return {"accuracy": right / max(total, 1)}


@dataclasses.dataclass(frozen=True)
class Extras:
  """`System.extras` of classify: its settings and its network (flax module)."""
  settings: Settings
  network: nn.Module


def build_system(config: Any) -> System:
  """The "classify" System from an experiment config: `Settings.from_config(config)` and
  `config.compute_dtype`."""
  m = Settings.from_config(config)
  dtype = jnp.dtype(config.get("compute_dtype", "float32"))
  parts = backbones.get_backbone(m.backbone, dtype=dtype, **m.backbone_kw)
  net = backbones.classifier(parts, m.num_classes)
  size = m.input_size
  mutable = ["batch_stats"] if not parts.dense_fc else False

  def crops(batch, key):
    b, mb = batch["boxes"].shape[:2]
    if key is None:
      wins = jax.vmap(lambda bx: object_crops(None, bx, context=m.context))(batch["boxes"])
    else:
      keys = global_batch.example_keys(key, b)
      wins = jax.vmap(lambda k, bx: object_crops(k, bx, context=m.context,
                                                 jitter=m.jitter))(keys, batch["boxes"])
    x = jax.vmap(functools.partial(win.crop_windows, size=size))(batch["image"], wins)
    return backbones.normalize_images(x.reshape(b * mb, size, size, 3), dtype)

  @jax.jit
  def init(rng, batch):
    return dict(net.init({"params": rng}, jnp.zeros((1, size, size, 3), dtype), train=False))

  def loss(variables, batch, rng):
    k_crop, k_drop = jax.random.split(rng)
    out = net.apply(variables, crops(batch, k_crop), train=True, rngs={"dropout": k_drop},
                    mutable=mutable)
    logits, new_state = out if mutable else (out, {})
    value, metrics = losses.classification_loss(
        logits, batch["labels"].reshape(-1), batch["box_mask"].reshape(-1), terms=m.loss)
    return value, metrics, dict(new_state)

  def predict(variables, batch):
    b, mb = batch["boxes"].shape[:2]
    probs = jax.nn.softmax(net.apply(variables, crops(batch, None), train=False).astype(
        jnp.float32), -1).reshape(b, mb, m.num_classes)
    mask = batch["box_mask"]
    return {"boxes": jnp.where(mask[..., None], batch["boxes"].astype(jnp.float32), 0.0),
            "scores": jnp.where(mask, jnp.max(probs, -1), 0.0),
            "labels": jnp.where(mask, jnp.argmax(probs, -1), 0).astype(jnp.int32),
            "valid": mask}

  return System(name="classify", num_classes=m.num_classes, init=init, loss=loss,
                predict=predict, extras=Extras(settings=m, network=net),
                eval_metrics=classification_metrics, eval_metric_names=("accuracy",))
