"""Host and member actions are acknowledged: SDK calls return once the server applied them
and raise the typed refusal at once when it refused (request ids, ``ack``/``refused``)."""

from __future__ import annotations

import asyncio
import tempfile
import time
from collections.abc import Iterator

import pytest

from medverse.client_sdk import (
    AudioError,
    MemberStateChanged,
    ObjectError,
    RefusedError,
    connect,
)
from medverse.protocol.messages import PROTOCOL_VERSION, Error, Hello, Moderate, encode_message
from medverse.server.auth import mint_token

from .conftest import ServerProcess, run_server
from .helpers import RawClient

SECRET = "a" * 48
ROOM = "acks"


@pytest.fixture(scope="module")
def srv() -> Iterator[ServerProcess]:
    with run_server(auth_secret=SECRET, data_dir=tempfile.mkdtemp(prefix="medverse-acks-")) as s:
        yield s


def tok(who: str, role: str = "participant", room: str = ROOM) -> str:
    return mint_token(SECRET.encode(), room=room, identity=who, name=who, role=role)


async def quickly(coro: object, error: type[Exception]) -> Exception:
    """The typed refusal ``coro`` raises, which must come at once (not after a timeout)."""
    t0 = time.monotonic()
    with pytest.raises(error) as e:
        await coro  # type: ignore[misc]
    assert time.monotonic() - t0 < 1.0
    return e.value


async def test_refusals_are_raised_at_once_and_actions_return_when_applied(
    srv: ServerProcess,
) -> None:
    async with (
        connect(srv.url, ROOM, token=tok("lead", "host"), ping_interval=0) as host,
        connect(srv.url, ROOM, token=tok("patient"), ping_interval=0) as patient,
    ):
        pid = patient.member_id
        # Refused: typed errors at once, whatever the family.
        err = await quickly(patient.moderate("lock"), RefusedError)
        assert err.code == "forbidden"  # type: ignore[attr-defined]
        err = await quickly(patient.spawn("nothex"), ObjectError)
        assert err.code == "out_of_range"  # type: ignore[attr-defined]
        err = await quickly(patient.audio.set_zone(pid, 2), AudioError)
        assert err.code == "forbidden"  # type: ignore[attr-defined]
        err = await quickly(patient.audio.whisper(pid), AudioError)
        assert err.code == "bad_field"  # type: ignore[attr-defined]
        err = await quickly(host.moderate("mute", 4242), RefusedError)
        assert err.code == "not_found"  # type: ignore[attr-defined]
        err = await quickly(host.moderate("remove"), RefusedError)
        assert err.code == "bad_field"  # type: ignore[attr-defined]
        # Applied when the call returns: what the server sent before its ack is here already.
        await host.moderate("mute", pid)
        seen = []
        while not host._events.empty():
            seen.append(host._events.get_nowait())
        assert any(isinstance(e, MemberStateChanged) and e.muted for e in seen), seen
        await patient.request_unmute()
        await host.moderate("allow_unmute", pid)
        await host.audio.set_zone(pid, 3)
        await host.audio.broadcast(pid, True, 0.5)
        await patient.audio.ignore(host.member_id)
        await patient.audio.mute(True)
        await patient.pause(True)
        assert patient.state.value == "paused"
        await patient.pause(False)  # returns with the fresh welcome taken in
        assert patient.state.value == "joined" and host.member_id in patient.members
        await host.change_role(pid, grant="annotate", allow=False)
        await host.moderate("end", reason="done for today")  # ends our own session too
        closed = await asyncio.wait_for(patient.wait_closed(), 5)
        assert (closed.code, closed.message) == ("session_ended", "done for today")


async def test_requests_without_req_still_get_plain_errors(srv: ServerProcess) -> None:
    """Older clients send no req: their refusals are plain ``error`` messages, as before."""
    raw = await RawClient.open(srv.url)
    hello = Hello(PROTOCOL_VERSION, "acks-old", "x", 3, None, tok("old", room="acks-old"))
    await raw.ws.send_bytes(encode_message(hello))
    await raw.next_control()
    await raw.ws.send_bytes(encode_message(Moderate("lock")))
    err = await raw.next_error()
    assert isinstance(err, Error) and (err.code, err.fatal) == ("forbidden", False)
    await raw.close()


def test_the_tokens_name_wins_and_the_sdk_says_so(caplog: pytest.LogCaptureFixture) -> None:
    from medverse.client_sdk import Session

    token = mint_token(SECRET.encode(), room=ROOM, identity="dr-a", name="Dr A")
    with caplog.at_level("WARNING", logger="medverse.client"):
        s = Session("ws://127.0.0.1:1", ROOM, "Someone Else", token=token)
    assert s.name == "Dr A"
    assert "token's name 'Dr A' wins" in caplog.text
    caplog.clear()
    assert Session("ws://127.0.0.1:1", ROOM, token=token).name == "Dr A"
    assert Session("ws://127.0.0.1:1", ROOM, "Dr A", token=token).name == "Dr A"
    assert Session("ws://127.0.0.1:1", ROOM, "Anon").name == "Anon"  # no token: as given
    assert not caplog.text
