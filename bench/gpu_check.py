#!/usr/bin/env python
"""The GPU check (run it through bench/gpu_check.sh): what only a GPU can prove, in one
Markdown table, ready to paste into docs/benchmarks.md. Every row runs the service's own
code (Trainer, its DeepSpeed engine, the data reader) and reports its peak GPU memory.

Rows: fp16 dynamic loss scaling with a forced gradient overflow (step skipped, scale
halves, weights and EMA unchanged, not counted as divergence, the next step applies);
bf16; ZeRO-2 and ZeRO-3 on one device; NCCL initialisation and an all-reduce; img/s, MFU
and peak memory of the paper's ImageNet-64 job (launch/jobs/paper/imagenet64_hybrid_cosine.yaml)
at the largest per-GPU batch that fits (at most MAX_BATCH; an out-of-memory error frees the
failed engine and retries at 3/4 of the batch); the timestep sampler's no-host-sync test.

Time: each row has a budget (Row.budget_s); a row over it fails and the next one runs, so
the whole check ends within TOTAL_BUDGET_S on one H100 or H200. Exit status 1 if a row fails.

--dry-run runs the same functions on CPU at tiny sizes: the CPU accelerator and gloo, fp16
through the CPU fp16 test seam (env.CPU_FP16_SEAM, set by the dry run only), one injected
out-of-memory error for the retry path; it skips, with the reason, only what needs a GPU
(NCCL, CUDA sync detection) and has no allocator to read peak memory from.
"""
from __future__ import annotations

import argparse
import gc
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

if "--dry-run" in sys.argv:  # before torch is imported: a dry run never touches a GPU
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    os.environ["DS_ACCELERATOR"] = "cpu"  # the engine refuses an accelerator unlike placement.device()

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
PAPER_JOB = ROOT / "launch/jobs/paper/imagenet64_hybrid_cosine.yaml"
MAX_BATCH = 512        # the ImageNet-64 row's batch search stops here (MFU is flat beyond)
TOTAL_BUDGET_S = 480   # the rows' budgets plus start-up (imports, process group, shards)


class Skip(Exception):
    """A row that cannot run on this machine; the message says why."""


class OverBudget(BaseException):
    """A row ran past its time budget. BaseException: no `except Exception` swallows it."""


@dataclass
class Context:
    """What the rows share. The dry run differs in sizes only, never in the functions run."""
    gpu: bool
    tmp: Path
    shards16: Path
    shards64: Path
    warmup: int                  # service steps before timing
    steps: int                   # service steps timed
    probe_batches: tuple[int, int]  # the memory probe's two batch sizes (ImageNet-64 row)
    cpu_batch: int               # the dry run's batch: a CPU has no allocator to fit against
    paper_sets: list[str]        # --set overrides of the paper job
    matmul_reps: int             # for a measured peak (a GPU missing from DENSE_BF16_PEAK, CPU)
    budgets: bool                # enforce Row.budget_s (GPU runs; a CPU dry run is not timed)
    inject_oom: int = 0          # out-of-memory errors for the timed runs (dry run: the retry)
    alive: dict[str, weakref.ref] = field(default_factory=dict)  # the last service's objects


@dataclass
class Result:
    detail: str
    img_s: float | None = None
    mfu: float | None = None
    peak_bytes: int | None = None  # the row's own figure where the row knows better


@dataclass
class Row:
    name: str
    check: Callable[[Context], Result]
    budget_s: float
    in_process: bool = True  # False: the work runs in a child process, whose memory we cannot read


@dataclass
class Outcome:
    row: Row
    status: str
    detail: str
    seconds: float
    peak_bytes: int | None
    img_s: float | None = None
    mfu: float | None = None


# ------------------------------------------------------------------------- helpers


def write_shards(folder: Path, size: int, count: int) -> Path:
    """Random images as pre-sized raw shards (no decode cost, no scikit-learn), labels 0..9."""
    from iddpm_ds.data.shards import WriteOptions, array_items, write_items

    if not (folder / "index.json").is_file():
        rng = np.random.default_rng(0)
        images = rng.integers(0, 256, (count, size, size, 3), dtype=np.uint8)
        write_items(array_items(images, np.arange(count) % 10), folder,
                    WriteOptions(image_size=size, raw=True, progress=False), "check")
    return folder


def tiny_job(shards: Path, run_dir: Path, **fields: Any):
    """A ~0.3M-parameter 16 px job, one step per call, nothing written between steps."""
    from iddpm_ds.spec.job import JobSpec

    job = {
        "model": {"image_size": 16, "num_channels": 32, "num_res_blocks": 1, "channel_mult": [1, 2],
                  "attention_resolutions": "8", "learn_sigma": True},
        "diffusion": {"diffusion_steps": 100, "noise_schedule": "cosine"},
        "data": {"shards": f"{shards}/index.json#train", "num_workers": 1, "shuffle_buffer": 64},
        "train": {"batch_size": 8, "lr": 1e-3, "log_interval": 10**9, "save_interval": 10**9,
                  "ema_rate": "0.9"},
        "precision": "fp32", "deepspeed": {"zero_stage": 0},
        "output": {"run_dir": str(run_dir), "tensorboard": False},
    }
    for dotted, value in fields.items():
        section, _, key = dotted.partition(".")
        if key:
            job[section] = {**job[section], key: value}
        else:
            job[section] = value
    return JobSpec.model_validate(job)


@contextmanager
def service(job, ctx: Context) -> Iterator[Any]:
    """The service's Trainer for `job`, ready to step; closed and its engine destroyed on
    exit. ctx.alive keeps weak references, to prove a failed one is freed."""
    from iddpm_ds.train.trainer import Trainer

    trainer = Trainer(job)
    trainer._batches = iter(trainer.data)
    ctx.alive = {"trainer": weakref.ref(trainer), "engine": weakref.ref(trainer.engine)}
    try:
        yield trainer
    finally:
        close(trainer)


def close(trainer) -> None:
    """Stop the trainer's workers and handlers, and tear its engine down. engine.destroy()
    removes the gradient hooks DeepSpeed registered (held from C++, so the cycle collector
    never frees them) and its module/parameter registries: without it no engine is ever
    freed (measured on DeepSpeed 0.19.8; with it ZeRO 0-2 engines are, ZeRO-3 ones not)."""
    trainer.data.close()
    trainer.preempt.restore()
    trainer.writer.close()
    trainer.engine.destroy()


def free_memory(ctx: Context) -> None:
    gc.collect()
    if ctx.gpu:
        torch.cuda.empty_cache()


def reset_peak(ctx: Context) -> None:
    if ctx.gpu:
        torch.cuda.reset_peak_memory_stats()


def peak_bytes(ctx: Context) -> int | None:
    """Peak bytes the caching allocator handed out since reset_peak (None: CPU, none kept)."""
    return torch.cuda.max_memory_allocated() if ctx.gpu else None


def weights(trainer) -> torch.Tensor:
    """The fp32 master weights of this rank, flattened (a copy)."""
    return torch.cat([p.detach().float().flatten() for p in trainer.master.local()]).clone()


def ema_weights(trainer) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in trainer.ema.params[0]]).clone()


def train_steps(trainer, n: int) -> float:
    """n service steps; returns the last interval's mean loss (a host read, once)."""
    for _ in range(n):
        trainer.train_step()
    loss = trainer.losses.reduce()["loss"]
    if not math.isfinite(loss):
        raise AssertionError(f"loss is {loss}")
    return loss


# ---------------------------------------------------------------------------- rows


def check_fp16_overflow(ctx: Context) -> Result:
    """Force a gradient overflow with a finite loss (the loss scale raised to 2^40): the
    step is skipped, the scale halves, weights and EMA stay, the divergence guard does not
    count it, and at the scale that applied before, the next step applies again."""
    details = []
    for stage in (0, 2):
        job = tiny_job(ctx.shards16, ctx.tmp / f"fp16_{stage}", precision="fp16",
                       **{"deepspeed.zero_stage": stage})
        with service(job, ctx) as trainer:
            tries = step_until_applied(trainer)  # from 2^20 the first steps may overflow by design
            scaler = trainer.loss_scale
            clean, before, ema_before = scaler.state_dict(), weights(trainer), ema_weights(trainer)
            skips = scaler.overflow_skips_total
            scaler.load_state_dict({**clean, "cur_scale": 2.0**40})
            trainer.train_step()
            assert scaler.value == 2.0**39, f"loss scale 2^40 -> {scaler.value}, expected 2^39"
            assert scaler.overflow_skips_total == skips + 1, "the overflow was not counted as a skip"
            assert not bool(trainer.guard.applied), "the overflow step was applied"
            assert torch.equal(weights(trainer), before), "weights changed on the skipped step"
            assert torch.equal(ema_weights(trainer), ema_before), "EMA changed on the skipped step"
            trainer.guard.poll()
            assert trainer.guard.streak == 0, "the overflow skip counted as divergence"
            scaler.load_state_dict(clean)  # the scale that applied: another batch applies too
            again = step_until_applied(trainer, limit=3)
            assert not torch.equal(weights(trainer), before), "weights did not move after the overflow"
            details.append(f"ZeRO-{stage}: first step applied at try {tries}, forced 2^40 -> 2^39, "
                           f"applied again at try {again}")
    return Result("overflow skipped, weights + EMA kept, not divergence; " + "; ".join(details))


def step_until_applied(trainer, limit: int = 30) -> int:
    for tries in range(1, limit + 1):
        trainer.train_step()
        if bool(trainer.guard.applied):
            return tries
    raise AssertionError(f"no fp16 step applied in {limit} tries")


def check_precision_and_zero(ctx: Context, precision: str, stage: int) -> Result:
    """A few service steps: finite loss, weights move, EMA follows."""
    job = tiny_job(ctx.shards16, ctx.tmp / f"{precision}_{stage}", precision=precision,
                   **{"deepspeed.zero_stage": stage})
    with service(job, ctx) as trainer:
        before = weights(trainer)
        first = train_steps(trainer, 1)
        last = train_steps(trainer, 4)
        assert not torch.equal(weights(trainer), before), "weights did not move"
        dtypes = sorted({str(p.dtype).replace("torch.", "") for p in trainer.engine.module.parameters()})
        optimizer = type(trainer.engine.optimizer).__name__
    return Result(f"loss {first:.3f} -> {last:.3f}, module weights {'/'.join(dtypes)}, "
                  f"optimizer {optimizer}, fp32 masters + EMA")


def check_nccl(ctx: Context) -> Result:
    """The process group the service initialised (group.init): its backend and a collective."""
    import torch.distributed as torch_dist

    backend, world = torch_dist.get_backend(), torch_dist.get_world_size()
    value = torch.full((4,), 3.0, device="cuda" if ctx.gpu else "cpu")
    torch_dist.all_reduce(value)
    assert value.tolist() == [3.0 * world] * 4, value
    if not ctx.gpu:
        raise Skip(f"NCCL needs a GPU (this run initialised {backend}; its all_reduce works)")
    assert backend == "nccl", f"backend is {backend}"
    version = ".".join(str(v) for v in torch.cuda.nccl.version())
    return Result(f"backend nccl {version}, world size {world}, all_reduce ok")


def check_paper_throughput(ctx: Context) -> Result:
    """ImageNet-64 hybrid cosine (121M parameters, bf16, ZeRO-1) at the largest batch that
    fits, from two measured service runs; service img/s, MFU and peak memory."""
    from common import device_peak

    sets = [f"data.shards={ctx.shards64}/index.json#train", "data.eval_shards=null",
            f"output.run_dir={ctx.tmp / 'in64'}", "output.tensorboard=false",
            "train.log_interval=1000000000", "train.save_interval=1000000000",
            "train.sample_interval=0", "train.eval_interval=0"] + ctx.paper_sets
    batch, how = largest_batch(sets, ctx)
    job, timing, retries = time_with_retries(sets, batch, ctx)
    batch = job.train.batch_size
    seconds = timing["seconds"]
    flops = paper_step_flops(job, batch)
    peak, where = device_peak(torch.device("cuda" if ctx.gpu else "cpu"), ctx.matmul_reps)
    return Result(f"{timing['params'] / 1e6:.1f}M params, {job.precision} ZeRO-{job.deepspeed.zero_stage}, "
                  f"batch {batch}/GPU ({how}{retries}), data wait {timing['wait']:.0%}, "
                  f"{flops / seconds / 1e12:.1f} TFLOP/s of {where}",
                  img_s=batch / seconds, mfu=flops / seconds / peak, peak_bytes=timing["peak"])


def time_service(job, ctx: Context, warmup: int | None = None, steps: int | None = None,
                 inject: bool = False) -> dict:
    """Seconds per service step after warm-up, the data-wait fraction, the parameter
    count, and the peak memory of this service (allocator peak reset before it starts).
    `inject`: raise one of ctx.inject_oom's out-of-memory errors (dry run)."""
    warmup, steps = warmup or ctx.warmup, steps or ctx.steps
    free_memory(ctx)
    reset_peak(ctx)
    with service(job, ctx) as trainer:
        train_steps(trainer, warmup)
        if inject and ctx.inject_oom:  # dry run: where a real one strikes, with the engine built and stepped
            ctx.inject_oom -= 1
            raise torch.OutOfMemoryError("CUDA out of memory (injected by the dry run)")
        sync = torch.cuda.synchronize if ctx.gpu else (lambda: None)
        sync()
        trainer._data_wait, began = 0.0, time.perf_counter()
        train_steps(trainer, steps)
        seconds = (time.perf_counter() - began) / steps
        return {"seconds": seconds, "wait": trainer._data_wait / steps / seconds, "peak": peak_bytes(ctx),
                "params": sum(p.numel() for p in trainer.engine.module.parameters())}


def largest_batch(sets: list[str], ctx: Context) -> tuple[int, str]:
    """The largest multiple of 8 (<= MAX_BATCH) whose service run fits in 90% of the
    device, from the peak memory of two short service runs at the probe batch sizes."""
    from iddpm_ds.spec.job import load_job

    small, large = ctx.probe_batches
    peaks = [time_service(load_job(PAPER_JOB, sets + [f"train.batch_size={b}"]), ctx, 1, 1)["peak"]
             for b in (small, large)]
    if not ctx.gpu:  # the probes ran; a CPU keeps no allocator peak to fit against
        return ctx.cpu_batch, "dry run"
    total = torch.cuda.get_device_properties(0).total_memory
    fits = fit_batch(peaks[0], peaks[1], small, large, total)
    per_image = (peaks[1] - peaks[0]) / (large - small)
    return min(fits, MAX_BATCH), (f"fits {fits}: {per_image / 2**20:.0f} MiB per image, "
                                  f"{total / 2**30:.0f} GiB device" + (f", capped" if fits > MAX_BATCH else ""))


def fit_batch(peak_small: int, peak_large: int, small: int, large: int, total: int,
              usable: float = 0.9) -> int:
    """Largest multiple of 8 (at least 8) whose peak fits in `usable` of `total` bytes, with
    peak memory linear in the batch through the two measured points."""
    per_image = (peak_large - peak_small) / (large - small)
    fixed = peak_small - small * per_image  # model states, workspaces: what batch 0 would need
    fits = int((usable * total - fixed) // per_image)
    return max(8, fits // 8 * 8)


def time_with_retries(sets: list[str], batch: int, ctx: Context, tries: int = 3) -> tuple[Any, dict, str]:
    """time_service at `batch`; on an out-of-memory error, free the failed service and
    retry at 3/4 of the batch, at most `tries` times in all."""
    from iddpm_ds.spec.job import load_job

    failed: list[str] = []
    for _ in range(tries):
        job = load_job(PAPER_JOB, sets + [f"train.batch_size={batch}"])
        timing = time_or_none(job, ctx)
        if timing is not None:
            return job, timing, f"; after out-of-memory at {', '.join(failed)}" if failed else ""
        failed.append(f"{batch} ({free_failed(ctx)})")
        batch = smaller_batch(batch)
    raise AssertionError(f"out of memory at batch sizes {', '.join(failed)}")


def smaller_batch(batch: int) -> int:
    """3/4 of the batch, a multiple of 8 from 8 on."""
    smaller = batch * 3 // 4
    return smaller // 8 * 8 if smaller >= 8 else max(1, smaller)


def time_or_none(job, ctx: Context) -> dict | None:
    """time_service, or None on an out-of-memory error. The retry happens outside this
    `except`: while it runs, its traceback holds time_service's frame, and the failed
    trainer with it, so nothing could free that engine's memory."""
    try:
        return time_service(job, ctx, inject=True)
    except torch.OutOfMemoryError:
        return None


def free_failed(ctx: Context) -> str:
    """Collect the failed service; it must be gone (its memory is the retry's)."""
    free_memory(ctx)
    alive = [name for name, ref in ctx.alive.items() if ref() is not None]
    if alive:
        raise AssertionError(f"the failed {' and '.join(alive)} survived the out-of-memory error: "
                             "its memory is not free for the retry")
    left = f", {torch.cuda.memory_allocated() / 2**30:.1f} GiB left allocated" if ctx.gpu else ""
    return f"engine freed{left}"


def paper_step_flops(job, batch: int) -> int:
    """FLOPs of one forward + backward at this batch (torch's count; meta tensors: no memory)."""
    from common import step_flops

    from iddpm_ds import build_diffusion, build_model

    with torch.device("meta"):
        model = build_model(job.model)
        x_start = torch.empty(batch, 3, job.model.image_size, job.model.image_size)  # [N, C, H, W]
        t = torch.zeros(batch, dtype=torch.long)
    diffusion = build_diffusion(job.diffusion)
    return step_flops(lambda: diffusion.training_losses(model, x_start, t)["loss"].mean().backward())


def check_sampler_no_host_sync(ctx: Context) -> Result:
    """The sampler test that runs under torch.cuda.set_sync_debug_mode("error")."""
    test = "tests/test_timestep_sampler.py::test_cuda_update_matches_reference_without_host_sync"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", test],
                          cwd=ROOT, capture_output=True, text=True)
    tail = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-300:]
    if " skipped" in tail and proc.returncode == 0:
        reason = [line for line in proc.stdout.splitlines() if "SKIPPED" in line]
        raise Skip(reason[0].split(": ", 1)[-1] if reason else tail)
    assert proc.returncode == 0, proc.stdout[-1500:]
    return Result(f"{test.split('::')[1]}: {tail}")


# --------------------------------------------------------------------------- table


def rows() -> list[Row]:
    """The check's rows and their time budgets (seconds on one H100/H200; the sum plus
    start-up stays within TOTAL_BUDGET_S)."""
    return [
        Row("fp16 loss scaling, forced overflow", check_fp16_overflow, 60),
        Row("bf16 training (ZeRO-1)", lambda c: check_precision_and_zero(c, "bf16", 1), 30),
        Row("ZeRO-2, one device (bf16)", lambda c: check_precision_and_zero(c, "bf16", 2), 30),
        Row("ZeRO-3, one device (fp32)", lambda c: check_precision_and_zero(c, "fp32", 3), 30),
        Row("NCCL initialisation", check_nccl, 15),
        Row("ImageNet-64 paper job: img/s, MFU", check_paper_throughput, 195),
        Row("sampler: no host sync", check_sampler_no_host_sync, 60, in_process=False),
    ]


@contextmanager
def budget(seconds: float, enforce: bool) -> Iterator[None]:
    """Raise OverBudget in this (main) thread once `seconds` have passed."""
    if not enforce:
        yield
        return

    def over(signum: int, frame: Any) -> None:
        raise OverBudget(f"over its {seconds:.0f} s budget")

    previous = signal.signal(signal.SIGALRM, over)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def run_rows(table: list[Row], ctx: Context) -> list[Outcome]:
    outcomes = []
    for row in table:
        began, result = time.perf_counter(), None
        reset_peak(ctx)
        try:
            with budget(row.budget_s, ctx.budgets):
                result = row.check(ctx)
            status, detail = "PASS", result.detail
        except Skip as why:
            status, detail = "SKIP", str(why)
        except (Exception, OverBudget) as err:  # noqa: BLE001 - one failing row must not hide the others
            status, detail = "FAIL", f"{type(err).__name__}: {err}".splitlines()[0][:300]
            traceback.print_exc()
        free_memory(ctx)
        peak = result.peak_bytes if result is not None and result.peak_bytes is not None else \
            peak_bytes(ctx) if row.in_process else None
        seconds = time.perf_counter() - began
        outcomes.append(Outcome(row, status, detail, seconds, peak,
                                result.img_s if result else None, result.mfu if result else None))
        print(f"[gpu_check] {row.name}: {status} ({seconds:.0f} s)", file=sys.stderr, flush=True)
    return outcomes


def markdown_table(outcomes: list[Outcome], ctx: Context) -> str:
    """The table as Markdown (docs/benchmarks.md's GPU-check section takes it as it is)."""
    dash = "—"
    lines = ["| check | result | s (budget) | peak GPU memory | img/s | MFU | detail |",
             "|---|---|---:|---:|---:|---:|---|"]
    for o in outcomes:
        memory = f"{o.peak_bytes / 2**30:.2f} GiB" if o.peak_bytes is not None else \
            (dash + " (child process)" if ctx.gpu else dash)
        lines.append(" | ".join([
            f"| {o.row.name}", o.status, f"{o.seconds:.0f} ({o.row.budget_s:.0f})", memory,
            f"{o.img_s:.1f}" if o.img_s is not None else dash,
            f"{o.mfu:.1%}" if o.mfu is not None else dash,
            o.detail.replace("|", "/")]) + " |")
    return "\n".join(lines)


def machine_line(ctx: Context, seconds: float) -> str:
    import deepspeed

    if ctx.gpu:
        device = (f"{torch.cuda.get_device_name(0)} "
                  f"({torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}")
    else:
        device = "CPU (dry run)"
    return (f"gpu_check on {device}, torch {torch.__version__}, DeepSpeed {deepspeed.__version__}: "
            f"{seconds:.0f} s in all (budget {TOTAL_BUDGET_S} s)")


def make_context(gpu: bool, tmp: Path) -> Context:
    # dry run: the paper job's code path at a CPU-sized width
    paper_sets = ["data.num_workers=8"] if gpu else ["model.num_channels=32", "model.num_res_blocks=1",
                                                      "data.num_workers=1"]
    return Context(gpu=gpu, tmp=tmp, shards16=write_shards(tmp / "s16", 16, 512),
                   shards64=write_shards(tmp / "s64", 64, 2048 if gpu else 64),
                   warmup=3 if gpu else 1, steps=10 if gpu else 2,
                   probe_batches=(8, 16) if gpu else (2, 4), cpu_batch=4, paper_sets=paper_sets,
                   matmul_reps=10 if gpu else 1, budgets=gpu, inject_oom=0 if gpu else 1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU, tiny sizes: the same functions, GPU-only rows skipped with the reason")
    args = parser.parse_args()
    gpu = torch.cuda.is_available() and not args.dry_run
    if not args.dry_run and not gpu:
        print("error: no GPU visible; use --dry-run for the CPU run", file=sys.stderr)
        return 2
    from iddpm_ds.dist import env, group

    if args.dry_run:
        os.environ[env.CPU_FP16_SEAM] = "1"  # DeepSpeed's real fp16 engine, on CPU
    began = time.perf_counter()
    group.init()
    with tempfile.TemporaryDirectory() as tmp:
        ctx = make_context(gpu, Path(tmp))
        outcomes = run_rows(rows(), ctx)
    print(f"\n{machine_line(ctx, time.perf_counter() - began)}\n\n{markdown_table(outcomes, ctx)}")
    group.shutdown()
    return 1 if any(o.status == "FAIL" for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
