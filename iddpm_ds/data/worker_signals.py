"""SIGTERM in loader workers: only their rank ends them.

Slurm's `scancel JOBID` and a node drain send SIGTERM to every process of the step, the
loader workers included. torch's worker handler lets such a signal kill the worker unless
the rank sent it, and the rank's SIGCHLD handler then raises "DataLoader worker ... killed
by signal" wherever the step happens to be: the rank crashed before the stop that all ranks
agree on (train/preempt.py), and the job lost everything since its last checkpoint.

A worker here blocks SIGTERM and takes it on a thread with sigwaitinfo, which names the
sender. From the rank (torch's terminate() of a worker that did not stop at shutdown) the
worker exits with 0 at once, as torch's handler does; from anyone else it is ignored, and
the worker serves batches until its rank closes the loader, or dies (torch's watchdog in
the worker notices a dead parent). Where sigwaitinfo is missing (not Linux), torch's
handling stays. A `pipe:` shard command does not inherit the blocked SIGTERM (Python's
subprocess starts children with an empty mask; measured); sources.open_url makes it ignore
SIGTERM instead.
"""
from __future__ import annotations

import os
import signal
import threading


def shield_from_outside_sigterm(worker_id: int) -> None:
    """DataLoader `worker_init_fn`: runs in each worker before its first batch."""
    if not hasattr(signal, "sigwaitinfo"):
        return
    # blocked before any other thread starts here, so every thread of the worker inherits it
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    threading.Thread(target=_take_sigterm, args=(os.getppid(),), name="sigterm",
                     daemon=True).start()


def _take_sigterm(rank_pid: int) -> None:
    while True:
        info = signal.sigwaitinfo({signal.SIGTERM})
        if info.si_pid == rank_pid:
            os._exit(0)
