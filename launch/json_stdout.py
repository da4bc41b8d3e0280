"""The output contract of iddpm-sample and iddpm-evaluate: stdout carries exactly one JSON
object (from rank 0) and nothing else, so `json.loads(stdout)` and `| jq` work.

DeepSpeed writes its accelerator banner and "... built successfully" op-build lines to
stdout (its logger and plain print), and a JIT op build may write from a child process,
so while a tool runs the process's file descriptor 1 points at stderr; the JSON goes to
the saved original stdout.
"""
from __future__ import annotations

import contextlib
import os
import sys
from typing import Any, Callable, Iterator, TextIO


@contextlib.contextmanager
def json_stdout() -> Iterator[TextIO]:
    """Yield a stream on the real stdout; meanwhile everything else written to stdout (by
    Python, C code or child processes) lands on stderr."""
    sys.stdout.flush()
    saved = os.dup(1)
    result = os.fdopen(saved, "w", closefd=False)
    os.dup2(2, 1)
    try:
        with contextlib.redirect_stdout(sys.stderr):  # keeps Python's prints in stderr order
            yield result
    finally:
        result.close()  # flushes; the descriptor stays open (closefd=False) until restored
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def run_json_tool(args: Any, run: Callable[[Any, TextIO], int]) -> int:
    """run(args, result_out) inside json_stdout, with the process group (if launched as
    several ranks) set up before and torn down after."""
    with json_stdout() as result_out:
        from iddpm_ds.dist import group

        group.init()
        try:
            return run(args, result_out)
        finally:
            group.shutdown()
