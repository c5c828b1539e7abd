"""WebRTC settings shared by the server and the SDK (configuration only, no I/O here).

aioice gathers host candidates on every interface of the machine except loopback
(``aioice.ice.get_host_addresses``), and aiortc adds a public STUN server unless
``iceServers`` is given. medverse names the addresses explicitly instead: the development and
test default is ``127.0.0.1`` only, and a production server names its public address(es).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Any

import aioice.ice

#: The development default: WebRTC media stays on loopback.
DEFAULT_HOST_ADDRESSES = ("127.0.0.1",)
_configured: tuple[str, ...] | None = None


def parse_addresses(spec: str | Iterable[str]) -> tuple[str, ...]:
    """``"127.0.0.1, 203.0.113.7"`` (or a list) to a tuple of validated IP addresses."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out = tuple(str(ipaddress.ip_address(a.strip())) for a in items if a.strip())
    if not out:
        raise ValueError("name at least one ICE host address")
    return out


def restrict_ice_addresses(spec: str | Iterable[str]) -> tuple[str, ...]:
    """Make ICE gather host candidates on exactly these addresses (process-wide: aioice looks
    its host addresses up through one module function). Returns the addresses."""
    global _configured
    addresses = parse_addresses(spec)
    _configured = addresses

    def host_addresses(use_ipv4: bool, use_ipv6: bool) -> list[str]:
        return [
            a
            for a in addresses
            if (use_ipv4 and ipaddress.ip_address(a).version == 4)
            or (use_ipv6 and ipaddress.ip_address(a).version == 6)
        ]

    aioice.ice.get_host_addresses = host_addresses  # type: ignore[assignment]
    return addresses


def configured_addresses() -> tuple[str, ...] | None:
    """The addresses set by :func:`restrict_ice_addresses`, if it was called."""
    return _configured


def set_jitter_prefetch(pc: Any, frames: int) -> None:
    """Release received audio after ``frames`` 20 ms frames instead of aiortc's fixed 4.

    aiortc's audio receivers hold four frames (80 ms) before decoding; on a LAN or loopback
    one or two is enough, and each frame held adds 20 ms of mouth-to-ear latency.
    """
    from aiortc.jitterbuffer import JitterBuffer

    for receiver in pc.getReceivers():
        if receiver.track is not None and receiver.track.kind == "audio":
            receiver._RTCRtpReceiver__jitter_buffer = JitterBuffer(
                capacity=16, prefetch=max(0, frames)
            )
