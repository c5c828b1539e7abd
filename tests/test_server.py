"""A real server on 127.0.0.1 and real SDK clients: sync, membership, resume, bad input."""

from __future__ import annotations

import asyncio
import contextlib
import math
import socket
import struct
import tempfile
import time

import aiohttp
import numpy as np
import psutil
import pytest

from medverse.client_sdk import Joined, Left, Pose, Reconnecting, Resumed, connect
from medverse.protocol.messages import (
    FRAME_POSE,
    PROTOCOL_VERSION,
    Error,
    Hello,
    Ping,
    Pong,
    Welcome,
    encode_message,
    encode_pose,
)
from medverse.protocol.quant import rotation_error_deg

from .conftest import ServerProcess, run_server
from .helpers import RawClient, quat_about_y, wait_for

pytestmark = pytest.mark.asyncio


def client_pose(i: int, t: float) -> tuple[Pose, Pose, Pose]:
    """Distinct, moving head and hands for client i at time t."""
    a = 0.7 * t + i
    head = Pose((i * 0.5, 1.6 + 0.05 * math.sin(a), -1.0), quat_about_y(0.3 * math.sin(a)))
    left = Pose((i * 0.5 - 0.2, 1.2 + 0.1 * math.sin(2 * a), -1.3), quat_about_y(a))
    right = Pose((i * 0.5 + 0.2, 1.2, -1.3 + 0.1 * math.cos(3 * a)), quat_about_y(-a))
    return head, left, right


def assert_pose_close(got: Pose | None, want: Pose) -> None:
    assert got is not None
    assert np.max(np.abs(np.subtract(got.position, want.position))) <= 0.0005 + 1e-9
    assert rotation_error_deg(np.array(got.rotation), np.array(want.rotation)) <= 0.2


async def test_health_and_metrics(server: ServerProcess) -> None:
    assert '"status": "ok"' in server.get("/health")
    text = server.get("/metrics")
    for name in (
        "medverse_rooms",
        "medverse_members",
        "medverse_tick_seconds_bucket",
        "medverse_sent_bytes_total",
        "medverse_received_bytes_total",
    ):
        assert name in text


async def test_twenty_clients_see_every_other_pose(server: ServerProcess) -> None:
    n = 20
    sessions = [connect(server.url, room="sync20", name=f"c{i}") for i in range(n)]
    await asyncio.gather(*(s.start() for s in sessions))
    try:
        ids = [s.member_id for s in sessions]
        assert len(set(ids)) == n
        start = time.monotonic()
        last: list[tuple[Pose, Pose, Pose]] = []
        frames0 = [s.frames_received for s in sessions]
        while (t := time.monotonic() - start) < 3.0:
            last = [client_pose(i, t) for i in range(n)]
            for s, (h, left, r) in zip(sessions, last, strict=True):
                s.send_pose(head=h, left=left, right=r)
            await asyncio.sleep(1 / 30)
        elapsed = time.monotonic() - start
        await asyncio.sleep(0.3)  # let the last poses travel
        for s in sessions:
            avatars = s.avatars
            for j, mid in enumerate(ids):
                av = avatars[mid]
                assert av.name == f"c{j}"
                for got, want in zip((av.head, av.left, av.right), last[j], strict=True):
                    assert_pose_close(got, want)
        rates = [
            (s.frames_received - f0) / elapsed for s, f0 in zip(sessions, frames0, strict=True)
        ]
        assert min(rates) > 25, rates
        # Interpolated sampling returns a pose between the buffered states.
        av = sessions[0].avatars[ids[1]].sample(sessions[0].render_time())
        assert av.head is not None and av.name == "c1"
    finally:
        await asyncio.gather(*(s.close() for s in sessions))


async def test_join_and_leave_events_carry_names(server: ServerProcess) -> None:
    async with connect(server.url, room="joinleave", name="Dr A") as a:
        events = a.events()
        async with connect(server.url, room="joinleave", name="Patient B") as b:
            assert b.members == {a.member_id: "Dr A"}
            ev = await asyncio.wait_for(anext(events), 5)
            assert isinstance(ev, Joined) and ev == Joined(b.member_id, "Patient B")
            b.send_pose(head=Pose((1.0, 1.5, 0.0)))
            await wait_for(lambda: b.member_id in a.avatars and a.avatars[b.member_id].head)
            bid = b.member_id
        ev = await asyncio.wait_for(anext(events), 5)
        assert isinstance(ev, Left) and (ev.member_id, ev.name, ev.reason) == (
            bid,
            "Patient B",
            "left",
        )
        await wait_for(lambda: bid not in a.avatars)
        assert bid not in a.members


async def test_room_closes_after_linger(server: ServerProcess) -> None:
    async with connect(server.url, room="linger-room", name="x"):
        await wait_for(lambda: server.get("/health").count('"rooms": 0') == 0)
    # linger is 0.5 s in the test server
    await wait_for(lambda: '"rooms": 0' in server.get("/health"), timeout=5)


async def test_reconnect_resumes_same_member(server: ServerProcess) -> None:
    async with (
        connect(server.url, room="resume", name="Dr A") as a,
        connect(server.url, room="resume", name="Observer") as b,
    ):
        b_events = b.events()
        mid = a.member_id
        a.send_pose(head=Pose((0.0, 1.7, 0.0)))
        await wait_for(lambda: mid in b.avatars and b.avatars[mid].head is not None)
        events = a.events()
        # Drop the TCP connection under the client, as a network failure would.
        a._ws._response.connection.transport.abort()  # type: ignore[union-attr]
        seen = []
        async with asyncio.timeout(10):
            async for ev in events:
                if not isinstance(ev, Joined):  # b's arrival may still be queued
                    seen.append(ev)
                if isinstance(ev, Resumed):
                    break
        assert isinstance(seen[0], Reconnecting)
        assert seen[-1] == Resumed(mid, True)
        assert a.member_id == mid
        # The resumed member keeps sending and is seen; nobody saw it leave.
        a.send_pose(head=Pose((0.5, 1.7, 0.0)))
        await wait_for(lambda: b.avatars[mid].head.position[0] == pytest.approx(0.5, abs=1e-3))
        await wait_for(lambda: a.tick is not None)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(anext(b_events), 0.3)


async def test_resume_token_works_inside_grace_only() -> None:
    with run_server(resume_grace=0.5) as srv:
        async with connect(srv.url, room="grace", name="watcher") as w:
            events = w.events()
            raw = await RawClient.open(srv.url)
            first = await raw.join("grace", "patient")
            assert isinstance(first, Welcome)
            assert isinstance(await anext(events), Joined)
            await raw.close()
            # Inside the window the token brings back the same member.
            raw = await RawClient.open(srv.url)
            await raw.ws.send_bytes(
                encode_message(Hello(PROTOCOL_VERSION, "grace", "patient", 3, first.resume))
            )
            again = await raw.next_control()
            assert isinstance(again, Welcome) and again.resumed
            assert again.member_id == first.member_id
            await raw.close()
            # After the window the member is gone for everyone and the token is refused.
            ev = await asyncio.wait_for(anext(events), 5)
            assert isinstance(ev, Left) and ev.reason == "disconnected"
            assert ev.member_id == first.member_id
            raw = await RawClient.open(srv.url)
            await raw.ws.send_bytes(
                encode_message(Hello(PROTOCOL_VERSION, "grace", "patient", 3, again.resume))
            )
            err = await raw.next_control()
            assert isinstance(err, Error) and err.code == "bad_resume" and not err.fatal
            late = await raw.next_control()
            assert isinstance(late, Welcome) and not late.resumed
            assert late.member_id != first.member_id
            await raw.close()


async def test_slow_reader_is_skipped_and_memory_stays_bounded() -> None:
    with run_server(send_soft_limit=16384, send_hard_limit=262144, socket_send_buffer=32768) as srv:
        good = [connect(srv.url, room="slow", name=f"g{i}") for i in range(3)]
        await asyncio.gather(*(g.start() for g in good))
        proc = psutil.Process(srv.pid)
        # A client that floods pings and never reads: replies pile up on the server side.
        sock = socket.create_connection(("127.0.0.1", srv.port))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        key = "dGhlIHNhbXBsZSBub25jZQ=="
        sock.sendall(
            (
                f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{srv.port}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        time.sleep(0.2)

        def ws_frame(payload: bytes) -> bytes:
            assert len(payload) < 126
            return bytes((0x82, 0x80 | len(payload))) + b"\0\0\0\0" + payload

        sock.sendall(ws_frame(encode_message(Hello(PROTOCOL_VERSION, "slow", "sloth", 3))))
        ping = ws_frame(encode_message(Ping(1, 1.0)))
        rss0 = proc.memory_info().rss
        try:
            f0 = [g.frames_received for g in good]
            t0 = time.monotonic()
            closed = False
            sock.setblocking(False)
            while time.monotonic() - t0 < 4.0:
                for i, g in enumerate(good):
                    g.send_pose(head=Pose((i, 1.6, math.sin(time.monotonic()))))
                if not closed:
                    try:
                        sock.send(ping * 200)
                    except BlockingIOError:
                        pass
                    except OSError:
                        closed = True  # the server gave up on us, as it should
                await asyncio.sleep(1 / 60)
            elapsed = time.monotonic() - t0
            rates = [(g.frames_received - a) / elapsed for g, a in zip(good, f0, strict=True)]
            assert min(rates) > 27, rates
            grown = proc.memory_info().rss - rss0
            assert grown < 40 * 1024 * 1024, grown
            # Either the server closed the flooding reader at its hard limit, or TCP flow
            # control throttled it; in both cases what the server holds for it is bounded.
            metrics = srv.get("/metrics")
            slow = [
                ln
                for ln in metrics.splitlines()
                if ln.startswith("medverse_slow_disconnects_total")
            ]
            assert slow, metrics
        finally:
            sock.close()
            await asyncio.gather(*(g.close() for g in good))


async def test_stale_pose_sequence_is_dropped(server: ServerProcess) -> None:
    async with connect(server.url, room="stale", name="watcher") as w:
        raw = await RawClient.open(server.url)
        try:
            welcome = await raw.join("stale", "sender")
            assert isinstance(welcome, Welcome)
            await raw.ws.send_bytes(encode_pose(10, [((1.0, 1.0, 1.0), (0, 0, 0, 1)), None, None]))
            await raw.ws.send_bytes(encode_pose(5, [((2.0, 2.0, 2.0), (0, 0, 0, 1)), None, None]))
            mid = welcome.member_id
            await wait_for(lambda: mid in w.avatars and w.avatars[mid].head is not None)
            await asyncio.sleep(0.2)
            assert w.avatars[mid].head.position == pytest.approx((1.0, 1.0, 1.0))
        finally:
            await raw.close()


BAD_FRAMES = {
    "unknown frame kind": (b"\x7fhello", "malformed"),
    "empty control": (b"\x01", "malformed"),
    "bad msgpack": (b"\x01\xc1\xc1", "malformed"),
    "not a map": (b"\x01\x93\x01\x02\x03", "malformed"),
    "unknown type": (b"\x01\x81\xa1t\xa4nope", "unknown_type"),
    "wrong field type": (
        encode_message(Ping(1, 1.0)).replace(b"\xa2id\x01", b"\xa2id\xa1x"),
        "bad_field",
    ),
    "server message from client": (encode_message(Pong(1, 1.0, 2.0)), "unknown_type"),
    "second hello": (encode_message(Hello(PROTOCOL_VERSION, "bad", "again", 3)), "already_joined"),
    "truncated pose": (encode_pose(1, [((0, 1, 0), (0, 0, 0, 1)), None, None])[:-3], "malformed"),
    "oversized pose": (encode_pose(1, [((0, 1, 0), (0, 0, 0, 1))] * 4), "oversized"),
    "nan pose": (encode_pose(2, [((math.nan, 1, 0), (0, 0, 0, 1)), None, None]), "out_of_range"),
    "infinite pose": (
        encode_pose(3, [((0, math.inf, 0), (0, 0, 0, 1)), None, None]),
        "out_of_range",
    ),
    "absurd position": (encode_pose(4, [((0, 1e9, 0), (0, 0, 0, 1)), None, None]), "out_of_range"),
    "zero quaternion": (encode_pose(5, [((0, 1, 0), (0, 0, 0, 0)), None, None]), "out_of_range"),
    "mask beyond slots": (
        struct.pack("<BBHI", FRAME_POSE, 0, 0x10, 6) + bytes(84),
        "out_of_range",
    ),
    "oversized control": (b"\x01" + bytes(8000), "oversized"),
}


@pytest.mark.parametrize("name", list(BAD_FRAMES))
async def test_malformed_frames_get_typed_errors(server: ServerProcess, name: str) -> None:
    frame, code = BAD_FRAMES[name]
    async with connect(server.url, room=f"bad-{len(name)}", name="good") as good:
        raw = await RawClient.open(server.url)
        try:
            assert isinstance(await raw.join(f"bad-{len(name)}", "hostile"), Welcome)
            f0 = good.frames_received
            await raw.ws.send_bytes(frame)
            err = await raw.next_error()
            assert err.code == code and not err.fatal, err
            # The connection survives a bad frame and the good member keeps its updates.
            await raw.ws.send_bytes(encode_message(Ping(7, 1.0)))
            # Plugins greet a new member (audio rules, synced objects and images) in between.
            while not isinstance(m := await raw.next_control(), Pong):
                assert not isinstance(m, Error), m
            await asyncio.sleep(0.3)
            assert good.frames_received - f0 >= 6
        finally:
            await raw.close()


async def test_frame_over_limit_closes_only_that_connection(server: ServerProcess) -> None:
    async with connect(server.url, room="huge", name="good") as good:
        raw = await RawClient.open(server.url)
        try:
            await raw.join("huge", "hostile")
            await raw.ws.send_bytes(b"\x01" + bytes(100_000))
            with pytest.raises(ConnectionError):
                for _ in range(10):
                    await raw.next_control()
            assert raw.ws.close_code == aiohttp.WSCloseCode.MESSAGE_TOO_BIG
            f0 = good.frames_received
            await asyncio.sleep(0.3)
            assert good.frames_received - f0 >= 6
        finally:
            await raw.close()


async def test_flood_of_bad_frames_is_answered_sparingly(server: ServerProcess) -> None:
    async with connect(server.url, room="flood", name="good") as good:
        raw = await RawClient.open(server.url)
        try:
            await raw.join("flood", "hostile")
            f0 = good.frames_received
            t0 = time.monotonic()
            for _ in range(200):  # within the message burst: each one is judged, not throttled
                await raw.ws.send_bytes(b"\x7f")
            await raw.ws.send_bytes(encode_message(Ping(9, 1.0)))
            errors = 0
            while True:
                m = await raw.next_control()
                if isinstance(m, Pong):
                    break
                errors += 1
            assert 1 <= errors <= 100  # rate-limited replies, not one per bad frame
            await asyncio.sleep(0.3)
            elapsed = time.monotonic() - t0
            assert (good.frames_received - f0) / elapsed > 20
        finally:
            await raw.close()


async def test_sustained_flood_is_closed_with_a_clear_code(server: ServerProcess) -> None:
    async with connect(server.url, room="flood2", name="good") as good:
        raw = await RawClient.open(server.url)
        try:
            await raw.join("flood2", "hostile")
            f0 = good.frames_received
            t0 = time.monotonic()
            codes = set()
            with contextlib.suppress(ConnectionError, aiohttp.ClientError):
                for _ in range(5000):
                    await raw.ws.send_bytes(encode_message(Ping(1, 1.0)))
            with contextlib.suppress(ConnectionError):
                while True:
                    m = await raw.next_control()
                    if isinstance(m, Error):
                        codes.add(m.code)
            assert raw.ws.close_code == 4008
            assert "rate_limited" in codes
            await asyncio.sleep(0.3)
            assert (good.frames_received - f0) / (time.monotonic() - t0) > 20
        finally:
            await raw.close()


@pytest.mark.parametrize(
    ("first", "code"),
    [
        (encode_message(Ping(1, 1.0)), "handshake_required"),
        (encode_message(Hello(PROTOCOL_VERSION + 1, "room", "x", 3)), "unsupported_version"),
        (b"\x01\x81\xa1t\xa5hello", "bad_field"),
        (encode_pose(1, [None, None, None]), "malformed"),
    ],
)
async def test_bad_handshake_is_refused(server: ServerProcess, first: bytes, code: str) -> None:
    raw = await RawClient.open(server.url)
    try:
        await raw.ws.send_bytes(first)
        err = await raw.next_error()
        assert err.code == code and err.fatal
        msg = await raw.ws.receive(timeout=5)
        assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
    finally:
        await raw.close()


async def test_silent_connection_times_out(server: ServerProcess) -> None:
    raw = await RawClient.open(server.url)
    try:
        t0 = time.monotonic()
        err = await raw.next_error(timeout=5)
        assert err.code == "handshake_timeout"
        assert time.monotonic() - t0 < 3
    finally:
        await raw.close()


async def test_ping_measures_round_trip(server: ServerProcess) -> None:
    async with connect(server.url, room="ping", name="p") as s:
        rtt = await s.ping()
        assert 0 < rtt < 3.0  # loopback: milliseconds, but a busy machine may stall either end
        assert s.rtt == rtt


async def test_tick_rate_is_configurable() -> None:
    with run_server(tick_rate=60) as srv:
        async with connect(srv.url, room="fast", name="f") as s:
            assert s.rate == 60
            await wait_for(lambda: s.tick is not None)
            f0, k0, t0 = s.frames_received, s.tick, time.monotonic()
            await asyncio.sleep(3.0)
            elapsed = time.monotonic() - t0
            # The server's tick numbers follow its fixed-rate clock even when a busy machine
            # delays a tick; the frames received show it runs well past the default 30 Hz.
            assert s.tick is not None and k0 is not None
            assert 55 < (s.tick - k0) / elapsed < 65
            assert (s.frames_received - f0) / elapsed > 40


async def test_app_is_embeddable_in_another_aiohttp_app() -> None:
    from aiohttp import web

    from medverse.server.app import create_app
    from medverse.server.config import ServerConfig

    from .conftest import free_port

    outer = web.Application()
    cfg = ServerConfig(no_auth=True, data_dir=tempfile.mkdtemp(prefix="medverse-embed-"))
    outer.add_subapp("/medverse", create_app(cfg))
    runner = web.AppRunner(outer)
    await runner.setup()
    port = free_port()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    try:
        async with connect(f"ws://127.0.0.1:{port}/medverse/ws", room="embedded", name="e") as s:
            s.send_pose(head=Pose((0.0, 1.6, 0.0)))
            await wait_for(lambda: s.avatars.get(s.member_id) and s.avatars[s.member_id].head)
    finally:
        await runner.cleanup()


async def test_welcome_lists_members_with_names(server: ServerProcess) -> None:
    async with connect(server.url, room="welcome", name="Dr A") as a:
        raw = await RawClient.open(server.url)
        try:
            w = await raw.join("welcome", "Dr B")
            assert isinstance(w, Welcome)
            assert [(m.id, m.name) for m in w.members] == [(a.member_id, "Dr A")]
            assert w.rate == 30 and w.resume and not w.resumed
        finally:
            await raw.close()


async def test_error_message_is_typed(server: ServerProcess) -> None:
    raw = await RawClient.open(server.url)
    try:
        await raw.join("typed")
        await raw.ws.send_bytes(b"\x7f")
        err = await raw.next_error()
        assert isinstance(err, Error) and err.code == "malformed" and err.message
    finally:
        await raw.close()


async def test_resuming_with_other_slots_joins_anew_and_the_tick_goes_on(
    server: ServerProcess,
) -> None:
    """A resume token names an avatar of so many pose slots: a connection with another number
    joins as a new member (``bad_resume``), and nobody's state stops."""
    room = "slots-resume"
    async with connect(server.url, room=room, name="watcher", ping_interval=0) as watcher:
        raw = await RawClient.open(server.url)
        w = await raw.join(room, "three", slots=3)
        assert isinstance(w, Welcome)
        await raw.close()
        raw = await RawClient.open(server.url)
        await raw.ws.send_bytes(
            encode_message(Hello(PROTOCOL_VERSION, room, "one", 1, w.resume, None))
        )
        err = await raw.next_control()
        assert isinstance(err, Error) and err.code == "bad_resume"
        w2 = await raw.next_control()
        assert isinstance(w2, Welcome) and w2.member_id != w.member_id and not w2.resumed
        await raw.ws.send_bytes(encode_pose(1, [((0.5, 1.5, 0.0), (0.0, 0.0, 0.0, 1.0))]))
        frames = watcher.frames_received
        await wait_for(lambda: watcher.frames_received > frames + 10)
        await wait_for(lambda: (av := watcher.avatars.get(w2.member_id)) is not None and av.head)
        await raw.close()
