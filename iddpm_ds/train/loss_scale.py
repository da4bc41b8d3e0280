"""The fp16 dynamic loss scale: the reference's lg_loss_scale, kept by DeepSpeed.

The reference starts at 2^20, halves the scale on a step whose gradients overflow (and
skips that step), and grows lg_loss_scale by 1e-3 per clean step, i.e. doubles the scale
after 1,000 clean steps. ds_configs/fp16.json asks DeepSpeed for the same: initial scale
power 20, window 1000, hysteresis 1, factor 2.

This module is the one place that knows where each DeepSpeed fp16 optimizer keeps its
scale, and it fixes two things DeepSpeed 0.19.8 does not do for us:

- **ZeRO-0 scales nothing.** `engine.backward` multiplies the loss by the scale only for
  ZeRO optimizers; FP16_UnfusedOptimizer (ZeRO-0, torch AdamW) still divides the
  gradients by it in `step()`, so AdamW received gradients 2^-20 too small and clipping
  never applied (measured: true norm 1.24, norm reaching AdamW 1.19e-6). `scale_loss`
  applies the scale there. Verified on DeepSpeed 0.19.8 only (runtime/engine.py
  `backward`: `if isinstance(self.optimizer, ZeROOptimizer): loss = ...scale_if_loss`);
  another version refuses fp16 at ZeRO-0 rather than risk scaling twice
  (ds_config.ZERO0_FP16_VERIFIED).
- **The floor is a traceback.** ZeRO's DynamicLossScaler raises a bare Exception on an
  overflow at the minimum scale. That check is switched off here and the same condition
  (an overflow at the floor: the gradients overflow unscaled) becomes `Diverged`, the
  documented exit 3 with one line.

The scale's state is checkpointed by the trainer's registry (REPLICATED), so it survives
a resume at another world size, where DeepSpeed's universal checkpoint does not carry it.
"""
from __future__ import annotations

import math
from typing import Any

from .guard import Diverged

_STATE_KEYS = ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis")


class LossScale:
    """Host-side view of an engine's fp16 loss scale (inactive for other precisions)."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.active = bool(engine.fp16_enabled())
        optimizer = engine.optimizer
        # ZeRO 1-3 keep a DynamicLossScaler; the ZeRO-0 fp16 optimizers a LossScaleConfig
        self._scaler = getattr(optimizer, "loss_scaler", None) or getattr(optimizer, "loss_scale_config", None)
        self._unscaled_backward = self.active and not engine.zero_optimization()
        self.overflow_skips = 0        # host; since the last log
        self.overflow_skips_total = 0  # host; checkpointed
        if self.active and hasattr(self._scaler, "raise_error_at_min_scale"):
            self._scaler.raise_error_at_min_scale = False  # the floor is ours: Diverged

    @property
    def value(self) -> float | None:
        """The current scale (a host float), or None outside fp16."""
        return float(self._scaler.cur_scale) if self.active else None

    @property
    def floor(self) -> float:
        scaler = self._scaler
        return float(getattr(scaler, "min_scale", None) or getattr(scaler, "min_loss_scale", None) or 1.0)

    def scale_loss(self, loss: Any) -> Any:
        """The loss to hand to engine.backward: scaled here where DeepSpeed does not (ZeRO-0)."""
        return loss * self._scaler.cur_scale if self._unscaled_backward else loss

    def after_step(self, scale_before: float | None) -> None:
        """After engine.step() at an accumulation boundary: count an overflow skip, and stop
        the run (Diverged) when the gradients overflowed at the floor scale. Host only:
        DeepSpeed already read its overflow flag on the host."""
        if not self.active or not self.engine.optimizer.overflow:
            return
        self.overflow_skips += 1
        self.overflow_skips_total += 1
        if scale_before is not None and scale_before <= self.floor:
            raise Diverged(
                f"training diverged: fp16 gradients overflowed at the minimum loss scale "
                f"{self.floor:g} (lg_loss_scale {math.log2(self.floor):g}), so they are not "
                "finite even unscaled; the step was skipped")

    def metrics(self) -> dict[str, float | int]:
        """lg_loss_scale and the overflow skips since the last call (fp16 only)."""
        if not self.active:
            return {}
        out = {"lg_loss_scale": math.log2(self.value), "overflow_skips": self.overflow_skips,
               "overflow_skips_total": self.overflow_skips_total}
        self.overflow_skips = 0
        return out

    def state_dict(self) -> dict[str, Any]:
        if not self.active:
            return {}
        state = {key: getattr(self._scaler, key) for key in _STATE_KEYS if hasattr(self._scaler, key)}
        return {**state, "overflow_skips_total": self.overflow_skips_total}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the scale (any world size). A checkpoint of another precision has none:
        the scale then starts at its configured initial value."""
        if not self.active or not state:
            return
        for key in _STATE_KEYS:
            if key in state and hasattr(self._scaler, key):
                setattr(self._scaler, key, state[key])
        self.overflow_skips_total = int(state.get("overflow_skips_total", 0))
