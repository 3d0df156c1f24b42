"""Synthetic datasets (the embedded default), tfds loaders, augmentation, batching.

Modules:
  synthetic   SyntheticDetection: shapes on textured backgrounds, rendered with NumPy from
              (seed, split, index); the default dataset, no files needed.
  tfds        VOC 2007/2012 and COCO 2017 through `tfds.data_source` (array_record, no
              TensorFlow); boxes converted to pixel (x1, y1, x2, y2) once, on entry.
  transforms  resize (shorter side / square), horizontal flip, YOLO scale-translate and HSV
              jitter, shape buckets; boxes move with the pixels exactly.
  batching    pad_boxes (fixed max_boxes with a mask) and collate (fixed-shape batch dicts).
  pipeline    default_data_config (every data config key is documented there), make_source,
              source_from_examples, validation where data enters (validate_example,
              validate_examples for a whole list at once, check_split before a run), and the
              deterministic, resumable, prefetching Loader (make_loader).
"""
