"""launch/train.py across hosts, launched exactly as on a cluster: `deepspeed --hostfile`.

The hosts come from tests/hosts_harness.py: network namespaces on one machine, each with
its own address, hostname and sshd, on one bridge; the repository, venv, data and run dir
are shared, as on NFS/Lustre. The launcher runs on the first host and reaches every host
(itself included) through pdsh over ssh, so the ranks of host 2 live in host 2's network
and get only what the launcher exports: the venv through --venv_script, PYTHON* variables,
and .deepspeed_env (GLOO_SOCKET_IFNAME; each host's own name resolves to 127.0.1.1, as
Debian writes it, so gloo without the interface variable would not be reachable).

tests/probe/sitecustomize.py records, in every real rank, the labels of each batch it
takes (the shards below label sample i with class i, so labels are sample keys) and,
after a resume, the full state it holds.
"""
from __future__ import annotations

import json
import re
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from hosts_harness import (IFACE, PROBE, Hosts, assert_each_sample_once_per_epoch,
                           id_job, probe_batches)
from test_data_helpers import id_shards
from train_utils import ROOT, TRAIN, metrics

pytestmark = pytest.mark.slow

PREEMPTED_EXIT = 75
VENV = Path(sys.prefix)
DEEPSPEED = Path(sys.executable).parent / "deepspeed"
SIZES = [20, 27, 17]  # 64 samples in uneven shards
SAMPLES = sum(SIZES)
BATCH = 4  # per rank: 4 ranks x 4 = 16 samples a step, 4 steps an epoch
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(scope="module")
def id_data(tmp_path_factory) -> list[str]:
    return id_shards(tmp_path_factory.mktemp("ids"), SIZES, side=16)


@pytest.fixture(autouse=True)
def no_strays(hosts):
    """Whatever a test leaves running on the hosts (ranks of a failed launch) ends with it."""
    yield
    hosts.kill_strays()


class Run:
    """One run dir trained by `deepspeed --hostfile` launches from host 1 (shared cwd)."""

    def __init__(self, hosts: Hosts, work: Path, shards: list[str], **overrides) -> None:
        self.hosts, self.work = hosts, work
        self.job = id_job(work, shards, SAMPLES, **{"train.batch_size": BATCH, **overrides})
        self.run_dir = work / "run"
        self.probe = work / "probe"
        self.probe.mkdir()
        # what every rank on every host needs besides the venv; read by the launcher from
        # its working directory and exported into each remote command
        env_lines = [f"GLOO_SOCKET_IFNAME={IFACE}", "DS_ACCELERATOR=cpu", "OMP_NUM_THREADS=1",
                     f"IDDPM_PROBE_DIR={self.probe}"]
        if os.environ.get("TORCH_EXTENSIONS_DIR"):  # the JIT-built comm op's cache, if moved
            env_lines.append(f"TORCH_EXTENSIONS_DIR={os.environ['TORCH_EXTENSIONS_DIR']}")
        (work / ".deepspeed_env").write_text("\n".join(env_lines) + "\n")
        self.outputs: list[str] = []

    def launch(self, slots: dict[int, int], *train_args: str, master_addr: str | None = None,
               probe_state: bool = False) -> subprocess.Popen:
        """The README's command, `deepspeed --hostfile hosts launch/train.py --job`
        (+ --venv_script), with `slots` {host index: ranks}, run on the hostfile's first
        host. Without master_addr DeepSpeed asks that host for `hostname -I`. (A one-host
        hostfile launches locally, on whichever node runs the command: launching it
        elsewhere would rendezvous at the named host's address, where no rank listens.)"""
        hostfile = self.hosts.hostfile(self.work / f"hosts{len(self.outputs)}", slots)
        cmd = [str(DEEPSPEED), "--hostfile", str(hostfile), "--venv_script", str(VENV / "bin" / "activate")]
        if master_addr:
            cmd += ["--master_addr", master_addr]
        cmd += [str(TRAIN), "--job", str(self.job), *train_args]
        env = {k: v for k, v in os.environ.items()
               if k not in LAUNCHER_VARS and not k.startswith(("SLURM_", "PYTHON"))}
        # the shell on the launch host: .deepspeed_env reaches the ranks of pdsh launches
        # only; a one-host launch is local and passes this environment on as it is
        env.update(PATH=f"{VENV / 'bin'}:{env.get('PATH', '/usr/bin:/bin')}", VIRTUAL_ENV=str(VENV),
                   PYTHONPATH=f"{PROBE}{os.pathsep}{ROOT}",  # this checkout, not what the venv installed
                   PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu",
                   IDDPM_PROBE_DIR=str(self.probe), IDDPM_PROBE_STATE="1" if probe_state else "0")
        log = open(self.work / f"launch{len(self.outputs)}.out", "w+")
        self.outputs.append(log.name)
        proc = self.hosts.popen(self.hosts.hosts[next(iter(slots))], cmd, cwd=self.work, env=env, stdout=log,
                                stderr=subprocess.STDOUT, text=True)
        log.close()
        proc.started = time.monotonic()
        return proc

    def finish(self, proc: subprocess.Popen, timeout: float) -> tuple[int, str, float]:
        """Exit status, output and wall time of a launch; kills it and fails after timeout."""
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            self.hosts.kill_strays()
            raise AssertionError(f"launch still running after {timeout} s:\n{self.output()[-6000:]}")
        return code, self.output(), time.monotonic() - proc.started

    def output(self, index: int = -1) -> str:
        return Path(self.outputs[index]).read_text(errors="replace")

    def batches(self) -> dict[int, list[dict]]:
        return probe_batches(self.probe)

    def steps_logged(self) -> list[int]:
        path = self.run_dir / "metrics.jsonl"
        return [m["step"] for m in metrics(self.run_dir)] if path.exists() else []

    def wait_for_step(self, proc: subprocess.Popen, step: int, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while not any(s >= step for s in self.steps_logged()):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"never reached step {step}:\n{self.output()[-6000:]}")
            time.sleep(0.25)

    def latest(self) -> str:
        return (self.run_dir / "checkpoints" / "latest").read_text().strip()


def events(output: str, name: str) -> list[dict]:
    """The trainer's JSON events in pdsh output ("host: {...}" lines)."""
    found = []
    for line in output.splitlines():
        start = line.find('{"event"')
        if start >= 0 and f'"event": "{name}"' in line:
            found.append(json.loads(line[start:]))
    return found


def ranks_on(hosts: Hosts, index: int) -> list[psutil.Process]:
    """The training ranks running on host `index`: launch/train.py processes that are not
    the launcher's and not forked by a rank."""
    def is_rank(p: psutil.Process) -> bool:
        try:
            cmd = p.cmdline()
            return len(cmd) > 2 and cmd[2] == str(TRAIN) and "python" in Path(cmd[0]).name
        except psutil.Error:
            return False

    found = []
    for pid in hosts.pids(hosts.hosts[index]):
        try:
            proc = psutil.Process(pid)
            if is_rank(proc) and not is_rank(proc.parent()):
                found.append(proc)
        except psutil.Error:
            continue
    return found


def check_checkpoint(run: Run, tag: str, world_size: int) -> None:
    """Complete, and every file once: one per rank where per rank, else one."""
    tag_dir = run.run_dir / "checkpoints" / tag
    assert (tag_dir / "complete.json").is_file()
    assert json.loads((tag_dir / "complete.json").read_text())["world_size"] == world_size
    names = sorted(p.name for p in tag_dir.iterdir() if p.is_file())
    assert [n for n in names if n.startswith("rank")] == [f"rank{r:05d}.pt" for r in range(world_size)]
    optim = [n for n in names if n.endswith("optim_states.pt")]
    assert len(optim) == world_size and len({n.split("_pp_rank_")[1] for n in optim}) == world_size
    step = int(tag[4:])
    for once in (f"model{step:06d}.pt", "trainer_state.pt"):
        assert names.count(once) == 1
    assert sorted(p.name for p in run.run_dir.iterdir()) == ["checkpoints", "job.yaml", "metrics.jsonl"]


# ----------------------------------------------------------------------------- tests
# one case: ZeRO-3 in bf16 shards parameters, gradients and optimizer state across the hosts
# (ZeRO-1/2 cross hosts in the elastic, storage and failure tests; the stage x precision grid
# is covered pairwise on one host by test_resume_world_size)
@pytest.mark.parametrize("stage, precision", [(3, "bf16")], ids=["zero3-bf16"])
def test_two_hosts_then_resume_on_one_host_of_three_ranks(hosts, tmp_path, id_data, stage, precision):
    steps = 8  # two epochs of 4 steps
    run = Run(hosts, tmp_path, id_data, **{"train.max_steps": steps, "train.save_interval": 4,
                                           "deepspeed.zero_stage": stage, "precision": precision})
    code, out, wall = run.finish(run.launch({0: 2, 1: 2}), timeout=500)
    print(f"2 hosts x 2 ranks, {steps} steps, ZeRO-{stage} {precision}: {wall:.1f} s")
    assert code == 0, out[-6000:]

    # ranks 0-1 on host 1, 2-3 on host 2, each knowing the job's master and the venv
    by_rank = run.batches()
    first, second = hosts.hosts[0], hosts.hosts[1]
    placement = {r: (recs[0]["host"], recs[0]["local_rank"]) for r, recs in by_rank.items()}
    assert placement == {0: (first.name, 0), 1: (first.name, 1), 2: (second.name, 0), 3: (second.name, 1)}
    for records in by_rank.values():
        assert {(r["MASTER_ADDR"], r["WORLD_SIZE"], r["VIRTUAL_ENV"], r["GLOO_SOCKET_IFNAME"])
                for r in records} == {(first.addr, "4", str(VENV), IFACE)}
        assert len(records) == steps and all(len(r["labels"]) == BATCH for r in records)
    assert_each_sample_once_per_epoch(by_rank, SAMPLES, epochs=2)

    # metrics and checkpoints written once, by global rank 0 only
    assert run.steps_logged() == list(range(1, steps + 1))
    assert len(events(out, "train_start")) == 1 and events(out, "train_start")[0]["world_size"] == 4
    assert run.latest() == f"step{steps:07d}"
    check_checkpoint(run, f"step{steps:07d}", 4)

    # the same run resumed on one (other) host with 3 ranks
    more = steps + 2
    code, out, wall = run.finish(run.launch({2: 3}, "--set", f"train.max_steps={more}", probe_state=True),
                                 timeout=500)
    print(f"resume on 1 host x 3 ranks, {more - steps} steps, ZeRO-{stage} {precision}: {wall:.1f} s")
    assert code == 0, out[-6000:]
    resumed = events(out, "resumed")
    assert [(r["step"], r["saved_world_size"], r["world_size"]) for r in resumed] == [(steps, 4, 3)]
    tag = f"step{steps:07d}"
    got = torch.load(run.probe / f"resumed-{tag}.pt", weights_only=True)
    saved = saved_state(run.run_dir / "checkpoints" / tag, steps, rates=(0.9, 0.5))
    assert got["step"] == steps and got["world_size"] == 3
    for key in ("model", "ema", "sampler", "exp_avg", "exp_avg_sq"):
        assert_equal(got[key], saved[key], key)
    on_third = probe_batches(run.probe, host=hosts.hosts[2].name)
    assert {r: len(recs) for r, recs in on_third.items()} == {0: more - steps, 1: more - steps, 2: more - steps}
    assert run.steps_logged() == list(range(1, more + 1))
    assert run.latest() == f"step{more:07d}"
    check_checkpoint(run, f"step{more:07d}", 3)


def saved_state(tag_dir: Path, step: int, rates: tuple[float, ...]) -> dict:
    """What the checkpoint holds: exported weights and EMA, the sampler, and the full Adam
    moments DeepSpeed extracted from the 4 ranks' shards (universal/)."""
    load = lambda p: torch.load(p, weights_only=True)  # noqa: E731
    model = load(tag_dir / f"model{step:06d}.pt")
    state = {"model": model, "ema": {r: load(tag_dir / f"ema_{r}_{step:06d}.pt") for r in rates},
             "sampler": _sampler_state(load(tag_dir / "trainer_state.pt"))}
    for moment in ("exp_avg", "exp_avg_sq"):
        state[moment] = {}
        for name in model:
            value = torch.load(tag_dir / "universal" / "zero" / name / f"{moment}.pt", weights_only=False)
            state[moment][name] = value["param"] if isinstance(value, dict) else value
    return state


def _sampler_state(trainer_state: dict) -> dict:
    """The timestep sampler's saved state (its key before and after the train/ refactor)."""
    return trainer_state["timestep_sampler" if "timestep_sampler" in trainer_state else "sampler"]


def assert_equal(a, b, what: str) -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys(), what
        for key in a:
            assert_equal(a[key], b[key], f"{what}.{key}")
    elif isinstance(a, torch.Tensor):
        # ZeRO-3's extracted moments are flat: compare values in order
        assert torch.equal(a.cpu().float().flatten(), b.cpu().float().flatten()), what
    else:
        assert a == b, what


def test_preemption_signal_on_the_second_host_stops_every_rank_at_one_step(hosts, tmp_path, id_data):
    total = 1000
    run = Run(hosts, tmp_path, id_data, **{"train.max_steps": total, "train.save_interval": 1000})
    proc = run.launch({0: 2, 1: 2}, master_addr=hosts.hosts[0].name)
    run.wait_for_step(proc, 2)
    target = ranks_on(hosts, 1)
    assert len(target) == 2
    target[-1].send_signal(signal.SIGUSR1)  # one rank of host 2: the others learn it at the next step
    code, out, wall = run.finish(proc, timeout=300)
    assert code == PREEMPTED_EXIT, out[-6000:]
    stopped = events(out, "preempted")[0]["step"]
    assert 2 <= stopped < total
    assert run.latest() == f"step{stopped:07d}"
    check_checkpoint(run, f"step{stopped:07d}", 4)
    # every rank on both hosts took exactly the batches of the agreed steps
    assert {r: len(recs) for r, recs in run.batches().items()} == {r: stopped for r in range(4)}
    assert not ranks_on(hosts, 0) and not ranks_on(hosts, 1)
    # the same command again resumes there and finishes
    code, out, _ = run.finish(run.launch({0: 2, 1: 2}, "--set", f"train.max_steps={stopped + 2}",
                                         master_addr=hosts.hosts[0].name), timeout=300)
    assert code == 0, out[-6000:]
    assert [r["step"] for r in events(out, "resumed")] == [stopped]
    assert run.steps_logged() == list(range(1, stopped + 3))


def failure_run(hosts: Hosts, tmp_path: Path, shards: list[str], timeout_s: int, save_interval: int = 2,
                fail_at: int = 3) -> tuple[Run, subprocess.Popen]:
    """A 2 x 2 run saving every `save_interval` steps, with the job's collective timeout
    `timeout_s`, once it has a complete checkpoint (step `fail_at` logged)."""
    run = Run(hosts, tmp_path, shards, **{"train.max_steps": restart_steps(save_interval),
                                          "train.save_interval": save_interval,
                                          "distributed.collective_timeout_s": timeout_s})
    proc = run.launch({0: 2, 1: 2})
    run.wait_for_step(proc, fail_at)
    return run, proc


def restart_steps(save_interval: int) -> int:
    """Far enough that the failure lands mid-run; the restart trains to it."""
    return max(16, 2 * save_interval + 4)


def check_restart_resumes(run: Run, save_interval: int = 2) -> None:
    """The same command again: it resumes from the newest complete checkpoint, finishes."""
    latest = run.latest()
    assert (run.run_dir / "checkpoints" / latest / "complete.json").is_file()
    code, out, wall = run.finish(run.launch({0: 2, 1: 2}), timeout=400)
    print(f"restart after the failure: {wall:.1f} s")
    assert code == 0, out[-6000:]
    assert [r["tag"] for r in events(out, "resumed")] == [latest]
    assert events(out, "train_done")[0]["step"] == restart_steps(save_interval)
    assert run.latest() == f"step{restart_steps(save_interval):07d}"


def test_a_host_that_dies_ends_the_run_and_the_same_command_resumes(hosts, tmp_path, id_data):
    run, proc = failure_run(hosts, tmp_path, id_data, timeout_s=600)  # death needs no timeout
    victims = ranks_on(hosts, 1)
    assert len(victims) == 2
    for rank in victims:  # the host is gone: its ranks die without a word, sockets close
        rank.kill()
    killed = time.monotonic()
    code, out, _ = run.finish(proc, timeout=120)  # far below the 600 s timeout: no hang
    print(f"host 2 killed: launcher exited {time.monotonic() - killed:.1f} s later with {code}")
    assert code not in (0, PREEMPTED_EXIT), out[-6000:]
    assert not ranks_on(hosts, 0) and not ranks_on(hosts, 1)
    survivors = [line for line in out.splitlines() if "that rank died or was killed" in line]
    assert {line.split("rank ", 1)[1].split(":")[0] for line in survivors} >= {"0", "1"}, out[-6000:]
    check_restart_resumes(run)


def test_a_network_partition_ends_the_run_within_the_collective_timeout(hosts, tmp_path, id_data):
    """A partition while the ranks train. (One during a checkpoint save, a sample grid or a
    conversion ends within distributed.long_wait_timeout_s instead, the bound on waiting for
    rank 0's solo work there: docs/cluster.md.) Saves at 10 and 20 and the cut after step 11:
    the ranks are training when it lands (the test sees step 11 within 0.25 s, and the next
    save is 9 steps away)."""
    timeout_s, save_interval = 20, 10
    run, proc = failure_run(hosts, tmp_path, id_data, timeout_s=timeout_s, save_interval=save_interval,
                            fail_at=save_interval + 1)
    hosts.link(hosts.hosts[1], up=False)  # no socket closes: only the timeout can end this
    cut = time.monotonic()
    try:
        # bounded: the timeout, plus the launchers' own exit; not torch's fixed 30 minutes
        code, out, _ = run.finish(proc, timeout=timeout_s + 120)
        print(f"partition: launcher exited {time.monotonic() - cut:.1f} s after the cut with {code}")
        assert code not in (0, PREEMPTED_EXIT), out[-6000:]
        # host 1's ranks each end with one line: the first to reach the timeout names it; the
        # other may instead see that rank's socket close as it exits (both at ~timeout_s)
        ended = {m[1]: m[2] for m in re.finditer(r"error: rank ([01]): (.*)", out)}
        assert sorted(ended) == ["0", "1"], out[-6000:]
        timed_out = f"waited longer than distributed.collective_timeout_s={timeout_s} s"
        assert any(timed_out in line for line in ended.values()), out[-6000:]
        assert all(timed_out in line or "lost its connection" in line for line in ended.values()), ended
        # the cut-off host's ranks give up on their own as well
        deadline = time.monotonic() + timeout_s + 60
        while ranks_on(hosts, 1) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not ranks_on(hosts, 1), "ranks behind the partition still running"
    finally:
        hosts.link(hosts.hosts[1], up=True)
    assert run.latest() == f"step{save_interval:07d}", "the cut did not land between two saves"
    check_restart_resumes(run, save_interval)
