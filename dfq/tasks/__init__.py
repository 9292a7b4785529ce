"""Tasks: data, preprocessing, metrics and evaluate() for classification, segmentation, detection."""
