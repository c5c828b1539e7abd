"""Plain values the SDK hands to applications: poses, avatars and events.

An event that is a protocol message exactly as the server sent it (:class:`Joined`,
:class:`Left`, :class:`Waiting`, :class:`Called`, :class:`MoveDeclined`, ``ErrorEvent``,
``MemberStateChanged``) is delivered as that message, a class of :mod:`medverse.protocol`
exported here under its SDK name; its ``type`` is the message's type on the wire. The classes
defined here are the events the SDK makes itself (from several messages, or from what the
connection did).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any, TypeVar

# Re-exported (``X as X``): these protocol messages are SDK events as they are.
from medverse.protocol.clinic import Called as Called
from medverse.protocol.clinic import MoveDeclined as MoveDeclined
from medverse.protocol.messages import Error, MemberState
from medverse.protocol.messages import Joined as Joined
from medverse.protocol.messages import Left as Left
from medverse.protocol.messages import Waiting as Waiting
from medverse.protocol.snapshot import FLAG_SPEAKING

Vec3 = tuple[float, float, float]
Quat = tuple[float, float, float, float]
E = TypeVar("E")


@dataclass(frozen=True, slots=True)
class Pose:
    """A tracked pose: ``position`` in metres (x, y, z), ``rotation`` a unit quaternion
    (qx, qy, qz, qw). Frame: right-handed, +Y up, -Z forward (OpenXR / WebXR)."""

    position: Vec3
    rotation: Quat = (0.0, 0.0, 0.0, 1.0)


@dataclass(frozen=True, slots=True)
class Avatar:
    """A member's avatar as last received. ``poses`` holds every slot; ``head``, ``left`` and
    ``right`` are slots 0, 1 and 2 (None when absent or not tracked)."""

    member_id: int
    name: str | None
    poses: tuple[Pose | None, ...]
    _sampler: Callable[[int, float], Avatar | None] | None = field(
        default=None, repr=False, compare=False
    )
    #: The entity flags from the state (see ``protocol.snapshot``: ``FLAG_SPEAKING``, ...).
    flags: int = 0

    @property
    def speaking(self) -> bool:
        """True while the member is talking (the server sets it from their voice level)."""
        return bool(self.flags & FLAG_SPEAKING)

    @property
    def head(self) -> Pose | None:
        return self.poses[0] if self.poses else None

    @property
    def left(self) -> Pose | None:
        return self.poses[1] if len(self.poses) > 1 else None

    @property
    def right(self) -> Pose | None:
        return self.poses[2] if len(self.poses) > 2 else None

    def sample(self, t: float) -> Avatar:
        """This avatar at room time ``t`` (seconds), interpolated between the two buffered
        snapshots around ``t`` (positions linearly, rotations by slerp). Use
        ``session.render_time()`` for ``t``: the room clock now minus a small delay so that
        there are snapshots on both sides. Before the buffer it gives the oldest state, after
        it the newest."""
        if self._sampler is None:
            return self
        out = self._sampler(self.member_id, t)
        return self if out is None else out


class RefusedError(Exception):
    """The server refused a call: ``code`` is the protocol error code (``forbidden``,
    ``not_found``, ``bad_field``, ...), ``message`` says why. Object and audio calls raise
    its subclasses :class:`~medverse.client_sdk.ObjectError` and
    :class:`~medverse.client_sdk.AudioError`."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


#: The server refused something we sent (``code`` is a protocol ErrorCode value; ``fatal``:
#: the server closes the connection).
ErrorEvent = Error
#: A member paused or came back (hosts see it), was muted or unmuted on the server (everyone
#: sees it), or asks to be unmuted (hosts see it).
MemberStateChanged = MemberState


def from_message(event: type[E], msg: object, **values: Any) -> E:
    """The SDK event ``event`` for a protocol message that carries its fields: every field of
    the event not given in ``values`` is the message's field of the same name (``type`` keeps
    the event's own default). Matching by name, not position, keeps an event right when its
    fields are in another order than the message's (``LockChanged``)."""
    for f in fields(event):  # type: ignore[arg-type]
        if f.name != "type" and f.name not in values:
            values[f.name] = getattr(msg, f.name)
    return event(**values)


@dataclass(frozen=True, slots=True)
class Reconnecting:
    """The connection dropped; the SDK retries after ``delay`` seconds (attempt counts from 1)."""

    attempt: int
    delay: float
    type: str = "reconnecting"


@dataclass(frozen=True, slots=True)
class Resumed:
    """Connected again. ``same_member`` is False if the grace window had passed and we joined
    as a new member (``member_id`` then differs from before)."""

    member_id: int
    same_member: bool
    type: str = "resumed"


@dataclass(frozen=True, slots=True)
class Closed:
    """The session ended for good; no more events follow.

    ``code`` says why, for programs: an error code of the protocol when the server ended it
    (``removed``, ``banned``, ``session_ended``, ``denied``, ``unauthorized``, ...),
    ``consent_withdrawn`` after :meth:`Session.withdraw_consent`, ``closed`` when the
    application closed it, ``disconnected`` when the connection was lost and not resumed.
    ``message`` carries the host's own words (the reason given for a removal, a ban or the
    end of the session); ``reason`` is one line for people."""

    reason: str
    code: str = "closed"
    message: str = ""
    type: str = "closed"


@dataclass(frozen=True, slots=True)
class LobbyEntry:
    """Someone waiting in the lobby: ``id`` to admit or deny, the ``name`` shown, and the
    verified ``identity`` (or pseudonym in pseudonymous rooms) that tells two people with the
    same name apart."""

    id: int
    name: str
    identity: str | None


@dataclass(frozen=True, slots=True)
class LobbyChanged:
    """To hosts: who waits in the lobby, as (lobby id, name) pairs to admit or deny, and
    ``entries`` with each one's verified identity."""

    waiting: tuple[tuple[int, str], ...]
    entries: tuple[LobbyEntry, ...] = ()
    type: str = "lobby"


@dataclass(frozen=True, slots=True)
class BanEntry:
    """A ban in force: ``id`` (``session.moderate("unban", id)`` lifts it), the name the
    member had, ``until`` (Unix seconds; None: until lifted) and the ``reason``."""

    id: int
    name: str
    until: float | None
    reason: str


@dataclass(frozen=True, slots=True)
class BansChanged:
    """To hosts: the room's bans in force (when one is added or lifted, and on joining)."""

    bans: tuple[BanEntry, ...]
    type: str = "bans"


@dataclass(frozen=True, slots=True)
class EntryChanged:
    """The room's entry mode is now ``open``, ``lobby`` or ``locked``."""

    entry: str
    type: str = "entry"


@dataclass(frozen=True, slots=True)
class GrantsChanged:
    """A host changed a member's role or grants (ours, or, for hosts, anyone's)."""

    member_id: int
    role: str
    grants: frozenset[str]
    type: str = "grants"


@dataclass(frozen=True, slots=True)
class Moved:
    """We were moved out of our room into ``room`` by ``by`` (a host, a receptionist) for
    ``reason``. The session carries on by itself: the room's consent (the ``consent=``
    callback is asked with that room's text), its lobby (:class:`Waiting`), then
    :class:`Arrived`."""

    room: str
    by: str
    reason: str
    type: str = "moved"


@dataclass(frozen=True, slots=True)
class Arrived:
    """After a move: we are in ``room`` now, as member ``member_id``, with ``members``
    ({id: name}) there."""

    room: str
    member_id: int
    members: dict[int, str]
    type: str = "arrived"


@dataclass(frozen=True, slots=True)
class QueueChanged:
    """In a waiting room: our ``position`` in the queue (1: next), how many wait, the estimated
    wait in seconds (None: the clinic cannot tell yet) and the clinic's message."""

    position: int
    waiting: int
    estimate: float | None
    message: str
    type: str = "queue"


Event = (
    Joined
    | Left
    | ErrorEvent
    | Reconnecting
    | Resumed
    | Closed
    | Waiting
    | MemberStateChanged
    | LobbyChanged
    | BansChanged
    | EntryChanged
    | GrantsChanged
    | Moved
    | Arrived
    | QueueChanged
    | Called
    | MoveDeclined
)
