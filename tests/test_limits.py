"""Connection budgets and memory under unauthenticated garbage, on a real server."""

from __future__ import annotations

import asyncio
import random
import struct
import time

import psutil

from medverse.client_sdk import Pose, connect
from medverse.protocol.messages import PROTOCOL_VERSION, Hello, encode_message
from medverse.protocol.rfc6455 import masked_frame

from .conftest import run_server
from .helpers import RawClient


async def upgraded(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A TCP connection that completed the WebSocket upgrade and sent nothing since."""
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(
        b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    await w.drain()
    await r.readuntil(b"\r\n\r\n")
    return r, w


# Everything an attacker without a token throws at the server, one connection each.
GARBAGE = [
    masked_frame(0x2, b"\x01\xdd\xff\xff\xff\xff"),  # msgpack array32 of 4G items
    masked_frame(0x2, b"\x01" + b"\x91" * 50000),  # 50,000 nested arrays
    masked_frame(0x2, b"\x01\xc6\x7f\xff\xff\xff"),  # bin32 claiming 2 GB
    masked_frame(0x1, b"hello"),  # a text frame
    struct.pack("!BBQ", 0x82, 0xFF, 16 * 1024 * 1024) + b"\0\0\0\0" + bytes(16 * 1024 * 1024),
    b"".join(masked_frame(0x2, b"\x01\x80") for _ in range(2000)),  # a flood of tiny frames
]


async def _throw(port: int, payload: bytes) -> None:
    try:
        _, w = await upgraded(port)
        w.write(payload)
        await asyncio.wait_for(w.drain(), 5)
        await asyncio.sleep(0.05)
        w.close()
    except (TimeoutError, OSError, asyncio.IncompleteReadError):
        pass  # the server closed on us: that is its answer


def rss_mb(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / 2**20


async def test_unidentified_connections_are_budgeted() -> None:
    with run_server(max_unidentified_per_address=4, handshake_timeout=30) as s:
        idle = [await upgraded(s.port) for _ in range(4)]
        extra = await RawClient.open(s.url)
        err = await extra.next_error()
        assert (err.code, err.fatal) == ("too_many_connections", True)
        assert "not joined" in err.message
        await extra.close()
        # One of them joins: it no longer counts, and a new connection is let in.
        _, w = idle[0]
        w.write(masked_frame(0x2, encode_message(Hello(PROTOCOL_VERSION, "budget", "a", 3))))
        await w.drain()
        await asyncio.sleep(0.3)
        ok = await RawClient.open(s.url)
        assert (await ok.join("budget", "b")).TYPE == "welcome"
        await ok.close()
        metrics = s.get("/metrics")
        assert 'medverse_connections_refused_total{reason="too many connections from this ' in (
            metrics
        )
        for _, w in idle:
            w.close()


async def test_garbage_without_a_token_costs_almost_no_memory() -> None:
    """100 idle sockets and, connection after connection, msgpack bombs, a text frame, a 16 MiB
    frame and floods of tiny frames: the server's memory stays within 100 MB of the start and
    comes back within 50 MB of it once the attack stops, and a member keeps its update rate."""
    with run_server(handshake_timeout=5) as s:
        await asyncio.sleep(1.0)
        start = rss_mb(s.pid)
        async with connect(s.url, room="calm", name="good", ping_interval=0) as good:
            good.send_pose(head=Pose((0.0, 1.6, 0.0)))
            idle = [await upgraded(s.port) for _ in range(100)]
            peak = start
            t0 = time.monotonic()
            frames0 = good.frames_received
            rounds = 0
            while time.monotonic() - t0 < 10.0 and rounds < 400:  # bounded in time and count
                await asyncio.gather(*(_throw(s.port, g) for g in random.sample(GARBAGE, 3)))
                good.send_pose(head=Pose((0.0, 1.6, 0.01 * (rounds % 50))))
                peak = max(peak, rss_mb(s.pid))
                rounds += 1
            rate = (good.frames_received - frames0) / (time.monotonic() - t0)
            for _, w in idle:
                w.close()
        await asyncio.sleep(10.0)
        after = rss_mb(s.pid)
    assert rounds > 20
    assert peak - start <= 100, (start, peak)
    assert after - start <= 50, (start, after)
    # A member keeps its rate (the attacker shares this test process's core, hence headroom).
    assert rate >= 25, rate
