#!/usr/bin/env python
"""torchrun with the service's restart policy: lose a host, keep training.

    python launch/elastic.py --nnodes 1:2 --nproc-per-node 8 --max-restarts 10 \\
        --rdzv-backend c10d --rdzv-endpoint node001:29400 --rdzv-id myrun \\
        launch/train.py --job job.yaml

The same command on every node; it takes every torchrun option (`--help`). Each node's
torch elastic agent starts its workers in a rendezvous of MIN..MAX nodes. When a worker
fails, e.g. exit 4 because a peer host died or was cut off (detected within
distributed.collective_timeout_s), every surviving agent restarts its workers in a new
rendezvous, and the Trainer resumes from the newest complete checkpoint at the world size
left (resharded through universal conversion). When a node (re)joins, the agents stop
their workers with SIGTERM (the Trainer checkpoints, as on a preemption) and the next
rendezvous takes it in. Membership changes do not count against --max-restarts.

What torchrun lacks is a restart policy: its agent restarts after any failure. Here the
statuses in iddpm_ds.exits.NEVER_RESTARTED (2 bad job, 3 diverged, 5 checkpoint write
failed, 75 preempted) stop the agent at once, and this command exits with the failed
worker's status instead of torchrun's 1, so a scheduler sees 75 and requeues, and a
divergence or a bad job ends the run instead of looping. The agent's decisions are JSON
event lines on stdout: elastic_workers_started (round, nodes, world size), elastic_restart
(why), elastic_stop (status, why).

Keep --shutdown-timeout above preempt_check_interval steps plus one checkpoint save, so
a membership change ends in a checkpoint rather than a SIGKILL (which loses the steps
since the last save, nothing more). The c10d rendezvous is served by the agent on the
--rdzv-endpoint host: losing that host ends the run (use an endpoint off the training
nodes, or etcd, to survive it).
"""
from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

from torch.distributed import run as torchrun
from torch.distributed.elastic.agent.server.api import RunResult, WorkerGroup, WorkerState
from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.launcher import api as launcher_api

from iddpm_ds.exits import restartable


def event(name: str, **fields: Any) -> None:
    print(json.dumps({"event": name, "time": round(time.time(), 3), **fields}), flush=True)


class ServiceAgent(LocalElasticAgent):
    """torch's local elastic agent, which stops instead of restarting after a status that
    a restart would only repeat, and says what it decided."""

    rounds = 0

    def _initialize_workers(self, worker_group: WorkerGroup) -> None:
        super()._initialize_workers(worker_group)  # rendezvous, then start the workers
        spec = worker_group.spec
        self.rounds += 1
        event("elastic_workers_started", round=self.rounds,
              node_rank=worker_group.group_rank, nodes=worker_group.group_world_size,
              world_size=worker_group.workers[0].world_size, local_world_size=spec.local_world_size)

    def _monitor_workers(self, worker_group: WorkerGroup) -> RunResult:
        result = super()._monitor_workers(worker_group)
        if result.state not in (WorkerState.FAILED, WorkerState.UNHEALTHY):
            return result
        codes = sorted({f.exitcode for f in result.failures.values()})
        final = [c for c in codes if not restartable(c)]
        if final:
            self._remaining_restarts = 0  # _invoke_run then stops the workers and returns
            event("elastic_stop", exitcode=final[0], exitcodes=codes,
                  why="a restart would fail the same way or the scheduler owns this status")
        elif self._remaining_restarts > 0:
            event("elastic_restart", exitcodes=codes, restarts_left=self._remaining_restarts - 1,
                  why="worker failure")
        else:
            event("elastic_stop", exitcode=codes[0], exitcodes=codes, why="--max-restarts spent")
        return result

    def _restart_workers(self, worker_group: WorkerGroup) -> None:
        if worker_group.state == WorkerState.HEALTHY:  # _invoke_run's other caller
            event("elastic_restart", why="a node is waiting to join")
        super()._restart_workers(worker_group)


def status_of(err: ChildFailedError) -> int:
    """The first failed worker's exit status (a signal as 128 + its number, as a shell says)."""
    _, failure = err.get_first_failure()
    code = failure.exitcode
    return 128 + (-code) if code < 0 else (code or 1)


def parse_args(argv: list[str] | None) -> Any:
    """torchrun's own parser: every torchrun option, then the training script and its args."""
    return torchrun.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    # torch 2.13's shared rendezvous TCP store publishes MASTER_ADDR once, in the agent's
    # first round: a node that joins later waits for it forever (measured: the grow step
    # hung until join_timeout). Unshared, rank 0's agent publishes it every round.
    os.environ["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    # torch builds its agent in launcher.api.launch_agent with no hook to choose the class;
    # this module attribute is the one seam, set here in the launcher process only
    launcher_api.LocalElasticAgent = ServiceAgent
    args = parse_args(argv)
    try:
        torchrun.run(args)
    except ChildFailedError as err:
        return status_of(err)
    return 0


if __name__ == "__main__":
    sys.exit(main())
