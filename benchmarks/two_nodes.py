"""Do the workers on every node of a cluster read the data? A two-node Ray run, simulated.

Usage: ``python benchmarks/two_nodes.py [--images 128] [--out two_nodes]`` (the ``dev`` extra:
moto, s3fs, universal_pathlib)

Starts, on this machine, a Ray cluster of two nodes (``ray.cluster_utils.Cluster``: a head
and a worker raylet, each with its own processes, object store and 1 CPU, on 127.0.0.1 at free
ports, told apart by the custom resources ``node_a`` and ``node_b``) and an S3 server (moto's,
on 127.0.0.1), which holds a generated ``folder-cls`` data set of 256 px JPEGs, so that the
images are on no node's disk. The ``prepare`` stage indexes the bucket (``data.root:
s3://...``); then the pretrain stage's Ray Train run (:func:`fit_torch_trainer`:
:class:`PretrainHooks` in the shared worker loop, DDP over gloo) trains for one epoch with
2 workers of 1 CPU each, so one per node, the driver joining the cluster through
``RAY_ADDRESS`` as :func:`local_ray` does for a user's cluster.

Each worker reads its shard of the training split through the loader the stage builds; the
split is wrapped to count the samples read and the seconds spent reading them, and the worker
reports these, with its own Ray node id, to an actor. Writes
``benchmarks/results/two_nodes.{json,md}``: per worker its node (and that node's resources),
rank, samples read and seconds. Everything it started (the nodes, the server) is stopped at
the end, failed or not; Ray's session files and its address file go to a private folder
(``RAY_TMPDIR``), so no other Ray on this machine sees this cluster.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Subset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, write_results  # noqa: E402
from data_scale import write_photos  # noqa: E402

from pipelines.data import Sample, Split  # noqa: E402
from pipelines.stages.pretrain import PretrainHooks  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BUCKET = "gattn-two-nodes"
NODES = ("node_a", "node_b")  # the custom resource that names each node
PRETRAIN = [  # one short epoch of a small MAE, one 1-CPU worker per node
    "pretrain.num_workers=2",
    "pretrain.cpus_per_worker=1",
    "pretrain.epochs=1",
    "pretrain.warmup_epochs=0.5",
    "pretrain.batch_size=8",
    "pretrain.img_size=32",
    "pretrain.backbone_kwargs={embed_dim: 48, depth: 2, num_heads: 2}",
    "pretrain.probe.enabled=false",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class CountedSplit(Subset[Sample]):
    """A split that counts the samples its loader fetched and the seconds spent decoding
    them (a ``DataLoader`` without workers fetches a batch through ``__getitems__``)."""

    def __init__(self, split: Split) -> None:
        super().__init__(split.dataset, split.indices)
        self.count = 0
        self.seconds = 0.0

    def __getitems__(self, indices: list[int]) -> list[Sample]:
        t0 = time.perf_counter()
        batch = super().__getitems__(indices)
        self.seconds += time.perf_counter() - t0
        self.count += len(indices)
        return batch


class CountingHooks(PretrainHooks):
    """The pretrain stage's hooks, its training split read through :class:`CountedSplit`."""

    def build(self) -> tuple[torch.nn.Module, Split, int]:
        model, dataset, batch_size = super().build()
        self.read = CountedSplit(dataset)
        return model, self.read, batch_size


class Tally:
    """The workers' records (a Ray actor without CPUs)."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def add(self, record: dict[str, Any]) -> None:
        self.rows.append(record)

    def records(self) -> list[dict[str, Any]]:
        return self.rows


def counting_loop(config: dict[str, Any]) -> None:
    """One Ray Train worker: the stage's loop (:func:`train`), then its reading figures and
    Ray node id to ``config["tally"]``."""
    import ray

    from pipelines.train.loop import train

    hooks = CountingHooks(config)
    t0 = time.perf_counter()
    train(hooks, hooks.p.cpus_per_worker)
    record = {
        "rank": hooks.rank,
        "node_id": ray.get_runtime_context().get_node_id(),
        "pid": os.getpid(),
        "samples_read": hooks.read.count,
        "read_s": hooks.read.seconds,
        "worker_s": time.perf_counter() - t0,
    }
    ray.get(config["tally"].add.remote(record))


def start_s3(photos: Path) -> tuple[Any, str]:
    """A moto S3 server on 127.0.0.1 holding ``photos`` under ``s3://BUCKET/photos``; the
    environment (inherited by the Ray nodes started after) points boto at it."""
    import fsspec
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # a line per request otherwise
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    os.environ.update(
        AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}",
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
    )
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    fs.mkdir(BUCKET)
    for folder in sorted(d for d in photos.iterdir() if d.is_dir()):  # the classes
        fs.put(f"{folder}/", f"{BUCKET}/photos/{folder.name}", recursive=True)
    return server, f"s3://{BUCKET}/photos"


def add_nodes(cluster: Any) -> None:
    """A head and one worker node, 1 CPU each, on 127.0.0.1 at free ports."""
    common = {"node_ip_address": "127.0.0.1", "num_cpus": 1, "include_dashboard": False}
    cluster.add_node(
        **common,
        resources={NODES[0]: 1},
        gcs_server_port=free_port(),
        dashboard_agent_listen_port=free_port(),
        metrics_export_port=free_port(),
    )
    cluster.add_node(**common, resources={NODES[1]: 1})
    cluster.wait_for_nodes()


def run(images: int, work: Path) -> list[dict[str, Any]]:
    """Prepare the bucket's data set, run the pretrain workers on the cluster (its address
    in ``RAY_ADDRESS``); one row per worker."""
    import ray
    from ray.cluster_utils import Cluster

    from pipelines.config import load_params
    from pipelines.data import data_fingerprint
    from pipelines.ray_session import local_ray
    from pipelines.stages.prepare import prepare
    from pipelines.stages.pretrain import encoder_config, loop_config, run_name
    from pipelines.train.trainer import fit_torch_trainer

    write_photos(work / "photos", images)
    server, root = start_s3(work / "photos")
    cluster = Cluster()  # no node yet: shutdown() stops those added, however far it got
    try:
        prepared = work / "prepared"
        data = ["data.task=folder-cls", f"data.root={root}", "data.grid_samples=4"]
        params = load_params(ROOT / "params.yaml", [*data, *PRETRAIN])
        prepare(params, prepared, work / "reports")
        add_nodes(cluster)
        os.environ["RAY_ADDRESS"] = cluster.address
        with local_ray():  # joins the cluster, as a stage does on a user's
            tally = ray.remote(num_cpus=0)(Tally).remote()
            p, runs = params.pretrain, work / "runs"
            name = run_name(p, params.seed, data_fingerprint(prepared))
            config = loop_config(p, params.seed, encoder_config(p), prepared, None, runs / "x")
            config["tally"] = tally
            _, wall = fit_torch_trainer(counting_loop, config, p, name, runs)
            records = ray.get(tally.records.remote())
            nodes = {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}
    finally:
        cluster.shutdown()
        server.stop()
    return [row(r, nodes[r["node_id"]], wall) for r in sorted(records, key=lambda r: r["rank"])]


def row(record: dict[str, Any], resources: dict[str, float], wall: float) -> dict[str, Any]:
    """A worker's table row: its node by the custom resource the node was started with."""
    node = next(k for k in NODES if k in resources)
    shown = {k: v for k, v in resources.items() if k in ("CPU", *NODES)}
    return {"node": node, **record, "node_resources": shown, "run_s": wall}


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=128, help="JPEGs in the generated data set")
    ap.add_argument("--out", default="two_nodes")
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="g2n"))  # short: Ray's socket paths live under it
    os.environ["RAY_TMPDIR"] = str(work / "r")
    # On Linux, Ray turns a loopback cluster address into this machine's outward IP
    # (``services.resolve_ip_for_localhost``), where the nodes, bound to 127.0.0.1, do not
    # listen; with this flag (read when ray is imported) it keeps 127.0.0.1, as on macOS.
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    try:
        rows = run(args.images, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    read = {r["node"]: r["samples_read"] for r in rows}
    summary = {
        "images": args.images,
        "workers_per_node": {n: sum(r["node"] == n for r in rows) for n in NODES},
        "every_node_read": all(read.get(n, 0) > 0 for n in NODES),
    }
    columns = ["node", "rank", "node_id", "samples_read", "read_s", "worker_s", "node_resources"]
    notes = (
        "Two Ray nodes on one machine (ray.cluster_utils.Cluster: two raylets, each its own "
        "object store and 1 CPU, marked node_a / node_b); the images on a local S3 server "
        "(moto), read by each pretrain Ray Train worker (DDP, gloo) through the stage's own "
        "loader. samples_read / read_s: the samples the worker's loader fetched in the epoch "
        "and the seconds spent decoding them; worker_s: the worker's whole loop (build, "
        "epoch, checkpoint). node_id and counts are reported by the workers themselves. Ray Train "
        "reports both workers as node_rank 0: it groups workers by IP, and both nodes are "
        "127.0.0.1.\n"
    )
    meta = {**environment(torch.device("cpu")), **summary, "run_s": rows[0]["run_s"]}
    write_results(args.out, rows, columns, meta, notes)
    print(summary)
    if not summary["every_node_read"]:
        raise SystemExit("a node's worker read no data")


if __name__ == "__main__":
    main()
