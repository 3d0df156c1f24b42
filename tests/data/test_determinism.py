"""The input pipeline gives the same batches whatever its threads' timing (README:
"What is reproducible")."""

import random
import threading
import time

import numpy as np

from jaxdet.data import pipeline, transforms


class SlowSource:
  """A source whose reads take a random 0-20 ms, from a clock-seeded generator, so that
  worker threads finish in a different order on every run."""

  def __init__(self, source):
    self._source = source
    self._random = random.Random()   # unseeded on purpose: timing only, never data
    self._lock = threading.Lock()
    self.class_names, self.num_classes = source.class_names, source.num_classes

  def __len__(self):
    return len(self._source)

  def __getitem__(self, index):
    with self._lock:
      delay = self._random.uniform(0.0, 0.02)
    time.sleep(delay)
    return self._source[index]


def _batches(slow: bool, num_batches: int):
  config = pipeline.default_data_config()
  config["num_train"] = 20   # batches of 8 cross epoch boundaries
  source = pipeline.make_source(config, "train")
  loader = pipeline.Loader(
      SlowSource(source) if slow else source, batch_size=8, max_boxes=config["max_boxes"],
      transform=transforms.make_transform(config, True),
      buckets=transforms.default_buckets(config), seed=3, train=True,
      prefetch=3 if slow else 0, num_workers=4 if slow else 1)
  it = iter(loader)
  return [next(it) for _ in range(num_batches)]


def test_delayed_workers_give_the_same_batches():
  reference = _batches(slow=False, num_batches=6)
  for _ in range(2):
    got = _batches(slow=True, num_batches=6)
    for b_ref, b_got in zip(reference, got):
      assert sorted(b_ref) == sorted(b_got)
      for key in b_ref:
        np.testing.assert_array_equal(b_ref[key], b_got[key], err_msg=key)
