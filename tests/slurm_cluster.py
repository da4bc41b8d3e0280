"""Real Slurm clusters for tests (Debian slurm-wlm 22.05 + munge): one node on localhost
(`slurm_cluster`), or two nodes in separate networks (`slurm_two_nodes`).

Everything lives in a private temporary directory: its own munged (own socket, the
system key), slurmctld and slurmd started in the foreground as children of the test
process, on free ports, with a slurm.conf that clients find through SLURM_CONF (set in
`SlurmCluster.env`; sbatch exports it to jobs, so srun/scontrol inside jobs find it too).
Nothing under /etc is written and a Slurm or munge already running on the machine is
left alone. Needs root (slurmd launches jobs); skipped only when the Slurm binaries are
absent -- under CI=true only when .ci/run reports that apt itself failed
(IDDPM_SLURM_UNAVAILABLE); otherwise a missing Slurm there is an installation failure.

Two nodes: the hosts of tests/hosts_harness.py (network namespaces with their own
addresses and hostnames; node names resolve through each host's /etc/netns hosts file, so
the first node of SLURM_JOB_NODELIST is a usable MASTER_ADDR). slurmctld runs on a third
host, which is also where sbatch/squeue/scontrol run (the login node); munged runs on this
machine, its socket path reaching every namespace. Each slurmd has its own spool, pid and
log file (`%n`), as Debian's slurmd supports several nodes on one machine.

Settings from shared/notes/cluster_on_one_machine.md: cred_expire=10 and sched_interval=2
make a requeued job start after ~11 s instead of ~3 minutes; jobs are polled with
`squeue` (sbatch --wait rechecks only after 2, 8, 32 s).

Dead nodes (two nodes only, `kill_node`/`revive_node`): slurmctld declares a silent node
DOWN, and ends (or requeues) its jobs with NODE_FAIL, only after two failed pings: each
ping retries a refused connect once a second for MessageTimeout (at most 10) seconds, and a
node is DOWN at the first ping round that starts SlurmdTimeout after the previous one saw
it alive. Defaults (300 s, 10 s): ~5 minutes. SlurmdTimeout=5 and MessageTimeout=5 here:
DOWN 15-17 s after the kill (measured; 24 s with MessageTimeout=10). Both are far above a
healthy slurmd's reply time on this machine, even under the test suite's load.
"""
from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:  # pragma: no cover
    from hosts_harness import Host, Hosts

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "squeue", "scontrol", "sinfo", "scancel")
NODE = "localhost"
CPUS = 2


def missing_binaries() -> list[str]:
    return [b for b in BINARIES if shutil.which(b) is None and not Path("/usr/sbin", b).exists()]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _which(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


SLURM_CONF = """\
ClusterName=iddpmtest
SlurmctldHost={ctld_host}({ctld_addr})
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket},cred_expire=10
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc={state}/log/jobcomp.txt
MailProg={true}
{kill_wait}
MinJobAge=600
{node_timeouts}
InactiveLimit=0
SchedulerParameters=sched_interval=2,bf_interval=2,batch_sched_delay=0,sched_min_interval=0
StateSaveLocation={state}/ctld
SlurmdSpoolDir={state}/spool{per_node}
SlurmctldPidFile={state}/run/slurmctld.pid
SlurmdPidFile={state}/run/slurmd{per_node}.pid
SlurmctldLogFile={state}/log/slurmctld.log
SlurmdLogFile={state}/log/slurmd{per_node}.log
{nodes}
PartitionName=debug Nodes={node_names} Default=YES MaxTime=INFINITE State=UP
"""
NODE_LINE = "NodeName={name} NodeAddr={addr} CPUs={cpus} State=UNKNOWN"
DEAD_NODE_TIMEOUTS = "SlurmdTimeout=5\nMessageTimeout=5"
"""Two nodes: a killed node is DOWN (its jobs NODE_FAIL) ~15 s later (module docstring)."""


class SlurmCluster:
    """Start/stop the daemons; `env` is the environment every client command must use."""

    def __init__(self, hosts: "Hosts | None" = None) -> None:
        """One node (`localhost`) in this machine's network, or, given hosts (see
        tests/hosts_harness.py), a controller on the last host and one node (slurmd) on
        each of the others, each in its host's network namespace; client commands then run
        on the controller's host, the cluster's login node."""
        self.hosts = hosts
        if hosts is None:
            self.nodes = [(NODE, "127.0.0.1")]
            self.head = None
        else:
            self.nodes = [(h.name, h.addr) for h in hosts.hosts[:-1]]
            self.head = hosts.hosts[-1]
        # short path: slurmstepd puts unix sockets in the spool dir (108-byte limit)
        self.state = Path(tempfile.mkdtemp(prefix="slurm-", dir="/tmp"))
        self.state.chmod(0o755)  # munged insists every parent of its socket is traversable
        self.conf = self.state / "slurm.conf"
        self.munge_socket = self.state / "munge" / "munge.sock"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        for key in ("SLURM_JOB_ID", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_JOBID"):
            self.env.pop(key, None)  # a test session started inside a Slurm job
        self.procs: dict[str, subprocess.Popen] = {}

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> "SlurmCluster":
        for sub in ("ctld", "spool", "run", "log", *(f"spool-{n}" for n, _ in self.nodes)):
            (self.state / sub).mkdir()
        self._start_munged()
        self.conf.write_text(self._conf())
        self._spawn("slurmctld", [_which("slurmctld"), "-D", "-c", "-i", "-f", str(self.conf)], self.head)
        for name, _addr in self.nodes:
            self._start_slurmd(name)
        self._wait_idle(timeout=60)
        return self

    def _start_slurmd(self, name: str) -> None:
        host = None if self.hosts is None else self._host(name)
        label = "slurmd" if self.hosts is None else f"slurmd-{name}"
        self._spawn(label, [_which("slurmd"), "-D", "-N", name, "-f", str(self.conf)], host)

    def _host(self, name: str) -> "Host":
        return next(h for h in self.hosts.hosts if h.name == name)

    # ------------------------------------------------------------- dead nodes
    def kill_node(self, name: str) -> float:
        """Node `name` dies (two nodes only): SIGKILL every process on its host -- its
        slurmd, the jobs' slurmstepd and tasks -- so its sockets close and nothing answers
        slurmctld's pings any more (the harness's own sshd, which Slurm never uses, stays).
        Returns time.time() of the kill."""
        proc = self.procs[f"slurmd-{name}"]
        killed_at = time.time()
        self.hosts.kill_all(self._host(name).netns, keep_sshd=True)
        proc.wait(timeout=10)
        return killed_at

    def revive_node(self, name: str, timeout: float = 60) -> None:
        """Start a killed node's slurmd again and wait until both nodes are idle. A node
        slurmctld set DOWN for not responding comes back when it registers
        (ReturnToService=2); `state=resume` covers a node still marked down."""
        self._start_slurmd(name)
        self._wait(lambda: self._node_state(name) not in ("", "down*"), timeout, f"{name} registered")
        if self._node_state(name).startswith(("down", "drain")):
            self.run(["scontrol", "update", f"nodename={name}", "state=resume"], check=False)
        self._wait_idle(timeout)

    def _node_state(self, name: str) -> str:
        return self.run(["sinfo", "-h", "-n", name, "-o", "%t"], check=False).stdout.strip()

    def _conf(self) -> str:
        if self.head is None:  # free ports: a Slurm of the machine's own may be running
            ctld, ports, per_node = (NODE, "127.0.0.1"), (_free_port(), _free_port()), ""
            timeouts = ""  # Slurm's defaults: the one node never dies on purpose
            # Slurm's default grace between a cancel's SIGTERM and its SIGKILL, as on a real
            # cluster: the ranks of a cancelled job checkpoint within it (test_slurm)
            kill_wait = "KillWait=30"
        else:  # own network namespaces: Slurm's default ports are free there
            ctld, ports, per_node = (self.head.name, self.head.addr), (6817, 6818), "-%n"
            timeouts = DEAD_NODE_TIMEOUTS
            # the ranks left by a dead node hang in a collective until SIGKILL: end them soon
            kill_wait = "KillWait=5"
        nodes = "\n".join(NODE_LINE.format(name=n, addr=a, cpus=CPUS) for n, a in self.nodes)
        return SLURM_CONF.format(
            ctld_host=ctld[0], ctld_addr=ctld[1], ctld_port=ports[0], slurmd_port=ports[1],
            per_node=per_node, node_timeouts=timeouts, kill_wait=kill_wait, nodes=nodes, node_names=",".join(n for n, _ in self.nodes),
            state=self.state, munge_socket=self.munge_socket, true=shutil.which("true") or "/bin/true")

    def _wrap(self, cmd: list[str], host: "Host | None" = None) -> list[str]:
        """A command as run on `host` (default: the login node; this machine for one node)."""
        host = host or self.head
        return cmd if host is None else self.hosts.wrap(host, cmd)

    def _start_munged(self) -> None:
        munge_dir = self.munge_socket.parent
        munge_dir.mkdir()
        key = Path("/etc/munge/munge.key")
        if not key.is_file():  # no key from munge's postinst: make a private one
            key = munge_dir / "munge.key"
            key.write_bytes(os.urandom(1024))
            key.chmod(0o600)
        user = pwd.getpwnam("munge") if _has_user("munge") else None
        if user is not None:
            for path in (munge_dir, *munge_dir.iterdir()):
                os.chown(path, user.pw_uid, user.pw_gid)
        cmd = [_which("munged"), "-F", f"--socket={self.munge_socket}", f"--key-file={key}",
               f"--pid-file={munge_dir}/munged.pid", f"--log-file={munge_dir}/munged.log",
               f"--seed-file={munge_dir}/munged.seed"]
        if user is not None:
            cmd = ["runuser", "-u", "munge", "--", *cmd]
        else:
            cmd.append("--force")
        self._spawn("munged", cmd)
        self._wait(lambda: self.munge_socket.exists(), 20, "munged socket")

    def _spawn(self, name: str, cmd: list[str], host: "Host | None" = None) -> None:
        """Start a daemon (munged: on this machine; its socket serves every namespace)."""
        log = open(self.state / "log" / f"{name}.out", "a")  # a restarted slurmd appends
        if host is not None:
            cmd = self.hosts.wrap(host, cmd)
        self.procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                            start_new_session=True)
        log.close()

    def _wait_idle(self, timeout: float) -> None:
        def idle() -> bool:
            out = self.run(["sinfo", "-h", "-N", "-o", "%t"], check=False).stdout.split()
            return out == ["idle"] * len(self.nodes)
        self._wait(idle, timeout, "node idle")

    def _wait(self, predicate, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            dead = [n for n, p in self.procs.items() if p.poll() is not None]
            if dead:
                raise RuntimeError(f"{dead} exited while waiting for {what}:\n{self.logs()}")
            if predicate():
                return
            time.sleep(0.2)
        raise RuntimeError(f"timed out after {timeout} s waiting for {what}:\n{self.logs()}")

    def stop(self) -> None:
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            jobs = self.run(["squeue", "-h", "-o", "%A"], check=False).stdout.split()
            if jobs:
                self.run(["scancel", *jobs], check=False)
                deadline = time.monotonic() + 15
                while time.monotonic() < deadline and self.run(["squeue", "-h", "-o", "%A"],
                                                                check=False).stdout.strip():
                    time.sleep(0.5)
        for name in sorted(self.procs, key=lambda n: ("slurmd", "slurmctld", "munged").index(n.split("-")[0])):
            proc = self.procs.get(name)
            if proc is None or proc.poll() is not None:
                continue
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        shutil.rmtree(self.state, ignore_errors=True)

    # ------------------------------------------------------------------ clients
    def run(self, cmd: list[str], check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
        proc = subprocess.run(self._wrap(cmd), env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{cmd} failed ({proc.returncode}): {proc.stdout}{proc.stderr}")
        return proc

    def sbatch(self, *args: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
        """Submit (extra `env` on top of the cluster's); returns the job id (an array's id)."""
        proc = subprocess.run(self._wrap(["sbatch", "--parsable", *args]), env={**self.env, **(env or {})},
                              capture_output=True, text=True, timeout=30, cwd=cwd)
        if proc.returncode != 0:
            raise RuntimeError(f"sbatch {args} failed: {proc.stderr}")
        return proc.stdout.strip().split(";")[0]

    def job_infos(self, job_id: str) -> list[dict[str, str]]:
        """`scontrol show job` as dicts: one job, or every task of an array."""
        records = []
        for line in self.run(["scontrol", "show", "job", "-o", job_id]).stdout.splitlines():
            fields: dict[str, str] = {}
            for item in line.split():
                key, _, value = item.partition("=")
                fields.setdefault(key, value)
            records.append(fields)
        return records

    def job_info(self, job_id: str) -> dict[str, str]:
        return self.job_infos(job_id)[0]

    def active(self, job_id: str) -> bool:
        """Pending, running or completing (any task of an array)."""
        out = self.run(["squeue", "-h", "-j", job_id, "-o", "%T"], check=False)
        return bool(out.stdout.strip())

    def wait_done(self, job_id: str, timeout: float, poll: float = 0.5) -> None:
        deadline = time.monotonic() + timeout
        while self.active(job_id):
            if time.monotonic() > deadline:
                self.run(["scancel", job_id], check=False)
                raise AssertionError(f"job {job_id} still active after {timeout} s:\n"
                                     + self.run(["scontrol", "show", "job", job_id], check=False).stdout)
            time.sleep(poll)

    def logs(self) -> str:
        parts = []
        for path in sorted((self.state / "log").glob("*")):
            parts.append(f"--- {path.name}\n" + path.read_text(errors="replace")[-3000:])
        munge_log = self.munge_socket.parent / "munged.log"
        if munge_log.exists():
            parts.append("--- munged.log\n" + munge_log.read_text(errors="replace")[-2000:])
        return "\n".join(parts)


def _has_user(name: str) -> bool:
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


def require_slurm() -> None:
    """Skip when Slurm is absent (under CI: fail, unless .ci/run says apt could not work)."""
    missing = missing_binaries()
    if missing:
        # .ci/run sets the reason only when apt itself failed; an apt that worked must
        # have installed Slurm, so under CI a missing binary is an error, not a skip
        reason = os.environ.get("IDDPM_SLURM_UNAVAILABLE")
        if os.environ.get("CI") and not reason:
            pytest.fail(f"CI must run the Slurm tests, but these are missing: {missing}")
        pytest.skip(f"Slurm not installed (missing {missing}): {reason or 'see .ci/run'}")
    if os.geteuid() != 0:
        if os.environ.get("CI"):
            pytest.fail("the Slurm test cluster needs root (slurmd launches jobs)")
        pytest.skip("the Slurm test cluster needs root (slurmd launches jobs)")


@pytest.fixture(scope="session")
def slurm_cluster():
    """A started one-node cluster (node `localhost`, 2 CPUs, partition `debug`)."""
    require_slurm()
    cluster = SlurmCluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def slurm_two_nodes():
    """A started two-node cluster on hosts of tests/hosts_harness.py: nodes <prefix>-1 and
    <prefix>-2 (2 CPUs each, partition `debug`), each slurmd in its own network namespace
    with its own address; slurmctld and the client commands on a third host."""
    from hosts_harness import Hosts, require_machine

    require_slurm()
    require_machine()
    hosts = Hosts(3)
    cluster = None
    try:
        hosts.start()
        cluster = SlurmCluster(hosts)
        cluster.start()
        yield cluster
    finally:
        if cluster is not None:
            cluster.stop()
        hosts.stop()
