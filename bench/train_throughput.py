"""Training-step throughput of the service against a bare torch loop timed in the same process,
then time per phase of both; --levers: one fresh world-1 process per lever row.
docs/benchmarks.md explains every column.

    python -m bench.train_throughput [--world 1 2] [--steps 4] [--precision bf16] [--zero-stage 1]
    python -m bench.train_throughput --levers [ROW ...]     # every lever row: ~14 min on 2 cores
"""
from __future__ import annotations

import functools
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

from bench.common import (alternate, cli, paired_ratio, per_step, result, run_workers, sync,
                          table)
from iddpm_ds.testing import bench_job, digits_shards

BATCH = 16
PHASES = {  # phase: what it times, as attribute paths from the Trainer or the bare loop
    "data wait": ["_next_batch"],
    "forward (losses)": ["diffusion.training_losses"],
    "backward": ["engine.backward"],
    "sampler (sample + update)": [f"timestep_sampler.{name}" for name in
                                  ("sample", "update_with_local_losses", "begin_step", "end_step")],
    "optimizer step": ["engine.step"],
    "EMA": ["ema.update"],
    "divergence guard": [f"guard.{name}" for name in
                         ("begin_step", "poison", "measure_grads", "end_step")],
    "metrics + preemption check": ["losses.accumulate", "_after_step", "preempt.should_stop"],
}
OFF = {"train.adamw_kernel": "loop"}  # torch AdamW's own CPU default: the levers-off service
MATH = {**OFF, "train.attention_kernel": "math"}
ALL = {"train.adamw_kernel": "fused", "train.channels_last": True, "train.compile": True}
BEST = {**MATH, "train.adamw_kernel": "fused"}  # what pays on this CPU (docs/benchmarks.md)
KERNELS = {"": (OFF, "every lever off"),  # row name suffix: (job fields, gain from)
           " math attention": (MATH, "explicit matmul + softmax instead of SDPA"),
           " all levers": (ALL, "fused AdamW + channels_last + compile"),
           " best": (BEST, "fused AdamW + math attention")}
LEVERS = {f"{precision}{suffix}": (precision, fields, gain)  # row: (precision, job fields, gain)
          for precision in ("fp32", "bf16", "bf16-mixed")
          for suffix, (fields, gain) in KERNELS.items()}
BLOCKS, WARMUP = 5, 3  # alternating timed blocks per loop; untimed steps first (compilation)


def bare_step(job, device: torch.device, world: int) -> tuple[Callable[[], None], Any]:
    """The baseline: what a hand-written loop does, nothing more. fp32 model,
    GaussianDiffusion.training_losses, torch AdamW with its defaults, the batch already in
    memory, uniform t; torch DDP (all-reduce overlapped with backward) at world size > 1.
    Returns the step and the loop's components under the Trainer's names (PHASES)."""
    from iddpm_ds import build_diffusion, build_model

    torch.manual_seed(0)
    model = build_model(job.model).to(device)  # fp32, sdpa attention: torch's defaults
    model = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    diffusion, opt = build_diffusion(job.diffusion), torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.rand(BATCH, 3, 32, 32, device=device) * 2 - 1  # [N, C, H, W]
    engine = SimpleNamespace(backward=lambda loss: loss.backward(),  # DDP's all-reduce overlaps it
                             step=lambda: (opt.step(), opt.zero_grad(set_to_none=True)))

    def step() -> None:
        t = torch.randint(0, diffusion.num_timesteps, (BATCH,), device=device)
        engine.backward(diffusion.training_losses(model, x, t)["loss"].mean())
        engine.step()
    return step, SimpleNamespace(diffusion=diffusion, engine=engine)


def phase_pass(step: Callable[[], None], loop: Any, n: int,
               device: torch.device) -> dict[str, float]:
    """Seconds per step of each phase over n steps: each of `loop`'s components in PHASES
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
    for name, path in ((name, p.split(".")) for name, paths in PHASES.items() for p in paths):
        owner = functools.reduce(lambda o, attr: getattr(o, attr, None), path[:-1], loop)
        if hasattr(owner, path[-1]):
            setattr(owner, path[-1], clocked(getattr(owner, path[-1]), name))
        elif not isinstance(loop, SimpleNamespace):  # the Trainer has every one: a rename
            raise AttributeError(f"the Trainer has no {'.'.join(path)}: update PHASES")
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

    def service() -> None:  # what Trainer.run does per step (its log_interval never comes)
        trainer.train_step()
        trainer.preempt.should_stop(trainer.step, now=trainer._grid_or_eval_due())
        trainer._after_step()
    loops = {"bare": bare_step(trainer.job, device, world), "service": (service, trainer)}
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
    for name, (step, loop) in loops.items() if args.phases else []:
        barrier()
        phases[name] = phase_pass(step, loop, args.steps, device)
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
    """The throughput table, the service's own logged metrics and the phase table."""
    print(table("world size | sampler | bare fp32 img/s | service img/s | ratio", (
        [f"{r['world']} ({r['threads']} thread(s) per rank)", r["sampler"], f"{r['bare']:.2f}",
         f"{r['service']:.2f}", f"{r['ratio']:.3f}"] for r in results)))
    rows = []
    for r in results:  # medians over the timed blocks
        logged, mfu = r["logged"], [x["mfu"] for x in r["logged"] if x["mfu"] is not None]
        rows.append([r["world"], f"{logged[-1]['flops_per_image'] / 1e9:.2f}",
                     f"{statistics.median(x['tflops_per_s_per_rank'] for x in logged):.3f}",
                     f"{statistics.median(mfu):.1%} of {logged[-1]['peak_tflops_per_s']:.0f} "
                     "TFLOP/s" if mfu else "n/a (no data-sheet peak)",
                     f"{max(logged[-1]['memory_mb_per_rank']):.0f} ({logged[-1]['memory_kind']})"])
    print("\n" + table("world size | GFLOP/image | TFLOP/s per rank | MFU | peak MB per rank",
                       rows))
    cols = [(k, r) for r in results for k in ("bare", "service")]
    print("\n" + table("phase (ms per step, device synced at each boundary) | " + " | ".join(
        f"{k}, world {r['world']}" for k, r in cols), ([phase] + [
            f"{1e3 * r['phases'][k][phase]:.1f}" if phase in r["phases"][k] else "-"
            for k, r in cols] for phase in [*PHASES, "total"])))


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
        rows = []
        for name in args.levers or list(LEVERS):
            precision, fields, gain = LEVERS[name]
            r = launch(args, 1, shards, precision, fields, phases=False)
            rows.append([name, f"{r['service']:.2f}", f"{r['bare']:.2f}", f"{r['ratio']:.2f}",
                         f"{r['warmup_s']['service']:.0f}", gain])
    print(table("row | service img/s | bare fp32 img/s | ratio | warm-up s | gain from", rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
