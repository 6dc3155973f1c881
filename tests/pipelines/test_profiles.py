"""Params profiles as DVC experiments (issue 16 §5): ``gattn pipeline --params
params-<name>.yaml`` runs ``dvc exp run --name <name> -S ...`` with the overrides that make
``params.yaml`` hold the profile's values (:mod:`pipelines.profiles`).

The overrides are checked through DVC's own code (:func:`dvc.utils.hydra.apply_overrides`, what
``dvc exp run -S`` calls), and once for real on a scratch git + DVC repository.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from pipelines.commands.pipeline import dvc_command, free_name
from pipelines.config import ParamsError, load_params
from pipelines.profiles import (
    apply_with_dvc,
    check_overrides,
    experiment_name,
    hydra_value,
    param_overrides,
    profile_overrides,
)

ROOT = Path(__file__).resolve().parents[2]
PROFILES = ["params-fashion-mnist.yaml", "params-gpu.yaml"]


def test_overrides_change_add_and_remove_keys_and_replace_lists() -> None:
    base = {
        "a": {"x": 1, "lst": [1, 2], "fam": {"one": {"k": 1}, "two": {"k": 2}}},
        "b": "keep",
    }
    target = {
        "a": {"x": 2.5, "lst": [3], "fam": {"two": {"k": 2}, "three": {"k": "z y"}}, "y": None},
        "b": "keep",
    }
    assert param_overrides(base, target) == [
        "a.x=2.5",
        "a.lst=[3]",
        '+a.fam.three={k: "z y"}',
        "~a.fam.one",
        "+a.y=null",
    ]
    assert param_overrides(base, base) == []


def test_a_mapping_that_loses_a_null_is_replaced_whole() -> None:
    # Hydra's `~key` on a null fails ("does not exist"): the mapping is rewritten instead.
    base = {"s": {"keep": 1, "gone": None}}
    target = {"s": {"keep": 1}}
    assert param_overrides(base, target) == ["~s", "+s={keep: 1}"]
    with pytest.raises(ValueError, match="null key cannot be removed"):
        param_overrides({"top": None}, {})


def test_a_mapping_that_becomes_a_value_is_removed_then_added() -> None:
    assert param_overrides({"s": {"k": 1}}, {"s": [1]}) == ["~s", "+s=[1]"]
    assert param_overrides({"s": None}, {"s": {"k": 1}}) == ["s={k: 1}"]


def test_hydra_values_keep_their_types() -> None:
    assert hydra_value(None) == "null"
    assert hydra_value(True) == "true"
    assert hydra_value(64) == "64"
    assert hydra_value(1e-05) == "1e-05"
    assert hydra_value("64") == '"64"'  # text stays text
    assert hydra_value('say "a\\b"') == '"say \\"a\\b\\""'  # Hydra's escapes
    assert hydra_value("end\\") == '"end\\\\"'
    assert hydra_value([1, "a", {"k": [None]}]) == '[1, "a", {k: [null]}]'
    for bad in (float("nan"), "${x}", {"a b": 1}, object()):
        with pytest.raises(ValueError):
            hydra_value(bad)


def test_dvc_reads_the_values_back_as_they_were(tmp_path: Path) -> None:
    """Every kind of value, through DVC's -S code and back through PyYAML."""
    target = {
        "s": 'it\'s "data/external", a,b',
        "w": "C:\\dir\\",  # backslashes inside and at the end
        "n": None,
        "t": True,
        "i": 7,
        "f": 0.002,
        "lst": [0.5, 1, "x"],
        "d": {"k": [1, 2], "m": {"deep": "v"}},
        "e": [],
        "ed": {},
    }
    path = tmp_path / "p.yaml"
    path.write_text("s: old\nn: 3\nd: {k: [9], m: {deep: w, other: 1}}\nlst: [1]\n")
    apply_with_dvc(path, param_overrides(yaml.safe_load(path.read_text()), target))
    assert yaml.safe_load(path.read_text()) == target


@pytest.mark.parametrize("profile", PROFILES)
def test_profile_overrides_make_params_yaml_load_as_the_profile(
    profile: str, tmp_path: Path
) -> None:
    params = tmp_path / "params.yaml"
    shutil.copyfile(ROOT / "params.yaml", params)
    overrides = profile_overrides(ROOT / profile, params)
    assert overrides and load_params(params) != load_params(ROOT / profile)
    apply_with_dvc(params, overrides)
    assert load_params(params) == load_params(ROOT / profile)
    assert "# Every knob the pipeline reads" in params.read_text()  # DVC keeps the comments
    # Run again on the result: nothing is left to change.
    assert profile_overrides(ROOT / profile, params) == []


def test_keys_the_profile_leaves_out_take_their_defaults_not_params_yaml(tmp_path: Path) -> None:
    profile = tmp_path / "params-mini.yaml"
    profile.write_text("tune:\n  epochs: 3\n  families: {vit: {backbone: gattn_vit_global}}\n")
    overrides = profile_overrides(profile, ROOT / "params.yaml")
    assert "tune.epochs=3" in overrides
    assert "~tune.families.cnn" in overrides and "~tune.families.swin" in overrides
    assert "data.large.num_samples=4" in overrides  # params.yaml's 16 -> the default, 4
    assert "tune.points_to_evaluate=[]" in overrides


def test_a_profile_dvc_would_write_back_differently_is_refused(tmp_path: Path) -> None:
    """DVC writes a float below 1e-4 as ``1e-05``, which PyYAML reads as text: in a
    free-form value (a timm argument here) the profile would not run as written."""
    profile = tmp_path / "params-tiny-float.yaml"
    profile.write_text(
        "pretrain:\n  min_lr: 0.000001\n  backbone_kwargs: {drop_path_rate: 0.00001}\n"
    )
    base = tmp_path / "params.yaml"
    shutil.copyfile(ROOT / "params.yaml", base)
    overrides = profile_overrides(profile, base)
    with pytest.raises(ParamsError, match="backbone_kwargs.drop_path_rate"):
        check_overrides(profile, base, overrides)
    # A typed float (pretrain.min_lr) reads back right: pydantic takes '1e-06' as a number.
    ok = tmp_path / "params-typed-float.yaml"
    ok.write_text("pretrain:\n  min_lr: 0.000001\n")
    check_overrides(ok, base, profile_overrides(ok, base))


def test_pipeline_command_is_repro_for_params_yaml_and_a_named_experiment_for_a_profile(
    tmp_path: Path,
) -> None:
    shutil.copyfile(ROOT / "params.yaml", tmp_path / "params.yaml")
    shutil.copyfile(ROOT / "params-fashion-mnist.yaml", tmp_path / "params-fashion-mnist.yaml")
    assert dvc_command(Path("params.yaml"), ["--force"], tmp_path) == ["repro", "--force"]
    command = dvc_command(Path("params-fashion-mnist.yaml"), ["prepare"], tmp_path, "fm")
    assert command[:4] == ["exp", "run", "--name", "fm"] and command[-1] == "prepare"
    sets = command[4:-1]
    assert sets[::2] == ["-S"] * (len(sets) // 2)
    assert 'data.task="torchvision-cls"' in sets[1::2]
    assert experiment_name("params-fashion-mnist.yaml") == "fashion-mnist"
    assert free_name("fm", set()) == "fm"
    assert free_name("fm", {"fm", "fm-2"}) == "fm-3"


@pytest.mark.slow
def test_dvc_exp_run_takes_the_profile_overrides(tmp_path: Path) -> None:
    """``dvc exp run --name fashion-mnist -S ...`` for real (a one-stage dvc.yaml that copies
    params.yaml): DVC accepts every override, the workspace's params.yaml then loads as the
    profile, the run is a named experiment, and a second run of the name is refused by DVC
    (what :func:`free_name` avoids)."""
    env = {
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@localhost",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@localhost",
        "PATH": "/usr/bin:/bin",
        "HOME": str(tmp_path),
    }

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True)

    shutil.copyfile(ROOT / "params.yaml", tmp_path / "params.yaml")
    stage = {"cmd": "cp params.yaml seen.yaml", "params": ["data", "tune"], "outs": ["seen.yaml"]}
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"copy": stage}}))
    assert run("git", "init", "-q").returncode == 0
    assert run(sys.executable, "-m", "dvc", "init", "-q").returncode == 0
    run("git", "add", "-A")
    assert run("git", "commit", "-qm", "init").returncode == 0

    profile = ROOT / "params-fashion-mnist.yaml"
    command = dvc_command(profile, [], tmp_path, "fashion-mnist")
    out = run(sys.executable, "-m", "dvc", *command)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert load_params(tmp_path / "seen.yaml") == load_params(profile)
    names = run(sys.executable, "-m", "dvc", "exp", "list", "--name-only").stdout.split()
    assert names == ["fashion-mnist"]
    again = run(sys.executable, "-m", "dvc", *command)
    assert again.returncode != 0 and "conflicts with existing experiment" in again.stderr
    assert dvc_command(profile, [], tmp_path)[3] == "fashion-mnist-2"


@pytest.mark.slow
def test_gattn_pipeline_runs_a_profile_as_a_named_experiment(
    tmp_path: Path,
    tiny_project: Callable[..., Path],
    gattn_cli: Callable[..., subprocess.CompletedProcess],
    _mlflow_store: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``gattn pipeline --params params-small.yaml -- prepare`` on a scratch project: the stage
    runs on the profile's values under the MLflow parent run, as the DVC experiment ``small``,
    and the workspace's params.yaml then loads as the profile."""
    for var in ("GIT_AUTHOR_NAME", "GIT_COMMITTER_NAME"):
        monkeypatch.setenv(var, "t")
    for var in ("GIT_AUTHOR_EMAIL", "GIT_COMMITTER_EMAIL"):
        monkeypatch.setenv(var, "t@localhost")
    repo = tiny_project(tmp_path / "repo")
    (repo / ".gitignore").write_text("/data/\n/outputs/\nmlflow.db\nreports/\n/models/\n")
    profile = yaml.safe_load((repo / "params.yaml").read_text())
    profile["data"]["num_samples"] = 30
    profile["tracking"] = {"experiment": "gattn-small"}
    (repo / "params-small.yaml").write_text(yaml.safe_dump(profile, sort_keys=False))
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True)
    subprocess.run(["git", "commit", "-qm", "init"], cwd=repo, check=True)

    out = gattn_cli(repo, "pipeline", "--params", "params-small.yaml", "--", "prepare")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "pipeline: dvc exp run --name small -S " in out.stdout
    assert " -S data.num_samples=30 " in out.stdout
    assert " -S 'tracking.experiment=\"gattn-small\"' " in out.stdout  # as a shell takes it
    assert load_params(repo / "params.yaml") == load_params(repo / "params-small.yaml")
    metrics = json.loads((repo / "reports" / "prepare" / "metrics.json").read_text())
    assert metrics["num_samples"] == 30
    names = subprocess.run(
        [sys.executable, "-m", "dvc", "exp", "list", "--name-only"],
        cwd=repo,
        capture_output=True,
        text=True,
    ).stdout.split()
    assert names == ["small"]

    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{_mlflow_store}")
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    parent = next(r for r in runs if r.data.tags.get("gattn.stage") == "pipeline")
    assert parent.data.params["params_file"] == "params-small.yaml"
    assert parent.info.status == "FINISHED"
    stage = next(r for r in runs if r.data.tags.get("gattn.stage") == "prepare")
    assert stage.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert mlflow.get_experiment(stage.info.experiment_id).name == "gattn-small"
