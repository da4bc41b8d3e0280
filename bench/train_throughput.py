"""Training-step throughput of the service against a bare torch loop timed in the same process,
then time per phase of both; --levers: one fresh world-1 process per lever row.
docs/benchmarks.md explains every column.

    python -m bench.train_throughput [--world 1 2] [--steps 4] [--precision bf16] [--zero-stage 1]
    python -m bench.train_throughput --levers [ROW ...]     # every lever row: ~10 min on 2 cores
"""
from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import torch

from bench.common import alternate, cli, paired_ratio, per_step, result, run_workers, sync
from iddpm_ds.testing import bench_job, digits_shards

BATCH = 16
PHASES = ["data wait", "forward (losses)", "backward", "sampler (sample + update)", "optimizer step",
          "EMA", "divergence guard", "metrics + preemption check"]
OFF = {"train.adamw_kernel": "loop"}  # torch AdamW's own CPU default: the levers-off service
MATH = {**OFF, "train.attention_kernel": "math"}
ALL = {"train.adamw_kernel": "fused", "train.channels_last": True, "train.compile": True}
BEST = {**MATH, "train.adamw_kernel": "fused"}  # what pays on this CPU (docs/benchmarks.md)
LEVERS: dict[str, tuple[str, dict, str]] = {  # row: (precision, job fields, gain from)
    "fp32": ("fp32", OFF, "baseline: the service with every lever off"),
    "fp32 math attention": ("fp32", MATH, "explicit matmul + softmax instead of SDPA"),
    "fp32 all levers": ("fp32", ALL, "fused AdamW + channels_last + compile"),
    "fp32 best": ("fp32", BEST, "fused AdamW + math attention"),
    "bf16": ("bf16", OFF, "bf16 weights and activations: bf16 matmul/conv"),
    "bf16 math attention": ("bf16", MATH, "bf16 + the explicit attention"),
    "bf16 all levers": ("bf16", ALL, "bf16 + fused AdamW + channels_last + compile"),
    "bf16 best": ("bf16", BEST, "bf16 + fused AdamW + math attention"),
    "bf16-mixed": ("bf16-mixed", OFF, "autocast: fp32 weights, bf16 torso convs"),
    "bf16-mixed best": ("bf16-mixed", BEST, "bf16-mixed + fused AdamW + math attention"),
}
BLOCKS, WARMUP = 5, 3  # alternating timed blocks per loop; untimed steps first (compilation)


def bare_step(job, device: torch.device, world: int) -> tuple[Callable[[], None], list]:
    """The baseline: what a hand-written loop does, nothing more. fp32 model,
    GaussianDiffusion.training_losses, torch AdamW with its defaults, the batch already in
    memory, uniform t; torch DDP (all-reduce overlapped with backward) at world size > 1.
    Returns the step and its phases as phase_pass takes them."""
    from iddpm_ds import build_diffusion, build_model

    torch.manual_seed(0)
    model = build_model(job.model).to(device)  # fp32, sdpa attention: torch's defaults
    model = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    diffusion, opt = build_diffusion(job.diffusion), torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.rand(BATCH, 3, 32, 32, device=device) * 2 - 1  # [N, C, H, W]
    loop = SimpleNamespace(backward=lambda loss: loss.backward(),  # DDP's all-reduce overlaps it
                           optimizer=lambda: (opt.step(), opt.zero_grad(set_to_none=True)))

    def step() -> None:
        t = torch.randint(0, diffusion.num_timesteps, (BATCH,), device=device)
        loop.backward(diffusion.training_losses(model, x, t)["loss"].mean())
        loop.optimizer()
    return step, [(diffusion, "training_losses", "forward (losses)"), (loop, "backward", "backward"),
                  (loop, "optimizer", "optimizer step")]


def service_step(trainer) -> tuple[Callable[[], None], list]:
    """What Trainer.run does per step, and the components it calls as phase_pass takes them."""
    wraps = [(trainer, "_next_batch", "data wait"), (trainer.diffusion, "training_losses", "forward (losses)"),
             (trainer.engine, "backward", "backward"), (trainer.engine, "step", "optimizer step"),
             (trainer.ema, "update", "EMA"), (trainer.losses, "accumulate", "metrics + preemption check"),
             (trainer, "_after_step", "metrics + preemption check"),
             (trainer.preempt, "should_stop", "metrics + preemption check")]
    wraps += [(trainer.timestep_sampler, name, "sampler (sample + update)")
              for name in ("sample", "update_with_local_losses", "begin_step", "end_step")]
    wraps += [(trainer.guard, name, "divergence guard")
              for name in ("begin_step", "poison", "measure_grads", "end_step")]

    def step() -> None:
        trainer.train_step()
        trainer._after_step()
        trainer.preempt.should_stop(trainer.step)
    return step, wraps


def phase_pass(step: Callable[[], None], wraps: list, n: int, device: torch.device) -> dict[str, float]:
    """Seconds per step of each phase over n steps: each (owner, attribute, phase) of `wraps`
    routed, in place, through a wall clock that synchronises the device at both ends. Run
    last (bench only): the timed blocks and the trainer's step never synchronise."""
    seconds: dict[str, float] = defaultdict(float)

    def clocked(inner: Callable, name: str) -> Callable:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            sync(device)
            start = time.perf_counter()
            out = inner(*args, **kwargs)
            sync(device)
            seconds[name] += time.perf_counter() - start
            return out
        return wrapped
    for owner, attr, name in wraps:
        setattr(owner, attr, clocked(getattr(owner, attr), name))
    clocked(lambda: [step() for _ in range(n)], "total")()
    return {k: v / n for k, v in seconds.items()}


def worker(args) -> None:
    from iddpm_ds import placement
    from iddpm_ds.dist import env, group
    from iddpm_ds.train.trainer import Trainer

    group.init()
    world, device = env.world_size(), placement.device()
    barrier = group.barrier if world > 1 else (lambda: None)
    sampler = "uniform" if world == 1 else "loss-second-moment"
    trainer = Trainer(bench_job(Path(args.run_dir), Path(args.shards), precision=args.precision, **{
        "deepspeed.zero_stage": args.zero_stage, "train.schedule_sampler": sampler, **args.fields}))
    trainer._batches = iter(trainer.data)
    loops = {"bare": bare_step(trainer.job, device, world), "service": service_step(trainer)}  # (step, wraps)
    steps = {name: step for name, (step, _) in loops.items()}
    warm = {name: per_step(step, WARMUP, device) * WARMUP for name, step in steps.items()}

    def service_block() -> float:  # the run logs its own metrics for each timed block (collective)
        trainer._reset_timers()
        seconds = per_step(steps["service"], args.steps, device)
        trainer.log_metrics()
        return seconds
    times = alternate({"bare": lambda: per_step(steps["bare"], args.steps, device), "service": service_block},
                      BLOCKS, barrier)
    phases = {}
    for name, (step, wraps) in loops.items() if args.phases else []:
        barrier()
        phases[name] = phase_pass(step, wraps, args.steps, device)
    trainer.data.close()
    if env.is_main():
        logged = [json.loads(line) for line in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
        result({"world": world, "sampler": sampler, "threads": torch.get_num_threads(), "times": times,
                "phases": phases, "warmup_s": warm, "logged": logged})
    group.shutdown()


def launch(args, world: int, shards: Path, precision: str, fields: dict, phases: bool) -> dict:
    """One run of `world` processes (torchrun); rank 0's result, with the speeds and ratio."""
    with tempfile.TemporaryDirectory() as run_dir:
        settings = {**vars(args), "shards": shards, "run_dir": run_dir, "precision": precision,
                    "fields": fields, "phases": phases}
        res = run_workers("bench.train_throughput", world, settings, args.threads, "the service bench")
    times = res["times"]
    res.update({k: BATCH * world / statistics.median(times[k]) for k in times})  # img/s, all ranks
    return {**res, "ratio": paired_ratio(times["service"], times["bare"])}


def report(results: list[dict]) -> None:
    print("| world size | sampler | bare fp32 img/s | service img/s | ratio |\n|---|---|---|---|---|")
    for r in results:
        print(f"| {r['world']} ({r['threads']} thread(s) per rank) | {r['sampler']} | {r['bare']:.2f} "
              f"| {r['service']:.2f} | {r['ratio']:.3f} |")
    for r in results:
        logged, mfu = r["logged"], [x["mfu"] for x in r["logged"] if x["mfu"] is not None]
        print(f"world {r['world']}, the service's logged metrics (median of the timed blocks): "
              f"{logged[-1]['flops_per_image'] / 1e9:.2f} GFLOP/image, "
              f"{statistics.median(x['tflops_per_s_per_rank'] for x in logged):.3f} TFLOP/s per rank, MFU "
              + (f"{statistics.median(mfu):.1%} of {logged[-1]['peak_tflops_per_s']:.0f} TFLOP/s" if mfu
                 else "n/a (no data-sheet peak)")
              + f", peak memory {max(logged[-1]['memory_mb_per_rank']):.0f} MB per rank ({logged[-1]['memory_kind']})")
    cols = [(k, r) for r in results for k in ("bare", "service")]
    print("\n| phase (ms per step, device synced at each boundary) | "
          + " | ".join(f"{k}, world {r['world']}" for k, r in cols) + " |\n|---|" + "---|" * len(cols))
    for phase in PHASES + ["total"]:
        print(f"| {phase} | " + " | ".join(f"{1e3 * r['phases'][k][phase]:.1f}" if phase in r["phases"][k]
                                           else "-" for k, r in cols) + " |")


def main(argv: list[str] | None = None) -> int:
    parser = cli(__doc__)
    parser.add_argument("--world", type=int, nargs="+", default=[1, 2], help="world sizes to run")
    parser.add_argument("--steps", type=int, default=4, help="steps per timed block")
    parser.add_argument("--precision", choices=["fp32", "bf16", "bf16-mixed"], default="fp32")
    parser.add_argument("--zero-stage", type=int, default=0, choices=[0, 1, 2, 3])
    parser.add_argument("--levers", nargs="*", choices=list(LEVERS), metavar="ROW",
                        help=f"the lever table at world size 1 (rows: {', '.join(LEVERS)}; none: all)")
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker)
        return 0
    print("config: 32 px, 64 ch, 2 res blocks, attention 16,8, learn_sigma, cosine, T=1000, dropout 0.1, "
          f"batch {BATCH} per rank, 1 loader worker per rank, service {args.precision} ZeRO-{args.zero_stage} "
          "(--levers: as each row says); every ratio is against the bare fp32 loop timed in the same process\n")
    with tempfile.TemporaryDirectory() as tmp:
        shards = digits_shards(Path(tmp) / "digits")
        if args.levers is None:
            report([launch(args, world, shards, args.precision, {}, True) for world in args.world])
            return 0
        print("| row | service img/s | bare fp32 img/s | ratio | warm-up s | gain from |\n|---|---|---|---|---|---|")
        for name in args.levers or list(LEVERS):
            precision, fields, gain = LEVERS[name]
            r = launch(args, 1, shards, precision, fields, phases=False)
            print(f"| {name} | {r['service']:.2f} | {r['bare']:.2f} | {r['ratio']:.2f} "
                  f"| {r['warmup_s']['service']:.0f} | {gain} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
