"""The training step's math beyond warm-up, on a real DeepSpeed engine in one real process:
the gradient DeepSpeed's optimizer steps with is sum_i w_i grad(loss_i) / N for the
sampler's importance weights w (hand-computed from per-sample gradients), the weights are
1/(T p_t) of the sampler's p, the logged loss_weighted is loss * weight, the lr each step
applies is the reference's warm-up-then-linear-anneal written out as numbers, bf16-mixed
autocasts the UNet's torso (not its fp32 regions) inside the engine's own forward,
micro-batch accumulation equals the full-batch step, and grad_clip bounds the gradient
AdamW steps with."""
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
    optimizer, applied = trainer.engine.basic_optimizer, []
    step = optimizer.step

    def spy_step(*args, **kwargs):  # the lr the torch AdamW update is about to use
        applied.append(optimizer.param_groups[0]["lr"])
        return step(*args, **kwargs)

    optimizer.step = spy_step
    for _ in range(STEPS):
        trainer.train_step()
    lrs = {"applied": applied, "reported": trainer.engine.get_lr()[0]}
    logged = trainer.losses.reduce()
    trainer.preempt.restore()
    trainer.writer.close()
    trainer.data.close()
    return {"draws": draws, "losses": losses, "lrs": lrs, "logged": logged,
            "T": diffusion.num_timesteps, "accumulation": trainer.sizes.accumulation}


def test_importance_weights_and_lr_schedule_past_warm_up(tmp_path, digits_shards):
    job = tiny_job(tmp_path, digits_shards, **{
        "diffusion.diffusion_steps": 10, "train.sample_respacing": "ddim5",
        "train.eval_respacing": "5", "train.microbatch": 4, "train.warmup_steps": 3,
        "train.lr": 2e-3, "train.lr_anneal_steps": 20, "train.max_steps": STEPS, "data.num_workers": 0,
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
    # The lr optimizer step k (0-based) applies, written out: linear warm-up over 3 steps,
    # times the reference's anneal 1 - k / lr_anneal_steps (k / 20 here), lr 2e-3.
    want = [2e-3 * (1 / 3) * (20 / 20), 2e-3 * (2 / 3) * (19 / 20), 2e-3 * 18 / 20,
            1.7e-3, 1.6e-3, 1.5e-3, 1.4e-3, 1.3e-3, 1.2e-3, 1.1e-3, 1.0e-3, 9e-4, 8e-4, 7e-4]
    got = out["lrs"]["applied"]
    assert len(got) == STEPS and all(math.isclose(a, b, rel_tol=1e-9) for a, b in zip(got, want)), \
        (got, want)
    # the lr logged after the last step is the next step's: 2e-3 * (1 - 14 / 20)
    assert math.isclose(out["lrs"]["reported"], 6e-4, rel_tol=1e-9), out["lrs"]["reported"]


N = 4
WEIGHTS = (0.25, 3.0, 1.0, 0.5)  # non-uniform importance weights of the 4 samples


def _weighted_gradients(rank: int, world_size: int, job_path: str) -> list[dict]:
    """Two optimizer steps on one fixed batch (fixed x_start, y, t, noise), the first with
    unit weights, the second with WEIGHTS. Per step: the gradient DeepSpeed hands to AdamW,
    and the hand computation sum_i w_i grad(loss_i) / N from N separate one-sample
    backward passes through a plain copy of the model with the engine's current weights."""
    from iddpm_ds.models import build_model
    from iddpm_ds.spec.job import load_job
    from iddpm_ds.train.trainer import Trainer

    job = load_job(job_path)
    trainer = Trainer(job)
    gen = torch.Generator().manual_seed(0)
    x_start = torch.rand(N, 3, 16, 16, generator=gen) * 2 - 1                 # [N, C, H, W]
    y = torch.randint(10, (N,), generator=gen)                               # [N]
    t = torch.tensor([2, 31, 64, 97])                                        # [N]
    noise = torch.randn(N, 3, 16, 16, generator=gen)                         # [N, C, H, W]
    cases = [torch.ones(N), torch.tensor(WEIGHTS)]
    queue = list(cases)
    trainer._batches = iter([(x_start, {"y": y})] * len(cases))
    trainer.timestep_sampler.sample = lambda n: (t, queue.pop(0))  # the drawn (t, weights)
    training_losses = trainer.diffusion.training_losses
    trainer.diffusion.training_losses = lambda *a, **k: training_losses(*a, noise=noise, **k)
    optimizer, names = trainer.engine.basic_optimizer, [n for n, _ in trainer.engine.module.named_parameters()]
    step, seen = optimizer.step, []

    def spy_step(*args, **kwargs):  # observes the gradients DeepSpeed hands to AdamW
        seen.append(torch.cat([p.grad.flatten() for _, p in trainer.engine.module.named_parameters()]))
        return step(*args, **kwargs)

    optimizer.step = spy_step
    out = []
    for weights in cases:
        model = build_model(job.model)
        model.load_state_dict(trainer.engine.module.state_dict())
        params = dict(model.named_parameters())
        expected = torch.zeros_like(torch.cat([p.flatten() for p in params.values()]), dtype=torch.float64)
        for i in range(N):  # grad(loss_i), one sample at a time
            loss_i = training_losses(model, x_start[i:i + 1], t[i:i + 1], model_kwargs={"y": y[i:i + 1]},
                                     noise=noise[i:i + 1])["loss"].sum()
            grads = torch.autograd.grad(loss_i, [params[n] for n in names])
            expected += float(weights[i]) * torch.cat([g.flatten() for g in grads]).double() / N
        trainer.train_step()
        out.append({"expected": expected, "got": seen[-1].double()})
    trainer.preempt.restore()
    trainer.writer.close()
    trainer.data.close()
    return out


def test_importance_weights_scale_each_sample_gradient(tmp_path, digits_shards):
    """The optimizer steps with sum_i w_i grad(loss_i) / N: with unit weights the plain
    mean gradient, with WEIGHTS the weighted one (ZeRO-0 fp32, no clipping, 1 micro-batch)."""
    job = tiny_job(tmp_path, digits_shards, **{
        "train.schedule_sampler": "uniform", "train.max_steps": 2, "train.grad_clip": 0.0,
        "data.num_workers": 0, "deepspeed.zero_stage": 0, "train.batch_size": N})
    unit, weighted = run_ranks(_weighted_gradients, 1, str(job))[0]
    for case in (unit, weighted):
        err = (case["got"] - case["expected"]).norm() / case["expected"].norm()
        assert case["expected"].norm() > 0 and err < 1e-4, float(err)
    # the weights matter: without them the second step would have the plain mean gradient
    unweighted_err = (weighted["got"] - unit["expected"]).norm() / unit["expected"].norm()
    assert unweighted_err > 0.05, float(unweighted_err)


def _autocast_dtypes(rank: int, world_size: int, job_path: str) -> dict:
    """The dtype each convolution, linear layer and GroupNorm of engine.module computes in
    during one engine(...) forward, observed below autocast (a TorchDispatchMode sees the
    aten op with the inputs autocast handed it), and the parameters' dtypes."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from iddpm_ds.spec.job import load_job
    from iddpm_ds.train.engine import build_engine

    class Recorder(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.current: str | None = None
            self.ops: list[tuple[str, str, set]] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            op = func.overloadpacket.__name__
            if self.current and op in ("convolution", "native_group_norm", "addmm", "mm"):
                dtypes = {a.dtype for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()}
                self.ops.append((self.current, op, dtypes))  # input, weight, bias
            return func(*args, **(kwargs or {}))

    engine = build_engine(load_job(job_path)).engine
    recorder = Recorder()
    kinds = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Linear, torch.nn.GroupNorm)
    for name, module in engine.module.named_modules():
        if isinstance(module, kinds):
            module.register_forward_pre_hook(lambda m, a, name=name: setattr(recorder, "current", name))
            module.register_forward_hook(lambda m, a, o: setattr(recorder, "current", None))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 16, 16, generator=gen)                             # [N, C, H, W] fp32
    with recorder:
        out = engine(x, torch.tensor([3, 70]), y=torch.tensor([1, 8]))
    return {"ops": recorder.ops, "out": out.dtype,
            "params": {p.dtype for p in engine.module.parameters()}}


def test_bf16_mixed_autocasts_the_torso_inside_the_engine_forward(tmp_path):
    """precision bf16-mixed: fp32 weights; DeepSpeed's forward autocasts, so the torso's
    convolutions (attention's 1-d ones included) compute in bf16, while the UNet's fp32
    regions (unet.py: every GroupNorm, the time-embedding MLP, the per-block embedding
    projections and the output head) compute in fp32."""
    job = tiny_job(tmp_path, tmp_path / "no-shards-needed", **{
        "precision": "bf16-mixed", "deepspeed.zero_stage": 0})
    got = run_ranks(_autocast_dtypes, 1, str(job))[0]
    assert got["params"] == {torch.float32} and got["out"] == torch.float32
    fp32_region = lambda name: (name.startswith(("time_embed.", "out.")) or ".emb_layers." in name)  # noqa: E731
    torso, fp32 = set(), set()
    for name, op, dtype in got["ops"]:
        if op == "native_group_norm" or fp32_region(name):
            assert dtype == {torch.float32}, (name, op, dtype)
            fp32.add(name)
        else:
            assert op == "convolution" and dtype == {torch.bfloat16}, (name, op, dtype)
            torso.add(name)
    # the test saw what it claims: torso convolutions, attention, and each fp32 region
    assert "input_blocks.0.0" in torso and any(".qkv" in n for n in torso) and len(torso) > 10, torso
    assert {"time_embed.0", "time_embed.2", "out.0", "out.2"} <= fp32, fp32
    assert any(".emb_layers." in n for n in fp32) and any(".in_layers.0" in n for n in fp32), fp32


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
