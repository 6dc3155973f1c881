"""The tune stage's memory estimator against an independent measurement, over its search space.

Usage: ``python benchmarks/memory_estimate.py [--limit N] [--full-size N] [--seed S]``

For every distinct model structure of the default ``tune`` search space (family x block x
size x attention implementation x position x copies x head; options a block ignores are
collapsed) the peak memory of one training step (forward, loss, backward, AdamW step) is

- estimated with :func:`gattn.budget.estimate_peak_memory` (fake tensors, no activations), and
- measured independently with :func:`gattn.budget.profiled_peak_memory` (the PyTorch
  profiler's CPU allocator events plus the persistent state)

at a small batch and resolution (``--batch``, ``--size``), and for ``--full-size`` of them at
a random batch size and resolution of the space (those the estimator puts under
``--max-gib``, so the real step fits this machine). The target is |error| <= 15% on every
config. ``--limit`` samples that many structures (seeded) instead of all. Writes
``benchmarks/results/memory_estimate.{json,md}``; exits 1 when a config misses the target.
"""

from __future__ import annotations

import argparse
import itertools
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _common import environment, write_results  # noqa: E402

from gattn.budget import estimate_peak_memory, profiled_peak_memory  # noqa: E402
from pipelines.config import TuneParams  # noqa: E402
from pipelines.stages.tune.space import ATTENTION_BLOCKS, model_config, summary  # noqa: E402

TARGET = 0.15
MIB = 2**20


def structures(p: TuneParams) -> list[dict[str, Any]]:
    """Every distinct model structure of the search space (batch and resolution left out)."""
    seen, out = set(), []
    for family, module, size, impl, position, blocks, head in itertools.product(
        sorted(p.families),
        p.modules,
        sorted(p.module_sizes),
        p.attn_impls,
        p.positions,
        p.num_blocks,
        p.heads,
    ):
        if module == "none":
            size, impl, position, blocks = sorted(p.module_sizes)[0], p.attn_impls[0], "last", 1
        elif module not in ATTENTION_BLOCKS:
            impl = p.attn_impls[0]
        s = {
            "family": family,
            "module": module,
            "module_size": size,
            "attn_impl": impl,
            "position": position,
            "num_blocks": blocks,
            "head": head,
        }
        key = tuple(s.values())
        if key not in seen:
            seen.add(key)
            out.append(s)
    return out


def measure(p: TuneParams, sample: dict[str, Any], batch: int, size: int) -> dict[str, Any]:
    cfg = model_config({**sample, "batch_size": batch, "img_size": size}, p, "seg", 4, 3)
    t0 = time.perf_counter()
    estimate = estimate_peak_memory(cfg, batch, size)
    estimate_s = time.perf_counter() - t0
    reference = profiled_peak_memory(cfg, batch, size)
    error = (estimate - reference) / reference
    return {
        "config": summary({**sample, "batch_size": batch, "img_size": size}),
        "estimate_mib": estimate / MIB,
        "profiler_mib": reference / MIB,
        "error_pct": 100 * error,
        "within_15pct": abs(error) <= TARGET,
        "estimate_s": estimate_s,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=None, help="sample N structures")
    parser.add_argument("--full-size", type=int, default=12, help="configs at full sizes")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=48)
    parser.add_argument("--max-gib", type=float, default=1.5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    p = TuneParams()
    rng = random.Random(args.seed)
    every = structures(p)
    chosen = every if args.limit is None else rng.sample(every, min(args.limit, len(every)))
    rows = []
    t0 = time.perf_counter()
    for s in chosen:
        rows.append({"set": "small", **measure(p, s, args.batch, args.size)})
        print(f"{rows[-1]['config']}: {rows[-1]['error_pct']:+.2f}%", flush=True)
    full = 0
    for s in rng.sample(every, len(every)):
        if full >= args.full_size:
            break
        batch, size = rng.choice(p.batch_sizes), rng.choice(p.img_sizes)
        cfg = model_config({**s, "batch_size": batch, "img_size": size}, p, "seg", 4, 3)
        if estimate_peak_memory(cfg, batch, size) > args.max_gib * 2**30:
            continue
        rows.append({"set": "full", **measure(p, s, batch, size)})
        print(f"{rows[-1]['config']}: {rows[-1]['error_pct']:+.2f}%", flush=True)
        full += 1
    errors = [abs(r["error_pct"]) for r in rows]
    meta = {
        **environment(torch.device("cpu")),
        "command": "python benchmarks/memory_estimate.py " + " ".join(argv or sys.argv[1:]),
        "structures_in_space": len(every),
        "structures_measured": len(chosen),
        "small_batch_size": args.batch,
        "small_img_size": args.size,
        "full_size_configs": full,
        "max_abs_error_pct": max(errors),
        "mean_abs_error_pct": sum(errors) / len(errors),
        "all_within_15pct": all(r["within_15pct"] for r in rows),
        "total_s": round(time.perf_counter() - t0, 1),
    }
    notes = (
        "`estimate`: fake tensors (FakeTensorMode) counted by gattn.budget.memory.StoragePeak; "
        "`profiler`: torch.profiler CPU allocator events during the real step plus parameters, "
        "buffers and AdamW state. `small`: every structure at a small batch and resolution; "
        "`full`: random configs of the space at their own batch size and resolution.\n"
    )
    columns = ["set", "config", "estimate_mib", "profiler_mib", "error_pct", "estimate_s"]
    write_results("memory_estimate", rows, columns, meta, notes)
    print({k: meta[k] for k in ("max_abs_error_pct", "all_within_15pct", "total_s")})
    return 0 if meta["all_within_15pct"] else 1


if __name__ == "__main__":
    sys.exit(main())
