"""The training step's math beyond warm-up, on a real DeepSpeed engine in one real process:
loss-aware importance weights in backward equal 1/(T p_t) of the sampler's p, the logged
loss_weighted is loss * weight, and the lr after every step follows lr_factor."""
from __future__ import annotations

import math

import torch

from mp_utils import run_ranks
from train_utils import tiny_job

STEPS = 14


def _train(rank: int, world_size: int, job_path: str) -> dict:
    from iddpm_ds.spec.job import load_job
    from iddpm_ds.train.trainer import Trainer

    trainer = Trainer(load_job(job_path))
    trainer._batches = iter(trainer.data)
    sampler, diffusion = trainer.timestep_sampler, trainer.diffusion
    draws, losses = [], []
    sample, training_losses = sampler.sample, diffusion.training_losses

    def spy_sample(n: int):  # observes the real sampler; changes nothing
        p = sampler.probabilities().clone()                                   # [T]
        t, weights = sample(n)
        draws.append((t.clone(), weights.clone(), p))
        return t, weights

    def spy_losses(*args, **kwargs):
        out = training_losses(*args, **kwargs)
        losses.append(out["loss"].detach().clone())
        return out

    sampler.sample, diffusion.training_losses = spy_sample, spy_losses
    lrs = []
    for _ in range(STEPS):
        trainer.train_step()
        lrs.append(trainer.engine.get_lr()[0])
    logged = trainer.losses.reduce()
    trainer.preempt.restore()
    trainer.writer.close()
    trainer.data.close()
    return {"draws": draws, "losses": losses, "lrs": lrs, "logged": logged,
            "T": diffusion.num_timesteps, "accumulation": trainer.sizes.accumulation}


def test_importance_weights_and_lr_schedule_past_warm_up(tmp_path, digits_shards):
    from iddpm_ds.spec.job import load_job
    from iddpm_ds.train.engine import lr_factor

    job = tiny_job(tmp_path, digits_shards, **{
        "diffusion.diffusion_steps": 10, "train.sample_respacing": "ddim5",
        "train.eval_respacing": "5", "train.microbatch": 4, "train.warmup_steps": 3,
        "train.lr_anneal_steps": 20, "train.max_steps": STEPS, "data.num_workers": 0,
        "train.schedule_sampler": {"name": "loss-second-moment", "history_per_term": 2}})
    out = run_ranks(_train, 1, str(job))[0]
    T = out["T"]
    assert out["accumulation"] == 2 and len(out["draws"]) == 2 * STEPS
    reweighted = 0
    for t, weights, p in out["draws"]:
        # 1/(T p_t): the reference's importance weight of each drawn t
        assert torch.allclose(weights.double(), 1.0 / (T * p[t]), rtol=1e-6)
        reweighted += int((weights - 1).abs().gt(1e-3).any())
    assert reweighted >= 4, "the sampler never left warm-up: the test proves nothing"
    # the logged loss_weighted is the mean of loss * weight over every micro-batch
    loss = torch.cat(out["losses"]).double()
    weights = torch.cat([w for _, w, _ in out["draws"]]).double()
    assert math.isclose(out["logged"]["loss"], float(loss.mean()), rel_tol=1e-6)
    assert math.isclose(out["logged"]["loss_weighted"], float((loss * weights).mean()),
                        rel_tol=1e-6)
    assert abs(out["logged"]["loss_weighted"] - out["logged"]["loss"]) > 1e-6
    # lr after step k (the one step k+1 uses) = lr * lr_factor(k)
    spec = load_job(job).train
    factor = lr_factor(spec)
    want = [spec.lr * factor(k) for k in range(1, STEPS + 1)]
    assert all(math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12) for a, b in zip(out["lrs"], want)), \
        (out["lrs"], want)
    assert out["lrs"][-1] < out["lrs"][3]  # annealed, past warm-up
