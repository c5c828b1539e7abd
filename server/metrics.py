"""Prometheus metrics, one registry per application so several apps can share a process."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class Metrics:
    """The counters the server keeps all the time."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.rooms = Gauge("medverse_rooms", "Open rooms", registry=r)
        self.members = Gauge(
            "medverse_members", "Members in rooms (including those resuming)", registry=r
        )
        self.connections = Gauge("medverse_connections", "Open WebSocket connections", registry=r)
        self.unidentified = Gauge(
            "medverse_unidentified_connections",
            "Open WebSocket connections that have not sent a valid hello",
            registry=r,
        )
        self.connections_refused = Counter(
            "medverse_connections_refused_total",
            "Connections refused before anything was read, or cut before their first HTTP request "
            "was complete, by reason",
            ["reason"],
            registry=r,
        )
        self.tick_seconds = Histogram(
            "medverse_tick_seconds",
            "Work time of one server tick (inputs, encoding, fan-out) for all rooms",
            buckets=(
                0.0001,
                0.00025,
                0.0005,
                0.001,
                0.002,
                0.003,
                0.005,
                0.0075,
                0.01,
                0.02,
                0.05,
                0.1,
            ),
            registry=r,
        )
        self.tick_overruns = Counter(
            "medverse_tick_overruns_total", "Ticks skipped because the loop fell behind", registry=r
        )
        self.sent_bytes = Counter("medverse_sent_bytes_total", "Bytes sent to clients", registry=r)
        self.received_bytes = Counter(
            "medverse_received_bytes_total", "Bytes received from clients", registry=r
        )
        self.state_frames = Counter(
            "medverse_state_frames_total", "State frames sent to members", ["kind"], registry=r
        )
        self.skipped = Counter(
            "medverse_skipped_ticks_total",
            "State ticks skipped for a member that fell behind",
            registry=r,
        )
        self.protocol_errors = Counter(
            "medverse_protocol_errors_total",
            "Bad client input, by error code",
            ["code"],
            registry=r,
        )
        self.auth_refusals = Counter(
            "medverse_auth_refusals_total",
            "Joins refused for their token, by code",
            ["code"],
            registry=r,
        )
        self.slow_disconnects = Counter(
            "medverse_slow_disconnects_total", "Members closed for not reading", registry=r
        )
        self.silent_disconnects = Counter(
            "medverse_silent_disconnects_total",
            "Connections dropped after silence_timeout seconds without a byte (dead peers)",
            registry=r,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def totals(self) -> dict[str, object]:
        """The running totals ``/health`` reports (and the operator panel charts as rates):
        bytes in and out, and refusals by reason, read from the same counters as
        ``/metrics``."""
        return {
            "traffic": {
                "sent_bytes": _total(self.sent_bytes),
                "received_bytes": _total(self.received_bytes),
            },
            "refusals": {
                "connections": _by_label(self.connections_refused),
                "auth": _by_label(self.auth_refusals),
                "protocol_errors": _by_label(self.protocol_errors),
            },
        }


def _total(counter: Counter) -> int:
    """An unlabelled counter's value."""
    return sum(
        int(s.value) for f in counter.collect() for s in f.samples if s.name.endswith("_total")
    )


def _by_label(counter: Counter) -> dict[str, int]:
    """A counter with one label as ``{label value: count}``."""
    return {
        next(iter(s.labels.values())): int(s.value)
        for f in counter.collect()
        for s in f.samples
        if s.name.endswith("_total") and s.labels
    }


class Traffic:
    """Counters written on the hot paths (every write, every tick) as plain integers and moved
    into Prometheus once per tick, which costs far less than a Prometheus call per write."""

    __slots__ = ("deltas_sent", "keyframes_sent", "received_bytes", "sent_bytes", "skipped")

    def __init__(self) -> None:
        self.sent_bytes = 0
        self.received_bytes = 0
        self.skipped = 0
        self.keyframes_sent = 0
        self.deltas_sent = 0

    def flush(self, m: Metrics) -> None:
        """Add what was counted since the last flush to ``m``'s counters."""
        if self.sent_bytes:
            m.sent_bytes.inc(self.sent_bytes)
            self.sent_bytes = 0
        if self.received_bytes:
            m.received_bytes.inc(self.received_bytes)
            self.received_bytes = 0
        if self.skipped:
            m.skipped.inc(self.skipped)
            self.skipped = 0
        if self.keyframes_sent:
            m.state_frames.labels("keyframe").inc(self.keyframes_sent)
            self.keyframes_sent = 0
        if self.deltas_sent:
            m.state_frames.labels("delta").inc(self.deltas_sent)
            self.deltas_sent = 0
