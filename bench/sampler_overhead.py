"""Overhead of the loss-aware timestep sampler per training step: ours vs the reference's.

Times one `sample(B)` + `update_with_local_losses(t, losses)` per step, in real spawned
processes joined by gloo, at world size 1, 2 and 4 and local batch 16 and 256, for
(a) a faithful re-implementation of the reference algorithm (three all_gathers: batch
sizes, then timesteps, then losses padded to the largest batch; `.item()` on every
gathered element; a per-element Python history update on a numpy shift buffer; numpy
global-state sampling) and (b) iddpm_ds's LossSecondMomentResampler (one all-gather of a
fixed-size buffer, vectorised device-side update). Both are warmed up (full histories),
so sampling is non-uniform. Time per step is the slowest rank's. Three views, printed
with their ratios: back to back (update, then sample at once: every collective's latency
is on the clock); with host-idle work between update and the next sample, as in training
where the backward pass runs there (iddpm_ds's all-gather is asynchronous and overlaps
it, the reference's three are blocking); and compute only, one process consuming what
the gathers would have returned.

    python -m bench.sampler_overhead            # full run (about a minute on 2 cores)
    python -m bench.sampler_overhead --quick    # smoke run
"""
from __future__ import annotations

import argparse
import socket
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from iddpm_ds.diffusion.timestep_sampler import LossSecondMomentResampler

T, H, UNIFORM_PROB = 1000, 10, 0.001
# Host-idle time per step standing in for a GPU backward pass (a real UNet backward at
# these batch sizes takes longer), and the steps timed with it.
WORK_S = 0.02


class ReferenceLossSecondMoment:
    """The reference algorithm as it runs in improved-diffusion (minus its np.int crash)."""

    def __init__(self, num_timesteps: int, history_per_term: int, uniform_prob: float) -> None:
        self.history_per_term = history_per_term
        self.uniform_prob = uniform_prob
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


def _warm_history() -> np.ndarray:
    rng = np.random.default_rng(0)  # same on every rank: the state is global
    return np.exp(rng.normal(size=(T, H)))


def _make_samplers(rank: int, batch: int) -> dict:
    history = _warm_history()
    reference = ReferenceLossSecondMoment(T, H, UNIFORM_PROB)
    reference._loss_history[:] = history
    reference._loss_counts[:] = H
    ours = LossSecondMomentResampler(T, device="cpu", seed=0, rank=rank, history_per_term=H,
                                     uniform_prob=UNIFORM_PROB, max_local_batch=batch)
    ours.load_state_dict({"name": ours.name, "num_timesteps": T,
                          "loss_history": torch.from_numpy(history),
                          "loss_counts": torch.full((T,), H)})
    return {"reference": reference, "ours": ours}


def _time_steps(sampler, batch: int, steps: int, warmup: int, work_s: float = 0.0) -> float:
    """Seconds per step spent in sample + update (the slowest rank's). With work_s > 0,
    the host idles that long after each update, as it does while a GPU runs the backward
    pass; the time actually slept is not counted."""
    losses = torch.rand(steps + warmup, batch)  # [S, B]
    for i in range(warmup):
        t, _ = sampler.sample(batch)
        sampler.update_with_local_losses(t, losses[i])
    dist.barrier()
    slept = 0.0
    start = time.perf_counter()
    for i in range(warmup, warmup + steps):
        t, _ = sampler.sample(batch)
        sampler.update_with_local_losses(t, losses[i])
        if work_s:
            nap = time.perf_counter()
            time.sleep(work_s)
            slept += time.perf_counter() - nap
    return _slowest(time.perf_counter() - start - slept) / steps


def _slowest(seconds: float) -> float:
    elapsed = torch.tensor([seconds], dtype=torch.float64)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    return float(elapsed)


def _time_one_gather(batch: int, steps: int) -> float:
    """Seconds per bare all-gather of our packet size: the latency floor of one collective."""
    world = dist.get_world_size()
    packet = torch.zeros(2 * batch, dtype=torch.int64)
    out = torch.empty(world * packet.numel(), dtype=torch.int64)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    for _ in range(3):
        gather(out, packet)
    dist.barrier()
    start = time.perf_counter()
    for _ in range(steps):
        gather(out, packet)
    return _slowest(time.perf_counter() - start) / steps


def _worker(rank: int, world: int, port: int, batches: list, steps: dict, work_steps: dict,
            queue) -> None:
    torch.set_num_threads(1)
    np.random.seed(rank)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        for batch in batches:
            samplers = _make_samplers(rank, batch)
            row = [_time_steps(samplers[name], batch, n, warmup=3, work_s=work_s)
                   for work_s, n in ((0.0, steps[batch]), (WORK_S, work_steps[batch]))
                   for name in ("reference", "ours")]
            gather = _time_one_gather(batch, steps[batch]) if world > 1 else 0.0
            if rank == 0:
                queue.put((world, batch, *row, gather))
    finally:
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


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run_processes(worlds: list, batches: list, steps: dict, work_steps: dict) -> list:
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    rows = []
    for world in worlds:
        mp.start_processes(_worker, args=(world, _free_port(), batches, steps, work_steps, queue),
                           nprocs=world, join=True, start_method="spawn")
        while not queue.empty():
            rows.append(queue.get())
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few steps, smoke test only")
    parser.add_argument("--worlds", default="1,2,4", help="comma-separated world sizes")
    args = parser.parse_args()
    torch.set_num_threads(1)
    worlds, batches = [int(w) for w in args.worlds.split(",")], [16, 256]
    steps = {16: 20, 256: 5} if args.quick else {16: 200, 256: 50}
    work_steps = {16: 5, 256: 2} if args.quick else {16: 50, 256: 25}
    rows = _run_processes(worlds, batches, steps, work_steps)
    print(f"loss-aware sampler overhead per step (sample + update), T={T}, history={H}, "
          f"gloo, CPU, {torch.get_num_threads()} thread per rank")
    print(f"{'world':>5} {'batch':>5} {'reference ms':>13} {'iddpm_ds ms':>12} {'ratio':>7}"
          f" {'1 all-gather ms':>16}")
    for world, batch, ref, ours, _, _, gather in rows:
        print(f"{world:>5} {batch:>5} {ref * 1e3:>13.3f} {ours * 1e3:>12.3f} {ref / ours:>6.1f}x"
              f" {gather * 1e3:>16.3f}")
    print(f"same, with {WORK_S * 1e3:.0f} ms of host-idle work (a GPU backward) after each "
          "update, not counted:")
    for world, batch, _, _, ref, ours, _ in rows:
        print(f"{world:>5} {batch:>5} {ref * 1e3:>13.3f} {ours * 1e3:>12.3f} {ref / ours:>6.1f}x")
    print("same, without communication (one process consuming what the gathers return):")
    for world in worlds:
        for batch in batches:
            ref, ours = _compute_only(world, batch, steps[batch])
            print(f"{world:>5} {batch:>5} {ref * 1e3:>13.3f} {ours * 1e3:>12.3f} "
                  f"{ref / ours:>6.1f}x")
    target = [r for r in rows if r[:2] == (4, 256)]
    if target:
        _, _, ref, ours, ref_work, ours_work, _ = target[0]
        print(f"batch 256, world 4: {ref / ours:.1f}x less overhead back to back, "
              f"{ref_work / ours_work:.1f}x with work between steps (target >= 10x)")


if __name__ == "__main__":
    main()
