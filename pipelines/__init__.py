"""The gattn pipeline: DVC stages, the Ray Train loop they share, the Ray Serve app, MLflow
tracking and the `gattn` command line."""
