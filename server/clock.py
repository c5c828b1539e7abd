"""The fixed-rate clock that paces the tick loop (30 Hz state) and the audio mixer (50 Hz frames).

Tick ``n`` is due at ``start + n * period`` on the event loop's monotonic clock, so the rate
never drifts however long each tick's work takes. A loop that falls behind by whole periods
skips those ticks (and counts them) instead of running them late in a burst: late state or
audio is worth less than the next fresh one.
"""

from __future__ import annotations

import asyncio
import time


class FixedRateClock:
    """Drift-corrected ticks of ``period`` seconds; ``await clock.next()`` waits for the next."""

    def __init__(self, period: float, first: int = 0) -> None:
        self.period = period
        #: The tick the caller is working on (``first`` before the first ``next``).
        self.tick = first
        #: Ticks skipped so far because the caller fell behind.
        self.skipped = 0
        self._start_loop: float | None = None
        # Wall-clock anchor of tick 0 on time.monotonic() (full resolution, unlike some loops'
        # cached time), for :meth:`seconds`.
        self._start_mono = time.monotonic() - first * period

    def seconds(self) -> float:
        """Seconds since tick 0 now (tick ``n`` is at ``n * period``)."""
        return time.monotonic() - self._start_mono

    async def next(self) -> tuple[int, int]:
        """Sleep until the next tick is due; returns it and how many ticks were skipped
        before it (0 unless the caller fell behind by a whole period or more)."""
        loop = asyncio.get_running_loop()
        period = self.period
        if self._start_loop is None:
            self._start_loop = loop.time() - self.tick * period
            self._start_mono = time.monotonic() - self.tick * period
        n = self.tick + 1
        due = self._start_loop + n * period
        delay = due - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        skip = 0
        late = loop.time() - due
        if late >= period:
            skip = int(late / period)
            n += skip
            self.skipped += skip
        self.tick = n
        return n, skip

    def due(self, tick: int) -> float:
        """Loop time at which ``tick`` is (was) due."""
        assert self._start_loop is not None, "the clock has not started"
        return self._start_loop + tick * self.period
