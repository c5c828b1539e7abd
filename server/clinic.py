"""The clinic, as a room plugin: transfers between rooms, calling the next patient, and what a
waiting patient is told.

* ``transfer``: a host of the room (``moderate``), a ``receptionist`` or a member with the
  ``transfer`` grant moves a member of its room to another room. The member is not
  reconnected: the core takes it out of this room and through the other room's entry on the
  same connection (its consent text, its lobby, its locks and bans).
* ``call_next``: a host calls the patient who has waited longest in the clinic's waiting room
  into the host's own room (no lobby: the host is letting the patient in). The patient gets
  ``called`` then ``moved``.
* ``send_back``: a host (or receptionist) sends a member of its room back to the waiting room.

A member who declines the consent of the room it was moved to goes back to the room it came
from (the core's doing; its mover gets ``move_declined``). A patient called from the waiting
room who comes back so, before entering the room it was called into, takes back its place in
the queue.

In the waiting room every patient (a member who neither hosts nor transfers) is told its place
in the queue, how many wait, an estimate of the wait and the clinic's message (``queue``),
again whenever any of them changes. The estimate is the mean length of the clinic's last
consultations (a stay that began with a call from the waiting room; the clinic file's
``default_consultation_minutes`` until one has been measured) times the patient's position,
shared among the consultation rooms that have a host in them now.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Awaitable, Coroutine
from typing import Any

from medverse.protocol.clinic import (
    MAX_ESTIMATE_SECONDS,
    Access,
    Called,
    CallNext,
    Moved,
    MoveDeclined,
    Queue,
    SendBack,
    Transfer,
)
from medverse.protocol.errors import ErrorCode, ProtocolError
from medverse.protocol.messages import MemberState, Message

from .clinicdef import Clinic
from .plugins import MemberView, RoomContext, RoomPlugin, ServerContext, ServerPlugin

#: Clinic requests (transfer, call_next, send_back) per second per member, and the burst.
REQUEST_RATE = 2.0
REQUEST_BURST = 6.0
#: Consultations the estimate averages over.
RECENT_CONSULTATIONS = 20
#: Calls remembered until the patient arrives (a patient who never arrives is forgotten).
MAX_PENDING_CALLS = 1024


def _patient(m: MemberView) -> bool:
    """A member who waits its turn: not staff (hosts, receptionists) and not an observer."""
    return not (m.hidden or m.can("moderate") or m.can("transfer"))


def _may_move(m: MemberView) -> None:
    if not (m.can("moderate") or m.can("transfer")):
        raise ProtocolError(
            ErrorCode.FORBIDDEN, f"role {m.identity.role} may not move members between rooms"
        )


class ClinicRoom(RoomPlugin):
    """One room of the clinic: its members' transfers, and its queue if it is the waiting
    room."""

    name = "clinic"
    messages = (Transfer, CallNext, SendBack)
    server_messages = (Moved, Queue, Called, Access, MoveDeclined)

    def __init__(self, ctx: RoomContext, service: ClinicService) -> None:
        super().__init__(ctx)
        self.service = service
        #: Patients waiting, in the order they entered (member id -> monotonic time).
        self.queue: dict[int, float] = {}
        #: Members called in from the waiting room: when their consultation began.
        self.consulting: dict[int, float] = {}
        self._buckets: dict[int, tuple[float, float]] = {}
        self._told: dict[int, Queue] = {}
        #: Patients called out of the queue, by identity: when they had entered it (a called
        #: patient who comes back without entering the room it was called into keeps its
        #: place).
        self._called_out: dict[str, float] = {}

    @property
    def waiting(self) -> bool:
        """Whether this room is the clinic's waiting room."""
        return self.service.waiting_room == self.ctx.name

    # ----------------------------------------------------------------- lifecycle

    def on_create(self) -> None:
        self.service.rooms[self.ctx.name] = self

    def on_close(self) -> None:
        if self.service.rooms.get(self.ctx.name) is self:
            del self.service.rooms[self.ctx.name]

    def on_join(self, member: MemberView) -> None:
        ctx = self.ctx
        if ctx.settings.audio_muted and not member.hidden and not member.can("moderate"):
            ctx.set_muted(member, True)
            ctx.broadcast(MemberState(member.id, member.paused, True, False))
        called = self.service.calls.pop(member.identity.subject, None)
        if called == ctx.name:
            self.consulting[member.id] = time.monotonic()
        if self.waiting and _patient(member):
            entered = self._called_out.pop(member.identity.subject, None)
            if called is None or called == ctx.name or entered is None:
                entered = time.monotonic()
            self.queue[member.id] = entered
            if len(self.queue) > 1 and entered < max(self.queue.values()):
                # Back before its call was answered: in its old place, by when it entered.
                self.queue = dict(sorted(self.queue.items(), key=lambda kv: kv[1]))
            self.tell_queue()
        elif member.can("moderate") and not self.waiting:
            self.service.staff_changed()

    def on_leave(self, member: MemberView, reason: str) -> None:
        self._buckets.pop(member.id, None)
        self._told.pop(member.id, None)
        started = self.consulting.pop(member.id, None)
        if started is not None:
            self.service.consultation_ended(time.monotonic() - started)
        if self.queue.pop(member.id, None) is not None:
            self.tell_queue()
        elif member.can("moderate") and not self.waiting:
            self.service.staff_changed()

    def on_member_changed(self, member: MemberView, what: str) -> None:
        if what != "grants" or not self.waiting:
            return
        # A patient made staff leaves the queue; staff made a patient joins its end.
        if _patient(member) and member.id not in self.queue:
            self.queue[member.id] = time.monotonic()
        elif not _patient(member):
            self.queue.pop(member.id, None)
        self.tell_queue()

    def on_resume(self, member: MemberView) -> None:
        self._told.pop(member.id, None)  # the new connection has been told nothing yet
        if member.id in self.queue:
            self.tell_queue()

    def describe(self) -> dict[str, object]:
        return {"queue": len(self.queue)} if self.waiting else {}

    # ----------------------------------------------------------------- the queue

    def tell_queue(self) -> None:
        """Tell every waiting patient its place, the estimate and the message, if changed."""
        ctx = self.ctx
        members = ctx.members
        order = [mid for mid in self.queue if mid in members]
        per_patient = self.service.estimate_per_patient()
        message = self.service.message
        for position, mid in enumerate(order, start=1):
            estimate = None
            if per_patient is not None:
                estimate = min(MAX_ESTIMATE_SECONDS, math.ceil(per_patient * position))
            facts = Queue(position, len(order), message, estimate)
            if self._told.get(mid) != facts:
                self._told[mid] = facts
                ctx.send(members[mid], facts)

    def next_patient(self) -> MemberView:
        """The patient who has waited longest and is connected now."""
        members = self.ctx.members
        for mid in self.queue:
            m = members.get(mid)
            if m is not None and m.connected:
                return m
        raise ProtocolError(ErrorCode.NOT_FOUND, "nobody is waiting")

    def call_next(self, into: str, by: MemberView) -> Coroutine[Any, Any, None] | None:
        """Call the patient who has waited longest in this (the waiting) room into room
        ``into``, on behalf of ``by`` (a member of that room): admitted there without its
        lobby. As :meth:`_move`: a coroutine answering the request while another server of
        the cluster decides; ``not_found`` if nobody connected is waiting."""
        return self._move(self.next_patient(), into, by, "called", admit=True)

    # ----------------------------------------------------------------- requests

    def on_message(self, member: MemberView, msg: Message) -> Coroutine[Any, Any, None] | None:
        self._limit(member)
        _may_move(member)
        if isinstance(msg, Transfer):
            target = self._member(member, msg.member_id)
            return self._move(target, msg.room, member, msg.reason or "", admit=False)
        elif isinstance(msg, CallNext):
            waiting = self.service.waiting_room
            if waiting is None:
                raise ProtocolError(ErrorCode.NOT_FOUND, "this clinic has no waiting room")
            if waiting == self.ctx.name:
                raise ProtocolError(ErrorCode.BAD_FIELD, "call patients into another room")
            room = self.service.rooms.get(waiting)
            if room is None:
                raise ProtocolError(ErrorCode.NOT_FOUND, "nobody is waiting")
            return room.call_next(self.ctx.name, member)
        elif isinstance(msg, SendBack):
            waiting = self.service.waiting_room
            if waiting is None:
                raise ProtocolError(ErrorCode.NOT_FOUND, "this clinic has no waiting room")
            target = self._member(member, msg.member_id)
            return self._move(
                target, waiting, member, msg.reason or "sent back to the waiting room"
            )
        return None

    def _member(self, actor: MemberView, member_id: int) -> MemberView:
        m = self.ctx.members.get(member_id)
        if m is None or m.hidden:  # observers are not found, as in moderation
            raise ProtocolError(ErrorCode.NOT_FOUND, "no such member")
        if m.id == actor.id:
            raise ProtocolError(ErrorCode.BAD_FIELD, "members do not move themselves")
        return m

    def _move(
        self, member: MemberView, room: str, by: MemberView, reason: str, admit: bool = False
    ) -> Coroutine[Any, Any, None] | None:
        """Move ``member`` of this room; a patient leaving the waiting room is called (and its
        consultation is timed from its arrival). A coroutine answering the request while
        another server of the cluster decides (see ``RoomContext.transfer``)."""
        notice = None
        subject = member.identity.subject
        if self.waiting and member.id in self.queue:
            notice = Called(room, by.name)
            self.service.call(subject, room)
            if len(self._called_out) >= MAX_PENDING_CALLS:
                self._called_out.pop(next(iter(self._called_out)))
            self._called_out[subject] = self.queue[member.id]
        try:
            pending = self.ctx.transfer(member, room, by, reason, admit, notice)
        except ProtocolError:
            if notice is not None:
                self.service.calls.pop(subject, None)
            raise
        if pending is None:
            return None
        return self._finish_move(pending, subject if notice is not None else None)

    async def _finish_move(self, pending: Awaitable[None], called: str | None) -> None:
        """The request's answer, once another server of the cluster has taken or refused the
        member (a refused call is forgotten)."""
        try:
            await pending
        except ProtocolError:
            if called is not None:
                self.service.calls.pop(called, None)
            raise

    def _limit(self, member: MemberView) -> None:
        now = time.monotonic()
        tokens, stamp = self._buckets.get(member.id, (REQUEST_BURST, now))
        tokens = min(REQUEST_BURST, tokens + (now - stamp) * REQUEST_RATE)
        if tokens < 1.0:
            self._buckets[member.id] = (tokens, now)
            raise ProtocolError(ErrorCode.RATE_LIMITED, "too many transfers; slow down")
        self._buckets[member.id] = (tokens - 1.0, now)


class ClinicService(ServerPlugin):
    """The clinic across rooms: which room is the waiting room, the recent consultations'
    lengths, and the rooms' :class:`ClinicRoom` instances (to call a patient from one room
    into another)."""

    room_plugin = ClinicRoom

    def __init__(self, clinic: Clinic | None = None) -> None:
        self.clinic = clinic
        self.rooms: dict[str, ClinicRoom] = {}
        #: Lengths (seconds) of the last consultations.
        self.durations: deque[float] = deque(maxlen=RECENT_CONSULTATIONS)
        #: Patients called from the waiting room, by identity, and the room they go to.
        self.calls: dict[str, str] = {}

    def create(self, ctx: RoomContext) -> RoomPlugin:
        return ClinicRoom(ctx, self)

    async def start(self, server: ServerContext) -> None:
        if self.clinic is None:
            self.clinic = server.clinic

    @property
    def waiting_room(self) -> str | None:
        return self.clinic.waiting_room if self.clinic is not None else None

    @property
    def message(self) -> str:
        return self.clinic.message if self.clinic is not None else ""

    def call(self, subject: str, room: str) -> None:
        if len(self.calls) >= MAX_PENDING_CALLS:
            self.calls.pop(next(iter(self.calls)))
        self.calls[subject] = room

    def estimate_per_patient(self) -> float | None:
        """Seconds of waiting each place in the queue stands for (None: nothing to go by)."""
        if self.durations:
            mean = sum(self.durations) / len(self.durations)
        elif self.clinic is not None and self.clinic.default_consultation is not None:
            mean = self.clinic.default_consultation
        else:
            return None
        staffed = sum(
            1
            for name, room in self.rooms.items()
            if name != self.waiting_room
            and any(m.can("moderate") for m in room.ctx.members.values())
        )
        return mean / max(1, staffed)

    def consultation_ended(self, seconds: float) -> None:
        self.durations.append(seconds)
        self._refresh()

    def staff_changed(self) -> None:
        self._refresh()

    def _refresh(self) -> None:
        waiting = self.waiting_room
        room = self.rooms.get(waiting) if waiting is not None else None
        if room is not None and room.queue:
            room.tell_queue()

    def health(self) -> dict[str, object]:
        waiting = self.waiting_room
        room = self.rooms.get(waiting) if waiting is not None else None
        return {"clinic_waiting": len(room.queue) if room is not None else 0}
