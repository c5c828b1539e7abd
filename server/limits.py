"""Connection budgets: how many connections one address, and everyone together, may hold open,
and how many of them may be unidentified (no valid ``hello`` yet).

An unidentified connection costs little (the frame parser keeps at most one frame header's worth
of bytes for it and the handshake timeout closes it), but a flood of them from one address, or
from many, must not crowd out the members: the budget refuses the next one before anything of it
is read, with a typed error, a log line and a count in ``medverse_connections_refused_total``.
"""

from __future__ import annotations

import logging
from collections import Counter

log = logging.getLogger("medverse.limits")


class ConnectionBudget:
    """Counts open and unidentified connections, per address and in total."""

    def __init__(self, per_address: int, unidentified_per_address: int, unidentified: int) -> None:
        #: 0 means unlimited, for each of the three.
        self.per_address = per_address
        self.unidentified_per_address = unidentified_per_address
        self.unidentified_total = unidentified
        self._open: Counter[str] = Counter()
        self._unidentified: Counter[str] = Counter()
        self._unidentified_sum = 0

    def admit(self, address: str) -> str | None:
        """Count a new connection from ``address`` as open and unidentified, or say why it is
        refused (nothing is counted then)."""
        if 0 < self.per_address <= self._open[address]:
            return "too many connections from this address"
        if 0 < self.unidentified_per_address <= self._unidentified[address]:
            return "too many connections from this address that have not joined"
        if 0 < self.unidentified_total <= self._unidentified_sum:
            return "too many connections that have not joined"
        self._open[address] += 1
        self._unidentified[address] += 1
        self._unidentified_sum += 1
        return None

    def identified(self, address: str) -> None:
        """The connection sent a valid ``hello``: it no longer counts as unidentified."""
        self._drop(self._unidentified, address)
        self._unidentified_sum -= 1

    def closed(self, address: str, identified: bool) -> None:
        """The connection ended."""
        self._drop(self._open, address)
        if not identified:
            self._drop(self._unidentified, address)
            self._unidentified_sum -= 1

    @staticmethod
    def _drop(counts: Counter[str], address: str) -> None:
        counts[address] -= 1
        if counts[address] <= 0:
            del counts[address]

    @property
    def unidentified(self) -> int:
        """Connections open now that have not joined."""
        return self._unidentified_sum
