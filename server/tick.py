"""The tick loop: at a fixed rate, inputs -> entity table -> one encode of every room -> fan-out.

Each tick the rooms' plugins write their entities (``on_tick``), the latest pose of every member
is validated and quantized in one vectorized batch, the world encoder encodes every room's delta
in one pass, and each room writes its frame to its members (:meth:`~.room.Room.send_state`).
"""

from __future__ import annotations

import asyncio
import logging
import time

from medverse.protocol.snapshot import WorldEncoder

from .clock import FixedRateClock
from .entities import EntityTable
from .metrics import Metrics, Traffic
from .registry import RoomRegistry
from .room import Member

log = logging.getLogger("medverse.tick")

#: Fewest ticks between two keyframes of one room (3 ticks: 100 ms at 30 Hz).
KEYFRAME_MIN_TICKS = 3
#: Tick work times kept for ``/health`` (the oldest half goes when it is full).
WORK_HISTORY = 16384


class TickLoop:
    """Runs every room's tick on one :class:`~.clock.FixedRateClock`."""

    def __init__(
        self,
        clock: FixedRateClock,
        table: EntityTable,
        rooms: RoomRegistry,
        metrics: Metrics,
        traffic: Traffic,
    ) -> None:
        self.clock = clock
        self._table = table
        self._rooms = rooms
        self._metrics = metrics
        self._traffic = traffic
        self._encoder = WorldEncoder()
        self._task: asyncio.Task[None] | None = None
        #: Recent tick work times, seconds.
        self.work: list[float] = []

    def tick(self) -> None:
        """One tick of every room."""
        n = self.clock.tick
        rooms = self._rooms
        for room in rooms:
            room.before_tick(n)
        for owner in self._table.apply_inputs():
            if isinstance(owner, Member):
                owner.pose_refused()
        segments, bodies = self._encoder.encode(self._table.snapshot())
        seg_list = segments.tolist()
        # Keyframes cost a whole encode of the room: build at most one per room every
        # KEYFRAME_MIN_TICKS (a joiner waits at most that long), so members who join, resume
        # or fall behind over and over cannot make the tick pay for one every tick.
        wanted = [
            s
            for s in seg_list
            if (r := rooms.by_segment(s)) is not None and r.take_keyframe(n, KEYFRAME_MIN_TICKS)
        ]
        keyframes = (
            dict(zip(wanted, self._encoder.keyframes(wanted), strict=True)) if wanted else {}
        )
        for seg, body in zip(seg_list, bodies, strict=True):
            room = rooms.by_segment(seg)
            if room is not None:
                room.send_state(n, body, keyframes.get(seg))

    async def run(self) -> None:
        """Tick at the clock's rate until cancelled; a failing tick is logged, not fatal."""
        clock = self.clock
        metrics = self._metrics
        while True:
            _n, skipped = await clock.next()
            if skipped:
                metrics.tick_overruns.inc(skipped)
            t0 = time.perf_counter()
            try:
                self.tick()
            except Exception:  # a bug in one tick must not stop every room
                log.exception("tick %d failed", clock.tick)
            work = time.perf_counter() - t0
            metrics.tick_seconds.observe(work)
            self.work.append(work)
            if len(self.work) > WORK_HISTORY:
                del self.work[: WORK_HISTORY // 2]
            self._traffic.flush(metrics)

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
