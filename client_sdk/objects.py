"""Shared 3D objects in the SDK: ``session.objects`` and the calls that change them.

``session.objects`` is a read-only mapping ``{object_id: SharedObject}`` of the room's objects
with their transform (from the tick state), lease holder, view state and annotations. The
calls (``spawn``, ``grab``, ``move``, ``release``, ``annotate``, ...) are methods of the
session; each awaits the server's answer and raises :class:`ObjectError` (with the protocol
error code, and the holder for ``object_locked``) when it is refused. ``move`` is the
exception: it returns at once, applies the move locally while you hold the object, and sends
the newest transform at most once per tick; if the server refuses it, the local transform is
dropped for the server's (a :class:`MoveRefused` event says so).

Events (in ``session.events()``): :class:`ObjectAdded`, :class:`ObjectRemoved`,
:class:`LockChanged`, :class:`HandoverRequested`, :class:`ViewChanged`,
:class:`AnnotationChanged`, :class:`MoveRefused`. ``await session.objects.wait_synced()``
returns once the room's full object list has arrived after (re)connecting.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from medverse.protocol.messages import Message, Welcome
from medverse.protocol.objects import (
    Annotate,
    AnnotationDeleted,
    AnnotationState,
    DeleteAnnotation,
    EditAnnotation,
    ForceRelease,
    Grab,
    ObjectAck,
    ObjectRefused,
    ObjectState,
    Release,
    Remove,
    RequestHandover,
    SetView,
    Spawn,
    ViewState,
    Yield,
    encode_move,
    entity_id,
    scale_from_state,
)
from medverse.protocol.objects import HandoverRequested as HandoverMsg
from medverse.protocol.objects import LockChanged as LockMsg
from medverse.protocol.objects import ObjectRemoved as RemovedMsg
from medverse.protocol.objects import (
    ObjectsSynced as ObjectsSyncedMsg,
)
from medverse.protocol.quant import dequantize_positions, dequantize_rotations

from .feature import PendingRequests, SessionLink
from .types import Pose, Quat, RefusedError, Vec3, from_message


class ObjectError(RefusedError):
    """The server refused an object operation. ``code`` is the protocol error code
    (``object_locked``, ``not_holder``, ``not_found``, ``forbidden``, ...); ``holder`` is the
    member holding the lease when the code is ``object_locked``."""

    def __init__(
        self, code: str, message: str, object_id: int | None = None, holder: int | None = None
    ) -> None:
        super().__init__(code, message)
        self.object_id = object_id
        self.holder = holder


@dataclass(frozen=True, slots=True)
class Annotation:
    """A pin, stroke or measurement, its points in the object's local frame (metres)."""

    id: int
    object_id: int
    kind: str  # pin | stroke | measure
    points: tuple[Vec3, ...]
    text: str | None
    color: int | None
    author: str  # display name (pseudonym in pseudonymous rooms)
    author_id: int  # member id of the author when it was made
    time: float  # created, Unix seconds
    edited: float | None
    seq: int  # room-wide order of annotation changes

    @property
    def distance_mm(self) -> float | None:
        """For a measurement: the distance between its two points, in millimetres (in the
        object's local units; multiply by the object's scale for the world distance)."""
        if self.kind != "measure":
            return None
        return math.dist(self.points[0], self.points[1]) * 1000.0


@dataclass(eq=False)
class SharedObject:
    """A shared object as this member sees it."""

    id: int
    asset: str  # SHA-256 of the glTF asset
    name: str
    author: str
    holder: int | None  # member id holding the lease, or None
    nodes: dict[str, bool]  # node visibility overrides (name -> visible)
    plane: tuple[float, ...]  # clipping plane (nx, ny, nz, d) in the local frame, or ()
    annotations: dict[int, Annotation] = field(default_factory=dict)
    _initial: tuple[Vec3, Quat, float] = ((0.0, 0.0, 0.0), (0.0, 0.0, 0.0, 1.0), 1.0)
    _client: ObjectsClient | None = field(default=None, repr=False)

    @property
    def transform(self) -> tuple[Vec3, Quat, float]:
        """(position, rotation, uniform scale): your own pending move while you hold it, else
        the newest tick state (the spawn transform until the state has it)."""
        c = self._client
        if c is None:
            return self._initial
        local = c._own(self.id)
        if local is not None:
            return local
        return c._state_transform(self.id) or self._initial

    def sample(self, t: float) -> tuple[Vec3, Quat, float]:
        """The transform at room time ``t`` (use ``session.render_time()``), interpolated
        between buffered states like :meth:`Avatar.sample` (position and scale linearly,
        rotation by slerp); your own pending move while you hold the object."""
        c = self._client
        if c is None:
            return self._initial
        local = c._own(self.id)
        if local is not None:
            return local
        sampled = c._s.sample_entity(entity_id(self.id), t)
        if sampled is None or len(sampled.poses) < 2 or None in sampled.poses:
            return self.transform
        body, scale_row = sampled.poses[0], sampled.poses[1]
        assert body is not None and scale_row is not None
        # Row 1 carries the scale in thousandths as its x millimetres, so in metres it is the
        # scale itself.
        return body.position, body.rotation, scale_row.position[0]

    @property
    def pose(self) -> Pose:
        pos, rot, _ = self.transform
        return Pose(pos, rot)

    @property
    def position(self) -> Vec3:
        return self.transform[0]

    @property
    def rotation(self) -> Quat:
        return self.transform[1]

    @property
    def scale(self) -> float:
        return self.transform[2]


# --------------------------------------------------------------------------- events


@dataclass(frozen=True, slots=True)
class ObjectAdded:
    object_id: int
    type: str = "object_added"


@dataclass(frozen=True, slots=True)
class ObjectRemoved:
    object_id: int
    by: int | None
    type: str = "object_removed"


@dataclass(frozen=True, slots=True)
class LockChanged:
    """``holder`` (a member id, or None: free) has the object now, because of ``reason``."""

    object_id: int
    holder: int | None
    reason: str
    type: str = "lock_changed"


@dataclass(frozen=True, slots=True)
class HandoverRequested:
    """You hold ``object_id`` and ``member_id`` asks for it: ``session.yield_object``."""

    object_id: int
    member_id: int
    type: str = "handover_requested"


@dataclass(frozen=True, slots=True)
class ViewChanged:
    object_id: int
    type: str = "view_changed"


@dataclass(frozen=True, slots=True)
class AnnotationChanged:
    """An annotation was created or edited (``deleted`` False) or deleted."""

    annotation_id: int
    object_id: int
    deleted: bool
    seq: int
    type: str = "annotation_changed"


@dataclass(frozen=True, slots=True)
class MoveRefused:
    """The server refused your move of ``object_id``; it shows the server's transform again."""

    object_id: int
    code: str
    holder: int | None
    type: str = "move_refused"


# --------------------------------------------------------------------------- client


class ObjectsClient(Mapping[int, SharedObject]):
    """The room's shared objects, ``{object_id: SharedObject}`` (``session.objects``)."""

    def __init__(self, session: SessionLink) -> None:
        self._s = session
        self._objects: dict[int, SharedObject] = {}
        self._local: dict[int, tuple[Vec3, Quat, float]] = {}
        # After a release: our last transform and the room time until which the state (as
        # rendered, a few ticks late) may not show it yet.
        self._released: dict[int, tuple[tuple[Vec3, Quat, float], float]] = {}
        self._pending: PendingRequests[ObjectAck] = PendingRequests()
        self._moves: dict[int, bytes] = {}
        self._move_ready: asyncio.Event | None = None
        self._move_task: asyncio.Task[None] | None = None
        self._synced: asyncio.Event | None = None
        for cls, fn in (
            (ObjectAck, self._on_ack),
            (ObjectRefused, self._on_refused),
            (ObjectState, self._on_state),
            (RemovedMsg, self._on_removed),
            (LockMsg, self._on_lock),
            (HandoverMsg, self._on_handover),
            (ViewState, self._on_view),
            (AnnotationState, self._on_anno),
            (AnnotationDeleted, self._on_anno_deleted),
            (ObjectsSyncedMsg, self._on_synced),
            (Welcome, self._on_welcome),  # after un-pausing: the full list follows
        ):
            session.add_handler(cls, fn)
        session.add_connected_hook(self._on_welcome)

    # ----------------------------------------------------------------- mapping

    def __getitem__(self, object_id: int) -> SharedObject:
        return self._objects[object_id]

    def __iter__(self) -> Iterator[int]:
        return iter(self._objects)

    def __len__(self) -> int:
        return len(self._objects)

    def annotation(self, annotation_id: int) -> Annotation | None:
        """An annotation by id, on whichever object."""
        for obj in self._objects.values():
            a = obj.annotations.get(annotation_id)
            if a is not None:
                return a
        return None

    @property
    def synced(self) -> bool:
        """True once the room's full object list has arrived on the current connection."""
        return self._synced is not None and self._synced.is_set()

    async def wait_synced(self, timeout: float = 5.0) -> None:
        """Wait until the room's object list has arrived after the current connection (or
        after coming back from a pause)."""
        if self._synced is None:
            self._synced = asyncio.Event()
        await asyncio.wait_for(self._synced.wait(), timeout)

    # ----------------------------------------------------------------- requests

    def _next_req(self) -> int:
        # One counter for requests and moves, so a refusal's id names exactly one of them.
        return self._pending.next_req()

    async def request(self, make: Any, timeout: float = 10.0) -> ObjectAck:
        """Send ``make(req)`` and wait for its acknowledgement; raise ObjectError if refused."""
        req = self._next_req()

        async def send() -> None:
            await self._flush_moves()  # moves made before this call reach the server first
            await self._s.send_message(make(req))

        return await self._pending.wait(req, send, timeout)

    def move(
        self,
        object_id: int,
        position: Vec3,
        rotation: Quat = (0.0, 0.0, 0.0, 1.0),
        scale: float = 1.0,
    ) -> int:
        if not all(math.isfinite(v) for v in (*position, *rotation, scale)):
            raise ValueError("transform values must be finite")
        seq = self._next_req()
        obj = self._objects.get(object_id)
        if obj is not None and obj.holder == self._s.member_id:
            n = math.sqrt(sum(q * q for q in rotation)) or 1.0
            x, y, z = (float(v) for v in position)
            qx, qy, qz, qw = (q / n for q in rotation)
            self._local[object_id] = ((x, y, z), (qx, qy, qz, qw), float(scale))
        self._moves[object_id] = encode_move(object_id, seq, position, rotation, scale)
        if self._move_task is None:
            self._move_ready = asyncio.Event()
            self._move_task = self._s.run_task(self._send_moves())
        assert self._move_ready is not None
        self._move_ready.set()
        return seq

    async def _send_moves(self) -> None:
        """Send the newest move of each object, at most once per tick (latest wins)."""
        assert self._move_ready is not None
        while True:
            await self._move_ready.wait()
            self._move_ready.clear()
            await self._flush_moves()
            await asyncio.sleep(1.0 / max(1, self._s.rate))

    async def _flush_moves(self) -> None:
        frames, self._moves = list(self._moves.values()), {}
        for frame in frames:
            with contextlib.suppress(ConnectionError, RuntimeError, OSError):
                await self._s.send_raw(frame)

    # ----------------------------------------------------------------- state

    def _own(self, object_id: int) -> tuple[Vec3, Quat, float] | None:
        """Our own transform of the object, while it should override the received state."""
        local = self._local.get(object_id)
        if local is not None:
            return local
        released = self._released.get(object_id)
        if released is not None:
            if self._s.render_time() <= released[1]:
                return released[0]
            del self._released[object_id]
        return None

    def _released_by_us(self, object_id: int) -> None:
        """Keep showing our last move until the state rendered shows it (no jump back)."""
        local = self._local.pop(object_id, None)
        if local is not None:
            self._released[object_id] = (local, self._s.room_time() + 1.0 / max(1, self._s.rate))

    def _state_transform(self, object_id: int) -> tuple[Vec3, Quat, float] | None:
        snap = self._s.snapshot
        rows = snap.rows_of(entity_id(object_id))
        if rows is None or not snap.present[rows.start]:
            return None
        pos = dequantize_positions(snap.pos[rows.start : rows.start + 1])[0]
        rot = dequantize_rotations(
            snap.rot_index[rows.start : rows.start + 1], snap.rot[rows.start : rows.start + 1]
        )[0]
        scale = float(scale_from_state(int(snap.pos[rows.start + 1, 0])))
        px, py, pz = pos.tolist()
        qx, qy, qz, qw = rot.tolist()
        return (px, py, pz), (qx, qy, qz, qw), scale

    def _emit(self, ev: Any) -> None:
        self._s.emit(ev)

    def _on_welcome(self, welcome: Message) -> None:
        """A fresh connection (or coming back from a pause): the server resends everything."""
        self._objects.clear()
        self._local.clear()
        self._released.clear()
        if self._synced is not None:
            self._synced.clear()
        self._pending.renewed()

    def _on_ack(self, m: Message) -> None:
        assert isinstance(m, ObjectAck)
        self._pending.acknowledged(m.req, m)

    def _on_refused(self, m: Message) -> None:
        assert isinstance(m, ObjectRefused)
        if self._pending.refused(m.req, ObjectError(m.code, m.message, m.object_id, m.holder)):
            return
        if m.object_id is not None:  # a refused move: show the server's transform again
            self._local.pop(m.object_id, None)
            self._released.pop(m.object_id, None)
            self._emit(from_message(MoveRefused, m))

    def _on_state(self, m: Message) -> None:
        assert isinstance(m, ObjectState)
        obj = self._objects.get(m.object_id)
        fresh = obj is None
        if obj is None:
            obj = SharedObject(m.object_id, m.asset, m.name, m.author, m.holder, {}, ())
            obj._client = self
            self._objects[m.object_id] = obj
        obj.holder, obj.nodes, obj.plane = m.holder, dict(m.nodes), tuple(m.plane)
        obj._initial = (m.position, m.rotation, m.scale)
        if fresh:
            self._emit(from_message(ObjectAdded, m))

    def _on_removed(self, m: Message) -> None:
        assert isinstance(m, RemovedMsg)
        self._objects.pop(m.object_id, None)
        self._local.pop(m.object_id, None)
        self._released.pop(m.object_id, None)
        self._emit(from_message(ObjectRemoved, m))

    def _on_lock(self, m: Message) -> None:
        assert isinstance(m, LockMsg)
        obj = self._objects.get(m.object_id)
        me = self._s.member_id
        was_mine = obj is not None and obj.holder == me
        if obj is not None:
            obj.holder = m.holder
        if m.holder is None and m.reason == "release" and was_mine:
            self._released_by_us(m.object_id)  # our last move stands: no jump back
        elif m.holder != me:
            self._local.pop(m.object_id, None)
            self._released.pop(m.object_id, None)
        self._emit(from_message(LockChanged, m))

    def _on_handover(self, m: Message) -> None:
        assert isinstance(m, HandoverMsg)
        self._emit(from_message(HandoverRequested, m))

    def _on_view(self, m: Message) -> None:
        assert isinstance(m, ViewState)
        obj = self._objects.get(m.object_id)
        if obj is not None:
            obj.nodes, obj.plane = dict(m.nodes), tuple(m.plane)
            self._emit(from_message(ViewChanged, m))

    def _on_anno(self, m: Message) -> None:
        assert isinstance(m, AnnotationState)
        obj = self._objects.get(m.object_id)
        if obj is None:
            return
        obj.annotations[m.annotation_id] = Annotation(
            m.annotation_id,
            m.object_id,
            m.kind,
            tuple(tuple(p) for p in m.points),  # type: ignore[misc]
            m.text,
            m.color,
            m.author,
            m.author_id,
            m.time,
            m.edited,
            m.seq,
        )
        self._emit(from_message(AnnotationChanged, m, deleted=False))

    def _on_anno_deleted(self, m: Message) -> None:
        assert isinstance(m, AnnotationDeleted)
        obj = self._objects.get(m.object_id)
        if obj is not None:
            obj.annotations.pop(m.annotation_id, None)
        self._emit(from_message(AnnotationChanged, m, deleted=True))

    def _on_synced(self, m: Message) -> None:
        assert isinstance(m, ObjectsSyncedMsg)
        if self._synced is None:
            self._synced = asyncio.Event()
        self._synced.set()


def _vec(v: Sequence[float], n: int, what: str) -> tuple[float, ...]:
    if len(v) != n:
        raise ValueError(f"{what} needs {n} numbers")
    return tuple(float(x) for x in v)


class ObjectsAPI:
    """The object calls of :class:`~client_sdk.session.Session` (mixed into it)."""

    objects: ObjectsClient

    async def spawn(
        self,
        asset: str,
        position: Vec3 = (0.0, 0.0, 0.0),
        rotation: Quat = (0.0, 0.0, 0.0, 1.0),
        scale: float = 1.0,
        name: str | None = None,
    ) -> int:
        """Instantiate an uploaded asset (its SHA-256, lowercase hex); returns the object id
        once the object is stored."""
        pos, rot = _vec(position, 3, "position"), _vec(rotation, 4, "rotation")
        ack = await self.objects.request(
            lambda r: Spawn(r, asset, pos, rot, float(scale), name)  # type: ignore[arg-type]
        )
        assert ack.object_id is not None
        return ack.object_id

    async def grab(self, object_id: int) -> None:
        """Take the object's exclusive lease; ObjectError ``object_locked`` (with ``holder``)
        when someone else has it."""
        await self.objects.request(lambda r: Grab(r, object_id))

    def move(
        self,
        object_id: int,
        position: Vec3,
        rotation: Quat = (0.0, 0.0, 0.0, 1.0),
        scale: float = 1.0,
    ) -> int:
        """Move (and scale) an object you hold: applied locally at once, sent at most once per
        tick (latest wins). Returns the move's sequence number."""
        return self.objects.move(object_id, position, rotation, scale)

    async def release(self, object_id: int) -> None:
        """Give the lease back."""
        await self.objects.request(lambda r: Release(r, object_id))

    async def request_object(self, object_id: int) -> None:
        """Ask the holder to hand the object over (granted at once if it is free); a
        ``LockChanged`` event naming you follows when the holder yields."""
        await self.objects.request(lambda r: RequestHandover(r, object_id))

    async def yield_object(self, object_id: int, to: int) -> None:
        """Hand an object you hold to a member who asked for it."""
        await self.objects.request(lambda r: Yield(r, object_id, to))

    async def force_release(self, object_id: int) -> None:
        """Hosts only: end whoever's lease on the object."""
        await self.objects.request(lambda r: ForceRelease(r, object_id))

    async def set_view(
        self,
        object_id: int,
        nodes: Mapping[str, bool] | None = None,
        plane: Sequence[float] | None = None,
    ) -> None:
        """Change the shared view state: node visibility (merged into the object's map) and
        the clipping plane ``(nx, ny, nz, d)`` in the object's local frame (``()`` removes
        it)."""
        pl = None if plane is None else (() if len(plane) == 0 else _vec(plane, 4, "plane"))
        await self.objects.request(
            lambda r: SetView(r, object_id, dict(nodes) if nodes is not None else None, pl)
        )

    async def remove_object(self, object_id: int) -> None:
        """Remove an object and its annotations from the room."""
        await self.objects.request(lambda r: Remove(r, object_id))

    async def annotate(
        self,
        object_id: int,
        kind: str,
        points: Sequence[Vec3],
        text: str | None = None,
        color: int | None = None,
    ) -> int:
        """Annotate an object (points in its local frame, metres): ``pin`` (1 point),
        ``stroke`` (2-128 points) or ``measure`` (2 points). Returns the annotation id once it
        is stored."""
        pts = tuple(_vec(p, 3, "point") for p in points)
        ack = await self.objects.request(
            lambda r: Annotate(r, object_id, kind, pts, text, color)  # type: ignore[arg-type]
        )
        assert ack.annotation_id is not None
        return ack.annotation_id

    async def edit_annotation(
        self,
        annotation_id: int,
        text: str | None = None,
        points: Sequence[Vec3] | None = None,
        color: int | None = None,
    ) -> None:
        """Change an annotation's text, points or colour (its author or a host)."""
        pts = None if points is None else tuple(_vec(p, 3, "point") for p in points)
        await self.objects.request(
            lambda r: EditAnnotation(r, annotation_id, text, pts, color)  # type: ignore[arg-type]
        )

    async def delete_annotation(self, annotation_id: int) -> None:
        """Delete an annotation (its author or a host)."""
        await self.objects.request(lambda r: DeleteAnnotation(r, annotation_id))


__all__ = [
    "Annotation",
    "AnnotationChanged",
    "HandoverRequested",
    "LockChanged",
    "MoveRefused",
    "ObjectAdded",
    "ObjectError",
    "ObjectRemoved",
    "ObjectsAPI",
    "ObjectsClient",
    "SharedObject",
    "ViewChanged",
]
