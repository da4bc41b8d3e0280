"""A storage host for the multi-host harness: real nginx serving shards over HTTP.

One more network namespace, "storage" (SUBNET.200), hangs on the hosts' bridge
(tests/hosts_harness.py) and runs Debian's nginx on port 8080, serving one folder (shards
and index.json files) read-only. Every host resolves the name `storage`. Beside nginx the
storage host can run the small servers of tests/http_faults.py: a stalled server (accepts,
sends nothing) and a delaying TCP proxy in front of nginx (latency); `rate_limit` puts a tc
token bucket (tbf) on the storage side of the link, so every byte that leaves the storage
host for the training hosts is paced (this kernel has no netem; tbf works on a veth).
`stop_nginx` / `start_nginx` make a server restart. Everything goes when `stop()` runs (or
when the hosts harness stops: the namespace is registered with it).

Needs root, iproute2 (ip, tc) and nginx (.ci/run installs them).
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hosts_harness import IFACE, SUBNET, Hosts, _sh

NGINX = "/usr/sbin/nginx"
NAME = "storage"
"""The storage host's name, as the job files' urls spell it."""
PORT = 8080
STALL_PORT = 9000
PROXY_PORT = 8081
FAULTS = Path(__file__).resolve().parent / "http_faults.py"

NGINX_CONF = """\
daemon off;
master_process on;
worker_processes 1;
user root;
pid {state}/nginx.pid;
error_log {state}/error.log warn;
events {{ worker_connections 512; }}
http {{
    access_log {state}/access.log;
    client_body_temp_path {state}/tmp/body;
    proxy_temp_path {state}/tmp/proxy;
    fastcgi_temp_path {state}/tmp/fastcgi;
    uwsgi_temp_path {state}/tmp/uwsgi;
    scgi_temp_path {state}/tmp/scgi;
    types {{ application/json json; application/x-tar tar; }}
    default_type application/octet-stream;
    sendfile on;
    server {{
        listen {port};
        root {root};
        # a shard whose store is overloaded for good
        location ~ /busy[^/]*\\.tar$ {{ return 503; }}
    }}
}}
"""


def require_nginx() -> None:
    """Skip (or, under CI, fail) without nginx or tc, as hosts_harness does for sshd."""
    missing = [b for b in (NGINX, "tc") if shutil.which(b) is None]
    if not missing:
        return
    problem = f"missing {missing} (apt-get install nginx iproute2)"
    reason = os.environ.get("IDDPM_HOSTS_UNAVAILABLE")
    if os.environ.get("CI") and not reason:
        pytest.fail(f"CI must run the storage-host tests: {problem}")
    pytest.skip(f"cannot make a storage host: {problem}" + (f" ({reason})" if reason else ""))


class Storage:
    """nginx on the storage host, serving `root` at http://storage:8080/."""

    def __init__(self, hosts: Hosts, root: Path) -> None:
        self.hosts, self.root = hosts, root
        self.netns = f"{hosts.prefix}-st"
        self.addr = f"{SUBNET}.200"
        self.state = hosts.state / "storage"
        self.nginx: subprocess.Popen | None = None
        self.extra: list[subprocess.Popen] = []

    def url(self, path: str, port: int = PORT) -> str:
        return f"http://{NAME}:{port}/{path}"

    def start(self) -> "Storage":
        _sh("ip", "netns", "add", self.netns)
        self.hosts._made.append(self.netns)  # the hosts harness deletes it at the latest
        _sh("ip", "link", "add", "pst", "netns", self.hosts.switch, "type", "veth",
            "peer", "name", IFACE, "netns", self.netns)
        _sh("ip", "-n", self.hosts.switch, "link", "set", "pst", "master", "br0", "up")
        _sh("ip", "-n", self.netns, "addr", "add", f"{self.addr}/24", "dev", IFACE)
        _sh("ip", "-n", self.netns, "link", "set", IFACE, "up")
        _sh("ip", "-n", self.netns, "link", "set", "lo", "up")
        for host in self.hosts.hosts:  # the same inode: bind mounts of running hosts see it
            path = self.hosts._hosts_file(host)
            path.write_text(path.read_text() + f"{self.addr} {NAME}\n")
        for sub in ("tmp/body", "tmp/proxy", "tmp/fastcgi", "tmp/uwsgi", "tmp/scgi"):
            (self.state / sub).mkdir(parents=True, exist_ok=True)
        (self.state / "nginx.conf").write_text(
            NGINX_CONF.format(state=self.state, root=self.root, port=PORT))
        self.start_nginx()
        return self

    def _in_ns(self, cmd: list[str]) -> list[str]:
        return ["nsenter", f"--net=/run/netns/{self.netns}", *cmd]

    def start_nginx(self) -> None:
        log = open(self.state / "nginx.out", "a")
        self.nginx = subprocess.Popen(
            self._in_ns([NGINX, "-p", f"{self.state}/", "-c", str(self.state / "nginx.conf")]),
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        self._wait_port(PORT, self.nginx)

    def stop_nginx(self) -> None:
        """Fast shutdown (SIGTERM): open connections close, new ones are refused."""
        if self.nginx is not None:
            self.nginx.send_signal(signal.SIGTERM)
            self.nginx.wait(timeout=10)
            self.nginx = None

    def start_stall(self) -> None:
        self._start_server("stall", str(STALL_PORT), port=STALL_PORT)

    def start_proxy(self, delay_s: float) -> None:
        """A TCP proxy on PROXY_PORT in front of nginx, delay_s per connection and request."""
        self._start_server("proxy", str(PROXY_PORT), f"127.0.0.1:{PORT}", str(delay_s),
                           port=PROXY_PORT)

    def _start_server(self, *args: str, port: int) -> None:
        log = open(self.state / f"{args[0]}.out", "a")
        proc = subprocess.Popen(self._in_ns([sys.executable, str(FAULTS), *args]),
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        self.extra.append(proc)
        self._wait_port(port, proc)

    def _wait_port(self, port: int, proc: subprocess.Popen, timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        while _sh(*self._in_ns(["bash", "-c", f"exec 3<>/dev/tcp/127.0.0.1/{port}"]),
                  check=False).returncode != 0:
            if proc.poll() is not None or time.monotonic() > deadline:
                logs = "\n".join(p.read_text(errors="replace")[-2000:]
                                 for p in self.state.glob("*.out"))
                raise RuntimeError(f"nothing listens on storage port {port}:\n{logs}")
            time.sleep(0.1)

    def rate_limit(self, bytes_per_s: float | None) -> None:
        """Pace what the storage host sends to bytes_per_s (tc tbf); None: no limit."""
        _sh("tc", "-n", self.netns, "qdisc", "del", "dev", IFACE, "root", check=False)
        if bytes_per_s is not None:
            bits = max(8000, int(bytes_per_s * 8))
            _sh("tc", "-n", self.netns, "qdisc", "add", "dev", IFACE, "root", "tbf",
                "rate", f"{bits}bit", "burst", "16kb", "latency", "500ms")

    def paced_bytes(self) -> int | None:
        """Bytes the storage host has sent through rate_limit's pacer since it was set (tc -s);
        None when no pacer is in place."""
        shown = _sh("tc", "-s", "-n", self.netns, "qdisc", "show", "dev", IFACE).stdout
        paced = re.search(r"qdisc tbf .*?Sent (\d+) bytes", shown, re.S)
        return int(paced[1]) if paced else None

    def stop(self) -> None:
        for proc in [*self.extra, self.nginx]:
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self.extra, self.nginx = [], None
        self.hosts.kill_all(self.netns)
        _sh("ip", "netns", "del", self.netns, check=False)
        if self.netns in self.hosts._made:
            self.hosts._made.remove(self.netns)
        for host in self.hosts.hosts:
            path = self.hosts._hosts_file(host)
            if path.exists():
                path.write_text(path.read_text().replace(f"{self.addr} {NAME}\n", ""))

