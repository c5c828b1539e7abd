"""Typed protocol errors: every bad input becomes one of these, never a stray exception."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class ErrorCode(enum.StrEnum):
    """Error codes carried in ``error`` messages; stable strings, part of the wire contract."""

    MALFORMED = "malformed"  # not decodable at all (bad msgpack, truncated binary, bad frame kind)
    OVERSIZED = "oversized"  # frame longer than the limit for its kind
    UNKNOWN_TYPE = "unknown_type"  # control message with a type we do not know
    BAD_FIELD = "bad_field"  # missing, unexpected or wrongly typed field
    OUT_OF_RANGE = "out_of_range"  # NaN, infinity, absurd position, bad quaternion, too long text
    UNSUPPORTED_VERSION = (
        "unsupported_version"  # handshake names a protocol version we do not speak
    )
    HANDSHAKE_REQUIRED = "handshake_required"  # anything but hello before the handshake
    ALREADY_JOINED = "already_joined"  # a second hello on the same connection
    HANDSHAKE_TIMEOUT = "handshake_timeout"  # no hello in time; the connection is closed
    ROOM_FULL = "room_full"  # the room has its maximum number of members
    BAD_RESUME = "bad_resume"  # resume token unknown or expired; join as a new member instead
    UNAUTHORIZED = "unauthorized"  # join token missing, forged, or for another room
    TOKEN_EXPIRED = "token_expired"  # join token past its expiry
    FORBIDDEN = "forbidden"  # the member's role and grants do not allow this action
    RATE_LIMITED = "rate_limited"  # over the member's message or byte rate
    TOO_MANY_CONNECTIONS = "too_many_connections"  # over the per-address connection limit
    DENIED = "denied"  # a host denied entry from the lobby
    REMOVED = "removed"  # a host removed the member (the message gives the reason)
    BANNED = "banned"  # removed and barred from this session
    ROOM_LOCKED = "room_locked"  # the room takes no new members
    SESSION_ENDED = "session_ended"  # a host ended the session for everyone
    NOT_FOUND = "not_found"  # no such member, object, annotation or asset
    INVALID_ASSET = "invalid_asset"  # an upload that is not a glTF 2.0 model we accept
    CORRUPT = "corrupt"  # stored data failed its integrity check and is not served
    NOT_DICOM = "not_dicom"  # an image upload holds a file that is not DICOM
    NO_PIXEL_DATA = "no_pixel_data"  # a DICOM file without the Image Pixel module
    MIXED_SERIES = "mixed_series"  # files of several series (UIDs, sizes, orientations, positions)
    UNSUPPORTED_TRANSFER_SYNTAX = "unsupported_transfer_syntax"  # a syntax we do not decode
    UNSUPPORTED_IMAGE = "unsupported_image"  # colour, multi-frame, uneven or sheared slices
    IDENTIFIABLE_DATA = "identifiable_data"  # identifying attributes where they are not allowed
    OBJECT_LOCKED = "object_locked"  # another member holds the object's lease (names the holder)
    NOT_HOLDER = "not_holder"  # moving or releasing an object without holding its lease
    LIMIT_REACHED = "limit_reached"  # too many objects in the room or annotations on an object
    CONSENT_REQUIRED = "consent_required"  # consent declined, withdrawn or for another version
    STALE_INPUT = "stale_input"  # pose sequence number not newer than the last one applied
    TOO_SLOW = "too_slow"  # the member's connection cannot keep up and was closed
    SHUTTING_DOWN = "shutting_down"  # the server is stopping
    ROOM_MOVING = "room_moving"  # the room is between servers of a cluster; join again shortly
    TRANSFER_TIMEOUT = "transfer_timeout"  # the server running a move's target room did not answer
    INTERNAL = "internal"  # a bug on our side; the member stays connected


@dataclass(eq=False)
class ProtocolError(Exception):
    """A bad input as a value: ``code`` for machines, ``message`` for people."""

    code: ErrorCode
    message: str

    def __str__(self) -> str:
        return f"{self.code.value}: {self.message}"
