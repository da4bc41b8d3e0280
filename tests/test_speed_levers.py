"""Speed levers (train.compile, train.channels_last, train.adamw_kernel,
train.attention_kernel, precision bf16-mixed): each changes speed, never the result beyond
rounding. Spec checks and rendering here; the UNet's numerics; the service end to end."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from iddpm_ds.models import at_precision, build_model, set_kernels
from iddpm_ds.models.precision import AtPrecision
from iddpm_ds.models.nn import qkv_attention
from iddpm_ds.spec.job import JobSpec, load_job
from iddpm_ds.spec.model import ModelSpec
from iddpm_ds.testing import TINY_MODEL
from iddpm_ds.train.ds_config import render_ds_config
from test_job_spec import job_dict
from train_utils import metrics, run_train, tiny_job


def test_bf16_mixed_renders_autocast_with_fp32_weights(tmp_path):
    job = JobSpec.model_validate({**job_dict(tmp_path), "precision": "bf16-mixed"})
    config = render_ds_config(job, 2, has_gpu=False)
    assert config["torch_autocast"]["enabled"] is True and config["torch_autocast"]["dtype"] == "bfloat16"
    assert not config["bf16"]["enabled"] and not config["fp16"]["enabled"]  # weights stay fp32
    # gradients of the convolutions only may travel in bf16 (the reference casts only those)
    assert all("conv.Conv" in name for name in config["torch_autocast"]["lower_precision_safe_modules"])
    for precision in ("fp32", "bf16"):
        other = JobSpec.model_validate({**job_dict(tmp_path), "precision": precision})
        assert "torch_autocast" not in render_ds_config(other, 2, has_gpu=False)


def test_autocast_switch_is_spec_owned(tmp_path):
    d = job_dict(tmp_path, deepspeed={"overrides": {"torch_autocast": {"enabled": True}}})
    with pytest.raises(ValidationError, match="torch_autocast.enabled.*set precision instead"):
        JobSpec.model_validate(d)


@pytest.mark.parametrize("kernel,expected", [("fused", {"fused": True}), ("foreach", {"foreach": True}),
                                             ("loop", {"fused": False, "foreach": False})])
def test_adamw_kernel_reaches_torch_adamw(tmp_path, kernel, expected):
    job = JobSpec.model_validate(job_dict(tmp_path, train={"batch_size": 8, "adamw_kernel": kernel}))
    params = render_ds_config(job, 1, has_gpu=False)["optimizer"]["params"]
    assert params["torch_adam"] is True
    assert expected.items() <= params.items()


def test_adamw_kernel_with_cpu_adam_is_refused(tmp_path):
    offload = {"zero_stage": 2, "offload_optimizer": True}
    with pytest.raises(ValidationError, match="adamw_kernel: does not apply"):
        JobSpec.model_validate(job_dict(tmp_path, deepspeed=offload,
                                        train={"batch_size": 8, "adamw_kernel": "foreach"}))
    job = JobSpec.model_validate(job_dict(tmp_path, deepspeed=offload))  # default: not set, fine
    params = render_ds_config(job, 1, has_gpu=False)["optimizer"]["params"]
    assert params["torch_adam"] is False and "fused" not in params


@pytest.mark.parametrize("bad", [{"attention_kernel": "flash"}, {"adamw_kernel": "apex"},
                                 {"compile": "maybe"}])
def test_lever_values_are_checked(tmp_path, bad):
    with pytest.raises(ValidationError, match=next(iter(bad))):
        JobSpec.model_validate(job_dict(tmp_path, train={"batch_size": 8, **bad}))


# --- the UNet's side ------------------------------------------------------------------

def _spec() -> ModelSpec:
    return ModelSpec(image_size=16, num_channels=32, num_res_blocks=1, channel_mult=(1, 2),
                     attention_resolutions="16,8", num_heads=2, learn_sigma=True, class_cond=True,
                     num_classes=3)


def _model_and_inputs(seed: int = 0):
    torch.manual_seed(seed)
    model = build_model(_spec())
    with torch.no_grad():  # zero-initialised layers random, so every block shows in the output
        for p in model.parameters():
            if not p.any():
                p.normal_(0, 0.05)
    x = torch.randn(2, 3, 16, 16)
    return model, x, torch.tensor([3.0, 900.0]), {"y": torch.tensor([0, 2])}


def test_math_and_sdpa_attention_agree():
    qkv = torch.randn(3, 3 * 64, 40, generator=torch.Generator().manual_seed(0)) * 2
    expected = qkv_attention(qkv, 4, "sdpa")
    torch.testing.assert_close(qkv_attention(qkv, 4, "math"), expected, atol=1e-5, rtol=1e-5)
    for kernel in ("math", "sdpa"):  # in bf16 both are the fp32 result up to bf16 rounding
        err = (qkv_attention(qkv.bfloat16(), 4, kernel).float() - expected).abs()
        assert err.mean() < 1e-2 * expected.abs().mean() * 2 and err.max() < 0.25, kernel
    with pytest.raises(ValueError, match="unknown attention kernel"):
        qkv_attention(qkv, 4, "flash")


def test_sdpa_reaches_the_fused_kernel_forward_and_backward():
    """The fused kernels need stride 1 on the head channels; the reference's qkv layout has
    the tokens innermost, so without a copy SDPA silently fell back to its math path (bmm,
    softmax and a masked-row pass) on every device."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    qkv = torch.randn(2, 3 * 64, 64, requires_grad=True)  # [B, heads * 3 * ch, L]
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # raises "No available kernel" otherwise
        out = qkv_attention(qkv, 4, "sdpa")
        out.square().sum().backward()
    torch.testing.assert_close(out, qkv_attention(qkv.detach(), 4, "math"), atol=1e-5, rtol=1e-5)
    assert qkv.grad is not None and qkv.grad.isfinite().all()


def test_set_kernels_changes_no_result():
    model, x, t, kwargs = _model_and_inputs()
    expected = model(x, t, **kwargs)
    set_kernels(model, attention="math", channels_last=True)
    assert all(p.is_contiguous() for p in model.parameters())  # DeepSpeed views them as bytes
    out = model(x, t, **kwargs)  # a plain NCHW input: the model converts it
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert set(model.state_dict()) == set(build_model(_spec()).state_dict())


def test_bf16_mixed_keeps_the_reference_fp32_regions():
    """Under autocast: the torso's convolutions compute in bf16; the timestep MLP, the
    embedding projections of every ResBlock and the output layer stay fp32 (the modules the
    reference's fp16 path leaves in fp32). Weights are never cast."""
    model, x, t, kwargs = _model_and_inputs()
    seen: dict[str, torch.dtype] = {}
    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Linear)):
            module.register_forward_hook(lambda m, i, o, name=name: seen.__setitem__(name, o.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t, **kwargs)
    assert out.dtype == torch.float32
    fp32 = {n for n in seen if n.startswith(("time_embed", "out.")) or ".emb_layers." in n}
    assert {n for n, d in seen.items() if d == torch.float32} == fp32
    assert all(seen[n] == torch.bfloat16 for n in seen if n not in fp32)
    assert any(n.startswith("middle_block") for n in seen) and len(fp32) >= 4
    assert all(p.dtype == torch.float32 for p in model.parameters())
    expected = model(x, t, **kwargs)
    err = (out - expected).abs().max() / expected.abs().max()
    assert 0 < err < 0.05, err  # bf16 rounding, nothing more


# --- the service, end to end ------------------------------------------------------------

# the tiny model at one resolution (no down/upsampling level; attention at 16 px): what
# inductor compiles cold on CPU (two ranks at once; most of the test's CPU time) is about
# the number of distinct ops, and this UNet has every kind of block with fewer of them
COMPILE_MODEL = {**TINY_MODEL, "channel_mult": [1], "attention_resolutions": "16"}


@pytest.fixture(scope="module")
def inductor_cache(tmp_path_factory) -> Path:
    """Inductor's cache for this module's runs: the kernels it writes there show that the
    model was compiled (with train.compile ignored nothing would be written)."""
    return tmp_path_factory.mktemp("inductor")


@pytest.mark.slow
@pytest.mark.parametrize("stage,world", [(0, 1), (2, 2)])
def test_service_trains_with_every_lever(tmp_path, digits_shards, stage, world, inductor_cache, monkeypatch):
    """bf16-mixed, channels_last, math attention, foreach AdamW, compiled: the loss falls and
    the exported weights are plain fp32 reference-named tensors. Inductor compiles cold once,
    on one rank, and the kernels it writes show that train.compile compiled; ZeRO-2 on 2 ranks
    then reads the module's cache (two ranks compiling cold at once cost CI ~110 CPU-s)."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(inductor_cache))  # the ranks inherit it
    job = tiny_job(tmp_path, digits_shards, **{
        "model": COMPILE_MODEL,
        "precision": "bf16-mixed", "deepspeed.zero_stage": stage, "train.max_steps": 20,
        "train.compile": True, "train.channels_last": True, "train.attention_kernel": "math",
        "train.adamw_kernel": "foreach"})
    run_train(world, job)
    logs = metrics(tmp_path / "run")
    assert [r["step"] for r in logs] == [5, 10, 15, 20]
    assert logs[-1]["mse"] < 0.7 * logs[0]["mse"], logs
    weights = torch.load(tmp_path / "run" / "checkpoints" / "step0000020" / "model000020.pt",
                         weights_only=True)
    assert set(weights) == set(build_model(load_job(job).model).state_dict())  # no compile prefix
    assert all(v.dtype == torch.float32 for v in weights.values())
    kernels = [p for p in inductor_cache.rglob("*") if p.suffix in (".py", ".cpp", ".so")]
    assert kernels, "train.compile=true compiled nothing"  # written by the cold run


# --- sampling and evaluation precision ----------------------------------------------------

@pytest.mark.parametrize("precision", ["bf16", "bf16-mixed"])
def test_inference_precision_is_fp32_up_to_bf16_rounding(precision):
    model, x, t, kwargs = _model_and_inputs()
    expected = model(x, t, **kwargs)
    wrapped = at_precision(model, precision)
    out = wrapped(x, t, **kwargs)
    assert out.dtype == torch.float32  # the diffusion's formulas stay fp32
    err = (out - expected).abs().max() / expected.abs().max()
    assert 0 < err < 0.05, err
    weight_dtype = next(model.parameters()).dtype
    assert weight_dtype == (torch.bfloat16 if precision == "bf16" else torch.float32)
    assert next(wrapped.parameters()) is next(model.parameters())  # the loops can find the device
    with pytest.raises(ValueError, match="unknown precision"):
        AtPrecision(model, "fp8")


def test_sample_and_evaluate_clis_take_a_precision(tmp_path):
    from test_evaluate import digit_images, write_shards
    from test_sampling import _cli, make_run, tiny_specs

    from iddpm_ds.spec.data import DataSpec

    images, labels = digit_images(8)
    index = str(write_shards(tmp_path / "shards", images, labels, eval_count=4))
    run_dir = make_run(tmp_path / "run", *tiny_specs(),
                       data=DataSpec(shards=index, eval_shards=index, num_workers=0))
    proc = _cli("sample.py", "--run-dir", str(run_dir), "--num-samples", "2", "--batch-size", "2",
                "--respacing", "ddim3", "--precision", "bf16", "--no-progress")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout)["precision"] == "bf16"
    proc = _cli("evaluate.py", "--run-dir", str(run_dir), "--num-samples", "2", "--batch-size", "2",
                "--respacing", "3", "--precision", "bf16-mixed", "--no-progress")
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    assert report["precision"] == "bf16-mixed" and report["bpd"] > 0
    proc = _cli("sample.py", "--run-dir", str(run_dir), "--precision", "fp8")
    assert proc.returncode == 2 and "--precision" in proc.stderr
