"""Faster R-CNN's cpu preset, reduced, trained by 2 processes (1 CPU device each, gloo) or 1.

    python tests/train/multiprocess_run.py worker PORT PROCESS_ID WORKDIR
    python tests/train/multiprocess_run.py reference WORKDIR MULTI_WORKDIR

worker: one of the 2 processes of jax.distributed (coordinator 127.0.0.1:PORT) running
  jaxdet.train.loop.train_and_evaluate in WORKDIR (resuming from its checkpoints).
reference: the same config in 1 process on 1 device, in WORKDIR; then prints one JSON line:
  "param_diff" (largest |difference| of its final parameters from MULTI_WORKDIR's latest
  checkpoint), "moved" (largest change from the initial parameters), "eval" (its own scores),
  "multi_eval" (MULTI_WORKDIR/eval.json, scored by the 2 processes' sharded evaluation) and
  "single_eval" (the 2-process run's final parameters scored by one-device evaluation).
"""

import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

NUM_STEPS = 6


def config():
  from experiments.configs import faster_rcnn
  c = faster_rcnn.get_config("cpu")
  c.unlock()
  c.data.image_size = (64, 64)
  c.data.num_train, c.data.num_test = 32, 12
  c.data.prefetch, c.data.num_workers = 0, 1
  c.model.anchor_scales = (16.0, 32.0)
  c.train.batch_size, c.train.num_steps, c.train.log_every = 4, NUM_STEPS, 2
  c.optimizer.warmup_steps, c.optimizer.decay_steps = 0, ()
  c.eval.batch_size, c.eval.every_steps = 4, 0
  c.checkpoint.every_steps, c.checkpoint.keep = 2, 2
  return c


def worker(port: str, process_id: str, workdir: str) -> None:
  import jax
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                             process_id=int(process_id))
  from jaxdet.train import loop
  assert jax.device_count() == 2 and jax.process_count() == 2
  ckpts = os.path.join(workdir, "checkpoints")
  steps = [int(n) for n in os.listdir(ckpts) if n.isdigit()] if os.path.isdir(ckpts) else []
  print(f"start_step {max(steps, default=0)}", flush=True)
  loop.train_and_evaluate(config(), workdir)
  print("done", flush=True)


def reference(workdir: str, multi: str) -> None:
  import jax
  import numpy as np
  from jaxdet.data.pipeline import make_loader
  from jaxdet.train import loop, setup
  from jaxdet.train.evaluate import evaluate_variables
  c = config()
  system = setup.system_from_config(c)
  state = loop.train_and_evaluate(c, workdir)
  loader = make_loader(c.data, "train", batch_size=4, seed=0, train=True)
  init = setup.init_state(c, system, setup.peek(loader))[0]
  other = loop.restore_for_inference(c, multi, system, setup.peek(loader))

  def diff(a, b):
    d = jax.tree_util.tree_map(lambda x, y: float(np.max(np.abs(np.asarray(x) - np.asarray(y)))),
                               a, b)
    return max(jax.tree_util.tree_leaves(d))

  eval_loader = make_loader(c.data, "test", batch_size=4, seed=0, train=False)
  single = evaluate_variables(system.predict, other.variables, eval_loader, system.num_classes)
  with open(os.path.join(workdir, "eval.json")) as f:
    own = json.load(f)
  with open(os.path.join(multi, "eval.json")) as f:
    multi_eval = json.load(f)
  print(json.dumps({"param_diff": diff(state.params, other.params),
                    "moved": diff(state.params, init.params), "step": int(other.step),
                    "eval": own, "multi_eval": multi_eval, "single_eval": single}))


if __name__ == "__main__":
  {"worker": worker, "reference": reference}[sys.argv[1]](*sys.argv[2:])
