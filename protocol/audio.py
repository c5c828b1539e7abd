"""Spatial audio messages: WebRTC signaling over the room connection and the routing rules.

A member negotiates one WebRTC peer connection with the server (offer from the client, answer
from the server, all ICE candidates inside the SDP: no trickle). It may publish one microphone
track and receives one stereo track, the mix made for it. Routing rules (zones, broadcast
speakers, whispers, ignores, self mute) are room state; the server sends each member the part
of it that member may know (``audio_rules``) and who is talking (``audio_speaking``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar

from .errors import ErrorCode, ProtocolError
from .messages import Message, Spec, wire_field

#: Largest audio offer frame: a browser's SDP offer is larger than other control frames
#: (MAX_CONTROL_BYTES). An aiortc audio-only offer with one host candidate is about 1.2 KB,
#: Chromium's about 5-6 KB with a few candidates. It equals the server's default WebSocket
#: message limit (--max-frame-bytes).
AUDIO_OFFER_MAX_BYTES = 16 * 1024
#: Longest SDP accepted in an offer.
MAX_SDP_CHARS = AUDIO_OFFER_MAX_BYTES - 96
#: Zones are small positive integers; 0 means "no zone" (the open room).
MAX_ZONE = 65535
#: Broadcast gain is given in percent of the reference level.
MAX_GAIN_PERCENT = 400
#: Longest list of integers in an audio message (pairs count twice).
MAX_INT_LIST = 1024
_MEMBER_ID = {"lo": 1, "hi": 2**32 - 1}
_SDP_RE = re.compile(r"v=0\r?\n.*", re.DOTALL)  # a whole SDP: it begins with its version line


class AudioMessage(Message):
    """Adds ``int_list`` fields (flat lists of non-negative integers) to the base validation."""

    __slots__ = ()

    @classmethod
    def check_field(cls, name: str, spec: Spec, value: Any) -> Any:
        if spec.kind == "int_list":
            return _check_int_list(name, value, spec.max_len or MAX_INT_LIST)
        return super().check_field(name, spec, value)


def _check_int_list(name: str, value: Any, max_len: int) -> tuple[int, ...]:
    if not isinstance(value, list):
        raise ProtocolError(ErrorCode.BAD_FIELD, f"{name} must be a list of integers")
    if len(value) > max_len:
        raise ProtocolError(ErrorCode.OUT_OF_RANGE, f"{name} longer than {max_len}")
    for v in value:
        if not isinstance(v, int) or isinstance(v, bool):
            raise ProtocolError(ErrorCode.BAD_FIELD, f"{name} must be a list of integers")
        if not 0 <= v <= 2**32 - 1:
            raise ProtocolError(ErrorCode.OUT_OF_RANGE, f"{name} has an integer out of range")
    return tuple(value)


# --------------------------------------------------------------------------- client to server


@dataclass(frozen=True, slots=True)
class AudioOffer(AudioMessage):
    """Start (or restart) this member's audio: an SDP offer with exactly one audio section and
    its ICE candidates. ``publish`` asks to send a microphone (offer ``sendrecv``; needs the
    ``publish_audio`` grant); without it the offer is ``recvonly`` and the member only listens.
    The server answers with :class:`AudioAnswer`."""

    TYPE: ClassVar[str] = "audio_offer"
    MAX_FRAME_BYTES: ClassVar[int] = AUDIO_OFFER_MAX_BYTES
    sdp: str = wire_field("str", max_len=MAX_SDP_CHARS, pattern=_SDP_RE)
    publish: bool = wire_field("bool")


@dataclass(frozen=True, slots=True)
class AudioMute(AudioMessage):
    """Self mute (``muted`` true) or unmute. A host's server mute is separate and stronger: a
    server-muted member stays silent whatever it sends."""

    TYPE: ClassVar[str] = "audio_mute"
    muted: bool = wire_field("bool")


@dataclass(frozen=True, slots=True)
class AudioZone(AudioMessage):
    """Host: put a member in ``zone`` (1-65535; members of a zone hear only each other) or take
    them out (0)."""

    TYPE: ClassVar[str] = "audio_zone"
    member_id: int = wire_field("int", **_MEMBER_ID)
    zone: int = wire_field("int", lo=0, hi=MAX_ZONE)


@dataclass(frozen=True, slots=True)
class AudioBroadcast(AudioMessage):
    """Host: make a member a broadcast speaker, heard by everyone at ``gain`` percent of the
    reference level regardless of distance and zones (``on`` false ends it)."""

    TYPE: ClassVar[str] = "audio_broadcast"
    member_id: int = wire_field("int", **_MEMBER_ID)
    on: bool = wire_field("bool")
    gain: int | None = wire_field("int", lo=0, hi=MAX_GAIN_PERCENT, optional=True)


@dataclass(frozen=True, slots=True)
class AudioWhisper(AudioMessage):
    """Whisper to one member: while it lasts only ``target`` hears us. No target ends it."""

    TYPE: ClassVar[str] = "audio_whisper"
    target: int | None = wire_field("int", **_MEMBER_ID, optional=True)


@dataclass(frozen=True, slots=True)
class AudioIgnore(AudioMessage):
    """Stop hearing (and being heard by) a member, or undo it."""

    TYPE: ClassVar[str] = "audio_ignore"
    member_id: int = wire_field("int", **_MEMBER_ID)
    ignore: bool = wire_field("bool")


# --------------------------------------------------------------------------- server to client


@dataclass(frozen=True, slots=True)
class AudioAnswer(AudioMessage):
    """The server's SDP answer to :class:`AudioOffer` (its candidates included)."""

    TYPE: ClassVar[str] = "audio_answer"
    sdp: str = wire_field("str", max_len=65536)
    publish: bool = wire_field("bool")


@dataclass(frozen=True, slots=True)
class AudioRules(AudioMessage):
    """The room's audio routing rules as this member may know them. Lists are flat:

    ``zones`` pairs (member id, zone); ``broadcast`` pairs (member id, gain percent);
    ``whispers`` pairs (speaker id, target id) that involve this member (hosts see all);
    ``self_muted`` member ids; ``ignored`` ids this member ignores."""

    TYPE: ClassVar[str] = "audio_rules"
    zones: tuple[int, ...] = wire_field("int_list", max_len=MAX_INT_LIST)
    broadcast: tuple[int, ...] = wire_field("int_list", max_len=MAX_INT_LIST)
    whispers: tuple[int, ...] = wire_field("int_list", max_len=MAX_INT_LIST)
    self_muted: tuple[int, ...] = wire_field("int_list", max_len=MAX_INT_LIST)
    ignored: tuple[int, ...] = wire_field("int_list", max_len=MAX_INT_LIST)


@dataclass(frozen=True, slots=True)
class AudioSpeaking(AudioMessage):
    """Who is talking now (member ids, loudest first); sent when the set changes."""

    TYPE: ClassVar[str] = "audio_speaking"
    members: tuple[int, ...] = wire_field("int_list", max_len=MAX_INT_LIST)


#: The spatial audio messages clients send, and those the server sends.
CLIENT_AUDIO: tuple[type[Message], ...] = (
    AudioOffer,
    AudioMute,
    AudioZone,
    AudioBroadcast,
    AudioWhisper,
    AudioIgnore,
)
SERVER_AUDIO: tuple[type[Message], ...] = (AudioAnswer, AudioRules, AudioSpeaking)


def pairs(flat: tuple[int, ...]) -> list[tuple[int, int]]:
    """``(a, b, c, d)`` as ``[(a, b), (c, d)]`` (an odd last element is ignored)."""
    return list(zip(flat[0::2], flat[1::2], strict=False))


def audio_sections(sdp: str) -> list[str]:
    """The media kinds of an SDP's ``m=`` lines, in order."""
    return [line[2:].split(" ", 1)[0] for line in sdp.splitlines() if line.startswith("m=")]


def offer_direction(sdp: str) -> str:
    """The direction attribute of the (single) media section, ``sendrecv`` if none is given."""
    in_media = False
    for line in sdp.splitlines():
        if line.startswith("m="):
            in_media = True
        elif in_media and line in ("a=sendrecv", "a=sendonly", "a=recvonly", "a=inactive"):
            return line[2:]
    return "sendrecv"


__all__ = [
    "AUDIO_OFFER_MAX_BYTES",
    "MAX_SDP_CHARS",
    "MAX_ZONE",
    "AudioAnswer",
    "AudioBroadcast",
    "AudioIgnore",
    "AudioMute",
    "AudioOffer",
    "AudioRules",
    "AudioSpeaking",
    "AudioWhisper",
    "AudioZone",
    "audio_sections",
    "offer_direction",
    "pairs",
]
