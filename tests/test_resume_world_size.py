"""Resume at another world size, ZeRO 0-3, fp32 and bf16 (ZeRO 1-3: through a universal
checkpoint; ZeRO-0: its replicated engine state loads as is).

2 real ranks train and save (the session's shared demo run, train_utils.DemoRuns); its run
dir is copied and resumed on 1 or on 3 real ranks from the checkpoint before the last.
The grid stage x precision x world size (4 x 2 x 2) runs pairwise: every (stage,
precision) once, and every stage and every precision on both 1 and 3 ranks (CASES; the
cover is checked below), half the resumes of the full product.
Right after the resume, model weights, Adam moments, EMA, sampler history and step must
equal what was saved (tensors compared); then training continues and its losses must be
in line with the run that never stopped.
"""
from __future__ import annotations

import pytest
import torch

from mp_utils import run_ranks
from train_utils import DEMO_SAVED, DEMO_STEPS, metrics

pytestmark = pytest.mark.slow
SAVED, MORE = DEMO_SAVED, DEMO_STEPS


def _resume_worker(rank: int, world: int, run_dir: str) -> dict | None:
    from deepspeed.utils import safe_get_full_optimizer_state

    from iddpm_ds.spec.job import load_job
    from iddpm_ds.train.trainer import Trainer

    job = load_job(f"{run_dir}/job.yaml", [f"train.max_steps={MORE}"])
    trainer = Trainer(job)
    loaded = {
        "step": trainer.step,
        "model": trainer.master.full_state_dict(),
        "ema": trainer.ema.full_state_dicts(),
        "sampler": trainer.timestep_sampler.state_dict(),
        **_moments(trainer, safe_get_full_optimizer_state),
    }
    status = trainer.run()
    return {**loaded, "status": status} if rank == 0 else None


def _moments(trainer, safe_get_full_optimizer_state) -> dict:
    """Full Adam moments by parameter name."""
    master = trainer.master
    if not master.partitioned:  # ZeRO-0: the torch optimizer's own per-parameter state
        # (cloned: on CPU .cpu() returns the live tensor, which training then updates)
        state = trainer.engine.basic_optimizer.state
        return {m: {n: state[t][m].cpu().clone() for n, t in zip(master.names, master.local())}
                for m in ("exp_avg", "exp_avg_sq")}
    return {m: {n: safe_get_full_optimizer_state(p, m).cpu() for n, p in zip(master.names, master.params)}
            for m in ("exp_avg", "exp_avg_sq")}


def _saved_zero0_moments(tag, names) -> dict:
    """ZeRO-0: DeepSpeed's model-states file holds the torch optimizer's state dict
    (bf16: inside its fp32-master wrapper), parameters numbered in model order."""
    states = torch.load(tag / "mp_rank_00_model_states.pt", weights_only=False, map_location="cpu")
    optimizer = states["optimizer"]
    optimizer = optimizer.get("optimizer_state_dict", optimizer)
    return {m: {n: optimizer["state"][i][m] for i, n in enumerate(names)} for m in ("exp_avg", "exp_avg_sq")}


def _saved(run_dir, stage):
    tag = run_dir / "checkpoints" / f"step{SAVED:07d}"
    load = lambda p: torch.load(p, weights_only=True)  # noqa: E731
    saved = {"model": load(tag / f"model{SAVED:06d}.pt"),
             "ema": {r: load(tag / f"ema_{r}_{SAVED:06d}.pt") for r in (0.9, 0.5)},
             "sampler": load(tag / "trainer_state.pt")["timestep_sampler"]}
    if stage == 0:
        assert not (tag / "universal").exists()  # nothing to convert
        return {**saved, **_saved_zero0_moments(tag, list(saved["model"]))}
    for moment in ("exp_avg", "exp_avg_sq"):  # full tensors DeepSpeed extracted for us
        saved[moment] = {n: _param(tag / "universal" / "zero" / n / f"{moment}.pt")
                         for n in saved["model"]}
    return saved


def _param(path):
    value = torch.load(path, weights_only=False)  # DeepSpeed's own file format
    return value["param"] if isinstance(value, dict) else value


def _equal(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    for key in a:
        if isinstance(a[key], dict):
            _equal(a[key], b[key], f"{what}.{key}")
        elif not isinstance(a[key], torch.Tensor):
            assert a[key] == b[key], f"{what}.{key}"
        else:
            # ZeRO-3's universal files hold flat tensors: compare values in order
            assert torch.equal(a[key].cpu().float().flatten(), b[key].cpu().float().flatten()), f"{what}.{key}"


# (stage, precision, world): 1 rank takes every rank's shards; 3 ranks split them unevenly
CASES = [(0, "fp32", 1), (1, "fp32", 3), (2, "fp32", 1), (3, "fp32", 3),
         (0, "bf16", 3), (1, "bf16", 1), (2, "bf16", 3), (3, "bf16", 1)]


def test_cases_cover_every_pair():
    assert {(s, p) for s, p, _ in CASES} == {(s, p) for s in range(4) for p in ("fp32", "bf16")}
    assert {(s, w) for s, _, w in CASES} == {(s, w) for s in range(4) for w in (1, 3)}
    assert {(p, w) for _, p, w in CASES} == {(p, w) for p in ("fp32", "bf16") for w in (1, 3)}


@pytest.mark.parametrize("stage,precision,world", CASES)
def test_resume_on_1_or_3_ranks(tmp_path, demo_runs, stage, precision, world):
    # the reference: 2 ranks, straight to MORE (checkpoints at SAVED and MORE kept)
    two, _ = demo_runs.get(stage, precision)
    reference = metrics(two)
    run_dir = tmp_path / f"on{world}"
    demo_runs.stopped_at_saved(stage, precision, run_dir)  # the copy, latest = SAVED
    got = run_ranks(_resume_worker, world, str(run_dir))[0]
    saved = _saved(run_dir, stage)
    assert got["step"] == SAVED and got["status"] == 0
    for key in ("model", "exp_avg", "exp_avg_sq"):
        _equal(got[key], saved[key], f"{key}@{world}")
    _equal(got["ema"], saved["ema"], f"ema@{world}")
    _equal(got["sampler"], saved["sampler"], f"sampler@{world}")
    after = metrics(run_dir)
    assert [r["step"] for r in after] == [MORE]  # log_interval 5: SAVED + 5 == MORE
    # in line with the uninterrupted run, and far from a fresh model's loss
    assert 0.6 * reference[-1]["mse"] < after[-1]["mse"] < 1.5 * reference[-1]["mse"], (reference, after)
    assert after[-1]["mse"] < 0.9 * reference[0]["mse"]
    latest = (run_dir / "checkpoints" / "latest").read_text()
    assert latest == f"step{MORE:07d}"
    state = torch.load(run_dir / "checkpoints" / latest / "trainer_state.pt", weights_only=True)
    assert state["meta"]["world_size"] == world
