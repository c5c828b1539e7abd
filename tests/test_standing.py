"""Moderation belongs to the identity, not the member object: a removal ends that token's
session for good, a ban bars the identity from the room name beyond the session (for a time or
until lifted, stored and audited), and mutes and grant changes survive leaving and rejoining."""

from __future__ import annotations

import asyncio
import sqlite3
import tempfile
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from medverse.client_sdk import AssetClient, AssetError, ObjectError, connect
from medverse.protocol.messages import (
    PROTOCOL_VERSION,
    Bans,
    ChangeRole,
    Error,
    Grants,
    Hello,
    Leave,
    MemberState,
    Message,
    Moderate,
    Waiting,
    Welcome,
    encode_message,
)
from medverse.server.audit import DB_FILE
from medverse.server.auth import mint_admin_token, mint_token
from medverse.server.bans import DB_FILE as BANS_FILE

from .backends import Backend
from .conftest import ServerProcess, run_server
from .helpers import RawClient, wait_for

SECRET = "s" * 48


@pytest.fixture(scope="module")
def data() -> Path:
    return Path(tempfile.mkdtemp(prefix="medverse-standing-"))


@pytest.fixture(scope="module")
def srv(data: Path) -> Iterator[ServerProcess]:
    with run_server(auth_secret=SECRET, data_dir=data, room_linger=0.2) as s:
        yield s


def tok(room: str, who: str, role: str = "participant") -> str:
    return mint_token(SECRET.encode(), room=room, identity=who, name=who, role=role)


async def hello(url: str, room: str, token: str) -> tuple[RawClient, Message]:
    raw = await RawClient.open(url)
    await raw.ws.send_bytes(encode_message(Hello(PROTOCOL_VERSION, room, "x", 3, None, token)))
    return raw, await raw.next_control()


async def next_of(raw: RawClient, kind: type, timeout: float = 5.0) -> Message:
    while True:
        m = await raw.next_control(timeout)
        if isinstance(m, kind):
            return m


async def test_a_removed_member_stays_out_until_a_new_token(srv: ServerProcess) -> None:
    room = "removal"
    host, _ = await hello(srv.url, room, tok(room, "lead", "host"))
    token = tok(room, "patient")
    patient = connect(srv.url, room, token=token, ping_interval=0)
    await patient.start()
    try:
        await host.ws.send_bytes(encode_message(Moderate("remove", patient.member_id, "calm")))
        closed = await asyncio.wait_for(patient.wait_closed(), 5)
        assert (closed.code, closed.message) == ("removed", "calm")
        # The same token is refused for the rest of the session, lobby or not.
        for entry in ("open", "lobby"):
            await host.ws.send_bytes(encode_message(Moderate(entry)))
            again, answer = await hello(srv.url, room, token)
            assert isinstance(answer, Error) and (answer.code, answer.fatal) == ("removed", True)
            assert "new invitation" in answer.message
            await again.close()
        # Over HTTP too.
        client = AssetClient(srv.http, room, token)
        with pytest.raises(AssetError) as e:
            await client.list()
        assert e.value.code == "removed"
        await client.close()
        # A new token from the organiser is the way back (through the lobby, as anyone).
        back, answer = await hello(srv.url, room, tok(room, "patient"))
        assert isinstance(answer, Waiting)
        await back.close()
    finally:
        await patient.close()
        await host.close()


async def test_a_ban_outlives_the_session_until_it_expires_or_is_lifted(
    srv: ServerProcess, data: Path
) -> None:
    room = "banned-room"
    host, _ = await hello(srv.url, room, tok(room, "lead", "host"))
    p1, w1 = await hello(srv.url, room, tok(room, "forever"))
    p2, w2 = await hello(srv.url, room, tok(room, "briefly"))
    assert isinstance(w1, Welcome) and isinstance(w2, Welcome)
    await host.ws.send_bytes(encode_message(Moderate("ban", w1.member_id, "threats")))
    await host.ws.send_bytes(encode_message(Moderate("ban", w2.member_id, "noise", 2)))
    err = await p1.next_error()
    assert (err.code, err.message, err.fatal) == ("banned", "threats", True)
    bans = await next_of(host, Bans)
    while len(bans.bans) < 2:  # type: ignore[attr-defined]
        bans = await next_of(host, Bans)
    forever = next(b for b in bans.bans if b.name == "forever")  # type: ignore[attr-defined]
    briefly = next(b for b in bans.bans if b.name == "briefly")  # type: ignore[attr-defined]
    assert forever.until == 0 and forever.reason == "threats" and briefly.until > 0
    await host.ws.send_bytes(encode_message(Leave()))
    for raw in (host, p1, p2):
        await raw.close()
    await wait_for(lambda: not _room_open(srv, room), timeout=5)  # the session is over
    # A new session of the same room name: the bans hold, on every channel.
    again, answer = await hello(srv.url, room, tok(room, "forever"))
    assert isinstance(answer, Error) and answer.code == "banned"
    assert "until a host lifts the ban" in answer.message and "threats" in answer.message
    await again.close()
    async with aiohttp.ClientSession() as http:
        headers = {"Authorization": f"Bearer {tok(room, 'forever')}"}
        async with http.get(f"{srv.http}/rooms/{room}/assets", headers=headers) as r:
            assert r.status == 403 and (await r.json())["error"]["code"] == "banned"
    await asyncio.sleep(2.2)  # the timed ban has expired
    back, answer = await hello(srv.url, room, tok(room, "briefly"))
    assert isinstance(answer, Welcome)
    await back.close()
    # A host lifts the other one.
    host, _ = await hello(srv.url, room, tok(room, "lead", "host"))
    listed = await next_of(host, Bans)
    assert [b.name for b in listed.bans] == ["forever"]  # type: ignore[attr-defined]
    await host.ws.send_bytes(encode_message(Moderate("unban", forever.id)))
    assert (await next_of(host, Bans)).bans == ()  # type: ignore[attr-defined]
    back, answer = await hello(srv.url, room, tok(room, "forever"))
    assert isinstance(answer, Welcome)
    await back.close()
    await host.close()
    # Stored, and in the audit log.
    db = sqlite3.connect(data / BANS_FILE)
    rows = db.execute("SELECT subject, lifted IS NOT NULL FROM bans WHERE room = ?", (room,))
    assert sorted(rows.fetchall()) == [("briefly", 0), ("forever", 1)]
    db.close()
    db = sqlite3.connect(data / DB_FILE)
    kinds = [r[0] for r in db.execute("SELECT kind FROM entries WHERE room = ?", (room,))]
    db.close()
    assert kinds.count("banned") == 2 and kinds.count("unbanned") == 1


def _room_open(srv: ServerProcess, room: str) -> bool:
    import json
    import urllib.request

    admin = mint_admin_token(SECRET.encode(), identity="ops")
    req = urllib.request.Request(
        f"{srv.http}/admin/rooms", headers={"Authorization": f"Bearer {admin}"}
    )
    with urllib.request.urlopen(req) as r:
        return any(entry["room"] == room for entry in json.load(r)["rooms"])


async def test_bans_are_stored_across_restarts(backend: Backend) -> None:
    data = Path(tempfile.mkdtemp(prefix="medverse-bans-"))
    room = "durable"
    with run_server(auth_secret=SECRET, data_dir=data, **backend.settings()) as s:
        host, _ = await hello(s.url, room, tok(room, "lead", "host"))
        p, w = await hello(s.url, room, tok(room, "troll"))
        assert isinstance(w, Welcome)
        await host.ws.send_bytes(encode_message(Moderate("ban", w.member_id)))
        assert (await p.next_error()).code == "banned"
        await p.close()
        await host.close()
    with run_server(auth_secret=SECRET, data_dir=data, **backend.settings()) as s:
        p, answer = await hello(s.url, room, tok(room, "troll"))
        assert isinstance(answer, Error) and answer.code == "banned"
        await p.close()


async def test_mutes_and_grant_changes_survive_leaving_and_rejoining(srv: ServerProcess) -> None:
    room = "standing"
    host, _ = await hello(srv.url, room, tok(room, "lead", "host"))
    token = tok(room, "patient")
    p, w = await hello(srv.url, room, token)
    assert isinstance(w, Welcome)
    await host.ws.send_bytes(encode_message(Moderate("mute", w.member_id)))
    await host.ws.send_bytes(encode_message(ChangeRole(w.member_id, None, "annotate", False)))
    await next_of(p, Grants)
    await p.close()  # leaves; rejoins with the same token as a new member
    async with connect(srv.url, room, token=token, ping_interval=0) as again:
        assert again.member_id != w.member_id
        await wait_for(lambda: again.grants is not None and "annotate" not in again.grants)
        state = await next_of(host, MemberState)
        while state.member_id != again.member_id:  # type: ignore[attr-defined]
            state = await next_of(host, MemberState)
        assert state.muted  # type: ignore[attr-defined]
        with pytest.raises(ObjectError) as e:
            await again.annotate(1, "pin", [(0.0, 0.0, 0.0)])
        assert e.value.code == "forbidden"
    await host.close()


async def test_hosts_tell_apart_two_waiting_people_with_one_name(srv: ServerProcess) -> None:
    from medverse.client_sdk import LobbyChanged

    room = "same-names"
    async with connect(srv.url, room, token=tok(room, "lead", "host"), ping_interval=0) as host:
        await host.moderate("lobby")
        waiters = []
        for subject in ("sam-1", "sam-2"):
            raw = await RawClient.open(srv.url)
            t = mint_token(SECRET.encode(), room=room, identity=subject, name="Sam")
            await raw.ws.send_bytes(encode_message(Hello(PROTOCOL_VERSION, room, "x", 3, None, t)))
            assert isinstance(await raw.next_control(), Waiting)
            waiters.append(raw)
        entries: tuple = ()
        async for ev in host.events():
            if isinstance(ev, LobbyChanged) and len(ev.entries) == 2:
                entries = ev.entries
                break
        assert [(e.name, e.identity) for e in entries] == [("Sam", "sam-1"), ("Sam", "sam-2")]
        for raw in waiters:
            await raw.close()


async def test_removals_and_mutes_hold_across_a_restart_and_end_with_the_session() -> None:
    """One server (SQLite): a host mutes a patient and removes a troll; the server restarts
    within the session: the troll's token is still refused and the patient comes back muted.
    Once the room has closed after staying empty, a new session starts clean."""
    room = "restarted"
    data = Path(tempfile.mkdtemp(prefix="medverse-standing-restart-"))
    troll_token, patient_token = tok(room, "troll"), tok(room, "patient")
    with run_server(auth_secret=SECRET, data_dir=data, room_linger=0.3) as srv:
        host, _ = await hello(srv.url, room, tok(room, "lead", "host"))
        patient, pw = await hello(srv.url, room, patient_token)
        troll, tw = await hello(srv.url, room, troll_token)
        assert isinstance(pw, Welcome) and isinstance(tw, Welcome)
        await host.ws.send_bytes(encode_message(Moderate("mute", pw.member_id)))
        assert (await next_of(host, MemberState)).muted is True  # type: ignore[attr-defined]
        await host.ws.send_bytes(encode_message(Moderate("remove", tw.member_id, "noise")))
        assert (await troll.next_error()).code == "removed"
        for raw in (host, patient, troll):
            await raw.close()
    with run_server(auth_secret=SECRET, data_dir=data, room_linger=0.3) as srv:
        again, answer = await hello(srv.url, room, troll_token)
        assert isinstance(answer, Error) and answer.code == "removed", answer
        await again.close()
        patient, pw = await hello(srv.url, room, patient_token)
        assert isinstance(pw, Welcome)
        state = await next_of(patient, MemberState)
        assert (state.member_id, state.muted) == (pw.member_id, True)  # type: ignore[attr-defined]
        await patient.ws.send_bytes(encode_message(Leave()))
        await patient.close()
        await wait_for(lambda: not _room_open(srv, room), timeout=5)  # the session is over
        fresh, answer = await hello(srv.url, room, troll_token)
        assert isinstance(answer, Welcome), answer
        await fresh.close()
        patient, pw = await hello(srv.url, room, patient_token)
        assert isinstance(pw, Welcome)
        with pytest.raises(TimeoutError):  # no mute any more
            await next_of(patient, MemberState, timeout=0.5)
        await patient.close()
