"""A room: its members and lobby, its plugins, and its part of every tick's fan-out.

Connections reach their room through a few methods: ``entry`` and ``join`` (through the
registry, which places the room); ``submit_pose``, ``handle``, ``handle_frame``, ``set_paused``
and ``time`` while joined; ``leave``, ``disconnected``, ``resumable``, ``has_member`` and
``reattach`` to go and to resume; ``wait``, ``leave_lobby`` and ``lobby_changed`` in its lobby;
and its ``name`` and ``member_count``. The room reaches a connection only through the
:class:`Link` it was given, so neither writes the other's state. Everything room-specific
beyond membership and avatars (moderation, audio, shared objects, an application's own logic)
is a plugin (:mod:`medverse.server.plugins`): the room calls their hooks with read-only views of
its members and gives each of them a :class:`RoomContext` of its own, which is all a plugin
sees of the server.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Protocol

import numpy as np

from medverse.protocol.errors import ErrorCode, ProtocolError
from medverse.protocol.messages import (
    PROTOCOL_VERSION,
    Joined,
    Left,
    MemberInfo,
    Message,
    Redirect,
    Welcome,
    encode_message,
    pose_frame_size,
    pose_sequence,
)
from medverse.protocol.rfc6455 import binary_frame
from medverse.protocol.snapshot import state_header

from .auth import Identity
from .clock import FixedRateClock
from .config import ServerConfig
from .entities import EntityTable
from .metrics import Traffic
from .plugins import MemberView, P, RoomPlugin, RoomSettings, ServerPlugin, Wait

log = logging.getLogger("medverse.room")

#: Close codes the room asks a connection to close with.
CLOSE_GOING_AWAY = 1001
CLOSE_POLICY = 1008
CLOSE_REPLACED = 4002
CLOSE_MODERATION = 4010


class Link(Protocol):
    """A member's connection as the room sees it: ways to write to it and to close it."""

    def send(self, msg: Message) -> bool:
        """Send one control message; False if the connection is gone."""

    def write(self, frame: bytes) -> bool:
        """Write one prebuilt WebSocket frame; False if the connection is gone."""

    def offer(self, frame: bytes, soft_limit: int) -> bool:
        """Write ``frame`` unless more than ``soft_limit`` bytes are still unsent (latest
        wins: a reader that is behind skips it); False if not written."""

    def backlog(self) -> int:
        """Bytes written but not yet sent."""

    def send_error(self, err: ProtocolError, fatal: bool = False) -> None:
        """Send a typed error (rate limited unless fatal)."""

    def close(self, code: int, reason: bytes) -> None:
        """Close the connection with a WebSocket close code."""

    def admitted(self, member: Member) -> None:
        """The connection, waiting in the lobby, is now ``member`` (a host admitted it)."""

    def move(
        self,
        room: str,
        by: str,
        actor: str,
        reason: str,
        admit: bool,
        notice: Message | None = None,
    ) -> Awaitable[None] | None:
        """Take the connection's member out of its room and into ``room`` under that room's
        rules (``by``/``actor``: the mover's name and identity; ``notice``: a message it gets
        just before ``moved``); raises ProtocolError, with nothing changed, if that room does
        not take it. None once moved; an awaitable when another server of the cluster runs
        ``room`` and decides first: it ends once moved, or raises that server's refusal
        (the member stays where it is)."""


class Member:
    """One member of a room, as the core keeps it. Only this module writes its fields; ``link``
    is None while the connection is down and the member may still resume. Plugins see
    :attr:`view` instead."""

    __slots__ = (
        "grace",
        "id",
        "identity",
        "last_seq",
        "link",
        "muted",
        "name",
        "needs_keyframe",
        "paused",
        "resume_token",
        "row",
        "slots",
        "view",
    )

    def __init__(
        self, mid: int, identity: Identity, slots: int, row: int, link: Link, name: str
    ) -> None:
        self.id = mid
        self.identity = identity
        self.slots = slots
        self.row = row  # avatar row block in the entity table; -1 for hidden members
        self.link: Link | None = link
        self.name = name
        self.resume_token = secrets.token_urlsafe(24)
        self.last_seq = -1
        self.needs_keyframe = True
        self.grace: asyncio.TimerHandle | None = None
        self.paused = False
        self.muted = False
        #: What plugins are given for this member: the same object for its whole stay.
        self.view = _MemberView(self)

    @property
    def hidden(self) -> bool:
        return self.identity.hidden

    def info(self) -> MemberInfo:
        return MemberInfo(self.id, self.name)

    def pose_refused(self) -> None:
        """The tick's validation refused this member's pose (see ``EntityTable``)."""
        if self.link is not None:
            self.link.send_error(
                ProtocolError(
                    ErrorCode.OUT_OF_RANGE,
                    "pose has NaN, infinity, an absurd position or a quaternion far from unit "
                    "length",
                )
            )


class _MemberView:
    """A member as plugins see it (:class:`~.plugins.MemberView`): read-only, no connection."""

    __slots__ = ("_m",)

    def __init__(self, member: Member) -> None:
        self._m = member

    def __repr__(self) -> str:
        return f"<member {self._m.id} {self._m.name!r}>"

    @property
    def id(self) -> int:
        return self._m.id

    @property
    def name(self) -> str:
        return self._m.name

    @property
    def identity(self) -> Identity:
        return self._m.identity

    @property
    def hidden(self) -> bool:
        return self._m.identity.hidden

    @property
    def paused(self) -> bool:
        return self._m.paused

    @property
    def muted(self) -> bool:
        return self._m.muted

    @property
    def connected(self) -> bool:
        return self._m.link is not None

    @property
    def row(self) -> int:
        return self._m.row

    def can(self, grant: str) -> bool:
        return grant in self._m.identity.grants


@dataclass
class RoomServices:
    """What the core gives every room: settings, the shared entity table and clock, the audit
    log and the traffic counters."""

    config: ServerConfig
    table: EntityTable
    clock: FixedRateClock
    traffic: Traffic
    #: ``audit(kind, room=..., actor=..., subject=..., **fields)``; never raises.
    audit: Callable[..., None]
    #: In a cluster, makes the resume token of a member (room, member id, identity, slots)
    #: that any node can check; None: random tokens this process alone knows.
    resume_token: Callable[[str, int, Identity, int], str] | None = None


@dataclass
class LobbyEntry:
    """A connection waiting in the lobby."""

    identity: Identity
    slots: int
    link: Link


class _RoomEntities:
    """The room's rows of the entity table, for its plugins (:class:`~.plugins.Entities`).

    Plugins write and free only the rows they were given here, and read or flag those and the
    avatars of the room's own members: another room's rows are out of reach.
    """

    __slots__ = ("_avatar_rows", "_rows", "_segment", "_table")

    def __init__(self, table: EntityTable, segment: int, avatar_rows: Callable[[], set[int]]):
        self._table = table
        self._segment = segment
        self._rows: set[int] = set()
        self._avatar_rows = avatar_rows

    def _own(self, rows: np.ndarray | int, avatars: bool) -> None:
        wanted = {rows} if isinstance(rows, int) else set(np.asarray(rows).tolist())
        allowed = self._rows | self._avatar_rows() if avatars else self._rows
        if not wanted <= allowed:
            raise ValueError(f"rows {sorted(wanted - allowed)[:4]} are not this room's")

    def alloc(self, entity_id: int, slots: int) -> int:
        row = self._table.alloc(self._segment, entity_id, slots)
        self._rows.add(row)
        return row

    def free(self, row: int) -> None:
        self._own(row, False)
        self._rows.discard(row)
        self._table.free(row)

    def free_all(self) -> None:
        """Free what plugins left allocated (the room is closing)."""
        for row in self._rows:
            self._table.free(row)
        self._rows.clear()

    def write(
        self,
        rows: np.ndarray,
        present: np.ndarray,
        pos: np.ndarray,
        rot_index: np.ndarray,
        rot: np.ndarray,
    ) -> None:
        self._own(rows, False)
        self._table.write(rows, present, pos, rot_index, rot)

    def poses(
        self, rows: np.ndarray, slot: int = 0
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        self._own(rows, True)
        return self._table.poses(rows, slot)

    def flags(self, row: int) -> int:
        self._own(row, True)
        return self._table.flags(row)

    def set_flags(self, row: int, flags: int) -> None:
        self._own(row, True)
        self._table.set_flags(row, flags)


class _Context:
    """A plugin's :class:`~.plugins.RoomContext`: what it may see and do in its room, and
    nothing of the room's connections or of the core's own methods."""

    __slots__ = ("_room",)

    def __init__(self, room: Room) -> None:
        self._room = room

    @property
    def name(self) -> str:
        return self._room.name

    @property
    def config(self) -> ServerConfig:
        return self._room.config

    @property
    def pseudonymous(self) -> bool:
        return self._room.pseudonymous

    @property
    def settings(self) -> RoomSettings:
        return self._room.settings

    @property
    def members(self) -> Mapping[int, MemberView]:
        return self._room.views

    @property
    def lobby(self) -> Mapping[int, Identity]:
        return self._room.lobby

    @property
    def tick(self) -> int:
        return self._room.tick

    @property
    def entities(self) -> _RoomEntities:
        return self._room.entities

    def time(self) -> float:
        return self._room.time()

    def send(self, member: MemberView, msg: Message) -> None:
        self._room.send(member.id, msg)

    def broadcast(
        self,
        msg: Message,
        exclude: MemberView | None = None,
        to: Callable[[MemberView], bool] | None = None,
    ) -> None:
        self._room.broadcast(msg, exclude.id if exclude is not None else None, to)

    def error(self, member: MemberView, err: ProtocolError) -> None:
        self._room.error(member.id, err)

    def audit(
        self, kind: str, actor: str | None = None, subject: str | None = None, **fields: object
    ) -> None:
        self._room.audit(kind, actor, subject, **fields)

    def plugin(self, cls: type[P]) -> P | None:
        return self._room.plugin(cls)

    def call_later(self, delay: float, fn: Callable[[], None]) -> asyncio.TimerHandle:
        return self._room.call_later(delay, fn)

    def spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        return self._room.spawn(coro)

    def admit(self, lobby_id: int) -> None:
        self._room.admit(lobby_id)

    def deny(self, lobby_id: int, err: ProtocolError) -> None:
        self._room.deny(lobby_id, err)

    def remove(self, member: MemberView, err: ProtocolError, reason: str = "removed") -> None:
        self._room.remove(member.id, err, reason)

    def set_muted(self, member: MemberView, muted: bool) -> None:
        self._room.set_muted(member.id, muted)

    def set_identity(self, member: MemberView, identity: Identity) -> None:
        self._room.set_identity(member.id, identity)

    def end(self, actor: str, reason: str) -> None:
        self._room.end(actor, reason)

    def transfer(
        self,
        member: MemberView,
        room: str,
        by: MemberView,
        reason: str = "",
        admit: bool = False,
        notice: Message | None = None,
    ) -> Awaitable[None] | None:
        return self._room.transfer(
            member.id, room, by.name, by.identity.subject, reason, admit, notice
        )


class Room:
    """A room: created when someone first enters, closed ``room_linger`` seconds after its
    last member left."""

    def __init__(
        self,
        name: str,
        segment: int,
        services: RoomServices,
        plugins: Sequence[ServerPlugin],
        *,
        kind: str = "default",
        pseudonymous: bool = False,
        on_empty: Callable[[Room], None] = lambda room: None,
        first_member_id: int = 1,
        settings: RoomSettings | None = None,
    ) -> None:
        self.name = name
        self.kind = kind
        #: The room's policies (what plugins read as ``ctx.settings``).
        self.settings = settings or RoomSettings(pseudonymous=pseudonymous)
        #: The room's id in the tick state (high bits of its entities' keys).
        self.segment = segment
        self._services = services
        self.config = services.config
        self._table = services.table
        self._clock = services.clock
        self._traffic = services.traffic
        self.tick0 = services.clock.tick  # world tick at which this room's clock starts
        self.pseudonymous = pseudonymous
        self._members: dict[int, Member] = {}
        self._views: dict[int, MemberView] = {}
        #: The members as plugins see them (read-only).
        self.views: Mapping[int, MemberView] = MappingProxyType(self._views)
        self._by_token: dict[str, Member] = {}
        self._lobby: dict[int, LobbyEntry] = {}
        # A room that moved to this server starts its new members' ids where no member resuming
        # from its previous server can have one.
        self._next_id = first_member_id
        self._next_lobby_id = 1
        self._on_empty = on_empty
        self._last_tick: int | None = None  # room tick of the last state frame sent
        self._keyframe_wanted = False
        self._last_keyframe_tick = -(10**9)  # world tick of the room's last keyframe
        self.ended = False
        self.closed = False
        self._timers: set[asyncio.TimerHandle] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.entities = _RoomEntities(services.table, segment, self._avatar_rows)
        self.plugins: list[RoomPlugin] = [p.create(_Context(self)) for p in plugins]
        self._handlers: dict[type[Message], RoomPlugin] = {}
        self._frame_handlers: dict[int, RoomPlugin] = {}
        for p in self.plugins:
            for cls in p.messages:
                if cls in self._handlers:
                    raise ValueError(f"two plugins of room {name} handle {cls.__name__}")
                self._handlers[cls] = p
            for kind_byte in p.frame_kinds:
                if kind_byte in self._frame_handlers:
                    raise ValueError(f"two plugins of room {name} take frame 0x{kind_byte:02x}")
                self._frame_handlers[kind_byte] = p
        self._tick_plugins = [p for p in self.plugins if type(p).on_tick is not RoomPlugin.on_tick]

    def _avatar_rows(self) -> set[int]:
        return {m.row for m in self._members.values() if m.row >= 0}

    # ----------------------------------------------------------------- what plugins use

    @property
    def lobby(self) -> Mapping[int, Identity]:
        return {lid: e.identity for lid, e in self._lobby.items()}

    @property
    def tick(self) -> int:
        """The room's tick now."""
        return self._clock.tick - self.tick0

    def time(self) -> float:
        """Seconds on the room's clock now (tick T is at T / rate)."""
        return self._clock.seconds() - self.tick0 * self._clock.period

    def send(self, member_id: int, msg: Message) -> None:
        """A control message to one connected member, paused or not (answers to its own
        requests)."""
        m = self._members.get(member_id)
        if m is not None and m.link is not None:
            m.link.send(msg)

    def send_subject(self, subject: str, msg: Message) -> None:
        """A control message to every connected member of this identity, paused or not."""
        for m in self._members.values():
            if m.link is not None and m.identity.subject == subject:
                m.link.send(msg)

    def broadcast(
        self,
        msg: Message,
        exclude: int | None = None,
        to: Callable[[MemberView], bool] | None = None,
    ) -> None:
        """A control message, encoded once, to every connected member not paused (those
        ``to`` selects, if given)."""
        frame = binary_frame(encode_message(msg))
        for m in self._members.values():
            if m.id == exclude or m.link is None or m.paused or (to is not None and not to(m.view)):
                continue
            m.link.write(frame)

    def error(self, member_id: int, err: ProtocolError) -> None:
        m = self._members.get(member_id)
        if m is not None and m.link is not None:
            m.link.send_error(err)

    def audit(
        self, kind: str, actor: str | None = None, subject: str | None = None, **fields: object
    ) -> None:
        self._services.audit(kind, room=self.name, actor=actor, subject=subject, **fields)

    def call_later(self, delay: float, fn: Callable[[], None]) -> asyncio.TimerHandle:
        """Run ``fn`` after ``delay`` unless the room has closed by then."""

        def run() -> None:
            self._timers.discard(handle)
            if not self.closed:
                fn()

        if len(self._timers) > 64:  # forget handles a plugin cancelled
            self._timers = {t for t in self._timers if not t.cancelled()}
        handle = asyncio.get_running_loop().call_later(delay, run)
        self._timers.add(handle)
        return handle

    def spawn(self, coro: Coroutine[Any, Any, None], answered: bool = False) -> asyncio.Task[None]:
        """A task cancelled when the room closes; its failure is logged (unless ``answered``:
        a request's handler, whose ProtocolError is the requester's answer)."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)

        def done(t: asyncio.Task[None]) -> None:
            self._tasks.discard(t)
            if t.cancelled() or t.exception() is None:
                return
            if not (answered and isinstance(t.exception(), ProtocolError)):
                log.error("task of room %s failed", self.name, exc_info=t.exception())

        task.add_done_callback(done)
        return task

    def admit(self, lobby_id: int) -> None:
        """Let a lobby connection in (raises ``not_found``, or ``room_full``: the waiter is
        turned away and the host told)."""
        entry = self._lobby.pop(lobby_id, None)
        if entry is None:
            raise ProtocolError(ErrorCode.NOT_FOUND, "nobody with that id is waiting")
        try:
            member = self.join(entry.identity, entry.slots, entry.link)
        except ProtocolError as err:
            entry.link.send_error(err, True)
            entry.link.close(CLOSE_POLICY, b"join refused")
            self._notify("on_lobby_changed")
            raise
        entry.link.admitted(member)
        self._notify("on_lobby_changed")

    def deny(self, lobby_id: int, err: ProtocolError) -> None:
        entry = self._lobby.pop(lobby_id, None)
        if entry is None:
            raise ProtocolError(ErrorCode.NOT_FOUND, "nobody with that id is waiting")
        entry.link.send_error(err, True)
        entry.link.close(CLOSE_MODERATION, b"denied")
        self._notify("on_lobby_changed")

    def _member(self, member_id: int) -> Member:
        m = self._members.get(member_id)
        if m is None:
            raise ProtocolError(ErrorCode.NOT_FOUND, "no such member")
        return m

    def remove(self, member_id: int, err: ProtocolError, reason: str = "removed") -> None:
        """Remove a member now: it gets ``err`` (fatal), its connection closes, it does not
        resume, and the others see it leave with ``reason``."""
        m = self._member(member_id)
        link, m.link = m.link, None
        if link is not None:
            link.send_error(err, True)
            link.close(CLOSE_MODERATION, reason.encode()[:120])
        self.leave(m, reason)

    def set_muted(self, member_id: int, muted: bool) -> None:
        m = self._member(member_id)
        m.muted = muted
        self._notify("on_member_changed", m.view, "muted")

    def set_identity(self, member_id: int, identity: Identity) -> None:
        m = self._member(member_id)
        m.identity = identity
        self._notify("on_member_changed", m.view, "grants")

    def transfer(
        self,
        member_id: int,
        room: str,
        by: str,
        actor: str,
        reason: str,
        admit: bool,
        notice: Message | None = None,
    ) -> Awaitable[None] | None:
        """Move a connected member of this room to ``room`` (see ``RoomContext.transfer``)."""
        m = self._members.get(member_id)
        if m is None or m.hidden:
            raise ProtocolError(ErrorCode.NOT_FOUND, "no such member")
        if m.link is None:
            raise ProtocolError(ErrorCode.NOT_FOUND, "that member's connection is down")
        return m.link.move(room, by, actor, reason, admit, notice)

    def end(self, actor: str, reason: str) -> None:
        """End the session for everyone in the room and its lobby; nobody may enter again
        until the room has closed."""
        self.audit("session_ended", actor=actor)
        self.ended = True
        err = ProtocolError(ErrorCode.SESSION_ENDED, reason)
        for lid in list(self._lobby):
            entry = self._lobby.pop(lid)
            entry.link.send_error(err, True)
            entry.link.close(CLOSE_MODERATION, b"session ended")
        for m in list(self._members.values()):
            self.remove(m.id, err, "session ended")

    # ----------------------------------------------------------------- plugins

    def _notify(self, hook: str, *args: object) -> None:
        """Call ``hook`` on every plugin; a failing plugin is logged, never propagated."""
        for p in self.plugins:
            try:
                getattr(p, hook)(*args)
            except Exception:
                log.exception("plugin %s of room %s failed in %s", p.name, self.name, hook)

    async def persist(self, timeout: float = 5.0) -> None:
        """Let every plugin store what it has not stored yet (``on_persist``) and wait until
        that is committed, for at most ``timeout`` seconds (the room is about to move)."""
        waits = []
        for p in self.plugins:
            try:
                pending = p.on_persist()
            except Exception:
                log.exception("plugin %s of room %s failed in on_persist", p.name, self.name)
                continue
            if pending is not None:
                waits.append(pending)
        if not waits:
            return
        try:
            results = await asyncio.wait_for(
                asyncio.gather(*waits, return_exceptions=True), timeout
            )
        except TimeoutError:
            log.warning("room %s: its state was not stored within %.0f s", self.name, timeout)
            return
        for err in results:
            if isinstance(err, BaseException):
                log.error("room %s: storing its state failed", self.name, exc_info=err)

    def plugin(self, cls: type[P]) -> P | None:
        """This room's instance of plugin class ``cls``, if its room type has it."""
        return next((p for p in self.plugins if isinstance(p, cls)), None)

    def describe(self) -> dict[str, object]:
        """What operators see of the room (``GET /admin/rooms``)."""
        out: dict[str, object] = {"room": self.name, "type": self.kind, "ended": self.ended}
        for p in self.plugins:
            out.update(p.describe())
        out["lobby"] = len(self._lobby)
        out["members"] = [
            {
                "id": m.id,
                "name": m.name,
                "role": m.identity.role,
                "connected": m.link is not None,
                "paused": m.paused,
                "muted": m.muted,
            }
            for m in self._members.values()
        ]
        return out

    def create(self) -> None:
        """Run the plugins' ``on_create`` (once, right after the room is placed)."""
        self._notify("on_create")

    def entry_pending(self) -> asyncio.Future[None] | None:
        """What joins wait for before the entry checks (a plugin still reading the room's
        state), or None."""
        for p in self.plugins:
            try:
                fut = p.entry_pending()
            except Exception:
                log.exception("plugin %s of room %s failed in entry_pending", p.name, self.name)
                continue
            if fut is not None and not fut.done():
                return fut
        return None

    def close(self, session_over: bool = False) -> None:
        """Close the room (the registry calls this once it is empty and has lingered:
        ``session_over``; or when it moved to another server, or the server stops)."""
        if session_over and not self.closed:
            self._notify("on_session_end")
        self.closed = True
        err = ProtocolError(ErrorCode.SESSION_ENDED, "the room closed")
        for lid in list(self._lobby):
            entry = self._lobby.pop(lid)
            entry.link.send_error(err, True)
            entry.link.close(CLOSE_MODERATION, b"room closed")
        for m in self._members.values():
            if m.grace is not None:
                m.grace.cancel()
                m.grace = None
        for t in self._timers:
            t.cancel()
        self._timers.clear()
        for task in self._tasks:
            task.cancel()
        self._notify("on_close")
        self.entities.free_all()

    # ----------------------------------------------------------------- membership

    @property
    def member_count(self) -> int:
        return len(self._members)

    @property
    def lobby_count(self) -> int:
        """Connections waiting in the lobby."""
        return len(self._lobby)

    def entry(self, identity: Identity) -> Wait | ProtocolError | None:
        """May ``identity`` enter now? None: yes; WAIT: through the lobby; an error: no.
        A refusal by any plugin wins over a wait."""
        if self.ended:
            return ProtocolError(ErrorCode.SESSION_ENDED, "this session has ended")
        wait: Wait | None = None
        for p in self.plugins:
            try:
                answer = p.on_enter(identity)
            except Exception:
                log.exception("plugin %s of room %s failed in on_enter", p.name, self.name)
                return ProtocolError(ErrorCode.INTERNAL, "entry check failed")
            if isinstance(answer, ProtocolError):
                return answer
            if isinstance(answer, Wait):
                wait = answer
        return wait

    def wait(self, identity: Identity, slots: int, link: Link) -> int:
        """Put a connection in the lobby; returns its lobby id. The caller sends ``waiting``,
        then calls :meth:`lobby_changed` (so a plugin that admits at once finds the connection
        ready to be admitted)."""
        lid = self._next_lobby_id
        self._next_lobby_id += 1
        self._lobby[lid] = LobbyEntry(identity, slots, link)
        return lid

    def lobby_changed(self) -> None:
        self._notify("on_lobby_changed")

    def leave_lobby(self, lobby_id: int) -> None:
        """A lobby connection went away."""
        if self._lobby.pop(lobby_id, None) is not None:
            self._notify("on_lobby_changed")

    def join(
        self, identity: Identity, slots: int, link: Link, member_id: int | None = None
    ) -> Member:
        """Add a member, send its welcome, tell the room and the plugins (raises
        ``room_full``). Hidden members (observers) get no avatar and nobody is told.
        ``member_id``: a member resuming here after its room moved from another server of the
        cluster keeps its id (its welcome says ``resumed``)."""
        if len(self._members) >= self.config.max_members_per_room:
            raise ProtocolError(ErrorCode.ROOM_FULL, f"room {self.name} is full")
        moved = member_id is not None and member_id not in self._members
        if moved:
            assert member_id is not None
            mid = member_id
            if mid >= self._next_id:
                self._next_id = mid + 1
        else:
            mid = self._next_id
            self._next_id += 1
        name = (identity.pseudonym or f"Participant {mid}") if self.pseudonymous else identity.name
        member = Member(mid, identity, slots, -1, link, name)
        make_token = self._services.resume_token
        if make_token is not None:
            member.resume_token = make_token(self.name, mid, identity, slots)
        if not identity.hidden:
            member.row = self._table.alloc(self.segment, mid, slots, owner=member)
        self._members[mid] = member
        self._views[mid] = member.view
        self._by_token[member.resume_token] = member
        self._keyframe_wanted = True
        if moved:
            self.audit("resume", actor=identity.subject, subject=str(mid), moved=True)
        else:
            self.audit(
                "join",
                actor=identity.subject,
                subject=str(mid),
                name=identity.name,
                role=identity.role,
            )
        if not member.hidden:
            self.broadcast(Joined(mid, member.name), exclude=mid)
        link.send(self.welcome(member, moved))
        self._notify("on_join", member.view)
        return member

    def has_member(self, member_id: int) -> bool:
        return member_id in self._members

    def hand_over(self, url: str | None) -> None:
        """This server stops running the room (it moved to another server of the cluster, or
        its lease is lost): every member and lobby connection is redirected to ``url`` (or,
        without one, closed so it reconnects), keeping its place to resume there. Then the
        registry closes the room here."""
        self.audit("room_moved", to=url)
        links = [e.link for e in self._lobby.values()]
        self._lobby.clear()
        for m in self._members.values():
            if m.grace is not None:
                m.grace.cancel()
                m.grace = None
            if m.link is not None:
                links.append(m.link)
                m.link = None  # its session's close must not start a resume grace here
        for link in links:
            if url is not None:
                link.send(Redirect(url, "moving"))
            link.close(CLOSE_GOING_AWAY, b"room moved")

    def welcome(self, member: Member, resumed: bool) -> Welcome:
        """The ``welcome`` for ``member`` now (after a join, a resume or a pause)."""
        return Welcome(
            version=PROTOCOL_VERSION,
            member_id=member.id,
            room=self.name,
            rate=self.config.tick_rate,
            tick=self.tick,
            resume=member.resume_token,
            resumed=resumed,
            members=tuple(
                m.info() for m in self._members.values() if m is not member and not m.hidden
            ),
        )

    def resumable(self, token: str, slots: int) -> Member | None:
        """The member this resume token names, if it is still here and its avatar has the
        same number of pose slots as the new connection's (else the connection joins anew)."""
        m = self._by_token.get(token)
        return m if m is not None and m.slots == slots else None

    def reattach(self, member: Member, link: Link) -> None:
        """A new connection takes over ``member`` within its grace window (the old one, if
        still open, is closed) and gets its welcome. A new connection starts in the room, so
        a member that had stepped out comes back with it."""
        if member.grace is not None:
            member.grace.cancel()
            member.grace = None
        old, member.link = member.link, link
        if old is not None and old is not link:
            old.close(CLOSE_REPLACED, b"replaced by a resumed connection")
        was_paused, member.paused = member.paused, False
        if was_paused and member.row >= 0:
            self._table.set_shown(member.row, True)
        member.needs_keyframe = True
        self._keyframe_wanted = True
        self.audit("resume", actor=member.identity.subject, subject=str(member.id))
        link.send(self.welcome(member, True))
        self._notify("on_resume", member.view)
        if was_paused:
            self._notify("on_pause", member.view, False)

    def disconnected(self, member: Member, link: Link) -> None:
        """``link`` dropped; if it still carries ``member``, keep its place for the resume grace
        window."""
        if member.link is not link or self._members.get(member.id) is not member:
            return
        member.link = None
        loop = asyncio.get_running_loop()
        member.grace = loop.call_later(self.config.resume_grace, self.leave, member, "disconnected")
        self._notify("on_disconnect", member.view)

    def leave(self, member: Member, reason: str) -> None:
        """Remove a member now and tell the room."""
        if self._members.get(member.id) is not member:
            return
        if member.grace is not None:
            member.grace.cancel()
            member.grace = None
        del self._members[member.id]
        del self._views[member.id]
        self._by_token.pop(member.resume_token, None)
        if member.row >= 0:
            self._table.free(member.row)
        member.link = None
        self.audit("leave", actor=member.identity.subject, subject=str(member.id), reason=reason)
        if not member.hidden:
            self.broadcast(Left(member.id, member.name, reason), exclude=member.id)
        self._notify("on_leave", member.view, reason)
        if not self._members:
            self._on_empty(self)

    # ----------------------------------------------------------------- input

    def submit_pose(self, member: Member, frame: bytes) -> None:
        """A structurally checked pose frame: kept for the next tick (latest wins)."""
        if member.paused:
            return  # stepped out: nothing of this member reaches the room
        if member.hidden:
            raise ProtocolError(ErrorCode.FORBIDDEN, "observers send no poses")
        if len(frame) != pose_frame_size(member.slots):  # the tick batches frames by size
            raise ProtocolError(ErrorCode.MALFORMED, "pose frame does not match the avatar")
        seq = pose_sequence(frame)
        if seq <= member.last_seq:
            return  # stale: an older pose than one already applied
        member.last_seq = seq
        self._table.submit_pose(member.row, member.slots, frame)

    def handle(self, member: Member, msg: Message) -> asyncio.Task[None] | None:
        """A control message for a plugin; raises ProtocolError to refuse it. A plugin that
        answers later (its handler returned a coroutine) gets it run as a task of the room,
        returned here so the request is answered when it ends."""
        plugin = self._handlers.get(type(msg))
        if plugin is None:
            raise ProtocolError(ErrorCode.UNKNOWN_TYPE, f"{msg.TYPE} is not handled in this room")
        later = plugin.on_message(member.view, msg)
        return self.spawn(later, answered=True) if later is not None else None

    def handle_frame(self, member: Member, frame: bytes) -> None:
        """A binary frame of a plugin's kind; raises ProtocolError to refuse it."""
        plugin = self._frame_handlers.get(frame[0])
        if plugin is None:
            raise ProtocolError(ErrorCode.MALFORMED, f"unknown frame kind 0x{frame[0]:02x}")
        plugin.on_frame(member.view, frame)

    def set_paused(self, member: Member, paused: bool) -> None:
        """Step out of the room or back in (patient control). Coming back, the member gets a
        new welcome (the member list may have changed meanwhile) and a keyframe."""
        if member.paused == paused:
            return
        member.paused = paused
        if member.row >= 0:
            # Stepped out: the avatar leaves everyone's state (not only its poses), so nobody
            # keeps a figure standing there; it comes back as the same entity.
            if paused:
                self._table.hide(member.row)
            self._table.set_shown(member.row, not paused)
        if not paused:
            member.needs_keyframe = True
            self._keyframe_wanted = True
            if member.link is not None:
                member.link.send(self.welcome(member, True))
        self._notify("on_pause", member.view, paused)

    # ----------------------------------------------------------------- tick

    def before_tick(self, world_tick: int) -> None:
        """Plugins write what arrived since the last tick into their entity rows."""
        for p in self._tick_plugins:
            try:
                p.on_tick(world_tick)
            except Exception:
                log.exception("plugin %s of room %s failed in on_tick", p.name, self.name)

    def take_keyframe(self, world_tick: int, min_ticks: int) -> bool:
        """Whether this tick should build a keyframe for the room (someone needs one and the
        last was at least ``min_ticks`` ago); if so, the room counts it as built."""
        if self._keyframe_wanted and world_tick - self._last_keyframe_tick >= min_ticks:
            self._last_keyframe_tick = world_tick
            return True
        return False

    def send_state(self, world_tick: int, body: bytes, keyframe_body: bytes | None) -> None:
        """Write this tick's delta to every member; keyframes to those who need one.

        Latest wins: a member whose connection has more than the soft limit unsent gets nothing
        this tick and a keyframe once it has caught up, so nothing queues behind a slow reader.
        """
        tick = world_tick - self.tick0
        gap = 0 if self._last_tick is None else tick - self._last_tick
        self._last_tick = tick
        in_gap = 0 < gap <= 255
        if not in_gap:
            for m in self._members.values():
                m.needs_keyframe = True
        delta = binary_frame(state_header(tick, gap, False) + body) if in_gap else None
        key = binary_frame(state_header(tick, 0, True) + keyframe_body) if keyframe_body else None
        soft = self.config.send_soft_limit
        wanted = False
        sent = 0
        # The common case (a delta to a member that keeps up) is one call; the rest is rare.
        for m in self._members.values():
            link = m.link
            if link is None:
                continue
            if m.needs_keyframe or m.paused or delta is None or not link.offer(delta, soft):
                wanted |= self._send_slow(m, link, delta, key, soft)
                continue
            sent += 1
        traffic = self._traffic
        if sent:
            traffic.sent_bytes += sent * len(delta)  # type: ignore[arg-type]
            traffic.deltas_sent += sent
        self._keyframe_wanted = wanted

    def _send_slow(
        self, m: Member, link: Link, delta: bytes | None, key: bytes | None, soft: int
    ) -> bool:
        """A member that needs a keyframe or is behind; returns True if it still wants one."""
        if m.paused:
            return False
        traffic = self._traffic
        if link.backlog() > soft:
            if not m.needs_keyframe:
                m.needs_keyframe = True
                traffic.skipped += 1
            return True
        if m.needs_keyframe:
            if key is None:
                return True
            if link.write(key):
                m.needs_keyframe = False
                traffic.keyframes_sent += 1
            return m.needs_keyframe
        if delta is not None and link.write(delta):
            traffic.deltas_sent += 1
        return False
