r"""R-CNN test time per image, broken down: proposals, warp, CNN, SVMs, regression, NMS.

    python -m experiments.bench_rcnn --mode small     # the cpu preset's scale (CPU)
    python -m experiments.bench_rcnn --mode paper     # VGG16, ~2000 proposals, 600x1000 (GPU)

small: a 128x128 synthetic image, selective search fast mode (at most 256 proposals), the
  tiny backbone on 48x48 regions (the rcnn cpu preset), C = 6, float32.
paper: a 600x1000 synthetic image, selective search quality mode, 2000 proposals (padded
  to 2000 if fewer), VGG16 on 224x224 regions with 16 px context, bfloat16, C = 20.

Each part is its own jitted function, timed after compilation with block_until_ready (median
of --repeats runs): proposals (OpenCV selective search on the host, one image), warp
(crop_and_resize of every proposal), CNN (pool5 and fc7 of every warped region, in chunks),
SVMs (fc7 x W + b for all classes), regression (pool5 x W_reg per class, decode, clip) and NMS
(per-class NMS at 0.3 over every (proposal, class) pair). Weights are random: the time does not
depend on them. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np


def main(argv: list[str]) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--mode", choices=("small", "paper"), default="small")
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--proposal_repeats", type=int, default=3)
  args = ap.parse_args(argv[1:])

  import jax
  import jax.numpy as jnp
  from experiments import benchlib
  from jaxdet.data import synthetic
  from jaxdet.models import backbones, rcnn
  from jaxdet.ops import box_coder, boxes as box_ops, crop_resize
  from jaxdet.ops.nms import multiclass_nms
  from jaxdet.proposals import selective_search as ss

  small = args.mode == "small"
  if small:
    from experiments.configs import rcnn as rcnn_config
    cfg = rcnn_config.get_config("cpu")
    h, w, p, mode, dtype = 128, 128, 256, "fast", jnp.float32
  else:
    from experiments.configs import rcnn as rcnn_config
    cfg = rcnn_config.get_config("paper")
    h, w, p, mode, dtype = 600, 1000, 2000, "quality", jnp.bfloat16
  m = rcnn.Settings.from_config(cfg)
  s, ctx, c = m.input_size, m.context, m.num_classes
  image = synthetic.SyntheticDetection(1, image_size=(h, w), max_objects=6, seed=1)[0]["image"]

  # proposals (host)
  times = []
  for _ in range(args.proposal_repeats):
    start = time.perf_counter()
    props, pmask = ss.selective_search(image, mode=mode, max_proposals=p)
    times.append(time.perf_counter() - start)
  t_props = statistics.median(times)
  n_real = int(pmask.sum())
  pmask = np.ones_like(pmask)   # time all P slots (padding rows cost the same)

  net = rcnn.make_network(m, dtype)
  params = net.init(jax.random.PRNGKey(0), jnp.zeros((1, s, s, 3), dtype))["params"]
  img = jnp.asarray(image)[None]
  size = jnp.asarray([[h, w]], jnp.int32)
  rois = jnp.asarray(props)[None]
  mask = jnp.asarray(pmask)[None]

  warp = jax.jit(lambda im, r, mk: crop_resize.batch_crop_and_resize(
      backbones.normalize_images(im, jnp.float32), r, (s, s), context=ctx, image_size=size,
      mask=mk, dtype=dtype))
  warped = warp(img, rois, mask)
  chunk = min(m.chunk, p)

  @jax.jit
  def cnn(params, x):
    x = x[0]                                                  # [P, S, S, 3]
    pad = -x.shape[0] % chunk
    x = jnp.pad(x, ((0, pad), (0, 0), (0, 0), (0, 0))).reshape((-1, chunk) + x.shape[1:])
    out = jax.lax.map(lambda xc: net.apply({"params": params}, xc), x)
    return jax.tree_util.tree_map(lambda t: t.reshape((-1,) + t.shape[2:])[:p], out)

  feats = cnn(params, warped)
  fdim, pdim = feats["fc7"].shape[-1], feats["pool5"].shape[-1]
  key = jax.random.PRNGKey(1)
  svm_w = jax.random.normal(key, (fdim, c)) * 0.01
  svm_b = jnp.zeros((c,))
  reg_w = jax.random.normal(key, (c, pdim, 4)) * 1e-4
  reg_b = jnp.zeros((c, 4))
  svm = jax.jit(lambda f: f @ svm_w + svm_b)
  scores = svm(feats["fc7"])

  @jax.jit
  def regress(pool5, r):
    deltas = jnp.einsum("rd,cdk->rck", pool5, reg_w) + reg_b[None]
    anchors = jnp.broadcast_to(r[:, None], (r.shape[0], c, 4))
    return box_ops.clip_boxes(box_coder.decode_boxes(deltas, anchors), h, w)

  boxes = regress(feats["pool5"], rois[0])
  pred = m.predict
  post = jax.jit(lambda b, sc: multiclass_nms(
      b, sc, iou_threshold=pred.nms_iou, max_output=pred.max_detections,
      score_threshold=pred.score_threshold, pre_nms_topk=pred.pre_nms_topk,
      mask=mask[0]))

  def median_s(fn, *fn_args):
    return benchlib.time_jax(fn, fn_args, args.repeats).median_s

  t = {"proposals_s": t_props,
       "warp_s": median_s(warp, img, rois, mask),
       "cnn_s": median_s(cnn, params, warped),
       "svm_s": median_s(svm, feats["fc7"]),
       "regression_s": median_s(regress, feats["pool5"], rois[0]),
       "nms_s": median_s(post, boxes, scores)}
  out = {"mode": args.mode, "device": str(jax.devices()[0]), "image": [h, w],
         "proposals_capacity": p, "proposals_found": n_real, "selective_search": mode,
         "backbone": m.backbone, "input_size": s, "dtype": jnp.dtype(dtype).name,
         "num_classes": c, **t,
         "total_s": sum(t.values()), "total_without_proposals_s": sum(t.values()) - t_props}
  print(json.dumps(out))
  return out


if __name__ == "__main__":
  main(sys.argv)
