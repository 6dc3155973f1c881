"""Sliding-window inference for images larger than the model's input, with global feedback.

Tiling with overlapping windows and importance-weighted blending as in MONAI's
``sliding_window_inference`` and nnU-Net (Isensee et al. 2021, "nnU-Net: a self-configuring
method for deep learning-based biomedical image segmentation"): a gaussian weight with
``sigma = window / 8`` favours each window's centre, where it sees the most context, and the
blended logits are divided by the summed weights.

Unlike the source article's ``SlidingWindowInference``: the output has the model's ``K``
channels (not the image's), the last window of a row/column is flush with the right/bottom
edge (so every pixel is covered for any size, including sizes that are not a multiple of the
stride and images smaller than the window, which are padded and cropped back), windows run
several at a time, and blending can be gaussian.

Speed on CPU (``benchmarks/sliding_window.py``): a fixed batch of 8 windows made a small CNN
1.4-2.9x slower than one window at a time once a window's activations (16 channels x 256²,
4 MiB) no longer fit the cache, so the batch size is chosen from the model's largest
activation (:func:`auto_batch_size`), and conv models run channels-last on CPU (oneDNN's
native layout; 1.2-2x faster forwards for the CNN). Blending adds nothing beyond one
``addcmul_`` per window and one division.

Global-context feedback: a window cannot see a cue outside itself. For models that accept a
``global_context`` (:class:`~gattn.models.segmenter.Segmenter`), ``global_context="auto"``
runs one pass over the whole image downscaled to ``context_size`` through
``model.encode_context`` and gives that per-image vector to every window.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

Blend = Literal["gaussian", "constant"]
Size = int | tuple[int, int]

GAUSSIAN_SIGMA_SCALE = 0.125  # sigma = window / 8 (MONAI's default, nnU-Net)
_MIN_WEIGHT = 1e-6  # floor of the gaussian, so that no covered pixel has a zero weight
DEFAULT_CACHE_BYTES = 1 << 20  # L2 size assumed where it cannot be read
CACHE_BUDGET_FACTOR = 2  # CPU batch budget in L2 sizes, see auto_batch_size
MAX_AUTO_BATCH = 64  # most windows per forward that batch_size="auto" picks


def _pair(value: Size) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


def window_starts(size: int, window: int, stride: int) -> list[int]:
    """Start offsets of windows of ``window`` pixels along an axis of ``size`` pixels.

    Windows are ``stride`` apart and the last one ends exactly at ``size`` (it may overlap its
    neighbour more than the others do), so every pixel is covered. A ``size <= window`` axis
    gets one window at 0.

    Args:
        size: Length of the axis.
        window: Window length.
        stride: Distance between window starts, ``1 <= stride <= window``.
    """
    if window <= 0 or not 0 < stride <= window:
        raise ValueError(f"need window > 0 and 0 < stride <= window, got {window=}, {stride=}")
    if size <= window:
        return [0]
    starts = list(range(0, size - window + 1, stride))
    if starts[-1] != size - window:
        starts.append(size - window)
    return starts


def blend_weights(
    window: Size,
    blend: Blend = "gaussian",
    device: torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Per-pixel blending weight ``(h, w)`` of one window, maximum 1.

    Args:
        window: Window size ``(h, w)`` or an int.
        blend: ``"gaussian"`` (``sigma = GAUSSIAN_SIGMA_SCALE * size`` per axis, floored at a
            small positive value) or ``"constant"`` (all ones).
        device: Device of the weights.
        dtype: Dtype of the weights.
    """
    h, w = _pair(window)
    if blend == "constant":
        return torch.ones(h, w, device=device, dtype=dtype)
    if blend != "gaussian":
        raise ValueError(f"blend must be 'gaussian' or 'constant', got {blend!r}")

    def axis(n: int) -> torch.Tensor:  # maximum 1, so the outer product's maximum is 1
        x = torch.arange(n, device=device, dtype=torch.float64) - (n - 1) / 2
        g = torch.exp(-0.5 * (x / (GAUSSIAN_SIGMA_SCALE * n)) ** 2)
        return (g / g.max()).to(dtype)

    return torch.outer(axis(h), axis(w)).clamp_min_(_MIN_WEIGHT)


def downscaled_context(model: object, image: torch.Tensor, context_size: Size) -> torch.Tensor:
    """``model.encode_context`` of ``image`` resized (antialiased bilinear) to ``context_size``."""
    encode_context = getattr(model, "encode_context", None)
    if not callable(encode_context):
        raise TypeError(
            f"global_context='auto' needs a model with encode_context(x), not {type(model)}"
        )
    small = F.interpolate(
        image, size=_pair(context_size), mode="bilinear", align_corners=False, antialias=True
    )
    return encode_context(small)


def cache_bytes(level: int = 2) -> int:
    """Size in bytes of one core's level-``level`` data cache, read from Linux's sysfs.

    Returns :data:`DEFAULT_CACHE_BYTES` where the size cannot be read (other systems).
    """
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    try:
        for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
            kind = (index / "type").read_text().strip()
            if int((index / "level").read_text()) == level and kind in ("Data", "Unified"):
                size = (index / "size").read_text().strip()
                return int(size[:-1]) * units[size[-1]] if size[-1] in units else int(size)
    except (OSError, ValueError):
        pass
    return DEFAULT_CACHE_BYTES


def _tensors(value: object) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, list | tuple):
        return [t for v in value for t in _tensors(v)]
    return []


def largest_activation(model: nn.Module, *args: object, **kwargs: object) -> tuple[Any, int]:
    """``model(*args, **kwargs)`` and the bytes of the largest tensor that its submodules
    returned, recorded by forward hooks removed afterwards.

    The model's own inputs and output count only when no submodule returned a tensor: they
    are streamed once (copied in, blended out), while inner activations are read again by the
    next layers, which is where the cache matters. (A ViT segmenter's input window and its
    logits upsampled to the window are the largest tensors of its forward and the cheapest.)
    """
    largest = 0

    def record(_module: nn.Module, _inputs: object, output: object) -> None:
        nonlocal largest
        largest = max([largest, *(t.nbytes for t in _tensors(output))])

    submodules = list(model.modules())[1:] if isinstance(model, nn.Module) else []
    handles = [m.register_forward_hook(record) for m in submodules]
    try:
        output = model(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    if not largest:
        largest = max(t.nbytes for t in _tensors([args, output]))
    return output, largest


def auto_batch_size(activation_bytes: int, num_windows: int, device: torch.device) -> int:
    """Windows per forward pass such that the largest activation stays within a memory budget.

    CPU: ``CACHE_BUDGET_FACTOR`` (2) times one core's L2 cache (:func:`cache_bytes`), for the
    largest activation inside the model (:func:`largest_activation`). Batching amortises the
    per-call overhead and feeds matrix products more rows, but once a layer's output falls out
    of cache the elementwise layers run at memory bandwidth. Measured per window on 2 cores
    with 2 MiB of L2 each, one thread, channels-last (``benchmarks/sliding_window.py``): the
    3-conv net (16-channel activations: 1 MiB at 128 px, 4 MiB at 256 px) is ~1.9x faster
    in batches of 8 at 64 px, about even from 2 to 8 at 128 px and ~1.9x slower in batches of
    8 at 256 px; the ViT segmenter (largest inner activation, the MLP's hidden tokens: 96 KiB
    at 128 px, 384 KiB at 256 px, 1.5 MiB at 512 px) is fastest in batches of 16-64, 8-16
    and 1-2 windows there (2.3x, 1.3x and 1.04x faster than one at a time) and 20% slower in
    batches of 32 at 256 px or 8 at 512 px. This rule picks 16, 4, 1 (CNN) and 42, 10, 2
    (ViT). The measurements are noisy (shared machine, +-10%).
    CUDA: a quarter of the free device memory, at 4 activations of the largest size per window
    (a forward keeps a few alive), to fill the device without risking out-of-memory.

    Args:
        activation_bytes: Largest tensor a forward of one window creates (see
            :func:`largest_activation`).
        num_windows: Windows left to run (the batch never exceeds it).
        device: Device of the forward.
    """
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget, per_window = free // 4, 4 * activation_bytes
    else:
        budget, per_window = CACHE_BUDGET_FACTOR * cache_bytes(), activation_bytes
    return int(max(1, min(num_windows, MAX_AUTO_BATCH, budget // max(per_window, 1))))


def window_grid(
    image: torch.Tensor, window: Size, overlap: Size, pad_value: float = 0.0
) -> tuple[torch.Tensor, list[int], list[int]]:
    """``image`` padded at the bottom/right to at least ``window`` (crop results back to the
    original size), and the window starts along its height and width (:func:`window_starts`,
    stride ``window - overlap``)."""
    win, ovl = _pair(window), _pair(overlap)
    H, W = image.shape[-2:]
    pad_h, pad_w = max(win[0] - H, 0), max(win[1] - W, 0)
    if pad_h or pad_w:
        image = F.pad(image, (0, pad_w, 0, pad_h), value=pad_value)
    ys = window_starts(image.shape[-2], win[0], win[0] - ovl[0])
    xs = window_starts(image.shape[-1], win[1], win[1] - ovl[1])
    return image, ys, xs


def resolve_context(
    model: object,
    image: torch.Tensor,
    global_context: torch.Tensor | Literal["auto"] | None,
    context_size: Size,
) -> torch.Tensor | None:
    """The ``(B, C_g)`` context of a sliding window: ``None``, the tensor given (checked to
    have one row per image) or, for ``"auto"``, :func:`downscaled_context` at ``context_size``."""
    if isinstance(global_context, str):
        if global_context != "auto":
            raise ValueError(f"global_context must be None, a tensor or 'auto': {global_context!r}")
        global_context = downscaled_context(model, image, context_size)
    if global_context is not None and global_context.shape[0] != image.shape[0]:
        raise ValueError(
            f"global_context has {global_context.shape[0]} rows for {image.shape[0]} images"
        )
    return global_context


def window_batch(
    image: torch.Tensor,
    chunk: list[tuple[int, int, int]],
    window: tuple[int, int],
    global_context: torch.Tensor | None = None,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The windows ``(n, C, h, w)`` at ``chunk``'s ``(image index, top, left)`` positions,
    copied once into ``memory_format``, and the model's keyword arguments: each window's row
    of ``global_context`` (none when it is ``None``)."""
    windows = torch.empty(
        (len(chunk), image.shape[1], *window),
        device=image.device,
        dtype=image.dtype,
        memory_format=memory_format,
    )
    for tile, (b, y, x) in zip(windows, chunk, strict=True):
        tile.copy_(image[b, :, y : y + window[0], x : x + window[1]])
    kwargs = {}
    if global_context is not None:
        rows = torch.tensor([b for b, _, _ in chunk], device=global_context.device)
        kwargs["global_context"] = global_context[rows]
    return windows, kwargs


def _layout(x: torch.Tensor) -> torch.memory_format:
    """Memory format of ``x``: channels-last only where it is that and not plain contiguous."""
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def prefers_channels_last(model: nn.Module, device: torch.device) -> bool:
    """Whether ``channels_last="auto"`` runs windows channels-last: on CPU, for models with 2-d
    convolutions (oneDNN runs NHWC natively and reorders NCHW inputs and outputs of every
    convolution; measured 1.4-2x faster for the 3-conv net at 128-512 px)."""
    return device.type == "cpu" and any(isinstance(m, nn.Conv2d) for m in model.modules())


@torch.no_grad()
def sliding_window(
    model: nn.Module,
    image: torch.Tensor,
    window: Size,
    overlap: Size,
    batch_size: int | Literal["auto"] | None = "auto",
    blend: Blend = "gaussian",
    global_context: torch.Tensor | Literal["auto"] | None = None,
    *,
    context_size: Size | None = None,
    pad_value: float = 0.0,
    channels_last: bool | Literal["auto"] = "auto",
) -> torch.Tensor:
    """Blended logits ``(B, K, H, W)`` of ``model`` run on overlapping windows of ``image``.

    The model is called as ``model(windows)`` or, when a context is given,
    ``model(windows, global_context=context)`` with ``windows`` ``(n, C, h, w)`` and
    ``context`` ``(n, C_g)`` (each window gets its own image's vector). It must return logits
    ``(n, K, h', w')``; maps smaller than the window (a stride > 1 head) are resized
    bilinearly to the window. Put the model in eval mode first; gradients are not tracked.

    Each window is copied once (into the batch, in the chosen memory format), its logits are
    multiplied by the blending weight and added into an accumulator in one in-place
    ``addcmul_`` (the accumulator takes the logits' memory layout, as strided adds cost twice
    as much), and the sum is divided by the summed weights at the end, into a contiguous
    ``(B, K, H, W)`` tensor (cropped to ``H, W`` when the image was padded). With one window
    per image, its logits are copied out as they are.

    Args:
        model: Segmentation model.
        image: Images ``(B, C, H, W)``, any ``H, W``.
        window: Window size in pixels, ``(h, w)`` or an int.
        overlap: Overlap of neighbouring windows in pixels (stride = window - overlap).
        batch_size: Windows per forward pass (windows of all images are batched together), or
            ``"auto"``/``None``: the first window runs alone while forward hooks record the
            largest activation, and the rest run in equal batches of at most
            :func:`auto_batch_size` windows (a budget of 2 L2 caches on CPU, free memory on
            CUDA).
        blend: ``"gaussian"`` or ``"constant"`` weights, see :func:`blend_weights`.
        global_context: ``None`` (no feedback), a ``(B, C_g)`` tensor given to every window of
            its image, or ``"auto"``: :func:`downscaled_context` of the whole image.
        context_size: Size of the downscaled image for ``"auto"``; defaults to ``window``
            (the resolution the model was trained at).
        pad_value: Value that pads axes shorter than the window (cropped off the output).
        channels_last: Run the windows in ``torch.channels_last`` memory format; ``"auto"``:
            :func:`prefers_channels_last`. Pass ``False`` for a model that needs contiguous
            NCHW input (one that calls ``.view`` on it).
    """
    if image.ndim != 4:
        raise ValueError(f"image must be (B, C, H, W), got shape {tuple(image.shape)}")
    auto_batch = batch_size is None or batch_size == "auto"
    if not auto_batch and not (isinstance(batch_size, int) and batch_size >= 1):
        raise ValueError(f"batch_size must be an int >= 1, 'auto' or None, got {batch_size!r}")
    win = _pair(window)
    B, _, H, W = image.shape
    device = image.device
    global_context = resolve_context(model, image, global_context, context_size or win)
    if channels_last == "auto":
        channels_last = prefers_channels_last(model, device)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    image, ys, xs = window_grid(image, win, overlap, pad_value)
    Hp, Wp = image.shape[-2:]
    crops = [(b, y, x) for b in range(B) for y in ys for x in xs]
    single = len(ys) == len(xs) == 1
    weight = blend_weights(win, blend, device=device)

    def forward(chunk: list[tuple[int, int, int]], measure: bool) -> tuple[torch.Tensor, int]:
        windows, kwargs = window_batch(image, chunk, win, global_context, memory_format)
        if measure:
            return largest_activation(model, windows, **kwargs)
        return model(windows, **kwargs), 0

    out: torch.Tensor | None = None
    i, n = 0, int(batch_size) if isinstance(batch_size, int) else 1  # 1 to measure, if auto
    while i < len(crops):
        chunk = crops[i : i + n]
        logits, activation_bytes = forward(chunk, measure=auto_batch and i == 0 and len(crops) > 1)
        if logits.shape[-2:] != win:
            logits = F.interpolate(logits, size=win, mode="bilinear", align_corners=False)
        if single:  # one window per image: its logits are the blend
            out = torch.empty(B, logits.shape[1], Hp, Wp, device=device) if out is None else out
            for (b, _, _), tile in zip(chunk, logits, strict=True):
                out[b].copy_(tile)
        else:
            if out is None:  # accumulate in the logits' layout: strided adds cost 2x
                shape = (B, logits.shape[1], Hp, Wp)
                out = torch.empty(shape, device=device, memory_format=_layout(logits)).zero_()
            for (b, y, x), tile in zip(chunk, logits, strict=True):
                out[b, :, y : y + win[0], x : x + win[1]].addcmul_(tile, weight)
        i += len(chunk)
        left = len(crops) - i
        if auto_batch and i == 1 and left:  # the rest in equal batches of at most the budget
            n = math.ceil(left / math.ceil(left / auto_batch_size(activation_bytes, left, device)))
    assert out is not None  # at least one window per image
    if single:
        return out[..., :H, :W]

    norm = torch.zeros(Hp, Wp, device=device)
    for y in ys:
        for x in xs:
            norm[y : y + win[0], x : x + win[1]] += weight
    if out.is_contiguous():
        return out.div_(norm)[..., :H, :W]
    return torch.div(out, norm, out=torch.empty(out.shape, device=device))[..., :H, :W]
