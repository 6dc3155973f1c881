"""Forward+backward time and peak memory of every global-context block, as ratios.

Usage: ``python benchmarks/modules.py [--device cuda --dtype bfloat16] [--sizes 32 64 128]``

Each block from the registry runs on a ``(B, C, s, s)`` map (C=128) at every size ``s``. Two
baselines are measured in the same run at the same size:

- ``naive``: the article's global self-attention with its axis bug fixed but still
  materialising the ``(heads, N, N)`` score matrix (``GlobalSelfAttention(fused_attn=False)``);
  it is skipped where its score matrix alone would exceed ``--naive-limit-gib``;
- ``conv3x3``: a residual 3x3 convolution, the cheapest local block.

Writes ``benchmarks/results/modules[-<device>].{json,md}``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, median_time, write_results  # noqa: E402

from gattn import modules  # noqa: E402
from gattn.budget import peak_memory  # noqa: E402
from gattn.modules.attention import GlobalSelfAttention  # noqa: E402


class Conv3x3(nn.Module):
    """Local baseline: ``x + conv3x3(x)``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x)


def naive_attention(channels: int, num_heads: int) -> nn.Module:
    return modules.TokenMixerBlock(
        channels, GlobalSelfAttention(channels, num_heads, fused_attn=False), layout="tokens"
    )


def measure(
    block: nn.Module, shape: tuple[int, ...], device: torch.device, dtype: torch.dtype, reps: int
) -> dict[str, float]:
    block = block.to(device=device, dtype=dtype).train()

    def step() -> None:
        x = torch.randn(shape, device=device, dtype=dtype, requires_grad=True)
        block(x).float().square().mean().backward()
        block.zero_grad(set_to_none=True)

    seconds = median_time(step, device, warmup=1, reps=reps)
    peak = peak_memory(step, [block], device)
    return {"ms": seconds * 1e3, "peak_mib": peak / 2**20}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 128])
    ap.add_argument("--channels", type=int, default=128)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--blocks", nargs="+", default=None, help="registry names (default: all)")
    ap.add_argument(
        "--naive-limit-gib",
        type=float,
        default=1.0,
        help="skip the naive baseline where its fp32 score matrix exceeds this",
    )
    ap.add_argument("--out", default=None, help="result name (default modules[-device])")
    args = ap.parse_args(argv)

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(0)
    names = args.blocks or modules.available()
    rows: list[dict] = []
    for s in args.sizes:
        shape = (args.batch, args.channels, s, s)
        n = s * s
        score_gib = args.batch * args.heads * n * n * 4 / 2**30
        base_conv = measure(Conv3x3(args.channels), shape, device, dtype, args.reps)
        base_naive = (
            measure(naive_attention(args.channels, args.heads), shape, device, dtype, args.reps)
            if score_gib <= args.naive_limit_gib
            else None
        )
        baselines = [("naive", base_naive), ("conv3x3", base_conv)]
        for name, res in [("naive_global_attn", base_naive), ("conv3x3", base_conv)]:
            if res is not None:
                rows.append({"block": name, "size": s, "tokens": n, **res})
        for name in names:
            kw = {"num_heads": args.heads} if name in ("global_attn",) else {}
            res = measure(
                modules.create(name, args.channels, **kw), shape, device, dtype, args.reps
            )
            row = {"block": name, "size": s, "tokens": n, **res}
            for bname, b in baselines:
                if b is not None:
                    row[f"time_vs_{bname}"] = res["ms"] / b["ms"]
                    row[f"mem_vs_{bname}"] = res["peak_mib"] / b["peak_mib"]
            rows.append(row)
            print(f"{s:>4}² {name:<20} {res['ms']:9.2f} ms {res['peak_mib']:9.1f} MiB", flush=True)

    checks = {}
    ga = {r["size"]: r for r in rows if r["block"] == "global_attn"}
    gt = {r["size"]: r for r in rows if r["block"] == "global_tokens"}
    if 64 in ga and "time_vs_naive" in ga[64]:
        checks["global_attn_N4096_time_vs_naive<=0.25"] = ga[64]["time_vs_naive"] <= 0.25
        checks["global_attn_N4096_mem_vs_naive<=0.2"] = ga[64]["mem_vs_naive"] <= 0.2
    if 64 in gt and 128 in gt:
        growth = gt[128]["ms"] / gt[64]["ms"]
        checks[f"global_tokens_time_growth_64to128={growth:.2f}<=5"] = growth <= 5
    meta = {
        **environment(device),
        "dtype": args.dtype,
        "channels": args.channels,
        "batch": args.batch,
        "heads": args.heads,
        "reps": args.reps,
        "command": "python benchmarks/modules.py " + " ".join(argv or sys.argv[1:]),
        "checks": checks,
    }
    out = args.out or ("modules" if device.type == "cpu" else f"modules-{device.type}")
    cols = [
        "block",
        "size",
        "tokens",
        "ms",
        "peak_mib",
        "time_vs_naive",
        "mem_vs_naive",
        "time_vs_conv3x3",
        "mem_vs_conv3x3",
    ]
    notes = (
        "Ratios are against baselines measured in the same run at the same size. "
        "`naive_global_attn` materialises the (heads, N, N) scores; it is skipped where "
        "they would exceed the memory limit, so those rows have no `vs_naive` ratio.\n"
    )
    json_path, md_path = write_results(out, rows, cols, meta, notes)
    print(f"checks: {checks}\nwrote {json_path} and {md_path}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
