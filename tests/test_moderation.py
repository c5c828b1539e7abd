"""Lobby, host moderation and patient pause on a real server with join tokens."""

from __future__ import annotations

import asyncio
import sqlite3
import tempfile
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from medverse.client_sdk import Joined, JoinError, Left, Pose, Waiting, connect
from medverse.protocol.messages import (
    PROTOCOL_VERSION,
    Error,
    Hello,
    Lobby,
    MemberState,
    Message,
    Moderate,
    Pause,
    RequestUnmute,
    RoomState,
    Welcome,
    encode_message,
    encode_pose,
)
from medverse.protocol.messages import Waiting as WaitingMsg
from medverse.server.audit import DB_FILE
from medverse.server.auth import mint_token

from .conftest import ServerProcess, run_server
from .helpers import RawClient, wait_for

SECRET = "m" * 48


@pytest.fixture(scope="module")
def srv() -> Iterator[ServerProcess]:
    data = tempfile.mkdtemp(prefix="medverse-mod-")
    with run_server(auth_secret=SECRET, data_dir=data, room_linger=0.2) as s:
        s.data_dir = Path(data)  # type: ignore[attr-defined]
        yield s


def tok(room: str, who: str, role: str = "participant") -> str:
    return mint_token(SECRET.encode(), room=room, identity=who, name=who, role=role)


async def raw_join(
    url: str, room: str, who: str, role: str = "participant"
) -> tuple[RawClient, Message]:
    raw = await RawClient.open(url)
    await raw.ws.send_bytes(
        encode_message(Hello(PROTOCOL_VERSION, room, who, 3, None, tok(room, who, role)))
    )
    return raw, await raw.next_control()


async def next_of(raw: RawClient, kind: type, timeout: float = 5.0) -> Message:
    while True:
        m = await raw.next_control(timeout)
        if isinstance(m, kind):
            return m


async def test_only_hosts_moderate(srv: ServerProcess) -> None:
    raw, w = await raw_join(srv.url, "mod0", "patient")
    assert isinstance(w, Welcome)
    await raw.ws.send_bytes(encode_message(Moderate("lock")))
    err = await raw.next_error()
    assert err.code == "forbidden" and not err.fatal
    await raw.close()


async def test_lobby_admit_and_deny(srv: ServerProcess) -> None:
    host, hw = await raw_join(srv.url, "lobby", "therapist", "host")
    assert isinstance(hw, Welcome)
    await host.ws.send_bytes(encode_message(Moderate("lobby")))
    assert await next_of(host, RoomState) == RoomState("lobby")
    p1, waiting = await raw_join(srv.url, "lobby", "patient1")
    assert waiting.TYPE == "waiting"
    lobby = await next_of(host, Lobby)
    assert [m.name for m in lobby.members] == ["patient1"]  # type: ignore[attr-defined]
    # While waiting: nothing of the room, no state frames, no poses accepted.
    await p1.ws.send_bytes(encode_pose(1, [((0, 1, 0), (0, 0, 0, 1)), None, None]))
    assert (await p1.next_error()).code == "forbidden"
    with pytest.raises(TimeoutError):
        await p1.ws.receive(timeout=0.3)
    lid = waiting.lobby_id  # type: ignore[attr-defined]
    await host.ws.send_bytes(encode_message(Moderate("admit", lid)))
    welcome = await next_of(p1, Welcome)
    assert [m.name for m in welcome.members] == ["therapist"]  # type: ignore[attr-defined]
    msg = await p1.ws.receive(timeout=2)  # state now flows
    assert msg.type == aiohttp.WSMsgType.BINARY
    p2, waiting2 = await raw_join(srv.url, "lobby", "patient2")
    await host.ws.send_bytes(
        encode_message(Moderate("deny", waiting2.lobby_id, "not on today's list"))  # type: ignore[attr-defined]
    )
    err = await p2.next_error()
    assert (err.code, err.message, err.fatal) == ("denied", "not on today's list", True)
    # The SDK waits in the lobby and joins when admitted.
    sdk = connect(srv.url, room="lobby", name="x", token=tok("lobby", "patient3"))
    starting = asyncio.ensure_future(sdk.start())
    lobby = await next_of(host, Lobby)
    while [m.name for m in lobby.members] != ["patient3"]:  # type: ignore[attr-defined]
        lobby = await next_of(host, Lobby)
    await host.ws.send_bytes(encode_message(Moderate("admit", lobby.members[0].id)))  # type: ignore[attr-defined]
    await asyncio.wait_for(starting, 5)
    events = sdk.events()
    assert isinstance(await asyncio.wait_for(anext(events), 1), Waiting)
    await sdk.close()
    for r in (host, p1, p2):
        await r.close()


async def test_remove_ban_lock_and_end(srv: ServerProcess) -> None:
    host, _ = await raw_join(srv.url, "mod", "lead", "host")
    async with connect(srv.url, room="mod", name="x", token=tok("mod", "watcher")) as watcher:
        events = watcher.events()
        p, pw = await raw_join(srv.url, "mod", "resident")
        pid = pw.member_id  # type: ignore[attr-defined]
        await host.ws.send_bytes(encode_message(Moderate("remove", pid, "please rejoin later")))
        err = await p.next_error()
        assert (err.code, err.message, err.fatal) == ("removed", "please rejoin later", True)
        ev = await asyncio.wait_for(anext(events), 5)
        while not isinstance(ev, Left):
            ev = await asyncio.wait_for(anext(events), 5)
        assert (ev.member_id, ev.reason) == (pid, "removed")
        await p.close()
        # Removed is not banned: rejoining works; banned is final for this session.
        p, pw = await raw_join(srv.url, "mod", "resident")
        assert isinstance(pw, Welcome)
        await host.ws.send_bytes(encode_message(Moderate("ban", pw.member_id)))
        assert (await p.next_error()).code == "banned"
        await p.close()
        p, refusal = await raw_join(srv.url, "mod", "resident")
        assert isinstance(refusal, Error) and refusal.code == "banned"
        await p.close()
        # Locked: participants are refused, hosts still enter.
        await host.ws.send_bytes(encode_message(Moderate("lock")))
        await next_of(host, RoomState)
        p, refusal = await raw_join(srv.url, "mod", "late")
        assert isinstance(refusal, Error) and refusal.code == "room_locked"
        await p.close()
        co, cw = await raw_join(srv.url, "mod", "co-host", "host")
        assert isinstance(cw, Welcome)
        await host.ws.send_bytes(encode_message(Moderate("unlock")))
        await next_of(host, RoomState)
        p, pw = await raw_join(srv.url, "mod", "late")
        assert isinstance(pw, Welcome)
        # End: everyone is told and closed; nobody gets back in.
        await host.ws.send_bytes(encode_message(Moderate("end", reason="thank you all")))
        for r in (p, co, host):
            err = await r.next_error()
            assert (err.code, err.message, err.fatal) == ("session_ended", "thank you all", True)
        async with asyncio.timeout(5):
            while True:
                ev = await anext(events)
                if isinstance(ev, type(ev)) and getattr(ev, "code", None) == "session_ended":
                    break
        for r in (p, co, host):
            await r.close()
    p, refusal = await raw_join(srv.url, "mod", "someone")
    assert isinstance(refusal, Error) and refusal.code == "session_ended"
    await p.close()
    db = sqlite3.connect(srv.data_dir / DB_FILE)  # type: ignore[attr-defined]
    kinds = {r[0] for r in db.execute("SELECT kind FROM entries WHERE room = 'mod'")}
    db.close()
    assert {"removed", "entry_mode", "session_ended", "join_refused"} <= kinds


async def test_pause_hides_the_member_and_stops_their_stream(srv: ServerProcess) -> None:
    host, _ = await raw_join(srv.url, "pause", "therapist", "host")
    async with (
        connect(srv.url, room="pause", name="x", token=tok("pause", "peer")) as peer,
        connect(srv.url, room="pause", name="x", token=tok("pause", "patient")) as patient,
    ):
        patient.send_pose(head=Pose((0.5, 1.6, 0.0)))
        pid = patient.member_id
        await wait_for(lambda: pid in peer.avatars and peer.avatars[pid].head is not None)
        await patient.send_raw(encode_message(Pause(True)))
        state = await next_of(host, MemberState)
        assert state == MemberState(pid, True, False, False)
        # Stepped out: gone from the others' avatars altogether, not a figure without poses.
        await wait_for(lambda: pid not in peer.avatars, timeout=1.0)
        await asyncio.sleep(0.1)
        frames = patient.frames_received
        patient.send_pose(head=Pose((0.9, 1.6, 0.0)))  # ignored while paused
        await asyncio.sleep(0.4)
        assert patient.frames_received == frames
        assert pid not in peer.avatars
        await patient.send_raw(encode_message(Pause(False)))
        assert await next_of(host, MemberState) == MemberState(pid, False, False, False)
        await wait_for(lambda: patient.frames_received > frames + 5)
        patient.send_pose(head=Pose((0.7, 1.6, 0.0)))
        await wait_for(lambda: pid in peer.avatars and peer.avatars[pid].head is not None)
    await host.close()


async def test_coming_back_from_a_pause_brings_the_room_as_it_is_now(srv: ServerProcess) -> None:
    """The welcome after a pause replaces the member list: who left meanwhile is gone, who
    joined meanwhile has a name, and both are reported as events."""
    room = "pause-fresh"
    patient = connect(srv.url, room, "p", token=tok(room, "patient"), ping_interval=0)
    leaver = connect(srv.url, room, "l", token=tok(room, "leaver"), ping_interval=0)
    async with patient, leaver:
        gone = leaver.member_id
        await wait_for(lambda: gone in patient.members)
        await patient.pause(True)
        await leaver.close()
        async with connect(srv.url, room, "n", token=tok(room, "newcomer")) as newcomer:
            newcomer.send_pose(head=Pose((0.3, 1.6, 0.0)))
            await asyncio.sleep(0.2)
            await patient.pause(False)
            new = newcomer.member_id
            await wait_for(lambda: new in patient.members and gone not in patient.members)
            assert patient.members[new] == "newcomer"
            await wait_for(lambda: new in patient.avatars and patient.avatars[new].head)
            assert patient.avatars[new].name == "newcomer"
            assert gone not in patient.avatars
            seen = [await next_event(patient, Left), await next_event(patient, Joined)]
            assert (seen[0].member_id, seen[1].member_id) == (gone, new)  # type: ignore[attr-defined]


async def test_mute_is_server_side_and_only_hosts_lift_it(srv: ServerProcess) -> None:
    host, _ = await raw_join(srv.url, "mute", "therapist", "host")
    p, pw = await raw_join(srv.url, "mute", "patient")
    pid = pw.member_id  # type: ignore[attr-defined]
    await host.ws.send_bytes(encode_message(Moderate("mute", pid)))
    assert await next_of(p, MemberState) == MemberState(pid, False, True, False)
    assert await next_of(host, MemberState) == MemberState(pid, False, True, False)
    await p.ws.send_bytes(encode_message(RequestUnmute()))
    assert await next_of(host, MemberState) == MemberState(pid, False, True, True)
    await p.ws.send_bytes(encode_message(Moderate("allow_unmute", pid)))  # not a host
    assert (await p.next_error()).code == "forbidden"
    await host.ws.send_bytes(encode_message(Moderate("allow_unmute", pid)))
    assert await next_of(p, MemberState) == MemberState(pid, False, False, False)
    await host.ws.send_bytes(encode_message(Moderate("remove", 9999)))
    assert (await host.next_error()).code == "not_found"
    await p.close()
    await host.close()


async def test_denied_sdk_join_raises(srv: ServerProcess) -> None:
    host, _ = await raw_join(srv.url, "deny-sdk", "therapist", "host")
    await host.ws.send_bytes(encode_message(Moderate("lobby")))
    await next_of(host, RoomState)
    sdk = connect(srv.url, room="deny-sdk", name="x", token=tok("deny-sdk", "p"))
    starting = asyncio.ensure_future(sdk.start())
    lobby = await next_of(host, Lobby)
    while not lobby.members:  # type: ignore[attr-defined]
        lobby = await next_of(host, Lobby)
    await host.ws.send_bytes(encode_message(Moderate("deny", lobby.members[0].id)))  # type: ignore[attr-defined]
    with pytest.raises(JoinError) as e:
        await asyncio.wait_for(starting, 5)
    assert e.value.code == "denied"
    await host.close()


async def next_event(session: object, kind: type, timeout: float = 5.0) -> object:
    async def find() -> object:
        async for ev in session.events():  # type: ignore[attr-defined]
            if isinstance(ev, kind):
                return ev
        raise AssertionError("session closed")

    return await asyncio.wait_for(find(), timeout)


async def test_hosts_change_roles_and_grants(srv: ServerProcess) -> None:
    from medverse.client_sdk import EntryChanged, ErrorEvent, GrantsChanged, RefusedError

    room = "roles"
    host = connect(srv.url, room, "Dr H", token=tok(room, "dr-h", "host"), reconnect=False)
    nurse = connect(srv.url, room, "Nurse", token=tok(room, "nurse"), reconnect=False)
    student = connect(srv.url, room, "Student", token=tok(room, "stu", "observer"))
    async with host, nurse, student:
        # A participant may not change anyone's role, and may not moderate: the calls raise
        # the typed refusal at once.
        with pytest.raises(RefusedError) as refused:
            await nurse.change_role(host.member_id, "participant")
        assert refused.value.code == "forbidden"
        with pytest.raises(RefusedError) as refused:
            await nurse.moderate("lock")
        assert refused.value.code == "forbidden"
        # Promoted to host, the nurse can lock the room; the change reaches her and the host.
        await host.change_role(nurse.member_id, "host")
        ev = await next_event(nurse, GrantsChanged)
        assert ev.role == "host" and "moderate" in ev.grants  # type: ignore[attr-defined]
        assert nurse.role == "host" and nurse.grants is not None and "moderate" in nurse.grants
        ev = await next_event(host, GrantsChanged)
        assert ev.member_id == nurse.member_id  # type: ignore[attr-defined]
        await nurse.moderate("lock")
        assert (await next_event(host, EntryChanged)).entry == "locked"  # type: ignore[attr-defined]
        await nurse.moderate("unlock")
        # Taking one grant away: back to no moderation.
        await host.change_role(nurse.member_id, grant="moderate", allow=False)
        ev = await next_event(nurse, GrantsChanged)
        assert "moderate" not in ev.grants and "annotate" in ev.grants  # type: ignore[attr-defined]
        with pytest.raises(RefusedError) as refused:
            await nurse.moderate("lock")
        assert refused.value.code == "forbidden"
        # Hidden-ness is fixed at join; malformed and unknown requests are typed errors.
        for kw, code in (
            ({"member_id": nurse.member_id, "grant": "hidden", "allow": True}, "forbidden"),
            ({"member_id": nurse.member_id, "role": "observer"}, "forbidden"),
            ({"member_id": student.member_id, "role": "host"}, "not_found"),  # hidden
            ({"member_id": nurse.member_id, "role": "host", "grant": "annotate"}, "bad_field"),
            ({"member_id": nurse.member_id, "grant": "annotate"}, "bad_field"),
            ({"member_id": 9999, "role": "host"}, "not_found"),
        ):
            with pytest.raises(RefusedError) as refused:
                await host.change_role(**kw)  # type: ignore[arg-type]
            assert refused.value.code == code, kw
        for bad in (
            {"t": "change_role", "member_id": nurse.member_id, "role": "admin"},
            {"t": "change_role", "member_id": nurse.member_id, "grant": "root", "allow": True},
            {"t": "change_role", "member_id": -1, "role": "host"},
            {"t": "change_role", "role": "host"},
        ):
            import msgpack

            await host.send_raw(b"\x01" + msgpack.packb(bad))
            err = await next_event(host, ErrorEvent)
            assert err.code in ("out_of_range", "bad_field"), bad  # type: ignore[attr-defined]
    db = sqlite3.connect(f"file:{srv.data_dir / DB_FILE}?mode=ro", uri=True)  # type: ignore[attr-defined]
    try:
        rows = db.execute("SELECT COUNT(*) FROM entries WHERE kind = 'role_changed'").fetchone()
    finally:
        db.close()
    assert rows[0] == 2


async def test_a_host_who_stepped_out_still_sees_the_lobby(srv: ServerProcess) -> None:
    host, hw = await raw_join(srv.url, "lobby-away", "therapist", "host")
    assert isinstance(hw, Welcome)
    await host.ws.send_bytes(encode_message(Moderate("lobby")))
    await next_of(host, RoomState)
    await host.ws.send_bytes(encode_message(Pause(True)))
    patient, w = await raw_join(srv.url, "lobby-away", "patient")
    assert isinstance(w, WaitingMsg)
    lobby = await next_of(host, Lobby)
    assert [m.name for m in lobby.members] == ["patient"]  # type: ignore[attr-defined]
    await patient.close()
    await host.close()


async def test_admitting_into_a_full_room_turns_the_waiter_away_and_tells_the_host() -> None:
    with run_server(auth_secret=SECRET, max_members_per_room=1) as s:
        host, hw = await raw_join(s.url, "full", "therapist", "host")
        assert isinstance(hw, Welcome)
        await host.ws.send_bytes(encode_message(Moderate("lobby")))
        await next_of(host, RoomState)
        patient, w = await raw_join(s.url, "full", "patient")
        assert isinstance(w, WaitingMsg)
        await host.ws.send_bytes(encode_message(Moderate("admit", w.lobby_id)))
        err = await patient.next_error()
        assert (err.code, err.fatal) == ("room_full", True)
        closing = await patient.ws.receive(timeout=5)
        assert closing.type == aiohttp.WSMsgType.CLOSE and closing.data == 1008
        err = await host.next_error()
        assert (err.code, err.fatal) == ("room_full", False)
        await patient.close()
        await host.close()


async def test_a_member_that_resumes_while_stepped_out_is_back(srv: ServerProcess) -> None:
    """A new connection starts in the room (protocol state ``joined``): resuming ends a pause,
    so the member is seen and hears again, and may pause again."""
    room = "resume-paused"
    a = connect(srv.url, room=room, name="a", token=tok(room, "a"), ping_interval=0)
    b = connect(srv.url, room=room, name="b", token=tok(room, "b"), ping_interval=0)
    async with a, b:
        a.send_pose(head=Pose((1.0, 1.6, 0.0)))
        await wait_for(lambda: a.member_id in b.avatars and b.avatars[a.member_id].head)
        await a.pause(True)
        await wait_for(
            lambda: b.avatars.get(a.member_id) is None or not b.avatars[a.member_id].head
        )
        assert a._ws is not None
        await a._ws.close()  # the connection drops; the SDK resumes the same member
        await wait_for(lambda: a.state.value == "joined" and a._conn is not None, timeout=10)
        a.send_pose(head=Pose((2.0, 1.6, 0.0)))
        await wait_for(
            lambda: (
                (av := b.avatars.get(a.member_id)) is not None
                and av.head is not None
                and av.head.position[0] == pytest.approx(2.0)
            ),
            timeout=10,
        )
        await a.pause(True)  # and it can step out again
        await wait_for(lambda: a.member_id not in b.avatars)


async def test_fatal_endings_stop_the_sdk_with_the_hosts_words(srv: ServerProcess) -> None:
    """Removed, banned or ended: the SDK stops with a typed Closed carrying the host's words,
    and does not try to get back in (no join_refused in the audit log after the end)."""
    from medverse.client_sdk import Closed, Reconnecting

    room = "endings"
    host, _ = await raw_join(srv.url, room, "lead", "host")
    removed = connect(srv.url, room, "r", token=tok(room, "to-remove"), ping_interval=0)
    banned = connect(srv.url, room, "b", token=tok(room, "to-ban"), ping_interval=0)
    stayer = connect(srv.url, room, "s", token=tok(room, "stayer"), ping_interval=0)
    await removed.start()
    await banned.start()
    await stayer.start()
    try:
        await host.ws.send_bytes(encode_message(Moderate("remove", removed.member_id, "be kind")))
        await host.ws.send_bytes(encode_message(Moderate("ban", banned.member_id, "threats")))
        await host.ws.send_bytes(encode_message(Moderate("end", reason="thank you all")))
        ends = [await asyncio.wait_for(s.wait_closed(), 5) for s in (removed, banned, stayer)]
        assert [(c.code, c.message) for c in ends] == [
            ("removed", "be kind"),
            ("banned", "threats"),
            ("session_ended", "thank you all"),
        ]
        await asyncio.sleep(0.5)  # time enough for a reconnection to have been tried
        for s in (removed, banned, stayer):
            seen = []
            async for ev in s.events():
                seen.append(ev)
            assert not any(isinstance(ev, Reconnecting) for ev in seen), seen
            assert isinstance(seen[-1], Closed) and seen[-1] == s.closed_reason
    finally:
        for s in (removed, banned, stayer):
            await s.close()
        await host.close()
    db = sqlite3.connect(srv.data_dir / DB_FILE)  # type: ignore[attr-defined]
    refused = db.execute(
        "SELECT actor FROM entries WHERE room = ? AND kind = 'join_refused'", (room,)
    ).fetchall()
    db.close()
    assert refused == []


async def test_an_app_sees_the_lobby_and_keeps_its_own_time_limit(srv: ServerProcess) -> None:
    from medverse.client_sdk import LobbyChanged

    room = "lobby-wait"
    async with connect(srv.url, room, token=tok(room, "lead", "host"), ping_interval=0) as host:
        await host.moderate("lobby")
        seen: list[Waiting] = []
        patient = connect(srv.url, room, token=tok(room, "patient"), on_waiting=seen.append)
        starting = asyncio.ensure_future(patient.start())
        await wait_for(lambda: bool(seen))
        assert patient.state.value == "lobby" and patient.waiting == seen[0]
        # The application's own time limit: cancelling start() leaves the lobby.
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(starting, 0.3)
        async for ev in host.events():
            if isinstance(ev, LobbyChanged) and not ev.entries:
                break
        await patient.close()
        # Or the SDK's: lobby_timeout.
        late = connect(srv.url, room, token=tok(room, "late"), lobby_timeout=0.3)
        with pytest.raises(TimeoutError, match="lobby"):
            await late.start()
        await late.close()
