"""Ray for a command: a local instance bound to loopback, or the cluster we run on.

Every command that needs Ray (the training stages, the search, ``gattn serve``) enters
:func:`local_ray`, so Ray is started one way everywhere: on 127.0.0.1 without a dashboard,
with the logical CPUs the command reserves, and shut down after, unless it was already up or
``$RAY_ADDRESS`` names a cluster to join.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

# Ray Train's print patch tees a worker's print to stdout *and* logs it: every progress line
# showed twice
PRINT_PATCH = "RAY_TRAIN_ENABLE_PRINT_PATCH"


@contextlib.contextmanager
def local_ray(num_cpus: int | None = None, use_gpu: bool = False) -> Iterator[None]:
    """Run the block with Ray up: a local Ray (127.0.0.1, no dashboard) unless one is up or
    ``RAY_ADDRESS`` names a cluster (then connect to it). Shuts down only what it started.
    On a local Ray, Ray's warnings that do not apply there are silenced in every process
    (:mod:`pipelines.ray_logs`).

    Args:
        num_cpus: Logical CPUs to declare (may exceed the cores when a Tune driver must sit
            beside its workers); default: the machine's cores.
        use_gpu: Let Ray see GPUs; otherwise declare none, so nothing waits for one.
    """
    import ray

    from pipelines.ray_logs import WORKER_SETUP_HOOK, quiet_benign_warnings

    started = not ray.is_initialized()
    if started and os.environ.get("RAY_ADDRESS"):
        # a cluster keeps Ray Train's preemption watcher (its nodes can be drained)
        ray.init(configure_logging=False, runtime_env={"env_vars": {PRINT_PATCH: "0"}})
    elif started:
        quiet_benign_warnings()  # in this process; the hook does it in Ray's
        for attempt in range(3):  # a busy machine can keep the raylet past Ray's 30 s start
            try:
                ray.init(
                    address="local",
                    num_cpus=max(os.cpu_count() or 1, num_cpus or 0),
                    num_gpus=None if use_gpu else 0,
                    include_dashboard=False,
                    _node_ip_address="127.0.0.1",
                    configure_logging=False,
                    runtime_env={
                        "worker_process_setup_hook": WORKER_SETUP_HOOK,
                        "env_vars": {
                            PRINT_PATCH: "0",
                            # one machine has no node to drain; its watcher actor logged a
                            # core-worker error line at every Ray Train start
                            "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
                        },
                    },
                )
                break
            except Exception as err:
                if "timed out during startup" not in str(err) or attempt == 2:
                    raise
                ray.shutdown()
                print(f"ray: local node slow to start on a busy machine, retrying ({err})")
    try:
        yield
    finally:
        if started:
            ray.shutdown()
