"""The tune stage: budget screening, failure isolation, outputs, MLflow children, recommend."""

from __future__ import annotations

import csv
import dataclasses
import json
import pickle
import random
from pathlib import Path

import mlflow
import pytest
import torch
import yaml
from safetensors.torch import load_file

from gattn.budget import estimate_peak_memory, profiled_peak_memory
from gattn.ssl.schedules import warmup_cosine
from pipelines.cli import main
from pipelines.config import ParamsError, TuneParams
from pipelines.data import stream
from pipelines.metrics import score_resized
from pipelines.stages.tune import results, scheduler, space, stage, trial

ray = pytest.importorskip("ray")

TINY_FAMILIES = {
    "cnn": {"backbone": "gattn_local_cnn", "backbone_kwargs": {"widths": [8, 16]}},
    "vit": {
        "backbone": "gattn_vit_global",
        "backbone_kwargs": {"embed_dim": 16, "depth": 2, "num_heads": 2, "patch_size": 8},
    },
}
SAMPLE = {
    "family": "cnn",
    "module": "global_attn",
    "module_size": "small",
    "attn_impl": "fused",
    "position": "last",
    "num_blocks": 1,
    "batch_size": 4,
    "img_size": 32,
    "head": "fcn",
    "lr": 1e-3,
}
# Plain attention after the stride-2 stage of a batch of 64 at 64 px: GiBs of scores.
HUGE = {**SAMPLE, "attn_impl": "plain", "position": "second_last", "batch_size": 64, "img_size": 64}
# Dilation rates 2, 4, 8 grid (HDC rule): building the block raises.
CRASH = {**SAMPLE, "module": "dilated"}


def tiny(**overrides) -> TuneParams:
    base = {
        "num_samples": 3,
        "budgets_gib": [0.01, 0.1],
        "families": TINY_FAMILIES,
        "modules": ["none", "global_attn", "dilated"],
        "module_sizes": {
            "small": {"global_attn": {"num_heads": 2}, "dilated": {"rates": [2, 4, 8]}}
        },
        "batch_sizes": [4, 64],
        "img_sizes": [32, 64],
        "epochs": 2,
        "max_train_samples": 8,
        "max_val_samples": 4,
        "max_concurrent": 2,
        "points_to_evaluate": [],
    }
    return TuneParams.model_validate({**base, **overrides})


@pytest.fixture(scope="module")
def context(prepared: Path) -> trial.TrialContext:
    return stage.data_context(prepared, None, tiny(), seed=0)


def test_the_trial_context_survives_pickling(context: trial.TrialContext) -> None:
    """``tune.with_parameters`` puts the context into Ray's object store (a pickle)."""
    copy = pickle.loads(pickle.dumps(context))
    assert copy.params == context.params and (copy.kind, copy.seed) == (context.kind, 0)
    assert (copy.train, copy.val) == (context.train, context.val)
    assert torch.equal(copy.class_weight, context.class_weight)
    # Only where the data are travels, never the images: the pickle stays small.
    assert len(pickle.dumps(context)) < 20_000


def test_over_budget_trial_is_skipped_without_training(
    context: trial.TrialContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []
    monkeypatch.setattr(trial, "train_epoch", lambda *a, **k: calls.append(a))
    reports: list[dict] = []
    row = trial.run_trial(HUGE, context, reports.append)
    assert row["status"] == "infeasible"
    assert calls == []  # no training step ran
    assert row["steps"] == 0 and row["fits_budgets_gib"] == []
    assert row["estimated_memory_gib"] > max(tiny().budgets_gib)
    assert len(reports) == 1 and reports[0]["quality"] == 0.0


def test_feasible_trial_trains_and_measures(context: trial.TrialContext) -> None:
    reports: list[dict] = []
    row = trial.run_trial(SAMPLE, context, reports.append)
    assert row["status"] == "ok", row.get("traceback")
    assert [r["epochs"] for r in reports] == [1, 2]
    assert row["steps"] == 2 * (8 // 4)
    assert 0.0 <= row["quality"] <= 1.0 and row["images_per_s"] > 0
    assert row["params"] == sum(p.numel() for p in trial.build_model(row["model"]).parameters())
    # The trial's measured peak is the estimator's figure (the same step, real tensors).
    assert row["peak_memory_gib"] == pytest.approx(row["estimated_memory_gib"], rel=0.15)


def test_a_trial_is_deterministic_and_follows_the_warmup_cosine_schedule(
    context: trial.TrialContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Same sample, context and seed: the same figures to the last digit and the same
    weights; every step's learning rate is finetune's warm-up + cosine at the sample's peak."""
    p = tiny(epochs=3, warmup_epochs=1.0, min_lr_ratio=0.1)
    ctx = dataclasses.replace(context, params=p)
    cfg = space.model_config(SAMPLE, p, ctx.kind, ctx.num_classes, ctx.in_chans)
    lrs: list[float] = []
    step = trial.train_step

    def recording_step(model, optimizer, *args, **kwargs):
        lrs.append(optimizer.param_groups[0]["lr"])
        return step(model, optimizer, *args, **kwargs)

    monkeypatch.setattr(trial, "train_step", recording_step)

    def train(seed: int) -> tuple[dict, dict]:
        row: dict = {"steps": 0}
        c = dataclasses.replace(ctx, seed=seed)
        model = trial.train_config(SAMPLE, c, p, dict(cfg), torch.device("cpu"), row, print)
        return row, model.state_dict()

    (a, wa), (b, wb), (_, wc) = train(0), train(0), train(1)
    assert (a["quality"], a["loss"], a["steps"]) == (b["quality"], b["loss"], b["steps"])
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)  # the seed does matter

    total, per_epoch = a["steps"], a["steps"] // 3
    peak = SAMPLE["lr"]
    expected = [peak * warmup_cosine(s, total, 1.0, 0.1, per_epoch) for s in range(total)]
    assert lrs[:total] == pytest.approx(expected)
    assert max(lrs) == pytest.approx(peak, rel=0.05) and lrs[total - 1] < 0.5 * peak


def test_crashing_and_oom_trials_are_recorded(
    context: trial.TrialContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    row = trial.run_trial(CRASH, context, lambda r: None)
    assert row["status"] == "error" and "gridding" in row["error"]
    assert row["steps"] == 0 and "Traceback" in row["traceback"]

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")

    monkeypatch.setattr(trial, "train_epoch", oom)
    row = trial.run_trial(SAMPLE, context, lambda r: None)
    assert row["status"] == "oom" and "out of memory" in row["error"]


def test_estimator_matches_profiler_on_default_space_sample() -> None:
    """Configs drawn from the default search space (structure as sampled; batch and resolution
    kept small so the real profiled step is quick)."""
    p = TuneParams()
    rng = random.Random(0)
    for _ in range(3):
        sample = {
            "family": rng.choice(sorted(p.families)),
            "module": rng.choice(p.modules[1:]),
            "module_size": rng.choice(sorted(p.module_sizes)),
            "attn_impl": rng.choice(p.attn_impls),
            "position": rng.choice(p.positions),
            "num_blocks": rng.choice(p.num_blocks),
            "head": rng.choice(p.heads),
            "batch_size": 2,
            "img_size": 48,
        }
        cfg = space.model_config(sample, p, "seg", 4, 3)
        reference = profiled_peak_memory(cfg, 2, 48)
        estimate = estimate_peak_memory(cfg, 2, 48)
        assert abs(estimate - reference) <= 0.15 * reference, (sample, estimate, reference)


def test_pareto_front_matches_brute_force() -> None:
    rng = random.Random(1)
    rows = [
        {"quality": rng.random(), "peak_memory_gib": rng.random(), "images_per_s": rng.random()}
        for _ in range(30)
    ]
    front = results.pareto_front(rows)
    for r in rows:
        beaten = any(
            o["quality"] >= r["quality"]
            and o["peak_memory_gib"] <= r["peak_memory_gib"]
            and o["images_per_s"] >= r["images_per_s"]
            and o is not r
            for o in rows
        )
        assert (r in front) == (not beaten)


def test_unknown_block_is_a_params_error() -> None:
    with pytest.raises(ParamsError, match="tune.modules"):
        space.check_params(tiny(modules=["none", "non_local"]))
    with pytest.raises(ValueError, match="select_budget"):
        tiny(select_budget=3.0)


@pytest.mark.slow
def test_tiny_sweep_writes_outputs_and_child_runs(
    tmp_path: Path,
    prepared: Path,
    ray_local: None,
    capsys: pytest.CaptureFixture,
    context: trial.TrialContext,
) -> None:
    points = [SAMPLE, HUGE, CRASH]
    section = tiny(storage=str(tmp_path / "ray"), points_to_evaluate=points).model_dump(mode="json")
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"tune": section}))
    out, reports = tmp_path / "models" / "tune", tmp_path / "reports" / "tune"
    args = ["tune", "--params", str(params), "--data", str(prepared)]
    args += ["--pretrained", str(tmp_path / "none"), "--out", str(out), "--reports", str(reports)]
    assert main(args) == 0

    with open(reports / "trials.csv") as f:
        trials = list(csv.DictReader(f))
    assert sorted(t["status"] for t in trials) == ["error", "infeasible", "ok"]
    infeasible = next(t for t in trials if t["status"] == "infeasible")
    assert infeasible["steps"] == "0" and infeasible["peak_memory_gib"] == ""

    best = json.loads((out / "best.json").read_text())
    assert best["task"] == "seg" and best["budgets_gib"] == [0.01, 0.1]
    chosen = best["per_budget"][best["selected_budget"]]
    assert chosen["model"]["backbone"] == "gattn_local_cnn"
    assert chosen["model"]["num_classes"] == 4 and chosen["model"]["img_size"] == 32
    assert chosen["train"]["batch_size"] == 4 and chosen["metric"] == "miou"
    assert chosen["peak_memory_gib"] <= float(best["selected_budget"])
    # The best trial's weights sit beside best.json, load into its model to the last tensor
    # and score what the trial reported on the images the search scored on.
    assert chosen["weights"] == f"weights/{chosen['trial']}.safetensors"
    model = trial.build_model(chosen["model"])
    model.load_state_dict(load_file(str(out / chosen["weights"])), strict=True)
    val = stream(context.val.open())
    again = score_resized(model, val, "seg", chosen["train"]["img_size"], 4)
    assert again["miou"] == pytest.approx(chosen["quality"], abs=1e-6)
    pareto = json.loads((reports / "pareto.json").read_text())
    assert [p["trial"] for p in pareto["points"]] == [chosen["trial"]]
    assert (reports / "pareto.png").stat().st_size > 0
    metrics = json.loads((reports / "metrics.json").read_text())
    assert (metrics["num_ok"], metrics["num_infeasible"], metrics["num_error"]) == (1, 1, 1)

    parent = mlflow.search_runs(
        experiment_names=["gattn"],
        filter_string="tags.`gattn.stage` = 'tune'",
        output_format="list",
    )
    assert len(parent) == 1
    children = mlflow.search_runs(
        experiment_names=["gattn"],
        filter_string=f"tags.mlflow.parentRunId = '{parent[0].info.run_id}'",
        output_format="list",
    )
    assert sorted(c.data.tags["gattn.status"] for c in children) == ["error", "infeasible", "ok"]

    # The recommendation follows the Pareto file just written.
    capsys.readouterr()
    rec = ["recommend", "--task", "seg", "--memory", "12", "--pareto", str(reports / "pareto.json")]
    assert main([*rec, "--best", str(out / "best.json"), "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["source"] == "measured" and answer["choice"]["trial"] == chosen["trial"]
    tiny_budget = chosen["peak_memory_gib"] / 2
    rec[4] = str(tiny_budget)
    assert main([*rec, "--best", str(out / "best.json")]) == 0
    assert "default table" in capsys.readouterr().out


def test_recommend_cli_reads_the_pareto_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    def pt(trial: str, quality: float, memory: float) -> dict:
        return {
            "trial": trial,
            "summary": trial,
            "quality": quality,
            "metric": "accuracy",
            "peak_memory_gib": memory,
            "images_per_s": 10.0,
            "params": 5,
            "model": {},
            "train": {"batch_size": 8, "img_size": 32, "lr": 0.001},
        }

    pareto = tmp_path / "pareto.json"
    pareto.write_text(json.dumps({"task": "cls", "points": [pt("a", 0.7, 1.0), pt("b", 0.9, 3.0)]}))
    base = ["recommend", "--task", "cls", "--pareto", str(pareto), "--best", str(tmp_path / "x")]
    assert main([*base, "--memory", "2"]) == 0
    out = capsys.readouterr().out
    assert "source: measured" in out and "trial a" in out and "needs 3.000 GiB" in out
    assert main([*base, "--memory", "3"]) == 0
    assert "trial b" in capsys.readouterr().out
    pareto.write_text("{not json")
    assert main([*base, "--memory", "3"]) == 2
    assert "rerun `gattn tune`" in capsys.readouterr().err


def test_trials_that_never_reported_are_written_and_the_stage_says_why(tmp_path: Path) -> None:
    """A sweep whose trials were all stopped before their first report (a busy machine, a
    too-short time budget): the outputs are still written, every trial as stopped."""
    rows = [{"trial": "t1", "status": "stopped", "summary": "", "config": dict(SAMPLE)}]
    metrics = results.write_outputs(rows, tiny(), "seg", 1.0, tmp_path / "m", tmp_path / "r")
    assert metrics["num_ok"] == 0 and metrics["num_stopped"] == 1
    with open(tmp_path / "r" / "trials.csv") as f:
        (trial,) = list(csv.DictReader(f))
    assert trial["status"] == "stopped" and trial["metric"] == "miou"


def test_asha_never_stops_a_fixed_point_early_but_stops_sampled_trials() -> None:
    """Four trials reach ASHA's rung at epoch 1 with falling scores: the sampled ones below the
    rung's cutoff (top half) stop, the fixed point below it runs on."""
    from types import SimpleNamespace

    from ray.tune.schedulers import TrialScheduler

    points = [{"module": "ppm", "lr": 0.003}]
    sched = scheduler.points_run_to_end(
        points, "training_iteration", max_t=4, grace_period=1, reduction_factor=2
    )
    sched.set_search_properties("quality", "max")
    configs = [
        {"module": "none", "lr": 0.01},
        {"module": "se", "lr": 0.01},
        {"module": "ppm", "lr": 0.003},  # the fixed point, scoring worst
        {"module": "ppm", "lr": 0.002},  # a sampled trial of the same module, also worst
    ]
    trials = [SimpleNamespace(trial_id=f"t{i}", config=c) for i, c in enumerate(configs)]
    for t in trials:
        sched.on_trial_add(None, t)
    actions = [
        sched.on_trial_result(None, t, {"training_iteration": 1, "quality": q})
        for t, q in zip(trials, [0.8, 0.7, 0.2, 0.2], strict=True)
    ]
    stop, go = TrialScheduler.STOP, TrialScheduler.CONTINUE
    assert actions == [go, stop, go, stop]  # the point runs on, the same module sampled does not
    assert scheduler.is_point(configs[2], points) and not scheduler.is_point(configs[3], points)
    # At max_t the point stops like any trial.
    final = sched.on_trial_result(None, trials[2], {"training_iteration": 4, "quality": 0.8})
    assert final == TrialScheduler.STOP
