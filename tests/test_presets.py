"""Every config x preset traces end to end at its true shapes: config, tfds data path (mock VOC /
ImageNet of real image sizes), loader, buckets, System.init, the train step and predict
(jax.eval_shape: no compilation). Plus the data pieces the paper presets rely on: aspect-ratio
grouped batches, the ImageNet source, the frozen-without-weights error."""

import jax
import numpy as np
import pytest

from experiments import check_presets as cp
from jaxdet.data import batching, pipeline, transforms
from jaxdet.data import tfds as tfds_lib

# What the papers' scales give on VOC-sized images: (config, batch H x W options).
PAPER_SHAPES = {
    "classify": {(256, 512), (512, 256), (512, 512)},   # ImageNet, shorter side 256
    "localization": {(224, 224)},
    "windows": {(480, 800), (800, 480)},
    "overfeat": {(480, 800), (800, 480)},
    "rcnn": {(500, 500)},
    "fast_rcnn": {(600, 1000), (1000, 600)},
    "faster_rcnn": {(600, 1000), (1000, 600)},
    "yolo": {(448, 448)},
}


@pytest.fixture(scope="module")
def mocked():
  with cp.mock_tfds(num=8):
    yield


@pytest.mark.parametrize("preset", cp.PRESETS)
@pytest.mark.parametrize("name", cp.CONFIGS)
def test_preset_traces_at_its_true_shapes(name, preset, mocked):
  config = cp.load_config(name, preset)
  bs = min(int(config.train.batch_size), 8)   # YOLO's 64: the shapes per image are the same
  out = cp.trace(config, batch_size=bs, test_batch_size=1)   # predict on one image's shape
  h, w = out["train_batch"][1:3]
  buckets = {tuple(b) for b in (config.data.buckets or transforms.default_buckets(config.data))}
  assert (h, w) in buckets
  if preset == "paper":
    assert (h, w) in PAPER_SHAPES[name], (name, (h, w))
  assert out["loss"].shape == () and out["loss"].dtype == np.float32
  if preset == "paper":
    assert tuple(out["test_batch"][1:3]) in PAPER_SHAPES[name], (name, out["test_batch"])
  dets = out["detections"]
  k = dets["boxes"].shape[1]
  assert dets["boxes"].shape == (1, k, 4) and dets["valid"].shape == (1, k)
  assert out["params"] > 0


def test_frozen_layers_without_weights_are_an_error():
  from jaxdet.train import setup
  from experiments.configs import fast_rcnn, faster_rcnn
  for module in (fast_rcnn, faster_rcnn):
    config = module.get_config("paper")
    with pytest.raises(ValueError, match="frozen.*random initialisation"):
      setup.system_from_config(config)


def _aspect_batches(order, landscape, b):
  return [landscape[order[i:i + b]] for i in range(0, len(order), b)]


@pytest.mark.parametrize("n,b", [(23, 2), (40, 4), (7, 3), (5, 8)])
def test_aspect_grouped_order_is_a_permutation_with_pure_batches(n, b):
  r = np.random.default_rng(n * b)
  order = r.permutation(n)
  landscape = r.random(n) < 0.7
  got = batching.aspect_grouped_order(order, landscape, b)
  assert sorted(got.tolist()) == list(range(n))
  batches = _aspect_batches(got, landscape, b)
  mixed = [x for x in batches if x.any() and not x.all()]
  # Only the last one or two batches (the leftovers of both orientations) may mix.
  assert all(not (x.any() and not x.all()) for x in batches[:-2])
  assert len(mixed) <= 1
  # As many pure full batches as the two orientations' counts allow.
  pure_full = sum(1 for x in batches if len(x) == b and (x.all() or not x.any()))
  assert pure_full >= int(landscape.sum()) // b + int((~landscape).sum()) // b


def _voc_loader(config, batch_size):
  data = config.data
  return pipeline.make_loader(data, "train", batch_size=batch_size, seed=0, train=True)


def test_shorter_side_batches_never_pad_to_the_square_bucket_and_compile_once_per_bucket():
  """VOC sizes at 600 / 1000, batch 2: every batch within an epoch fits (600, 1000) or
  (1000, 600); at most the epoch's last (mixed leftovers) is (1000, 1000). Without grouping
  about half the batches would be square (67% more pixels). A jitted function traces once per
  bucket."""
  with cp.mock_tfds(num=12):
    config = cp.load_config("fast_rcnn", "paper")
    config.data.proposals.max_proposals = 0   # no proposals needed for shapes
    loader = _voc_loader(config, 2)
    traces = []

    @jax.jit
    def f(image):
      traces.append(image.shape)
      return image.sum()

    shapes = []
    for _ in range(12):   # two epochs of 6 batches
      batch = next(loader)
      shapes.append(batch["image"].shape[1:3])
      f(batch["image"])
    assert set(shapes) <= {(600, 1000), (1000, 600), (1000, 1000)}
    assert shapes.count((1000, 1000)) <= 2
    assert {(600, 1000), (1000, 600)} <= set(shapes)
    assert len(traces) == len(set(shapes))
    # The resumable state keeps its meaning: a loader restored mid-epoch continues the same.
    state = loader.get_state()
    after = [next(loader)["image_id"].tolist() for _ in range(3)]
    fresh = _voc_loader(config, 2)
    fresh.set_state(state)
    assert [next(fresh)["image_id"].tolist() for _ in range(3)] == after
    # Evaluation: one pass over every example exactly once, grouped the same way.
    ev = pipeline.make_loader(config.data, "test", batch_size=2, seed=0, train=False)
    ids, ev_shapes = [], []
    for batch in ev:
      ids += batch["image_id"][batch["example_mask"]].tolist()
      ev_shapes.append(batch["image"].shape[1:3])
    assert sorted(ids) == list(range(12))
    assert ev_shapes.count((1000, 1000)) <= 1
    # Without grouping the same data gives square batches: the grouping is what prevents them.
    config.data.group_by_aspect = False
    plain = _voc_loader(config, 2)
    assert any(next(plain)["image"].shape[1:3] == (1000, 1000) for _ in range(6))


def test_imagenet_source_is_one_centred_square_object_per_image():
  examples = cp.mock_examples("imagenet2012", 4)
  for i, raw in enumerate(examples):
    ex = tfds_lib.decode_imagenet(raw, i)
    h, w = raw["image"].shape[:2]
    s = min(h, w)
    np.testing.assert_allclose(ex["boxes"], [[(w - s) / 2, (h - s) / 2, (w + s) / 2,
                                               (h + s) / 2]])
    assert ex["labels"].tolist() == [int(raw["label"])]
  with cp.mock_tfds(num=4):
    config = cp.load_config("classify", "paper")
    src = pipeline.make_source(config.data, "train")
    assert src.num_classes == 1000 and len(src) == 4
