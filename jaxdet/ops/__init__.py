"""Pure array ops, one image at a time, jit/vmap safe; no flax.

Boxes are f32[..., 4] (x1, y1, x2, y2) in absolute pixels. Fixed-capacity ops return
`(values, valid)`; variable counts travel with a boolean mask (True = real).

The functions `nms` and `roi_pool` are not re-exported here: they share their modules' names,
and a re-export would hide the modules (`import jaxdet.ops.nms as m` would give the function).
Call them as `jaxdet.ops.nms.nms` and `jaxdet.ops.roi_pool.roi_pool`.
"""

from jaxdet.ops.anchors import anchors_inside_mask, base_anchors, grid_anchors
from jaxdet.ops.box_coder import decode_boxes, encode_boxes
from jaxdet.ops.boxes import (box_area, box_iou, clip_boxes, cxcywh_to_xyxy,
                              elementwise_box_iou, elementwise_generalized_box_iou,
                              finite_box_mask, generalized_box_iou, small_box_mask, xywh_to_xyxy,
                              xyxy_to_cxcywh, xyxy_to_xywh, xyxy_to_yxyx_normalized,
                              yxyx_normalized_to_xyxy)
from jaxdet.ops.matching import match_boxes
from jaxdet.ops.nms import batched_nms, multiclass_nms
from jaxdet.ops.roi_pool import roi_align
from jaxdet.ops.sampling import balanced_sample_mask, sample_balanced

__all__ = [
    "anchors_inside_mask", "base_anchors", "grid_anchors", "decode_boxes", "encode_boxes",
    "box_area", "box_iou", "clip_boxes", "cxcywh_to_xyxy", "elementwise_box_iou",
    "elementwise_generalized_box_iou", "finite_box_mask", "generalized_box_iou", "small_box_mask",
    "xywh_to_xyxy", "xyxy_to_cxcywh", "xyxy_to_xywh", "xyxy_to_yxyx_normalized",
    "yxyx_normalized_to_xyxy", "match_boxes", "batched_nms", "multiclass_nms",
    "roi_align", "balanced_sample_mask", "sample_balanced",
]
