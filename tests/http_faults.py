"""Small network servers for the http data tests (no tests here).

- `FileServer`: serves a folder over HTTP/1.1 with Range requests, in a thread of the
  test process, with faults switched per path: a status answered for good (404, 503), a
  connection cut after N body bytes (once), a stall (accepts, reads the request, sends
  nothing); `stop()` / `start()` make a server that is away and comes back on the same port.
- Run as a script, the same module is a server of its own for the storage host:
    python tests/http_faults.py stall PORT
        accepts, sends nothing
    python tests/http_faults.py proxy PORT HOST:PORT DELAY_S
        a TCP proxy that waits DELAY_S per connection and per request (latency)
"""
from __future__ import annotations

import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class FileServer:
    """`root` over http://127.0.0.1:PORT/ with per-path faults (see the module doc)."""

    def __init__(self, root: Path):
        self.root = root
        self.status: dict[str, int] = {}
        """path -> status answered for good."""
        self.cut_after: dict[str, int] = {}
        """path -> body bytes sent before the connection is closed (once per path)."""
        self.stall: set[str] = set()
        self.requests: list[tuple[str, str]] = []
        """(path, Range header) of every request, in order."""
        self.release = threading.Event()
        self.port = 0
        self._server: ThreadingHTTPServer | None = None
        self.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}/{path}"

    def start(self) -> None:
        server = ThreadingHTTPServer(("127.0.0.1", self.port), self._handler())
        server.daemon_threads = True
        self.port = server.server_address[1]
        self._server = server
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()

    def stop(self) -> None:
        """Close the listening socket: connections are refused until start()."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def close(self) -> None:
        self.release.set()
        self.stop()

    def _handler(self) -> type:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                path = self.path.lstrip("/")
                outer.requests.append((path, self.headers.get("Range", "")))
                if path in outer.stall:
                    outer.release.wait(60)  # holds the connection open, sends nothing
                    return
                if path in outer.status:
                    self.send_error(outer.status[path])
                    return
                file = outer.root / path
                if not file.is_file():
                    self.send_error(404)
                    return
                body, start = file.read_bytes(), 0
                asked = self.headers.get("Range", "")
                if asked.startswith("bytes="):
                    start = int(asked[6:].split("-")[0])
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                cut = outer.cut_after.pop(path, None)
                if cut is not None:
                    self.wfile.write(body[start:start + cut])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self.wfile.write(body[start:])

        return Handler


def _stall(port: int) -> None:
    """Accept every connection, read nothing, answer nothing, keep it open."""
    server = socket.create_server(("0.0.0.0", port), backlog=64)
    held = []
    while True:
        conn, _ = server.accept()
        held.append(conn)


def _pump(src: socket.socket, dst: socket.socket, delay: float) -> None:
    try:
        while True:
            data = src.recv(1 << 16)
            if not data:
                break
            time.sleep(delay)
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def _proxy(port: int, target: str, delay: float) -> None:
    """Forward each connection to target DELAY_S late, and each request (each chunk the
    client sends) DELAY_S late: latency per connection and per read, not a rate limit."""
    host, target_port = target.rsplit(":", 1)
    server = socket.create_server(("0.0.0.0", port), backlog=64)
    while True:
        conn, _ = server.accept()

        def serve(conn: socket.socket = conn) -> None:
            time.sleep(delay)
            try:
                upstream = socket.create_connection((host, int(target_port)))
            except OSError:
                conn.close()
                return
            # requests go up DELAY_S late; bodies come back at the link's rate
            threading.Thread(target=_pump, args=(conn, upstream, delay), daemon=True).start()
            _pump(upstream, conn, 0.0)

        threading.Thread(target=serve, daemon=True).start()


if __name__ == "__main__":
    if sys.argv[1] == "stall":
        _stall(int(sys.argv[2]))
    elif sys.argv[1] == "proxy":
        _proxy(int(sys.argv[2]), sys.argv[3], float(sys.argv[4]))
    else:
        sys.exit(f"unknown server {sys.argv[1]!r}")
