"""Precision modes, each against fp32 measured in the same run; docs/benchmarks.md explains the
tables.

    python -m bench.precision digits [--steps 500] [--demo-objective]
    python -m bench.precision error       # seconds: model-output error of each precision
    python -m bench.precision learning    # minutes: 300 steps fp16 vs fp32 (CPU fp16 seam)
    python -m bench.precision sampling [--images 32] [--batch 16] [--world 1 2]   # DDIM-50 and bpd img/s
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

from bench.common import ROOT, cli, result, run_workers
from iddpm_ds.testing import BENCH_DIFFUSION, BENCH_MODEL, TINY_MODEL, digits_shards, tiny_job_dict

HYBRID = ["model.learn_sigma=true", "diffusion.predict_xstart=false"]
PRECISIONS = ("fp32", "bf16", "bf16-mixed")
TASKS = {"ddim50_img_per_s": "DDIM-50 sampling", "bpd_img_per_s": "bits/dim eval (50 steps)"}


def train(job: Path, run_dir: Path, sets: list[str], fp16_seam: bool = False) -> list[dict]:
    """launch/train.py on `job` with `sets`; the run's logged metrics records."""
    cmd = [sys.executable, str(ROOT / "launch/train.py"), "--job", str(job), *(w for s in sets for w in ("--set", s))]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "2", "IDDPM_CPU_FP16": "1" if fp16_seam else ""}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{job} {sets}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def digits_table(steps: int, demo_objective: bool) -> list[str]:
    out = [f"digits job, {steps} steps, batch 32, objective: "
           f"{'demo (x_0, fixed variances)' if demo_objective else 'L_hybrid (learned variances)'}",
           "| precision | img/s | vs fp32 | held-out bpd (EMA 0.99) | bpd (live weights) | last logged loss |",
           "|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        shards = digits_shards(Path(tmp) / "digits")
        for precision in PRECISIONS:  # fp32 first: the base
            run_dir = Path(tmp) / precision
            rows = train(ROOT / "launch/jobs/digits.yaml", run_dir, [
                f"precision={precision}", f"output.run_dir={run_dir}", f"train.lr_anneal_steps={steps}",
                f"train.eval_interval={steps}", "train.sample_interval=0", f"train.save_interval={steps}",
                f"data.shards={shards}/index.json#train", f"data.eval_shards={shards}/index.json#eval",
                *([] if demo_objective else HYBRID)])
            img_s = statistics.median([r["img_per_s"] for r in rows if "img_per_s" in r][1:])
            base, evals = img_s if precision == "fp32" else base, [r for r in rows if "eval_bpd" in r][-1]
            out.append(f"| {precision} | {img_s:.1f} | {img_s / base:.2f}x | {evals['eval_bpd']:.3f} "
                       f"| {evals['eval_bpd_model']:.3f} | {[r['loss'] for r in rows if 'loss' in r][-1]:.4f} |")
    return out


def error_table() -> list[str]:
    from iddpm_ds.models import at_precision, build_model
    from iddpm_ds.models.nn import Float32Region
    from iddpm_ds.spec.model import ModelSpec

    torch.manual_seed(0)
    model = build_model(ModelSpec(**TINY_MODEL)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3 / max(1, p[0].numel()) ** 0.5)
    x, t, y = torch.randn(8, 3, 16, 16), torch.randint(0, 100, (8,)), torch.randint(0, 10, (8,))
    rows = ["| precision | relative RMS error | max abs error |", "|---|---|---|"]
    with torch.no_grad():
        want = model(x, t, y=y).double()                                       # [N, 6, H, W]
        for name, dtype, regions in [("fp16 (whole cast)", torch.float16, False), ("fp16 (fp32 regions)",
                                     torch.float16, True), ("bf16 (fp32 regions)", torch.bfloat16, True),
                                     ("bf16-mixed", None, True)]:  # None: fp32 weights, autocast to bf16
            Float32Region.fp32_regions = regions
            cast = build_model(ModelSpec(**TINY_MODEL)).eval()
            cast.load_state_dict(model.state_dict())
            got = (cast.to(dtype) if dtype else at_precision(cast, "bf16-mixed"))(x, t, y=y)  # fp32 in, x's dtype out
            Float32Region.fp32_regions = True
            err = got.double() - want
            rows.append(f"| {name} | {err.pow(2).mean().sqrt() / want.pow(2).mean().sqrt():.2e} "
                        f"| {err.abs().max():.2e} |")
    return rows


def learning_table(steps: int) -> list[str]:
    losses = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        shards = digits_shards(tmp / "digits")
        for precision in ("fp32", "fp16"):
            job = tiny_job_dict(tmp / precision, shards, **{
                "precision": precision, "data.eval_shards": None, "data.shuffle_buffer": 1000,
                "train.warmup_steps": 0, "train.ema_rate": "0.99", "train.log_interval": 100,
                "train.save_interval": 100000, "train.max_steps": steps, "train.schedule_sampler": "uniform"})
            (tmp / f"{precision}.yaml").write_text(yaml.safe_dump(job))
            rows = train(tmp / f"{precision}.yaml", tmp / precision, [], fp16_seam=True)
            losses[precision] = [r["loss"] for r in rows if "loss" in r]
    rows = ["| steps | fp32 loss | fp16 loss | fp16 / fp32 |", "|---|---|---|---|"]
    for i, (a, b) in enumerate(zip(losses["fp32"], losses["fp16"])):
        rows.append(f"| {i * 100 + 1}-{(i + 1) * 100} | {a:.4f} | {b:.4f} | {b / a:.3f} |")
    return rows


def sampling_worker(args) -> None:
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


def sampling_table(args) -> list[str]:
    """DDIM-50 and bits/dim-eval img/s of the bench model (weights as initialised) per
    precision, over 1 and 2 ranks sharing --threads; ratios against fp32 at 1 rank."""
    results = {(p, w): run_workers("bench.precision sampling", w, {**vars(args), "precision": p}, args.threads, p)
               for p in PRECISIONS for w in args.world}
    rows = [f"bench model (32 px, 64 ch, 2 res blocks, attention 16,8, learn_sigma); {args.images} images per "
            f"cell, batch {args.batch} per rank, {args.threads} threads shared by the ranks",
            "| task | precision | " + " | ".join(f"{w} rank(s) img/s" for w in args.world) + " | vs fp32 at 1 rank |",
            "|---|---|" + "---|" * (len(args.world) + 1)]
    for key, label in TASKS.items():
        for precision in PRECISIONS:
            rates = [results[precision, w][key] for w in args.world]
            rows.append(f"| {label} | {precision} | " + " | ".join(f"{r:.2f}" for r in rates) + " | "
                        + " / ".join(f"{r / results['fp32', args.world[0]][key]:.2f}x" for r in rates) + " |")
    return rows


def main() -> None:
    parser = cli(__doc__)
    parser.add_argument("table", choices=["digits", "error", "learning", "sampling"])
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
    if args.table == "digits":
        rows = digits_table(args.steps or 500, args.demo_objective)
    elif args.table == "sampling":
        rows = sampling_table(args)
    else:
        rows = error_table() if args.table == "error" else learning_table(args.steps or 300)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
