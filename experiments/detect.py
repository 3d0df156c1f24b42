r"""Detects objects in new images with a workdir's trained detector (every system).

    python -m experiments.detect [--config experiments/configs/<system>.py[:preset]] \
        --workdir DIR --images photos/ "shots/*.jpg" one.png [--out OUT] [--draw] \
        [--format jsonl|coco] [--annotations instances.json] [--min_score 0.05]

The config defaults to the one training saved in DIR/config.json.
--images takes files, folders (searched recursively for common image types) and glob patterns.
Images of any size and mode (grey, RGBA, EXIF-rotated) go through the config's test-time
resize and shape buckets as evaluation images do (one compile per bucket), with selective
search proposals for R-CNN and Fast R-CNN (cached under data.proposals.cache_root).

OUT (default DIR/detections) receives detections.jsonl: one line per image
{"path", "height", "width", "detections": [{"box": [x1, y1, x2, y2], "score", "label",
"class"}]} with boxes in the ORIGINAL image's pixels; with --format coco instead
detections_coco.json, a COCO results list [{image_id, category_id, bbox [x, y, w, h], score}]
(ids: from --annotations, a COCO-style json mapping file_name -> id and category names -> ids;
else COCO's official category ids for coco2017 and label + 1 otherwise, images 1, 2, ...).
--draw also writes OUT/<name>.png with the detections scoring at least --score_threshold.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from experiments.configs import common


def define_flags(fv) -> None:
  from absl import flags
  flags.DEFINE_string("workdir", None, "the training run's directory", flag_values=fv)
  flags.DEFINE_multi_string("images", [], "image files, folders (recursive) and glob patterns",
                            flag_values=fv)
  flags.DEFINE_string("out", None, "output folder (default WORKDIR/detections)", flag_values=fv)
  flags.DEFINE_enum("format", "jsonl", ["jsonl", "coco"], "detections.jsonl (per image) or "
                    "detections_coco.json (a COCO results list)", flag_values=fv)
  flags.DEFINE_string("annotations", None, "COCO-style json giving the image ids (by file_name) "
                      "and category ids (by name) for --format coco", flag_values=fv)
  flags.DEFINE_bool("draw", False, "also write OUT/<name>.png with the detections drawn",
                    flag_values=fv)
  flags.DEFINE_float("score_threshold", 0.3, "draw detections scoring at least this",
                     flag_values=fv)
  flags.DEFINE_float("min_score", 0.0, "write detections scoring at least this",
                     flag_values=fv)
  flags.DEFINE_integer("batch_size", 0, "images per batch (0: config.eval.batch_size)",
                       flag_values=fv)


def detect(config: Any | None, workdir: str, images: list[str], out: str, *, fmt: str = "jsonl",
           annotations: str | None = None, draw: bool = False, score_threshold: float = 0.3,
           min_score: float = 0.0, batch_size: int = 0) -> dict[str, Any]:
  """Runs the workdir's detector over `images` (files, folders, globs) and writes OUT.

  `config` None: the one saved in workdir/config.json.

  Returns:
    {"detections": the JSONL or COCO json path, "drawn": [PNG paths], "num_images": n}.
  """
  from jaxdet import detector as det_lib
  paths = det_lib.find_images(images)
  if not paths:
    raise ValueError(f"--images: no image files found in {images}")
  detector = det_lib.Detector.from_workdir(workdir, config)
  config = detector.config
  results = list(detector.run(paths, batch_size=batch_size or None, progress=True,
                              min_score=min_score))
  if fmt == "coco":
    from jaxdet import files
    image_ids, category_ids = det_lib.coco_ids(config, detector.class_names, paths,
                                               annotations=annotations)
    written = os.path.join(out, "detections_coco.json")
    os.makedirs(out, exist_ok=True)
    files.write_json(written, det_lib.detections_to_coco(results, image_ids, category_ids))
  else:
    written = det_lib.write_jsonl(os.path.join(out, "detections.jsonl"), results)
  drawn = []
  if draw:
    from jaxdet.eval.draw import draw_detections, save_image
    for path, r in zip(paths, results):
      image = det_lib.load_image(path)
      picture = draw_detections(image, r["boxes"], r["labels"], r["scores"],
                                class_names=detector.class_names,
                                score_threshold=score_threshold)
      stem = os.path.splitext(os.path.basename(path))[0]
      drawn.append(str(save_image(os.path.join(out, f"{stem}.png"), picture)))
  return {"detections": written, "drawn": drawn, "num_images": len(paths)}


def expand_list_flag(argv: list[str], name: str) -> list[str]:
  """`--images A B` -> `--images=A --images=B` (absl wants one flag per value)."""
  out, in_list = [], False
  for arg in argv:
    if arg == f"--{name}":
      in_list = True
    elif in_list and not arg.startswith("-"):
      out.append(f"--{name}={arg}")
    else:
      in_list = False
      out.append(arg)
  return out


def main(argv: list[str]) -> dict[str, Any]:
  config, flags = common.parse_flags(expand_list_flag(list(argv), "images"), define_flags,
                                     config_optional=True)
  if not flags.workdir or not flags.images:
    raise ValueError("--workdir, --images: expected a run directory and image files, folders "
                     "or glob patterns")
  out = flags.out or os.path.join(flags.workdir, "detections")
  result = detect(config, flags.workdir, list(flags.images), out, fmt=flags.format,
                  annotations=flags.annotations, draw=flags.draw,
                  score_threshold=flags.score_threshold, min_score=flags.min_score,
                  batch_size=flags.batch_size)
  print(result["detections"])
  return result


if __name__ == "__main__":
  main(sys.argv)
