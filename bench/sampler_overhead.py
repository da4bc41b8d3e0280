"""Overhead of the loss-aware timestep sampler per training step: ours vs the reference's.

Times one `sample(B)` + `update_with_local_losses(t, losses)` per step in torchrun ranks
joined by gloo (world 1, 2, 4; batch 16, 256), for a faithful re-implementation of the
reference (three blocking all_gathers, `.item()` per element, a Python history update) and
iddpm_ds's LossSecondMomentResampler (one asynchronous all-gather, vectorised update), both
warmed up. Time per step is the slowest rank's; three views with their ratios: back to back,
with host-idle work between steps (as a GPU backward gives), and compute only (one process).
docs/timestep_sampler.md explains each.

    python -m bench.sampler_overhead            # full run (about a minute on 2 cores)
    python -m bench.sampler_overhead --quick    # smoke run
"""
from __future__ import annotations

import time

import numpy as np
import torch
import torch.distributed as dist

from bench.common import cli, result, run_workers
from iddpm_ds.diffusion.timestep_sampler import LossSecondMomentResampler

T, H, UNIFORM_PROB, BATCHES = 1000, 10, 0.001, (16, 256)
# Host-idle time per step standing in for a GPU backward pass (a real UNet backward at
# these batch sizes takes longer).
WORK_S = 0.02


def steps(batch: int, quick: bool) -> tuple[int, int]:
    """Timed steps per batch size: back to back, and with work between steps."""
    return {16: (20, 5), 256: (5, 2)}[batch] if quick else {16: (200, 50), 256: (50, 25)}[batch]


class ReferenceLossSecondMoment:
    """The reference algorithm as it runs in improved-diffusion (minus its np.int crash)."""

    def __init__(self, num_timesteps: int, history_per_term: int, uniform_prob: float) -> None:
        self.history_per_term, self.uniform_prob = history_per_term, uniform_prob
        self._loss_history = np.zeros([num_timesteps, history_per_term], dtype=np.float64)
        self._loss_counts = np.zeros([num_timesteps], dtype=np.int64)

    def weights(self) -> np.ndarray:
        if not (self._loss_counts == self.history_per_term).all():
            return np.ones([len(self._loss_counts)], dtype=np.float64)
        weights = np.sqrt(np.mean(self._loss_history ** 2, axis=-1))
        weights /= np.sum(weights)
        weights *= 1 - self.uniform_prob
        weights += self.uniform_prob / len(weights)
        return weights

    def sample(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.weights()
        p = w / np.sum(w)
        indices_np = np.random.choice(len(p), size=(batch_size,), p=p)
        indices = torch.from_numpy(indices_np).long()
        weights = torch.from_numpy(1 / (len(p) * p[indices_np])).float()
        return indices, weights

    def update_with_local_losses(self, local_ts: torch.Tensor, local_losses: torch.Tensor) -> None:
        world = dist.get_world_size()
        batch_sizes = [torch.tensor([0], dtype=torch.int32) for _ in range(world)]
        dist.all_gather(batch_sizes, torch.tensor([len(local_ts)], dtype=torch.int32))
        batch_sizes = [x.item() for x in batch_sizes]
        max_bs = max(batch_sizes)
        timestep_batches = [torch.zeros(max_bs).to(local_ts) for _ in batch_sizes]
        loss_batches = [torch.zeros(max_bs).to(local_losses) for _ in batch_sizes]
        pad = max_bs - len(local_ts)
        dist.all_gather(timestep_batches, torch.nn.functional.pad(local_ts, (0, pad)))
        dist.all_gather(loss_batches, torch.nn.functional.pad(local_losses, (0, pad)))
        self.update_from_gathered(batch_sizes, timestep_batches, loss_batches)

    def update_from_gathered(self, batch_sizes: list, timestep_batches: list,
                             loss_batches: list) -> None:
        timesteps = [x.item() for y, bs in zip(timestep_batches, batch_sizes) for x in y[:bs]]
        losses = [x.item() for y, bs in zip(loss_batches, batch_sizes) for x in y[:bs]]
        self.update_with_all_losses(timesteps, losses)

    def update_with_all_losses(self, ts: list, losses: list) -> None:
        for t, loss in zip(ts, losses):
            if self._loss_counts[t] == self.history_per_term:
                self._loss_history[t, :-1] = self._loss_history[t, 1:]
                self._loss_history[t, -1] = loss
            else:
                self._loss_history[t, self._loss_counts[t]] = loss
                self._loss_counts[t] += 1


def _make_samplers(rank: int, batch: int) -> dict:
    history = np.exp(np.random.default_rng(0).normal(size=(T, H)))  # same on every rank: global state
    reference = ReferenceLossSecondMoment(T, H, UNIFORM_PROB)
    reference._loss_history[:] = history
    reference._loss_counts[:] = H
    ours = LossSecondMomentResampler(T, device="cpu", seed=0, rank=rank, history_per_term=H,
                                     uniform_prob=UNIFORM_PROB, max_local_batch=batch)
    ours.load_state_dict({"name": ours.name, "num_timesteps": T,
                          "loss_history": torch.from_numpy(history),
                          "loss_counts": torch.full((T,), H)})
    return {"reference": reference, "ours": ours}


def _per_step(step, steps: int, warmup: int = 3) -> float:
    """Seconds per call of step(i) after `warmup` untimed calls, the slowest rank's, less
    the seconds each call returns as slept (host-idle time standing in for a backward)."""
    for i in range(warmup):
        step(i)
    dist.barrier()
    start, slept = time.perf_counter(), 0.0
    for i in range(warmup, warmup + steps):
        slept += step(i)
    elapsed = torch.tensor([time.perf_counter() - start - slept], dtype=torch.float64)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    return float(elapsed) / steps


def _sampler_step(sampler, batch: int, steps: int, work_s: float):
    losses = torch.rand(steps + 3, batch)  # [S, B]

    def step(i: int) -> float:
        t, _ = sampler.sample(batch)
        sampler.update_with_local_losses(t, losses[i])
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
    np.random.seed(rank)
    for batch in BATCHES:
        samplers, (n, n_work) = _make_samplers(rank, batch), steps(batch, quick)
        row = [_per_step(_sampler_step(samplers[name], batch, n_steps, work_s), n_steps)
               for work_s, n_steps in ((0.0, n), (WORK_S, n_work)) for name in ("reference", "ours")]
        packet, out = torch.zeros(2 * batch, dtype=torch.int64), torch.empty(2 * batch * world, dtype=torch.int64)
        gather = (lambda i: dist.all_gather_into_tensor(out, packet) or 0.0)  # the floor: one bare collective
        rows.append([world, batch, *row, _per_step(gather, n) if world > 1 else 0.0])
    if rank == 0:
        result({"rows": rows})
    dist.barrier()
    dist.destroy_process_group()


def _compute_only(world: int, batch: int, steps: int) -> tuple[float, float]:
    """Seconds per step of everything but the communication, in this process: both
    implementations consume what the all-gather(s) of `world` equal ranks would return."""
    samplers = _make_samplers(0, batch)
    reference, ours = samplers["reference"], samplers["ours"]
    losses = torch.rand(steps, batch)  # [S, B]
    start = time.perf_counter()
    for i in range(steps):
        t, _ = reference.sample(batch)
        reference.update_from_gathered([batch] * world, [t.clone() for _ in range(world)],
                                       [losses[i].clone() for _ in range(world)])
    ref_seconds = (time.perf_counter() - start) / steps
    start = time.perf_counter()
    for i in range(steps):
        t, _ = ours.sample(batch)
        ours._apply_gathered(ours._pack(t, losses[i]).repeat(world, 1, 1))  # [W, 2, C]
    return ref_seconds, (time.perf_counter() - start) / steps


def main() -> None:
    parser = cli(__doc__)
    parser.add_argument("--quick", action="store_true", help="few steps, smoke test only")
    parser.add_argument("--worlds", default="1,2,4", help="comma-separated world sizes")
    args = parser.parse_args()
    if args.worker:
        return worker(args.quick)
    worlds = [int(w) for w in args.worlds.split(",")]
    quick = ["--quick"] if args.quick else []
    rows = [row for w in worlds for row in run_workers("bench.sampler_overhead", w, quick, w, "sampler")["rows"]]
    print(f"loss-aware sampler overhead per step (sample + update), T={T}, history={H}, "
          "gloo, CPU, 1 thread per rank")
    print(f"{'world':>5} {'batch':>5} {'reference ms':>13} {'iddpm_ds ms':>12} {'ratio':>7} {'1 all-gather ms':>16}")
    for world, batch, ref, ours, _, _, gather in rows:
        print(f"{world:>5} {batch:>5} {ref * 1e3:>13.3f} {ours * 1e3:>12.3f} {ref / ours:>6.1f}x {gather * 1e3:>16.3f}")
    print(f"same, with {WORK_S * 1e3:.0f} ms of host-idle work (a GPU backward) after each update, not counted:")
    for world, batch, _, _, ref, ours, _ in rows:
        print(f"{world:>5} {batch:>5} {ref * 1e3:>13.3f} {ours * 1e3:>12.3f} {ref / ours:>6.1f}x")
    print("same, without communication (one process consuming what the gathers return):")
    torch.set_num_threads(1)
    for world in worlds:
        for batch in BATCHES:
            ref, ours = _compute_only(world, batch, steps(batch, args.quick)[0])
            print(f"{world:>5} {batch:>5} {ref * 1e3:>13.3f} {ours * 1e3:>12.3f} {ref / ours:>6.1f}x")
    for _, _, ref, ours, ref_work, ours_work, _ in (r for r in rows if r[:2] == [4, 256]):
        print(f"batch 256, world 4: {ref / ours:.1f}x less overhead back to back, "
              f"{ref_work / ours_work:.1f}x with work between steps (target >= 10x)")


if __name__ == "__main__":
    main()
