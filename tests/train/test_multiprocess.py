"""Two real processes (jax.distributed, gloo CPU collectives) train Faster R-CNN's reduced cpu
preset with checkpoints, are SIGKILLed mid-run, resume and finish with the parameters of a
one-process run of the same global batch; their sharded evaluation scores as one device."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
SCRIPT = os.path.join(HERE, "multiprocess_run.py")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env():
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)   # one CPU device per process
  return env


def _launch(workdir: str, logdir: str, tag: str) -> list[subprocess.Popen]:
  port = str(_free_port())
  procs = []
  for i in range(2):
    log = open(os.path.join(logdir, f"{tag}_{i}.log"), "w")
    procs.append(subprocess.Popen([sys.executable, SCRIPT, "worker", port, str(i), workdir],
                                  env=_env(), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT))
  return procs


def _logs(logdir: str) -> str:
  return "\n".join(f"== {n}\n" + open(os.path.join(logdir, n)).read()[-2000:]
                   for n in sorted(os.listdir(logdir)))


def _steps(workdir: str) -> list[int]:
  ckpts = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(ckpts) if n.isdigit()) if os.path.isdir(ckpts) else []


def test_two_processes_killed_resume_to_the_one_process_result(tmp_path):
  multi, ref, logs = str(tmp_path / "multi"), str(tmp_path / "ref"), str(tmp_path / "logs")
  os.makedirs(logs)
  # the one-process reference trains while the 2 processes run, then compares
  procs = _launch(multi, logs, "first")
  deadline = time.time() + 600
  while not _steps(multi) and time.time() < deadline:
    assert all(p.poll() is None for p in procs), _logs(logs)
    time.sleep(0.05)
  for p in procs:   # mid-run: after the first checkpoint, before the last step
    p.send_signal(signal.SIGKILL)
    p.wait()
  assert _steps(multi), _logs(logs)
  assert not os.path.exists(os.path.join(multi, "eval.json")), "finished before the kill"
  procs = _launch(multi, logs, "second")
  for p in procs:
    assert p.wait(timeout=600) == 0, _logs(logs)
  second = open(os.path.join(logs, "second_0.log")).read()
  assert "start_step 0" not in second and "start_step" in second, _logs(logs)   # resumed
  proc = subprocess.run([sys.executable, SCRIPT, "reference", ref, multi], env=_env(), cwd=ROOT,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  assert out["step"] == 6
  assert out["moved"] > 1e-3, out
  assert out["param_diff"] < 1e-5, out   # float reassociation of the 2-device sums only
  for key in ("voc07_map", "coco_AP", "num_images"):   # sharded scoring = one-device scoring
    assert abs(out["multi_eval"][key] - out["single_eval"][key]) < 1e-9, out


def test_loader_parts_of_processes_are_the_global_batch():
  """Each process's shard is its slice of the one-process global batch; the state is global,
  so one saved state resumes every process (train: across an epoch; eval: padded end)."""
  import numpy as np
  from jaxdet.data.pipeline import default_data_config, make_loader
  cfg = default_data_config()
  cfg.update(num_train=10, num_test=7, image_size=(32, 32), prefetch=0, num_workers=1)
  for split, train in (("train", True), ("test", False)):
    whole = make_loader(cfg, split, batch_size=4, seed=3, train=train)
    parts = [make_loader(cfg, split, batch_size=4, seed=3, train=train, shard=(i, 2))
             for i in range(2)]
    for step in range(2 if not train else 4):
      want = next(whole)
      got = [next(p) for p in parts]
      for key in want:
        np.testing.assert_array_equal(np.concatenate([g[key] for g in got]), want[key])
      assert parts[0].get_state() == parts[1].get_state() == whole.get_state()
    if train:   # resume process 1 from the state process 0 saved
      resumed = make_loader(cfg, split, batch_size=4, seed=3, train=True, shard=(1, 2))
      resumed.set_state(parts[0].get_state())
      np.testing.assert_array_equal(next(resumed)["image"], next(whole)["image"][2:])
  with pytest.raises(ValueError, match="shard"):
    make_loader(cfg, "train", batch_size=4, seed=3, train=True, shard=(0, 3))
