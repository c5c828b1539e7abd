"""Server-to-client WebSocket frames built once and written to many transports.

Frames from a server are unmasked, so one tick's state frame is the same bytes for every member;
building it once and handing it to each transport is the cheapest possible fan-out.
"""

from __future__ import annotations

import struct

_OP_BINARY_FIN = 0x82


def binary_frame(payload: bytes) -> bytes:
    """One final, unmasked, uncompressed binary WebSocket frame (RFC 6455 section 5.2)."""
    n = len(payload)
    if n < 126:
        return bytes((_OP_BINARY_FIN, n)) + payload
    if n < 65536:
        return struct.pack("!BBH", _OP_BINARY_FIN, 126, n) + payload
    return struct.pack("!BBQ", _OP_BINARY_FIN, 127, n) + payload
