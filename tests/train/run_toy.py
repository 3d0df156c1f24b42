"""Trains the toy system in a subprocess (for the kill-and-resume test).

    python tests/train/run_toy.py WORKDIR NUM_STEPS DELAY_S

Checkpoints every step; the loader sleeps DELAY_S per batch so that the test can kill the
process mid-run. Writes WORKDIR/final_params.npz at the end.
"""

import functools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402

from toy_system import build_system, make_toy_loader, resume_config  # noqa: E402


def main(workdir: str, num_steps: int, delay_s: float) -> None:
  import logging
  import jax
  logging.basicConfig(level=logging.INFO)
  from jaxdet.train.loop import train_and_evaluate
  config = resume_config(num_steps)
  state = train_and_evaluate(config, workdir, system=build_system(config),
                             make_loader=functools.partial(make_toy_loader, delay_s=delay_s))
  flat = {jax.tree_util.keystr(p): np.asarray(x)
          for p, x in jax.tree_util.tree_flatten_with_path(state.params)[0]}
  np.savez(os.path.join(workdir, "final_params.npz"), **flat)


if __name__ == "__main__":
  main(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]))
