"""Rooms and their members: membership, lifecycle and the per-room part of the fan-out."""

from __future__ import annotations

import asyncio
import secrets
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from medverse.protocol.messages import Joined, Left, MemberInfo, Message, encode_message
from medverse.protocol.snapshot import state_header

from .auth import Identity
from .websocket import binary_frame

if TYPE_CHECKING:
    from .session import Session
    from .world import World


@dataclass(eq=False)
class Member:
    """One member of a room. ``session`` is None while the member may still resume."""

    id: int
    identity: Identity
    slots: int
    room: Room
    index: int  # row block in the world's entity table; -1 for hidden members (no avatar)
    session: Session | None = None
    resume_token: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    last_seq: int = -1
    needs_keyframe: bool = True
    grace: asyncio.TimerHandle | None = None
    paused: bool = False  # stepped out: invisible to others, receives nothing
    muted: bool = False  # audio muted on the server by a host
    unmute_requested: bool = False

    @property
    def name(self) -> str:
        """What others see: the pseudonym in pseudonymous rooms, else the display name."""
        if self.room.pseudonymous:
            return self.identity.pseudonym or f"Participant {self.id}"
        return self.identity.name

    @property
    def hidden(self) -> bool:
        return self.identity.hidden

    def info(self) -> MemberInfo:
        return MemberInfo(self.id, self.name)


class Room:
    """A room: created on first join, closed ``linger`` seconds after its last member left.

    The entity state lives in the world's arrays; the room keeps who is in it, turns the world
    encoder's body for its segment into frames, and writes them to its members.
    """

    def __init__(self, world: World, name: str, segment: int, tick0: int) -> None:
        self.world = world
        self.name = name
        self.segment = segment
        self.tick0 = tick0  # world tick at which this room's clock starts
        self.members: dict[int, Member] = {}
        self._next_id = 1
        self._last_tick: int | None = None  # room tick of the last frame sent
        self.close_timer: asyncio.TimerHandle | None = None
        self.keyframe_wanted = False
        self.last_keyframe_tick = -(10**9)  # world tick of the room's last keyframe
        self.entry = "open"  # open | lobby | locked
        self.pseudonymous = False  # members appear only under pseudonyms
        self.ended = False
        self.banned: set[str] = set()  # token subjects barred for this session
        self.lobby: dict[int, Session] = {}  # lobby id -> waiting connection
        self._next_lobby_id = 1

    def new_lobby_id(self) -> int:
        lid = self._next_lobby_id
        self._next_lobby_id += 1
        return lid

    def room_tick(self, world_tick: int) -> int:
        return world_tick - self.tick0

    def new_member_id(self) -> int:
        mid = self._next_id
        self._next_id += 1
        return mid

    def others(self, member: Member) -> list[MemberInfo]:
        """The members ``member`` may know about: everyone else who is not hidden."""
        return [m.info() for m in self.members.values() if m is not member and not m.hidden]

    def broadcast(self, msg: Message, exclude: Member | None = None) -> None:
        """Send a control message to every connected member (built once)."""
        frame = binary_frame(encode_message(msg))
        for m in self.members.values():
            if m is not exclude and m.session is not None and not m.paused:
                m.session.write(frame)

    def announce_join(self, member: Member) -> None:
        if not member.hidden:
            self.broadcast(Joined(member.id, member.name), exclude=member)

    def announce_leave(self, member: Member, reason: str) -> None:
        if not member.hidden:
            self.broadcast(Left(member.id, member.name, reason), exclude=member)

    def send_state(self, world_tick: int, body: bytes, keyframe_body: bytes | None) -> None:
        """Write this tick's delta to every member; keyframes to those who need one.

        Latest wins: a member whose socket has more than the soft limit unsent gets nothing
        this tick and a keyframe once it has caught up, so nothing queues behind a slow reader.
        """
        tick = world_tick - self.tick0
        gap = 0 if self._last_tick is None else tick - self._last_tick
        self._last_tick = tick
        if not 0 < gap <= 255:
            for m in self.members.values():
                m.needs_keyframe = True
        delta = binary_frame(state_header(tick, gap, False) + body) if 0 < gap <= 255 else None
        key = binary_frame(state_header(tick, 0, True) + keyframe_body) if keyframe_body else None
        world = self.world
        soft = world.config.send_soft_limit
        wanted = False
        sent = 0
        # The common case (delta to a member that keeps up) is two C calls; the rest is rare.
        for m in self.members.values():
            s = m.session
            if s is None:
                continue
            t = s.transport
            if (
                m.needs_keyframe
                or m.paused
                or delta is None
                or t.is_closing()
                or t.get_write_buffer_size() > soft
            ):
                wanted |= self._send_slow(m, s, delta, key, soft)
                continue
            t.write(delta)
            sent += 1
        if sent:
            world.sent_bytes += sent * len(delta)  # type: ignore[arg-type]
            world.deltas_sent += sent
        self.keyframe_wanted = wanted

    def _send_slow(
        self, m: Member, s: Session, delta: bytes | None, key: bytes | None, soft: int
    ) -> bool:
        """A member that needs a keyframe or is behind; returns True if it still wants one."""
        if m.paused:
            return False
        if s.transport_backlog() > soft:
            if not m.needs_keyframe:
                m.needs_keyframe = True
                self.world.skipped += 1
            return True
        if m.needs_keyframe:
            if key is None:
                return True
            if s.write(key):
                m.needs_keyframe = False
                self.world.keyframes_sent += 1
            return m.needs_keyframe
        if delta is not None and s.write(delta):
            self.world.deltas_sent += 1
        return False
