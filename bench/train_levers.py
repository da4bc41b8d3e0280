#!/usr/bin/env python
"""The speed levers, one row each and combined, against the bare fp32 loop.

Every row is a fresh process (torch.compile caches and DeepSpeed's autocast state are
process-wide) running bench.train_throughput's worker at world size 1: the service
with that row's job fields and the bare fp32 loop (bench.common), in alternating timed
blocks. Each row's ratio is service img/s / bare fp32 img/s measured in that same process,
so rows compare like for like even when the machine's load drifts between rows.

Targets (issue 14, on the 2-core development VM): bf16 >= 2.2x and fp32 >= 1.13x the bare
fp32 loop (which is about 1.15x faster than the original improved-diffusion TrainLoop,
so these are 2.5x and 1.3x that loop).

    python -m bench.train_levers                 # every row (~10 min on 2 cores)
    python -m bench.train_levers --rows fp32 "fp32 all levers"
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

from bench.common import BATCH, CONFIG_LINE, digits_shards, paired_ratio
from bench.train_throughput import launch

OFF = ["train.adamw_kernel=\"loop\""]  # torch AdamW's own default on CPU: the levers-off service
ALL = ["train.adamw_kernel=\"fused\"", "train.channels_last=true", "train.compile=true"]
# the levers that pay on this CPU: channels_last slows bf16 here (GroupNorm32's fp32 round
# trips reorder NHWC) and compile's ~170 s warm-up buys about nothing (see docs/benchmarks.md)
BEST = ["train.adamw_kernel=\"fused\"", "train.attention_kernel=\"math\""]
ROWS: dict[str, tuple[str, list[str], str]] = {
    # name: (precision, job fields, where the gain comes from)
    "fp32": ("fp32", OFF, "baseline: the service with every lever off"),
    "fp32 fused AdamW": ("fp32", ["train.adamw_kernel=\"fused\""],
                         "one optimizer kernel over all ~200 tensors instead of a Python loop"),
    "fp32 foreach AdamW": ("fp32", ["train.adamw_kernel=\"foreach\""], "batched optimizer ops"),
    "fp32 channels_last": ("fp32", OFF + ["train.channels_last=true"],
                           "NHWC convolutions (oneDNN's native layout), no reorders"),
    "fp32 math attention": ("fp32", OFF + ["train.attention_kernel=\"math\""],
                            "explicit matmul + softmax instead of SDPA's CPU kernel"),
    "fp32 compile": ("fp32", OFF + ["train.compile=true"],
                     "inductor fuses the element-wise work (GroupNorm, SiLU, scale-shift, losses "
                     "stay eager) and removes Python overhead"),
    "fp32 all levers": ("fp32", ALL, "fused AdamW + channels_last + compile"),
    "fp32 best": ("fp32", BEST, "fused AdamW + math attention"),
    "bf16": ("bf16", OFF, "bf16 weights and activations (whole-module cast): bf16 matmul/conv"),
    "bf16 math attention": ("bf16", OFF + ["train.attention_kernel=\"math\""],
                            "bf16 with the explicit matmul + softmax attention"),
    "bf16 best": ("bf16", BEST, "bf16 + fused AdamW + math attention"),
    "bf16-mixed": ("bf16-mixed", OFF, "autocast: fp32 weights, bf16 torso convs, fp32 regions"),
    "bf16-mixed best": ("bf16-mixed", BEST, "bf16-mixed + fused AdamW + math attention"),
    "bf16 all levers": ("bf16", ALL, "bf16 + fused AdamW + channels_last + compile"),
    "bf16-mixed all levers": ("bf16-mixed", ALL, "bf16-mixed + fused AdamW + channels_last + compile"),
}


def run_row(name: str, shards: Path, args) -> dict:
    precision, fields, _ = ROWS[name]
    row_args = SimpleNamespace(precision=precision, zero_stage=0, workers=args.workers,
                               steps=args.steps, blocks=args.blocks, warmup=args.warmup,
                               sampler="uniform", phases=False, set=fields,
                               threads=args.threads)
    return launch(row_args, 1, shards)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--steps", type=int, default=4, help="steps per timed block")
    parser.add_argument("--blocks", type=int, default=5, help="alternating timed blocks per loop")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation)")
    parser.add_argument("--workers", type=int, default=1, help="loader worker processes")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (OMP_NUM_THREADS)")
    args = parser.parse_args()
    print(f"config: {CONFIG_LINE}; service ZeRO-0, uniform sampler, world size 1, "
          f"{args.workers} loader worker(s), {args.threads} threads")
    print(f"{'row':<24} {'service img/s':>13} {'bare fp32 img/s':>15} {'ratio':>6} {'warm-up s':>9}  gain from")
    with tempfile.TemporaryDirectory() as tmp:
        shards = digits_shards(Path(tmp) / "digits")
        for name in args.rows:
            result = run_row(name, shards, args)
            times = result["times"]
            service, bare = (BATCH / statistics.median(times[k]) for k in ("service", "bare"))
            ratio = paired_ratio(times["service"], times["bare"])
            print(f"{name:<24} {service:13.2f} {bare:15.2f} {ratio:6.2f} "
                  f"{result['warmup_s']['service']:9.1f}  {ROWS[name][2]}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
