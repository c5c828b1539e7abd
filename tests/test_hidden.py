"""Hidden observers cannot be found by trying ids: every message that names a member answers
for an observer's id exactly as for an id nobody has, and nothing names an observer."""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from medverse.protocol.audio import AudioBroadcast, AudioIgnore, AudioRules, AudioWhisper, AudioZone
from medverse.protocol.clinic import SendBack, Transfer
from medverse.protocol.messages import (
    PROTOCOL_VERSION,
    ChangeRole,
    Error,
    Hello,
    MemberState,
    Message,
    Moderate,
    Pause,
    Welcome,
    encode_message,
)
from medverse.protocol.objects import (
    Grab,
    HandoverRequested,
    ObjectAck,
    ObjectRefused,
    RequestHandover,
    Spawn,
    Yield,
)
from medverse.server.auth import mint_token

from .conftest import ServerProcess, run_server
from .helpers import RawClient
from .models import provide

SECRET = "h" * 48
ROOM = "hidden"


@pytest.fixture(scope="module")
def srv() -> Iterator[ServerProcess]:
    data = tempfile.mkdtemp(prefix="medverse-hidden-")
    # The room is a clinic room with a waiting room, so that transfers and sending back name
    # members too.
    clinic = Path(data) / "clinic.toml"
    clinic.write_text(
        '[clinic]\nwaiting_room = "hidden-waiting"\n\n'
        '[types.plain]\nrooms = ["hidden", "hidden-*"]\n',
        encoding="utf-8",
    )
    with run_server(auth_secret=SECRET, data_dir=data, clinic=clinic) as s:
        yield s


async def join(url: str, who: str, role: str) -> tuple[RawClient, int]:
    raw = await RawClient.open(url)
    token = mint_token(SECRET.encode(), room=ROOM, identity=who, name=who, role=role)
    await raw.ws.send_bytes(encode_message(Hello(PROTOCOL_VERSION, ROOM, who, 3, None, token)))
    welcome = await raw.next_control()
    assert isinstance(welcome, Welcome), welcome
    return raw, welcome.member_id


async def until(raw: RawClient, kind: type) -> Message:
    """The next control message of type ``kind`` (others are dropped)."""
    while True:
        m = await raw.next_control()
        if isinstance(m, kind):
            return m


async def answer(raw: RawClient, msg: Message) -> tuple[str, str]:
    """The code and message of the error (or object refusal) ``msg`` gets."""
    await raw.ws.send_bytes(encode_message(msg))
    while True:
        m = await raw.next_control()
        if isinstance(m, Error | ObjectRefused):
            return m.code, m.message


async def test_an_observers_id_answers_like_an_unused_one(srv: ServerProcess) -> None:
    heart = (
        await provide(
            srv.http, ROOM, mint_token(SECRET.encode(), room=ROOM, identity="lead", role="host")
        )
    )[0]
    host, _ = await join(srv.url, "lead", "host")
    patient, pid = await join(srv.url, "patient", "participant")
    observer, oid = await join(srv.url, "student", "observer")
    unused = oid + 1000
    # The host holds an object the patient has asked for: a Yield from the holder, with a
    # request pending, gets as far as looking up the member it names.
    await host.ws.send_bytes(
        encode_message(Spawn(1, heart, (0.0, 1.0, 0.0), (0.0, 0.0, 0.0, 1.0), 1.0, None))
    )
    ack = await until(host, ObjectAck)
    assert isinstance(ack, ObjectAck) and ack.object_id is not None
    obj = ack.object_id
    await host.ws.send_bytes(encode_message(Grab(2, obj)))
    assert (await until(host, ObjectAck)).object_id == obj  # type: ignore[attr-defined]
    await patient.ws.send_bytes(encode_message(RequestHandover(1, obj)))
    asked = await until(host, HandoverRequested)
    assert asked.member_id == pid  # type: ignore[attr-defined]
    from_patient = [
        lambda mid: AudioIgnore(mid, True),
        lambda mid: AudioWhisper(mid),
    ]
    from_host = [
        lambda mid: Yield(3, obj, mid),
        lambda mid: Transfer(mid, "hidden-2", None),
        lambda mid: SendBack(mid, None),
        lambda mid: AudioZone(mid, 3),
        lambda mid: AudioBroadcast(mid, True, 100),
        lambda mid: Moderate("mute", mid),
        lambda mid: Moderate("allow_unmute", mid),
        lambda mid: Moderate("remove", mid, "x"),
        lambda mid: Moderate("ban", mid, "x"),
        lambda mid: ChangeRole(mid, "host"),
        lambda mid: ChangeRole(mid, None, "annotate", True),
    ]
    for raw, makers in ((patient, from_patient), (host, from_host)):
        for make in makers:
            hidden = await answer(raw, make(oid))
            missing = await answer(raw, make(unused))
            assert hidden == missing, (make(oid), hidden, missing)
            assert hidden[0] == "not_found", hidden
    # Nothing the patient or the host was sent names the observer: no audio rule lists it and
    # its pause reaches no host.
    await observer.ws.send_bytes(encode_message(Pause(True)))
    await asyncio.sleep(0.3)
    for raw in (patient, host):
        while True:
            try:
                m = await raw.next_control(timeout=0.2)
            except TimeoutError:
                break
            if isinstance(m, AudioRules):
                listed = set(m.zones + m.broadcast + m.whispers + m.self_muted + m.ignored)
                assert oid not in listed, m
            assert not (isinstance(m, MemberState) and m.member_id == oid), m
    assert pid != oid
    for raw in (host, patient, observer):
        await raw.close()
