"""Writing one complete checkpoint (all ranks take part)."""
from __future__ import annotations

import time
from typing import TYPE_CHECKING

from .. import dist
from . import checkpoint as ckpt

if TYPE_CHECKING:  # pragma: no cover
    from .trainer import Trainer

# ds_to_universal needs this key in the client state; our UNet has no tensor-parallel
# slicing, so it carries no patterns.
UNIVERSAL_INFO = {"universal_checkpoint_info": {"universal_checkpoint_version": 0.2}}


def save_checkpoint(trainer: "Trainer") -> None:
    """Engine state, exports, trainer state and per-rank state; `latest` moves last."""
    start = time.perf_counter()
    step, tag = trainer.step, ckpt.tag_for(trainer.step)
    tag_dir = trainer.ckpt_dir / tag
    trainer.engine.save_checkpoint(str(trainer.ckpt_dir), tag=tag, save_latest=False,
                                   client_state={"step": step, **UNIVERSAL_INFO})
    model_state = trainer.master.full_state_dict()        # collective under ZeRO
    ema_states = trainer.ema.full_state_dicts()           # collective under ZeRO
    if dist.is_main():
        ckpt.atomic_torch_save(model_state, tag_dir / ckpt.export_name_model(step))
        for rate, state in ema_states.items():
            ckpt.atomic_torch_save(state, tag_dir / ckpt.export_name_ema(rate, step))
        ckpt.atomic_torch_save(_trainer_state(trainer), tag_dir / "trainer_state.pt")
    ckpt.atomic_torch_save({"data": trainer.data.state_dict(), "rng": ckpt.rng_state(),
                            "sampler_rng": trainer.sampler.rng_state()},
                           tag_dir / f"rank{dist.rank():05d}.pt")
    dist.wait_for_main("writing the checkpoint")  # every rank's files are on disk before it counts
    if dist.is_main():
        meta = {"step": step, "world_size": dist.world_size(), "time": time.time()}
        ckpt.mark_complete(trainer.ckpt_dir, tag, meta, trainer.job.output.keep_checkpoints)
    dist.wait_for_main("pruning old checkpoints")
    dist.log0("checkpoint_saved", step=step, tag=tag, seconds=round(time.perf_counter() - start, 2))


def _trainer_state(trainer: "Trainer") -> dict:
    return {
        "step": trainer.step,
        "world_size": dist.world_size(),
        "global_batch": trainer.plan.global_batch,
        "per_rank_batch": trainer.plan.per_rank,
        "ema_rates": list(trainer.ema.rates),
        "sampler": trainer.sampler.state_dict(),
        "spec": trainer.job.model_dump(mode="json"),
    }
