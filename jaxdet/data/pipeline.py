"""Sources, validation and the resumable, prefetching batch Loader.

Data config (a Mapping: ml_collections ConfigDict in experiments, or a plain dict; start from
`default_data_config()`). Every key the data package reads:

  name:         "synthetic" | "synthetic_single" | "voc2007" | "voc2012" | "coco2017" |
                "imagenet2012" (classification: one object per image, see tfds.decode_imagenet) |
                "examples" (user examples passed to make_source / make_loader).
  data_dir:     tfds data folder for VOC/COCO ("": $TFDS_DATA_DIR or ~/tensorflow_datasets).
  num_train:    examples in the train split (synthetic: its size; tfds: the first n, 0 = all).
  num_test:     examples in the test split (same meaning).
  image_size:   (H, W) of synthetic images; also the bucket of resize mode "none".
  min_objects:  synthetic: fewest objects per image.
  max_objects:  synthetic: most objects per image.
  max_boxes:    M, boxes per image after padding (COCO needs ~100, VOC ~42).
  box_policy:   "error" (an image with more than M boxes is an error naming it) or
                "keep_largest" (keep the M largest boxes).
  resize:       mode: "none" (keep pixels) | "shorter_side" (Fast/Faster R-CNN: shorter side
                  S, longer at most max_size) | "square" (YOLO: square_size x square_size);
                min_sizes: the S values; training draws one per image (multi-scale);
                test_min_size: S at evaluation (0: min_sizes[0]);
                max_size: the longer-side cap; square_size: the square side.
  buckets:      list of (H, W) batch shapes (empty: derived from resize, see
                transforms.default_buckets); each batch is zero padded to the smallest
                bucket that fits all its images, so a jitted step compiles once per bucket.
  group_by_aspect: batches all-landscape or all-portrait (batching.aspect_grouped_order;
                training: within each shuffled epoch; evaluation: the examples in index
                order, grouped), so that a shorter-side batch fits (S, M) or (M, S), not the
                square (M, M) bucket; reads every example's image size once, at the first
                batch.
  augment:      hflip: bool (p = 0.5); scale_translate: max fraction (YOLO: 0.2; 0 = off);
                hsv: max exposure/saturation factor (YOLO: 1.5; 1 = off). Training only.
  prefetch:     batches prepared ahead by the background thread (0 = no thread).
  num_workers:  threads that decode and augment the examples of a batch in parallel.
  proposals:    (optional) precomputed region proposals attached to every example (R-CNN,
                Fast R-CNN): max_proposals (P; 0 = none), mode ("fast" | "quality"),
                cache_root, num_workers; see attach_proposals. Batches then carry
                "proposals" f32[B, P, 4] and "proposal_mask" bool[B, P].
  seed:         seed of the synthetic images (the Loader's order and augmentation seed is the
                `seed` argument of make_loader).

Randomness: the train order of epoch e is a permutation drawn from (seed, e); the augmentation
of an example from (seed, e, index). A Loader's state is (epoch, position), so a restored
Loader produces exactly the batches an uninterrupted one would have.
"""

from __future__ import annotations

import concurrent.futures
import queue
import threading
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from jaxdet import checks
from jaxdet.data import batching, synthetic, transforms

SOURCE_NAMES = ("synthetic", "synthetic_single", "voc2007", "voc2012", "coco2017", "imagenet2012",
                "examples")


def default_data_config(name: str = "synthetic") -> dict[str, Any]:
  """A plain nested dict with every data config key (no None values, so that command-line
  overrides of ml_collections configs keep working).

  "synthetic" (the default): 128x128 images, 0-4 objects, max_boxes 8, hflip.
  "synthetic_single": the same with exactly one larger object per image.
  "voc2007" / "voc2012" / "coco2017": all examples (num_train = num_test = 0), Fast R-CNN's
  resize (shorter side 600, longer at most 1000), hflip, max_boxes 64 (VOC, at most 42 objects
  per image) or 100 (COCO, with box_policy "keep_largest").
  "examples": like "synthetic", for user examples of `image_size`.
  """
  if name not in SOURCE_NAMES:
    raise ValueError(f"name: expected one of {SOURCE_NAMES}, got {name!r}")
  cfg = {
      "name": name,
      "data_dir": "",
      "num_train": 2048,
      "num_test": 256,
      "image_size": (128, 128),
      "min_objects": 0,
      "max_objects": 4,
      "max_boxes": 8,
      "box_policy": "error",
      "resize": {"mode": "none", "min_sizes": (600,), "test_min_size": 0,
                 "max_size": 1000, "square_size": 448},
      "buckets": (),
      "group_by_aspect": False,
      "augment": {"hflip": True, "scale_translate": 0.0, "hsv": 1.0},
      "prefetch": 2,
      "num_workers": 2,
      "seed": 0,
  }
  if name in ("voc2007", "voc2012", "coco2017"):
    cfg.update(num_train=0, num_test=0, max_boxes=100 if name == "coco2017" else 64,
               box_policy="keep_largest" if name == "coco2017" else "error")
    cfg["resize"]["mode"] = "shorter_side"
  return cfg


# ----------------------------------------------------------------------------- sources


class ListSource:
  """Random access over a list of example dicts (user data)."""

  def __init__(self, examples: Sequence[Mapping[str, Any]], class_names: Sequence[str]):
    self._examples = list(examples)
    self.class_names = tuple(class_names)
    self.num_classes = len(self.class_names)

  def __len__(self) -> int:
    return len(self._examples)

  def __getitem__(self, index: int) -> dict[str, Any]:
    ex = dict(self._examples[index])
    ex.setdefault("image_id", int(index))
    return ex


class ValidatedSource:
  """Wraps a source; every example read is checked where it enters (see validate_example)."""

  def __init__(self, source):
    self._source = source
    self.class_names = tuple(source.class_names)
    self.num_classes = len(self.class_names)

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return validate_example(self._source[index], self.num_classes, index=index)


class ProposalSource:
  """Wraps a source; attaches each example's precomputed region proposals.

  `[i]` adds "proposals" f32[P, 4] (x1, y1, x2, y2) pixels of the example's original image,
  clipped to it, zeros where padded, and "proposal_mask" bool[P]; the transforms then move
  them with the image exactly like "boxes", and batching stacks them (see jaxdet.data.batching).
  Used by R-CNN and Fast R-CNN (selective search, jaxdet.proposals).

  Args:
    source: a random-access source (e.g. ValidatedSource).
    proposals: f32[N, P, 4], row i for example i of `source`.
    mask: bool[N, P] True = real proposal.
  """

  def __init__(self, source, proposals: np.ndarray, mask: np.ndarray):
    proposals, mask = np.asarray(proposals, np.float32), np.asarray(mask, bool)
    checks.check_array("proposals", proposals, ndim=3, last_dim=4)
    checks.check_mask("mask", mask, "proposals", proposals.shape[:2])
    if len(proposals) != len(source):
      raise ValueError(f"proposals: expected one row per example of the source "
                       f"({len(source)}), got shape {proposals.shape}")
    self._source, self._proposals, self._mask = source, proposals, mask
    self.class_names = tuple(source.class_names)
    self.num_classes = len(self.class_names)

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    ex = dict(self._source[index])
    h, w = np.asarray(ex["image"]).shape[:2]
    props, mask = self._proposals[index], self._mask[index]
    if not np.all(np.isfinite(props[mask])):
      raise ValueError(f"proposals (example {ex.get('image_id', index)}): not finite")
    props = np.clip(props, 0.0, np.float32([w, h, w, h]))
    ex["proposals"] = np.where(mask[:, None], props, 0.0).astype(np.float32)
    ex["proposal_mask"] = mask.copy()
    return ex


def attach_proposals(source, data_config: Mapping[str, Any], split: str) -> ProposalSource:
  """`source` with the selective search proposals of `data_config["proposals"]` attached.

  The section's keys: max_proposals (P, the capacity), mode ("fast" | "quality"), cache_root
  (folder of the on-disk caches; "" = ~/.cache/jaxdet/proposals), num_workers (processes that
  compute a missing cache; 0 = all cores). The cache of (dataset, split, mode, size) is
  computed once (resumable) and reused; see jaxdet.proposals.selective_search.
  """
  import os
  from jaxdet.proposals import selective_search
  cfg = data_config["proposals"]
  root = cfg.get("cache_root") or os.path.join(os.path.expanduser("~"), ".cache", "jaxdet",
                                               "proposals")
  dataset = str(data_config["name"])
  if dataset.startswith("synthetic"):   # the images depend on these keys too
    h, w = (int(x) for x in data_config["image_size"])
    dataset += (f"_{h}x{w}_seed{int(data_config.get('seed', 0))}_objects"
                f"{int(data_config.get('min_objects', 0))}-{int(data_config.get('max_objects', 4))}")
  boxes, mask = selective_search.proposals_for(
      source, root, dataset, split, mode=str(cfg.get("mode", "fast")),
      max_proposals=int(cfg["max_proposals"]), num_workers=int(cfg.get("num_workers", 0)) or None)
  return ProposalSource(source, boxes, mask)


def validate_example(example: Mapping[str, Any], num_classes: int, *, index: int | None = None
                     ) -> dict[str, Any]:
  """Checks and normalises one example where data enters jaxdet.

  Accepts "image" u8[H, W, 3] (u8[H, W] or [H, W, 1] grey is converted to RGB), "boxes"
  [N, 4] (x1, y1, x2, y2) pixels, "labels" [N] integers; optional "difficult" [N],
  "image_id". Images without objects (N = 0) are normal.

  Raises:
    ValueError / TypeError naming the example: a corrupt image (wrong dtype, rank, channels,
    empty), boxes not finite, inverted, outside the image or of zero area, labels out of range.
  """
  eid = example.get("image_id", index)
  if "image" not in example or "boxes" not in example or "labels" not in example:
    raise ValueError(f"example (example {eid}): expected keys 'image', 'boxes', 'labels', got "
                     f"{sorted(example)}")
  image = np.asarray(example["image"])
  checks.check_image("image", image, example_id=eid)
  if image.ndim == 2:
    image = image[..., None]
  if image.shape[-1] == 1:
    image = np.repeat(image, 3, axis=-1)
  h, w = image.shape[:2]
  boxes = np.asarray(example["boxes"], np.float32)
  if boxes.size == 0:
    boxes = boxes.reshape(0, 4)
  labels = np.asarray(example["labels"])
  if labels.size == 0:
    labels = labels.reshape(0).astype(np.int32)
  checks.check_box_values("boxes", boxes, height=h, width=w, example_id=eid, allow_empty=False)
  checks.check_same_size("boxes", boxes, "labels", labels)
  checks.check_label_values("labels", labels, num_classes, example_id=eid)
  out = dict(example)
  out.update(image=image, boxes=boxes, labels=labels.astype(np.int32), image_id=eid)
  if out.get("difficult") is not None:
    out["difficult"] = np.asarray(out["difficult"], bool).reshape(-1)
    checks.check_same_size("boxes", boxes, "difficult", out["difficult"])
  return out


def validate_examples(examples: Sequence[Mapping[str, Any]], num_classes: int, *,
                      name: str = "examples", max_boxes: int | None = None,
                      box_policy: str = "error",
                      buckets: Sequence[Sequence[int]] | None = None, hint: str = "") -> None:
  """Checks every example of a list at once, before any is used (what validate_example checks
  one by one when an example is read), so that a bad example stops a run before its first step
  rather than when it is first drawn.

  One pass over the examples reads only their shapes and dtypes; the boxes and labels of all
  examples are then concatenated and checked in one vectorised pass (jaxdet.checks).

  Args:
    examples: the list (see source_from_examples).
    num_classes: labels must lie in [0, num_classes).
    name: the argument's name in errors ("examples", "eval_examples").
    max_boxes, box_policy: with policy "error", more than max_boxes boxes in an example is an
      error (None: not checked).
    buckets: (H, W) batch shapes; every image must fit one (resize mode "none"; None: not
      checked).
    hint: appended to the label error (e.g. the class names).
  Raises:
    ValueError / TypeError naming `name`, the example (its image_id and list index), the box or
    label and why: missing keys, image not u8[H, W, 3], boxes not [N, 4] or not finite,
    x2 < x1, zero area, outside the image, labels not integers or out of range, too many boxes,
    an image larger than every bucket.
  """
  if examples is None or len(examples) == 0:
    raise ValueError(f"{name}: expected a non-empty list of {{'image', 'boxes', 'labels'}} "
                     f"dicts, got {examples!r}"[:200])
  ids, sizes, all_boxes, all_labels = [], [], [], []
  for i, ex in enumerate(examples):
    eid = f"{ex.get('image_id', i) if isinstance(ex, Mapping) else i}, {name}[{i}]"
    if not isinstance(ex, Mapping) or not {"image", "boxes", "labels"} <= set(ex):
      got = sorted(ex) if isinstance(ex, Mapping) else type(ex).__name__
      raise ValueError(f"example (example {eid}): expected a dict with keys 'image', 'boxes', "
                       f"'labels', got {got}")
    image = np.asarray(ex["image"])
    checks.check_image("image", image, example_id=eid)
    boxes = np.asarray(ex["boxes"], np.float32)
    boxes = boxes.reshape(0, 4) if boxes.size == 0 else boxes
    labels = np.asarray(ex["labels"])
    labels = labels.reshape(0).astype(np.int32) if labels.size == 0 else labels
    checks.check_boxes(f"boxes (example {eid})", boxes)
    checks.check_array(f"labels (example {eid})", labels, ndim=1, dtype_kind="iu")
    checks.check_same_size(f"boxes (example {eid})", boxes, f"labels (example {eid})", labels)
    ids.append(eid)
    sizes.append(image.shape[:2])
    all_boxes.append(boxes)
    all_labels.append(labels)
  counts = np.array([len(b) for b in all_boxes])
  sizes = np.array(sizes).reshape(-1, 2)                          # [n, 2] (H, W)
  owner = np.repeat(np.arange(len(counts)), counts)               # [N] example of each box
  boxes = np.concatenate(all_boxes)                               # [N, 4]
  checks.check_box_values("boxes", boxes, height=sizes[owner, 0], width=sizes[owner, 1],
                          example_id=ids, owner=owner, allow_empty=False)
  checks.check_label_values("labels", np.concatenate(all_labels).astype(np.int64),
                            num_classes, example_id=ids, owner=owner, hint=hint)
  if max_boxes is not None and box_policy == "error" and (counts > max_boxes).any():
    k = int(np.argmax(counts > max_boxes))
    batching.pad_boxes(all_boxes[k], all_labels[k], int(max_boxes), policy=box_policy,
                       example_id=ids[k])   # raises its error (how to fix max_boxes)
  if buckets:
    b = np.array([tuple(x) for x in buckets]).reshape(-1, 2)      # [k, 2]
    fits = ((sizes[:, None, 0] <= b[None, :, 0]) & (sizes[:, None, 1] <= b[None, :, 1])).any(1)
    if not fits.all():
      k = int(np.argmin(fits))
      h, w = (int(x) for x in sizes[k])
      raise ValueError(
          f"image (example {ids[k]}): {h}x{w} (height x width) is larger than every batch "
          f"shape {[tuple(int(v) for v in x) for x in b]}; with resize mode 'none' set the data "
          f"config's image_size to at least ({int(sizes[:, 0].max())}, "
          f"{int(sizes[:, 1].max())}), add a larger bucket to `buckets`, or resize "
          f"(resize.mode 'shorter_side' or 'square')")


def source_from_examples(examples: Sequence[Mapping[str, Any]], class_names: Sequence[str]
                         ) -> ValidatedSource:
  """A validated random-access source over user examples (all validated here, up front).

  Args:
    examples: dicts {"image": u8[H, W, 3], "boxes": f32[N, 4] (x1, y1, x2, y2) pixels,
      "labels": i32[N] in [0, len(class_names)), optional "difficult": bool[N],
      optional "image_id": int (default: the list index)}.
    class_names: the C class names.
  """
  return ValidatedSource(_examples_source(examples, class_names))


def _class_hint(class_names: Sequence[str]) -> str:
  """"2 names: square, bar" (the first few of a long list)."""
  names = tuple(class_names)
  shown = names if len(names) <= 8 else names[:6] + ("...",)
  return f"{len(names)} names: {', '.join(map(str, shown))}"


def _examples_source(examples: Sequence[Mapping[str, Any]] | None,
                     class_names: Sequence[str] | None, *, name: str = "examples",
                     data_config: Mapping[str, Any] | None = None) -> ListSource:
  """ListSource over user examples, every example validated first (validate_examples); with
  a data config, also against its max_boxes / box_policy and (resize mode "none") buckets."""
  if examples is None or class_names is None:
    raise ValueError(f"{name}: data config name 'examples' needs the list of examples and "
                     f"class_names (passed to make_source / make_loader, or to "
                     f"train_and_evaluate / evaluate as examples=, eval_examples=, "
                     f"class_names=), got {name}={type(examples).__name__}, "
                     f"class_names={class_names!r}"[:400])
  if not class_names or isinstance(class_names, str):
    raise ValueError(f"class_names: expected a non-empty list of class names, got "
                     f"{class_names!r}")
  kw: dict[str, Any] = {}
  if data_config is not None:
    kw = {"max_boxes": int(data_config["max_boxes"]),
          "box_policy": data_config.get("box_policy", "error")}
    if data_config["resize"]["mode"] == "none":
      kw["buckets"] = data_config.get("buckets") or transforms.default_buckets(data_config)
  validate_examples(examples, len(class_names), name=name,
                    hint=f"; class_names has {_class_hint(class_names)}: add the missing "
                         f"class names or fix the label", **kw)
  return ListSource(examples, class_names)


def _dataset(data_config: Mapping[str, Any], split: str, *,
             examples: Sequence[Mapping[str, Any]] | None, class_names: Sequence[str] | None,
             examples_name: str = "examples"):
  """The unwrapped source of a data config's dataset and split (see make_source)."""
  name = data_config["name"]
  key = "num_train" if split == "train" else "num_test"
  num = data_config.get(key)
  if name in ("synthetic", "synthetic_single"):
    if not num or int(num) <= 0:
      raise ValueError(f"data.{key}: the synthetic dataset's {split!r} split needs a positive "
                       f"size, got {num!r}; set --config.data.{key}=N")
    return synthetic.SyntheticDetection(
        int(num), image_size=tuple(data_config["image_size"]),
        min_objects=int(data_config.get("min_objects", 0)),
        max_objects=int(data_config.get("max_objects", 4)),
        seed=int(data_config.get("seed", 0)), split=split,
        single_object=(name == "synthetic_single"))
  if name in ("voc2007", "voc2012", "coco2017", "imagenet2012"):
    from jaxdet.data import tfds as tfds_lib   # tfds itself is imported lazily in there
    return tfds_lib.TfdsDetection(name, split, data_dir=data_config.get("data_dir") or None,
                                  num_examples=int(num) if num else None)
  if name == "examples":
    return _examples_source(examples, class_names, name=examples_name, data_config=data_config)
  raise ValueError(f"data.name: expected one of {SOURCE_NAMES}, got {name!r}")


def check_num_classes(num_classes: int, source: Any, dataset: str) -> None:
  """The model's class count must be the dataset's: labels >= num_classes would be out of
  range for the losses, and classes the data never has would dilute mAP.

  Args:
    num_classes: C of the model (an experiment's config.num_classes).
    source: a source with `num_classes` and `class_names`.
    dataset: the data config's name (named in the error).
  """
  have = int(source.num_classes)
  if int(num_classes) == have:
    return
  if dataset == "examples":
    raise ValueError(f"num_classes: expected len(class_names) = {have} (class_names has "
                     f"{_class_hint(source.class_names)}), got num_classes={num_classes}; set "
                     f"config.num_classes = len(class_names)")
  raise ValueError(
      f"num_classes: the dataset {dataset!r} has {have} classes "
      f"({_class_hint(source.class_names)}), got num_classes={num_classes}, so "
      + (f"its labels {num_classes}..{have - 1} would be out of range for the model"
         if num_classes < have else f"{num_classes - have} classes would never be seen")
      + f"; set --config.num_classes={have} (config.num_classes = {have})")


def check_split(data_config: Mapping[str, Any], split: str, *, num_classes: int, train: bool,
                examples: Sequence[Mapping[str, Any]] | None = None,
                class_names: Sequence[str] | None = None,
                examples_name: str = "examples") -> int:
  """Everything about one split's data that is knowable without reading its images: for a
  run to check before its first step (jaxdet.train.preflight).

  Checks the data config's box and resize settings, that the split exists and is not empty,
  that the dataset's class count is `num_classes`, and for user examples every example
  (validate_examples). Proposals are not computed.

  Args:
    data_config, split, examples, class_names: as for make_source.
    num_classes: the model's C.
    train: the split is read for training (its transform is checked).
    examples_name: the examples' argument name in errors (e.g. "eval_examples").
  Returns:
    The number of examples in the split.
  """
  policy = data_config.get("box_policy", "error")
  if policy not in batching.BOX_POLICIES:
    raise ValueError(f"data.box_policy: expected one of {batching.BOX_POLICIES}, got "
                     f"{policy!r}")
  max_boxes = data_config["max_boxes"]
  if isinstance(max_boxes, bool) or not isinstance(max_boxes, (int, np.integer)) \
      or max_boxes < 1:
    raise ValueError(f"data.max_boxes: expected an integer >= 1, got {max_boxes!r}")
  name = data_config["name"]
  objects = int(data_config.get("max_objects", 4))
  if name == "synthetic" and policy == "error" and objects > max_boxes:
    raise ValueError(f"data.max_boxes: synthetic images have up to data.max_objects={objects} "
                     f"objects, more than max_boxes={max_boxes} with box_policy 'error'; set "
                     f"--config.data.max_boxes={objects} or --config.data.box_policy="
                     f"keep_largest")
  transforms.make_transform(data_config, train)
  if not data_config.get("buckets"):
    transforms.default_buckets(data_config)
  source = _dataset(data_config, split, examples=examples, class_names=class_names,
                    examples_name=examples_name)
  if len(source) == 0:
    where = examples_name if name == "examples" else f"data.name={name!r} split {split!r}"
    raise ValueError(f"{where}: expected at least one example, got an empty split")
  check_num_classes(num_classes, source, name)
  return len(source)


def make_source(data_config: Mapping[str, Any], split: str, *,
                examples: Sequence[Mapping[str, Any]] | None = None,
                class_names: Sequence[str] | None = None,
                num_classes: int | None = None) -> ValidatedSource:
  """The random-access source of a data config's dataset and split ("train" or "test").

  Returns a source with `len`, `[i]` -> validated example dict, `class_names`, `num_classes`.
  For name "examples" pass the examples (and class_names) here; they are all validated here.
  num_classes: the model's class count; given, it must be the dataset's (check_num_classes),
  so that every label the source lets through is in range for the model.
  """
  src = _dataset(data_config, split, examples=examples, class_names=class_names)
  if num_classes is not None:
    check_num_classes(num_classes, src, data_config["name"])
  source = ValidatedSource(src)
  props = data_config.get("proposals")
  if props and int(props.get("max_proposals", 0) or 0) > 0:
    return attach_proposals(source, data_config, split)
  return source


# ----------------------------------------------------------------------------- loader


class Loader:
  """Fixed-shape batches from a random-access source; deterministic, resumable, prefetching.

  Iterate it (`next(loader)` or `for batch in loader`) to get batch dicts (see
  jaxdet.data.batching). Training (`train=True`): shuffled, endless epochs, augmented; the
  stream runs across epoch boundaries. Evaluation: in order, one pass; the last batch is
  padded with example_mask False; iterating a finished evaluation Loader again starts a new
  pass.

  Batches are global: batch_size must be divisible by num_devices; the caller shards them
  along axis 0.

  Several processes: with shard=(index, count) (jax.process_index(), jax.process_count())
  every process walks the same global order with the same seed and loads only its part of
  each global batch, examples [index * b, (index + 1) * b) with b = batch_size / count; the
  parts of all processes, in process order, are the global batch one process would load.
  Each part is padded to the shape bucket of its own images: where images of one batch can
  fall into different buckets (several `buckets`, or resize sizes), give several processes
  one bucket (data.buckets = [(H, W)]) so that every part has the same shape.

  State: `get_state()` -> {"epoch": int, "position": int, "seed": int} after the last batch
  returned, a position in the global order (the same on every process); `set_state(state)`
  makes the next batch the one an uninterrupted run would produce next (augmentation
  included), so one saved state resumes every process.
  """

  def __init__(self, source, *, batch_size: int, max_boxes: int,
               transform: Callable[[Mapping[str, Any], np.random.Generator], dict[str, Any]],
               buckets: Sequence[Sequence[int]], seed: int = 0, train: bool = True,
               box_policy: str = "error", prefetch: int = 2, num_workers: int = 1,
               num_devices: int = 1, group_by_aspect: bool = False,
               shard: Sequence[int] = (0, 1)):
    checks.check_positive("batch_size", batch_size)
    checks.check_positive("num_devices", num_devices)
    index, count = (int(x) for x in shard)
    if not 0 <= index < count or batch_size % count:
      raise ValueError(f"shard: expected (index, count) with 0 <= index < count and count "
                       f"dividing batch_size={batch_size}, got {tuple(shard)}")
    if (batch_size // count) % num_devices:
      raise ValueError(f"batch_size: expected a multiple of num_devices={num_devices} per "
                       f"process, got {batch_size // count}")
    if len(source) == 0:
      raise ValueError("source: expected at least one example, got an empty source")
    self.source, self.batch_size, self.max_boxes = source, int(batch_size), int(max_boxes)
    self.transform, self.buckets = transform, [tuple(int(x) for x in b) for b in buckets]
    self.seed, self.train, self.box_policy = int(seed), bool(train), box_policy
    self.prefetch, self.num_workers = int(prefetch), max(1, int(num_workers))
    self.num_devices = int(num_devices)
    self.shard = (index, count)
    self._epoch, self._position = 0, 0
    self._pool = (concurrent.futures.ThreadPoolExecutor(self.num_workers)
                  if self.num_workers > 1 else None)
    self._thread: threading.Thread | None = None
    self._queue: queue.Queue | None = None
    self._stop: threading.Event | None = None
    self._perm_cache: tuple[int, np.ndarray] | None = None
    self.group_by_aspect = bool(group_by_aspect)
    self._landscape: np.ndarray | None = None   # per example, read once (group_by_aspect)

  # -- state

  def get_state(self) -> dict[str, int]:
    return {"epoch": self._epoch, "position": self._position, "seed": self.seed}

  def set_state(self, state: Mapping[str, Any]) -> None:
    if int(state.get("seed", self.seed)) != self.seed:
      raise ValueError(f"state: saved with seed {state['seed']}, this Loader has seed "
                       f"{self.seed}")
    self._stop_thread()
    self._epoch, self._position = int(state["epoch"]), int(state["position"])

  @property
  def num_batches(self) -> int | None:
    """Batches in one evaluation pass (None for training, which repeats)."""
    return None if self.train else -(-len(self.source) // self.batch_size)

  # -- producing batches (pure functions of the state)

  def _order(self, epoch: int) -> np.ndarray:
    n = len(self.source)
    if not self.train and not self.group_by_aspect:
      return np.arange(n)
    epoch = epoch if self.train else 0
    if self._perm_cache is None or self._perm_cache[0] != epoch:
      perm = (np.random.default_rng([self.seed, epoch]).permutation(n) if self.train
              else np.arange(n))
      if self.group_by_aspect:
        perm = batching.aspect_grouped_order(perm, self._landscape_flags(), self.batch_size)
      self._perm_cache = (epoch, perm)
    return self._perm_cache[1]

  def _landscape_flags(self) -> np.ndarray:
    """bool[N]: each example's image at least as wide as tall (read once, then kept)."""
    if self._landscape is None:
      shapes = [np.shape(self.source[i]["image"])[:2] for i in range(len(self.source))]
      self._landscape = np.asarray([w >= h for h, w in shapes], bool)
    return self._landscape

  def _load(self, epoch: int, index: int) -> dict[str, Any]:
    rng = np.random.default_rng([self.seed, epoch, int(index)])
    return self.transform(self.source[int(index)], rng)

  def _make_batch(self, epoch: int, position: int):
    """(batch, (epoch, position) after it) or None at the end of an evaluation pass."""
    n = len(self.source)
    if not self.train and position >= n:
      return None
    keys = []
    while len(keys) < self.batch_size:
      if position >= n:
        if not self.train:
          break
        epoch, position = epoch + 1, 0
      order = self._order(epoch)
      take = min(self.batch_size - len(keys), n - position)
      keys += [(epoch, int(i)) for i in order[position:position + take]]
      position += take
    local = self.batch_size // self.shard[1]
    keys = keys[self.shard[0] * local:(self.shard[0] + 1) * local]   # this process's part
    if self._pool is not None:
      examples = list(self._pool.map(lambda k: self._load(*k), keys))
    else:
      examples = [self._load(*k) for k in keys]
    if not self.train:   # evaluation looks the dataset's own ground truth up by it
      examples = [{**e, "index": i} for e, (_, i) in zip(examples, keys)]
    hh = max((e["image"].shape[0] for e in examples), default=1)
    ww = max((e["image"].shape[1] for e in examples), default=1)
    shape = transforms.choose_bucket(hh, ww, self.buckets)
    pad = local - len(examples)
    examples += [{"image": np.zeros((shape[0], shape[1], 3), np.uint8),
                  "boxes": np.zeros((0, 4), np.float32), "labels": np.zeros(0, np.int32),
                  "image_id": -1, "example_mask": False}] * pad
    batch = batching.collate(examples, self.max_boxes, policy=self.box_policy,
                             image_shape=shape)
    return batch, (epoch, position)

  # -- iteration

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    """Training: continues from the current state. Evaluation: a finished pass starts over,
    so `for batch in loader` runs one full pass each time."""
    if not self.train and self._position >= len(self.source):
      self.set_state({"epoch": 0, "position": 0})
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self.prefetch <= 0:
      item = self._make_batch(self._epoch, self._position)
    else:
      if self._thread is None:
        self._start_thread()
      item = self._queue.get()
      if isinstance(item, BaseException):
        self._stop_thread()
        raise item
    if item is None:
      self._stop_thread()
      raise StopIteration
    batch, (self._epoch, self._position) = item
    return batch

  def _start_thread(self) -> None:
    self._queue = queue.Queue(maxsize=self.prefetch)
    self._stop = threading.Event()
    q, stop = self._queue, self._stop

    def put(item) -> bool:
      while not stop.is_set():
        try:
          q.put(item, timeout=0.1)
          return True
        except queue.Full:
          continue
      return False

    def work(epoch: int, position: int) -> None:
      try:
        while not stop.is_set():
          item = self._make_batch(epoch, position)
          if not put(item) or item is None:
            return
          epoch, position = item[1]
      except BaseException as e:  # handed to the consumer, raised by __next__
        put(e)

    self._thread = threading.Thread(target=work, args=(self._epoch, self._position),
                                    daemon=True, name="jaxdet-data")
    self._thread.start()

  def _stop_thread(self) -> None:
    if self._thread is not None:
      self._stop.set()
      self._thread.join()
      self._thread, self._queue, self._stop = None, None, None

  def close(self) -> None:
    """Stops the prefetch thread and the worker pool."""
    self._stop_thread()
    if self._pool is not None:
      self._pool.shutdown(wait=True)
      self._pool = None

  def __del__(self):
    try:
      self._stop_thread()
    except Exception:  # interpreter shutdown
      pass


def make_loader(data_config: Mapping[str, Any], split: str, *, batch_size: int, seed: int,
                train: bool, examples: Sequence[Mapping[str, Any]] | None = None,
                class_names: Sequence[str] | None = None, num_devices: int = 1,
                num_classes: int | None = None, shard: Sequence[int] = (0, 1)) -> Loader:
  """The Loader of a data config (see the module docstring for keys and randomness).

  Args:
    data_config: Mapping with the keys of `default_data_config()`.
    split: "train" or "test" (tfds sources also accept tfds split strings).
    batch_size: global batch size (a multiple of num_devices).
    seed: order and augmentation seed.
    train: shuffled, repeating, augmented (True) or in order, one pass, padded (False).
    examples, class_names: the user examples when data_config["name"] == "examples".
    num_devices, shard: see Loader (shard: this process's part of each global batch,
      (jax.process_index(), jax.process_count())).
    num_classes: the model's class count, checked against the dataset's (see make_source).
  """
  source = make_source(data_config, split, examples=examples, class_names=class_names,
                       num_classes=num_classes)
  buckets = data_config.get("buckets") or transforms.default_buckets(data_config)
  return Loader(source, batch_size=batch_size, max_boxes=int(data_config["max_boxes"]),
                transform=transforms.make_transform(data_config, train), buckets=buckets,
                seed=seed, train=train, box_policy=data_config.get("box_policy", "error"),
                prefetch=int(data_config.get("prefetch", 2)),
                num_workers=int(data_config.get("num_workers", 1)),
                num_devices=num_devices, shard=shard,
                group_by_aspect=bool(data_config.get("group_by_aspect", False)))
