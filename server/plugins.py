"""The room plugin API: how room behaviour is written.

A room's behaviour (moderation, spatial audio, shared objects, and whatever an application adds)
is a list of plugins. One instance of each :class:`RoomPlugin` is created per room and receives
the room's lifecycle, in the spirit of Colyseus's Room:

==================  =====================================================================
``on_create``       the room was created (its first member is about to enter)
``on_enter``        someone asks to enter: let in (None), wait in the lobby, or refuse
``on_join``         a member joined (its ``welcome`` is sent)
``on_message``      a member sent a control message of a type in ``messages``
``on_frame``        a member sent a binary frame of a kind in ``frame_kinds``
``on_tick``         every state tick, before the state is encoded (write entity rows here)
``on_leave``        a member left for good (left, removed, timed out, consent withdrawn)
``on_close``        the room closed after its last member left and the linger time passed
==================  =====================================================================

and finer events where a plugin needs them (``on_resume``, ``on_disconnect``, ``on_pause``,
``on_member_changed``, ``on_lobby_changed``, ``on_session_end``; ``entry_pending`` makes joins
wait while the plugin reads what decides entry). Hooks run on the event loop and must not
block; a hook that raises is logged and the room carries on. ``on_message`` and ``on_frame``
refuse a message by raising :class:`~medverse.protocol.errors.ProtocolError`: the member gets
the typed error and carries on. A message class with ``ACKED = True`` and an optional ``req``
field is a request: when the client gives ``req``, the server answers ``ack`` once
``on_message`` returned, or ``refused`` naming ``req`` if it raised (SPEC.md, "Requests").

A plugin sees the room only through its :class:`RoomContext` (``self.ctx``): the members as
read-only :class:`MemberView` values, send and broadcast, the room's entity rows, the audit log,
the settings, timers and tasks that end with the room, and the few membership actions a
plugin may take (admit, deny, remove, mute, change grants, end). It never sees a connection, a
socket or another room.

Plugins that share something across rooms (a storage thread, the audio mixer's clock) are a
:class:`ServerPlugin`: started and stopped with the server, it makes the per-room instances. A
plain :class:`RoomPlugin` subclass given to ``create_app(plugins=...)`` is wrapped in one.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, TypeVar

import numpy as np

from medverse.protocol.errors import ProtocolError
from medverse.protocol.messages import Message

from .auth import Identity

if TYPE_CHECKING:
    from .assets import AssetStore
    from .clinicdef import Clinic
    from .config import ServerConfig
    from .imaging import ImageStore


P = TypeVar("P", bound="RoomPlugin")


class MemberView(Protocol):
    """A member of a room as plugins see it (read-only)."""

    @property
    def id(self) -> int:
        """Member id, unique in the room (1, 2, ...)."""

    @property
    def name(self) -> str:
        """What others see: the token's name, or the pseudonym in pseudonymous rooms."""

    @property
    def identity(self) -> Identity:
        """Who the member is (token subject, role, grants), as of the last role change."""

    @property
    def hidden(self) -> bool:
        """An observer: no avatar, nothing of it in the room's state."""

    @property
    def paused(self) -> bool:
        """Stepped out: invisible to others, receives nothing."""

    @property
    def muted(self) -> bool:
        """Audio muted on the server by a host."""

    @property
    def connected(self) -> bool:
        """False while the member's connection is down and it may still resume."""

    @property
    def row(self) -> int:
        """The member's avatar row block in :attr:`RoomContext.entities` (-1 if hidden)."""

    def can(self, grant: str) -> bool:
        """Whether the member holds ``grant`` now."""


@dataclass(frozen=True, slots=True)
class RoomSettings:
    """A room's policies, from the clinic definition and the server's flags
    (:mod:`medverse.server.policy`)."""

    #: The clinic room type whose rules the room follows ("default": none).
    type: str = "default"
    #: How the room is entered until a host changes it: ``open``, ``lobby`` or ``locked``.
    entry: str = "open"
    #: The text members accept before entering (None: no consent step) and its SHA-256.
    consent_text: str | None = None
    consent_version: str = ""
    pseudonymous: bool = False
    #: Roles that host here (None: as their tokens say).
    hosts: frozenset[str] | None = None
    #: Members who do not host enter muted by the server.
    audio_muted: bool = False


class Entities(Protocol):
    """The room's rows in the tick state. Entity ids of plugins start at
    ``protocol.snapshot.OBJECT_ID_BASE`` (member ids are below it)."""

    def alloc(self, entity_id: int, slots: int) -> int:
        """A row block for a new entity; returns its row for the other calls."""

    def free(self, row: int) -> None:
        """Remove the entity (it disappears from every member's view)."""

    def write(
        self,
        rows: np.ndarray,
        present: np.ndarray,
        pos: np.ndarray,
        rot_index: np.ndarray,
        rot: np.ndarray,
    ) -> None:
        """Set quantized pose rows of entities of one slot count at once: ``rows`` (N,),
        ``present`` (N, S), ``pos`` (N, S, 3), ``rot_index`` (N, S), ``rot`` (N, S, 3), as
        ``protocol.quant`` produces them. The next tick sends the change."""

    def poses(
        self, rows: np.ndarray, slot: int = 0
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Pose ``slot`` of rows as of the last tick: present, position mm, rotation index and
        smallest-three components."""

    def flags(self, row: int) -> int:
        """The entity's 8 flag bits."""

    def set_flags(self, row: int, flags: int) -> None:
        """Set the entity's 8 flag bits (sent with the next tick)."""


class RoomContext(Protocol):
    """What a plugin may see and do in its room."""

    @property
    def name(self) -> str:
        """The room's name."""

    @property
    def config(self) -> ServerConfig:
        """The server's settings."""

    @property
    def pseudonymous(self) -> bool:
        """Whether members of this room appear only under pseudonyms."""

    @property
    def settings(self) -> RoomSettings:
        """The room's policies (entry mode, consent, hosts, audio defaults)."""

    @property
    def members(self) -> Mapping[int, MemberView]:
        """Members by id, including those whose connection is down (``connected`` False)."""

    @property
    def lobby(self) -> Mapping[int, Identity]:
        """Who waits in the lobby, by lobby id."""

    @property
    def tick(self) -> int:
        """The room's tick now (tick ``T`` is at room time ``T / rate``)."""

    @property
    def entities(self) -> Entities:
        """The room's rows in the tick state."""

    def time(self) -> float:
        """The room clock now, in seconds."""

    def send(self, member: MemberView, msg: Message) -> None:
        """Send a control message to one member while it is connected, paused or not: use it
        for answers to the member's own requests. Room content is not for paused members
        (:meth:`broadcast` skips them; they get what they need when they come back)."""

    def broadcast(
        self,
        msg: Message,
        exclude: MemberView | None = None,
        to: Callable[[MemberView], bool] | None = None,
    ) -> None:
        """Send a control message, encoded once, to every connected member not paused (those
        ``to`` selects, if given)."""

    def error(self, member: MemberView, err: ProtocolError) -> None:
        """Send a member a typed (non-fatal) error."""

    def audit(
        self, kind: str, actor: str | None = None, subject: str | None = None, **fields: object
    ) -> None:
        """Append an entry for this room to the tamper-evident audit log (never content)."""

    def plugin(self, cls: type[P]) -> P | None:
        """This room's instance of another plugin class (None if the room's type does not run
        it), for plugins built on others: e.g. ``ctx.plugin(RoomObjects)`` to drive a shared
        object."""

    def call_later(self, delay: float, fn: Callable[[], None]) -> asyncio.TimerHandle:
        """Run ``fn`` after ``delay`` seconds, unless the room has closed by then."""

    def spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Run a task that is cancelled when the room closes; its failure is logged."""

    # Membership actions, for plugins that moderate.

    def admit(self, lobby_id: int) -> None:
        """Let a lobby member in."""

    def deny(self, lobby_id: int, err: ProtocolError) -> None:
        """Turn a lobby member away with a fatal error."""

    def remove(self, member: MemberView, err: ProtocolError, reason: str = "removed") -> None:
        """Remove a member now: it gets ``err`` (fatal), its connection closes and it does not
        resume; the others see it leave with ``reason``."""

    def set_muted(self, member: MemberView, muted: bool) -> None:
        """Mute a member's audio on the server (or allow it again); every plugin's
        ``on_member_changed(member, "muted")`` follows."""

    def set_identity(self, member: MemberView, identity: Identity) -> None:
        """Give a member another role or grants; ``on_member_changed(member, "grants")``
        follows."""

    def end(self, actor: str, reason: str) -> None:
        """End the session for everyone in the room and its lobby; nobody may enter again
        until the room has closed."""

    def transfer(
        self,
        member: MemberView,
        room: str,
        by: MemberView,
        reason: str = "",
        admit: bool = False,
        notice: Message | None = None,
    ) -> Awaitable[None] | None:
        """Move ``member`` of this room to room ``room`` on its own connection: it leaves
        this room (the others see it leave with reason ``moved``), gets ``notice`` if given
        and ``moved``, and enters the other room under that room's rules (consent, lobby
        unless ``admit``: the mover hosts there). ``by`` is the member who asked (of this room
        or another) and is in the audit log. Raises a ProtocolError, with nothing moved, if
        the room is unknown, locked, full or refuses the member, or the member is not
        connected. None once moved; in a cluster, when another server runs ``room``, an
        awaitable that ends once that server has accepted the member and it has left for it,
        or raises that server's refusal (``room_locked``, ``banned``, ``room_full``,
        ``room_moving`` when it is gone, ``transfer_timeout``), the member still here."""


@dataclass(frozen=True, slots=True)
class Wait:
    """``on_enter``'s answer: the joiner waits in the lobby until a host admits or denies it."""


#: The single :class:`Wait` value.
WAIT = Wait()


class RoomPlugin:
    """Base class of room plugins: every hook does nothing; override what you need.

    ``messages`` are the client-to-server control messages this plugin handles (they are added
    to the server's decoder), ``server_messages`` those it sends (for clients' decoders and the
    spec), ``frame_kinds`` the binary frame kinds it takes (first byte; for inputs too frequent
    for msgpack). Two plugins of one room may not claim the same message or frame kind.
    """

    #: Name used in :class:`RoomType` lists (default: the class name).
    name: ClassVar[str] = ""
    messages: ClassVar[Sequence[type[Message]]] = ()
    server_messages: ClassVar[Sequence[type[Message]]] = ()
    frame_kinds: ClassVar[Sequence[int]] = ()

    def __init__(self, ctx: RoomContext) -> None:
        self.ctx = ctx

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        if not cls.__dict__.get("name"):
            cls.name = cls.__name__

    def on_create(self) -> None:
        """The room was created; its first member is about to enter."""

    def entry_pending(self) -> asyncio.Future[None] | None:
        """What joins of the room wait for before ``on_enter`` is asked (state the plugin
        reads from a database when the room opens, which decides who may enter), or None."""
        return None

    def on_enter(self, identity: Identity) -> Wait | ProtocolError | None:
        """Someone with ``identity`` asks to enter: None lets them in (as far as this plugin
        is concerned), :data:`WAIT` sends them to the lobby, a ProtocolError refuses them."""
        return None

    def on_join(self, member: MemberView) -> None:
        """A member joined (its welcome was sent)."""

    def on_resume(self, member: MemberView) -> None:
        """A member came back on a new connection within the grace window (welcome sent)."""

    def on_disconnect(self, member: MemberView) -> None:
        """A member's connection dropped; it may still resume within the grace window."""

    def on_pause(self, member: MemberView, paused: bool) -> None:
        """A member stepped out (``paused``) or came back (its new welcome was sent)."""

    def on_member_changed(self, member: MemberView, what: str) -> None:
        """A host changed the member: ``"muted"`` or ``"grants"`` (check what it may still
        do)."""

    def on_lobby_changed(self) -> None:
        """Someone entered or left the lobby."""

    def on_message(self, member: MemberView, msg: Message) -> Coroutine[Any, Any, None] | None:
        """A control message of one of :attr:`messages`; raise ProtocolError to refuse.

        A request that must wait for something slow (a database write, another server of the
        cluster deciding on a move) returns a coroutine instead (e.g. from an ``async def``
        helper): it runs as a task of the room, and the request is answered when it finishes
        (``ack``, or ``refused`` with the ProtocolError it raises) while the member's later
        messages are handled meanwhile."""
        return None

    def on_frame(self, member: MemberView, frame: bytes) -> None:
        """A binary frame of one of :attr:`frame_kinds` (the whole frame, kind byte
        included); raise ProtocolError to refuse."""

    def on_tick(self, tick: int) -> None:
        """Every state tick before encoding (world tick number); keep it cheap."""

    def on_leave(self, member: MemberView, reason: str) -> None:
        """A member left for good."""

    def on_close(self) -> None:
        """The room closed."""

    def on_session_end(self) -> None:
        """The room's session is over: it closes after staying empty (called before
        ``on_close``; not when the room moves to another server or this server stops)."""

    def on_persist(self) -> Coroutine[Any, Any, None] | None:
        """The room is about to move to another server (this one drains): store what is not
        stored yet (e.g. state written at intervals) and return a coroutine that ends once it
        is committed. The other server loads the room from the store after that."""
        return None

    def describe(self) -> dict[str, object]:
        """What operators see of this plugin's state in ``GET /admin/rooms``."""
        return {}


@dataclass
class ServerContext:
    """What a :class:`ServerPlugin` gets when the server starts."""

    config: ServerConfig
    #: Prometheus registry for the plugin's own metrics.
    registry: Any
    #: Append a server-level entry to the audit log.
    audit: Callable[..., None]
    #: Count a refused client input by error code (``medverse_protocol_errors_total``).
    count_error: Callable[[str], None]
    #: Uploaded 3D models (None on a server without asset storage).
    assets: AssetStore | None = None
    #: The clinic definition the server was given (None: no ``--clinic`` file).
    clinic: Clinic | None = None
    #: Uploaded image series and the image viewers' state (None without image storage).
    images: ImageStore | None = None


class ServerPlugin:
    """The server-wide part of a plugin: started once, makes a :class:`RoomPlugin` per room.

    Subclass it when rooms share something (a storage thread, a clock); for a plugin with
    per-room state only, pass the :class:`RoomPlugin` subclass itself to ``create_app``.
    """

    #: The per-room class (its ``name``, ``messages`` and ``frame_kinds`` describe this plugin).
    room_plugin: ClassVar[type[RoomPlugin]] = RoomPlugin

    @property
    def name(self) -> str:
        return self.room_plugin.name

    def create(self, ctx: RoomContext) -> RoomPlugin:
        """The plugin's instance for a new room."""
        return self.room_plugin(ctx)

    async def start(self, server: ServerContext) -> None:
        """Called once when the server starts (open storage, start clocks)."""

    async def stop(self) -> None:
        """Called once when the server stops (flush storage, close peers)."""

    def health(self) -> dict[str, object]:
        """Merged into ``GET /health``."""
        return {}


class _PerRoom(ServerPlugin):
    """A plain RoomPlugin class as a ServerPlugin."""

    def __init__(self, cls: type[RoomPlugin]) -> None:
        self._cls = cls

    @property
    def name(self) -> str:
        return self._cls.name

    @property
    def plugin_class(self) -> type[RoomPlugin]:
        return self._cls

    def create(self, ctx: RoomContext) -> RoomPlugin:
        return self._cls(ctx)


def as_server_plugin(plugin: ServerPlugin | type[RoomPlugin]) -> ServerPlugin:
    """``plugin`` itself, or a RoomPlugin class wrapped as a server plugin."""
    if isinstance(plugin, ServerPlugin):
        return plugin
    if isinstance(plugin, type) and issubclass(plugin, RoomPlugin):
        return _PerRoom(plugin)
    raise TypeError(f"not a plugin: {plugin!r}")


def plugin_class(plugin: ServerPlugin) -> type[RoomPlugin]:
    """The per-room class a server plugin makes."""
    return plugin.plugin_class if isinstance(plugin, _PerRoom) else plugin.room_plugin


@dataclass(frozen=True)
class RoomType:
    """A kind of room: the plugins (by name) its rooms run, and which rooms are of this kind.

    ``rooms`` is a regular expression that must match the whole room name (an exact name is a
    valid one: ``re.escape("ward-3")``). ``create_app`` tries room types in order; rooms no type
    matches run every plugin given to it.
    """

    name: str
    plugins: Sequence[str]
    rooms: str = ".*"
    _pattern: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_pattern", re.compile(self.rooms))

    def matches(self, room: str) -> bool:
        return self._pattern.fullmatch(room) is not None
