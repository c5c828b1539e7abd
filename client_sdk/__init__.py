"""medverse client SDK: a thin async client for headsets, desktop apps and bots.

from client_sdk import connect, Pose

async with connect("ws://127.0.0.1:8750", room="demo", name="Dr A") as session:
    session.send_pose(head=Pose((0, 1.6, 0), (0, 0, 0, 1)))
"""

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
from .session import JoinError, Session, connect
from .types import (
    Avatar,
    Closed,
    ErrorEvent,
    Event,
    Joined,
    Left,
    Pose,
    Reconnecting,
    Resumed,
    Waiting,
)

__all__ = [
    "Annotation",
    "AnnotationChanged",
    "Avatar",
    "Closed",
    "ErrorEvent",
    "Event",
    "HandoverRequested",
    "JoinError",
    "Joined",
    "Left",
    "LockChanged",
    "MoveRefused",
    "ObjectAdded",
    "ObjectError",
    "ObjectRemoved",
    "Pose",
    "Reconnecting",
    "Resumed",
    "Session",
    "SharedObject",
    "ViewChanged",
    "Waiting",
    "connect",
]
