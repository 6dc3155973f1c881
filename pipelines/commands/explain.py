"""``gattn explain IMAGE``: where the model looks, as a PNG overlay.

Attention rollout (Abnar & Zuidema 2020, "Quantifying Attention Flow in Transformers") for
transformers with a patch grid, Grad-CAM (Selvaraju et al. 2017) on the backbone's last
feature map otherwise, or the one asked for with ``--method``. The map is computed at the
model's input size (as :class:`pipelines.serve.predictor.Predictor` serves it) and drawn over the
original image beside it; for a segmenter the target class defaults to its largest predicted
foreground class, for a classifier to its prediction.

A detector is explained by Grad-CAM (rollout does not apply: its score is not a token's) of a
detection score: the class's logit at the location of its top detection (the highest-scoring
box of that class, over every FPN level; :class:`gattn.diagnostics.detection.DetectionScores`), the
target class defaulting to the top detection's. The map is computed at the image's own size,
as the detector is served.

``--model`` takes a model folder or a registry URI (``models:/gattn-model@champion``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from gattn.data.images import open_image
from gattn.diagnostics import overlay_heatmap
from pipelines.paths import EXPLAIN_REPORTS, FINETUNED

if TYPE_CHECKING:  # the predictor (torch) is imported when the command runs
    from pipelines.serve.predictor import Method

METHODS: dict[str, Method] = {"auto": "auto", "rollout": "rollout", "gradcam": "grad_cam"}


def explain(
    image_path: Path,
    model: str | Path = FINETUNED,
    method: str = "auto",
    target: int | None = None,
    out: Path | None = None,
) -> dict[str, Any]:
    """Write the overlay of one image; returns ``{"out", "method", "target", "class"}``.

    Args:
        image_path: Any image PIL reads.
        model: Model folder or ``models:/`` URI.
        method: ``auto``, ``rollout`` or ``gradcam``.
        target: Class id to explain (default: see the module docstring).
        out: PNG to write (default ``reports/explain/<stem>_<method>.png``).

    Raises:
        FileNotFoundError: the image or the model is missing.
        ValueError: an unknown method, a method the model does not support, a bad target.
    """
    from pipelines.registry import resolve_model
    from pipelines.serve.predictor import Predictor

    if method not in METHODS:
        raise ValueError(f"method must be one of {sorted(METHODS)}, not {method!r}")
    image_path = Path(image_path)
    if not image_path.is_file():
        raise FileNotFoundError(f"{image_path}: no such image")
    predictor = Predictor(resolve_model(model))
    # Decoded as the serving app and the data sets decode (EXIF orientation, 16-bit), then
    # preprocessed by the same path (gattn.inference.model_input via InputSpec.preprocess).
    picture = open_image(image_path, predictor.spec.mode)
    used, heat, target = predictor.explain(
        predictor.spec.preprocess(picture), METHODS[method], target
    )
    out = Path(out) if out else EXPLAIN_REPORTS / f"{image_path.stem}_{used}.png"
    name = predictor.spec.classes[target]
    overlay_heatmap(
        np.asarray(picture),
        {f"{used.replace('_', '-')}: {name}": heat},
        out,
        title=f"{image_path.name}: where the model looks for '{name}'",
    )
    return {"out": str(out), "method": used, "target": target, "class": name}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("image", type=Path, help="image to explain")
    parser.add_argument(
        "--model",
        default=str(FINETUNED),
        help="model folder or registry URI, e.g. models:/gattn-model@champion "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--method", choices=sorted(METHODS), default="auto", help="default: rollout if it applies"
    )
    parser.add_argument("--target", type=int, default=None, help="class id to explain")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"PNG to write (default: {EXPLAIN_REPORTS}/STEM_METHOD.png)",
    )


def run(args: argparse.Namespace) -> int:
    try:
        out = explain(args.image, args.model, args.method, args.target, args.out)
    except (FileNotFoundError, ValueError) as err:  # bad input: the message says the fix
        print(f"gattn explain: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(out))
    return 0
