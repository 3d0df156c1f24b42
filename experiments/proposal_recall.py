r"""Selective search proposal recall: the share of ground truth covered at IoU 0.5 / 0.7.

    python -m experiments.proposal_recall --dataset synthetic --split test --num 64 \
        --modes fast,quality [--max_proposals 2000] [--cache_root DIR] [--workers 0]
    python -m experiments.proposal_recall --dataset voc2007 --split test --modes quality

Computes (or reuses) the on-disk cache of each mode (jaxdet.proposals.selective_search) and
prints one JSON line per mode: recall@{100,500,2000}_iou{0.5,0.7}, the mean number of proposals
per image and the seconds per image spent computing proposals (0 when read from the cache).
Recall bounds every detector that classifies these proposals (R-CNN, Fast R-CNN).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def main(argv: list[str]) -> list[dict]:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--dataset", default="synthetic")
  ap.add_argument("--split", default="test")
  ap.add_argument("--num", type=int, default=64, help="examples (0 = the whole split)")
  ap.add_argument("--modes", default="fast,quality")
  ap.add_argument("--max_proposals", type=int, default=2000)
  ap.add_argument("--cache_root", default="")
  ap.add_argument("--workers", type=int, default=0, help="processes (0 = every core)")
  args = ap.parse_args(argv[1:])
  from jaxdet.data import pipeline
  from jaxdet.proposals import recall, selective_search as ss
  cfg = pipeline.default_data_config(args.dataset)
  cfg["num_train" if args.split == "train" else "num_test"] = args.num
  source = pipeline.make_source(cfg, args.split)
  root = args.cache_root or os.path.join(os.path.expanduser("~"), ".cache", "jaxdet",
                                         "proposals")
  gts = [source[i]["boxes"] for i in range(len(source))]
  results = []
  for mode in args.modes.split(","):
    path = ss.split_cache_dir(root, f"recall_{args.dataset}", args.split, mode, len(source))
    start = time.perf_counter()
    ss.compute_proposals(source, path, mode=mode, max_proposals=args.max_proposals,
                         num_workers=args.workers or None)
    seconds = time.perf_counter() - start
    boxes, mask = ss.load_proposals(path)
    out = {"mode": mode, "dataset": args.dataset, "split": args.split, "images": len(source),
           **recall.proposal_recall(gts, list(boxes), list(mask)),
           "wall_s_per_image": seconds / len(source), "cache": path}
    print(json.dumps(out))
    results.append(out)
  return results


if __name__ == "__main__":
  main(sys.argv)
