"""A seeded, fault-injecting HTTP proxy on loopback, in front of a real server (S3 or MLflow).

Clients talk to it over a real socket; it forwards each request to the upstream on a fresh connection
unless a fault applies. Faults come from a queue (``arm``: the next N requests, optionally only those a
``match`` picks) or at random (``chaos``: a rate, a seeded RNG, a set of kinds). Kinds:

- an int: that HTTP status with an S3-style XML error body (503 SlowDown, 500, 403 AccessDenied, 404)
- ``"reset"``: the connection is reset before the request reaches the server
- ``"reset_after"``: the request reaches the server, then the connection is reset (a lost answer)
- ``"stall"``: the connection is accepted and never answered (until the proxy closes)
- ``"truncate"``: the answer's body is cut short, Content-Length still the full length
- ``"truncate_fixlen"``: the body is cut at a random point and Content-Length fixed up to match
- ``"corrupt"``: one byte of the body is flipped (the same byte every time), length kept
- ``("latency", seconds)``: the answer is delayed, then forwarded
- ``("status", code, json_body)``: a custom answer (e.g. MLflow's 400 for a unique violation)
"""

from __future__ import annotations

import collections
import http.client
import random
import socket
import struct
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlparse

_S3_ERRORS = {
    503: ("SlowDown", "Please reduce your request rate."),
    500: ("InternalError", "We encountered an internal error. Please try again."),
    403: ("AccessDenied", "Access Denied"),
    404: ("NoSuchKey", "The specified key does not exist."),
}

Match = Callable[[str, str], bool]
"""``match(method, path)``: does a fault apply to this request?"""

BODY_FAULTS = ("truncate", "truncate_fixlen", "corrupt")


def on(method: str | None = None, path_contains: str | None = None) -> Match:
    """A ``match`` for requests with this method and/or a path containing this text."""
    return lambda m, p: (method is None or m == method) and (path_contains is None or path_contains in p)


def kind_of(fault: Any) -> str:
    if isinstance(fault, tuple):
        return str(fault[0])
    return str(fault)


class FaultProxy:
    def __init__(self, upstream: str, *, seed: int = 0):
        parsed = urlparse(upstream)
        self.upstream = (parsed.hostname, parsed.port)
        self.lock = threading.Lock()
        self.faults: list[tuple[Match | None, Any]] = []
        self.rng = random.Random(seed)
        self.chaos_rate = 0.0
        self.chaos_kinds: tuple[Any, ...] = ()
        self.chaos_match: Match | None = None
        self.requests = 0
        self.faulted = 0
        self.by_kind: collections.Counter[str] = collections.Counter()
        self.log: list[tuple[str, str, str]] = []  # (method, path, fault kind) of each faulted request
        self.seen: list[tuple[str, str]] = []  # (method, path) of every request, to count what a pass costs
        self.closing = threading.Event()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _reset(self):
                # SO_LINGER 0: close() sends RST, so the client sees "connection reset by peer".
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.connection.close()
                self.close_connection = True

            def _handle(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    body = _read_chunked(self.rfile)
                fault = proxy._pick(self.command, self.path)
                kind = kind_of(fault) if fault is not None else ""
                if kind == "reset":
                    return self._reset()
                if kind == "stall":
                    proxy.closing.wait(600)
                    return self._reset()
                if isinstance(fault, int) or kind == "status":
                    return self._answer_error(fault)
                if kind == "latency":
                    time.sleep(float(fault[1]))
                try:
                    status, headers, data = proxy._forward(self.command, self.path, self.headers, body)
                except OSError:
                    return self._reset()  # upstream down: the client sees what it would see without us
                if kind == "reset_after":
                    return self._reset()
                full = len(data)
                if kind in BODY_FAULTS and self.command == "GET" and full > 1:
                    if kind == "truncate_fixlen":
                        data = data[: proxy._cut(full)]
                        full = len(data)
                    elif kind == "truncate":
                        data = data[: proxy._cut(full)]
                    else:
                        pos = full // 2
                        data = data[:pos] + bytes([data[pos] ^ 0xFF]) + data[pos + 1:]
                self.send_response(status)
                for k, v in headers:
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(full))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                if kind == "truncate":
                    self.wfile.flush()
                    self._reset()

            def _answer_error(self, fault):
                if isinstance(fault, int):
                    code, msg = _S3_ERRORS.get(fault, ("Error", "injected"))
                    payload = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
                               f"<Message>{msg}</Message></Error>").encode()
                    status, ctype = fault, "application/xml"
                else:
                    status, payload, ctype = int(fault[1]), str(fault[2]).encode(), "application/json"
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = do_PATCH = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.server.handle_error = lambda request, client_address: None  # type: ignore[method-assign]  # resets are the point
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    # -- configuring ---------------------------------------------------------------------------------
    def arm(self, *faults: Any, match: Match | None = None) -> None:
        """Replace the queue: the next requests (that ``match`` picks) get these faults, in order."""
        with self.lock:
            self.faults = [(match, f) for f in faults]

    def add(self, *faults: Any, match: Match | None = None) -> None:
        with self.lock:
            self.faults.extend((match, f) for f in faults)

    def chaos(self, rate: float, kinds: tuple[Any, ...] = ("reset",), *, match: Match | None = None) -> None:
        """Fault each request with probability ``rate`` (seeded), a kind chosen at random."""
        with self.lock:
            self.chaos_rate, self.chaos_kinds, self.chaos_match = rate, tuple(kinds), match

    def calm(self) -> None:
        with self.lock:
            self.faults, self.chaos_rate = [], 0.0

    def figures(self) -> dict[str, Any]:
        with self.lock:
            return {"requests": self.requests, "faulted": self.faulted, "by_kind": dict(self.by_kind)}

    # -- internals -----------------------------------------------------------------------------------
    def _pick(self, method: str, path: str) -> Any:
        with self.lock:
            self.requests += 1
            self.seen.append((method, path))
            fault = None
            for i, (match, f) in enumerate(self.faults):
                if match is None or match(method, path):
                    fault = f
                    del self.faults[i]
                    break
            if (fault is None and self.chaos_rate and (self.chaos_match is None or self.chaos_match(method, path))
                    and self.rng.random() < self.chaos_rate):
                fault = self.rng.choice(self.chaos_kinds)
            if fault is not None:
                self.faulted += 1
                self.by_kind[kind_of(fault)] += 1
                self.log.append((method, path, kind_of(fault)))
            return fault

    def _cut(self, n: int) -> int:
        with self.lock:
            return self.rng.randrange(1, n)

    def _forward(self, method: str, path: str, headers: Any, body: bytes) -> tuple[int, list, bytes]:
        conn = http.client.HTTPConnection(*self.upstream, timeout=120)
        try:
            fwd = {k: v for k, v in headers.items() if k.lower() != "transfer-encoding"}
            if body or method in ("POST", "PUT", "PATCH"):
                fwd["Content-Length"] = str(len(body))
            conn.request(method, path, body=body or None, headers=fwd)
            resp = conn.getresponse()
            data = resp.read()
            return resp.status, resp.getheaders(), data
        finally:
            conn.close()

    def __enter__(self) -> FaultProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.closing.set()
        self.server.shutdown()
        self.server.server_close()


def _read_chunked(rfile: Any) -> bytes:
    out = b""
    while True:
        line = rfile.readline().strip()
        size = int(line.split(b";")[0] or b"0", 16)
        if size == 0:
            rfile.readline()
            return out
        out += rfile.read(size)
        rfile.readline()
