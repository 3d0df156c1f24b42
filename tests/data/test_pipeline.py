"""Sources, validation and the Loader: fixed shapes, order, resumption, bad data."""

import json

import numpy as np
import pytest

from jaxdet.data import pipeline


def _cfg(**updates):
  cfg = pipeline.default_data_config()
  cfg.update(image_size=(32, 48), num_train=10, num_test=7, max_objects=3, max_boxes=4)
  cfg.update(updates)
  return cfg


def _augmented_cfg(**updates):
  cfg = _cfg(**updates)
  cfg["augment"] = {"hflip": True, "scale_translate": 0.2, "hsv": 1.5}
  return cfg


def _assert_batches_equal(a, b):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_train_batches_fixed_shapes_and_masks():
  loader = pipeline.make_loader(_augmented_cfg(), "train", batch_size=4, seed=0, train=True)
  for _ in range(4):
    b = next(loader)
    assert b["image"].shape == (4, 32, 48, 3) and b["image"].dtype == np.uint8
    assert b["boxes"].shape == (4, 4, 4) and b["boxes"].dtype == np.float32
    assert b["labels"].shape == (4, 4) and b["labels"].dtype == np.int32
    for k in ("box_mask", "difficult"):
      assert b[k].shape == (4, 4) and b[k].dtype == bool
    assert b["image_id"].dtype == np.int32 and b["example_mask"].all()
    assert b["scale"].shape == (4,) and b["image_size"].tolist() == [[32, 48]] * 4
    assert not b["boxes"][~b["box_mask"]].any()
    real = b["boxes"][b["box_mask"]]
    assert np.all(real[:, 2] > real[:, 0]) and np.all(real[:, 3] > real[:, 1])
    assert np.all(real >= 0) and np.all(real[:, 2] <= 48) and np.all(real[:, 3] <= 32)
  loader.close()


def test_train_order_epochs_and_seed():
  cfg = _cfg(prefetch=0)
  a = pipeline.make_loader(cfg, "train", batch_size=5, seed=1, train=True)
  ids = np.concatenate([next(a)["image_id"] for _ in range(4)])
  assert sorted(ids[:10].tolist()) == list(range(10))     # epoch 0 is a permutation
  assert sorted(ids[10:].tolist()) == list(range(10))     # and so is epoch 1
  assert ids[:10].tolist() != ids[10:].tolist()
  b = pipeline.make_loader(cfg, "train", batch_size=5, seed=1, train=True)
  assert np.concatenate([next(b)["image_id"] for _ in range(4)]).tolist() == ids.tolist()
  c = pipeline.make_loader(cfg, "train", batch_size=5, seed=2, train=True)
  assert np.concatenate([next(c)["image_id"] for _ in range(4)]).tolist() != ids.tolist()


def test_resume_gives_the_same_next_batches():
  """Batch size 4 over 10 examples: batches straddle epochs; augmentation on; prefetching."""
  cfg = _augmented_cfg()
  ref = pipeline.make_loader(cfg, "train", batch_size=4, seed=3, train=True)
  for _ in range(3):
    next(ref)
  state = json.loads(json.dumps(ref.get_state()))
  want = [next(ref) for _ in range(3)]
  ref.close()
  resumed = pipeline.make_loader(cfg, "train", batch_size=4, seed=3, train=True)
  resumed.set_state(state)
  for w in want:
    _assert_batches_equal(w, next(resumed))
  # set_state on a running loader rewinds it too.
  resumed.set_state(state)
  _assert_batches_equal(want[0], next(resumed))
  resumed.close()
  with pytest.raises(ValueError, match="seed"):
    pipeline.make_loader(cfg, "train", batch_size=4, seed=4, train=True).set_state(state)


def test_eval_one_pass_in_order_padded():
  loader = pipeline.make_loader(_augmented_cfg(), "test", batch_size=3, seed=0, train=False)
  assert loader.num_batches == 3
  batches = list(loader)
  assert len(batches) == 3
  ids = np.concatenate([b["image_id"] for b in batches])
  mask = np.concatenate([b["example_mask"] for b in batches])
  assert ids.tolist() == list(range(7)) + [-1, -1]
  assert mask.tolist() == [True] * 7 + [False] * 2
  assert not batches[-1]["box_mask"][1:].any()
  # Evaluation is not augmented: pixels are the source's.
  src = pipeline.make_source(_cfg(), "test")
  np.testing.assert_array_equal(batches[1]["image"][0], src[3]["image"])
  with pytest.raises(StopIteration):
    next(loader)
  again = list(loader)                          # a finished pass starts over
  assert np.concatenate([b["image_id"] for b in again]).tolist() == ids.tolist()


def test_ml_collections_config():
  ml_collections = pytest.importorskip("ml_collections")
  cfg = ml_collections.ConfigDict(_cfg(prefetch=0))
  cfg.buckets = [(40, 48)]
  cfg.augment.hflip = False
  b = next(pipeline.make_loader(cfg, "train", batch_size=2, seed=0, train=True))
  assert b["image"].shape == (2, 40, 48, 3) and not b["image"][:, 32:].any()


def test_batch_size_divisible_by_devices():
  cfg = _cfg()
  with pytest.raises(ValueError, match="multiple of num_devices"):
    pipeline.make_loader(cfg, "train", batch_size=3, seed=0, train=True, num_devices=2)


def _user_examples(rng, n=6, h=20, w=30):
  out = []
  for i in range(n):
    k = i % 3                                    # includes images without objects
    xy = rng.uniform(0, 10, (k, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(1, 9, (k, 2))], 1).astype(np.float32)
    out.append({"image": rng.integers(0, 255, (h, w, 3), dtype=np.uint8), "boxes": boxes,
                "labels": rng.integers(0, 2, k).astype(np.int32), "image_id": 50 + i})
  return out


def test_user_examples_and_bad_data_named_by_example(rng):
  good = _user_examples(rng)
  cfg = _cfg(name="examples", image_size=(20, 30), prefetch=1)
  loader = pipeline.make_loader(cfg, "test", batch_size=4, seed=0, train=False, examples=good,
                                class_names=("a", "b"))
  batches = list(loader)
  assert np.concatenate([b["image_id"] for b in batches]).tolist()[:6] == list(range(50, 56))
  np.testing.assert_array_equal(batches[0]["boxes"][2, :2], good[2]["boxes"])
  src = pipeline.source_from_examples(good, ("a", "b"))
  assert len(src) == 6 and src.num_classes == 2

  def bad(i, **updates):
    examples = [dict(e) for e in good]
    examples[i].update(updates)
    return pipeline.source_from_examples(examples, ("a", "b"))
  with pytest.raises(ValueError, match=r"example 52.*outside"):
    bad(2, boxes=np.float32([[1, 1, 5, 5], [20, 2, 31, 8]]))[2]
  with pytest.raises(ValueError, match=r"example 52.*zero area"):
    bad(2, boxes=np.float32([[1, 1, 5, 5], [3, 2, 3, 8]]))[2]
  with pytest.raises(ValueError, match=r"example 52.*x2 < x1"):
    bad(2, boxes=np.float32([[1, 1, 5, 5], [6, 2, 3, 8]]))[2]
  with pytest.raises(ValueError, match=r"example 52.*label 2"):
    bad(2, labels=np.int32([0, 2]))[2]
  with pytest.raises(TypeError, match=r"example 51.*uint8"):
    bad(1, image=np.zeros((20, 30, 3), np.float32))[1]
  with pytest.raises(ValueError, match=r"example 51.*\(H, W, 3\)"):
    bad(1, image=np.zeros((20, 30, 4), np.uint8))[1]
  with pytest.raises(ValueError, match=r"example 51.*not finite"):
    bad(1, boxes=np.float32([[1, 1, np.nan, 5]]))[1]
  many = [dict(e) for e in good]
  many[4]["boxes"] = np.float32([[1, 1, 5, 5]] * 6)
  many[4]["labels"] = np.zeros(6, np.int32)
  with pytest.raises(ValueError, match=r"example 54.*exceed max_boxes=4.*box_policy"):
    pipeline.make_loader(cfg, "test", batch_size=2, seed=0, train=False, examples=many,
                         class_names=("a", "b"))   # every example is checked up front
  # Errors raised in the prefetch thread reach the caller, with the example id.
  loader = pipeline.Loader(pipeline.ValidatedSource(pipeline.ListSource(many, ("a", "b"))),
                           batch_size=2, max_boxes=4, transform=lambda ex, rng: ex,
                           buckets=[(20, 30)], train=False, prefetch=1)
  with pytest.raises(ValueError, match=r"example 54.*exceed max_boxes=4.*box_policy"):
    list(loader)
  with pytest.raises(ValueError, match="examples"):
    pipeline.make_source(cfg, "train")


def test_shorter_side_buckets(rng):
  examples = [{"image": rng.integers(0, 255, hw + (3,), dtype=np.uint8),
               "boxes": np.float32([[1, 1, 10, 10]]), "labels": np.zeros(1, np.int32)}
              for hw in [(30, 40), (40, 30), (20, 60), (36, 36)]]
  cfg = _cfg(name="examples", prefetch=0)
  cfg["resize"] = {"mode": "shorter_side", "min_sizes": (24, 32), "max_size": 48}
  loader = pipeline.make_loader(cfg, "train", batch_size=1, seed=0, train=True,
                                examples=examples, class_names=("a",))
  shapes = {next(loader)["image"].shape[1:3] for _ in range(12)}
  assert shapes <= {(32, 48), (48, 32), (48, 48)} and len(shapes) >= 2
  loader = pipeline.make_loader(cfg, "test", batch_size=4, seed=0, train=False,
                                examples=examples, class_names=("a",))
  b = next(loader)
  assert b["image"].shape[1:3] == (32, 48)    # the smallest bucket holding 32 x 48
  assert b["image_size"].tolist() == [[24, 32], [32, 24], [16, 48], [24, 24]]
  np.testing.assert_allclose(b["scale"], [0.8, 0.8, 0.8, 2 / 3], rtol=1e-6)


def test_default_configs_share_keys():
  base = pipeline.default_data_config()
  assert base["image_size"] == (128, 128) and base["max_objects"] == 4
  assert base["max_boxes"] == 8
  for name in ("synthetic_single", "voc2007", "voc2012", "coco2017", "examples"):
    cfg = pipeline.default_data_config(name)
    assert cfg.keys() == base.keys() and cfg["resize"].keys() == base["resize"].keys()
    assert all(v is not None for v in cfg.values())
  assert pipeline.default_data_config("voc2007")["num_train"] == 0       # all of VOC
  with pytest.raises(ValueError, match="name"):
    pipeline.default_data_config("imagenet")
  single = next(pipeline.make_loader(_cfg(name="synthetic_single", prefetch=0), "train",
                                     batch_size=2, seed=0, train=True))
  assert single["box_mask"].sum(1).tolist() == [1, 1]
