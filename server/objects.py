"""Shared 3D objects in rooms: spawning assets, exclusive leases, moves, view state,
annotations, and their persistence.

Object transforms live in the world's entity table (ids from ``OBJECT_ID_BASE``), so they travel
in the same delta-coded tick state as avatars and an object at rest costs one bit per tick.
Leases are in memory only (nobody holds anything after a restart). Everything else is
committed to the :class:`~server.store.ObjectStore` by one writer thread, in request order, and
becomes visible (broadcast) and acknowledged only once durable; moved transforms are written
every ``object_flush_interval`` seconds.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from medverse.protocol.errors import ErrorCode, ProtocolError
from medverse.protocol.messages import Message
from medverse.protocol.objects import (
    FRAME_MOVE,
    OBJECT_SLOTS,
    POINTS_PER_KIND,
    Annotate,
    AnnotationDeleted,
    AnnotationState,
    DeleteAnnotation,
    EditAnnotation,
    ForceRelease,
    Grab,
    HandoverRequested,
    LockChanged,
    ObjectAck,
    ObjectRefused,
    ObjectRemoved,
    ObjectsSynced,
    ObjectState,
    Release,
    Remove,
    RequestHandover,
    SetView,
    Spawn,
    ViewState,
    Yield,
    decode_move,
    entity_id,
    scale_to_state,
)
from medverse.protocol.quant import quantize_positions, quantize_rotations

from .features import Feature
from .store import ObjectStore, SQLiteObjectStore, StoredAnnotation, StoredObject, TransformRow

if TYPE_CHECKING:
    from .room import Member, Room
    from .session import Session
    from .world import World

log = logging.getLogger("medverse.objects")

#: Refused moves answered per second per member (a token bucket with this burst too): moves
#: arrive at up to 90 Hz and the answers should not outgrow them.
MOVE_REFUSALS_PER_SECOND = 30.0
# The scale row's rotation is always the identity.
_IDENTITY_INDEX, _IDENTITY_ROT = (a[0] for a in quantize_rotations(np.array([[0.0, 0, 0, 1]])))


class Refusal(ProtocolError):
    """A refused object operation; ``holder`` names the lease holder for ``object_locked``."""

    def __init__(
        self, code: ErrorCode, message: str, object_id: int | None = None, holder: int | None = None
    ) -> None:
        super().__init__(code, message)
        self.object_id = object_id
        self.holder = holder


@dataclass(eq=False)
class LiveObject:
    """An object of an open room: its stored record, state row and lease."""

    rec: StoredObject
    row: int  # row block in the world's entity table
    holder: Member | None = None
    last_active: float = 0.0  # when the holder last did something with it (monotonic)
    requests: set[int] = field(default_factory=set)  # member ids asking for a hand-over
    last_seq: int = -1  # the holder's newest applied move
    removing: bool = False  # removal is being committed
    annotations: int = 0  # how many annotations it carries


@dataclass(eq=False)
class RoomObjects:
    """The objects and annotations of one open room."""

    room: Room
    objects: dict[int, LiveObject]
    annotations: dict[int, StoredAnnotation]  # insertion order = seq order
    next_object_id: int
    next_annotation_id: int
    seq: int
    spawning: int = 0  # spawns being committed (count towards the room's limit)


class ObjectsFeature(Feature):
    """The shared-objects feature (register with ``world.add_feature``)."""

    def __init__(self, world: World, store: ObjectStore | None = None) -> None:
        super().__init__()
        self.world = world
        self.config = world.config
        self._store = store
        self.rooms: dict[str, RoomObjects] = {}
        self._writer: ThreadPoolExecutor | None = None
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._held: set[LiveObject] = set()
        self._dirty: set[LiveObject] = set()  # moved since the last flush
        self._moved: set[LiveObject] = set()  # moved since the last tick
        # id(member) -> (tokens, monotonic time of the last refill)
        self._refusal_tokens: dict[int, tuple[float, float]] = {}
        self.handlers.update(
            {
                Spawn: self._guard(self._spawn),
                Grab: self._guard(self._grab),
                Release: self._guard(self._release),
                RequestHandover: self._guard(self._request),
                Yield: self._guard(self._yield),
                SetView: self._guard(self._set_view),
                Remove: self._guard(self._remove),
                ForceRelease: self._guard(self._force_release),
                Annotate: self._guard(self._annotate),
                EditAnnotation: self._guard(self._edit_annotation),
                DeleteAnnotation: self._guard(self._delete_annotation),
            }
        )
        self.binary_handlers[FRAME_MOVE] = self._move

    # ----------------------------------------------------------------- lifecycle

    @property
    def store(self) -> ObjectStore:
        assert self._store is not None, "the feature is not started"
        return self._store

    async def start(self) -> None:
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="medverse-objects")
        if self._store is None:
            self._store = await asyncio.get_running_loop().run_in_executor(
                self._writer, SQLiteObjectStore, self.config.data_dir
            )
        self._flush_tick()
        self._sweep_tick()

    async def stop(self) -> None:
        for t in self._timers.values():
            t.cancel()
        self._timers.clear()
        self.flush()
        if self._writer is not None:
            writer = self._writer
            await asyncio.get_running_loop().run_in_executor(None, writer.shutdown, True)
            self._writer = None
        if self._store is not None:
            self._store.close()
            self._store = None

    def _flush_tick(self) -> None:
        self.flush()
        loop = asyncio.get_running_loop()
        interval = self.config.object_flush_interval
        self._timers["flush"] = loop.call_later(interval, self._flush_tick)

    def _sweep_tick(self) -> None:
        """End leases whose holder has been idle for longer than the lease timeout."""
        if self._held:
            cutoff = time.monotonic() - self.config.object_lease_timeout
            for obj in [o for o in self._held if o.last_active < cutoff]:
                ro = self.rooms.get(obj.rec.room)
                if ro is not None:
                    self._set_holder(ro, obj, None, "timeout")
        interval = min(0.25, self.config.object_lease_timeout / 4)
        self._timers["sweep"] = asyncio.get_running_loop().call_later(interval, self._sweep_tick)

    def flush(self, room: str | None = None) -> None:
        """Queue the moved objects' transforms (of one room, or all) for writing."""
        picked = [o for o in self._dirty if room is None or o.rec.room == room]
        self._dirty.difference_update(picked)
        rows = [
            TransformRow(o.rec.room, o.rec.id, o.rec.position, o.rec.rotation, o.rec.scale)
            for o in picked
            if not o.removing
        ]
        if rows and self._writer is not None:
            self._writer.submit(self._write_transforms, rows)

    def _write_transforms(self, rows: list[TransformRow]) -> None:
        try:
            self.store.put_transforms(rows)
        except Exception:
            log.exception("writing %d object transforms failed", len(rows))

    def _commit(
        self,
        fn: Callable[..., None],
        *args: Any,
        done: Callable[[], None],
        failed: Callable[[], None],
    ) -> None:
        """Run a store call on the writer thread; ``done`` or ``failed`` runs on the loop, in
        the order the calls were made (one writer, FIFO)."""
        assert self._writer is not None
        fut = asyncio.get_running_loop().run_in_executor(self._writer, fn, *args)

        def finished(f: asyncio.Future[None]) -> None:
            if f.cancelled() or f.exception() is not None:
                log.error(
                    "object store write failed", exc_info=None if f.cancelled() else f.exception()
                )
                failed()
            else:
                done()

        fut.add_done_callback(finished)

    # ----------------------------------------------------------------- rooms

    def room_created(self, room: Room) -> None:
        """Bring the room's stored objects back (waits for earlier writes of the same room)."""
        if self._writer is None:
            return
        record = self._writer.submit(self.store.load_room, room.name).result()
        ro = RoomObjects(
            room,
            {},
            {a.id: a for a in record.annotations},
            record.next_object_id,
            record.next_annotation_id,
            record.seq,
        )
        for rec in record.objects:
            ro.objects[rec.id] = self._materialize(room, rec)
        for a in record.annotations:
            if a.object_id in ro.objects:
                ro.objects[a.object_id].annotations += 1
        self.rooms[room.name] = ro

    def room_closed(self, room: Room) -> None:
        ro = self.rooms.get(room.name)
        if ro is None or ro.room is not room:
            return
        self.flush(room.name)
        for obj in ro.objects.values():
            self._held.discard(obj)
            self._moved.discard(obj)
            self.world.free_entity(obj.row)
        del self.rooms[room.name]

    def _materialize(self, room: Room, rec: StoredObject) -> LiveObject:
        row = self.world.alloc_entity(room, entity_id(rec.id), OBJECT_SLOTS)
        obj = LiveObject(rec, row)
        self._write_state(obj)
        return obj

    def _write_state(self, obj: LiveObject) -> None:
        self._write_states([obj])

    def _write_states(self, objs: list[LiveObject]) -> None:
        """Quantize the objects' transforms and scales into their state rows in one batch."""
        n = len(objs)
        recs = [o.rec for o in objs]
        pos = np.zeros((n, OBJECT_SLOTS, 3), np.int64)
        pos[:, 0] = quantize_positions(np.array([r.position for r in recs]))
        pos[:, 1, 0] = [scale_to_state(r.scale) for r in recs]
        index = np.zeros((n, OBJECT_SLOTS), np.uint8)
        rot = np.zeros((n, OBJECT_SLOTS, 3), np.int64)
        index[:, 0], rot[:, 0] = quantize_rotations(np.array([r.rotation for r in recs]))
        index[:, 1], rot[:, 1] = _IDENTITY_INDEX, _IDENTITY_ROT
        rows = np.fromiter((o.row for o in objs), np.int64, n)
        self.world.write_entities(rows, np.ones((n, OBJECT_SLOTS), np.bool_), pos, index, rot)

    def before_tick(self, tick: int) -> None:
        """Write the transforms moved since the last tick (latest wins) in one batch."""
        if self._moved:
            objs = [o for o in self._moved if not o.removing]
            self._moved.clear()
            if objs:
                self._write_states(objs)

    def _room(self, member: Member) -> RoomObjects:
        ro = self.rooms.get(member.room.name)
        if ro is None or ro.room is not member.room:
            raise Refusal(ErrorCode.INTERNAL, "the room's objects are not loaded")
        return ro

    # ----------------------------------------------------------------- members

    def member_joined(self, member: Member) -> None:
        self._send_all(member)

    def member_resumed(self, member: Member) -> None:
        self._send_all(member)  # it may have missed changes while disconnected

    def member_paused(self, member: Member, paused: bool) -> None:
        if paused:
            self._drop_member(member, "paused")
        else:
            self._send_all(member)  # it received nothing while paused

    def member_disconnected(self, member: Member) -> None:
        self._drop_member(member, "disconnected")

    def member_left(self, member: Member, reason: str) -> None:
        self._drop_member(member, "left")
        self._refusal_tokens.pop(id(member), None)

    def _drop_member(self, member: Member, reason: str) -> None:
        """End the member's leases and hand-over requests at once."""
        ro = self.rooms.get(member.room.name)
        if ro is None:
            return
        for obj in ro.objects.values():
            obj.requests.discard(member.id)
            if obj.holder is member:
                self._set_holder(ro, obj, None, reason)

    def _send_all(self, member: Member) -> None:
        s = member.session
        ro = self.rooms.get(member.room.name)
        if s is None or ro is None or member.paused:
            return  # a paused member gets everything when it comes back
        live = [o for o in ro.objects.values() if not o.removing]
        for obj in live:
            s.send(self._state_msg(obj))
        annos = [a for a in ro.annotations.values() if a.object_id in ro.objects]
        for a in annos:
            s.send(_anno_msg(a))
        s.send(ObjectsSynced(len(live), len(annos)))

    @staticmethod
    def _state_msg(obj: LiveObject) -> ObjectState:
        r = obj.rec
        return ObjectState(
            r.id,
            r.asset,
            r.name,
            r.author,
            r.position,
            r.rotation,
            r.scale,
            r.nodes,
            r.plane,
            obj.holder.id if obj.holder is not None else None,
        )

    # ----------------------------------------------------------------- plumbing

    def _guard(
        self, fn: Callable[[Session, Member, Any], None]
    ) -> Callable[[Session, Member, Message], None]:
        """Answer a refused operation with ``obj_refused`` carrying its request id."""

        def handler(session: Session, member: Member, msg: Message) -> None:
            try:
                fn(session, member, msg)
            except ProtocolError as err:
                self.world.metrics.protocol_errors.labels(err.code.value).inc()
                session.send(
                    ObjectRefused(
                        msg.req,  # type: ignore[attr-defined]
                        err.code.value,
                        err.message[:1024],
                        getattr(err, "object_id", None) or getattr(msg, "object_id", None),
                        getattr(err, "holder", None),
                    )
                )

        return handler

    @staticmethod
    def _allowed(member: Member, grant: str) -> None:
        if member.hidden:
            raise Refusal(ErrorCode.FORBIDDEN, "observers receive only")
        if member.paused:
            raise Refusal(ErrorCode.FORBIDDEN, "paused members act on nothing")
        if not member.identity.can(grant):
            raise Refusal(ErrorCode.FORBIDDEN, f"role {member.identity.role} may not {grant}")

    @staticmethod
    def _object(ro: RoomObjects, object_id: int) -> LiveObject:
        obj = ro.objects.get(object_id)
        if obj is None or obj.removing:
            raise Refusal(ErrorCode.NOT_FOUND, f"no object {object_id}", object_id)
        return obj

    @staticmethod
    def _locked(obj: LiveObject) -> Refusal:
        h = obj.holder
        assert h is not None
        return Refusal(
            ErrorCode.OBJECT_LOCKED,
            f"object {obj.rec.id} is held by {h.name} (member {h.id})",
            obj.rec.id,
            h.id,
        )

    @staticmethod
    def _reply(member: Member, msg: Message) -> None:
        s = member.session
        if s is not None and not member.paused:
            s.send(msg)

    def _set_holder(
        self, ro: RoomObjects, obj: LiveObject, holder: Member | None, why: str
    ) -> None:
        obj.holder = holder
        obj.last_seq = -1
        if holder is None:
            self._held.discard(obj)
        else:
            obj.requests.discard(holder.id)
            obj.last_active = time.monotonic()
            self._held.add(obj)
        ro.room.broadcast(LockChanged(obj.rec.id, why, holder.id if holder else None))

    def _record(self, kind: str, member: Member, subject: str, **fields: object) -> None:
        self.world.record(
            kind, room=member.room.name, actor=member.identity.subject, subject=subject, **fields
        )

    # ----------------------------------------------------------------- objects

    def _spawn(self, session: Session, member: Member, msg: Spawn) -> None:
        self._allowed(member, "manipulate_objects")
        ro = self._room(member)
        checker = getattr(self.world, "assets", None)
        if checker is not None and checker.info(member.room.name, msg.asset) is None:
            raise Refusal(ErrorCode.NOT_FOUND, "no such asset in this room")
        if len(ro.objects) + ro.spawning >= self.config.max_objects_per_room:
            raise Refusal(ErrorCode.LIMIT_REACHED, "the room holds its maximum of objects")
        oid = ro.next_object_id
        ro.next_object_id += 1
        rec = StoredObject(
            member.room.name,
            oid,
            msg.asset,
            msg.name or f"object {oid}",
            member.name,
            member.identity.subject,
            time.time(),
            msg.position,
            msg.rotation,
            msg.scale,
        )
        ro.spawning += 1

        def done() -> None:
            ro.spawning -= 1
            if self.rooms.get(ro.room.name) is not ro:
                return  # the room closed meanwhile; it is stored and comes back next time
            obj = ro.objects[oid] = self._materialize(ro.room, rec)
            self._record("object_spawned", member, f"object:{oid}", asset=msg.asset)
            ro.room.broadcast(self._state_msg(obj))
            self._reply(member, ObjectAck(msg.req, oid))

        def failed() -> None:
            ro.spawning -= 1
            self._reply(member, ObjectRefused(msg.req, "internal", "storage failed"))

        self._commit(self.store.put_object, replace(rec), done=done, failed=failed)

    def _grab(self, session: Session, member: Member, msg: Grab) -> None:
        self._allowed(member, "manipulate_objects")
        ro = self._room(member)
        obj = self._object(ro, msg.object_id)
        if obj.holder is None:
            self._set_holder(ro, obj, member, "grab")
        elif obj.holder is not member:
            raise self._locked(obj)
        else:
            obj.last_active = time.monotonic()
        session.send(ObjectAck(msg.req, msg.object_id))

    def _release(self, session: Session, member: Member, msg: Release) -> None:
        self._allowed(member, "manipulate_objects")
        ro = self._room(member)
        obj = self._object(ro, msg.object_id)
        if obj.holder is None:
            raise Refusal(ErrorCode.NOT_HOLDER, "nobody holds this object", msg.object_id)
        if obj.holder is not member:
            raise self._locked(obj)
        self._set_holder(ro, obj, None, "release")
        session.send(ObjectAck(msg.req, msg.object_id))

    def _request(self, session: Session, member: Member, msg: RequestHandover) -> None:
        self._allowed(member, "manipulate_objects")
        ro = self._room(member)
        obj = self._object(ro, msg.object_id)
        if obj.holder is None:
            self._set_holder(ro, obj, member, "grab")
        elif obj.holder is not member:
            obj.requests.add(member.id)
            self._reply(obj.holder, HandoverRequested(obj.rec.id, member.id))
        session.send(ObjectAck(msg.req, msg.object_id))

    def _yield(self, session: Session, member: Member, msg: Yield) -> None:
        self._allowed(member, "manipulate_objects")
        ro = self._room(member)
        obj = self._object(ro, msg.object_id)
        if obj.holder is not member:
            if obj.holder is None:
                raise Refusal(ErrorCode.NOT_HOLDER, "you do not hold this object", msg.object_id)
            raise self._locked(obj)
        target = member.room.members.get(msg.to)
        if target is None or msg.to not in obj.requests or target.session is None:
            raise Refusal(ErrorCode.NOT_FOUND, f"member {msg.to} has not asked for it")
        self._set_holder(ro, obj, target, "handover")
        session.send(ObjectAck(msg.req, msg.object_id))

    def _force_release(self, session: Session, member: Member, msg: ForceRelease) -> None:
        self._allowed(member, "moderate")
        ro = self._room(member)
        obj = self._object(ro, msg.object_id)
        if obj.holder is not None:
            self._record(
                "object_force_released",
                member,
                f"object:{obj.rec.id}",
                holder=obj.holder.identity.subject,
            )
            self._set_holder(ro, obj, None, "forced")
        session.send(ObjectAck(msg.req, msg.object_id))

    def _set_view(self, session: Session, member: Member, msg: SetView) -> None:
        self._allowed(member, "manipulate_objects")
        ro = self._room(member)
        obj = self._object(ro, msg.object_id)
        rec = obj.rec
        nodes = {**rec.nodes, **(msg.nodes or {})}
        if len(nodes) > 64:
            raise Refusal(ErrorCode.LIMIT_REACHED, "at most 64 nodes in a visibility map")
        rec.nodes = nodes
        if msg.plane is not None:
            rec.plane = msg.plane
        if obj.holder is member:
            obj.last_active = time.monotonic()
        view = ViewState(rec.id, dict(nodes), rec.plane)

        def done() -> None:
            if self.rooms.get(ro.room.name) is ro:
                ro.room.broadcast(view)
            self._reply(member, ObjectAck(msg.req, rec.id))

        self._commit(self.store.put_object, replace(rec), done=done, failed=self._fail(member, msg))

    def _fail(self, member: Member, msg: Any) -> Callable[[], None]:
        return lambda: self._reply(member, ObjectRefused(msg.req, "internal", "storage failed"))

    def _remove(self, session: Session, member: Member, msg: Remove) -> None:
        self._allowed(member, "manipulate_objects")
        ro = self._room(member)
        obj = self._object(ro, msg.object_id)
        if obj.holder is not None and obj.holder is not member:
            raise self._locked(obj)
        obj.removing = True
        oid = obj.rec.id

        def done() -> None:
            self._held.discard(obj)
            self._dirty.discard(obj)
            if self.rooms.get(ro.room.name) is ro and ro.objects.get(oid) is obj:
                del ro.objects[oid]
                self.world.free_entity(obj.row)
                for aid in [a.id for a in ro.annotations.values() if a.object_id == oid]:
                    del ro.annotations[aid]
                ro.room.broadcast(ObjectRemoved(oid, member.id))
            self._record("object_removed", member, f"object:{oid}")
            self._reply(member, ObjectAck(msg.req, oid))

        def failed() -> None:
            obj.removing = False
            self._reply(member, ObjectRefused(msg.req, "internal", "storage failed"))

        self._commit(self.store.delete_object, ro.room.name, oid, ro.seq, done=done, failed=failed)

    def _move(self, session: Session, member: Member, frame: bytes) -> None:
        """A holder's new transform: applied at once to the state row (the next tick sends
        it); a non-holder's is refused and changes nothing."""
        mv = decode_move(frame)
        if isinstance(mv, ProtocolError):
            raise mv
        if member.paused:
            return  # nothing of a paused member reaches the room
        ro = self.rooms.get(member.room.name)
        obj = ro.objects.get(mv.object_id) if ro is not None else None
        try:
            self._allowed(member, "manipulate_objects")
            if obj is None or obj.removing:
                raise Refusal(ErrorCode.NOT_FOUND, f"no object {mv.object_id}", mv.object_id)
            if obj.holder is not member:
                if obj.holder is None:
                    raise Refusal(ErrorCode.NOT_HOLDER, "grab the object first", mv.object_id)
                raise self._locked(obj)
        except Refusal as err:
            now = time.monotonic()
            rate = MOVE_REFUSALS_PER_SECOND
            tokens, stamp = self._refusal_tokens.get(id(member), (rate, now))
            tokens = min(rate, tokens + (now - stamp) * rate)
            self.world.metrics.protocol_errors.labels(err.code.value).inc()
            self._refusal_tokens[id(member)] = (tokens - 1.0 if tokens >= 1.0 else tokens, now)
            if tokens >= 1.0:
                session.send(
                    ObjectRefused(mv.seq, err.code.value, err.message, mv.object_id, err.holder)
                )
            return
        if mv.seq <= obj.last_seq:
            return  # older than a move already applied
        obj.last_seq = mv.seq
        obj.last_active = time.monotonic()
        rec = obj.rec
        rec.position, rec.rotation, rec.scale = mv.position, mv.rotation, mv.scale
        self._dirty.add(obj)
        self._moved.add(obj)  # quantized with the others at the next tick

    # ----------------------------------------------------------------- annotations

    def _annotate(self, session: Session, member: Member, msg: Annotate) -> None:
        self._allowed(member, "annotate")
        ro = self._room(member)
        obj = self._object(ro, msg.object_id)
        _check_points(msg.kind, msg.points)
        if obj.annotations >= self.config.max_annotations_per_object:
            raise Refusal(ErrorCode.LIMIT_REACHED, "the object carries its maximum of annotations")
        aid = ro.next_annotation_id
        ro.next_annotation_id += 1
        ro.seq += 1
        anno = StoredAnnotation(
            member.room.name,
            aid,
            obj.rec.id,
            msg.kind,
            msg.points,
            msg.text,
            msg.color,
            member.name,
            member.identity.subject,
            member.id,
            time.time(),
            None,
            ro.seq,
        )
        ro.annotations[aid] = anno
        obj.annotations += 1
        out = _anno_msg(anno)

        def done() -> None:
            self._record(
                "annotation_created",
                member,
                f"annotation:{aid}",
                object=obj.rec.id,
                author=anno.author_subject,
            )
            if self.rooms.get(ro.room.name) is ro:
                ro.room.broadcast(out)
            self._reply(member, ObjectAck(msg.req, obj.rec.id, aid))

        self._commit(self.store.put_annotation, anno, done=done, failed=self._fail(member, msg))

    def _own_annotation(self, member: Member, ro: RoomObjects, aid: int) -> StoredAnnotation:
        self._allowed(member, "annotate")
        anno = ro.annotations.get(aid)
        if anno is None or anno.object_id not in ro.objects:
            raise Refusal(ErrorCode.NOT_FOUND, f"no annotation {aid}")
        if anno.author_subject != member.identity.subject and not member.identity.can("moderate"):
            raise Refusal(ErrorCode.FORBIDDEN, "only its author or a host may change it")
        return anno

    def _edit_annotation(self, session: Session, member: Member, msg: EditAnnotation) -> None:
        ro = self._room(member)
        old = self._own_annotation(member, ro, msg.annotation_id)
        if msg.points is not None:
            _check_points(old.kind, msg.points)
        ro.seq += 1
        anno = replace(
            old,
            text=msg.text if msg.text is not None else old.text,
            points=msg.points if msg.points is not None else old.points,
            color=msg.color if msg.color is not None else old.color,
            edited=time.time(),
            seq=ro.seq,
        )
        ro.annotations.pop(anno.id)  # re-insert: the dict stays in seq order
        ro.annotations[anno.id] = anno
        out = _anno_msg(anno)

        def done() -> None:
            self._record(
                "annotation_edited",
                member,
                f"annotation:{anno.id}",
                object=anno.object_id,
                author=anno.author_subject,
            )
            if self.rooms.get(ro.room.name) is ro:
                ro.room.broadcast(out)
            self._reply(member, ObjectAck(msg.req, anno.object_id, anno.id))

        self._commit(self.store.put_annotation, anno, done=done, failed=self._fail(member, msg))

    def _delete_annotation(self, session: Session, member: Member, msg: DeleteAnnotation) -> None:
        ro = self._room(member)
        anno = self._own_annotation(member, ro, msg.annotation_id)
        ro.seq += 1
        seq = ro.seq
        del ro.annotations[anno.id]
        ro.objects[anno.object_id].annotations -= 1

        def done() -> None:
            self._record(
                "annotation_deleted",
                member,
                f"annotation:{anno.id}",
                object=anno.object_id,
                author=anno.author_subject,
            )
            if self.rooms.get(ro.room.name) is ro:
                ro.room.broadcast(AnnotationDeleted(anno.id, anno.object_id, seq))
            self._reply(member, ObjectAck(msg.req, anno.object_id, anno.id))

        self._commit(
            self.store.delete_annotation,
            ro.room.name,
            anno.id,
            seq,
            done=done,
            failed=self._fail(member, msg),
        )


def _check_points(kind: str, points: tuple[Any, ...]) -> None:
    lo, hi = POINTS_PER_KIND[kind]
    if not lo <= len(points) <= hi:
        raise Refusal(ErrorCode.OUT_OF_RANGE, f"a {kind} takes {lo}-{hi} points")
    if kind == "measure" and math.dist(points[0], points[1]) == 0.0:
        raise Refusal(ErrorCode.OUT_OF_RANGE, "a measurement needs two distinct points")


def _anno_msg(a: StoredAnnotation) -> AnnotationState:
    return AnnotationState(
        a.id,
        a.object_id,
        a.kind,
        a.points,
        a.author,
        a.author_id,
        a.created,
        a.seq,
        a.text,
        a.color,
        a.edited,
    )
