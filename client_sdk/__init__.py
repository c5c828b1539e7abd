"""medverse client SDK: a thin async client for headsets, desktop apps and bots.

from medverse.client_sdk import connect, Pose

async with connect("ws://127.0.0.1:8750", room="demo", name="Dr A") as session:
    session.send_pose(head=Pose((0, 1.6, 0), (0, 0, 0, 1)))
"""

from .assets import AssetClient, AssetError, AssetInfo
from .audio import (
    AudioClient,
    AudioError,
    LevelMeter,
    RoomAudioRules,
    ToneTrack,
    file_track,
    microphone_track,
    tone_track,
)
from .objects import (
    Annotation,
    AnnotationChanged,
    HandoverRequested,
    LockChanged,
    MoveRefused,
    ObjectAdded,
    ObjectError,
    ObjectRemoved,
    SharedObject,
    ViewChanged,
)
from .playback import AudioPlayer
from .session import JoinError, Session, connect
from .types import (
    Avatar,
    BanEntry,
    BansChanged,
    Closed,
    EntryChanged,
    ErrorEvent,
    Event,
    GrantsChanged,
    Joined,
    Left,
    LobbyChanged,
    LobbyEntry,
    MemberStateChanged,
    Pose,
    Reconnecting,
    RefusedError,
    Resumed,
    Waiting,
)

__all__ = [
    "Annotation",
    "AnnotationChanged",
    "AssetClient",
    "AssetError",
    "AssetInfo",
    "AudioClient",
    "AudioError",
    "AudioPlayer",
    "Avatar",
    "BanEntry",
    "BansChanged",
    "Closed",
    "EntryChanged",
    "ErrorEvent",
    "Event",
    "GrantsChanged",
    "HandoverRequested",
    "JoinError",
    "Joined",
    "Left",
    "LevelMeter",
    "LobbyChanged",
    "LobbyEntry",
    "LockChanged",
    "MemberStateChanged",
    "MoveRefused",
    "ObjectAdded",
    "ObjectError",
    "ObjectRemoved",
    "Pose",
    "Reconnecting",
    "RefusedError",
    "Resumed",
    "RoomAudioRules",
    "Session",
    "SharedObject",
    "ToneTrack",
    "ViewChanged",
    "Waiting",
    "connect",
    "file_track",
    "microphone_track",
    "tone_track",
]
