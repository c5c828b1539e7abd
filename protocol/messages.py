"""Frames and control messages: every message type a small dataclass, msgpack framing, strict
validation. Decoding never raises: a bad frame becomes a :class:`ProtocolError` value.

A WebSocket binary message is one frame; its first byte says what it holds:

* ``0x01`` control: a msgpack map with the type under ``"t"`` (hello, welcome, ping, ...);
* ``0x02`` state: a snapshot delta or keyframe (``protocol.snapshot``);
* ``0x03`` pose: one member's avatar pose input, fixed layout (``encode_pose``).
"""

from __future__ import annotations

import math
import re
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import msgpack
import numpy as np
import numpy.typing as npt

from .errors import ErrorCode, ProtocolError
from .quant import quantize_positions, quantize_rotations, validate_poses
from .snapshot import FRAME_STATE, MAX_SLOTS

PROTOCOL_VERSION = 1
FRAME_CONTROL = 0x01
FRAME_POSE = 0x03
__all__ = ["FRAME_STATE"]  # extended at the bottom

#: Largest control frame a client may send.
MAX_CONTROL_BYTES = 4096
#: Longest room name and display name, in characters.
MAX_NAME_CHARS = 64
ROOM_NAME_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
# Display names: any printable text, no control characters.
DISPLAY_NAME_RE = re.compile(r"^[^\x00-\x1f\x7f]{1,64}$")

_POSE_HEADER = struct.Struct("<BBHI")  # kind, reserved (0), present mask, sequence
POSE_HEADER_SIZE = _POSE_HEADER.size
POSE_FLOATS = 7  # x, y, z, qx, qy, qz, qw
POSE_SLOT_BYTES = POSE_FLOATS * 4


def pose_frame_size(slots: int) -> int:
    """Exact byte length of a pose frame for an entity with ``slots`` pose slots."""
    return POSE_HEADER_SIZE + slots * POSE_SLOT_BYTES


def pose_frame_dtype(slots: int) -> np.dtype:
    """A pose frame of ``slots`` slots as one numpy record (the same bytes, field by field), for
    reading or writing many frames in one array operation."""
    return np.dtype(
        [
            ("kind", "u1"),
            ("reserved", "u1"),
            ("mask", "<u2"),
            ("seq", "<u4"),
            ("poses", "<f4", (slots, POSE_FLOATS)),
        ]
    )


# --------------------------------------------------------------------------- field validation


@dataclass(frozen=True, slots=True)
class Spec:
    """How one message field is checked on decode."""

    kind: str  # "int", "float", "str", "bool", "members", "any_int_list"
    lo: float | None = None
    hi: float | None = None
    max_len: int | None = None
    pattern: re.Pattern[str] | None = None
    optional: bool = False


def wire_field(kind: str, **kw: Any) -> Any:
    """A message dataclass field and how decoding checks it: ``kind`` is ``"int"``,
    ``"float"``, ``"str"``, ``"bool"``, ``"strs"`` or ``"members"`` (message families may add
    their own through :meth:`Message.check_field`), with ``lo``/``hi`` bounds, ``max_len``, a
    ``pattern`` and ``optional`` (then ``default``, None unless given)::

        @dataclass(frozen=True, slots=True)
        class BreathingStart(Message):
            TYPE: ClassVar[str] = "breathing_start"
            object_id: int = wire_field("int", lo=1, hi=2**32 - 1)
            period: float = wire_field("float", lo=2.0, hi=20.0)
    """
    default = kw.pop("default", None)
    has_default = "optional" in kw and kw["optional"]
    meta = {"spec": Spec(kind, **kw)}
    if has_default:
        return field(default=default, metadata=meta)
    return field(metadata=meta)


def _check(name: str, spec: Spec, value: Any) -> Any:
    if value is None:
        if spec.optional:
            return None
        raise ProtocolError(ErrorCode.BAD_FIELD, f"{name} is required")
    k = spec.kind
    if k == "int":
        if not isinstance(value, int) or isinstance(value, bool):
            raise ProtocolError(ErrorCode.BAD_FIELD, f"{name} must be an integer")
    elif k == "float":
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ProtocolError(ErrorCode.BAD_FIELD, f"{name} must be a number")
        value = float(value)
        if not math.isfinite(value):
            raise ProtocolError(ErrorCode.OUT_OF_RANGE, f"{name} must be finite")
    elif k == "bool":
        if not isinstance(value, bool):
            raise ProtocolError(ErrorCode.BAD_FIELD, f"{name} must be a boolean")
    elif k == "str":
        if not isinstance(value, str):
            raise ProtocolError(ErrorCode.BAD_FIELD, f"{name} must be a string")
        if spec.max_len is not None and len(value) > spec.max_len:
            raise ProtocolError(ErrorCode.OUT_OF_RANGE, f"{name} longer than {spec.max_len}")
        if spec.pattern is not None and not spec.pattern.fullmatch(value):
            raise ProtocolError(ErrorCode.OUT_OF_RANGE, f"{name} has characters not allowed")
    elif k == "strs":
        if not isinstance(value, list) or len(value) > (spec.hi or 16):
            raise ProtocolError(ErrorCode.BAD_FIELD, f"{name} must be a short list")
        for item in value:
            if not isinstance(item, str) or len(item) > (spec.max_len or 64):
                raise ProtocolError(ErrorCode.BAD_FIELD, f"{name} entries must be short strings")
        return tuple(value)
    elif k in ("members", "bans"):
        if not isinstance(value, list) or len(value) > 10_000:
            raise ProtocolError(ErrorCode.BAD_FIELD, f"{name} must be a list")
        entry = MemberInfo if k == "members" else BanInfo
        out = []
        for item in value:
            if not isinstance(item, dict):
                raise ProtocolError(ErrorCode.BAD_FIELD, f"{name} entries must be maps")
            out.append(entry.from_wire(item))
        return tuple(out)
    if (spec.lo is not None and value < spec.lo) or (spec.hi is not None and value > spec.hi):
        raise ProtocolError(ErrorCode.OUT_OF_RANGE, f"{name} out of range")
    return value


class Message:
    """Base of every control message. ``TYPE`` is the value of ``"t"`` on the wire."""

    TYPE: ClassVar[str] = ""
    #: A larger frame limit for this type than the decoder's (0: none), e.g. an audio offer's.
    MAX_FRAME_BYTES: ClassVar[int] = 0
    #: True for client requests with an optional ``req`` that the server answers with ``ack``
    #: or ``refused`` when ``req`` is given (plugins' own requests may opt in).
    ACKED: ClassVar[bool] = False
    __slots__ = ()

    @property
    def type(self) -> str:
        """The message's type on the wire (``TYPE``), by which an application that receives
        it as an event tells events apart (``event.type == "joined"``)."""
        return self.TYPE

    @classmethod
    def refusal(cls, req: int, err: ProtocolError) -> Message:
        """The answer refusing request ``req`` of this type: ``refused`` (object messages
        answer with their own ``obj_refused``)."""
        return RequestRefused(req, err.code.value, err.message[:1024])

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {"t": self.TYPE}
        for f in fields(self):  # type: ignore[arg-type]
            v = getattr(self, f.name)
            if v is None:
                continue
            if f.metadata["spec"].kind in ("members", "bans"):
                v = [m.to_wire() for m in v]
            elif isinstance(v, tuple):
                v = list(v)
            elif isinstance(v, ErrorCode):
                v = v.value
            out[f.name] = v
        return out

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> Message:
        known = {f.name: f for f in fields(cls)}  # type: ignore[arg-type]
        extra = set(data) - set(known) - {"t"}
        if extra:
            raise ProtocolError(
                ErrorCode.BAD_FIELD, f"unexpected field {sorted(map(str, extra))[0]!r}"
            )
        kwargs = {n: cls.check_field(n, f.metadata["spec"], data.get(n)) for n, f in known.items()}
        return cls(**kwargs)

    @classmethod
    def check_field(cls, name: str, spec: Spec, value: Any) -> Any:
        """Validate one field; message families with field kinds of their own override it."""
        return _check(name, spec, value)


@dataclass(frozen=True, slots=True)
class MemberInfo:
    """A member as others see it. ``identity`` is only in ``lobby`` entries (to hosts): the
    verified identity, or its pseudonym in pseudonymous rooms, so two people with the same
    name can be told apart."""

    id: int
    name: str
    identity: str | None = None

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "name": self.name}
        if self.identity is not None:
            out["identity"] = self.identity
        return out

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> MemberInfo:
        if not {"id", "name"} <= set(data) <= {"id", "name", "identity"}:
            raise ProtocolError(ErrorCode.BAD_FIELD, "member entries have id, name, identity")
        return cls(
            _check("id", Spec("int", lo=1, hi=2**32 - 1), data["id"]),
            _check("name", Spec("str", max_len=MAX_NAME_CHARS), data["name"]),
            _check("identity", Spec("str", max_len=128, optional=True), data.get("identity")),
        )


@dataclass(frozen=True, slots=True)
class BanInfo:
    """A ban in force, as hosts see it: ``id`` (to lift it), the ``name`` the banned member had
    in the room, ``until`` (Unix seconds; 0: until a host lifts it) and the ``reason``."""

    id: int
    name: str
    until: int
    reason: str

    def to_wire(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "until": self.until, "reason": self.reason}

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> BanInfo:
        if set(data) != {"id", "name", "until", "reason"}:
            raise ProtocolError(ErrorCode.BAD_FIELD, "ban entries have id, name, until, reason")
        return cls(
            _check("id", Spec("int", lo=1, hi=2**32 - 1), data["id"]),
            _check("name", Spec("str", max_len=MAX_NAME_CHARS), data["name"]),
            _check("until", Spec("int", lo=0, hi=2**63 - 1), data["until"]),
            _check("reason", Spec("str", max_len=256), data["reason"]),
        )


# --------------------------------------------------------------------------- client to server


@dataclass(frozen=True, slots=True)
class Hello(Message):
    """First message on a connection: join ``room`` as ``name`` (or resume a member)."""

    TYPE: ClassVar[str] = "hello"
    version: int = wire_field("int", lo=0, hi=65535)
    room: str = wire_field("str", pattern=ROOM_NAME_RE)
    name: str = wire_field("str", max_len=MAX_NAME_CHARS, pattern=DISPLAY_NAME_RE)
    slots: int = wire_field("int", lo=1, hi=MAX_SLOTS)
    resume: str | None = wire_field("str", max_len=128, optional=True)
    token: str | None = wire_field("str", max_len=2048, optional=True)


@dataclass(frozen=True, slots=True)
class Ping(Message):
    """Round-trip probe; the server answers with :class:`Pong` at once."""

    TYPE: ClassVar[str] = "ping"
    id: int = wire_field("int", lo=0, hi=2**32 - 1)
    client_time: float = wire_field("float")


@dataclass(frozen=True, slots=True)
class Leave(Message):
    """Leave the room now (no grace window for resuming)."""

    TYPE: ClassVar[str] = "leave"


MODERATION_ACTIONS = re.compile(
    r"^(admit|deny|remove|ban|unban|mute|allow_unmute|lock|unlock|lobby|open|end)$"
)
#: Longest ban a host may give with a duration (ten years); without one a ban lasts until
#: a host lifts it.
MAX_BAN_SECONDS = 10 * 365 * 86400


@dataclass(frozen=True, slots=True)
class Moderate(Message):
    """A host's action: ``admit``/``deny`` a lobby member; ``remove`` a member from the session
    or ``ban`` its identity from the room name (for ``duration`` seconds, or until lifted) with
    a ``reason`` shown to them; ``unban`` lifts ban ``member_id`` (an id from ``bans``);
    ``mute`` a member's audio on the server or ``allow_unmute``; set entry to
    ``lock``/``unlock``/``lobby``/``open``; ``end`` the session for everyone."""

    ACKED: ClassVar[bool] = True
    TYPE: ClassVar[str] = "moderate"
    action: str = wire_field("str", pattern=MODERATION_ACTIONS)
    member_id: int | None = wire_field("int", lo=1, hi=2**32 - 1, optional=True)
    reason: str | None = wire_field("str", max_len=256, optional=True)
    duration: int | None = wire_field("int", lo=1, hi=MAX_BAN_SECONDS, optional=True)
    req: int | None = wire_field("int", lo=0, hi=2**32 - 1, optional=True)


ROLE_NAMES = re.compile(r"^(host|participant|observer|receptionist)$")
GRANT_NAMES = re.compile(
    r"^(publish_audio|manipulate_objects|annotate|upload_assets|moderate|hidden|transfer)$"
)


@dataclass(frozen=True, slots=True)
class ChangeRole(Message):
    """A host changes a member's ``role`` (its grants become the role's), or gives
    (``allow`` true) or takes away one ``grant``. Give either ``role`` or ``grant`` and
    ``allow``."""

    ACKED: ClassVar[bool] = True
    TYPE: ClassVar[str] = "change_role"
    member_id: int = wire_field("int", lo=1, hi=2**32 - 1)
    role: str | None = wire_field("str", pattern=ROLE_NAMES, optional=True)
    grant: str | None = wire_field("str", pattern=GRANT_NAMES, optional=True)
    allow: bool | None = wire_field("bool", optional=True)
    req: int | None = wire_field("int", lo=0, hi=2**32 - 1, optional=True)


@dataclass(frozen=True, slots=True)
class Pause(Message):
    """Patient control: step out (``paused`` true) or back in. While paused the member's avatar
    is gone for others and the member receives nothing of the room."""

    ACKED: ClassVar[bool] = True
    TYPE: ClassVar[str] = "pause"
    paused: bool = wire_field("bool")
    req: int | None = wire_field("int", lo=0, hi=2**32 - 1, optional=True)


@dataclass(frozen=True, slots=True)
class Consent(Message):
    """Accept (or decline, or later withdraw) the room's consent text, named by its SHA-256."""

    TYPE: ClassVar[str] = "consent"
    version: str = wire_field("str", max_len=64)
    accept: bool = wire_field("bool")


@dataclass(frozen=True, slots=True)
class RequestUnmute(Message):
    """A server-muted member asks the hosts to allow unmuting."""

    ACKED: ClassVar[bool] = True
    TYPE: ClassVar[str] = "request_unmute"
    req: int | None = wire_field("int", lo=0, hi=2**32 - 1, optional=True)


# --------------------------------------------------------------------------- server to client


@dataclass(frozen=True, slots=True)
class Waiting(Message):
    """The room has a lobby: wait until a host admits (``welcome`` follows) or denies you."""

    TYPE: ClassVar[str] = "waiting"
    room: str = wire_field("str", pattern=ROOM_NAME_RE)
    lobby_id: int = wire_field("int", lo=1, hi=2**32 - 1)


@dataclass(frozen=True, slots=True)
class ConsentRequired(Message):
    """The room asks for consent to ``text`` (``version`` is its SHA-256, hex) before anything
    of the room flows; answer with :class:`Consent`."""

    TYPE: ClassVar[str] = "consent_required"
    version: str = wire_field("str", max_len=64)
    text: str = wire_field("str", max_len=65536)


@dataclass(frozen=True, slots=True)
class Lobby(Message):
    """To hosts: who is waiting in the lobby (``members`` ids are lobby ids for ``admit``)."""

    TYPE: ClassVar[str] = "lobby"
    members: tuple[MemberInfo, ...] = wire_field("members")


@dataclass(frozen=True, slots=True)
class MemberState(Message):
    """A member's moderation-relevant state: paused (to hosts), muted (to everyone), or asking
    to be unmuted (to hosts)."""

    TYPE: ClassVar[str] = "member_state"
    member_id: int = wire_field("int", lo=1, hi=2**32 - 1)
    paused: bool = wire_field("bool")
    muted: bool = wire_field("bool")
    unmute_requested: bool = wire_field("bool")


@dataclass(frozen=True, slots=True)
class Grants(Message):
    """A member's role and grants changed (to that member and to hosts)."""

    TYPE: ClassVar[str] = "grants"
    member_id: int = wire_field("int", lo=1, hi=2**32 - 1)
    role: str = wire_field("str", max_len=16)
    grants: tuple[str, ...] = wire_field("strs", hi=16, max_len=32)


@dataclass(frozen=True, slots=True)
class Bans(Message):
    """To hosts: the room's bans in force (when one is added, lifted, and when a host
    joins)."""

    TYPE: ClassVar[str] = "bans"
    bans: tuple[BanInfo, ...] = wire_field("bans")


@dataclass(frozen=True, slots=True)
class RoomState(Message):
    """The room's entry mode changed: ``open``, ``lobby`` or ``locked``."""

    TYPE: ClassVar[str] = "room_state"
    entry: str = wire_field("str", max_len=16)


@dataclass(frozen=True, slots=True)
class Welcome(Message):
    """Reply to hello: who you are, the room's tick rate and clock, who is here.

    Room time of tick ``T`` is ``T / rate`` seconds; ``tick`` is the room's tick now.
    """

    TYPE: ClassVar[str] = "welcome"
    version: int = wire_field("int", lo=0, hi=65535)
    member_id: int = wire_field("int", lo=1, hi=2**32 - 1)
    room: str = wire_field("str", pattern=ROOM_NAME_RE)
    rate: int = wire_field("int", lo=1, hi=1000)
    tick: int = wire_field("int", lo=0, hi=2**32 - 1)
    resume: str = wire_field("str", max_len=128)
    resumed: bool = wire_field("bool")
    members: tuple[MemberInfo, ...] = wire_field("members")


@dataclass(frozen=True, slots=True)
class Joined(Message):
    """A member entered the room."""

    TYPE: ClassVar[str] = "joined"
    member_id: int = wire_field("int", lo=1, hi=2**32 - 1)
    name: str = wire_field("str", max_len=MAX_NAME_CHARS)


@dataclass(frozen=True, slots=True)
class Left(Message):
    """A member left the room (``reason``: left, disconnected, timeout, ...)."""

    TYPE: ClassVar[str] = "left"
    member_id: int = wire_field("int", lo=1, hi=2**32 - 1)
    name: str = wire_field("str", max_len=MAX_NAME_CHARS)
    reason: str = wire_field("str", max_len=64)


@dataclass(frozen=True, slots=True)
class Pong(Message):
    """Answer to :class:`Ping`; ``room_time`` is the room clock in seconds when it was sent."""

    TYPE: ClassVar[str] = "pong"
    id: int = wire_field("int", lo=0, hi=2**32 - 1)
    client_time: float = wire_field("float")
    room_time: float = wire_field("float")


@dataclass(frozen=True, slots=True)
class Ack(Message):
    """Request ``req`` (a client message that carried it) was applied."""

    TYPE: ClassVar[str] = "ack"
    req: int = wire_field("int", lo=0, hi=2**32 - 1)


@dataclass(frozen=True, slots=True)
class RequestRefused(Message):
    """Request ``req`` was refused with error ``code`` (nothing of it was applied); requests
    without ``req`` get a plain ``error`` instead."""

    TYPE: ClassVar[str] = "refused"
    req: int = wire_field("int", lo=0, hi=2**32 - 1)
    code: str = wire_field("str", max_len=64)
    message: str = wire_field("str", max_len=1024)


#: Where a ``redirect`` may send a client: a WebSocket URL without spaces or control characters.
REDIRECT_URL_RE = re.compile(r"^wss?://[^\x00-\x20\x7f]{1,500}$")


@dataclass(frozen=True, slots=True)
class Redirect(Message):
    """Another server runs this room (or is about to): connect to ``url`` and send the same
    ``hello`` there, with the resume token if you had one, so the member carries on as itself.
    The server closes the connection right after. ``reason`` says why: ``owner`` (the room
    lives on that server), ``moving`` (this server hands the room over, as when it drains),
    ``transfer`` (a host moved the member to a room another server runs). ``token``, with
    ``transfer``: the signed, short-lived transfer grant to send as that ``hello``'s token in
    place of the join token (which names another room), for that one join."""

    TYPE: ClassVar[str] = "redirect"
    url: str = wire_field("str", pattern=REDIRECT_URL_RE)
    reason: str = wire_field("str", max_len=64)
    token: str | None = wire_field("str", max_len=2048, optional=True)


class RequestError(ProtocolError):
    """A request that did not decode but whose ``req`` could be read: the server answers it
    with :attr:`answer` (its family's refusal carrying that ``req``) instead of a plain
    ``error``, so the client's call fails at once rather than waiting for an answer."""

    def __init__(self, err: ProtocolError, answer: Message) -> None:
        super().__init__(err.code, err.message)
        self.answer = answer


@dataclass(frozen=True, slots=True)
class Error(Message):
    """A typed error. ``fatal`` errors are followed by the server closing the connection."""

    TYPE: ClassVar[str] = "error"
    code: str = wire_field("str", max_len=64)
    message: str = wire_field("str", max_len=1024)
    fatal: bool = wire_field("bool")

    @classmethod
    def of(cls, err: ProtocolError, fatal: bool = False) -> Error:
        return cls(err.code.value, err.message[:1024], fatal)


#: The core's messages: what every room speaks, whatever its plugins.
CORE_CLIENT_MESSAGES: tuple[type[Message], ...] = (
    Hello,
    Ping,
    Leave,
    Moderate,
    ChangeRole,
    Pause,
    RequestUnmute,
    Consent,
)
CORE_SERVER_MESSAGES: tuple[type[Message], ...] = (
    Welcome,
    Joined,
    Left,
    Pong,
    Error,
    Waiting,
    Lobby,
    MemberState,
    RoomState,
    ConsentRequired,
    Grants,
    Bans,
    Ack,
    RequestRefused,
    Redirect,
)


def message_registry(*families: Sequence[type[Message]]) -> dict[str, type[Message]]:
    """A decoder's registry (wire type -> class) of the given message families; a type named
    twice is an error."""
    registry: dict[str, type[Message]] = {}
    for family in families:
        for cls in family:
            if not cls.TYPE or registry.get(cls.TYPE, cls) is not cls:
                raise ValueError(f"message type {cls.TYPE!r} is already taken")
            registry[cls.TYPE] = cls
    return registry


def encode_message(msg: Message) -> bytes:
    """A control frame: ``0x01`` then the msgpack map."""
    body: bytes = msgpack.packb(msg.to_wire(), use_bin_type=True)
    return bytes((FRAME_CONTROL,)) + body


def _unpack(frame: bytes | bytearray | memoryview, max_str_len: int) -> Any:
    """The msgpack body of a control frame, within the bounds every control message keeps."""
    return msgpack.unpackb(
        memoryview(frame)[1:],
        raw=False,
        strict_map_key=True,
        max_array_len=1024,
        max_map_len=64,
        max_str_len=max_str_len,
        max_bin_len=0,
        max_ext_len=0,
    )


def decode_message(
    frame: bytes | bytearray | memoryview,
    registry: Mapping[str, type[Message]],
    max_bytes: int = MAX_CONTROL_BYTES,
) -> Message | ProtocolError:
    """Decode a control frame; any problem comes back as a :class:`ProtocolError` value.

    A frame longer than ``max_bytes`` is ``oversized`` unless its type allows more
    (``Message.MAX_FRAME_BYTES``): then it is decoded as far as its type, and refused as
    oversized if that is not such a type."""
    size = len(frame)
    limit = max_bytes
    if size > max_bytes:
        limit = max((cls.MAX_FRAME_BYTES for cls in registry.values()), default=0)
    oversized = ProtocolError(ErrorCode.OVERSIZED, f"control frame over {max_bytes} bytes")
    if size > limit:
        return oversized
    if size < 2 or frame[0] != FRAME_CONTROL:
        return ProtocolError(ErrorCode.MALFORMED, "not a control frame")
    try:
        data = _unpack(frame, limit)
    except Exception as exc:  # msgpack raises a few odd types on hostile input
        err = ProtocolError(ErrorCode.MALFORMED, f"bad msgpack: {type(exc).__name__}")
        return oversized if size > max_bytes else err
    kind = data.get("t") if isinstance(data, dict) else None
    cls = registry.get(kind) if isinstance(kind, str) else None
    if size > max_bytes and (cls is None or size > cls.MAX_FRAME_BYTES):
        return oversized
    if not isinstance(data, dict):
        return ProtocolError(ErrorCode.MALFORMED, "control frame is not a map")
    if not isinstance(kind, str):
        return ProtocolError(ErrorCode.BAD_FIELD, "missing message type 't'")
    if cls is None:
        return ProtocolError(ErrorCode.UNKNOWN_TYPE, f"unknown message type {kind[:32]!r}")
    try:
        return cls.from_wire(data)
    except ProtocolError as err:
        return _answerable(cls, data, err)
    except (TypeError, ValueError) as exc:  # e.g. unhashable keys in nested maps
        return ProtocolError(ErrorCode.BAD_FIELD, f"bad {kind} message: {type(exc).__name__}")


def request_refusal(
    frame: bytes, registry: Mapping[str, type[Message]], err: ProtocolError, max_bytes: int
) -> Message | None:
    """The answer refusing, with ``err``, the request in control frame ``frame`` that was not
    decoded (a server drops it over the connection's rate limit): its family's refusal naming
    its ``req``, so the client's call fails at once. None if ``frame`` is not a control frame
    of at most ``max_bytes``, not a map, not a request type of ``registry``, or has no valid
    ``req`` (a plain ``error`` answers it then)."""
    if not 2 <= len(frame) <= max_bytes or frame[0] != FRAME_CONTROL:
        return None
    try:
        data = _unpack(frame, max_bytes)
    except Exception:  # hostile bytes: no req to name
        return None
    kind = data.get("t") if isinstance(data, dict) else None
    cls = registry.get(kind) if isinstance(kind, str) else None
    if cls is None:
        return None
    assert isinstance(data, dict)
    answer = _answerable(cls, data, err)
    return answer.answer if isinstance(answer, RequestError) else None


def _answerable(cls: type[Message], data: dict[str, Any], err: ProtocolError) -> ProtocolError:
    """``err`` for a message of type ``cls`` that did not decode; a :class:`RequestError`
    when the message is a request whose own ``req`` is valid (so the refusal can name it)."""
    req = data.get("req")
    if (
        isinstance(req, int)
        and not isinstance(req, bool)
        and 0 <= req <= 2**32 - 1
        and any(f.name == "req" for f in fields(cls))  # type: ignore[arg-type]
    ):
        return RequestError(err, cls.refusal(req, err))
    return err


# --------------------------------------------------------------------------- pose input


PoseTuple = tuple[Sequence[float], Sequence[float]]


def encode_pose(seq: int, poses: Sequence[PoseTuple | None]) -> bytes:
    """A pose frame: sequence number and one (position, quaternion) or None per slot."""
    mask = 0
    floats: list[float] = []
    for i, p in enumerate(poses):
        if p is None:
            floats.extend((0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0))
            continue
        mask |= 1 << i
        floats.extend(p[0])
        floats.extend(p[1])
    if len(floats) != POSE_FLOATS * len(poses):
        raise ValueError("each pose is a 3-vector and a 4-vector")
    return _POSE_HEADER.pack(FRAME_POSE, 0, mask, seq & 0xFFFFFFFF) + struct.pack(
        f"<{len(floats)}f", *floats
    )


def encode_pose_frames(
    seq: npt.ArrayLike, mask: npt.ArrayLike, poses: npt.ArrayLike
) -> npt.NDArray[np.uint8]:
    """Many pose frames in one call, for a sender of many avatars (the load generator).

    ``poses`` is ``(N, slots, 7)``: x, y, z, qx, qy, qz, qw per slot, sent as float32 (absent
    slots are sent as given); ``seq`` and ``mask`` are one value or one per frame. Row ``i``
    of the result is the frame :func:`encode_pose` writes for the same values.
    """
    p = np.asarray(poses, dtype=np.float32)
    dtype = pose_frame_dtype(p.shape[1])
    out = np.zeros(p.shape[0], dtype)
    out["kind"] = FRAME_POSE
    out["mask"] = mask
    out["seq"] = np.asarray(seq, dtype=np.int64) & 0xFFFFFFFF
    out["poses"] = p
    return out.view(np.uint8).reshape(p.shape[0], dtype.itemsize)  # also for no frames


def pose_sequence(frame: bytes) -> int:
    """Sequence number of a pose frame whose length was already checked."""
    return int.from_bytes(frame[4:8], "little")


def check_pose_frame(frame: bytes, slots: int) -> ProtocolError | None:
    """Cheap structural check done on arrival; values are validated in the tick's batch."""
    if len(frame) != pose_frame_size(slots):
        code = ErrorCode.OVERSIZED if len(frame) > pose_frame_size(slots) else ErrorCode.MALFORMED
        return ProtocolError(code, f"pose frame must be {pose_frame_size(slots)} bytes")
    if frame[1] != 0:
        return ProtocolError(ErrorCode.MALFORMED, "reserved byte must be 0")
    mask = frame[2] | (frame[3] << 8)
    if mask >> slots:
        return ProtocolError(ErrorCode.OUT_OF_RANGE, "present mask names a slot we do not have")
    return None


@dataclass(slots=True)
class PoseBatch:
    """Many pose frames of one slot count, validated and quantized together."""

    ok: npt.NDArray[np.bool_]  # (M,) frame accepted
    present: npt.NDArray[np.bool_]  # (M, S)
    pos: npt.NDArray[np.int32]  # (M, S, 3) mm
    rot_index: npt.NDArray[np.uint8]  # (M, S)
    rot: npt.NDArray[np.int32]  # (M, S, 3)


def decode_pose_batch(frames: Sequence[bytes], slots: int) -> PoseBatch:
    """Validate and quantize structurally checked pose frames in one vectorized pass.

    A frame is refused (``ok`` False) if any present pose has a NaN or infinite value, a
    coordinate beyond the position limit, or a quaternion whose norm is far from one.
    """
    arr = np.frombuffer(b"".join(frames), dtype=pose_frame_dtype(slots))
    present = (arr["mask"][:, None] >> np.arange(slots, dtype=np.uint16)) & 1 == 1
    poses = arr["poses"].astype(np.float64)
    pos, quat = poses[..., :3], poses[..., 3:]
    valid = validate_poses(pos, quat) | ~present
    ok = valid.all(axis=1)
    use = present & ok[:, None]
    # Absent or refused rows get a harmless identity so quantization sees no garbage.
    pos = np.where(use[..., None], pos, 0.0)
    quat = np.where(use[..., None], quat, np.array([0.0, 0.0, 0.0, 1.0]))
    rot_index, rot = quantize_rotations(quat)
    return PoseBatch(ok, use, quantize_positions(pos), rot_index, rot)


__all__ += [
    "CORE_CLIENT_MESSAGES",
    "CORE_SERVER_MESSAGES",
    "FRAME_CONTROL",
    "FRAME_POSE",
    "MAX_BAN_SECONDS",
    "MAX_CONTROL_BYTES",
    "PROTOCOL_VERSION",
    "Ack",
    "BanInfo",
    "Bans",
    "ChangeRole",
    "Consent",
    "ConsentRequired",
    "Error",
    "Grants",
    "Hello",
    "Joined",
    "Leave",
    "Left",
    "Lobby",
    "MemberInfo",
    "MemberState",
    "Message",
    "Moderate",
    "Pause",
    "Ping",
    "Pong",
    "PoseBatch",
    "Redirect",
    "RequestError",
    "RequestRefused",
    "RequestUnmute",
    "RoomState",
    "Waiting",
    "Welcome",
    "check_pose_frame",
    "decode_message",
    "decode_pose_batch",
    "encode_message",
    "encode_pose",
    "encode_pose_frames",
    "message_registry",
    "pose_frame_dtype",
    "pose_frame_size",
    "pose_sequence",
    "request_refusal",
    "wire_field",
]
