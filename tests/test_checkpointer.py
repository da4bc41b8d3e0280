"""The CheckpointManager's save schedule: the step and time intervals (unit level, a clock
the test moves), and the time interval in a real 2-rank run, where rank 0's clock decides
and both ranks save the same steps. Saving and resuming themselves are tested through the
Trainer elsewhere (test_train, test_rows_fast, test_disk_safety, test_preemption)."""
from __future__ import annotations

import pytest
import torch

from iddpm_ds.train import checkpoint as ckpt
from iddpm_ds.train.checkpointer import SaveSchedule
from mp_utils import run_ranks
from train_utils import tiny_job


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_schedule_saves_on_steps_and_on_time_at_check_steps_only():
    clock = _Clock()
    schedule = SaveSchedule(every_steps=100, minutes=0.5, check_every=10, clock=clock)
    assert [s for s in range(1, 301) if schedule.step_due(s)] == [100, 200, 300]
    assert [s for s in range(1, 31) if schedule.checks_time_at(s)] == [10, 20, 30]
    clock.now += 29.9
    assert not schedule.time_elapsed()  # 29.9 s < 0.5 min
    clock.now += 0.1
    assert schedule.time_elapsed()      # exactly 30 s
    schedule.restart()                  # a save: the interval starts again
    assert not schedule.time_elapsed()
    clock.now += 45.0
    assert schedule.time_elapsed()


def test_schedule_without_minutes_never_asks_the_clock():
    clock = _Clock()
    schedule = SaveSchedule(every_steps=7, minutes=None, check_every=1, clock=clock)
    clock.now += 1e9
    assert not schedule.time_elapsed()
    assert not any(schedule.checks_time_at(s) for s in range(1, 50))  # no collective either
    assert [s for s in range(1, 22) if schedule.step_due(s)] == [7, 14, 21]


STEPS, LOG_EVERY = 6, 2


def _time_saves(rank: int, world: int, job_path: str) -> list[tuple[int, bool]]:
    """Train with a tiny time interval; rank 1's clock never moves, so only rank 0's
    decision, followed by rank 1, can make rank 1 save on time. Returns the (step, last)
    of every save this rank took part in."""
    from iddpm_ds.spec.job import load_job
    from iddpm_ds.train.trainer import Trainer

    trainer = Trainer(load_job(job_path))
    manager = trainer.checkpoints
    if rank == 1:
        manager.schedule.clock = lambda: 0.0
        manager.schedule.since = 0.0
    saves: list[tuple[int, bool]] = []
    real_save = manager.save

    def save(step: int, last: bool = False) -> bool:  # records, then saves as it would
        done = real_save(step, last)
        if done:
            saves.append((step, last))
        return done

    manager.save = save
    assert trainer.run() == 0
    return saves


@pytest.mark.slow
@pytest.mark.timeout(180)  # a disagreement would leave the ranks in mismatched collectives
def test_time_interval_saves_the_same_steps_on_both_ranks(tmp_path, digits_shards, monkeypatch):
    # torch checks that every rank enters the same collective: ranks that disagreed on a
    # save would fail at once instead of waiting in mismatched collectives
    monkeypatch.setenv("TORCH_DISTRIBUTED_DEBUG", "DETAIL")
    job = tiny_job(tmp_path, digits_shards, **{
        "train.max_steps": STEPS, "train.log_interval": LOG_EVERY, "train.save_interval": 1000,
        "train.save_interval_minutes": 0.001, "output.keep_checkpoints": 100,
        "data.num_workers": 0, "deepspeed.zero_stage": 0, "train.schedule_sampler": "uniform"})
    rank0, rank1 = run_ranks(_time_saves, 2, str(job))
    assert rank0 == rank1, (rank0, rank1)
    on_time = [step for step, last in rank0 if not last]
    assert [s for s in on_time if s < STEPS], f"no time save before the end (60 ms interval): {rank0}"
    assert all(step % LOG_EVERY == 0 for step in on_time), rank0  # decided at log steps only
    assert rank0[-1][0] == STEPS  # on time, or else the final save
    ckpt_dir = tmp_path / "run" / "checkpoints"
    assert [ckpt.step_of(t) for t in ckpt.complete_tags(ckpt_dir)] == [s for s, _ in rank0]
    for step, _ in rank0:  # each rank wrote its own data position of that very step
        tag_dir = ckpt_dir / ckpt.tag_for(step)
        for rank in range(2):
            data = torch.load(tag_dir / f"rank{rank:05d}.pt", weights_only=True)["data"]
            assert (data["rank"], data["batches_done"]) == (rank, step)
