"""Starting Ray for a stage: a local instance bound to loopback, or the cluster we run on."""

from __future__ import annotations

import os


def start_local_ray(num_cpus: int | None = None, use_gpu: bool = False) -> bool:
    """Start a local Ray (127.0.0.1, no dashboard) unless one is up or ``RAY_ADDRESS`` names
    a cluster (then connect to it). Returns True when this call started Ray, so the caller
    shuts down only what it started.

    Args:
        num_cpus: Logical CPUs to declare (may exceed the cores when a Tune driver must sit
            beside its workers); default: the machine's cores.
        use_gpu: Let Ray see GPUs; otherwise declare none, so nothing waits for one.
    """
    import ray

    if ray.is_initialized():
        return False
    if os.environ.get("RAY_ADDRESS"):
        ray.init(configure_logging=False)
        return True
    ray.init(
        address="local",
        num_cpus=max(os.cpu_count() or 1, num_cpus or 0),
        num_gpus=None if use_gpu else 0,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        configure_logging=False,
    )
    return True
