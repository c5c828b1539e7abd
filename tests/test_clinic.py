"""A virtual clinic on a real server (``--clinic examples/clinic.toml``): patients wait, are
called into a consultation room and sent back on their own connection, the front desk moves
them, refusals are typed, avatars and audio follow, the audit log records who moved whom."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import msgpack
import pytest

from benchmarks.dicomgen import synthetic_ct
from medverse.client_sdk import (
    Arrived,
    Called,
    LevelMeter,
    Moved,
    MoveDeclined,
    Pose,
    QueueChanged,
    RefusedError,
    Session,
    Waiting,
    connect,
    tone_track,
)
from medverse.client_sdk.assets import AssetError
from medverse.client_sdk.images import ImageError
from medverse.client_sdk.types import Event, LobbyChanged
from medverse.protocol.clinic import CallNext, Transfer
from medverse.protocol.messages import (
    PROTOCOL_VERSION,
    Consent,
    ConsentRequired,
    Hello,
    RequestRefused,
    Welcome,
    encode_message,
)
from medverse.server.audit import DB_FILE
from medverse.server.auth import mint_token
from medverse.server.clinicdef import ClinicError, load_clinic
from medverse.server.roomaccess import RoomAccess, derive_key

from .conftest import ServerProcess, free_port, run_server
from .helpers import RawClient
from .models import triangle_glb
from .services import redis_available, redis_server

SECRET = "k" * 48
CLINIC_FILE = Path(__file__).resolve().parent.parent / "examples" / "clinic.toml"
CLINIC = load_clinic(CLINIC_FILE)
TEXTS = {t.type: t.consent_text for t in CLINIC.types}
MAX_MEMBERS = 4


@pytest.fixture(scope="module")
def srv() -> Iterator[ServerProcess]:
    data = tempfile.mkdtemp(prefix="medverse-clinic-")
    with run_server(
        auth_secret=SECRET,
        data_dir=data,
        clinic=CLINIC_FILE,
        room_linger=0.5,
        max_members_per_room=MAX_MEMBERS,
        rtc_host_addresses="127.0.0.1",
    ) as s:
        s.data_dir = Path(data)  # type: ignore[attr-defined]
        yield s


def tok(room: str, who: str, role: str = "participant", pseudonym: str | None = None) -> str:
    return mint_token(
        SECRET.encode(), room=room, identity=who, name=who.upper(), role=role, pseudonym=pseudonym
    )


class Consents:
    """A consent callback that accepts and remembers every text it was shown."""

    def __init__(self) -> None:
        self.texts: list[str] = []

    def __call__(self, version: str, text: str) -> bool:
        self.texts.append(text)
        return True


@contextlib.asynccontextmanager
async def member(
    srv: ServerProcess,
    room: str,
    who: str,
    role: str = "participant",
    consent: Consents | None = None,
    pseudonym: str | None = None,
) -> AsyncIterator[Session]:
    async with connect(
        srv.url,
        room=room,
        name=who.upper(),
        token=tok(room, who, role, pseudonym),
        consent=consent if consent is not None else Consents(),
        ping_interval=0,
    ) as s:
        yield s


async def expect(
    s: Session, kind: str, where: Callable[[Any], bool] = lambda e: True, timeout: float = 15.0
) -> Any:
    """The next event of type ``kind`` satisfying ``where`` (earlier events are dropped)."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"no {kind} event in {timeout} s")
        try:
            ev: Event | None = await asyncio.wait_for(s._events.get(), left)
        except TimeoutError:
            raise AssertionError(f"no {kind} event in {timeout} s") from None
        if ev is None:
            raise AssertionError(f"the session ended waiting for {kind}: {s.closed_reason}")
        if ev.type == kind and where(ev):
            return ev


async def until(cond: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out: {what}")
        await asyncio.sleep(0.02)


def audit_rows(srv: ServerProcess, kind: str) -> list[tuple[str, str, str, dict[str, Any]]]:
    db = sqlite3.connect(srv.data_dir / DB_FILE)  # type: ignore[attr-defined]
    try:
        rows = db.execute(
            "SELECT room, actor, subject, detail FROM entries WHERE kind = ? ORDER BY seq", (kind,)
        ).fetchall()
    finally:
        db.close()
    return [(r, a, s, json.loads(d) if d else {}) for r, a, s, d in rows]


def entity_ids(s: Session) -> set[int]:
    return {int(i) for i in s.snapshot.ids}


# --------------------------------------------------------------------------- the journey


async def test_scripted_consultation(srv: ServerProcess) -> None:
    """A patient waits (position and estimate live), is called into a consultation room,
    consents to that room's own text, is seen there within a tick, and is sent back."""
    ann, ben = Consents(), Consents()
    async with (
        member(srv, "waiting", "ann", consent=ann, pseudonym="Heron") as pa,
        member(srv, "waiting", "frontdesk", role="receptionist") as desk,
    ):
        first = await expect(pa, "queue")
        assert isinstance(first, QueueChanged)
        assert (first.position, first.waiting, first.message) == (1, 1, CLINIC.message)
        assert first.estimate == 12 * 60  # the clinic's default until a consultation is measured
        assert ann.texts == [TEXTS["waiting"]]
        # Pseudonymous: staff without a pseudonym are "Participant N" here too.
        assert pa.members == {desk.member_id: f"Participant {desk.member_id}"}
        async with member(srv, "waiting", "ben", consent=ben) as pb:
            # Ann is still first; Ben is second, with twice the wait.
            q = await expect(pb, "queue")
            assert (q.position, q.waiting, q.estimate) == (2, 2, 2 * 12 * 60)
            assert (await expect(pa, "queue")).waiting == 2
            # The waiting room is muted for patients, and pseudonymous.
            assert desk.members[pa.member_id] == "Heron"

            doc = Consents()
            async with member(srv, "consult-1", "drlee", role="host", consent=doc) as dr:
                assert doc.texts == [TEXTS["consultation"]]
                pa.send_pose(head=Pose((0.5, 1.6, 0.0)))
                await until(lambda: pa.member_id in entity_ids(desk), what="ann seen in waiting")
                wait_id = pa.member_id

                seen: list[tuple[int, set[int]]] = []
                dr.on_state = lambda now, snap: seen.append(
                    (dr.tick or 0, {int(i) for i in snap.ids})
                )
                ann_ticks: list[int] = []
                pa.on_state = lambda now, snap: (
                    ann_ticks.append(pa.tick or 0) if (pa.room == "consult-1") else None
                )
                desk_seen: list[tuple[str, set[int]]] = []
                desk.on_state = lambda now, snap: desk_seen.append(
                    ("state", {int(i) for i in snap.ids})
                )
                await dr.call_next()

                called = await expect(pa, "called")
                assert isinstance(called, Called)
                assert (called.room, called.by) == ("consult-1", "DRLEE")
                moved = await expect(pa, "moved")
                assert isinstance(moved, Moved)
                assert (moved.room, moved.by, moved.reason) == ("consult-1", "DRLEE", "called")
                arrived = await expect(pa, "arrived")
                assert isinstance(arrived, Arrived)
                # The consultation room asked for consent to its own text; the clinician
                # called Ann in, so its lobby did not hold her.
                assert ann.texts == [TEXTS["waiting"], TEXTS["consultation"]]
                assert (pa.room, arrived.room) == ("consult-1", "consult-1")
                assert arrived.members == {dr.member_id: "DRLEE"}
                assert pa.queue is None

                # Ben moves up, live.
                q = await expect(pb, "queue", lambda e: e.position == 1)
                assert q.waiting == 1

                # The avatar left the waiting room: the desk's first state after "left" lacks
                # it; and it is in the consultation room's state within a tick of the welcome.
                left = await expect(desk, "left", lambda e: e.member_id == wait_id)
                assert left.reason == "moved"
                n = len(desk_seen)
                await until(lambda: len(desk_seen) > n, what="a state after left")
                assert wait_id not in desk_seen[n][1]
                pa.send_pose(head=Pose((0.0, 1.6, -1.0)))
                await until(
                    lambda: any(pa.member_id in ids for _, ids in seen), what="ann in consult-1"
                )
                # Ann's avatar is in the clinician's state from the tick of her own first state
                # in the room (her join and that tick's encode are one step on the server).
                first_tick = next(t for t, ids in seen if pa.member_id in ids)
                await until(lambda: bool(ann_ticks), what="ann's first state in consult-1")
                assert ann_ticks and first_tick <= ann_ticks[0] + 1, (first_tick, ann_ticks[:3])
                await until(
                    lambda: (
                        pa.member_id in dr.avatars and dr.avatars[pa.member_id].head is not None
                    ),
                    what="ann's pose in consult-1",
                )

                # Nobody can call the next patient from the waiting room itself, nor may a
                # patient call anyone.
                with pytest.raises(RefusedError) as err:
                    await pa.call_next()
                assert err.value.code == "forbidden"

                await asyncio.sleep(0.3)  # a consultation of measurable length
                await dr.send_back(pa.member_id)
                moved = await expect(pa, "moved")
                assert (moved.room, moved.reason) == ("waiting", "sent back to the waiting room")
                await expect(pa, "arrived", lambda e: e.room == "waiting")
                assert ann.texts[-1] == TEXTS["waiting"]
                # The waiting room's audio policy: patients enter muted by the server.
                state = await expect(pa, "member_state", lambda e: e.member_id == pa.member_id)
                assert state.muted
                q = await expect(pa, "queue")
                # Back at the end of the queue; the estimate now comes from the measured
                # consultation (well under the 12-minute default).
                assert (q.position, q.waiting) == (2, 2)
                assert q.estimate is not None and q.estimate < 60
    transfers = await _audit(srv, "transferred", 2)
    (r1, a1, s1, d1), (r2, a2, s2, d2) = transfers[-2:]
    assert (r1, a1, s1, d1["to"], d1["reason"]) == (
        "waiting",
        "drlee",
        "ann",
        "consult-1",
        "called",
    )
    assert (r2, a2, s2, d2["to"]) == ("consult-1", "drlee", "ann", "waiting")


async def _audit(srv: ServerProcess, kind: str, n: int) -> list[tuple[str, str, str, Any]]:
    """The audit entries of ``kind``, once there are at least ``n`` (writes are batched)."""
    deadline = time.monotonic() + 10
    while len(rows := audit_rows(srv, kind)) < n:
        assert time.monotonic() < deadline, rows
        await asyncio.sleep(0.1)
    return rows


class DeclinesConsultations(Consents):
    """Accepts the waiting room's text, declines a consultation room's."""

    def __call__(self, version: str, text: str) -> bool:
        self.texts.append(text)
        return text != TEXTS["consultation"]


async def test_a_patient_who_declines_the_consultation_goes_back_to_wait(
    srv: ServerProcess,
) -> None:
    """A patient called into a consultation room that declines its consent goes back to the
    waiting room on the same connection, in its place in the queue; the clinician is told why
    and the audit log records the decline."""
    kim = DeclinesConsultations()
    async with (
        member(srv, "waiting", "kim", consent=kim) as pc,
        member(srv, "waiting", "lou") as pd,
        member(srv, "consult-1", "drmay", role="host") as dr,
    ):
        await expect(pd, "queue", lambda e: e.waiting == 2)
        first_id = pc.member_id
        await dr.call_next()
        moved = await expect(pc, "moved")
        assert (moved.room, moved.reason) == ("consult-1", "called")
        back = await expect(pc, "moved", lambda e: e.room == "waiting")
        assert isinstance(back, Moved)
        assert (back.by, back.reason) == ("DRMAY", "consent_declined")
        arrived = await expect(pc, "arrived")
        assert isinstance(arrived, Arrived) and arrived.room == "waiting"
        assert kim.texts == [TEXTS["waiting"], TEXTS["consultation"]]  # not asked again
        assert pc.room == "waiting" and pc.closed_reason is None
        assert pc.consent_version == CLINIC.types[0].consent_version  # the waiting room's
        assert pd.member_id in pc.members
        # Back in its place: first of two, ahead of the patient who came after it.
        q = await expect(pc, "queue")
        assert (q.position, q.waiting) == (1, 2)
        await until(lambda: pd.queue is not None and pd.queue.position == 2, what="dan 2nd")

        told = await expect(dr, "move_declined")
        assert isinstance(told, MoveDeclined)
        # Named as the room it left showed it (the waiting room is pseudonymous).
        assert (told.member_id, told.name, told.origin, told.room) == (
            first_id,
            f"Participant {first_id}",
            "waiting",
            "consult-1",
        )
        assert (told.reason, told.back) == ("consent_declined", "waiting")
        assert pc.member_id not in dr.members

        # Still connected and a patient like any other: called again, it is the next one.
        await dr.call_next()
        await expect(pc, "moved", lambda e: e.room == "consult-1")
        await expect(pc, "moved", lambda e: e.room == "waiting")
        assert pc.closed_reason is None
    await until(
        lambda: len([a for _, a, _, _ in audit_rows(srv, "consent_declined") if a == "kim"]) == 2,
        what="both declines in the audit log",
    )
    mine = [(r, d) for r, a, _, d in audit_rows(srv, "consent_declined") if a == "kim"]
    assert [(r, d.get("back")) for r, d in mine] == [("consult-1", "waiting")] * 2


async def test_a_decline_with_no_room_to_go_back_to_ends_the_connection(
    srv: ServerProcess,
) -> None:
    """The room a member was moved from refuses it back (locked since): the decline closes
    the connection as before, and the mover learns that the member is gone."""
    ned = DeclinesConsultations()
    async with member(srv, "waiting", "frontdesk2", role="receptionist") as desk:
        async with member(srv, "waiting", "ned", consent=ned) as pn:
            await expect(desk, "joined", lambda e: e.member_id == pn.member_id)
            ned_id = pn.member_id
            await desk.moderate("lock")
            try:
                await desk.transfer(ned_id, "consult-7", "see the nurse")
                told = await expect(desk, "move_declined")
                assert (told.member_id, told.room, told.reason, told.back) == (
                    ned_id,
                    "consult-7",
                    "consent_declined",
                    None,
                )
                ended = await pn.wait_closed()
                assert ended.code == "consent_required"
            finally:
                await desk.moderate("unlock")
    await until(
        lambda: any(a == "ned" for _, a, _, _ in audit_rows(srv, "consent_declined")),
        what="the decline in the audit log",
    )
    mine = [(r, d) for r, a, _, d in audit_rows(srv, "consent_declined") if a == "ned"]
    assert [(r, "back" in d) for r, d in mine] == [("consult-7", False)]


async def test_receptionist_transfers_into_a_lobby(srv: ServerProcess) -> None:
    """The front desk moves a patient to a consultation room: that room's lobby holds the
    patient until its clinician admits them."""
    async with (
        member(srv, "waiting", "cat") as pc,
        member(srv, "waiting", "desk2", role="receptionist") as desk,
        member(srv, "consult-2", "drmoss", role="host") as dr,
    ):
        await expect(pc, "queue")
        await desk.transfer(pc.member_id, "consult-2", "your clinician is ready")
        moved = await expect(pc, "moved")
        # The mover as the waiting room shows it (pseudonymous: no real name leaks).
        assert (moved.room, moved.by, moved.reason) == (
            "consult-2",
            f"Participant {desk.member_id}",
            "your clinician is ready",
        )
        waiting = await expect(pc, "waiting")
        assert isinstance(waiting, Waiting) and waiting.room == "consult-2"
        lobby = await expect(dr, "lobby", lambda e: len(e.entries) == 1)
        assert isinstance(lobby, LobbyChanged) and lobby.entries[0].identity == "cat"
        await dr.moderate("admit", lobby.entries[0].id)
        arrived = await expect(pc, "arrived")
        assert arrived.members == {dr.member_id: "DRMOSS"}
        assert pc.state.value == "joined"
        # The receptionist does not host the consultation room (hosts = ["host"]): a transfer
        # from there is its grant, not moderation.
        rows = await _audit(srv, "transferred", 1)
        assert any(
            (r, a, s, d["to"]) == ("waiting", "desk2", "cat", "consult-2") for r, a, s, d in rows
        )


async def test_a_patient_waiting_in_an_empty_rooms_lobby_is_not_dropped(srv: ServerProcess) -> None:
    """Moved into the lobby of a consultation room nobody is in yet, the patient waits there
    past the room's linger time (the room stays open while its lobby holds someone) until the
    clinician comes and admits it."""
    async with (
        member(srv, "waiting", "eli") as pe,
        member(srv, "waiting", "desk3", role="receptionist") as desk,
    ):
        await expect(pe, "queue")
        await desk.transfer(pe.member_id, "consult-3", "your clinician is on the way")
        waiting = await expect(pe, "waiting")
        assert waiting.room == "consult-3"
        await asyncio.sleep(4 * 0.5)  # four times the server's room_linger
        assert pe.closed_reason is None and pe.state.value == "lobby"
        async with member(srv, "consult-3", "drnash", role="host") as dr:
            await dr.moderate("admit", waiting.lobby_id)
            arrived = await expect(pe, "arrived")
            assert arrived.room == "consult-3" and dr.member_id in arrived.members


async def test_audio_follows_the_patient(srv: ServerProcess) -> None:
    """A patient publishing a tone in the waiting room is heard by the clinician once called
    in: the SDK renegotiates its WebRTC connection in the new room by itself."""
    async with (
        member(srv, "waiting", "dan") as pd,
        member(srv, "consult-3", "drwu", role="host") as dr,
    ):
        tone = tone_track(440.0, -20.0)
        old_mix = await pd.audio.start(tone)
        lis_mix = await dr.audio.start(None)
        meter = LevelMeter(lis_mix)
        try:
            pd.send_pose(head=Pose((0.0, 1.6, -1.0)))
            dr.send_pose(head=Pose((0.0, 1.6, 0.0)))
            await dr.call_next()
            await expect(pd, "arrived")
            await until(
                lambda: pd.audio.mix is not None and pd.audio.mix is not old_mix,
                timeout=20,
                what="the patient's audio renegotiated",
            )
            pd.send_pose(head=Pose((0.0, 1.6, -1.0)))
            # The track published in the waiting room is published again (aiortc would stop
            # it with the old connection), and the clinician hears it.
            await until(lambda: max(meter.levels(0.2)) > -45.0, timeout=30, what="heard")
            assert tone.readyState == "live"
        finally:
            meter.stop()


# --------------------------------------------------------------------------- refusals


async def test_unauthorised_and_impossible_transfers_are_refused(srv: ServerProcess) -> None:
    async with (
        member(srv, "waiting", "eve") as pe,
        member(srv, "waiting", "fay") as pf,
        member(srv, "consult-4", "drno", role="host") as dr,
        member(srv, "waiting", "desk3", role="receptionist") as desk,
    ):
        await expect(pf, "queue")

        async def refused(call: Any, code: str) -> None:
            with pytest.raises(RefusedError) as err:
                await call
            assert err.value.code == code, err.value

        # A patient may not move anyone, nor call or send back.
        await refused(pe.transfer(pf.member_id, "consult-4"), "forbidden")
        await refused(pe.send_back(pf.member_id), "forbidden")
        await refused(pe.call_next(), "forbidden")
        # Unknown member, unknown room, oneself, the room it is in.
        await refused(desk.transfer(999, "consult-4"), "not_found")
        await refused(desk.transfer(pf.member_id, "nowhere"), "not_found")
        await refused(desk.transfer(desk.member_id, "consult-4"), "bad_field")
        await refused(desk.transfer(pf.member_id, "waiting"), "bad_field")
        # A host may send back only members of its own room.
        await refused(dr.send_back(999), "not_found")
        # A locked room takes nobody.
        await dr.moderate("lock")
        await refused(desk.transfer(pf.member_id, "consult-4"), "room_locked")
        await dr.moderate("lobby")
        # A full room takes nobody: fill consult-5 to the limit.
        async with contextlib.AsyncExitStack() as stack:
            for i in range(MAX_MEMBERS):
                await stack.enter_async_context(member(srv, "consult-5", f"g{i}", role="host"))
            await refused(desk.transfer(pf.member_id, "consult-5"), "room_full")
        # The room type's host roles: the front desk hosts the waiting room, a clinician's
        # host token does not (hosts = ["receptionist"] there).
        async with member(srv, "waiting", "drvisit", role="host") as visitor:
            await refused(visitor.moderate("lock"), "forbidden")
            await refused(visitor.call_next(), "forbidden")
        await desk.moderate("allow_unmute", pf.member_id)
        # Nothing moved: both patients are still waiting, in order.
        assert pe.room == pf.room == "waiting"
        assert pe.member_id in desk.members and pf.member_id in desk.members
    rows = audit_rows(srv, "transferred")
    assert not any(s in ("eve", "fay") for _, _, s, _ in rows)


async def raw_member(srv: ServerProcess, room: str, who: str, role: str) -> tuple[RawClient, int]:
    raw = await RawClient.open(srv.url)
    await raw.ws.send_bytes(
        encode_message(Hello(PROTOCOL_VERSION, room, who, 3, None, tok(room, who, role)))
    )
    m = await raw.next_control()
    if isinstance(m, ConsentRequired):
        await raw.ws.send_bytes(encode_message(Consent(m.version, True)))
        m = await raw.next_control()
    assert isinstance(m, Welcome), m
    return raw, m.member_id


async def next_refused(raw: RawClient, req: int) -> RequestRefused:
    while True:
        m = await raw.next_control()
        if isinstance(m, RequestRefused) and m.req == req:
            return m


async def test_bad_transfer_requests_get_typed_errors(srv: ServerProcess) -> None:
    """Malformed, oversized and out-of-range clinic requests, and a flood of them, are each
    refused with a typed error while the room carries on."""
    desk, _ = await raw_member(srv, "waiting", "desk4", "receptionist")
    try:
        async with member(srv, "waiting", "gil") as pg:
            await expect(pg, "queue")

            def frame(wire: dict[str, Any]) -> bytes:
                return b"\x01" + msgpack.packb(wire, use_bin_type=True)

            cases: list[tuple[dict[str, Any], str]] = [
                ({"t": "transfer", "req": 1, "member_id": "2", "room": "consult-1"}, "bad_field"),
                ({"t": "transfer", "req": 2, "member_id": 0, "room": "consult-1"}, "out_of_range"),
                ({"t": "transfer", "req": 3, "member_id": 2**33, "room": "c"}, "out_of_range"),
                ({"t": "transfer", "req": 4, "member_id": 2, "room": "no/such"}, "out_of_range"),
                ({"t": "transfer", "req": 5, "member_id": 2}, "bad_field"),
                ({"t": "transfer", "req": 6, "member_id": 2, "room": "a", "x": 1}, "bad_field"),
                (
                    {"t": "transfer", "req": 7, "member_id": 2, "room": "a", "reason": "r" * 300},
                    "out_of_range",
                ),
                ({"t": "send_back", "req": 8, "member_id": -1}, "out_of_range"),
                ({"t": "call_next", "req": 9, "extra": True}, "bad_field"),
            ]
            for wire, code in cases:
                await desk.ws.send_bytes(frame(wire))
                answer = await next_refused(desk, wire["req"])
                assert answer.code == code, (wire, answer)
            # Oversized: a control frame over the 4 KiB limit.
            big = frame({"t": "transfer", "req": 10, "member_id": 2, "room": "a" * 5000})
            await desk.ws.send_bytes(big)
            assert (await desk.next_error()).code == "oversized"
            # Flooding: more transfers than the clinic's rate allows are refused as such.
            for req in range(100, 140):
                await desk.ws.send_bytes(encode_message(Transfer(999, "consult-1", None, req)))
            codes = [(await next_refused(desk, req)).code for req in range(100, 140)]
            assert codes.count("rate_limited") >= 20 and set(codes) <= {
                "rate_limited",
                "not_found",
            }
            # The room carries on: the patient is still answered and still waits.
            assert await pg.ping() < 5.0
            assert pg.room == "waiting" and pg.queue is not None
            await desk.ws.send_bytes(encode_message(CallNext(200)))
            assert (await next_refused(desk, 200)).code in ("bad_field", "rate_limited")
    finally:
        await desk.close()


# --------------------------------------------------------------------------- the clinic file


def write(tmp: Path, text: str) -> Path:
    p = tmp / "clinic.toml"
    p.write_text(text)
    return p


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("[clinic\nname = 1\n", "line 1"),
        ("[clinic]\nname = 'x'\nwaiting = 'w'\n", "clinic.waiting"),
        ("[types.a]\nrooms = ['a']\nentry = 'maybe'\n", "types.a.entry"),
        ("[types.a]\nentry = 'open'\n", "types.a: give rooms"),
        ("[types.a]\nrooms = ['a b']\n", "types.a.rooms"),
        ("[types.a]\nregex = '('\n", "types.a.regex"),
        ("[types.a]\nrooms = ['a']\nhosts = ['observer']\n", "types.a.hosts"),
        ("[types.a]\nrooms = ['a']\nconsent_file = 'missing.txt'\n", "types.a.consent_file"),
        ("[types.a]\nrooms = ['a']\naudio = { loud = true }\n", "types.a.audio.loud"),
        ("[types.a]\nrooms = ['a']\npseudonymous = 'yes'\n", "types.a.pseudonymous"),
        ("[clinic]\nwaiting_room = 'lounge'\n[types.a]\nrooms = ['a']\n", "no room type"),
        ("[clinic]\ndefault_consultation_minutes = -3\n", "default_consultation_minutes"),
        ("[wards]\n", "wards"),
    ],
)
def test_bad_clinic_files_name_the_key(tmp_path: Path, text: str, says: str) -> None:
    with pytest.raises(ClinicError) as err:
        load_clinic(write(tmp_path, text))
    assert says in str(err.value)


def test_serve_refuses_a_bad_clinic_file_in_one_line(tmp_path: Path) -> None:
    bad = write(tmp_path, "[types.consult]\nrooms = ['consult-*']\nplugins = ['teleport']\n")
    out = subprocess.run(
        [sys.executable, "-m", "medverse.server.cli", "serve", "--clinic", str(bad)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env={"MEDVERSE_AUTH_SECRET": SECRET, "MEDVERSE_PORT": str(free_port()), "PATH": ""},
    )
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "types.consult.plugins" in lines[0] and "teleport" in lines[0]


def test_flags_are_rules_like_the_clinic_file(tmp_path: Path) -> None:
    """--consent-file/--consent-rooms and --pseudonymous-rooms are the same rules as a room
    type's, after the clinic's own."""
    from medverse.server.config import ServerConfig
    from medverse.server.policy import RoomPolicy

    text = tmp_path / "c.txt"
    text.write_text("flag text\n")
    cfg = ServerConfig(
        consent_file=str(text), consent_rooms="ward-.*", pseudonymous_rooms="ward-.*|consult-.*"
    )
    policy = RoomPolicy(cfg, CLINIC)
    assert policy.consent("ward-1") is not None and policy.consent("ward-1")[1] == "flag text\n"  # type: ignore[index]
    assert policy.settings("ward-1").pseudonymous and policy.settings("ward-1").type == "default"
    # The clinic's consultation text wins over the flag for its rooms; the flag still makes
    # rooms pseudonymous that the clinic type leaves as they are.
    assert policy.consent("consult-1") == (CLINIC.types[1].consent_version, TEXTS["consultation"])
    assert policy.settings("consult-1").pseudonymous and not policy.settings("mdt-1").pseudonymous
    assert policy.known("consult-7") and not policy.known("ward-1")


async def test_a_moved_member_resumes_in_its_new_room(srv: ServerProcess) -> None:
    """A dropped connection after a move resumes the same member in the room it was moved to,
    with the token of the room it first joined."""
    async with (
        member(srv, "waiting", "hal") as ph,
        member(srv, "consult-6", "drkim", role="host") as dr,
    ):
        await expect(ph, "queue")
        await dr.call_next()
        arrived = await expect(ph, "arrived")
        assert ph.room == "consult-6"
        ws = ph._ws
        assert ws is not None
        await ws.close()  # the connection drops without a leave
        resumed = await expect(ph, "resumed")
        assert resumed.same_member and ph.member_id == arrived.member_id
        assert ph.room == "consult-6" and dr.members == {ph.member_id: "HAL"}
    # Once its place is gone, a resume there falls back to the room the token names.
    raw = await RawClient.open(srv.url)
    try:
        hello = Hello(PROTOCOL_VERSION, "consult-6", "HAL", 3, "gone" * 8, tok("waiting", "hal"))
        await raw.ws.send_bytes(encode_message(hello))
        assert (await raw.next_error()).code == "bad_resume"
        ask = await raw.next_control()
        assert isinstance(ask, ConsentRequired) and ask.text == TEXTS["waiting"]
        await raw.ws.send_bytes(encode_message(Consent(ask.version, True)))
        welcome = await raw.next_control()
        assert isinstance(welcome, Welcome) and welcome.room == "waiting"
        # A token for one room never joins another without a resume token naming a member.
        other = await RawClient.open(srv.url)
        try:
            await other.ws.send_bytes(
                encode_message(Hello(PROTOCOL_VERSION, "consult-6", "HAL", 3, None, hello.token))
            )
            err = await other.next_error()
            assert (err.code, err.fatal) == ("unauthorized", True)
        finally:
            await other.close()
    finally:
        await raw.close()


@pytest.mark.skipif(not redis_available(), reason="redis-server is not installed")
async def test_in_a_cluster_a_move_places_the_room_through_the_directory() -> None:
    """A room is run by one server of a cluster: a move to a room nobody runs yet asks the
    cluster's directory, which places it (here, on the only server); a move to a room the
    server holds goes on at once. Across servers: tests/test_cluster.py."""
    from benchmarks.harness import start_server

    with redis_server() as redis:
        node = start_server(
            redis_url=redis.url, auth_secret=SECRET, cluster_lease_ttl=2.5, room_linger=2.0
        )
        try:
            node.wait_ready(timeout=60)
            async with (
                member(node, "ward-a", "host-a", role="host") as host,
                member(node, "ward-a", "pat-a") as pat,
                member(node, "ward-b", "host-b", role="host") as other,
            ):
                await host.transfer(pat.member_id, "ward-b")  # held here: moves at once
                arrived = await expect(pat, "arrived")
                assert arrived.room == "ward-b" and other.member_id in arrived.members
                await other.transfer(pat.member_id, "ward-never-opened")
                arrived = await expect(pat, "arrived")
                assert arrived.room == pat.room == "ward-never-opened"
                assert arrived.members == {}
        finally:
            node.stop()


# --------------------------------------------------------------------------- HTTP after a move


async def _http_code(srv: ServerProcess, path: str, bearer: str) -> tuple[int, str]:
    """(status, typed error code or "") of a GET with ``bearer`` as its token."""
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{srv.url}{path}", headers={"Authorization": f"Bearer {bearer}"}) as r,
    ):
        if r.status < 400:
            return r.status, ""
        return r.status, (await r.json())["error"]["code"]


async def test_a_moved_member_fetches_its_new_rooms_models_and_images(
    srv: ServerProcess, tmp_path: Path
) -> None:
    """Called in, a patient downloads the consultation room's model and image series with the
    room access credential of its ``moved`` (its join token names the waiting room); sent
    back, that credential is refused at once; forged, expired, foreign and misrouted
    credentials are refused with typed errors."""
    model = triangle_glb()
    async with (
        member(srv, "waiting", "gil") as pg,
        member(srv, "consult-9", "drpark", role="host") as dr,
    ):
        asset = await dr.upload_asset(model, "heart")
        series = await dr.upload_series(synthetic_ct(16, 16, 4), "abdomen CT")
        await expect(pg, "queue")
        # The waiting room's token opens no consultation room.
        assert await _http_code(srv, "/rooms/consult-9/assets", pg.token or "") == (
            401,
            "unauthorized",
        )
        assert pg.room_access is None
        await dr.call_next()
        await expect(pg, "arrived", lambda e: e.room == "consult-9")
        access = pg.room_access
        assert access is not None and access != pg.token

        got = await pg.assets.download(asset.sha256, tmp_path / "heart.glb")
        assert got.read_bytes() == model
        assert [a.sha256 for a in await pg.assets.list()] == [asset.sha256]
        described = await pg.series(series.sha256)
        assert described["planes"]["axial"]["count"] == 4
        assert (await pg.fetch_slice(series.sha256, "axial", 2)).startswith(b"\x89PNG")
        # The credential is for consult-9 only, and grants no upload to a participant.
        assert await _http_code(srv, "/rooms/consult-8/assets", access) == (401, "unauthorized")
        with pytest.raises(AssetError) as refused:
            await pg.upload_asset(triangle_glb(("other",)), "mine")
        assert refused.value.code == "forbidden"

        claims = jwt.decode(pg.token or "", options={"verify_signature": False})
        tid = claims["jti"]
        key = derive_key(SECRET.encode())
        expired = RoomAccess(key, ttl=-60).issue("consult-9", "gil", tid)
        forged = RoomAccess(derive_key(b"f" * 48)).issue("consult-9", "gil", tid)
        # Signed with the token secret itself (not the derived key): not the server's.
        raw_secret = RoomAccess(SECRET.encode()).issue("consult-9", "gil", tid)
        someone_else = RoomAccess(key).issue("consult-9", "mallory", tid)
        other_token = RoomAccess(key).issue("consult-9", "gil", "not-that-token")
        tampered = access[:-4] + ("AAAA" if not access.endswith("AAAA") else "BBBB")
        for bad, code in [
            (expired, "token_expired"),
            (forged, "unauthorized"),
            (raw_secret, "unauthorized"),
            (someone_else, "unauthorized"),
            (other_token, "unauthorized"),
            (tampered, "unauthorized"),
            ("", "unauthorized"),
            ("x" * 5000, "unauthorized"),
        ]:
            assert await _http_code(srv, "/rooms/consult-9/assets", bad) == (401, code), bad
        assert await _http_code(srv, f"/rooms/consult-9/series/{series.sha256}", access) == (
            200,
            "",
        )

        await dr.send_back(pg.member_id)
        await expect(pg, "arrived", lambda e: e.room == "waiting")
        # Gone from consult-9: its credential there is revoked before it expires.
        for path in ("/rooms/consult-9/assets", f"/rooms/consult-9/series/{series.sha256}"):
            assert await _http_code(srv, path, access) == (401, "unauthorized")
        # Back in the room its join token names: no credential, the token serves there.
        assert pg.room_access is None and pg.assets.token == pg.images.token == pg.token
        # The cached clients followed the member to the waiting room.
        assert pg.assets.room == pg.images.room == "waiting"
        assert await pg.assets.list() == []
        with pytest.raises(ImageError) as gone:
            await pg.series(series.sha256)
        assert gone.value.code == "not_found"


# --------------------------------------------------------------------------- credential refresh

#: A short credential lifetime, so its refresh and expiry happen within a test.
SHORT_ACCESS_TTL = 4.0


async def test_the_access_credential_is_refreshed_before_it_expires() -> None:
    """With a 4 s credential lifetime, a moved member gets a fresh credential every 2 s (an
    ``access`` message), and its SDK's HTTP clients use it: downloads keep working long after
    the first credential has expired (which the server then refuses, typed); a resume gets a
    fresh one at once."""
    data = tempfile.mkdtemp(prefix="medverse-clinic-")
    with run_server(
        auth_secret=SECRET,
        data_dir=data,
        clinic=CLINIC_FILE,
        room_linger=0.5,
        room_access_ttl=SHORT_ACCESS_TTL,
    ) as node:
        node.data_dir = Path(data)  # type: ignore[attr-defined]
        async with (
            member(node, "waiting", "ivy") as pi,
            member(node, "consult-5", "drmoss", role="host") as dr,
        ):
            asset = await dr.upload_asset(triangle_glb(), "heart")
            await expect(pi, "queue")
            await dr.call_next()
            await expect(pi, "arrived", lambda e: e.room == "consult-5")
            first = pi.room_access
            assert first is not None
            claims = jwt.decode(first, options={"verify_signature": False})
            assert claims["exp"] - claims["iat"] == SHORT_ACCESS_TTL
            seen = {first}
            # Refreshed every half lifetime while the member stays (and the HTTP clients
            # follow), until the first credential has expired (its exp and the 5 s leeway).
            while time.time() <= claims["exp"] + 6:
                await asyncio.sleep(0.2)
                seen.add(pi.room_access or "")
            assert len(seen) >= 3, len(seen)
            assert pi.assets.token == pi.room_access and pi.images.token == pi.room_access
            assert await _http_code(node, "/rooms/consult-5/assets", first) == (
                401,
                "token_expired",
            )
            # ... while the member's current one, and so its SDK, still work.
            assert [a.sha256 for a in await pi.assets.list()] == [asset.sha256]
            # A resume in the room gets a fresh credential at once.
            before = pi.room_access
            ws = pi._ws
            assert ws is not None
            await ws.close()
            resumed = await expect(pi, "resumed")
            assert resumed.same_member and pi.room == "consult-5"
            await until(lambda: pi.room_access != before, timeout=1.5, what="fresh credential")
            assert await _http_code(node, "/rooms/consult-5/assets", pi.room_access or "") == (
                200,
                "",
            )
