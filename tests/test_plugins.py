"""The room plugin API, through the README's example: a guided breathing exercise that drives a
shared object's scale, running in the rooms of its room type only."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from examples.breathing import (
    BREATHING_MESSAGES,
    BreathingStart,
    BreathingState,
    BreathingStop,
    breath,
)
from medverse.client_sdk import ErrorEvent, JoinError, Session, connect
from medverse.protocol.tokens import mint_token
from medverse.server.app import create_app
from medverse.server.config import ServerConfig
from medverse.server.plugins import RoomPlugin, RoomType

from .conftest import ServerProcess, run_server
from .helpers import RecordingLink
from .models import HEART, provide

SECRET = "b" * 48


@pytest.fixture(scope="module")
def srv() -> Iterator[ServerProcess]:
    with run_server(app="examples.breathing", auth_secret=SECRET, room_linger=0.5) as s:
        yield s


def tok(room: str, who: str, role: str) -> str:
    return mint_token(SECRET.encode(), room=room, identity=who, role=role)


def member(srv: ServerProcess, room: str, who: str, role: str = "participant") -> Session:
    return connect(
        srv.url,
        room=room,
        name=who,
        token=tok(room, who, role),
        ping_interval=0,
        messages=BREATHING_MESSAGES,
    )


async def next_error(s: Session, timeout: float = 5.0) -> ErrorEvent:
    events = s.events()
    async with asyncio.timeout(timeout):
        while True:
            ev = await anext(events)
            if isinstance(ev, ErrorEvent):
                return ev


def test_breath_is_eased_and_periodic() -> None:
    assert breath(0.0, 4.0, 6.0) == 0.0
    assert breath(4.0, 4.0, 6.0) == pytest.approx(1.0)  # the top of the breath
    assert breath(2.0, 4.0, 6.0) == pytest.approx(0.5)
    assert breath(7.0, 4.0, 6.0) == pytest.approx(0.5)  # half way out
    assert breath(10.0, 4.0, 6.0) == pytest.approx(0.0)
    assert breath(12.0, 4.0, 6.0) == pytest.approx(breath(2.0, 4.0, 6.0))
    assert breath(0.1, 4.0, 6.0) < 0.01  # eased: slow at the turn


async def test_the_therapists_pace_drives_the_orb_for_everyone(srv: ServerProcess) -> None:
    room = "therapy-7"
    (orb_asset,) = await provide(srv.http, room, tok(room, "curator", "host"), HEART)
    therapist, patient = member(srv, room, "Dr A", "host"), member(srv, room, "Pat")
    states: list[BreathingState] = []
    await therapist.start()
    try:
        orb = await therapist.spawn(orb_asset, (0.0, 1.2, -1.0), scale=0.5, name="orb")
        await patient.start()
        patient.add_handler(BreathingState, states.append)
        await patient.objects.wait_synced()
        # A patient may not lead the exercise; the therapist may.
        await patient.send_message(BreathingStart(orb, 1.0, 1.0, 0.5))
        err = await next_error(patient)
        assert err.code == "forbidden"
        await therapist.send_message(BreathingStart(orb, 1.0, 1.0, 0.5))
        seen: list[float] = []
        deadline = time.monotonic() + 3.0  # one and a half breaths of two seconds
        while time.monotonic() < deadline:
            if orb in patient.objects:
                seen.append(patient.objects[orb].transform[2])
            await asyncio.sleep(0.03)
        # The orb breathes from its own size to half as large again, in the shared state.
        assert min(seen) == pytest.approx(0.5, abs=0.02), seen
        assert max(seen) == pytest.approx(0.75, abs=0.02), seen
        assert states and states[-1].object_id == orb and states[-1].inhale == 1.0
        # Someone joining late learns the pace.
        late = member(srv, room, "Sam")
        late_states: list[BreathingState] = []
        late.add_handler(BreathingState, late_states.append)
        async with late:
            await asyncio.wait_for(_until(lambda: bool(late_states)), 5.0)
            assert late_states[0].object_id == orb
        # Stopping puts the orb back at its own size.
        await therapist.send_message(BreathingStop())
        await asyncio.wait_for(_until(lambda: states[-1].object_id is None), 5.0)
        await asyncio.sleep(0.3)
        assert patient.objects[orb].transform[2] == pytest.approx(0.5, abs=0.002)
    finally:
        await patient.close()
        await therapist.close()


async def test_rooms_of_another_type_do_not_run_the_plugin(srv: ServerProcess) -> None:
    room = "ward-3"
    async with member(srv, room, "Dr B", "host") as host:
        await host.send_message(BreathingStart(1, 4.0, 6.0))
        err = await next_error(host)
        assert err.code == "unknown_type" and "not handled in this room" in err.message


async def _until(cond: Any) -> None:
    while not cond():
        await asyncio.sleep(0.02)


def test_room_types_must_name_known_plugins(tmp_path: Path) -> None:
    cfg = ServerConfig(data_dir=str(tmp_path))

    class Quiet(RoomPlugin):
        name = "quiet"

    with pytest.raises(ValueError, match="unknown plugin"):
        create_app(cfg, plugins=[Quiet], room_types=[RoomType("x", ["quiet", "nope"])])


def test_two_plugins_may_not_take_one_message(tmp_path: Path) -> None:
    cfg = ServerConfig(data_dir=str(tmp_path))

    class A(RoomPlugin):
        messages = (BreathingStop,)

    class B(RoomPlugin):
        messages = (BreathingStop,)

    with pytest.raises(ValueError, match="plugins A and B both take 'breathing_stop'"):
        create_app(cfg, plugins=[A, B])


@pytest.fixture(scope="module")
def gate() -> Iterator[ServerProcess]:
    with run_server(app="tests.plugin_app", auth_secret=SECRET, room_linger=0.5) as s:
        yield s


async def test_a_plugin_decides_entry_for_a_rooms_first_entrant(gate: ServerProcess) -> None:
    with pytest.raises(JoinError) as e:
        await member(gate, "gate-1", "intruder").start()
    assert e.value.code == "forbidden"


async def test_a_plugin_may_admit_from_the_lobby_at_once(gate: ServerProcess) -> None:
    async with member(gate, "gate-2", "Dr A", "host") as host:
        s = member(gate, "gate-2", "Pat")
        async with s:  # waits in the lobby and is admitted by the plugin straight away
            assert s.member_id and s.state.value == "joined"
            await _until(lambda: s.member_id in host.members)


def _room(
    tmp_path: Path, plugins: list[Any], name: str = "r", segment: int = 1, table: Any = None
) -> Any:
    from medverse.server.clock import FixedRateClock
    from medverse.server.entities import EntityTable
    from medverse.server.metrics import Traffic
    from medverse.server.plugins import as_server_plugin
    from medverse.server.room import Room, RoomServices

    cfg = ServerConfig(data_dir=str(tmp_path), no_auth=True)
    table = EntityTable() if table is None else table
    services = RoomServices(cfg, table, FixedRateClock(1 / 30), Traffic(), lambda *a, **k: None)
    return Room(name, segment, services, [as_server_plugin(p) for p in plugins])


async def test_a_room_whose_objects_did_not_load_refuses_object_operations(
    tmp_path: Path,
) -> None:
    """Running on with empty state would give new objects the ids of stored ones."""
    from medverse.protocol.objects import ObjectRefused, Spawn
    from medverse.server.auth import anonymous
    from medverse.server.objects import SharedObjects
    from medverse.server.plugins import ServerContext
    from medverse.server.store import SQLiteObjectStore

    class Unreadable(SQLiteObjectStore):
        def load_room(self, room: str) -> Any:
            raise OSError("disk gone")

    service = SharedObjects(Unreadable(str(tmp_path)))
    cfg = ServerConfig(data_dir=str(tmp_path), no_auth=True)
    await service.start(ServerContext(cfg, None, lambda *a, **k: None, lambda code: None))
    try:
        room = _room(tmp_path, [service])
        room.create()  # starts loading the room's objects, which fails
        link = RecordingLink()
        m = room.join(anonymous("a", "r", "a"), 3, link)
        # A request while the room loads waits for the load, then is refused.
        room.handle(m, Spawn(7, "0" * 64, (0.0, 0.0, 0.0), (0.0, 0.0, 0.0, 1.0), 1.0))
        assert not [x for x in link.sent if isinstance(x, ObjectRefused)]
        await _until(lambda: any(isinstance(x, ObjectRefused) for x in link.sent))
        refused = [x for x in link.sent if isinstance(x, ObjectRefused)]
        assert refused[0].req == 7 and refused[0].code == "internal"
    finally:
        await service.stop()


def test_plugins_reach_only_their_own_rooms_rows(tmp_path: Path) -> None:
    import numpy as np

    from medverse.protocol.snapshot import SEGMENT_SHIFT
    from medverse.server.entities import EntityTable
    from medverse.server.plugins import RoomPlugin as Base

    class Grabby(Base):
        pass

    table = EntityTable()
    a = _room(tmp_path, [Grabby], "a", 1, table)
    b = _room(tmp_path, [Grabby], "b", 2, table)
    mine = a.plugins[0].ctx.entities.alloc(2**31 + 1, 2)
    theirs = b.plugins[0].ctx.entities.alloc(2**31 + 1, 2)
    rows = np.array([theirs])
    one = np.ones((1, 2), np.bool_)
    zeros = np.zeros((1, 2, 3), np.int64)
    with pytest.raises(ValueError, match="not this room's"):
        a.plugins[0].ctx.entities.write(rows, one, zeros, np.zeros((1, 2), np.uint8), zeros)
    with pytest.raises(ValueError, match="not this room's"):
        a.plugins[0].ctx.entities.free(theirs)
    a.plugins[0].ctx.entities.write(np.array([mine]), one, zeros, np.zeros((1, 2), np.uint8), zeros)
    segments = table.snapshot().ids.astype(np.int64) >> SEGMENT_SHIFT
    assert sorted(segments.tolist()) == [1, 2]
    a.close()  # rows a plugin left behind go with its room
    segments = table.snapshot().ids.astype(np.int64) >> SEGMENT_SHIFT
    assert segments.tolist() == [2]
