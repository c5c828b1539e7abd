"""Room features: how audio, shared objects and other subsystems plug into the core.

The core (world, rooms, sessions) knows members, poses and moderation. A feature is an object
the world notifies of member lifecycle events, which may also handle its own control messages
(registered with :meth:`World.add_feature`). Every hook runs on the event loop and must not
block; a feature that fails in a hook is logged and does not break the session or the room.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from medverse.protocol.messages import Message

if TYPE_CHECKING:
    from .room import Member, Room
    from .session import Session

#: A control-message handler: (session, member, message). Raise ProtocolError to refuse it;
#: the session sends the error to the member, who carries on.
Handler = Callable[["Session", "Member", Message], None]
#: A handler of a binary frame kind of its own (the whole frame, kind byte included).
BinaryHandler = Callable[["Session", "Member", bytes], None]


class Feature:
    """Base class with no-op hooks; subclasses override what they need."""

    #: Control messages this feature handles, by message class.
    handlers: dict[type[Message], Handler]
    #: Binary frames this feature handles, by frame kind (first byte), for inputs too frequent
    #: for msgpack (object moves).
    binary_handlers: dict[int, BinaryHandler]

    def __init__(self) -> None:
        self.handlers = {}
        self.binary_handlers = {}

    async def start(self) -> None:
        """Called once when the server starts (open storage, start timers)."""

    async def stop(self) -> None:
        """Called once when the server stops (flush storage, close peers)."""

    def room_created(self, room: Room) -> None:
        """A room was created (its first member is about to join)."""

    def room_closed(self, room: Room) -> None:
        """A room closed after its last member left and the linger time passed."""

    def member_joined(self, member: Member) -> None:
        """A member joined (after its welcome was sent)."""

    def member_resumed(self, member: Member) -> None:
        """A member came back on a new connection within the grace window (welcome sent)."""

    def member_left(self, member: Member, reason: str) -> None:
        """A member left the room for good (left, removed, timed out, consent withdrawn)."""

    def member_disconnected(self, member: Member) -> None:
        """A member's connection dropped; it may still resume within the grace window."""

    def member_paused(self, member: Member, paused: bool) -> None:
        """A member stepped out (``paused``) or came back."""

    def member_muted(self, member: Member, muted: bool) -> None:
        """A host muted a member's audio on the server, or allowed it again."""

    def member_grants_changed(self, member: Member) -> None:
        """A host changed the member's role or grants (``member.identity`` is the new one);
        stop whatever the member may no longer do."""

    def before_tick(self, tick: int) -> None:
        """Called at the start of each world tick, before the state is encoded: write what
        arrived since the last tick into the world's arrays, in one batch (keep it cheap; it
        runs on the tick's time budget)."""
