"""The GPU check: what only a GPU can prove, as tests under the `gpu` marker.

`python -m bench.gpu_check` (bench/gpu_check.sh on a GPU machine) runs `pytest -m gpu` and
prints one Markdown table of the rows: fp16 dynamic loss scaling with a forced gradient
overflow (step skipped, scale halves, weights and EMA unchanged, not counted as
divergence, the next step applies); bf16; ZeRO-2 and ZeRO-3 on one device; NCCL; img/s,
MFU and peak memory of the paper's ImageNet-64 job at the largest per-GPU batch that fits
(read from the run's own metrics); the timestep sampler's no-host-sync test
(tests/test_timestep_sampler.py). Every row runs the service's own code (Trainer, its
DeepSpeed engine, the data reader) in a fresh process that initialised the service's
process group (group.init), so each row starts on a free device with its own peak memory,
and a row over its time budget is killed, fails, and the next one runs.

Without a GPU the rows a CPU can run still run, at tiny sizes (CI): fp16 through the CPU
fp16 seam (IDDPM_CPU_FP16, DeepSpeed's real fp16 engine), bf16, ZeRO-2/3, and the paper
job's path at a CPU width with one injected out-of-memory error for the retry. NCCL and
CUDA sync detection skip ("needs a GPU").
"""
from __future__ import annotations

import gc
import math
import multiprocessing
import os
import subprocess
import sys
import time
import traceback
import weakref
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from iddpm_ds import placement
from iddpm_ds.dist import env, group
from iddpm_ds.testing import random_shards, tiny_job

ROOT = Path(__file__).resolve().parents[1]
PAPER_JOB = ROOT / "launch/jobs/paper/imagenet64_hybrid_cosine.yaml"
GPU = torch.cuda.is_available()
MAX_BATCH = 512  # the ImageNet-64 row's batch search stops here (MFU is flat beyond)
CPU_LIMIT_S = 300  # no budgets on CPU (not timed), only a bound on a hang


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> dict[int, Path]:
    """Random raw shards at 16 px (the tiny job) and 64 px (the paper job)."""
    tmp = tmp_path_factory.mktemp("gpu_check_shards")
    return {16: random_shards(tmp / "s16", 16, 512), 64: random_shards(tmp / "s64", 64, 2048 if GPU else 64)}


# ------------------------------------------------------------- one row, one process


def _entry(queue: Any, fn: Callable[..., dict], args: tuple) -> None:
    # before DeepSpeed is imported (group.init): its accelerator must match placement.device()
    os.environ["DS_ACCELERATOR"] = "cuda" if GPU else "cpu"
    if not GPU:
        os.environ[env.CPU_FP16_SEAM] = "1"  # DeepSpeed's real fp16 engine, on CPU
    try:
        group.init()
        result = fn(*args)
        if GPU:
            result.setdefault("peak_bytes", torch.cuda.max_memory_allocated())
        queue.put(("ok", result))
        group.shutdown()
    except BaseException:  # noqa: BLE001 - the parent reports it
        queue.put(("error", traceback.format_exc()))


def in_service_process(fn: Callable[..., dict], *args: Any, budget_s: float, enforce: bool = GPU) -> dict:
    """fn(*args) in a spawned process after group.init (NCCL on a GPU, gloo on CPU); its
    result dict. Past budget_s (enforced on a GPU) the process is killed and the row fails."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.SimpleQueue()
    proc = ctx.Process(target=_entry, args=(queue, fn, args))
    proc.start()
    proc.join(budget_s if enforce else CPU_LIMIT_S)
    if proc.is_alive():
        proc.kill()
        proc.join()
        pytest.fail(f"over its {budget_s:.0f} s budget", pytrace=False)
    if queue.empty():
        pytest.fail(f"the row's process died (exit {proc.exitcode})", pytrace=False)
    status, value = queue.get()
    assert status == "ok", value
    return value


def report(record_property: Callable[[str, Any], None], name: str, budget_s: float, result: dict) -> None:
    """What bench/gpu_check.py's table shows (junit-xml properties)."""
    record_property("row", name)
    record_property("budget_s", budget_s)
    for key in ("detail", "img_s", "mfu", "peak_bytes", "memory_kind"):
        if result.get(key) is not None:
            record_property(key, result[key])


# ------------------------------------------------------------- service helpers (child)


_ALIVE: dict[str, weakref.ref] = {}  # the last service's objects, to prove a failed one freed


def open_service(job) -> Any:
    from iddpm_ds.train.trainer import Trainer

    trainer = Trainer(job)
    trainer._batches = iter(trainer.data)
    _ALIVE.update(trainer=weakref.ref(trainer), engine=weakref.ref(trainer.engine))
    return trainer


def close(trainer) -> None:
    """Stop the trainer's workers and handlers, and tear its engine down. engine.destroy()
    removes the gradient hooks DeepSpeed registered (held from C++, so the cycle collector
    never frees them): without it no engine is ever freed (DeepSpeed 0.19.8)."""
    trainer.data.close()
    trainer.preempt.restore()
    trainer.writer.close()
    trainer.engine.destroy()


def free_memory() -> None:
    gc.collect()
    if GPU:
        torch.cuda.empty_cache()


def weights(trainer) -> torch.Tensor:
    """The fp32 master weights of this rank, flattened (a copy)."""
    return torch.cat([p.detach().float().flatten() for p in trainer.master.local()]).clone()


def ema_weights(trainer) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in trainer.ema.params[0]]).clone()


def train_steps(trainer, n: int) -> float:
    """n service steps; the interval's mean loss (a host read, once)."""
    for _ in range(n):
        trainer.train_step()
    loss = trainer.losses.reduce()["loss"]
    assert math.isfinite(loss), f"loss is {loss}"
    return loss


def step_until_applied(trainer, limit: int = 30) -> int:
    for tries in range(1, limit + 1):
        trainer.train_step()
        if bool(trainer.guard.applied):
            return tries
    raise AssertionError(f"no fp16 step applied in {limit} tries")


def check_job(shards16: Path, run_dir: Path, **fields: Any):
    """The tiny job, one step per call, nothing logged or saved between steps."""
    return tiny_job(run_dir, shards16, **{"train.log_interval": 10**9, "train.save_interval": 10**9,
                                          "train.max_steps": None, "train.warmup_steps": 0, "train.lr": 1e-3,
                                          "train.ema_rate": "0.9", "train.schedule_sampler": "uniform",
                                          "deepspeed.zero_stage": 0, **fields})


# --------------------------------------------------------------------- the rows (child)


def fp16_overflow(shards16: Path, tmp: Path) -> dict:
    """Force a gradient overflow with a finite loss (the loss scale raised to 2^40)."""
    details = []
    for stage in (0, 2):
        trainer = open_service(check_job(shards16, tmp / f"fp16_{stage}", precision="fp16",
                                         **{"deepspeed.zero_stage": stage}))
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
        close(trainer)
        details.append(f"ZeRO-{stage}: first step applied at try {tries}, forced 2^40 -> 2^39, "
                       f"applied again at try {again}")
    return {"detail": "overflow skipped, weights + EMA kept, not divergence; " + "; ".join(details)}


def precision_and_zero(shards16: Path, tmp: Path, precision: str, stage: int) -> dict:
    """A few service steps: finite loss, weights move, EMA follows."""
    trainer = open_service(check_job(shards16, tmp / f"{precision}_{stage}", precision=precision,
                                     **{"deepspeed.zero_stage": stage}))
    before = weights(trainer)
    first, last = train_steps(trainer, 1), train_steps(trainer, 4)
    assert not torch.equal(weights(trainer), before), "weights did not move"
    dtypes = sorted({str(p.dtype).replace("torch.", "") for p in trainer.engine.module.parameters()})
    optimizer = type(trainer.engine.optimizer).__name__
    close(trainer)
    return {"detail": f"loss {first:.3f} -> {last:.3f}, module weights {'/'.join(dtypes)}, "
                      f"optimizer {optimizer}, fp32 masters + EMA"}


def nccl() -> dict:
    """The process group the service initialised (group.init): its backend and a collective."""
    import torch.distributed as torch_dist

    backend, world = torch_dist.get_backend(), torch_dist.get_world_size()
    value = torch.full((4,), 3.0, device="cuda")
    torch_dist.all_reduce(value)
    assert value.tolist() == [3.0 * world] * 4, value
    assert backend == "nccl", f"backend is {backend}"
    version = ".".join(str(v) for v in torch.cuda.nccl.version())
    return {"detail": f"backend nccl {version}, world size {world}, all_reduce ok"}


def paper_throughput(shards64: Path, tmp: Path, inject_oom: int) -> dict:
    """ImageNet-64 hybrid cosine (121M parameters, bf16, ZeRO-1) at the largest batch that
    fits; img/s, MFU and peak memory as the run logs them (metrics.jsonl)."""
    sets = [f"data.shards={shards64}/index.json#train", f"data.eval_shards={shards64}/index.json#eval",
            f"output.run_dir={tmp / 'in64'}", "output.tensorboard=false",
            "train.log_interval=1000000000", "train.save_interval=1000000000",
            "train.sample_interval=0", "train.eval_interval=0"]
    sets += ["data.num_workers=8"] if GPU else ["model.num_channels=32", "model.num_res_blocks=1",
                                                "data.num_workers=1"]  # the code path at a CPU width
    batch, how = largest_batch(sets)
    failed: list[str] = []
    for _ in range(3):  # on an out-of-memory error: free the failed service, retry at 3/4
        record = time_or_none(sets, batch, inject=len(failed) < inject_oom)
        if record is not None:
            break
        failed.append(f"{batch} ({free_failed()})")
        batch = batch * 3 // 4 // 8 * 8 if batch * 3 // 4 >= 8 else max(1, batch * 3 // 4)
    else:
        raise AssertionError(f"out of memory at batch sizes {', '.join(failed)}")
    retries = f"; after out-of-memory at {', '.join(failed)}" if failed else ""
    return {"detail": f"{record['params'] / 1e6:.1f}M params, batch {batch}/GPU ({how}{retries}), "
                      f"data wait {record['data_wait_frac']:.0%}, {record['tflops_per_s_per_rank']:.1f} "
                      f"TFLOP/s ({record['flops_per_image'] / 1e9:.0f} GFLOP/image), "
                      + (f"peak {record['peak_tflops_per_s']:.0f} TFLOP/s" if record["mfu"] else "no data-sheet peak"),
            "img_s": record["img_per_s"], "mfu": record["mfu"], "memory_kind": record["memory_kind"],
            "peak_bytes": int(record["memory_mb_per_rank"][0] * 2**20)}


def time_service(sets: list[str], batch: int, warmup: int, steps: int, inject: bool = False) -> dict:
    """The run's own metrics record over `steps` service steps after `warmup` (allocator
    peak reset before the service starts), plus the parameter count."""
    import json

    from iddpm_ds.spec.job import load_job

    free_memory()
    if GPU:
        torch.cuda.reset_peak_memory_stats()
    trainer = open_service(load_job(PAPER_JOB, sets + [f"train.batch_size={batch}"]))
    try:
        train_steps(trainer, warmup)
        if inject:  # CPU: where a real one strikes, with the engine built and stepped
            raise torch.OutOfMemoryError("CUDA out of memory (injected by the CPU run)")
        trainer._reset_timers()
        for _ in range(steps):
            trainer.train_step()
        trainer.log_metrics()  # the interval since _reset_timers: these steps
        record = json.loads((trainer.run_dir / "metrics.jsonl").read_text().splitlines()[-1])
        return {**record, "params": sum(p.numel() for p in trainer.engine.module.parameters())}
    finally:
        close(trainer)


def time_or_none(sets: list[str], batch: int, inject: bool) -> dict | None:
    """time_service, or None on an out-of-memory error. The retry happens outside this
    `except`: its traceback holds the failed trainer, so nothing could free that engine."""
    try:
        return time_service(sets, batch, 3 if GPU else 1, 10 if GPU else 2, inject)
    except torch.OutOfMemoryError:
        return None


def free_failed() -> str:
    """Collect the failed service; it must be gone (its memory is the retry's)."""
    free_memory()
    alive = [name for name, ref in _ALIVE.items() if ref() is not None]
    assert not alive, (f"the failed {' and '.join(alive)} survived the out-of-memory error: "
                       "its memory is not free for the retry")
    return "engine freed" + (f", {torch.cuda.memory_allocated() / 2**30:.1f} GiB left allocated" if GPU else "")


def largest_batch(sets: list[str]) -> tuple[int, str]:
    """The largest multiple of 8 (<= MAX_BATCH) whose run fits in 90% of the device, from
    the logged peak memory of two short runs at the probe batch sizes."""
    small, large = (8, 16) if GPU else (2, 4)
    peaks = [time_service(sets, b, 1, 1)["memory_mb_per_rank"][0] * 2**20 for b in (small, large)]
    if not GPU:  # the probes ran; a CPU keeps no allocator peak to fit against
        return 4, "CPU run"
    total = torch.cuda.get_device_properties(0).total_memory
    fits = fit_batch(int(peaks[0]), int(peaks[1]), small, large, total)
    per_image = (peaks[1] - peaks[0]) / (large - small)
    return min(fits, MAX_BATCH), (f"fits {fits}: {per_image / 2**20:.0f} MiB per image, "
                                  f"{total / 2**30:.0f} GiB device" + (", capped" if fits > MAX_BATCH else ""))


def fit_batch(peak_small: int, peak_large: int, small: int, large: int, total: int,
              usable: float = 0.9) -> int:
    """Largest multiple of 8 (at least 8) whose peak fits in `usable` of `total` bytes, with
    peak memory linear in the batch through the two measured points."""
    per_image = (peak_large - peak_small) / (large - small)
    fixed = peak_small - small * per_image  # model states, workspaces: what batch 0 would need
    fits = int((usable * total - fixed) // per_image)
    return max(8, fits // 8 * 8)


def sleeps(seconds: float) -> dict:
    time.sleep(seconds)
    return {"detail": "woke"}


# ------------------------------------------------------------------------- the tests


@pytest.mark.gpu
@pytest.mark.slow
def test_fp16_loss_scaling_forced_overflow(shards, tmp_path, record_property):
    result = in_service_process(fp16_overflow, shards[16], tmp_path, budget_s=60)
    report(record_property, "fp16 loss scaling, forced overflow", 60, result)
    assert "ZeRO-0: " in result["detail"] and "ZeRO-2: " in result["detail"]


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("precision, stage", [("bf16", 1), ("bf16", 2), ("fp32", 3)])
def test_precision_and_zero_stage_on_one_device(shards, tmp_path, record_property, precision, stage):
    result = in_service_process(precision_and_zero, shards[16], tmp_path, precision, stage, budget_s=30)
    report(record_property, f"{precision} training, ZeRO-{stage} on one device", 30, result)


@pytest.mark.gpu
def test_nccl_initialisation(record_property):
    record_property("row", "NCCL initialisation")  # the table's name for the skip too
    if not GPU:
        pytest.skip("needs a GPU")
    report(record_property, "NCCL initialisation", 15, in_service_process(nccl, budget_s=15))


@pytest.mark.gpu
@pytest.mark.slow
def test_paper_job_throughput_mfu_and_memory_from_its_metrics(shards, tmp_path, record_property):
    result = in_service_process(paper_throughput, shards[64], tmp_path, 0 if GPU else 1, budget_s=195)
    report(record_property, "ImageNet-64 paper job: img/s, MFU", 195, result)
    assert result["img_s"] > 0
    if GPU:
        assert 0 < result["mfu"] < 1 and result["memory_kind"] == "cuda_max_allocated", result
    else:  # the injected out-of-memory error at batch 4: the engine was freed, retried at 3
        assert result["mfu"] is None and result["memory_kind"] == "cpu_max_rss", result
        assert "after out-of-memory at 4 (engine freed)" in result["detail"], result["detail"]
        assert "batch 3/GPU" in result["detail"], result["detail"]


def test_gpu_check_runs_the_marker_and_prints_the_table():
    """bench.gpu_check picks the `gpu` tests and prints them as the table (the two that need
    a GPU, so that this costs a pytest start-up only); without a GPU and --dry-run: exit 2."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--dry-run", "--", "-k", "nccl or host_sync"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = proc.stdout[proc.stdout.index("| check |"):].splitlines()
    assert "gpu_check on CPU (dry run)" in proc.stdout and len(table) == 4, proc.stdout
    assert table[2].startswith("| NCCL initialisation | SKIP |") and "needs a GPU" in table[2], table
    assert table[3].startswith("| test_cuda_update_matches_reference_without_host_sync | SKIP |"), table
    if not GPU:
        proc = subprocess.run([sys.executable, "-m", "bench.gpu_check"], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and "use --dry-run" in proc.stderr


def test_a_row_over_its_budget_is_killed_and_fails():
    began = time.perf_counter()
    with pytest.raises(pytest.fail.Exception, match="over its 2 s budget"):
        in_service_process(sleeps, 60, budget_s=2, enforce=True)
    assert time.perf_counter() - began < 30  # killed at its budget, not after the 60 s sleep


def test_fit_batch_is_linear_through_the_two_probes():
    gib = 2**30
    # 2 GiB fixed + 0.25 GiB per image; 80 GiB device, 90% usable: (72 - 2) / 0.25 = 280
    assert fit_batch(2 * gib + 8 * gib // 4, 2 * gib + 16 * gib // 4, 8, 16, 80 * gib) == 280
    # 1 GiB fixed, 80.85 GiB device: (72.765 - 1) / 0.25 = 287.06 images, down to a multiple of 8
    assert fit_batch(gib + 8 * gib // 4, gib + 16 * gib // 4, 8, 16, int(80.85 * gib)) == 280
    # 55 GiB fixed + 2.5 GiB per image: 6.8 images fit; still 8 (the retry takes it from there)
    assert fit_batch(75 * gib, 95 * gib, 8, 16, 80 * gib) == 8


def test_check_accelerator_refuses_a_device_of_another_kind():
    from iddpm_ds.placement import PlacementError
    from iddpm_ds.train.engine import check_accelerator

    check_accelerator("cpu", torch.device("cpu"))
    check_accelerator("cuda", torch.device("cuda", 1))
    with pytest.raises(PlacementError) as err:
        check_accelerator("cpu", torch.device("cuda", 0))
    assert str(err.value).count("\n") == 0
    assert "accelerator is cpu" in str(err.value) and "cuda:0" in str(err.value)
    with pytest.raises(PlacementError, match="set DS_ACCELERATOR=cpu"):
        check_accelerator("cuda", torch.device("cpu"))


def test_build_engine_refuses_when_deepspeed_and_dist_disagree(tmp_path, monkeypatch):
    """DS_ACCELERATOR=cpu here; placement.device() as a rank with a GPU would see it (the
    device init() fixed in the dist state, the one input changed): the engine is refused
    before DeepSpeed builds anything."""
    from iddpm_ds.dist import state
    from iddpm_ds.placement import PlacementError
    from iddpm_ds.spec.distributed import DistributedSpec
    from iddpm_ds.train.engine import build_engine

    job = check_job(tmp_path, tmp_path / "run")
    as_gpu_rank = state.DistState(DistributedSpec(), launcher_local_rank=0,
                                  device=torch.device("cuda", 0))
    monkeypatch.setattr(state.SLOT, "state", as_gpu_rank)
    with pytest.raises(PlacementError, match="accelerator is cpu .* device is cuda:0"):
        build_engine(job)
