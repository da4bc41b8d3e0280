"""Timestep samplers for diffusion training: uniform, and loss-aware importance sampling.

A schedule sampler draws the training timesteps t with probability p_t and returns the
importance weights 1/(T p_t), so that mean(loss * weights) is an unbiased estimate of the
uniform mean over timesteps. `LossSecondMomentResampler` is the reference's (IDDPM,
Nichol & Dhariwal 2021, sec. 3.3) choice p_t ~ sqrt(E[L_t^2]), estimated from the last
`history_per_term` losses seen at each t, mixed with `uniform_prob` of uniform mass; it
samples uniformly until every timestep has a full history.

Distributed service design (differences from the reference, which all-gathers three
times, walks every element with `.item()` and forgets its history on resume):

- `update_with_local_losses` issues EXACTLY ONE collective per call (none at world size
  1): every rank packs its (t, loss) pairs into a fixed-size int64 buffer [2, C] (the
  timesteps, then the float64 losses' bits) of C = `max_local_batch` slots, padding
  with t = T, and all ranks all-gather these buffers (all_gather_into_tensor, called
  all_gather_single in newer torch). The
  capacity must be known to all ranks without a collective, so it is fixed at
  construction (the trainer passes its micro-batch size); local batches may be smaller
  (zero included) and differ between ranks; a larger one raises on that rank before
  anything is sent.
- The all-gather is issued with async_op and applied when the sampler is next read
  (the next `sample`, or `metrics`, `state_dict`, ...): the next draw sees the update, as
  in the reference, while the latency overlaps whatever runs in between (the backward
  pass). Collectives stay in the same order on every rank, so other collectives in
  between (DeepSpeed's gradient reductions) are fine.
- Every rank applies the same vectorised update (a stable sort by t, each sample's rank
  among the same-t arrivals, scatter into ring slots (total_t + k) % H) to identical
  gathered data in identical rank-major order, so history, counts and weights are
  bit-identical on all ranks, and equal to appending the losses one by one: rank 0's
  samples in order, then rank 1's, ... (as the reference does).
- Padding, losses that a timestep receives more than `history_per_term` times in one
  update (only the newest H can survive) and non-finite losses (which would poison the
  distribution until pushed out) are all written into a spare sink row T, never read.
- An optimizer step the trainer skips (non-finite loss or gradient norm) leaves the
  history as it was: `begin_step` keeps a copy of history and counts (small: [T+1, H]),
  `end_step(applied)` puts it back with a torch.where on the device flag. No collective
  and no host sync are added.
- Every rank must call `update_with_local_losses` on every micro-step (it is a
  collective; with gradient accumulation each micro-batch's losses are appended, as in
  the reference). The sampler is independent of the model, so of its ZeRO stage.
- No host synchronisation on the per-step path: history, counts and probabilities live
  on the device, draws come from a per-rank `torch.Generator` seeded from (seed, rank).
- `state_dict()` holds the global history (chronological, oldest first, as the
  reference lays it out), counts and ring phase, identical on every rank, so a
  checkpoint reloads at any world size and the resumed sampler is bit-identical to the
  uninterrupted one (as warm, same weights).
"""
from __future__ import annotations

import abc
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from iddpm_ds.spec.sampler import SamplerSpec

# Slots per rank in the gathered buffer when the caller does not state its largest local
# batch; the trainer should pass its micro-batch size instead (smaller buffer, no surprise).
DEFAULT_MAX_LOCAL_BATCH = 1024


def stream_seed(seed: int, rank: int) -> int:
    """Well-mixed 63-bit generator seed for one rank: nearby (seed, rank) pairs get
    unrelated streams, and no two ranks share one."""
    state = np.random.SeedSequence([int(seed), int(rank)]).generate_state(1, dtype=np.uint64)
    return int(state[0]) & ((1 << 63) - 1)


class ScheduleSampler(abc.ABC):
    """Draws timesteps t with probability p_t and weights 1/(T p_t) for one rank."""

    name: str = ""

    def __init__(self, num_timesteps: int, *, device: torch.device | str, seed: int,
                 rank: int) -> None:
        if num_timesteps < 1:
            raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
        self.num_timesteps = int(num_timesteps)
        self.device = torch.device(device)
        self._generator = torch.Generator(device=self.device)
        self._generator.manual_seed(stream_seed(seed, rank))

    @abc.abstractmethod
    def weights(self) -> torch.Tensor:
        """Unnormalised sampling weights per timestep, [T] float64 on the device."""

    def probabilities(self) -> torch.Tensor:
        """p_t, [T] float64 on the device, summing to 1."""
        w = self.weights()  # [T]
        return w / w.sum()

    def sample(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw batch_size timesteps. Returns t (int64 [N]) and weights 1/(T p_t) (float32 [N])."""
        p = self.probabilities()  # [T]
        if batch_size == 0:  # multinomial refuses zero draws
            empty = torch.zeros(0, dtype=torch.int64, device=self.device)
            return empty, torch.zeros(0, dtype=torch.float32, device=self.device)
        t = torch.multinomial(p, batch_size, replacement=True, generator=self._generator)  # [N]
        weights = (1.0 / (self.num_timesteps * p[t])).float()  # [N]
        return t, weights

    def update_with_local_losses(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        """Report this rank's per-sample losses at timesteps t (no-op unless loss-aware)."""

    def begin_step(self) -> None:
        """An optimizer step starts: remember the history its updates may have to drop."""

    def end_step(self, applied: torch.Tensor) -> None:
        """The step ended; with `applied` (device bool scalar, the same on every rank) False
        it was skipped, and its updates are dropped on the device, without a host sync."""

    @property
    def warmed_up(self) -> torch.Tensor:
        """Device bool scalar: the sampler has left its uniform warm-up."""
        return torch.ones((), dtype=torch.bool, device=self.device)

    def metrics(self) -> dict[str, torch.Tensor]:
        """Device float32 scalars for the training log (no host sync): warmup_fraction,
        entropy (nats) of p, weight_min and weight_max (over all timesteps)."""
        p = self.probabilities()  # [T]
        weights = 1.0 / (self.num_timesteps * p)  # [T]
        values = {
            "warmup_fraction": self._warmup_fraction(),
            "entropy": -torch.special.xlogy(p, p).sum(),
            "weight_min": weights.min(),
            "weight_max": weights.max(),
        }
        return {key: value.float() for key, value in values.items()}

    def _warmup_fraction(self) -> torch.Tensor:
        return torch.ones((), dtype=torch.float64, device=self.device)

    def rng_state(self) -> torch.Tensor:
        """This rank's generator state (uint8 CPU tensor); per rank, save one per rank."""
        return self._generator.get_state()

    def set_rng_state(self, state: torch.Tensor) -> None:
        self._generator.set_state(state.detach().to("cpu", torch.uint8))

    def state_dict(self) -> dict[str, Any]:
        """Global (rank-independent) state of plain types and CPU tensors."""
        return {"name": self.name, "num_timesteps": self.num_timesteps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("name") != self.name:
            raise ValueError(f"checkpoint holds a {state.get('name')!r} sampler, not {self.name!r}")
        if int(state["num_timesteps"]) != self.num_timesteps:
            raise ValueError(f"checkpoint sampler has T={state['num_timesteps']}, "
                             f"this one T={self.num_timesteps}")


class UniformSampler(ScheduleSampler):
    """Every timestep equally likely; all weights are 1."""

    name = "uniform"

    def weights(self) -> torch.Tensor:
        return torch.ones(self.num_timesteps, dtype=torch.float64, device=self.device)

    def sample(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        t = torch.randint(0, self.num_timesteps, (batch_size,), generator=self._generator,
                          device=self.device)  # [N]
        return t, torch.ones(batch_size, dtype=torch.float32, device=self.device)


class LossSecondMomentResampler(ScheduleSampler):
    """p_t ~ sqrt(mean of the last H squared losses at t), mixed with uniform_prob of
    uniform mass; uniform until every t has H losses. See the module docstring."""

    name = "loss-second-moment"

    def __init__(self, num_timesteps: int, *, device: torch.device | str, seed: int, rank: int,
                 history_per_term: int = 10, uniform_prob: float = 0.001,
                 max_local_batch: int = DEFAULT_MAX_LOCAL_BATCH,
                 history_dtype: torch.dtype = torch.float64,
                 group: dist.ProcessGroup | None = None) -> None:
        super().__init__(num_timesteps, device=device, seed=seed, rank=rank)
        if history_per_term < 1 or not 0.0 <= uniform_prob <= 1.0 or max_local_batch < 1:
            raise ValueError("need history_per_term >= 1, 0 <= uniform_prob <= 1, "
                             "max_local_batch >= 1")
        self.history_per_term = int(history_per_term)
        self.uniform_prob = float(uniform_prob)
        self.max_local_batch = int(max_local_batch)
        self._group = group
        T, H = self.num_timesteps, self.history_per_term
        # Ring buffer per timestep; row T is a sink for padding and discarded losses.
        self._history = torch.zeros(T + 1, H, dtype=history_dtype, device=self.device)  # [T+1, H]
        # Losses ever appended per t; the next write goes to slot total % H.
        self._total = torch.zeros(T + 1, dtype=torch.int64, device=self.device)  # [T+1]
        # Send buffer template: t = T (the sink) and loss bits 0 in every unused slot.
        self._empty_packet = torch.zeros(2, self.max_local_batch, dtype=torch.int64,
                                         device=self.device)  # [2, C]
        self._empty_packet[0] = T
        self._iota = torch.zeros(0, dtype=torch.int64, device=self.device)  # [M], cached arange
        self._ones = self._iota  # [M], cached ones
        # All-gather issued by the last update and not yet applied: (work or None, output).
        self._pending: tuple[Any, torch.Tensor] | None = None
        self._p: torch.Tensor | None = None  # [T] probabilities, recomputed after an update
        self._weight_of_t: torch.Tensor | None = None  # [T] float32 1/(T p_t)
        self._before_step: tuple[torch.Tensor, torch.Tensor] | None = None  # see begin_step

    # --- reading the state -------------------------------------------------------------
    def counts(self) -> torch.Tensor:
        """Losses held per timestep (at most H), [T] int64."""
        self._settle()
        return self._total[: self.num_timesteps].clamp(max=self.history_per_term)

    def _oldest_slot(self) -> torch.Tensor:
        self._settle()
        H = self.history_per_term
        total = self._total[: self.num_timesteps]  # [T]
        return torch.where(total >= H, total % H, torch.zeros_like(total))  # [T]

    def history(self) -> torch.Tensor:
        """Loss history in chronological order (oldest first, unused slots zero), [T, H]."""
        slots = torch.arange(self.history_per_term, device=self.device)  # [H]
        slots = (self._oldest_slot()[:, None] + slots) % self.history_per_term  # [T, H]
        return self._history[: self.num_timesteps].gather(1, slots)

    @property
    def warmed_up(self) -> torch.Tensor:
        self._settle()
        return (self._total[: self.num_timesteps] >= self.history_per_term).all()

    def _warmup_fraction(self) -> torch.Tensor:
        self._settle()
        full = self._total[: self.num_timesteps] >= self.history_per_term  # [T]
        return full.to(torch.float64).mean()

    def _mixed(self) -> torch.Tensor:
        """Root-mean-square loss per t normalised to sum 1, times (1 - uniform_prob), plus
        uniform_prob / T. [T] float64."""
        self._settle()
        T = self.num_timesteps
        history = self._history[:T].to(torch.float64)  # [T, H]
        # sqrt(sum) is sqrt(H) times the root mean square; the factor cancels below. Summed
        # in ring order: deterministic given the global state (ring phase included, and
        # checkpointed), so identical on all ranks and across a resume.
        norm = (history * history).sum(dim=-1).sqrt()  # [T]
        scale = (1.0 - self.uniform_prob) / norm.sum().clamp_min(torch.finfo(torch.float64).tiny)
        return norm * scale + self.uniform_prob / T  # [T], sums to 1

    def weights(self) -> torch.Tensor:
        """The reference's weights: ones during warm-up, else `_mixed()`. [T] float64."""
        return torch.where(self.warmed_up, self._mixed(), 1.0)

    def probabilities(self) -> torch.Tensor:
        self._settle()
        if self._p is None:
            self._p = torch.where(self.warmed_up, self._mixed(), 1.0 / self.num_timesteps)
        return self._p

    def sample(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        p = self.probabilities()  # [T]
        if self._weight_of_t is None:  # once per update, not per draw
            self._weight_of_t = (1.0 / (self.num_timesteps * p)).float()  # [T]
        if batch_size == 0:
            return super().sample(0)
        t = torch.multinomial(p, batch_size, replacement=True, generator=self._generator)  # [N]
        return t, self._weight_of_t[t]

    # --- the update -------------------------------------------------------------------
    def update_with_local_losses(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        """Append this rank's (t, loss) pairs and every other rank's to the shared history.

        A collective: every rank must call it on every micro-step, with its own local
        batch (sizes may differ, up to max_local_batch, zero included). Exactly one
        all-gather per call, issued asynchronously: it is waited for and applied when the
        sampler is next read (sample, metrics, state_dict, ...), so the next draw sees it
        as in the reference while its latency overlaps whatever the caller does in
        between (the backward pass). No host synchronisation besides that wait.
        """
        if t.ndim != 1 or losses.shape != t.shape:
            raise ValueError(f"need t [N] and losses [N], got {tuple(t.shape)}, "
                             f"{tuple(losses.shape)}")
        if t.shape[0] > self.max_local_batch:
            raise ValueError(f"local batch {t.shape[0]} exceeds max_local_batch="
                             f"{self.max_local_batch}; build the sampler with the largest "
                             "micro-batch")
        self._settle()  # updates apply in call order
        self._pending = self._all_gather(self._pack(t, losses))
        self._p = self._weight_of_t = None

    def _settle(self) -> None:
        """Wait for the in-flight all-gather, if any, and append what it brought."""
        if self._pending is None:
            return
        work, gathered = self._pending
        self._pending = None
        if work is not None:
            work.wait()  # NCCL: the current stream waits, the host does not
        self._apply_gathered(gathered)

    def _apply_gathered(self, gathered: torch.Tensor) -> None:
        """Append every rank's packet of the all-gather ([W, 2, C] int64), rank by rank."""
        t_all = gathered[:, 0].reshape(-1)  # [W*C], rank-major
        loss_all = gathered[:, 1].view(torch.float64).reshape(-1)  # [W*C]
        self._append(t_all, loss_all)
        self._p = self._weight_of_t = None

    def _pack(self, t: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
        """[2, C] int64: timesteps, then the float64 losses' bits (one dtype, one gather)."""
        n = t.shape[0]
        packed = self._empty_packet.clone()  # [2, C]
        packed[0, :n] = t.detach().to(self.device)
        packed[1, :n] = losses.detach().to(self.device, torch.float64).view(torch.int64)
        return packed

    def _all_gather(self, packed: torch.Tensor) -> tuple[Any, torch.Tensor]:
        """The single collective, started: [2, C] per rank -> (work, [W, 2, C] in rank order)."""
        if not (dist.is_available() and dist.is_initialized()):
            return None, packed.unsqueeze(0)
        world = dist.get_world_size(self._group)
        if world == 1:
            return None, packed.unsqueeze(0)
        out = torch.empty(world * packed.numel(), dtype=packed.dtype, device=packed.device)
        # Looked up at call time (not bound at import) so tests can observe the real call.
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        work = gather(out, packed.reshape(-1), group=self._group, async_op=True)
        return work, out.view(world, *packed.shape)

    def _append(self, t_all: torch.Tensor, loss_all: torch.Tensor) -> None:
        """Vectorised equivalent of appending each (t, loss) in order to t's history."""
        T, H = self.num_timesteps, self.history_per_term
        if self._iota.shape != t_all.shape:
            self._iota = torch.arange(t_all.shape[0], device=self.device)  # [M]
            self._ones = torch.ones_like(self._iota)  # [M]
        t_all = torch.where(torch.isfinite(loss_all), t_all, T)  # [M] non-finite -> sink
        t_sorted, order = torch.sort(t_all, stable=True)  # [M]; ties keep arrival order
        loss_sorted = loss_all[order].to(self._history.dtype)  # [M]
        first = torch.searchsorted(t_sorted, t_sorted)  # [M] sorted index of t's first arrival
        end = torch.searchsorted(t_sorted, t_sorted, right=True)  # [M] one past its last
        k = self._iota - first  # [M] arrival rank within its timestep
        row = torch.where(self._iota >= end - H, t_sorted, T)  # [M] only the newest H survive
        slot = (self._total[t_sorted] + k) % H  # [M] distinct among the survivors of one t
        self._history.view(-1).index_put_((row * H + slot,), loss_sorted)
        self._total.index_add_(0, t_all, self._ones)

    # --- skipped optimizer steps ------------------------------------------------------
    def begin_step(self) -> None:
        self._settle()
        self._before_step = (self._history.clone(), self._total.clone())  # [T+1, H], [T+1]

    def end_step(self, applied: torch.Tensor) -> None:
        # settled now rather than at the next draw: the gather had the backward pass and
        # the optimizer step to complete, and a dropped step must drop its last update too
        self._settle()
        history, total = self._before_step
        self._history = torch.where(applied, self._history, history)
        self._total = torch.where(applied, self._total, total)
        self._before_step = None
        self._p = self._weight_of_t = None

    # --- checkpointing ----------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """History (chronological, oldest first, the reference's layout), counts and ring
        phase as CPU tensors; identical on every rank, so any rank may save it and any
        world size may load it."""
        return {
            **super().state_dict(),
            "history_per_term": self.history_per_term,
            "uniform_prob": self.uniform_prob,
            "loss_history": self.history().cpu(),  # [T, H]
            "loss_counts": self.counts().cpu(),  # [T]
            "ring_offset": self._oldest_slot().cpu(),  # [T] slot of the oldest loss
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore history, counts and ring phase (a state without "ring_offset", e.g. a
        history in the reference's layout, starts at phase 0); uniform_prob and the
        capacity keep this sampler's values."""
        super().load_state_dict(state)
        self._settle()  # completes this rank's part of an in-flight gather, then overwrites
        T, H = self.num_timesteps, self.history_per_term
        history = torch.as_tensor(state["loss_history"]).to(self.device, self._history.dtype)
        counts = torch.as_tensor(state["loss_counts"]).to(self.device, torch.int64)
        offset = torch.as_tensor(state.get("ring_offset", torch.zeros(T, dtype=torch.int64)))
        offset = offset.to(self.device, torch.int64)
        if tuple(history.shape) != (T, H) or counts.shape != (T,) or offset.shape != (T,):
            raise ValueError(f"checkpoint history {tuple(history.shape)} / counts / offsets "
                             f"do not fit T={T}, history_per_term={H}")
        bad = (counts < 0) | (counts > H) | (offset < 0) | (offset >= H)
        bad |= (counts < H) & (offset != 0)
        if bool(bad.any()):
            raise ValueError(f"checkpoint counts must lie in [0, {H}], offsets in [0, {H}) "
                             "and be 0 for timesteps without a full history")
        slots = (offset[:, None] + torch.arange(H, device=self.device)) % H  # [T, H]
        self._history.zero_()
        self._history[:T].scatter_(1, slots, history)
        self._total.zero_()
        self._total[:T] = torch.where(counts == H, H + offset, counts)
        self._p = self._weight_of_t = None


def build_schedule_sampler(spec: SamplerSpec, num_timesteps: int, *, device: torch.device | str,
                           seed: int, rank: int, max_local_batch: int | None = None,
                           group: dist.ProcessGroup | None = None) -> ScheduleSampler:
    """The sampler a job spec asks for. max_local_batch: the largest per-rank batch that
    will ever be passed to update_with_local_losses (the micro-batch size); it sizes the
    one all-gather and must be the same on every rank."""
    if spec.name == "uniform":
        return UniformSampler(num_timesteps, device=device, seed=seed, rank=rank)
    if spec.name == "loss-second-moment":
        return LossSecondMomentResampler(
            num_timesteps, device=device, seed=seed, rank=rank,
            history_per_term=spec.history_per_term, uniform_prob=spec.uniform_prob,
            max_local_batch=max_local_batch or DEFAULT_MAX_LOCAL_BATCH, group=group)
    raise ValueError(f"unknown schedule sampler {spec.name!r}")  # unreachable with a valid spec
