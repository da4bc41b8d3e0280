"""The training step's math beyond warm-up, on a real DeepSpeed engine in one real process:
loss-aware importance weights in backward equal 1/(T p_t) of the sampler's p, the logged
loss_weighted is loss * weight, the lr after every step follows lr_factor, micro-batch
accumulation equals the full-batch step, and grad_clip bounds the gradient AdamW steps with."""
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


def _fixed_steps(rank: int, world_size: int, job_path: str, micro: int) -> dict:
    """3 optimizer steps of 8 images on fixed data, t and noise, split into micro-batches
    of `micro`: only the engine's accumulation differs between two such runs."""
    from iddpm_ds.spec.job import load_job
    from iddpm_ds.train.engine import grad_norm
    from iddpm_ds.train.trainer import Trainer

    trainer = Trainer(load_job(job_path))
    start = {k: v.clone() for k, v in trainer.master.full_state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    steps = [(torch.rand(8, 3, 16, 16, generator=gen) * 2 - 1, torch.randint(10, (8,), generator=gen),
              torch.randint(100, (8,), generator=gen), torch.randn(8, 3, 16, 16, generator=gen))
             for _ in range(3)]
    split = lambda a: list(a.split(micro))  # noqa: E731
    batches = [(x, {"y": y}) for x_s, y_s, _, _ in steps for x, y in zip(split(x_s), split(y_s))]
    ts = [t for _, _, t_s, _ in steps for t in split(t_s)]
    noises = [n for _, _, _, n_s in steps for n in split(n_s)]
    trainer._batches = iter(batches)
    trainer.timestep_sampler.sample = lambda n: (ts.pop(0), torch.ones(n))
    training_losses = trainer.diffusion.training_losses
    trainer.diffusion.training_losses = lambda *a, **k: training_losses(*a, noise=noises.pop(0), **k)
    norms = []
    for _ in steps:
        trainer.train_step()
        trainer.guard.poll()
        norm = trainer.guard.grad_norm if trainer.guard.direct else grad_norm(trainer.engine)
        norms.append(float(norm))
    params = {k: v.clone() for k, v in trainer.master.full_state_dict().items()}
    trainer.preempt.restore()
    trainer.writer.close()
    trainer.data.close()
    update = torch.cat([(params[k] - start[k]).flatten() for k in sorted(params)])
    return {"norms": norms, "update": update, "accumulation": trainer.sizes.accumulation}


def test_micro_batch_accumulation_equals_the_full_batch_step(tmp_path, digits_shards):
    """DeepSpeed averages micro-batch gradients (docs/training.md): the accumulated
    gradient is the full batch's mean-loss gradient, so norms and weights match."""
    runs = {}
    for micro in (8, 4):
        job = tiny_job(tmp_path / f"m{micro}", digits_shards, **{
            "train.microbatch": micro, "train.schedule_sampler": "uniform", "train.max_steps": 3,
            "data.num_workers": 0, "deepspeed.zero_stage": 0})
        runs[micro] = run_ranks(_fixed_steps, 1, str(job), micro)[0]
    full, accumulated = runs[8], runs[4]
    assert full["accumulation"] == 1 and accumulated["accumulation"] == 2
    for a, b in zip(full["norms"], accumulated["norms"]):
        assert a > 0 and math.isclose(a, b, rel_tol=1e-4), (full["norms"], accumulated["norms"])
    # Adam divides by sqrt(v): where a gradient is ~0, float rounding of the two summation
    # orders moves single weights by up to lr, so the whole update is compared
    diff = (full["update"] - accumulated["update"]).norm() / full["update"].norm()
    assert full["update"].norm() > 0 and diff < 1e-2, float(diff)


def _clipped_norms(rank: int, world_size: int, job_path: str) -> list[tuple[float, float]]:
    """(norm before clipping, norm the optimizer steps with) for 3 steps, ZeRO-0 fp32."""
    from iddpm_ds.spec.job import load_job
    from iddpm_ds.train.trainer import Trainer

    trainer = Trainer(load_job(job_path))
    trainer._batches = iter(trainer.data)
    optimizer, seen = trainer.engine.optimizer, []
    step = optimizer.step

    def spy_step(*args, **kwargs):  # observes the gradients DeepSpeed hands to AdamW
        grads = [p.grad for group in optimizer.param_groups for p in group["params"]
                 if p.grad is not None]
        seen.append(float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))))
        return step(*args, **kwargs)

    optimizer.step = spy_step
    before = []
    for _ in range(3):
        trainer.train_step()
        before.append(float(trainer.guard.grad_norm))
    trainer.preempt.restore()
    trainer.writer.close()
    trainer.data.close()
    return list(zip(before, seen))


def test_grad_clip_bounds_the_norm_the_optimizer_sees(tmp_path, digits_shards):
    job = tiny_job(tmp_path, digits_shards, **{
        "train.grad_clip": 0.05, "train.max_steps": 3, "data.num_workers": 0,
        "deepspeed.zero_stage": 0, "train.schedule_sampler": "uniform"})
    pairs = run_ranks(_clipped_norms, 1, str(job))[0]
    assert len(pairs) == 3
    for before, stepped in pairs:
        assert before > 0.05, pairs                       # the clip is active ...
        assert math.isclose(stepped, 0.05, rel_tol=1e-3), pairs   # ... and applied
