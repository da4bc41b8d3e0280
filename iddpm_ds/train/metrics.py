"""Training metrics: accumulated on the device every micro-step, read at log intervals.

Per-sample losses are summed overall and per quartile of t (reference keys key_q0..q3,
quartile = int(4 t / T)) with index_add_, so a micro-step costs a few tiny kernels and no
host sync. At a log interval all ranks pack their sums into one tensor, all-reduce it
once, and rank 0 writes JSONL, TensorBoard and a console line.

`loss` is the raw per-sample loss; `loss_weighted` is loss * importance weight (what the
backward pass sees, and what the reference logs under loss-aware sampling). With the
uniform sampler the two are equal.
"""
from __future__ import annotations

import json
import math
import resource
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as torch_dist

from .. import placement
from ..dist import env, output
from .flops import peak_flops


class LossAccumulator:
    """On-device sums of per-sample losses, overall and by timestep quartile."""

    def __init__(self, num_timesteps: int, device: torch.device) -> None:
        self.num_timesteps = num_timesteps
        self.device = device
        self.keys: list[str] = []
        self.sums: dict[str, torch.Tensor] = {}   # key -> [5]: quartiles 0..3, then total
        self.counts = torch.zeros(5, dtype=torch.float64, device=device)

    @torch.no_grad()
    def accumulate(self, t: torch.Tensor, losses: dict[str, torch.Tensor],
                   weights: torch.Tensor | None = None) -> None:
        """Add one micro-batch: `losses` maps key -> [N]; `weights` [N] (the sampler's
        importance weights) adds `loss_weighted` = loss * weights."""
        if weights is not None:
            losses = {**losses, "loss_weighted": losses["loss"].detach() * weights}
        quartile = (4 * t // self.num_timesteps).clamp_(0, 3)            # [N]
        ones = torch.ones_like(t, dtype=torch.float64)
        self.counts.index_add_(0, quartile, ones)
        self.counts[4] += t.shape[0]
        for key, values in losses.items():
            if key not in self.sums:
                self.keys.append(key)
                self.sums[key] = torch.zeros(5, dtype=torch.float64, device=self.device)
            values = values.detach().to(torch.float64)                    # [N]
            self.sums[key].index_add_(0, quartile, values)
            self.sums[key][4] += values.sum()

    def reduce(self) -> dict[str, float]:
        """Global means over all ranks since the last call (collective), then reset."""
        keys = sorted(self.keys)
        packed = torch.stack([self.counts] + [self.sums[k] for k in keys])  # [1 + K, 5]
        if env.world_size() > 1:
            torch_dist.all_reduce(packed)
        packed = packed.cpu()
        counts, out = packed[0], {}
        for i, key in enumerate(keys, start=1):
            out[key] = float(packed[i, 4] / counts[4]) if counts[4] else math.nan
            for q in range(4):
                if counts[q]:
                    out[f"{key}_q{q}"] = float(packed[i, q] / counts[q])
        self.counts.zero_()
        for key in keys:
            self.sums[key].zero_()
        return out


def memory_mb(device: torch.device) -> float:
    """Peak memory of this rank: device memory on a GPU, else the process's max RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def utilisation(flops_per_image: int, img_per_s: float, device: torch.device,
                precision: str) -> dict[str, Any]:
    """Model FLOP/s per rank, MFU against the device's data-sheet peak (null without one,
    e.g. on CPU), and peak memory (collective: every rank's), for one log interval."""
    achieved = flops_per_image * img_per_s / env.world_size()  # img_per_s is all ranks'
    peak = peak_flops(device, precision)
    return {
        "flops_per_image": flops_per_image,
        "tflops_per_s_per_rank": achieved / 1e12,
        "peak_tflops_per_s": peak / 1e12 if peak else None,
        "mfu": achieved / peak if peak else None,
        "memory_mb_per_rank": gather_floats(memory_mb(device)),
        # what memory_mb_per_rank is: a CPU has no allocator peak, its max RSS stands in
        "memory_kind": "cuda_max_allocated" if device.type == "cuda" else "cpu_max_rss",
    }


def gather_floats(value: float) -> list[float]:
    """One float from every rank (collective); small, only at log intervals."""
    tensor = torch.tensor([value], dtype=torch.float64, device=placement.device())
    if env.world_size() == 1:
        return [value]
    out = [torch.zeros_like(tensor) for _ in range(env.world_size())]
    torch_dist.all_gather(out, tensor)
    return [float(t) for t in out]


def finite_or_null(value: Any) -> tuple[Any, int]:
    """`value` with every non-finite float (in dicts and lists too) replaced by None, and
    how many were replaced."""
    if isinstance(value, float) and not math.isfinite(value):
        return None, 1
    if isinstance(value, dict):
        items = [(k, *finite_or_null(v)) for k, v in value.items()]
        return {k: v for k, v, _ in items}, sum(n for _, _, n in items)
    if isinstance(value, (list, tuple)):
        items = [finite_or_null(v) for v in value]
        return [v for v, _ in items], sum(n for _, n in items)
    return value, 0


class MetricsWriter:
    """Rank 0's sinks: metrics.jsonl, TensorBoard events, and the console progress line."""

    def __init__(self, run_dir: Path, tensorboard: bool, total_steps: int | None) -> None:
        self.total_steps = total_steps
        self.jsonl = None
        self.tb = None
        self.started = time.time()
        if env.is_main():
            self.jsonl = open(run_dir / "metrics.jsonl", "a", buffering=1)
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tb"))

    def write(self, step: int, record: dict[str, Any]) -> None:
        """One JSON line (strict JSON: non-finite numbers become null, counted in
        "nonfinite_values"), TensorBoard scalars and the console line."""
        if not env.is_main():
            return
        record, bad = finite_or_null({"step": step, "time": round(time.time(), 3), **record})
        if bad:
            record["nonfinite_values"] = bad
        self.jsonl.write(json.dumps(record, allow_nan=False) + "\n")
        if self.tb is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("step", "time"):
                    self.tb.add_scalar(key, value, step)
            self.tb.flush()
        output.print0(self._console(step, record))

    def _console(self, step: int, r: dict[str, Any]) -> str:
        total = f"/{self.total_steps}" if self.total_steps else ""
        parts = [f"step {step}{total}"]
        for key, fmt in (("loss", ".4f"), ("mse", ".4f"), ("vb", ".4f"), ("grad_norm", ".3f"),
                         ("lr", ".2e"), ("img_per_s", ".1f"), ("data_wait_frac", ".0%"),
                         ("eval_bpd", ".3f"), ("eval_bpd_model", ".3f")):
            if key in r and r[key] is not None and not (isinstance(r[key], float) and math.isnan(r[key])):
                parts.append(f"{key} {format(r[key], fmt)}")
        if r.get("eval_bpd") is not None and r.get("eval_steps"):
            parts.append(_eval_note(r))
        if r.get("nonfinite_steps"):
            parts.append(f"skipped {r['nonfinite_steps']} non-finite steps")
        if self.total_steps and r.get("step_time_s"):
            eta = (self.total_steps - step) * r["step_time_s"]
            parts.append(f"eta {eta / 60:.1f} min")
        return " | ".join(parts)

    def image(self, tag: str, image_hwc: Any, step: int) -> None:
        if self.tb is not None:
            self.tb.add_image(tag, image_hwc, step, dataformats="HWC")
            self.tb.flush()

    def close(self) -> None:
        if self.jsonl:
            self.jsonl.close()
        if self.tb:
            self.tb.close()


def _eval_note(r: dict[str, Any]) -> str:
    """What eval_bpd is, beside it: an upper bound on the NLL over the eval's steps; with
    fixed variances and few steps it is loose, and may exceed the 8 bits/dim of raw pixels
    (a reader would take that for a broken model)."""
    note = f"eval_bpd: NLL upper bound over {r['eval_steps']} steps"
    if r.get("eval_variances") == "fixed":
        note += "; loose with fixed variances (can exceed raw pixels' 8)"
    return note
