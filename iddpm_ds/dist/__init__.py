"""Distributed facts and the process group, one concern per module.

- env: the launcher's facts (deepspeed, torchrun, Slurm), this process's rank and place on
  its node, and the test seams; the only module of iddpm_ds that reads the environment.
- state: the one object init() makes (`DistState`) and the slot that holds it.
- group: the process group's life (init, session, shutdown), its timeouts and its waits.
- failures: a failed collective or set-up as one line and an exit code.
- output: rank-gated console and log lines, one write per line.

Which GPU a rank uses lives in iddpm_ds.placement, and preparing DeepSpeed's op builds in
iddpm_ds.build_locks. This file imports nothing, so that a caller that only logs pulls in
output (and env) alone.
"""
