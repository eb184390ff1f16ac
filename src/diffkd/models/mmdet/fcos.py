"""MMDetection's fcos (placeholder: being written)."""
