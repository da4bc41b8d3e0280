"""Rank-gated output: console lines, error lines and JSON log lines, one write per line.

Modules that only report (data readers, the sample grid) import this module alone. The
rank comes from dist.env, so these work before init, after shutdown and in data workers.
"""
from __future__ import annotations

import json
import sys
import time
from typing import Any, Optional, TextIO

from .env import is_main, rank


def write_line(text: str, stream: Optional[TextIO] = None) -> None:
    """One line in one write call. Ranks of a node share the launcher's pipe, and print()
    writes the text and its newline separately, so two ranks' lines could fuse into one;
    a single write of under PIPE_BUF bytes reaches the pipe whole."""
    stream = sys.stderr if stream is None else stream
    stream.write(text + "\n")
    stream.flush()


def error_line(message: str) -> None:
    """The one-line `error: ...` a user reads (this rank's; callers gate by rank)."""
    write_line(f"error: {message}")


def error0(message: str) -> None:
    """error_line on rank 0 only: for errors every rank meets alike (a bad input or job)."""
    if is_main():
        error_line(message)


def print0(text: str) -> None:
    """One console line on rank 0 only; the single gate for rank-dependent console output."""
    if is_main():
        write_line(text, sys.stdout)


def log0(event: str, **fields: Any) -> None:
    """One structured (JSON) log line on rank 0: {"event": ..., "time": ..., **fields}."""
    if is_main():
        log(event, **fields)


def log(event: str, **fields: Any) -> None:
    """One structured log line from this rank (use for per-rank warnings/errors)."""
    record = {"event": event, "time": round(time.time(), 3), "rank": rank(), **fields}
    write_line(json.dumps(record, default=str))
