"""A guided breathing exercise for group therapy, written as a medverse room plugin.

The therapist (a member with the ``moderate`` grant) picks a shared object of the room, say an
orb spawned from an uploaded model, and starts the exercise with a pace: the orb then grows while
the group breathes in and shrinks while it breathes out. The orb's scale rides in the room's tick
state like every avatar, so every headset sees the same breath at the same moment; a member who
joins late is told the pace. The therapist changes the pace by starting again, or stops.

Run a server whose rooms named ``therapy-...`` have the exercise (the others run the default
plugins)::

    python -m examples.breathing          # settings as for `medverse serve` (MEDVERSE_* env)

and in a client (the Python SDK learns the plugin's messages with ``messages=``)::

    session = connect(url, "therapy-7", "Dr A", token=token, messages=BREATHING_MESSAGES)
    await session.send_message(BreathingStart(orb_id, inhale=4.0, exhale=6.0))
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from medverse.protocol.errors import ErrorCode, ProtocolError
from medverse.protocol.messages import Message, wire_field
from medverse.server.app import create_app, default_plugins
from medverse.server.cli import serve
from medverse.server.config import ServerConfig
from medverse.server.objects import RoomObjects
from medverse.server.plugins import MemberView, RoomPlugin, RoomType

# --------------------------------------------------------------------------- messages


@dataclass(frozen=True, slots=True)
class BreathingStart(Message):
    """Therapist to server: breathe with ``object_id``, ``inhale`` and ``exhale`` seconds a
    breath; the object grows by ``depth`` (a fraction of its size) at the top of each breath."""

    TYPE: ClassVar[str] = "breathing_start"
    object_id: int = wire_field("int", lo=1, hi=2**31 - 1)
    inhale: float = wire_field("float", lo=1.0, hi=10.0)
    exhale: float = wire_field("float", lo=1.0, hi=15.0)
    depth: float | None = wire_field("float", lo=0.05, hi=1.0, optional=True)


@dataclass(frozen=True, slots=True)
class BreathingStop(Message):
    """Therapist to server: end the exercise (the object goes back to its size)."""

    TYPE: ClassVar[str] = "breathing_stop"


@dataclass(frozen=True, slots=True)
class BreathingState(Message):
    """Server to members: the exercise now (``object_id`` None: none); a breath began at room
    time ``since`` and every ``inhale + exhale`` seconds after it."""

    TYPE: ClassVar[str] = "breathing_state"
    object_id: int | None = wire_field("int", lo=1, hi=2**31 - 1, optional=True)
    inhale: float | None = wire_field("float", optional=True)
    exhale: float | None = wire_field("float", optional=True)
    since: float | None = wire_field("float", optional=True)


#: Every message of the exercise, for a client's ``connect(..., messages=...)``.
BREATHING_MESSAGES = (BreathingStart, BreathingStop, BreathingState)


def breath(t: float, inhale: float, exhale: float) -> float:
    """How full the lungs are ``t`` seconds into the exercise: 0 to 1 while breathing in, back
    to 0 while breathing out, eased at both ends as a calm breath is."""
    t %= inhale + exhale
    x = t / inhale if t < inhale else 1.0 - (t - inhale) / exhale
    return (1.0 - math.cos(math.pi * x)) / 2.0


# --------------------------------------------------------------------------- the plugin


@dataclass
class _Pace:
    object_id: int
    inhale: float
    exhale: float
    depth: float
    since: float  # room time the first breath began
    scale: float  # the object's own scale, restored at the end


class BreathingExercise(RoomPlugin):
    """Drives a shared object's scale with the breath the therapist sets."""

    name = "breathing"
    messages = (BreathingStart, BreathingStop)
    server_messages = (BreathingState,)

    pace: _Pace | None = None

    def _objects(self) -> RoomObjects:
        objects = self.ctx.plugin(RoomObjects)
        if objects is None:
            raise ProtocolError(ErrorCode.NOT_FOUND, "this room has no shared objects")
        return objects

    def on_message(self, member: MemberView, msg: Message) -> None:
        if not member.can("moderate"):
            raise ProtocolError(ErrorCode.FORBIDDEN, "the therapist leads the exercise")
        if isinstance(msg, BreathingStart):
            objects = self._objects()
            _, _, scale = objects.transform(msg.object_id)  # not_found: the pace stays as it is
            if self.pace is not None and self.pace.object_id == msg.object_id:
                scale = self.pace.scale  # a new pace for the same orb: keep its own size
            self._stop()
            self.pace = _Pace(
                msg.object_id, msg.inhale, msg.exhale, msg.depth or 0.3, self.ctx.time(), scale
            )
            self.ctx.audit(
                "breathing_started",
                actor=member.identity.subject,
                subject=f"object:{msg.object_id}",
                inhale=msg.inhale,
                exhale=msg.exhale,
            )
        else:
            self._stop()
        self.ctx.broadcast(self._state())

    def on_join(self, member: MemberView) -> None:
        if self.pace is not None:
            self.ctx.send(member, self._state())

    def on_tick(self, tick: int) -> None:
        p = self.pace
        if p is None:
            return
        full = breath(self.ctx.time() - p.since, p.inhale, p.exhale)
        try:
            # Every tick's size goes to the members, not to storage: the orb's own size stays
            # stored, whenever the room closes.
            scale = p.scale * (1.0 + p.depth * full)
            self._objects().drive(p.object_id, scale=scale, store=False)
        except ProtocolError as err:
            if err.code is ErrorCode.NOT_FOUND:  # the orb was removed: the exercise ends
                self.pace = None
                self.ctx.broadcast(self._state())
            # object_locked: someone holds the orb; the breath goes on when they let go

    def _stop(self) -> None:
        """End the exercise: the orb goes back to its own size."""
        p, self.pace = self.pace, None
        if p is not None:
            try:
                self._objects().drive(p.object_id, scale=p.scale)
            except ProtocolError:
                pass  # removed or held: nothing to restore

    def _state(self) -> BreathingState:
        p = self.pace
        if p is None:
            return BreathingState()
        return BreathingState(p.object_id, p.inhale, p.exhale, p.since)


#: Therapy rooms run the exercise beside the default plugins; other rooms do not have it.
THERAPY = RoomType("therapy", ["moderation", "audio", "objects", "breathing"], rooms=r"therapy-.*")


def main() -> None:
    """A medverse server with the exercise in rooms named ``therapy-...``."""
    cfg = ServerConfig.from_env()
    plugins = [*default_plugins(), BreathingExercise]
    default = RoomType("default", ["moderation", "audio", "objects"])
    serve(cfg, create_app(cfg, plugins=plugins, room_types=[THERAPY, default]))


if __name__ == "__main__":
    main()
