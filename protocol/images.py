"""Shared image viewers: panels showing a medical image series, their synced viewer state, a
pointer per member, and measurements.

A panel is placed in the room like an object (position, rotation, width in metres) and shows
one series (uploaded over HTTP, named by its SHA-256) with a shared viewer state: the plane
shown (``axial``, ``coronal``, ``sagittal``), the image index in each plane, the window
(center, width in the series' units: Hounsfield units for CT), zoom and pan. A panel may be
linked to a shared object (a model made in the series' frame of reference): a point on the
model then maps to the images through it.

Every client request carries ``req``, answered by exactly one :class:`ImageAck` or
:class:`ImageRefused`. Changes of a panel reach every member as the panel's whole state
(:class:`PanelState`), at most once per tick (the newest wins). Pointers are not requests:
each member's newest pointer goes to the room once per tick in one :class:`Pointers` message.
Measurements are in patient coordinates (DICOM LPS, millimetres) and are stored before they
are acknowledged, like annotations.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar

from .errors import ErrorCode, ProtocolError
from .messages import Message, Spec, wire_field
from .objects import MAX_OBJECT_ID, MAX_U32, SHA256_RE, Quat, Vec3, _check_custom, _number

PLANE_RE = re.compile(r"^(axial|coronal|sagittal)$")
MEASURE_KIND_RE = re.compile(r"^(distance|angle|roi)$")
UID_RE = re.compile(r"^[0-9.]{1,64}$")
PLANE_NAMES = ("axial", "coronal", "sagittal")
#: Points each measurement kind takes: (fewest, most). An ROI is a polygon in one image.
POINTS_PER_MEASURE = {"distance": (2, 2), "angle": (3, 3), "roi": (3, 64)}
#: Largest image index in any plane, window limits, zoom and pan limits.
MAX_INDEX = 65535
MAX_WINDOW_CENTER = 1e6
MAX_WINDOW_WIDTH = 1e6
MIN_ZOOM, MAX_ZOOM = 0.1, 20.0
MAX_PAN = 10.0
MIN_PANEL_WIDTH, MAX_PANEL_WIDTH = 0.05, 10.0
#: Most pointers in one ``img_pointers`` message.
MAX_POINTERS = 1024
MAX_LABEL_CHARS = 256


def _indices(name: str, v: Any) -> tuple[int, int, int]:
    if not isinstance(v, list | tuple) or len(v) != 3:
        raise ProtocolError(ErrorCode.BAD_FIELD, f"{name} must be a list of 3 integers")
    out = []
    for x in v:
        if isinstance(x, bool) or not isinstance(x, int):
            raise ProtocolError(ErrorCode.BAD_FIELD, f"{name} must hold integers")
        if not 0 <= x <= MAX_INDEX:
            raise ProtocolError(ErrorCode.OUT_OF_RANGE, f"{name} entries are 0-{MAX_INDEX}")
        out.append(x)
    return out[0], out[1], out[2]


def _window(name: str, v: Any) -> tuple[float, float]:
    if not isinstance(v, list | tuple) or len(v) != 2:
        raise ProtocolError(ErrorCode.BAD_FIELD, f"{name} must be [center, width]")
    c, w = _number(name, v[0]), _number(name, v[1])
    if abs(c) > MAX_WINDOW_CENTER or not 1.0 <= w <= MAX_WINDOW_WIDTH:
        raise ProtocolError(
            ErrorCode.OUT_OF_RANGE, f"{name}: center within ±{MAX_WINDOW_CENTER:g}, width 1-1e6"
        )
    return c, w


def _pan(name: str, v: Any) -> tuple[float, float]:
    if not isinstance(v, list | tuple) or len(v) != 2:
        raise ProtocolError(ErrorCode.BAD_FIELD, f"{name} must be [x, y]")
    x, y = _number(name, v[0]), _number(name, v[1])
    if abs(x) > MAX_PAN or abs(y) > MAX_PAN:
        raise ProtocolError(ErrorCode.OUT_OF_RANGE, f"{name} within ±{MAX_PAN:g} image widths")
    return x, y


def _pointers(name: str, v: Any) -> tuple[tuple[int, int, float, float, float], ...]:
    if not isinstance(v, list | tuple) or len(v) > MAX_POINTERS:
        raise ProtocolError(ErrorCode.BAD_FIELD, f"{name} must be a list of pointers")
    out = []
    for p in v:
        if not isinstance(p, list | tuple) or len(p) != 5:
            raise ProtocolError(ErrorCode.BAD_FIELD, f"{name} entries are [member, panel, x, y, z]")
        member, panel = p[0], p[1]
        for x in (member, panel):
            if isinstance(x, bool) or not isinstance(x, int) or not 0 <= x <= MAX_U32:
                raise ProtocolError(ErrorCode.OUT_OF_RANGE, f"{name} ids out of range")
        xyz = _check_custom(name, "vec3", Spec("vec3"), list(p[2:]))
        out.append((member, panel, *xyz))
    return tuple(out)


_KINDS = {"indices": _indices, "window": _window, "pan": _pan, "pointers": _pointers}


class ImageMessage(Message):
    """Base of the image messages: the core field kinds, the object ones (vectors,
    quaternions, point lists) and image indices, windows, pans and pointer lists."""

    __slots__ = ()

    @classmethod
    def check_field(cls, name: str, spec: Spec, value: Any) -> Any:
        check = _KINDS.get(spec.kind)
        if check is not None:
            if value is None:
                if spec.optional:
                    return None
                raise ProtocolError(ErrorCode.BAD_FIELD, f"{name} is required")
            return check(name, value)
        if spec.kind in ("vec3", "quat", "points"):
            return _check_custom(name, spec.kind, spec, value)
        return super().check_field(name, spec, value)

    @classmethod
    def refusal(cls, req: int, err: ProtocolError) -> Message:
        """Image requests are refused with ``img_refused`` (decoding errors included)."""
        return ImageRefused(req, err.code.value, err.message[:1024])


def _req() -> Any:
    return wire_field("int", lo=0, hi=MAX_U32)


def _pid(optional: bool = False) -> Any:
    return wire_field("int", lo=1, hi=MAX_OBJECT_ID, optional=optional)


def _mid(optional: bool = False) -> Any:
    return wire_field("int", lo=1, hi=MAX_U32, optional=optional)


# --------------------------------------------------------------------------- client to server


@dataclass(frozen=True, slots=True)
class OpenPanel(ImageMessage):
    """Place a new image panel showing ``series`` in the room; the ack carries its id."""

    TYPE: ClassVar[str] = "img_open"
    req: int = _req()
    series: str = wire_field("str", pattern=SHA256_RE)
    position: Vec3 = wire_field("vec3")  # noqa: RUF009
    rotation: Quat = wire_field("quat")  # noqa: RUF009
    width: float = wire_field("float", lo=MIN_PANEL_WIDTH, hi=MAX_PANEL_WIDTH)


@dataclass(frozen=True, slots=True)
class ClosePanel(ImageMessage):
    """Take a panel out of the room."""

    TYPE: ClassVar[str] = "img_close"
    req: int = _req()
    panel_id: int = _pid()


@dataclass(frozen=True, slots=True)
class SetImageView(ImageMessage):
    """Change a panel's viewer state; absent fields stay as they are. A new ``series`` shows
    its middle images with its own default window (unless ``slices``/``window`` say)."""

    TYPE: ClassVar[str] = "img_view"
    req: int = _req()
    panel_id: int = _pid()
    series: str | None = wire_field("str", pattern=SHA256_RE, optional=True)
    plane: str | None = wire_field("str", pattern=PLANE_RE, optional=True)
    slices: tuple[int, int, int] | None = wire_field("indices", optional=True)
    window: tuple[float, float] | None = wire_field("window", optional=True)
    zoom: float | None = wire_field("float", lo=MIN_ZOOM, hi=MAX_ZOOM, optional=True)
    pan: tuple[float, float] | None = wire_field("pan", optional=True)


@dataclass(frozen=True, slots=True)
class PlacePanel(ImageMessage):
    """Move a panel in the room (and resize it)."""

    TYPE: ClassVar[str] = "img_place"
    req: int = _req()
    panel_id: int = _pid()
    position: Vec3 = wire_field("vec3")  # noqa: RUF009
    rotation: Quat = wire_field("quat")  # noqa: RUF009
    width: float | None = wire_field("float", lo=MIN_PANEL_WIDTH, hi=MAX_PANEL_WIDTH, optional=True)


@dataclass(frozen=True, slots=True)
class LinkPanel(ImageMessage):
    """Link a panel to a shared object (a model) made in ``frame_of_reference``: the series'
    Frame of Reference UID (as listed, or the original one of a de-identified series). The
    model's local frame is then the series' patient frame in metres. Without ``object_id``:
    unlink."""

    TYPE: ClassVar[str] = "img_link"
    req: int = _req()
    panel_id: int = _pid()
    object_id: int | None = wire_field("int", lo=1, hi=MAX_OBJECT_ID, optional=True)
    frame_of_reference: str | None = wire_field("str", pattern=UID_RE, optional=True)


@dataclass(frozen=True, slots=True)
class Locate(ImageMessage):
    """Show the images through ``point`` on the panel's linked model (its local frame,
    metres): every plane's index moves to the point."""

    TYPE: ClassVar[str] = "img_locate"
    req: int = _req()
    panel_id: int = _pid()
    point: Vec3 = wire_field("vec3")  # noqa: RUF009


@dataclass(frozen=True, slots=True)
class Point(ImageMessage):
    """This member's pointer on a panel, at ``point`` (patient coordinates, mm); ``panel_id``
    0 hides it. Not acknowledged; the newest per member reaches the room once per tick."""

    TYPE: ClassVar[str] = "img_pointer"
    panel_id: int = wire_field("int", lo=0, hi=MAX_OBJECT_ID)
    point: Vec3 | None = wire_field("vec3", optional=True)  # noqa: RUF009


@dataclass(frozen=True, slots=True)
class Measure(ImageMessage):
    """Measure on a series, points in patient coordinates (mm): a ``distance`` (2 points), an
    ``angle`` (3 points, the vertex second) or an ``roi`` (a polygon of 3-64 points in one
    image of one plane; the server computes the mean and standard deviation of the pixels
    inside). The ack carries the measurement id."""

    TYPE: ClassVar[str] = "img_measure"
    req: int = _req()
    series: str = wire_field("str", pattern=SHA256_RE)
    kind: str = wire_field("str", pattern=MEASURE_KIND_RE)
    points: tuple[Vec3, ...] = wire_field("points")
    label: str | None = wire_field("str", max_len=MAX_LABEL_CHARS, optional=True)


@dataclass(frozen=True, slots=True)
class DeleteMeasurement(ImageMessage):
    """Delete a measurement (its author or a host)."""

    TYPE: ClassVar[str] = "img_unmeasure"
    req: int = _req()
    measurement_id: int = wire_field("int", lo=1, hi=MAX_U32)


# --------------------------------------------------------------------------- server to client


@dataclass(frozen=True, slots=True)
class ImageAck(ImageMessage):
    """Request ``req`` was applied (and, for panels opened, closed or linked and for
    measurements, stored)."""

    TYPE: ClassVar[str] = "img_ack"
    req: int = _req()
    panel_id: int | None = _pid(optional=True)
    measurement_id: int | None = wire_field("int", lo=1, hi=MAX_U32, optional=True)


@dataclass(frozen=True, slots=True)
class ImageRefused(ImageMessage):
    """Request ``req`` was refused with error ``code``."""

    TYPE: ClassVar[str] = "img_refused"
    req: int = _req()
    code: str = wire_field("str", max_len=64)
    message: str = wire_field("str", max_len=1024)


@dataclass(frozen=True, slots=True)
class PanelState(ImageMessage):
    """A panel's whole state. ``version`` increases with every change of the panel; ``by``
    names the member whose change this is."""

    TYPE: ClassVar[str] = "img_panel"
    panel_id: int = _pid()
    series: str = wire_field("str", pattern=SHA256_RE)
    position: Vec3 = wire_field("vec3")  # noqa: RUF009
    rotation: Quat = wire_field("quat")  # noqa: RUF009
    width: float = wire_field("float", lo=MIN_PANEL_WIDTH, hi=MAX_PANEL_WIDTH)
    plane: str = wire_field("str", pattern=PLANE_RE)
    slices: tuple[int, int, int] = wire_field("indices")
    window: tuple[float, float] = wire_field("window")
    zoom: float = wire_field("float", lo=MIN_ZOOM, hi=MAX_ZOOM)
    pan: tuple[float, float] = wire_field("pan")
    version: int = wire_field("int", lo=0, hi=2**53)
    object_id: int | None = wire_field("int", lo=1, hi=MAX_OBJECT_ID, optional=True)
    by: int | None = _mid(optional=True)


@dataclass(frozen=True, slots=True)
class PanelClosed(ImageMessage):
    """A panel left the room."""

    TYPE: ClassVar[str] = "img_closed"
    panel_id: int = _pid()
    by: int | None = _mid(optional=True)


@dataclass(frozen=True, slots=True)
class Pointers(ImageMessage):
    """Members' pointers changed since the last tick: ``[member, panel, x, y, z]`` each
    (panel 0: the pointer is hidden)."""

    TYPE: ClassVar[str] = "img_pointers"
    pointers: tuple[tuple[int, int, float, float, float], ...] = wire_field("pointers")


@dataclass(frozen=True, slots=True)
class MeasurementState(ImageMessage):
    """A measurement: ``value`` is the distance (mm), the angle (degrees) or the ROI's area
    (mm²); an ROI adds ``mean``, ``sd``, ``min``, ``max`` of its pixels (the series' units)
    and their count. ``seq`` orders every measurement change of the room."""

    TYPE: ClassVar[str] = "img_measurement"
    measurement_id: int = wire_field("int", lo=1, hi=MAX_U32)
    series: str = wire_field("str", pattern=SHA256_RE)
    kind: str = wire_field("str", pattern=MEASURE_KIND_RE)
    points: tuple[Vec3, ...] = wire_field("points")
    value: float = wire_field("float")
    author: str = wire_field("str", max_len=64)
    author_id: int = _mid()
    time: float = wire_field("float", lo=0)
    seq: int = wire_field("int", lo=0, hi=2**53)
    label: str | None = wire_field("str", max_len=MAX_LABEL_CHARS, optional=True)
    mean: float | None = wire_field("float", optional=True)
    sd: float | None = wire_field("float", optional=True)
    min: float | None = wire_field("float", optional=True)
    max: float | None = wire_field("float", optional=True)
    pixels: int | None = wire_field("int", lo=0, hi=2**53, optional=True)
    units: str | None = wire_field("str", max_len=16, optional=True)


@dataclass(frozen=True, slots=True)
class MeasurementDeleted(ImageMessage):
    """A measurement was deleted (``seq`` as in :class:`MeasurementState`)."""

    TYPE: ClassVar[str] = "img_measurement_deleted"
    measurement_id: int = wire_field("int", lo=1, hi=MAX_U32)
    seq: int = wire_field("int", lo=0, hi=2**53)


@dataclass(frozen=True, slots=True)
class ImagesSynced(ImageMessage):
    """The end of the panels and measurements sent after a (re)join or un-pause."""

    TYPE: ClassVar[str] = "img_synced"
    panels: int = wire_field("int", lo=0, hi=MAX_U32)
    measurements: int = wire_field("int", lo=0, hi=MAX_U32)


@dataclass(frozen=True, slots=True)
class SeriesListing:
    """A series as its room lists it over HTTP (``GET /rooms/{room}/series``, and the answer to
    an upload): the JSON document the server writes and the SDK reads."""

    sha256: str
    name: str
    size: int
    uploader: str
    uploaded_at: float  # Unix time
    series_uid: str
    study_uid: str
    frame_of_reference: str
    instances: int
    deidentified: bool
    transfer_syntaxes: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "sha256": self.sha256,
            "name": self.name,
            "size": self.size,
            "uploader": self.uploader,
            "uploaded_at": self.uploaded_at,
            "series_uid": self.series_uid,
            "study_uid": self.study_uid,
            "frame_of_reference": self.frame_of_reference,
            "instances": self.instances,
            "deidentified": self.deidentified,
            "transfer_syntaxes": list(self.transfer_syntaxes),
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> SeriesListing:
        return cls(
            d["sha256"],
            d["name"],
            int(d["size"]),
            d["uploader"],
            float(d["uploaded_at"]),
            d["series_uid"],
            d["study_uid"],
            d["frame_of_reference"],
            int(d["instances"]),
            bool(d["deidentified"]),
            tuple(d.get("transfer_syntaxes", ())),
        )


CLIENT_IMAGES: tuple[type[Message], ...] = (
    OpenPanel,
    ClosePanel,
    SetImageView,
    PlacePanel,
    LinkPanel,
    Locate,
    Point,
    Measure,
    DeleteMeasurement,
)
SERVER_IMAGES: tuple[type[Message], ...] = (
    ImageAck,
    ImageRefused,
    PanelState,
    PanelClosed,
    Pointers,
    MeasurementState,
    MeasurementDeleted,
    ImagesSynced,
)

__all__ = [
    "CLIENT_IMAGES",
    "PLANE_NAMES",
    "POINTS_PER_MEASURE",
    "SERVER_IMAGES",
    "ClosePanel",
    "DeleteMeasurement",
    "ImageAck",
    "ImageMessage",
    "ImageRefused",
    "ImagesSynced",
    "LinkPanel",
    "Locate",
    "Measure",
    "MeasurementDeleted",
    "MeasurementState",
    "OpenPanel",
    "PanelClosed",
    "PanelState",
    "PlacePanel",
    "Point",
    "Pointers",
    "SeriesListing",
    "SetImageView",
]
