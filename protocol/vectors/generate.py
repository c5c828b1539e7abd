"""Writes the protocol test vectors: ``python -m protocol.vectors.generate``.

``quantization.json``: float poses in, integer codes and dequantized values out.
``snapshots.json``: named sequences of quantized snapshots and the exact state frames that
:class:`protocol.SnapshotEncoder` produces for them. Both files are deterministic; the tests in
``tests/test_vectors.py`` check the codec against them byte for byte, in both directions.
``connection.json``: scripted sequences of frames received and messages sent by either end of
a connection, with the event and state :class:`protocol.Connection` gives after each step
(replayed by ``tests/test_connection.py``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

from medverse.protocol.clinic import Access, Called, Moved, Queue
from medverse.protocol.connection import (
    Connection,
    Event,
    FrameReceived,
    Ignored,
    LocalProtocolError,
    MessageReceived,
    Refused,
    Role,
)
from medverse.protocol.images import (
    ImageAck,
    ImageRefused,
    ImagesSynced,
    LinkPanel,
    Locate,
    Measure,
    MeasurementDeleted,
    MeasurementState,
    OpenPanel,
    PanelClosed,
    PanelState,
    Point,
    Pointers,
    SetImageView,
)
from medverse.protocol.messages import (
    PROTOCOL_VERSION,
    Ack,
    ChangeRole,
    Consent,
    ConsentRequired,
    Error,
    Hello,
    Joined,
    Leave,
    MemberInfo,
    Message,
    Moderate,
    Pause,
    Ping,
    Pong,
    Redirect,
    RequestError,
    RequestRefused,
    Waiting,
    Welcome,
    encode_message,
    encode_pose,
)
from medverse.protocol.quant import (
    POSITION_LIMIT_M,
    dequantize_positions,
    dequantize_rotations,
    quantize_positions,
    quantize_rotations,
)
from medverse.protocol.snapshot import Snapshot, SnapshotEncoder

HERE = Path(__file__).resolve().parent
H = math.sqrt(0.5)


# --------------------------------------------------------------------------- quantization


def _positions() -> list[list[float]]:
    lim = POSITION_LIMIT_M
    return [
        [0.0, 0.0, 0.0],
        [-0.0, 0.0004, -0.0004],
        [0.0005, -0.0005, 0.0015],
        [0.0025, -0.0025, 0.0006],
        [1.2345, -2.5, 0.1],
        [lim, -lim, 0.0],
        [lim - 0.0004, -lim + 0.0004, lim - 0.0005],
        [1.7, 1.0, -3.25],
    ]


def _quaternions() -> list[list[float]]:
    e = 1e-7
    fixed = [
        [0.0, 0.0, 0.0, 1.0],
        [0.0, 0.0, 0.0, -1.0],  # the same rotation, sign-flipped
        [1.0, 0.0, 0.0, 0.0],
        [0.0, -1.0, 0.0, 0.0],
        [H, 0.0, 0.0, H],  # two-way tie for the largest component
        [-H, 0.0, 0.0, -H],
        [H, 0.0, 0.0, -H],
        [0.5, 0.5, 0.5, 0.5],  # four-way tie
        [-0.5, -0.5, -0.5, -0.5],
        [0.5, -0.5, 0.5, -0.5],
        [0.5 + e, 0.5, 0.5, 0.5 - e],  # near ties: the tiny difference decides the index
        [0.5 - e, 0.5, 0.5, 0.5 + e],
        [0.5, 0.5 + e, -0.5, 0.5],
        [H + e, H - e, 0.0, 0.0],
        [0.1, 0.2, 0.3, 0.9],  # not unit: normalized first
        [-0.1, -0.2, -0.3, -0.9],
        [0.0, 0.0, 0.3826834323650898, 0.9238795325112867],  # 45 degrees about z
        [0.0, 0.0, -0.3826834323650898, -0.9238795325112867],
    ]
    rng = np.random.default_rng(20240601)
    rand = rng.normal(size=(12, 4))
    rand /= np.linalg.norm(rand, axis=1, keepdims=True)
    out = fixed + [[float(x) for x in q] for q in rand]
    out += [[-float(x) for x in q] for q in rand[:4]]
    return out


def quantization_vectors() -> dict[str, Any]:
    positions = _positions()
    quats = _quaternions()
    qpos = quantize_positions(np.array(positions))
    dpos = dequantize_positions(qpos)
    index, comps = quantize_rotations(np.array(quats))
    dq = dequantize_rotations(index, comps)
    return {
        "description": (
            "Pose quantization (SPEC.md, 'Pose quantization'). Positions: metres in, integer "
            "millimetres out, then back to metres. Rotations: (x, y, z, w) in; rot_index is the "
            "index of the dropped largest component, rot the three 10-bit codes of the others in "
            "ascending index order, packed = rot_index << 30 | rot[0] << 20 | rot[1] << 10 | "
            "rot[2]; dequantized is the unit quaternion rebuilt from the codes."
        ),
        "positions": [
            {"in": p, "mm": [int(v) for v in qp], "dequantized": [float(v) for v in dp]}
            for p, qp, dp in zip(positions, qpos, dpos, strict=True)
        ],
        "rotations": [
            {
                "in": q,
                "rot_index": int(i),
                "rot": [int(v) for v in c],
                "packed": (int(i) << 30) | (int(c[0]) << 20) | (int(c[1]) << 10) | int(c[2]),
                "dequantized": [float(v) for v in d],
            }
            for q, i, c, d in zip(quats, index, comps, dq, strict=True)
        ],
    }


# --------------------------------------------------------------------------- snapshots

# One entity: (id, flags, rows); a row is None (absent) or (x, y, z, rot_index, c0, c1, c2).
Row = tuple[int, int, int, int, int, int, int] | None
Entity = tuple[int, int, list[Row]]

IDENT = (3, 511, 511, 511)  # near-identity rotation: w dropped, x y z codes near zero


def snapshot_from(entities: list[Entity]) -> Snapshot:
    entities = sorted(entities, key=lambda e: e[0])
    rows = [r for _, _, rs in entities for r in rs]
    present = [r is not None for r in rows]
    full = [r if r is not None else (0, 0, 0, 0, 0, 0, 0) for r in rows]
    return Snapshot(
        ids=np.array([e[0] for e in entities], np.uint64),
        slots=np.array([len(e[2]) for e in entities], np.uint8),
        flags=np.array([e[1] for e in entities], np.uint8),
        present=np.array(present, np.bool_),
        pos=np.array([r[:3] for r in full], np.int64).reshape(-1, 3),
        rot_index=np.array([r[3] for r in full], np.uint8),
        rot=np.array([r[4:] for r in full], np.int64).reshape(-1, 3),
    )


def snapshot_to_json(s: Snapshot) -> dict[str, Any]:
    return {
        "ids": [int(v) for v in s.ids],
        "slots": [int(v) for v in s.slots],
        "flags": [int(v) for v in s.flags],
        "present": [int(v) for v in s.present],
        "pos": [[int(v) for v in r] for r in s.pos],
        "rot_index": [int(v) for v in s.rot_index],
        "rot": [[int(v) for v in r] for r in s.rot],
    }


def snapshot_from_json(d: dict[str, Any]) -> Snapshot:
    return Snapshot(
        ids=np.array(d["ids"], np.uint64),
        slots=np.array(d["slots"], np.uint8),
        flags=np.array(d["flags"], np.uint8),
        present=np.array(d["present"], np.bool_),
        pos=np.array(d["pos"], np.int64).reshape(-1, 3),
        rot_index=np.array(d["rot_index"], np.uint8),
        rot=np.array(d["rot"], np.int64).reshape(-1, 3),
    )


def _r(x: int, y: int, z: int, rot: tuple[int, int, int, int] = IDENT) -> Row:
    return (x, y, z, *rot)


# A case is a list of steps: (tick, entities) encodes a tick; ("keyframe",) asks the encoder
# for a keyframe of the last encoded tick, as a member joining mid-stream gets.
Step = tuple[int, list[Entity]] | tuple[str]


def _avatar(eid: int, x: int, flags: int = 0, rot: tuple[int, int, int, int] = IDENT) -> Entity:
    """Head and two hands."""
    return (eid, flags, [_r(x, 1600, 0, rot), _r(x - 250, 1100, 150), _r(x + 250, 1100, 150)])


def _cases() -> list[tuple[str, str, list[Step]]]:
    prop = (42, 0, [_r(500, 900, -1200, (3, 600, 400, 520))])
    moving = [(7, 1, [_r(1000 + 10 * t, 1600, -5 * t)]) for t in range(5)]
    return [
        (
            "keyframe",
            "First frame: a keyframe of a one-slot prop and a three-slot avatar with one hand "
            "absent and a flag set.",
            [
                (
                    100,
                    [
                        prop,
                        (3, 2, [_r(0, 1600, 0), None, _r(250, 1100, 150, (0, 500, 520, 530))]),
                    ],
                )
            ],
        ),
        (
            "empty_room",
            "An empty room: keyframe, then a delta with nothing in it.",
            [(1, []), (2, [])],
        ),
        (
            "no_change",
            "Nothing moves: one changed bit (0) per entity.",
            [(10, [prop, _avatar(3, 0)]), (11, [prop, _avatar(3, 0)])],
        ),
        (
            "steady_motion",
            "An entity moving at constant velocity: the first delta sets the velocity "
            "(RESIDUAL), the next ones are predicted exactly (changed bit 0).",
            [(t + 1, [moving[t]]) for t in range(4)],
        ),
        (
            "residual_motion",
            "Accelerating position and a turning rotation: RESIDUAL rows every tick.",
            [
                (50, [_avatar(9, 0)]),
                (51, [_avatar(9, 3, rot=(3, 512, 511, 510))]),
                (52, [_avatar(9, 9, rot=(3, 514, 510, 508))]),
                (53, [_avatar(9, 18, rot=(3, 513, 511, 508))]),
            ],
        ),
        (
            "rotation_index_change",
            "The largest quaternion component changes: ABSOLUTE row, rotation velocity reset.",
            [
                (7, [(5, 0, [_r(0, 0, 0, (3, 1000, 511, 511))])]),
                (8, [(5, 0, [_r(1, 0, 0, (3, 1010, 511, 511))])]),
                (9, [(5, 0, [_r(2, 0, 0, (0, 12, 511, 511))])]),
                (10, [(5, 0, [_r(3, 0, 0, (0, 12, 511, 511))])]),
            ],
        ),
        (
            "pose_disappears_and_reappears",
            "A hand loses tracking (ABSENT), stays absent (SAME), comes back (ABSOLUTE).",
            [
                (20, [_avatar(4, 0)]),
                (21, [(4, 0, [_r(0, 1600, 0), None, _r(250, 1100, 150)])]),
                (22, [(4, 0, [_r(0, 1600, 0), None, _r(250, 1100, 150)])]),
                (23, [(4, 0, [_r(0, 1600, 0), _r(-240, 1120, 160), _r(250, 1100, 150)])]),
            ],
        ),
        (
            "join_and_leave",
            "Entities join and leave inside deltas; entity 8 changes its slot count (removed "
            "and added again in one frame); entity 4294967295 uses the largest id.",
            [
                (30, [prop, _avatar(3, 0), (8, 0, [_r(10, 20, 30)])]),
                (
                    31,
                    [
                        _avatar(3, 0),
                        _avatar(8, 100, flags=4),
                        (4294967295, 0, [_r(-7, -8, -9), None]),
                    ],
                ),
                (32, [_avatar(3, 0), (12, 1, [None]), (4294967295, 0, [_r(-7, -8, -9), None])]),
                (33, []),
            ],
        ),
        (
            "flag_changes",
            "Flags change on some entities while poses stay put.",
            [
                (60, [(1, 0, [_r(0, 0, 0)]), (2, 5, [_r(1, 1, 1)]), (6, 0, [_r(2, 2, 2)])]),
                (61, [(1, 3, [_r(0, 0, 0)]), (2, 5, [_r(1, 1, 1)]), (6, 255, [_r(2, 2, 2)])]),
                (62, [(1, 0, [_r(0, 0, 0)]), (2, 0, [_r(1, 1, 1)]), (6, 255, [_r(2, 2, 2)])]),
            ],
        ),
        (
            "late_join",
            "A keyframe taken mid-stream carries the velocities, so the deltas that follow "
            "apply to it.",
            [(t + 200, [moving[t]]) for t in range(3)]
            + [("keyframe",), (203, [moving[3]]), (204, [moving[4]])],
        ),
        (
            "tick_gap_resets",
            "A tick gap over 255 cannot be a delta: the encoder sends a keyframe.",
            [(1000, [prop]), (1001, [prop]), (1300, [prop]), (1301, [prop])],
        ),
    ]


def snapshot_vectors() -> dict[str, Any]:
    cases = []
    for name, description, steps in _cases():
        enc = SnapshotEncoder()
        out_steps = []
        last: Snapshot | None = None
        for step in steps:
            if step[0] == "keyframe":
                assert last is not None and enc.tick is not None
                frame = enc.keyframe()
                out_steps.append(
                    {
                        "action": "keyframe",
                        "tick": enc.tick,
                        "snapshot": snapshot_to_json(last),
                        "frame": frame.hex(),
                    }
                )
                continue
            tick, entities = step
            assert isinstance(tick, int) and isinstance(entities, list)
            last = snapshot_from(entities)
            frame = enc.encode(tick, last)
            out_steps.append(
                {
                    "action": "encode",
                    "tick": tick,
                    "snapshot": snapshot_to_json(last),
                    "frame": frame.hex(),
                }
            )
        cases.append({"name": name, "description": description, "steps": out_steps})
    return {
        "description": (
            "State frames (SPEC.md, 'State frames'). Each case runs one encoder from scratch: "
            "'encode' steps give the snapshot encoded at that tick and the exact frame; "
            "'keyframe' steps give the encoder's keyframe of the last encoded tick. Feeding "
            "every frame of a case in order to one decoder yields each step's snapshot. Rows "
            "are flattened in entity order then slot order; absent rows carry zeros."
        ),
        "cases": cases,
    }


# --------------------------------------------------------------------------- connection

# A script step: ("recv", frame) a binary message from the peer, ("text", data) a text message,
# ("send", message) this end sends, ("closed",) the transport went away.
ConnStep = tuple[str] | tuple[str, bytes] | tuple[str, Message]

_HELLO = Hello(PROTOCOL_VERSION, "ward-3", "Dr A", 3, None, "token")
_WELCOME = Welcome(PROTOCOL_VERSION, 7, "ward-3", 30, 1200, "r" * 32, False, (MemberInfo(2, "B"),))
_REDIRECT = Redirect("wss://node-b.example/ws", "owner")
_CONSENT_TEXT = ConsentRequired("ab" * 32, "Nothing of this room is recorded.")
_POSE = encode_pose(1, [((0.0, 1.6, 0.0), (0.0, 0.0, 0.0, 1.0)), None, None])
_MOVE = bytes((0x04, 0, 0, 0, 1, 0, 0, 0)) + bytes(36)
_STATE = bytes((0x02, 0x00, 0xB0, 0x04, 0x00, 0x00))  # opaque here: the machine only routes it
_SERIES = "5e" * 32
_PANEL = PanelState(
    1,
    _SERIES,
    (0.0, 1.5, -1.0),
    (0.0, 0.0, 0.0, 1.0),
    0.6,
    "axial",
    (150, 256, 256),
    (40.0, 400.0),
    1.0,
    (0.0, 0.0),
    0,
    None,
    7,
)
_MEASUREMENT = MeasurementState(
    1,
    _SERIES,
    "roi",
    ((0.0, 0.0, 50.0), (9.5, 0.0, 50.0), (0.0, 9.5, 50.0)),
    45.125,
    "B",
    2,
    1796000000.5,
    1,
    "lesion",
    61.25,
    3.5,
    55.0,
    70.0,
    92,
    "HU",
)


def _c(msg: Message) -> ConnStep:
    return ("recv", encode_message(msg))


def _wire(data: dict[str, Any]) -> bytes:
    """A control frame straight from a wire map (for maps no message class would build)."""
    return bytes((0x01,)) + msgpack.packb(data, use_bin_type=True)


def _conn_cases() -> list[tuple[str, str, str, list[ConnStep]]]:
    """(name, description, role, steps)."""
    consent = Consent(_CONSENT_TEXT.version, True)
    return [
        (
            "server_open_room",
            "Hello, a non-fatal bad_resume then welcome; poses, a ping, a pause (poses "
            "ignored), the way back (a fresh welcome), leave; nothing counts after it.",
            "server",
            [
                _c(_HELLO),
                ("send", Error("bad_resume", "cannot resume; joining anew", False)),
                ("send", _WELCOME),
                ("recv", _POSE),
                _c(Ping(1, 0.25)),
                ("send", Pong(1, 0.25, 40.0)),
                ("send", Joined(9, "C")),
                ("recv", _MOVE),
                _c(Pause(True)),
                ("recv", _POSE),
                _c(Pause(False)),
                ("send", _WELCOME),
                _c(Leave()),
                ("recv", _POSE),
                ("send", Pong(2, 0.0, 41.0)),
                ("closed",),
            ],
        ),
        (
            "server_consent_and_lobby",
            "Consent asked, then the lobby, then admitted; what each state refuses.",
            "server",
            [
                _c(_HELLO),
                ("send", _CONSENT_TEXT),
                ("recv", _POSE),
                _c(Moderate("lock")),
                ("recv", b"\x01\xc1"),
                _c(Ping(1, 0.5)),
                ("send", Pong(1, 0.5, 0.0)),
                _c(consent),
                ("send", Waiting("ward-3", 4)),
                _c(consent),
                ("recv", _POSE),
                _c(Ping(2, 0.5)),
                ("send", Welcome(PROTOCOL_VERSION, 8, "ward-3", 30, 1500, "s" * 32, False, ())),
                ("recv", _POSE),
            ],
        ),
        (
            "server_moved",
            "A member is moved to another room (after being told it is called): the target "
            "room's consent follows as after a hello; poses and plugin frames sent before the "
            "member knew are ignored until the new welcome; then moved again while paused.",
            "server",
            [
                _c(_HELLO),
                ("send", _WELCOME),
                ("send", Queue(1, 1, "Welcome", 600)),
                ("recv", _POSE),
                ("send", Called("consult-1", "Dr A")),
                ("send", Moved("consult-1", "Dr A", "called")),
                ("recv", _POSE),
                ("send", _CONSENT_TEXT),
                ("recv", _POSE),
                ("recv", _MOVE),
                _c(Ping(1, 0.5)),
                _c(consent),
                ("send", Welcome(PROTOCOL_VERSION, 2, "consult-1", 30, 90, "t" * 32, False, ())),
                ("recv", _POSE),
                _c(Pause(True)),
                ("send", Moved("waiting", "Dr A", "sent back", "eyJhbGciOiJIUzI1NiJ9.e30.c2ln")),
                ("send", Moved("waiting", "Dr A", "twice")),
                ("send", Welcome(PROTOCOL_VERSION, 5, "waiting", 30, 95, "u" * 32, False, ())),
                ("recv", _POSE),
            ],
        ),
        (
            "server_first_frame_not_hello",
            "A ping first: fatal handshake_required; the server sends the fatal error and "
            "reads nothing more.",
            "server",
            [
                _c(Ping(1, 0.0)),
                _c(_HELLO),
                ("send", Error("handshake_required", "the first message must be hello", True)),
                ("send", Error("internal", "too late", False)),
            ],
        ),
        (
            "server_first_frame_pose",
            "A pose first is not a control frame: fatal malformed.",
            "server",
            [("recv", _POSE)],
        ),
        (
            "server_first_frame_text",
            "A text message first: fatal malformed.",
            "server",
            [("text", b'{"t":"hello"}')],
        ),
        (
            "server_wrong_version",
            "A hello of another protocol version: fatal unsupported_version.",
            "server",
            [_c(Hello(PROTOCOL_VERSION + 1, "ward-3", "Dr A", 3))],
        ),
        (
            "server_hello_pending",
            "Before the server answers a hello: a second hello and a ping are refused "
            "(non-fatal), leave is taken.",
            "server",
            [
                _c(_HELLO),
                _c(_HELLO),
                _c(Ping(1, 0.0)),
                ("recv", b"\x01\x80"),
                _c(Leave()),
            ],
        ),
        (
            "server_joined_refusals",
            "What a joined member gets refused (all non-fatal) or passed on as a frame, and "
            "consent withdrawn (the server closes).",
            "server",
            [
                _c(_HELLO),
                ("send", _WELCOME),
                ("recv", _POSE[:-4]),
                ("recv", _POSE + b"\x00"),
                ("recv", _POSE[:2] + b"\x08\x00" + _POSE[4:]),
                ("recv", _STATE),
                ("recv", b"\x7f"),
                ("recv", b""),
                ("text", b"hi"),
                _c(_HELLO),
                ("recv", b"\x01\x81\xa1t\xa8teleport"),
                _c(ChangeRole(2, "host")),
                ("send", Error("forbidden", "needs the moderate grant", False)),
                ("send", _CONSENT_TEXT),
                _c(Consent(_CONSENT_TEXT.version, False)),
                ("recv", _POSE),
            ],
        ),
        (
            "server_acknowledged_requests",
            "Requests that carry req get one answer each: ack when applied, refused naming "
            "the req when not; a request that does not decode but whose req is valid is "
            "refused by name (refused, or obj_refused for objects); without req, a plain "
            "error as before.",
            "server",
            [
                _c(_HELLO),
                ("send", _WELCOME),
                _c(Moderate("lock", None, None, None, 1)),
                ("send", Ack(1)),
                _c(ChangeRole(2, "host", None, None, 2)),
                ("send", RequestRefused(2, "forbidden", "role participant may not moderate")),
                _c(Pause(True, 3)),
                ("send", Ack(3)),
                _c(Pause(False, 4)),
                ("send", _WELCOME),
                ("send", Ack(4)),
                ("recv", _wire({"t": "moderate", "action": "zap", "req": 5})),
                ("send", RequestRefused(5, "out_of_range", "action has characters not allowed")),
                (
                    "recv",
                    _wire(
                        {
                            "t": "obj_spawn",
                            "req": 6,
                            "asset": "nothex",
                            "position": [0.0, 0.0, 0.0],
                            "rotation": [0.0, 0.0, 0.0, 1.0],
                            "scale": 1.0,
                        }
                    ),
                ),
                ("recv", _wire({"t": "moderate", "action": "zap"})),
                _c(Moderate("mute", 2)),
                ("send", Error("not_found", "no such member", False)),
            ],
        ),
        (
            "client_acknowledged_requests",
            "A client sends requests with req and takes ack and refused in the room.",
            "client",
            [
                ("send", _HELLO),
                _c(Ack(1)),
                _c(_WELCOME),
                ("send", Moderate("lock", None, None, None, 1)),
                _c(Ack(1)),
                ("send", Pause(True, 2)),
                _c(RequestRefused(2, "forbidden", "no")),
            ],
        ),
        (
            "server_image_viewer",
            "Image viewer requests in the room: each decoded with its fields, a pointer (no "
            "req), a request that does not decode but names its req (refused with "
            "img_refused), a pointer with a bad id (a plain error), and the server's image "
            "messages sent.",
            "server",
            [
                _c(_HELLO),
                ("send", _WELCOME),
                _c(OpenPanel(1, _SERIES, (0.0, 1.5, -1.0), (0.0, 0.0, 0.0, 1.0), 0.6)),
                ("send", ImageAck(1, 1)),
                ("send", _PANEL),
                _c(SetImageView(2, 1, None, "coronal", (40, 200, 256), (40.0, 400.0), 2.0)),
                _c(SetImageView(3, 1, None, None, None, None, None, (0.25, -0.5))),
                _c(Point(1, (12.5, -30.0, 101.25))),
                _c(Point(0)),
                _c(LinkPanel(4, 1, 3, "1.2.826.0.1.3680043.8.498.2001")),
                _c(Locate(5, 1, (0.01, -0.02, 0.1))),
                _c(
                    Measure(
                        6, _SERIES, "roi", ((0.0, 0.0, 50.0), (9.5, 0.0, 50.0), (0.0, 9.5, 50.0))
                    )
                ),
                (
                    "recv",
                    _wire({"t": "img_view", "req": 7, "panel_id": 1, "slices": [1, 2, 70000]}),
                ),
                (
                    "recv",
                    _wire({"t": "img_view", "req": 8, "panel_id": 1, "window": [40.0, 0.5]}),
                ),
                ("recv", _wire({"t": "img_pointer", "panel_id": -1})),
                ("send", Pointers(((2, 1, 12.5, -30.0, 101.25), (7, 0, 0.0, 0.0, 0.0)))),
                ("send", _MEASUREMENT),
                ("send", MeasurementDeleted(1, 2)),
                ("send", PanelClosed(1, 7)),
                ("send", ImagesSynced(0, 0)),
            ],
        ),
        (
            "client_image_viewer",
            "A client receives panels, pointers and measurements, and sends image requests.",
            "client",
            [
                ("send", _HELLO),
                _c(_WELCOME),
                _c(_PANEL),
                _c(_MEASUREMENT),
                _c(ImagesSynced(1, 1)),
                ("send", SetImageView(1, 1, slices=(41, 256, 256))),
                _c(ImageAck(1, 1)),
                ("send", Measure(2, _SERIES, "distance", ((0.0, 0.0, 0.0), (1.0, 0.0, 0.0)))),
                _c(ImageRefused(2, "out_of_range", "a point lies outside the series' volume")),
                _c(Pointers(((2, 1, 12.5, -30.0, 101.25),))),
                _c(PanelClosed(1)),
            ],
        ),
        (
            "server_lobby_text",
            "A text message in the lobby is fatal (as before any welcome).",
            "server",
            [_c(_HELLO), ("send", Waiting("ward-3", 1)), ("text", b"hi")],
        ),
        (
            "server_sends_out_of_turn",
            "Sends the state does not allow raise a local error and change nothing.",
            "server",
            [
                ("send", _WELCOME),
                ("send", Joined(9, "C")),
                ("send", _HELLO),
                _c(_HELLO),
                ("send", Joined(9, "C")),
                ("send", _CONSENT_TEXT),
                ("send", _CONSENT_TEXT),
                ("send", _WELCOME),
                ("send", Waiting("ward-3", 1)),
                ("send", Error("removed", "a host removed you", True)),
                ("send", Error("internal", "late", False)),
                ("closed",),
                ("send", Error("shutting_down", "bye", True)),
            ],
        ),
        (
            "client_join",
            "Hello, welcome, state frames, a pause with frames in flight and a crossing "
            "welcome, back in, leave.",
            "client",
            [
                ("send", Ping(1, 0.0)),
                ("send", Leave()),
                ("send", _HELLO),
                ("send", _HELLO),
                ("send", Ping(1, 0.0)),
                _c(_WELCOME),
                ("recv", _STATE),
                _c(Joined(9, "C")),
                ("send", Pause(True)),
                ("recv", _STATE),
                _c(_WELCOME),
                ("send", Pause(True)),
                ("send", Pause(False)),
                _c(_WELCOME),
                ("send", Pause(False)),
                ("send", Leave()),
                ("recv", _STATE),
                ("send", Leave()),
            ],
        ),
        (
            "client_consent_and_lobby",
            "Consent, the lobby, admitted; out-of-place server messages are refused "
            "(non-fatal); consent withdrawn at the end.",
            "client",
            [
                ("send", _HELLO),
                _c(Joined(9, "C")),
                ("recv", _STATE),
                _c(_CONSENT_TEXT),
                ("send", Moderate("lock")),
                ("send", consent),
                ("send", Ping(1, 0.5)),
                _c(Pong(1, 0.5, 0.0)),
                _c(Joined(9, "C")),
                _c(Waiting("ward-3", 2)),
                ("send", consent),
                _c(_CONSENT_TEXT),
                _c(Joined(9, "C")),
                _c(_WELCOME),
                _c(Waiting("ward-3", 2)),
                ("send", Consent(_CONSENT_TEXT.version, True)),
                ("send", Consent(_CONSENT_TEXT.version, False)),
            ],
        ),
        (
            "client_moved",
            "Moved out of a room: the target room's lobby, then its welcome; moved again into "
            "a room that asks for consent; no ping between the move and the next answer.",
            "client",
            [
                ("send", _HELLO),
                _c(_WELCOME),
                _c(Called("consult-1", "Dr A")),
                _c(Moved("consult-1", "Dr A", "called")),
                ("recv", _STATE),
                ("send", Ping(1, 0.5)),
                _c(Waiting("consult-1", 3)),
                _c(Moved("consult-2", "Dr A", "again")),
                _c(_WELCOME),
                _c(Moved("consult-2", "Dr B", "")),
                _c(_CONSENT_TEXT),
                ("send", consent),
                _c(_WELCOME),
                ("recv", _STATE),
            ],
        ),
        (
            "client_moved_consent_declined",
            "Moved into a room that asks for consent and declined: the server moves the member "
            "back (a moved in state consent, only while moving), then the old room's welcome. "
            "At a first join a moved in state consent is refused.",
            "client",
            [
                ("send", _HELLO),
                _c(_WELCOME),
                _c(Moved("consult-1", "Dr A", "called")),
                _c(_CONSENT_TEXT),
                ("send", Consent(_CONSENT_TEXT.version, False)),
                _c(Moved("waiting", "Dr A", "consent_declined")),
                _c(_WELCOME),
                ("recv", _STATE),
            ],
        ),
        (
            "client_first_consent_then_moved",
            "A moved while answering a first join's consent is out of place.",
            "client",
            [
                ("send", _HELLO),
                _c(_CONSENT_TEXT),
                ("send", Consent(_CONSENT_TEXT.version, False)),
                _c(Moved("waiting", "Dr A", "consent_declined")),
            ],
        ),
        (
            "client_refused",
            "A server error before hello (non-fatal), then a fatal refusal of the join.",
            "client",
            [
                _c(Error("rate_limited", "slow down", False)),
                _c(_WELCOME),
                ("send", _HELLO),
                _c(Error("unauthorized", "a join token is required", True)),
                _c(_WELCOME),
                ("send", Leave()),
            ],
        ),
        (
            "server_redirect",
            "Before the hello a redirect is not allowed; after it the server redirects (the "
            "room lives on another server) and reads nothing more.",
            "server",
            [
                ("send", _REDIRECT),
                _c(_HELLO),
                ("send", _REDIRECT),
                ("recv", _POSE),
                _c(Ping(1, 0.0)),
                ("send", _WELCOME),
            ],
        ),
        (
            "server_redirect_members",
            "A room moving to another server: its joined and paused members are redirected.",
            "server",
            [
                _c(_HELLO),
                ("send", _WELCOME),
                _c(Pause(True)),
                ("send", Redirect("wss://node-b.example/ws", "moving")),
                _c(Pause(False)),
            ],
        ),
        (
            "server_moved_to_another_server",
            "A member moved to a room another server of the cluster runs: moved (with its room "
            "access credential), then a redirect of reason transfer carrying the transfer "
            "grant to send as the next hello's token; the server reads nothing more.",
            "server",
            [
                _c(_HELLO),
                ("send", _WELCOME),
                ("send", Moved("ward-9", "Dr A", "review", "eyJhbGciOiJIUzI1NiJ9.e30.YWNj")),
                ("recv", _POSE),
                (
                    "send",
                    Redirect(
                        "wss://node-b.example/ws", "transfer", "eyJhbGciOiJIUzI1NiJ9.e30.Z3Jh"
                    ),
                ),
                _c(Ping(1, 0.0)),
            ],
        ),
        (
            "client_redirect",
            "A redirect answers the hello: the client closes and joins at the URL it names; "
            "a redirect in the room (the room moves) likewise; out of place before the hello.",
            "client",
            [
                _c(_REDIRECT),
                ("send", _HELLO),
                _c(_REDIRECT),
                _c(_WELCOME),
                ("send", Leave()),
            ],
        ),
        (
            "client_redirect_in_room",
            "Joined, then the room moves to another server.",
            "client",
            [
                ("send", _HELLO),
                _c(_WELCOME),
                ("recv", _STATE),
                _c(Redirect("ws://127.0.0.1:9001/ws", "moving")),
                ("recv", _STATE),
            ],
        ),
        (
            "server_access_refreshed",
            "A moved member's room access credential is refreshed in the room with access "
            "(joined and paused); not while waiting in the target room's lobby.",
            "server",
            [
                _c(_HELLO),
                ("send", _WELCOME),
                ("send", Moved("ward-9", "Dr A", "review", "eyJhbGciOiJIUzI1NiJ9.e30.YWNj")),
                ("send", Waiting("ward-9", 3)),
                ("send", Access("ward-9", "eyJhbGciOiJIUzI1NiJ9.e30.bG9i")),
                ("send", Welcome(PROTOCOL_VERSION, 4, "ward-9", 30, 10, "v" * 32, False, ())),
                ("send", Access("ward-9", "eyJhbGciOiJIUzI1NiJ9.e30.MQ")),
                _c(Pause(True)),
                ("send", Access("ward-9", "eyJhbGciOiJIUzI1NiJ9.e30.Mg")),
            ],
        ),
        (
            "client_access_refreshed",
            "A client takes access in the room; before its welcome it is out of place.",
            "client",
            [
                ("send", _HELLO),
                _c(Access("ward-9", "eyJhbGciOiJIUzI1NiJ9.e30.MA")),
                _c(_WELCOME),
                _c(Access("ward-9", "eyJhbGciOiJIUzI1NiJ9.e30.MQ")),
                ("send", Moderate("lock", None, None, None, 1)),
                _c(RequestRefused(1, "transfer_timeout", "the server did not answer")),
            ],
        ),
        (
            "client_bad_frames",
            "What a client refuses from a server: all non-fatal.",
            "client",
            [
                ("send", _HELLO),
                _c(_WELCOME),
                ("recv", b""),
                ("text", b"hi"),
                ("recv", b"\x01\xc1"),
                _c(_HELLO),
                ("recv", _MOVE),
            ],
        ),
    ]


def _event_json(event: Event) -> dict[str, Any]:
    out: dict[str, Any] = {"event": type(event).__name__}
    if isinstance(event, MessageReceived):
        out["type"] = event.message.TYPE
    elif isinstance(event, Refused):
        out["code"] = event.error.code.value
        out["fatal"] = event.fatal
        if isinstance(event.error, RequestError):
            # A request that did not decode but named its req: the server answers with this.
            out["answer"] = event.error.answer.to_wire()
    elif isinstance(event, FrameReceived):
        out["kind"] = event.kind
    elif isinstance(event, Ignored):
        out["reason"] = event.reason
    return out


def connection_vectors() -> dict[str, Any]:
    cases = []
    for name, description, role, steps in _conn_cases():
        conn = Connection(Role(role))
        out: list[dict[str, Any]] = []
        for step in steps:
            what = step[0]
            rec: dict[str, Any]
            if what in ("recv", "text"):
                data = step[1]
                assert isinstance(data, bytes)
                rec = {"recv": data.hex()}
                if what == "text":
                    rec["text"] = True
                rec |= _event_json(conn.receive(data, text=what == "text"))
            elif what == "send":
                msg = step[1]
                assert isinstance(msg, Message)
                rec = {"send": msg.to_wire()}
                try:
                    conn.send(msg)
                except LocalProtocolError:
                    rec["error"] = "local"
            else:
                rec = {"closed": True}
                conn.closed()
            rec["state"] = conn.state.value
            out.append(rec)
        cases.append({"name": name, "role": role, "description": description, "steps": out})
    return {
        "description": (
            "Connection states (SPEC.md, 'Connection states'). Each case runs one end's state "
            "machine from a new connection. A 'recv' step is one WebSocket message from the "
            "peer (hex; 'text' true if it was a text message) with the event it gives: "
            "'MessageReceived' (with the message 'type'), 'PoseReceived', 'StateReceived', "
            "'FrameReceived' (with the frame 'kind'), 'Refused' (with the error 'code' and "
            "whether it is 'fatal') or 'Ignored' (with the 'reason'). A 'send' step is a "
            "message this end sends, as its wire map; 'error': 'local' means the state does "
            "not allow it and nothing changes. A 'closed' step is the transport going away. "
            "'state' is the state after the step."
        ),
        "cases": cases,
    }


def write(directory: Path = HERE) -> list[Path]:
    paths = []
    for name, data in (
        ("quantization.json", quantization_vectors()),
        ("snapshots.json", snapshot_vectors()),
        ("connection.json", connection_vectors()),
    ):
        path = directory / name
        path.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
        paths.append(path)
    return paths


if __name__ == "__main__":
    for p in write():
        print(p)
