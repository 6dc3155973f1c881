"""``gattn tune``: the stage that runs the search (see :mod:`pipelines.stages.tune`).

Gathers what every trial shares once (:func:`data_context`: where the data are, the class
weights, each family's initial weights; each trial reads its own batches from the files), runs
the Ray Tune sweep (:func:`sweep`: Optuna TPE + ASHA, one function trainable per trial,
``cpus_per_trial`` CPUs each, ``max_concurrent`` at once) and writes the outputs
(:func:`pipelines.stages.tune.results.write_outputs`).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any, cast

import torch

from gattn.models import DET_RECIPES
from pipelines.config import ParamsError, TuneParams, add_params_arguments, load_params
from pipelines.data import (
    HeldSplit,
    held_split,
    native_size,
    read_splits,
    stream,
)
from pipelines.init_weights import InitWeights, resolve_init
from pipelines.metrics import METRIC, class_counts, class_weights
from pipelines.paths import PREPARED, PRETRAINED, TUNE_REPORTS, TUNED
from pipelines.stages.tune.results import log_trials, trial_row, write_outputs
from pipelines.stages.tune.scheduler import points_run_to_end
from pipelines.stages.tune.space import check_params, search_space, trial_id
from pipelines.stages.tune.trial import TrialContext, trainable


def family_inits(p: TuneParams, pretrained: Path | None) -> dict[str, InitWeights]:
    """Each family's initial weights (``tune.families.<name>.init``), read once per source:
    ``ssl`` without a pretrained encoder starts from scratch, as before the pretrain stage
    has run; a missing file, package or (``hub``) network is an error before any trial."""
    inits: dict[str, InitWeights] = {}
    read: dict[tuple[str, str], InitWeights] = {}
    for name, family in sorted(p.families.items()):
        backbone = family_backbone(family.backbone)
        key = (family.init, backbone if family.init == "hub" else "")
        if key not in read:
            read[key] = resolve_init(family.init, backbone, pretrained, require_encoder=False)
        inits[name] = read[key]
    return inits


def family_backbone(name: str) -> str:
    """The timm backbone of a family: its ``backbone``, or a detector recipe's."""
    return str(DET_RECIPES[name]["backbone"]) if name in DET_RECIPES else name


def split_class_counts(held: HeldSplit, num_classes: int, workers: int = 0) -> torch.Tensor:
    """:func:`pipelines.metrics.class_counts` of a whole split, read as a stream: a
    classification split's labels from its index (nothing decoded), a segmentation split's
    masks batch by batch at the held size (``workers`` loader processes)."""
    data = held.open()
    if held.kind == "cls":
        samples = cast(Any, data.split.dataset).samples  # every cls data set indexes them
        labels = torch.tensor([samples[i][1] for i in data.split.indices])
        return class_counts(labels, num_classes)
    counts = torch.zeros(num_classes, dtype=torch.long)
    for _, targets, _ in stream(data, workers=workers):
        counts += class_counts(targets, num_classes)
    return counts


def data_context(prepared: Path, pretrained: Path | None, p: TuneParams, seed: int) -> TrialContext:
    """What every trial shares: where its data are (:class:`pipelines.data.HeldSplit`, at the
    data's own size; each trial reads its own batches and resizes them to its resolution),
    classes, channels, the class weights (one streamed pass over the training split), each
    family's initial weights (:func:`family_inits`; ``pretrained``: the pretrain stage's
    folder, for ``ssl``) and the device. Nothing here grows with the data set."""
    info = read_splits(prepared)
    problem = p.det_families_error(info["kind"])
    if problem:
        raise ParamsError(f"{problem} (data.task {info['task']!r})")
    inits = family_inits(p, pretrained)  # a missing file fails before the data loads
    num_classes = len(info["classes"])
    size = native_size(prepared, max(p.img_sizes))  # your images: any sizes, held at the largest
    train = held_split(prepared, "train", p.max_train_samples, size)
    val = held_split(prepared, "val", p.max_val_samples, size)
    weight = None
    if p.balance_classes and train.kind != "det":  # a detector's focal loss takes no weights
        weight = class_weights(split_class_counts(train, num_classes, p.loader_workers))
    use_gpu = p.gpus_per_trial > 0 and torch.cuda.is_available()
    return TrialContext(
        params=p,
        seed=seed,
        kind=train.kind,
        num_classes=num_classes,
        in_chans=int(train.open()[0][0].shape[0]),
        train=train,
        val=val,
        class_weight=weight,
        inits=inits,
        device="cuda" if use_gpu else "cpu",
        threads=p.cpus_per_trial,
    )


def sweep(p: TuneParams, context: TrialContext, name: str) -> tuple[list[dict[str, Any]], float]:
    """Run the Ray Tune sweep; returns a row per trial and the wall time."""
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    from pipelines.ray_session import local_ray

    metric = "quality"
    searcher = OptunaSearch(
        metric=metric,
        mode="max",
        seed=context.seed,
        points_to_evaluate=p.points(context.kind) or None,  # less keys the task lacks
    )
    scheduler = points_run_to_end(
        p.points(context.kind),
        time_attr="training_iteration",
        max_t=p.epochs,
        grace_period=p.grace_period,
        reduction_factor=p.reduction_factor,
    )
    resources = {
        "cpu": p.cpus_per_trial,
        "gpu": p.gpus_per_trial if context.device == "cuda" else 0,
    }
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(trainable, context=context), resources),
        param_space=search_space(p, context.kind),
        tune_config=tune.TuneConfig(
            metric=metric,
            mode="max",
            search_alg=searcher,
            scheduler=scheduler,
            num_samples=p.num_samples,
            max_concurrent_trials=p.max_concurrent,
            time_budget_s=p.time_budget_s,
            reuse_actors=True,  # a trial process keeps torch, timm and the data loaded
        ),
        run_config=tune.RunConfig(
            name=name,
            storage_path=str(Path(p.storage).resolve()),
            failure_config=tune.FailureConfig(max_failures=0),
            # Each epoch's report carries the weights: keep only each trial's latest.
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            verbose=0,
        ),
    )
    # Keeping one checkpoint per trial (above) makes Tune snapshot the experiment at every
    # checkpoint, and with trials checkpointing each epoch it warned of "excessive" snapshots
    # (12 warnings of 4 lines per default sweep); on the run's own storage they are cheap.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    with local_ray(p.max_concurrent * p.cpus_per_trial, resources["gpu"] > 0):
        t0 = time.perf_counter()
        grid = tuner.fit()
        wall = time.perf_counter() - t0
    return [trial_row(grid[i]) for i in range(len(grid))], wall


def tune_stage(
    p: TuneParams,
    seed: int = 0,
    prepared: Path = PREPARED,
    pretrained: Path | None = PRETRAINED,
    out_dir: Path = TUNED,
    reports_dir: Path = TUNE_REPORTS,
) -> dict[str, Any]:
    """Run the stage; returns ``{"metrics", "rows", "name"}``.

    Args:
        p: The ``tune`` section.
        seed: The global seed (searcher, initialisation, data order).
        prepared: The prepare stage's output.
        pretrained: The pretrain stage's output, for families with ``init: ssl`` (None or
            missing: they train from scratch).
        out_dir: Where ``best.json`` goes.
        reports_dir: Where trials, the Pareto front, its plot and metrics go.
    """
    check_params(p)
    context = data_context(Path(prepared), pretrained, p, seed)
    name = f"tune-{time.strftime('%Y%m%d-%H%M%S')}-{trial_id(p.model_dump(mode='json'))}"
    rows, wall = sweep(p, context, name)
    measured_on = {
        "split": "val",
        "images": len(context.val.open()),
        "size": context.val.size,
        "metric": METRIC[context.kind],
    }
    metrics = write_outputs(
        rows, p, context.kind, wall, Path(out_dir), Path(reports_dir), measured_on
    )
    if not metrics["num_ok"]:
        raise RuntimeError(
            f"tune: none of {len(rows)} trials finished an epoch (statuses in "
            f"{Path(reports_dir) / 'trials.csv'}); on a busy machine raise tune.time_budget_s "
            "or lower tune.max_concurrent"
        )
    return {"metrics": metrics, "rows": rows, "name": name}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_params_arguments(parser)
    parser.add_argument("--data", type=Path, default=PREPARED, help="prepared data folder")
    parser.add_argument(
        "--pretrained", type=Path, default=PRETRAINED, help="pretrained encoder folder"
    )
    parser.add_argument("--out", type=Path, default=TUNED, help="folder for best.json")
    parser.add_argument("--reports", type=Path, default=TUNE_REPORTS, help="report folder to write")


def run(args: argparse.Namespace) -> int:
    import mlflow

    from pipelines import tracking

    params = load_params(args.params, args.overrides)
    with tracking.stage_run(
        "tune", params.model_dump(include={"seed", "tune"}), params.tracking.experiment
    ) as parent:
        out = tune_stage(
            params.tune, params.seed, args.data, args.pretrained, args.out, args.reports
        )
        mlflow.log_metrics({k: float(v) for k, v in out["metrics"].items()})
        mlflow.set_tag("gattn.ray_run", out["name"])
        mlflow.log_artifacts(str(args.reports), artifact_path="tune")
        mlflow.log_artifacts(str(args.out), artifact_path="best")
        log_trials(out["rows"], parent.info.experiment_id, parent.info.run_id)
    m = out["metrics"]
    print(
        f"tune: {m['num_trials']} trials ({m['num_ok']} trained, {m['num_infeasible']} infeasible, "
        f"{m['num_error'] + m['num_oom']} failed) in {m['wall_s']:.0f}s; best quality "
        f"{m['best_quality']:.4f}; see {args.reports / 'pareto.csv'} and {args.out / 'best.json'}"
    )
    return 0
