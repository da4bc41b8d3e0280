"""fp16 through DeepSpeed's real fp16 engine, on this CPU, through the test seam
(IDDPM_CPU_FP16=1, iddpm_ds/dist/env.py): DeepSpeed's CPU accelerator refuses fp16, yet its
fp16 engine, optimizers and loss scaler run on torch's CPU half kernels.

What the reference's fp16 does and these tests pin: the gradient AdamW steps with is the
true gradient (unscaled), clipped at train.grad_clip; overflow skips halve the scale and
are not divergence; a non-finite loss or an overflow at the floor scale is (exit 3); the
scale survives a resume at another world size; the timestep MLP, embedding projections,
GroupNorm and output head compute in fp32.
"""
from __future__ import annotations

import json
import math

import pytest
import torch

from mp_utils import run_ranks
from train_utils import tiny_job

STAGES = (0, 1, 2, 3)
KERNELS = ("fused", "loop")


def fp16_ranks(fn, world: int, *args):
    """run_ranks with the CPU fp16 seam on in the spawned ranks only."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("IDDPM_CPU_FP16", "1")
        return run_ranks(fn, world, *args)


def _job(tmp_path, shards, name: str, **overrides):
    return str(tiny_job(tmp_path / name, shards, **{
        "diffusion.diffusion_steps": 10, "train.sample_respacing": "ddim5",
        "train.eval_respacing": "5", "data.num_workers": 0, "train.warmup_steps": 0,
        "train.schedule_sampler": "uniform", **overrides}))


def _close(trainer) -> None:
    trainer.preempt.restore()
    trainer.writer.close()
    trainer.data.close()


# ------------------------------------------------ the gradient that reaches AdamW
def _first_step_norm(job_path: str) -> dict:
    """Build the real Trainer, take optimizer steps until one is applied, and return the
    global norm of the gradient AdamW received (a pre-step hook on the torch optimizer)."""
    import torch.distributed as torch_dist

    from iddpm_ds.spec.job import load_job
    from iddpm_ds.train.trainer import Trainer

    trainer = Trainer(load_job(job_path))
    trainer._batches = iter(trainer.data)
    seen: list[float] = []

    def hook(optimizer, args, kwargs):
        grads = [p.grad.float() for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        local = torch.stack([g.pow(2).sum() for g in grads]).sum()
        if trainer.engine.zero_optimization():  # ZeRO: each rank holds a partition
            torch_dist.all_reduce(local)
        seen.append(float(local.sqrt()))

    trainer.engine.basic_optimizer.register_step_pre_hook(hook)
    skips = 0
    while not seen:
        trainer.train_step()
        skips += 1
    out = {"norm": seen[0], "skips": skips - 1, "scale": trainer.loss_scale.value,
           "optimizer": type(trainer.engine.optimizer).__name__}
    _close(trainer)
    return out


def _gradient_worker(rank: int, world: int, jobs: dict[str, str]) -> dict:
    return {name: _first_step_norm(path) for name, path in jobs.items()}


@pytest.fixture(scope="module")
def gradients(tmp_path_factory, digits_shards) -> dict:
    """One fp32 reference step, then fp16 at every ZeRO stage x AdamW kernel, clipped at
    half the fp32 norm, on 2 ranks: same weights (seeded), same first batch and noise."""
    tmp = tmp_path_factory.mktemp("fp16_grad")
    common = {"train.lr": 1e-4, "deepspeed.overrides": {"fp16": {"initial_scale_power": 12}}}
    reference = {"fp32": _job(tmp, digits_shards, "fp32", **{"train.lr": 1e-4})}
    fp32 = fp16_ranks(_gradient_worker, 2, reference)[0]["fp32"]["norm"]
    clip = round(fp32 / 2, 6)
    jobs = {f"{stage}-{kernel}": _job(tmp, digits_shards, f"{stage}-{kernel}", precision="fp16", **{
        "deepspeed.zero_stage": stage, "train.adamw_kernel": kernel, "train.grad_clip": clip,
        **common}) for stage in STAGES for kernel in KERNELS}
    jobs["1-fused-noclip"] = _job(tmp, digits_shards, "noclip", precision="fp16", **{
        "deepspeed.zero_stage": 1, **common})
    jobs["0-fused-noclip"] = _job(tmp, digits_shards, "noclip0", precision="fp16", **{
        "deepspeed.zero_stage": 0, **common})
    results = fp16_ranks(_gradient_worker, 2, jobs)
    return {"fp32": fp32, "clip": clip, "ranks": results}


@pytest.mark.slow
@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("kernel", KERNELS)
def test_adamw_gets_the_unscaled_gradient_clipped_at_grad_clip(gradients, stage, kernel):
    """Clipping at half the true norm: AdamW must see exactly grad_clip. A leaked loss
    scale (DeepSpeed 0.19.8's ZeRO-0: 2^-12 here) gives a norm far below it and no
    clipping; clipping that stops applying gives the full norm."""
    for rank in gradients["ranks"]:
        got = rank[f"{stage}-{kernel}"]
        assert got["scale"] is not None and got["optimizer"] != "AdamW"  # the fp16 engine
        assert got["norm"] == pytest.approx(gradients["clip"], rel=2e-3), got


@pytest.mark.slow
@pytest.mark.parametrize("stage", (0, 1))
def test_unclipped_fp16_gradient_equals_the_fp32_gradient(gradients, stage):
    for rank in gradients["ranks"]:
        got = rank[f"{stage}-fused-noclip"]["norm"]
        assert got == pytest.approx(gradients["fp32"], rel=2e-2), (got, gradients["fp32"])


def test_zero0_fp16_gradient_reaches_adamw_unscaled(tmp_path, digits_shards):
    """One rank, ZeRO-0 only (the stage DeepSpeed 0.19.8 gets wrong): the fast check the
    mutant runner uses (tests/mutants.py)."""
    common = {"train.lr": 1e-4, "deepspeed.zero_stage": 0}
    jobs = {"fp32": _job(tmp_path, digits_shards, "fp32", **common),
            "fp16": _job(tmp_path, digits_shards, "fp16", precision="fp16", **common,
                         **{"deepspeed.overrides": {"fp16": {"initial_scale_power": 12}}})}
    got = fp16_ranks(_gradient_worker, 1, jobs)[0]
    assert got["fp16"]["optimizer"] == "FP16_UnfusedOptimizer"
    assert got["fp16"]["norm"] == pytest.approx(got["fp32"]["norm"], rel=2e-2), got


# ------------------------------------------- overflow, divergence, the floor, resume
def _run_worker(rank: int, world: int, job_path: str, nan_from: int | None) -> dict:
    from iddpm_ds.spec.job import load_job
    from iddpm_ds.train.trainer import Trainer

    class Poisoned(Trainer):
        def _next_batch(self):
            x_start, model_kwargs = super()._next_batch()
            if nan_from is not None and self.step >= nan_from:
                x_start = torch.full_like(x_start, float("nan"))
            return x_start, model_kwargs

    trainer = Poisoned(load_job(job_path))
    status = trainer.run()
    return {"status": status, "scale": trainer.loss_scale.value, "step": trainer.step,
            "state": trainer.loss_scale.state_dict(), "nonfinite_total": trainer.guard.total}


def _records(run_dir) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if '"loss"' in line]


@pytest.mark.slow
def test_overflow_skips_are_counted_not_divergence_and_scale_survives_resume(tmp_path, digits_shards):
    """From 2^20 the first steps overflow by design: with max_nonfinite_steps=2 those
    skips must not stop the run. lg_loss_scale and the skips are logged; the scale is in
    the checkpoint and comes back at world size 1 (universal conversion) and 2."""
    job = _job(tmp_path, digits_shards, "run", precision="fp16", **{
        "deepspeed.zero_stage": 2, "train.max_nonfinite_steps": 2, "train.max_steps": 12,
        "train.log_interval": 6, "train.save_interval": 6})
    first = fp16_ranks(_run_worker, 2, job, None)
    assert [r["status"] for r in first] == [0, 0]
    records = _records(tmp_path / "run" / "run")
    skips = sum(r["overflow_skips"] for r in records)
    assert skips >= 2, records  # in a row: counted as a streak, they would stop this run
    assert records[-1]["overflow_skips_total"] == skips
    assert all(r["nonfinite_steps"] == 0 for r in records)
    assert records[-1]["lg_loss_scale"] == pytest.approx(math.log2(first[0]["scale"]))
    assert records[-1]["lg_loss_scale"] <= 20 - skips  # halved on each overflow
    saved = torch.load(tmp_path / "run" / "run" / "checkpoints" / "step0000012" / "trainer_state.pt",
                       weights_only=True)
    assert saved["loss_scale"]["cur_scale"] == first[0]["scale"]
    # resume: one more step at world size 1 and at 2; the scale continues from the checkpoint
    for world in (1, 2):
        resumed = fp16_ranks(_probe_scale, world, job)
        assert resumed[0]["scale"] == first[0]["scale"], (world, resumed[0])
        assert resumed[0]["cur_iter"] == first[0]["state"]["cur_iter"]
        assert resumed[0]["skips_total"] == skips


def _probe_scale(rank: int, world: int, job_path: str) -> dict:
    from iddpm_ds.spec.job import load_job
    from iddpm_ds.train.trainer import Trainer

    trainer = Trainer(load_job(job_path))
    out = {"scale": trainer.loss_scale.value, "cur_iter": trainer.loss_scale.state_dict()["cur_iter"],
           "skips_total": trainer.loss_scale.overflow_skips_total, "step": trainer.step}
    _close(trainer)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("case", ["nan_loss", "floor"])
def test_fp16_divergence_stops_with_exit_3_and_latest_stays_finite(tmp_path, digits_shards, case, capfd):
    """A non-finite loss in the forward pass, streak after streak, or an overflow at the
    floor scale: exit 3, one error line, and `latest` names a finite checkpoint."""
    overrides = {"deepspeed.overrides": {"fp16": {"initial_scale_power": 12}}} if case == "nan_loss" \
        else {"deepspeed.overrides": {"fp16": {"initial_scale_power": 8, "min_loss_scale": 128}},
              "train.lr": 1e3}  # step 1 applies and explodes the weights; then overflows
    job = _job(tmp_path, digits_shards, "run", precision="fp16", **{
        "deepspeed.zero_stage": 1, "train.max_nonfinite_steps": 3, "train.max_steps": 40,
        "train.log_interval": 2, "train.save_interval": 1, **overrides})
    results = fp16_ranks(_run_worker, 2, job, 5 if case == "nan_loss" else None)
    assert [r["status"] for r in results] == [3, 3]
    assert results[0]["step"] <= (8 if case == "nan_loss" else 4)  # NaN from step 6: 3 in a row
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err[-3000:]
    assert ("minimum loss scale" in lines[0]) == (case == "floor"), lines[0]
    assert ("non-finite loss" in lines[0]) == (case == "nan_loss"), lines[0]
    ckpt = tmp_path / "run" / "run" / "checkpoints"
    latest = (ckpt / "latest").read_text().strip()
    weights = torch.load(ckpt / latest / f"model{int(latest[4:]):06d}.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in weights.values())


# ----------------------------------------------------------------- fp32 regions
def _region_worker(rank: int, world: int, job_path: str) -> dict:
    from iddpm_ds.models.nn import Conv2d32, GroupNorm32, Linear32
    from iddpm_ds.spec.job import load_job
    from iddpm_ds.train.engine import EngineModel, build_engine

    bundle = build_engine(load_job(job_path))
    seen: dict[str, tuple[str, str, str]] = {}
    for name, module in bundle.engine.module.named_modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear, GroupNorm32)):
            def hook(mod, args, out, name=name):
                seen[name] = (type(mod).__name__, str(mod.weight.dtype), str(out.dtype))
            module.register_forward_hook(hook)
    x = torch.randn(2, 3, 16, 16)
    out = EngineModel(bundle.engine)(x, torch.tensor([1, 7]), y=torch.tensor([0, 3]))
    return {"seen": seen, "out": str(out.dtype), "regions": [Linear32.__name__, Conv2d32.__name__]}


def test_fp16_keeps_the_reference_fp32_regions(tmp_path, digits_shards):
    """Weights are fp16 everywhere (DeepSpeed casts the module), yet the timestep MLP, the
    embedding projections and the output head (norm, conv) compute in fp32, while the
    torso's convolutions run in fp16, as the reference's convert_to_fp16 leaves them.
    GroupNorm32 computes in fp32 and returns its input's dtype (tests/test_unet.py)."""
    job = _job(tmp_path, digits_shards, "run", precision="fp16")
    res = fp16_ranks(_region_worker, 1, job)[0]
    seen = res["seen"]
    assert all(w == "torch.float16" for _, w, _ in seen.values())
    fp32 = {n for n, (kind, _, out) in seen.items() if out == "torch.float32"}
    expected = {n for n, (kind, _, _) in seen.items() if kind in res["regions"]} | {"out.0"}
    assert fp32 == expected
    assert {"time_embed.0", "time_embed.2", "out.0", "out.2"} <= fp32
    assert any(n.endswith("emb_layers.1") for n in fp32)
    torso = {n for n, (kind, _, out) in seen.items() if kind == "Conv2d"}
    assert torso and all(seen[n][2] == "torch.float16" for n in torso)
    assert res["out"] == "torch.float32"


# ----------------------------------------------------------------- refusals
def test_fp16_zero0_is_refused_on_an_unverified_deepspeed(tmp_path, digits_shards, monkeypatch, capsys):
    """The ZeRO-0 loss-scale fix is pinned to the DeepSpeed version it was measured on;
    another version gets one line naming the fields, exit 2, at --check (and at start:
    the trainer renders the same config first)."""
    from iddpm_ds.train import ds_config
    from iddpm_ds_launch import train as launch_train

    job = _job(tmp_path, digits_shards, "run", precision="fp16", **{"deepspeed.zero_stage": 0})
    monkeypatch.setenv("IDDPM_CPU_FP16", "1")
    assert launch_train.main(["--job", job, "--check"]) == 0
    capsys.readouterr()
    monkeypatch.setattr(ds_config, "installed_deepspeed", lambda: "0.20.0")
    assert launch_train.main(["--job", job, "--check"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "deepspeed.zero_stage: 0" in err[0] and "use deepspeed.zero_stage: 1" in err[0]
    monkeypatch.setattr(ds_config, "installed_deepspeed", lambda: "0.20.0")
    assert launch_train.main(["--job", job, "--check", "--set", "deepspeed.zero_stage=1"]) == 0


def test_fp16_without_a_gpu_or_the_seam_is_one_line(tmp_path, digits_shards, monkeypatch, capsys):
    from iddpm_ds_launch import train as launch_train

    monkeypatch.delenv("IDDPM_CPU_FP16", raising=False)
    job = _job(tmp_path, digits_shards, "run", precision="fp16")
    assert launch_train.main(["--job", job, "--check"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "fp16 needs a GPU" in err[0]


# ------------------------------------------------------- the scale's dynamics
def _dynamics_worker(rank: int, world: int, jobs: dict[str, str]) -> dict:
    """Drive each engine's own scaler update (the one DeepSpeed's step calls) through an
    overflow and 1,000 clean steps, recording the scale."""
    from iddpm_ds.spec.job import load_job
    from iddpm_ds.train.engine import build_engine
    from iddpm_ds.train.loss_scale import LossScale

    out = {}
    for name, path in jobs.items():
        engine = build_engine(load_job(path)).engine
        scale, optimizer = LossScale(engine), engine.optimizer
        update = (optimizer.loss_scaler.update_scale if hasattr(optimizer, "loss_scaler")
                  else optimizer._update_scale)
        trace = [scale.value]
        update(True)                 # one overflow
        trace.append(scale.value)
        for _ in range(1001):        # clean steps
            update(False)
            trace.append(scale.value)
        out[name] = trace
    return out


@pytest.mark.slow
def test_loss_scale_starts_at_2_20_halves_on_overflow_doubles_after_1000_clean_steps(tmp_path, digits_shards):
    """The reference: lg_loss_scale 20 at start, -1 on overflow, +1e-3 per clean step (so
    x2 after 1,000). Each engine's real scaler, built from ds_configs/fp16.json: ZeRO-0's
    FP16_UnfusedOptimizer and the DynamicLossScaler that ZeRO 1-3 share. DeepSpeed
    doubles in the update that ends the 1,001st clean step: the reference's lg_loss_scale
    reaches +1 one step earlier, a difference of one step in 1,000."""
    jobs = {str(stage): _job(tmp_path, digits_shards, f"s{stage}", precision="fp16",
                             **{"deepspeed.zero_stage": stage}) for stage in (0, 1)}
    traces = fp16_ranks(_dynamics_worker, 1, jobs)[0]
    for stage, trace in traces.items():
        assert trace[0] == 2.0 ** 20 and trace[1] == 2.0 ** 19, stage
        assert trace[1:1002] == [2.0 ** 19] * 1001, stage          # 1,000 clean steps: unchanged
        assert trace[1002] == 2.0 ** 20, (stage, trace[995:])       # then doubled
