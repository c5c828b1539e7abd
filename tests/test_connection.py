"""The connection state machine (protocol/connection.py), both ends, without sockets.

The tables below are written out by hand from SPEC.md ("Connection states"): for every state,
every message type of the protocol and every kind of bad frame, the exact event, error code,
fatal flag and state that follows.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgpack
import pytest

from medverse.protocol import connection as conn_mod
from medverse.protocol.catalog import CLIENT_MESSAGES, SERVER_MESSAGES
from medverse.protocol.clinic import Moved
from medverse.protocol.connection import (
    Connection,
    Event,
    FrameReceived,
    Ignored,
    LocalProtocolError,
    MessageReceived,
    PoseReceived,
    Refused,
    Role,
    State,
    StateReceived,
)
from medverse.protocol.messages import (
    MAX_CONTROL_BYTES,
    PROTOCOL_VERSION,
    Consent,
    ConsentRequired,
    Error,
    Hello,
    Joined,
    Leave,
    MemberInfo,
    Message,
    Pause,
    Ping,
    Pong,
    Waiting,
    Welcome,
    decode_message,
    encode_message,
    encode_pose,
)
from medverse.protocol.vectors import generate

HELLO = Hello(PROTOCOL_VERSION, "ward-3", "Dr A", 3, None, "token")
WELCOME = Welcome(PROTOCOL_VERSION, 7, "ward-3", 30, 1200, "r" * 32, False, (MemberInfo(2, "B"),))
CONSENT_REQUIRED = ConsentRequired("ab" * 32, "We record nothing.")
WAITING = Waiting("ward-3", 1)
FATAL = Error("removed", "a host removed you", True)
ASSET = "0123456789abcdef" * 4

# One valid wire map per message type of the protocol, features included; the test below
# fails when a type is added without a row here.
CLIENT_SAMPLES: dict[str, dict[str, Any]] = {
    "hello": HELLO.to_wire(),
    "ping": {"t": "ping", "id": 1, "client_time": 0.5},
    "leave": {"t": "leave"},
    "moderate": {"t": "moderate", "action": "lock"},
    "change_role": {"t": "change_role", "member_id": 2, "role": "host"},
    "pause": {"t": "pause", "paused": True},
    "request_unmute": {"t": "request_unmute"},
    "consent": {"t": "consent", "version": "ab" * 32, "accept": True},
    "audio_offer": {"t": "audio_offer", "sdp": "v=0\r\n", "publish": False},
    "audio_mute": {"t": "audio_mute", "muted": True},
    "audio_zone": {"t": "audio_zone", "member_id": 2, "zone": 1},
    "audio_broadcast": {"t": "audio_broadcast", "member_id": 2, "on": True},
    "audio_whisper": {"t": "audio_whisper", "target": 2},
    "audio_ignore": {"t": "audio_ignore", "member_id": 2, "ignore": True},
    "obj_spawn": {
        "t": "obj_spawn",
        "req": 1,
        "asset": ASSET,
        "position": [0.0, 1.0, 0.0],
        "rotation": [0.0, 0.0, 0.0, 1.0],
        "scale": 1.0,
    },
    "obj_grab": {"t": "obj_grab", "req": 1, "object_id": 1},
    "obj_release": {"t": "obj_release", "req": 1, "object_id": 1},
    "obj_request": {"t": "obj_request", "req": 1, "object_id": 1},
    "obj_yield": {"t": "obj_yield", "req": 1, "object_id": 1, "to": 2},
    "obj_view": {"t": "obj_view", "req": 1, "object_id": 1, "plane": []},
    "obj_remove": {"t": "obj_remove", "req": 1, "object_id": 1},
    "obj_force_release": {"t": "obj_force_release", "req": 1, "object_id": 1},
    "anno_create": {
        "t": "anno_create",
        "req": 1,
        "object_id": 1,
        "kind": "pin",
        "points": [[0.0, 0.0, 0.0]],
    },
    "anno_edit": {"t": "anno_edit", "req": 1, "annotation_id": 1, "text": "x"},
    "anno_delete": {"t": "anno_delete", "req": 1, "annotation_id": 1},
    "transfer": {"t": "transfer", "req": 1, "member_id": 2, "room": "consult-1"},
    "call_next": {"t": "call_next", "req": 1},
    "send_back": {"t": "send_back", "req": 1, "member_id": 2},
    "img_open": {
        "t": "img_open",
        "req": 1,
        "series": ASSET,
        "position": [0.0, 1.5, -1.0],
        "rotation": [0.0, 0.0, 0.0, 1.0],
        "width": 0.6,
    },
    "img_close": {"t": "img_close", "req": 1, "panel_id": 1},
    "img_view": {"t": "img_view", "req": 1, "panel_id": 1, "slices": [10, 256, 256]},
    "img_place": {
        "t": "img_place",
        "req": 1,
        "panel_id": 1,
        "position": [0.0, 1.5, -1.0],
        "rotation": [0.0, 0.0, 0.0, 1.0],
    },
    "img_link": {"t": "img_link", "req": 1, "panel_id": 1, "object_id": 1},
    "img_locate": {"t": "img_locate", "req": 1, "panel_id": 1, "point": [0.0, 0.0, 0.1]},
    "img_pointer": {"t": "img_pointer", "panel_id": 1, "point": [0.0, 0.0, 12.5]},
    "img_measure": {
        "t": "img_measure",
        "req": 1,
        "series": ASSET,
        "kind": "distance",
        "points": [[0.0, 0.0, 0.0], [10.0, 0.0, 0.0]],
    },
    "img_unmeasure": {"t": "img_unmeasure", "req": 1, "measurement_id": 1},
}
SERVER_SAMPLES: dict[str, dict[str, Any]] = {
    "welcome": WELCOME.to_wire(),
    "joined": {"t": "joined", "member_id": 2, "name": "B"},
    "left": {"t": "left", "member_id": 2, "name": "B", "reason": "left"},
    "pong": {"t": "pong", "id": 1, "client_time": 0.5, "room_time": 2.0},
    "error": {"t": "error", "code": "bad_resume", "message": "joining anew", "fatal": False},
    "waiting": WAITING.to_wire(),
    "lobby": {"t": "lobby", "members": [{"id": 1, "name": "C", "identity": "c-42"}]},
    "member_state": {
        "t": "member_state",
        "member_id": 2,
        "paused": False,
        "muted": True,
        "unmute_requested": False,
    },
    "room_state": {"t": "room_state", "entry": "locked"},
    "consent_required": CONSENT_REQUIRED.to_wire(),
    "grants": {"t": "grants", "member_id": 2, "role": "host", "grants": ["moderate"]},
    "bans": {"t": "bans", "bans": [{"id": 1, "name": "C", "until": 0, "reason": "threats"}]},
    "ack": {"t": "ack", "req": 5},
    "refused": {"t": "refused", "req": 5, "code": "forbidden", "message": "hosts only"},
    "redirect": {"t": "redirect", "url": "ws://127.0.0.1:9001/ws", "reason": "owner"},
    "audio_answer": {"t": "audio_answer", "sdp": "v=0\r\n", "publish": False},
    "audio_rules": {
        "t": "audio_rules",
        "zones": [],
        "broadcast": [],
        "whispers": [],
        "self_muted": [],
        "ignored": [],
    },
    "audio_speaking": {"t": "audio_speaking", "members": [2]},
    "obj_ack": {"t": "obj_ack", "req": 1, "object_id": 1},
    "obj_refused": {"t": "obj_refused", "req": 1, "code": "not_found", "message": "no"},
    "obj_state": {
        "t": "obj_state",
        "object_id": 1,
        "asset": ASSET,
        "name": "heart",
        "author": "B",
        "position": [0.0, 1.0, 0.0],
        "rotation": [0.0, 0.0, 0.0, 1.0],
        "scale": 1.0,
        "nodes": {},
        "plane": [],
    },
    "obj_removed": {"t": "obj_removed", "object_id": 1},
    "obj_lock": {"t": "obj_lock", "object_id": 1, "reason": "grab", "holder": 2},
    "obj_handover": {"t": "obj_handover", "object_id": 1, "member_id": 2},
    "obj_view_state": {"t": "obj_view_state", "object_id": 1, "nodes": {}, "plane": []},
    "anno": {
        "t": "anno",
        "annotation_id": 1,
        "object_id": 1,
        "kind": "pin",
        "points": [[0.0, 0.0, 0.0]],
        "author": "B",
        "author_id": 2,
        "time": 1.0,
        "seq": 1,
    },
    "anno_deleted": {"t": "anno_deleted", "annotation_id": 1, "object_id": 1, "seq": 2},
    "obj_synced": {"t": "obj_synced", "objects": 1, "annotations": 0},
    "moved": {"t": "moved", "room": "consult-1", "by": "Dr A", "reason": "called"},
    "queue": {"t": "queue", "position": 1, "waiting": 2, "message": "hi", "estimate": 600},
    "called": {"t": "called", "room": "consult-1", "by": "Dr A"},
    "move_declined": {
        "t": "move_declined",
        "member_id": 3,
        "name": "Ann",
        "origin": "waiting",
        "room": "consult-1",
        "reason": "consent_declined",
        "back": "waiting",
    },
    "access": {"t": "access", "room": "consult-1", "access": "eyJhbGciOiJIUzI1NiJ9.e30.YQ"},
    "img_ack": {"t": "img_ack", "req": 1, "panel_id": 1},
    "img_refused": {"t": "img_refused", "req": 1, "code": "not_found", "message": "no"},
    "img_panel": {
        "t": "img_panel",
        "panel_id": 1,
        "series": ASSET,
        "position": [0.0, 1.5, -1.0],
        "rotation": [0.0, 0.0, 0.0, 1.0],
        "width": 0.6,
        "plane": "axial",
        "slices": [10, 256, 256],
        "window": [40.0, 400.0],
        "zoom": 1.0,
        "pan": [0.0, 0.0],
        "version": 3,
    },
    "img_closed": {"t": "img_closed", "panel_id": 1},
    "img_pointers": {"t": "img_pointers", "pointers": [[2, 1, 0.0, 0.0, 12.5]]},
    "img_measurement": {
        "t": "img_measurement",
        "measurement_id": 1,
        "series": ASSET,
        "kind": "distance",
        "points": [[0.0, 0.0, 0.0], [10.0, 0.0, 0.0]],
        "value": 10.0,
        "author": "B",
        "author_id": 2,
        "time": 1.0,
        "seq": 1,
    },
    "img_measurement_deleted": {"t": "img_measurement_deleted", "measurement_id": 1, "seq": 2},
    "img_synced": {"t": "img_synced", "panels": 1, "measurements": 0},
}


def wire_frame(wire: dict[str, Any]) -> bytes:
    """A control frame straight from a wire map (no dataclass in between)."""
    return b"\x01" + msgpack.packb(wire, use_bin_type=True)


def client_msg(t: str) -> Message:
    msg = decode_message(wire_frame(CLIENT_SAMPLES[t]), CLIENT_MESSAGES)
    assert isinstance(msg, Message), msg
    return msg


def server_msg(t: str) -> Message:
    msg = decode_message(wire_frame(SERVER_SAMPLES[t]), SERVER_MESSAGES, 1 << 24)
    assert isinstance(msg, Message), msg
    return msg


POSE = encode_pose(1, [((0.0, 1.6, 0.0), (0.0, 0.0, 0.0, 1.0)), None, None])
MOVE = bytes((0x04, 0, 0, 0)) + bytes(40)

# Every state a connection can be in, plus HELLO after the hello (received or sent).
STATES = ["hello", "hello_pending", "consent", "lobby", "joined", "paused", "closing", "closed"]


def server_in(state: str) -> Connection:
    """A server end driven to ``state`` through the public API only."""
    c = Connection(Role.SERVER)
    if state == "hello":
        return c
    assert isinstance(c.receive(encode_message(HELLO)), MessageReceived)
    if state == "consent":
        c.send(CONSENT_REQUIRED)
    elif state == "lobby":
        c.send(WAITING)
    elif state in ("joined", "paused", "closing"):
        c.send(WELCOME)
        if state == "paused":
            c.receive(encode_message(Pause(True)))
        elif state == "closing":
            c.receive(encode_message(Leave()))
    elif state == "closed":
        c.closed()
    assert c.state.value == ("hello" if state == "hello_pending" else state)
    return c


def client_in(state: str) -> Connection:
    """A client end driven to ``state`` through the public API only."""
    c = Connection(Role.CLIENT)
    if state == "hello":
        return c
    c.send(HELLO)
    if state == "consent":
        c.receive(encode_message(CONSENT_REQUIRED))
    elif state == "lobby":
        c.receive(encode_message(WAITING))
    elif state in ("joined", "paused", "closing"):
        c.receive(encode_message(WELCOME))
        if state == "paused":
            c.send(Pause(True))
        elif state == "closing":
            c.send(Leave())
    elif state == "closed":
        c.closed()
    assert c.state.value == ("hello" if state == "hello_pending" else state)
    return c


# Expected outcomes: ("msg", state after) | ("refused", code, fatal, state after) |
# ("ignored", reason) | ("pose",) | ("state",) | ("frame", kind)
Outcome = tuple[Any, ...]


def ok(state: str) -> Outcome:
    return ("msg", state)


def refused(code: str, fatal: bool, state: str) -> Outcome:
    return ("refused", code, fatal, state)


def ignored(reason: str) -> Outcome:
    return ("ignored", reason)


def check(c: Connection, event: Event, want: Outcome, before: str) -> None:
    """Assert ``event`` and the connection's state match ``want``."""
    kind = want[0]
    if kind == "msg":
        assert isinstance(event, MessageReceived), event
        assert c.state.value == want[1]
    elif kind == "refused":
        assert isinstance(event, Refused), event
        assert (event.error.code.value, event.fatal, c.state.value) == want[1:]
    elif kind == "ignored":
        assert event == Ignored(want[1])
        assert c.state.value == ("hello" if before == "hello_pending" else before)
    elif kind == "pose":
        assert isinstance(event, PoseReceived), event
        assert c.state.value == before
    elif kind == "state":
        assert isinstance(event, StateReceived), event
        assert c.state.value == before
    else:
        assert isinstance(event, FrameReceived), event
        assert event.kind == want[1]
        assert c.state.value == before


def test_samples_cover_every_message_type() -> None:
    assert set(CLIENT_SAMPLES) == set(CLIENT_MESSAGES)
    assert set(SERVER_SAMPLES) == set(SERVER_MESSAGES)
    for t in CLIENT_SAMPLES:
        assert client_msg(t).TYPE == t
    for t in SERVER_SAMPLES:
        assert server_msg(t).TYPE == t


# --------------------------------------------------------------------------- server receives

# Per state: (outcomes for particular message types, outcome for every other type).
SERVER_RECV_MESSAGES: dict[str, tuple[dict[str, Outcome], Outcome]] = {
    "hello": ({"hello": ok("hello")}, refused("handshake_required", True, "closing")),
    "hello_pending": (
        {"hello": refused("already_joined", False, "hello"), "leave": ok("closing")},
        refused("handshake_required", False, "hello"),
    ),
    "consent": (
        {"consent": ok("consent"), "ping": ok("consent"), "leave": ok("closing")},
        refused("consent_required", False, "consent"),
    ),
    "lobby": (
        {"ping": ok("lobby"), "leave": ok("closing")},
        refused("forbidden", False, "lobby"),
    ),
    "joined": (
        {
            "hello": refused("already_joined", False, "joined"),
            "leave": ok("closing"),
            "pause": ok("paused"),  # the sample is pause true
        },
        ok("joined"),
    ),
    "paused": (
        {
            "hello": refused("already_joined", False, "paused"),
            "leave": ok("closing"),
            "pause": ok("paused"),
        },
        ok("paused"),
    ),
    "closing": ({}, ignored("closing")),
    "closed": ({}, ignored("closed")),
}


@pytest.mark.parametrize("t", sorted(CLIENT_SAMPLES))
@pytest.mark.parametrize("state", STATES)
def test_server_receives_every_client_message(state: str, t: str) -> None:
    c = server_in(state)
    special, default = SERVER_RECV_MESSAGES[state]
    want = special.get(t, default)
    event = c.receive(wire_frame(CLIENT_SAMPLES[t]))
    check(c, event, want, state)
    if isinstance(event, MessageReceived):
        assert event.message == client_msg(t)


# Messages whose fields change the outcome.
OTHER_VERSION = Hello(PROTOCOL_VERSION + 1, "ward-3", "A", 3)
SERVER_RECV_FIELDS: list[tuple[str, Message, Outcome]] = [
    ("hello", OTHER_VERSION, refused("unsupported_version", True, "closing")),
    ("hello", Hello(0, "ward-3", "A", 3), refused("unsupported_version", True, "closing")),
    ("hello_pending", OTHER_VERSION, refused("already_joined", False, "hello")),
    ("consent", Consent("x", False), ok("consent")),  # declining: the server answers fatally
    ("joined", Pause(False), ok("joined")),
    ("joined", Consent("ab" * 32, False), ok("closing")),  # withdrawal: leave and close
    ("joined", Consent("ab" * 32, True), ok("joined")),
    ("joined", OTHER_VERSION, refused("already_joined", False, "joined")),
    ("paused", Pause(False), ok("joined")),
    ("paused", Pause(True), ok("paused")),
    ("paused", Consent("ab" * 32, False), ok("closing")),
    ("paused", Consent("ab" * 32, True), ok("paused")),
    ("lobby", Consent("ab" * 32, True), refused("forbidden", False, "lobby")),
]


@pytest.mark.parametrize(("state", "msg", "want"), SERVER_RECV_FIELDS)
def test_server_receives_messages_whose_fields_matter(
    state: str, msg: Message, want: Outcome
) -> None:
    c = server_in(state)
    check(c, c.receive(encode_message(msg)), want, state)


# Frames other than valid control messages, by name.
SERVER_FRAMES: dict[str, tuple[bytes, bool]] = {
    "pose": (POSE, False),
    "pose_short": (POSE[:-1], False),
    "pose_long": (POSE + b"\0", False),
    "pose_reserved": (POSE[:1] + b"\x01" + POSE[2:], False),
    "pose_mask": (POSE[:2] + b"\x08\x00" + POSE[4:], False),  # slot 3 of a 3-slot avatar
    "state": (bytes((0x02, 0, 0, 0, 0)), False),
    "move": (MOVE, False),
    "kind_7f": (b"\x7f\x00", False),
    "empty": (b"", False),
    "text": (b'{"t": "hello"}', True),
    "control_only": (b"\x01", False),
    "bad_msgpack": (b"\x01\xc1", False),
    "not_a_map": (b"\x01\x93\x01\x02\x03", False),
    "no_type": (wire_frame({"x": 1}), False),
    "unknown_type": (wire_frame({"t": "teleport"}), False),
    "server_type": (encode_message(WELCOME), False),  # not a client message
    "bad_field": (wire_frame({"t": "ping", "id": "1", "client_time": 0.0}), False),
    "out_of_range": (wire_frame({"t": "ping", "id": -1, "client_time": 0.0}), False),
    "oversized": (wire_frame({"t": "moderate", "action": "x" * MAX_CONTROL_BYTES}), False),
}

# Decoding errors of the control frames above, and what the pose checks say.
_DECODE = {
    "control_only": "malformed",
    "bad_msgpack": "malformed",
    "not_a_map": "malformed",
    "no_type": "bad_field",
    "unknown_type": "unknown_type",
    "server_type": "unknown_type",
    "bad_field": "bad_field",
    "out_of_range": "out_of_range",
    "oversized": "oversized",
}
_NOT_CONTROL = ["pose", "pose_short", "pose_long", "pose_reserved", "pose_mask", "state"]
_NOT_CONTROL += ["move", "kind_7f", "empty"]


def _server_frames(state: str) -> dict[str, Outcome]:
    """The expected outcome of every frame of SERVER_FRAMES in ``state``."""
    if state in ("closing", "closed"):
        return {name: ignored(state) for name in SERVER_FRAMES}
    if state == "hello":
        out = {name: refused(code, True, "closing") for name, code in _DECODE.items()}
        out |= {name: refused("malformed", True, "closing") for name in _NOT_CONTROL}
        out["text"] = refused("malformed", True, "closing")
        return out
    if state == "hello_pending":
        out = {name: refused(code, False, "hello") for name, code in _DECODE.items()}
        out |= {name: refused("malformed", False, "hello") for name in _NOT_CONTROL}
        out["text"] = refused("malformed", True, "closing")
        return out
    if state in ("consent", "lobby"):
        code = "consent_required" if state == "consent" else "forbidden"
        out = {name: refused(code, False, state) for name in SERVER_FRAMES}
        out["text"] = refused("malformed", True, "closing")
        return out
    out = {name: refused(code, False, state) for name, code in _DECODE.items()}
    out |= {
        "pose": ("pose",),
        "pose_short": refused("malformed", False, state),
        "pose_long": refused("oversized", False, state),
        "pose_reserved": refused("malformed", False, state),
        "pose_mask": refused("out_of_range", False, state),
        "state": refused("malformed", False, state),
        "move": ("frame", 0x04),
        "kind_7f": ("frame", 0x7F),
        "empty": ignored("empty frame"),
        "text": refused("malformed", False, state),
    }
    if state == "paused":
        for name in ("pose", "pose_short", "pose_long", "pose_reserved", "pose_mask"):
            out[name] = ignored("paused")
    return out


@pytest.mark.parametrize("frame_name", list(SERVER_FRAMES))
@pytest.mark.parametrize("state", STATES)
def test_server_receives_every_kind_of_frame(state: str, frame_name: str) -> None:
    c = server_in(state)
    data, text = SERVER_FRAMES[frame_name]
    want = _server_frames(state)[frame_name]
    event = c.receive(data, text=text)
    check(c, event, want, state)
    if isinstance(event, PoseReceived | FrameReceived):
        assert event.frame == data


def test_server_tables_cover_every_frame() -> None:
    for state in STATES:
        assert set(_server_frames(state)) == set(SERVER_FRAMES)


# --------------------------------------------------------------------------- server sends

# Per state: (resulting state for particular types, for every other server type); None: the
# send raises LocalProtocolError. "error" is a non-fatal error; fatal ones are tested apart.
SERVER_SEND: dict[str, tuple[dict[str, str | None], str | None]] = {
    "hello": ({"error": "hello", "pong": "hello"}, None),
    "hello_pending": (
        {
            "consent_required": "consent",
            "waiting": "lobby",
            "welcome": "joined",
            "error": "hello",
            "pong": "hello",
            "redirect": "closing",
        },
        None,
    ),
    "consent": (
        {
            "waiting": "lobby",
            "welcome": "joined",
            "error": "consent",
            "pong": "consent",
            "redirect": "closing",
        },
        None,
    ),
    "lobby": (
        {"welcome": "joined", "error": "lobby", "pong": "lobby", "redirect": "closing"},
        None,
    ),
    # A move leaves the room: the target room's entry follows as after a hello.
    "joined": (
        {
            "consent_required": None,
            "waiting": None,
            "welcome": "joined",
            "redirect": "closing",
            "moved": "hello",
        },
        "joined",
    ),
    "paused": (
        {
            "consent_required": None,
            "waiting": None,
            "welcome": "joined",
            "redirect": "closing",
            "moved": "hello",
        },
        "paused",
    ),
    "closing": ({}, None),
    "closed": ({}, None),
}


def _assert_send(c: Connection, msg: Message, want: str | None, before: str) -> None:
    hello, slots = c.hello, c.slots
    assert c.accepts(msg) is (want is not None)
    if want is None:
        with pytest.raises(LocalProtocolError):
            c.send(msg)
        assert c.state.value == ("hello" if before == "hello_pending" else before)
        assert (c.hello, c.slots) == (hello, slots)
    else:
        assert c.send(msg) == encode_message(msg)
        assert c.state.value == want


@pytest.mark.parametrize("t", sorted(SERVER_SAMPLES))
@pytest.mark.parametrize("state", STATES)
def test_server_sends_every_server_message(state: str, t: str) -> None:
    special, default = SERVER_SEND[state]
    _assert_send(server_in(state), server_msg(t), special.get(t, default), state)


@pytest.mark.parametrize("state", STATES)
def test_server_sends_a_fatal_error_in_any_state_but_closed(state: str) -> None:
    _assert_send(server_in(state), FATAL, None if state == "closed" else "closing", state)


@pytest.mark.parametrize("t", sorted(CLIENT_SAMPLES))
@pytest.mark.parametrize("state", ["hello_pending", "joined"])
def test_server_never_sends_client_messages(state: str, t: str) -> None:
    _assert_send(server_in(state), client_msg(t), None, state)


# --------------------------------------------------------------------------- client sends

CLIENT_SEND: dict[str, tuple[dict[str, str | None], str | None]] = {
    "hello": ({"hello": "hello"}, None),
    "hello_pending": ({"leave": "closing"}, None),
    "consent": ({"consent": "consent", "ping": "consent", "leave": "closing"}, None),
    "lobby": ({"ping": "lobby", "leave": "closing"}, None),
    # Samples: pause true, consent accept true.
    "joined": ({"hello": None, "leave": "closing", "pause": "paused", "consent": None}, "joined"),
    "paused": ({"hello": None, "leave": "closing", "pause": None, "consent": None}, "paused"),
    "closing": ({}, None),
    "closed": ({}, None),
}


@pytest.mark.parametrize("t", sorted(CLIENT_SAMPLES))
@pytest.mark.parametrize("state", STATES)
def test_client_sends_every_client_message(state: str, t: str) -> None:
    special, default = CLIENT_SEND[state]
    _assert_send(client_in(state), client_msg(t), special.get(t, default), state)


CLIENT_SEND_FIELDS: list[tuple[str, Message, str | None]] = [
    ("consent", Consent("ab" * 32, False), "consent"),  # declining
    ("joined", Pause(False), None),
    ("joined", Consent("ab" * 32, False), "closing"),  # withdrawing consent leaves
    ("paused", Pause(False), "joined"),
    ("paused", Consent("ab" * 32, False), "closing"),
    ("lobby", Consent("ab" * 32, False), None),
    ("hello_pending", Consent("ab" * 32, False), None),
]


@pytest.mark.parametrize(("state", "msg", "want"), CLIENT_SEND_FIELDS)
def test_client_sends_messages_whose_fields_matter(
    state: str, msg: Message, want: str | None
) -> None:
    _assert_send(client_in(state), msg, want, state)


@pytest.mark.parametrize("t", sorted(SERVER_SAMPLES))
@pytest.mark.parametrize("state", ["hello_pending", "joined"])
def test_client_never_sends_server_messages(state: str, t: str) -> None:
    _assert_send(client_in(state), server_msg(t), None, state)


# --------------------------------------------------------------------------- client receives

CLIENT_RECV_MESSAGES: dict[str, tuple[dict[str, Outcome], Outcome]] = {
    # Before our hello only a server's error (or pong) makes sense.
    "hello": (
        {"error": ok("hello"), "pong": ok("hello")},
        refused("handshake_required", False, "hello"),
    ),
    "hello_pending": (
        {
            "consent_required": ok("consent"),
            "waiting": ok("lobby"),
            "welcome": ok("joined"),
            "error": ok("hello"),
            "pong": ok("hello"),
            "redirect": ok("closing"),
        },
        refused("handshake_required", False, "hello"),
    ),
    "consent": (
        {
            "waiting": ok("lobby"),
            "welcome": ok("joined"),
            "error": ok("consent"),
            "pong": ok("consent"),
            "redirect": ok("closing"),
        },
        refused("consent_required", False, "consent"),
    ),
    "lobby": (
        {
            "welcome": ok("joined"),
            "error": ok("lobby"),
            "pong": ok("lobby"),
            "redirect": ok("closing"),
        },
        refused("forbidden", False, "lobby"),
    ),
    "joined": (
        {
            "consent_required": refused("already_joined", False, "joined"),
            "waiting": refused("already_joined", False, "joined"),
            "redirect": ok("closing"),
            "moved": ok("hello"),
        },
        ok("joined"),
    ),
    "paused": (
        {
            "consent_required": refused("already_joined", False, "paused"),
            "waiting": refused("already_joined", False, "paused"),
            "welcome": ok("paused"),  # only our own pause(false) ends the pause
            "redirect": ok("closing"),
            "moved": ok("hello"),
        },
        ok("paused"),
    ),
    "closing": ({}, ignored("closing")),
    "closed": ({}, ignored("closed")),
}


@pytest.mark.parametrize("t", sorted(SERVER_SAMPLES))
@pytest.mark.parametrize("state", STATES)
def test_client_receives_every_server_message(state: str, t: str) -> None:
    c = client_in(state)
    special, default = CLIENT_RECV_MESSAGES[state]
    event = c.receive(wire_frame(SERVER_SAMPLES[t]))
    check(c, event, special.get(t, default), state)
    if isinstance(event, MessageReceived):
        assert event.message == server_msg(t)


@pytest.mark.parametrize("state", STATES)
def test_client_receives_a_fatal_error(state: str) -> None:
    c = client_in(state)
    want = ignored(state) if state in ("closing", "closed") else ok("closing")
    check(c, c.receive(encode_message(FATAL)), want, state)


CLIENT_FRAMES: dict[str, tuple[bytes, bool]] = {
    "state": (bytes((0x02, 0, 0, 0, 0)), False),
    "pose": (POSE, False),
    "move": (MOVE, False),
    "empty": (b"", False),
    "text": (b"hi", True),
    "bad_msgpack": (b"\x01\xc1", False),
    "client_type": (encode_message(HELLO), False),  # not a server message
    "bad_field": (wire_frame({"t": "joined", "member_id": 0.5, "name": "B"}), False),
}


def _client_frames(state: str) -> dict[str, Outcome]:
    if state in ("closing", "closed"):
        return {name: ignored(state) for name in CLIENT_FRAMES}
    after = "hello" if state == "hello_pending" else state
    out = {
        "empty": refused("malformed", False, after),
        "text": refused("malformed", False, after),
        "bad_msgpack": refused("malformed", False, after),
        "client_type": refused("unknown_type", False, after),
        "bad_field": refused("bad_field", False, after),
    }
    if state in ("joined", "paused"):
        return out | {"state": ("state",), "pose": ("frame", 0x03), "move": ("frame", 0x04)}
    return out | {name: refused("malformed", False, after) for name in ("state", "pose", "move")}


@pytest.mark.parametrize("frame_name", list(CLIENT_FRAMES))
@pytest.mark.parametrize("state", STATES)
def test_client_receives_every_kind_of_frame(state: str, frame_name: str) -> None:
    c = client_in(state)
    data, text = CLIENT_FRAMES[frame_name]
    event = c.receive(data, text=text)
    check(c, event, _client_frames(state)[frame_name], state)
    if isinstance(event, StateReceived | FrameReceived):
        assert event.frame == data


def test_client_accepts_large_server_control_frames() -> None:
    c = client_in("hello_pending")
    members = tuple(MemberInfo(i, f"member {i}") for i in range(1, 1000))
    big = Welcome(PROTOCOL_VERSION, 1000, "ward-3", 30, 0, "r", False, members)
    assert len(encode_message(big)) > MAX_CONTROL_BYTES
    assert c.receive(encode_message(big)) == MessageReceived(big)
    over = b"\x01" + bytes(conn_mod.MAX_SERVER_CONTROL_BYTES)
    event = c.receive(over)
    assert isinstance(event, Refused) and event.error.code.value == "oversized"


# --------------------------------------------------------------------------- whole journeys


def test_server_open_room_journey() -> None:
    c = Connection(Role.SERVER)
    assert (c.role, c.state, c.hello, c.slots) == (Role.SERVER, State.HELLO, None, None)
    assert c.receive(encode_message(HELLO)) == MessageReceived(HELLO)
    assert (c.state, c.hello, c.slots) == (State.HELLO, HELLO, 3)
    assert c.send(Error("bad_resume", "joining anew", False)).startswith(b"\x01")
    c.send(WELCOME)
    assert c.state is State.JOINED
    assert c.receive(bytearray(POSE)) == PoseReceived(POSE)
    assert c.receive(memoryview(MOVE)) == FrameReceived(4, MOVE)
    assert c.receive(encode_message(Ping(3, 1.0))) == MessageReceived(Ping(3, 1.0))
    c.send(Pong(3, 1.0, 2.0))
    c.send(Joined(9, "C"))
    assert c.receive(encode_message(Pause(True))) == MessageReceived(Pause(True))
    assert c.state is State.PAUSED
    assert c.receive(POSE) == Ignored("paused")
    c.send(Joined(10, "D"))
    assert c.state is State.PAUSED
    c.receive(encode_message(Pause(False)))
    assert c.state is State.JOINED
    c.send(WELCOME)  # the re-synchronising welcome after a pause
    assert c.state is State.JOINED
    assert c.receive(encode_message(Leave())) == MessageReceived(Leave())
    assert c.state is State.CLOSING
    assert c.receive(POSE) == Ignored("closing")
    assert not c.accepts(Pong)
    assert c.accepts(Error)  # a fatal one
    c.closed()
    assert c.state is State.CLOSED
    assert not c.accepts(Error)


def test_server_consent_then_lobby_then_admitted() -> None:
    c = Connection(Role.SERVER)
    c.receive(encode_message(HELLO))
    c.send(CONSENT_REQUIRED)
    assert c.state is State.CONSENT
    consent = Consent(CONSENT_REQUIRED.version, True)
    assert c.receive(encode_message(consent)) == MessageReceived(consent)
    assert c.state is State.CONSENT
    c.send(WAITING)
    assert c.state is State.LOBBY
    c.send(WELCOME)
    assert c.state is State.JOINED


def test_server_fatal_refusal_closes_at_once() -> None:
    c = Connection(Role.SERVER)
    event = c.receive(encode_message(Ping(1, 0.0)))
    assert isinstance(event, Refused) and event.fatal
    assert event.error.message == "the first message must be hello"
    assert c.state is State.CLOSING
    assert c.receive(encode_message(HELLO)) == Ignored("closing")
    assert c.hello is None
    frame = c.send(Error.of(event.error, True))
    sent = decode_message(frame, SERVER_MESSAGES)
    assert sent == Error("handshake_required", event.error.message, True)
    with pytest.raises(LocalProtocolError):
        c.send(Error.of(event.error, False))  # the fatal one is the last word


def test_server_version_mismatch_records_nothing() -> None:
    c = Connection(Role.SERVER)
    event = c.receive(encode_message(Hello(PROTOCOL_VERSION + 1, "ward-3", "A", 3)))
    assert isinstance(event, Refused) and event.error.code.value == "unsupported_version"
    assert (c.state, c.hello, c.slots) == (State.CLOSING, None, None)


def test_server_pose_size_follows_the_hello_slots() -> None:
    c = Connection(Role.SERVER)
    c.receive(encode_message(Hello(PROTOCOL_VERSION, "r", "A", 1)))
    c.send(WELCOME)
    one = encode_pose(5, [((0.0, 0.0, 0.0), (0.0, 0.0, 0.0, 1.0))])
    assert c.receive(one) == PoseReceived(one)
    event = c.receive(POSE)
    assert isinstance(event, Refused) and event.error.code.value == "oversized"


def test_server_max_control_bytes() -> None:
    c = Connection(Role.SERVER, max_control_bytes=64)
    big = Hello(PROTOCOL_VERSION, "ward-3", "A" * 60, 3)
    event = c.receive(encode_message(big))
    assert isinstance(event, Refused) and event.fatal
    assert event.error.code.value == "oversized"


def test_client_journey_with_consent_lobby_and_pause() -> None:
    c = Connection(Role.CLIENT)
    assert c.accepts(Hello) and not c.accepts(Leave) and not c.accepts(Ping)
    assert c.send(HELLO) == encode_message(HELLO)
    assert (c.state, c.hello, c.slots) == (State.HELLO, HELLO, 3)
    assert not c.accepts(Hello) and c.accepts(Leave)
    c.receive(encode_message(Error("bad_resume", "joining anew", False)))
    assert c.state is State.HELLO
    c.receive(encode_message(CONSENT_REQUIRED))
    assert c.state is State.CONSENT
    assert c.accepts(Consent) and c.accepts(Ping) and not c.accepts(Pause)
    c.send(Consent(CONSENT_REQUIRED.version, True))
    assert c.state is State.CONSENT
    c.send(Ping(1, 0.0))
    c.receive(encode_message(Pong(1, 0.0, 0.0)))
    c.receive(encode_message(WAITING))
    assert c.state is State.LOBBY
    assert not c.accepts(Consent)
    c.receive(encode_message(WELCOME))
    assert c.state is State.JOINED
    assert c.receive(b"\x02\x00") == StateReceived(b"\x02\x00")
    c.send(Pause(True))
    assert c.state is State.PAUSED
    assert c.receive(b"\x02\x01") == StateReceived(b"\x02\x01")  # in flight before the pause
    c.receive(encode_message(WELCOME))  # the welcome of an earlier unpause, crossing ours
    assert c.state is State.PAUSED
    assert c.accepts(Pause) and not c.accepts(Pause(True))
    c.send(Pause(False))
    c.receive(encode_message(WELCOME))
    assert c.state is State.JOINED
    c.send(Consent(CONSENT_REQUIRED.version, False))
    assert c.state is State.CLOSING
    assert c.receive(encode_message(Joined(3, "C"))) == Ignored("closing")


def test_client_join_refused() -> None:
    c = Connection(Role.CLIENT)
    c.send(HELLO)
    refusal = Error("unauthorized", "a join token is required", True)
    assert c.receive(encode_message(refusal)) == MessageReceived(refusal)
    assert c.state is State.CLOSING
    assert not c.accepts(Leave)
    with pytest.raises(LocalProtocolError, match="leave"):
        c.send(Leave())


def test_events_are_frozen_values() -> None:
    event = Ignored("paused")
    with pytest.raises(AttributeError):
        event.reason = "x"  # type: ignore[misc]
    assert not hasattr(event, "__dict__")


# --------------------------------------------------------------------------- vectors

CONNECTION_VECTORS = json.loads(
    (Path(generate.__file__).resolve().parent / "connection.json").read_text(encoding="utf-8")
)


def _from_wire(wire: dict[str, Any]) -> Message:
    cls = CLIENT_MESSAGES.get(wire["t"]) or SERVER_MESSAGES[wire["t"]]
    return cls.from_wire(wire)


def test_connection_vectors_cover_both_roles_and_every_state() -> None:
    cases = CONNECTION_VECTORS["cases"]
    assert {c["role"] for c in cases} == {"server", "client"}
    for role in ("server", "client"):
        seen = {s["state"] for c in cases if c["role"] == role for s in c["steps"]}
        assert seen >= {s.value for s in State} - {"closed"}
    events = {s.get("event") for c in cases for s in c["steps"]}
    assert events >= {"MessageReceived", "PoseReceived", "StateReceived", "FrameReceived"}
    assert events >= {"Refused", "Ignored"}


@pytest.mark.parametrize("case", CONNECTION_VECTORS["cases"], ids=lambda c: c["name"])
def test_connection_vector(case: dict[str, Any]) -> None:
    c = Connection(Role(case["role"]))
    for step in case["steps"]:
        if "send" in step:
            msg = _from_wire(step["send"])
            if step.get("error") == "local":
                with pytest.raises(LocalProtocolError):
                    c.send(msg)
            else:
                c.send(msg)
        elif "recv" in step:
            event = c.receive(bytes.fromhex(step["recv"]), text=step.get("text", False))
            assert type(event).__name__ == step["event"]
            if isinstance(event, Refused):
                assert (event.error.code.value, event.fatal) == (step["code"], step["fatal"])
                answer = getattr(event.error, "answer", None)
                assert (answer.to_wire() if answer is not None else None) == step.get("answer")
            elif isinstance(event, MessageReceived):
                assert event.message.TYPE == step["type"]
            elif isinstance(event, FrameReceived):
                assert event.kind == step["kind"]
            elif isinstance(event, Ignored):
                assert event.reason == step["reason"]
        else:
            assert step == {"closed": True, "state": "closed"}
            c.closed()
        assert c.state.value == step["state"], step


def test_a_request_that_does_not_decode_is_refused_by_its_req() -> None:
    """A request whose fields are wrong but whose own ``req`` is valid is answered with its
    family's refusal naming that req (``refused``, or ``obj_refused`` for objects), so the
    client's call fails at once; without a usable req it is a plain error."""
    from medverse.protocol.messages import RequestError, RequestRefused
    from medverse.protocol.objects import ObjectRefused

    c = server_in("joined")
    ev = c.receive(wire_frame({"t": "moderate", "action": "zap", "req": 9}))
    assert isinstance(ev, Refused) and not ev.fatal and isinstance(ev.error, RequestError)
    assert ev.error.answer == RequestRefused(9, "out_of_range", ev.error.message)
    assert c.accepts(ev.error.answer)
    spawn = {**CLIENT_SAMPLES["obj_spawn"], "asset": "nothex", "req": 4}
    ev = c.receive(wire_frame(spawn))
    assert isinstance(ev, Refused) and isinstance(ev.error, RequestError)
    assert ev.error.answer == ObjectRefused(4, "out_of_range", ev.error.message)
    for wire in (
        {"t": "moderate", "action": "zap"},
        {"t": "moderate", "action": "zap", "req": -1},
        {"t": "moderate", "action": "zap", "req": True},
        {"t": "ping", "id": "x", "client_time": 0.0, "req": 1},  # not a request type
    ):
        ev = c.receive(wire_frame(wire))
        assert isinstance(ev, Refused) and not isinstance(ev.error, RequestError), wire
    assert c.state is State.JOINED


def test_a_member_that_declines_a_moved_to_rooms_consent_is_moved_back() -> None:
    """Both ends: ``moved`` is allowed in state consent only while moving (a decline after a
    move takes the member back), not at a first join's consent."""
    back = Moved("waiting", "Dr A", "consent_declined")
    server, client = server_in("joined"), client_in("joined")
    for msg in (Moved("consult-1", "Dr A", "called"), CONSENT_REQUIRED):
        client.receive(server.send(msg))
    client.send(Consent(CONSENT_REQUIRED.version, False))
    assert server.state is client.state is State.CONSENT
    assert server.accepts(Moved) and client.receive(server.send(back)) == MessageReceived(back)
    assert server.state is client.state is State.HELLO
    client.receive(server.send(WELCOME))
    assert (server.state, client.moving) == (State.JOINED, False)

    first = server_in("consent")
    assert not first.accepts(Moved)
    with pytest.raises(LocalProtocolError):
        first.send(back)
    refused = client_in("consent").receive(encode_message(back))
    assert isinstance(refused, Refused)
