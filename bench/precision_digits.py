#!/usr/bin/env python
"""Precision modes on the digits job: held-out bits/dim after the same steps, and img/s.

Each mode is one run of launch/train.py on launch/jobs/digits.yaml with only `precision`
changed (same seed, data order, steps, lr schedule, EMA), so the rows differ in numerics
and speed alone:
  fp32        fp32 weights, fp32 compute (the reference without --use_fp16);
  bf16        the whole module cast to bf16, fp32 master weights in DeepSpeed's optimizer;
  bf16-mixed  fp32 weights, matmuls/convolutions autocast to bf16, normalisation and the
              diffusion's formulas in fp32 (the reference's fp16 scheme, in bf16).
The demo job trains x_0 with fixed variances, whose 50-step bound is dominated by the
variance mismatch (~17 bits/dim whatever the precision); by default the rows therefore
train the paper's L_hybrid (learned variances, eps prediction), whose bound is the one
precision can move. img/s is the median of the run's logged steps after the first
interval (start-up and warm-up excluded); bits/dim is the EMA model's (first EMA rate).

    python bench/precision_digits.py [--steps 500] [--modes fp32 bf16 bf16-mixed] [--demo-objective]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HYBRID = ["model.learn_sigma=true", "diffusion.predict_xstart=false"]


def run_mode(precision: str, steps: int, objective: list[str], out: Path) -> dict:
    """Train `steps` steps in `precision`; return img/s, held-out bpd and wall time."""
    run_dir = out / precision
    sets = [f"precision={precision}", f"output.run_dir={run_dir}", f"train.lr_anneal_steps={steps}",
            f"train.eval_interval={steps}", "train.sample_interval=0",
            f"train.save_interval={steps}", *objective]
    cmd = [sys.executable, str(ROOT / "launch/train.py"), "--job", str(ROOT / "launch/jobs/digits.yaml")]
    for item in sets:
        cmd += ["--set", item]
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{precision}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    speeds = [r["img_per_s"] for r in rows if "img_per_s" in r][1:]
    evals = [r for r in rows if "eval_bpd" in r]
    return {"precision": precision, "img_per_s": statistics.median(speeds),
            "eval_bpd": evals[-1]["eval_bpd"], "eval_bpd_model": evals[-1]["eval_bpd_model"],
            "final_loss": [r["loss"] for r in rows if "loss" in r][-1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--modes", nargs="+", default=["fp32", "bf16", "bf16-mixed"])
    parser.add_argument("--demo-objective", action="store_true",
                        help="keep the demo's x_0 / fixed-variance objective instead of L_hybrid")
    args = parser.parse_args()
    objective = [] if args.demo_objective else HYBRID
    if not (ROOT / "data/digits/index.json").exists():  # what launch/demo.sh writes first
        subprocess.run([sys.executable, str(ROOT / "launch/make_shards.py"), "digits", "--out",
                        str(ROOT / "data/digits")], cwd=ROOT, check=True)
    with tempfile.TemporaryDirectory() as tmp:
        results = [run_mode(mode, args.steps, objective, Path(tmp)) for mode in args.modes]
    base = next((r for r in results if r["precision"] == "fp32"), results[0])
    print(f"digits job, {args.steps} steps, batch 32, objective: "
          f"{'demo (x_0, fixed variances)' if args.demo_objective else 'L_hybrid (learned variances)'}")
    print("| precision | img/s | vs fp32 | held-out bpd (EMA 0.99) | bpd (live weights) | last logged loss |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['precision']} | {r['img_per_s']:.1f} | {r['img_per_s'] / base['img_per_s']:.2f}x "
              f"| {r['eval_bpd']:.3f} | {r['eval_bpd_model']:.3f} | {r['final_loss']:.4f} |")


if __name__ == "__main__":
    main()
