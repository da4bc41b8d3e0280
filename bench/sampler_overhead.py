"""Overhead of the loss-aware timestep sampler per step, ours vs the reference's;
docs/timestep_sampler.md explains each view.

    python -m bench.sampler_overhead [--quick] [--world 1 2 4]
"""
from __future__ import annotations

import time
from functools import partial
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist

from bench.common import cli, per_step, result, run_workers, table
from iddpm_ds.diffusion.timestep_sampler import LossSecondMomentResampler
from iddpm_ds.testing import ReferenceSecondMoment

T, H, UNIFORM_PROB, BATCHES = 1000, 10, 0.001, (16, 256)
WORK_S = 0.02  # host-idle time per step standing in for a GPU backward (a real one is longer)
STEPS = {False: {16: (200, 50), 256: (50, 25)},  # timed steps per batch: back to back, with work
         True: {16: (20, 5), 256: (5, 2)}}       # --quick


def _make_samplers(rank: int, batch: int) -> dict:
    history = np.exp(np.random.default_rng(0).normal(size=(T, H)))  # same on every rank: global state
    reference = ReferenceSecondMoment(T, H, UNIFORM_PROB)
    reference.history[:], reference.counts[:] = history, H
    ours = LossSecondMomentResampler(T, device="cpu", seed=0, rank=rank, history_per_term=H,
                                     uniform_prob=UNIFORM_PROB, max_local_batch=batch)
    ours.load_state_dict({"name": ours.name, "num_timesteps": T,
                          "loss_history": torch.from_numpy(history),
                          "loss_counts": torch.full((T,), H)})
    return {"reference": reference, "ours": ours}


def _sampler_step(sampler, batch: int, steps: int, work_s: float) -> Callable[[], float]:
    losses = iter(torch.rand(steps + 3, batch))  # [S, B]

    def step() -> float:
        t, _ = sampler.sample(batch)
        sampler.update_with_local_losses(t, next(losses))
        if not work_s:
            return 0.0
        nap = time.perf_counter()
        time.sleep(work_s)
        return time.perf_counter() - nap
    return step


def worker(quick: bool) -> None:
    """One torchrun rank (gloo, one thread): each batch size's row, printed by rank 0."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world, rows = dist.get_rank(), dist.get_world_size(), []
    timed = partial(per_step, warmup=3, barrier=dist.barrier)
    np.random.seed(rank)
    for batch in BATCHES:
        samplers, (n, n_work) = _make_samplers(rank, batch), STEPS[quick][batch]
        row = [timed(_sampler_step(samplers[name], batch, n_steps, work_s), n_steps)
               for work_s, n_steps in ((0.0, n), (WORK_S, n_work)) for name in ("reference", "ours")]
        packet, out = torch.zeros(2 * batch, dtype=torch.int64), torch.empty(2 * batch * world, dtype=torch.int64)
        gather = (lambda: dist.all_gather_into_tensor(out, packet))  # the floor: one bare collective
        rows.append([world, batch, *row, timed(gather, n) if world > 1 else 0.0])
    result({"rows": rows})
    dist.barrier()
    dist.destroy_process_group()


def _compute_only(world: int, batch: int, steps: int) -> tuple[float, float]:
    """Seconds per step of everything but the communication, in this process: both
    implementations consume what the all-gather(s) of `world` equal ranks would return."""
    reference, ours = _make_samplers(0, batch).values()
    losses = iter(torch.rand(2 * steps, batch))  # [S, B]: each step takes the next row

    def ref_step() -> None:
        t, loss = reference.sample(batch)[0], next(losses)
        reference.update_from_gathered([batch] * world, [t.clone() for _ in range(world)],
                                       [loss.clone() for _ in range(world)])

    def our_step() -> None:
        t, loss = ours.sample(batch)[0], next(losses)
        ours._apply_gathered(ours._pack(t, loss).repeat(world, 1, 1))  # [W, 2, C]
    return per_step(ref_step, steps), per_step(our_step, steps)


def main() -> None:
    parser = cli(__doc__)
    parser.add_argument("--quick", action="store_true", help="few steps, smoke test only")
    parser.add_argument("--world", type=int, nargs="+", default=[1, 2, 4], help="world sizes")
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker.quick)
    rows = [row for w in args.world
            for row in run_workers("bench.sampler_overhead", w, vars(args), w, "sampler")["rows"]]
    print(f"loss-aware sampler overhead per step (sample + update), T={T}, history={H}, gloo, "
          f"CPU, 1 thread per rank; with work: {WORK_S * 1e3:.0f} ms of host-idle work (a GPU "
          "backward) after each update, not counted; compute only: one process consuming what "
          "the gathers return\n")
    torch.set_num_threads(1)
    views = {(w, b, "compute only"): (*_compute_only(w, b, STEPS[args.quick][b][0]), "-")
             for w in args.world for b in BATCHES}
    for world, batch, ref, ours, ref_work, ours_work, gather in rows:
        views[world, batch, "back to back"] = ref, ours, f"{gather * 1e3:.3f}"
        views[world, batch, "with work"] = ref_work, ours_work, "-"
    print(table("world: | batch: | view | reference ms: | iddpm_ds ms: | ratio: | 1 all-gather ms:",
                ([*key, f"{ref * 1e3:.3f}", f"{ours * 1e3:.3f}", f"{ref / ours:.1f}x", gather]
                 for key, (ref, ours, gather) in sorted(views.items()))))
    for _, _, ref, ours, ref_work, ours_work, _ in (r for r in rows if r[:2] == [4, 256]):
        print(f"\nbatch 256, world 4: {ref / ours:.1f}x less overhead back to back, "
              f"{ref_work / ours_work:.1f}x with work between steps (target >= 10x)")

if __name__ == "__main__":
    main()
