r"""RPN proposal recall (at 300 proposals) against selective search (at 2000), same images.

    python -m experiments.rpn_recall --config experiments/configs/faster_rcnn.py:cpu \
        --workdir /tmp/frcnn [--num 64] [--ss_mode fast] [--no_ss]

Restores the latest checkpoint of a trained `faster_rcnn` workdir, runs the RPN alone as a
proposal generator (`system.extras.proposals`: test settings, e.g. 6000 -> NMS 0.7 -> 300)
on the first `--num` images of `config.eval.split`, and prints one JSON line per method with
recall@{k}_iou{0.5,0.7} (`jaxdet.proposals.recall.proposal_recall`: the share of ground-truth
boxes whose best IoU with the first k proposals reaches the threshold) and seconds per image.
Selective search runs on the same (resized) images on the host, 2000 proposals, OpenCV's fast
or quality mode. The paper (Table 1/Figure 2): RPN at 300 proposals recalls about as well as
selective search at 2000.
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np


def main(argv: list[str]) -> list[dict]:
  from experiments.configs import common

  def define(fv):
    from absl import flags
    flags.DEFINE_string("workdir", None, "a trained faster_rcnn workdir", flag_values=fv)
    flags.DEFINE_integer("num", 64, "images of the eval split", flag_values=fv)
    flags.DEFINE_string("ss_mode", "fast", "selective search mode: fast | quality",
                        flag_values=fv)
    flags.DEFINE_bool("no_ss", False, "skip selective search", flag_values=fv)

  config, fv = common.parse_flags(argv, define)
  import jax
  from jaxdet.proposals import recall
  from jaxdet.train import loop, setup

  system = setup.system_from_config(config)
  make_loader = setup.default_make_loader()
  loader = make_loader(config.data, config.eval.split, batch_size=int(config.eval.batch_size),
                       seed=int(config.seed), train=False)
  state = loop.restore_for_inference(config, fv.workdir, system, setup.peek(loader))
  proposals = jax.jit(system.extras.proposals)
  gts, images, rpn_boxes, rpn_masks = [], [], [], []
  seconds = 0.0
  for batch in loader:
    keep = np.asarray(batch.get("example_mask", np.ones(len(batch["image"]), bool)))
    inputs = {k: v for k, v in batch.items() if k != "example_mask"}
    start = time.perf_counter()
    out = jax.device_get(jax.block_until_ready(proposals(state.variables, inputs)))
    seconds += time.perf_counter() - start
    for i in np.flatnonzero(keep):
      if len(gts) == fv.num:
        break
      gts.append(np.asarray(batch["boxes"][i])[np.asarray(batch["box_mask"][i])])
      h, w = (int(v) for v in batch["image_size"][i])
      images.append(np.asarray(batch["image"][i])[:h, :w])
      rpn_boxes.append(out["boxes"][i])
      rpn_masks.append(out["valid"][i])
    if len(gts) == fv.num:
      break
  k = int(rpn_boxes[0].shape[0])
  results = [{"method": "rpn", "images": len(gts), "proposals": k,
              **recall.proposal_recall(gts, rpn_boxes, rpn_masks, top_k=(50, 100, k)),
              "s_per_image_incl_first_compile": seconds / max(len(gts), 1)}]
  if not fv.no_ss:
    from jaxdet.proposals import selective_search as ss
    start = time.perf_counter()
    found = [ss.selective_search(im, mode=fv.ss_mode, max_proposals=2000) for im in images]
    ss_seconds = time.perf_counter() - start
    results.append({"method": f"selective_search_{fv.ss_mode}", "images": len(gts),
                    "proposals": 2000,
                    **recall.proposal_recall(gts, [b for b, _ in found], [m for _, m in found],
                                             top_k=(k, 2000)),
                    "s_per_image": ss_seconds / max(len(gts), 1)})
  for r in results:
    print(json.dumps(r))
  return results


if __name__ == "__main__":
  main(sys.argv)
