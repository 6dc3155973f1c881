"""Peak memory of one training step of a model config: measured, estimated, and profiled.

One training step is what a budget must hold: a batch of ``batch_size`` images at
``img_size`` x ``img_size`` (and their targets), the forward pass, the loss (cross-entropy; a
detector's FCOS loss with :data:`DET_BOXES_PER_IMAGE` boxes per image), the backward pass and
an AdamW step, with the parameters, buffers and optimizer state already in
place (as in every step after the first). Gradients are freed before the step
(``zero_grad(set_to_none=True)``).

Three ways to get the figure:

- :func:`measure_peak_memory` runs the real step. On CUDA the caching allocator's peak is the
  truth; on CPU tensor allocations are tracked by torch's ``MemTracker`` (a dispatch mode that
  records every storage allocated and freed; see :func:`gattn.budget.memory.peak_memory`).
- :func:`estimate_peak_memory` runs the same step on fake tensors (``FakeTensorMode``: shapes,
  dtypes and devices, no data, no arithmetic) and counts their storages with
  :class:`~gattn.budget.memory.StoragePeak`. Only the parameters are ever real (the model is
  built normally, then its tensors are swapped for fakes), so the cost does not grow with the
  batch or the resolution: about a second per config on one CPU core.
- :func:`profiled_peak_memory` is an independent check on CPU: the PyTorch profiler's memory
  events (``profile_memory=True``, reported by the CPU allocator itself, below the dispatcher)
  during the step, plus the persistent state counted from the model and optimizer. It also
  sees allocations no dispatch mode can (a kernel's internal scratch buffers), so agreement
  with the estimate is evidence, not a tautology.

Reference: the memory accounting follows "Reducing Activation Recomputation in Large
Transformer Models" (Korthikanti et al., 2022): weights + optimizer state + activations kept
for backward + transient buffers; the tools here measure rather than model those terms.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_leaves

from gattn.data.datasets import IGNORE_INDEX
from gattn.models import Detector, build_model
from gattn.models.fcos import Target

from .memory import StoragePeak, peak_memory

__all__ = [
    "DET_BOXES_PER_IMAGE",
    "IGNORE_INDEX",
    "allocator_peak",
    "estimate_peak_memory",
    "make_batch",
    "measure_peak_memory",
    "persistent_bytes",
    "profiled_peak_memory",
    "train_step",
]


# Boxes per image of a detector's estimated step. The FCOS assignment holds a few
# (locations x boxes x 4) tensors, one image at a time (0.35 MiB each at 128 px with P2 and 16
# boxes): small next to the activations at this count; pass the data set's typical count as
# boxes_per_image where it is much larger.
DET_BOXES_PER_IMAGE = 16

Targets = torch.Tensor | Sequence[Target]


def make_batch(
    cfg: Mapping[str, Any],
    batch_size: int,
    img_size: int,
    device: torch.device | str = "cpu",
    *,
    boxes_per_image: int = DET_BOXES_PER_IMAGE,
) -> tuple[torch.Tensor, Targets]:
    """Random images and targets of the shapes a training step of ``cfg`` takes.

    Args:
        cfg: A :func:`gattn.models.build_model` config (``task``, ``num_classes``, ``in_chans``).
        batch_size: Images per batch.
        img_size: Image side in pixels.
        device: Where to allocate.
        boxes_per_image: Boxes per image for ``task="det"``.

    Returns:
        Images ``(B, in_chans, S, S)`` and targets: ``(B, S, S)`` class ids for ``task="seg"``,
        per image ``{"boxes": (n, 4) xyxy, "labels": (n,)}`` for ``"det"`` (4-16 px boxes),
        ``(B,)`` labels otherwise.
    """
    images = torch.randn(batch_size, cfg.get("in_chans", 3), img_size, img_size, device=device)
    if cfg.get("task") == "det":
        return images, [
            random_boxes(boxes_per_image, img_size, max(1, cfg["num_classes"]), device)
            for _ in range(batch_size)
        ]
    shape = (batch_size, img_size, img_size) if cfg.get("task") == "seg" else (batch_size,)
    targets = torch.randint(0, max(1, cfg["num_classes"]), shape, device=device)
    return images, targets


def random_boxes(
    num: int, img_size: int, num_classes: int, device: torch.device | str = "cpu"
) -> Target:
    """``num`` random boxes of 4-16 px (at most the image) inside an ``img_size`` square, and
    random labels in ``0..num_classes-1``."""
    side = 4 + torch.rand(num, 2, device=device) * 12
    side = side.clamp(max=img_size)
    corner = torch.rand(num, 2, device=device) * (img_size - side)
    return {
        "boxes": torch.cat([corner, corner + side], dim=1),
        "labels": torch.randint(0, num_classes, (num,), device=device),
    }


def training_loss(
    model: nn.Module,
    images: torch.Tensor,
    targets: Targets,
    class_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """The loss a training step minimises: a :class:`~gattn.models.Detector`'s own loss
    (``targets`` a list of box dicts), otherwise cross-entropy with segmentation targets equal
    to :data:`IGNORE_INDEX` excluded.

    Raises:
        ValueError: ``class_weight`` for a detector (its focal loss has no class weights).
    """
    if isinstance(model, Detector):
        if class_weight is not None:
            raise ValueError("a detector's loss takes no class_weight (its focal loss balances)")
        if isinstance(targets, torch.Tensor):
            raise TypeError("a detector's targets are a list of {'boxes', 'labels'} dicts")
        return model.loss(model(images), targets)["loss"]
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"{type(model).__name__} takes a tensor of targets, not {type(targets)}")
    return F.cross_entropy(model(images), targets, weight=class_weight, ignore_index=IGNORE_INDEX)


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    targets: Targets,
    class_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """One optimisation step: free gradients, forward, loss (:func:`training_loss`),
    backward, step.

    Args:
        model, optimizer: What is trained.
        images, targets: One batch (a detector's targets: per image ``{"boxes", "labels"}``).
        class_weight: Optional per-class loss weights ``(num_classes,)`` (not for detectors).

    Returns:
        The loss (detached).
    """
    optimizer.zero_grad(set_to_none=True)
    loss = training_loss(model, images, targets, class_weight)
    loss.backward()
    optimizer.step()
    return loss.detach()


def adamw(model: nn.Module, lr: float, device: torch.device) -> torch.optim.AdamW:
    """AdamW as PyTorch picks it by default for ``device`` (the multi-tensor ``foreach``
    kernels on CUDA, one tensor at a time elsewhere), chosen explicitly so fake parameters,
    which PyTorch would not pick ``foreach`` for, get the same implementation."""
    return torch.optim.AdamW(model.parameters(), lr=lr, foreach=device.type == "cuda")


def _config(cfg: Mapping[str, Any], img_size: int) -> dict[str, Any]:
    if "num_classes" not in cfg or cfg["num_classes"] < 1:
        raise ValueError("a training step needs cfg['num_classes'] >= 1 (a classifier or head)")
    return {**cfg, "img_size": img_size}


def _setup(
    cfg: Mapping[str, Any], img_size: int, lr: float, device: torch.device | str
) -> tuple[nn.Module, torch.optim.Optimizer]:
    model = build_model(_config(cfg, img_size)).to(device).train()
    return model, adamw(model, lr, torch.device(device))


def _warm(optimizer: torch.optim.Optimizer) -> None:
    """Create the optimizer state with one step on zero gradients, then free the gradients
    (the state has the shapes a real step gives, without a forward and backward pass)."""
    for group in optimizer.param_groups:
        for q in group["params"]:
            q.grad = torch.zeros_like(q)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def measure_peak_memory(
    model_cfg: Mapping[str, Any],
    batch_size: int,
    img_size: int,
    device: torch.device | str = "cpu",
    *,
    lr: float = 1e-3,
    seed: int = 0,
    boxes_per_image: int = DET_BOXES_PER_IMAGE,
) -> int:
    """Peak bytes of one real training step of ``model_cfg`` (see the module docstring).

    Args:
        model_cfg: A :func:`gattn.models.build_model` config with ``num_classes >= 1``;
            ``img_size`` is set from the argument.
        batch_size: Images per step.
        img_size: Image side in pixels.
        device: ``"cpu"`` (tracked tensor allocations) or a CUDA device (allocator peak).
        lr: AdamW learning rate (does not change the memory).
        seed: Seed of the initialisation and the random batch.
        boxes_per_image: Boxes per image of a detector's batch (:func:`make_batch`).

    Returns:
        Peak bytes: parameters, buffers, optimizer state, the batch, activations, gradients and
        temporaries of one step.
    """
    torch.manual_seed(seed)
    model, optimizer = _setup(model_cfg, img_size, lr, device)
    _warm(optimizer)
    images, targets = make_batch(
        model_cfg, batch_size, img_size, device, boxes_per_image=boxes_per_image
    )
    return peak_memory(
        lambda: train_step(model, optimizer, images, targets),
        [model, optimizer, images, *tree_leaves(targets)],
        device,
    )


def _fakeify(model: nn.Module, mode: Any, device: torch.device) -> nn.Module:
    """Swap every parameter and buffer of ``model`` for a fake tensor on ``device``, in place
    (called outside ``mode``).

    (Building the model inside ``FakeTensorMode`` would avoid the real parameters, but
    ``Module.to`` cannot swap fake parameters in torch 2.14, and timm and
    :func:`gattn.models.inject` call it while building.)
    """
    memo: dict[int, torch.Tensor] = {}

    def fake(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in memo:
            with torch.no_grad():
                f = mode.from_tensor(t)
            if f.device != device:
                with mode:
                    f = f.to(device)
            memo[id(t)] = f
        return memo[id(t)]

    for module in model.modules():
        for name, p in module._parameters.items():
            if p is not None:
                module._parameters[name] = nn.Parameter(fake(p), requires_grad=p.requires_grad)
        for name, b in module._buffers.items():
            if b is not None:
                module._buffers[name] = fake(b)
    return model


def estimate_peak_memory(
    model_cfg: Mapping[str, Any],
    batch_size: int,
    img_size: int,
    device: torch.device | str = "cpu",
    *,
    lr: float = 1e-3,
    boxes_per_image: int = DET_BOXES_PER_IMAGE,
) -> int:
    """Peak bytes of one training step, from a run on fake tensors (no real activations).

    The model is built for real (its parameters are the only real memory used), its tensors
    are swapped for fakes, and the warm-up step and the tracked step of
    :func:`measure_peak_memory` run under ``FakeTensorMode``, with
    :class:`~gattn.budget.memory.StoragePeak` counting the fake storages (rounded to the CUDA
    allocator's 512-byte blocks on a CUDA device).

    Args:
        model_cfg: As in :func:`measure_peak_memory`.
        batch_size: Images per step.
        img_size: Image side in pixels.
        device: The device the figure is for; no memory is allocated on it (a CUDA device
            must be visible, for its properties).
        lr: AdamW learning rate.
        boxes_per_image: Boxes per image of a detector's batch (:func:`make_batch`).

    Returns:
        Estimated peak bytes, the figure :func:`measure_peak_memory` reports.

    Raises:
        ValueError: a CUDA device is asked for and none is visible, or no ``num_classes``.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            "estimating for a CUDA device needs one visible (nothing is allocated on it); "
            "on a machine without one, estimate for device='cpu'"
        )
    model = build_model(_config(model_cfg, img_size)).train()
    mode = FakeTensorMode(allow_non_fake_inputs=False)
    _fakeify(model, mode, device)
    with mode:
        optimizer = adamw(model, lr, device)
        _warm(optimizer)
        images, targets = make_batch(
            model_cfg, batch_size, img_size, device, boxes_per_image=boxes_per_image
        )
        tracker = StoragePeak()
        tracker.track(*_state_tensors(model, optimizer), images, *tree_leaves(targets))
        with tracker:
            train_step(model, optimizer, images, targets)
    return tracker.peak


def _state_tensors(*objects: nn.Module | torch.optim.Optimizer) -> list[torch.Tensor]:
    """Parameters, buffers and gradients of modules; state tensors of optimizers."""
    tensors: list[torch.Tensor] = []
    for obj in objects:
        if isinstance(obj, nn.Module):
            tensors += [*obj.parameters(), *obj.buffers()]
            tensors += [q.grad for q in obj.parameters() if q.grad is not None]
        else:
            tensors += [v for s in obj.state.values() for v in s.values() if torch.is_tensor(v)]
    return tensors


def persistent_bytes(*objects: nn.Module | torch.optim.Optimizer) -> int:
    """Bytes of the distinct storages of modules (parameters, buffers, gradients) and
    optimizers (state); shared storages count once."""
    storages = {
        t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
        for t in _state_tensors(*objects)
    }
    return sum(storages.values())


def allocator_peak(prof: Any) -> int:
    """Peak of the running sum of the CPU allocations and frees in a finished
    ``torch.profiler.profile(profile_memory=True)`` (bytes above the level at its start)."""
    from torch._C._profiler import _EventType

    found, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        if event.tag == _EventType.Allocation and event.extra_fields.device.type == "cpu":
            found.append(event)
        stack.extend(event.children)
    current = peak = 0
    for event in sorted(found, key=lambda e: e.start_time_ns):
        current += event.extra_fields.alloc_size
        peak = max(peak, current)
    return peak


def profiled_peak_memory(
    model_cfg: Mapping[str, Any],
    batch_size: int,
    img_size: int,
    *,
    lr: float = 1e-3,
    seed: int = 0,
    boxes_per_image: int = DET_BOXES_PER_IMAGE,
) -> int:
    """Peak bytes of one real CPU training step from the profiler's memory events.

    An independent reference for :func:`estimate_peak_memory` and the CPU path of
    :func:`measure_peak_memory` (both count storages at the dispatcher): the running sum of
    every CPU allocation and free the allocator reports while the step runs (batch creation
    included), plus the persistent parameters, buffers and optimizer state (allocated before
    profiling).

    Args:
        model_cfg, batch_size, img_size, lr, seed, boxes_per_image: As in
            :func:`measure_peak_memory`.

    Returns:
        Peak bytes on the CPU.
    """
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(seed)
    model, optimizer = _setup(model_cfg, img_size, lr, "cpu")
    _warm(optimizer)
    base = persistent_bytes(model, optimizer)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        batch = make_batch(model_cfg, batch_size, img_size, boxes_per_image=boxes_per_image)
        train_step(model, optimizer, *batch)
    return base + allocator_peak(prof)
