"""Shards and index files read over http(s), through the faults a network has.

Why not `curl` in a pipe: a pipe can only fail, so one server restart would lose the rest
of a shard. This reader keeps the byte offset it has handed out; after a refused or
dropped connection, a read timeout (a stalled server) or a transient answer (5xx, 429)
it waits (backoff doubling from `backoff_s`, at most MAX_BACKOFF_S), reconnects and asks
for the rest with a Range request, so the tar stream continues at the same byte and no
sample is lost or read twice. Each retry is an event naming the url and the retry count.
A permanent answer (404, 403, 410, ...) or `retries` failures in a row end the read with
an error; the caller counts the shard's remaining samples as missing data
(data.max_corrupt_fraction).
"""
from __future__ import annotations

import http.client
import io
import ssl
import time
from dataclasses import dataclass
from typing import Callable, TypeVar
from urllib.parse import urlsplit

from ..dist import output

MAX_BACKOFF_S = 30.0
"""Cap on the wait between two retries."""
TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
"""Answers that a restart or an overload gives: retried. Others (404, 403, ...) are not."""
_CHUNK = 1 << 20
T = TypeVar("T")


@dataclass(frozen=True)
class HttpOptions:
    """How http(s) reads retry and time out (from DataSpec's http_* fields)."""

    retries: int = 5
    backoff_s: float = 1.0
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 30.0


class HttpError(OSError):
    """An http(s) read that cannot go on; `permanent` when retrying could not help."""

    def __init__(self, message: str, permanent: bool = False):
        super().__init__(message)
        self.permanent = permanent


def is_http(url: str) -> bool:
    return url.startswith(("http://", "https://"))


class HttpReader(io.RawIOBase):
    """A forward-only binary file over one http(s) url; read(n) returns n bytes unless the
    body ends. Connects on construction (so a missing shard fails at open)."""

    def __init__(self, url: str, options: HttpOptions):
        super().__init__()
        self.url, self.options = url, options
        self.pos = 0
        """Bytes handed out so far: where a reconnect resumes."""
        self.peer: tuple | None = None
        """Address of the server last reached (host, port, ...)."""
        self._conn: http.client.HTTPConnection | None = None
        self._resp: http.client.HTTPResponse | None = None
        self._retrying(self._connect)

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        """n bytes (all the rest for n < 0); fewer only at the end of the body."""
        parts, want = [], n
        while want != 0:
            data = self._retrying(lambda: self._read_some(want))
            if not data:
                break  # the body ended
            parts.append(data)
            self.pos += len(data)
            want = want - len(data) if want > 0 else want
        return b"".join(parts)

    def readinto(self, buffer) -> int:  # io.RawIOBase's contract, for wrappers
        data = self.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)

    def close(self) -> None:
        self._drop()
        super().close()

    def _read_some(self, n: int) -> bytes:
        if self._resp is None:
            self._connect()
        data = self._resp.read(_CHUNK if n < 0 else min(n, _CHUNK))
        if not data and self._resp.length:  # closed before Content-Length was reached
            raise HttpError(f"connection closed with {self._resp.length} bytes of the body unread")
        return data

    def _connect(self) -> None:
        """GET the url from byte `pos` on; raises HttpError for unusable answers."""
        self._drop()
        parts = urlsplit(self.url)
        kind = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        kwargs = {"context": ssl.create_default_context()} if parts.scheme == "https" else {}
        conn = kind(parts.hostname, parts.port, timeout=self.options.connect_timeout_s, **kwargs)
        self._conn = conn
        conn.connect()
        conn.sock.settimeout(self.options.read_timeout_s)  # a stalled server ends here
        self.peer = conn.sock.getpeername()
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        headers = {"Range": f"bytes={self.pos}-"} if self.pos else {}
        conn.request("GET", path or "/", headers=headers)
        resp = conn.getresponse()
        if resp.status in (200, 206):
            self._resp = resp
            if self.pos and resp.status == 200:  # no Range support: skip what was handed out
                self._skip_resent(self.pos)
            return
        resp.close()
        raise HttpError(f"HTTP {resp.status} {resp.reason} from {self.url}",
                        permanent=resp.status not in TRANSIENT_STATUS)

    def _skip_resent(self, count: int) -> None:
        while count:
            data = self._resp.read(min(count, _CHUNK))
            if not data:
                raise HttpError("the server resent a shorter body than before")
            count -= len(data)

    def _retrying(self, attempt: Callable[[], T]) -> T:
        """attempt() until it works; after a failure wait and retry (attempt reconnects at
        `pos`: _drop() cleared the response)."""
        failures = 0
        while True:
            try:
                return attempt()
            except (OSError, http.client.HTTPException) as err:
                self._drop()
                if getattr(err, "permanent", False) or failures >= self.options.retries:
                    raise _final(err, self.url, failures) from None
                failures += 1
                wait = min(self.options.backoff_s * 2 ** (failures - 1), MAX_BACKOFF_S)
                output.log("data_http_retry", url=self.url, retry=failures,
                         retries=self.options.retries, wait_s=round(wait, 3), at_byte=self.pos,
                         error=f"{type(err).__name__}: {err}")
                time.sleep(wait)

    def _drop(self) -> None:
        if self._conn is not None:
            self._conn.close()
        self._conn, self._resp = None, None


def _final(err: BaseException, url: str, failures: int) -> HttpError:
    if isinstance(err, HttpError) and err.permanent:
        return err
    text = str(err) or type(err).__name__
    return HttpError(f"{url}: gave up after {failures} retries ({type(err).__name__}: {text})")


def fetch(url: str, options: HttpOptions) -> bytes:
    """The whole body of url (an index file), with the same retries as a shard."""
    reader = HttpReader(url, options)
    try:
        return reader.read()
    finally:
        reader.close()
