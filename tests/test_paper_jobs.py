"""The paper's configurations (launch/jobs/paper/) validate, --check them, and build the
reference model's exact parameter count (counted from improved-diffusion's own code)."""
from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch

from iddpm_ds import build_model
from iddpm_ds.spec.job import load_job

ROOT = Path(__file__).resolve().parents[1]
PAPER = ROOT / "launch" / "jobs" / "paper"
REFERENCE_PARAMS = {
    "cifar10_hybrid.yaml": 52_546_438,
    "imagenet64_hybrid_cosine.yaml": 121_063_942,
    "imagenet64_simple_linear.yaml": 121_060_483,
    "imagenet64_cond.yaml": 273_049_350,
    "lsun_bedroom256.yaml": 113_676_678,
}


def test_every_paper_job_is_listed():
    assert sorted(p.name for p in PAPER.glob("*.yaml")) == sorted(REFERENCE_PARAMS)


@pytest.mark.parametrize("name", sorted(REFERENCE_PARAMS))
def test_parameter_count_equals_the_reference(name):
    job = load_job(PAPER / name)
    with torch.device("meta"):  # no memory: the 270M model is only counted
        model = build_model(job.model)
    assert sum(p.numel() for p in model.parameters()) == REFERENCE_PARAMS[name]


@pytest.mark.parametrize("name", sorted(REFERENCE_PARAMS))
def test_check_prints_parameters_and_memory(name, digits_shards, capsys):
    train = importlib.import_module("iddpm_ds_launch.train")
    index = digits_shards / "index.json"
    status = train.main(["--job", str(PAPER / name), "--check", "--world-size", "8",
                         "--set", f"data.shards={index}#train",
                         "--set", f"data.eval_shards={index}#eval"])
    out = capsys.readouterr().out
    assert status == 0
    assert f"# parameters: {REFERENCE_PARAMS[name]:,}" in out
    assert "world 8" in out and "MiB" in out
