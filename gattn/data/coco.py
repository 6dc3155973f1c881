"""COCO detection annotations: read and validate, map categories to labels, write subsets.

The format is COCO's "instances" JSON (Lin et al., "Microsoft COCO: Common Objects in
Context", ECCV 2014; https://cocodataset.org/#format-data), as CVAT, Label Studio, Roboflow
and ``pycocotools`` write and read it::

    {"images":      [{"id": 1, "file_name": "img_001.jpg", "width": 640, "height": 480}, ...],
     "annotations": [{"id": 1, "image_id": 1, "category_id": 3, "bbox": [x, y, w, h]}, ...],
     "categories":  [{"id": 3, "name": "car"}, ...]}

``bbox`` is ``[x, y, width, height]`` in pixels of the image as shown (after its EXIF
orientation), from its top-left corner. :func:`read_coco` checks every entry and names the
first bad one with its fix. Categories map to contiguous labels ``0..K-1`` in the order of
their ids (COCO's ids 1, 2, 3, 5 become labels 0, 1, 2, 3), their names kept; categories
without annotations still count. A box at most :data:`BOX_TOLERANCE` px outside its image is
clipped to it (annotation tools round); further out is an error. Crowd annotations
(``iscrowd: 1``) are dropped (counted in :attr:`CocoSet.num_crowd`); segmentations are not
read. Images without annotations are kept (images with nothing to detect).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["BOX_TOLERANCE", "AnnotationError", "CocoImage", "CocoSet", "coco_dict", "read_coco"]

BOX_TOLERANCE = 1.0  # px a box may stick out of its image (then it is clipped)


class AnnotationError(ValueError):
    """A COCO annotation file is unreadable or holds an invalid entry (the message names it)."""


@dataclass(frozen=True)
class CocoImage:
    """One image and its boxes.

    Args:
        id: the COCO image id.
        file_name: the path COCO gives (relative to the images folder).
        width: width in pixels (as shown).
        height: height in pixels (as shown).
        boxes: ``(N, 4)`` float32 ``(x0, y0, x1, y1)`` in pixels.
        labels: ``(N,)`` int64 contiguous labels ``0..K-1``.
    """

    id: int
    file_name: str
    width: int
    height: int
    boxes: np.ndarray = field(repr=False)
    labels: np.ndarray = field(repr=False)


@dataclass(frozen=True)
class CocoSet:
    """A validated COCO file: categories in label order and the images.

    Args:
        category_ids: the COCO category id of each label (sorted).
        class_names: the category name of each label.
        images: every image, in the file's order.
        num_crowd: crowd annotations dropped.
    """

    category_ids: list[int]
    class_names: list[str]
    images: list[CocoImage]
    num_crowd: int = 0


def _fail(path: Path, where: str, problem: str) -> AnnotationError:
    return AnnotationError(f"{path}: {where}: {problem}")


def _int_id(path: Path, where: str, value: Any, key: str = "id") -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(path, where, f"{key}={value!r} is not an integer")
    return value


def _entries(path: Path, data: dict[str, Any], key: str, required: Sequence[str]) -> list[Any]:
    entries = data.get(key)
    if not isinstance(entries, list):
        raise _fail(path, key, "missing or not a list (a COCO instances file has images, "
                    "annotations and categories)")  # fmt: skip
    for i, entry in enumerate(entries):
        missing = [k for k in required if not isinstance(entry, dict) or k not in entry]
        if missing:
            raise _fail(path, f"{key}[{i}]", f"lacks {missing} (needs {list(required)})")
    return entries


def _categories(path: Path, data: dict[str, Any]) -> dict[int, str]:
    names: dict[int, str] = {}
    for i, c in enumerate(_entries(path, data, "categories", ("id", "name"))):
        cid = _int_id(path, f"categories[{i}]", c["id"])
        if cid in names:
            raise _fail(path, f"categories[{i}]", f"id {cid} is used twice; ids must be unique")
        names[cid] = str(c["name"])
    if not names:
        raise _fail(path, "categories", "empty: declare the classes to detect")
    return dict(sorted(names.items()))


def _box(path: Path, where: str, bbox: Any, width: int, height: int) -> list[float]:
    """A validated ``[x, y, w, h]`` as a clipped ``[x0, y0, x1, y1]``."""
    fix = "bbox is [x, y, width, height] in pixels, inside the image, width and height > 0"
    if (
        not isinstance(bbox, list)
        or len(bbox) != 4
        or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in bbox)
        or not all(math.isfinite(v) for v in bbox)
    ):
        raise _fail(path, where, f"bbox {bbox!r} is not 4 finite numbers; {fix}")
    x, y, w, h = (float(v) for v in bbox)
    if w <= 0 or h <= 0:
        raise _fail(path, where, f"bbox {bbox!r} has width or height <= 0; {fix}")
    tol = BOX_TOLERANCE
    if x < -tol or y < -tol or x + w > width + tol or y + h > height + tol:
        raise _fail(path, where, f"bbox {bbox!r} lies outside the {width}x{height} image; {fix}")
    x0, y0 = max(x, 0.0), max(y, 0.0)
    x1, y1 = min(x + w, float(width)), min(y + h, float(height))
    if x1 <= x0 or y1 <= y0:
        raise _fail(path, where, f"bbox {bbox!r} is empty inside the image; {fix}")
    return [x0, y0, x1, y1]


def read_coco(path: str | os.PathLike[str]) -> CocoSet:
    """Read and validate a COCO instances file.

    Raises:
        AnnotationError: the file is missing or not JSON, or an entry is invalid (named, with
            the fix): duplicate image ids or file names, an image without a positive width
            and height, an annotation of an unknown image or category, a bad bbox.
    """
    path = Path(path)
    if not path.is_file():
        raise AnnotationError(f"{path}: not found")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise AnnotationError(f"{path}: not a readable JSON file: {err}") from None
    if not isinstance(data, dict):
        raise AnnotationError(f"{path}: expected a JSON object with images, annotations, "
                              "categories")  # fmt: skip
    categories = _categories(path, data)
    label = {cid: i for i, cid in enumerate(categories)}

    images: dict[int, dict[str, Any]] = {}
    names: set[str] = set()
    for i, im in enumerate(_entries(path, data, "images", ("id", "file_name", "width", "height"))):
        where = f"images[{i}] (id {im['id']!r})"
        iid = _int_id(path, where, im["id"])
        for key in ("width", "height"):
            value = im[key]
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise _fail(path, where, f"{key}={value!r} is not a positive integer")
        name = str(im["file_name"])
        if iid in images or name in names:
            raise _fail(path, where, f"id {iid} or file_name {name!r} appears twice")
        names.add(name)
        images[iid] = {**im, "boxes": [], "labels": []}

    crowd = 0
    for i, a in enumerate(_entries(path, data, "annotations", ("image_id", "category_id", "bbox"))):
        where = f"annotations[{i}] (id {a.get('id')!r})"
        iid, cid = a["image_id"], a["category_id"]
        if iid not in images:
            raise _fail(path, where, f"image_id {iid!r} is not among the images' ids")
        if cid not in label:
            raise _fail(path, where, f"category_id {cid!r} is not among the categories' ids "
                        f"{list(categories)}")  # fmt: skip
        if a.get("iscrowd"):
            crowd += 1
            continue
        im = images[iid]
        im["boxes"].append(_box(path, where, a["bbox"], im["width"], im["height"]))
        im["labels"].append(label[cid])

    return CocoSet(
        category_ids=list(categories),
        class_names=list(categories.values()),
        images=[
            CocoImage(
                id=iid,
                file_name=str(im["file_name"]),
                width=im["width"],
                height=im["height"],
                boxes=np.asarray(im["boxes"], np.float32).reshape(-1, 4),
                labels=np.asarray(im["labels"], np.int64),
            )
            for iid, im in images.items()
        ],
        num_crowd=crowd,
    )


def coco_dict(
    images: Sequence[CocoImage], category_ids: Sequence[int], class_names: Sequence[str]
) -> dict[str, Any]:
    """A COCO instances file of ``images`` (labels back to ``category_ids``). Annotation ids
    run from 1 in image order (``pycocotools`` takes an id of 0 for "unmatched")."""
    annotations: list[dict[str, Any]] = []
    for im in images:
        for (x0, y0, x1, y1), lab in zip(im.boxes.tolist(), im.labels.tolist(), strict=True):
            w, h = x1 - x0, y1 - y0
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": im.id,
                    "category_id": int(category_ids[lab]),
                    "bbox": [x0, y0, w, h],
                    "area": w * h,
                    "iscrowd": 0,
                }
            )
    return {
        "images": [
            {"id": im.id, "file_name": im.file_name, "width": im.width, "height": im.height}
            for im in images
        ],
        "annotations": annotations,
        "categories": [
            {"id": int(c), "name": n} for c, n in zip(category_ids, class_names, strict=True)
        ],
    }
