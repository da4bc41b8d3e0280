#!/usr/bin/env python
"""The GPU check (run it through bench/gpu_check.sh): what only a GPU can prove, in one
table. Every row runs the service's own code (Trainer, its DeepSpeed engine, the data
reader); --dry-run runs the same rows on CPU at tiny sizes and skips, with the reason,
only what needs a GPU (fp16, NCCL, CUDA sync detection).

Rows: fp16 dynamic loss scaling with a forced overflow (step skipped, scale halves,
weights and EMA unchanged, the next step applies); bf16; ZeRO-2 and ZeRO-3 on one device;
NCCL initialisation and an all-reduce; img/s and MFU of the paper's ImageNet-64 job
(launch/jobs/paper/imagenet64_hybrid_cosine.yaml) at the largest per-GPU batch that fits;
the timestep sampler's no-host-sync test. Exit status 1 if any row fails.
"""
from __future__ import annotations

import argparse
import gc
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

if "--dry-run" in sys.argv:  # before torch is imported: a dry run never touches a GPU
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
PAPER_JOB = ROOT / "launch/jobs/paper/imagenet64_hybrid_cosine.yaml"
# dense bf16 tensor-core peaks (vendor data sheets, no sparsity), by device-name fragment
BF16_PEAK = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12}


class Skip(Exception):
    """A row that cannot run on this machine; the message says why."""


# ------------------------------------------------------------------------- helpers


def write_shards(folder: Path, size: int, count: int = 512) -> Path:
    """Random images as pre-sized raw shards (no decode cost), labels 0..9."""
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


def start(job):
    from iddpm_ds.train.trainer import Trainer

    trainer = Trainer(job)
    trainer._batches = iter(trainer.data)
    return trainer


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


def close(trainer) -> None:
    trainer.data.close()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------- rows


def check_fp16_overflow(ctx: dict) -> str:
    """Feed one batch of infinities: DeepSpeed must skip that step and halve the scale;
    weights and EMA stay; a following clean step applies."""
    if not ctx["gpu"]:
        raise Skip("fp16 needs a GPU (DeepSpeed's CPU accelerator refuses fp16)")
    from iddpm_ds.train.engine import loss_scale

    details = []
    for stage in (0, 2):
        trainer = start(tiny_job(ctx["shards16"], ctx["tmp"] / f"fp16_{stage}", precision="fp16",
                                 **{"deepspeed.zero_stage": stage}))
        step_until_applied(trainer)  # the first steps at 2^20 may overflow by themselves
        scale, before, ema_before = loss_scale(trainer.engine), weights(trainer), ema_weights(trainer)
        clean = trainer._next_batch
        trainer._next_batch = lambda: (lambda x, kw: (x * float("inf"), kw))(*clean())
        trainer.train_step()
        trainer._next_batch = clean
        after = loss_scale(trainer.engine)
        assert not trainer.engine.was_step_applied(), "the overflow step was applied"
        assert after == scale / 2, f"loss scale {scale} -> {after}, expected {scale / 2}"
        assert torch.equal(weights(trainer), before), "weights changed on the skipped step"
        assert torch.equal(ema_weights(trainer), ema_before), "EMA changed on the skipped step"
        tries = step_until_applied(trainer)
        assert not torch.equal(weights(trainer), before), "weights did not move after the overflow"
        trainer.losses.reduce()  # the interval's metrics hold the NaN losses: dropped
        details.append(f"ZeRO-{stage}: scale 2^{math.log2(scale):.0f} -> 2^{math.log2(after):.0f}, "
                       f"applied again after {tries} step(s)")
        close(trainer)
    return "overflow step skipped, weights + EMA unchanged; " + "; ".join(details)


def step_until_applied(trainer, limit: int = 20) -> int:
    for tries in range(1, limit + 1):
        trainer.train_step()
        if trainer.engine.was_step_applied():
            return tries
    raise AssertionError(f"no fp16 step applied in {limit} tries")


def check_precision_and_zero(ctx: dict, precision: str, stage: int) -> str:
    """A few service steps: finite falling-or-steady loss, weights move, EMA follows."""
    trainer = start(tiny_job(ctx["shards16"], ctx["tmp"] / f"{precision}_{stage}", precision=precision,
                             **{"deepspeed.zero_stage": stage}))
    before = weights(trainer)
    first = train_steps(trainer, 1)
    last = train_steps(trainer, 4)
    assert not torch.equal(weights(trainer), before), "weights did not move"
    dtypes = sorted({str(p.dtype).replace("torch.", "") for p in trainer.engine.module.parameters()})
    optimizer = type(trainer.engine.optimizer).__name__
    close(trainer)
    return (f"loss {first:.3f} -> {last:.3f}, module weights {'/'.join(dtypes)}, "
            f"optimizer {optimizer}, fp32 masters + EMA")


def check_nccl(ctx: dict) -> str:
    """The process group the service initialised (dist.init): its backend and a collective."""
    import torch.distributed as torch_dist

    backend, world = torch_dist.get_backend(), torch_dist.get_world_size()
    value = torch.full((4,), 3.0, device="cuda" if ctx["gpu"] else "cpu")
    torch_dist.all_reduce(value)
    assert value.tolist() == [3.0 * world] * 4, value
    if not ctx["gpu"]:
        raise Skip(f"NCCL needs a GPU (this run initialised {backend}; its all_reduce works)")
    assert backend == "nccl", f"backend is {backend}"
    version = ".".join(str(v) for v in torch.cuda.nccl.version())
    return f"backend nccl {version}, world size {world}, all_reduce ok"


def check_paper_throughput(ctx: dict) -> str:
    """ImageNet-64 hybrid cosine (121M parameters, bf16, ZeRO-1) at the largest batch that
    fits, found from measured memory (3/4 of it after an out-of-memory); service img/s, MFU."""
    from iddpm_ds.spec.job import load_job

    sets = [f"data.shards={ctx['shards64']}/index.json#train", "data.eval_shards=null",
            f"output.run_dir={ctx['tmp'] / 'in64'}", "output.tensorboard=false",
            "train.log_interval=1000000000", "train.save_interval=1000000000",
            "train.sample_interval=0", "train.eval_interval=0"] + ctx["paper_sets"]
    batch = largest_batch(load_job(PAPER_JOB, sets), ctx)
    for _ in range(3):
        job = load_job(PAPER_JOB, sets + [f"train.batch_size={batch}"])
        try:
            seconds, wait, params = time_service(job, ctx)
            break
        except torch.cuda.OutOfMemoryError:
            batch = max(8, int(batch * 0.75) // 8 * 8)
            gc.collect()
            torch.cuda.empty_cache()
    else:
        raise AssertionError(f"out of memory down to batch {batch}")
    flops = step_flops(job, batch)
    peak, where = device_peak(ctx)
    return (f"{params / 1e6:.1f}M params, {job.precision} ZeRO-{job.deepspeed.zero_stage}, "
            f"batch {batch}/GPU: {batch / seconds:.1f} img/s (data wait {wait:.0%}), "
            f"{flops / seconds / 1e12:.1f} TFLOP/s = MFU {flops / seconds / peak:.1%} of {where}")


def time_service(job, ctx: dict) -> tuple[float, float, int]:
    """Seconds per service step after warm-up, the data-wait fraction, parameter count."""
    trainer = start(job)
    try:
        train_steps(trainer, ctx["warmup"])
        sync = torch.cuda.synchronize if ctx["gpu"] else (lambda: None)
        sync()
        trainer._data_wait, began = 0.0, time.perf_counter()
        train_steps(trainer, ctx["steps"])
        seconds = (time.perf_counter() - began) / ctx["steps"]
        wait = trainer._data_wait / ctx["steps"] / seconds
        return seconds, wait, sum(p.numel() for p in trainer.engine.module.parameters())
    finally:
        close(trainer)


def largest_batch(job, ctx: dict) -> int:
    """Fixed memory (model states) + per-image activation memory, measured at two batch
    sizes of a forward/backward of the model in the job's dtype; 90% of the device."""
    if not ctx["gpu"]:
        return ctx["cpu_batch"]
    from iddpm_ds import build_diffusion, build_model

    model = build_model(job.model).cuda().to(torch.bfloat16 if "bf16" in job.precision else torch.float32)
    diffusion = build_diffusion(job.diffusion)
    peaks = {}
    for batch in (8, 16):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        x = torch.randn(batch, 3, job.model.image_size, job.model.image_size, device="cuda")
        t = torch.randint(0, diffusion.num_timesteps, (batch,), device="cuda")
        fn = lambda x_, t_, **kw: model(x_.to(model.inner_dtype), t_, **kw).float()  # noqa: E731
        diffusion.training_losses(fn, x, t)["loss"].mean().backward()
        model.zero_grad(set_to_none=True)
        peaks[batch] = torch.cuda.max_memory_allocated()
    per_image = (peaks[16] - peaks[8]) / 8
    params = sum(p.numel() for p in model.parameters())
    del model
    torch.cuda.empty_cache()
    states = params * (2 + 2 + 12 + 4 * len(job.train.ema_rate))  # bf16 weights/grads, masters+Adam, EMA
    total = torch.cuda.get_device_properties(0).total_memory
    fits = int((0.9 * total - states - peaks[8] + 8 * per_image) // per_image)
    return max(8, fits // 8 * 8)


def step_flops(job, batch: int) -> int:
    """FLOPs of one forward + backward at this batch (torch's count; meta tensors: no memory)."""
    from torch.utils.flop_counter import FlopCounterMode

    from iddpm_ds import build_diffusion, build_model

    with torch.device("meta"):
        model = build_model(job.model)
        x = torch.empty(batch, 3, job.model.image_size, job.model.image_size)
        t = torch.zeros(batch, dtype=torch.long)
    diffusion = build_diffusion(job.diffusion)
    with FlopCounterMode(display=False) as counter:
        diffusion.training_losses(model, x, t)["loss"].mean().backward()
    return counter.get_total_flops()


def device_peak(ctx: dict) -> tuple[float, str]:
    if ctx["gpu"]:
        name = torch.cuda.get_device_name(0)
        for key, peak in BF16_PEAK.items():
            if key in name:
                return peak, f"{name} dense bf16 peak {peak / 1e12:.0f} TFLOP/s"
    from common import matmul_peak

    peak = matmul_peak(torch.bfloat16, torch.device("cuda" if ctx["gpu"] else "cpu"))
    return peak, f"measured bf16 matmul peak {peak / 1e12:.2f} TFLOP/s"


def check_sampler_no_host_sync(ctx: dict) -> str:
    """The sampler test that runs under torch.cuda.set_sync_debug_mode("error")."""
    test = "tests/test_timestep_sampler.py::test_cuda_update_matches_reference_without_host_sync"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", test],
                          cwd=ROOT, capture_output=True, text=True)
    tail = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-300:]
    if " skipped" in tail and proc.returncode == 0:
        reason = [line for line in proc.stdout.splitlines() if "SKIPPED" in line]
        raise Skip(reason[0].split(": ", 1)[-1] if reason else tail)
    assert proc.returncode == 0, proc.stdout[-1500:]
    return f"{test.split('::')[1]}: {tail}"


# --------------------------------------------------------------------------- table


def rows(ctx: dict) -> list[tuple[str, Callable[[dict], str]]]:
    return [
        ("fp16 loss scaling, forced overflow", check_fp16_overflow),
        ("bf16 training (ZeRO-1)", lambda c: check_precision_and_zero(c, "bf16", 1)),
        ("ZeRO-2, one device (bf16)", lambda c: check_precision_and_zero(c, "bf16", 2)),
        ("ZeRO-3, one device (fp32)", lambda c: check_precision_and_zero(c, "fp32", 3)),
        ("NCCL initialisation", check_nccl),
        ("ImageNet-64 paper job: img/s, MFU", check_paper_throughput),
        ("sampler: no host sync", check_sampler_no_host_sync),
    ]


def run_rows(ctx: dict) -> list[tuple[str, str, str, float]]:
    results = []
    for name, check in rows(ctx):
        began = time.perf_counter()
        try:
            status, detail = "PASS", check(ctx)
        except Skip as why:
            status, detail = "SKIP", str(why)
        except Exception as err:  # noqa: BLE001 - one failing row must not hide the others
            status, detail = "FAIL", f"{type(err).__name__}: {err}".splitlines()[0][:300]
            traceback.print_exc()
        results.append((name, status, detail, time.perf_counter() - began))
        print(f"[gpu_check] {name}: {status} ({time.perf_counter() - began:.0f} s)", file=sys.stderr, flush=True)
    return results


def print_table(results: list[tuple[str, str, str, float]], header: str) -> None:
    width = max(len(r[0]) for r in results)
    print(f"\n{header}")
    print(f"{'check':<{width}}  result  {'s':>4}  detail")
    for name, status, detail, seconds in results:
        print(f"{name:<{width}}  {status:<6}  {seconds:4.0f}  {detail}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU, tiny sizes: the same rows, GPU-only ones skipped with the reason")
    args = parser.parse_args()
    gpu = torch.cuda.is_available() and not args.dry_run
    if not args.dry_run and not gpu:
        print("error: no GPU visible; use --dry-run for the CPU run", file=sys.stderr)
        return 2
    from iddpm_ds import dist

    dist.init()
    began = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        ctx = {"gpu": gpu, "tmp": tmp_path, "shards16": write_shards(tmp_path / "s16", 16),
               "shards64": write_shards(tmp_path / "s64", 64, count=2048 if gpu else 64),
               "warmup": 3 if gpu else 1, "steps": 10 if gpu else 2, "cpu_batch": 4,
               # dry run: the paper job's code path at a CPU-sized width
               "paper_sets": ["data.num_workers=4"] if gpu else
               ["model.num_channels=32", "model.num_res_blocks=1", "data.num_workers=1"]}
        results = run_rows(ctx)
    device = torch.cuda.get_device_name(0) if gpu else "CPU (dry run)"
    print_table(results, f"gpu_check on {device}, torch {torch.__version__}, "
                         f"{time.perf_counter() - began:.0f} s")
    dist.shutdown()
    return 1 if any(r[1] == "FAIL" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
