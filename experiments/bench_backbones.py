"""Forward throughput of every backbone's classification network, against torchvision.

  python -m experiments.bench_backbones            # accelerator: batch 64, 20 timed steps
  python -m experiments.bench_backbones --small    # CPU smoke run: batch 1, 2 timed steps

For each backbone (classifier form, 1000 classes, 224x224 inputs) and compute dtype (bfloat16,
float32): images/s of the jitted forward pass, after a warm-up call (compile time reported
separately). Where torch and torchvision import, the same torchvision network runs in the same
process on the same inputs (eval mode, channels_last, torch.autocast(bfloat16) for the bfloat16
row), with its weights converted into ours by `jaxdet.models.torch_weights`; the table then
shows torch's images/s, the ratio jax / torch and the float32 output agreement
(max |ours - torch| / max |torch|).
Notes: both frameworks may use TF32 for float32 convolutions on NVIDIA GPUs (their defaults).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from experiments import benchlib
from jaxdet.models import backbones as bb
from jaxdet.models import torch_weights as tw

TORCHVISION = {"alexnet": "alexnet", "vgg16": "vgg16", "resnet50": "resnet50"}
DTYPES = {"bf16": jnp.bfloat16, "f32": jnp.float32}


def bench_jax(name: str, dtype, x_nhwc: np.ndarray, iters: int, variables=None):
  model = bb.classifier(bb.get_backbone(name, dtype=dtype), 1000)
  x = jnp.asarray(x_nhwc, dtype)
  if variables is None:
    variables = jax.jit(model.init)(jax.random.key(0), x[:1])
  fwd = jax.jit(model.apply)
  first, step = benchlib.time_pipelined(lambda: fwd(variables, x), jax.block_until_ready, iters)
  return first, step, np.asarray(fwd(variables, x), np.float32)


def torch_net(name: str):
  """(torch module on the best device, device, torch) or None where torch is missing."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
    import torchvision  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  torch.manual_seed(0)
  device = "cuda" if torch.cuda.is_available() else "cpu"
  net = getattr(torchvision.models, TORCHVISION[name])(weights=None).eval()
  with torch.no_grad():   # non-trivial BatchNorm statistics for the agreement check
    for m in net.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        m.running_mean.uniform_(-0.1, 0.1)
        m.running_var.uniform_(0.5, 1.5)
  return net.to(device).to(memory_format=torch.channels_last), device, torch


def bench_torch(net, device, torch, x_nchw: np.ndarray, bf16: bool, iters: int):
  x = torch.from_numpy(x_nchw).to(device).contiguous(memory_format=torch.channels_last)
  sync = benchlib.torch_sync(torch)

  def fwd():
    with torch.inference_mode(), torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
      return net(x)
  first, step = benchlib.time_pipelined(fwd, lambda _: sync(), iters)
  return first, step, fwd().float().cpu().numpy()


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--small", action="store_true", help="batch 1, 2 timed steps (CPU)")
  parser.add_argument("--batch", type=int, default=None)
  parser.add_argument("--iters", type=int, default=None)
  parser.add_argument("--size", type=int, default=224)
  parser.add_argument("--backbones", default=",".join(bb.BACKBONES))
  parser.add_argument("--dtypes", default="bf16,f32")
  parser.add_argument("--no-torch", action="store_true")
  args = parser.parse_args(argv)
  batch = args.batch or (1 if args.small else 64)
  iters = args.iters or (2 if args.small else 20)
  print(f"jax {jax.__version__} on {benchlib.device_kind()}; batch {batch}, "
        f"{args.size}x{args.size}, {iters} timed steps")
  rng = np.random.default_rng(0)
  x_nchw = rng.normal(size=(batch, 3, args.size, args.size)).astype(np.float32)
  x_nhwc = np.ascontiguousarray(x_nchw.transpose(0, 2, 3, 1))
  header = (f"{'backbone':14s} {'dtype':5s} {'compile s':>9s} {'jax img/s':>10s} "
            f"{'torch img/s':>11s} {'jax/torch':>9s} {'rel err':>8s}")
  print(header)
  for name in args.backbones.split(","):
    tnet = None if args.no_torch or name not in TORCHVISION else torch_net(name)
    variables = None
    if tnet is not None:
      sd = {k: v.detach().cpu().numpy() for k, v in tnet[0].state_dict().items()}
      variables = jax.device_put(tw.convert_state_dict(name, sd))
    for dname in args.dtypes.split(","):
      first, step, out = bench_jax(name, DTYPES[dname], x_nhwc, iters, variables)
      row = f"{name:14s} {dname:5s} {first:9.1f} {batch / step:10.1f}"
      if tnet is not None:
        _, t_step, t_out = bench_torch(*tnet, x_nchw, dname == "bf16", iters)
        err = np.abs(out - t_out).max() / max(np.abs(t_out).max(), 1e-12)
        row += f" {batch / t_step:11.1f} {t_step / step:9.2f} {err:8.1e}"
      print(row, flush=True)


if __name__ == "__main__":
  main()
