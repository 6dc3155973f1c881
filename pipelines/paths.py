"""Every path the DVC stages hand each other, defined once.

``dvc.yaml`` names the same folders and files as each stage's ``deps`` and ``outs``
(``tests/pipelines/test_paths.py`` checks that the two agree). A stage's command-line options
default to these, relative to the project root, where DVC runs every stage.
"""

from __future__ import annotations

from pathlib import Path

# prepare: the data set and its splits; the data report
PREPARED = Path("data/prepared")
SPLITS_JSON = "splits.json"  # inside PREPARED: the splits, classes, where the images live
COCO_SPLITS = "coco"  # inside PREPARED, detection tasks: <split>.json, COCO annotations
PREPARE_REPORTS = Path("reports/prepare")

# pretrain: the self-supervised encoder
PRETRAINED = Path("models/pretrained")
PRETRAIN_REPORTS = Path("reports/pretrain")

# tune: the best searched config per memory budget, the Pareto front
TUNED = Path("models/tune")
BEST_JSON = TUNED / "best.json"
TUNE_REPORTS = Path("reports/tune")
PARETO_JSON = TUNE_REPORTS / "pareto.json"

# finetune: the model folder (also registered in MLflow)
FINETUNED = Path("models/finetuned")
FINETUNE_REPORTS = Path("reports/finetune")

# evaluate
EVALUATE_REPORTS = Path("reports/evaluate")

# deploy: the Ray Serve config `gattn serve` runs
DEPLOYED = Path("models/deploy")
SERVE_CONFIG = DEPLOYED / "serve_config.yaml"

# not a DVC stage: `gattn explain` writes its overlays here
EXPLAIN_REPORTS = Path("reports/explain")

# the Ray run folders (checkpoints) of pretrain, tune and finetune, under each section's
# `storage` (params.yaml), are not stage outputs: a rerun of the same config resumes there.
