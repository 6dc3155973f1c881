"""Generated global-context benchmark: deterministic by seed, written as PNG + manifest.

Three tasks that a model with only local context cannot solve:

- ``cue-seg`` (segmentation, :mod:`gattn.data.cue_seg`): one coloured cue names every shape.
- ``pathfinder`` (classification, :mod:`gattn.data.pathfinder`; Linsley et al., NeurIPS 2018;
  Tay et al., "Long Range Arena", ICLR 2021): are the two markers joined by one path.
- ``tiny-det`` (detection, :mod:`gattn.data.tiny_det`): small look-alike objects among
  clutter, whose class one distant coloured cue names.

Sample ``i`` of seed ``s`` is drawn from its own ``numpy.random.Generator`` seeded with
``(s, i)``, so any sample can be regenerated alone (:func:`synthetic_sample`) and the order of
generation does not matter. Pathfinder labels come in pairs ``(2p, 2p + 1)`` with one positive
each, so a data set is balanced 50/50 (exactly, for even ``n``). A tiny-det image's cue class
comes from a stream of its own, ``(s, 2, i)``, apart from its layout's.

On disk (``generate``)::

    out_dir/
      images/000000.png ...     RGB (cue-seg, tiny-det) or greyscale (pathfinder) images
      masks/000000.png ...      cue-seg only: uint8 class ids (0 = background)
      labels.csv                pathfinder only: ``image,label``
      annotations.json          tiny-det only: COCO instances (:mod:`gattn.data.coco`), image
                                ``i`` has id ``i + 1`` and file_name ``000000.png`` (relative
                                to ``images/``), category ids 1..K are labels 0..K-1
      manifest.json             task, seed, config, classes, samples, sha256 of every file

Every file is written to a temporary name and moved into place with ``os.replace``; the manifest
is written last, so its presence means the data set is complete.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from gattn.data.coco import CocoImage, coco_dict
from gattn.data.cue_seg import CueSegConfig, cue_seg_sample
from gattn.data.pathfinder import PathfinderConfig, pathfinder_sample
from gattn.data.tiny_det import TinyDetConfig, tiny_det_sample

__all__ = [
    "ANNOTATIONS",
    "MANIFEST",
    "TASKS",
    "ManifestError",
    "atomic_write",
    "generate",
    "make_config",
    "read_manifest",
    "sha256_file",
    "synthetic_sample",
    "verify_manifest",
]

MANIFEST = "manifest.json"
ANNOTATIONS = "annotations.json"  # a detection data set's COCO file (folder-det's layout too)
FORMAT = "gattn.synthetic/1"
TASKS: dict[str, str] = {"cue-seg": "seg", "pathfinder": "cls", "tiny-det": "det"}  # -> kind
Config = CueSegConfig | PathfinderConfig | TinyDetConfig
_CONFIGS: dict[str, type[Config]] = {
    "cue-seg": CueSegConfig,
    "pathfinder": PathfinderConfig,
    "tiny-det": TinyDetConfig,
}


class ManifestError(ValueError):
    """A generated data set is missing, incomplete or does not match its manifest."""


def make_config(task: str, image_size: int = 64, **kw: Any) -> Config:
    """The validated generator config of ``task``; an unknown task or key is a ValueError."""
    if task not in _CONFIGS:
        raise ValueError(f"unknown synthetic task {task!r}; available: {sorted(_CONFIGS)}")
    cls = _CONFIGS[task]
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(kw) - names)
    if unknown:
        raise ValueError(f"{task}: unknown option(s) {unknown}; valid options: {sorted(names)}")
    return cls(image_size=image_size, **kw)


def _pair_label(seed: int, index: int) -> int:
    """Label of pathfinder sample ``index``: exactly one positive per pair (2p, 2p + 1)."""
    flip = int(np.random.default_rng([seed, 1, index // 2]).integers(2))
    return (index % 2) ^ flip


def _cue_class(seed: int, index: int, num_cues: int) -> int:
    """Cue class of tiny-det sample ``index``, drawn apart from its layout."""
    return int(np.random.default_rng([seed, 2, index]).integers(num_cues))


def synthetic_sample(
    task: str, index: int, seed: int = 0, image_size: int = 64, **kw: Any
) -> tuple[np.ndarray, Any, dict[str, Any]]:
    """Regenerate sample ``index`` of (``task``, ``seed``) alone.

    Returns:
        ``(image, target, meta)``: a uint8 image, a uint8 mask (cue-seg), an int label
        (pathfinder) or ``{"boxes": (N, 4) xyxy, "labels": (N,)}`` arrays (tiny-det), and what
        the generator knows about the sample.
    """
    cfg = make_config(task, image_size, **kw)
    return _sample(task, cfg, seed, index)


def _sample(task: str, cfg: Any, seed: int, index: int) -> tuple[np.ndarray, Any, dict[str, Any]]:
    if index < 0 or seed < 0:
        raise ValueError(f"index={index} and seed={seed} must be >= 0")
    rng = np.random.default_rng([seed, 0, index])
    if task == "cue-seg":
        return cue_seg_sample(cfg, rng)
    if task == "tiny-det":
        return tiny_det_sample(cfg, rng, _cue_class(seed, index, cfg.num_cues))
    return pathfinder_sample(cfg, rng, _pair_label(seed, index))


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike[str]) -> str:
    return sha256_bytes(Path(path).read_bytes())


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and ``os.replace``."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def generate(
    task: str,
    out_dir: str | os.PathLike[str],
    n: int,
    image_size: int = 64,
    seed: int = 0,
    **kw: Any,
) -> dict[str, Any]:
    """Generate ``n`` samples of ``task`` into ``out_dir`` and return the manifest.

    Args:
        task: ``"cue-seg"``, ``"pathfinder"`` or ``"tiny-det"``.
        out_dir: destination folder (created; files of an earlier run are overwritten).
        n: number of samples.
        image_size: image side in pixels.
        seed: data set seed; same seed and options give the same bytes.
        **kw: the task's config fields (:class:`CueSegConfig`, :class:`PathfinderConfig`,
            :class:`TinyDetConfig`).
    """
    cfg = make_config(task, image_size, **kw)
    if not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n={n!r} is invalid, expected an int >= 1")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed={seed!r} is invalid, expected an int >= 0")
    kind = TASKS[task]
    root = Path(out_dir)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / MANIFEST).unlink(missing_ok=True)  # the folder is incomplete until the end
    if kind == "seg":
        (root / "masks").mkdir(exist_ok=True)
    width = max(6, len(str(n - 1)))
    files: dict[str, str] = {}
    samples: list[dict[str, Any]] = []
    boxed: list[CocoImage] = []  # tiny-det's annotations

    def put(rel: str, data: bytes) -> None:
        atomic_write(root / rel, data)
        files[rel] = sha256_bytes(data)

    for i in range(n):
        image, target, meta = _sample(task, cfg, seed, i)
        record: dict[str, Any] = {"image": f"images/{i:0{width}d}.png"}
        put(record["image"], _png(image))
        if kind == "seg":
            record["mask"] = f"masks/{i:0{width}d}.png"
            put(record["mask"], _png(target))
        elif kind == "det":
            name = Path(record["image"]).name
            boxed.append(CocoImage(i + 1, name, image.shape[1], image.shape[0], **target))
        else:
            record["label"] = int(target)
        samples.append({**record, "meta": meta})
    if kind == "cls":
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(["image", "label"])
        writer.writerows([s["image"], s["label"]] for s in samples)
        put("labels.csv", buf.getvalue().encode())
    if kind == "det":
        ids = list(range(1, cfg.num_classes + 1))
        put(ANNOTATIONS, json.dumps(coco_dict(boxed, ids, cfg.class_names)).encode())
    manifest = {
        "format": FORMAT,
        "task": task,
        "kind": kind,
        "seed": int(seed),
        "n": int(n),
        "image_size": image_size,
        "config": dataclasses.asdict(cfg),
        "num_classes": cfg.num_classes,
        "class_names": cfg.class_names,
        "samples": samples,
        "files": files,
    }
    atomic_write(root / MANIFEST, json.dumps(manifest, indent=1).encode())
    return manifest


def read_manifest(root: str | os.PathLike[str]) -> dict[str, Any]:
    """Load ``root/manifest.json`` (a ManifestError if it is missing or not one of ours)."""
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise ManifestError(f"{path} not found: generate the data set first (gattn prepare)")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ManifestError(f"{path} is unreadable: {err}") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ManifestError(f"{path} is not a {FORMAT} manifest")
    return manifest


def verify_manifest(root: str | os.PathLike[str]) -> dict[str, Any]:
    """Check every file of a generated data set against its sha256; return the manifest.

    Raises:
        ManifestError: the manifest is missing, or files are missing or differ (named).
    """
    manifest = read_manifest(root)
    missing, changed = [], []
    for rel, digest in manifest["files"].items():
        path = Path(root) / rel
        if not path.is_file():
            missing.append(rel)
        elif sha256_file(path) != digest:
            changed.append(rel)
    if missing or changed:
        raise ManifestError(
            f"{root}: {len(missing)} missing file(s) {missing[:5]}, "
            f"{len(changed)} changed file(s) {changed[:5]} (regenerate the data set)"
        )
    return manifest
