"""Slow HTTP clients ("slow loris") on a real server: a request sent a byte at a time is cut
after the request head deadline, counted and logged, and cannot crowd out anyone else."""

from __future__ import annotations

import asyncio
import contextlib
import re
import tempfile
import time

from medverse.client_sdk import connect

from .conftest import run_server

REQUEST = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: slow\r\n\r\n"


async def drip(port: int, every: float, limit: float) -> tuple[float, int, bytes]:
    """Send ``REQUEST`` one byte every ``every`` seconds until the server closes the
    connection or answers, or ``limit`` seconds pass. Returns (seconds until then, bytes sent,
    what the server sent)."""
    r, w = await asyncio.open_connection("127.0.0.1", port)
    t0 = time.monotonic()
    sent = 0
    got = b""
    try:
        for byte in REQUEST:
            if time.monotonic() - t0 > limit:
                break
            w.write(bytes([byte]))
            await w.drain()
            sent += 1
            try:
                chunk = await asyncio.wait_for(r.read(4096), every)
            except TimeoutError:
                continue
            got += chunk
            if not chunk:  # closed by the server
                break
            if b"\r\n\r\n" in got:
                break
        else:
            # The whole request went out: its answer may take a moment on a busy machine.
            while b"\r\n\r\n" not in got:
                chunk = await asyncio.wait_for(r.read(4096), 10)
                got += chunk
                if not chunk:
                    break
    except (OSError, TimeoutError):
        pass  # reset by the server: that is its answer
    finally:
        w.close()
    return time.monotonic() - t0, sent, got


def refused_count(metrics: str, reason: str) -> float:
    m = re.search(
        r'medverse_connections_refused_total\{reason="' + re.escape(reason) + r'"\} (\S+)', metrics
    )
    return float(m.group(1)) if m else 0.0


async def test_a_request_sent_a_byte_a_second_is_cut_after_the_deadline() -> None:
    with (
        tempfile.TemporaryFile("w+") as log,
        run_server(header_timeout=3, log=log, log_level="info") as s,
    ):
        async with connect(s.url, room="calm", name="member", ping_interval=0) as member:
            slow = [asyncio.ensure_future(drip(s.port, 1.0, 30.0)) for _ in range(5)]
            # Meanwhile everyone else is served as usual.
            await asyncio.sleep(1.0)
            health = await asyncio.to_thread(s.get_json, "/health")
            assert health["status"] == "ok"
            frames = member.frames_received
            results = await asyncio.gather(*slow)
            assert member.frames_received > frames  # the member kept receiving the room
        for took, sent, got in results:
            # Cut at the deadline (3 s; generous headroom for a busy machine), long before the
            # 60-odd seconds the request would take, with no answer: there is no request.
            assert 2.5 <= took <= 10.0, took
            assert sent < len(REQUEST) and got == b""
        metrics = await asyncio.to_thread(s.get, "/metrics")
        assert refused_count(metrics, "no complete request in time") == 5
        log.seek(0)
        lines = [ln for ln in log if "cut an HTTP connection from 127.0.0.1" in ln]
        assert len(lines) == 5 and "no complete request in time" in lines[0]


async def test_a_slow_but_complete_request_is_answered() -> None:
    with run_server(header_timeout=5) as s:
        _, sent, got = await drip(s.port, 0.02, 20.0)  # about 1.5 s for the whole head
        assert sent == len(REQUEST)
        assert got.startswith(b"HTTP/1.1 200"), got[:80]
        metrics = await asyncio.to_thread(s.get, "/metrics")
        assert refused_count(metrics, "no complete request in time") == 0


async def test_slow_connections_from_one_address_are_bounded() -> None:
    """At most ``max_unidentified_per_address`` connections of one address may wait for their
    first request head: the next is answered 503 at once; a WebSocket member that has sent its
    head is not counted, and after the slow ones are cut, new connections are served."""
    with run_server(header_timeout=4, max_unidentified_per_address=4) as s:
        async with connect(s.url, room="calm", name="member", ping_interval=0):
            held = [await asyncio.open_connection("127.0.0.1", s.port) for _ in range(4)]
            for _, w in held:
                w.write(b"GET /hea")  # a request begun and never finished
                await w.drain()
            await asyncio.sleep(0.3)
            r, w = await asyncio.open_connection("127.0.0.1", s.port)
            answer = await asyncio.wait_for(r.read(), 5)
            w.close()
            assert answer.startswith(b"HTTP/1.1 503"), answer
            # The held connections are cut at their deadline, and then new ones are served.
            for r, _ in held:
                assert await asyncio.wait_for(r.read(), 15) == b""
            for _, w in held:
                w.close()
            health = await asyncio.to_thread(s.get_json, "/health")
            assert health["status"] == "ok"
        metrics = await asyncio.to_thread(s.get, "/metrics")
        reason = "too many connections from this address that have not sent a request"
        assert refused_count(metrics, reason) == 1
        assert refused_count(metrics, "no complete request in time") == 4


async def test_a_connection_that_sends_nothing_is_cut_too() -> None:
    with run_server(header_timeout=2) as s:
        r, w = await asyncio.open_connection("127.0.0.1", s.port)
        t0 = time.monotonic()
        assert await asyncio.wait_for(r.read(), 15) == b""
        assert 1.5 <= time.monotonic() - t0 <= 12.0
        w.close()


async def test_over_tls_a_stalled_handshake_or_request_is_cut_and_wss_still_works() -> None:
    import ssl
    from pathlib import Path

    from .test_auth import _self_signed

    cert, key = _self_signed(Path(tempfile.mkdtemp()))
    with run_server(tls_cert=cert, tls_key=key, header_timeout=2) as s:
        # A client that opens TCP and never starts TLS (the event loop's handshake timeout,
        # set to the same deadline, cuts it), and one that completes the TLS handshake and
        # then sends half a request (the guard cuts it, counted): both go at the deadline.
        r1, w1 = await asyncio.open_connection("127.0.0.1", s.port)
        ctx = ssl.create_default_context(cafile=str(cert))
        r2, w2 = await asyncio.open_connection("127.0.0.1", s.port, ssl=ctx)
        w2.write(b"GET /health HTTP/1.1\r\nHost: 12")
        await w2.drain()
        t0 = time.monotonic()
        assert await asyncio.wait_for(r1.read(), 15) == b""
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            assert await asyncio.wait_for(r2.read(), 15) == b""
        assert 1.5 <= time.monotonic() - t0 <= 12.0
        for w in (w1, w2):
            w.close()
        async with connect(
            s.url.replace("ws://", "wss://"), room="tls", name="t", ssl=ctx, ping_interval=0
        ) as member:
            assert member.member_id
        metrics = await asyncio.to_thread(s.get, "/metrics")
        assert refused_count(metrics, "no complete request in time") == 1
