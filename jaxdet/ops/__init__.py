"""Pure array ops, one image at a time, jit/vmap safe; no flax.

Boxes are f32[..., 4] (x1, y1, x2, y2) in absolute pixels. Fixed-capacity ops return
`(values, valid)`; variable counts travel with a boolean mask (True = real).
"""

from jaxdet.ops.anchors import anchors_inside_mask, base_anchors, grid_anchors
from jaxdet.ops.box_coder import decode_boxes, encode_boxes
from jaxdet.ops.boxes import (box_area, box_iou, clip_boxes, cxcywh_to_xyxy,
                              elementwise_box_iou, elementwise_generalized_box_iou,
                              generalized_box_iou, small_box_mask, xywh_to_xyxy,
                              xyxy_to_cxcywh, xyxy_to_xywh, xyxy_to_yxyx_normalized,
                              yxyx_normalized_to_xyxy)
from jaxdet.ops.matching import match_boxes
from jaxdet.ops.nms import batched_nms, multiclass_nms, nms
from jaxdet.ops.roi_pool import roi_align, roi_pool
from jaxdet.ops.sampling import balanced_sample_mask, sample_balanced

__all__ = [
    "anchors_inside_mask", "base_anchors", "grid_anchors", "decode_boxes", "encode_boxes",
    "box_area", "box_iou", "clip_boxes", "cxcywh_to_xyxy", "elementwise_box_iou",
    "elementwise_generalized_box_iou", "generalized_box_iou", "small_box_mask",
    "xywh_to_xyxy", "xyxy_to_cxcywh", "xyxy_to_xywh", "xyxy_to_yxyx_normalized",
    "yxyx_normalized_to_xyxy", "match_boxes", "batched_nms", "multiclass_nms", "nms",
    "roi_align", "roi_pool", "balanced_sample_mask", "sample_balanced",
]
