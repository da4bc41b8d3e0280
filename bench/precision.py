"""Precision modes, each against fp32 measured in the same run; docs/benchmarks.md explains
the tables.

    python -m bench.precision digits [--steps 500] [--demo-objective]
    python -m bench.precision error       # seconds: model-output error of each precision
    python -m bench.precision learning    # minutes: 300 steps fp16 vs fp32 (CPU fp16 seam)
    python -m bench.precision sampling [--images 32] [--batch 16] [--world 1 2]   # img/s
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from bench.common import ROOT, cli, result, run_workers, table
from iddpm_ds import placement
from iddpm_ds.bpd import evaluate_bpd
from iddpm_ds.diffusion import build_diffusion
from iddpm_ds.dist import env, group
from iddpm_ds.image_sampler import SampleOptions, sample
from iddpm_ds.models import at_precision, build_model
from iddpm_ds.models.nn import Float32Region
from iddpm_ds.spec.diffusion import DiffusionSpec
from iddpm_ds.spec.model import ModelSpec
from iddpm_ds.testing import (BENCH_DIFFUSION, BENCH_MODEL, TINY_MODEL, digits_shards,
                              tiny_job_dict)

HYBRID = ["model.learn_sigma=true", "diffusion.predict_xstart=false"]
PRECISIONS = ("fp32", "bf16", "bf16-mixed")
TASKS = {"ddim50_img_per_s": "DDIM-50 sampling", "bpd_img_per_s": "bits/dim eval (50 steps)"}


def train(job: Path, tmp: Path, precisions: tuple[str, ...], sets: list[str],
          fp16_seam: bool = False) -> dict[str, list[dict]]:
    """launch/train.py on `job` with `sets`, once per precision (run dir tmp/precision);
    each run's logged metrics records."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "2",
           "IDDPM_CPU_FP16": "1" if fp16_seam else ""}
    runs = {}
    for precision in precisions:
        sets_here = [f"precision={precision}", f"output.run_dir={tmp / precision}", *sets]
        cmd = [sys.executable, str(ROOT / "launch/train.py"), "--job", str(job),
               *(word for s in sets_here for word in ("--set", s))]
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{job} {sets_here}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
        lines = (tmp / precision / "metrics.jsonl").read_text().splitlines()
        runs[precision] = [json.loads(line) for line in lines]
    return runs


def digits_table(args) -> list[str]:
    steps = args.steps or 500
    with tempfile.TemporaryDirectory() as tmp:
        shards = digits_shards(Path(tmp) / "digits")
        runs = train(ROOT / "launch/jobs/digits.yaml", Path(tmp), PRECISIONS, [
            f"train.lr_anneal_steps={steps}", f"train.eval_interval={steps}",
            "train.sample_interval=0", f"train.save_interval={steps}",
            f"data.shards={shards}/index.json#train", f"data.eval_shards={shards}/index.json#eval",
            *([] if args.demo_objective else HYBRID)])
    rows = []
    for precision, records in runs.items():  # fp32 first: the base
        img_s = statistics.median([r["img_per_s"] for r in records if "img_per_s" in r][1:])
        base = img_s if precision == "fp32" else base
        evals = [r for r in records if "eval_bpd" in r][-1]
        loss = [r["loss"] for r in records if "loss" in r]
        rows.append([precision, f"{img_s:.1f}", f"{img_s / base:.2f}x", f"{evals['eval_bpd']:.3f}",
                     f"{evals['eval_bpd_model']:.3f}", f"{loss[-1]:.4f}"])
    objective = "demo (x_0, fixed variances)" if args.demo_objective else "L_hybrid"
    return [f"digits job, {steps} steps, batch 32, objective: {objective}", table(
        "precision | img/s | vs fp32 | held-out bpd (EMA 0.99) | bpd (live weights) | "
        "last logged loss", rows)]


def error_table(args) -> list[str]:
    torch.manual_seed(0)
    model = build_model(ModelSpec(**TINY_MODEL)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3 / max(1, p[0].numel()) ** 0.5)
    x, t, y = torch.randn(8, 3, 16, 16), torch.randint(0, 100, (8,)), torch.randint(0, 10, (8,))
    casts = {"fp16 (whole cast)": (torch.float16, False),  # (dtype, fp32 regions)
             "fp16 (fp32 regions)": (torch.float16, True),
             "bf16 (fp32 regions)": (torch.bfloat16, True),
             "bf16-mixed": (None, True)}  # None: fp32 weights, autocast to bf16
    rows = []
    with torch.no_grad():
        want = model(x, t, y=y).double()                                       # [N, 6, H, W]
        for name, (dtype, regions) in casts.items():
            Float32Region.fp32_regions = regions
            cast = build_model(ModelSpec(**TINY_MODEL)).eval()
            cast.load_state_dict(model.state_dict())
            cast = cast.to(dtype) if dtype else at_precision(cast, "bf16-mixed")
            err = cast(x, t, y=y).double() - want  # fp32 in, the weights' dtype out
            Float32Region.fp32_regions = True
            rows.append([name, f"{err.pow(2).mean().sqrt() / want.pow(2).mean().sqrt():.2e}",
                         f"{err.abs().max():.2e}"])
    return [table("precision | relative RMS error | max abs error", rows)]


def learning_table(args) -> list[str]:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        job = tiny_job_dict(tmp / "run", digits_shards(tmp / "digits"), **{
            "data.eval_shards": None, "data.shuffle_buffer": 1000, "train.warmup_steps": 0,
            "train.ema_rate": "0.99", "train.log_interval": 100, "train.save_interval": 100000,
            "train.max_steps": args.steps or 300, "train.schedule_sampler": "uniform"})
        (tmp / "job.yaml").write_text(yaml.safe_dump(job))
        runs = train(tmp / "job.yaml", tmp, ("fp32", "fp16"), [], fp16_seam=True)
    losses = [[r["loss"] for r in runs[p] if "loss" in r] for p in ("fp32", "fp16")]
    return [table("steps | fp32 loss | fp16 loss | fp16 / fp32", (
        [f"{i * 100 + 1}-{(i + 1) * 100}", f"{a:.4f}", f"{b:.4f}", f"{b / a:.3f}"]
        for i, (a, b) in enumerate(zip(*losses))))]


def sampling_worker(args) -> None:
    group.init()
    device, rank, world = placement.device(), env.rank(), env.world_size()
    spec = ModelSpec(**BENCH_MODEL)
    torch.manual_seed(0)
    model = at_precision(build_model(spec).to(device).eval(), args.precision)
    ddim = build_diffusion(DiffusionSpec(**BENCH_DIFFUSION, timestep_respacing="ddim50"))
    opts = SampleOptions(num_samples=args.images, batch_size=args.batch, use_ddim=True,
                         progress=False)
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
    result(out)
    group.shutdown()


def sampling_table(args) -> list[str]:
    """DDIM-50 and bits/dim-eval img/s of the bench model (weights as initialised) per
    precision, over 1 and 2 ranks sharing --threads; ratios against fp32 at 1 rank."""
    res = {(p, w): run_workers("bench.precision sampling", w, {**vars(args), "precision": p},
                               args.threads, p) for p in PRECISIONS for w in args.world}
    rows = []
    for (key, label), precision in ((task, p) for task in TASKS.items() for p in PRECISIONS):
        rates = [res[precision, w][key] for w in args.world]
        rows.append([label, precision, *(f"{r:.2f}" for r in rates),
                     " / ".join(f"{r / res['fp32', args.world[0]][key]:.2f}x" for r in rates)])
    return [f"bench model (32 px, 64 ch, 2 res blocks, attention 16,8, learn_sigma); "
            f"{args.images} images per cell, batch {args.batch} per rank, {args.threads} threads "
            "shared by the ranks",
            table(" | ".join(["task", "precision", *(f"{w} rank(s) img/s" for w in args.world),
                              "vs fp32 at 1 rank"]), rows)]


TABLES = {"digits": digits_table, "error": error_table, "learning": learning_table,
          "sampling": sampling_table}


def main() -> None:
    parser = cli(__doc__)
    parser.add_argument("table", choices=list(TABLES))
    parser.add_argument("--steps", type=int, default=None, help="digits: 500, learning: 300")
    parser.add_argument("--demo-objective", action="store_true",
                        help="digits: keep the demo's x_0 / fixed-variance objective instead of L_hybrid")
    parser.add_argument("--images", type=int, default=32, help="sampling: images per cell, over all ranks")
    parser.add_argument("--batch", type=int, default=16, help="sampling: images per forward pass per rank")
    parser.add_argument("--world", type=int, nargs="+", default=[1, 2], help="sampling: world sizes")
    args = parser.parse_args()
    if args.worker:
        return sampling_worker(args.worker)
    torch.set_num_threads(2)
    print("\n".join(TABLES[args.table](args)))


if __name__ == "__main__":
    main()
