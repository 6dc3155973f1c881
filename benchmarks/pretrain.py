"""Pretraining throughput: MAE's masked encoder against encoding every patch, 1 vs 2 Ray workers.

Usage: ``python benchmarks/pretrain.py [--device cuda --peak-tflops 989] [--sizes 64 128]``

1. MAE (He et al., CVPR 2022, §4: encoding only the visible 25% makes pre-training >= 3x
   faster): a training step (forward, backward, AdamW) of :class:`gattn.ssl.MaskedAutoencoder`
   with mask ratio 0.75 against the same ViT encoding all patches (mask ratio 0) with the same
   decoder and the loss on every patch, at each ``--sizes`` (the ``pretrain`` default encoder,
   ``gattn_vit_global``). Both in this process, interleaved; target: ratio >= 2.5. Model FLOPs
   per image are counted with ``torch.utils.flop_counter``; with ``--peak-tflops`` the
   model-FLOPs utilisation (MFU) is reported too.
2. Ray Train: the ``pretrain`` stage (:func:`pipelines.stages.pretrain.pretrain`, MAE, probe off)
   for few epochs with 1 worker x ``--cpus`` CPUs and with 2 workers x ``--cpus / 2`` CPUs (the
   same cores): the median images/s of the epochs after the first (which pays for start-up)
   and their ratio. On one 2-core machine the ratio
   shows the DDP overhead (no new cores); on a cluster, give each worker its own cores.

Writes ``benchmarks/results/pretrain[-<device>].{json,md}``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _common import environment, median_time, write_results  # noqa: E402

from gattn.ssl import MaskedAutoencoder, masked_mse  # noqa: E402
from pipelines.config import Params, PretrainParams  # noqa: E402
from pipelines.stages.pretrain import build_objective, encoder_config, pretrain  # noqa: E402

TARGET = 2.5


def mae_step(model: MaskedAutoencoder, imgs: torch.Tensor, mask_ratio: float) -> torch.Tensor:
    """The training loss: masked patches only (MAE), or every patch with ``mask_ratio`` 0."""
    latent, mask, ids_restore = model.forward_encoder(imgs, mask_ratio)
    pred = model.forward_decoder(latent, ids_restore)
    weights = mask if mask_ratio > 0 else torch.ones_like(mask)
    return masked_mse(pred, model.target(imgs), weights)


def measure_mae(
    size: int, batch: int, device: torch.device, dtype: torch.dtype, reps: int, peak: float | None
) -> list[dict[str, Any]]:
    """Images/s and FLOPs per image of a training step at mask ratio 0.75 and 0."""
    p = PretrainParams.model_validate({"img_size": size})
    torch.manual_seed(0)
    model = build_objective(p, encoder_config(p)).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    imgs = torch.rand(batch, 3, size, size, device=device)
    use_amp = dtype != torch.float32

    def step(ratio: float) -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=use_amp):
            loss = mae_step(model, imgs, ratio)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    rows = []
    for name, ratio in (("all patches (ratio 0)", 0.0), ("MAE (ratio 0.75)", 0.75)):
        counter = FlopCounterMode(display=False)
        with counter:
            step(ratio)
        seconds = median_time(lambda r=ratio: step(r), device, warmup=2, reps=reps)
        flops = counter.get_total_flops() / batch
        row = {
            "part": "mae",
            "config": f"{size}px, {(size // 8) ** 2} patches",
            "variant": name,
            "images_per_s": batch / seconds,
            "gflops_per_image": flops / 1e9,
            "tflops_per_s": flops * batch / seconds / 1e12,
        }
        if peak:
            row["mfu"] = row["tflops_per_s"] / peak
        rows.append(row)
    base, mae = rows
    mae["speedup"] = mae["images_per_s"] / base["images_per_s"]
    mae["flops_ratio"] = base["gflops_per_image"] / mae["gflops_per_image"]
    return rows


def prepared_data(root: Path, given: Path | None, n: int) -> Path:
    """``given`` if it is a prepared folder, else a small cue-seg set prepared under ``root``."""
    if given is not None and (given / "splits.json").is_file():
        return given
    from pipelines.stages.prepare import prepare

    data = {"num_samples": n, "large": {"num_samples": 0}, "grid_samples": 4}
    prepare(Params.model_validate({"data": data}), root / "prepared", root / "prepare-reports")
    return root / "prepared"


def measure_ray(
    prepared: Path, root: Path, cpus: int, epochs: int, samples: int, batch: int
) -> list[dict[str, Any]]:
    """The pretrain stage with 1 worker x ``cpus`` CPUs and 2 workers x ``cpus // 2``."""
    rows = []
    for workers in (1, 2):
        p = PretrainParams.model_validate(
            {
                "epochs": epochs,
                "warmup_epochs": 0.5,
                "batch_size": batch,
                "max_samples": samples,
                "num_workers": workers,
                "cpus_per_worker": max(1, cpus // workers),
                "storage": str(root / f"ray-{workers}"),
                "probe": {"enabled": False},
            }
        )
        out = pretrain(p, 0, prepared, root / f"m{workers}", root / f"r{workers}")
        rows.append(
            {
                "part": "ray",
                "config": f"{workers} worker(s) x {p.cpus_per_worker} CPU, batch {batch}/worker",
                "variant": f"{workers} worker(s)",
                "images_per_s": statistics.median(
                    e["images_per_s"] for e in out["history"][1:] or out["history"]
                ),
                "wall_s": out["metrics"]["wall_s"],
            }
        )
    rows[1]["speedup"] = rows[1]["images_per_s"] / rows[0]["images_per_s"]
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch threads for part 1")
    ap.add_argument("--peak-tflops", type=float, default=None, help="device peak, for MFU")
    ap.add_argument("--data", type=Path, default=Path("data/prepared"))
    ap.add_argument("--cpus", type=int, default=2, help="CPUs shared by the Ray workers")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--skip-ray", action="store_true")
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    rows: list[dict[str, Any]] = []
    for size in args.sizes:
        rows += measure_mae(size, args.batch, device, dtype, args.reps, args.peak_tflops)
    if not args.skip_ray:
        with tempfile.TemporaryDirectory() as tmp:
            prepared = prepared_data(Path(tmp), args.data, 2 * args.samples)
            rows += measure_ray(
                prepared, Path(tmp), args.cpus, args.epochs, args.samples, args.batch
            )

    speedups = [r["speedup"] for r in rows if r["part"] == "mae" and "speedup" in r]
    meta = {
        **environment(device),
        "dtype": args.dtype,
        "batch": args.batch,
        "mae_speedup_min": min(speedups),
        "mae_target": f">= {TARGET}x",
        "mae_target_met": min(speedups) >= TARGET,
    }
    ray_rows = [r for r in rows if r["part"] == "ray"]
    if ray_rows:
        meta["ray_2_vs_1_workers"] = ray_rows[1]["speedup"]
    columns = [
        "part",
        "config",
        "variant",
        "images_per_s",
        "speedup",
        "gflops_per_image",
        "flops_ratio",
        "tflops_per_s",
        "wall_s",
    ]
    if args.peak_tflops:
        columns.append("mfu")
    notes = (
        "`speedup`: images/s against the row above (MAE vs all patches; 2 vs 1 Ray workers). "
        "`flops_ratio`: model FLOPs of encoding all patches over MAE's. Ray rows: the pretrain "
        "stage's median images/s over epochs 2.. (data loading included), workers sharing "
        "the same cores.\n"
    )
    suffix = "" if device.type == "cpu" else f"-{device.type}"
    json_path, md_path = write_results(f"pretrain{suffix}", rows, columns, meta, notes)
    print(md_path.read_text())
    return 0 if meta["mae_target_met"] else 1


if __name__ == "__main__":
    sys.exit(main())
