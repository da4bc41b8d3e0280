"""Checkpoint layout, atomic completion and discovery.

    run_dir/checkpoints/
      latest                  tag of the newest COMPLETE checkpoint (written last, atomically)
      step0000100/            one DeepSpeed tag directory
        mp_rank_*, *optim_states.pt      engine state (DeepSpeed's files)
        model000100.pt                   fp32 weights, reference file name (plain state dict)
        ema_0.9999_000100.pt             EMA weights per rate, reference file names
        trainer_state.pt                 REPLICATED states by name + meta (spec, world size), rank 0
        rank00000.pt ...                 PER_RANK states by name (data position, RNG streams)
        complete.json                    written after every rank finished: the completion mark,
                                         with each file's size (resume checks them)

What goes into these files is the state registry's business (registry.py); this module
only knows the layout. Every file of ours is a dict of tensors and plain types, loaded
with weights_only=True.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, BinaryIO, Callable

import torch

from ..dist import env

TAG_RE = re.compile(r"^step(\d{7,})$")
COMPLETE = "complete.json"


def tag_for(step: int) -> str:
    return f"step{step:07d}"


def step_of(tag: str) -> int:
    match = TAG_RE.match(tag)
    if not match:
        raise ValueError(f"not a checkpoint tag: {tag!r}")
    return int(match.group(1))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` under `path` or leave the old file: temp file, fsync, rename, fsync of the
    directory (the rename itself survives a power loss only once the directory is synced)."""
    _atomic_write(path, lambda fh: fh.write(data))


def atomic_torch_save(obj: Any, path: Path, zipfile: bool = True) -> None:
    """torch.save, atomically and durably as atomic_write_bytes; a failed write (disk full,
    quota) raises OSError naming `path` and its errno, and leaves no temp file."""
    _atomic_write(path, lambda fh: torch_save_to(obj, fh, path, zipfile))


def torch_save_to(obj: Any, fh: BinaryIO, path: Path, zipfile: bool = True) -> None:
    """torch.save into an open file. torch turns a failed write into a RuntimeError without
    errno ("unexpected pos ..."); the OSError that the file's write raised is kept and
    raised instead, so the user reads "errno 28 ENOSPC"."""
    writer = _ErrnoKeeper(fh)
    try:
        torch.save(obj, writer, _use_new_zipfile_serialization=zipfile)
    except RuntimeError:
        if writer.error is None:
            raise
        raise OSError(writer.error.errno, writer.error.strerror, str(path)) from None


class _ErrnoKeeper:
    """A file's write, remembering the OSError that torch's serializer swallows."""

    def __init__(self, fh: BinaryIO) -> None:
        self.fh = fh
        self.error: OSError | None = None

    def write(self, data: bytes) -> int:
        try:
            return self.fh.write(data)
        except OSError as err:
            self.error = err
            raise

    def flush(self) -> None:
        self.fh.flush()


def _atomic_write(path: Path, write: Callable[[BinaryIO], Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp{env.rank()}")
    try:
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)  # a full disk keeps no half-written debris
        raise OSError(err.errno, err.strerror, str(path)) from None
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_plain(path: Path) -> Any:
    """Load one of our files: tensors and plain containers only (never code)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def is_complete(tag_dir: Path) -> bool:
    return (tag_dir / COMPLETE).is_file()


def complete_tags(ckpt_dir: Path) -> list[str]:
    """Complete checkpoint tags, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    tags = [p.name for p in ckpt_dir.iterdir() if p.is_dir() and TAG_RE.match(p.name)]
    return sorted((t for t in tags if is_complete(ckpt_dir / t)), key=step_of)


class DamagedCheckpoints(RuntimeError):
    """Every complete checkpoint of the run dir lost or truncated a file after its save."""


def damage(tag_dir: Path) -> str | None:
    """What is wrong with a complete checkpoint's files against the sizes its completion
    mark recorded (a file lost or cut short after the save: a copy, a filesystem fault), or
    None. Marks written before the sizes were recorded are trusted."""
    try:
        files = json.loads((tag_dir / COMPLETE).read_text()).get("files", {})
    except (OSError, ValueError) as err:
        return f"{COMPLETE} unreadable ({err})"
    for name, size in files.items():
        path = tag_dir / name
        if not path.is_file():
            return f"{name} is missing"
        if (found := path.stat().st_size) != size:
            return f"{name} is {found} bytes, the save wrote {size}"
    return None


def find_resume_tag(ckpt_dir: Path) -> tuple[str | None, str]:
    """(tag to resume from or None, a sentence saying why): never an incomplete checkpoint,
    and past a damaged one to the newest intact one; DamagedCheckpoints if all are damaged."""
    complete = complete_tags(ckpt_dir)
    latest_file = ckpt_dir / "latest"
    pointed = latest_file.read_text().strip() if latest_file.is_file() else None
    if not complete:
        if pointed:
            return None, f"latest points to {pointed!r}, which is incomplete, and no complete checkpoint exists: starting fresh"
        return None, "no checkpoint: starting fresh"
    why = ("" if pointed in complete else f"latest points to {pointed!r}, which is incomplete; "
           if pointed else "no latest file; ")
    newest_first = sorted(complete, key=lambda t: (t == pointed, step_of(t)), reverse=True)
    skipped = []
    for tag in newest_first:  # latest first, if complete
        found = damage(ckpt_dir / tag)
        if found is None:
            kind = ("latest" if tag == pointed else "the newest intact checkpoint" if skipped
                    else "the newest complete checkpoint")
            return tag, why + "".join(skipped) + f"resuming from {tag} ({kind})"
        skipped.append(f"{tag} is damaged: {found}; ")
    raise DamagedCheckpoints(f"every checkpoint in {ckpt_dir} is damaged: " + "".join(skipped)
                             + "move them aside to start fresh")


def mark_complete(ckpt_dir: Path, tag: str, meta: dict[str, Any], keep: int) -> None:
    """Rank 0, after a barrier: mark the tag complete (with every file's size, which resume
    checks), point latest at it, prune old ones."""
    files = {str(p.relative_to(ckpt_dir / tag)): p.stat().st_size
             for p in sorted((ckpt_dir / tag).rglob("*")) if p.is_file() and p.name != COMPLETE}
    atomic_write_bytes(ckpt_dir / tag / COMPLETE, json.dumps({**meta, "files": files}, indent=1).encode())
    atomic_write_bytes(ckpt_dir / "latest", tag.encode())
    for old in complete_tags(ckpt_dir)[:-keep]:
        shutil.rmtree(ckpt_dir / old, ignore_errors=True)
    for stale in ckpt_dir.iterdir():
        # incomplete saves older than the newest complete one are debris of a crash
        if stale.is_dir() and TAG_RE.match(stale.name) and not is_complete(stale) \
                and step_of(stale.name) < step_of(tag):
            shutil.rmtree(stale, ignore_errors=True)


def rng_state() -> dict[str, Any]:
    import random

    state: dict[str, Any] = {"torch": torch.get_rng_state(),
                             "python": list(random.getstate()[1]) + [random.getstate()[2] or 0]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import random

    torch.set_rng_state(state["torch"])
    values = [int(v) for v in state["python"]]
    random.setstate((3, tuple(values[:-1]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def export_name_model(step: int) -> str:
    return f"model{step:06d}.pt"


def export_name_ema(rate: float, step: int) -> str:
    return f"ema_{rate}_{step:06d}.pt"
