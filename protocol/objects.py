"""Shared 3D objects: spawn, lease (grab/release/hand-over), move, view state, annotations.

Every client operation carries a request id ``req`` (chosen by the client) that the server
echoes in exactly one :class:`ObjectAck` or :class:`ObjectRefused`, so an SDK can match answers
to calls. Moves are frequent (30-90 Hz while someone turns a model), so they travel in a fixed
44-byte binary frame of kind ``0x04`` (:func:`encode_move`) rather than msgpack; the server
answers a move only when it refuses it (the move's ``seq`` is the request id then).

In the tick state an object is the entity ``OBJECT_ID_BASE + object_id`` with two pose rows:
row 0 its position and rotation, row 1 its uniform scale in thousandths as position x (so
scaling streams like a move and an object at rest costs one bit per tick).
"""

from __future__ import annotations

import math
import re
import struct
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt

from .errors import ErrorCode, ProtocolError
from .messages import Message, Spec, wire_field
from .quant import POSITION_LIMIT_M, QUAT_NORM_MAX, QUAT_NORM_MIN
from .snapshot import OBJECT_ID_BASE

FRAME_MOVE = 0x04
#: Pose rows of an object entity in the state: the transform, then the scale row.
OBJECT_SLOTS = 2
#: Uniform scale limits and the state's scale unit (scale x 1000 in row 1's position x).
MIN_SCALE = 0.001
MAX_SCALE = 1000.0
SCALE_UNIT = 1000
#: Object ids on the wire are 1..MAX_OBJECT_ID; the entity id is OBJECT_ID_BASE + object id.
MAX_OBJECT_ID = (1 << 31) - 1
MAX_U32 = (1 << 32) - 1
#: Longest annotation text (characters) and most points of a stroke.
MAX_TEXT_CHARS = 1024
MAX_STROKE_POINTS = 128
#: Most entries of an object's node visibility map, and longest node name.
MAX_VIEW_NODES = 64
MAX_NODE_NAME = 64
ANNOTATION_KINDS = ("pin", "stroke", "measure")
#: Points each annotation kind takes: (fewest, most).
POINTS_PER_KIND = {"pin": (1, 1), "stroke": (2, MAX_STROKE_POINTS), "measure": (2, 2)}
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
NODE_NAME_RE = re.compile(r"^[^\x00-\x1f\x7f]{1,64}$")
ANNOTATION_KIND_RE = re.compile(r"^(pin|stroke|measure)$")
LOCK_REASON_RE = re.compile(r"^(grab|release|handover|disconnected|left|paused|timeout|forced)$")

Vec3 = tuple[float, float, float]
Quat = tuple[float, float, float, float]


def entity_id(object_id: int) -> int:
    """The state entity id of an object."""
    return OBJECT_ID_BASE + object_id


# --------------------------------------------------------------------------- field kinds


def _number(name: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise ProtocolError(ErrorCode.BAD_FIELD, f"{name} must hold numbers")
    f = float(v)
    if not math.isfinite(f):
        raise ProtocolError(ErrorCode.OUT_OF_RANGE, f"{name} must be finite")
    return f


def _numbers(name: str, v: Any, n: int) -> tuple[float, ...]:
    if not isinstance(v, list | tuple) or len(v) != n:
        raise ProtocolError(ErrorCode.BAD_FIELD, f"{name} must be a list of {n} numbers")
    return tuple(_number(name, x) for x in v)


def _vec3(name: str, v: Any) -> Vec3:
    out = _numbers(name, v, 3)
    if any(abs(x) > POSITION_LIMIT_M for x in out):
        raise ProtocolError(ErrorCode.OUT_OF_RANGE, f"{name} beyond {POSITION_LIMIT_M:.0f} m")
    return out  # type: ignore[return-value]


def _unit(name: str, v: Any, n: int, norm_of: int) -> tuple[float, ...]:
    out = _numbers(name, v, n)
    norm = math.sqrt(sum(x * x for x in out[:norm_of]))
    if not QUAT_NORM_MIN <= norm <= QUAT_NORM_MAX:
        raise ProtocolError(ErrorCode.OUT_OF_RANGE, f"{name} is far from unit length")
    return tuple(x / norm for x in out[:norm_of]) + out[norm_of:]


def _check_custom(name: str, kind: str, spec: Any, v: Any) -> Any:
    if v is None:
        if spec.optional:
            return None
        raise ProtocolError(ErrorCode.BAD_FIELD, f"{name} is required")
    if kind == "vec3":
        return _vec3(name, v)
    if kind == "quat":
        return _unit(name, v, 4, 4)
    if kind == "plane":
        # (nx, ny, nz, d): unit normal and the signed distance from the object's origin, in
        # the object's local frame; an empty list clears the plane.
        if isinstance(v, list | tuple) and len(v) == 0:
            return ()
        out = _unit(name, v, 4, 3)
        if abs(out[3]) > POSITION_LIMIT_M:
            raise ProtocolError(ErrorCode.OUT_OF_RANGE, f"{name} distance out of range")
        return out
    if kind == "points":
        if not isinstance(v, list | tuple) or not 1 <= len(v) <= MAX_STROKE_POINTS:
            raise ProtocolError(
                ErrorCode.BAD_FIELD, f"{name} must be a list of 1-{MAX_STROKE_POINTS} points"
            )
        return tuple(_vec3(name, p) for p in v)
    if kind == "nodes":
        if not isinstance(v, dict) or len(v) > MAX_VIEW_NODES:
            raise ProtocolError(ErrorCode.BAD_FIELD, f"{name} must be a map of node names")
        nodes: dict[str, bool] = {}
        for k, vis in v.items():
            if not isinstance(k, str) or not NODE_NAME_RE.fullmatch(k):
                raise ProtocolError(ErrorCode.OUT_OF_RANGE, f"{name} has a bad node name")
            if not isinstance(vis, bool):
                raise ProtocolError(ErrorCode.BAD_FIELD, f"{name} values must be booleans")
            nodes[k] = vis
        return nodes
    raise AssertionError(kind)


_CUSTOM = frozenset({"vec3", "quat", "plane", "points", "nodes"})


class ObjectMessage(Message):
    """Base of the object messages: the core field kinds plus vectors, quaternions, planes,
    point lists and node visibility maps."""

    __slots__ = ()

    @classmethod
    def check_field(cls, name: str, spec: Spec, value: Any) -> Any:
        if spec.kind in _CUSTOM:
            return _check_custom(name, spec.kind, spec, value)
        return super().check_field(name, spec, value)


def _req() -> Any:
    return wire_field("int", lo=0, hi=MAX_U32)


def _oid(optional: bool = False) -> Any:
    return wire_field("int", lo=1, hi=MAX_OBJECT_ID, optional=optional)


def _aid(optional: bool = False) -> Any:
    return wire_field("int", lo=1, hi=MAX_U32, optional=optional)


def _mid(optional: bool = False) -> Any:
    return wire_field("int", lo=1, hi=MAX_U32, optional=optional)


# --------------------------------------------------------------------------- client to server


@dataclass(frozen=True, slots=True)
class Spawn(ObjectMessage):
    """Instantiate an uploaded asset (named by its SHA-256, lowercase hex) as a new object."""

    TYPE: ClassVar[str] = "obj_spawn"
    req: int = _req()
    asset: str = wire_field("str", pattern=SHA256_RE)
    position: Vec3 = wire_field("vec3")  # noqa: RUF009
    rotation: Quat = wire_field("quat")  # noqa: RUF009
    scale: float = wire_field("float", lo=MIN_SCALE, hi=MAX_SCALE)
    name: str | None = wire_field("str", max_len=64, pattern=NODE_NAME_RE, optional=True)


@dataclass(frozen=True, slots=True)
class Grab(ObjectMessage):
    """Ask for the object's exclusive lease; refused with ``object_locked`` if someone has it."""

    TYPE: ClassVar[str] = "obj_grab"
    req: int = _req()
    object_id: int = _oid()


@dataclass(frozen=True, slots=True)
class Release(ObjectMessage):
    """Give the lease back (the holder only)."""

    TYPE: ClassVar[str] = "obj_release"
    req: int = _req()
    object_id: int = _oid()


@dataclass(frozen=True, slots=True)
class RequestHandover(ObjectMessage):
    """Ask the holder to hand the object over (a free object is granted at once)."""

    TYPE: ClassVar[str] = "obj_request"
    req: int = _req()
    object_id: int = _oid()


@dataclass(frozen=True, slots=True)
class Yield(ObjectMessage):
    """The holder hands the lease to ``to``, a member who asked for it."""

    TYPE: ClassVar[str] = "obj_yield"
    req: int = _req()
    object_id: int = _oid()
    to: int = _mid()


@dataclass(frozen=True, slots=True)
class SetView(ObjectMessage):
    """Change the shared view state: ``nodes`` (merged into the visibility map: node name ->
    visible) and/or ``plane`` (the clipping plane; an empty list removes it)."""

    TYPE: ClassVar[str] = "obj_view"
    req: int = _req()
    object_id: int = _oid()
    nodes: dict[str, bool] | None = wire_field("nodes", optional=True)  # noqa: RUF009
    plane: tuple[float, ...] | None = wire_field("plane", optional=True)


@dataclass(frozen=True, slots=True)
class Remove(ObjectMessage):
    """Remove an object (and its annotations) from the room."""

    TYPE: ClassVar[str] = "obj_remove"
    req: int = _req()
    object_id: int = _oid()


@dataclass(frozen=True, slots=True)
class ForceRelease(ObjectMessage):
    """A host (``moderate`` grant) ends whoever's lease on the object."""

    TYPE: ClassVar[str] = "obj_force_release"
    req: int = _req()
    object_id: int = _oid()


@dataclass(frozen=True, slots=True)
class Annotate(ObjectMessage):
    """Create an annotation on an object, points in the object's local frame (metres): a
    ``pin`` (1 point, usually with text), a ``stroke`` (2-128 points) or a ``measure`` (2
    points; the distance is derived)."""

    TYPE: ClassVar[str] = "anno_create"
    req: int = _req()
    object_id: int = _oid()
    kind: str = wire_field("str", pattern=ANNOTATION_KIND_RE)
    points: tuple[Vec3, ...] = wire_field("points")
    text: str | None = wire_field("str", max_len=MAX_TEXT_CHARS, optional=True)
    color: int | None = wire_field("int", lo=0, hi=0xFFFFFF, optional=True)


@dataclass(frozen=True, slots=True)
class EditAnnotation(ObjectMessage):
    """Change an annotation's text and/or points (its author or a host)."""

    TYPE: ClassVar[str] = "anno_edit"
    req: int = _req()
    annotation_id: int = _aid()
    text: str | None = wire_field("str", max_len=MAX_TEXT_CHARS, optional=True)
    points: tuple[Vec3, ...] | None = wire_field("points", optional=True)
    color: int | None = wire_field("int", lo=0, hi=0xFFFFFF, optional=True)


@dataclass(frozen=True, slots=True)
class DeleteAnnotation(ObjectMessage):
    """Delete an annotation (its author or a host)."""

    TYPE: ClassVar[str] = "anno_delete"
    req: int = _req()
    annotation_id: int = _aid()


# --------------------------------------------------------------------------- server to client


@dataclass(frozen=True, slots=True)
class ObjectAck(ObjectMessage):
    """Request ``req`` succeeded and is durable; ``object_id``/``annotation_id`` name what it
    created or changed."""

    TYPE: ClassVar[str] = "obj_ack"
    req: int = _req()
    object_id: int | None = _oid(optional=True)
    annotation_id: int | None = _aid(optional=True)


@dataclass(frozen=True, slots=True)
class ObjectRefused(ObjectMessage):
    """Request ``req`` (a move: its ``seq``) was refused with error ``code``; for
    ``object_locked`` ``holder`` names the member holding the lease."""

    TYPE: ClassVar[str] = "obj_refused"
    req: int = _req()
    code: str = wire_field("str", max_len=64)
    message: str = wire_field("str", max_len=1024)
    object_id: int | None = _oid(optional=True)
    holder: int | None = _mid(optional=True)


@dataclass(frozen=True, slots=True)
class ObjectState(ObjectMessage):
    """An object as it is (sent on spawn to everyone and to late joiners for every object).
    The transform here is the latest the server had when sending; the tick state carries it
    from then on."""

    TYPE: ClassVar[str] = "obj_state"
    object_id: int = _oid()
    asset: str = wire_field("str", pattern=SHA256_RE)
    name: str = wire_field("str", max_len=64)
    author: str = wire_field("str", max_len=64)
    position: Vec3 = wire_field("vec3")  # noqa: RUF009
    rotation: Quat = wire_field("quat")  # noqa: RUF009
    scale: float = wire_field("float", lo=MIN_SCALE, hi=MAX_SCALE)
    nodes: dict[str, bool] = wire_field("nodes")  # noqa: RUF009
    plane: tuple[float, ...] = wire_field("plane")
    holder: int | None = _mid(optional=True)


@dataclass(frozen=True, slots=True)
class ObjectRemoved(ObjectMessage):
    """The object (and its annotations) left the room."""

    TYPE: ClassVar[str] = "obj_removed"
    object_id: int = _oid()
    by: int | None = _mid(optional=True)


@dataclass(frozen=True, slots=True)
class LockChanged(ObjectMessage):
    """The object's lease changed: ``holder`` has it now (None: free) because of ``reason``
    (grab, release, handover, disconnected, left, paused, timeout, forced)."""

    TYPE: ClassVar[str] = "obj_lock"
    object_id: int = _oid()
    reason: str = wire_field("str", pattern=LOCK_REASON_RE)
    holder: int | None = _mid(optional=True)


@dataclass(frozen=True, slots=True)
class HandoverRequested(ObjectMessage):
    """To the holder: ``member_id`` asks for the object (answer with :class:`Yield`)."""

    TYPE: ClassVar[str] = "obj_handover"
    object_id: int = _oid()
    member_id: int = _mid()


@dataclass(frozen=True, slots=True)
class ViewState(ObjectMessage):
    """The object's whole shared view state after a change."""

    TYPE: ClassVar[str] = "obj_view_state"
    object_id: int = _oid()
    nodes: dict[str, bool] = wire_field("nodes")  # noqa: RUF009
    plane: tuple[float, ...] = wire_field("plane")


@dataclass(frozen=True, slots=True)
class AnnotationState(ObjectMessage):
    """An annotation as created or edited. ``seq`` increases with every annotation change in
    the room (creates, edits, deletes), so receivers can check the order; ``time`` is when it
    was created and ``edited`` when last changed (Unix seconds)."""

    TYPE: ClassVar[str] = "anno"
    annotation_id: int = _aid()
    object_id: int = _oid()
    kind: str = wire_field("str", pattern=ANNOTATION_KIND_RE)
    points: tuple[Vec3, ...] = wire_field("points")
    author: str = wire_field("str", max_len=64)
    author_id: int = _mid()
    time: float = wire_field("float", lo=0)
    seq: int = wire_field("int", lo=0, hi=2**53)
    text: str | None = wire_field("str", max_len=MAX_TEXT_CHARS, optional=True)
    color: int | None = wire_field("int", lo=0, hi=0xFFFFFF, optional=True)
    edited: float | None = wire_field("float", lo=0, optional=True)


@dataclass(frozen=True, slots=True)
class AnnotationDeleted(ObjectMessage):
    """An annotation was deleted (``seq`` as in :class:`AnnotationState`)."""

    TYPE: ClassVar[str] = "anno_deleted"
    annotation_id: int = _aid()
    object_id: int = _oid()
    seq: int = wire_field("int", lo=0, hi=2**53)


@dataclass(frozen=True, slots=True)
class ObjectsSynced(ObjectMessage):
    """End of the room's object list for a (re)joining member: every ``obj_state`` and ``anno``
    before this one is the room's full object state."""

    TYPE: ClassVar[str] = "obj_synced"
    objects: int = wire_field("int", lo=0, hi=MAX_U32)
    annotations: int = wire_field("int", lo=0, hi=MAX_U32)


#: The shared-object messages clients send, and those the server sends.
CLIENT_OBJECTS: tuple[type[Message], ...] = (
    Spawn,
    Grab,
    Release,
    RequestHandover,
    Yield,
    SetView,
    Remove,
    ForceRelease,
    Annotate,
    EditAnnotation,
    DeleteAnnotation,
)
SERVER_OBJECTS: tuple[type[Message], ...] = (
    ObjectAck,
    ObjectRefused,
    ObjectState,
    ObjectRemoved,
    LockChanged,
    HandoverRequested,
    ViewState,
    AnnotationState,
    AnnotationDeleted,
    ObjectsSynced,
)


# --------------------------------------------------------------------------- move frames

_MOVE = struct.Struct("<BBHII8f")  # kind, reserved, reserved, object id, seq, 3+4+1 floats
MOVE_FRAME_SIZE = _MOVE.size  # 44


@dataclass(frozen=True, slots=True)
class Move:
    """A holder's new transform for an object (binary frame ``0x04``)."""

    object_id: int
    seq: int
    position: Vec3
    rotation: Quat
    scale: float


def encode_move(
    object_id: int, seq: int, position: Vec3, rotation: Quat, scale: float = 1.0
) -> bytes:
    """The 44-byte move frame."""
    return _MOVE.pack(
        FRAME_MOVE, 0, 0, object_id, seq & MAX_U32, *position, *rotation, float(scale)
    )


def decode_move(frame: bytes | bytearray | memoryview) -> Move | ProtocolError:
    """Decode and validate a move frame; any problem comes back as a value."""
    if len(frame) != MOVE_FRAME_SIZE:
        code = ErrorCode.OVERSIZED if len(frame) > MOVE_FRAME_SIZE else ErrorCode.MALFORMED
        return ProtocolError(code, f"move frame must be {MOVE_FRAME_SIZE} bytes")
    kind, r0, r1, oid, seq, px, py, pz, qx, qy, qz, qw, scale = _MOVE.unpack(frame)
    if kind != FRAME_MOVE:
        return ProtocolError(ErrorCode.MALFORMED, "not a move frame")
    if r0 or r1:
        return ProtocolError(ErrorCode.MALFORMED, "reserved bytes must be 0")
    if not 1 <= oid <= MAX_OBJECT_ID:
        return ProtocolError(ErrorCode.OUT_OF_RANGE, "object id out of range")
    vals = (px, py, pz, qx, qy, qz, qw, scale)
    if not all(math.isfinite(v) for v in vals):
        return ProtocolError(ErrorCode.OUT_OF_RANGE, "move has NaN or infinity")
    if max(abs(px), abs(py), abs(pz)) > POSITION_LIMIT_M:
        return ProtocolError(ErrorCode.OUT_OF_RANGE, "position beyond the limit")
    norm = math.sqrt(qx * qx + qy * qy + qz * qz + qw * qw)
    if not QUAT_NORM_MIN <= norm <= QUAT_NORM_MAX:
        return ProtocolError(ErrorCode.OUT_OF_RANGE, "rotation far from unit length")
    if not MIN_SCALE <= scale <= MAX_SCALE:
        return ProtocolError(ErrorCode.OUT_OF_RANGE, f"scale outside {MIN_SCALE}-{MAX_SCALE}")
    return Move(oid, seq, (px, py, pz), (qx / norm, qy / norm, qz / norm, qw / norm), scale)


def scale_to_state(scale: float) -> int:
    """The scale as the state carries it (row 1, position x)."""
    return round(scale * SCALE_UNIT)


def scale_from_state(value: int | npt.NDArray[np.int64]) -> Any:
    return value / SCALE_UNIT


__all__ = [
    "FRAME_MOVE",
    "MOVE_FRAME_SIZE",
    "OBJECT_SLOTS",
    "Annotate",
    "AnnotationDeleted",
    "AnnotationState",
    "DeleteAnnotation",
    "EditAnnotation",
    "ForceRelease",
    "Grab",
    "HandoverRequested",
    "LockChanged",
    "Move",
    "ObjectAck",
    "ObjectMessage",
    "ObjectRefused",
    "ObjectRemoved",
    "ObjectState",
    "ObjectsSynced",
    "Release",
    "Remove",
    "RequestHandover",
    "SetView",
    "Spawn",
    "ViewState",
    "Yield",
    "decode_move",
    "encode_move",
    "entity_id",
]
