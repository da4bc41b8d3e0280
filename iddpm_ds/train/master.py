"""Uniform access to a DeepSpeed engine's fp32 master weights, whatever the ZeRO stage.

The EMA follows the fp32 masters (reference semantics). Under ZeRO 1/2/3 those are flat
partitions owned by this rank, so the EMA is kept per partition too: it costs 4 bytes per
parameter per rate divided by the data-parallel size, and one fused `_foreach` op per
step, with no communication. Full (unpartitioned) tensors are assembled only for
checkpoints, exports and sample grids, through DeepSpeed's own fragment mapping
(`safe_get_full_fp32_param`): the EMA values are swapped into the master partition,
gathered, and swapped back, so no index arithmetic of ours can drift from DeepSpeed's.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

_FLAT_PARTITIONS = ("single_partition_of_fp32_groups",  # ZeRO 1/2
                    "fp32_partitioned_groups_flat",     # ZeRO 3
                    "fp32_groups_flat_partition")       # BF16_Optimizer


class MasterWeights:
    """This rank's fp32 master tensors of an engine, and full <-> local conversion."""

    def __init__(self, engine: torch.nn.Module) -> None:
        self.engine = engine
        self.names = [name for name, _ in engine.module.named_parameters()]
        self.params = [param for _, param in engine.module.named_parameters()]
        optimizer = getattr(engine, "optimizer", None)
        self.partitioned = False
        self._local: list[torch.Tensor]
        for attr in _FLAT_PARTITIONS:
            if hasattr(optimizer, attr):
                self._local = list(getattr(optimizer, attr))
                self.partitioned = True
                return
        if hasattr(optimizer, "fp16_groups") and hasattr(optimizer, "fp32_groups"):
            # ZeRO-0 mixed precision: one full fp32 copy per parameter, in group order.
            by_id = {id(p): i for i, p in enumerate(self.params)}
            pairs = [(by_id[id(lp)], hp) for lps, hps in zip(optimizer.fp16_groups, optimizer.fp32_groups)
                     for lp, hp in zip(lps, hps)]
            self._local = [hp for _, hp in sorted(pairs, key=lambda pair: pair[0])]
        else:  # ZeRO-0 fp32: the parameters are the masters
            self._local = self.params

    def local(self) -> list[torch.Tensor]:
        """This rank's fp32 master tensors (flat partitions or per-parameter tensors)."""
        return self._local

    def full_state_dict(self, local: list[torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Full fp32 tensors by parameter name, on CPU; collective under ZeRO (call on all ranks).

        With `local` (same layout as `local()`, e.g. an EMA), those values are assembled instead.
        """
        with self._swapped(local):
            if not self.partitioned:
                return {n: t.detach().float().cpu().clone() for n, t in zip(self.names, self._local)}
            return {n: safe_get_full_fp32_param(p).detach().cpu().clone()
                    for n, p in zip(self.names, self.params)}

    def local_from_full(self, state: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """The local layout of a full state dict (e.g. a saved EMA), at this world size."""
        missing = [n for n in self.names if n not in state]
        if missing:
            raise KeyError(f"state dict lacks parameters {missing[:5]}")
        if not self.partitioned:
            return [state[n].to(t.device, torch.float32).clone().view_as(t)
                    for n, t in zip(self.names, self._local)]
        backup = [t.detach().clone() for t in self._local]
        try:
            for name, param in zip(self.names, self.params):
                _set_full_fp32(param, state[name].to(torch.float32))
            return [t.detach().clone() for t in self._local]
        finally:
            with torch.no_grad():
                torch._foreach_copy_(self._local, backup)

    @contextmanager
    def _swapped(self, local: list[torch.Tensor] | None) -> Iterator[None]:
        if local is None:
            yield
            return
        backup = [t.detach().clone() for t in self._local]
        with torch.no_grad():
            torch._foreach_copy_(self._local, local)
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_(self._local, backup)



def _set_full_fp32(param: torch.Tensor, value: torch.Tensor) -> None:
    """safe_set_full_fp32_param, except for ZeRO-3 where DeepSpeed 0.19.8 slices past the
    end of the value on the rank holding the padded last partition ("start + length
    exceeds dimension size"); there the slice is copied by hand with the same mapping."""
    if not hasattr(param, "ds_id"):
        safe_set_full_fp32_param(param, value)
        return
    optimizer = param._z3_optimizer
    partition, _ = optimizer._get_fp32_opt_state_partition(param, release_swap_buffers=False)
    start = partition.numel() * optimizer._get_param_partition_rank(param)
    piece = value.flatten()[start: start + partition.numel()]
    with torch.no_grad():
        partition.zero_()
        partition[: piece.numel()].copy_(piece)
