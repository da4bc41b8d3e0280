#!/usr/bin/env python
"""Training-step throughput of the service against a bare loop, with time per phase.

At each world size (default 1 and 2) one launch of that many processes trains the bench
config (iddpm_ds.testing.bench_job) two ways, in alternating timed blocks so machine noise hits both:
  bare     fp32 model + GaussianDiffusion.training_losses + torch AdamW (its defaults),
           batch already in memory, uniform t; torch DDP at world size > 1.
  service  iddpm_ds's Trainer: the step of Trainer.run (train_step, the after-step
           checks, the preemption check), streamed WebDataset batches, the schedule
           sampler (uniform at world size 1, loss-second-moment with its all-gather at
           world size > 1, as a multi-GPU job runs it), DeepSpeed backward/step, EMA,
           on-device metrics.
Then a second pass times each phase of both loops (data wait, forward, backward, sampler,
optimizer step, EMA, metrics + preemption check), synchronising the device at every phase
boundary. That sync happens here only; the trainer's own step never synchronises. FLOPs per
image, model TFLOP/s, MFU (GPU only: against the data-sheet peak) and peak memory are
the service's own logged metrics (one log_metrics call after the timed blocks).

Speed levers are job fields: --precision bf16-mixed, --set train.compile=true, ...
(python -m bench.train_levers runs the whole lever table).

    python -m bench.train_throughput [--world 1 2] [--steps 4] [--blocks 5] [--precision fp32]
                                     [--zero-stage 0] [--workers 1] [--set train.compile=true]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from bench.common import (BATCH, CONFIG_LINE, Bare, PhaseClock, bench_job, digits_shards, interleaved,
                          paired_ratio, run_workers, timed)

PHASES = ["data wait", "forward (losses)", "backward", "sampler (sample + update)", "optimizer step",
          "EMA", "divergence guard", "metrics + preemption check"]


def instrument_service(trainer, clock: PhaseClock) -> None:
    """Route each component the trainer's step calls through a phase clock (in place)."""
    sampler = trainer.timestep_sampler
    clock.wrap(trainer, "_next_batch", "data wait")
    clock.wrap(trainer.diffusion, "training_losses", "forward (losses)")
    clock.wrap(trainer.engine, "backward", "backward")
    for name in ("sample", "update_with_local_losses", "begin_step", "end_step"):
        clock.wrap(sampler, name, "sampler (sample + update)")
    clock.wrap(trainer.engine, "step", "optimizer step")
    clock.wrap(trainer.ema, "update", "EMA")
    for name in ("begin_step", "poison", "measure_grads", "end_step"):
        clock.wrap(trainer.guard, name, "divergence guard")
    clock.wrap(trainer.losses, "accumulate", "metrics + preemption check")
    clock.wrap(trainer, "_after_step", "metrics + preemption check")
    clock.wrap(trainer.preempt, "should_stop", "metrics + preemption check")


def service_step(trainer):
    def step() -> None:  # what Trainer.run does per step
        trainer.train_step()
        trainer._after_step()
        trainer.preempt.should_stop(trainer.step)
    return step


def bare_step(bare: Bare, clock: PhaseClock):
    def step() -> None:
        t = torch.randint(0, bare.diffusion.num_timesteps, (BATCH,), device=bare.device)
        with clock.phase("forward (losses)"):
            loss = bare.diffusion.training_losses(bare.model, bare.x, t)["loss"].mean()
        with clock.phase("backward"):
            loss.backward()  # DDP's gradient all-reduce overlaps this
        with clock.phase("optimizer step"):
            bare.opt.step()
            bare.opt.zero_grad(set_to_none=True)
    return step


def phase_pass(steps: dict, clocks: dict, n: int, device, barrier) -> dict[str, dict[str, float]]:
    """Seconds per step of each phase, clocks enabled (synchronising) for n steps."""
    out = {}
    for name, step in steps.items():
        barrier()
        clock = clocks[name]
        clock.reset()
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

    group.init()
    world, device = env.world_size(), placement.device()
    sampler = args.sampler or ("uniform" if world == 1 else "loss-second-moment")
    fields = {k: json.loads(v) for k, v in (s.split("=", 1) for s in args.set)}
    job = bench_job(Path(args.run_dir), Path(args.shards), precision=args.precision,  # nothing saved
                    **{"deepspeed.zero_stage": args.zero_stage, "data.num_workers": args.workers,
                       "train.schedule_sampler": sampler, **fields})
    result = measure(job, args, world, device)
    if env.is_main():
        print("RESULT " + json.dumps({
            "world": world, "sampler": sampler, "precision": args.precision, "stage": args.zero_stage,
            "workers": args.workers, "set": args.set, "threads": torch.get_num_threads(),
            "device": str(device), **result}), flush=True)
    group.shutdown()


def measure(job, args, world: int, device) -> dict:
    """Warm-up, interleaved timed blocks, then the per-phase pass, of both loops."""
    from iddpm_ds import placement
    from iddpm_ds.dist import env, group
    from iddpm_ds.train.trainer import Trainer

    barrier = group.barrier if world > 1 else (lambda: None)
    trainer = Trainer(job)
    trainer._batches = iter(trainer.data)
    clocks = {"bare": PhaseClock(device), "service": PhaseClock(device)}
    instrument_service(trainer, clocks["service"])
    bare = Bare(job, device, world)
    steps = {"bare": bare_step(bare, clocks["bare"]), "service": service_step(trainer)}
    warm = {name: timed(step, args.warmup, device) * args.warmup for name, step in steps.items()}
    times = interleaved(steps, args.blocks, args.steps, device, barrier)
    phases = phase_pass(steps, clocks, args.steps, device, barrier) if args.phases else {}
    trainer.log_metrics()  # the run's own utilisation record (collective; writes metrics.jsonl)
    logged = json.loads((trainer.run_dir / "metrics.jsonl").read_text().splitlines()[-1]) \
        if env.is_main() else {}
    trainer.data.close()
    times = {k: _slowest_rank(v, world) for k, v in times.items()}
    return {"times": times, "phases": phases, "warmup_s": warm,
            "logged": {k: logged.get(k) for k in ("flops_per_image", "peak_tflops_per_s", "memory_mb_per_rank",
                                                   "memory_kind")}}


def _slowest_rank(values: list[float], world: int) -> list[float]:
    if world == 1:
        return values
    import torch.distributed as torch_dist

    tensor = torch.tensor(values, dtype=torch.float64)
    torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.MAX)
    return tensor.tolist()


def launch(args, world: int, shards: Path) -> dict:
    """One run of `world` processes (torchrun); returns rank 0's result."""
    with tempfile.TemporaryDirectory() as run_dir:
        return run_workers("bench.train_throughput", world, ["--shards", str(shards), "--run-dir", run_dir]
                           + passthrough(args), args.threads, "the service bench")


def passthrough(args) -> list[str]:
    out = ["--precision", args.precision, "--zero-stage", str(args.zero_stage), "--workers",
           str(args.workers), "--steps", str(args.steps), "--blocks", str(args.blocks),
           "--warmup", str(args.warmup)]
    out += ["--sampler", args.sampler] if args.sampler else []
    out += [] if args.phases else ["--no-phases"]
    for item in args.set:
        out += ["--set", item]
    return out


def report(result: dict) -> None:
    world, times = result["world"], result["times"]
    bare, service = (statistics.median(times[k]) for k in ("bare", "service"))
    print(f"\n== world size {world}: {result['sampler']} sampler, service {result['precision']} "
          f"ZeRO-{result['stage']}, {result['workers']} loader worker(s) per rank, "
          f"{result['threads']} thread(s) per rank{', ' + ' '.join(result['set']) if result['set'] else ''}")
    print(f"{'':>12} {'img/s (all ranks)':>18} {'ratio to bare':>14}   warm-up s")
    for name, sec in (("bare fp32", bare), ("service", service)):
        ratio = 1.0 if name == "bare fp32" else paired_ratio(times["service"], times["bare"])
        warm = result["warmup_s"]["bare" if name == "bare fp32" else "service"]
        print(f"{name:>12} {BATCH * world / sec:18.2f} {ratio:14.3f}   {warm:8.1f}")
    logged = result["logged"]  # the service run's own metrics
    achieved = logged["flops_per_image"] * BATCH / service
    peak = logged["peak_tflops_per_s"]
    print(f"service (its logged metrics): {logged['flops_per_image'] / 1e9:.2f} GFLOP/image, "
          f"{achieved / 1e12:.3f} TFLOP/s per rank at the service's timed speed, MFU "
          + (f"{achieved / peak / 1e12:.1%} of {peak:.0f} TFLOP/s" if peak else "n/a (no data-sheet peak)")
          + f"; peak memory {max(logged['memory_mb_per_rank']):.0f} MB per rank ({logged['memory_kind']})")
    if result["phases"]:
        print(f"{'phase (ms per step, device synced at each boundary)':<52} {'bare':>8} {'service':>8}")
        for phase in PHASES + ["other (not in a phase above)", "total"]:
            cells = [_phase_ms(result["phases"][k], phase) for k in ("bare", "service")]
            print(f"{phase:<52} " + " ".join(f"{c:8.1f}" if c is not None else f"{'-':>8}" for c in cells))


def _phase_ms(phases: dict[str, float], phase: str) -> float | None:
    if phase.startswith("other"):
        return 1e3 * (phases["total"] - sum(v for k, v in phases.items() if k != "total"))
    return 1e3 * phases[phase] if phase in phases else None


def parse(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", type=int, nargs="+", default=[1, 2], help="world sizes to run")
    parser.add_argument("--steps", type=int, default=4, help="steps per timed block")
    parser.add_argument("--blocks", type=int, default=5, help="alternating timed blocks per loop")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation)")
    parser.add_argument("--precision", choices=["fp32", "bf16", "bf16-mixed"], default="fp32")
    parser.add_argument("--zero-stage", type=int, default=0, choices=[0, 1, 2, 3])
    parser.add_argument("--workers", type=int, default=1, help="loader worker processes per rank")
    parser.add_argument("--sampler", default=None, help="default: uniform at world 1, else loss-second-moment")
    parser.add_argument("--set", action="append", default=[], metavar="train.FIELD=JSON",
                        help="a lever field of the train section, e.g. train.compile=true")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="CPU threads shared by the ranks (OMP_NUM_THREADS = threads / world)")
    parser.add_argument("--no-phases", dest="phases", action="store_false", help="skip the per-phase pass")
    parser.add_argument("--json", action="store_true", help="print results as JSON lines too")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
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
    print(f"config: {CONFIG_LINE}; every ratio is against the bare fp32 loop timed in the same run")
    with tempfile.TemporaryDirectory() as tmp:
        shards = digits_shards(Path(tmp) / "digits")
        for world in args.world:
            result = launch(args, world, shards)
            report(result)
            if args.json:
                print("JSON " + json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
