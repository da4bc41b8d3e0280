"""Super-resolution end to end: training (low_res from the batch on the device), in-training
grids and bits/dim, iddpm-evaluate, and cascade sampling from a base-samples npz."""
from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest
import torch

from iddpm_ds.superres import downsample, with_low_res
from iddpm_ds.spec.model import ModelSpec
from train_utils import events, metrics, run_train, tiny_job

SR = {"model.small_size": 4, "train.max_steps": 6, "train.log_interval": 3,
      "train.sample_interval": 6, "train.sample_count": 6, "train.sample_respacing": "ddim4",
      "train.eval_interval": 6, "train.eval_samples": 6, "train.eval_respacing": "4",
      "train.batch_size": 4, "train.save_interval": 6}


def test_low_res_is_the_area_mean():
    x = torch.randn(2, 3, 16, 16)
    got = downsample(x, 4)                                                # [2, 3, 4, 4]
    want = x.reshape(2, 3, 4, 4, 4, 4).mean(dim=(3, 5))
    assert torch.allclose(got, want, atol=1e-6)
    spec = ModelSpec(image_size=16, small_size=4, num_channels=32, channel_mult=(1, 2),
                     attention_resolutions=(8,))
    kwargs = with_low_res(spec, x, {"y": torch.tensor([1, 2])})
    assert set(kwargs) == {"y", "low_res"} and torch.equal(kwargs["low_res"], got)
    assert with_low_res(spec.model_copy(update={"small_size": None}), x, {}) == {}


@pytest.mark.slow
def test_sr_job_trains_samples_grids_and_evaluates(tmp_path, digits_shards):
    job = tiny_job(tmp_path, digits_shards, **SR)
    proc = run_train(2, job)
    run = tmp_path / "run"
    logs = metrics(run)
    assert [r["step"] for r in logs] == [3, 6]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["loss_weighted"]) for r in logs)
    evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
             if "eval_bpd" in line]
    assert len(evals) == 1 and math.isfinite(evals[0]["eval_bpd"]) and evals[0]["eval_bpd"] > 0
    assert (run / "samples" / "ema_0.9_000006.png").is_file()
    assert events(proc, "train_done")[0]["step"] == 6


# ------------------------------------------------------------------- sampling, evaluation
from iddpm_ds.image_sampler import (BaseSamples, SampleOptions, load_base_samples,  # noqa: E402
                                    sample)
from iddpm_ds.weights import SamplingError, WeightsChoice, load_weights, respaced  # noqa: E402
from test_evaluate import digit_images, write_shards  # noqa: E402
from test_sampling import (_cli, _errors, _sample_on_one_and_two_ranks, make_run,  # noqa: E402
                           tiny_model, tiny_specs)

CPU = torch.device("cpu")
SR_16 = dict(image_size=16, small_size=8, attention_resolutions=(8,), class_cond=True,
             num_classes=3)


def _base(n: int, size: int = 8, seed: int = 0) -> BaseSamples:
    rng = np.random.default_rng(seed)
    return BaseSamples(rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
                       rng.integers(0, 3, n).astype(np.int64))


def test_image_i_is_conditioned_on_base_image_i():
    model_spec, diffusion_spec = tiny_specs(**SR_16)
    model, diffusion = tiny_model(model_spec), respaced(diffusion_spec, "ddim4")
    with torch.no_grad():  # the reference zero-initialises the output conv: wake it up
        for p in model.parameters():
            if not p.any():
                p.normal_(0, 0.05)
    base = _base(3)
    other = BaseSamples(base.images.copy(), base.labels.copy())
    other.images[1] = 255 - other.images[1]
    run = lambda b: sample(model, diffusion, model_spec, SampleOptions(  # noqa: E731
        num_samples=3, batch_size=2, use_ddim=True, seed=1, progress=False, base_samples=b), CPU)
    a, b = run(base), run(other)
    assert a.images.shape == (3, 16, 16, 3) and a.labels.tolist() == base.labels.tolist()
    assert np.array_equal(a.images[[0, 2]], b.images[[0, 2]])
    assert not np.array_equal(a.images[1], b.images[1])


def test_base_samples_are_checked(tmp_path):
    model_spec, _ = tiny_specs(**SR_16)
    path = tmp_path / "base.npz"
    np.savez(path, np.zeros((2, 4, 4, 3), np.uint8), np.zeros(2, np.int64))
    with pytest.raises(SamplingError, match=r"arr_0 must be uint8 \[N, 8, 8, 3\]"):
        load_base_samples(path, model_spec)
    np.savez(path, np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(SamplingError, match="needs arr_1"):
        load_base_samples(path, model_spec)
    np.savez(path, np.zeros((2, 8, 8, 3), np.uint8), np.array([0, 3]))
    with pytest.raises(SamplingError, match="labels outside 0..2"):
        load_base_samples(path, model_spec)
    with pytest.raises(SamplingError, match="for super-resolution models"):
        load_base_samples(path, tiny_specs()[0])
    with pytest.raises(SamplingError, match="exceeds the 2 base samples"):
        SampleOptions(num_samples=3, base_samples=_base(2))


@pytest.mark.slow
def test_cascade_on_one_and_two_ranks(tmp_path):
    """Base run -> its npz -> the SR run, as `iddpm-sample` twice; 2 ranks == 1 rank."""
    base_run = make_run(tmp_path / "base", *tiny_specs(class_cond=True, num_classes=3))
    sr_run = make_run(tmp_path / "sr", *tiny_specs(**SR_16))
    proc = _cli("sample.py", "--run-dir", str(base_run), "--num-samples", "5", "--respacing",
                "ddim4", "--no-progress", "--out", str(tmp_path / "base.npz"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    common = ["--run-dir", str(sr_run), "--base-samples", str(tmp_path / "base.npz"),
              "--batch-size", "2", "--respacing", "4", "--seed", "3", "--no-progress"]
    one, _ = _sample_on_one_and_two_ranks(common, tmp_path)
    assert one["num_samples"] == 5  # all of the base samples by default
    with np.load(tmp_path / "base.npz") as base, np.load(tmp_path / "one.npz") as a, \
            np.load(tmp_path / "two.npz") as b:
        assert a["arr_0"].shape == (5, 16, 16, 3) and np.array_equal(a["arr_0"], b["arr_0"])
        assert np.array_equal(a["arr_1"], base["arr_1"]) and np.array_equal(b["arr_1"], base["arr_1"])
    # a base model's npz size does not fit: exit 2, one line
    bad = _cli("sample.py", "--run-dir", str(sr_run), "--base-samples", str(tmp_path / "one.npz"))
    assert bad.returncode == 2 and len(_errors(bad)) == 1 and "arr_0 must be" in _errors(bad)[0]
    bare = _cli("sample.py", "--run-dir", str(sr_run))
    assert bare.returncode == 2 and "--base-samples" in _errors(bare)[0]


def test_evaluate_sr_returns_finite_bpd(tmp_path):
    from test_evaluate import _cli as evaluate_cli
    from iddpm_ds.spec.data import DataSpec

    images, labels = digit_images(12)
    index = str(write_shards(tmp_path / "shards", images, labels, eval_count=6))
    data = DataSpec(shards=index, eval_shards=index, num_workers=0)
    spec = dict(image_size=8, small_size=4, attention_resolutions=(4,))
    run_dir = make_run(tmp_path / "run", *tiny_specs(**spec), data=data)
    proc = evaluate_cli("--run-dir", str(run_dir), "--num-samples", "4", "--batch-size", "2",
                        "--respacing", "4", "--weights", "model")
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    assert report["num_samples"] == 4 and math.isfinite(report["bpd"]) and report["bpd"] > 0
