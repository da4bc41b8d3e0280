"""The training service's loop: one IDDPM optimizer step at a time on a DeepSpeed engine.

A step reads top to bottom: batch, timesteps, losses, sampler update, backward, step,
EMA, metrics. Everything read back from the device waits for a log interval.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from .. import placement
from ..dist import env, group, output
from ..data import build_eval_stream, build_train_stream
from ..diffusion import build_diffusion
from ..diffusion.timestep_sampler import build_schedule_sampler
from ..spec.job import JobSpec, dump_job
from ..superres import with_low_res
from .checkpointer import CheckpointManager
from .ds_config import render_ds_config, resolve_batch
from .ema import EMA
from .engine import EngineModel, build_engine, grad_norm
from .guard import DIVERGED_EXIT, DivergenceGuard, Diverged, all_finite
from .loss_scale import LossScale
from .master import MasterWeights
from .flops import train_flops_per_image
from .metrics import LossAccumulator, MetricsWriter, utilisation
from .periodic import evaluate_during_training, write_sample_grid
from .preempt import PREEMPTED_EXIT, PreemptionWatch
from .registry import Policy, StateRegistry
from .states import EMAState, EngineState, ProcessRNG, SamplerRNG, TrainCounters

class Trainer:
    """Builds every component from its spec slice, resumes if it can, and trains."""

    def __init__(self, job: JobSpec) -> None:
        self.job = job
        # first: a preemption signal during start-up then ends in a checkpoint at step 1
        # instead of the default action (death without a save)
        self.preempt = PreemptionWatch(job.train.preempt_check_interval)
        self.run_dir = Path(job.output.run_dir)
        sizes = resolve_batch(job.train, env.world_size())
        # config errors before any work
        render_ds_config(job, env.world_size(), placement.has_gpu(), placement.fp16_capable())
        self.data = build_train_stream(  # missing/corrupt data fails here, before any write
            job.data, image_size=job.model.image_size, class_cond=job.model.class_cond,
            batch_size=sizes.micro, rank=env.rank(), world_size=env.world_size(), seed=job.train.seed,
            num_classes=job.model.num_classes)
        if job.train.eval_interval:  # a bad held-out source fails now, not hours in
            build_eval_stream(job.data, image_size=job.model.image_size, class_cond=job.model.class_cond,
                              batch_size=sizes.micro, rank=env.rank(), world_size=env.world_size(),
                              num_samples=job.train.eval_samples, num_classes=job.model.num_classes)
        bundle = build_engine(job)
        self.engine, self.sizes, self.dtype = bundle.engine, bundle.sizes, bundle.dtype
        self.model_fn = EngineModel(self.engine)
        self.diffusion = build_diffusion(job.diffusion)
        self.master = MasterWeights(self.engine)
        self.ema = EMA(self.master, job.train.ema_rate)
        self.device = placement.device()
        self.flops_per_image = train_flops_per_image(job)  # for the logged MFU; before the seed
        torch.manual_seed(job.train.seed * 100_003 + env.rank())  # per-rank noise and dropout
        self.timestep_sampler = build_schedule_sampler(
            job.train.schedule_sampler, self.diffusion.num_timesteps, device=self.device,
            seed=job.train.seed, rank=env.rank(), max_local_batch=self.sizes.micro)
        self.losses = LossAccumulator(self.diffusion.num_timesteps, self.device)
        self.guard = DivergenceGuard(self.engine, job.train.max_nonfinite_steps, self.device)
        self.loss_scale = LossScale(self.engine)
        self.counters = TrainCounters()
        self.checkpoints = CheckpointManager(self._register_state(), job, self.sizes,
                                             before_save=self._refuse_unsafe_save)
        restored = self.checkpoints.load()
        self.resumed_from = restored.tag if restored else None
        self._write_job_file()  # after load: a refused restart must not touch the run's job.yaml
        self.writer = MetricsWriter(self.run_dir, job.output.tensorboard, job.train.total_steps)
        self._reset_timers()

    def _register_state(self) -> StateRegistry:
        """Everything a checkpoint holds. New checkpointed state: one `register` line here
        (see registry.py for the policies; entries load in this order)."""
        seed, registry = self.job.train.seed, StateRegistry()
        registry.register("engine", EngineState(self.engine, self.master), Policy.SHARDED)
        registry.register("loss_scale", self.loss_scale, Policy.REPLICATED)  # after the engine
        registry.register("ema", EMAState(self.ema), Policy.SHARDED)
        registry.register("counters", self.counters, Policy.REPLICATED)
        registry.register("timestep_sampler", self.timestep_sampler, Policy.REPLICATED)
        registry.register("divergence_guard", self.guard, Policy.REPLICATED)
        registry.register("data", self.data, Policy.PER_RANK)
        registry.register("rng", ProcessRNG(self.counters, seed), Policy.PER_RANK)
        registry.register("timestep_sampler_rng",
                          SamplerRNG(self.timestep_sampler, self.counters, seed), Policy.PER_RANK)
        return registry

    @property
    def step(self) -> int:
        return self.counters.step

    @step.setter
    def step(self, value: int) -> None:
        self.counters.step = value

    def _write_job_file(self) -> None:
        if env.is_main():
            (self.run_dir / "job.yaml").write_text(dump_job(self.job))
        group.barrier()

    # ----------------------------------------------------------------------- the loop
    def run(self) -> int:
        """Train until train.total_steps (or forever); returns the process exit status."""
        total = self.job.train.total_steps
        output.log0("train_start", step=self.step, total_steps=total, world_size=env.world_size(),
                  per_rank_batch=self.sizes.per_rank, micro=self.sizes.micro,
                  accumulation=self.sizes.accumulation, global_batch=self.sizes.global_batch,
                  zero_stage=self.job.deepspeed.zero_stage, precision=self.job.precision,
                  **env.slurm_facts())
        self._batches = iter(self.data)
        try:
            while total is None or self.step < total:
                self.train_step()
                if self.step % self.job.train.log_interval == 0:
                    self.log_metrics()
                # before a grid or an eval, which can take minutes: a preemption's notice
                # (Slurm's --signal lead time, KillWait after scancel) is for the checkpoint
                if self.preempt.should_stop(self.step, now=self._grid_or_eval_due()):
                    output.log0("preempted", step=self.step)
                    self.checkpoints.save(self.step, last=True)
                    return PREEMPTED_EXIT
                self._after_step()
            self.checkpoints.save(self.step, last=True)
            output.log0("train_done", step=self.step)
            return 0
        except Diverged as err:  # every rank gets here at the same step: the verdicts are global
            latest = self.checkpoints.latest
            where = f"latest checkpoint: {latest}" if latest else "no checkpoint"
            output.error0(f"{err}; stopped at step {self.step}, nothing saved ({where})")
            return DIVERGED_EXIT
        finally:
            self.preempt.restore()
            self.writer.close()
            self.data.close()

    def train_step(self) -> None:
        """One optimizer step: `accumulation` micro-batches, then DeepSpeed steps. A step
        with a non-finite loss or gradient norm is skipped on the device (guard.py)."""
        self.guard.begin_step()
        self.timestep_sampler.begin_step()
        for micro in range(self.sizes.accumulation):
            x_start, model_kwargs = self._next_batch()                       # [n, C, H, W]
            t, weights = self.timestep_sampler.sample(x_start.shape[0])      # [n], [n]
            losses = self.diffusion.training_losses(self.model_fn, x_start, t,
                                                    model_kwargs=model_kwargs)
            self.timestep_sampler.update_with_local_losses(t, losses["loss"].detach())  # one collective
            loss = self.guard.poison((losses["loss"] * weights).mean())
            self.engine.backward(self.loss_scale.scale_loss(loss))  # DeepSpeed: / accumulation
            if micro == self.sizes.accumulation - 1:
                self.guard.measure_grads()             # ZeRO-0 fp32: norm before clipping
                scale = self.loss_scale.value          # fp16: the scale this step ran at
            self.engine.step()                         # optimizer only at the boundary
            self.losses.accumulate(t, losses, weights)
        self.loss_scale.after_step(scale)              # fp16: overflow skip, or the floor
        applied = self.guard.end_step()                # device bool: no host sync
        self.timestep_sampler.end_step(applied)
        self.ema.update(applied)
        self.step += 1
        self._steps_in_interval += 1

    def _next_batch(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        start = time.perf_counter()
        batch, cond = next(self._batches)
        self._data_wait += time.perf_counter() - start
        x_start = batch.to(self.device, non_blocking=True)
        model_kwargs = {k: v.to(self.device, non_blocking=True) for k, v in cond.items()}
        return x_start, with_low_res(self.job.model, x_start, model_kwargs)  # SR: + low_res

    def _grid_or_eval_due(self) -> bool:
        train = self.job.train
        return any(every and self.step % every == 0 for every in (train.sample_interval, train.eval_interval))

    def _after_step(self) -> None:
        train, step = self.job.train, self.step
        start = time.perf_counter()  # grids, evals and saves do not count as step time
        if self._grid_or_eval_due():
            self.sample_grid()
        if train.eval_interval and step % train.eval_interval == 0:
            self.evaluate()
        self.checkpoints.save(step)  # if its step or time interval is due
        self._paused += time.perf_counter() - start

    # ------------------------------------------------------------- at intervals only
    def log_metrics(self) -> None:
        """Read the interval's metrics from the device (collective; all ranks)."""
        record: dict[str, Any] = self.losses.reduce()
        elapsed = time.perf_counter() - self._interval_start - self._paused
        steps = max(1, self._steps_in_interval)
        self.guard.poll()
        norm = self.guard.grad_norm if self.guard.direct else grad_norm(self.engine)
        record.update({
            "grad_norm": _norm_value(norm),
            "lr": self.engine.get_lr()[0],
            "samples": self.step * self.sizes.global_batch,
            "img_per_s": steps * self.sizes.global_batch / elapsed,
            "step_time_s": elapsed / steps,
            "data_wait_s": self._data_wait / steps,
            "compute_s": (elapsed - self._data_wait) / steps,
            "data_wait_frac": self._data_wait / elapsed,
        })
        record.update(utilisation(self.flops_per_image, record["img_per_s"], self.device, self.job.precision))
        record.update(self.loss_scale.metrics())
        record.update({f"sampler_{k}": float(v) for k, v in self.timestep_sampler.metrics().items()})
        record.update({f"data_{k}": v for k, v in self.data.stats().items()
                       if isinstance(v, (int, float))})
        record.update(self.guard.metrics())
        if record["nonfinite_steps"]:
            output.log0("nonfinite_steps_skipped", step=self.step, count=record["nonfinite_steps"],
                      streak=record["nonfinite_streak"], total=record["nonfinite_steps_total"])
        self.writer.write(self.step, record)
        self._reset_timers()
        self.guard.check()

    def _reset_timers(self) -> None:
        self._interval_start = time.perf_counter()
        self._paused = 0.0
        self._data_wait = 0.0
        self._steps_in_interval = 0

    def sample_grid(self) -> None:
        write_sample_grid(self.job, self.ema, self.ema.rates[0], self.step, self.run_dir,
                          self.writer, self.device)

    def evaluate(self) -> None:
        evaluate_during_training(self.job, self.ema, self.master, self.step, self.writer,
                                 self.device, self.sizes.micro)

    def _refuse_unsafe_save(self) -> None:
        """Before every checkpoint (all ranks): refused, ending the run, once the guard has
        tripped or if any weight is non-finite: `latest` only ever names finite checkpoints."""
        self.guard.poll()
        self.guard.check()
        if not all_finite(self.master.local() + [t for ema in self.ema.params for t in ema]):
            raise Diverged("training diverged: non-finite fp32 master or EMA weights")


def _norm_value(norm: Any) -> float | None:
    """A gradient norm for the log: DeepSpeed reports a non-finite one as -1 (made NaN)."""
    if norm is None:
        return None
    value = float(norm)
    return value if value >= 0 else float("nan")
