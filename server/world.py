"""The world: every room's entities in one struct-of-arrays table and the fixed-rate tick loop.

Each tick applies the latest pose input of every member in one vectorized batch, encodes every
room's delta in one pass of the world encoder, and hands each room its frame for the fan-out.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

import numpy as np

from medverse.protocol.errors import ErrorCode, ProtocolError
from medverse.protocol.messages import decode_pose_batch
from medverse.protocol.snapshot import MAX_SLOTS, SEGMENT_SHIFT, Snapshot, WorldEncoder

from .audit import AuditLog
from .auth import Identity, TokenVerifier
from .config import ServerConfig
from .features import BinaryHandler, Feature, Handler
from .metrics import Metrics
from .policy import RoomPolicy
from .room import Member, Room

if TYPE_CHECKING:
    from .assets import AssetStore
    from .session import Session

log = logging.getLogger("medverse.world")

#: Fewest ticks between two keyframes of one room (3 ticks: 100 ms at 30 Hz).
KEYFRAME_MIN_TICKS = 3


class World:
    """All rooms of one server process and the tick loop that drives them."""

    def __init__(self, config: ServerConfig, metrics: Metrics) -> None:
        self.config = config
        self.metrics = metrics
        self.period = 1.0 / config.tick_rate
        self.rooms: dict[str, Room] = {}
        self._rooms_by_segment: dict[int, Room] = {}
        self._next_segment = 1
        self._by_token: dict[str, Member] = {}
        self.tick_no = 0
        self._start = time.monotonic()
        self._task: asyncio.Task[None] | None = None
        self._encoder = WorldEncoder()
        # Entity table, grown by doubling; a member owns one row block.
        cap = 64
        self._keys = np.zeros(cap, np.uint64)
        self._active = np.zeros(cap, np.bool_)
        self._slots = np.zeros(cap, np.uint8)
        self._flags = np.zeros(cap, np.uint8)
        self._present = np.zeros((cap, MAX_SLOTS), np.bool_)
        self._pos = np.zeros((cap, MAX_SLOTS, 3), np.int64)
        self._rot_index = np.zeros((cap, MAX_SLOTS), np.uint8)
        self._rot = np.zeros((cap, MAX_SLOTS, 3), np.int64)
        self._free: list[int] = list(range(cap - 1, -1, -1))
        self._layout: tuple[np.ndarray, np.ndarray] | None = None  # entity order, row gather
        # Latest unapplied pose frame per table row, one dict per slot count.
        self.pending: dict[int, dict[int, bytes]] = {}
        # Counters flushed into Prometheus once per tick (cheaper than per write).
        self.sent_bytes = 0
        self.received_bytes = 0
        self.skipped = 0
        self.keyframes_sent = 0
        self.deltas_sent = 0
        self.tick_work: list[float] = []  # recent tick work times, seconds (bounded)
        self.overruns = 0  # ticks skipped because the loop fell behind
        self.connections_by_address: dict[str, int] = {}
        #: Checks join tokens; None on a server running without authentication.
        self.verifier: TokenVerifier | None = None
        self.policy = RoomPolicy(config)
        #: The tamper-evident audit log (opened when the app starts).
        self.audit: AuditLog | None = None
        #: Uploaded 3D models (opened when the app starts).
        self.assets: AssetStore | None = None
        #: Plugged-in room features (audio, shared objects, ...) and their message handlers.
        self.features: list[Feature] = []
        self.handlers: dict[type, Handler] = {}
        self.binary_handlers: dict[int, BinaryHandler] = {}

    # ----------------------------------------------------------------- features

    def add_feature(self, feature: Feature) -> None:
        """Plug a feature in: it gets lifecycle hooks and handles its control messages."""
        for cls, handler in feature.handlers.items():
            if cls in self.handlers:
                raise ValueError(f"two features handle {cls.__name__}")
            self.handlers[cls] = handler
        for kind, bhandler in feature.binary_handlers.items():
            if kind in self.binary_handlers:
                raise ValueError(f"two features handle frame kind 0x{kind:02x}")
            self.binary_handlers[kind] = bhandler
        self.features.append(feature)

    def notify(self, hook: str, *args: object) -> None:
        """Call ``hook`` on every feature; a failing feature is logged, never propagated."""
        for f in self.features:
            try:
                getattr(f, hook)(*args)
            except Exception:
                log.exception("feature %s failed in %s", type(f).__name__, hook)

    # ----------------------------------------------------------------- clock

    def room_time(self, room: Room) -> float:
        """Seconds on the room's clock now (tick T is at T / rate)."""
        return (time.monotonic() - self._start) - room.tick0 * self.period

    # ----------------------------------------------------------------- membership

    def join(self, identity: Identity, slots: int, session: Session) -> Member:
        """Add a member to its room (creating the room); raises ProtocolError if it is full.

        Hidden members (observers) get no avatar: nothing of them is in the room's state.
        """
        room_name = identity.room
        room = self.rooms.get(room_name)
        if room is None:
            room = Room(self, room_name, self._next_segment, self.tick_no)
            room.pseudonymous = self.policy.pseudonymous(room_name)
            self._next_segment += 1
            self.rooms[room_name] = room
            self._rooms_by_segment[room.segment] = room
            self.metrics.rooms.set(len(self.rooms))
            self.notify("room_created", room)
        if len(room.members) >= self.config.max_members_per_room:
            raise ProtocolError(ErrorCode.ROOM_FULL, f"room {room_name} is full")
        if room.close_timer is not None:
            room.close_timer.cancel()
            room.close_timer = None
        mid = room.new_member_id()
        index = -1 if identity.hidden else self._alloc_row(room.segment, mid, slots)
        member = Member(mid, identity, slots, room, index, session)
        room.members[mid] = member
        room.keyframe_wanted = True
        self._by_token[member.resume_token] = member
        self.metrics.members.inc()
        self.record(
            "join",
            room=room_name,
            actor=identity.subject,
            subject=str(mid),
            name=identity.name,
            role=identity.role,
        )
        room.announce_join(member)
        return member

    def record(self, kind: str, **fields: object) -> None:
        """Append to the audit log (if open); never lets logging break a session."""
        if self.audit is None:
            return
        room = fields.pop("room", None)
        actor = fields.pop("actor", None)
        subject = fields.pop("subject", None)
        try:
            self.audit.append(kind, room=room, actor=actor, subject=subject, **fields)  # type: ignore[arg-type]
        except Exception:
            log.exception("audit append failed")

    def find_resumable(self, token: str, room_name: str) -> Member | None:
        m = self._by_token.get(token)
        if m is None or m.room.name != room_name or m.room.members.get(m.id) is not m:
            return None
        return m

    def resume(self, member: Member, session: Session) -> None:
        """Attach a new connection to a member inside its grace window."""
        if member.grace is not None:
            member.grace.cancel()
            member.grace = None
        old = member.session
        member.session = session
        if old is not None and old is not session:
            old.detach(reason="replaced by a resumed connection")
        member.needs_keyframe = True
        member.room.keyframe_wanted = True
        self.record(
            "resume", room=member.room.name, actor=member.identity.subject, subject=str(member.id)
        )

    def disconnected(self, member: Member) -> None:
        """The member's connection dropped: keep its place for the resume grace window."""
        member.session = None
        loop = asyncio.get_running_loop()
        member.grace = loop.call_later(self.config.resume_grace, self.leave, member, "disconnected")
        self.notify("member_disconnected", member)

    def leave(self, member: Member, reason: str) -> None:
        """Remove a member now and tell the room."""
        room = member.room
        if room.members.get(member.id) is not member:
            return
        if member.grace is not None:
            member.grace.cancel()
            member.grace = None
        del room.members[member.id]
        self._by_token.pop(member.resume_token, None)
        if member.index >= 0:
            self._free_row(member.index)
        self.metrics.members.dec()
        self.record(
            "leave",
            room=room.name,
            actor=member.identity.subject,
            subject=str(member.id),
            reason=reason,
        )
        room.announce_leave(member, reason)
        self.notify("member_left", member, reason)
        if not room.members:
            loop = asyncio.get_running_loop()
            room.close_timer = loop.call_later(self.config.room_linger, self._close_room, room)

    def _close_room(self, room: Room) -> None:
        if room.members or self.rooms.get(room.name) is not room:
            return
        del self.rooms[room.name]
        del self._rooms_by_segment[room.segment]
        self.metrics.rooms.set(len(self.rooms))
        self.notify("room_closed", room)
        log.info("room %s closed", room.name)

    def alloc_entity(self, room: Room, entity_id: int, slots: int) -> int:
        """Give a non-member entity (a shared object, ...) of ``room`` a row block in the state.

        ``entity_id`` is the id on the wire, unique in the room; member ids are below
        ``protocol.snapshot.OBJECT_ID_BASE`` and other entities use ids from there up.
        Returns the row block index for :meth:`write_entity` and :meth:`free_entity`.
        """
        return self._alloc_row(room.segment, entity_id, slots)

    def free_entity(self, row: int) -> None:
        """Take an entity out of the state (it is removed from every member's view)."""
        self._free_row(row)

    def write_entity(
        self,
        row: int,
        present: np.ndarray,
        pos: np.ndarray,
        rot_index: np.ndarray,
        rot: np.ndarray,
    ) -> None:
        """Set an entity's quantized pose rows (as ``protocol.quant`` produces them); the next
        tick sends the change."""
        self.write_entities(np.array([row]), present[None], pos[None], rot_index[None], rot[None])

    def write_entities(
        self,
        rows: np.ndarray,
        present: np.ndarray,
        pos: np.ndarray,
        rot_index: np.ndarray,
        rot: np.ndarray,
    ) -> None:
        """:meth:`write_entity` for many entities of the same slot count at once: ``rows``
        (N,), ``present`` (N, S), ``pos`` (N, S, 3), ``rot_index`` (N, S), ``rot`` (N, S, 3)."""
        n = present.shape[1]
        self._present[rows, :n] = present
        self._pos[rows, :n] = pos
        self._rot_index[rows, :n] = rot_index
        self._rot[rows, :n] = rot

    def set_flags(self, row: int, flags: int) -> None:
        """Set an entity's 8 flag bits (e.g. ``FLAG_SPEAKING`` on an avatar)."""
        if row >= 0:
            self._flags[row] = flags

    def flags_of(self, row: int) -> int:
        return int(self._flags[row]) if row >= 0 else 0

    def poses_of(
        self, rows: np.ndarray, slot: int = 0
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Quantized pose ``slot`` of entity rows (all >= 0), as of the last tick: present (N,),
        position mm (N, 3), rotation index (N,) and smallest-three components (N, 3)."""
        return (
            self._present[rows, slot],
            self._pos[rows, slot],
            self._rot_index[rows, slot],
            self._rot[rows, slot],
        )

    def _alloc_row(self, segment: int, mid: int, slots: int) -> int:
        if not self._free:
            self._grow()
        i = self._free.pop()
        self._keys[i] = (segment << SEGMENT_SHIFT) | mid
        self._active[i] = True
        self._slots[i] = slots
        self._flags[i] = 0
        self._present[i] = False
        self._pos[i] = 0
        self._rot_index[i] = 0
        self._rot[i] = 0
        self._layout = None
        return i

    def _free_row(self, i: int) -> None:
        self._active[i] = False
        self._present[i] = False
        for d in self.pending.values():
            d.pop(i, None)
        self._free.append(i)
        self._layout = None

    def _grow(self) -> None:
        cap = self._keys.size
        for name in (
            "_keys",
            "_active",
            "_slots",
            "_flags",
            "_present",
            "_pos",
            "_rot_index",
            "_rot",
        ):
            a = getattr(self, name)
            b = np.zeros((cap * 2, *a.shape[1:]), a.dtype)
            b[:cap] = a
            setattr(self, name, b)
        self._free.extend(range(cap * 2 - 1, cap - 1, -1))

    # ----------------------------------------------------------------- input

    def hide_avatar(self, member: Member) -> None:
        """Take a member's avatar out of the room's state (pause); it shows again with the next
        pose the member sends."""
        if member.index < 0:
            return
        self._present[member.index] = False
        for d in self.pending.values():
            d.pop(member.index, None)

    def submit_pose(self, member: Member, frame: bytes) -> None:
        """Keep the member's newest pose frame until the next tick (latest wins)."""
        d = self.pending.get(member.slots)
        if d is None:
            d = self.pending[member.slots] = {}
        d[member.index] = frame

    def _apply_inputs(self) -> list[int]:
        """Validate and quantize all pending poses at once; return rows whose frame was refused."""
        refused: list[int] = []
        for slots, d in self.pending.items():
            if not d:
                continue
            idx = np.fromiter(d.keys(), np.int64, len(d))
            batch = decode_pose_batch(list(d.values()), slots)
            d.clear()
            ok = batch.ok
            good = idx[ok]
            self._present[good, :slots] = batch.present[ok]
            self._pos[good, :slots] = batch.pos[ok]
            self._rot_index[good, :slots] = batch.rot_index[ok]
            self._rot[good, :slots] = batch.rot[ok]
            if not ok.all():
                refused.extend(idx[~ok].tolist())
        return refused

    # ----------------------------------------------------------------- tick

    def snapshot(self) -> Snapshot:
        """The world's quantized state now, entities in (room, member) order."""
        if self._layout is None:
            act = np.flatnonzero(self._active)
            order = act[np.argsort(self._keys[act], kind="stable")]
            used = np.arange(MAX_SLOTS) < self._slots[order][:, None]
            gather = (order[:, None] * MAX_SLOTS + np.arange(MAX_SLOTS))[used]
            self._layout = (order, gather)
        order, gather = self._layout
        return Snapshot(
            ids=self._keys[order],
            slots=self._slots[order],
            flags=self._flags[order],
            present=self._present.reshape(-1)[gather],
            pos=self._pos.reshape(-1, 3)[gather],
            rot_index=self._rot_index.reshape(-1)[gather],
            rot=self._rot.reshape(-1, 3)[gather],
        )

    def tick(self) -> None:
        """One tick of every room."""
        if self.features:
            self.notify("before_tick", self.tick_no)
        refused = self._apply_inputs()
        if refused:
            self._refuse(refused)
        segments, bodies = self._encoder.encode(self.snapshot())
        seg_list = segments.tolist()
        # Keyframes cost a whole encode of the room: build at most one per room every
        # KEYFRAME_MIN_TICKS (a joiner waits at most that long), so members who join, resume
        # or fall behind over and over cannot make the tick pay for one every tick.
        wanted = [
            s
            for s in seg_list
            if (r := self._rooms_by_segment.get(s))
            and r.keyframe_wanted
            and self.tick_no - r.last_keyframe_tick >= KEYFRAME_MIN_TICKS
        ]
        for s in wanted:
            self._rooms_by_segment[s].last_keyframe_tick = self.tick_no
        keyframes = (
            dict(zip(wanted, self._encoder.keyframes(wanted), strict=True)) if wanted else {}
        )
        for seg, body in zip(seg_list, bodies, strict=True):
            room = self._rooms_by_segment.get(seg)
            if room is not None:
                room.send_state(self.tick_no, body, keyframes.get(seg))

    def _refuse(self, rows: list[int]) -> None:
        members = {m.index: m for r in self.rooms.values() for m in r.members.values()}
        for i in rows:
            m = members.get(i)
            if m is not None and m.session is not None:
                m.session.send_error(
                    ProtocolError(
                        ErrorCode.OUT_OF_RANGE,
                        "pose has NaN, infinity, an absurd "
                        "position or a quaternion far from unit length",
                    ),
                )

    def _flush_counters(self) -> None:
        m = self.metrics
        if self.sent_bytes:
            m.sent_bytes.inc(self.sent_bytes)
            self.sent_bytes = 0
        if self.received_bytes:
            m.received_bytes.inc(self.received_bytes)
            self.received_bytes = 0
        if self.skipped:
            m.skipped.inc(self.skipped)
            self.skipped = 0
        if self.keyframes_sent:
            m.state_frames.labels("keyframe").inc(self.keyframes_sent)
            self.keyframes_sent = 0
        if self.deltas_sent:
            m.state_frames.labels("delta").inc(self.deltas_sent)
            self.deltas_sent = 0

    async def run(self) -> None:
        """Tick at the configured rate, drift-corrected on the monotonic clock.

        Tick numbers follow the clock: tick n is due at start + n * period. If the loop falls
        behind by whole periods, those ticks are skipped (and counted) rather than run late in a
        burst, so a room's clock never drifts from wall time.
        """
        loop = asyncio.get_running_loop()
        period = self.period
        start_loop = loop.time()
        self._start = time.monotonic() - self.tick_no * period
        start_loop -= self.tick_no * period
        n = self.tick_no
        while True:
            n += 1
            due = start_loop + n * period
            delay = due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            late = loop.time() - due
            if late >= period:
                skip = int(late / period)
                n += skip
                self.overruns += skip
                self.metrics.tick_overruns.inc(skip)
            self.tick_no = n
            t0 = time.perf_counter()
            try:
                self.tick()
            except Exception:  # a bug in one tick must not stop every room
                log.exception("tick %d failed", n)
            work = time.perf_counter() - t0
            self.metrics.tick_seconds.observe(work)
            self.tick_work.append(work)

            if len(self.tick_work) > 16384:
                del self.tick_work[:8192]
            self._flush_counters()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self.run(), name="medverse-tick")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
