"""VOC and COCO average precision, drawing detections."""
