"""A distributed failure as one line a user can act on, and the exit code that goes with it.

No silent hangs: group.session() turns a failed or timed-out collective into the line
describe_failure() writes (which rank, which call and where, which field bounds the wait)
and COLLECTIVE_FAILED_EXIT; a set-up problem of this machine into EXIT_BAD_SETUP.
"""
from __future__ import annotations

import os
import re
import traceback
from pathlib import Path
from typing import Optional

import torch.distributed as torch_dist

from .. import exits
from ..build_locks import StaleBuildLock
from . import state
from .env import rank

EXIT_BAD_SETUP = exits.BAD_JOB  # this machine's set-up (stale build lock, too few GPUs)
COLLECTIVE_FAILED_EXIT = exits.COLLECTIVE_FAILED

_REPO = Path(__file__).resolve().parents[2]
_PACKAGE = str(Path(__file__).resolve().parent) + os.sep  # dist/ is never "where" it failed


class CollectiveFailure(RuntimeError):
    """A collective timed out or lost a peer; the message is the one line to print."""


def is_group_failure(err: BaseException) -> bool:
    """True for a collective that timed out or lost a peer: torch's DistError family, and
    the plain RuntimeError that gloo raises (its message names its gloo source file)."""
    return isinstance(err, torch_dist.DistError) or (
        isinstance(err, RuntimeError) and "gloo/" in str(err))


def reason(err: BaseException) -> str:
    """"timed out", or which connection was lost, from torch's message (first line, short)."""
    text = str(err)
    if re.search(r"timed? ?out", text, re.IGNORECASE):
        return "timed out"
    lines = [line for line in text.splitlines() if line.strip()] or [type(err).__name__]
    return "lost its connection to another rank (" + re.sub(r"^\[[^\]]*\] ", "", lines[0])[:160] + ")"


def describe_failure(err: BaseException) -> str:
    """One line for a failed collective: this rank, the operation and where it was called
    (when the traceback shows them), what happened, and the field that bounds the wait."""
    op, where = _failed_call(err)
    call = (op or "a collective") + (f" at {where}" if where else "")
    if reason(err) == "timed out":
        return (f"rank {rank()}: {call} waited longer than distributed.collective_timeout_s="
                f"{state.job_spec().collective_timeout_s} s for the other ranks: another rank "
                f"stopped or died (see its log); raise distributed.collective_timeout_s if such a "
                f"wait is expected")
    return f"rank {rank()}: {call} {reason(err)}: that rank died or was killed (see its log)"


def _failed_call(err: BaseException) -> tuple[Optional[str], Optional[str]]:
    """The torch.distributed function that failed and the innermost call site in this repo
    outside dist/ (a wait in group.py is reported where its caller called it)."""
    op = where = None
    for frame, lineno in traceback.walk_tb(err.__traceback__):
        path = frame.f_code.co_filename
        if op is None and path.endswith("distributed_c10d.py"):
            op = frame.f_code.co_name
        if (path.startswith(str(_REPO)) and "site-packages" not in path
                and not path.startswith(_PACKAGE)):
            where = f"{os.path.relpath(path, _REPO)}:{lineno} ({frame.f_code.co_name})"
    return op, where


def stale_lock_cause(err: BaseException) -> Optional[StaleBuildLock]:
    """The StaleBuildLock behind `err`: DeepSpeed re-raises a failed op load as its own error."""
    seen: Optional[BaseException] = err
    while seen is not None:
        if isinstance(seen, StaleBuildLock):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None
