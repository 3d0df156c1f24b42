"""Selective search (Uijlings et al. 2013) through OpenCV contrib, and an on-disk proposal cache.

`selective_search(image, mode, max_proposals)` runs `cv2.ximgproc.segmentation.
createSelectiveSearchSegmentation` in its "fast" (`switchToSelectiveSearchFast`) or "quality"
(`switchToSelectiveSearchQuality`) mode and returns pixel (x1, y1, x2, y2) boxes in OpenCV's
ranking order, padded to a fixed capacity with a mask.

The cache (`compute_proposals`, `load_proposals`) holds one split's proposals in shard files
`<dir>/shard_<k>.npz` of `shard_size` examples each, computed once in parallel over CPU cores
(multiprocessing), with a tqdm progress bar; a shard is written atomically (temporary file +
os.replace), so an interrupted run resumes at the first missing shard and never reads a
half-written file. `meta.json` records the settings; a cache made with other settings is an
error, not a silent mix.

cv2 (opencv-contrib) is imported lazily: the rest of jaxdet works without it.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import numpy as np

from jaxdet import checks, files

MODES = ("fast", "quality")


def _set_threads(n: int) -> None:
  import cv2
  cv2.setNumThreads(n)


def _seed_opencv(seed: int) -> None:
  """Seeds the generators OpenCV's selective search draws its random ranking from.

  The ranking (rank = level x random, Uijlings et al. section 3.4) uses the C library's
  `rand()`, so the same image gives another order on every call unless libc is seeded too.
  """
  import ctypes
  import cv2
  cv2.setRNGSeed(int(seed))
  try:
    ctypes.CDLL(None).srand(ctypes.c_uint(int(seed) & 0xFFFFFFFF))
  except (OSError, AttributeError):   # no libc symbols (e.g. Windows): order stays random
    pass


def selective_search(image: np.ndarray, *, mode: str = "fast", max_proposals: int = 2000,
                     min_size: float = 0.0, resize_to: int | None = None, seed: int = 0
                     ) -> tuple[np.ndarray, np.ndarray]:
  """Selective search proposals of one image, padded to a fixed capacity.

  Args:
    image: u8[H, W, 3] RGB pixels.
    mode: "fast" or "quality" (OpenCV's two strategy sets, as in the paper).
    max_proposals: P, the capacity; the first P proposals in OpenCV's order are kept.
    min_size: drop proposals with a side shorter than this (pixels) before truncating.
    resize_to: run on a copy whose longer side is this many pixels (a speed knob; boxes are
      mapped back to the original pixels); None = the original image.
    seed: seeds the random part of selective search's ranking, so the same image and seed
      give the same proposals in the same order.
  Returns:
    (boxes f32[P, 4] (x1, y1, x2, y2) pixels of `image`, zero where padded; mask bool[P]).
  """
  import cv2
  from cv2 import ximgproc  # noqa: F401  (opencv-contrib provides it)
  image = np.asarray(image)
  checks.check_array("image", image, ndim=3, last_dim=3, dtype_kind="u")
  if mode not in MODES:
    raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
  checks.check_positive("max_proposals", max_proposals)
  h, w = image.shape[:2]
  scale = 1.0
  work = image
  if resize_to is not None and max(h, w) != int(resize_to):
    scale = int(resize_to) / max(h, w)
    work = cv2.resize(image, (max(1, round(w * scale)), max(1, round(h * scale))),
                      interpolation=cv2.INTER_AREA)
  _seed_opencv(seed)
  ss = cv2.ximgproc.segmentation.createSelectiveSearchSegmentation()
  ss.setBaseImage(np.ascontiguousarray(work[..., ::-1]))   # OpenCV wants BGR
  if mode == "fast":
    ss.switchToSelectiveSearchFast()
  else:
    ss.switchToSelectiveSearchQuality()
  rects = np.asarray(ss.process(), np.float32).reshape(-1, 4)   # (x, y, w, h)
  boxes = np.concatenate([rects[:, :2], rects[:, :2] + rects[:, 2:]], axis=1) / scale
  boxes = np.clip(boxes, 0.0, np.float32([w, h, w, h]))
  if min_size > 0:
    keep = ((boxes[:, 2] - boxes[:, 0]) >= min_size) & ((boxes[:, 3] - boxes[:, 1]) >= min_size)
    boxes = boxes[keep]
  return pad_proposals(boxes, max_proposals)


def pad_proposals(boxes: np.ndarray, capacity: int) -> tuple[np.ndarray, np.ndarray]:
  """boxes f32[N, 4] -> (f32[capacity, 4] the first `capacity` boxes, zero padded; bool mask)."""
  boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
  n = min(len(boxes), int(capacity))
  out = np.zeros((int(capacity), 4), np.float32)
  mask = np.zeros((int(capacity),), bool)
  out[:n], mask[:n] = boxes[:n], True
  return out, mask


# ----------------------------------------------------------------------------- cache


def _meta(mode: str, max_proposals: int, min_size: float, resize_to: int | None,
          num_examples: int, shard_size: int) -> dict[str, Any]:
  return {"method": "opencv_selective_search", "mode": mode, "max_proposals": int(max_proposals),
          "min_size": float(min_size), "resize_to": resize_to,
          "num_examples": int(num_examples), "shard_size": int(shard_size)}


def _shard_path(cache_dir: str, k: int) -> str:
  return os.path.join(cache_dir, f"shard_{k:05d}.npz")


# Worker state: each worker process opens the source once (the source is pickled to it).
_WORKER: dict[str, Any] = {}


def _worker_init(source, options) -> None:
  _WORKER["source"], _WORKER["options"] = source, options
  _set_threads(1)


def _worker_shard(args: tuple[str, int, int, int]) -> int:
  cache_dir, k, start, stop = args
  return _compute_shard(_WORKER["source"], _WORKER["options"], cache_dir, k, start, stop)


def _compute_shard(source, options: Mapping[str, Any], cache_dir: str, k: int, start: int,
                   stop: int) -> int:
  boxes, masks, ids = [], [], []
  for i in range(start, stop):
    ex = source[i]
    b, m = selective_search(ex["image"], **options)
    boxes.append(b)
    masks.append(m)
    ids.append(int(ex.get("image_id", i)))
  arrays = {"boxes": np.stack(boxes), "mask": np.stack(masks), "index": np.arange(start, stop),
            "image_id": np.asarray(ids, np.int64)}
  files.save_npz(_shard_path(cache_dir, k), arrays)
  return stop - start


def compute_proposals(source, cache_dir: str, *, mode: str = "fast",
                      max_proposals: int = 2000, min_size: float = 0.0,
                      resize_to: int | None = None, shard_size: int = 64,
                      num_workers: int | None = None, progress: bool = True) -> str:
  """Computes (or finishes) the proposal cache of a random-access source.

  Args:
    source: len() and [i] -> {"image": u8[H, W, 3], "image_id": ...} (e.g. make_source's);
      must be picklable when num_workers > 1.
    cache_dir: the split's cache folder (created).
    mode, max_proposals, min_size, resize_to: see `selective_search`.
    shard_size: examples per shard file (the unit of resumption).
    num_workers: processes (None: os.cpu_count(); 1: in this process).
    progress: show a tqdm progress bar (examples done).
  Returns:
    cache_dir.
  Raises:
    ValueError: the folder holds a cache made with other settings.
  """
  if mode not in MODES:
    raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
  checks.check_positive("shard_size", shard_size)
  n = len(source)
  os.makedirs(cache_dir, exist_ok=True)
  meta = _meta(mode, max_proposals, min_size, resize_to, n, shard_size)
  meta_path = os.path.join(cache_dir, "meta.json")
  if os.path.exists(meta_path):
    with open(meta_path) as f:
      old = json.load(f)
    if old != meta:
      raise ValueError(f"cache_dir: {cache_dir} holds proposals made with {old}, not {meta}; "
                       f"use another folder or delete it")
  else:
    files.write_json(meta_path, meta, indent=2)
  shards = [(cache_dir, k, s, min(s + shard_size, n))
            for k, s in enumerate(range(0, n, shard_size))]
  todo = [t for t in shards if not os.path.exists(_shard_path(cache_dir, t[1]))]
  done = n - sum(t[3] - t[2] for t in todo)
  options = {"mode": mode, "max_proposals": max_proposals, "min_size": min_size,
             "resize_to": resize_to}
  workers = (os.cpu_count() or 1) if num_workers is None else int(num_workers)
  from tqdm.auto import tqdm
  bar = tqdm(total=n, initial=done, desc=f"selective search ({mode})", unit="img",
             disable=not progress)
  try:
    if workers <= 1 or len(todo) <= 1:
      for t in todo:
        bar.update(_compute_shard(source, options, *t))
    else:
      import multiprocessing as mp
      ctx = mp.get_context("spawn")   # no fork of a process that may hold JAX/XLA threads
      with ctx.Pool(min(workers, len(todo)), _worker_init, (source, options)) as pool:
        for count in pool.imap_unordered(_worker_shard, todo):
          bar.update(count)
  finally:
    bar.close()
  return cache_dir


def load_proposals(cache_dir: str) -> tuple[np.ndarray, np.ndarray]:
  """The whole cache of a split: (boxes f32[N, P, 4], mask bool[N, P]), row i = example i.

  Raises:
    FileNotFoundError: the cache is missing or incomplete (names the missing shard).
  """
  meta_path = os.path.join(cache_dir, "meta.json")
  if not os.path.exists(meta_path):
    raise FileNotFoundError(f"cache_dir: no proposal cache in {cache_dir}; compute it with "
                            f"jaxdet.proposals.selective_search.compute_proposals")
  with open(meta_path) as f:
    meta = json.load(f)
  n, size, p = meta["num_examples"], meta["shard_size"], meta["max_proposals"]
  boxes = np.zeros((n, p, 4), np.float32)
  mask = np.zeros((n, p), bool)
  for k, start in enumerate(range(0, n, size)):
    path = _shard_path(cache_dir, k)
    if not os.path.exists(path):
      raise FileNotFoundError(f"cache_dir: shard {path} is missing (an interrupted run); run "
                              f"compute_proposals again to finish the cache")
    with np.load(path) as z:
      boxes[z["index"]], mask[z["index"]] = z["boxes"], z["mask"]
  return boxes, mask


def split_cache_dir(root: str, dataset: str, split: str, mode: str, num_examples: int | None
                    ) -> str:
  """The conventional cache folder of a dataset split: root/dataset/split_mode_n."""
  n = "all" if num_examples is None else str(int(num_examples))
  return os.path.join(root, str(dataset), f"{split}_{mode}_{n}")


def proposals_for(source, root: str, dataset: str, split: str, *, mode: str = "fast",
                  max_proposals: int = 2000, num_workers: int | None = None,
                  progress: bool = True, **kw: Any) -> tuple[np.ndarray, np.ndarray]:
  """Computes the split's cache if needed (resuming) and loads it: (f32[N, P, 4], bool[N, P])."""
  path = split_cache_dir(root, dataset, split, mode, len(source))
  compute_proposals(source, path, mode=mode, max_proposals=max_proposals,
                    num_workers=num_workers, progress=progress, **kw)
  return load_proposals(path)
