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

    def render(self) -> bytes:
        return generate_latest(self.registry)
