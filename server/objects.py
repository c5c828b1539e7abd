"""Shared 3D objects, as a room plugin: spawning assets, exclusive leases, moves, view state,
annotations, and their persistence.

Object transforms are entities of the room's tick state (ids from ``OBJECT_ID_BASE``), so they
travel in the same delta-coded state as avatars and an object at rest costs one bit per tick.
Leases are in memory only (nobody holds anything after a restart). Everything else is
committed to the :class:`~.store.ObjectStore` by one writer thread shared by every room
(:class:`SharedObjects`), in request order, and becomes visible (broadcast) and acknowledged
only once durable; moved transforms are written every ``object_flush_interval`` seconds.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import threading
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from medverse.protocol.errors import ErrorCode, ProtocolError
from medverse.protocol.messages import Message
from medverse.protocol.objects import (
    CLIENT_OBJECTS,
    FRAME_MOVE,
    MAX_SCALE,
    MIN_SCALE,
    OBJECT_SLOTS,
    POINTS_PER_KIND,
    SERVER_OBJECTS,
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

from .assets import AssetStore
from .plugins import MemberView, RoomContext, RoomPlugin, ServerContext, ServerPlugin
from .store import (
    ObjectStore,
    Quat,
    RoomRecord,
    SQLiteObjectStore,
    StoredAnnotation,
    StoredObject,
    TransformRow,
    Vec3,
)

log = logging.getLogger("medverse.objects")

#: Annotations sent to a joining member between two yields to the event loop.
SEND_CHUNK = 256
#: Store operations committed in one transaction at most.
MAX_BATCH = 256
#: Object requests a loading room keeps to answer once it has loaded (more are refused).
MAX_WAITING_REQUESTS = 256
#: Refused moves answered per second per member (a token bucket with this burst too): moves
#: arrive at up to 90 Hz and the answers should not outgrow them.
MOVE_REFUSALS_PER_SECOND = 30.0
# The scale row's rotation is always the identity.
_IDENTITY_INDEX, _IDENTITY_ROT = (a[0] for a in quantize_rotations(np.array([[0.0, 0, 0, 1]])))


def why_not_allowed(member: MemberView, grant: str) -> str | None:
    """Why ``member`` may not act on the room's shared things with ``grant`` (None: it may):
    observers and paused members act on nothing, others as their role allows."""
    if member.hidden:
        return "observers receive only"
    if member.paused:
        return "paused members act on nothing"
    if not member.can(grant):
        return f"role {member.identity.role} may not {grant}"
    return None


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
    row: int  # row block in the room's entities
    holder: MemberView | None = None
    last_active: float = 0.0  # when the holder last did something with it (monotonic)
    requests: set[int] = field(default_factory=set)  # member ids asking for a hand-over
    last_seq: int = -1  # the holder's newest applied move
    removing: bool = False  # removal is being committed
    annotations: int = 0  # how many annotations it carries


class RoomObjects(RoomPlugin):
    """The objects and annotations of one open room."""

    name = "objects"
    messages = CLIENT_OBJECTS
    server_messages = SERVER_OBJECTS
    frame_kinds = (FRAME_MOVE,)

    def __init__(self, ctx: RoomContext, service: SharedObjects) -> None:
        super().__init__(ctx)
        self.service = service
        self.objects: dict[int, LiveObject] = {}
        self.annotations: dict[int, StoredAnnotation] = {}  # insertion order = seq order
        self.next_object_id = 1
        self.next_annotation_id = 1
        self.seq = 0
        self.spawning = 0  # spawns being committed (count towards the room's limit)
        self.loaded = False
        self.loading = False
        # Requests that came while the room's objects loaded (answered once they have).
        self._waiting: list[tuple[MemberView, Message]] = []
        self._moved: set[LiveObject] = set()  # moved since the last tick
        # member id -> (tokens, monotonic time of the last refill) for refused moves
        self._refusal_tokens: dict[int, tuple[float, float]] = {}
        self._handlers: dict[type[Message], Callable[[MemberView, Any], None]] = {
            Spawn: self._spawn,
            Grab: self._grab,
            Release: self._release,
            RequestHandover: self._request,
            Yield: self._yield,
            SetView: self._set_view,
            Remove: self._remove,
            ForceRelease: self._force_release,
            Annotate: self._annotate,
            EditAnnotation: self._edit_annotation,
            DeleteAnnotation: self._delete_annotation,
        }

    # ----------------------------------------------------------------- lifecycle

    def on_create(self) -> None:
        """Start bringing the room's stored objects back, on the storage thread: the event
        loop (every other room's ticks and audio) never waits for a large room to load. Until
        it has, object requests wait in order and members get the objects once they are
        there. Rooms whose stored objects are held back (see :meth:`SharedObjects.hold_back`)
        refuse every object operation instead."""
        if self.ctx.name in self.service.held_back:
            return
        self.service.rooms[self.ctx.name] = self
        self.loading = True
        self.service.load(self.ctx.name).add_done_callback(self._loaded)

    def _loaded(self, fut: asyncio.Future[RoomRecord]) -> None:
        self.loading = False
        if not self._alive():
            return  # closed while loading
        if fut.cancelled() or fut.exception() is not None:
            log.error(
                "loading the objects of room %s failed",
                self.ctx.name,
                exc_info=None if fut.cancelled() else fut.exception(),
            )
            self._flush_waiting()  # refused now: the room's objects are not loaded
            return
        record = fut.result()
        self.annotations = {a.id: a for a in record.annotations}
        self.next_object_id = record.next_object_id
        self.next_annotation_id = record.next_annotation_id
        self.seq = record.seq
        for rec in record.objects:
            self.objects[rec.id] = self._materialize(rec)
        for a in record.annotations:
            if a.object_id in self.objects:
                self.objects[a.object_id].annotations += 1
        self.loaded = True
        for member in list(self.ctx.members.values()):  # those who came while it loaded
            self._send_all(member)
        self._flush_waiting()

    def _flush_waiting(self) -> None:
        """Run the requests that arrived while the room loaded, in order."""
        waiting, self._waiting = self._waiting, []
        for member, msg in waiting:
            if self.ctx.members.get(member.id) is member:
                self.on_message(member, msg)

    def on_persist(self) -> Coroutine[Any, Any, None] | None:
        # Transforms are written at intervals: write this room's now, then wait for the
        # writer (one thread, in order) to have committed everything queued before.
        self.service.flush(self.ctx.name)
        return self.service.settled()

    def on_close(self) -> None:
        service = self.service
        service.flush(self.ctx.name)
        for obj in self.objects.values():
            service.held.discard(obj)
            self.ctx.entities.free(obj.row)
        self._moved.clear()
        if service.rooms.get(self.ctx.name) is self:
            del service.rooms[self.ctx.name]

    def _alive(self) -> bool:
        """Whether this room is still open (a commit may finish after it closed)."""
        return self.service.rooms.get(self.ctx.name) is self

    def _materialize(self, rec: StoredObject) -> LiveObject:
        row = self.ctx.entities.alloc(entity_id(rec.id), OBJECT_SLOTS)
        obj = LiveObject(rec, row)
        self._write_states([obj])
        return obj

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
        self.ctx.entities.write(rows, np.ones((n, OBJECT_SLOTS), np.bool_), pos, index, rot)

    def on_tick(self, tick: int) -> None:
        """Write the transforms moved since the last tick (latest wins) in one batch."""
        if self._moved:
            objs = [o for o in self._moved if not o.removing]
            self._moved.clear()
            if objs:
                self._write_states(objs)

    # ----------------------------------------------------------------- members

    def on_join(self, member: MemberView) -> None:
        self._send_all(member)

    def on_resume(self, member: MemberView) -> None:
        self._send_all(member)  # it may have missed changes while disconnected

    def on_pause(self, member: MemberView, paused: bool) -> None:
        if paused:
            self._drop_member(member, "paused")
        else:
            self._send_all(member)  # it received nothing while paused

    def on_disconnect(self, member: MemberView) -> None:
        self._drop_member(member, "disconnected")

    def on_leave(self, member: MemberView, reason: str) -> None:
        self._drop_member(member, "left")
        self._refusal_tokens.pop(member.id, None)

    def _drop_member(self, member: MemberView, reason: str) -> None:
        """End the member's leases and hand-over requests at once."""
        for obj in self.objects.values():
            obj.requests.discard(member.id)
            if obj.holder is member:
                self.set_holder(obj, None, reason)

    def _send_all(self, member: MemberView) -> None:
        if not member.connected or member.paused or not self.loaded:
            return  # a paused member gets everything when it comes back; all get it on load
        send = self.ctx.send
        live = [o for o in self.objects.values() if not o.removing]
        for obj in live:
            send(member, self._state_msg(obj))
        aids = [a.id for a in self.annotations.values() if a.object_id in self.objects]
        if len(aids) <= SEND_CHUNK:
            for aid in aids:
                send(member, _anno_msg(self.annotations[aid]))
            send(member, ObjectsSynced(len(live), len(aids)))
        else:  # thousands of annotations: a few hundred at a time, the loop runs in between
            self.ctx.spawn(self._send_annotations(member, len(live), aids))

    async def _send_annotations(self, member: MemberView, objects: int, aids: list[int]) -> None:
        sent = 0
        for i in range(0, len(aids), SEND_CHUNK):
            if not member.connected or self.ctx.members.get(member.id) is not member:
                return
            for aid in aids[i : i + SEND_CHUNK]:
                # The current version: an edit or a deletion broadcast since the list was
                # taken must not be undone by an older copy arriving after it.
                anno = self.annotations.get(aid)
                if anno is not None and anno.object_id in self.objects:
                    self.ctx.send(member, _anno_msg(anno))
                    sent += 1
            await asyncio.sleep(0)
        self.ctx.send(member, ObjectsSynced(objects, sent))

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

    def on_message(self, member: MemberView, msg: Message) -> None:
        """Run the operation; a refusal is answered with ``obj_refused`` carrying its request
        id (never raised: object clients match answers to requests)."""
        if self.loading:
            if len(self._waiting) < MAX_WAITING_REQUESTS:
                self._waiting.append((member, msg))
                return
            busy = Refusal(ErrorCode.RATE_LIMITED, "the room's objects are loading")
            self._refuse(member, msg, busy)
            return
        try:
            self._check_loaded()
            self._handlers[type(msg)](member, msg)
        except ProtocolError as error:
            self._refuse(member, msg, error)

    def _refuse(self, member: MemberView, msg: Message, err: ProtocolError) -> None:
        """Answer a refused operation with ``obj_refused`` carrying its request id."""
        self.service.count_refusal(err)
        self.ctx.send(
            member,
            ObjectRefused(
                msg.req,  # type: ignore[attr-defined]
                err.code.value,
                err.message[:1024],
                getattr(err, "object_id", None) or getattr(msg, "object_id", None),
                getattr(err, "holder", None),
            ),
        )

    @staticmethod
    def _allowed(member: MemberView, grant: str) -> None:
        reason = why_not_allowed(member, grant)
        if reason is not None:
            raise Refusal(ErrorCode.FORBIDDEN, reason)

    def _object(self, object_id: int) -> LiveObject:
        obj = self.objects.get(object_id)
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

    def set_holder(self, obj: LiveObject, holder: MemberView | None, why: str) -> None:
        obj.holder = holder
        obj.last_seq = -1
        if holder is None:
            self.service.held.discard(obj)
        else:
            obj.requests.discard(holder.id)
            obj.last_active = time.monotonic()
            self.service.held.add(obj)
        self.ctx.broadcast(LockChanged(obj.rec.id, why, holder.id if holder else None))

    def _record(self, kind: str, member: MemberView, subject: str, **fields: object) -> None:
        self.ctx.audit(kind, actor=member.identity.subject, subject=subject, **fields)

    def _failed(self, member: MemberView, req: int) -> Callable[[], None]:
        return lambda: self.ctx.send(member, ObjectRefused(req, "internal", "storage failed"))

    # ----------------------------------------------------------------- objects

    def _spawn(self, member: MemberView, msg: Spawn) -> None:
        self._allowed(member, "manipulate_objects")
        if len(self.objects) + self.spawning >= self.ctx.config.max_objects_per_room:
            raise Refusal(ErrorCode.LIMIT_REACHED, "the room holds its maximum of objects")
        assets = self.service.assets
        if assets is None:
            self._spawn_listed(member, msg)
            return
        # Whether the room lists the model is a read of the asset index (a database round
        # trip in a cluster): in a thread, the spawn counting towards the limit meanwhile.
        self.spawning += 1
        self.ctx.spawn(self._spawn_after_lookup(assets, member, msg))

    async def _spawn_after_lookup(self, assets: AssetStore, member: MemberView, msg: Spawn) -> None:
        try:
            info = await asyncio.to_thread(assets.info, self.ctx.name, msg.asset)
        except Exception:
            log.exception("looking up asset %s failed", msg.asset)
            self.spawning -= 1
            if self._alive():
                self._refuse(member, msg, Refusal(ErrorCode.INTERNAL, "the asset index failed"))
            return
        self.spawning -= 1
        if not self._alive() or self.ctx.members.get(member.id) is not member:
            return  # closed, or the member left, meanwhile
        try:
            if info is None:
                raise Refusal(ErrorCode.NOT_FOUND, "no such asset in this room")
            if len(self.objects) + self.spawning >= self.ctx.config.max_objects_per_room:
                raise Refusal(ErrorCode.LIMIT_REACHED, "the room holds its maximum of objects")
            self._spawn_listed(member, msg)
        except ProtocolError as err:
            self._refuse(member, msg, err)

    def _spawn_listed(self, member: MemberView, msg: Spawn) -> None:
        """Spawn an object of a model the room lists."""
        room = self.ctx.name
        oid = self.next_object_id
        self.next_object_id += 1
        rec = StoredObject(
            room,
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
        self.spawning += 1

        def done() -> None:
            self.spawning -= 1
            if not self._alive():
                return  # the room closed meanwhile; it is stored and comes back next time
            obj = self.objects[oid] = self._materialize(rec)
            self._record("object_spawned", member, f"object:{oid}", asset=msg.asset)
            self.ctx.broadcast(self._state_msg(obj))
            self.ctx.send(member, ObjectAck(msg.req, oid))

        def failed() -> None:
            self.spawning -= 1
            self.ctx.send(member, ObjectRefused(msg.req, "internal", "storage failed"))

        self.service.commit(self.service.store.put_object, replace(rec), done=done, failed=failed)

    def _grab(self, member: MemberView, msg: Grab) -> None:
        self._allowed(member, "manipulate_objects")
        obj = self._object(msg.object_id)
        if obj.holder is None:
            self.set_holder(obj, member, "grab")
        elif obj.holder is not member:
            raise self._locked(obj)
        else:
            obj.last_active = time.monotonic()
        self.ctx.send(member, ObjectAck(msg.req, msg.object_id))

    def _release(self, member: MemberView, msg: Release) -> None:
        self._allowed(member, "manipulate_objects")
        obj = self._object(msg.object_id)
        if obj.holder is None:
            raise Refusal(ErrorCode.NOT_HOLDER, "nobody holds this object", msg.object_id)
        if obj.holder is not member:
            raise self._locked(obj)
        self.set_holder(obj, None, "release")
        self.ctx.send(member, ObjectAck(msg.req, msg.object_id))

    def _request(self, member: MemberView, msg: RequestHandover) -> None:
        self._allowed(member, "manipulate_objects")
        obj = self._object(msg.object_id)
        if obj.holder is None:
            self.set_holder(obj, member, "grab")
        elif obj.holder is not member:
            obj.requests.add(member.id)
            self.ctx.send(obj.holder, HandoverRequested(obj.rec.id, member.id))
        self.ctx.send(member, ObjectAck(msg.req, msg.object_id))

    def _yield(self, member: MemberView, msg: Yield) -> None:
        self._allowed(member, "manipulate_objects")
        obj = self._object(msg.object_id)
        if obj.holder is not member:
            if obj.holder is None:
                raise Refusal(ErrorCode.NOT_HOLDER, "you do not hold this object", msg.object_id)
            raise self._locked(obj)
        target = self.ctx.members.get(msg.to)
        if target is None or msg.to not in obj.requests or not target.connected:
            # The same words whoever ``to`` names (a hidden observer, nobody, anyone who did
            # not ask): trying ids must not tell them apart.
            raise Refusal(ErrorCode.NOT_FOUND, "that member has not asked for it")
        self.set_holder(obj, target, "handover")
        self.ctx.send(member, ObjectAck(msg.req, msg.object_id))

    def _force_release(self, member: MemberView, msg: ForceRelease) -> None:
        self._allowed(member, "moderate")
        obj = self._object(msg.object_id)
        if obj.holder is not None:
            self._record(
                "object_force_released",
                member,
                f"object:{obj.rec.id}",
                holder=obj.holder.identity.subject,
            )
            self.set_holder(obj, None, "forced")
        self.ctx.send(member, ObjectAck(msg.req, msg.object_id))

    def _set_view(self, member: MemberView, msg: SetView) -> None:
        self._allowed(member, "manipulate_objects")
        obj = self._object(msg.object_id)
        rec = obj.rec
        self._check_nodes(rec, msg.nodes)
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
            if self._alive():
                self.ctx.broadcast(view)
            self.ctx.send(member, ObjectAck(msg.req, rec.id))

        self.service.commit(
            self.service.store.put_object,
            replace(rec),
            done=done,
            failed=self._failed(member, msg.req),
        )

    def _check_nodes(self, rec: StoredObject, nodes: dict[str, bool] | None) -> None:
        """Refuse node names the object's model does not have, naming them: a view state
        that hides a node nobody can see would only mislead the others."""
        assets = self.service.assets
        if not nodes or assets is None:
            return
        # The model's node names, as read when the room loaded or the object was spawned
        # (fixed by the model's content: no database round trip on the event loop).
        known = set(assets.cached_nodes(rec.asset) or ())
        unknown = sorted(set(nodes) - known)
        if unknown:
            names = ", ".join(repr(n) for n in unknown[:8])
            raise Refusal(
                ErrorCode.NOT_FOUND,
                f"the model of object {rec.id} has no node named {names}",
                rec.id,
            )

    def _remove(self, member: MemberView, msg: Remove) -> None:
        self._allowed(member, "manipulate_objects")
        obj = self._object(msg.object_id)
        if obj.holder is not None and obj.holder is not member:
            raise self._locked(obj)
        obj.removing = True
        oid = obj.rec.id

        def done() -> None:
            self.service.held.discard(obj)
            self.service.dirty.discard(obj)
            if self._alive() and self.objects.get(oid) is obj:
                del self.objects[oid]
                self.ctx.entities.free(obj.row)
                for aid in [a.id for a in self.annotations.values() if a.object_id == oid]:
                    del self.annotations[aid]
                self.ctx.broadcast(ObjectRemoved(oid, member.id))
            self._record("object_removed", member, f"object:{oid}")
            self.ctx.send(member, ObjectAck(msg.req, oid))

        def failed() -> None:
            obj.removing = False
            self.ctx.send(member, ObjectRefused(msg.req, "internal", "storage failed"))

        self.service.commit(
            self.service.store.delete_object, self.ctx.name, oid, self.seq, done=done, failed=failed
        )

    # ----------------------------------------------------------------- for other plugins

    def transform(self, object_id: int) -> tuple[Vec3, Quat, float]:
        """An object's position, rotation and scale now (raises ``not_found``)."""
        rec = self._object(object_id).rec
        return rec.position, rec.rotation, rec.scale

    def drive(
        self,
        object_id: int,
        position: Vec3 | None = None,
        rotation: Quat | None = None,
        scale: float | None = None,
        *,
        store: bool = True,
    ) -> None:
        """Move an object from the server's side (another plugin's logic): like a holder's
        move, it reaches every member with the next tick and, with ``store``, is stored with
        the next flush (an animation that runs every tick passes ``store=False`` and stores
        its resting transform once it ends). Raises ``not_found``, or ``object_locked`` while
        a member holds the object (members' hands win over scripts)."""
        self._check_loaded()
        obj = self._object(object_id)
        if obj.holder is not None:
            raise self._locked(obj)
        rec = obj.rec
        if position is not None:
            rec.position = position
        if rotation is not None:
            rec.rotation = rotation
        if scale is not None:
            if not MIN_SCALE <= scale <= MAX_SCALE:
                raise Refusal(ErrorCode.OUT_OF_RANGE, f"scale must be {MIN_SCALE}-{MAX_SCALE}")
            rec.scale = scale
        if store:
            self.service.dirty.add(obj)
        self._moved.add(obj)

    def _check_loaded(self) -> None:
        """Refuse everything in a room whose stored objects could not be loaded: with empty
        state, new ids would overwrite what is stored."""
        if not self.loaded:
            held = self.service.held_back.get(self.ctx.name)
            if held is not None:
                raise Refusal(ErrorCode.CORRUPT, held)
            raise Refusal(ErrorCode.INTERNAL, "the room's objects are not loaded")

    def on_frame(self, member: MemberView, frame: bytes) -> None:
        """A holder's new transform: applied to the state row at the next tick (latest wins);
        a non-holder's is refused and changes nothing."""
        if self.loading:
            return  # nobody holds anything before the room's objects are there
        self._check_loaded()
        mv = decode_move(frame)
        if isinstance(mv, ProtocolError):
            raise mv
        if member.paused:
            return  # nothing of a paused member reaches the room
        obj = self.objects.get(mv.object_id)
        try:
            self._allowed(member, "manipulate_objects")
            if obj is None or obj.removing:
                raise Refusal(ErrorCode.NOT_FOUND, f"no object {mv.object_id}", mv.object_id)
            if obj.holder is not member:
                if obj.holder is None:
                    raise Refusal(ErrorCode.NOT_HOLDER, "grab the object first", mv.object_id)
                raise self._locked(obj)
        except Refusal as err:
            # Moves arrive at up to 90 Hz: refusals are answered at most
            # MOVE_REFUSALS_PER_SECOND per member (a token bucket), the rest only counted.
            now = time.monotonic()
            rate = MOVE_REFUSALS_PER_SECOND
            tokens, stamp = self._refusal_tokens.get(member.id, (rate, now))
            tokens = min(rate, tokens + (now - stamp) * rate)
            self.service.count_refusal(err)
            self._refusal_tokens[member.id] = (tokens - 1.0 if tokens >= 1.0 else tokens, now)
            if tokens >= 1.0:
                self.ctx.send(
                    member,
                    ObjectRefused(mv.seq, err.code.value, err.message, mv.object_id, err.holder),
                )
            return
        if mv.seq <= obj.last_seq:
            return  # older than a move already applied
        obj.last_seq = mv.seq
        obj.last_active = time.monotonic()
        rec = obj.rec
        rec.position, rec.rotation, rec.scale = mv.position, mv.rotation, mv.scale
        self.service.dirty.add(obj)
        self._moved.add(obj)  # quantized with the others at the next tick

    # ----------------------------------------------------------------- annotations

    def _announce(
        self, kind: str, member: MemberView, anno: StoredAnnotation, out: Message, req: int
    ) -> Callable[[], None]:
        """What follows a committed annotation change: the audit entry (ids and authors, never
        the text), the broadcast (if the room is still open) and the author's ack."""

        def done() -> None:
            self._record(
                kind,
                member,
                f"annotation:{anno.id}",
                object=anno.object_id,
                author=anno.author_subject,
            )
            if self._alive():
                self.ctx.broadcast(out)
            self.ctx.send(member, ObjectAck(req, anno.object_id, anno.id))

        return done

    def _annotate(self, member: MemberView, msg: Annotate) -> None:
        self._allowed(member, "annotate")
        obj = self._object(msg.object_id)
        _check_points(msg.kind, msg.points)
        if obj.annotations >= self.ctx.config.max_annotations_per_object:
            raise Refusal(ErrorCode.LIMIT_REACHED, "the object carries its maximum of annotations")
        aid = self.next_annotation_id
        self.next_annotation_id += 1
        self.seq += 1
        anno = StoredAnnotation(
            self.ctx.name,
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
            self.seq,
        )
        self.annotations[aid] = anno
        obj.annotations += 1
        done = self._announce("annotation_created", member, anno, _anno_msg(anno), msg.req)
        self.service.commit(
            self.service.store.put_annotation, anno, done=done, failed=self._failed(member, msg.req)
        )

    def _own_annotation(self, member: MemberView, aid: int) -> StoredAnnotation:
        self._allowed(member, "annotate")
        anno = self.annotations.get(aid)
        if anno is None or anno.object_id not in self.objects:
            raise Refusal(ErrorCode.NOT_FOUND, f"no annotation {aid}")
        if anno.author_subject != member.identity.subject and not member.can("moderate"):
            raise Refusal(ErrorCode.FORBIDDEN, "only its author or a host may change it")
        return anno

    def _edit_annotation(self, member: MemberView, msg: EditAnnotation) -> None:
        old = self._own_annotation(member, msg.annotation_id)
        if msg.points is not None:
            _check_points(old.kind, msg.points)
        self.seq += 1
        anno = replace(
            old,
            text=msg.text if msg.text is not None else old.text,
            points=msg.points if msg.points is not None else old.points,
            color=msg.color if msg.color is not None else old.color,
            edited=time.time(),
            seq=self.seq,
        )
        self.annotations.pop(anno.id)  # re-insert: the dict stays in seq order
        self.annotations[anno.id] = anno
        done = self._announce("annotation_edited", member, anno, _anno_msg(anno), msg.req)
        self.service.commit(
            self.service.store.put_annotation, anno, done=done, failed=self._failed(member, msg.req)
        )

    def _delete_annotation(self, member: MemberView, msg: DeleteAnnotation) -> None:
        anno = self._own_annotation(member, msg.annotation_id)
        self.seq += 1
        seq = self.seq
        del self.annotations[anno.id]
        self.objects[anno.object_id].annotations -= 1
        out = AnnotationDeleted(anno.id, anno.object_id, seq)
        done = self._announce("annotation_deleted", member, anno, out, msg.req)
        self.service.commit(
            self.service.store.delete_annotation,
            self.ctx.name,
            anno.id,
            seq,
            done=done,
            failed=self._failed(member, msg.req),
        )


class SharedObjects(ServerPlugin):
    """The shared-objects plugin: one storage writer for every room, and per room a
    :class:`RoomObjects`."""

    def __init__(self, store: ObjectStore | None = None) -> None:
        self._store = store
        self._writer: ThreadPoolExecutor | None = None
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self.assets: AssetStore | None = None
        self._count_error: Callable[[str], None] = lambda code: None
        self.lease_timeout = 5.0
        self.flush_interval = 0.5
        self.rooms: dict[str, RoomObjects] = {}
        #: Objects with a holder (for the lease timeout) and objects moved since the last flush.
        self.held: set[LiveObject] = set()
        self.dirty: set[LiveObject] = set()
        #: Rooms whose stored objects must not be opened, and why (see :meth:`hold_back`).
        self.held_back: dict[str, str] = {}
        #: Store calls waiting for the writer, with the futures they settle.
        self._batch: list[tuple[Callable[[], None], asyncio.Future[None]]] = []
        self._batch_lock = threading.Lock()

    room_plugin = RoomObjects

    def create(self, ctx: RoomContext) -> RoomPlugin:
        return RoomObjects(ctx, self)

    def use_store(self, store: ObjectStore) -> None:
        """Keep objects in ``store`` instead of the data directory's SQLite file (unless a
        store was given when the plugin was made); before :meth:`start`."""
        if self._store is None:
            self._store = store

    @property
    def store(self) -> ObjectStore:
        assert self._store is not None, "the plugin is not started"
        return self._store

    # ----------------------------------------------------------------- lifecycle

    async def start(self, server: ServerContext) -> None:
        cfg = server.config
        self.assets = server.assets
        self._count_error = server.count_error
        self.lease_timeout = cfg.object_lease_timeout
        self.flush_interval = cfg.object_flush_interval
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="medverse-objects")
        if self._store is None:
            self._store = await asyncio.get_running_loop().run_in_executor(
                self._writer, SQLiteObjectStore, cfg.data_dir
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
        self._timers["flush"] = loop.call_later(self.flush_interval, self._flush_tick)

    def _sweep_tick(self) -> None:
        """End leases whose holder has been idle for longer than the lease timeout."""
        if self.held:
            cutoff = time.monotonic() - self.lease_timeout
            for obj in [o for o in self.held if o.last_active < cutoff]:
                ro = self.rooms.get(obj.rec.room)
                if ro is not None:
                    ro.set_holder(obj, None, "timeout")
        interval = min(0.25, self.lease_timeout / 4)
        self._timers["sweep"] = asyncio.get_running_loop().call_later(interval, self._sweep_tick)

    def hold_back(self, room: str, reason: str) -> None:
        """Do not open ``room``'s stored objects: they lack changes that were acknowledged
        (found at start by :mod:`.integrity`). Its members are refused every object operation
        with ``corrupt`` and ``reason``, and nothing new is written over what is stored."""
        self.held_back[room] = reason

    def count_refusal(self, err: ProtocolError) -> None:
        """Count a refused operation with the server's protocol errors (by code)."""
        self._count_error(err.code.value)

    # ----------------------------------------------------------------- storage

    def load(self, room: str) -> asyncio.Future[RoomRecord]:
        """Everything stored about ``room``, read on the writer thread (after the writes
        already queued, so a room reopened at once sees its last changes)."""
        assert self._writer is not None
        store, assets = self.store, self.assets

        def read() -> RoomRecord:
            record = store.load_room(room)
            if assets is not None and record.objects:
                try:  # the models' node names, which view changes are checked against
                    assets.list(room)
                except Exception:
                    log.exception("reading the models of room %s failed", room)
            return record

        return asyncio.get_running_loop().run_in_executor(self._writer, read)

    def flush(self, room: str | None = None) -> None:
        """Queue the moved objects' transforms (of one room, or all) for writing."""
        picked = [o for o in self.dirty if room is None or o.rec.room == room]
        self.dirty.difference_update(picked)
        rows = [
            TransformRow(o.rec.room, o.rec.id, o.rec.position, o.rec.rotation, o.rec.scale)
            for o in picked
            if not o.removing
        ]
        if rows and self._writer is not None:
            self._writer.submit(self._write_transforms, rows)

    async def settled(self) -> None:
        """Wait until every write queued so far is committed (the writer runs them in order)."""
        if self._writer is not None:
            await asyncio.get_running_loop().run_in_executor(self._writer, lambda: None)

    def _write_transforms(self, rows: list[TransformRow]) -> None:
        try:
            self.store.put_transforms(rows)
        except Exception:
            log.exception("writing %d object transforms failed", len(rows))

    def commit(
        self,
        fn: Callable[..., None],
        *args: Any,
        done: Callable[[], None],
        failed: Callable[[], None],
    ) -> None:
        """Run a store call on the writer thread; ``done`` or ``failed`` runs on the loop, in
        the order the calls were made (one writer, FIFO). Calls that queue up while the
        writer commits are committed together next (see :meth:`ObjectStore.run_batch`)."""
        assert self._writer is not None
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        with self._batch_lock:
            self._batch.append((functools.partial(fn, *args), fut))
            first = len(self._batch) == 1
        if first:  # else the drain already queued takes it along
            self._writer.submit(self._drain, loop)

        def finished(f: asyncio.Future[None]) -> None:
            if f.cancelled() or f.exception() is not None:
                log.error(
                    "object store write failed", exc_info=None if f.cancelled() else f.exception()
                )
                failed()
            else:
                done()

        fut.add_done_callback(finished)

    def _drain(self, loop: asyncio.AbstractEventLoop) -> None:
        """On the writer thread: commit what is queued (up to MAX_BATCH at once)."""
        with self._batch_lock:
            batch, self._batch = self._batch[:MAX_BATCH], self._batch[MAX_BATCH:]
            more = bool(self._batch)
        if more:  # the rest after this batch, still before anything queued later
            self._writer.submit(self._drain, loop)  # type: ignore[union-attr]
        try:
            errors = self.store.run_batch([call for call, _ in batch])
        except Exception as exc:
            errors = [exc] * len(batch)

        def settle() -> None:
            for (_, fut), err in zip(batch, errors, strict=True):
                if fut.done():
                    continue
                if err is None:
                    fut.set_result(None)
                else:
                    fut.set_exception(err)

        loop.call_soon_threadsafe(settle)


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
