"""Bits/dim evaluation: the reduction equals calc_bpd_loop's own numbers, bpd falls when a
model trains on the demo digits, held-out shards split over 2 real ranks count every
sample once, the command line's JSON, and the training hook (which must not move the
training RNG streams)."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from iddpm_ds import DiffusionSpec, ModelSpec, build_diffusion
from iddpm_ds.bpd import evaluate_bpd, evaluate_shards, noise_seed
from iddpm_ds.spec.data import DataSpec
from iddpm_ds.weights import SamplingError, respaced
from mp_utils import run_ranks
from test_sampling import TINY, make_run, tiny_model, tiny_specs

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


def demo_digits(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first n of the demo set (scikit-learn's 8x8 digits) as RGB x [n, 3, 8, 8] in
    [-1, 1] on the uint8 grid, and labels [n]."""
    from sklearn import datasets

    digits = datasets.load_digits()
    gray = np.rint(digits.images[:n] * (255.0 / 16.0)).astype(np.uint8)      # [n, 8, 8]
    x = torch.from_numpy(gray).float().div(127.5).sub(1)[:, None].repeat(1, 3, 1, 1)
    return x, torch.from_numpy(digits.target[:n])


def write_shards(out: Path, images: np.ndarray, labels: np.ndarray, eval_count: int) -> Path:
    from iddpm_ds.data.shards import WriteOptions, array_items, write_items

    write_items(array_items(images, labels), out,
                WriteOptions(shard_size=4, eval_count=eval_count, progress=False),
                created_by="test")
    return out / "index.json"


def digit_images(n: int) -> tuple[np.ndarray, np.ndarray]:
    x, y = demo_digits(n)
    images = ((x + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return np.ascontiguousarray(images), y.numpy()


# ------------------------------------------------------------------------ the reduction
def test_result_is_calc_bpd_loops_mean_over_unmasked_samples() -> None:
    model_spec, diffusion_spec = tiny_specs()
    model, diffusion = tiny_model(model_spec), respaced(diffusion_spec, "5")
    x, _ = demo_digits(4)
    torch.manual_seed(noise_seed(3, 0))
    with torch.no_grad():
        out = diffusion.calc_bpd_loop(model, x)
    mask = torch.tensor([True, False, True, True])
    torch.manual_seed(123)
    state = torch.get_rng_state()
    padding = (x[:1], {}, torch.zeros(1, dtype=torch.bool))
    result = evaluate_bpd(model, diffusion, [(x, {}, mask), padding], device=CPU, seed=3)
    assert torch.equal(torch.get_rng_state(), state), "evaluation must not move the caller's RNG"
    keep = out["total_bpd"][mask]
    assert result["num_samples"] == 3
    assert result["bpd"] == pytest.approx(float(keep.mean()), rel=1e-12)
    assert result["prior_bpd"] == pytest.approx(float(out["prior_bpd"][mask].mean()), rel=1e-12)
    # calc_bpd_loop's columns run t = T-1 .. 0; the report is ascending in t
    vb_by_t = out["vb"][mask].double().mean(0).flip(0)
    assert result["terms"]["vb"] == pytest.approx(vb_by_t.tolist(), rel=1e-9)
    # total_bpd is summed in float32 by calc_bpd_loop, the terms here in float64
    assert result["bpd"] == pytest.approx(result["prior_bpd"] + result["vb_bpd"], rel=1e-6)
    assert result["mse"] == pytest.approx(float(out["mse"][mask].double().mean()), rel=1e-9)
    assert result["timesteps"] == sorted(result["timesteps"]) == list(diffusion.timestep_map)
    assert result["num_timesteps"] == 5 and len(result["terms"]["xstart_mse"]) == 5


def test_no_samples_is_an_error() -> None:
    model_spec, diffusion_spec = tiny_specs()
    with pytest.raises(SamplingError, match="no held-out sample"):
        evaluate_bpd(tiny_model(model_spec), respaced(diffusion_spec, "2"), [], device=CPU)


def test_bpd_is_finite_and_falls_as_a_model_trains_on_the_demo_set() -> None:
    x, _ = demo_digits(16)
    model_spec = ModelSpec(**TINY)
    diffusion_spec = DiffusionSpec(learn_sigma=True, diffusion_steps=100, noise_schedule="cosine")
    model = tiny_model(model_spec, seed=0)
    train_diffusion = build_diffusion(diffusion_spec)
    eval_diffusion = respaced(diffusion_spec, "10")
    before = evaluate_bpd(model.eval(), eval_diffusion, [(x, {})], device=CPU)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    model.train()
    gen = torch.Generator().manual_seed(0)
    for _ in range(40):
        t = torch.randint(0, train_diffusion.num_timesteps, (x.shape[0],), generator=gen)
        loss = train_diffusion.training_losses(model, x, t)["loss"].mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = evaluate_bpd(model.eval(), eval_diffusion, [(x, {})], device=CPU)
    for result in (before, after):
        assert all(math.isfinite(result[k]) for k in ("bpd", "prior_bpd", "vb_bpd", "mse"))
        assert 0 <= result["prior_bpd"] < 1e-3  # cosine schedule: q(x_T | x_0) is ~N(0, I)
    assert after["bpd"] < 0.7 * before["bpd"], (before["bpd"], after["bpd"])
    assert after["mse"] < before["mse"]


# --------------------------------------------------------------------- held-out shards
def _evaluate_on_ranks(rank: int, world_size: int, index: str, num_samples: int) -> dict:
    from iddpm_ds.data import build_eval_stream

    model_spec, diffusion_spec = tiny_specs(class_cond=True, num_classes=10)
    model, diffusion = tiny_model(model_spec), respaced(diffusion_spec, "3")
    data = DataSpec(shards=index, eval_shards=index, num_workers=0)
    result = evaluate_shards(model, diffusion, model_spec, data, batch_size=2, device=CPU,
                             num_samples=num_samples, seed=5)
    # this rank's own sums, recomputed from its slice with its noise seed
    stream = build_eval_stream(data, image_size=8, class_cond=True, batch_size=2, rank=rank,
                               world_size=world_size, num_samples=num_samples)
    total, count, labels = 0.0, 0, []
    torch.manual_seed(noise_seed(5, rank))
    for x, cond, mask in stream.padded():
        if mask.any():
            with torch.no_grad():
                out = diffusion.calc_bpd_loop(model, x, model_kwargs=cond)
            total += float(out["total_bpd"][mask].double().sum())
            count += int(mask.sum())
            labels += cond["y"][mask].tolist()
    return {"result": result, "total": total, "count": count, "labels": labels}


@pytest.mark.slow
def test_two_ranks_evaluate_every_held_out_sample_once(tmp_path: Path) -> None:
    images, labels = digit_images(14)
    index = str(write_shards(tmp_path / "shards", images, labels, eval_count=7))
    full = None
    for num_samples in (None, 5):
        ranks = run_ranks(_evaluate_on_ranks, 2, index, num_samples)
        full = full or ranks
        expected_n = 7 if num_samples is None else 5
        assert [r["count"] for r in ranks] == [expected_n // 2, expected_n - expected_n // 2]
        assert ranks[0]["result"] == ranks[1]["result"]
        result = ranks[0]["result"]
        assert result["num_samples"] == expected_n
        assert result["bpd"] == pytest.approx(sum(r["total"] for r in ranks) / expected_n, rel=1e-9)
    # contiguous rank ranges of the canonical order: together, the one-rank order
    single = _evaluate_on_ranks(0, 1, index, None)
    assert single["labels"] == full[0]["labels"] + full[1]["labels"]
    assert single["result"]["num_samples"] == 7


# ------------------------------------------------------------------------- command line
def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    return subprocess.run([sys.executable, str(ROOT / "launch" / "evaluate.py"), *args],
                          capture_output=True, text=True, env=env, timeout=240, cwd=ROOT)


def test_cli_evaluate_reports_json(tmp_path: Path) -> None:
    images, labels = digit_images(12)
    index = str(write_shards(tmp_path / "shards", images, labels, eval_count=6))
    data = DataSpec(shards=index, eval_shards=index, num_workers=0)
    run_dir = make_run(tmp_path / "run", *tiny_specs(), data=data)
    proc = _cli("--run-dir", str(run_dir), "--num-samples", "5", "--batch-size", "2",
                "--respacing", "4", "--weights", "model", "--out", str(tmp_path / "nll.json"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout)  # the whole stdout: DeepSpeed's lines went to stderr
    report = json.loads((tmp_path / "nll.json").read_text())
    # the console gets the compact object; --out adds the per-step lists
    assert summary == {k: v for k, v in report.items()
                       if k not in ("timesteps", "terms")}
    assert summary["bpd"] == report["bpd"] and "terms" not in summary
    assert report["num_samples"] == 5 and report["held_out_total"] == 5
    assert report["weights"] == "model" and report["step"] == 10 and report["respacing"] == "4"
    assert math.isfinite(report["bpd"]) and report["bpd"] > 0
    assert set(report["terms"]) == {"vb", "mse", "xstart_mse"} and len(report["terms"]["vb"]) == 4
    # no held-out data anywhere: exit 2, one message
    bare = make_run(tmp_path / "bare", *tiny_specs())
    proc = _cli("--run-dir", str(bare))
    assert proc.returncode == 2 and proc.stdout == ""
    assert [l for l in proc.stderr.splitlines() if l.startswith("error:")] == [
        "error: no held-out data: give --eval-shards (or a job with data.eval_shards)"]


# ----------------------------------------------------------------------- training hook
@pytest.mark.slow
def test_eval_during_training_logs_bpd_and_leaves_training_unchanged(tmp_path: Path) -> None:
    images, labels = digit_images(40)
    index = str(write_shards(tmp_path / "shards", images, labels, eval_count=8))
    job = {
        "model": {**TINY, "channel_mult": [1, 2], "attention_resolutions": [4]},
        "diffusion": {"diffusion_steps": 40, "noise_schedule": "cosine"},
        "data": {"shards": index, "eval_shards": index, "num_workers": 0},
        "train": {"batch_size": 4, "lr": 1e-3, "max_steps": 4, "log_interval": 2,
                  "save_interval": 100, "eval_interval": 2, "eval_samples": 6,
                  "eval_respacing": "4", "sample_respacing": "ddim4", "ema_rate": "0.9"},
        "output": {"run_dir": str(tmp_path / "with_eval"), "tensorboard": False},
    }
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    for run, interval in (("with_eval", 2), ("without_eval", 0)):
        proc = subprocess.run(
            [sys.executable, str(ROOT / "launch" / "train.py"), "--job", str(tmp_path / "job.yaml"),
             "--set", f"output.run_dir={tmp_path / run}",
             "--set", f"train.eval_interval={interval}"],
            capture_output=True, text=True, env=env, timeout=240)
        assert proc.returncode == 0, proc.stderr[-3000:]
    lines = (tmp_path / "with_eval" / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    evals = [r for r in records if "eval_bpd" in r]
    assert [r["step"] for r in evals] == [2, 4]
    for r in evals:
        assert r["eval_samples"] == 6 and r["eval_ema_rate"] == 0.9
        for key in ("eval_bpd", "eval_bpd_model", "eval_mse"):
            assert math.isfinite(r[key]) and r[key] > 0
    without = (tmp_path / "without_eval" / "metrics.jsonl").read_text()
    assert "eval_bpd" not in without
    # evaluation must not shift any training RNG stream: identical weights after 4 steps
    for name in ("model000004.pt", "ema_0.9_000004.pt"):
        a = torch.load(tmp_path / "with_eval" / "checkpoints" / "step0000004" / name)
        b = torch.load(tmp_path / "without_eval" / "checkpoints" / "step0000004" / name)
        assert all(torch.equal(a[k], b[k]) for k in a), name
