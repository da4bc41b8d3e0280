"""Fast, one-process checks of rows whose other tests are multi-process training runs: the
divergence guard refusing a save, a ZeRO-1 checkpoint of 2 ranks resuming on 1 through a
universal checkpoint, and a preemption signal ending in a checkpoint and exit 75. Real
DeepSpeed engines and trainers (tiny job); the mutant check (tests/mutants.py) runs these."""
from __future__ import annotations

import math
import os
import signal

import torch

from iddpm_ds.train import checkpoint as ckpt
from mp_utils import run_ranks
from train_utils import tiny_job


def _close(trainer) -> None:
    trainer.preempt.restore()
    trainer.writer.close()
    trainer.data.close()


# ---------------------------------------------------------------- save refusal
def _save_refusals(rank: int, world: int, job_path: str) -> dict:
    """Step, save (finite: allowed); NaN in one master weight: save refused; weights put
    back, then a streak of train.max_nonfinite_steps NaN batches: save refused."""
    from iddpm_ds.spec.job import load_job
    from iddpm_ds.train.guard import Diverged
    from iddpm_ds.train.trainer import Trainer

    trainer = Trainer(load_job(job_path))
    real, poison = iter(trainer.data), [False]

    def feed():
        while True:
            x_start, cond = next(real)
            yield (torch.full_like(x_start, math.nan) if poison[0] else x_start), cond

    trainer._batches = feed()
    out: dict = {"errors": []}

    def save_at(step_label: str) -> None:
        try:
            trainer.checkpoints.save(trainer.step, last=True)  # forced, as at the end
            out["errors"].append((step_label, None))
        except Diverged as err:
            out["errors"].append((step_label, str(err)))

    trainer.train_step()
    save_at("finite")                                     # step 1: saved
    trainer.train_step()                                  # step 2
    weight = trainer.master.local()[0]
    kept = weight.detach().clone()
    with torch.no_grad():
        weight.view(-1)[0] = math.nan
    save_at("nan-weight")                                 # step 2: refused
    with torch.no_grad():
        weight.copy_(kept)
    poison[0] = True
    for _ in range(trainer.job.train.max_nonfinite_steps):
        trainer.train_step()                              # skipped on the device
    save_at("streak")                                     # refused
    out["step"] = trainer.step
    _close(trainer)
    return out


def test_save_is_refused_once_diverged(tmp_path, digits_shards):
    job = tiny_job(tmp_path, digits_shards, **{
        "train.max_nonfinite_steps": 2, "train.save_interval": 1000, "data.num_workers": 0,
        "deepspeed.zero_stage": 0, "train.schedule_sampler": "uniform"})
    out = run_ranks(_save_refusals, 1, str(job))[0]
    errors = dict(out["errors"])
    assert errors["finite"] is None, errors
    assert "non-finite fp32 master or EMA weights" in (errors["nan-weight"] or "saved"), errors
    assert "train.max_nonfinite_steps=2" in (errors["streak"] or "saved"), errors
    ckpt_dir = tmp_path / "run" / "checkpoints"
    assert out["step"] == 4
    assert (ckpt_dir / "latest").read_text() == ckpt.tag_for(1)  # only the finite save happened
    assert sorted(p.name for p in ckpt_dir.glob("step*")) == [ckpt.tag_for(1)]


# ------------------------------------------------- resume at another world size
def _full_moments(trainer) -> dict:
    from deepspeed.utils import safe_get_full_optimizer_state

    master = trainer.master
    return {m: {n: safe_get_full_optimizer_state(p, m).clone() for n, p in zip(master.names, master.params)}
            for m in ("exp_avg", "exp_avg_sq")}


def _train_and_save(rank: int, world: int, job_path: str) -> dict | None:
    from iddpm_ds.spec.job import load_job
    from iddpm_ds.train.trainer import Trainer

    trainer = Trainer(load_job(job_path))
    status = trainer.run()                                # saves at train.max_steps
    state = {"status": status, "step": trainer.step, "model": trainer.master.full_state_dict(),
             **_full_moments(trainer)}                    # collective: every rank
    return state if rank == 0 else None


def _resume(rank: int, world: int, job_path: str) -> dict:
    from iddpm_ds.spec.job import load_job
    from iddpm_ds.train.trainer import Trainer

    trainer = Trainer(load_job(job_path))
    state = {"step": trainer.step, "model": trainer.master.full_state_dict(), **_full_moments(trainer)}
    _close(trainer)
    return state


def test_zero1_checkpoint_of_2_ranks_resumes_on_1_rank(tmp_path, digits_shards):
    """ZeRO-1 shards Adam's moments by rank: on 1 rank they come back through the universal
    conversion, equal to the full moments the 2 saving ranks held (read before exiting)."""
    job = tiny_job(tmp_path, digits_shards, **{
        "train.max_steps": 2, "train.log_interval": 2, "train.save_interval": 1000,
        "data.num_workers": 0, "deepspeed.zero_stage": 1, "train.schedule_sampler": "uniform"})
    saved = run_ranks(_train_and_save, 2, str(job))[0]
    assert saved["status"] == 0 and saved["step"] == 2
    tag_dir = tmp_path / "run" / "checkpoints" / ckpt.tag_for(2)
    assert len(list(tag_dir.glob("*optim_states.pt"))) == 2  # really sharded over 2 ranks
    got = run_ranks(_resume, 1, str(job))[0]
    assert got["step"] == 2
    assert (tag_dir / "universal" / ckpt.COMPLETE).is_file()
    for key in ("model", "exp_avg", "exp_avg_sq"):
        assert got[key].keys() == saved[key].keys()
        for name, want in saved[key].items():
            assert torch.equal(got[key][name].flatten(), want.flatten()), (key, name)
    assert any(v.abs().sum() > 0 for v in saved["exp_avg"].values())  # moments are not trivial


# --------------------------------------------------------------------- preemption
PREEMPT_AT = 2


def _preempted(rank: int, world: int, job_path: str) -> dict:
    from iddpm_ds.spec.job import load_job
    from iddpm_ds.train.trainer import Trainer

    class SignalledTrainer(Trainer):
        def train_step(self) -> None:
            super().train_step()
            if self.step == PREEMPT_AT:  # a real SIGUSR1 (Slurm's --signal) to this process
                os.kill(os.getpid(), signal.SIGUSR1)

    trainer = SignalledTrainer(load_job(job_path))
    return {"status": trainer.run(), "step": trainer.step,
            "handler_restored": signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL}


def test_preemption_signal_saves_and_exits_75(tmp_path, digits_shards):
    job = tiny_job(tmp_path, digits_shards, **{
        "train.max_steps": 6, "train.save_interval": 1000, "train.log_interval": 1000,
        "train.preempt_check_interval": 1, "data.num_workers": 0, "deepspeed.zero_stage": 0,
        "train.schedule_sampler": "uniform"})
    out = run_ranks(_preempted, 1, str(job))[0]
    assert out["status"] == 75 and out["step"] == PREEMPT_AT, out
    ckpt_dir = tmp_path / "run" / "checkpoints"
    assert (ckpt_dir / "latest").read_text() == ckpt.tag_for(PREEMPT_AT)
    assert ckpt.is_complete(ckpt_dir / ckpt.tag_for(PREEMPT_AT))
    assert out["handler_restored"]
