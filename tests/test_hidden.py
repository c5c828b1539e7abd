"""Hidden observers cannot be found by trying ids: every message that names a member answers
for an observer's id exactly as for an id nobody has, and nothing names an observer."""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import Iterator

import pytest

from medverse.protocol.audio import AudioBroadcast, AudioIgnore, AudioRules, AudioWhisper, AudioZone
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
from medverse.protocol.objects import ObjectRefused, Yield
from medverse.server.auth import mint_token

from .conftest import ServerProcess, run_server
from .helpers import RawClient

SECRET = "h" * 48
ROOM = "hidden"


@pytest.fixture(scope="module")
def srv() -> Iterator[ServerProcess]:
    data = tempfile.mkdtemp(prefix="medverse-hidden-")
    with run_server(auth_secret=SECRET, data_dir=data) as s:
        yield s


async def join(url: str, who: str, role: str) -> tuple[RawClient, int]:
    raw = await RawClient.open(url)
    token = mint_token(SECRET.encode(), room=ROOM, identity=who, name=who, role=role)
    await raw.ws.send_bytes(encode_message(Hello(PROTOCOL_VERSION, ROOM, who, 3, None, token)))
    welcome = await raw.next_control()
    assert isinstance(welcome, Welcome), welcome
    return raw, welcome.member_id


async def answer(raw: RawClient, msg: Message) -> tuple[str, str]:
    """The code and message of the error (or object refusal) ``msg`` gets."""
    await raw.ws.send_bytes(encode_message(msg))
    while True:
        m = await raw.next_control()
        if isinstance(m, Error | ObjectRefused):
            return m.code, m.message


async def test_an_observers_id_answers_like_an_unused_one(srv: ServerProcess) -> None:
    host, _ = await join(srv.url, "lead", "host")
    patient, pid = await join(srv.url, "patient", "participant")
    observer, oid = await join(srv.url, "student", "observer")
    unused = oid + 1000
    from_patient = [
        lambda mid: AudioIgnore(mid, True),
        lambda mid: AudioWhisper(mid),
        lambda mid: Yield(1, 1, mid),
    ]
    from_host = [
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
            assert hidden[0] in ("not_found", "not_holder"), hidden
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
