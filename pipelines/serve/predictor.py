"""A model folder behind an HTTP API: preprocessing, batched prediction and explanations.

The serving app (:mod:`pipelines.serve.app`) hands a :class:`Predictor` the requests of one
dynamic batch; it groups them by image size and options and runs each group as one forward
pass, so a batch of same-sized requests costs one call of the model.

Images become model inputs through the one preprocessing path the evaluate stage uses too
(:mod:`gattn.inference.preprocess`: floats in ``[0, 1]``, the folder's ``mean``/``std`` when
it has them, antialiased bilinear resizing as in training); :meth:`InputSpec.preprocess` and
:meth:`InputSpec.transform` apply it with a model's settings. Classifiers see the image
resized to the model's input size. Segmenters see

- a sliding window (:func:`gattn.inference.sliding_window`, windows of the input size, with
  global-context feedback when the model takes it) for images larger than the input size
  (``sliding="auto"``) or always (``"on"``);
- otherwise the image itself (convolutional models take any size) or, for models with a fixed
  input grid (a timm ``PatchEmbed``: ViT, Swin), the image resized to the input size and the
  logits resized back.

Detectors are run the same way, on boxes: sliding windows
(:func:`gattn.inference.sliding_window_detect`, windows' boxes merged by NMS, global-context
feedback), the whole image, or the image resized (:func:`gattn.inference.resized_detect`);
their boxes are in the image's pixels.

Test-time augmentation (:func:`gattn.inference.tta`, :func:`gattn.inference.tta_detect` for
boxes) wraps any of these. Explanations are attention rollout (Abnar & Zuidema 2020) for
models with attention layers, else Grad-CAM (Selvaraju et al. 2017) on the backbone's last
feature map; for a detector, Grad-CAM of its top detection's class logit at that detection's
location (:class:`gattn.diagnostics.detection.DetectionScores`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from timm.layers import PatchEmbed
from torch import nn

from gattn.diagnostics import attention_rollout, grad_cam, rollout_map
from gattn.diagnostics.detection import DetectionScores, top_class
from gattn.inference import (
    BoxRunner,
    InputTransform,
    model_input,
    resize_input,
    resized_detect,
    sliding_window,
    sliding_window_detect,
    tta,
    tta_detect,
)
from gattn.inference.detection import BoxPredictor
from gattn.inference.tta import resize as resize_output
from gattn.models import load_model
from gattn.models.detector import Detector
from gattn.models.fcos import Target
from pipelines.config import ModelTask

Sliding = Literal["auto", "on", "off"]
Method = Literal["auto", "rollout", "grad_cam"]  # of an explanation
Runner = Callable[[torch.Tensor], torch.Tensor]
Boxes = dict[str, np.ndarray]  # one image's detections: boxes (n, 4) xyxy px, scores, labels
Result = np.ndarray | Boxes | Exception  # of one job (see Predictor.run)
WINDOW_BATCH = 16  # sliding windows per forward pass


@dataclass(frozen=True)
class Options:
    """Per-request inference options (requests with equal options and sizes batch together)."""

    tta: bool = False
    sliding: Sliding = "auto"


@dataclass(frozen=True)
class Job:
    """One request of a batch: a preprocessed image ``(C, H, W)`` and its options.

    The image may be a numpy array: that is how the serving ingress sends it to a model
    replica, since Ray passes numpy buffers without copying where a tensor is pickled whole.
    """

    image: torch.Tensor | np.ndarray
    options: Options


def as_tensor(image: torch.Tensor | np.ndarray) -> torch.Tensor:
    """A tensor of ``image`` (a numpy array is copied: Ray hands replicas read-only buffers)."""
    return image if isinstance(image, torch.Tensor) else torch.from_numpy(np.array(image))


def fixed_input_size(model: nn.Module) -> bool:
    """Whether ``model`` needs inputs of its configured size (it embeds patches on a grid)."""
    return any(isinstance(m, PatchEmbed) for m in model.modules())


def has_attention(model: nn.Module) -> bool:
    """Whether :func:`~gattn.diagnostics.capture_attention` finds attention layers in it."""
    return any(
        hasattr(m, "fused_attn") and isinstance(getattr(m, "attn_drop", None), nn.Module)
        for m in model.modules()
    )


def cam_layer(model: nn.Module) -> tuple[str, Literal["nhwc"] | None]:
    """Name of the backbone's last feature stage (Grad-CAM's target) and its layout.

    Raises:
        ValueError: the model has no timm ``feature_info`` that names a module.
    """
    backbone, prefix = (model.encoder, "encoder.") if hasattr(model, "encoder") else (model, "")
    info = getattr(backbone, "feature_info", None)
    if info is None:
        raise ValueError(f"{type(backbone).__name__} has no feature_info; cannot pick a layer")
    name = info.module_name(-1) if hasattr(info, "module_name") else info[-1]["module"]
    fmt = getattr(backbone, "output_fmt", "NCHW")
    layout: Literal["nhwc"] | None = "nhwc" if getattr(fmt, "value", fmt) == "NHWC" else None
    modules = dict(model.named_modules())
    for candidate in (name, name.replace(".", "_"), f"model.{name}"):
        if prefix + candidate in modules:
            return prefix + candidate, layout
    raise ValueError(f"feature module {name!r} not found in {type(model).__name__}")


@dataclass(frozen=True)
class InputSpec:
    """What the HTTP side needs to know about a served model, without its weights: the task,
    the classes, the input size and channels, and how images become its input.

    The serving app's ingress holds one (from :meth:`Predictor.spec`) to validate, decode and
    preprocess requests in its own process; only batches of ready tensors reach the model.
    """

    task: ModelTask
    classes: tuple[str, ...]
    img_size: tuple[int, int]
    in_chans: int
    fixed: bool  # needs inputs of img_size (a patch grid): ViT, Swin
    feedback: bool  # its decode head (a detector: itself) takes global-context feedback
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    @classmethod
    def of(cls, model: nn.Module, config: dict[str, Any], where: str = "model") -> InputSpec:
        """The spec of a loaded model and its ``config.json``.

        Raises:
            ValueError: the config lists the wrong number of classes, names no input size, or
                the model takes other than 1 or 3 channels.
        """
        cfg = config["model"]
        num_classes = int(cfg["num_classes"])
        classes = tuple(str(c) for c in config.get("classes") or []) or tuple(
            str(i) for i in range(num_classes)
        )
        if len(classes) != num_classes:
            raise ValueError(
                f"{where}/config.json lists {len(classes)} classes for a model with "
                f"num_classes={num_classes}"
            )
        size = config.get("img_size") or cfg.get("img_size")
        if not size:
            raise ValueError(f"{where}/config.json names no img_size (the input size)")
        in_chans = int(cfg.get("in_chans", 3))
        if in_chans not in (1, 3):
            raise ValueError(f"serving takes 1- or 3-channel models, not in_chans={in_chans}")
        head = getattr(model, "head", None)
        mean, std = config.get("mean"), config.get("std")
        return cls(
            task=cfg.get("task", "cls"),
            classes=classes,
            img_size=(int(size), int(size)),
            in_chans=in_chans,
            fixed=fixed_input_size(model),
            feedback=any(getattr(m, "context_proj", None) is not None for m in (head, model)),
            mean=tuple(mean) if mean is not None else None,
            std=tuple(std) if std is not None else None,
        )

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def mode(self) -> str:
        """The PIL mode images are decoded to."""
        return "L" if self.in_chans == 1 else "RGB"

    def info(self) -> dict[str, Any]:
        """Task, classes and input size (for ``GET /v1/model``)."""
        return {
            "task": self.task,
            "classes": list(self.classes),
            "input_size": list(self.img_size),
            "in_chans": self.in_chans,
            "fixed_input_size": self.fixed,
            "global_feedback": self.feedback,
        }

    def preprocess(self, image: Image.Image | np.ndarray | torch.Tensor) -> torch.Tensor:
        """A decoded image (in :attr:`mode`) as the float tensor ``(C, H, W)`` the model takes
        (:func:`gattn.inference.model_input`): a classifier's at :attr:`img_size`, a
        segmenter's or detector's at the image's own size (sliding windows, or a resize for
        fixed-size models, are chosen per request by :class:`Predictor`)."""
        size = self.img_size if self.task == "cls" else None
        return model_input(image, size, self.mean, self.std)

    def transform(self, resize: bool) -> InputTransform:
        """The same preprocessing as a data set transform (``t(image)``, ``t(image, mask)``):
        at :attr:`img_size` (masks resized nearest) when ``resize``, else at each image's
        own size."""
        return InputTransform(self.img_size if resize else None, self.mean, self.std)

    def use_sliding(self, size: tuple[int, int], options: Options) -> bool:
        """Whether a segmentation or detection of an image of ``size`` runs on sliding
        windows."""
        if options.sliding == "on":
            return True
        large = size[0] > self.img_size[0] or size[1] > self.img_size[1]
        return options.sliding == "auto" and large


class Predictor:
    """A loaded model folder answering prediction and explanation requests.

    Args:
        model_dir: A folder written by :func:`gattn.models.save_model` whose ``config.json``
            holds ``classes`` and ``img_size`` (the finetune stage's output).
        overlap: Sliding-window overlap as a fraction of the window.
        tta_scales: Scales of test-time augmentation (with horizontal flips).
        device: Torch device.
    """

    def __init__(
        self,
        model_dir: Path,
        overlap: float = 0.25,
        tta_scales: Sequence[float] = (0.75, 1.0, 1.25),
        device: str = "cpu",
    ) -> None:
        self.model, self.config = load_model(model_dir, device)
        self.spec = InputSpec.of(self.model, self.config, str(model_dir))
        height, width = self.spec.img_size
        self.overlap = (int(overlap * height), int(overlap * width))
        self.tta_scales = tuple(tta_scales)
        self.device = torch.device(device)

    def _fit(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of ``x``; fixed-size models see it resized (seg logits are resized back)."""
        if not self.spec.fixed:
            return self.model(x)
        logits = self.model(resize_input(x, self.spec.img_size))
        size = (x.shape[-2], x.shape[-1])
        return resize_output(logits, size) if logits.ndim == 4 else logits

    def _runner(self, size: tuple[int, int], options: Options) -> Runner:
        if self.spec.task == "seg" and self.spec.use_sliding(size, options):
            return functools.partial(
                sliding_window,
                self.model,
                window=self.spec.img_size,
                overlap=self.overlap,
                batch_size=WINDOW_BATCH,
                global_context="auto" if self.spec.feedback else None,
            )
        return self._fit

    @torch.inference_mode()
    def probabilities(self, images: torch.Tensor, options: Options) -> torch.Tensor:
        """Class probabilities of same-sized images ``(B, C, H, W)``: ``(B, K)`` for a classifier
        (images resized to the input size first), ``(B, K, H, W)`` for a segmenter.

        Raises:
            ValueError: the model is a detector (its answer: :meth:`detections`).
        """
        task = self.spec.task
        if task == "det":
            raise ValueError("a detector gives boxes, not class probabilities: see detections()")
        images = images.to(self.device)
        if task == "cls":
            images = resize_input(images, self.spec.img_size)  # a no-op after preprocess()
        runner = self._runner((images.shape[-2], images.shape[-1]), options)
        if options.tta:
            return tta(runner, images, self.tta_scales, flip=True, task=task)
        return runner(images).float().softmax(dim=1)

    @property
    def detector(self) -> Detector:
        """The model, a detector.

        Raises:
            TypeError: the model is not a :class:`~gattn.models.detector.Detector`.
        """
        if not isinstance(self.model, Detector):
            raise TypeError(f"{type(self.model).__name__} is not a detector")
        return self.model

    def _box_runner(self, size: tuple[int, int], options: Options) -> BoxPredictor:
        """How a detector sees images of ``size``: sliding windows (with global feedback when
        it takes it), the image resized to the input size (fixed-size models) or itself."""
        if self.spec.use_sliding(size, options):
            return BoxRunner(
                functools.partial(
                    sliding_window_detect,
                    self.detector,
                    window=self.spec.img_size,
                    overlap=self.overlap,
                    batch_size=WINDOW_BATCH,
                    global_context="auto" if self.spec.feedback else None,
                )
            )
        if self.spec.fixed:
            resized = functools.partial(resized_detect, self.detector, size=self.spec.img_size)
            return BoxRunner(resized)
        return self.detector

    @torch.inference_mode()
    def detections(self, images: torch.Tensor, options: Options) -> list[Target]:
        """A detector's boxes of same-sized images ``(B, C, H, W)``, per image ``{"boxes": (n,
        4) xyxy image pixels, "scores", "labels"}`` by score (the model's ``predict`` defaults:
        scores from 0.05, at most 100 boxes)."""
        images = images.to(self.device)
        runner = self._box_runner((images.shape[-2], images.shape[-1]), options)
        if options.tta:
            tta_run = functools.partial(tta_detect, runner, scales=self.tta_scales, flip=True)
            runner = BoxRunner(tta_run)
        return runner.predict(images)

    def _results(self, images: torch.Tensor, options: Options) -> list[np.ndarray | Boxes]:
        """One group's results (see :meth:`run`)."""
        if self.spec.task == "det":
            return [
                {k: v.cpu().numpy() for k, v in found.items()}
                for found in self.detections(images, options)
            ]
        probs = self.probabilities(images, options)
        out = probs if self.spec.task == "cls" else probs.argmax(1)
        return list(out.cpu().numpy())

    def run(self, jobs: Sequence[Job]) -> list[Result]:
        """Results of a batch of jobs, in order: ``(K,)`` probabilities (cls), an ``(H, W)``
        class-id mask (seg) or the boxes (det: :data:`Boxes`, image pixels) per job, or the
        exception its group raised (so one bad group does not fail the others).

        Jobs with equal image shape and options run as one forward pass.
        """
        groups: dict[tuple[Any, ...], list[int]] = {}
        for i, job in enumerate(jobs):
            groups.setdefault((tuple(job.image.shape), job.options), []).append(i)
        results: list[Result] = [RuntimeError("not run")] * len(jobs)
        for (_, options), members in groups.items():
            try:
                images = torch.stack([as_tensor(jobs[i].image) for i in members])
                out = self._results(images, options)
                for i, row in zip(members, out, strict=True):
                    results[i] = row
            except Exception as err:  # reported to the requests of this group only
                for i in members:
                    results[i] = err
        return results

    def default_target(self, x: torch.Tensor) -> int:
        """The class to explain when none is asked for, for one image ``(1, C, H, W)``: the
        predicted class (cls), the largest predicted foreground class (seg; background 0 when
        no pixel is foreground), or the top detection's class (det)."""
        if self.spec.task == "det":
            return top_class(self.detector, x)
        probs = self.probabilities(x, Options(sliding="off"))[0]
        if self.spec.task == "cls":
            return int(probs.argmax())
        counts = torch.bincount(probs.argmax(0).flatten(), minlength=self.spec.num_classes)
        return int(counts[1:].argmax()) + 1 if counts[1:].any() else 0

    def _rollout(self, x: torch.Tensor) -> torch.Tensor:
        prefix = next(
            (
                int(n)
                for m in self.model.modules()
                if (n := getattr(m, "num_prefix_tokens", None)) is not None
            ),
            0,
        )
        grid = next(tuple(m.grid_size) for m in self.model.modules() if isinstance(m, PatchEmbed))
        return rollout_map(attention_rollout(self.model, x), prefix, grid)[0]

    def explain(
        self,
        image: torch.Tensor,
        method: Method = "auto",
        target: int | None = None,
    ) -> tuple[str, np.ndarray, int]:
        """A relevance map in ``[0, 1]`` for one image ``(C, H, W)``.

        Args:
            image: Preprocessed image ``(C, H, W)`` (a tensor or a numpy array).
            method: ``"rollout"`` (transformers: one token grid through all layers),
                ``"grad_cam"``, or ``"auto"``: rollout where it applies, else Grad-CAM.
            target: Class to explain (Grad-CAM); default :meth:`default_target`. For a
                detector, the score explained is the class's logit at its top detection's
                location (:class:`gattn.diagnostics.detection.DetectionScores`).

        Returns:
            ``(method used, map (h, w) at any resolution, target class)``.

        Raises:
            ValueError: ``target`` is out of range, or the method does not apply to the model.
        """
        if method not in ("auto", "rollout", "grad_cam"):
            raise ValueError(f"method must be 'auto', 'rollout' or 'grad_cam', not {method!r}")
        x = as_tensor(image)[None].to(self.device)
        if self.spec.task == "cls" or self.spec.fixed:
            x = resize_input(x, self.spec.img_size)
        if target is None:
            target = self.default_target(x)
        if not 0 <= target < self.spec.num_classes:
            raise ValueError(f"target {target} is not a class id in [0, {self.spec.num_classes})")
        rollout = self.spec.task != "det" and has_attention(self.model) and self.spec.fixed
        if method != "grad_cam" and rollout:
            try:
                return "rollout", self._rollout(x).float().cpu().numpy(), target
            except ValueError:  # e.g. window attention: token counts differ between layers
                if method == "rollout":
                    raise
        elif method == "rollout":
            raise ValueError(
                "rollout needs a transformer with a patch grid (not a detector); use grad_cam"
            )
        layer, layout = cam_layer(self.model)
        scores = DetectionScores(self.detector) if self.spec.task == "det" else self.model
        heat = grad_cam(scores, x, self.model.get_submodule(layer), target, layout=layout)[0]
        return "grad_cam", heat.float().cpu().numpy(), target
