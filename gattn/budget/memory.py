"""Peak tensor memory of a piece of work, on CPU and CUDA alike.

On CUDA the caching allocator's peak (``torch.cuda.max_memory_allocated``) is the truth. On CPU
there is no allocator statistic, and process RSS mixes in the interpreter, libraries and freed
pages, so we track tensor storages instead with torch's ``MemTracker`` (a dispatch mode that
records every allocation and free, attributed to parameters, gradients, activations, optimizer
state and temporaries).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

_CUDA_BLOCK = 512  # the CUDA caching allocator's smallest block, bytes


def peak_memory(
    fn: Callable[[], object],
    modules: Iterable[nn.Module | torch.optim.Optimizer | torch.Tensor] = (),
    device: torch.device | str = "cpu",
) -> int:
    """Peak bytes of tensor memory while ``fn()`` runs.

    On CPU this counts tensors allocated inside ``fn`` plus the parameters, buffers, gradients
    and optimizer state of ``modules``; tensors created before the call and not owned by one of
    ``modules`` (e.g. an input batch) are not counted, so create them inside ``fn`` to include
    them. On CUDA it is the allocator's peak over everything live during the call.

    Args:
        fn: The work to measure, e.g. one forward + backward pass.
        modules: Modules, optimizers and tensors whose parameters, buffers, state or storage
            already exist and must be counted (on CPU; on CUDA everything allocated is counted
            anyway).
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


class StoragePeak(TorchDispatchMode):
    """Running total and peak of the tensor storages created while the mode is active.

    A lighter ``MemTracker``: no per-module attribution, so its cost per operator does not grow
    with the model (about 3x faster on fake tensors). Each distinct storage counts once (views
    share one), from the operator that returns it until it is garbage collected; storages that
    exist beforehand count only if passed to :meth:`track`. Works on real and fake tensors; on
    CUDA sizes are rounded up to the caching allocator's 512-byte blocks.

    Example::

        tracker = StoragePeak()
        tracker.track(*model.parameters())
        with tracker:
            model(x).sum().backward()
        tracker.peak  # bytes
    """

    def __init__(self) -> None:
        # torch leaves TorchDispatchMode.__init__ unannotated, and mypy's untyped_calls_exclude
        # (pyproject.toml) does not cover calls through super()
        super().__init__()  # type: ignore[no-untyped-call]
        self.current = 0
        self.peak = 0
        self._seen: WeakIdKeyDictionary = WeakIdKeyDictionary()

    def _release(self, nbytes: int) -> None:
        self.current -= nbytes

    def track(self, *tensors: torch.Tensor) -> None:
        """Count the storages of ``tensors`` (already existing ones, e.g. parameters)."""
        for t in tensors:
            storage = t.untyped_storage()
            if storage in self._seen:
                continue
            nbytes = storage.nbytes()
            if t.device.type == "cuda":
                nbytes = -(-nbytes // _CUDA_BLOCK) * _CUDA_BLOCK
            self._seen[storage] = nbytes
            self.current += nbytes
            self.peak = max(self.peak, self.current)
            weakref.finalize(storage, self._release, nbytes)

    def __torch_dispatch__(
        self,
        func: Callable[..., Any],
        types: Collection[type],
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
    ) -> Any:
        out = func(*args, **(kwargs or {}))
        self.track(*(t for t in tree_leaves(out) if isinstance(t, torch.Tensor)))
        return out
