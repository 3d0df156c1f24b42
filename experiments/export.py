r"""Exports a workdir's detector as a serialized StableHLO program (jax.export), no jaxdet needed.

    python -m experiments.export --workdir DIR --out detector.jax \
        [--config experiments/configs/<system>.py[:preset]] [--batch_size 0] [--platforms cpu,cuda]

Writes OUT (the program: `jax.export.Exported.serialize()`, the variables closed over as
constants) and OUT.json, what a consumer needs:
  inputs:  [{"name", "shape", "dtype"}] in call order: image u8[B, H, W, 3] (RGB, the resized
           image at the top left, zero padded to H x W), image_size i32[B, 2] (height, width of
           the real pixels); for R-CNN / Fast R-CNN also proposals f32[B, P, 4] (x1, y1, x2,
           y2 pixels of the resized image) and proposal_mask bool[B, P]. B is "b" (any batch
           size) when the system allows a symbolic batch, else fixed.
  outputs: boxes f32[B, K, 4] (x1, y1, x2, y2, resized pixels), scores f32[B, K],
           labels i32[B, K], valid bool[B, K].
  class_names, resize (the data config's test-time resize; map boxes back to the original
           image by orig / resized size per axis), system, platforms.

A consumer, with jax alone:

    from jax import export
    program = export.deserialize(bytearray(open("detector.jax", "rb").read()))
    boxes, scores, labels, valid = program.call(image, image_size)
"""

from __future__ import annotations

import json
import sys
from typing import Any

from experiments.configs import common

INPUTS = ("image", "image_size", "proposals", "proposal_mask")
OUTPUTS = ("boxes", "scores", "labels", "valid")


def define_flags(fv) -> None:
  from absl import flags
  flags.DEFINE_string("workdir", None, "the training run's directory", flag_values=fv)
  flags.DEFINE_string("out", None, "the program file to write (its metadata goes to OUT.json)",
                      flag_values=fv)
  flags.DEFINE_integer("batch_size", 0, "0: a symbolic batch size where the system allows "
                       "(else config.eval.batch_size); > 0: this fixed batch size",
                       flag_values=fv)
  flags.DEFINE_list("platforms", [], "platforms to lower for, e.g. cpu,cuda (default: this "
                    "machine's)", flag_values=fv)


def input_specs(detector: Any, batch: Any) -> dict[str, Any]:
  """jax.ShapeDtypeStruct of each program input (INPUTS present for this system)."""
  import jax
  from jaxdet.data import transforms
  from jaxdet.train import setup
  data = setup.to_dict(detector.config.data)
  buckets = data.get("buckets") or transforms.default_buckets(data)
  h, w = max((tuple(int(x) for x in b) for b in buckets), key=lambda b: (b[0] * b[1], b))
  from jaxdet.detector import example_batch
  example = example_batch(detector.config)
  shapes = {"image": (h, w, 3), "image_size": (2,)}
  for k in ("proposals", "proposal_mask"):
    if k in example:
      shapes[k] = example[k].shape[1:]
  return {k: jax.ShapeDtypeStruct((batch,) + tuple(shapes[k]), example[k].dtype)
          for k in INPUTS if k in shapes}


def program_fn(detector: Any, names: list[str]):
  """(inputs in `names` order) -> (boxes, scores, labels, valid): the detector's predict on
  a batch holding these inputs (ground-truth keys empty), variables closed over."""
  import jax.numpy as jnp
  variables, predict = detector.variables, detector.predict

  def fn(*args):
    batch = dict(zip(names, args))
    b = batch["image"].shape[0]
    batch.update(boxes=jnp.zeros((b, 1, 4), jnp.float32), labels=jnp.zeros((b, 1), jnp.int32),
                 box_mask=jnp.zeros((b, 1), bool), difficult=jnp.zeros((b, 1), bool),
                 image_id=jnp.zeros((b,), jnp.int32), scale=jnp.ones((b,), jnp.float32),
                 orig_size=batch["image_size"])
    out = predict(variables, batch)
    return tuple(out[k] for k in OUTPUTS)
  return fn


def export_detector(detector: Any, *, batch_size: int = 0, platforms: list[str] | None = None):
  """(jax.export.Exported, metadata dict) of a jaxdet.Detector; see the module docstring.

  batch_size 0 tries a symbolic batch size first and falls back to config.eval.batch_size.
  """
  import jax
  from jax import export
  attempts = [export.symbolic_shape("b")[0]] if not batch_size else []
  attempts.append(int(batch_size or detector.config.eval.batch_size))
  error = None
  for batch in attempts:
    specs = input_specs(detector, batch)
    names = list(specs)
    try:
      exported = export.export(jax.jit(program_fn(detector, names)),
                               platforms=platforms or None)(*specs.values())
      break
    except Exception as e:  # a system whose shapes need a concrete batch: fall back
      error = e
  else:
    raise RuntimeError(f"export failed for batch sizes {attempts}") from error
  meta = {"system": detector.config.system,
          "inputs": [{"name": k, "shape": [v if isinstance(v, int) else str(v)
                                           for v in s.shape], "dtype": str(s.dtype)}
                     for k, s in specs.items()],
          "outputs": list(OUTPUTS), "class_names": list(detector.class_names),
          "resize": resize_meta(detector.config), "platforms": list(exported.platforms),
          "batch": "b" if not isinstance(batch, int) else batch}
  return exported, meta


def resize_meta(config: Any) -> dict[str, Any]:
  """What a consumer needs to prepare images as the detector does: the data config's resize
  section, image_size and buckets."""
  from jaxdet.train import setup
  data = setup.to_dict(config.data)
  return {"resize": data["resize"], "image_size": list(data["image_size"]),
          "buckets": [list(b) for b in data.get("buckets") or ()]}


def main(argv: list[str]) -> dict[str, Any]:
  config, flags = common.parse_flags(argv, define_flags, config_optional=True)
  if not flags.workdir or not flags.out:
    raise ValueError("--workdir, --out: expected a run directory and the file to write")
  from jaxdet import files
  from jaxdet.detector import Detector
  detector = Detector.from_workdir(flags.workdir, config)
  exported, meta = export_detector(detector, batch_size=int(flags.batch_size),
                                   platforms=list(flags.platforms))
  blob = bytes(exported.serialize())
  files.atomic_write(flags.out, lambda f: f.write(blob))
  files.write_json(flags.out + ".json", meta, indent=2)
  print(json.dumps({"out": flags.out, "bytes": len(blob), **meta}))
  return meta


if __name__ == "__main__":
  main(sys.argv)
