"""Shared image viewers, as a room plugin: panels showing image series with a synced viewer
state, members' pointers, and measurements computed from the pixels.

A room's requests run one at a time in arrival order (a queue and one task per room), so a
request that must open a series file or compute an ROI in a thread never overtakes an earlier
one. Panel changes are applied and acknowledged at once and reach every member as the panel's
whole state with the next tick (the newest wins: a member scrolling at 60 Hz costs the room
one message per tick); panel states are stored every ``object_flush_interval`` seconds, and
opening, closing and linking panels is stored before the acknowledgement. Measurements are
stored before they are acknowledged or shown, like annotations.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from medverse.protocol.errors import ErrorCode, ProtocolError
from medverse.protocol.images import (
    CLIENT_IMAGES,
    PLANE_NAMES,
    POINTS_PER_MEASURE,
    SERVER_IMAGES,
    ClosePanel,
    DeleteMeasurement,
    ImageAck,
    ImageRefused,
    ImagesSynced,
    LinkPanel,
    Locate,
    Measure,
    MeasurementDeleted,
    MeasurementState,
    OpenPanel,
    PanelClosed,
    PanelState,
    PlacePanel,
    Point,
    Pointers,
    SetImageView,
)
from medverse.protocol.messages import Message

from .dicom import Geometry, uid_mapper
from .imaging import ImageStore, SeriesListing, Volume, plane_image
from .objects import RoomObjects, why_not_allowed
from .plugins import MemberView, RoomContext, RoomPlugin, ServerContext, ServerPlugin

log = logging.getLogger("medverse.viewer")

#: Panels one room may hold.
MAX_PANELS = 16
#: Requests a room keeps waiting for its turn (more are refused with rate_limited).
MAX_QUEUED = 256
#: Seconds a room trusts its last read of a series' listing (see ``RoomImages._listing``).
LISTING_TTL = 1.0
#: The grant each request needs (the others: ``manipulate_objects``, like an object's view).
GRANTS: dict[type[Message], str] = {Measure: "annotate", DeleteMeasurement: "annotate"}


@dataclass
class Panel:
    """An image panel of an open room."""

    panel_id: int
    series: str
    position: tuple[float, float, float]
    rotation: tuple[float, float, float, float]
    width: float
    plane: str
    slices: tuple[int, int, int]
    window: tuple[float, float]
    zoom: float = 1.0
    pan: tuple[float, float] = (0.0, 0.0)
    version: int = 0
    object_id: int | None = None
    by: int | None = None

    def msg(self) -> PanelState:
        return PanelState(
            self.panel_id,
            self.series,
            self.position,
            self.rotation,
            self.width,
            self.plane,
            self.slices,
            self.window,
            self.zoom,
            self.pan,
            self.version,
            self.object_id,
            self.by,
        )

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Panel:
        return cls(
            int(d["panel_id"]),
            d["series"],
            tuple(d["position"]),  # type: ignore[arg-type]
            tuple(d["rotation"]),  # type: ignore[arg-type]
            float(d["width"]),
            d["plane"],
            tuple(d["slices"]),  # type: ignore[arg-type]
            tuple(d["window"]),  # type: ignore[arg-type]
            float(d["zoom"]),
            tuple(d["pan"]),  # type: ignore[arg-type]
            int(d["version"]),
            d.get("object_id"),
            d.get("by"),
        )


@dataclass
class Measurement:
    measurement_id: int
    series: str
    kind: str
    points: tuple[tuple[float, float, float], ...]
    value: float
    author: str
    author_subject: str
    author_id: int
    time: float
    seq: int
    label: str | None = None
    stats: dict[str, Any] = field(default_factory=dict)  # mean, sd, min, max, pixels, units

    def msg(self) -> MeasurementState:
        s = self.stats
        return MeasurementState(
            self.measurement_id,
            self.series,
            self.kind,
            self.points,
            self.value,
            self.author,
            self.author_id,
            self.time,
            self.seq,
            self.label,
            s.get("mean"),
            s.get("sd"),
            s.get("min"),
            s.get("max"),
            s.get("pixels"),
            s.get("units"),
        )

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Measurement:
        return cls(
            int(d["measurement_id"]),
            d["series"],
            d["kind"],
            tuple(tuple(p) for p in d["points"]),  # type: ignore[misc]
            float(d["value"]),
            d["author"],
            d["author_subject"],
            int(d["author_id"]),
            float(d["time"]),
            int(d["seq"]),
            d.get("label"),
            dict(d.get("stats") or {}),
        )


class Refusal(ProtocolError):
    pass


# --------------------------------------------------------------------------- measuring


def _inside(geometry: Geometry, ijk: np.ndarray) -> bool:
    dims = np.array([geometry.cols, geometry.rows, geometry.slices], float)
    return bool(((ijk >= -0.5) & (ijk <= dims - 0.5)).all())


def measure(
    volume: Volume, kind: str, points: tuple[tuple[float, float, float], ...]
) -> tuple[float, dict[str, Any]]:
    """A measurement's value (distance mm, angle degrees, ROI area mm²) and, for an ROI, the
    statistics of the pixels whose centres lie inside the polygon (vectorised over the
    polygon's bounding box; blocking for large ROIs: run in a thread). Raises Refusal."""
    lo, hi = POINTS_PER_MEASURE[kind]
    if not lo <= len(points) <= hi:
        raise Refusal(ErrorCode.OUT_OF_RANGE, f"a {kind} takes {lo}-{hi} points")
    g = volume.geometry
    pts = np.asarray(points, float)
    ijk = np.array([g.to_voxel(p) for p in pts])
    if not all(_inside(g, v) for v in ijk):
        raise Refusal(ErrorCode.OUT_OF_RANGE, "a point lies outside the series' volume")
    if kind == "distance":
        d = float(np.linalg.norm(pts[1] - pts[0]))
        if d == 0.0:
            raise Refusal(ErrorCode.OUT_OF_RANGE, "a distance needs two distinct points")
        return d, {}
    if kind == "angle":
        a, b = pts[0] - pts[1], pts[2] - pts[1]
        na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
        if na == 0.0 or nb == 0.0:
            raise Refusal(ErrorCode.OUT_OF_RANGE, "an angle's arms need length")
        cos = float(np.clip(np.dot(a, b) / (na * nb), -1.0, 1.0))
        return math.degrees(math.acos(cos)), {}
    # An ROI: which plane's image holds every point (the same index, within half a voxel)?
    flat = [
        (a, p)
        for a, p in ((2, "axial"), (1, "coronal"), (0, "sagittal"))
        if np.ptp(ijk[:, a]) < 0.5
    ]
    if not flat:
        raise Refusal(ErrorCode.OUT_OF_RANGE, "an ROI lies in one image of one plane")
    axis, plane = flat[0]
    index = round(float(ijk[:, axis].mean()))
    # Polygon in the image's (column, row) pixel coordinates.
    if plane == "axial":
        u, v = ijk[:, 0], ijk[:, 1]
        img = volume.data[index]
        du, dv = g.pixel_spacing[1], g.pixel_spacing[0]
    elif plane == "coronal":
        u, v = ijk[:, 0], (g.slices - 1) - ijk[:, 2]
        img = plane_image(volume.data, plane, index)
        du, dv = g.pixel_spacing[1], g.slice_spacing
    else:
        u, v = ijk[:, 1], (g.slices - 1) - ijk[:, 2]
        img = plane_image(volume.data, plane, index)
        du, dv = g.pixel_spacing[0], g.slice_spacing
    h, w = img.shape
    c0, c1 = max(0, math.floor(u.min())), min(w - 1, math.ceil(u.max()))
    r0, r1 = max(0, math.floor(v.min())), min(h - 1, math.ceil(v.max()))
    cols = np.arange(c0, c1 + 1, dtype=np.float64)[None, :]
    rows = np.arange(r0, r1 + 1, dtype=np.float64)[:, None]
    inside = np.zeros((r1 - r0 + 1, c1 - c0 + 1), np.bool_)
    n = len(u)
    for e in range(n):  # even-odd rule, one vectorised pass per polygon edge (<= 64)
        x0, y0, x1, y1 = u[e], v[e], u[(e + 1) % n], v[(e + 1) % n]
        if y0 == y1:
            continue
        crosses = (rows >= min(y0, y1)) & (rows < max(y0, y1))
        xs = x0 + (rows - y0) * (x1 - x0) / (y1 - y0)
        inside ^= crosses & (cols < xs)
    values = np.asarray(img[r0 : r1 + 1, c0 : c1 + 1], np.float64)[inside]
    if values.size == 0:
        raise Refusal(ErrorCode.OUT_OF_RANGE, "the ROI holds no pixel centre")
    stats = {
        "mean": float(values.mean()),
        "sd": float(values.std(ddof=1)) if values.size > 1 else 0.0,
        "min": float(values.min()),
        "max": float(values.max()),
        "pixels": int(values.size),
        "units": volume.units,
    }
    return float(values.size * du * dv), stats


# --------------------------------------------------------------------------- the room plugin


class RoomImages(RoomPlugin):
    """The image panels, pointers and measurements of one open room."""

    name = "images"
    messages = CLIENT_IMAGES
    server_messages = SERVER_IMAGES

    def __init__(self, ctx: RoomContext, service: SharedImages) -> None:
        super().__init__(ctx)
        self.service = service
        self.panels: dict[int, Panel] = {}
        self.measurements: dict[int, Measurement] = {}
        self.next_panel = 1
        self.next_measurement = 1
        self.seq = 0
        self.loaded = False
        self._queue: asyncio.Queue[tuple[MemberView, Message]] = asyncio.Queue(MAX_QUEUED)
        self._changed: dict[int, Panel] = {}  # panels changed since the last tick
        self.dirty = False  # panel states changed since the last store
        self._pointers: dict[int, tuple[int, int, float, float, float]] = {}
        self._visible: dict[int, int] = {}  # member id -> the panel its pointer is on
        #: Series this room lists, as last read (see :meth:`_listing`).
        self._listed: dict[str, tuple[SeriesListing, float]] = {}
        self._handlers: dict[type[Message], Callable[[MemberView, Any], Any]] = {
            OpenPanel: self._open,
            ClosePanel: self._close,
            SetImageView: self._view,
            PlacePanel: self._place,
            LinkPanel: self._link,
            Locate: self._locate,
            Measure: self._measure,
            DeleteMeasurement: self._unmeasure,
        }

    # ----------------------------------------------------------------- lifecycle

    def on_create(self) -> None:
        self.service.rooms[self.ctx.name] = self
        self.ctx.spawn(self._run())

    def on_persist(self) -> Coroutine[Any, Any, None] | None:
        # Panels are stored at intervals: store them now and wait for the writer (in order).
        self.service.flush_room(self)
        return self.service.run(lambda: None)

    def on_close(self) -> None:
        self.service.flush_room(self)
        if self.service.rooms.get(self.ctx.name) is self:
            del self.service.rooms[self.ctx.name]

    async def _run(self) -> None:
        """Load the room's viewer state, then run its requests one at a time."""
        store = self.service.store
        try:
            panels, measurements, np_, nm, seq = await self.service.run(
                store.load_viewer, self.ctx.name
            )
        except Exception:
            # Nothing can be answered without the room's state: refuse every request (new
            # ids would overwrite what is stored) until the room is opened again.
            log.exception("loading the image viewers of room %s failed", self.ctx.name)
            while True:
                member, msg = await self._queue.get()
                self._refuse(
                    member,
                    msg,
                    ProtocolError(ErrorCode.INTERNAL, "the room's images are not loaded"),
                )
        self.panels = {p["panel_id"]: Panel.from_json(p) for p in panels}
        self.measurements = {m["measurement_id"]: Measurement.from_json(m) for m in measurements}
        self.next_panel, self.next_measurement, self.seq = np_, nm, seq
        self.loaded = True
        for member in list(self.ctx.members.values()):
            self._send_all(member)
        while True:
            member, msg = await self._queue.get()
            if self.ctx.members.get(member.id) is not member:
                continue  # left meanwhile
            try:
                self._allowed(member, GRANTS.get(type(msg), "manipulate_objects"))
                await self._handlers[type(msg)](member, msg)
            except ProtocolError as err:
                self._refuse(member, msg, err)
            except Exception:
                log.exception("image request %s failed", msg.TYPE)
                self._refuse(member, msg, ProtocolError(ErrorCode.INTERNAL, "request failed"))

    # ----------------------------------------------------------------- members

    def on_join(self, member: MemberView) -> None:
        self._send_all(member)

    def on_resume(self, member: MemberView) -> None:
        self._send_all(member)

    def on_pause(self, member: MemberView, paused: bool) -> None:
        if paused:
            self._hide_pointer(member)
        else:
            self._send_all(member)

    def on_disconnect(self, member: MemberView) -> None:
        self._hide_pointer(member)

    def on_leave(self, member: MemberView, reason: str) -> None:
        self._hide_pointer(member)

    def _hide_pointer(self, member: MemberView) -> None:
        """Hide the member's pointer if it shows one (nobody hears of members who never
        pointed)."""
        if self._visible.pop(member.id, None) is not None:
            self._pointers[member.id] = (member.id, 0, 0.0, 0.0, 0.0)

    def _send_all(self, member: MemberView) -> None:
        if not member.connected or member.paused or not self.loaded:
            return
        for panel in self.panels.values():
            self.ctx.send(member, panel.msg())
        for m in self.measurements.values():
            self.ctx.send(member, m.msg())
        self.ctx.send(member, ImagesSynced(len(self.panels), len(self.measurements)))

    # ----------------------------------------------------------------- plumbing

    def on_message(self, member: MemberView, msg: Message) -> None:
        if isinstance(msg, Point):
            self._point(member, msg)  # cheap, never queued: latest wins per tick
            return
        try:
            self._queue.put_nowait((member, msg))
        except asyncio.QueueFull:
            self._refuse(
                member, msg, ProtocolError(ErrorCode.RATE_LIMITED, "too many image requests")
            )

    def on_tick(self, tick: int) -> None:
        """Send the panels changed since the last tick and the pointers moved, once each."""
        if self._changed:
            changed, self._changed = list(self._changed.values()), {}
            for panel in changed:
                if panel.panel_id in self.panels:
                    self.ctx.broadcast(panel.msg())
        if self._pointers:
            moved, self._pointers = tuple(self._pointers.values()), {}
            self.ctx.broadcast(Pointers(moved))

    def _refuse(self, member: MemberView, msg: Message, err: ProtocolError) -> None:
        self.service.count_error(err.code.value)
        req = getattr(msg, "req", None)
        if req is None:
            self.ctx.error(member, err)
        else:
            self.ctx.send(member, ImageRefused(req, err.code.value, err.message[:1024]))

    @staticmethod
    def _allowed(member: MemberView, grant: str = "manipulate_objects") -> None:
        reason = why_not_allowed(member, grant)
        if reason is not None:
            raise Refusal(ErrorCode.FORBIDDEN, reason)

    def _panel(self, panel_id: int) -> Panel:
        panel = self.panels.get(panel_id)
        if panel is None:
            raise Refusal(ErrorCode.NOT_FOUND, f"no panel {panel_id}")
        return panel

    async def _listing(self, sha256: str) -> SeriesListing:
        """The series as the room lists it (``not_found`` if it does not). Read in a thread
        (a database round trip in a cluster), and trusted for :data:`LISTING_TTL` seconds,
        so a member scrolling at 60 Hz costs the database one read a second, not sixty (a
        series removed meanwhile is refused within that time)."""
        now = time.monotonic()
        known = self._listed.get(sha256)
        if known is not None and now - known[1] < LISTING_TTL:
            return known[0]
        listing = await asyncio.to_thread(self.service.store.listing, self.ctx.name, sha256)
        if listing is None:
            self._listed.pop(sha256, None)
            raise Refusal(ErrorCode.NOT_FOUND, "no such series in this room")
        self._listed[sha256] = (listing, now)
        return listing

    async def _volume(self, sha256: str) -> Volume:
        await self._listing(sha256)
        vol = self.service.store.cached_volume(sha256)
        if vol is None:
            vol = await asyncio.to_thread(self.service.store.volume, sha256)
        return vol

    def _changed_panel(self, panel: Panel, member: MemberView) -> None:
        panel.version += 1
        panel.by = member.id
        self._changed[panel.panel_id] = panel
        self.dirty = True

    async def _commit(self, fn: Callable[..., None], *args: Any) -> None:
        try:
            await self.service.run(fn, self.ctx.name, *args)
        except Exception:
            log.exception("storing image viewer state failed")
            raise Refusal(ErrorCode.INTERNAL, "storage failed") from None

    def _counters(self) -> tuple[int, int, int]:
        return self.next_panel, self.next_measurement, self.seq

    # ----------------------------------------------------------------- panels

    async def _open(self, member: MemberView, msg: OpenPanel) -> None:
        if len(self.panels) >= MAX_PANELS:
            raise Refusal(ErrorCode.LIMIT_REACHED, f"a room holds at most {MAX_PANELS} panels")
        vol = await self._volume(msg.series)
        g = vol.geometry
        panel = Panel(
            self.next_panel,
            msg.series,
            msg.position,
            msg.rotation,
            msg.width,
            "axial",
            (g.slices // 2, g.rows // 2, g.cols // 2),
            vol.window,
            by=member.id,
        )
        self.next_panel += 1
        await self._commit(self.service.store.put_panels, [panel.to_json()], *self._counters())
        self.panels[panel.panel_id] = panel
        self.ctx.audit(
            "image_panel_opened",
            actor=member.identity.subject,
            subject=f"panel:{panel.panel_id}",
            series=msg.series,
        )
        self.ctx.broadcast(panel.msg())
        self.ctx.send(member, ImageAck(msg.req, panel.panel_id))

    async def _close(self, member: MemberView, msg: ClosePanel) -> None:
        panel = self._panel(msg.panel_id)
        await self._commit(self.service.store.delete_panel, panel.panel_id, *self._counters())
        self.panels.pop(panel.panel_id, None)
        self._changed.pop(panel.panel_id, None)
        for mid in [m for m, p in self._visible.items() if p == panel.panel_id]:
            del self._visible[mid]  # pointers on the panel go with it
            self._pointers[mid] = (mid, 0, 0.0, 0.0, 0.0)
        self.ctx.audit(
            "image_panel_closed", actor=member.identity.subject, subject=f"panel:{panel.panel_id}"
        )
        self.ctx.broadcast(PanelClosed(panel.panel_id, member.id))
        self.ctx.send(member, ImageAck(msg.req, panel.panel_id))

    async def _view(self, member: MemberView, msg: SetImageView) -> None:
        panel = self._panel(msg.panel_id)
        series = msg.series or panel.series
        vol = await self._volume(series)
        g = vol.geometry
        slices = msg.slices
        window = msg.window
        if series != panel.series:
            slices = slices or (g.slices // 2, g.rows // 2, g.cols // 2)
            window = window or vol.window
        if slices is not None:
            limits = (g.slices, g.rows, g.cols)
            for name, s, n in zip(PLANE_NAMES, slices, limits, strict=True):
                if not 0 <= s < n:
                    raise Refusal(ErrorCode.OUT_OF_RANGE, f"{name} images are 0-{n - 1}")
        if panel not in self.panels.values():
            raise Refusal(ErrorCode.NOT_FOUND, f"no panel {msg.panel_id}")  # closed meanwhile
        panel.series = series
        if msg.plane is not None:
            panel.plane = msg.plane
        if slices is not None:
            panel.slices = slices
        if window is not None:
            panel.window = window
        if msg.zoom is not None:
            panel.zoom = msg.zoom
        if msg.pan is not None:
            panel.pan = msg.pan
        self._changed_panel(panel, member)
        self.ctx.send(member, ImageAck(msg.req, panel.panel_id))

    async def _place(self, member: MemberView, msg: PlacePanel) -> None:
        panel = self._panel(msg.panel_id)
        panel.position, panel.rotation = msg.position, msg.rotation
        if msg.width is not None:
            panel.width = msg.width
        self._changed_panel(panel, member)
        self.ctx.send(member, ImageAck(msg.req, panel.panel_id))

    async def _link(self, member: MemberView, msg: LinkPanel) -> None:
        panel = self._panel(msg.panel_id)
        if msg.object_id is not None:
            objects = self.ctx.plugin(RoomObjects)
            if objects is None:
                raise Refusal(ErrorCode.NOT_FOUND, "this room has no shared objects")
            objects.transform(msg.object_id)  # not_found if there is no such object
            listing = await self._listing(panel.series)
            claimed = msg.frame_of_reference
            if not listing.frame_of_reference:
                raise Refusal(ErrorCode.OUT_OF_RANGE, "the series has no frame of reference")
            if claimed is None:
                raise Refusal(ErrorCode.BAD_FIELD, "frame_of_reference is required to link")
            remap = uid_mapper(self.service.store.uid_key_for(self.ctx.name))
            if claimed != listing.frame_of_reference and not (
                listing.deidentified and remap(claimed) == listing.frame_of_reference
            ):
                raise Refusal(
                    ErrorCode.OUT_OF_RANGE,
                    "the model's frame of reference is not the series': a point on it would "
                    "not map to the images",
                )
        panel.object_id = msg.object_id
        panel.version += 1
        panel.by = member.id
        await self._commit(self.service.store.put_panels, [panel.to_json()], *self._counters())
        self.ctx.audit(
            "image_panel_linked",
            actor=member.identity.subject,
            subject=f"panel:{panel.panel_id}",
            object=msg.object_id,
        )
        self._changed[panel.panel_id] = panel
        self.ctx.send(member, ImageAck(msg.req, panel.panel_id))

    async def _locate(self, member: MemberView, msg: Locate) -> None:
        panel = self._panel(msg.panel_id)
        if panel.object_id is None:
            raise Refusal(ErrorCode.NOT_FOUND, "the panel is not linked to a model")
        objects = self.ctx.plugin(RoomObjects)
        if objects is None:
            raise Refusal(ErrorCode.NOT_FOUND, "this room has no shared objects")
        objects.transform(panel.object_id)  # the model is still there
        vol = await self._volume(panel.series)
        g = vol.geometry
        # The model's local frame is the series' patient frame in metres.
        ijk = g.to_voxel(np.asarray(msg.point, float) * 1000.0)
        if not _inside(g, ijk):
            raise Refusal(ErrorCode.OUT_OF_RANGE, "the point is outside the series' volume")
        i, j, k = (
            int(np.clip(round(float(v)), 0, n - 1))
            for v, n in zip(ijk, (g.cols, g.rows, g.slices), strict=True)
        )
        panel.slices = (k, j, i)
        self._changed_panel(panel, member)
        self.ctx.send(member, ImageAck(msg.req, panel.panel_id))

    # ----------------------------------------------------------------- pointers

    def _point(self, member: MemberView, msg: Point) -> None:
        # Pointing needs no grant (it is presence, like an avatar's hand), only a member
        # who is visible and present.
        if member.hidden or member.paused:
            raise ProtocolError(ErrorCode.FORBIDDEN, "observers and paused members do not point")
        if msg.panel_id == 0:
            self._hide_pointer(member)
            return
        if msg.panel_id not in self.panels:
            raise ProtocolError(ErrorCode.NOT_FOUND, f"no panel {msg.panel_id}")
        if msg.point is None:
            raise ProtocolError(ErrorCode.BAD_FIELD, "point is required on a panel")
        self._pointers[member.id] = (member.id, msg.panel_id, *msg.point)
        self._visible[member.id] = msg.panel_id

    # ----------------------------------------------------------------- measurements

    async def _measure(self, member: MemberView, msg: Measure) -> None:
        vol = await self._volume(msg.series)
        count = sum(1 for m in self.measurements.values() if m.series == msg.series)
        if count >= self.ctx.config.max_annotations_per_object:
            raise Refusal(ErrorCode.LIMIT_REACHED, "the series carries its maximum of measurements")
        # Measured from the stored pixels only while the file is what its hash says (a stat;
        # hashed again only if it changed), in a thread unless the images are small.
        if vol.data.shape[1] * vol.data.shape[2] > 128 * 128:
            value, stats = await asyncio.to_thread(self._measure_checked, vol, msg)
        else:
            value, stats = self._measure_checked(vol, msg)
        self.seq += 1
        m = Measurement(
            self.next_measurement,
            msg.series,
            msg.kind,
            msg.points,
            value,
            member.name,
            member.identity.subject,
            member.id,
            time.time(),
            self.seq,
            msg.label,
            stats,
        )
        self.next_measurement += 1
        await self._commit(self.service.store.put_measurement, m.to_json(), *self._counters())
        self.measurements[m.measurement_id] = m
        self.ctx.audit(
            "image_measured",
            actor=member.identity.subject,
            subject=f"measurement:{m.measurement_id}",
            series=msg.series,
            measure=msg.kind,
        )
        self.ctx.broadcast(m.msg())
        self.ctx.send(member, ImageAck(msg.req, None, m.measurement_id))

    def _measure_checked(self, vol: Volume, msg: Measure) -> tuple[float, dict[str, Any]]:
        problem = self.service.store.check(vol.sha256)
        if problem is not None:
            self.service.store.forget(vol.sha256)
            raise Refusal(ErrorCode.CORRUPT, f"the stored series is damaged: {problem}")
        return measure(vol, msg.kind, msg.points)

    async def _unmeasure(self, member: MemberView, msg: DeleteMeasurement) -> None:
        m = self.measurements.get(msg.measurement_id)
        if m is None:
            raise Refusal(ErrorCode.NOT_FOUND, f"no measurement {msg.measurement_id}")
        if m.author_subject != member.identity.subject and not member.can("moderate"):
            raise Refusal(ErrorCode.FORBIDDEN, "only its author or a host may delete it")
        self.seq += 1
        await self._commit(
            self.service.store.delete_measurement, m.measurement_id, *self._counters()
        )
        del self.measurements[m.measurement_id]
        self.ctx.audit(
            "image_measurement_deleted",
            actor=member.identity.subject,
            subject=f"measurement:{m.measurement_id}",
        )
        self.ctx.broadcast(MeasurementDeleted(m.measurement_id, self.seq))
        self.ctx.send(member, ImageAck(msg.req, None, m.measurement_id))


class SharedImages(ServerPlugin):
    """The image viewer plugin: one storage writer for every room, a :class:`RoomImages` per
    room, and the periodic store of changed panel states."""

    room_plugin = RoomImages

    def __init__(self) -> None:
        self._store: ImageStore | None = None
        self._writer: ThreadPoolExecutor | None = None
        self._timer: asyncio.TimerHandle | None = None
        self.rooms: dict[str, RoomImages] = {}
        self.flush_interval = 0.5
        self.count_error: Callable[[str], None] = lambda code: None

    def create(self, ctx: RoomContext) -> RoomPlugin:
        return RoomImages(ctx, self)

    @property
    def store(self) -> ImageStore:
        assert self._store is not None, "the plugin is not started"
        return self._store

    async def start(self, server: ServerContext) -> None:
        self._store = server.images
        self.count_error = server.count_error
        self.flush_interval = server.config.object_flush_interval
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="medverse-images")
        self._tick()

    async def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for room in list(self.rooms.values()):
            self.flush_room(room)
        if self._writer is not None:
            writer, self._writer = self._writer, None
            await asyncio.get_running_loop().run_in_executor(None, writer.shutdown, True)

    def _tick(self) -> None:
        for room in list(self.rooms.values()):
            self.flush_room(room)
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self.flush_interval, self._tick)

    def flush_room(self, room: RoomImages) -> None:
        """Queue the room's panel states for storing if they changed."""
        if not room.dirty or self._writer is None or not room.loaded:
            return
        room.dirty = False
        rows = [p.to_json() for p in room.panels.values()]
        store = self.store
        counters = (room.next_panel, room.next_measurement, room.seq)

        def write() -> None:
            try:
                store.put_panels(room.ctx.name, rows, *counters)
            except Exception:
                log.exception("storing %d panel states failed", len(rows))

        with contextlib.suppress(RuntimeError):  # the writer is shutting down
            self._writer.submit(write)

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run a store call on the writer thread (in call order)."""
        assert self._writer is not None
        return await asyncio.get_running_loop().run_in_executor(self._writer, fn, *args)


__all__ = ["Panel", "RoomImages", "SharedImages", "measure"]
