"""Box-level inference at full resolution: sliding-window detection and test-time augmentation.

Sliding window (sliced inference as in SAHI, Akyon et al. 2022, "Slicing Aided Hyper
Inference and Fine-tuning for Small Object Detection"): the image is cut into overlapping
windows on the segmentation sliding window's grid (:func:`~gattn.inference.sliding_window.
window_grid`, the last window flush with the edge, images smaller than a window padded), each
window's boxes are shifted back to image coordinates and all are merged by class-wise NMS. A
box that touches a window edge inside the image may be an object cut in two; such boxes
yield to uncut boxes in the NMS (they are suppressed by any overlapping uncut box, whatever the
scores), so an object smaller than the overlap comes out as the window that saw it whole
predicted it, and a cut box survives only where no window saw its object whole. Global-context
feedback as for segmentation: ``global_context="auto"`` gives every window the
``encode_context`` vector of the whole image, downscaled.

TTA (multi-scale + horizontal flip, as in the detection TTA of mmdetection): the model runs on
the image resized by each scale, with and without a flip; boxes of a flipped view are mirrored
back (``x -> W - x``), all are rescaled to the input size and merged by class-wise NMS.
NMS rather than weighted box fusion (Solovyev et al. 2021): every output box is one that a
view predicted, so an exactly equivariant model gets its own boxes back, and the merge is the
same as the sliding window's; WBF (averaging the coordinates of overlapping boxes) would
localise better and is not implemented.

The model is any module with ``predict(images, *, score_thresh, nms_iou, max_det,
global_context=None) -> list[{"boxes", "scores", "labels"}]`` (a
:class:`~gattn.models.detector.Detector`); put it in eval mode first. :func:`resized_detect`
runs one on an image resized to its input size (boxes scaled back), and :class:`BoxRunner`
makes any of these procedures such a model again, so that TTA can wrap a sliding window.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal, Protocol

import torch

from gattn.models.fcos import Target, merge_detections

from .preprocess import resize_input
from .sliding_window import Size, _pair, resolve_context, window_batch, window_grid
from .tta import resize, scaled_size

CUT_TOLERANCE = 1.0  # pixels: a box this close to a window edge inside the image is cut


class BoxPredictor(Protocol):
    """A detector's ``predict`` (see :meth:`gattn.models.detector.Detector.predict`)."""

    def predict(
        self,
        images: torch.Tensor,
        *,
        score_thresh: float = ...,
        nms_iou: float = ...,
        max_det: int = ...,
        global_context: torch.Tensor | None = ...,
    ) -> list[Target]: ...


class BoxRunner:
    """A box-inference procedure (:func:`resized_detect`, :func:`sliding_window_detect`, ...
    with its model bound) as a :class:`BoxPredictor`, so that :func:`tta_detect` can wrap it.

    Args:
        run: Called as ``run(images, score_thresh=..., nms_iou=..., max_det=...)``.
    """

    def __init__(self, run: Callable[..., list[Target]]) -> None:
        self.run = run

    def predict(
        self,
        images: torch.Tensor,
        *,
        score_thresh: float = 0.05,
        nms_iou: float = 0.6,
        max_det: int = 100,
        global_context: torch.Tensor | None = None,
    ) -> list[Target]:
        """``run``'s detections (see :meth:`gattn.models.detector.Detector.predict`).

        Raises:
            ValueError: a ``global_context`` is given (bind it to the procedure instead).
        """
        if global_context is not None:
            raise ValueError("BoxRunner takes no global_context; bind it to the procedure")
        return self.run(images, score_thresh=score_thresh, nms_iou=nms_iou, max_det=max_det)


@torch.no_grad()
def resized_detect(
    model: BoxPredictor,
    image: torch.Tensor,
    size: Size,
    *,
    score_thresh: float = 0.05,
    nms_iou: float = 0.6,
    max_det: int = 100,
) -> list[Target]:
    """Detections of ``model`` on ``image`` resized to ``size``
    (:func:`~gattn.inference.preprocess.resize_input`, as training and serving resize), boxes
    scaled back to ``image``'s pixels (a plain call when it has that size already).

    Args:
        model: A detector (see the module docstring), in eval mode.
        image: Images ``(B, C, H, W)``.
        size: Input size ``(h, w)`` or an int.
        score_thresh, nms_iou, max_det: As in ``predict``.
    """
    h, w = _pair(size)
    H, W = image.shape[-2], image.shape[-1]
    results = model.predict(
        resize_input(image, (h, w)), score_thresh=score_thresh, nms_iou=nms_iou, max_det=max_det
    )
    if (h, w) == (H, W):
        return results
    scale = image.new_tensor([W / w, H / h, W / w, H / h])
    return [{**r, "boxes": r["boxes"] * scale} for r in results]


def cut_by_window(
    boxes: torch.Tensor, window: tuple[int, int, int, int], image_size: tuple[int, int]
) -> torch.Tensor:
    """Whether each box ``(n, 4)`` (window coordinates) touches an edge of the window
    ``(top, left, h, w)`` that lies inside the image ``(H, W)``, within
    :data:`CUT_TOLERANCE` pixels."""
    top, left, h, w = window
    edges = [
        (boxes[:, 0] <= CUT_TOLERANCE) & (left > 0),
        (boxes[:, 1] <= CUT_TOLERANCE) & (top > 0),
        (boxes[:, 2] >= w - CUT_TOLERANCE) & (left + w < image_size[1]),
        (boxes[:, 3] >= h - CUT_TOLERANCE) & (top + h < image_size[0]),
    ]
    return torch.stack(edges).any(0)


@torch.no_grad()
def sliding_window_detect(
    model: BoxPredictor,
    image: torch.Tensor,
    window: Size,
    overlap: Size,
    batch_size: int = 8,
    global_context: torch.Tensor | Literal["auto"] | None = None,
    *,
    context_size: Size | None = None,
    score_thresh: float = 0.05,
    nms_iou: float = 0.6,
    max_det: int = 100,
    pad_value: float = 0.0,
) -> list[Target]:
    """Detections of ``model`` on overlapping windows of ``image``, merged per image.

    Args:
        model: A detector (see the module docstring), in eval mode.
        image: Images ``(B, C, H, W)``, any ``H, W``.
        window: Window size in pixels, ``(h, w)`` or an int.
        overlap: Overlap of neighbouring windows in pixels; make it at least the largest
            object's size, so that every object lies whole in some window.
        batch_size: Windows per ``predict`` call (windows of all images are batched).
        global_context: ``None``, a ``(B, C_g)`` tensor given to every window of its image, or
            ``"auto"``: ``model.encode_context`` of the whole image downscaled to
            ``context_size``.
        context_size: Size of the downscaled image for ``"auto"``; defaults to ``window``.
        score_thresh, nms_iou, max_det: As in ``predict``; ``max_det`` also bounds each
            window's boxes.
        pad_value: Value that pads axes shorter than the window.

    Returns:
        Per image ``{"boxes": (n, 4) xyxy image pixels, "scores": (n,), "labels": (n,)}``, by
        score.
    """
    if image.ndim != 4:
        raise ValueError(f"image must be (B, C, H, W), got shape {tuple(image.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    win = _pair(window)
    B, _, H, W = image.shape
    context = resolve_context(model, image, global_context, context_size or win)
    padded, ys, xs = window_grid(image, win, overlap, pad_value)
    crops = [(b, y, x) for b in range(B) for y in ys for x in xs]
    found: list[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]] = [
        [] for _ in range(B)
    ]
    for i in range(0, len(crops), batch_size):
        chunk = crops[i : i + batch_size]
        windows, kwargs = window_batch(padded, chunk, win, context)
        results = model.predict(
            windows, score_thresh=score_thresh, nms_iou=nms_iou, max_det=max_det, **kwargs
        )
        for (b, y, x), r in zip(chunk, results, strict=True):
            cut = cut_by_window(r["boxes"], (y, x, *win), (H, W))
            shift = r["boxes"].new_tensor([x, y, x, y])
            found[b].append((r["boxes"] + shift, r["scores"], r["labels"], cut))
    merged = []
    for parts in found:
        boxes, scores, labels, cut = (torch.cat(p) for p in zip(*parts, strict=True))
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, W)  # padding is not image
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, H)
        span = scores.max() - scores.min() + 1 if len(scores) else 1  # uncut boxes rank first
        priority = scores + (~cut).to(scores.dtype) * span
        merged.append(merge_detections(boxes, scores, labels, nms_iou, max_det, priority))
    return merged


@torch.no_grad()
def tta_detect(
    model: BoxPredictor,
    image: torch.Tensor,
    scales: Sequence[float] = (0.75, 1.0, 1.25),
    flip: bool = True,
    *,
    score_thresh: float = 0.05,
    nms_iou: float = 0.6,
    max_det: int = 100,
    mode: str = "bilinear",
) -> list[Target]:
    """Detections of ``model`` over scaled and horizontally flipped views, merged by NMS.

    Args:
        model: A detector (see the module docstring), in eval mode.
        image: Images ``(B, C, H, W)``.
        scales: Resize factors of the views (1.0 is the image itself).
        flip: Add the horizontal flip of every scaled view (one ``predict`` per scale).
        score_thresh, nms_iou, max_det: As in ``predict``, per view and for the merge.
        mode: Interpolation of the resized images.

    Returns:
        Per image ``{"boxes": (n, 4) xyxy input pixels, "scores": (n,), "labels": (n,)}``, by
        score.
    """
    if not scales:
        raise ValueError("tta_detect needs at least one scale")
    B = image.shape[0]
    size = (image.shape[-2], image.shape[-1])
    found: list[list[Target]] = [[] for _ in range(B)]
    for scale in scales:
        h, w = scaled_size(size, scale)
        view = resize(image, (h, w), mode)
        batch = torch.cat([view, view.flip(-1)]) if flip else view
        results = model.predict(batch, score_thresh=score_thresh, nms_iou=nms_iou, max_det=max_det)
        to_input = image.new_tensor([size[1] / w, size[0] / h, size[1] / w, size[0] / h])
        for i, r in enumerate(results):
            boxes = r["boxes"]
            if i >= B:  # a flipped view: mirror back
                boxes = torch.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], 1)
            found[i % B].append({**r, "boxes": boxes * to_input})
    return [
        merge_detections(
            torch.cat([r["boxes"] for r in parts]),
            torch.cat([r["scores"] for r in parts]),
            torch.cat([r["labels"] for r in parts]),
            nms_iou,
            max_det,
        )
        for parts in found
    ]
