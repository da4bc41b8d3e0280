"""Resuming a run from its newest complete checkpoint (automatic on restart)."""
from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as torch_dist

from .. import dist
from . import checkpoint as ckpt

if TYPE_CHECKING:  # pragma: no cover
    from .trainer import Trainer


class ResumeError(RuntimeError):
    """The run dir's checkpoint cannot continue this job (e.g. a different model)."""


class Resumer:
    def __init__(self, trainer: "Trainer") -> None:
        self.trainer = trainer

    def resume(self) -> str | None:
        """Load the newest complete checkpoint, if any; returns its tag."""
        start = time.perf_counter()
        tag, why = self._choose_tag()
        dist.log0("resume_check", decision=why)
        if tag is None:
            return None
        tag_dir = self.trainer.ckpt_dir / tag
        state = ckpt.load_plain(tag_dir / "trainer_state.pt")
        self._check_compatible(state["spec"])
        old_world = int(state["world_size"])
        if old_world == dist.world_size():
            self._load_engine(tag)
        else:
            from .universal import load_at_new_world_size

            load_at_new_world_size(self.trainer, tag, state)
        self._load_own_state(tag_dir, state, old_world)
        dist.log0("resumed", tag=tag, step=self.trainer.step, saved_world_size=old_world,
                  world_size=dist.world_size(), seconds=round(time.perf_counter() - start, 2))
        return tag

    def _choose_tag(self) -> tuple[str | None, str]:
        # rank 0 decides so that all ranks load the same tag even on a flaky shared FS
        choice = [ckpt.find_resume_tag(self.trainer.ckpt_dir) if dist.is_main() else None]
        if dist.world_size() > 1:
            torch_dist.broadcast_object_list(choice, src=0)
        return choice[0]

    def _check_compatible(self, saved: dict[str, Any]) -> None:
        job = self.trainer.job
        for section in ("model", "diffusion"):
            now = getattr(job, section).model_dump(mode="json")
            if saved[section] != now:
                diff = sorted(k for k in now if now[k] != saved[section].get(k))
                raise ResumeError(
                    f"{job.output.run_dir} holds a checkpoint of a different {section} "
                    f"(fields {diff} differ); use another output.run_dir or restore the spec")
        changed = [s for s in ("train", "data", "precision", "deepspeed")
                   if saved.get(s) != job.model_dump(mode="json")[s]]
        if changed:
            dist.log0("resume_spec_changed", sections=changed)

    def _load_engine(self, tag: str) -> None:
        path, _ = self.trainer.engine.load_checkpoint(
            str(self.trainer.ckpt_dir), tag=tag, load_optimizer_states=True,
            load_lr_scheduler_states=True, load_module_strict=True)
        if path is None:
            raise ResumeError(f"DeepSpeed could not load checkpoint {tag} from {self.trainer.ckpt_dir}")

    def _load_own_state(self, tag_dir: Path, state: dict[str, Any], old_world: int) -> None:
        trainer, step = self.trainer, int(state["step"])
        trainer.step = trainer.last_saved = step
        trainer.sampler.load_state_dict(state["sampler"])
        emas = {rate: ckpt.load_plain(tag_dir / ckpt.export_name_ema(rate, step))
                for rate in trainer.ema.rates if (tag_dir / ckpt.export_name_ema(rate, step)).is_file()}
        started = trainer.ema.load_full_state_dicts(emas)
        if started:
            dist.log0("ema_rate_started", rates=started, saved_rates=sorted(emas),
                      note="not in the checkpoint: starts from the resumed weights")
        ranks = [ckpt.load_plain(tag_dir / f"rank{r:05d}.pt") for r in range(old_world)]
        trainer.data.load_state_dict([r["data"] for r in ranks])
        if old_world == dist.world_size():  # same ranks: continue every random stream exactly
            mine = ranks[dist.rank()]
            ckpt.set_rng_state(mine["rng"])
            trainer.sampler.set_rng_state(mine["sampler_rng"])
        else:  # new ranks: fresh streams, mixed with the step so they do not replay step 0's
            _reseed(trainer, step)


def _reseed(trainer: "Trainer", step: int) -> None:
    from ..diffusion.timestep_sampler import stream_seed

    seed = stream_seed(trainer.job.train.seed * 1_000_003 + step, dist.rank())
    torch.manual_seed(seed)
    generator = torch.Generator(trainer.device).manual_seed(seed + 1)
    trainer.sampler.set_rng_state(generator.get_state())
