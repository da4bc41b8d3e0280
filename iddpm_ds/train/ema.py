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
    def update(self) -> None:
        source = [t.detach() for t in self.master.local()]
        for rate, ema in zip(self.rates, self.params):
            # mul then add, exactly the reference's update (a lerp rounds differently)
            torch._foreach_mul_(ema, rate)
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
