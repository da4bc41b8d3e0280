#!/usr/bin/env python
"""fp16 beside the other precisions: model-output error against fp32, and learning.

    python bench/precision_fp16.py error      # seconds: output error per precision
    python bench/precision_fp16.py learning   # minutes: 300 steps fp16 vs fp32

error: one UNet (the tests' tiny digits config, every weight drawn at random so that no
zero-initialised layer hides an error), one fixed batch; the fp32 output is the reference
and each row reports the relative RMS and the max abs error of the output:
  fp16 (whole cast)   every weight and activation in fp16 (what a plain model.half() does);
  fp16 (fp32 regions) fp16 weights, the timestep MLP, embedding projections, GroupNorm and
                      output head computed in fp32 (this project's fp16, the reference's);
  bf16                the same regions, bf16 torso;
  bf16-mixed          fp32 weights, the torso autocast to bf16.
CPU half kernels run them here; a GPU's fp16 kernels round the same way to within
accumulation order.

learning: the tiny digits job (16 px, batch 8, T=100, cosine, L_hybrid, lr 2e-3, seed 0)
trained 300 steps in fp32 and in fp16 through the CPU fp16 seam (IDDPM_CPU_FP16=1,
DeepSpeed's real fp16 engine, dynamic loss scale from 2^20), same seed and data order;
the mean loss of each 100-step window and the fp16/fp32 ratio.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
TINY = {"image_size": 16, "num_channels": 32, "num_res_blocks": 1, "channel_mult": [1, 2],
        "attention_resolutions": "8", "learn_sigma": True, "class_cond": True, "num_classes": 10}


def error_table() -> list[str]:
    from iddpm_ds.models import build_model
    from iddpm_ds.models.nn import Float32Region
    from iddpm_ds.spec.model import ModelSpec

    torch.manual_seed(0)
    model = build_model(ModelSpec(**TINY)).eval()
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
                    cast = build_model(ModelSpec(**TINY))
                    cast.load_state_dict(model.state_dict())
                    got = cast.to(dtype)(x, t, y=y)
        finally:
            Float32Region.fp32_regions = True
        err = got.double() - want
        rows.append(f"| {name} | {err.pow(2).mean().sqrt() / want.pow(2).mean().sqrt():.2e} "
                    f"| {err.abs().max():.2e} |")
    return rows


def train(precision: str, steps: int, shards: Path, out: Path) -> list[float]:
    job = {"model": TINY, "diffusion": {"diffusion_steps": 100, "noise_schedule": "cosine"},
           "data": {"shards": f"{shards}/index.json#train", "num_workers": 1},
           "train": {"batch_size": 8, "lr": 2e-3, "ema_rate": "0.99", "log_interval": 100,
                     "save_interval": 100000, "max_steps": steps, "seed": 0},
           "precision": precision, "deepspeed": {"zero_stage": 1},
           "output": {"run_dir": str(out / precision), "tensorboard": False}}
    path = out / f"{precision}.yaml"
    path.write_text(yaml.safe_dump(job))
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "IDDPM_CPU_FP16": "1", "OMP_NUM_THREADS": "2"}
    proc = subprocess.run([sys.executable, str(ROOT / "launch/train.py"), "--job", str(path)],
                          cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{precision}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / precision / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def learning_table(steps: int) -> list[str]:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        subprocess.run([sys.executable, str(ROOT / "launch/make_shards.py"), "digits", "--out",
                        str(tmp / "digits"), "--quiet"], cwd=ROOT, check=True)
        fp32, fp16 = (train(p, steps, tmp / "digits", tmp) for p in ("fp32", "fp16"))
    rows = ["| steps | fp32 loss | fp16 loss | fp16 / fp32 |", "|---|---|---|---|"]
    for i, (a, b) in enumerate(zip(fp32, fp16)):
        rows.append(f"| {i * 100 + 1}-{(i + 1) * 100} | {a:.4f} | {b:.4f} | {b / a:.3f} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("table", choices=["error", "learning"])
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    torch.set_num_threads(2)
    rows = error_table() if args.table == "error" else learning_table(args.steps)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
