"""Task scores computed by the library (the pipeline's classification and segmentation scores
live in ``pipelines.metrics``)."""

from gattn.metrics.detection import (
    DETECTION_METRICS,
    detection_metric,
    score_detections,
    summarise_detection,
)

__all__ = ["DETECTION_METRICS", "detection_metric", "score_detections", "summarise_detection"]
