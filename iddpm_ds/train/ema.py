"""Exponential moving averages of the fp32 master weights, one per rate."""
from __future__ import annotations

import torch

from .master import MasterWeights


class EMA:
    """EMA at each rate of `master.local()`, updated after every applied optimizer step.

    ema <- rate * ema + (1 - rate) * master, from step 0 with no warm-up (reference). Kept in
    the master's local layout (per ZeRO partition), updated with fused `_foreach` ops.
    """

    def __init__(self, master: MasterWeights, rates: tuple[float, ...]) -> None:
        self.master = master
        self.rates = tuple(rates)
        with torch.no_grad():
            self.params = [[t.detach().clone().float() for t in master.local()] for _ in self.rates]

    @torch.no_grad()
    def update(self, applied: torch.Tensor | None = None) -> None:
        """One EMA step. With `applied` (device bool scalar) False the EMA stays as it was,
        decided on the device: a skipped optimizer step must not move it. The gate costs
        one transient copy of the local masters; x1 is exact, so an applied step rounds
        exactly as the ungated update."""
        source = [t.detach() for t in self.master.local()]
        if applied is not None:
            source = torch._foreach_mul(source, applied.to(torch.float32))
        for rate, ema in zip(self.rates, self.params):
            factor = rate if applied is None else torch.where(applied, rate, 1.0).float()
            # mul then add, exactly the reference's update (a lerp rounds differently)
            torch._foreach_mul_(ema, factor)
            torch._foreach_add_(ema, source, alpha=1.0 - rate)

    def full_state_dict(self, rate: float) -> dict[str, torch.Tensor]:
        """Full EMA weights at one rate, by parameter name (collective under ZeRO)."""
        return self.master.full_state_dict(self.params[self.rates.index(rate)])

    def full_state_dicts(self) -> dict[float, dict[str, torch.Tensor]]:
        """Full EMA weights per rate, by parameter name (collective under ZeRO: all ranks)."""
        return {rate: self.master.full_state_dict(ema) for rate, ema in zip(self.rates, self.params)}

    def load_full_state_dicts(self, states: dict[float, dict[str, torch.Tensor]]) -> list[float]:
        """Restore from full state dicts (any world size; collective under ZeRO). A rate the
        checkpoint lacks (added to the spec since) starts from the current master weights;
        returns those rates."""
        started = []
        for i, rate in enumerate(self.rates):
            if rate in states:
                self.params[i] = self.master.local_from_full(states[rate])
            else:
                with torch.no_grad():
                    self.params[i] = [t.detach().clone().float() for t in self.master.local()]
                started.append(rate)
        return started
