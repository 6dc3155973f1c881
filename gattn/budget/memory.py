"""Peak tensor memory of a piece of work, on CPU and CUDA alike.

On CUDA the caching allocator's peak (``torch.cuda.max_memory_allocated``) is the truth. On CPU
there is no allocator statistic, and process RSS mixes in the interpreter, libraries and freed
pages, so we track tensor storages instead with torch's ``MemTracker`` (a dispatch mode that
records every allocation and free, attributed to parameters, gradients, activations, optimizer
state and temporaries).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn


def peak_memory(
    fn: Callable[[], object],
    modules: Iterable[nn.Module | torch.optim.Optimizer] = (),
    device: torch.device | str = "cpu",
) -> int:
    """Peak bytes of tensor memory while ``fn()`` runs.

    On CPU this counts tensors allocated inside ``fn`` plus the parameters, buffers, gradients
    and optimizer state of ``modules``; tensors created before the call and not owned by one of
    ``modules`` (e.g. an input batch) are not counted, so create them inside ``fn`` to include
    them. On CUDA it is the allocator's peak over everything live during the call.

    Args:
        fn: The work to measure, e.g. one forward + backward pass.
        modules: Modules and optimizers whose parameters, buffers and state already exist and
            must be counted (on CPU; on CUDA everything allocated is counted anyway).
        device: Where ``fn`` runs.

    Returns:
        Peak allocated bytes on ``device``.
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device))

    from torch.distributed._tools.mem_tracker import MemTracker

    tracker = MemTracker()
    external = list(modules)
    if external:
        tracker.track_external(*external)
    with tracker:
        fn()
    snapshot = tracker.get_tracker_snapshot("peak")
    return int(snapshot.get(device, {}).get("Total", 0))
