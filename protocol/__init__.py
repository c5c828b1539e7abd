"""The medverse wire protocol, sans-I/O: bytes in, typed messages out; no asyncio, no sockets.

See ``protocol/SPEC.md`` for the byte-level format.
"""

from . import (
    audio,  # registers the spatial audio messages
    objects,  # registers the shared-object messages
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
    "ErrorCode",
    "ProtocolError",
    "Snapshot",
    "SnapshotDecoder",
    "SnapshotEncoder",
    "WorldEncoder",
    "audio",
    "dequantize_positions",
    "dequantize_rotations",
    "objects",
    "quantize_positions",
    "quantize_rotations",
    "rotation_error_deg",
    "state_header",
    "validate_poses",
]
