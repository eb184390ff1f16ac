"""MMDetection's faster_rcnn (placeholder: being written)."""
