"""torchvision weights (alexnet, vgg16, resnet50) for jaxdet's backbones, from a local file.

Nothing is downloaded. The user names a file holding a torchvision state dict:

* a `.pth` / `.pt` written by `torch.save(model.state_dict(), path)`, read with torch when it
  is importable, or
* an `.npz` of it, written by `save_state_dict_npz` on a machine where torch exists, read with
  NumPy alone.

`load_torchvision_weights(arch, path)` returns the variables of `classifier(get_backbone(arch),
num_classes)`: {"params": {"conv", "fc", "head"}} (+ {"batch_stats": ...} for resnet50), so a
detector can take the "conv" and "fc" subtrees for its backbone.

Layout conversion (torch is NCHW, jaxdet NHWC):
  conv weight   (O, I, kH, kW)          -> kernel (kH, kW, I, O)              (HWIO)
  linear weight (out, in)               -> kernel (in, out)
  first fc      (out, C * H * W)        -> kernel (H * W * C, out)  (torch flattens pooled
                                           features in C, H, W order; jaxdet in H, W, C)
  batch norm    weight, bias, running_mean, running_var -> scale, bias, mean, var
Every key is accounted for: missing or unexpected keys and shape mismatches raise a ValueError
naming the key and both shapes.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxdet.models import backbones

TORCHVISION_ARCHS = ("alexnet", "vgg16", "resnet50")
_IGNORED_SUFFIXES = (".num_batches_tracked",)


# ----------------------------------------------------------------------------- files


def _to_numpy(t: Any) -> np.ndarray:
  if isinstance(t, np.ndarray):
    return t
  t = t.detach().cpu()
  if t.is_floating_point():
    t = t.float()   # bfloat16/half tensors have no NumPy dtype
  return t.numpy()


def _torch_load(path: str) -> dict[str, np.ndarray]:
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        f"path: reading {path!r} needs torch, which is not importable here; on a machine with "
        "torch run jaxdet.models.torch_weights.save_state_dict_npz(path, 'weights.npz') and "
        "load the .npz instead") from e
  sd = torch.load(path, map_location="cpu", weights_only=True)
  if not isinstance(sd, Mapping):
    raise ValueError(f"path: expected a state dict saved with torch.save(model.state_dict()), "
                     f"got a {type(sd).__name__} in {path!r}")
  return {k: _to_numpy(v) for k, v in sd.items()}


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads a torchvision state dict from a local `.npz`, or a `.pth`/`.pt` (needs torch).

  Returns:
    {torch key: np.ndarray} in torch's layouts.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"path: no file {path!r} (weights are never downloaded; save a "
                            "state dict locally first)")
  if path.endswith(".npz"):
    with np.load(path, allow_pickle=False) as z:
      return {k: z[k] for k in z.files}
  return _torch_load(path)


def save_state_dict_npz(state_dict: Mapping[str, Any] | str | os.PathLike,
                        out_path: str | os.PathLike) -> None:
  """Writes a state dict (or a `.pth` file's) to an `.npz` readable without torch.

  Run where torch exists, e.g.
    save_state_dict_npz(torchvision.models.vgg16(weights="DEFAULT").state_dict(), "vgg16.npz")
  """
  if isinstance(state_dict, (str, os.PathLike)):
    arrays = _torch_load(os.fspath(state_dict))
  else:
    arrays = {k: _to_numpy(v) for k, v in state_dict.items()}
  np.savez(out_path, **arrays)


# ----------------------------------------------------------------------------- layouts


def conv_weight_to_flax(w: np.ndarray) -> np.ndarray:
  """torch conv weight (O, I, kH, kW) -> flax kernel (kH, kW, I, O)."""
  return np.transpose(w, (2, 3, 1, 0))


def linear_weight_to_flax(w: np.ndarray, chw: tuple[int, int, int] | None = None) -> np.ndarray:
  """torch linear weight (out, in) -> flax kernel (in, out).

  With `chw = (C, H, W)` the input is a flattened feature map: torch's (C, H, W) order becomes
  jaxdet's (H, W, C) order, so `x_hwc.reshape(-1) @ kernel == x_chw.reshape(-1) @ w.T`.
  """
  if chw is None:
    return np.transpose(w)
  c, h, wd = chw
  return np.transpose(w.reshape(w.shape[0], c, h, wd), (2, 3, 1, 0)).reshape(h * wd * c, -1)


# ----------------------------------------------------------------------------- key maps
# An entry: torch prefix -> (our path as a tuple of names, kind); kinds: "conv", "linear",
# "linear_chw" (first fc), "bn".


def _alexnet_entries(parts: backbones.BackboneParts) -> dict[str, tuple[tuple[str, ...], str]]:
  """torchvision AlexNet indices: features = [conv, relu, (pool)]*; classifier =
  [dropout, linear, relu]* + linear (dropout before) or [linear, relu, dropout]* + linear."""
  entries, i = {}, 0
  for k, c in enumerate(parts.conv.convs):
    entries[f"features.{i}"] = (("conv", f"conv{k + 1}"), "conv")
    i += 2 + (c.pool is not None)
  return {**entries, **_dense_entries(parts)}


def _vgg_entries(parts: backbones.BackboneParts) -> dict[str, tuple[tuple[str, ...], str]]:
  """torchvision VGG indices: features = ([pool] + [conv, relu] * n) per stage."""
  entries, i = {}, 0
  for s, widths in enumerate(parts.conv.stages):
    i += s > 0
    for k in range(len(widths)):
      entries[f"features.{i}"] = (("conv", f"conv{s + 1}_{k + 1}"), "conv")
      i += 2
  return {**entries, **_dense_entries(parts)}


def _dense_entries(parts: backbones.BackboneParts) -> dict[str, tuple[tuple[str, ...], str]]:
  fc = parts.fc
  offset = 1 if fc.dropout_before else 0
  entries = {}
  for j in range(len(fc.features)):
    entries[f"classifier.{3 * j + offset}"] = (("fc", f"fc{6 + j}"),
                                               "linear_chw" if j == 0 else "linear")
  entries[f"classifier.{3 * len(fc.features)}"] = (("head",), "linear")
  return entries


def _resnet_entries(parts: backbones.BackboneParts) -> dict[str, tuple[tuple[str, ...], str]]:
  entries = {"conv1": (("conv", "conv1"), "conv"), "bn1": (("conv", "bn1"), "bn")}
  for i, n in enumerate(parts.conv.blocks):
    part = "conv" if i < 3 else "fc"
    for j in range(n):
      tp, our = f"layer{i + 1}.{j}", (part, f"layer{i + 1}_{j}")
      for k in (1, 2, 3):
        entries[f"{tp}.conv{k}"] = (our + (f"conv{k}",), "conv")
        entries[f"{tp}.bn{k}"] = (our + (f"bn{k}",), "bn")
      if j == 0:
        entries[f"{tp}.downsample.0"] = (our + ("downsample_conv",), "conv")
        entries[f"{tp}.downsample.1"] = (our + ("downsample_bn",), "bn")
  entries["fc"] = (("head",), "linear")
  return entries


_ENTRIES = {"alexnet": _alexnet_entries, "vgg16": _vgg_entries, "resnet50": _resnet_entries}


def _flat(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(_flat(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = v
  return out


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
  for k in path[:-1]:
    tree = tree.setdefault(k, {})
  tree[path[-1]] = value


def convert_state_dict(arch: str, state_dict: Mapping[str, Any], **backbone_kw
                       ) -> dict[str, Any]:
  """Converts a torchvision state dict into jaxdet `Classifier` variables.

  Args:
    arch: "alexnet", "vgg16" or "resnet50" (torchvision's key layout).
    state_dict: {torch key: array} (NumPy arrays or torch tensors).
    **backbone_kw: passed to `get_backbone(arch, ...)` (e.g. frozen_bn=True, or smaller layer
      widths with the same layout).
  Returns:
    {"params": {"conv", "fc", "head"}} (+ "batch_stats" for resnet50): float32 NumPy arrays for
    `classifier(get_backbone(arch, **backbone_kw), num_classes)`, num_classes taken from the
    state dict's last linear layer.
  Raises:
    ValueError: unknown arch, missing or unexpected keys, or a shape mismatch (naming the key,
      the file's shape and the expected torch shape).
  """
  if arch not in TORCHVISION_ARCHS:
    raise ValueError(f"arch: expected one of {TORCHVISION_ARCHS}, got {arch!r}")
  sd = {k: _to_numpy(v) for k, v in state_dict.items()}
  parts = backbones.get_backbone(arch, **backbone_kw)
  entries = _ENTRIES[arch](parts)
  head_prefix = next(p for p, (path, _) in entries.items() if path == ("head",))
  head_key = f"{head_prefix}.weight"
  if head_key not in sd or sd[head_key].ndim != 2:
    got = "missing" if head_key not in sd else f"shape {sd[head_key].shape}"
    raise ValueError(f"state_dict: expected {head_key!r} (out, in) for a torchvision {arch}, "
                     f"got {got}")
  num_classes = int(sd[head_key].shape[0])
  model = backbones.classifier(parts, num_classes)
  size = 224
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3))))
  expected = {(col,) + path: s.shape for col, tree in shapes.items()
              for path, s in _flat(tree).items()}

  # torch key -> (our full path, transform, expected torch shape)
  plan: dict[str, tuple[tuple[str, ...], Any, tuple[int, ...]]] = {}
  for prefix, (path, kind) in entries.items():
    p = ("params",) + path
    if kind == "bn":
      for tk, ours in (("weight", p + ("scale",)), ("bias", p + ("bias",)),
                       ("running_mean", ("batch_stats",) + path + ("mean",)),
                       ("running_var", ("batch_stats",) + path + ("var",))):
        plan[f"{prefix}.{tk}"] = (ours, None, expected.get(ours))
      continue
    kshape = expected.get(p + ("kernel",))
    if kind == "conv":
      tshape = None if kshape is None else (kshape[3], kshape[2], kshape[0], kshape[1])
      transform = conv_weight_to_flax
    elif kind == "linear":
      tshape = None if kshape is None else (kshape[1], kshape[0])
      transform = linear_weight_to_flax
    else:   # linear_chw: (H * W * C, out) <- (out, C * H * W)
      r = parts.roi_size
      c = None if kshape is None else kshape[0] // (r * r)
      tshape = None if kshape is None else (kshape[1], kshape[0])
      transform = lambda w, c=c, r=r: linear_weight_to_flax(w, (c, r, r))
    plan[f"{prefix}.weight"] = (p + ("kernel",), transform, tshape)
    if p + ("bias",) in expected:
      plan[f"{prefix}.bias"] = (p + ("bias",), None, expected[p + ("bias",)])

  # Internal consistency of this map with the modules: every variable gets exactly one key.
  unassigned = sorted("/".join(k) for k in set(expected) - {v[0] for v in plan.values()})
  unknown = sorted("/".join(v[0]) for v in plan.values() if v[0] not in expected)
  if unassigned or unknown:
    raise AssertionError(f"torch key map: no key for {unassigned}; no variable for {unknown}")
  missing = sorted(k for k in plan if k not in sd)
  unexpected = sorted(k for k in sd if k not in plan and not k.endswith(_IGNORED_SUFFIXES))
  if missing or unexpected:
    raise ValueError(f"state_dict: does not match torchvision {arch}: missing keys {missing}, "
                     f"unexpected keys {unexpected}")
  for key, (ours, _, tshape) in plan.items():
    if tuple(sd[key].shape) != tuple(tshape):
      raise ValueError(f"state_dict[{key!r}]: shape {tuple(sd[key].shape)} in the file, "
                       f"expected {tuple(tshape)} (torch layout) for {'/'.join(ours)} "
                       f"{tuple(expected[ours])}")

  variables: dict[str, Any] = {}
  for key, (ours, transform, _) in plan.items():
    w = sd[key].astype(np.float32)
    if transform is not None:
      w = np.ascontiguousarray(transform(w))
    _set(variables, ours, w)
  return variables


def load_torchvision_weights(arch: str, path: str | os.PathLike, **backbone_kw
                             ) -> dict[str, Any]:
  """`convert_state_dict(arch, load_state_dict(path), **backbone_kw)`; see both."""
  return convert_state_dict(arch, load_state_dict(path), **backbone_kw)
