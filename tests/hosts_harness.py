"""Several "hosts" on one machine for multi-host tests: network namespaces with sshd.

Each host is a Linux network namespace with its own interface (`ds0`, the same name on
every host, as on a real cluster), its own address, its own hostname (a UTS namespace)
and its own sshd accepting root by a harness key. The hosts hang on one bridge that lives
in a further, private "switch" namespace, so nothing is added to the machine's own
network: the private 10.x addresses exist only inside namespaces this harness made, and
no packet ever leaves them. The filesystem is shared by all hosts, as NFS or Lustre would
be on a cluster: repository, venv, data and run dirs are at the same paths everywhere.

Everything started on a host (`wrap`) enters the host's network namespace (nsenter) and
a private mount and UTS namespace, where the host's own hosts file is bind-mounted over
/etc/hosts and the hostname is set: each host resolves every host name without an edit of
the machine's /etc/hosts, and /sys keeps the machine's cgroup mounts (slurmd needs them;
`ip netns exec` would remount /sys without them). The ssh client finds the harness key
through a drop-in /etc/ssh/ssh_config.d/iddpm<tag>.conf (Debian's ssh_config includes
that folder) that matches the harness's host names only. `stop()` (also run at interpreter exit) kills
every process in the namespaces, deletes them and removes every file it wrote.

Needs root, iproute2, openssh-server/client and pdsh (.ci/run installs them).
"""
from __future__ import annotations

import atexit
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

IFACE = "ds0"
"""The hosts' interface name (what GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME name)."""
SUBNET = "10.213.0"
"""Private addresses, only inside this harness's namespaces (host i is SUBNET.i)."""
BINARIES = ("ip", "nsenter", "unshare", "mount", "ssh", "ssh-keygen", "pdsh", "/usr/sbin/sshd")
SSH_DROPIN_DIR = Path("/etc/ssh/ssh_config.d")
RUN_SSHD = Path("/run/sshd")

SSHD_CONFIG = """\
ListenAddress 0.0.0.0
Port 22
HostKey {state}/ssh/host_key
PidFile {state}/{name}/sshd.pid
AuthorizedKeysFile {state}/ssh/authorized_keys
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
UseDNS no
PrintMotd no
X11Forwarding no
MaxStartups 100:30:200
MaxSessions 100
ClientAliveInterval 5
ClientAliveCountMax 3
LogLevel ERROR
"""

SSH_CLIENT_CONFIG = """\
# iddpm_ds test hosts (tests/hosts_harness.py); removed when the harness stops
Host {pattern}
    User root
    IdentityFile {state}/ssh/id_key
    IdentitiesOnly yes
    StrictHostKeyChecking no
    UserKnownHostsFile /dev/null
    GlobalKnownHostsFile /dev/null
    GSSAPIAuthentication no
    BatchMode yes
    ConnectTimeout 10
    ServerAliveInterval 5
    ServerAliveCountMax 3
    LogLevel ERROR
"""


def missing_binaries() -> list[str]:
    return [b for b in BINARIES if shutil.which(b) is None]


@dataclass
class Host:
    name: str
    """Host name (resolves inside every host; the hostfile and Slurm use it)."""
    netns: str
    addr: str


def _sh(*cmd: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


class Hosts:
    """`count` hosts named iddpm<tag>-1.. ; `start()`, then `run`/`popen` on a host."""

    def __init__(self, count: int) -> None:
        self.tag = secrets.token_hex(3)
        self.prefix = f"iddpm{self.tag}"
        self.hosts = [Host(f"{self.prefix}-{i}", f"{self.prefix}-h{i}", f"{SUBNET}.{i}")
                      for i in range(1, count + 1)]
        self.switch = f"{self.prefix}-sw"
        # short path: sshd and slurmstepd put unix sockets under it
        self.state = Path(tempfile.mkdtemp(prefix="hosts-", dir="/tmp"))
        self.state.chmod(0o755)
        self.ssh_dropin = SSH_DROPIN_DIR / f"{self.prefix}.conf"
        self.sshd: dict[str, subprocess.Popen] = {}
        self._made: list[str] = []  # namespaces created, for stop()
        self._stopped = False
        atexit.register(self.stop)

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> "Hosts":
        try:
            self._network()
            self._name_resolution()
            self._ssh()
            for host in self.hosts:
                self._start_sshd(host)
            for host in self.hosts:
                self._wait_ssh(host, timeout=30)
        except BaseException:
            self.stop()
            raise
        return self

    def _network(self) -> None:
        _sh("ip", "netns", "add", self.switch)
        self._made.append(self.switch)
        _sh("ip", "-n", self.switch, "link", "add", "br0", "type", "bridge")
        _sh("ip", "-n", self.switch, "link", "set", "br0", "up")
        for i, host in enumerate(self.hosts, start=1):
            _sh("ip", "netns", "add", host.netns)
            self._made.append(host.netns)
            # the pair is created straight inside the namespaces: no name in the machine's
            _sh("ip", "link", "add", f"p{i}", "netns", self.switch, "type", "veth",
                "peer", "name", IFACE, "netns", host.netns)
            _sh("ip", "-n", self.switch, "link", "set", f"p{i}", "master", "br0", "up")
            _sh("ip", "-n", host.netns, "addr", "add", f"{host.addr}/24", "dev", IFACE)
            _sh("ip", "-n", host.netns, "link", "set", IFACE, "up")
            _sh("ip", "-n", host.netns, "link", "set", "lo", "up")

    def _name_resolution(self) -> None:
        for host in self.hosts:
            # as Debian's installer writes it: a host's own name is 127.0.1.1, so software
            # that binds "its hostname" (gloo without GLOO_SOCKET_IFNAME) is not reachable
            # from the other hosts, exactly the trap a real cluster sets
            lines = ["127.0.0.1 localhost", f"127.0.1.1 {host.name}",
                     *(f"{h.addr} {h.name}" for h in self.hosts if h is not host)]
            self._hosts_file(host).write_text("\n".join(lines) + "\n")

    def _hosts_file(self, host: Host) -> Path:
        return self.state / f"{host.name}.hosts"

    def _ssh(self) -> None:
        ssh = self.state / "ssh"
        ssh.mkdir(mode=0o700)
        _sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(ssh / "host_key"))
        _sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(ssh / "id_key"))
        shutil.copy(ssh / "id_key.pub", ssh / "authorized_keys")
        if not SSH_DROPIN_DIR.is_dir():
            raise RuntimeError(f"{SSH_DROPIN_DIR} missing: the ssh client cannot be configured")
        self.ssh_dropin.write_text(SSH_CLIENT_CONFIG.format(pattern=f"{self.prefix}-*", state=self.state))
        # sshd's privilege-separation directory, as openssh's tmpfiles.d entry makes it at
        # boot. Made if missing and left in place: a harness of another test process (a
        # pytest-xdist worker) may still run sshd that needs it.
        RUN_SSHD.mkdir(mode=0o755, exist_ok=True)

    def _start_sshd(self, host: Host) -> None:
        folder = self.state / host.name
        folder.mkdir()
        conf = folder / "sshd_config"
        conf.write_text(SSHD_CONFIG.format(state=self.state, name=host.name))
        log = open(folder / "sshd.log", "w")
        self.sshd[host.name] = subprocess.Popen(
            self.wrap(host, ["/usr/sbin/sshd", "-D", "-e", "-f", str(conf)]),
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()

    def _wait_ssh(self, host: Host, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            proc = self.run(self.hosts[0], ["ssh", host.name, "hostname"], check=False)
            if proc.returncode == 0 and proc.stdout.strip() == host.name:
                return
            if time.monotonic() > deadline or self.sshd[host.name].poll() is not None:
                log = (self.state / host.name / "sshd.log").read_text(errors="replace")
                raise RuntimeError(f"sshd on {host.name} not reachable: {proc.stderr}\n{log}")
            time.sleep(0.2)

    def stop(self) -> None:
        """Kill everything started inside the hosts, delete the namespaces and files."""
        if self._stopped:
            return
        self._stopped = True
        for netns in self._made:
            self.kill_all(netns)
        for proc in self.sshd.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        for netns in reversed(self._made):
            _sh("ip", "netns", "del", netns, check=False)
        self.ssh_dropin.unlink(missing_ok=True)
        shutil.rmtree(self.state, ignore_errors=True)
        atexit.unregister(self.stop)

    # ----------------------------------------------------------------- processes
    def pids(self, host: Host | str) -> list[int]:
        """Every process whose network namespace is this host's."""
        netns = host.netns if isinstance(host, Host) else host
        out = _sh("ip", "netns", "pids", netns, check=False).stdout.split()
        return [int(p) for p in out]

    def kill_all(self, netns: str, sig: int = signal.SIGKILL, keep_sshd: bool = False) -> None:
        """Signal every process in a namespace (all started by this harness), until none is left."""
        keep = {p.pid for p in self.sshd.values()} if keep_sshd else set()
        for _ in range(50):
            pids = [p for p in self.pids(netns) if p not in keep]
            if not pids:
                return
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            time.sleep(0.1)

    def kill_strays(self) -> None:
        """Between tests: end whatever a test left on the hosts (ranks), keep the sshds."""
        for host in self.hosts:
            self.kill_all(host.netns, keep_sshd=True)

    def wrap(self, host: Host, cmd: list[str]) -> list[str]:
        """`cmd` as run on `host`: its network namespace, /etc/hosts and hostname."""
        script = 'mount --bind "$1" /etc/hosts && hostname "$0" && shift && exec "$@"'
        return ["nsenter", f"--net=/run/netns/{host.netns}", "unshare", "--mount", "--uts",
                "--propagation", "private", "--", "sh", "-c", script, host.name,
                str(self._hosts_file(host)), *cmd]

    def run(self, host: Host, cmd: list[str], check: bool = True, timeout: float = 30,
            **kwargs) -> subprocess.CompletedProcess:
        proc = subprocess.run(self.wrap(host, cmd), capture_output=True, text=True, timeout=timeout,
                              **kwargs)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{cmd} on {host.name} failed ({proc.returncode}): {proc.stdout}{proc.stderr}")
        return proc

    def popen(self, host: Host, cmd: list[str], **kwargs) -> subprocess.Popen:
        """Start `cmd` on `host` in its own process group (kill with os.killpg)."""
        return subprocess.Popen(self.wrap(host, cmd), start_new_session=True, **kwargs)

    def hostfile(self, path: Path, slots: dict[int, int]) -> Path:
        """A DeepSpeed hostfile: {host index (0-based): slots}."""
        path.write_text("".join(f"{self.hosts[i].name} slots={n}\n" for i, n in slots.items()))
        return path

    def link(self, host: Host, up: bool) -> None:
        """Bring a host's network interface down (a partition: no socket closes) or up."""
        _sh("ip", "-n", host.netns, "link", "set", IFACE, "up" if up else "down")


def require_machine() -> None:
    """Skip (or, under CI, fail) when this machine cannot make hosts."""
    missing = missing_binaries()
    problem = f"missing {missing} (apt-get install openssh-server pdsh iproute2)" if missing else None
    if problem is None and os.geteuid() != 0:
        problem = "network namespaces need root"
    if problem is None:
        return
    # .ci/run sets the reason only when apt itself failed; an apt that worked must have
    # installed the tools, so under CI anything missing is an error, not a skip
    reason = os.environ.get("IDDPM_HOSTS_UNAVAILABLE")
    if os.environ.get("CI") and not reason:
        pytest.fail(f"CI must run the multi-host tests: {problem}")
    pytest.skip(f"cannot make hosts on this machine: {problem}" + (f" ({reason})" if reason else ""))


@pytest.fixture(scope="session")
def hosts():
    """Three started hosts (the tests use 1, 2 or 3 of them)."""
    require_machine()
    made = Hosts(3)
    try:
        made.start()
        yield made
    finally:
        made.stop()


# ------------------------------------------------------- what the probe recorded
PROBE = Path(__file__).resolve().parent / "probe"
"""Put on PYTHONPATH, with IDDPM_PROBE_DIR set, to record what each rank did."""


def id_job(tmp_path: Path, shards: list[str], samples: int, **overrides) -> Path:
    """The tiny job on id shards (class i = sample i): labels are sample keys."""
    from train_utils import tiny_job

    return tiny_job(tmp_path, tmp_path, **{
        "data.shards": shards, "data.eval_shards": None, "data.num_workers": 0,
        "model.num_classes": samples, "train.log_interval": 1, **overrides})


def probe_batches(probe: Path, host: str = "*") -> dict[int, list[dict]]:
    """The probe's batch records (of ranks on `host`) by global rank, in the order each
    rank took them; a rank number that ran on several hosts (relaunches) has its records
    in host name order."""
    import json

    by_rank: dict[int, list[dict]] = {}
    for path in sorted(probe.glob(f"batches-{host}-rank*.jsonl")):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            by_rank.setdefault(record["rank"], []).append(record)
    return by_rank


def assert_each_sample_once_per_epoch(by_rank: dict[int, list[dict]], samples: int, epochs: int) -> None:
    """Within each epoch every sample is served exactly once across all ranks."""
    world = len(by_rank)
    per_batch = len(by_rank[0][0]["labels"])
    per_epoch = samples // (world * per_batch)  # batches of one rank in an epoch
    assert per_epoch * world * per_batch == samples, "choose samples divisible by the global batch"
    for epoch in range(epochs):
        served = [label for records in by_rank.values()
                  for r in records[epoch * per_epoch:(epoch + 1) * per_epoch] for label in r["labels"]]
        assert sorted(served) == list(range(samples)), f"epoch {epoch}: {sorted(served)}"
