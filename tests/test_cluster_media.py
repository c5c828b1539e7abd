"""A room's models, image series and image viewers across the servers of a cluster: real
``medverse serve`` processes sharing a private redis-server, a private PostgreSQL and one blob
directory, each with a data directory of its own. A model and a CT uploaded to a room on one
server, panels and a measurement made there; that server is killed (``kill -9``) or drained,
and the room comes back on the other with the model listed and downloadable (same hash), the
series listed with its images rendered the same, the viewer state as it was, and new objects
of the model spawned there."""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis as redis_py

from benchmarks.dicomgen import synthetic_ct
from medverse.client_sdk import Resumed, Session, connect
from medverse.server.audit import KEY_FILE, PUBLIC_KEY_FILE
from medverse.server.auth import mint_token

from .conftest import ServerProcess
from .helpers import wait_for
from .models import triangle_glb
from .pgservice import new_database
from .services import RedisServer, redis_available, redis_server

pytestmark = pytest.mark.skipif(not redis_available(), reason="redis-server is not installed")

SECRET = "m" * 48
TTL = 2.5  # lease time to live: a failover waits about this long


@pytest.fixture(scope="module")
def redis() -> Iterator[RedisServer]:
    with redis_server() as r:
        yield r


def token(room: str, who: str, role: str = "host") -> str:
    return mint_token(SECRET.encode(), room=room, identity=who, name=who, role=role)


@dataclass
class Pair:
    nodes: list[ServerProcess]
    blobs: Path


@pytest.fixture
def pair(redis: RedisServer, postgres_server: str, tmp_path: Path) -> Iterator[Pair]:
    """Two servers with one database and one blob directory, each its own data directory."""
    from benchmarks.harness import start_server

    with redis_py.Redis.from_url(redis.url) as r:
        r.flushall()
    url = new_database(postgres_server)
    blobs = tmp_path / "blobs"
    dirs = [tmp_path / "a", tmp_path / "b"]
    settings: dict[str, object] = {
        "redis_url": redis.url,
        "cluster_lease_ttl": TTL,
        "auth_secret": SECRET,
        "room_linger": 2.0,
        "resume_grace": 10.0,
        "database_url": url,
        "blob_dir": blobs,
    }
    started: list[ServerProcess] = []
    try:
        started.append(start_server(data_dir=dirs[0], **settings))
        started[0].wait_ready(timeout=60)
        # One audit log in the database, one signing key: the second server gets a copy.
        dirs[1].mkdir()
        for name in (KEY_FILE, PUBLIC_KEY_FILE):
            shutil.copy2(dirs[0] / name, dirs[1] / name)
        started.append(start_server(data_dir=dirs[1], **settings))
        started[1].wait_ready(timeout=60)
        yield Pair(started, blobs)
    finally:
        for s in started:
            if s.proc.poll() is None:
                s.proc.kill()
                s.proc.wait()


def owner_of(nodes: list[ServerProcess], url: str) -> ServerProcess:
    return next(n for n in nodes if url.startswith(n.url))


@dataclass
class Made:
    """What the room held on its first server."""

    room: str
    asset: str
    series: str
    panel: int
    measurement: int
    obj: int
    png: bytes


async def make_case(s: Session, settle: bool = True) -> Made:
    """Upload a model and a CT, open a panel on the CT and scroll it, measure, spawn the
    model; wait until the panel's view is stored (two flush intervals) if ``settle``."""
    asset = await s.upload_asset(triangle_glb(nodes=("skin", "vessels")), "heart")
    series = (await s.upload_series(synthetic_ct(32, 32, 8))).sha256
    await s.panels.wait_synced()
    pid = await s.open_panel(series)
    await s.set_image_view(pid, slices=(6, 10, 11), window=(-500.0, 1500.0))
    mid = await s.measure(series, "distance", [(0, 0, 5), (0, 4, 5)], label="gap")
    oid = await s.spawn(asset.sha256)
    png = await s.fetch_slice(series, "axial", 6)
    await s.panels.wait_version(pid, 1)
    if settle:
        await asyncio.sleep(1.2)
    return Made(s.room, asset.sha256, series, pid, mid, oid, png)


async def check_case(survivor: ServerProcess, made: Made, tmp_path: Path) -> None:
    """A member joining the room now, on the server that runs it, finds everything."""
    s = connect(survivor.url, made.room, token=token(made.room, "fellow"), ping_interval=0)
    s.reconnect = False
    await s.start()
    try:
        assert s.url == f"{survivor.url}/ws"  # the room runs there now
        await s.panels.wait_synced(timeout=10)
        p = s.panels[made.panel]
        assert (p.series, p.slices, p.window) == (made.series, (6, 10, 11), (-500.0, 1500.0))
        m = s.panels.measurements[made.measurement]
        assert m.value == pytest.approx(4.0) and m.label == "gap"
        # The model: listed, downloadable with the same hash.
        assert [a.sha256 for a in await s.assets.list()] == [made.asset]
        got = await s.assets.download(made.asset, tmp_path / "heart.glb")
        assert hashlib.sha256(Path(got).read_bytes()).hexdigest() == made.asset
        # The series: listed, its images rendered here as there.
        assert [x.sha256 for x in await s.images.list_series()] == [made.series]
        assert await s.fetch_slice(made.series, "axial", 6) == made.png
        # Objects of the model: the one spawned there, view changes checked against the
        # model's nodes, a new one spawned here.
        await s.objects.wait_synced(timeout=10)
        assert s.objects[made.obj].asset == made.asset
        await s.set_view(made.obj, {"vessels": False})
        assert await s.spawn(made.asset) == made.obj + 1
        # The viewer's ids go on from where they were.
        assert await s.open_panel(made.series) == made.panel + 1
    finally:
        await s.close()


async def test_a_rooms_models_series_and_viewers_survive_kill_9(pair: Pair, tmp_path: Path) -> None:
    a, b = pair.nodes
    room = "tumour-board-9"
    lead = connect(a.url, room, token=token(room, "lead"), fallback_urls=[b.url], max_backoff=0.5)
    await lead.start()
    try:
        made = await make_case(lead)
        home = owner_of(pair.nodes, lead.url)
        survivor = b if home is a else a
        # The files are in the shared blob directory, not in the server's data directory.
        assert (pair.blobs / "assets" / made.asset[:2] / f"{made.asset}.glb").exists()
        assert (pair.blobs / "images" / made.series[:2] / f"{made.series}.series").exists()
        resumed = asyncio.create_task(
            anext(e async for e in lead.events() if isinstance(e, Resumed))
        )
        os.kill(home.pid, signal.SIGKILL)
        ev = await asyncio.wait_for(resumed, 30)
        assert ev.same_member and lead.url == f"{survivor.url}/ws"
        await check_case(survivor, made, tmp_path)
        # The member that resumed there sees the viewer as it was too.
        await wait_for(lambda: made.panel in lead.panels, timeout=10)
        assert lead.panels[made.panel].slices == (6, 10, 11)
    finally:
        await lead.close()


async def test_a_drained_servers_rooms_keep_their_models_series_and_viewers(
    pair: Pair, tmp_path: Path
) -> None:
    a, b = pair.nodes
    room = "tumour-board-10"
    lead = connect(a.url, room, token=token(room, "lead"), fallback_urls=[b.url], max_backoff=0.5)
    await lead.start()
    try:
        # Drained at once after the last changes: what the room stores at intervals (the
        # panel's view, the model's transform) is stored before the other server loads it.
        made = await make_case(lead, settle=False)
        await lead.objects.wait_synced()
        await lead.grab(made.obj)
        lead.move(made.obj, (0.4, 1.0, -0.2), (0.0, 0.0, 0.0, 1.0), 1.3)
        await lead.release(made.obj)
        home = owner_of(pair.nodes, lead.url)
        other = b if home is a else a
        home.proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(home.proc.wait, 30) == 0
        await wait_for(lambda: lead.url == f"{other.url}/ws", timeout=20)
        await check_case(other, made, tmp_path)
        await wait_for(lambda: lead.snapshot.ids.size >= 2, timeout=10)
        obj = lead.objects[made.obj]
        assert obj.position == pytest.approx((0.4, 1.0, -0.2), abs=0.002)
        assert obj.scale == pytest.approx(1.3, abs=0.002)
    finally:
        await lead.close()
