"""Consent to a versioned text and pseudonymous rooms, on a real server."""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from medverse.client_sdk import JoinError, Pose, connect
from medverse.protocol.messages import (
    PROTOCOL_VERSION,
    Consent,
    ConsentRequired,
    Hello,
    Welcome,
    encode_message,
    encode_pose,
)
from medverse.server.audit import DB_FILE
from medverse.server.auth import mint_token

from .conftest import ServerProcess, run_server
from .helpers import RawClient, wait_for

SECRET = "c" * 48
TEXT = "This group session is recorded in an audit log of who joined and when.\n"
VERSION = hashlib.sha256(TEXT.encode()).hexdigest()


@pytest.fixture(scope="module")
def srv() -> Iterator[ServerProcess]:
    data = Path(tempfile.mkdtemp(prefix="medverse-consent-"))
    (data / "consent.txt").write_text(TEXT)
    with run_server(
        auth_secret=SECRET,
        data_dir=data,
        consent_file=data / "consent.txt",
        consent_rooms="therapy-.*",
        pseudonymous_rooms="therapy-.*",
    ) as s:
        s.data_dir = data  # type: ignore[attr-defined]
        yield s


def tok(room: str, who: str, pseudonym: str | None = None) -> str:
    return mint_token(
        SECRET.encode(), room=room, identity=who, name=f"Real {who}", pseudonym=pseudonym
    )


async def test_nothing_flows_before_consent(srv: ServerProcess) -> None:
    async with connect(
        srv.url,
        room="therapy-1",
        name="x",
        token=tok("therapy-1", "a", "Blue"),
        consent=lambda v, t: v == VERSION and t == TEXT,
    ) as a:
        a.send_pose(head=Pose((0.0, 1.6, 0.0)))
        raw = await RawClient.open(srv.url)
        await raw.ws.send_bytes(
            encode_message(
                Hello(PROTOCOL_VERSION, "therapy-1", "x", 3, None, tok("therapy-1", "b"))
            )
        )
        ask = await raw.next_control()
        assert ask == ConsentRequired(VERSION, TEXT)
        # Before answering: no state, no members, poses refused.
        await raw.ws.send_bytes(encode_pose(1, [((0, 1, 0), (0, 0, 0, 1)), None, None]))
        assert (await raw.next_error()).code == "consent_required"
        with pytest.raises(TimeoutError):
            await raw.ws.receive(timeout=0.3)
        assert a.members == {}
        await raw.ws.send_bytes(encode_message(Consent(VERSION, True)))
        welcome = await raw.next_control()
        assert isinstance(welcome, Welcome)
        # Pseudonymous room: others see only the pseudonym (or a generated one).
        assert [m.name for m in welcome.members] == ["Blue"]
        await wait_for(
            lambda: a.members.get(welcome.member_id) == f"Participant {welcome.member_id}"
        )
        await raw.close()


async def test_declining_or_an_old_version_refuses(srv: ServerProcess) -> None:
    for answer in (Consent(VERSION, False), Consent("0" * 64, True)):
        raw = await RawClient.open(srv.url)
        await raw.ws.send_bytes(
            encode_message(
                Hello(PROTOCOL_VERSION, "therapy-2", "x", 3, None, tok("therapy-2", "c"))
            )
        )
        assert isinstance(await raw.next_control(), ConsentRequired)
        await raw.ws.send_bytes(encode_message(answer))
        err = await raw.next_error()
        assert (err.code, err.fatal) == ("consent_required", True)
        await raw.close()
    with pytest.raises(JoinError) as e:  # the SDK without a consent callback says so
        async with connect(srv.url, room="therapy-2", name="x", token=tok("therapy-2", "d")):
            pass
    assert e.value.code == "consent_required" and "consent=" in e.value.message
    assert "declined" not in e.value.message
    # Rooms outside consent_rooms and pseudonymous_rooms: straight in, real names.
    async with (
        connect(srv.url, room="ward", name="x", token=tok("ward", "e")) as s,
        connect(srv.url, room="ward", name="x", token=tok("ward", "f")) as t,
    ):
        assert t.members == {s.member_id: "Real e"}


async def test_a_missing_consent_callback_is_not_audited_as_a_decline(srv: ServerProcess) -> None:
    """An app that gave no ``consent=`` callback asked nobody: the SDK closes without an
    answer and raises its typed error, and the audit log shows no decline for that person."""
    room = "therapy-4"
    with pytest.raises(JoinError) as e:
        async with connect(srv.url, room=room, token=tok(room, "nobody-asked"), reconnect=False):
            pass
    assert e.value.code == "consent_required" and "consent=" in e.value.message
    # A real decline after it: once that one is in the log, an earlier one would be too.
    raw = await RawClient.open(srv.url)
    await raw.ws.send_bytes(
        encode_message(Hello(PROTOCOL_VERSION, room, "x", 3, None, tok(room, "said-no")))
    )
    assert isinstance(await raw.next_control(), ConsentRequired)
    await raw.ws.send_bytes(encode_message(Consent(VERSION, False)))
    assert (await raw.next_error()).code == "consent_required"
    await raw.close()

    def declined() -> list[str]:
        db = sqlite3.connect(srv.data_dir / DB_FILE)  # type: ignore[attr-defined]
        try:
            rows = db.execute(
                "SELECT actor FROM entries WHERE room = ? AND kind = 'consent_declined'", (room,)
            ).fetchall()
        finally:
            db.close()
        return [r[0] for r in rows]

    await wait_for(lambda: "said-no" in declined())
    assert declined() == ["said-no"]


async def test_withdrawing_consent_leaves_the_room_and_is_audited(srv: ServerProcess) -> None:
    yes = lambda v, t: True  # noqa: E731
    async with connect(
        srv.url, room="therapy-3", name="x", token=tok("therapy-3", "g"), consent=yes
    ) as g:
        events = g.events()
        h = connect(srv.url, room="therapy-3", name="x", token=tok("therapy-3", "h"), consent=yes)
        await h.start()
        hid = h.member_id
        await h.withdraw_consent()
        while True:
            ev = await asyncio.wait_for(anext(events), 5)
            if getattr(ev, "type", "") == "left":
                break
        assert (ev.member_id, ev.reason) == (hid, "consent withdrawn")  # type: ignore[union-attr]
        # The withdrawal has its own ending, and the SDK does not come back.
        assert h.closed_reason is not None and h.closed_reason.code == "consent_withdrawn"
        await asyncio.sleep(0.3)
        assert hid not in g.members and len(g.members) == 0
        await h.close()
    db = sqlite3.connect(srv.data_dir / DB_FILE)  # type: ignore[attr-defined]
    rows = db.execute(
        "SELECT kind, actor, detail FROM entries WHERE room = 'therapy-3' AND kind LIKE 'consent%'"
    ).fetchall()
    db.close()
    kinds = [(k, a) for k, a, _ in rows]
    assert ("consent", "g") in kinds and ("consent", "h") in kinds
    assert ("consent_withdrawn", "h") in kinds
    assert all(VERSION in d for _, _, d in rows)


async def test_the_lobby_shows_hosts_pseudonyms_in_pseudonymous_rooms(srv: ServerProcess) -> None:
    from medverse.client_sdk import LobbyChanged

    room = "therapy-lobby"
    yes = lambda v, t: True  # noqa: E731
    host_token = mint_token(SECRET.encode(), room=room, identity="dr", role="host")
    async with connect(srv.url, room, token=host_token, consent=yes, ping_interval=0) as host:
        await host.moderate("lobby")
        waiting = [
            connect(srv.url, room, token=tok(room, "alex", "Blue fox"), consent=yes),
            connect(srv.url, room, token=tok(room, "alex-2"), consent=yes),
        ]
        starts = [asyncio.ensure_future(w.start()) for w in waiting]
        entries: tuple = ()
        async for ev in host.events():
            if isinstance(ev, LobbyChanged) and len(ev.entries) == 2:
                entries = ev.entries
                break
        names = [e.name for e in entries]
        handles = [e.identity for e in entries]
        assert "Blue fox" in names and not any("Real" in n or "alex" in n for n in names)
        assert "Blue fox" in handles and len(set(handles)) == 2
        assert not any("alex" in str(h) for h in handles)
        for task in starts:
            task.cancel()
        for w in waiting:
            await w.close()
