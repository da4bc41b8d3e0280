"""Stale locks in the torch extensions cache: found and reported instead of waited on forever.

DeepSpeed JIT-builds its C++ ops on first use (cpu_adam for optimizer offload, fused ops
on GPUs) through torch.utils.cpp_extension, which guards each op's build folder with an
empty `lock` file made by O_CREAT|O_EXCL and held open by the builder until it removes it.
A builder killed mid-build (kill -9, a job killed at its time limit, Ctrl-C during the
link) leaves the file behind, and every later process waits for it to vanish: forever,
silently, before training starts. torch records no owner in the file, so staleness is
judged here from who holds it open: nobody on this host, twice in a row, on a local file
system (on a network file system the builder may be another node, so there the file must
also be older than any build takes).

prepare_deepspeed() applies this (and DeepSpeed's other build-time edits) before DeepSpeed
starts: dist.group.init() calls it, and so does the engine builder.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from .dist import env, state
from .dist.output import write_line
from .placement import has_gpu

# a shared home's builder may be another node: only a lock older than any build is stale there
NETWORK_STALE_AGE_S = 900.0
NETWORK_FS = ("nfs", "nfs4", "lustre", "gpfs", "cifs", "smb3", "smbfs", "beegfs", "ceph",
              "glusterfs", "fuse", "9p", "afs", "pvfs2", "orangefs", "wekafs")


class StaleBuildLock(RuntimeError):
    """A build lock nobody holds (or one held past the wait); the message is one line."""


def build_locks(root: Path) -> list[Path]:
    """The `lock` files of the op build folders under `root` (TORCH_EXTENSIONS_DIR layout)."""
    return sorted(root.glob("*/lock")) if root.is_dir() else []


def holders(lock: Path) -> Optional[list[int]]:
    """PIDs on this host that hold `lock` open; None where /proc cannot tell."""
    target = os.path.realpath(lock)
    proc = Path("/proc")
    if not (proc / "self" / "fd").is_dir():
        return None
    found = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fds = list((entry / "fd").iterdir())
        except OSError:  # gone meanwhile, or another user's process
            continue
        if any(_link(fd) == target for fd in fds):
            found.append(int(entry.name))
    return found


def _link(fd: Path) -> Optional[str]:
    try:
        return os.readlink(fd)
    except OSError:  # closed meanwhile (the listing's own descriptor, for one)
        return None


def on_network_fs(path: Path) -> bool:
    """True when `path` lies on a network file system (the mount with the longest prefix)."""
    real, best, fstype = os.path.realpath(path), "", ""
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return True  # cannot tell: assume the cautious case
    for line in mounts:
        parts = line.split()
        if len(parts) < 3:
            continue
        mount = parts[1].replace("\\040", " ")
        if (real == mount or real.startswith(mount.rstrip("/") + "/")) and len(mount) >= len(best):
            best, fstype = mount, parts[2]
    return fstype.startswith(NETWORK_FS)


def _identity(lock: Path) -> Optional[tuple[int, int]]:
    try:
        stat = lock.stat()
    except FileNotFoundError:
        return None
    return stat.st_ino, stat.st_mtime_ns


def is_stale(lock: Path, recheck_s: float = 1.0) -> bool:
    """Nobody holds the lock, seen twice `recheck_s` apart on the same file (a builder closes
    its descriptor a moment before it removes the file), and on a network file system the
    file is older than any build."""
    first = _identity(lock)
    if first is None:
        return False
    held = holders(lock)
    if held:
        return False
    if (held is None or on_network_fs(lock)) and time.time() - first[1] / 1e9 < NETWORK_STALE_AGE_S:
        return False
    time.sleep(recheck_s)
    return _identity(lock) == first and not holders(lock)


def wait_for_lock(lock: Path, timeout_s: float, poll_s: float = 1.0) -> None:
    """Return once `lock` is gone (its build finished); raise StaleBuildLock when nobody holds
    it, or when it is still held after `timeout_s` (a build that never ends)."""
    deadline = time.monotonic() + timeout_s
    while lock.exists():
        if is_stale(lock):
            raise StaleBuildLock(
                f"stale build lock {lock}: a process killed while building DeepSpeed's "
                f"{lock.parent.name} op left it, and every run would wait for it forever; "
                f"no process holds it: remove it (rm {lock}) and start again")
        if time.monotonic() > deadline:
            raise StaleBuildLock(
                f"DeepSpeed op build still running after {timeout_s:.0f} s: {lock} "
                f"(pid {holders(lock) or '?'}); if that process hangs, end it and remove the lock file")
        time.sleep(poll_s)


def guard_builds(timeout_s: float) -> None:
    """Make every JIT build wait of this process bounded and stale-aware. The check happens
    where torch waits (FileBaton.wait, called only for an op this run actually loads), so a
    stale lock of an op the job never uses cannot stop it."""
    import torch.utils.cpp_extension as cpp_extension
    from torch.utils.file_baton import FileBaton

    class _GuardedBaton(FileBaton):
        def wait(self) -> None:
            wait_for_lock(Path(self.lock_file_path), timeout_s)

    cpp_extension.FileBaton = _GuardedBaton


def stale_locks(root: Path) -> list[Path]:
    """The build locks under `root` that nobody holds (for a warning at start-up)."""
    return [lock for lock in build_locks(root) if is_stale(lock, recheck_s=0.2)]


def prepare_deepspeed() -> None:
    """Before DeepSpeed starts its comm backend or builds an op (idempotent): every JIT-build
    wait bounded and stale-aware, and the shm op never built. dist.group.init() calls it; so
    does the engine builder, for a process group that someone else made (a notebook, the
    tests), where DeepSpeed's own init would otherwise build the shm op and wait on its lock
    forever."""
    guard_builds(state.job_spec().long_wait_timeout_s)  # a live build is solo work too
    _skip_shm_op()
    if env.cpu_fp16_seam() and not has_gpu():
        _allow_cpu_fp16()


def _allow_cpu_fp16() -> None:
    """The test seam's one change to DeepSpeed: its CPU accelerator answers that fp16 is
    supported, so the engine's sanity check passes and the real fp16 engine is built."""
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    if accelerator.device_name() == "cpu":
        accelerator.is_fp16_supported = lambda: True


def _skip_shm_op() -> None:
    """DeepSpeed JIT-builds its CPU shared-memory op at init (~1 min the first time, and a
    stale lock if killed meanwhile), for tensor-parallel inference only: training and
    sampling here never call it. DeepSpeed keeps one compatibility dict for edits."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() == "cpu":  # the only accelerator that builds it
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def warn_stale_locks() -> None:
    """A stale lock stops only a run that loads its op (guard_builds); say so for the others,
    once per node, so that the lock is removed before a job that needs the op meets it."""
    if env.local_rank() != 0:
        return
    for lock in stale_locks(extensions_dir()):
        write_line(f"warning: stale build lock {lock} (DeepSpeed's {lock.parent.name} op; this job "
                   f"does not load it): a job that loads it would stop; remove it (rm {lock})")


def extensions_dir() -> Path:
    """Where torch builds this environment's JIT extensions (one folder per op)."""
    override = env.extensions_dir_override()
    if override is not None:
        return Path(override)
    from torch.utils.cpp_extension import get_default_build_root

    if torch.version.hip is not None:
        accelerator = "rocm" + torch.version.hip.replace(".", "")
    elif torch.version.cuda is not None:
        accelerator = "cu" + torch.version.cuda.replace(".", "")
    else:
        accelerator = "cpu"
    python = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
    return Path(get_default_build_root()) / f"{python}_{accelerator}"
