"""Proposals travel through sources, transforms and batching exactly like boxes."""

import numpy as np
import pytest

from jaxdet.data import pipeline, synthetic, transforms


def _source_with_gt_as_proposals(n=4, p=12):
  """Proposals = each image's gt boxes (then padding), so moved proposals must equal boxes."""
  src = pipeline.ValidatedSource(synthetic.SyntheticDetection(n, image_size=(48, 64),
                                                              min_objects=1, seed=5))
  props = np.zeros((n, p, 4), np.float32)
  mask = np.zeros((n, p), bool)
  for i in range(n):
    b = src[i]["boxes"]
    props[i, :len(b)], mask[i, :len(b)] = b, True
  return pipeline.ProposalSource(src, props, mask), props, mask


@pytest.mark.parametrize("resize", [
    {"mode": "shorter_side", "min_sizes": (40, 72), "test_min_size": 0, "max_size": 90,
     "square_size": 0},
    {"mode": "square", "min_sizes": (), "test_min_size": 0, "max_size": 0, "square_size": 56}])
def test_proposals_move_like_boxes(resize):
  src, props, mask = _source_with_gt_as_proposals()
  cfg = pipeline.default_data_config()
  cfg["resize"] = resize
  cfg["augment"] = {"hflip": True, "scale_translate": 0.3, "hsv": 1.0}
  tf = transforms.make_transform(cfg, train=True)
  for i in range(len(src)):
    for seed in range(4):
      ex = src[i]
      np.testing.assert_array_equal(ex["proposals"], props[i])
      out = tf(ex, np.random.default_rng(seed))
      p, m = out["proposals"], out["proposal_mask"]
      assert p.shape == (12, 4) and m.shape == (12,)
      # kept boxes are the proposals that remain (in order); masked rows are zero
      np.testing.assert_allclose(p[m], out["boxes"], atol=1e-4)
      np.testing.assert_array_equal(p[~m], 0)
      assert m.sum() == len(out["boxes"]) <= mask[i].sum()


def test_loader_batches_carry_padded_proposals():
  src, props, mask = _source_with_gt_as_proposals(n=3)
  cfg = pipeline.default_data_config()
  cfg["image_size"] = (48, 64)
  loader = pipeline.Loader(src, batch_size=2, max_boxes=8,
                           transform=transforms.make_transform(cfg, train=False),
                           buckets=[(48, 64)], train=False, prefetch=0)
  batches = list(loader)
  assert len(batches) == 2
  first, last = batches
  np.testing.assert_array_equal(first["proposals"], props[:2])
  np.testing.assert_array_equal(first["proposal_mask"], mask[:2])
  assert last["proposals"].shape == (2, 12, 4)
  np.testing.assert_array_equal(last["proposals"][1], 0)       # the padding example
  assert not last["proposal_mask"][1].any()


def test_make_source_computes_and_reuses_the_cache(tmp_path):
  cfg = pipeline.default_data_config()
  cfg.update(num_train=3, image_size=(48, 48), max_objects=2)
  cfg["proposals"] = {"max_proposals": 20, "mode": "fast", "cache_root": str(tmp_path),
                      "num_workers": 1}
  src = pipeline.make_source(cfg, "train")
  ex = src[1]
  assert ex["proposals"].shape == (20, 4) and ex["proposal_mask"].any()
  real = ex["proposals"][ex["proposal_mask"]]
  assert (real[:, 2] <= 48).all() and (real[:, :2] >= 0).all()
  again = pipeline.make_source(cfg, "train")[1]                 # read from the cache
  np.testing.assert_array_equal(again["proposals"], ex["proposals"])


def test_bad_proposals_named():
  src = pipeline.ValidatedSource(synthetic.SyntheticDetection(2, image_size=(32, 32)))
  with pytest.raises(ValueError, match="proposals"):
    pipeline.ProposalSource(src, np.zeros((3, 4, 4), np.float32), np.zeros((3, 4), bool))
  with pytest.raises(ValueError, match="mask"):
    pipeline.ProposalSource(src, np.zeros((2, 4, 4), np.float32), np.zeros((2, 5), bool))
