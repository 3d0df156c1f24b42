"""Detection on new images: `Detector.from_workdir(DIR)(images)` -> detections in the images'
own pixels.

    import jaxdet
    det = jaxdet.Detector.from_workdir("/tmp/yolo")     # the config from DIR/config.json
    result = det("photo.jpg")          # one image (a path, a PIL image or u8[H, W, 3|4] / [H, W])
    results = det(["a.jpg", "shots/", "more/*.png"])   # files, folders (recursive) and globs
    result["boxes"]        # f32[K, 4] (x1, y1, x2, y2) pixels of the ORIGINAL image
    result["class_names"]  # [K] names; also "scores" f32[K], "labels" i32[K]

Images go through exactly what evaluation does with a dataset's images: the data config's
test-time resize (`jaxdet.data.transforms.make_transform(..., train=False)`; in resize mode
"none" first a resize to `data.image_size`, the size the model was trained at), batching into
the smallest shape bucket (`jaxdet.data.pipeline.Loader`: one compile per bucket), and for the
selective-search systems (R-CNN, Fast R-CNN) proposals from `jaxdet.proposals` through the
pipeline's on-disk cache (`pipeline.attach_proposals`, keyed by the image files). Detections
come back to the original pixels by `to_original_pixels`, which evaluation uses too.

Loading images: EXIF orientation applied (PIL.ImageOps.exif_transpose), any mode (grey,
palette, RGBA, 16-bit) converted to RGB.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from jaxdet import files

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm",
                    ".pgm", ".pbm")
CONFIG_FILE = "config.json"


# ----------------------------------------------------------------------------- config


def save_config(config: Any, workdir: str) -> str:
  """Writes the run's config as workdir/config.json (what `Detector.from_workdir` reads)."""
  text = config.to_json_best_effort() if hasattr(config, "to_json_best_effort") \
      else json.dumps(config, default=str)
  path = os.path.join(workdir, CONFIG_FILE)
  os.makedirs(workdir, exist_ok=True)
  files.write_json(path, json.loads(text), indent=2)
  return path


def load_config(workdir: str) -> Any:
  """The config a training run saved in workdir/config.json, as a locked ConfigDict."""
  import ml_collections
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"workdir: no {CONFIG_FILE} in {workdir} (runs trained before it "
                            f"was saved): pass the config explicitly, e.g. "
                            f"Detector.from_workdir(DIR, config=get_config()) or --config")
  with open(path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  config.lock()
  return config


def class_names(config: Any) -> list[str]:
  """The C class names of a config's dataset: `config.class_names` when set, the tfds
  dataset's, the synthetic shapes', else "0", "1", ..."""
  from jaxdet.data import synthetic
  from jaxdet.data import tfds as tfds_lib
  c = int(config.num_classes)
  names = config.get("class_names") if hasattr(config, "get") else None
  name = str(config.data.name)
  if not names and name in tfds_lib.DATASETS:
    names = tfds_lib.DATASETS[name][2]
  elif not names and name.startswith("synthetic"):
    names = synthetic.CLASS_NAMES
  names = list(names) if names else [str(i) for i in range(c)]
  if len(names) != c:
    names = [str(i) for i in range(c)]
  return names


# ----------------------------------------------------------------------------- images


def find_images(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
  """Image files named by `paths`: files as given, folders searched recursively for the
  IMAGE_EXTENSIONS (case-insensitive, sorted), glob patterns expanded (sorted, `**` recursive);
  a file named twice is listed once.

  Raises:
    FileNotFoundError: a path that is neither a file, a folder nor a matching pattern.
  """
  if isinstance(paths, (str, os.PathLike)):
    paths = [paths]
  out: list[str] = []
  for p in map(str, paths):
    if os.path.isfile(p):
      out.append(p)
    elif os.path.isdir(p):
      found = [os.path.join(d, f) for d, _, names in os.walk(p) for f in names
               if f.lower().endswith(IMAGE_EXTENSIONS)]
      out += sorted(found)
    elif glob.has_magic(p):
      matched = sorted(m for m in glob.glob(p, recursive=True) if os.path.isfile(m))
      if not matched:
        raise FileNotFoundError(f"images: the pattern {p!r} matches no file")
      out += matched
    else:
      raise FileNotFoundError(f"images: {p!r} is no file, folder or glob pattern")
  return list(dict.fromkeys(out))   # each file once, first occurrence first


def load_image(image: Any) -> np.ndarray:
  """u8[H, W, 3] RGB pixels of a path, a PIL image or an array (u8[H, W], [H, W, 1|3|4]).

  Files: EXIF orientation applied, any PIL mode converted to RGB (alpha dropped).
  """
  from PIL import Image, ImageOps
  if isinstance(image, (str, os.PathLike)):
    with Image.open(image) as im:
      im = ImageOps.exif_transpose(im)
      return _pil_rgb(im)
  if isinstance(image, Image.Image):
    return _pil_rgb(image)
  arr = np.asarray(image)
  if arr.dtype != np.uint8:
    raise TypeError(f"image: expected uint8 pixels, got dtype {arr.dtype} and shape {arr.shape}")
  if arr.ndim == 2:
    arr = arr[..., None]
  if arr.ndim != 3 or arr.shape[-1] not in (1, 3, 4) or 0 in arr.shape[:2]:
    raise ValueError(f"image: expected shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) with "
                     f"H, W > 0, got {arr.shape}")
  if arr.shape[-1] == 1:
    arr = np.repeat(arr, 3, axis=-1)
  return np.ascontiguousarray(arr[..., :3])


def _pil_rgb(im) -> np.ndarray:
  if im.mode in ("I;16", "I;16B", "I;16L", "I"):   # 16/32-bit grey: scale to 8 bits
    a = np.asarray(im, np.float64)
    top = 65535.0 if im.mode.startswith("I;16") else max(float(a.max()), 1.0)
    grey = np.clip(np.rint(a * 255.0 / top), 0, 255).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=-1)
  return np.asarray(im.convert("RGB"))


class ImageSource:
  """Random access over images to detect in (paths or arrays); `[i]` -> an example dict
  {"image": u8[H, W, 3], "boxes": f32[0, 4], "labels": i32[0], "image_id": i} (no ground
  truth). Loads lazily, so a source of paths is light to pickle (proposal workers)."""

  def __init__(self, images: Sequence[Any], class_names: Sequence[str]):
    self.images = list(images)
    self.class_names = tuple(class_names)
    self.num_classes = len(self.class_names)

  def __len__(self) -> int:
    return len(self.images)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return {"image": load_image(self.images[int(index)]), "boxes": np.zeros((0, 4), np.float32),
            "labels": np.zeros((0,), np.int32), "image_id": int(index)}

  def fingerprint(self) -> str:
    """A short hash of the images (paths with size and mtime, or pixels): the proposal cache
    key."""
    h = hashlib.sha1()
    for x in self.images:
      if isinstance(x, (str, os.PathLike)):
        st = os.stat(x)
        h.update(f"{os.path.abspath(x)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
      else:
        a = load_image(x)
        h.update(str(a.shape).encode() + a.tobytes())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------- batches


def inference_transform(data_config: Mapping[str, Any]):
  """The per-example transform for images of any size at test time: the evaluation transform
  (`make_transform(data_config, False)`), after, in resize mode "none" (keep pixels):
  without explicit `buckets`, a resize to `image_size` (data of one size: the size the model
  was trained at); with `buckets`, images that fit one keep their pixels and larger ones are
  scaled down, aspect kept, to fit the largest (e.g. R-CNN's paper preset, 500 x 500)."""
  from jaxdet.data import transforms
  evaluate = transforms.make_transform(data_config, False)
  size = tuple(int(x) for x in data_config["image_size"])
  none = data_config["resize"]["mode"] == "none"
  buckets = [tuple(int(x) for x in b) for b in data_config.get("buckets") or ()]
  largest = max(buckets, key=lambda b: (b[0] * b[1], b)) if buckets else None

  def fit(h: int, w: int) -> tuple[int, int]:
    if largest is None:
      return size
    if any(h <= bh and w <= bw for bh, bw in buckets):
      return h, w
    s = min(largest[0] / h, largest[1] / w)
    return max(1, min(largest[0], int(h * s))), max(1, min(largest[1], int(w * s)))

  def transform(example, rng):
    if none:
      target = fit(*example["image"].shape[:2])
      if tuple(example["image"].shape[:2]) != target:
        example = transforms.resize(example, target)
    return evaluate(example, rng)
  return transform


def uses_proposals(config: Any) -> bool:
  """Whether the config's system takes precomputed proposals (data.proposals.max_proposals)."""
  props = config.data.get("proposals") if hasattr(config.data, "get") else None
  return bool(props) and int(props.get("max_proposals", 0) or 0) > 0


def make_batches(config: Any, source: Any, *, batch_size: int | None = None):
  """The evaluation Loader (in order, one pass, padded last batch) over `source`, with
  selective search proposals attached for the proposal-based systems."""
  from jaxdet.data import pipeline, transforms
  from jaxdet.train import setup
  data = setup.to_dict(config.data)
  if uses_proposals(config):
    fingerprint = source.fingerprint() if hasattr(source, "fingerprint") else "images"
    data["name"] = f"images_{fingerprint}"
    data["proposals"] = dict(data["proposals"])
    source = pipeline.attach_proposals(source, data, "detect")
    data["name"] = str(config.data.name)
  buckets = data.get("buckets") or transforms.default_buckets(data)
  return pipeline.Loader(source, batch_size=int(batch_size or config.eval.batch_size),
                         max_boxes=1, transform=inference_transform(data), buckets=buckets,
                         seed=0, train=False, prefetch=int(data.get("prefetch", 2)),
                         num_workers=int(data.get("num_workers", 1)))


def to_original_pixels(items: Sequence[Mapping[str, Any]], batch: Mapping[str, Any]
                       ) -> list[dict[str, Any]]:
  """Per-image dicts with "boxes" f32[N, 4] in a batch's (resized) pixels -> the same dicts
  with the boxes in the original images' pixels, clipped to them.

  The factors are per axis: orig_size / image_size (the batch's i32[B, 2] (height, width) of
  the original and of the resized real pixels), so the exact inverse of the resize. A batch
  without "image_size" carries no resize: the items come back unchanged.
  """
  if "image_size" not in batch:
    return [dict(item) for item in items]
  size = np.asarray(batch["image_size"], np.float64)            # [B, 2] resized (h, w)
  orig = np.asarray(batch.get("orig_size", batch["image_size"]), np.float64)  # [B, 2]
  out = []
  for i, item in enumerate(items):
    fy, fx = orig[i] / np.maximum(size[i], 1.0)
    h0, w0 = orig[i]
    boxes = np.asarray(item["boxes"], np.float64).reshape(-1, 4) * [fx, fy, fx, fy]
    boxes = np.clip(boxes, 0.0, [w0, h0, w0, h0])
    new = dict(item)
    new["boxes"] = boxes.astype(np.float32)
    out.append(new)
  return out


def inference_variables(config: Any, workdir: str, system: Any, batch: Mapping[str, Any],
                        replica: int | None = None) -> tuple[Any, Any]:
  """(variables, predict) of the detector a training run left in `workdir` (see
  `detector_run`): its latest checkpoint, or R-CNN's fine-tuned network with its SVMs and box
  regressors (predict with box regression). replica: of a train.num_seeds > 1 run, which
  replica (None = 0, with a warning; jaxdet.train.loop.restore_for_inference)."""
  from jaxdet.train import loop
  if config.system == "rcnn":
    from experiments import rcnn_stages
    return (rcnn_stages.inference_variables(config, workdir, system, batch),
            system.extras.predict_with_bbox_reg)
  return (loop.restore_for_inference(config, workdir, system, batch, replica=replica).variables,
          system.predict)


def detector_run(config: Any, workdir: str) -> tuple[Any, str]:
  """(config, workdir) of the detector a training run leaves: for Faster R-CNN's 4-step
  schedule its last step's, else the two unchanged (as experiments.evaluate)."""
  if config.system == "faster_rcnn":
    from jaxdet.train import alternating
    return alternating.detector_run(config, workdir)
  return config, workdir


def example_batch(config: Any) -> dict[str, np.ndarray]:
  """A batch of one blank image of the first shape bucket (with one proposal for the
  proposal-based systems): what initialising the variables' structure needs."""
  from jaxdet.data import batching, transforms
  from jaxdet.train import setup
  data = setup.to_dict(config.data)
  h, w = (data.get("buckets") or transforms.default_buckets(data))[0]
  example = {"image": np.zeros((int(h), int(w), 3), np.uint8),
             "boxes": np.zeros((0, 4), np.float32), "labels": np.zeros((0,), np.int32)}
  if uses_proposals(config):
    p = int(data["proposals"]["max_proposals"])
    example["proposals"] = np.zeros((p, 4), np.float32)
    example["proposals"][0] = [0, 0, w, h]
    example["proposal_mask"] = np.arange(p) == 0
  batch = batching.collate([example], 1, image_shape=(h, w))
  batch.pop("example_mask")
  return batch


class Detector:
  """A trained detector for new images (see the module docstring).

  Args:
    config: the run's experiment config.
    variables: the model's variables ({"params", ...}).
    predict: (variables, batch) -> Detections dict (default: the system's predict).
    system: the jaxdet.system.System (default: built from the config).
    names: the C class names (default: `class_names(config)`).
  """

  def __init__(self, config: Any, variables: Any, *, predict: Any = None, system: Any = None,
               names: Sequence[str] | None = None):
    import jax
    from jaxdet.train import setup
    self.config = config
    self.system = setup.system_from_config(config) if system is None else system
    self.variables = variables
    self.predict = self.system.predict if predict is None else predict
    self.class_names = list(names) if names is not None else class_names(config)
    self._jitted = jax.jit(self.predict)

  @classmethod
  def from_workdir(cls, workdir: str, config: Any = None, *, replica: int | None = None
                   ) -> "Detector":
    """The detector of a training run: its config (DIR/config.json unless given) and latest
    checkpoint (R-CNN: its stages; Faster R-CNN 4-step: the last step's). A run of
    train.num_seeds > 1 holds several replicas: `replica` picks one (seed config.seed +
    replica); None = replica 0, with a warning saying so."""
    from jaxdet.train import setup
    config = load_config(workdir) if config is None else config
    config, workdir = detector_run(config, workdir)
    system = setup.system_from_config(config)
    variables, predict = inference_variables(config, workdir, system, example_batch(config),
                                             replica)
    return cls(config, variables, predict=predict, system=system)

  def run(self, images: Sequence[Any], *, batch_size: int | None = None,
          progress: bool = False, min_score: float = 0.0) -> Iterator[dict[str, Any]]:
    """Detections of each image, in order (a generator; see `__call__` for the dicts)."""
    import jax
    from tqdm.auto import tqdm
    from jaxdet.eval.detections import unbatch_detections
    source = ImageSource(images, self.class_names)
    loader = make_batches(self.config, source, batch_size=batch_size)
    bar = tqdm(total=len(source), desc="detect", unit="img", disable=not progress)
    try:
      for batch in loader:   # one compile per shape bucket (jax.jit's cache)
        real = np.asarray(batch.pop("example_mask"))
        out = jax.device_get(self._jitted(self.variables, batch))
        dets = to_original_pixels(unbatch_detections(out), batch)
        for i in np.flatnonzero(real):
          index = int(batch["image_id"][i])
          yield self._result(images[index], dets[i], batch["orig_size"][i], min_score)
        bar.update(int(real.sum()))
    finally:
      bar.close()
      loader.close()

  def _result(self, image: Any, det: Mapping[str, Any], orig_size: Any, min_score: float
              ) -> dict[str, Any]:
    keep = np.asarray(det["scores"]) >= min_score
    labels = np.asarray(det["labels"])[keep]
    return {"path": str(image) if isinstance(image, (str, os.PathLike)) else None,
            "height": int(orig_size[0]), "width": int(orig_size[1]),
            "boxes": np.asarray(det["boxes"])[keep], "scores": np.asarray(det["scores"])[keep],
            "labels": labels, "class_names": [self.class_names[int(c)] for c in labels]}

  def __call__(self, images: Any, *, batch_size: int | None = None, progress: bool = False,
               min_score: float = 0.0) -> dict[str, Any] | list[dict[str, Any]]:
    """Detects objects in one image or many.

    Args:
      images: one image (a file path, a PIL image, an array u8[H, W], [H, W, 1|3|4]), or a
        list of images, folders (searched recursively) and glob patterns; a folder or pattern
        alone also gives a list.
      min_score: keep detections scoring at least this.
    Returns:
      per image {"path": str | None, "height": H, "width": W (the original image's),
      "boxes": f32[K, 4] (x1, y1, x2, y2) original pixels, "scores": f32[K], "labels": i32[K],
      "class_names": [K] str}; one dict for one image, else a list in input order.
    """
    single = not isinstance(images, (list, tuple)) and not (
        isinstance(images, (str, os.PathLike)) and not os.path.isfile(images))
    items = [images] if single else _expand(images)
    results = list(self.run(items, batch_size=batch_size, progress=progress,
                            min_score=min_score))
    return results[0] if single else results


def _expand(images: Any) -> list[Any]:
  """Images of a list (paths expanded by find_images; arrays and PIL images kept)."""
  if isinstance(images, (str, os.PathLike)):
    images = [images]
  out: list[Any] = []
  for x in images:
    out += find_images(x) if isinstance(x, (str, os.PathLike)) else [x]
  return out


# ----------------------------------------------------------------------------- outputs


def result_json(result: Mapping[str, Any]) -> dict[str, Any]:
  """One image's result as a JSON-ready dict (a line of the JSON Lines output):
  {"path", "height", "width", "detections": [{"box": [x1, y1, x2, y2] original pixels,
  "score", "label", "class"}]}."""
  dets = [{"box": [round(float(v), 2) for v in box], "score": round(float(s), 5),
           "label": int(c), "class": name}
          for box, s, c, name in zip(result["boxes"], result["scores"], result["labels"],
                                     result["class_names"])]
  out = {"path": result["path"], "height": int(result["height"]),
         "width": int(result["width"]), "detections": dets}
  if result.get("image_id") is not None:   # evaluation: the dataset's id instead of a path
    out = {"image_id": int(result["image_id"]), **{k: v for k, v in out.items() if k != "path"}}
  return out


def write_jsonl(path: str, results: Sequence[Mapping[str, Any]]) -> str:
  """Writes one `result_json` line per image (atomically); returns the path."""
  text = "".join(json.dumps(result_json(r)) + "\n" for r in results)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  files.atomic_write(path, lambda f: f.write(text.encode()))
  return path


def coco_ids(config: Any, names: Sequence[str], paths: Sequence[str | None], *,
             annotations: str | None = None) -> tuple[list[int], list[int]]:
  """(image_ids, category_ids) for results in COCO's format.

  With `annotations` (a COCO-style json with "images" [{"id", "file_name"}] and "categories"
  [{"id", "name"}]): images by file name (the path relative to any folder, or the base name),
  categories by class name. Otherwise: category ids are COCO's official ids for tfds's
  coco/2017 (tfds.COCO_CATEGORY_IDS), label + 1 for other data; image ids are 1, 2, ...

  Raises:
    ValueError: a class name or an image missing from the annotation file.
  """
  from jaxdet.data import tfds as tfds_lib
  if annotations:
    with open(annotations) as f:
      ann = json.load(f)
    by_name = {c["name"]: int(c["id"]) for c in ann.get("categories", [])}
    missing = [n for n in names if n not in by_name]
    if missing:
      raise ValueError(f"annotations: {annotations} has no category named {missing[:5]} "
                       f"(its categories: {sorted(by_name)[:10]}...)")
    cats = [by_name[n] for n in names]
    by_file = {im["file_name"].replace("\\", "/"): int(im["id"]) for im in ann["images"]}
    image_ids = []
    for p in paths:
      p = (p or "").replace("\\", "/")
      hits = [i for f, i in by_file.items() if p == f or p.endswith("/" + f)]
      if not hits:
        raise ValueError(f"annotations: no image with file_name matching {p!r} in "
                         f"{annotations}")
      image_ids.append(hits[0])
    return image_ids, cats
  if str(config.data.name) == "coco2017":
    cats = list(tfds_lib.COCO_CATEGORY_IDS)
  else:
    cats = [c + 1 for c in range(len(names))]
  return list(range(1, len(paths) + 1)), cats


def detections_to_coco(results: Sequence[Mapping[str, Any]], image_ids: Sequence[int],
                       category_ids: Sequence[int]) -> list[dict[str, Any]]:
  """A COCO results list [{image_id, category_id, bbox [x, y, w, h] original pixels, score}]."""
  from jaxdet.eval.coco import dets_to_coco_json
  return dets_to_coco_json(results, image_ids=image_ids, category_ids=category_ids)

