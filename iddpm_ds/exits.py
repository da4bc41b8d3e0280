"""The exit statuses of launch/train.py, in one place: what each means, and whether the
elastic launcher (launch/elastic.py) restarts the workers after it.

The README's exit-status table says what each leaves behind. A restart is worth it only
where the same command can succeed without a person: a lost peer (the survivors go on at
the world size left) or a crash. A bad job, a diverged run, a full disk or a preemption
would fail the same way again (or must go back to the scheduler), so the agent stops and
passes the status on.
"""
from __future__ import annotations

DONE = 0
BAD_JOB = 2             # bad job/config/data or machine set-up: one line naming the field
DIVERGED = 3            # train.max_nonfinite_steps non-finite steps in a row; latest finite
COLLECTIVE_FAILED = 4   # a collective timed out or lost a rank: one line per rank left
CHECKPOINT_WRITE_FAILED = 5  # a checkpoint write failed on some rank (disk full, quota)
PREEMPTED = 75          # EX_TEMPFAIL: checkpointed after SIGUSR1/SIGTERM; requeue to resume

NEVER_RESTARTED = frozenset({BAD_JOB, DIVERGED, CHECKPOINT_WRITE_FAILED, PREEMPTED})
"""Statuses after which the elastic agent stops instead of restarting: each would repeat
(2, 3, 5) or belongs to the scheduler that sent the signal (75). Every other failure (4,
a crash, a kill by signal) restarts, at most --max-restarts times."""


def restartable(exitcode: int) -> bool:
    """Whether a worker that ended with `exitcode` (negative: killed by that signal) may be
    restarted by the elastic agent."""
    return exitcode != DONE and exitcode not in NEVER_RESTARTED
