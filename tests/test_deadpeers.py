"""Dead peers are noticed within seconds (heartbeat, silence timeout), live idle ones never.

The plug is pulled for real in a private network namespace (tests/netns.py): the holder of an
object reaches the server through a small TCP proxy that, at once, forwards nothing more in
either direction, with no FIN and no reset, as when a headset's Wi-Fi vanishes.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

from medverse.client_sdk import LockChanged, connect
from medverse.server.auth import mint_token
from medverse.server.config import ServerConfig

from .conftest import run_server
from .models import HEART, provide, sha256_of
from .netns import run_in_netns

SECRET = "d" * 48
#: The defaults under test: a dead member is dropped after this many seconds of silence.
SILENCE = ServerConfig().silence_timeout
#: What the busy 2-core CI machine gets on top: the event loops' delays, the close, the event.
HEADROOM = 3.0


def tok(room: str, who: str) -> str:
    return mint_token(SECRET.encode(), room=room, identity=who, name=who, role="host")


class Plug:
    """A TCP proxy to ``port`` whose plug can be pulled: after :meth:`pull`, bytes either way
    are read and dropped (the connection stays open, as if the network ate them)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.pulled = False
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    def pull(self) -> None:
        self.pulled = True

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.port)
        await asyncio.gather(
            self._pipe(reader, up_writer), self._pipe(up_reader, writer), return_exceptions=True
        )

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        while data := await src.read(65536):
            if not self.pulled:
                dst.write(data)
        dst.close()

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


async def pull_the_plug() -> dict[str, Any]:
    """In the namespace: the holder's plug is pulled; when does the other member see the
    lease free? (Lease timeout and resume grace are far longer: only the heartbeat can.)"""
    room = "plug"
    with run_server(auth_secret=SECRET, object_lease_timeout=120, resume_grace=120) as srv:
        plug = Plug(srv.port)
        via = f"ws://127.0.0.1:{await plug.start()}"
        await provide(srv.url, room, tok(room, "curator"))
        watcher = connect(srv.url, room=room, name="b", token=tok(room, "b"), ping_interval=0)
        holder = connect(
            via, room=room, name="a", token=tok(room, "a"), reconnect=False, ping_interval=0
        )
        await watcher.start()
        await holder.start()
        try:
            oid = await holder.spawn(sha256_of(HEART))
            await holder.grab(oid)
            async with asyncio.timeout(10):
                events = watcher.events()
                while watcher.objects.get(oid) is None or not watcher.objects[oid].holder:
                    await asyncio.sleep(0.02)
                t0 = time.monotonic()
                plug.pull()
                while True:
                    ev = await anext(events)
                    if isinstance(ev, LockChanged) and ev.object_id == oid and ev.holder is None:
                        break
            return {"seconds": time.monotonic() - t0, "reason": ev.reason}
        finally:
            plug.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(holder.close(), 5)
            await asyncio.wait_for(watcher.close(), 5)


def test_a_vanished_holder_frees_its_lease_within_seconds() -> None:
    result = run_in_netns("tests.test_deadpeers:pull_the_plug", timeout=90)
    print(f"lease freed {result['seconds']:.2f} s after the plug was pulled")
    assert result["reason"] == "disconnected"
    # Not before the silence timeout less one heartbeat (the holder's last pong may be that
    # old), and not much after it.
    assert SILENCE - ServerConfig().heartbeat - 0.5 <= result["seconds"] <= SILENCE + HEADROOM


async def test_an_idle_member_answering_pings_is_never_dropped() -> None:
    """An SDK member that sends nothing of its own (no poses, no pings) stays for several
    silence timeouts: aiohttp answers the server's pings."""
    with run_server(auth_secret=SECRET, heartbeat=0.3, silence_timeout=1.0) as srv:
        s = connect(srv.url, room="idle", name="i", token=tok("idle", "i"), ping_interval=0)
        await s.start()
        try:
            first = s.member_id
            await asyncio.sleep(4.0)
            health = srv.get_json("/health")
            assert health["members"] == 1 and s.member_id == first
            assert "medverse_silent_disconnects_total 0.0" in srv.get("/metrics")
        finally:
            await s.close()


def test_keepalive_and_unacknowledged_data_are_bounded() -> None:
    """The kernel gives up on a silent peer too: keepalive probes after about the silence
    limit, and sent bytes left unacknowledged for twice the limit end the connection."""
    import socket

    from medverse.server.app import set_keepalive

    with socket.socket() as sock:
        set_keepalive(sock, 5.0)
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        if hasattr(socket, "TCP_KEEPIDLE"):
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 2
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == 3
        if hasattr(socket, "TCP_USER_TIMEOUT"):
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 10_000
