"""``gattn predict IMAGE``: the command-line client of the serving app (stdlib HTTP only).

Sends the image as the request body to ``POST /v1/predict`` and prints the top-k labels
(classifier), the class areas and saves the mask PNG (segmenter), or the boxes and saves the
image with the boxes drawn on it (detector, ``IMAGE.boxes.png``); ``--explain OUT.png``
also saves the heatmap from ``POST /v1/explain``. The URL defaults to ``serve.host`` /
``serve.port`` / ``serve.route_prefix`` of params.yaml, the token to the environment variable
``serve.auth_token_env`` names.
"""

from __future__ import annotations

import argparse
import base64
import json
import mimetypes
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from pipelines.config import ServeParams, add_params_arguments, load_params


class ClientError(RuntimeError):
    """The server is unreachable or answered with an error (its message is kept)."""


def default_url(p: ServeParams) -> str:
    """``http://host:port/prefix`` of the app (a wildcard bind address becomes loopback)."""
    host = "127.0.0.1" if p.host in ("0.0.0.0", "::", "") else p.host
    return f"http://{host}:{p.port}{p.route_prefix.rstrip('/')}"


def call(
    url: str,
    path: str,
    data: bytes | None = None,
    content_type: str = "application/octet-stream",
    query: dict[str, Any] | None = None,
    token: str | None = None,
    timeout: float = 60.0,
) -> dict[str, Any]:
    """One request to the app; the JSON answer.

    Args:
        url: Base URL of the app.
        path: Endpoint, e.g. ``/v1/predict``.
        data: Body (POST) or ``None`` (GET).
        content_type: Content type of the body.
        query: Query parameters (``None`` values are left out; booleans as ``true``/``false``).
        token: Bearer token.
        timeout: Seconds.

    Raises:
        ClientError: no server, or an HTTP error (with the server's ``detail``).
    """
    params = {
        k: (str(v).lower() if isinstance(v, bool) else v)
        for k, v in (query or {}).items()
        if v is not None
    }
    full = url.rstrip("/") + path + (f"?{urllib.parse.urlencode(params)}" if params else "")
    headers = {"Content-Type": content_type} if data is not None else {}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(full, data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as err:
        body = err.read().decode(errors="replace")
        try:
            detail = json.loads(body).get("detail", body)
        except (json.JSONDecodeError, AttributeError):
            detail = body
        raise ClientError(f"{full}: HTTP {err.code}: {detail}") from None
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise ClientError(f"{full}: no answer ({reason}); is `gattn serve` running?") from None


def save_png(b64: str, path: Path) -> Path:
    """Write a base64 PNG from a response to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(base64.b64decode(b64))
    return path


def draw_boxes(image: Path, boxes: list[dict[str, Any]], path: Path) -> Path:
    """Write ``image`` with the answer's ``boxes`` outlined, class ``k`` in matplotlib's tab10
    colour ``k`` (as the reports draw them), each labelled with its class and score."""
    import matplotlib
    from PIL import Image, ImageDraw

    colours = matplotlib.color_sequences["tab10"]
    with Image.open(image) as opened:
        picture = opened.convert("RGB")
    draw = ImageDraw.Draw(picture)
    for b in reversed(boxes):  # the best boxes drawn last, on top
        colour = tuple(round(255 * c) for c in colours[b["index"] % len(colours)])
        x0, y0, x1, y1 = b["box"]
        # pixel edges to the last pixel inside (a box under a pixel wide is one pixel)
        draw.rectangle((x0, y0, max(x0, x1 - 1), max(y0, y1 - 1)), outline=colour)
        draw.text((x0, max(0.0, y0 - 10)), f"{b['label']} {b['score']:.2f}", fill=colour)
    path.parent.mkdir(parents=True, exist_ok=True)
    picture.save(path, format="PNG")
    return path


def describe(result: dict[str, Any]) -> str:
    """Human-readable lines of a ``/v1/predict`` answer."""
    model = result["model"]
    version = f" v{model['version']}" if model.get("version") is not None else ""
    lines = [f"{model['name']}{version} ({result['task']}, {result['width']}x{result['height']})"]
    if result["task"] == "cls":
        lines += [f"  {t['probability']:.4f}  {t['label']}" for t in result["top_k"]]
    elif result["task"] == "det":
        lines.append(f"  {len(result['boxes'])} boxes")
        lines += [
            f"  {b['score']:.4f}  {b['label']} [{', '.join(f'{v:.1f}' for v in b['box'])}]"
            for b in result["boxes"]
        ]
    else:
        lines += [
            f"  {a['fraction']:7.2%}  {a['label']} ({a['pixels']} px)"
            for a in result["areas"]
            if a["pixels"]
        ]
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_params_arguments(parser)
    parser.add_argument("image", type=Path, help="image file (PNG, JPEG, ...)")
    parser.add_argument("--url", help="app URL (default: from params.yaml's serve section)")
    parser.add_argument("--token", help="bearer token (default: $<serve.auth_token_env>)")
    parser.add_argument("--top-k", type=int, help="labels to print (classifier)")
    parser.add_argument("--tta", action="store_true", help="test-time augmentation")
    parser.add_argument(
        "--sliding",
        choices=("auto", "on", "off"),
        default="auto",
        help="sliding windows (seg, det)",
    )
    parser.add_argument("--min-score", type=float, help="boxes from this score (detector)")
    parser.add_argument("--mask", type=Path, help="mask PNG to write (default: IMAGE.mask.png)")
    parser.add_argument(
        "--boxes", type=Path, help="image with the boxes drawn (default: IMAGE.boxes.png)"
    )
    parser.add_argument("--explain", type=Path, metavar="PNG", help="also save a heatmap here")
    parser.add_argument("--json", action="store_true", help="print the raw JSON answer")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per request")


def run(args: argparse.Namespace) -> int:
    p = load_params(args.params, args.overrides).serve
    url = args.url or default_url(p)
    token = args.token or (os.environ.get(p.auth_token_env) if p.auth_token_env else None)
    if not args.image.is_file():
        print(f"gattn predict: error: {args.image}: no such file", file=sys.stderr)
        return 2
    data = args.image.read_bytes()
    ctype = mimetypes.guess_type(args.image.name)[0] or "application/octet-stream"
    query = {
        "top_k": args.top_k,
        "tta": args.tta,
        "sliding": args.sliding,
        "min_score": args.min_score,
    }
    try:
        result = call(url, "/v1/predict", data, ctype, query, token, args.timeout)
        heat = None
        if args.explain:
            heat = call(url, "/v1/explain", data, ctype, None, token, args.timeout)
    except ClientError as err:
        print(f"gattn predict: error: {err}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2) if args.json else describe(result))
    if result.get("mask_png"):
        mask = args.mask or args.image.with_name(f"{args.image.stem}.mask.png")
        print(f"mask: {save_png(result['mask_png'], mask)}")
    if result.get("boxes") is not None:
        drawn = args.boxes or args.image.with_name(f"{args.image.stem}.boxes.png")
        print(f"boxes: {draw_boxes(args.image, result['boxes'], drawn)}")
    if heat is not None:
        print(
            f"heatmap ({heat['method']}, class {heat['label']}): "
            f"{save_png(heat['heatmap_png'], args.explain)}"
        )
    return 0
