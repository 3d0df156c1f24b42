"""README's "Write your own loss": the example term is a focal loss (checked against float64
NumPy) and Faster R-CNN trains with it when the config names it by its dotted path."""

import jax
import jax.numpy as jnp
import numpy as np

from experiments import own_loss_example
from jaxdet.models import faster_rcnn

SMALL = {
    "num_classes": 3, "backbone": "tiny",
    "backbone_kw": {"stride": 8, "widths": (8, 8, 16), "fc_features": (32,), "roi_size": 2},
    "dropout_rate": 0.0, "rpn_channels": 16, "anchor_scales": (16.0, 32.0),
    "anchor_ratios": (1.0,), "rpn_targets": {"num_samples": 32},
    "rpn_proposals": {"train": {"pre_nms_topk": 64, "post_nms_topk": 16, "min_size": 2.0},
                      "test": {"pre_nms_topk": 64, "post_nms_topk": 8, "min_size": 2.0}},
    "sampler": {"rois_per_image": 8}, "predict": {"max_detections": 5},
}


def _focal64(x, t, mask):
  p = 1.0 / (1.0 + np.exp(-x))
  p_t = np.where(t > 0.5, p, 1.0 - p)
  return np.where(mask, -(1.0 - p_t) ** 2 * np.log(p_t), 0.0)


def test_the_example_term_is_the_focal_loss_and_ignores_masked_garbage(rng):
  x = rng.normal(0, 3, 200)
  t = (rng.random(200) < 0.3).astype(np.float64)
  mask = rng.random(200) < 0.8
  x_in = np.where(mask, x, np.nan).astype(np.float32)
  got = own_loss_example.objectness_focal(jnp.asarray(x_in), jnp.asarray(t, jnp.float32),
                                          jnp.asarray(mask))
  # float32 logistic and log-sigmoid on XLA:CPU: up to ~2e-4 relative at |logit| ~ 11
  np.testing.assert_allclose(np.asarray(got), _focal64(x.astype(np.float32), t, mask),
                             rtol=1e-3, atol=1e-7)
  g = jax.grad(lambda v: jnp.sum(own_loss_example.objectness_focal(
      v, jnp.asarray(t, jnp.float32), jnp.asarray(mask))))(jnp.asarray(x_in))
  assert np.isfinite(np.asarray(g)).all() and not np.asarray(g)[~mask].any()


def test_faster_rcnn_trains_with_the_example_term_by_its_dotted_path(rng):
  b, size = 2, 32
  xy = rng.uniform(0, size - 14, (b, 2, 2))
  batch = {"image": rng.integers(0, 256, (b, size, size, 3), dtype=np.uint8),
           "image_size": np.full((b, 2), size, np.int32),
           "boxes": np.concatenate([xy, xy + rng.uniform(6, 14, xy.shape)], -1).astype(np.float32),
           "labels": rng.integers(0, 3, (b, 2)).astype(np.int32),
           "box_mask": np.ones((b, 2), bool)}
  def system(**loss):
    return faster_rcnn.build_system({"model": {**SMALL, "loss": loss}, "compute_dtype": "float32"})
  focal = system(rpn_objectness="experiments.own_loss_example:objectness_focal")
  variables = focal.init(jax.random.PRNGKey(0), batch)
  key = jax.random.PRNGKey(1)
  (total, (metrics, _)), grads = jax.jit(jax.value_and_grad(
      lambda v: (lambda out: (out[0], out[1:]))(focal.loss(v, batch, key)), has_aux=True))(variables)
  _, bce, _ = jax.jit(system().loss)(variables, batch, key)
  # the same sampled anchors: the focal term is below the cross-entropy (p_t > 0 everywhere)
  assert 0.0 < float(metrics["loss/rpn_objectness"]) < float(bce["loss/rpn_objectness"])
  np.testing.assert_allclose(float(metrics["loss/rpn_box"]), float(bce["loss/rpn_box"]), rtol=1e-6)
  leaves = jax.tree_util.tree_leaves(grads)
  assert all(np.isfinite(np.asarray(g)).all() for g in leaves) and np.isfinite(float(total))
