"""Grad-CAM: where in the image a layer's features drive a class score.

Paper: Selvaraju et al. 2017, "Grad-CAM: Visual Explanations from Deep Networks via
Gradient-based Localization" (ICCV), https://arxiv.org/abs/1610.02391. With activations
``A^c`` of a layer and the gradient of a scalar score ``y`` w.r.t. them, the channel weights
are ``alpha_c = mean_ij dy / dA^c_ij`` and the map is ``ReLU(sum_c alpha_c A^c)``, upsampled
to the input and scaled to ``[0, 1]`` per image.

Unlike the source article's ``grad_cam_visualization`` (the deprecated
``register_backward_hook`` and ``output.backward()`` on a non-scalar): a forward hook makes
the layer's output a fresh leaf of the graph, hands the downstream layers a *copy* of it, and
``torch.autograd.grad`` differentiates a scalar score w.r.t. the leaf. So parameters'
``.grad`` are untouched, frozen models work, the hook is removed even on error, and a layer
whose output the next one changes in place (timm ResNet's ``bn1``/``bn2``, followed by an
in-place ReLU or residual add) is explained from its own output: hooks that keep the
output itself (pytorch-grad-cam) see it overwritten and silently return a wrong map. For
segmentation logits ``(B, K, H, W)`` the score of a class is its logit summed over the pixels.

Layouts of the layer output: ``"nchw"`` (CNNs), ``"nhwc"`` (timm Swin stages) and
``"tokens"`` ``(B, N, C)`` (ViT blocks; prefix tokens dropped, patches laid on the grid).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

Layout = Literal["nchw", "nhwc", "tokens"]
Target = int | Sequence[int] | torch.Tensor | None


def class_scores(output: torch.Tensor) -> torch.Tensor:
    """Per-class scores ``(B, K)``: logits ``(B, K)``, or segmentation logits summed over pixels."""
    if output.ndim == 2:
        return output
    if output.ndim == 4:
        return output.flatten(2).sum(-1)
    raise ValueError(f"expected logits (B, K) or (B, K, H, W), got shape {tuple(output.shape)}")


def to_nchw(
    activation: torch.Tensor,
    layout: Layout,
    image_size: tuple[int, int],
    num_prefix_tokens: int = 0,
) -> torch.Tensor:
    """A layer output as a ``(B, C, h, w)`` map.

    Tokens ``(B, N, C)`` lose their ``num_prefix_tokens`` leading tokens and are laid on the
    grid with the image's aspect ratio (``h * w = N - num_prefix_tokens``).
    """
    if layout == "nchw":
        return activation
    if layout == "nhwc":
        return activation.permute(0, 3, 1, 2)
    if layout != "tokens":
        raise ValueError(f"layout must be 'nchw', 'nhwc' or 'tokens', got {layout!r}")
    tokens = activation[:, num_prefix_tokens:]
    n = tokens.shape[1]
    H, W = image_size
    h = max(1, round(math.sqrt(n * H / W)))
    w = n // h
    if h * w != n:
        raise ValueError(f"{n} patch tokens do not fit a grid of aspect {H}:{W}")
    return tokens.transpose(1, 2).reshape(tokens.shape[0], -1, h, w)


def _resolve_target(target: Target, scores: torch.Tensor) -> torch.Tensor:
    """Class index per image ``(B,)``: the argmax for ``None``, a single class broadcast,
    or one class per image.

    Raises:
        ValueError: a sequence whose length is not the batch size, or a class out of range.
    """
    B, K = scores.shape
    if target is None:
        return scores.argmax(dim=1)
    index = torch.as_tensor(target, device=scores.device).long()
    if index.ndim == 0:
        index = index.expand(B)
    elif index.ndim != 1 or index.shape[0] != B:
        raise ValueError(
            f"target has shape {tuple(index.shape)} for a batch of {B} images; give one class "
            f"(an int) for all images or a sequence of exactly {B} classes, one per image"
        )
    bad = (index < 0) | (index >= K)
    if bad.any():
        raise ValueError(
            f"target {index[bad].tolist()} is not a class id in [0, {K}) "
            f"(the model has {K} classes)"
        )
    return index


def _default_prefix(model: nn.Module) -> int:
    counts = (getattr(m, "num_prefix_tokens", None) for m in model.modules())
    return next((int(n) for n in counts if n is not None), 0)


def grad_cam(
    model: nn.Module,
    image: torch.Tensor,
    target_layer: nn.Module | str,
    target: Target = None,
    *,
    layout: Layout | None = None,
    num_prefix_tokens: int | None = None,
) -> torch.Tensor:
    """Grad-CAM maps ``(B, H, W)`` in ``[0, 1]`` at the input size.

    Args:
        model: Classifier (logits ``(B, K)``) or segmenter (``(B, K, H, W)``); put it in eval
            mode (batch statistics would mix images).
        image: Images ``(B, C, H, W)``.
        target_layer: The layer whose output is explained, or its name in
            ``model.named_modules()``. Its output must be a tensor.
        target: Class to explain: an int (or 0-d tensor) for all images, a sequence of
            exactly ``B`` classes (one per image; any other length is an error, not
            broadcast), or ``None`` for each image's highest-scoring class.
        layout: Layout of the layer output; ``None`` means ``"tokens"`` for 3-d outputs and
            ``"nchw"`` for 4-d ones (pass ``"nhwc"`` for Swin stages).
        num_prefix_tokens: Class/register tokens before the patches (tokens layout);
            ``None`` reads ``num_prefix_tokens`` from the model (0 if it has none).

    Raises:
        ValueError: the target layer did not run, or ``target`` does not fit the batch or
            the classes.
        TypeError: the target layer's output is not a tensor.
    """
    layer = model.get_submodule(target_layer) if isinstance(target_layer, str) else target_layer
    captured: list[torch.Tensor] = []

    def hook(_module: nn.Module, _inputs: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        if not isinstance(output, torch.Tensor):
            raise TypeError(f"target layer returned {type(output).__name__}, not a tensor")
        # The leaf is a copy of the layer's output and downstream layers get another copy, so
        # no in-place op after the layer (ReLU(inplace=True), ``x += shortcut``, or one on an
        # alias of an output that is the layer's input, e.g. nn.Identity) can overwrite it.
        leaf = output.detach().clone().requires_grad_(True)
        captured.append(leaf)
        return leaf.clone()

    handle = layer.register_forward_hook(hook)
    try:
        with torch.enable_grad():
            scores = class_scores(model(image))
            if not captured:
                raise ValueError("the target layer did not run in the forward pass")
            index = _resolve_target(target, scores)
            score = scores.gather(1, index[:, None]).sum()
            (grad,) = torch.autograd.grad(score, captured[-1])
    finally:
        handle.remove()

    activation = captured[-1].detach()
    layout = layout or ("tokens" if activation.ndim == 3 else "nchw")
    prefix = _default_prefix(model) if num_prefix_tokens is None else num_prefix_tokens
    size = (image.shape[-2], image.shape[-1])
    activation = to_nchw(activation, layout, size, prefix)
    grad = to_nchw(grad, layout, size, prefix)
    weights = grad.mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * activation).sum(dim=1, keepdim=True))
    cam = F.interpolate(cam, size=size, mode="bilinear", align_corners=False)[:, 0]
    low = cam.amin(dim=(1, 2), keepdim=True)
    span = cam.amax(dim=(1, 2), keepdim=True) - low
    return torch.where(span > 0, (cam - low) / span.clamp_min(1e-12), torch.zeros_like(cam))
