#!/usr/bin/env python
"""Sampling and evaluation throughput (docs/benchmarks.md): DDIM-50 img/s and bits/dim-eval
img/s of the bench model through the package's own entry points (image_sampler.sample,
bpd.evaluate_bpd over a 50-step respacing), split over 1 and 2 ranks sharing --threads CPU
threads, in fp32, bf16 and bf16-mixed; ratios against fp32 at 1 rank in the same run.

    python -m bench.sample_throughput [--images 32] [--batch 16] [--world 1 2]
"""
from __future__ import annotations

import sys
import time

import torch

from bench.common import BENCH_MODEL, cli, result, run_workers
from iddpm_ds.testing import BENCH_DIFFUSION

PRECISIONS = ("fp32", "bf16", "bf16-mixed")
TASKS = {"ddim50_img_per_s": "DDIM-50 sampling", "bpd_img_per_s": "bits/dim eval (50 steps)"}


def worker(args) -> None:
    from iddpm_ds import placement
    from iddpm_ds.dist import env, group
    from iddpm_ds.bpd import evaluate_bpd
    from iddpm_ds.diffusion import build_diffusion
    from iddpm_ds.image_sampler import SampleOptions, sample
    from iddpm_ds.models import at_precision, build_model
    from iddpm_ds.spec.diffusion import DiffusionSpec
    from iddpm_ds.spec.model import ModelSpec

    group.init()
    device, rank, world = placement.device(), env.rank(), env.world_size()
    spec = ModelSpec(**BENCH_MODEL)
    torch.manual_seed(0)
    model = at_precision(build_model(spec).to(device).eval(), args.precision)
    ddim = build_diffusion(DiffusionSpec(**BENCH_DIFFUSION, timestep_respacing="ddim50"))
    opts = SampleOptions(num_samples=args.images, batch_size=args.batch, use_ddim=True, progress=False)
    sample(model, ddim, spec, SampleOptions(num_samples=min(2, args.batch), batch_size=2,
                                            use_ddim=True, progress=False), device)  # warm-up
    out = {"ddim50_img_per_s": sample(model, ddim, spec, opts, device).img_per_s}
    respaced = build_diffusion(DiffusionSpec(**BENCH_DIFFUSION, timestep_respacing="50"))
    gen = torch.Generator().manual_seed(rank)
    mine = [b for b in range(0, args.images, args.batch) if (b // args.batch) % world == rank]
    batches = [(torch.rand(min(args.batch, args.images - b), 3, 32, 32, generator=gen) * 2 - 1, {})
               for b in mine]
    group.barrier()
    start = time.perf_counter()
    bpd = evaluate_bpd(model, respaced, batches, device=device)  # all-reduce at the end
    out["bpd_img_per_s"] = bpd["num_samples"] / (time.perf_counter() - start)
    if env.is_main():
        result(out)
    group.shutdown()


def main() -> int:
    parser = cli(__doc__)
    parser.add_argument("--images", type=int, default=32, help="images per cell, over all ranks")
    parser.add_argument("--batch", type=int, default=16, help="images per forward pass per rank")
    parser.add_argument("--world", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=PRECISIONS)
    parser.add_argument("--precision", default="fp32", help="(worker) this cell's precision")
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return 0
    print(f"bench model (32 px, 64 ch, 2 res blocks, attention 16,8, learn_sigma); {args.images} "
          f"images per cell, batch {args.batch} per rank, {args.threads} threads shared by the ranks")
    print(f"{'task':<26} {'precision':<11} " + " ".join(f"{f'{w} rank(s) img/s':>16}" for w in args.world)
          + "   ratio to fp32 at 1 rank")
    cell = ["--images", str(args.images), "--batch", str(args.batch)]
    results = {(p, w): run_workers("bench.sample_throughput", w, ["--precision", p, *cell], args.threads, p)
               for p in args.precisions for w in args.world}
    base = results.get(("fp32", args.world[0]))
    for key, label in TASKS.items():
        for precision in args.precisions:
            rates = [results[precision, w][key] for w in args.world]
            ratios = [r / base[key] for r in rates] if base else []
            print(f"{label:<26} {precision:<11} " + " ".join(f"{r:16.2f}" for r in rates)
                  + "   " + " / ".join(f"{x:.2f}x" for x in ratios))
    return 0


if __name__ == "__main__":
    sys.exit(main())
