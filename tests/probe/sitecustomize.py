"""Test probe for runs of the real launch/train.py on several hosts: it records what each
rank did and changes nothing. Active only where IDDPM_PROBE_DIR is set; the multi-host
tests put this folder on PYTHONPATH (which the deepspeed launcher exports to every host)
and IDDPM_PROBE_DIR in .deepspeed_env. Two records:

- batches-<host>-rank<R>.jsonl: one line per training batch a rank takes, with its labels
  (the tests' shards label sample i with class i, so labels are sample keys), the global
  rank, the launcher's local rank, the host name and the environment facts ENV_FACTS;
- resumed-<tag>.pt (rank 0), where IDDPM_PROBE_STATE=1 as well: right after the Trainer is
  built from a checkpoint, the full weights, EMA weights, sampler state and Adam moments it
  holds (gathered on all ranks; DeepSpeed's moment getter fails right after a resume at
  the same world size under ZeRO-1 fp32, before any step, so this is asked for only where
  the tests compare).

Hooks are attached after the real modules import (a meta-path finder), so a process
that never imports them (the launchers, pdsh, loader workers) is untouched.
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import json
import os
import socket
import sys

PROBE_DIR = os.environ.get("IDDPM_PROBE_DIR")
ENV_FACTS = ("MASTER_ADDR", "WORLD_SIZE", "VIRTUAL_ENV", "GLOO_SOCKET_IFNAME", "SLURM_NODEID", "SLURM_PROCID")


def _patch_reader(module) -> None:
    original = module.TrainStream._batches

    def _batches(self):
        rank = int(os.environ.get("RANK", "0"))
        host = socket.gethostname()
        path = os.path.join(PROBE_DIR, f"batches-{host}-rank{rank}.jsonl")
        facts = {"rank": rank, "local_rank": int(os.environ.get("LOCAL_RANK", "-1")), "host": host,
                 "pid": os.getpid(), **{k: os.environ.get(k) for k in ENV_FACTS}}
        with open(path, "a", buffering=1) as log:
            for x, cond in original(self):
                log.write(json.dumps({**facts, "labels": cond["y"].tolist()}) + "\n")
                yield x, cond

    module.TrainStream._batches = _batches


def _patch_trainer(module) -> None:
    original = module.Trainer.__init__

    def __init__(self, job) -> None:
        original(self, job)
        if self.resumed_from and os.environ.get("IDDPM_PROBE_STATE") == "1":
            _save_resumed(self)

    module.Trainer.__init__ = __init__


def _save_resumed(trainer) -> None:
    import torch
    from deepspeed.utils import safe_get_full_optimizer_state

    from iddpm_ds.dist import env

    master = trainer.master
    # the timestep sampler's attribute, before and after the train/ registry refactor
    sampler = trainer.timestep_sampler if hasattr(trainer, "timestep_sampler") else trainer.sampler
    state = {  # every call below is a collective under ZeRO-3: all ranks run them
        "step": trainer.step,
        "world_size": env.world_size(),
        "model": master.full_state_dict(),
        "ema": trainer.ema.full_state_dicts(),
        "sampler": sampler.state_dict(),
        "exp_avg": {n: safe_get_full_optimizer_state(p, "exp_avg").cpu()
                    for n, p in zip(master.names, master.params)},
        "exp_avg_sq": {n: safe_get_full_optimizer_state(p, "exp_avg_sq").cpu()
                       for n, p in zip(master.names, master.params)},
    }
    if env.is_main():
        torch.save(state, os.path.join(PROBE_DIR, f"resumed-{trainer.resumed_from}.pt"))


HOOKS = {"iddpm_ds.data.reader": _patch_reader, "iddpm_ds.train.trainer": _patch_trainer}


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs HOOKS[name](module) right after the real module `name` has executed."""

    def find_spec(self, name, path, target=None):
        if name not in HOOKS:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return None
        execute = spec.loader.exec_module

        def exec_module(module) -> None:
            execute(module)
            HOOKS[name](module)

        spec.loader.exec_module = exec_module
        return spec


if PROBE_DIR:
    sys.meta_path.insert(0, _AfterImport())
