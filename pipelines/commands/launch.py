"""``gattn launch``: run a pipeline stage on a Ray cluster as a Ray job.

The project folder (code and params files, without virtual environments, data, outputs,
MLflow stores or git/DVC internals) is uploaded as the job's working directory; the job runs
``prepare`` and then the stage (a job starts without data, and ``prepare`` is deterministic
given the params), with the params file and ``--set`` overrides forwarded and validated here
first. With ``--workdir`` the stages run in a folder on storage every node mounts, so that
what the driver writes (prepared data, checkpoints, models) is seen by workers on other nodes
and outlives the job. ``MLFLOW_TRACKING_URI`` (or ``--tracking-uri``) and
``GATTN_PARENT_RUN_ID`` are passed to the job, so its runs land in the same tracking server,
under the same parent run, as a local run would. The job's logs are streamed here and the
command exits 0 when the job SUCCEEDED, 1 otherwise.

Dependencies: by default the job uses the Python environment the cluster runs (the cluster
launcher's setup commands and the KubeRay image install this project); ``--deps pip`` or
``--deps uv`` installs this project's requirements into a per-job runtime environment instead.

Authentication: a cluster started with token authentication needs the token here:
``RAY_AUTH_MODE=token`` plus ``RAY_AUTH_TOKEN`` (or the token file ``ray get-auth-token``
shows); Ray's job client sends it.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import os
import secrets
import shlex
import sys
import time
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from pipelines.config import ParamsError, add_params_arguments, load_params
from pipelines.tracking import PARENT_RUN_ENV, PROJECT_ROOT

# stage -> the commands its job runs, in order (the job's working directory holds no data).
STAGES: dict[str, tuple[str, ...]] = {
    "tune": ("prepare", "tune"),
    "pretrain": ("prepare", "pretrain"),
}
# Never uploaded (gitwildmatch patterns, anchored at the project root where a bare name would
# also drop a package folder such as gattn/data or gattn/models).
EXCLUDES: tuple[str, ...] = (
    "/.venv/",
    "/.git/",
    "/.dvc/cache/",
    "/.dvc/tmp/",
    "/data/",
    "/outputs/",
    "/models/",
    "/reports/",
    "/mlruns/",
    "/mlartifacts/",
    "/mlflow.db",
    "__pycache__/",
    "*.egg-info/",
    ".pytest_cache/",
    ".ruff_cache/",
)
# Local environment variables a job inherits when they are set.
PASSED_ENV: tuple[str, ...] = ("MLFLOW_TRACKING_URI", PARENT_RUN_ENV)
DEPS = ("cluster", "pip", "uv")


def params_in_project(path: str | Path, root: Path = PROJECT_ROOT) -> str:
    """The params file as a POSIX path relative to the project root, which is what the job
    sees as its working directory.

    Raises:
        ParamsError: the file is outside the project, so it would not be uploaded.
    """
    resolved = Path(path).resolve()
    try:
        return resolved.relative_to(root.resolve()).as_posix()
    except ValueError:
        raise ParamsError(
            f"{path}: outside the project folder {root}, so the job would not see it; "
            "copy it into the project (e.g. next to params-gpu.yaml)"
        ) from None


def entrypoint(
    stage: str, params: str, overrides: Sequence[str] = (), workdir: str | None = None
) -> str:
    """The shell command the job runs: each of ``STAGES[stage]`` with the same params.

    Args:
        stage: A key of :data:`STAGES`.
        params: The params file, relative to the project (the job's working directory).
        overrides: ``key=value`` overrides forwarded as ``--set``.
        workdir: Run the stages in this folder instead of the job's working directory (the
            code stays importable: Ray puts the working directory on ``PYTHONPATH``). Point it
            at storage every node mounts, so that data, checkpoints and models written by the
            driver are seen by trials and workers on other nodes, and outlive the job.
    """
    prefix, params_arg = "", shlex.quote(params)
    if workdir:
        prefix = (
            f'GATTN_CODE="$PWD" && mkdir -p {shlex.quote(workdir)} && cd {shlex.quote(workdir)} && '
        )
        params_arg = f'"$GATTN_CODE"/{params_arg}'
    tail = "".join(f" --set {shlex.quote(a)}" for a in overrides)
    return prefix + " && ".join(
        f"python -m pipelines.cli {command} --params {params_arg}{tail}"
        for command in STAGES[stage]
    )


def requirements(distribution: str = "gattn") -> list[str]:
    """The installed project's runtime requirements (no extras such as ``dev``)."""
    from packaging.requirements import Requirement

    out = []
    for line in metadata.requires(distribution) or []:
        req = Requirement(line)
        if req.marker is None or req.marker.evaluate({"extra": ""}):
            out.append(line)
    return out


def parse_env(assignments: Sequence[str]) -> dict[str, str]:
    """``["KEY=VALUE", ...]`` -> a dict.

    Raises:
        ParamsError: an item without ``=`` or with an empty key.
    """
    env = {}
    for item in assignments:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ParamsError(f"--env {item!r}: expected KEY=VALUE, e.g. MLFLOW_EXPERIMENT=x")
        env[key] = value
    return env


def runtime_env(
    root: Path,
    deps: str = "cluster",
    env: Mapping[str, str] | None = None,
    excludes: Sequence[str] = EXCLUDES,
) -> dict[str, Any]:
    """The job's runtime environment: working directory, excludes, env vars, dependencies.

    Args:
        root: The project folder to upload.
        deps: ``cluster`` (use the cluster's environment), ``pip`` or ``uv`` (install this
            project's requirements into a per-job environment with that installer).
        env: Environment variables for the job; ``PYTHONUNBUFFERED`` is added so logs stream.
        excludes: gitwildmatch patterns left out of the upload.
    """
    if deps not in DEPS:
        raise ParamsError(f"--deps {deps!r}: expected one of {', '.join(DEPS)}")
    renv: dict[str, Any] = {
        "working_dir": str(root),
        "excludes": list(excludes),
        "env_vars": {"PYTHONUNBUFFERED": "1", **(env or {})},
    }
    if deps != "cluster":
        renv[deps] = requirements()
    return renv


def job_env(extra: Mapping[str, str], environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """``PASSED_ENV`` taken from ``environ`` where set, then ``extra`` (which wins)."""
    env = {k: environ[k] for k in PASSED_ENV if environ.get(k)}
    env.update(extra)
    return env


def _is_loopback(address: str) -> bool:
    host = urlparse(address if "://" in address else f"http://{address}").hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def tracking_warning(env: Mapping[str, str], address: str) -> str | None:
    """Why the job's MLflow runs might not reach you, or None when the store looks shared."""
    uri = env.get("MLFLOW_TRACKING_URI")
    if not uri:
        return (
            "no MLFLOW_TRACKING_URI here and no --tracking-uri: the job uses the cluster's "
            "own MLFLOW_TRACKING_URI if its nodes set one (the KubeRay manifests do), else a "
            "sqlite store in the folder it runs in. See infra/mlflow/README.md."
        )
    if uri.split(":", 1)[0] in ("sqlite", "file") and not _is_loopback(address):
        return (
            f"MLFLOW_TRACKING_URI={uri} is a local store but the cluster at {address} is "
            "remote: its nodes will write their own copy. Use an MLflow server URL."
        )
    return None


def exit_code(status: str) -> int:
    """0 for a job that SUCCEEDED, 1 for any other final status."""
    return 0 if str(status) == "SUCCEEDED" else 1


async def _tail(client: Any, job_id: str) -> None:
    async for chunk in client.tail_job_logs(job_id):
        sys.stdout.write(chunk)
        sys.stdout.flush()


def follow(client: Any, job_id: str, poll_s: float = 1.0) -> str:
    """Stream the job's logs until it ends; return its final status (e.g. ``SUCCEEDED``)."""
    try:
        asyncio.run(_tail(client, job_id))
    except RuntimeError as err:  # the log stream broke; the status below still tells
        print(f"launch: log stream ended early ({err}); waiting for the job", file=sys.stderr)
    while not (status := client.get_job_status(job_id)).is_terminal():
        time.sleep(poll_s)
    return str(status)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("stage", choices=list(STAGES), help="the stage to run on the cluster")
    parser.add_argument(
        "--address",
        default=os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS"),
        help="the cluster's job server, e.g. http://<head>:8265 "
        "(default: $RAY_API_SERVER_ADDRESS or $RAY_ADDRESS)",
    )
    add_params_arguments(parser)
    parser.add_argument(
        "--deps",
        choices=DEPS,
        default="cluster",
        help="cluster: use the environment the cluster's nodes run (default); pip/uv: install "
        "this project's requirements into a per-job runtime environment",
    )
    parser.add_argument(
        "--tracking-uri",
        help="the MLflow server the job logs to, as the cluster's nodes reach it (default: "
        "$MLFLOW_TRACKING_URI here; with neither, the job keeps the cluster's own setting)",
    )
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an extra environment variable for the job (repeatable); "
        f"{', '.join(PASSED_ENV)} are passed on when set here",
    )
    parser.add_argument(
        "--workdir",
        help="run the stages in this folder on the cluster, on storage every node mounts "
        "(e.g. /mnt/cluster_storage/gattn): needed when trials or training workers run on "
        "other nodes than the driver; outputs there outlive the job (default: the job's "
        "working directory, enough for one node)",
    )
    parser.add_argument("--submission-id", help="job id (default: gattn-<stage>-<time>-<hex>)")
    parser.add_argument(
        "--no-wait",
        action="store_true",
        help="submit and return; follow later with `ray job logs --follow ID --address URL`",
    )


def run(args: argparse.Namespace) -> int:
    from ray.job_submission import JobSubmissionClient

    if not args.address:
        raise ParamsError("--address: no cluster given; pass --address http://<head>:8265")
    load_params(args.params, args.overrides)  # fail here, not minutes later on the cluster
    params = params_in_project(args.params)
    extra = parse_env(args.env)
    if args.tracking_uri:
        extra["MLFLOW_TRACKING_URI"] = args.tracking_uri
    env = job_env(extra)
    if warning := tracking_warning(env, args.address):
        print(f"launch: warning: {warning}", file=sys.stderr)

    client = JobSubmissionClient(args.address)
    job_id = client.submit_job(
        entrypoint=entrypoint(args.stage, params, args.overrides, args.workdir),
        runtime_env=runtime_env(PROJECT_ROOT, args.deps, env),
        submission_id=args.submission_id
        or f"gattn-{args.stage}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}",
        metadata={
            "gattn.stage": args.stage,
            "gattn.params": params,
            "gattn.overrides": json.dumps(args.overrides),
        },
    )
    print(f"launch: submitted {job_id} to {args.address}", flush=True)
    if args.no_wait:
        print(f"launch: follow with `ray job logs --follow {job_id} --address {args.address}`")
        return 0
    try:
        status = follow(client, job_id)
    except KeyboardInterrupt:
        print(
            f"\nlaunch: stopped following; {job_id} keeps running "
            f"(`ray job stop {job_id} --address {args.address}` ends it)",
            file=sys.stderr,
        )
        return 130
    print(f"launch: {job_id} {status}", flush=True)
    return exit_code(status)
