"""PASCAL VOC 2007/2012 and COCO 2017 through `tfds.data_source` (array_record, no TensorFlow).

`tfds.data_source` reads the prepared array_record files by random access and decodes each
record in NumPy (images with OpenCV, or PIL), so TensorFlow is needed only to *prepare* the
dataset, never to read it. The datasets are opened with an explicit version ("voc/2007:5.0.0"),
which makes tfds build the reader from the prepared files' metadata rather than from the
builder code (COCO's builder code imports TensorFlow).

Conversion happens once, here: tfds' normalised (ymin, xmin, ymax, xmax) boxes become pixel
(x1, y1, x2, y2) boxes of the decoded image. tfds' VOC boxes are (xmin - 1, ymin - 1, xmax,
ymax) / size of the 1-based inclusive VOC annotation, i.e. already continuous pixel edges.

Decoded example: {"image": u8[H, W, 3], "boxes": f32[N, 4], "labels": i32[N],
"difficult": bool[N], "image_id": int} plus, for COCO, "crowd_boxes" f32[K, 4] and
"crowd_labels" i32[K]: crowd regions are kept out of the training targets. Evaluation reads
the ground truth as the official tools do from `TfdsDetection.ground_truth(i)` (original
pixels; jaxdet.train.evaluate.predict_dataset): COCO's crowd regions (iscrowd, the ignore
regions detections are matched to by IoA) and annotation `area` (which sets the small / medium /
large ranges), VOC's difficult flags. COCO boxes with zero width or height (a handful in
train2017) are dropped from the training targets at entry; evaluation keeps them as the
official tools do.

Preparing a dataset (on a machine with network access and TensorFlow installed):
  pip install tensorflow tensorflow-datasets
  tfds build voc/2007 --file_format=array_record --data_dir=/path/to/tensorflow_datasets
then point the data config's `data_dir` at that folder (or copy `voc/2007/5.0.0` there).
Sources already downloaded by hand go in `--manual_dir`.
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping

import numpy as np

VOC_CLASS_NAMES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor")

COCO_CLASS_NAMES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat",
    "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack",
    "umbrella", "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball",
    "kite", "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket",
    "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair",
    "couch", "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote",
    "keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book",
    "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush")

# ImageNet (ILSVRC 2012): tfds's label i is the i-th WordNet id in sorted order; the names are
# the label indices (the synset names live in the prepared dataset's info).
IMAGENET_CLASS_NAMES = tuple(f"imagenet_{i}" for i in range(1000))

# COCO's category id of each of the 80 labels (label i <-> COCO_CATEGORY_IDS[i]), for results
# written in COCO's json format.
COCO_CATEGORY_IDS = (tuple(range(1, 12)) + tuple(range(13, 26)) + (27, 28)
                     + tuple(range(31, 45)) + tuple(range(46, 66)) + (67, 70)
                     + tuple(range(72, 83)) + tuple(range(84, 91)))

# name -> (tfds name, version, class names, {our split: tfds split}).
DATASETS = {
    "voc2007": ("voc/2007", "5.0.0", VOC_CLASS_NAMES,
                {"train": "train+validation", "test": "test"}),
    "voc2012": ("voc/2012", "5.0.0", VOC_CLASS_NAMES,      # VOC 2012 test has no labels
                {"train": "train", "test": "validation"}),
    "coco2017": ("coco/2017", "1.1.0", COCO_CLASS_NAMES,
                 {"train": "train", "test": "validation"}),
    "imagenet2012": ("imagenet2012", "5.1.0", IMAGENET_CLASS_NAMES,
                     {"train": "train", "test": "validation"}),
}


def decode_imagenet(example: Mapping[str, Any], index: int) -> dict[str, Any]:
  """A tfds imagenet2012 example -> our example dict with one object: the image's central
  square (side = the shorter side), labelled with the image's class. The classify system's
  square crop around that box, jittered in size and position, is then the usual random crop
  of classification training (and the central crop at evaluation)."""
  image = np.asarray(example["image"])
  if image.ndim == 2:
    image = np.repeat(image[..., None], 3, axis=-1)
  h, w = image.shape[:2]
  s = min(h, w)
  x0, y0 = (w - s) / 2.0, (h - s) / 2.0
  return {"image": image,
          "boxes": np.float32([[x0, y0, x0 + s, y0 + s]]),
          "labels": np.int32([int(example["label"])]),
          "difficult": np.zeros(1, bool),
          "image_id": int(index)}


class DatasetNotPreparedError(RuntimeError):
  """The tfds dataset is not prepared (in array_record format) under data_dir."""


def normalized_yxyx_to_xyxy(bbox: np.ndarray, height: int, width: int) -> np.ndarray:
  """tfds boxes f32[N, 4] normalised (ymin, xmin, ymax, xmax) -> f32[N, 4] (x1, y1, x2, y2)
  pixels of a height x width image."""
  bbox = np.asarray(bbox, np.float32).reshape(-1, 4)
  scale = np.float32([width, height, width, height])
  return bbox[:, [1, 0, 3, 2]] * scale


def _to_pixels(bbox: np.ndarray, height: int, width: int) -> np.ndarray:
  """normalized_yxyx_to_xyxy, clipped to the image against float rounding (tfds stores
  coordinates in [0, 1])."""
  boxes = normalized_yxyx_to_xyxy(bbox, height, width)
  return np.clip(boxes, 0.0, np.float32([width, height, width, height]))


def _image_id(example: Mapping[str, Any], index: int) -> int:
  """COCO's image/id; for VOC the digits of the file name ("2008_000123.jpg" -> 2008000123)."""
  if "image/id" in example:
    return int(example["image/id"])
  name = example.get("image/filename", b"")
  name = name.decode() if isinstance(name, bytes) else str(name)
  digits = re.sub(r"\D", "", os.path.basename(name))
  return int(digits) if digits and int(digits) < 2**31 else int(index)


def _objects(example: Mapping[str, Any], keys: tuple[str, ...], index: int
             ) -> dict[str, np.ndarray]:
  objs = example["objects"]
  out = {k: np.asarray(objs[k]) for k in keys}
  n = len(out["bbox"])
  if any(len(v) != n for v in out.values()):
    lens = {k: len(v) for k, v in out.items()}
    raise ValueError(f"objects (example {index}): per-object fields differ in length: {lens}")
  return out


def decode_voc(example: Mapping[str, Any], index: int) -> dict[str, Any]:
  """A tfds VOC example (as `tfds.data_source` returns it) -> our example dict."""
  image = np.asarray(example["image"])
  h, w = image.shape[:2]
  objs = _objects(example, ("bbox", "label", "is_difficult"), index)
  return {"image": image,
          "boxes": _to_pixels(objs["bbox"], h, w),
          "labels": objs["label"].astype(np.int32),
          "difficult": objs["is_difficult"].astype(bool),
          "image_id": _image_id(example, index)}


def decode_coco(example: Mapping[str, Any], index: int) -> dict[str, Any]:
  """A tfds COCO example -> our example dict (crowd regions in "crowd_boxes"/"crowd_labels")."""
  image = np.asarray(example["image"])
  h, w = image.shape[:2]
  objs = _objects(example, ("bbox", "label", "is_crowd"), index)
  boxes = _to_pixels(objs["bbox"], h, w)
  labels = objs["label"].astype(np.int32)
  crowd = objs["is_crowd"].astype(bool)
  nonempty = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
  keep = ~crowd & nonempty
  return {"image": image, "boxes": boxes[keep], "labels": labels[keep],
          "difficult": np.zeros(int(keep.sum()), bool),
          "crowd_boxes": boxes[crowd], "crowd_labels": labels[crowd],
          "image_id": _image_id(example, index)}


def ground_truth_coco(example: Mapping[str, Any], index: int) -> dict[str, Any]:
  """A tfds COCO example's ground truth as pycocotools sees it: every annotation (crowd ones
  with iscrowd True) in original pixels, with the annotation's area (the mask's).

  Returns:
    {"boxes": f32[N, 4] (x1, y1, x2, y2) pixels, "labels": i32[N], "iscrowd": bool[N],
     "area": f64[N], "image_id": int}.
  """
  image = np.asarray(example["image"])
  h, w = image.shape[:2]
  objs = _objects(example, ("bbox", "label", "is_crowd"), index)
  boxes = _to_pixels(objs["bbox"], h, w)
  area = np.asarray(example["objects"].get("area", np.zeros(0)), np.float64).reshape(-1)
  if len(area) != len(boxes):   # no areas recorded: the box areas
    area = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).astype(np.float64)
  return {"boxes": boxes, "labels": objs["label"].astype(np.int32),
          "iscrowd": objs["is_crowd"].astype(bool), "area": area,
          "image_id": _image_id(example, index)}


def ground_truth_voc(example: Mapping[str, Any], index: int) -> dict[str, Any]:
  """A tfds VOC example's ground truth: boxes f32[N, 4] original pixels, labels, difficult."""
  ex = decode_voc(example, index)
  return {k: ex[k] for k in ("boxes", "labels", "difficult", "image_id")}


def ground_truth_imagenet(example: Mapping[str, Any], index: int) -> dict[str, Any]:
  """An imagenet2012 example's ground truth: its one object (decode_imagenet), original pixels."""
  ex = decode_imagenet(example, index)
  return {k: ex[k] for k in ("boxes", "labels", "image_id")}


def _prepare_message(tfds_name: str, version: str, data_dir: str) -> str:
  return (
      f"tfds dataset {tfds_name}:{version} is not prepared in array_record format under "
      f"data_dir={data_dir!r} (expected {os.path.join(data_dir, tfds_name, version)}). "
      f"Prepare it on a machine with network access and TensorFlow "
      f"(`pip install tensorflow tensorflow-datasets`), then copy the folder here:\n"
      f"  tfds build {tfds_name} --file_format=array_record --data_dir={data_dir}\n"
      f"(for sources downloaded by hand add --manual_dir=DIR), and set the data config's "
      f"`data_dir` to the folder holding `{tfds_name.split('/')[0]}/`.")


def open_data_source(tfds_name: str, version: str, split: str, data_dir: str | None):
  """`tfds.data_source` for a prepared dataset; a clear error when it is not prepared."""
  import tensorflow_datasets as tfds   # lazy: not needed by the rest of jaxdet
  data_dir = data_dir or os.environ.get("TFDS_DATA_DIR") or os.path.expanduser(
      "~/tensorflow_datasets")
  try:
    return tfds.data_source(f"{tfds_name}:{version}", split=split, data_dir=data_dir,
                            download=False, try_gcs=False)
  except Exception as e:  # tfds raises several kinds; decide from the files on disk
    info = os.path.join(data_dir, tfds_name, version, "dataset_info.json")
    if not os.path.exists(info) or isinstance(e, (NotImplementedError, ModuleNotFoundError)):
      raise DatasetNotPreparedError(_prepare_message(tfds_name, version, data_dir)) from e
    raise


def info_num_classes(source: Any) -> int | None:
  """The label feature's class count in a tfds data source's dataset_info (None: unknown)."""
  try:
    return int(source.dataset_info.features["objects"]["label"].num_classes)
  except (AttributeError, KeyError, TypeError):
    return None


class TfdsDetection:
  """Random-access VOC/COCO/ImageNet source: `ds[i]` -> decoded example (see the module docstring).

  Args:
    name: "voc2007", "voc2012" or "coco2017".
    split: "train" or "test" (mapped to tfds splits: VOC 2007 train = trainval; VOC 2012
      and COCO test = validation), or any tfds split string such as "validation[:100]".
    data_dir: the tfds data folder (default: $TFDS_DATA_DIR or ~/tensorflow_datasets).
    num_examples: use only the first `num_examples` examples (None: all).
  """

  def __init__(self, name: str, split: str, *, data_dir: str | None = None,
               num_examples: int | None = None):
    if name not in DATASETS:
      raise ValueError(f"name: expected one of {sorted(DATASETS)}, got {name!r}")
    tfds_name, version, self.class_names, splits = DATASETS[name]
    self.name = name
    self.num_classes = len(self.class_names)
    self.split = splits.get(split, split)
    self._decode = (decode_coco if name.startswith("coco") else
                    decode_imagenet if name.startswith("imagenet") else decode_voc)
    self._ground_truth = (ground_truth_coco if name.startswith("coco") else
                          ground_truth_imagenet if name.startswith("imagenet") else
                          ground_truth_voc)
    self._source = open_data_source(tfds_name, version, self.split, data_dir)
    in_info = info_num_classes(self._source)
    if in_info is not None and in_info != self.num_classes:
      raise ValueError(f"name: the prepared {tfds_name}:{version} has {in_info} label classes "
                       f"(its dataset_info), jaxdet's class list for {name!r} "
                       f"{self.num_classes}; prepare the version jaxdet reads ({version})")
    n = len(self._source)
    self._len = n if num_examples is None else min(int(num_examples), n)

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index)
    if not 0 <= index < self._len:
      raise IndexError(f"index {index} out of range for {self._len} examples")
    return self._decode(self._source[index], index)

  def ground_truth(self, index: int) -> dict[str, Any]:
    """Example `index`'s ground truth for evaluation, in original pixels (see
    ground_truth_coco / ground_truth_voc); decodes the record again."""
    index = int(index)
    if not 0 <= index < self._len:
      raise IndexError(f"index {index} out of range for {self._len} examples")
    return self._ground_truth(self._source[index], index)
