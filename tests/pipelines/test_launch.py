"""``gattn launch``: the job it builds (command, upload, environment) and, for real, a tiny
tune sweep submitted to a Ray head started on loopback, found afterwards in MLflow."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import mlflow
import pytest

from pipelines.cli import COMMANDS, main
from pipelines.commands.launch import (
    EXCLUDES,
    STAGES,
    entrypoint,
    exit_code,
    job_env,
    params_in_project,
    requirements,
    runtime_env,
    tracking_warning,
)
from pipelines.config import ParamsError
from pipelines.tracking import PROJECT_ROOT

FAKE_PYTHON = """#!/bin/sh
printf '%s\\n' "$(pwd)" >> "$CALLS"
for a in "$@"; do printf '%s\\0' "$a" >> "$CALLS"; done
printf '\\n' >> "$CALLS"
"""


def run_entrypoint(command: str, cwd: Path, tmp: Path) -> list[tuple[str, list[str]]]:
    """Run ``command`` with ``sh`` (as the job supervisor does), ``python`` replaced by a
    recorder; return (working folder, argv) per call."""
    bin_dir = tmp / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    calls = tmp / "calls"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "CALLS": str(calls)}
    subprocess.run(["sh", "-c", command], cwd=cwd, env=env, check=True)
    lines = calls.read_text().split("\n")
    return [(lines[i], lines[i + 1].split("\0")[:-1]) for i in range(0, len(lines) - 1, 2)]


def test_entrypoint_runs_each_stage_with_the_same_params_through_a_shell(tmp_path: Path) -> None:
    code = tmp_path / "code"
    code.mkdir()
    overrides = ["tune.img_sizes=[32, 48]", 'data.generator={name: "it\'s"}', "seed=3"]
    calls = run_entrypoint(entrypoint("tune", "profiles/p.yaml", overrides), code, tmp_path)
    args = ["--params", "profiles/p.yaml"] + [x for o in overrides for x in ("--set", o)]
    assert calls == [
        (str(code), ["-m", "pipelines.cli", command, *args]) for command in STAGES["tune"]
    ]


def test_entrypoint_with_workdir_runs_there_and_reads_params_from_the_code(
    tmp_path: Path,
) -> None:
    code, work = tmp_path / "code", tmp_path / "shared dir" / "gattn"
    code.mkdir()
    calls = run_entrypoint(entrypoint("pretrain", "params-gpu.yaml", (), str(work)), code, tmp_path)
    assert work.is_dir()
    assert [c[0] for c in calls] == [str(work)] * len(STAGES["pretrain"])
    assert [c[1][2:] for c in calls] == [
        [command, "--params", f"{code}/params-gpu.yaml"] for command in STAGES["pretrain"]
    ]


def test_every_launched_command_is_a_gattn_command() -> None:
    commands = {c for chain in STAGES.values() for c in chain}
    assert commands <= set(COMMANDS), commands - set(COMMANDS)


def test_params_file_must_be_inside_the_project(tmp_path: Path) -> None:
    assert params_in_project(PROJECT_ROOT / "params.yaml") == "params.yaml"
    assert params_in_project(PROJECT_ROOT / "a" / ".." / "b" / "p.yaml") == "b/p.yaml"
    with pytest.raises(ParamsError, match="outside the project"):
        params_in_project(tmp_path / "params.yaml")


def test_upload_leaves_out_local_state_but_keeps_packages_of_the_same_name(
    tmp_path: Path,
) -> None:
    """Ray's own packager (the code that zips a working_dir) applied to EXCLUDES."""
    from ray._private.runtime_env.packaging import create_package

    keep = ["gattn/data/x.py", "gattn/models/y.py", "pipelines/z.py", ".dvc/config", "p.yaml"]
    drop = [
        "data/prepared/a.png",
        "models/tune/best.json",
        "outputs/ray/ckpt.pt",
        "reports/r.json",
        ".venv/lib/t.py",
        ".git/HEAD",
        ".dvc/cache/ab/cd",
        "mlruns/0/m",
        "mlartifacts/1/a",
        "mlflow.db",
        "gattn/__pycache__/x.pyc",
    ]
    project = tmp_path / "project"
    for rel in keep + drop:
        (project / rel).parent.mkdir(parents=True, exist_ok=True)
        (project / rel).write_text("x")
    package = tmp_path / "pkg.zip"
    create_package(
        str(project), package, include_gitignore=False, excludes=runtime_env(project)["excludes"]
    )
    files = {n for n in zipfile.ZipFile(package).namelist() if not n.endswith("/")}
    assert files == set(keep)


def test_runtime_env_dependencies_and_environment() -> None:
    env = {"MLFLOW_TRACKING_URI": "http://mlflow:5000"}
    cluster = runtime_env(PROJECT_ROOT, "cluster", env)
    assert cluster["working_dir"] == str(PROJECT_ROOT)
    assert cluster["excludes"] == list(EXCLUDES)
    assert cluster["env_vars"] == {"PYTHONUNBUFFERED": "1", **env}
    assert "pip" not in cluster and "uv" not in cluster
    pip = runtime_env(PROJECT_ROOT, "pip")["pip"]
    assert pip == requirements()
    assert any(r.startswith("torch") for r in pip) and any(r.startswith("ray[") for r in pip)
    assert not any(r.startswith(("pytest", "ruff")) for r in pip)  # no dev extras
    assert runtime_env(PROJECT_ROOT, "uv")["uv"] == pip
    with pytest.raises(ParamsError, match="--deps"):
        runtime_env(PROJECT_ROOT, "conda")


def test_job_env_passes_tracking_and_parent_run_and_extras_win() -> None:
    environ = {"MLFLOW_TRACKING_URI": "http://a:5000", "GATTN_PARENT_RUN_ID": "abc", "HOME": "/x"}
    assert job_env({}, environ) == {
        "MLFLOW_TRACKING_URI": "http://a:5000",
        "GATTN_PARENT_RUN_ID": "abc",
    }
    assert job_env({"MLFLOW_TRACKING_URI": "http://b:5000", "K": "v"}, environ) == {
        "MLFLOW_TRACKING_URI": "http://b:5000",
        "GATTN_PARENT_RUN_ID": "abc",
        "K": "v",
    }


@pytest.mark.parametrize(
    ("uri", "address", "warns"),
    [
        ("http://mlflow:5000", "http://10.0.0.5:8265", False),
        ("sqlite:////tmp/mlflow.db", "http://127.0.0.1:8265", False),
        ("sqlite:////tmp/mlflow.db", "localhost:8265", False),
        ("sqlite:////tmp/mlflow.db", "http://10.0.0.5:8265", True),
        ("file:///tmp/mlruns", "http://head.example.com:8265", True),
        (None, "http://127.0.0.1:8265", True),
    ],
)
def test_tracking_warning(uri: str | None, address: str, warns: bool) -> None:
    env = {"MLFLOW_TRACKING_URI": uri} if uri else {}
    assert (tracking_warning(env, address) is not None) == warns


def test_exit_code_follows_the_job_status() -> None:
    from ray.job_submission import JobStatus

    assert exit_code(JobStatus.SUCCEEDED) == 0
    assert [exit_code(s) for s in (JobStatus.FAILED, JobStatus.STOPPED)] == [1, 1]


def test_bad_params_fail_before_contacting_a_cluster(capsys: pytest.CaptureFixture[str]) -> None:
    # Port 9 (discard) on loopback: nothing answers, so reaching the cluster would fail
    # differently (and slowly); the params error comes first, as exit status 2.
    address = "http://127.0.0.1:9"
    assert main(["launch", "tune", "--address", address, "--set", "data.image_size=4"]) == 2
    assert "data.image_size" in capsys.readouterr().err
    assert main(["launch", "tune", "--address", address, "--env", "NOVALUE"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# For real: a Ray head on loopback, a tiny sweep submitted as a job, its trials in MLflow.

TINY_TUNE = [
    "data.num_samples=24",
    "data.image_size=32",
    "data.large.num_samples=0",
    "data.grid_samples=4",
    "tune.num_samples=2",
    "tune.families={cnn: {backbone: gattn_local_cnn, init: scratch}}",
    "tune.modules=[none, se]",
    "tune.points_to_evaluate=[]",
    "tune.budgets_gib=[0.5, 2.0]",
    "tune.batch_sizes=[4]",
    "tune.img_sizes=[32]",
    "tune.epochs=1",
    "tune.grace_period=1",
    "tune.max_train_samples=8",
    "tune.max_val_samples=4",
    "tune.max_concurrent=1",
    "tune.cpus_per_trial=1",
]
HEAD_PORTS = (
    "port",
    "dashboard-port",
    "ray-client-server-port",
    "dashboard-agent-listen-port",
    "dashboard-agent-grpc-port",
    "runtime-env-agent-port",
    "metrics-export-port",
    "node-manager-port",
    "object-manager-port",
)


def _wait_for_job_server(address: str, head: subprocess.Popen, log: Path) -> None:
    from ray.job_submission import JobSubmissionClient

    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if head.poll() is not None:
            pytest.fail(f"ray start exited with {head.returncode}:\n{log.read_text()[-3000:]}")
        try:
            JobSubmissionClient(address).list_jobs()
            return
        except Exception:  # not up yet
            time.sleep(2)
    pytest.fail(f"the job server at {address} did not answer in 180 s")


@pytest.fixture
def ray_head(monkeypatch: pytest.MonkeyPatch, free_port: Callable[[], int]) -> Iterator[str]:
    """A Ray head (``ray start --head --block``, 2 CPUs, token auth off) on loopback with the
    job server; yields its address. It is stopped by its own process id (``ray stop`` would
    stop every Ray on the machine), with any job still running stopped first."""
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    ports = {name: free_port() for name in HEAD_PORTS}
    temp = Path(tempfile.mkdtemp(prefix="gr", dir="/tmp"))  # short: Ray's socket paths
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}  # the job's `python`
    log = temp / "head.log"
    cmd = [
        str(bin_dir / "ray"),
        "start",
        "--head",
        "--block",
        "--node-ip-address=127.0.0.1",
        "--dashboard-host=127.0.0.1",
        "--num-cpus=2",
        "--num-gpus=0",
        "--disable-usage-stats",
        f"--temp-dir={temp}",
        *(f"--{name}={port}" for name, port in ports.items()),
    ]
    with log.open("w") as out:
        head = subprocess.Popen(
            cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    address = f"http://127.0.0.1:{ports['dashboard-port']}"
    try:
        _wait_for_job_server(address, head, log)
        yield address
    finally:
        with contextlib.suppress(Exception):  # the head may be gone already
            from ray.job_submission import JobSubmissionClient

            client = JobSubmissionClient(address)
            for job in client.list_jobs():
                if not job.status.is_terminal():
                    client.stop_job(job.submission_id)
        head.send_signal(signal.SIGTERM)  # `ray start --block` stops what it started
        with contextlib.suppress(subprocess.TimeoutExpired):
            head.wait(timeout=60)
        with contextlib.suppress(ProcessLookupError):  # leftovers of this head's group only
            os.killpg(head.pid, signal.SIGKILL)
        head.wait()
        shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_launch_tune_on_a_local_head_logs_trials_to_mlflow(
    ray_head: str, _mlflow_store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if "tune" not in COMMANDS:
        pytest.fail("`gattn tune` is not a command yet (pipelines/cli.py COMMANDS)")
    overrides = [x for o in TINY_TUNE for x in ("--set", o)]
    work = tmp_path / "shared"  # stands in for storage every node mounts
    argv = ["launch", "tune", "--address", ray_head, "--workdir", str(work), *overrides]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "SUCCEEDED" in out and "prepare:" in out  # the job's own logs were streamed here
    # the stages ran in --workdir (the code imported from the uploaded copy), outputs kept
    assert (work / "data" / "prepared" / "splits.json").is_file()
    best = json.loads((work / "models" / "tune" / "best.json").read_text())
    assert best["selected_budget"] in best["per_budget"]

    # The job logged to the store named by this process's MLFLOW_TRACKING_URI.
    mlflow.set_tracking_uri(f"sqlite:///{_mlflow_store}")
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    by_stage: dict[str, list] = {}
    for r in runs:
        by_stage.setdefault(r.data.tags.get("gattn.stage"), []).append(r)
    assert [r.info.status for r in by_stage["prepare"]] == ["FINISHED"]
    (tune_run,) = by_stage["tune"]
    assert tune_run.info.status == "FINISHED"
    trials = by_stage["tune.trial"]
    assert len(trials) == 2
    assert {t.data.tags["mlflow.parentRunId"] for t in trials} == {tune_run.info.run_id}
    assert json.loads(tune_run.data.params["tune.num_samples"]) == 2
