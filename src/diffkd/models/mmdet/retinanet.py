"""MMDetection's retinanet (placeholder: being written)."""
