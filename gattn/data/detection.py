"""Detection data: COCO-annotated image folders (``folder-det``, and ``tiny-det`` as generated),
their training views and batching.

A sample is ``(image, target)``: a float image ``(C, H, W)`` and
``{"boxes": FloatTensor[N, 4] (x0, y0, x1, y1) in pixels of that image, "labels":
LongTensor[N] in 0..K-1, "image_id": int}`` (the COCO image id), the input torchvision's
detection models and ``torchmetrics``' ``MeanAveragePrecision`` take. Transforms
(:func:`gattn.data.views.det_train_transform`, ``seg_eval_transform``) are
``torchvision.transforms.v2`` joint transforms over ``tv_tensors.BoundingBoxes``, so a resize
rescales the boxes and a flip flips them with the image. :func:`collate_detection` batches
same-size images and keeps the targets a list (their box counts differ).

Bad files follow :mod:`gattn.data.datasets`: an image that fails to decode, or whose size is
not the one its annotations give, is skipped and recorded in ``dataset.skipped``; a missing
image file or an invalid annotation is an error that names it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torchvision import tv_tensors

from gattn.data.coco import CocoImage, read_coco
from gattn.data.datasets import IGNORE_INDEX, DataLayoutError, _check_dir, _ImageDataset
from gattn.data.synthetic import ANNOTATIONS

__all__ = [
    "DET_LAYOUT",
    "CocoDetectionDataset",
    "DetTarget",
    "collate_detection",
]

DetTarget = dict[str, Any]  # {"boxes": (N, 4) float xyxy, "labels": (N,) long, "image_id": int}

DET_LAYOUT = """root/
  annotations.json   COCO instances: images (id, file_name, width, height), categories
                     (id, name), annotations (image_id, category_id, bbox [x, y, w, h] px)
  images/
    img_001.jpg      file_name is looked up under images/, then under root/
    img_002.png"""


class CocoDetectionDataset(_ImageDataset):
    """Images with COCO box annotations: ``root/annotations.json`` + ``root/images/``.

    Categories become labels ``0..K-1`` in the order of their ids (``classes``: their names,
    ``category_ids``: their ids); see :mod:`gattn.data.coco` for the checks.

    Args:
        root: the folder holding the annotation file and ``images/``.
        transform: joint transform called as ``transform(image, target)`` on ``tv_tensors``
            (``target["boxes"]`` a ``BoundingBoxes``); default: image to float in [0, 1].
        check: index-time check, ``"verify"``, ``"decode"`` or ``"none"``.
        mode: PIL mode images are converted to.
        annotations: the COCO file's name under ``root``.

    Raises:
        DataLayoutError: ``root`` or the annotation file is missing, or image files are.
        AnnotationError: the annotation file is invalid (:func:`gattn.data.coco.read_coco`).
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        transform: Callable[..., Any] | None = None,
        check: Literal["verify", "decode", "none"] = "verify",
        mode: str = "RGB",
        annotations: str = ANNOTATIONS,
    ) -> None:
        self.root = Path(root)
        _check_dir(self.root, DET_LAYOUT)
        path = self.root / annotations
        if not path.is_file():
            raise DataLayoutError(f"{self.root} has no {annotations}", DET_LAYOUT)
        coco = read_coco(path)
        self.classes, self.category_ids = coco.class_names, coco.category_ids
        self.num_crowd = coco.num_crowd
        samples, missing = [], []
        for im in coco.images:
            found = next(
                (p for p in (self.root / "images" / im.file_name, self.root / im.file_name)
                 if p.is_file()),
                None,
            )  # fmt: skip
            if found is None:
                missing.append(im.file_name)
            else:
                samples.append((found, im))
        if missing:
            raise DataLayoutError(
                f"{path}: {len(missing)} of {len(coco.images)} image file(s) not found under "
                f"{self.root / 'images'} or {self.root}: {missing[:5]}",
                DET_LAYOUT,
            )
        if not samples:
            raise DataLayoutError(f"{path} lists no images", DET_LAYOUT)
        super().__init__(
            samples,
            task="det",
            num_classes=len(self.classes),
            transform=transform,
            check=check,
            mode=mode,
            ignore_index=IGNORE_INDEX,
            layout=DET_LAYOUT,
        )

    def _check_size(self, sample: tuple[Path, Any], size: tuple[int, int]) -> None:
        im: CocoImage = sample[1]
        if size != (im.width, im.height):
            raise ValueError(
                f"image {sample[0].name} is {size[0]}x{size[1]}, its annotations say "
                f"{im.width}x{im.height}"
            )

    def _target(self, sample: tuple[Path, Any], image: tv_tensors.Image) -> DetTarget:
        self._check_size(sample, (image.shape[-1], image.shape[-2]))
        im: CocoImage = sample[1]
        return {
            "boxes": tv_tensors.BoundingBoxes(
                torch.from_numpy(im.boxes),
                format=tv_tensors.BoundingBoxFormat.XYXY,
                canvas_size=(im.height, im.width),
            ),
            "labels": torch.from_numpy(im.labels),
            "image_id": im.id,
        }

    def _output(self, image: Any, target: Any) -> tuple[Any, Any]:
        if not isinstance(target, dict):  # the transform made its own target (a label)
            return image, target
        return image, {
            "boxes": target["boxes"].as_subclass(torch.Tensor).float(),
            "labels": target["labels"].long(),
            "image_id": int(target["image_id"]),
        }


def collate_detection(
    batch: Sequence[tuple[torch.Tensor, DetTarget]],
) -> tuple[torch.Tensor, list[DetTarget]]:
    """Stack a batch's images (all one size: resize them in the transform) and list its
    targets.

    Raises:
        ValueError: the images differ in size.
    """
    images, targets = zip(*batch, strict=True)
    shapes = sorted({tuple(x.shape) for x in images})
    if len(shapes) > 1:
        raise ValueError(
            f"collate_detection: images of {len(shapes)} sizes in one batch {shapes[:3]}; "
            "resize them to one size first (det_train_transform(size), seg_eval_transform(size))"
        )
    return torch.stack([torch.as_tensor(x) for x in images]), list(targets)
