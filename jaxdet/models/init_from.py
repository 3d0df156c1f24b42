r"""Starting a network from the parameters of another finished run (e.g. classification pretraining).

R-CNN, Fast R-CNN and Faster R-CNN start from a backbone pretrained for classification. In
jaxdet that pretraining is a run of the "classify" system (experiments/configs/classify.py),
whose parameters are {"conv", "fc", "head"}; a detector whose network keeps its backbone under
the same names ("conv", "fc") takes them over with

    params = init_from.load_into(params, workdir)          # inside the System's `init`

reading the latest checkpoint of `workdir` (orbax, jaxdet.train.checkpoint's layout). Only the
named sub-trees are copied; the detector's own layers (its classifier, box heads) keep their
fresh initialisation. Every copied sub-tree must have exactly the detector's structure and
shapes: a mismatch (another backbone, other widths) is an error naming the first differing
parameter and the source run's model config, never a silent partial load.

A detector exposes this as `config.model.init_from` (a workdir; "" = from scratch), e.g.

    python -m experiments.train --config experiments/configs/classify.py:cpu --workdir /tmp/cls
    python -m experiments.train --config experiments/configs/rcnn.py:cpu --workdir /tmp/rcnn \
        --config.model.init_from=/tmp/cls

(the classify config's `backbone` and `backbone_kw` must build the detector's backbone).
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import jax
import numpy as np

DEFAULT_KEYS = ("conv", "fc")


def read_params(workdir: str, step: int | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
  """The parameters and model meta of a finished run's checkpoint.

  Args:
    workdir: the run's --workdir (its checkpoints are in workdir/checkpoints).
    step: the checkpoint step; None = the latest.
  Returns:
    (params: nested dict of np.ndarray, meta: {"system", "model", "fingerprint"}).
  Raises:
    FileNotFoundError: no checkpoint in the workdir.
  """
  import orbax.checkpoint as ocp
  directory = os.path.join(os.path.abspath(workdir), "checkpoints")
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"init_from: no checkpoints in {directory}; train that run first "
                            f"(python -m experiments.train --workdir {workdir} ...)")
  manager = ocp.CheckpointManager(directory, item_names=("state", "loader", "meta"))
  try:
    step = manager.latest_step() if step is None else int(step)
    if step is None:
      raise FileNotFoundError(f"init_from: {directory} holds no finished checkpoint")
    out = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(),
                                                        meta=ocp.args.JsonRestore()))
  finally:
    manager.close()
  params = jax.tree_util.tree_map(np.asarray, out["state"]["state"]["params"])
  return params, dict(out["meta"])


def copy_subtrees(params: Any, source: Any, keys: Sequence[str] = DEFAULT_KEYS, *,
                  source_name: str = "source") -> dict[str, Any]:
  """`params` with the sub-trees `keys` replaced by those of `source` (float32 copies).

  Args:
    params: the network's freshly initialised parameters (nested dict).
    source: parameters to copy from (nested dict of arrays).
    keys: top-level names of the sub-trees to copy; each must be in both.
    source_name: how errors name the source (e.g. its workdir and model config).
  Returns:
    A new params dict (the other entries are the same objects as in `params`).
  Raises:
    ValueError: a key is missing on either side, or a sub-tree differs in structure or shape.
  """
  out = dict(params)
  for key in keys:
    if key not in params:
      raise ValueError(f"init_from: the network has no parameters {key!r} (it has "
                       f"{sorted(params)})")
    if key not in source:
      raise ValueError(f"init_from: {source_name} has no parameters {key!r} (it has "
                       f"{sorted(source)})")
    want = dict(jax.tree_util.tree_flatten_with_path(params[key])[0])
    got = dict(jax.tree_util.tree_flatten_with_path(source[key])[0])
    for path in sorted(set(want) | set(got), key=jax.tree_util.keystr):
      name = f"{key}{jax.tree_util.keystr(path)}"
      if path not in got or path not in want:
        side = "the network" if path not in want else source_name
        raise ValueError(f"init_from: parameter {name} is missing in {side}; the backbones "
                         f"differ (same `backbone` and `backbone_kw` needed)")
      if tuple(np.shape(got[path])) != tuple(np.shape(want[path])):
        raise ValueError(f"init_from: parameter {name} has shape {tuple(np.shape(got[path]))} "
                         f"in {source_name}, the network expects {tuple(np.shape(want[path]))}")
    out[key] = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float32), source[key])
  return out


def load_into(params: Any, workdir: str, keys: Sequence[str] = DEFAULT_KEYS) -> dict[str, Any]:
  """`params` with the sub-trees `keys` taken from the latest checkpoint of run `workdir`.

  Raises:
    FileNotFoundError: no checkpoint there; ValueError: the backbones do not match (the
    message names the parameter and the source run's system and model config).
  """
  source, meta = read_params(workdir)
  name = (f"run {workdir} (system {meta.get('system')!r}, model "
          f"{meta.get('model')})")
  return copy_subtrees(params, source, keys, source_name=name)


def start_backbone(variables: Any, *, backbone: str, backbone_kw: Any = None,
                   pretrained: str = "", init_from: str = "",
                   keys: Sequence[str] = DEFAULT_KEYS, where: str = "config.model"
                   ) -> dict[str, Any]:
  """A network's fresh `variables` with its backbone sub-trees `keys` taken from ImageNet
  weights and/or a finished classify run, as every paper in jaxdet starts.

  Args:
    variables: {"params": {...}, ...} the network's fresh variables; its backbone lives under
      `keys` (the classification network's names: "conv", "fc").
    backbone, backbone_kw: the config's backbone (a key of jaxdet.models.backbones.BACKBONES).
    pretrained: a local torchvision state dict (`.pth` with torch, or `.npz`) of `backbone`
      (alexnet, vgg16 or resnet50; jaxdet.models.torch_weights); "" = none. The file's other
      collections (ResNet's batch_stats) replace the network's.
    init_from: a finished classify run's workdir (its latest checkpoint); "" = none. Applied
      after `pretrained` (so a run fine-tuned from ImageNet weights wins).
    keys: the sub-trees to copy.
    where: how errors name the config section.
  Returns:
    the variables (a new dict; unchanged when both sources are empty).
  Raises:
    ValueError: `pretrained` for a backbone without torchvision weights; any structure or shape
      mismatch (naming the parameter); FileNotFoundError: a missing file or run.
  """
  variables = dict(variables)
  if pretrained:
    from jaxdet.models import torch_weights
    if backbone not in torch_weights.TORCHVISION_ARCHS:
      raise ValueError(f"{where}.pretrained: torchvision weights exist for the backbones "
                       f"{torch_weights.TORCHVISION_ARCHS}, this config's backbone is "
                       f"{backbone!r}; start it from a classify run ({where}.init_from) instead")
    loaded = torch_weights.load_torchvision_weights(backbone, str(pretrained),
                                                    **dict(backbone_kw or {}))
    variables.update({k: v for k, v in loaded.items() if k != "params"})
    variables["params"] = copy_subtrees(variables["params"], loaded["params"], keys,
                                        source_name=f"{where}.pretrained {str(pretrained)!r}")
  if init_from:
    variables["params"] = load_into(variables["params"], str(init_from), keys)
  return variables


def check_frozen_loaded(frozen: Sequence[str], *, pretrained: str = "", init_from: str = "",
                        where: str = "config.model") -> None:
  """Layers kept frozen must have been loaded from somewhere: freezing randomly initialised
  layers (no `pretrained` file and no `init_from` run) is an error that says so."""
  frozen = tuple(frozen or ())
  if frozen and not pretrained and not init_from:
    raise ValueError(
        f"{where}.frozen: {list(frozen)} would stay at their random initialisation: no weights "
        f"are loaded ({where}.pretrained and {where}.init_from are empty). Give "
        f"{where}.pretrained=/path/to/torchvision_weights.pth|.npz (or init_from=<classify "
        f"run>), or train every layer with {where}.frozen=()")
