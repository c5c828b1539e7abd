"""Clinic messages: moving members between rooms and what a waiting patient is told.

A virtual clinic is a set of rooms (a waiting room, consultation rooms, group rooms). A member
with the right to (a host of its room, the ``receptionist`` role or the ``transfer`` grant)
moves another member from one room to another without the moved member reconnecting: the
server sends it ``moved`` and the target room's entry follows on the same connection exactly
as after a ``hello`` (``consent_required``, ``waiting`` or ``welcome``; SPEC.md, "Transfers").
Patients in a waiting room are told their place in the queue (``queue``) and when a clinician
calls them in (``called``). A member who declines the consent of the room it was moved to goes
back to the room it came from (a ``moved`` there), and its mover is told (``move_declined``).
A moved member's room access credential (``moved``'s ``access``) is refreshed by the server
before it expires (``access``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .messages import MAX_NAME_CHARS, ROOM_NAME_RE, Message, wire_field

#: Longest reason a mover may give (shown to the member moved, kept in the audit log).
MAX_REASON_CHARS = 256
#: Longest clinic message shown in the waiting room.
MAX_CLINIC_MESSAGE_CHARS = 2048
#: Longest estimate the server sends, seconds (a day: beyond it an estimate means nothing).
MAX_ESTIMATE_SECONDS = 86_400
#: Longest room access credential (a compact JWT).
MAX_ACCESS_CHARS = 2048
_ID = {"lo": 1, "hi": 2**32 - 1}
_REQ = {"lo": 0, "hi": 2**32 - 1, "optional": True}


@dataclass(frozen=True, slots=True)
class Transfer(Message):
    """Move member ``member_id`` of the sender's room to room ``room`` (that room's entry
    rules apply to it there: consent, lobby, locks, bans). ``reason`` is shown to the member
    and kept in the audit log."""

    ACKED: ClassVar[bool] = True
    TYPE: ClassVar[str] = "transfer"
    member_id: int = wire_field("int", **_ID)
    room: str = wire_field("str", pattern=ROOM_NAME_RE)
    reason: str | None = wire_field("str", max_len=MAX_REASON_CHARS, optional=True)
    req: int | None = wire_field("int", **_REQ)


@dataclass(frozen=True, slots=True)
class CallNext(Message):
    """A host calls the patient who has waited longest in the clinic's waiting room into the
    host's own room."""

    ACKED: ClassVar[bool] = True
    TYPE: ClassVar[str] = "call_next"
    req: int | None = wire_field("int", **_REQ)


@dataclass(frozen=True, slots=True)
class SendBack(Message):
    """Send member ``member_id`` of the sender's room back to the clinic's waiting room."""

    ACKED: ClassVar[bool] = True
    TYPE: ClassVar[str] = "send_back"
    member_id: int = wire_field("int", **_ID)
    reason: str | None = wire_field("str", max_len=MAX_REASON_CHARS, optional=True)
    req: int | None = wire_field("int", **_REQ)


@dataclass(frozen=True, slots=True)
class Moved(Message):
    """To the member moved: it has left its room for ``room``, moved by ``by`` (the mover's
    name as the old room showed it) for ``reason``. The target room's entry follows at once
    (``consent_required``, ``waiting`` or ``welcome``, as after a ``hello``). ``access`` (on a
    server with join tokens) is the bearer credential for ``room``'s HTTP APIs (assets,
    image series) in place of the join token, which names the first room: valid while the
    member is in ``room``, for an hour by default, refreshed by ``access``; absent when
    ``room`` is the one its join token names."""

    TYPE: ClassVar[str] = "moved"
    room: str = wire_field("str", pattern=ROOM_NAME_RE)
    by: str = wire_field("str", max_len=MAX_NAME_CHARS)
    reason: str = wire_field("str", max_len=MAX_REASON_CHARS)
    access: str | None = wire_field("str", max_len=MAX_ACCESS_CHARS, optional=True)


@dataclass(frozen=True, slots=True)
class Access(Message):
    """To a moved member in room ``room``: a fresh room access credential for it (``access``,
    as in ``moved``), sent before the last one expires (SPEC.md, "Room access credentials").
    The client uses it in place of the last one from now on."""

    TYPE: ClassVar[str] = "access"
    room: str = wire_field("str", pattern=ROOM_NAME_RE)
    access: str = wire_field("str", max_len=MAX_ACCESS_CHARS)


@dataclass(frozen=True, slots=True)
class Queue(Message):
    """To a patient in a waiting room: its ``position`` in the queue (1: next), how many wait
    (``waiting``), an estimate of the wait in seconds (absent until the clinic has measured a
    consultation and has no default) and the clinic's ``message``. Sent on entering and
    whenever one of them changes."""

    TYPE: ClassVar[str] = "queue"
    position: int = wire_field("int", lo=1, hi=2**32 - 1)
    waiting: int = wire_field("int", lo=1, hi=2**32 - 1)
    message: str = wire_field("str", max_len=MAX_CLINIC_MESSAGE_CHARS)
    estimate: int | None = wire_field("int", lo=0, hi=MAX_ESTIMATE_SECONDS, optional=True)


@dataclass(frozen=True, slots=True)
class Called(Message):
    """To a waiting patient: ``by`` calls it into room ``room`` (its ``moved`` follows)."""

    TYPE: ClassVar[str] = "called"
    room: str = wire_field("str", pattern=ROOM_NAME_RE)
    by: str = wire_field("str", max_len=MAX_NAME_CHARS)


@dataclass(frozen=True, slots=True)
class MoveDeclined(Message):
    """To the member who moved another (each of its connections in the room the member left
    or the room it was moved to): member ``member_id`` (its id in room ``origin``, the room
    it was moved from), named ``name`` (as ``origin`` showed it), did not enter room ``room``
    for ``reason`` (``consent_declined``: it declined that room's consent). ``back`` is
    ``origin`` if the member went back there; absent, it could not and its connection was
    closed."""

    TYPE: ClassVar[str] = "move_declined"
    member_id: int = wire_field("int", **_ID)
    name: str = wire_field("str", max_len=MAX_NAME_CHARS)
    origin: str = wire_field("str", pattern=ROOM_NAME_RE)
    room: str = wire_field("str", pattern=ROOM_NAME_RE)
    reason: str = wire_field("str", max_len=64)
    back: str | None = wire_field("str", pattern=ROOM_NAME_RE, optional=True)


CLIENT_CLINIC: tuple[type[Message], ...] = (Transfer, CallNext, SendBack)
SERVER_CLINIC: tuple[type[Message], ...] = (Moved, Queue, Called, Access, MoveDeclined)

__all__ = [
    "CLIENT_CLINIC",
    "MAX_ACCESS_CHARS",
    "MAX_CLINIC_MESSAGE_CHARS",
    "MAX_ESTIMATE_SECONDS",
    "MAX_REASON_CHARS",
    "SERVER_CLINIC",
    "Access",
    "CallNext",
    "Called",
    "MoveDeclined",
    "Moved",
    "Queue",
    "SendBack",
    "Transfer",
]
