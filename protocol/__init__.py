"""The medverse wire protocol, sans-I/O: bytes in, typed messages out; no asyncio, no sockets.

See ``protocol/SPEC.md`` for the byte-level format.
"""

from . import audio, clinic, objects
from .catalog import CLIENT_MESSAGES, SERVER_MESSAGES
from .connection import (
    Connection,
    Event,
    FrameReceived,
    Ignored,
    LocalProtocolError,
    MessageReceived,
    PoseReceived,
    Refused,
    Role,
    State,
    StateReceived,
)
from .errors import ErrorCode, ProtocolError
from .quant import (
    dequantize_positions,
    dequantize_rotations,
    quantize_positions,
    quantize_rotations,
    rotation_error_deg,
    validate_poses,
)
from .snapshot import Snapshot, SnapshotDecoder, SnapshotEncoder, WorldEncoder, state_header

__all__ = [
    "CLIENT_MESSAGES",
    "SERVER_MESSAGES",
    "Connection",
    "ErrorCode",
    "Event",
    "FrameReceived",
    "Ignored",
    "LocalProtocolError",
    "MessageReceived",
    "PoseReceived",
    "ProtocolError",
    "Refused",
    "Role",
    "Snapshot",
    "SnapshotDecoder",
    "SnapshotEncoder",
    "State",
    "StateReceived",
    "WorldEncoder",
    "audio",
    "clinic",
    "dequantize_positions",
    "dequantize_rotations",
    "objects",
    "quantize_positions",
    "quantize_rotations",
    "rotation_error_deg",
    "state_header",
    "validate_poses",
]
