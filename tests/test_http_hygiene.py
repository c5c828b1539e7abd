"""Nobody can put tracebacks in the server's log: malformed HTTP, oversized headers, TLS on the
wrong port and clients that vanish mid-request or mid-download are one line at most."""

from __future__ import annotations

import json
import socket
import ssl
import struct
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest

from benchmarks.harness import ServerProcess, start_server

from .models import triangle_glb
from .test_auth import _self_signed


@pytest.fixture
def logged() -> Iterator[tuple[list[ServerProcess], IO[str]]]:
    """Servers started by :func:`serve_logging` write their stderr to one file; stopped after."""
    servers: list[ServerProcess] = []
    with tempfile.TemporaryFile("w+") as log:
        try:
            yield servers, log
        finally:
            for s in servers:
                s.stop()


def serve_logging(log: IO[str], servers: list[ServerProcess], **settings: str) -> ServerProcess:
    """A server logging at DEBUG (whatever is logged at all shows) into ``log``."""
    srv = start_server(log=log, log_level="debug", **settings)
    servers.append(srv)
    srv.wait_ready()
    return srv


def exchange(port: int, data: bytes, read: bool = True, tls: bool = False) -> bytes:
    """Send raw bytes; the first bytes of the answer (empty if the server just closed)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        sock: socket.socket = raw
        if tls:
            ctx = ssl.create_default_context()
            ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
            sock = ctx.wrap_socket(raw)
        sock.sendall(data)
        if not read:
            return b""
        try:
            return sock.recv(64)
        except OSError:
            return b""


def vanish(sock: socket.socket) -> None:
    """Close with a reset, as a client that crashed or lost its network does."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


BAD_REQUESTS = {
    "9 KB header": b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n",
    "9 KB request line": b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    "garbage": b"\x00\x01 GARBAGE \xff\r\n\r\n",
    "bad request line": b"GET /health HTTP/9\r\n\r\n",
    "bad content length": b"POST /health HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
    "bad chunk": b"POST /rooms/a/assets HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"zz\r\nabc\r\n",
    "both lengths": b"POST /health HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n"
    b"Transfer-Encoding: chunked\r\n\r\nabc",
    "tls to plain port": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(64),
    "second bad request": b"GET /health HTTP/1.1\r\nHost: x\r\n\r\nBREW /pot HTCPCP/1.0\r\n\r\n",
}


def test_bad_http_and_vanishing_clients_leave_no_traceback(
    logged: tuple[list[ServerProcess], IO[str]],
) -> None:
    servers, log = logged
    srv = serve_logging(log, servers)
    for name, request in BAD_REQUESTS.items():
        answer = exchange(srv.port, request)
        assert answer.startswith(b"HTTP/1.") or name == "second bad request", (name, answer)
    # A client that goes away mid-upload, mid-download and mid-WebSocket handshake.
    model = triangle_glb(extra=8 << 20)
    req = urllib.request.Request(f"{srv.http}/rooms/big/assets", data=model, method="POST")
    with urllib.request.urlopen(req, timeout=30) as r:
        sha = json.load(r)["sha256"]
    with socket.create_connection(("127.0.0.1", srv.port)) as s:
        s.sendall(b"POST /rooms/big/assets HTTP/1.1\r\nHost: x\r\nContent-Length: 900000\r\n\r\n")
        s.sendall(b"glTF" + bytes(100_000))
        time.sleep(0.2)
        vanish(s)
    for _ in range(3):
        s = socket.create_connection(("127.0.0.1", srv.port))
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.sendall(f"GET /rooms/big/assets/{sha} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert s.recv(4096).startswith(b"HTTP/1.1 200")
        time.sleep(0.3)  # the server is blocked writing the rest
        vanish(s)
    for _ in range(5):
        s = socket.create_connection(("127.0.0.1", srv.port))
        s.sendall(
            b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        vanish(s)
    # TLS: plain HTTP and garbage to a wss:// server.
    cert, key = _self_signed(Path(tempfile.mkdtemp()))
    tls = serve_logging(log, servers, tls_cert=str(cert), tls_key=str(key))
    exchange(tls.port, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    exchange(tls.port, b"\x16\x03\x01\x00\x05hello")
    exchange(tls.port, BAD_REQUESTS["9 KB header"], tls=True)
    time.sleep(1.0)
    assert srv.get("/health") and tls.get("/health")  # both still serve
    for s in servers:
        s.stop()
    log.seek(0)
    text = log.read()
    assert "Traceback" not in text, text
    assert "ERROR" not in text, text
    lines = [line for line in text.splitlines() if "bad HTTP request" in line]
    assert len(lines) >= len(BAD_REQUESTS) - 2, text  # each one line, naming the peer
    assert all("127.0.0.1" in line for line in lines), lines
    assert all(" INFO " in line or " DEBUG " in line for line in lines), lines


def test_the_filter_keeps_our_own_bugs_and_bounds_a_flood() -> None:
    import logging

    from aiohttp.http_exceptions import LineTooLong

    from medverse.server.httplog import ClientErrorFilter

    logger = logging.getLogger("medverse.test.httplog")
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    seen: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = seen.append  # type: ignore[method-assign]
    logger.addHandler(handler)
    logger.addFilter(ClientErrorFilter(per_minute=3))
    for _ in range(10):
        try:
            raise LineTooLong("x" * 9000 + "\nforged line", "8190")
        except LineTooLong as exc:
            logger.exception("Error handling request from %s", "203.0.113.9", exc_info=exc)
    try:
        raise KeyError("our own bug")
    except KeyError as exc:
        logger.exception("Error handling request from %s", "203.0.113.9", exc_info=exc)
    assert len(seen) == 4
    for r in seen[:3]:
        text = r.getMessage()
        assert r.levelno == logging.INFO and r.exc_info is None and "\n" not in text
        assert len(text) < 300 and "203.0.113.9" in text
    assert seen[3].levelno == logging.ERROR and seen[3].exc_info is not None
