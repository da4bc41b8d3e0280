"""Checkpointed pieces that need an adapter to the registry's protocols (see registry.py).

The data stream and the timestep sampler's history already speak state_dict /
load_state_dict and register as they are; the engine, EMA, counters and RNG streams
register through the classes here.
"""
from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from ..dist import env, output
from ..diffusion.timestep_sampler import ScheduleSampler, stream_seed
from . import checkpoint as ckpt
from .ema import EMA
from .master import MasterWeights
from .universal import load_at_new_world_size

# ds_to_universal needs this key in the client state; our UNet has no tensor-parallel
# slicing, so it carries no patterns.
UNIVERSAL_INFO = {"universal_checkpoint_info": {"universal_checkpoint_version": 0.2}}


class CheckpointLoadError(RuntimeError):
    """A checkpoint's files could not be loaded into this run."""


class EngineState:
    """SHARDED: the DeepSpeed engine (weights, Adam moments, lr schedule, loss scaler) in
    DeepSpeed's own files, plus the reference-named fp32 export model{step}.pt."""

    def __init__(self, engine: Any, master: MasterWeights) -> None:
        self.engine = engine
        self.master = master

    def save_shards(self, tag_dir: Path, step: int) -> None:
        """Collective; a failed write raises OSError only after every collective of the save."""
        with deepspeed_write_errors(self.engine) as failed:
            self.engine.save_checkpoint(str(tag_dir.parent), tag=tag_dir.name, save_latest=False,
                                        client_state={"step": step, **UNIVERSAL_INFO})
        weights = self.master.full_state_dict()  # collective under ZeRO
        if failed:
            raise failed[0]
        if env.is_main():
            ckpt.atomic_torch_save(weights, tag_dir / ckpt.export_name_model(step))

    def load_shards(self, tag_dir: Path, step: int, saved_world_size: int) -> None:
        # ZeRO-0 writes no per-rank optimizer shards: its one model-states file holds the
        # full weights and the (replicated) optimizer state, which any world size loads as
        # is; ds_to_universal has nothing to convert there.
        sharded = any(tag_dir.glob("*optim_states.pt"))
        if saved_world_size != env.world_size() and sharded:
            load_at_new_world_size(self.engine, tag_dir)
            return
        path, _ = self.engine.load_checkpoint(
            str(tag_dir.parent), tag=tag_dir.name, load_optimizer_states=True,
            load_lr_scheduler_states=True, load_module_strict=True)
        if path is None:
            raise CheckpointLoadError(f"DeepSpeed could not load checkpoint {tag_dir}")


@contextlib.contextmanager
def deepspeed_write_errors(engine: Any) -> Iterator[list[OSError]]:
    """During one engine.save_checkpoint, DeepSpeed's own writes (its checkpoint engine's
    save and makedirs, its recovery-script copy) keep their OSError in the yielded list
    instead of raising it. DeepSpeed's save runs barriers after its writes: a rank that
    raised out of it would skip them and leave the others waiting there until the
    collective timeout. Its torch.save goes through ckpt.atomic_torch_save, which names the
    errno (torch's own error has none) and fsyncs."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    failed: list[OSError] = []
    writer = engine.checkpoint_engine
    plain = isinstance(writer, TorchCheckpointEngine)  # others (async, Nebula) keep their save
    zipfile = bool(getattr(writer, "zipfile_serialization", True))

    def recorded(write: Callable[..., Any]) -> Callable[..., Any]:
        def attempt(*args: Any, **kwargs: Any) -> Any:
            if failed:  # one failure is enough: the save is lost anyway
                return None
            try:
                return write(*args, **kwargs)
            except OSError as err:
                failed.append(err)
                return None
        return attempt

    own_save = writer.save  # bound before the patch below shadows it

    def save(state_dict: Any, path: str) -> None:
        if plain:
            ckpt.atomic_torch_save(state_dict, Path(path), zipfile=zipfile)
        else:
            own_save(state_dict, path)

    patches = ((writer, "save", save), (writer, "makedirs", writer.makedirs),
               (engine, "_copy_recovery_script", getattr(engine, "_copy_recovery_script", None)))
    with contextlib.ExitStack() as stack:
        for obj, name, write in patches:
            if write is not None:
                stack.enter_context(_instance_attr(obj, name, recorded(write)))
        yield failed


@contextlib.contextmanager
def _instance_attr(obj: Any, name: str, value: Any) -> Iterator[None]:
    """obj.name = value for the block; afterwards the class's attribute shows through again."""
    setattr(obj, name, value)
    try:
        yield
    finally:
        delattr(obj, name)


class EMAState:
    """SHARDED: the EMA per rate, kept per ZeRO partition, saved as full fp32 tensors under
    the reference's names ema_{rate}_{step}.pt (so any world size can load them)."""

    def __init__(self, ema: EMA) -> None:
        self.ema = ema

    def save_shards(self, tag_dir: Path, step: int) -> None:
        states = self.ema.full_state_dicts()  # collective under ZeRO
        if env.is_main():
            for rate, state in states.items():
                ckpt.atomic_torch_save(state, tag_dir / ckpt.export_name_ema(rate, step))

    def load_shards(self, tag_dir: Path, step: int, saved_world_size: int) -> None:
        files = {rate: tag_dir / ckpt.export_name_ema(rate, step) for rate in self.ema.rates}
        states = {rate: ckpt.load_plain(path) for rate, path in files.items() if path.is_file()}
        started = self.ema.load_full_state_dicts(states)
        if started:
            output.log0("ema_rate_started", rates=started, saved_rates=sorted(states),
                        note="not in the checkpoint: starts from the resumed weights")


@dataclass
class TrainCounters:
    """REPLICATED: how far training got."""

    step: int = 0

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])


def fresh_stream_seed(seed: int, step: int) -> int:
    """This rank's seed for new random streams after a resume at another world size: mixed
    with the step, so the streams do not replay step 0's."""
    return stream_seed(seed * 1_000_003 + step, env.rank())


class ProcessRNG:
    """PER_RANK: torch (and CUDA) and Python RNG streams: noise, dropout. Continued exactly
    at the same world size; freshly seeded at another (no old rank owns a new rank)."""

    def __init__(self, counters: TrainCounters, seed: int) -> None:
        self.counters = counters
        self.seed = seed

    def state_dict(self) -> dict[str, Any]:
        return ckpt.rng_state()

    def load_state_dict(self, states: list[dict[str, Any]]) -> None:
        if len(states) == env.world_size():
            ckpt.set_rng_state(states[env.rank()])
        else:  # Python's too: left alone, it would go on from this process's OS-entropy seed
            seed = fresh_stream_seed(self.seed, self.counters.step)
            torch.manual_seed(seed)
            random.seed(seed)


class SamplerRNG:
    """PER_RANK: the timestep sampler's generator (its history is REPLICATED)."""

    def __init__(self, sampler: ScheduleSampler, counters: TrainCounters, seed: int) -> None:
        self.sampler = sampler
        self.counters = counters
        self.seed = seed

    def state_dict(self) -> torch.Tensor:
        return self.sampler.rng_state()

    def load_state_dict(self, states: list[torch.Tensor]) -> None:
        if len(states) == env.world_size():
            self.sampler.set_rng_state(states[env.rank()])
            return
        seed = fresh_stream_seed(self.seed, self.counters.step) + 1
        self.sampler.set_rng_state(torch.Generator(self.sampler.device).manual_seed(seed).get_state())
