"""Spatial audio: WebRTC peers per member, a mix made for each listener, routing rules.

Each member negotiates one aiortc peer connection over its room connection
(:class:`~medverse.protocol.audio.AudioOffer` -> :class:`~medverse.protocol.audio.AudioAnswer`;
:mod:`.signaling`). A publisher's Opus packets are taken from aiortc's RTP receiver as they
arrive (no decoder thread; see :func:`medverse.rtc.capture_encoded`). Every 20 ms the mixer
(:mod:`.plugin`) has each room's mix state (:mod:`.mixing`) decode one frame per speaker
(:mod:`.codec`) into its slot of the room's ring buffer (mono float), build the listeners x
speakers x 2 gain tensor from head poses and routing rules (:mod:`.spatial`) and mix all
listeners with one matrix product (one per interaural delay step); it then encodes each
listener's stereo frame once (:mod:`.codec`), and aiortc sends those packets as they are.

Rules the server enforces in the gain matrix, whatever a client does: a host's server mute, a
paused member (heard by nobody, hears nothing), self mute, zones, broadcast speakers, whispers
and ignores. Observers (hidden members) can only listen.

==============  ======================================================================
``spatial``     gains from poses and rules, and the mix itself (numpy only)
``codec``       Opus decoders and encoders (the only module that uses PyAV)
``mixing``      a room's mix state: slots, ring buffers, decoding, one frame's mix
``signaling``   offer checks and peer negotiation (aiortc, through ``medverse.rtc``)
``plugin``      ``RoomAudio`` (room plugin) and ``SpatialAudio`` (the mixer clock)
==============  ======================================================================
"""

from .codec import OpusDecoder, OpusStream, mono_of
from .mixing import MixCounters, MixedFrame, RoomMix
from .plugin import RoomAudio, SpatialAudio
from .signaling import MixTrack, Peer, PeerCloser, SpeakerInbox
from .spatial import Spatial

__all__ = [
    "MixCounters",
    "MixTrack",
    "MixedFrame",
    "OpusDecoder",
    "OpusStream",
    "Peer",
    "PeerCloser",
    "RoomAudio",
    "RoomMix",
    "Spatial",
    "SpatialAudio",
    "SpeakerInbox",
    "mono_of",
]
