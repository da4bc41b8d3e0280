"""Divergence guard: an optimizer step with a non-finite loss or gradient norm changes nothing.

Detection and skipping stay on the device, so the per-step path gains no host sync:

- The loss is made to carry NaN into every gradient when it is not finite (`poison`), so
  one finite flag covers both: the global gradient norm, which DeepSpeed all-reduces
  anyway (ZeRO 1-3, mixed precision) or which is computed here from the already reduced
  gradients (ZeRO-0 fp32). A non-finite loss on one rank therefore needs no collective of
  its own, and every rank reaches the same verdict.
- The verdict gates the optimizer where it runs: a pre-step hook hands it to torch's fused
  AdamW as `found_inf`, which leaves weights, both moments and the step count untouched on
  the device (the path of fp32 ZeRO-0 and bf16 ZeRO-2). Where DeepSpeed itself skips a
  non-finite step, reading its own flag on the host (fp16 overflow, fp32 ZeRO 1-2, bf16
  ZeRO 0-1, ZeRO-3), the hook does not run and the step counts as skipped too. DeepSpeedCPUAdam (ZeRO-Offload) takes no device flag; there
  the hook reads the verdict on the host, a path that waits for the host every step anyway.
- `applied` (a device bool) then gates the EMA update and the timestep sampler's history;
  streak and counts are device tensors too.
- The host reads the counters only at log intervals and before checkpoints (`poll`). A
  streak of `limit` skipped steps then stops the run: detection may lag by up to one log
  interval, which costs compute but no state, since skipped steps change nothing.
- fp16 is different: DeepSpeed skips a step whose scaled gradients overflow and halves the
  loss scale, by design (the first steps at 2^20 overflow). Such a skip is not divergence.
  There a step counts towards the streak only when its forward loss was not finite (on
  this rank; `poll` takes the maximum over ranks, so every rank reaches the same verdict),
  and an overflow at the floor scale stops the run at once (loss_scale.py).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as torch_dist

from .. import exits, placement
from ..dist import env

DIVERGED_EXIT = exits.DIVERGED


class Diverged(RuntimeError):
    """The run cannot continue: too many non-finite steps in a row, or non-finite weights."""


class DivergenceGuard:
    """Device-side finite check and skip of each optimizer step, with counters."""

    def __init__(self, engine: Any, limit: int, device: torch.device) -> None:
        self.engine = engine
        self.limit = limit
        self.device = device
        optimizer = engine.basic_optimizer  # the torch optimizer DeepSpeed steps
        # ZeRO-0 fp32: DeepSpeed computes no norm; the parameters' .grad are the reduced ones
        self.direct = engine.optimizer is optimizer
        self.fp16 = bool(engine.fp16_enabled())  # overflow skips are the loss scaler's
        self.grad_norm: torch.Tensor | None = None  # set each step on the direct path
        self.applied = torch.ones((), dtype=torch.bool, device=device)
        self._loss_bad = torch.zeros((), dtype=torch.bool, device=device)
        self._streak = torch.zeros((), dtype=torch.int64, device=device)
        self._longest = torch.zeros((), dtype=torch.int64, device=device)
        self._skipped = torch.zeros((), dtype=torch.int64, device=device)
        self.total = 0           # host, as of the last poll; checkpointed
        self.interval = 0        # host, skipped since the last log
        self.longest = 0         # host, longest streak seen
        self.streak = 0          # host, current streak as of the last poll
        if optimizer.defaults.get("fused"):
            optimizer.register_step_pre_hook(self._gate)
        else:
            self._wrap_on_host(optimizer)

    def poison(self, loss: torch.Tensor) -> torch.Tensor:
        """`loss` unchanged if finite, else a NaN whose gradient is NaN everywhere; a
        non-finite loss is remembered for this step (the fp16 divergence signal)."""
        finite = torch.isfinite(loss)
        self._loss_bad |= ~finite
        return loss * torch.where(finite, 1.0, float("nan"))

    def begin_step(self) -> None:
        # stays False when DeepSpeed skips the step before the optimizer runs
        self.applied = torch.zeros((), dtype=torch.bool, device=self.device)
        self._loss_bad = torch.zeros((), dtype=torch.bool, device=self.device)
        self.grad_norm = None

    @torch.no_grad()
    def measure_grads(self) -> None:
        """ZeRO-0 fp32: the global gradient norm from the reduced gradients, before DeepSpeed
        clips them (call after the accumulation boundary's backward)."""
        if not self.direct:
            return
        grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
        norms = torch._foreach_norm(grads) if grads else [torch.zeros((), device=self.device)]
        self.grad_norm = torch.linalg.vector_norm(torch.stack(norms))

    def _verdict(self) -> torch.Tensor:
        if self.direct:
            if self.grad_norm is None:
                self.measure_grads()
            norm = self.grad_norm
        else:
            norm = getattr(self.engine.optimizer, "_global_grad_norm", None)
            if norm is None:  # compute_grad_norm switched off by an override: nothing to check
                return torch.ones((), dtype=torch.bool, device=self.device)
        norm = torch.as_tensor(norm, dtype=torch.float32, device=self.device)
        return torch.isfinite(norm) & (norm >= 0)  # DeepSpeed reports a non-finite norm as -1

    def _gate(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self.applied = self._verdict()
        optimizer.found_inf = (~self.applied).float()  # fused Adam(W) skips the whole update

    def _wrap_on_host(self, optimizer: torch.optim.Optimizer) -> None:
        step = optimizer.step

        def gated_step(*args: Any, **kwargs: Any) -> Any:
            self.applied = self._verdict()
            return step(*args, **kwargs) if bool(self.applied) else None

        optimizer.step = gated_step

    def end_step(self) -> torch.Tensor:
        """Count the step; returns `applied` for the EMA and the sampler."""
        bad = (self._loss_bad if self.fp16 else ~self.applied).long()
        self._streak = (self._streak + 1) * bad
        self._longest = torch.maximum(self._longest, self._streak)
        self._skipped += bad
        return self.applied

    def poll(self) -> None:
        """Read the counters (host sync; log intervals and saves only, on every rank: the
        verdicts are global, so every rank reads the same numbers)."""
        counters = torch.stack([self._streak, self._longest, self._skipped])
        if self.fp16 and env.world_size() > 1:  # the loss flag is per rank: agree on the worst
            torch_dist.all_reduce(counters, op=torch_dist.ReduceOp.MAX)
        streak, longest, skipped = counters.tolist()
        self._skipped.zero_()
        self._longest.copy_(self._streak)
        self.streak, self.interval = streak, self.interval + skipped
        self.longest, self.total = max(self.longest, longest), self.total + skipped

    def check(self) -> None:
        """Raise Diverged once a streak reached the limit (after `poll`)."""
        if self.longest >= self.limit:
            what = "loss (fp16: gradient overflows are the loss scaler's)" if self.fp16 \
                else "loss or gradient norm"
            raise Diverged(
                f"training diverged: {self.longest} optimizer steps in a row had a non-finite "
                f"{what} (train.max_nonfinite_steps={self.limit}); they were skipped, so "
                "weights, Adam moments and EMA are those of the last finite step")

    def metrics(self) -> dict[str, int]:
        """Counts for the log record (after `poll`); resets the interval count."""
        out = {"nonfinite_steps": self.interval, "nonfinite_steps_total": self.total,
               "nonfinite_streak": self.streak}
        self.interval = 0
        return out

    def state_dict(self) -> dict[str, int]:
        return {"nonfinite_steps_total": self.total}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.total = int(state["nonfinite_steps_total"])


def all_finite(tensors: list[torch.Tensor]) -> bool:
    """Every element of every tensor finite, on every rank (collective; saves only)."""
    bad = torch.zeros((), dtype=torch.int32, device=placement.device())
    for tensor in tensors:
        bad |= (~torch.isfinite(tensor)).any().to(bad.device, torch.int32)
    if env.world_size() > 1:
        torch_dist.all_reduce(bad, op=torch_dist.ReduceOp.MAX)
    return not bool(bad)
