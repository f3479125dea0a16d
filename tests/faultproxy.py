"""A small fault-injecting HTTP reverse proxy for tests: put it between the job and an S3 server.

    with FaultProxy("http://127.0.0.1:5000", seed=7, rate=0.2) as proxy:
        os.environ["AWS_ENDPOINT_URL"] = proxy.url
        ...
    proxy.stats  # {"requests": ..., "throttle": ..., "error": ..., "reset": ..., "reset_body": ..., "slow": ...}

For a deterministic share of requests it answers with a fault instead of (or on the way to)
the upstream answer:

``throttle``     503 SlowDown with S3's XML error body, the request never reaches the server
``error``        500 InternalError with S3's XML error body, likewise
``reset``        the TCP connection is reset (RST) before the request is forwarded
``reset_body``   (half of the resets of GETs) the headers and half of the body are sent, then RST
``slow``         the answer is held back ``slow_seconds`` (below every client's read timeout)

Which request gets which fault is a pure function of the seed, the request (method, path and
query, Range header) and how many times that same request was seen before, so the schedule does
not depend on thread timing. A request is never faulted more than ``max_consecutive`` times in
a row: the faults are transient, as S3's are, and the least patient client in the job (pyarrow,
3 attempts) always gets through.

``lose_reply`` (a function of method, path and headers) picks requests that are forwarded, applied
by the server, and whose answer is then lost: the client's connection is reset instead (a timeout or
a reset after the server acted, as S3 clients meet them). Each one picked is counted in
``stats["lost_reply"]``.

``deny_writes=True`` answers every PUT, POST and DELETE with 403 AccessDenied (a bucket whose
policy denies writes). The proxy is bounded: it stops by itself after ``lifetime`` seconds, and
idle connections time out.
"""

from __future__ import annotations

import collections
import hashlib
import http.client
import socket
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable
from urllib.parse import urlparse

FAULTS = ("throttle", "error", "reset", "slow")
KINDS = FAULTS + ("reset_body",)  # reset_body: a GET reset half way through its body
# shares of the fault rate: mostly throttling and 5xx, as seen from real S3 under load
DEFAULT_MIX = {"throttle": 0.35, "error": 0.25, "reset": 0.25, "slow": 0.15}
HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade",
              "expect", "content-length"}

_XML = ('<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
        '<RequestId>faultproxy-{n}</RequestId></Error>')


class FaultProxy:
    def __init__(self, upstream: str, seed: int = 0, rate: float = 0.2, mix: dict[str, float] | None = None,
                 slow_seconds: float = 1.0, max_consecutive: int = 2, deny_writes: bool = False,
                 lifetime: float = 600.0, lose_reply: Callable[[str, str, dict[str, str]], bool] | None = None):
        parsed = urlparse(upstream)
        self.upstream = (parsed.hostname or "127.0.0.1", parsed.port or 80)
        self.seed, self.rate, self.slow_seconds = seed, rate, slow_seconds
        self.mix = dict(mix or DEFAULT_MIX)
        self.max_consecutive, self.deny_writes, self.lifetime = max_consecutive, deny_writes, lifetime
        self.lose_reply = lose_reply
        self.stats: collections.Counter = collections.Counter()
        self.log: list[tuple[str, str, str]] = []  # (method, path, fault or "ok"), in arrival order
        self._seen: collections.Counter = collections.Counter()
        self._streak: collections.Counter = collections.Counter()
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._timer: threading.Timer | None = None

    # ---- the schedule ------------------------------------------------------------------------

    def decide(self, method: str, path: str, range_header: str | None) -> str | None:
        """The fault for this request (or None), and bookkeeping: called once per request."""
        key = f"{method} {path} {range_header or ''}"
        with self._lock:
            attempt = self._seen[key]
            self._seen[key] += 1
            self.stats["requests"] += 1
            fault = None
            if self._streak[key] < self.max_consecutive:
                digest = hashlib.sha256(f"{self.seed}|{key}|{attempt}".encode()).digest()
                u = int.from_bytes(digest[:8], "big") / 2.0 ** 64
                if u < self.rate:
                    edge = 0.0
                    for name in FAULTS:
                        edge += self.rate * self.mix.get(name, 0.0) / sum(self.mix.values())
                        if u < edge:
                            fault = name
                            break
                    if fault == "reset" and method == "GET" and digest[8] & 1:
                        fault = "reset_body"
            self._streak[key] = self._streak[key] + 1 if fault else 0
            if fault:
                self.stats[fault] += 1
            self.log.append((method, path, fault or "ok"))
            return fault

    @property
    def faulted(self) -> int:
        return sum(self.stats[f] for f in KINDS)

    # ---- running -----------------------------------------------------------------------------

    def start(self) -> "FaultProxy":
        proxy = self

        class Handler(_Handler):
            owner = proxy

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True,
                         name="faultproxy").start()
        self._timer = threading.Timer(self.lifetime, self.stop)
        self._timer.daemon = True
        self._timer.start()
        return self

    @property
    def url(self) -> str:
        assert self._server is not None, "not started"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._timer is not None and self._timer is not threading.current_thread():
            self._timer.cancel()

    def __enter__(self) -> "FaultProxy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class _Handler(BaseHTTPRequestHandler):
    owner: FaultProxy
    protocol_version = "HTTP/1.1"  # keep-alive, as S3 clients expect
    timeout = 30                   # idle connections end by themselves

    def log_message(self, format, *args) -> None:  # quiet
        pass

    def do_GET(self): self._proxy()            # noqa: E704
    def do_HEAD(self): self._proxy()           # noqa: E704
    def do_PUT(self): self._proxy()            # noqa: E704
    def do_POST(self): self._proxy()           # noqa: E704
    def do_DELETE(self): self._proxy()         # noqa: E704

    def _read_body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            parts = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _reset(self) -> None:
        """Abort the connection with a TCP RST."""
        self.close_connection = True
        try:
            self.wfile.flush()
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
        except OSError:
            pass

    def _error(self, status: int, code: str, message: str) -> None:
        body = b"" if self.command == "HEAD" else _XML.format(code=code, message=message,
                                                              n=self.owner.stats["requests"]).encode()
        self.send_response_only(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        if status == 503:
            self.send_header("Retry-After", "1")
        self.end_headers()
        self.wfile.write(body)

    def _proxy(self) -> None:
        body = self._read_body()
        owner = self.owner
        if owner.deny_writes and self.command in ("PUT", "POST", "DELETE"):
            with owner._lock:
                owner.stats["denied"] += 1
            return self._error(403, "AccessDenied", "Access Denied")
        fault = owner.decide(self.command, self.path, self.headers.get("Range"))
        mid_body = fault == "reset_body"
        if fault == "throttle":
            return self._error(503, "SlowDown", "Please reduce your request rate.")
        if fault == "error":
            return self._error(500, "InternalError", "We encountered an internal error. Please try again.")
        if fault == "reset" and not mid_body:
            return self._reset()
        if fault == "slow":
            time.sleep(owner.slow_seconds)

        conn = http.client.HTTPConnection(*owner.upstream, timeout=60)
        try:
            conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            for name, value in self.headers.items():
                if name.lower() not in HOP_BY_HOP:
                    conn.putheader(name, value)
            if self.command not in ("GET", "HEAD") or body:
                conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body or None)
            resp = conn.getresponse()
            data = resp.read()
            headers = resp.getheaders()
            status = resp.status
        except OSError:
            return self._reset()  # the upstream went away: so does the client's connection
        finally:
            conn.close()
        if owner.lose_reply is not None and owner.lose_reply(self.command, self.path, dict(self.headers.items())):
            with owner._lock:
                owner.stats["lost_reply"] += 1
            return self._reset()   # the server applied it; the client never hears so

        self.send_response_only(status)
        for name, value in headers:
            if name.lower() not in HOP_BY_HOP:
                self.send_header(name, value)
        if self.command == "HEAD":
            length = dict((k.lower(), v) for k, v in headers).get("content-length")
            if length is not None:
                self.send_header("Content-Length", length)
            self.end_headers()
            return
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if mid_body and len(data) > 1:
            self.wfile.write(data[: len(data) // 2])
            return self._reset()
        self.wfile.write(data)
