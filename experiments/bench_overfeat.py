r"""Dense (fc layers as convolutions) vs explicit (crop every window) sliding-window evaluation.

    python -m experiments.bench_overfeat [--backbone tiny] [--image 128] [--batch 4] [--reps 3]

Both give class scores and boxes for the same windows (every window of the multi-scale grid of
the overfeat cpu config: its sizes x aspect ratios): dense runs the network once per scale; explicit crops each window,
resizes it to the network input and runs the fc network on it. Prints seconds per image for
each (compilation excluded), the speedup, the number of windows and the largest difference of
class probabilities (nonzero only through the conv layers' zero padding at window borders).
Random weights: the timing does not depend on training.
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np

from experiments import benchlib
from jaxdet.models import overfeat


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser()
  parser.add_argument("--image", type=int, default=128)
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--reps", type=int, default=3)
  parser.add_argument("--chunk", type=int, default=512)
  args = parser.parse_args(argv)
  from experiments.configs import overfeat as config_lib
  extras = overfeat.build_system(config_lib.get_config("cpu")).extras
  dense_net, conv_net = extras.network, extras.conv_network
  window, step = extras.window, extras.step
  params = dense_net.init(jax.random.PRNGKey(0), jnp.zeros((1, window, window, 3)))
  conv_params = overfeat.conv_variables(extras, params)
  scales = extras.scales   # (sy, sx) per window shape: the preset's sizes x aspect ratios
  images = jnp.asarray(np.random.default_rng(0).integers(
      0, 256, (args.batch, args.image, args.image, 3)), jnp.uint8)
  dense = jax.jit(lambda p, x: overfeat.dense_windows(conv_net, p, x, scales, window=window,
                                                      step=step))
  d = dense(conv_params, images)
  explicit = jax.jit(lambda p, x, w: overfeat.explicit_windows(dense_net, p, x, w, window=window,
                                                               chunk=args.chunk))
  e = explicit(params, images, d["windows"])
  t_dense = benchlib.time_jax(dense, (conv_params, images), args.reps).best_s
  t_explicit = benchlib.time_jax(explicit, (params, images, d["windows"]), args.reps).best_s
  result = {
      "device": benchlib.device_kind(), "image": args.image, "batch": args.batch,
      "scales": list(scales), "window": window, "step": step,
      "windows_per_image": int(d["windows"].shape[0]),
      "dense_s_per_image": t_dense / args.batch,
      "explicit_s_per_image": t_explicit / args.batch,
      "speedup": t_explicit / t_dense,
      "max_prob_diff": float(jnp.max(jnp.abs(d["probs"] - e["probs"]))),
  }
  print(json.dumps(result))
  return result


if __name__ == "__main__":
  main()
