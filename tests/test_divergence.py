"""Divergence guard: non-finite steps are skipped on the device, a streak stops the run with
exit status 3, checkpoints stay finite, metrics stay strict JSON. Real training runs."""
from __future__ import annotations

import json
import math

import pytest
import torch

from iddpm_ds.diffusion.timestep_sampler import LossSecondMomentResampler
from iddpm_ds.train.metrics import MetricsWriter
from mp_utils import run_ranks
from train_utils import run_train, tiny_job

DIVERGED_EXIT = 3
NAN_STEP = 3  # the 4th optimizer step gets a NaN image (on rank 1 only)


def _strict(line: str) -> dict:
    def refuse(name: str):
        raise ValueError(f"non-JSON constant {name}")

    return json.loads(line, parse_constant=refuse)


def _all_finite(state: dict) -> bool:
    return all(torch.isfinite(v).all() for v in state.values())


# ----------------------------------------------------------------------- unit level
def test_metrics_jsonl_is_strict_json_with_nulls_and_a_count(tmp_path):
    writer = MetricsWriter(tmp_path, tensorboard=False, total_steps=None)
    writer.write(5, {"loss": math.nan, "grad_norm": math.inf, "lr": 1e-4,
                     "memory_mb_per_rank": [1.0, -math.inf]})
    writer.close()
    record = _strict((tmp_path / "metrics.jsonl").read_text())
    assert record["loss"] is None and record["grad_norm"] is None
    assert record["memory_mb_per_rank"] == [1.0, None]
    assert record["lr"] == 1e-4 and record["nonfinite_values"] == 3


def test_sampler_drops_the_updates_of_a_skipped_step():
    sampler = LossSecondMomentResampler(5, device="cpu", seed=0, rank=0, history_per_term=2,
                                        uniform_prob=0.0, max_local_batch=8)
    t = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2])
    sampler.update_with_local_losses(t, torch.arange(8.0))
    before = sampler.state_dict()
    sampler.begin_step()
    sampler.update_with_local_losses(t, torch.full((8,), 7.0))        # micro-step 1
    sampler.update_with_local_losses(t, torch.full((8,), 9.0))        # micro-step 2
    sampler.end_step(torch.tensor(False))
    after = sampler.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in ("loss_history", "loss_counts", "ring_offset"))
    sampler.begin_step()
    sampler.update_with_local_losses(t, torch.full((8,), 7.0))
    sampler.end_step(torch.tensor(True))
    assert (sampler.state_dict()["loss_history"][:, -1] == 7.0).all()  # newest entry per t


# ------------------------------------------------------------ a transient NaN batch
def _capture(trainer) -> dict:
    """Everything a skipped step must leave alone (collective: all ranks)."""
    optimizer = trainer.engine.basic_optimizer
    return {
        "model": trainer.master.full_state_dict(),
        "ema": trainer.ema.full_state_dicts(),
        "adam": [{k: v.detach().clone() for k, v in s.items()} for s in optimizer.state.values()],
        "sampler": trainer.timestep_sampler.state_dict(),
    }


def _nan_batch_worker(rank: int, world: int, job_path: str) -> dict:
    from iddpm_ds.spec.job import load_job
    from iddpm_ds.train.trainer import Trainer

    class NaNOnceTrainer(Trainer):
        """Rank 1's first image of step NAN_STEP is NaN; states around that step are kept."""

        def _next_batch(self):
            x_start, model_kwargs = super()._next_batch()
            if self.step == NAN_STEP and rank == 1:
                x_start = x_start.clone()
                x_start[0] = float("nan")
            return x_start, model_kwargs

        def train_step(self) -> None:
            if self.step == NAN_STEP:
                self.before = _capture(self)
            super().train_step()
            if self.step == NAN_STEP + 1:
                self.after = _capture(self)

    trainer = NaNOnceTrainer(load_job(job_path))
    status = trainer.run()
    final = _capture(trainer)
    return {"status": status, "before": trainer.before, "after": trainer.after, "final": final,
            "total": trainer.guard.total}


def _same(a, b, path="") -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for key in a:
            _same(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


@pytest.mark.slow
@pytest.mark.parametrize("stage,precision", [(0, "fp32"), (2, "bf16"), (3, "fp32")])
def test_one_nan_batch_is_skipped_and_training_continues(tmp_path, digits_shards, stage, precision):
    job = tiny_job(tmp_path, digits_shards, **{
        "train.max_steps": 8, "train.log_interval": 4, "train.save_interval": 4,
        "deepspeed.zero_stage": stage, "precision": precision})
    results = run_ranks(_nan_batch_worker, 2, str(job))
    for rank, res in enumerate(results):
        assert res["status"] == 0 and res["total"] == 1
        # weights, Adam moments and step counts, EMA, sampler history: untouched by the step
        _same(res["before"], res["after"], f"rank{rank}")
        # ... and training went on afterwards
        name = next(iter(res["after"]["model"]))
        assert not torch.equal(res["after"]["model"][name], res["final"]["model"][name])
        assert _all_finite(res["final"]["model"])
    records = [_strict(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    by_step = {r["step"]: r for r in records if "loss" in r}
    assert by_step[4]["nonfinite_steps"] == 1 and by_step[4]["loss"] is None
    assert by_step[4]["nonfinite_values"] >= 1
    assert by_step[8]["nonfinite_steps"] == 0 and by_step[8]["nonfinite_steps_total"] == 1
    assert math.isfinite(by_step[8]["loss"])


# ------------------------------------------------------------- a diverging run stops
@pytest.mark.slow
@pytest.mark.parametrize("stage,precision", [(0, "fp32"), (2, "bf16"), (1, "fp32")])
def test_diverging_run_stops_with_exit_3_and_finite_checkpoints(tmp_path, digits_shards, stage, precision):
    from iddpm_ds import build_model
    from iddpm_ds.spec.job import load_job

    job = tiny_job(tmp_path, digits_shards, **{
        "train.max_steps": 60, "train.log_interval": 2, "train.save_interval": 2,
        "train.max_nonfinite_steps": 3, "output.keep_checkpoints": 2,
        "deepspeed.zero_stage": stage, "precision": precision})
    proc = run_train(2, job, "train.lr=1e3", check=False, launcher="deepspeed")
    out = proc.stdout + proc.stderr
    assert proc.returncode == DIVERGED_EXIT, out[-4000:]
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "train.max_nonfinite_steps=3" in errors[0], errors
    run_dir = tmp_path / "run"
    records = [_strict(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = records[-1]
    assert last["step"] < 60 and last["nonfinite_streak"] >= 3 and last["loss"] is None
    ckpt_dir = run_dir / "checkpoints"
    latest = (ckpt_dir / "latest").read_text()
    assert (ckpt_dir / latest / "complete.json").is_file()
    model = build_model(load_job(job).model)
    for tag_dir in sorted(ckpt_dir.glob("step*")):  # every checkpoint written, not only latest
        step = int(tag_dir.name[4:])
        for name in (f"model{step:06d}.pt", f"ema_0.9_{step:06d}.pt", f"ema_0.5_{step:06d}.pt"):
            state = torch.load(tag_dir / name, weights_only=True)
            assert _all_finite(state), f"{tag_dir.name}/{name}"
            model.load_state_dict(state, strict=True)
