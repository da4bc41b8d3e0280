#!/usr/bin/env python
"""Training-step throughput of the service against the bare loop (bench.common.Bare) timed
in the same process, in alternating blocks, then time per phase of both (device synced at
each phase boundary, here only), at world sizes 1 and 2 (sampler: uniform, then
loss-second-moment). FLOPs, MFU and peak memory are the service run's own logged metrics.
--levers: one fresh world-1 process per lever row (compile caches and autocast state are
process-wide). docs/benchmarks.md explains every column.

    python -m bench.train_throughput [--world 1 2] [--steps 4] [--blocks 5] [--precision fp32]
                                     [--zero-stage 0] [--workers 1] [--set train.compile=true]
    python -m bench.train_throughput --levers                # every lever row (~10 min on 2 cores)
    python -m bench.train_throughput --levers fp32 "bf16 best"
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from bench.common import (BATCH, CONFIG_LINE, Bare, PhaseClock, alternate, bench_job, cli, digits_shards,
                          paired_ratio, result, run_workers, timed)

PHASES = ["data wait", "forward (losses)", "backward", "sampler (sample + update)", "optimizer step",
          "EMA", "divergence guard", "metrics + preemption check"]
FUSED, MATH = 'train.adamw_kernel="fused"', 'train.attention_kernel="math"'
OFF = ['train.adamw_kernel="loop"']  # torch AdamW's own CPU default: the levers-off service
ALL = [FUSED, "train.channels_last=true", "train.compile=true"]
BEST = [FUSED, MATH]  # what pays on this CPU (docs/benchmarks.md: channels_last, compile)
LEVERS: dict[str, tuple[str, list[str], str]] = {  # row: (precision, job fields, gain from)
    "fp32": ("fp32", OFF, "baseline: the service with every lever off"),
    "fp32 fused AdamW": ("fp32", [FUSED], "one optimizer kernel instead of a Python loop"),
    "fp32 foreach AdamW": ("fp32", ['train.adamw_kernel="foreach"'], "batched optimizer ops"),
    "fp32 channels_last": ("fp32", OFF + ["train.channels_last=true"], "NHWC convolutions, no reorders"),
    "fp32 math attention": ("fp32", OFF + [MATH], "explicit matmul + softmax instead of SDPA"),
    "fp32 compile": ("fp32", OFF + ["train.compile=true"], "inductor fuses element-wise work"),
    "fp32 all levers": ("fp32", ALL, "fused AdamW + channels_last + compile"),
    "fp32 best": ("fp32", BEST, "fused AdamW + math attention"),
    "bf16": ("bf16", OFF, "bf16 weights and activations: bf16 matmul/conv"),
    "bf16 math attention": ("bf16", OFF + [MATH], "bf16 + the explicit attention"),
    "bf16 best": ("bf16", BEST, "bf16 + fused AdamW + math attention"),
    "bf16-mixed": ("bf16-mixed", OFF, "autocast: fp32 weights, bf16 torso convs"),
    "bf16-mixed best": ("bf16-mixed", BEST, "bf16-mixed + fused AdamW + math attention"),
    "bf16 all levers": ("bf16", ALL, "bf16 + fused AdamW + channels_last + compile"),
    "bf16-mixed all levers": ("bf16-mixed", ALL, "bf16-mixed + fused AdamW + channels_last + compile"),
}


def instrument_service(trainer, clock: PhaseClock) -> None:
    """Route each component the trainer's step calls through a phase clock (in place)."""
    wraps = [(trainer, "_next_batch", "data wait"), (trainer.diffusion, "training_losses", "forward (losses)"),
             (trainer.engine, "backward", "backward"), (trainer.engine, "step", "optimizer step"),
             (trainer.ema, "update", "EMA"), (trainer.losses, "accumulate", "metrics + preemption check"),
             (trainer, "_after_step", "metrics + preemption check"),
             (trainer.preempt, "should_stop", "metrics + preemption check")]
    wraps += [(trainer.timestep_sampler, name, "sampler (sample + update)")
              for name in ("sample", "update_with_local_losses", "begin_step", "end_step")]
    wraps += [(trainer.guard, name, "divergence guard") for name in ("begin_step", "poison", "measure_grads", "end_step")]
    for owner, attr, name in wraps:
        clock.wrap(owner, attr, name)


def loops(trainer, bare: Bare, clock: PhaseClock) -> dict:
    def service() -> None:  # what Trainer.run does per step
        trainer.train_step()
        trainer._after_step()
        trainer.preempt.should_stop(trainer.step)

    def bare_step() -> None:
        t = torch.randint(0, bare.diffusion.num_timesteps, (BATCH,), device=bare.device)
        with clock.phase("forward (losses)"):
            loss = bare.diffusion.training_losses(bare.model, bare.x, t)["loss"].mean()
        with clock.phase("backward"):
            loss.backward()  # DDP's gradient all-reduce overlaps this
        with clock.phase("optimizer step"):
            bare.opt.step()
            bare.opt.zero_grad(set_to_none=True)
    return {"bare": bare_step, "service": service}


def phase_pass(steps: dict, clocks: dict, n: int, barrier) -> dict[str, dict[str, float]]:
    """Seconds per step of each phase, clocks enabled (synchronising) for n steps."""
    out = {}
    for name, step in steps.items():
        barrier()
        clock = clocks[name]
        clock.seconds.clear()
        clock.enabled = True
        with clock.phase("total"):
            for _ in range(n):
                step()
        clock.enabled = False
        out[name] = {k: v / n for k, v in clock.seconds.items()}
    return out


def worker(args) -> None:
    from iddpm_ds import placement
    from iddpm_ds.dist import env, group
    from iddpm_ds.train.trainer import Trainer

    group.init()
    world, device = env.world_size(), placement.device()
    barrier = group.barrier if world > 1 else (lambda: None)
    sampler = "uniform" if world == 1 else "loss-second-moment"
    fields = {k: json.loads(v) for k, v in (s.split("=", 1) for s in args.set)}
    trainer = Trainer(bench_job(Path(args.run_dir), Path(args.shards), precision=args.precision, **{
        "deepspeed.zero_stage": args.zero_stage, "data.num_workers": args.workers,
        "train.schedule_sampler": sampler, **fields}))
    trainer._batches = iter(trainer.data)
    clocks = {"bare": PhaseClock(device), "service": PhaseClock(device)}
    instrument_service(trainer, clocks["service"])
    steps = loops(trainer, Bare(trainer.job, device, world), clocks["bare"])
    warm = {name: timed(step, args.warmup, device) * args.warmup for name, step in steps.items()}
    times = alternate({k: (lambda s=s: timed(s, args.steps, device)) for k, s in steps.items()}, args.blocks, barrier)
    phases = phase_pass(steps, clocks, args.steps, barrier) if args.phases else {}
    trainer.log_metrics()  # the run's own utilisation record (collective; writes metrics.jsonl)
    trainer.data.close()
    times = {k: _slowest_rank(v, world) for k, v in times.items()}
    if env.is_main():
        logged = json.loads((trainer.run_dir / "metrics.jsonl").read_text().splitlines()[-1])
        result({"world": world, "sampler": sampler, "threads": torch.get_num_threads(), "times": times,
                "phases": phases, "warmup_s": warm, "logged": logged})
    group.shutdown()


def _slowest_rank(values: list[float], world: int) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64)
    if world > 1:
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
    return tensor.tolist()


def launch(args, world: int, shards: Path, precision: str, fields: list[str], phases: bool) -> dict:
    """One run of `world` processes (torchrun); returns rank 0's result."""
    with tempfile.TemporaryDirectory() as run_dir:
        argv = ["--shards", str(shards), "--run-dir", run_dir, "--precision", precision, "--zero-stage",
                str(args.zero_stage), "--workers", str(args.workers), "--steps", str(args.steps), "--blocks",
                str(args.blocks), "--warmup", str(args.warmup), *([] if phases else ["--no-phases"])]
        return run_workers("bench.train_throughput", world, argv + [w for f in fields for w in ("--set", f)],
                           args.threads, "the service bench")


def report(res: dict, args) -> None:
    world, times, logged = res["world"], res["times"], res["logged"]
    service = statistics.median(times["service"])
    print(f"\n== world size {world}: {res['sampler']} sampler, service {args.precision} ZeRO-{args.zero_stage}, "
          f"{args.workers} loader worker(s) and {res['threads']} thread(s) per rank {' '.join(args.set)}")
    print(f"{'':>12} {'img/s (all ranks)':>18} {'ratio to bare':>14}   warm-up s")
    for name, label in (("bare", "bare fp32"), ("service", "service")):
        ratio = paired_ratio(times[name], times["bare"])
        print(f"{label:>12} {BATCH * world / statistics.median(times[name]):18.2f} {ratio:14.3f}   "
              f"{res['warmup_s'][name]:8.1f}")
    achieved, peak = logged["flops_per_image"] * BATCH / service, logged["peak_tflops_per_s"]
    print(f"service (its logged metrics): {logged['flops_per_image'] / 1e9:.2f} GFLOP/image, "
          f"{achieved / 1e12:.3f} TFLOP/s per rank at the service's timed speed, MFU "
          + (f"{achieved / peak / 1e12:.1%} of {peak:.0f} TFLOP/s" if peak else "n/a (no data-sheet peak)")
          + f"; peak memory {max(logged['memory_mb_per_rank']):.0f} MB per rank ({logged['memory_kind']})")
    if res["phases"]:
        print(f"{'phase (ms per step, device synced at each boundary)':<52} {'bare':>8} {'service':>8}")
        for name in ("bare", "service"):  # what no phase above covers
            ms = res["phases"][name]
            ms["other (not in a phase above)"] = 2 * ms["total"] - sum(ms.values())
        for phase in PHASES + ["other (not in a phase above)", "total"]:
            cells = [res["phases"][k].get(phase) for k in ("bare", "service")]
            print(f"{phase:<52} " + " ".join(f"{1e3 * c:8.1f}" if c is not None else f"{'-':>8}" for c in cells))


def levers(args, shards: Path) -> None:
    print(f"{'row':<24} {'service img/s':>13} {'bare fp32 img/s':>15} {'ratio':>6} {'warm-up s':>9}  gain from")
    for name in args.levers or list(LEVERS):
        precision, fields, gain = LEVERS[name]
        times = (res := launch(args, 1, shards, precision, fields, phases=False))["times"]
        service, bare = (BATCH / statistics.median(times[k]) for k in ("service", "bare"))
        print(f"{name:<24} {service:13.2f} {bare:15.2f} {paired_ratio(times['service'], times['bare']):6.2f} "
              f"{res['warmup_s']['service']:9.1f}  {gain}", flush=True)


def parse(argv: list[str] | None = None):
    parser = cli(__doc__)
    parser.add_argument("--world", type=int, nargs="+", default=[1, 2], help="world sizes to run")
    parser.add_argument("--steps", type=int, default=4, help="steps per timed block")
    parser.add_argument("--blocks", type=int, default=5, help="alternating timed blocks per loop")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation)")
    parser.add_argument("--precision", choices=["fp32", "bf16", "bf16-mixed"], default="fp32")
    parser.add_argument("--zero-stage", type=int, default=0, choices=[0, 1, 2, 3])
    parser.add_argument("--workers", type=int, default=1, help="loader worker processes per rank")
    parser.add_argument("--set", action="append", default=[], metavar="train.FIELD=JSON",
                        help="a lever field of the train section, e.g. train.compile=true")
    parser.add_argument("--no-phases", dest="phases", action="store_false", help="skip the per-phase pass")
    parser.add_argument("--levers", nargs="*", choices=list(LEVERS), metavar="ROW",
                        help=f"the lever table at world size 1 (rows: {', '.join(LEVERS)}; none: all)")
    parser.add_argument("--shards", help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for item in args.set:
        if not item.startswith("train.") or "=" not in item:
            parser.error(f"--set takes train.FIELD=JSON, got {item!r}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.worker:
        worker(args)
        return 0
    print(f"config: {CONFIG_LINE}; every ratio is against the bare fp32 loop timed in the same process")
    with tempfile.TemporaryDirectory() as tmp:
        shards = digits_shards(Path(tmp) / "digits")
        if args.levers is not None:
            levers(args, shards)
            return 0
        for world in args.world:
            report(launch(args, world, shards, args.precision, args.set, args.phases), args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
