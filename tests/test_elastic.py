"""launch/elastic.py: torchrun's elastic agent with the service's restart policy.

The shrink-and-grow test runs one agent per network-namespace host (tests/hosts_harness.py),
as on a cluster: the same command on every host, a c10d rendezvous on host 1's address.
Host 2 dies (every process of the run on it SIGKILLed: agent and ranks), host 1 goes on
alone at world size 2 from `latest`, host 2's agent is started again and the run grows
back to 4. Nothing is typed in between. The probe (tests/probe) records each rank's
batches and, at every resume, the state the Trainer holds.

The no-restart tests run on this machine alone (--standalone): a diverging run (exit 3)
and a bad job (exit 2) end the agent at once instead of being restarted.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from hosts_harness import IFACE, PROBE, Hosts, id_job, require_machine
from test_data_helpers import id_shards
from test_multihost import assert_equal, saved_state
from train_utils import ROOT, TRAIN, metrics, tiny_job

pytestmark = pytest.mark.slow

ELASTIC = ROOT / "launch" / "elastic.py"
VENV = Path(sys.prefix)
SIZES = [20, 27, 17]  # 64 samples in uneven shards: 4 steps an epoch at 4 ranks, 8 at 2
SAMPLES = sum(SIZES)
BATCH = 4
RDZV_PORT = 29400  # on host 1, named as on a cluster: torch serves the store where the name is its own
# the dead host's rendezvous entry expires after keep_alive_interval x keep_alive_max_attempt
# seconds (torch's default 5 x 3); the round closes last_call_timeout after MIN nodes joined
RDZV_CONF = "keep_alive_interval=1,keep_alive_max_attempt=3,last_call_timeout=2,join_timeout=120"
SHRINK_BOUND_S = 60   # host death -> first step at world size 2 (measured ~20 s)
GROW_BOUND_S = 60     # host back -> first step at world size 4 (measured ~20 s)


class ElasticRun:
    """One run dir, trained by one elastic agent per host (shared cwd and run dir)."""

    def __init__(self, hosts: Hosts, work: Path, shards: list[str]) -> None:
        self.hosts, self.work = hosts, work
        self.job = id_job(work, shards, SAMPLES, **{
            "train.batch_size": BATCH, "train.max_steps": 100_000, "train.save_interval": 4,
            "distributed.collective_timeout_s": 60, "output.keep_checkpoints": 100})
        self.run_dir = work / "run"
        self.probe = work / "probe"
        self.probe.mkdir()
        self.logs: list[Path] = []

    def start(self, index: int) -> subprocess.Popen:
        """The README's elastic command on host `index` (0-based)."""
        cmd = [sys.executable, str(ELASTIC), "--nnodes", "1:2", "--nproc-per-node", "2",
               "--max-restarts", "3", "--rdzv-backend", "c10d",
               "--rdzv-endpoint", f"{self.hosts.hosts[0].name}:{RDZV_PORT}", "--rdzv-id", "elastic-test",
               "--rdzv-conf", RDZV_CONF, "--monitor-interval", "0.5",
               str(TRAIN), "--job", str(self.job)]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PYTHON"))}
        env.update(PATH=f"{VENV / 'bin'}:{env.get('PATH', '/usr/bin:/bin')}", VIRTUAL_ENV=str(VENV),
                   PYTHONPATH=f"{PROBE}{os.pathsep}{ROOT}", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1",
                   DS_ACCELERATOR="cpu", GLOO_SOCKET_IFNAME=IFACE, IDDPM_PROBE_DIR=str(self.probe),
                   IDDPM_PROBE_STATE="1")
        log = self.work / f"agent{len(self.logs)}-host{index + 1}.out"
        self.logs.append(log)
        with open(log, "w") as out:
            return self.hosts.popen(self.hosts.hosts[index], cmd, cwd=self.work, env=env, stdout=out,
                                    stderr=subprocess.STDOUT, text=True)

    def events(self, name: str) -> list[dict]:
        """The JSON events of every agent log and its ranks, in time order."""
        found = []
        for log in self.logs:
            for line in log.read_text(errors="replace").splitlines():
                start = line.find('{"event"')
                if start >= 0 and f'"event": "{name}"' in line:
                    found.append(json.loads(line[start:]))
        return sorted(found, key=lambda e: e["time"])

    def output(self) -> str:
        return "\n".join(f"--- {p.name}\n" + p.read_text(errors="replace")[-4000:] for p in self.logs)

    def wait(self, what: str, predicate, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"no {what} after {timeout} s:\n{self.output()}")
            time.sleep(0.25)

    def first_step_after(self, t: float) -> dict | None:
        rows = [m for m in metrics(self.run_dir) if m["time"] > t] if (self.run_dir / "metrics.jsonl").exists() else []
        return rows[0] if rows else None

    def latest_step(self) -> int:
        path = self.run_dir / "checkpoints" / "latest"
        return int(path.read_text().strip()[4:]) if path.exists() else 0


def run_processes(hosts: Hosts, index: int, ranks_only: bool = False) -> list[psutil.Process]:
    """Every process of the run on host `index`: the agent and its ranks (or the ranks)."""
    found = []
    for pid in hosts.pids(hosts.hosts[index]):
        try:
            proc = psutil.Process(pid)
            cmd = proc.cmdline()
        except psutil.Error:
            continue
        if str(ELASTIC) not in cmd and str(TRAIN) in cmd or not ranks_only and str(ELASTIC) in cmd:
            found.append(proc)
    return found


def segments(probe: Path) -> list[dict[int, list[list[int]]]]:
    """The probe's batch records split into launches: [{rank: [labels of each batch]}], a
    launch being the n-th process (pid) of each rank number at one world size."""
    by_key: dict[tuple[int, int], list[list[int]]] = {}  # (world size, n-th pid of that rank)
    order: dict[tuple[int, int], list[int]] = {}
    for path in sorted(probe.glob("batches-*-rank*.jsonl")):
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            pids = order.setdefault((int(rec["WORLD_SIZE"]), rec["rank"]), [])
            if rec["pid"] not in pids:
                pids.append(rec["pid"])
            key = (int(rec["WORLD_SIZE"]), pids.index(rec["pid"]), rec["rank"])
            by_key.setdefault(key, []).append(rec["labels"])
    launches: dict[tuple[int, int], dict[int, list[list[int]]]] = {}
    for (world, nth, rank), batches in by_key.items():
        launches.setdefault((world, nth), {})[rank] = batches
    return [launches[k] for k in sorted(launches)]


def assert_once_per_epoch(launch: dict[int, list[list[int]]], first_epoch_batches: int) -> None:
    """Within each epoch of one launch no sample is served twice, and every full epoch
    serves every sample: the first epoch is the rest of the resumed one."""
    world = len(launch)
    full = SAMPLES // (world * BATCH)
    start, size = 0, first_epoch_batches
    while start < min(len(b) for b in launch.values()):
        served = [x for batches in launch.values() for b in batches[start:start + size] for x in b]
        assert len(served) == len(set(served)), f"a sample served twice in one epoch at world {world}"
        if size == full and all(len(b) >= start + size for b in launch.values()):
            assert sorted(served) == list(range(SAMPLES))
        start, size = start + size, full


@pytest.fixture(scope="module")
def id_data(tmp_path_factory) -> list[str]:
    return id_shards(tmp_path_factory.mktemp("ids"), SIZES, side=16)


@pytest.fixture(scope="module")
def two_hosts():
    """Two hosts of this module's own, not the session's `hosts`: the test then runs on
    another xdist worker beside the other multi-host tests instead of after them."""
    require_machine()
    made = Hosts(2)
    try:
        made.start()
        yield made
    finally:
        made.stop()


def test_a_dead_host_shrinks_the_run_and_its_return_grows_it(two_hosts, tmp_path, id_data):
    hosts = two_hosts
    run = ElasticRun(hosts, tmp_path, id_data)
    agents = [run.start(0), run.start(1)]
    try:
        run.wait("step 9 at world size 4", lambda: run.latest_step() >= 8 and run.first_step_after(0) and
                 max(m["step"] for m in metrics(run.run_dir)) >= 9, timeout=240)
        saved_before = run.latest_step()
        victims = run_processes(hosts, 1)
        assert len(victims) == 3, victims  # agent + 2 ranks
        for proc in victims:  # the host is gone: nothing on it says a word
            proc.kill()
        killed = time.time()
        run.wait("resume at world size 2", lambda: any(
            e["world_size"] == 2 for e in run.events("resumed")), timeout=SHRINK_BOUND_S + 60)
        run.wait("a step at world size 2", lambda: run.first_step_after(run.events("resumed")[0]["time"]),
                 timeout=60)
        shrunk = run.first_step_after(run.events("resumed")[0]["time"])
        lost = killed - [e for e in run.events("checkpoint_saved") if e["step"] == saved_before][0]["time"]

        agents.append(run.start(1))  # the host is back: its agent joins the next rendezvous
        back = time.time()
        run.wait("resume at world size 4", lambda: len(run.events("resumed")) == 2, timeout=GROW_BOUND_S + 60)
        grown_at = run.events("resumed")[1]["time"]
        run.wait("3 steps at world size 4", lambda: len([m for m in metrics(run.run_dir)
                                                         if m["time"] > grown_at]) >= 3, timeout=60)
        grown = run.first_step_after(grown_at)
        run_processes(hosts, 0, ranks_only=True)[0].send_signal(signal.SIGUSR1)  # end it: a preemption, exit 75
        codes = [agents[0].wait(timeout=120), agents[2].wait(timeout=120)]
    finally:
        for proc in agents:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        hosts.kill_strays()
    print(f"elastic: host death -> first step at world 2: {shrunk['time'] - killed:.1f} s "
          f"(lost work {lost:.1f} s since the checkpoint at step {saved_before}); "
          f"host back -> first step at world 4: {grown['time'] - back:.1f} s")
    out = run.output()
    assert codes == [75, 75], out  # the preemption is passed on, not restarted

    # the layouts: 4, then 2 from the checkpoint before the death, then 4 from the
    # checkpoint the membership change wrote (SIGTERM from the agent: nothing lost)
    assert run.events("elastic_restart")[0]["exitcodes"] == [4], out  # the survivors' one status
    started = run.events("elastic_workers_started")
    assert [e["world_size"] for e in started if e["node_rank"] == 0] == [4, 2, 4], out
    resumed = run.events("resumed")
    preempted = run.events("preempted")
    assert [(r["step"], r["saved_world_size"], r["world_size"]) for r in resumed] == [
        (saved_before, 4, 2), (preempted[0]["step"], 2, 4)], out
    assert [e["saved_world_size"] for e in run.events("resume_world_size_changed")] == [4, 2]
    assert shrunk["step"] == saved_before + 1 and grown["step"] == preempted[0]["step"] + 1
    assert shrunk["time"] - killed < SHRINK_BOUND_S and grown["time"] - back < GROW_BOUND_S

    # steps only increase within a launch; each launch starts after the checkpoint it loaded
    rows = metrics(run.run_dir)
    steps = [m["step"] for m in rows]
    starts = [0] + [next(i for i, m in enumerate(rows) if m["time"] > r["time"]) for r in resumed]
    assert [steps[i] for i in starts] == [1, saved_before + 1, preempted[0]["step"] + 1], steps
    for a, b in zip(starts, starts[1:] + [len(steps)]):
        assert steps[a:b] == list(range(steps[a], steps[a] + b - a))

    # each resume holds the checkpoint's weights, EMA, sampler and Adam moments
    for event in resumed:
        got = torch.load(run.probe / f"resumed-{event['tag']}.pt", weights_only=True)
        saved = saved_state(run.run_dir / "checkpoints" / event["tag"], event["step"], rates=(0.9, 0.5))
        for key in ("model", "ema", "sampler", "exp_avg", "exp_avg_sq"):
            assert_equal(got[key], saved[key], f"{event['tag']} {key}")

    # no sample twice within an epoch at any one world size
    launches = segments(run.probe)
    assert [len(launch) for launch in launches] == [2, 4, 4]  # sorted by (world size, n-th)
    data_resumes = run.events("data_resume")
    assert_once_per_epoch(launches[1], SAMPLES // (4 * BATCH))  # world 4, fresh
    assert_once_per_epoch(launches[0], data_resumes[0]["batches_left"])  # world 2
    assert_once_per_epoch(launches[2], data_resumes[1]["batches_left"])  # world 4 again

    # the final checkpoint loads: one more step on this machine, one rank
    final = run.latest_step()
    assert final == preempted[-1]["step"]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                           "1", str(TRAIN), "--job", str(run.job), "--set", f"train.max_steps={final + 1}"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert [e["tag"] for e in agent_events(proc.stdout + proc.stderr, "resumed")] == [f"step{final:07d}"]


# --------------------------------------------------------- statuses that never restart
def elastic_standalone(job: Path, *sets: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ELASTIC), "--standalone", "--nproc-per-node", "2", "--max-restarts", "3",
           "--monitor-interval", "0.5", str(TRAIN), "--job", str(job)]
    cmd += [a for s in sets for a in ("--set", s)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})


def agent_events(out: str, name: str) -> list[dict]:
    return [json.loads(line[line.find("{"):]) for line in out.splitlines()
            if line.startswith(f'{{"event": "{name}"')]


def test_divergence_under_the_elastic_agent_exits_3_without_a_restart(tmp_path, digits_shards):
    job = tiny_job(tmp_path, digits_shards, **{"train.max_steps": 60, "train.log_interval": 2,
                                               "train.save_interval": 2, "train.max_nonfinite_steps": 3})
    proc = elastic_standalone(job, "train.lr=1e3")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 3, out[-4000:]
    assert len(agent_events(out, "elastic_workers_started")) == 1, out[-4000:]
    assert [e["exitcode"] for e in agent_events(out, "elastic_stop")] == [3]
    assert not agent_events(out, "elastic_restart")
    assert len([line for line in out.splitlines() if line.startswith("error:")]) == 1


def test_a_bad_job_under_the_elastic_agent_exits_2_once(tmp_path, digits_shards):
    job = tiny_job(tmp_path, digits_shards)
    proc = elastic_standalone(job, "train.lr=-1")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-4000:]
    assert len(agent_events(out, "elastic_workers_started")) == 1
    assert [e["exitcode"] for e in agent_events(out, "elastic_stop")] == [2]
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "train.lr" in errors[0], errors
    assert not (tmp_path / "run").exists()
