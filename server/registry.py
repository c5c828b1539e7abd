"""The room registry: which rooms this process runs, placing new ones, closing empty ones.

A room is placed (created with the plugins of its room type) when someone first enters it and
closed ``room_linger`` seconds after its last member left. The registry knows nothing of
sockets: connections reach rooms through it with a :class:`~.room.Link`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator, Sequence

from medverse.protocol.errors import ProtocolError

from .auth import Identity
from .plugins import RoomSettings, RoomType, ServerPlugin, Wait, plugin_class
from .room import Link, Member, Room, RoomServices

log = logging.getLogger("medverse.registry")


class RoomRegistry:
    """Every room of this process, by name and by state segment."""

    def __init__(
        self,
        services: RoomServices,
        plugins: Sequence[ServerPlugin],
        room_types: Sequence[RoomType] = (),
        pseudonymous: Callable[[str], bool] | None = None,
        settings: Callable[[str], RoomSettings] | None = None,
        first_member_id: Callable[[str], int] | None = None,
        on_closed: Callable[[str], None] | None = None,
    ) -> None:
        #: In a cluster: the first member id of a room placed here (from its lease's
        #: generation), and what to do once a room closed here (give up its lease).
        self._first_member_id: Callable[[str], int] = first_member_id or (lambda name: 1)
        self._on_closed: Callable[[str], None] = on_closed or (lambda name: None)
        self._services = services
        self._plugins = {p.name: p for p in plugins}
        self._default = list(plugins)
        self._types = list(room_types)
        for t in self._types:
            unknown = [n for n in t.plugins if n not in self._plugins]
            if unknown:
                raise ValueError(f"room type {t.name} names unknown plugin(s) {unknown}")
        for name, chosen in [("default", self._default)] + [
            (t.name, [self._plugins[n] for n in t.plugins]) for t in self._types
        ]:
            _check_claims(name, chosen)
        self._pseudonymous = pseudonymous
        self._settings = settings  # each room's policies (a clinic's room types, the flags)
        self._rooms: dict[str, Room] = {}
        self._by_segment: dict[int, Room] = {}
        self._next_segment = 1
        self._close_timers: dict[str, asyncio.TimerHandle] = {}

    # ----------------------------------------------------------------- lookup

    def __len__(self) -> int:
        return len(self._rooms)

    def __iter__(self) -> Iterator[Room]:
        return iter(list(self._rooms.values()))

    def get(self, name: str) -> Room | None:
        return self._rooms.get(name)

    def by_segment(self, segment: int) -> Room | None:
        return self._by_segment.get(segment)

    def member_count(self) -> int:
        return sum(r.member_count for r in self._rooms.values())

    def room_type(self, name: str) -> tuple[str, list[ServerPlugin]]:
        """The room type a room of this name gets, and its plugins."""
        for t in self._types:
            if t.matches(name):
                return t.name, [self._plugins[n] for n in t.plugins]
        return "default", self._default

    # ----------------------------------------------------------------- placement

    def place(self, name: str) -> Room:
        """The room called ``name``, created (with its plugins) if this process has none."""
        room = self._rooms.get(name)
        if room is not None:
            return room
        kind, plugins = self.room_type(name)
        pseudonymous = self._pseudonymous is not None and self._pseudonymous(name)
        settings = self._settings(name) if self._settings is not None else None
        room = Room(
            name,
            self._next_segment,
            self._services,
            plugins,
            kind=kind,
            pseudonymous=pseudonymous,
            on_empty=self._empty,
            first_member_id=self._first_member_id(name),
            settings=settings,
        )
        self._next_segment += 1
        self._rooms[name] = room
        self._by_segment[room.segment] = room
        room.create()
        return room

    def entry(self, identity: Identity) -> Wait | ProtocolError | None:
        """May ``identity`` enter its room now (None), through the lobby (WAIT), or not? The
        room is placed first, so its plugins decide for the first entrant too; a room that
        nobody enters closes again after the linger time."""
        room = self.place(identity.room)
        answer = room.entry(identity)
        if not room.member_count and room.name not in self._close_timers:
            self._empty(room)  # cancelled when someone joins
        return answer

    def entry_pending(self, name: str) -> asyncio.Future[None] | None:
        """What a join of room ``name`` waits for before its entry checks (the room, placed
        if needed, still reading its state), or None. A room that nobody enters closes again
        after the linger time."""
        room = self.place(name)
        fut = room.entry_pending()
        if fut is not None and not room.member_count and room.name not in self._close_timers:
            self._empty(room)  # cancelled when someone joins
        return fut

    def join(
        self, identity: Identity, slots: int, link: Link, member_id: int | None = None
    ) -> Member:
        """Add a member to its room, placing the room if needed (raises ``room_full``);
        ``member_id``: a member resuming after its room moved here keeps its id."""
        room = self.place(identity.room)
        timer = self._close_timers.pop(room.name, None)
        if timer is not None:
            timer.cancel()
        return room.join(identity, slots, link, member_id)

    # ----------------------------------------------------------------- closing

    def _empty(self, room: Room) -> None:
        old = self._close_timers.pop(room.name, None)
        if old is not None:
            old.cancel()
        loop = asyncio.get_running_loop()
        self._close_timers[room.name] = loop.call_later(
            self._services.config.room_linger, self._close, room
        )

    def _close(self, room: Room) -> None:
        self._close_timers.pop(room.name, None)
        if room.member_count or self._rooms.get(room.name) is not room:
            return
        if room.lobby_count:
            # Someone waits in its lobby for a host (a member moved there, say): the room
            # stays, and is looked at again after the linger time.
            self._empty(room)
            return
        del self._rooms[room.name]
        del self._by_segment[room.segment]
        room.close(session_over=True)
        self._on_closed(room.name)
        log.info("room %s closed", room.name)

    async def persist(self, name: str) -> None:
        """Store what room ``name`` has not stored yet, and wait for it (it is about to move
        to another server)."""
        room = self._rooms.get(name)
        if room is not None:
            await room.persist()

    def drop(self, name: str, url: str | None) -> None:
        """Stop running room ``name`` here at once: its members and lobby are redirected to
        ``url`` (another server of the cluster runs it now) or, without one, disconnected to
        find it again; then it closes."""
        room = self._rooms.pop(name, None)
        if room is None:
            return
        del self._by_segment[room.segment]
        timer = self._close_timers.pop(name, None)
        if timer is not None:
            timer.cancel()
        room.hand_over(url)
        room.close()
        log.info("room %s moved %s", name, f"to {url}" if url else "away (lease lost)")

    def close_all(self) -> None:
        """Close every room now (the server is stopping)."""
        for timer in self._close_timers.values():
            timer.cancel()
        self._close_timers.clear()
        for room in list(self._rooms.values()):
            del self._rooms[room.name]
            del self._by_segment[room.segment]
            room.close()


def _check_claims(kind: str, plugins: Sequence[ServerPlugin]) -> None:
    """Refuse, when the server is built, a room type whose plugins claim one message type or
    binary frame kind twice (a room could not know whom to give it)."""
    messages: dict[str, str] = {}
    frames: dict[int, str] = {}
    for p in plugins:
        cls = plugin_class(p)
        for m in cls.messages:
            if messages.setdefault(m.TYPE, p.name) != p.name:
                raise ValueError(
                    f"room type {kind}: plugins {messages[m.TYPE]} and {p.name} both take "
                    f"{m.TYPE!r} messages"
                )
        for k in cls.frame_kinds:
            if frames.setdefault(k, p.name) != p.name:
                raise ValueError(
                    f"room type {kind}: plugins {frames[k]} and {p.name} both take frame 0x{k:02x}"
                )
