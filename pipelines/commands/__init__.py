"""The ``gattn`` commands that are not DVC stages: ``pipeline`` (every stage under one MLflow
parent run), ``launch`` (a stage as a Ray job on a cluster), ``explain`` and ``recommend``."""
