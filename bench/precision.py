"""Precision modes, each against fp32 measured in the same run (docs/benchmarks.md).

    python -m bench.precision digits [--steps 500] [--modes fp32 bf16 bf16-mixed] [--demo-objective]
    python -m bench.precision error       # seconds: model-output error of each precision
    python -m bench.precision learning    # minutes: 300 steps fp16 vs fp32

digits: launch/train.py on launch/jobs/digits.yaml with only `precision` changed, trained
with L_hybrid unless --demo-objective; img/s is the median logged interval after the first,
bits/dim the EMA model's. error: the tiny UNet with random weights, one batch, each
precision's output against fp32's. learning: the tiny job 300 steps in fp32 and in fp16
through the CPU fp16 seam (IDDPM_CPU_FP16=1), mean loss per 100-step window.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml

from bench.common import ROOT, cli
from iddpm_ds.testing import TINY_MODEL, digits_shards, tiny_job_dict

HYBRID = ["model.learn_sigma=true", "diffusion.predict_xstart=false"]


def train(job: Path, run_dir: Path, sets: list[str], fp16_seam: bool = False) -> list[dict]:
    """launch/train.py on `job` with `sets`; the run's logged metrics records."""
    cmd = [sys.executable, str(ROOT / "launch/train.py"), "--job", str(job), *(w for s in sets for w in ("--set", s))]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "2", "IDDPM_CPU_FP16": "1" if fp16_seam else ""}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{job} {sets}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def digits_table(steps: int, modes: list[str], demo_objective: bool) -> list[str]:
    objective = [] if demo_objective else HYBRID
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        shards = digits_shards(Path(tmp) / "digits")
        for precision in modes:
            run_dir = Path(tmp) / precision
            rows = train(ROOT / "launch/jobs/digits.yaml", run_dir, [
                f"precision={precision}", f"output.run_dir={run_dir}", f"train.lr_anneal_steps={steps}",
                f"train.eval_interval={steps}", "train.sample_interval=0", f"train.save_interval={steps}",
                f"data.shards={shards}/index.json#train", f"data.eval_shards={shards}/index.json#eval",
                *objective])
            evals = [r for r in rows if "eval_bpd" in r]
            results[precision] = {"img_per_s": statistics.median([r["img_per_s"] for r in rows if "img_per_s" in r][1:]),
                                  "eval_bpd": evals[-1]["eval_bpd"], "eval_bpd_model": evals[-1]["eval_bpd_model"],
                                  "final_loss": [r["loss"] for r in rows if "loss" in r][-1]}
    base = results.get("fp32", next(iter(results.values())))
    out = [f"digits job, {steps} steps, batch 32, objective: "
           f"{'demo (x_0, fixed variances)' if demo_objective else 'L_hybrid (learned variances)'}",
           "| precision | img/s | vs fp32 | held-out bpd (EMA 0.99) | bpd (live weights) | last logged loss |",
           "|---|---|---|---|---|---|"]
    for precision, r in results.items():
        out.append(f"| {precision} | {r['img_per_s']:.1f} | {r['img_per_s'] / base['img_per_s']:.2f}x "
                   f"| {r['eval_bpd']:.3f} | {r['eval_bpd_model']:.3f} | {r['final_loss']:.4f} |")
    return out


def error_table() -> list[str]:
    from iddpm_ds.models import build_model
    from iddpm_ds.models.nn import Float32Region
    from iddpm_ds.spec.model import ModelSpec

    torch.manual_seed(0)
    model = build_model(ModelSpec(**TINY_MODEL)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3 / max(1, p[0].numel()) ** 0.5)
    x, t, y = torch.randn(8, 3, 16, 16), torch.randint(0, 100, (8,)), torch.randint(0, 10, (8,))
    with torch.no_grad():
        want = model(x, t, y=y).double()                                       # [N, 6, H, W]
    rows = ["| precision | relative RMS error | max abs error |", "|---|---|---|"]
    cases = [("fp16 (whole cast)", torch.float16, False), ("fp16 (fp32 regions)", torch.float16, True),
             ("bf16 (fp32 regions)", torch.bfloat16, True), ("bf16-mixed", None, True)]
    for name, dtype, regions in cases:
        Float32Region.fp32_regions = regions
        try:
            with torch.no_grad():
                if dtype is None:
                    with torch.autocast("cpu", dtype=torch.bfloat16):
                        got = model(x, t, y=y)
                else:
                    cast = build_model(ModelSpec(**TINY_MODEL))
                    cast.load_state_dict(model.state_dict())
                    got = cast.to(dtype)(x, t, y=y)
        finally:
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


def main() -> None:
    parser = cli(__doc__, threads=None)
    parser.add_argument("table", choices=["digits", "error", "learning"])
    parser.add_argument("--steps", type=int, default=None, help="digits: 500, learning: 300")
    parser.add_argument("--modes", nargs="+", default=["fp32", "bf16", "bf16-mixed"])
    parser.add_argument("--demo-objective", action="store_true",
                        help="digits: keep the demo's x_0 / fixed-variance objective instead of L_hybrid")
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.table == "digits":
        rows = digits_table(args.steps or 500, args.modes, args.demo_objective)
    else:
        rows = error_table() if args.table == "error" else learning_table(args.steps or 300)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
