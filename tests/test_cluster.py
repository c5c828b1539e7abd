"""A cluster of real ``medverse serve`` processes sharing a private redis-server: node
registration and expiry, lease fencing, redirects followed by the SDK, cluster-wide admin
operations, failover after ``kill -9`` and draining."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import aiohttp
import jwt as pyjwt
import msgpack
import pytest
import redis as redis_py
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from medverse.client_sdk import Closed, RefusedError, Resumed, Session, connect
from medverse.protocol.connection import Connection, MessageReceived, Refused, Role
from medverse.protocol.errors import ErrorCode, ProtocolError
from medverse.protocol.messages import (
    PROTOCOL_VERSION,
    Error,
    Grants,
    Hello,
    MemberState,
    Redirect,
    Welcome,
    encode_message,
)
from medverse.server.audit import DB_FILE
from medverse.server.auth import Identity, mint_admin_token, mint_token
from medverse.server.cluster import (
    Cluster,
    ClusterHooks,
    Load,
    ResumeTokens,
    read_nodes,
    room_key,
)
from medverse.server.config import ServerConfig
from medverse.server.roomaccess import TransferGrants, is_transfer_grant

from .conftest import ROOT, ServerProcess
from .helpers import RawClient, wait_for
from .models import triangle_glb
from .services import RedisServer, redis_available, redis_server

pytestmark = pytest.mark.skipif(not redis_available(), reason="redis-server is not installed")

SECRET = "c" * 48
TTL = 2.5  # lease and heartbeat time to live: failover waits about this long


@pytest.fixture(scope="module")
def redis() -> Iterator[RedisServer]:
    with redis_server() as r:
        yield r


def start_node(redis: RedisServer, **settings: object) -> ServerProcess:
    from benchmarks.harness import start_server

    options: dict[str, object] = {
        "redis_url": redis.url,
        "cluster_lease_ttl": TTL,
        "auth_secret": SECRET,
        "room_linger": 2.0,
        "resume_grace": 10.0,
    }
    return start_server(**(options | settings))


@pytest.fixture
def nodes(redis: RedisServer) -> Iterator[list[ServerProcess]]:
    """Two nodes of one cluster (a fresh pair per test: some tests kill one)."""
    # The nodes of earlier tests were killed, so their entries and leases would linger for a
    # TTL in the module's Redis: each test starts from an empty directory instead.
    with redis_py.Redis.from_url(redis.url) as r:
        r.flushall()
    started = [start_node(redis), start_node(redis)]
    try:
        for s in started:
            s.wait_ready(timeout=60)  # the machine may be busy
        yield started
    finally:
        for s in started:
            if s.proc.poll() is None:
                s.proc.kill()
                s.proc.wait()


def token(room: str, who: str, role: str = "participant") -> str:
    return mint_token(SECRET.encode(), room=room, identity=who, name=who, role=role)


def admin() -> str:
    return mint_admin_token(SECRET.encode(), identity="ops", ttl=600)


async def call(srv: ServerProcess, method: str, path: str, **kw: Any) -> tuple[int, dict[str, Any]]:
    headers = {"Authorization": f"Bearer {admin()}"}
    async with (
        aiohttp.ClientSession() as http,
        http.request(method, srv.http + path, headers=headers, **kw) as r,
    ):
        return r.status, await r.json(content_type=None)


async def directory(redis: RedisServer) -> list[dict[str, str]]:
    import redis.asyncio as aioredis

    r = aioredis.Redis.from_url(redis.url)
    try:
        return await read_nodes(r)
    finally:
        await r.aclose()


async def wait_nodes(redis: RedisServer, n: int, timeout: float = 10.0) -> list[dict[str, str]]:
    deadline = time.monotonic() + timeout
    while True:
        found = await directory(redis)
        if len(found) == n or time.monotonic() > deadline:
            return found
        await asyncio.sleep(0.1)


def redis_url_of(node: ServerProcess) -> str:
    return node.env["MEDVERSE_REDIS_URL"]


def medverse(redis_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``medverse ARGS --redis-url ...`` as an operator runs it."""
    return subprocess.run(
        [sys.executable, "-m", "medverse.server.cli", *args, "--redis-url", redis_url],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )


def owner_of(nodes: list[ServerProcess], url: str) -> ServerProcess:
    return next(n for n in nodes if url.startswith(n.url))


# --------------------------------------------------------------------------- units


def test_resume_tokens_are_bound_to_room_subject_and_secret() -> None:
    tokens = ResumeTokens(b"k" * 32, bind_subject=True)
    t = tokens.issue("ward-1", 70000, "alice", 3)
    assert len(t) <= 128  # fits the hello's resume field
    assert tokens.check(t, "ward-1", "alice") == (70000, 3)
    assert tokens.check(t, "ward-2", "alice") is None
    assert tokens.check(t, "ward-1", "mallory") is None
    assert ResumeTokens(b"x" * 32, True).check(t, "ward-1", "alice") is None
    flipped = t[:5] + ("A" if t[5] != "A" else "B") + t[6:]
    assert tokens.check(flipped, "ward-1", "alice") is None
    for junk in ("", "!!!", "a" * 128, t[:-4]):
        assert tokens.check(junk, "ward-1", "alice") is None
    anonymous = ResumeTokens(b"k" * 32, bind_subject=False)
    assert anonymous.check(anonymous.issue("r", 1, "x", 1), "r", "y") == (1, 1)


def test_a_client_refuses_malformed_redirects() -> None:
    for url in ("http://b/ws", "ws://a b/ws", "ws://" + "x" * 600, "", "ws://\x00"):
        c = Connection(Role.CLIENT)
        c.send(Hello(PROTOCOL_VERSION, "ward-1", "A", 3, None, None))
        frame = b"\x01" + msgpack.packb({"t": "redirect", "url": url, "reason": "owner"})
        ev = c.receive(frame)
        assert isinstance(ev, Refused) and ev.error.code.value == "out_of_range", url
        assert c.state.value == "hello"
    c = Connection(Role.CLIENT)
    c.send(Hello(PROTOCOL_VERSION, "ward-1", "A", 3, None, None))
    ev = c.receive(encode_message(Redirect("wss://node-b.example:8443/ws", "owner")))
    assert isinstance(ev, MessageReceived) and c.state.value == "closing"


async def test_leases_are_fenced_by_generation(redis: RedisServer) -> None:
    """Two nodes in this process: the lease goes to one; once it expired and the other was
    granted the room, the stale owner can neither renew, release nor hand it over, and stops
    serving the room."""
    cfg = ServerConfig(redis_url=redis.url, cluster_lease_ttl=1.0, port=1111)
    a, b = Cluster(cfg, node_id="node-a"), Cluster(cfg, node_id="node-b")
    dropped: list[tuple[str, str | None]] = []

    def hooks(label: str) -> ClusterHooks:
        return ClusterHooks(
            load=lambda: Load(0, 0, 0.0, 0.0),
            describe=list,
            drop_room=lambda room, url: dropped.append((f"{label}:{room}", url)),
            command=lambda cmd: None,
            rooms=list,
        )

    a._hooks, b._hooks = hooks("a"), hooks("b")
    loop = asyncio.get_running_loop()

    async def renew(c: Cluster) -> None:
        # As the node's heartbeat thread does; a lost lease is dropped on the loop.
        await asyncio.to_thread(c._renew_sync, loop)
        await asyncio.sleep(0.05)

    try:
        await a.redis.delete(room_key("fenced"))
        assert (await a.route("fenced")).local
        gen_a = a.generation("fenced")
        assert a.holds("fenced")
        elsewhere = await b.route("fenced")
        assert not elsewhere.local and elsewhere.url == a.url
        await renew(a)  # the owner renews: still its own
        assert a.holds("fenced") and not dropped
        # A partition: a renews no more. Its own clock stops it serving before Redis frees
        # the lease.
        await asyncio.sleep(1.0 - a._margin + 0.05)
        assert not a.holds("fenced")
        deadline = time.monotonic() + 3
        while await a.redis.exists(room_key("fenced")):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        assert (await b.route("fenced")).local
        gen_b = b.generation("fenced")
        assert gen_b > gen_a
        # The stale owner comes back with its old generation: every write is refused.
        await renew(a)
        assert ("a:fenced", None) in dropped and "fenced" not in a.leases
        await a.release_lease("fenced", gen_a)
        a.leases["fenced"] = type(b.leases["fenced"])(gen_a, time.monotonic() + 5)
        assert not await a.transfer("fenced", "node-a", a.url)
        owner, gen = await a.redis.hmget(room_key("fenced"), "owner", "gen")
        assert owner == b"node-b" and int(gen) == gen_b
        await renew(b)
        assert b.holds("fenced") and not any(d[0].startswith("b:") for d in dropped)
    finally:
        for c in (a, b):
            c.leases.clear()
            await c._close_clients()


# --------------------------------------------------------------------------- processes


async def test_nodes_register_and_vanish_when_killed(
    redis: RedisServer, nodes: list[ServerProcess]
) -> None:
    found = await wait_nodes(redis, 2)
    assert len(found) == 2
    urls = sorted(n["url"] for n in found)
    assert urls == sorted(f"{s.url}/ws" for s in nodes)
    for n in found:
        assert int(n["capacity"]) == 1000 and n["members"] == "0" and n["draining"] == "0"
    health = nodes[0].get_json("/health")["cluster"]
    assert health["url"] == f"{nodes[0].url}/ws"
    os.kill(nodes[1].pid, signal.SIGKILL)
    nodes[1].proc.wait()
    t0 = time.monotonic()
    left = await wait_nodes(redis, 1, timeout=3 * TTL)
    assert [n["url"] for n in left] == [f"{nodes[0].url}/ws"]
    assert time.monotonic() - t0 < 3 * TTL


async def test_the_sdk_follows_redirects_with_its_token(nodes: list[ServerProcess]) -> None:
    a, b = nodes
    first = connect(a.url, "ward-7", token=token("ward-7", "alice"), reconnect=False)
    await first.start()
    home = owner_of(nodes, first.url)
    other = b if home is a else a
    # The second member enters through the node that does not run the room.
    second = connect(other.url, "ward-7", token=token("ward-7", "bob"), reconnect=False)
    await second.start()
    try:
        assert second.url == first.url == f"{home.url}/ws"
        assert second.redirects == 1
        assert second.member_id != first.member_id
        await wait_for(lambda: second.member_id in first.members)
        assert first.members[second.member_id] == "bob"
        # A hello for the room on the other node, by hand: a typed redirect, then the close.
        async with aiohttp.ClientSession() as http, http.ws_connect(other.url + "/ws") as ws:
            conn = Connection(Role.CLIENT)
            hello = Hello(PROTOCOL_VERSION, "ward-7", "carol", 3, None, token("ward-7", "carol"))
            await ws.send_bytes(conn.send(hello))
            msg = await ws.receive(timeout=10)
            ev = conn.receive(msg.data)
            assert isinstance(ev, MessageReceived) and isinstance(ev.message, Redirect)
            assert ev.message.url == f"{home.url}/ws" and ev.message.reason == "owner"
            assert (await ws.receive(timeout=10)).type in (
                aiohttp.WSMsgType.CLOSE,
                aiohttp.WSMsgType.CLOSED,
            )
        # A join with a forged token is refused where the room lives, not redirected blindly.
        bad = connect(other.url, "ward-7", token=token("ward-7", "eve")[:-4] + "AAAA")
        with pytest.raises(Exception, match="unauthorized"):
            await bad.start()
        health = other.get_json("/health")["cluster"]["redis"]
        assert health["joins"] >= 2 and health["join_round_trips"] == health["joins"]
    finally:
        await second.close()
        await first.close()


async def test_cluster_wide_list_end_and_ban(nodes: list[ServerProcess]) -> None:
    a, b = nodes
    host = connect(a.url, "ward-8", token=token("ward-8", "host", "host"), reconnect=False)
    await host.start()
    home = owner_of(nodes, host.url)
    other = b if home is a else a
    guest = connect(other.url, "ward-8", token=token("ward-8", "guest"))
    await guest.start()
    try:
        # The node that does not run the room lists it with both members and its node.
        async def listed() -> list[dict[str, Any]]:
            status, body = await call(other, "GET", "/admin/rooms")
            assert status == 200
            return [r for r in body["rooms"] if r["room"] == "ward-8"]

        deadline = time.monotonic() + 5
        while len(rooms := await listed()) != 1 or len(rooms[0]["members"]) != 2:
            assert time.monotonic() < deadline, rooms
            await asyncio.sleep(0.1)
        assert rooms[0]["url"] == f"{home.url}/ws"
        assert sorted(m["name"] for m in rooms[0]["members"]) == ["guest", "host"]
        status, body = await call(other, "GET", "/admin/nodes")
        assert status == 200 and len(body["nodes"]) == 2
        # The same from a shell with access to the Redis.
        out = await asyncio.to_thread(medverse, redis_url_of(other), "rooms")
        rows = [json.loads(line) for line in out.stdout.splitlines()]
        assert out.returncode == 0 and [r["url"] for r in rows if r["room"] == "ward-8"] == [
            f"{home.url}/ws"
        ]
        # Bad bans are refused with typed errors.
        for bad, code in (
            ({"identity": "guest"}, "bad_field"),
            ({"room": "ward 8", "identity": "guest"}, "bad_field"),
            ({"room": "ward-8", "identity": ""}, "bad_field"),
            ({"room": "ward-8", "identity": "guest", "duration": -1}, "out_of_range"),
            ({"room": "ward-8", "identity": "guest", "duration": True}, "out_of_range"),
            ({"room": "ward-8", "identity": "guest", "reason": "x" * 300}, "bad_field"),
        ):
            status, body = await call(other, "POST", "/admin/bans", json=bad)
            assert status == 400 and body["error"]["code"] == code, (bad, body)
        status, body = await call(other, "POST", "/admin/bans", data=b"[1,")
        assert status == 400
        # The ban, sent to the node that does not run the room, removes the guest there.
        status, body = await call(
            other, "POST", "/admin/bans", json={"room": "ward-8", "identity": "guest"}
        )
        assert status == 200 and body["nodes"] == 2
        closed = await asyncio.wait_for(guest.wait_closed(), 10)
        assert closed.code == "banned"
        again = connect(other.url, "ward-8", token=token("ward-8", "guest"), reconnect=False)
        with pytest.raises(Exception, match="banned"):
            await again.start()
        # Ending the room through the other node ends it where it runs.
        status, body = await call(other, "POST", "/admin/rooms/ward-8/end", json={"reason": "x"})
        assert status == 200 and body["node"]
        closed = await asyncio.wait_for(host.wait_closed(), 10)
        assert closed.code == "session_ended"
        status, body = await call(other, "POST", "/admin/rooms/nowhere/end")
        assert status == 404
    finally:
        await guest.close()
        await host.close()


async def test_failover_after_kill_9(nodes: list[ServerProcess]) -> None:
    a, b = nodes
    members = [
        connect(
            a.url,
            "ward-9",
            token=token("ward-9", who),
            fallback_urls=[b.url],
            max_backoff=0.5,
        )
        for who in ("p1", "p2")
    ]
    for m in members:
        await m.start()
    home = owner_of(nodes, members[0].url)
    survivor = b if home is a else a
    ids = [m.member_id for m in members]
    resumed: list[Resumed] = []

    async def watch(m: Any) -> None:
        async for ev in m.events():
            if isinstance(ev, Resumed):
                resumed.append(ev)
                return

    watchers = [asyncio.create_task(watch(m)) for m in members]
    try:
        t0 = time.monotonic()
        os.kill(home.pid, signal.SIGKILL)
        await asyncio.wait_for(asyncio.gather(*watchers), 20)
        took = time.monotonic() - t0
        assert all(ev.same_member for ev in resumed), resumed
        assert [m.member_id for m in members] == ids
        assert all(m.url == f"{survivor.url}/ws" for m in members)
        await wait_for(lambda: all(len(m.members) == 1 for m in members))
        assert took < 4 * TTL + 5, took
    finally:
        for w in watchers:
            w.cancel()
        for m in members:
            await m.close()


async def test_no_room_is_placed_on_a_node_killed_moments_ago(redis: RedisServer) -> None:
    """A killed node's entry outlives it by up to a lease time; once it has not changed for
    a few heartbeats the others count the node as gone: new rooms go to live nodes only."""
    with redis_py.Redis.from_url(redis.url) as r:
        r.flushall()
    # Heartbeats every 2 s: gone for the others after 2 unchanged (and a read, <= 6 s after
    # the kill); its entry expires 8-10 s after the kill.
    ttl = 10.0
    a, b = start_node(redis, cluster_lease_ttl=ttl), start_node(redis, cluster_lease_ttl=ttl)
    try:
        for s in (a, b):
            s.wait_ready(timeout=60)
        await wait_nodes(redis, 2, timeout=30)
        await wait_for(lambda: a.get_json("/health")["cluster"]["nodes"] == 2, timeout=30, step=0.1)
        os.kill(b.pid, signal.SIGKILL)
        b.proc.wait()
        t0 = time.monotonic()
        await wait_for(
            lambda: a.get_json("/health")["cluster"]["gone"] != [], timeout=ttl, step=0.1
        )
        assert len(await directory(redis)) == 2  # its entry is still there
        sessions = [
            connect(a.url, f"fresh-{i}", token=token(f"fresh-{i}", "p"), ping_interval=0)
            for i in range(4)
        ]
        try:
            for s in sessions:
                await asyncio.wait_for(s.start(), 5)
            # Placed on a, not redirected to the dead node (and back after its lease ran out).
            assert [s.redirects for s in sessions] == [0, 0, 0, 0]
            assert time.monotonic() - t0 < ttl, "the entry expired: nothing was tested"
        finally:
            for s in sessions:
                await s.close()
    finally:
        for s in (a, b):
            if s.proc.poll() is None:
                s.proc.kill()
                s.proc.wait()


async def test_drain_moves_rooms_and_exits(nodes: list[ServerProcess]) -> None:
    a, b = nodes
    m1 = connect(a.url, "ward-10", token=token("ward-10", "d1"), fallback_urls=[b.url])
    await m1.start()
    home = owner_of(nodes, m1.url)
    other = b if home is a else a
    m2 = connect(other.url, "ward-10", token=token("ward-10", "d2"), fallback_urls=[a.url])
    await m2.start()
    ids = (m1.member_id, m2.member_id)
    gaps: list[float] = []

    async def watch(m: Any) -> None:
        lost = None
        async for ev in m.events():
            if ev.type == "reconnecting" and lost is None:
                lost = time.monotonic()
            if isinstance(ev, Resumed):
                assert lost is not None
                gaps.append(time.monotonic() - lost)
                assert ev.same_member
                return
            assert not isinstance(ev, Closed), ev

    watchers = [asyncio.create_task(watch(m)) for m in (m1, m2)]
    try:
        home.proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(asyncio.gather(*watchers), 15)
        assert (m1.member_id, m2.member_id) == ids
        assert m1.url == m2.url == f"{other.url}/ws"
        assert max(gaps) < 1.0, gaps
        assert home.proc.wait(15) == 0
        # The drained node is gone from the directory; the room answers on the other.
        await wait_for(lambda: m2.member_id in m1.members)
        health = other.get_json("/health")
        assert health["rooms"] == 1 and health["members"] == 2
    finally:
        for w in watchers:
            w.cancel()
        await m1.close()
        await m2.close()


async def test_drain_command_names_a_live_node(redis: RedisServer) -> None:
    """``medverse drain`` refuses a node the directory does not know, in one line."""
    env = dict(os.environ, MEDVERSE_REDIS_URL=redis.url)
    out = subprocess.run(
        [sys.executable, "-m", "medverse.server.cli", "drain", "no-such-node"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=30,
    )
    assert out.returncode == 2 and "no live node" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_workers_without_redis_fail_clearly(tmp_path: Any) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDVERSE_")}
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "medverse.server.cli",
            "serve",
            "--workers",
            "2",
            "--data-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=30,
    )
    assert out.returncode == 2
    assert "--workers needs --redis-url" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def _two_free_ports() -> int:
    import socket

    from .conftest import free_port

    for _ in range(50):
        port = free_port()
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise RuntimeError("no two consecutive free ports")


async def test_workers_start_a_cluster_and_stop_on_sigterm(
    redis: RedisServer, tmp_path: Any
) -> None:
    port = _two_free_ports()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDVERSE_")}
    env.update(MEDVERSE_LOG_LEVEL="warning", MEDVERSE_CLUSTER_LEASE_TTL=str(TTL))
    cmd = [sys.executable, "-m", "medverse.server.cli", "serve", "--workers", "2"]
    cmd += ["--redis-url", redis.url, "--port", str(port), "--data-dir", str(tmp_path)]
    before = {n["node"] for n in await directory(redis)}
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while len(mine := [n for n in await directory(redis) if n["node"] not in before]) < 2:
            assert time.monotonic() < deadline and proc.poll() is None
            await asyncio.sleep(0.1)
        assert sorted(n["url"] for n in mine) == [
            f"ws://127.0.0.1:{port}/ws",
            f"ws://127.0.0.1:{port + 1}/ws",
        ]
        # One token secret for both, made once in the shared data directory.
        assert (tmp_path / "auth_secret").exists()
        assert (tmp_path / "node-0").is_dir() and (tmp_path / "node-1").is_dir()
        # Each worker keeps to a core of its own, so their ticks never wait for each other.
        cores = sorted(os.sched_getaffinity(0))
        kept = sorted(sorted(os.sched_getaffinity(int(n["pid"]))) for n in mine)
        assert kept == ([[cores[0]], [cores[1]]] if len(cores) >= 2 else [cores, cores])
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        left = {n["node"] for n in await directory(redis)}
        assert not left & {n["node"] for n in mine}
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@contextmanager
def database_pair(
    redis: RedisServer, postgres_server: str
) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    """Two nodes on one fresh PostgreSQL database: one audit log, so the second gets a copy
    of the first's signing key."""
    import shutil
    import tempfile
    from pathlib import Path

    from medverse.server.audit import KEY_FILE, PUBLIC_KEY_FILE

    from .pgservice import new_database

    url = new_database(postgres_server)
    dirs = [Path(tempfile.mkdtemp(prefix="medverse-")) for _ in range(2)]
    started = [start_node(redis, database_url=url, data_dir=dirs[0])]
    try:
        started[0].wait_ready(timeout=60)
        for name in (KEY_FILE, PUBLIC_KEY_FILE):
            shutil.copy2(dirs[0] / name, dirs[1] / name)
        started.append(start_node(redis, database_url=url, data_dir=dirs[1]))
        started[1].wait_ready(timeout=60)
        yield started[0], started[1]
    finally:
        for node in started:
            if node.proc.poll() is None:
                node.proc.kill()
                node.proc.wait()


async def test_failover_recreates_the_room_from_the_shared_database(
    redis: RedisServer, postgres_server: str
) -> None:
    """Nodes that share PostgreSQL: a ban a host gave on the node that died still holds on the
    node that takes the room over, and the host resumes there as itself."""
    with database_pair(redis, postgres_server) as (a, b):
        host = connect(
            a.url,
            "ward-11",
            token=token("ward-11", "doctor", "host"),
            fallback_urls=[b.url],
            max_backoff=0.5,
        )
        await host.start()
        home = owner_of([a, b], host.url)
        survivor = b if home is a else a
        guest = connect(a.url, "ward-11", token=token("ward-11", "troll"))
        await guest.start()
        await wait_for(lambda: guest.member_id in host.members)
        await host.moderate("ban", guest.member_id, "disruptive")
        assert (await asyncio.wait_for(guest.wait_closed(), 10)).code == "banned"
        hid = host.member_id
        resumed = asyncio.create_task(
            anext(e async for e in host.events() if isinstance(e, Resumed))
        )
        os.kill(home.pid, signal.SIGKILL)
        ev = await asyncio.wait_for(resumed, 30)
        assert ev.same_member and host.member_id == hid
        assert host.url == f"{survivor.url}/ws"
        again = connect(survivor.url, "ward-11", token=token("ward-11", "troll"), reconnect=False)
        with pytest.raises(Exception, match="banned"):
            await again.start()
        await host.close()


@pytest.mark.parametrize("how", ["drain", "kill -9"])
async def test_removals_mutes_and_grant_changes_hold_on_the_node_a_room_moves_to(
    redis: RedisServer, postgres_server: str, how: str
) -> None:
    """Nodes on one PostgreSQL: a host mutes a patient, takes a grant from it and removes a
    troll; the room moves to the other node (its node drains, or is killed). After the
    members resume there the mute and the grant change still hold (for the resumed patient
    and for a second device of the same identity) and the troll's token is still refused."""
    room = "ward-12"
    with database_pair(redis, postgres_server) as (a, b):
        members = {
            who: connect(
                a.url,
                room,
                token=token(room, who, "host" if who == "doctor" else "participant"),
                fallback_urls=[b.url],
                max_backoff=0.5,
                ping_interval=0,
            )
            for who in ("doctor", "patient")
        }
        host, patient = members["doctor"], members["patient"]
        troll_token = token(room, "troll")
        troll = connect(a.url, room, token=troll_token, ping_interval=0)
        for m in (host, patient, troll):
            await m.start()
        home = owner_of([a, b], host.url)
        survivor = b if home is a else a
        try:
            await wait_for(lambda: {patient.member_id, troll.member_id} <= set(host.members))
            await host.moderate("mute", patient.member_id)
            await host.change_role(patient.member_id, grant="annotate", allow=False)
            await host.moderate("remove", troll.member_id, "disruptive")
            assert (await asyncio.wait_for(troll.wait_closed(), 10)).code == "removed"
            ids = {who: m.member_id for who, m in members.items()}

            # The node that does not run the room refuses the removed token over HTTP too
            # (from the stored session), and still serves the members.
            async def assets_as(tok: str) -> tuple[int, Any]:
                headers = {"Authorization": f"Bearer {tok}"}
                async with (
                    aiohttp.ClientSession() as http,
                    http.get(f"{survivor.http}/rooms/{room}/assets", headers=headers) as r,
                ):
                    return r.status, await r.json(content_type=None)

            status, body = await assets_as(troll_token)
            assert status == 403 and body["error"]["code"] == "removed", body
            assert (await assets_as(token(room, "patient")))[0] == 200

            async def resumed(m: Session, grants: bool) -> tuple[Resumed, Any]:
                """The member's Resumed after the move and (``grants``) the grants the new
                node tells it after it lost its connection."""
                ev, lost, told = None, False, None
                async for e in m.events():
                    lost = lost or e.type == "reconnecting"
                    if isinstance(e, Resumed):
                        ev = e
                    elif lost and e.type == "grants":
                        told = e
                    if ev is not None and (told is not None or not grants):
                        return ev, told
                raise AssertionError("closed")

            watchers = [asyncio.create_task(resumed(m, m is patient)) for m in members.values()]
            if how == "drain":
                home.proc.send_signal(signal.SIGTERM)
            else:
                os.kill(home.pid, signal.SIGKILL)
            done = await asyncio.wait_for(asyncio.gather(*watchers), 30)
            assert all(ev.same_member for ev, _ in done)
            assert {who: m.member_id for who, m in members.items()} == ids
            assert host.url == patient.url == f"{survivor.url}/ws"
            changed = done[1][1]
            assert changed.member_id == patient.member_id
            assert "annotate" not in changed.grants and "publish_audio" in changed.grants

            # The node that runs the room now has the patient muted.
            async def listed() -> dict[str, Any]:
                _, body = await call(survivor, "GET", "/admin/rooms")
                return next(
                    m
                    for r in body["rooms"]
                    if r["room"] == room
                    for m in r["members"]
                    if m["id"] == patient.member_id
                )

            assert (await listed())["muted"] is True
            # A second device of the patient's identity joins muted, without the grant.
            raw = await RawClient.open(survivor.url)
            try:
                await raw.ws.send_bytes(
                    encode_message(
                        Hello(PROTOCOL_VERSION, room, "x", 3, None, token(room, "patient"))
                    )
                )
                welcome = await raw.next_control(10)
                assert isinstance(welcome, Welcome), welcome
                seen: dict[type, Any] = {}
                while Grants not in seen or MemberState not in seen:
                    m = await raw.next_control(10)
                    if isinstance(m, (Grants, MemberState)) and m.member_id == welcome.member_id:
                        seen[type(m)] = m
                assert "annotate" not in seen[Grants].grants
                assert seen[MemberState].muted is True
            finally:
                await raw.close()
            # The removed token is still refused, on the node that runs the room now.
            again = connect(survivor.url, room, token=troll_token, reconnect=False)
            with pytest.raises(Exception, match="removed"):
                await again.start()
        finally:
            for m in (host, patient, troll):
                await m.close()


async def test_kill_9_loses_no_acknowledged_annotation_and_keeps_flushed_transforms(
    redis: RedisServer, postgres_server: str
) -> None:
    """Nodes on one PostgreSQL: a surgeon moves a model and annotates it without pause while
    its node is killed; on the node that takes the room over, every annotation the surgeon got
    an acknowledgement for is there, and the model is where it was last flushed."""
    from medverse.client_sdk import AssetClient

    from .models import HEART

    with database_pair(redis, postgres_server) as (a, b):
        room = "ward-12"
        surgeon = connect(
            a.url,
            room,
            token=token(room, "surgeon", "host"),
            fallback_urls=[b.url],
            max_backoff=0.5,
        )
        await surgeon.start()
        home = owner_of([a, b], surgeon.url)
        survivor = b if home is a else a
        # The model is uploaded to both servers (each has its own blob directory here):
        # whichever runs the room can spawn it.
        for node in (a, b):
            client = AssetClient(node.url, room, token(room, "surgeon", "host"))
            try:
                sha = (await client.upload(HEART)).sha256
            finally:
                await client.close()
        await surgeon.objects.wait_synced()
        heart = await surgeon.spawn(sha, (0.0, 1.2, -0.6), name="heart")
        await surgeon.grab(heart)
        surgeon.move(heart, (0.3, 1.1, -0.5), (0.0, 0.0, 0.0, 1.0), 1.5)
        await surgeon.release(heart)
        await asyncio.sleep(1.0)  # transforms are flushed every 0.5 s
        acked: list[int] = []

        async def annotate_without_pause() -> None:
            i = 0
            while True:
                try:
                    acked.append(await surgeon.annotate(heart, "pin", [(0, 0, 0)], text=f"{i}"))
                except Exception:
                    await asyncio.sleep(0.05)  # unanswered: the node is gone; not counted
                i += 1

        resumed = asyncio.create_task(
            anext(e async for e in surgeon.events() if isinstance(e, Resumed))
        )
        writer = asyncio.create_task(annotate_without_pause())
        try:
            await wait_for(lambda: len(acked) >= 10, timeout=20)
            os.kill(home.pid, signal.SIGKILL)
            ev = await asyncio.wait_for(resumed, 30)
            assert ev.same_member
        finally:
            writer.cancel()
        before_kill = list(acked)
        observer = connect(survivor.url, room, token=token(room, "radiologist"))
        await observer.start()
        try:
            await observer.objects.wait_synced()
            obj = observer.objects[heart]
            missing = set(before_kill) - set(obj.annotations)
            assert not missing, f"acknowledged but lost: {sorted(missing)}"
            await wait_for(lambda: observer.snapshot.ids.size >= 2, timeout=10)
            assert obj.position == pytest.approx((0.3, 1.1, -0.5), abs=0.002)
            assert obj.scale == pytest.approx(1.5, abs=0.002)
        finally:
            await observer.close()
            await surgeon.close()


# --------------------------------------------------------------------------- transfers


def test_transfer_grants_are_signed_for_one_room_expire_and_join_once() -> None:
    ident = Identity("pat", "Pat", "ward-a", "participant", frozenset({"annotate"}), None, "t1")
    grants = TransferGrants(b"s" * 32)
    grant = grants.issue(ident, "ward-b", True, "drlee", "ward-a", "review", "ward-a")
    assert is_transfer_grant(grant) and not is_transfer_grant(token("ward-b", "pat"))
    # Another server of the same cluster (same secret) redeems it, once.
    there = TransferGrants(b"s" * 32)
    with pytest.raises(ProtocolError) as err:
        there.redeem(grant, "ward-c")
    assert err.value.code is ErrorCode.UNAUTHORIZED
    arrival = there.redeem(grant, "ward-b")
    assert arrival.identity == replace(ident, room="ward-b")
    assert (arrival.admit, arrival.actor, arrival.origin, arrival.reason, arrival.home) == (
        True,
        "drlee",
        "ward-a",
        "review",
        "ward-a",
    )
    with pytest.raises(ProtocolError) as err:
        there.redeem(grant, "ward-b")
    assert err.value.code is ErrorCode.UNAUTHORIZED and "used" in err.value.message
    # Another cluster's secret, a tampered signature, an expired grant: refused, typed.
    expired = TransferGrants(b"s" * 32, ttl=-60).issue(ident, "ward-b", False, "a", "b", "")
    for bad, code in [
        (TransferGrants(b"x" * 32).issue(ident, "ward-b", False, "a", "b", ""), "unauthorized"),
        (grant[:-4] + ("AAAA" if not grant.endswith("AAAA") else "BBBB"), "unauthorized"),
        (expired, "token_expired"),
        ("not.a.grant", "unauthorized"),
    ]:
        with pytest.raises(ProtocolError) as err:
            TransferGrants(b"s" * 32).redeem(bad, "ward-b")
        assert err.value.code.value == code, bad


def audit_of(node: ServerProcess, kind: str) -> list[tuple[str, str, str, dict[str, Any]]]:
    path = os.path.join(node.env["MEDVERSE_DATA_DIR"], DB_FILE)
    db = sqlite3.connect(path)
    try:
        rows = db.execute(
            "SELECT room, actor, subject, detail FROM entries WHERE kind = ? ORDER BY seq", (kind,)
        ).fetchall()
    finally:
        db.close()
    return [(r, a, s, json.loads(d) if d else {}) for r, a, s, d in rows]


async def room_elsewhere(
    nodes: list[ServerProcess],
    home: ServerProcess,
    mint: Callable[[str, str, str], str],
    sessions: list[Session],
) -> Session | None:
    """A host's session in a new room that the node other than ``home`` runs (new rooms go
    to the node with the most room left, as the nodes last read each other's load: tried
    until they have, bounded), appended to ``sessions``; None if none was placed there."""
    deadline = time.monotonic() + 20
    for i in range(40):
        entry = nodes[i % 2]
        s = connect(entry.url, f"ward-b{i}", token=mint(f"ward-b{i}", "drkim", "host"))
        s.reconnect = False
        await s.start()
        if owner_of(nodes, s.url) is not home:
            sessions.append(s)
            return s
        await s.close()
        if time.monotonic() > deadline:
            break
        await asyncio.sleep(0.3)
    return None


async def test_a_host_moves_a_member_into_a_room_another_node_runs(
    nodes: list[ServerProcess],
) -> None:
    """The member is moved, redirected with a transfer grant to the node that runs the target
    room and enters it there under that room's rules, with no new token from the organiser;
    both nodes' audit logs record it; it resumes there with its first token; its room access
    credential opens the target room's assets on that node."""
    a = nodes[0]
    host = connect(a.url, "ward-a", token=token("ward-a", "drlee", "host"), reconnect=False)
    await host.start()
    pat = connect(a.url, "ward-a", token=token("ward-a", "pat"), ping_interval=0)
    sessions = [host, pat]
    try:
        await pat.start()
        home = owner_of(nodes, host.url)
        target = await room_elsewhere(nodes, home, token, sessions)
        assert target is not None, "no room was placed on the other node"
        there = owner_of(nodes, target.url)
        room = target.room
        await host.transfer(pat.member_id, room, "second opinion")
        await wait_for(lambda: pat.room == room and pat.moving_to is None, timeout=20)
        assert pat.url == f"{there.url}/ws"
        await wait_for(lambda: pat.member_id in target.members, timeout=10)
        assert target.members[pat.member_id] == "pat"
        assert pat.members.get(target.member_id) == "drkim"
        await wait_for(lambda: pat.member_id not in host.members, timeout=10)
        # Its room access credential opens the target room's assets where it runs.
        assert pat.room_access is not None
        assert await pat.assets.list() == []
        # The grant was for one join: the member resumes there with its first join token.
        ws = pat._ws
        assert ws is not None
        mid = pat.member_id
        await ws.close()
        await wait_for(lambda: pat._ws is not ws and pat._connected.is_set(), timeout=20)
        assert pat.member_id == mid and pat.room == room
        await wait_for(
            lambda: any(d.get("to") == room for _, _, _, d in audit_of(home, "transferred")),
            timeout=10,
        )
        (r, actor, subject, detail) = next(
            e for e in audit_of(home, "transferred") if e[3].get("to") == room
        )
        assert (r, actor, subject, detail["remote"]) == ("ward-a", "drlee", "pat", True)
        await wait_for(lambda: bool(audit_of(there, "transfer_arrived")), timeout=10)
        (r, actor, subject, detail) = audit_of(there, "transfer_arrived")[-1]
        assert (r, actor, subject, detail["origin"], detail["reason"]) == (
            room,
            "drlee",
            "pat",
            "ward-a",
            "second opinion",
        )
    finally:
        for s in reversed(sessions):
            await s.close()


async def test_a_forged_transfer_grant_is_refused_not_routed(
    nodes: list[ServerProcess],
) -> None:
    ident = Identity("eve", "Eve", "ward-z", "host", frozenset({"moderate"}), None, "t")
    forged = TransferGrants(b"f" * 32).issue(ident, "ward-z", True, "x", "y", "")
    for node in nodes:
        async with aiohttp.ClientSession() as http, http.ws_connect(node.url + "/ws") as ws:
            conn = Connection(Role.CLIENT)
            hello = Hello(PROTOCOL_VERSION, "ward-z", "eve", 3, None, forged)
            await ws.send_bytes(conn.send(hello))
            ev = conn.receive((await ws.receive(timeout=10)).data)
            assert isinstance(ev, MessageReceived), ev
            assert not isinstance(ev.message, Redirect), "a forged grant is refused, not routed"
            assert getattr(ev.message, "code", None) == "unauthorized", ev.message


async def test_with_public_key_tokens_room_access_holds_across_nodes(
    redis: RedisServer, tmp_path: Any
) -> None:
    """Nodes that check join tokens with an identity provider's public key cannot sign with
    it: they sign room access credentials with the cluster's shared secret, so the
    credential one node gives a member it moves is accepted by the node that runs the room."""
    key = ed25519.Ed25519PrivateKey.generate()
    pem = tmp_path / "idp.pem"
    pem.write_bytes(key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo))

    def idp_token(room: str, who: str, role: str = "participant") -> str:
        now = int(time.time())
        claims = {"sub": who, "name": who, "room": room, "role": role, "iat": now}
        claims |= {"exp": now + 600, "jti": f"{who}-{room}"}
        return pyjwt.encode(claims, key, algorithm="EdDSA")

    with redis_py.Redis.from_url(redis.url) as r:
        r.flushall()
    pair = [start_node(redis, auth_secret="", auth_public_key=str(pem)) for _ in range(2)]
    sessions: list[Session] = []
    try:
        for n in pair:
            n.wait_ready(timeout=60)
        host = connect(pair[0].url, "ward-a", token=idp_token("ward-a", "drlee", "host"))
        host.reconnect = False
        sessions.append(host)
        await host.start()
        pat = connect(pair[0].url, "ward-a", token=idp_token("ward-a", "pat"), ping_interval=0)
        sessions.append(pat)
        await pat.start()
        home = owner_of(pair, host.url)
        target = await room_elsewhere(pair, home, idp_token, sessions)
        assert target is not None, "no room was placed on the other node"
        await host.transfer(pat.member_id, target.room)
        await wait_for(lambda: pat.room == target.room and pat.moving_to is None, timeout=20)
        assert pat.url == target.url != host.url
        asset = await target.upload_asset(triangle_glb(), "heart")
        assert [a.sha256 for a in await pat.assets.list()] == [asset.sha256]
    finally:
        for s in reversed(sessions):
            await s.close()
        for n in pair:
            n.stop()


async def next_event(s: Session, kind: str, timeout: float = 20.0) -> Any:
    """The next event of type ``kind`` (earlier events of other types are dropped)."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        assert left > 0, f"no {kind} event in {timeout} s"
        ev = await asyncio.wait_for(s._events.get(), left)
        assert ev is not None, f"the session ended waiting for {kind}: {s.closed_reason}"
        if ev.type == kind:
            return ev


async def test_the_target_rooms_rules_apply_on_the_node_that_runs_it(
    nodes: list[ServerProcess],
) -> None:
    """Moved across nodes, a member waits in the target room's lobby until its host there
    admits it; into a locked room, it is refused there with a typed error (as a join)."""
    a = nodes[0]
    host = connect(a.url, "ward-a", token=token("ward-a", "drlee", "host"), reconnect=False)
    sessions = [host]
    try:
        await host.start()
        pat = connect(a.url, "ward-a", token=token("ward-a", "pat"), ping_interval=0)
        sessions.append(pat)
        await pat.start()
        bob = connect(a.url, "ward-a", token=token("ward-a", "bob"), ping_interval=0)
        sessions.append(bob)
        await bob.start()
        home = owner_of(nodes, host.url)
        target = await room_elsewhere(nodes, home, token, sessions)
        assert target is not None, "no room was placed on the other node"
        await target.moderate("lobby")
        await host.transfer(pat.member_id, target.room)
        lobby = await next_event(target, "lobby")
        while not lobby.waiting:
            lobby = await next_event(target, "lobby")
        (lobby_id, name), *_ = lobby.waiting
        assert name == "pat" and pat.member_id not in target.members
        await target.moderate("admit", lobby_id)
        await wait_for(lambda: pat.room == target.room and pat.moving_to is None, timeout=20)
        await wait_for(lambda: pat.member_id in target.members, timeout=10)

        # Locked: the node that runs the room refuses before the member leaves; the mover's
        # request fails with that code, and the member stays in ward-a, connected.
        await target.moderate("lock")
        with pytest.raises(RefusedError) as refused:
            await host.transfer(bob.member_id, target.room)
        assert refused.value.code == "room_locked"
        await asyncio.sleep(0.5)  # nothing of a move follows
        assert bob.room == "ward-a" and bob.moving_to is None and bob.closed_reason is None
        assert bob.member_id in host.members and host.member_id in bob.members
        assert bob.url == host.url and await bob.ping(timeout=10) >= 0
        assert not any(subject == "bob" for _, _, subject, _ in audit_of(home, "transferred"))
        # Once the host there unlocks, the same move goes through.
        await target.moderate("unlock")
        await host.transfer(bob.member_id, target.room)
        assert bob.member_id not in host.members  # the ack follows its leaving
        await wait_for(lambda: bob.room == target.room and bob.moving_to is None, timeout=20)
        await wait_for(lambda: bob.member_id in target.members, timeout=10)
    finally:
        for s in reversed(sessions):
            await s.close()


def ghost_room(redis: RedisServer, room: str, node: str) -> None:
    """Record in the directory that node ``node`` (no medverse process) runs ``room``, as a
    node that died or stopped answering leaves it until its lease expires."""
    with redis_py.Redis.from_url(redis.url) as r:
        r.hset(room_key(room), mapping={"owner": node, "url": "ws://127.0.0.1:9/ws", "gen": 1})
        r.pexpire(room_key(room), 60_000)


async def test_a_move_to_a_gone_or_silent_node_is_refused_and_the_member_stays(
    nodes: list[ServerProcess], redis: RedisServer
) -> None:
    """The directory names a node for the target room that nobody answers for: gone (nobody
    listens on its channel), the move is refused with room_moving at once; silent (someone
    listens and never answers), with transfer_timeout after the node's timeout; a node that
    answers with a refusal, with its code. Each time the member stays in its room."""
    a = nodes[0]
    host = connect(a.url, "ward-a", token=token("ward-a", "drlee", "host"), reconnect=False)
    pat = connect(a.url, "ward-a", token=token("ward-a", "pat"), ping_interval=0)
    sessions = [host, pat]
    listener = redis_py.Redis.from_url(redis.url)
    pubsub = listener.pubsub(ignore_subscribe_messages=True)
    try:
        await host.start()
        await pat.start()

        async def stays() -> None:
            await asyncio.sleep(0.3)
            assert pat.room == "ward-a" and pat.moving_to is None and pat.closed_reason is None
            assert pat.member_id in host.members and await pat.ping(timeout=10) >= 0

        ghost_room(redis, "ward-gone", "node-gone")
        t0 = time.monotonic()
        with pytest.raises(RefusedError) as refused:
            await host.transfer(pat.member_id, "ward-gone")
        assert refused.value.code == "room_moving", refused.value
        assert time.monotonic() - t0 < 5.0  # no wait for an answer nobody can give
        await stays()

        ghost_room(redis, "ward-silent", "node-silent")
        pubsub.subscribe("medverse:node:node-silent:inbox")
        t0 = time.monotonic()
        with pytest.raises(RefusedError) as refused:
            await host.transfer(pat.member_id, "ward-silent", "second opinion")
        waited = time.monotonic() - t0
        assert refused.value.code == "transfer_timeout", refused.value
        assert waited >= 4.5  # the node's cluster_transfer_timeout (5 s by default)
        await stays()
        # What the silent node was asked: may this member, with this signed grant, enter?
        asked = None
        for _ in range(20):
            msg = pubsub.get_message(timeout=0.5)
            if msg is not None and msg.get("type") == "message":
                asked = json.loads(msg["data"])
                break
        assert asked is not None and asked["op"] == "admit" and asked["room"] == "ward-silent"
        with redis_py.Redis.from_url(redis.url) as r:
            secret = bytes.fromhex(r.get("medverse:secret").decode())
        arrival = TransferGrants(secret).verify(asked["grant"], "ward-silent")
        assert (arrival.identity.subject, arrival.origin, arrival.reason) == (
            "pat",
            "ward-a",
            "second opinion",
        )

        # A node that answers "banned" (as its moderation would): the move fails with it.
        ghost_room(redis, "ward-banned", "node-banned")
        pubsub.subscribe("medverse:node:node-banned:inbox")

        async def answer_banned() -> None:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                msg = await asyncio.to_thread(pubsub.get_message, timeout=0.2)
                if msg is None or msg.get("type") != "message":
                    continue
                q = json.loads(msg["data"])
                if q.get("room") == "ward-banned":
                    reply = {"op": "answer", "id": q["id"], "code": "banned", "message": "no"}
                    listener.publish(f"medverse:node:{q['from']}:inbox", json.dumps(reply))
                    return

        answering = asyncio.create_task(answer_banned())
        with pytest.raises(RefusedError) as refused:
            await host.transfer(pat.member_id, "ward-banned")
        await answering
        assert refused.value.code == "banned", refused.value
        await stays()
        home = owner_of(nodes, host.url)
        assert not any(d.get("remote") for *_, d in audit_of(home, "transferred"))
    finally:
        pubsub.close()
        listener.close()
        for s in reversed(sessions):
            await s.close()


async def test_a_transfer_grant_joins_once_across_the_cluster(
    nodes: list[ServerProcess], redis: RedisServer
) -> None:
    """A grant joins once in the whole cluster: replayed to the node that took it, or to the
    other node, it is refused with unauthorized (the other node checks before it would
    redirect); an unused grant presented to the other node is redirected to the room's."""
    host = connect(nodes[0].url, "ward-g", token=token("ward-g", "drlee", "host"))
    host.reconnect = False
    try:
        await host.start()
        owner = owner_of(nodes, host.url)
        other = next(n for n in nodes if n is not owner)
        with redis_py.Redis.from_url(redis.url) as r:
            secret = bytes.fromhex(r.get("medverse:secret").decode())
        grants = TransferGrants(secret)

        def grant(who: str) -> str:
            ident = Identity(who, who, "ward-a", "participant", frozenset(), None, f"t-{who}")
            return grants.issue(ident, "ward-g", True, "drlee", "ward-a", "review")

        async def hello(node: ServerProcess, tok: str) -> Any:
            async with aiohttp.ClientSession() as http, http.ws_connect(node.url + "/ws") as ws:
                conn = Connection(Role.CLIENT)
                await ws.send_bytes(conn.send(Hello(PROTOCOL_VERSION, "ward-g", "x", 3, None, tok)))
                ev = conn.receive((await ws.receive(timeout=20)).data)
                assert isinstance(ev, MessageReceived), ev
                return ev.message

        g = grant("pat")
        joined = await hello(owner, g)
        assert joined.TYPE == "welcome" and joined.room == "ward-g", joined
        for node in (other, owner):  # replayed, to the other node and to the same one
            again = await hello(node, g)
            assert isinstance(again, Error), again
            assert (again.code, again.fatal) == ("unauthorized", True), again
            assert "used" in again.message
        # Unused, at the node that does not run the room: redirected there, still valid.
        g2 = grant("sam")
        first = await hello(other, g2)
        assert isinstance(first, Redirect) and first.url.startswith(owner.url), first
        arrived = await hello(owner, g2)
        assert arrived.TYPE == "welcome", arrived
        assert any(
            d.get("reason") == "transfer grant already used"
            for *_, d in audit_of(other, "join_refused")
        )
    finally:
        await host.close()
