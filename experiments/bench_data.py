"""Input pipeline throughput (images/s) for VOC-like images resized to 600 x <=1000 (and 448^2).

  python -m experiments.bench_data [--batches 15] [--batch_size 4] [--workers 2]

Two sources of VOC-like 375x500 images:
  synthetic: SyntheticDetection rendered at 375x500 (NumPy rendering per image);
  jpeg:      a mock of what `tfds.data_source` does per record: JPEG bytes decoded with OpenCV
             (PIL when OpenCV is missing), boxes converted from normalised (ymin, xmin, ymax,
             xmax) by jaxdet.data.tfds.decode_voc.
Each goes through the full Loader (validation, Fast R-CNN resize to shorter side 600 / longer
at most 1000 padded to the bucket (600, 1000), or YOLO's 448x448; batching; prefetch thread)
with augmentation off, with hflip, and with YOLO's augmentation added (scale/translate 20%,
HSV 1.5).
Host-only: no accelerator involved. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import io
import os
import time

import numpy as np

from jaxdet.data import pipeline, synthetic, tfds as tfds_lib, transforms


class JpegVocSource:
  """tfds-like records (JPEG bytes + normalised yxyx boxes) decoded on every access."""

  def __init__(self, num_examples: int, image_size=(375, 500), seed: int = 0):
    self.class_names = tfds_lib.VOC_CLASS_NAMES
    self.num_classes = len(self.class_names)
    src = synthetic.SyntheticDetection(num_examples, image_size=image_size, max_objects=4,
                                       seed=seed)
    self._records = []
    h, w = image_size
    for i in range(num_examples):
      ex = src[i]
      b = ex["boxes"] / np.float32([w, h, w, h])
      self._records.append({
          "image": _encode_jpeg(ex["image"]), "image/filename": f"{i:06d}.jpg",
          "objects": {"bbox": b[:, [1, 0, 3, 2]], "label": ex["labels"].astype(np.int64),
                      "is_difficult": np.zeros(len(b), bool)}})

  def __len__(self):
    return len(self._records)

  def __getitem__(self, i):
    rec = dict(self._records[i])
    rec["image"] = _decode_jpeg(rec["image"])
    return tfds_lib.decode_voc(rec, i)


def _encode_jpeg(image):
  from PIL import Image
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format="JPEG", quality=90)
  return buf.getvalue()


def _decode_jpeg(data):
  try:
    import cv2   # what tfds uses for decoding without TensorFlow
    return cv2.cvtColor(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR),
                        cv2.COLOR_BGR2RGB)
  except ImportError:
    from PIL import Image
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def _config(resize: str, augment: str, workers: int) -> dict:
  cfg = pipeline.default_data_config()
  cfg.update(max_boxes=8, num_workers=workers, prefetch=2)
  cfg["resize"] = {"mode": resize, "min_sizes": (600,), "max_size": 1000, "square_size": 448}
  cfg["buckets"] = transforms.default_buckets(cfg)
  cfg["augment"] = {"none": {"hflip": False, "scale_translate": 0.0, "hsv": 1.0},
                    "hflip": {"hflip": True, "scale_translate": 0.0, "hsv": 1.0},
                    "yolo": {"hflip": True, "scale_translate": 0.2, "hsv": 1.5}}[augment]
  return cfg


def _rate(source, cfg, batch_size, batches) -> tuple[float, float]:
  """(images/s of the threaded Loader, CPU ms per image of a single-threaded Loader)."""
  def loader(prefetch, workers):
    return pipeline.Loader(
        pipeline.ValidatedSource(source), batch_size=batch_size, max_boxes=cfg["max_boxes"],
        transform=transforms.make_transform(cfg, train=True), buckets=cfg["buckets"], seed=0,
        train=True, prefetch=prefetch, num_workers=workers)
  threaded = loader(cfg["prefetch"], cfg["num_workers"])
  next(threaded)                                 # start the thread, fill caches
  start = time.perf_counter()
  for _ in range(batches):
    batch = next(threaded)
  rate = batches * batch_size / (time.perf_counter() - start)
  assert batch["image"].shape[1:3] in ((600, 1000), (448, 448))
  threaded.close()
  single = loader(0, 1)
  next(single)
  start = time.process_time()
  for _ in range(max(2, batches // 3)):
    next(single)
  cpu_ms = 1000 * (time.process_time() - start) / (max(2, batches // 3) * batch_size)
  return rate, cpu_ms


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--batches", type=int, default=15)
  p.add_argument("--batch_size", type=int, default=4)
  p.add_argument("--workers", type=int, default=2)
  args = p.parse_args()
  n = max(64, (args.batches + 1) * args.batch_size)
  sources = {"synthetic": synthetic.SyntheticDetection(n, image_size=(375, 500),
                                                       max_objects=4, seed=0),
             "jpeg": JpegVocSource(n)}
  print(f"# host cores: {os.cpu_count()}, load average before: "
        f"{', '.join(f'{x:.1f}' for x in os.getloadavg())}; batch {args.batch_size}, "
        f"{args.batches} batches, {args.workers} workers, prefetch 2; 375x500 -> 600x800 "
        f"in bucket 600x1000")
  print("Each cell: images/s of the Loader (2 workers + prefetch thread) / CPU ms per image "
        "(single thread; load-independent)")
  print("| source (375x500) | resize -> batch shape | read only (img/s) | no aug | "
        "hflip | hflip + scale/translate + HSV |")
  print("|---|---|---|---|---|---|")
  rows = [("synthetic", "shorter_side", "600/1000 -> 600x1000"),
          ("jpeg", "shorter_side", "600/1000 -> 600x1000"),
          ("jpeg", "square", "448 -> 448x448")]
  for name, resize, label in rows:
    src = sources[name]
    start = time.perf_counter()
    for i in range(32):
      src[i]
    read = 32 / (time.perf_counter() - start)
    rates = [_rate(src, _config(resize, a, args.workers), args.batch_size, args.batches)
             for a in ("none", "hflip", "yolo")]
    print(f"| {name} | {label} | {read:.0f} | "
          + " | ".join(f"{r:.0f} / {ms:.1f} ms" for r, ms in rates) + " |", flush=True)


if __name__ == "__main__":
  main()
