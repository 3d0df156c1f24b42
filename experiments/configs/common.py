"""Config pieces every system's config builds on, and the command-line parsing of configs.

A system's config file (experiments/configs/<system>.py) starts with the command that runs it
and defines `get_config(preset="cpu")`:

    def get_config(preset="cpu"):
      config = common.base_config(preset)
      config.system = "yolo"              # the key in jaxdet.systems.SYSTEMS
      config.model = {...}                # everything that defines the network (fingerprinted)
      config.optimizer.learning_rate = ...
      return common.finalize(config)

Presets: "cpu" (synthetic data, small backbone, minutes on 2 cores; the default) and
"paper" (the paper's backbone, image scale and schedule, tfds VOC).
"""

from __future__ import annotations

import difflib
from typing import Any, Callable, Sequence

import ml_collections

PRESETS = ("cpu", "paper")


def optimizer_config() -> ml_collections.ConfigDict:
  """SGD with momentum 0.9 and weight decay 5e-4 (the papers' Caffe solver), step schedule."""
  return ml_collections.ConfigDict({
      "name": "sgd",               # "sgd" | "adam" | "adamw"
      "learning_rate": 0.01,
      "momentum": 0.9,
      "nesterov": False,
      "b1": 0.9, "b2": 0.999, "eps": 1e-8,   # adam / adamw
      "weight_decay": 5e-4,        # kernels only (rank > 1 parameters)
      "schedule": "step",          # "constant" | "step" | "cosine"
      "decay_steps": (),           # step schedule: multiply by decay_factor at these steps
      "decay_factor": 0.1,
      "warmup_steps": 0,           # linear warm-up from learning_rate * warmup_factor
      "warmup_factor": 0.1,
      "grad_clip_norm": 0.0,       # clip the global gradient norm (0 = off)
      "lr_scaling": "none",        # "none" | "linear": learning_rate * train.batch_size /
                                   # reference_batch (Goyal et al. 2017), see jaxdet.train.optim
      "reference_batch": 0,        # the global batch learning_rate is for; 0 = the preset's
                                   # train.batch_size (set by finalize; paper: the paper's)
  })


def train_config(preset: str) -> ml_collections.ConfigDict:
  """The loop: batch size, length, logging and data parallelism."""
  cpu = preset == "cpu"
  return ml_collections.ConfigDict({
      "batch_size": 8 if cpu else 2,    # global batch, split over all devices
      "num_steps": 300 if cpu else 40_000,
      "log_every": 10 if cpu else 50,
      "parallel": "shard_map",          # "shard_map" | "pmap" (same train_step)
      # A step whose loss, gradients or updated state is NaN/inf is never applied. "stop":
      # end the run with an error naming the step and the non-finite loss/... terms; "skip":
      # drop that update, count it (skipped_steps), stop after max_consecutive_skips in a row.
      "on_nonfinite": "stop",
      "max_consecutive_skips": 10,
      # Several seeds in one program: N independent replicas (replica i from seed seed + i:
      # init and step randomness) trained by one jitted step on the same batches (the data
      # order is `seed`'s). Logged training metrics are the means over replicas; each eval
      # score NAME is the mean, NAME/std the sample std (ddof=1), NAME/seed{i} replica i's;
      # checkpoint.best_metric follows the mean. 1 = one run. Not for the multi-stage
      # pipelines (rcnn, faster_rcnn "alternating").
      "num_seeds": 1,
  })


def eval_config(preset: str) -> ml_collections.ConfigDict:
  """Evaluation during and after training."""
  cpu = preset == "cpu"
  return ml_collections.ConfigDict({
      "split": "test",
      "batch_size": 8 if cpu else 4,
      "every_steps": 100 if cpu else 5_000,   # 0 = only at the end
      "max_batches": 8 if cpu else -1,        # during training; -1 = the whole split
  })


def checkpoint_config(preset: str) -> ml_collections.ConfigDict:
  """orbax checkpoints: periodic, the last `keep` and the best by `best_metric`."""
  return ml_collections.ConfigDict({
      "every_steps": 100 if preset == "cpu" else 2_000,
      "keep": 3,
      "best_metric": "voc07_map",   # a key of the eval metrics; "" = keep only the last
      "best_mode": "max",
  })


def data_config(preset: str) -> ml_collections.ConfigDict:
  """jaxdet.data's defaults (synthetic shapes); the paper preset reads VOC 2007 via tfds.

  Systems set the image scale (`data.resize`) and augmentation for their paper preset.
  """
  from jaxdet.data import pipeline
  config = ml_collections.ConfigDict(pipeline.default_data_config())
  if preset == "paper":
    config.name = "voc2007"
    config.num_train = None      # trainval: all 5011 images
    config.num_test = None       # test: all 4952 images
    config.max_boxes = 42        # the most objects in one VOC 2007 image
  return config


def selective_search_data(config: ml_collections.ConfigDict) -> None:
  """The data settings of the selective-search detectors (R-CNN, Fast R-CNN), in place:
  proposals through the pipeline's on-disk cache (fast mode, 256 boxes on the cpu preset;
  quality mode, 2000 boxes on the paper's); cpu: 192 training images (each needs selective
  search once), the 256 test images of every other cpu preset, horizontal flips."""
  cpu = config.preset == "cpu"
  config.data.proposals = ml_collections.ConfigDict({
      "max_proposals": 256 if cpu else 2000,
      "mode": "fast" if cpu else "quality",
      "cache_root": "",            # "" = ~/.cache/jaxdet/proposals
      "num_workers": 0,            # 0 = every core
  })
  if cpu:
    config.data.num_train = 192
    config.data.num_test = 256
    config.data.augment.hflip = True


def num_classes(preset: str) -> int:
  """C of the preset's dataset: the 6 synthetic shapes or the 20 VOC classes."""
  from jaxdet.data import synthetic
  return len(synthetic.CLASS_NAMES) if preset == "cpu" else 20


def base_config(preset: str = "cpu") -> ml_collections.ConfigDict:
  """Everything but the system's name and model section."""
  if preset not in PRESETS:
    raise ValueError(f"preset: expected one of {PRESETS}, got {preset!r}")
  return ml_collections.ConfigDict({
      "system": "",                  # the key in jaxdet.systems.SYSTEMS
      "preset": preset,
      "seed": 0,
      "num_classes": num_classes(preset),   # C, object classes (no background)
      "compute_dtype": "float32" if preset == "cpu" else "bfloat16",  # params stay float32
      "model": ml_collections.ConfigDict(),
      "data": data_config(preset),
      "train": train_config(preset),
      "optimizer": optimizer_config(),
      "eval": eval_config(preset),
      "checkpoint": checkpoint_config(preset),
  })


def finalize(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Locks the config: from here on, setting an unknown key is an error.

  An unset optimizer.reference_batch becomes the preset's train.batch_size: the batch its
  learning rate is tuned for (the paper presets use the paper's batch), which
  optimizer.lr_scaling="linear" scales from when --config.train.batch_size changes it.
  """
  if not config.system:
    raise ValueError("config.system: expected the name of a system in jaxdet.systems.SYSTEMS")
  if not config.optimizer.get("reference_batch"):   # the batch the preset's rate is tuned for
    config.optimizer.reference_batch = int(config.train.batch_size)
  config.lock()
  return config


def unknown_key_error(key: str, valid: Sequence[str]) -> ValueError:
  """An error naming the unknown key and the nearest valid ones."""
  near = difflib.get_close_matches(key, valid, n=3, cutoff=0.5)
  if not near:   # try the last component alone, e.g. "train.batchsize" -> "*.batch_size"
    leaf = key.rsplit(".", 1)[-1]
    by_leaf = {k.rsplit(".", 1)[-1]: k for k in valid}
    near = [by_leaf[k] for k in difflib.get_close_matches(leaf, list(by_leaf), n=3,
                                                          cutoff=0.5)]
  hint = ", ".join(near) if near else "(none close; see the config file)"
  return ValueError(f"config: unknown key {key!r}; nearest valid keys: {hint}")


def config_keys(config: Any, prefix: str = "") -> list[str]:
  """Every key of a nested config as a dotted path ("optimizer", "optimizer.learning_rate")."""
  keys = []
  for key, value in config.items():
    keys.append(f"{prefix}{key}")
    if isinstance(value, (ml_collections.ConfigDict, dict)):
      keys += config_keys(value, f"{prefix}{key}.")
  return keys


def _flag_values(argv: list[str], define: Callable[[Any], None] | None):
  from absl import flags
  from ml_collections import config_flags
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file(
      "config", None, "experiments/configs/<system>.py[:preset]", flag_values=fv,
      lock_config=True, sys_argv=argv)
  flags.DEFINE_bool("multihost", False, "call jax.distributed.initialize() first",
                    flag_values=fv)
  flags.DEFINE_bool("show_config", False, "print the resolved config (every key with its "
                    "value, overrides applied) and exit", flag_values=fv)
  flags.DEFINE_string("coordinator_address", None, "--multihost: host:port of process 0 "
                      "(default: $JAX_COORDINATOR_ADDRESS or the cluster's)", flag_values=fv)
  flags.DEFINE_integer("num_processes", None, "--multihost: the number of processes "
                       "(default: detected from SLURM / Open MPI / Kubernetes)", flag_values=fv)
  flags.DEFINE_integer("process_id", None, "--multihost: this process's index "
                       "(default: detected as --num_processes)", flag_values=fv)
  if define is not None:
    define(fv)
  return fv


def initialize_distributed(fv) -> None:
  """With --multihost: jax.distributed.initialize from --coordinator_address, --num_processes,
  --process_id where given (the rest from $JAX_COORDINATOR_ADDRESS or the cluster's
  environment: SLURM, Open MPI, Kubernetes, Cloud TPU). Call before anything else uses JAX."""
  if not fv.multihost:
    return
  import jax
  given = {k: fv[k].value for k in ("coordinator_address", "num_processes", "process_id")
           if fv[k].value is not None}
  jax.distributed.initialize(**given)


def parse_flags(argv: Sequence[str], define: Callable[[Any], None] | None = None, *,
                config_optional: bool = False):
  """Parses `--config=FILE[:preset] [--config.key=value ...]` plus the script's own flags.

  `--help` prints `usage` and exits; `--show_config` prints the resolved config and exits.

  Args:
    argv: the command line, program name first.
    define: optional fn(flag_values) defining the script's other flags (absl).
    config_optional: without --config return (None, flag_values) (scripts that read the
      config a training run saved, e.g. WORKDIR/config.json).
  Returns:
    (config, flag_values): the locked ConfigDict with overrides applied, and the parsed flags.
  Raises:
    ValueError: an override names an unknown key (the error lists the nearest valid keys).
  """
  argv = list(argv)
  if any(a in HELP_ARGS for a in argv[1:]):
    print(usage(argv[0], define))
    raise SystemExit(0)
  plain_argv = [a for a in argv if not a.startswith("--config.")]
  plain = _flag_values(plain_argv, define)
  plain(plain_argv)
  if plain.config is None and config_optional and len(plain_argv) == len(argv):
    return None, plain
  if plain.config is None:
    raise ValueError("--config: expected experiments/configs/<system>.py[:preset]")
  valid = config_keys(plain.config)
  for arg in argv[1:]:
    if arg.startswith("--config."):
      key = arg[len("--config."):].split("=", 1)[0]
      if key not in valid:
        raise unknown_key_error(key, valid)
  fv = _flag_values(argv, define)
  fv(argv)
  if fv.config is None:
    raise ValueError("--config: expected experiments/configs/<system>.py[:preset]")
  if fv.show_config:
    print(fv.config)
    raise SystemExit(0)
  return fv.config, fv


HELP_ARGS = ("--help", "-h", "--helpshort", "--helpfull", "-?")


def config_files() -> list[str]:
  """The systems with a config file here: experiments/configs/<system>.py."""
  import os
  here = os.path.dirname(os.path.abspath(__file__))
  return sorted(f[:-3] for f in os.listdir(here)
                if f.endswith(".py") and f not in ("__init__.py", "common.py"))


def usage(program: str, define: Callable[[Any], None] | None = None) -> str:
  """The --help text of a script parsed by `parse_flags`: the --config flag with the systems
  and presets, the script's own flags with their defaults, and how to list every config key.

  The description is the running script's docstring (`__main__`), when it has one.
  """
  import sys
  fv = _flag_values([program], define)
  doc = (getattr(sys.modules.get("__main__"), "__doc__", None) or "").strip()
  spec = getattr(sys.modules.get("__main__"), "__spec__", None)
  name = f"python -m {spec.name}" if spec is not None else program
  lines = [f"usage: {name} --config=experiments/configs/<system>.py[:preset] [flags] "
           f"[--config.<key>=<value> ...]", ""]
  if doc:
    lines += [doc, ""]
  lines += ["--config: the experiment config file and preset",
            f"  systems: {', '.join(config_files())} (experiments/configs/<system>.py)",
            f"  presets: {', '.join(PRESETS)} (default {PRESETS[0]}), e.g. "
            f"--config=experiments/configs/yolo.py:{PRESETS[0]}",
            "  override any key: --config.train.num_steps=100 --config.data.name=voc2007",
            "  every key with its default: add --show_config (prints the resolved config, exits)",
            "", "flags:"]
  seen = set()
  for key in sorted(fv):
    flag = fv[key]
    if flag.name in seen or flag.name == "config":
      continue
    seen.add(flag.name)
    default = "" if flag.default is None else f" (default: {flag.default!r})"
    lines.append(f"  --{flag.name}: {flag.help}{default}")
  return "\n".join(lines)
