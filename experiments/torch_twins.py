"""The torchvision-built twins of jaxdet's region detectors, for the speed comparisons.

Imported only where torch and torchvision are: every function takes the modules it needs.
One definition serves `bench_fast_rcnn`, `bench_faster_rcnn` and `bench_speedups`, so that
they time the same twins:

* `vgg16_parts`: VGG16's conv part to conv5_3 + ReLU (stride 16, no pool5), its fc6/fc7 (with
  ReLU and dropout, as torchvision's classifier) and fresh heads as jaxdet's Fast R-CNN has
  them: (C + 1)-way scores and 4 C class-specific box deltas.
* `faster_rcnn`: `torchvision.models.detection.FasterRCNN` on those parts, with Fast R-CNN's
  RoI max pooling (7 x 7 at 1/16) in place of its RoI align.
"""

from __future__ import annotations

from typing import Any, Sequence


def vgg16_parts(torch: Any, torchvision: Any, num_classes: int, device: Any) -> dict[str, Any]:
  """{"conv5": conv1_1..conv5_3 + ReLU, "fc": fc6, ReLU, dropout, fc7, ReLU, dropout,
  "cls": Linear(4096, C + 1), "bbox": Linear(4096, 4 C)}, random weights, on `device`."""
  vgg = torchvision.models.vgg16(weights=None).to(device)
  return {"conv5": vgg.features[:-1],
          "fc": torch.nn.Sequential(*list(vgg.classifier)[:-1]),
          "cls": torch.nn.Linear(4096, num_classes + 1).to(device),
          "bbox": torch.nn.Linear(4096, 4 * num_classes).to(device)}


def roi_max_pool(torchvision: Any, output_size: int = 7, spatial_scale: float = 1 / 16) -> Any:
  """Fast R-CNN's RoI max pooling on FasterRCNN's single feature map "0". FasterRCNN accepts
  only a MultiScaleRoIAlign as its box_roi_pool, so this subclasses it and replaces forward."""

  class RoIMaxPool(torchvision.ops.MultiScaleRoIAlign):

    def __init__(self):
      super().__init__(["0"], output_size, 2)

    def forward(self, features, proposals, image_shapes):
      return torchvision.ops.roi_pool(features["0"], proposals, output_size, spatial_scale)

  return RoIMaxPool()


def faster_rcnn(torch: Any, torchvision: Any, parts: dict[str, Any], *, num_classes: int,
                image_hw: Sequence[int], anchor_scales: Sequence[float],
                rpn_pre_test: int, rpn_post_test: int, rpn_pre_train: int = 12000,
                rpn_post_train: int = 2000, device: Any = "cpu") -> Any:
  """torchvision's FasterRCNN with `parts` (see `vgg16_parts`): anchors `anchor_scales` x
  ratios (0.5, 1, 2) at stride 16, RPN NMS 0.7 with the given top-n, 256 anchors and 128
  RoIs sampled per image, RoI max pooling, per-class NMS 0.3, 100 detections; images resized
  to exactly `image_hw` (min_size / max_size)."""
  from torchvision.models.detection import FasterRCNN
  from torchvision.models.detection.anchor_utils import AnchorGenerator
  from torchvision.models.detection.faster_rcnn import FastRCNNPredictor

  fc = parts["fc"]

  class FC67(torch.nn.Module):
    def __init__(self):
      super().__init__()
      self.fc = fc

    def forward(self, x):
      return self.fc(torch.flatten(x, 1))

  backbone = parts["conv5"]
  backbone.out_channels = 512
  h, w = image_hw
  return FasterRCNN(
      backbone, num_classes=None, min_size=min(h, w), max_size=max(h, w),
      rpn_anchor_generator=AnchorGenerator(sizes=(tuple(int(a) for a in anchor_scales),),
                                           aspect_ratios=((0.5, 1.0, 2.0),)),
      rpn_pre_nms_top_n_train=rpn_pre_train, rpn_post_nms_top_n_train=rpn_post_train,
      rpn_pre_nms_top_n_test=rpn_pre_test, rpn_post_nms_top_n_test=rpn_post_test,
      rpn_nms_thresh=0.7, rpn_batch_size_per_image=256, box_batch_size_per_image=128,
      box_roi_pool=roi_max_pool(torchvision), box_head=FC67(),
      box_predictor=FastRCNNPredictor(4096, num_classes + 1),
      box_score_thresh=0.05, box_nms_thresh=0.3, box_detections_per_img=100).to(device)
