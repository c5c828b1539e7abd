"""Medical image series in the SDK: uploading over HTTP, descriptors and rendered slices, and
the room's shared image viewers (``session.panels``) with their calls and events.

HTTP (with the session's token; also usable on its own as :class:`ImageClient`)::

    listing = await session.upload_series("ct.zip", deidentify=True)
    series = await session.series(listing.sha256)          # geometry and planes
    png = await session.fetch_slice(listing.sha256, "axial", 40, window=(40, 400))

Viewers (each call awaits the server's answer and raises :class:`ImageViewError` if refused)::

    panel = await session.open_panel(listing.sha256, position=(0, 1.5, -1))
    await session.set_image_view(panel, slices=(41, 256, 256), window=(40, 400))
    mid = await session.measure(listing.sha256, "distance", [p0, p1])

``session.panels`` maps panel ids to :class:`ImagePanel`; ``session.panels.measurements`` and
``session.panels.pointers`` hold the rest. Events (in ``session.events()``):
:class:`PanelChanged`, :class:`PointerMoved`, :class:`MeasurementChanged`.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from medverse.protocol.images import (
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
    SeriesListing,
    SetImageView,
)
from medverse.protocol.messages import Message, Welcome

from .assets import AssetClient
from .feature import PendingRequests, SessionLink
from .objects import _vec
from .types import Quat, RefusedError, Vec3


class ImageError(Exception):
    """The server refused an image request over HTTP; ``code`` is the typed error code and
    ``attributes`` the identifying attribute keywords for ``identifiable_data``."""

    def __init__(
        self, code: str, message: str, status: int, attributes: Sequence[str] = ()
    ) -> None:
        super().__init__(f"{code}: {message} (HTTP {status})")
        self.code = code
        self.message = message
        self.status = status
        self.attributes = tuple(attributes)


class ImageViewError(RefusedError):
    """The server refused a viewer request (``code``: ``not_found``, ``out_of_range``,
    ``forbidden``, ``limit_reached``, ...)."""


def zip_files(files: Mapping[str, bytes]) -> bytes:
    """A zip (stored, not compressed: DICOM pixel data rarely shrinks) of ``{name: bytes}``."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buf.getvalue()


class ImageClient(AssetClient):
    """HTTP calls for one room's image series (an async context manager, like
    :class:`AssetClient`)."""

    def _series_url(self, sha256: str | None = None, suffix: str = "") -> str:
        u = f"{self.base}/rooms/{self.room}/series"
        return u + (f"/{sha256}" if sha256 else "") + suffix

    @staticmethod
    async def _raise_image(resp: aiohttp.ClientResponse) -> None:
        if resp.status < 400:
            return
        try:
            err = (await resp.json(content_type=None))["error"]
            code, message, attrs = str(err["code"]), str(err["message"]), err.get("attributes", [])
        except (ValueError, KeyError, TypeError, aiohttp.ContentTypeError):
            raise ImageError("http_error", await resp.text(), resp.status) from None
        raise ImageError(code, message, resp.status, attrs)

    async def upload(  # type: ignore[override]
        self,
        source: str | os.PathLike[str] | bytes | Mapping[str, bytes],
        name: str | None = None,
        *,
        deidentify: bool = False,
        multipart: bool = False,
    ) -> SeriesListing:
        """Upload a series: a zip (path or bytes), a folder of ``.dcm`` files, one DICOM file,
        or ``{file name: bytes}``; ``deidentify`` asks the server to de-identify it (needed in
        rooms that refuse identifiable images). ``multipart`` sends the files as parts instead
        of one zip."""
        files: dict[str, bytes] | None = None
        body: bytes | None = None
        if isinstance(source, Mapping):
            files = dict(source)
        elif isinstance(source, bytes):
            body = source
        else:
            path = Path(source)
            if path.is_dir():
                files = {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.is_file()}
            else:
                body = path.read_bytes()
                name = name or path.stem
        params = {"name": name or "series"}
        if deidentify:
            params["deidentify"] = "1"
        http = self._session()
        if files is not None and multipart:
            form = aiohttp.FormData()
            for fname, blob in files.items():
                form.add_field("file", blob, filename=fname, content_type="application/dicom")
            data: Any = form
            headers = self._headers()
        else:
            data = zip_files(files) if files is not None else body
            headers = self._headers({"Content-Type": "application/zip"})
        async with http.post(
            self._series_url(), data=data, headers=headers, params=params, ssl=self._ssl
        ) as resp:
            await self._raise_image(resp)
            return SeriesListing.from_json(await resp.json())

    async def list_series(self) -> list[SeriesListing]:
        async with self._session().get(
            self._series_url(), headers=self._headers(), ssl=self._ssl
        ) as r:
            await self._raise_image(r)
            return [SeriesListing.from_json(s) for s in (await r.json())["series"]]

    async def descriptor(self, sha256: str) -> dict[str, Any]:
        """The series descriptor: the listing plus ``geometry``, ``planes`` (for each plane:
        count, rows, cols, origin, row/col/slice steps in mm), ``window``, ``units``."""
        async with self._session().get(
            self._series_url(sha256), headers=self._headers(), ssl=self._ssl
        ) as r:
            await self._raise_image(r)
            out: dict[str, Any] = await r.json()
            return out

    async def fetch_slice(
        self,
        sha256: str,
        plane: str,
        index: int,
        window: tuple[float, float] | None = None,
        *,
        etag: str | None = None,
    ) -> tuple[bytes | None, str]:
        """One rendered image (PNG bytes) and its ETag; with ``etag`` (one fetched before)
        the answer may be ``(None, etag)``: not modified, keep your copy."""
        headers = self._headers()
        if etag:
            headers["If-None-Match"] = etag
        params = {"window": f"{window[0]:g},{window[1]:g}"} if window else {}
        async with self._session().get(
            self._series_url(sha256, f"/{plane}/{index}.png"),
            headers=headers,
            params=params,
            ssl=self._ssl,
        ) as r:
            tag = r.headers.get("ETag", "")
            if r.status == 304:
                return None, tag
            await self._raise_image(r)
            return await r.read(), tag

    async def remove_series(self, sha256: str) -> None:
        async with self._session().delete(
            self._series_url(sha256), headers=self._headers(), ssl=self._ssl
        ) as r:
            await self._raise_image(r)


# --------------------------------------------------------------------------- viewer state


@dataclass(eq=False)
class ImagePanel:
    """An image panel as this member sees it (the newest state the server sent)."""

    id: int
    series: str
    position: Vec3
    rotation: Quat
    width: float
    plane: str
    slices: tuple[int, int, int]  # axial, coronal, sagittal image index
    window: tuple[float, float]  # center, width
    zoom: float
    pan: tuple[float, float]
    version: int
    object_id: int | None
    by: int | None


@dataclass(frozen=True, slots=True)
class ImageMeasurement:
    """A measurement in patient coordinates (mm): ``value`` is mm, degrees or mm² (ROI
    area); an ROI has ``mean``/``sd``/``min``/``max`` of its pixels in ``units``."""

    id: int
    series: str
    kind: str
    points: tuple[Vec3, ...]
    value: float
    author: str
    author_id: int
    time: float
    seq: int
    label: str | None
    mean: float | None = None
    sd: float | None = None
    min: float | None = None
    max: float | None = None
    pixels: int | None = None
    units: str | None = None


@dataclass(frozen=True, slots=True)
class PanelChanged:
    panel_id: int
    closed: bool
    by: int | None
    type: str = "panel_changed"


@dataclass(frozen=True, slots=True)
class PointerMoved:
    """``member_id``'s pointer is on ``panel_id`` at ``point`` (None: hidden)."""

    member_id: int
    panel_id: int
    point: Vec3 | None
    type: str = "pointer_moved"


@dataclass(frozen=True, slots=True)
class MeasurementChanged:
    measurement_id: int
    deleted: bool
    seq: int
    type: str = "measurement_changed"


class PanelsClient(Mapping[int, ImagePanel]):
    """The room's image panels ``{panel_id: ImagePanel}`` (``session.panels``), its
    measurements and pointers."""

    def __init__(self, session: SessionLink) -> None:
        self._s = session
        self._panels: dict[int, ImagePanel] = {}
        #: Measurements by id.
        self.measurements: dict[int, ImageMeasurement] = {}
        #: Visible pointers: member id -> (panel id, point in patient mm).
        self.pointers: dict[int, tuple[int, Vec3]] = {}
        self._synced: asyncio.Event | None = None
        for cls, fn in (
            (ImageAck, self._on_ack),
            (ImageRefused, self._on_refused),
            (PanelState, self._on_panel),
            (PanelClosed, self._on_closed),
            (Pointers, self._on_pointers),
            (MeasurementState, self._on_measurement),
            (MeasurementDeleted, self._on_measurement_deleted),
            (ImagesSynced, self._on_synced),
            (Welcome, self._on_welcome),
        ):
            session.add_handler(cls, fn)
        session.add_connected_hook(self._on_welcome)
        self._pending: PendingRequests[ImageAck] = PendingRequests()
        self._changed = asyncio.Event()

    def __getitem__(self, panel_id: int) -> ImagePanel:
        return self._panels[panel_id]

    def __iter__(self) -> Iterator[int]:
        return iter(self._panels)

    def __len__(self) -> int:
        return len(self._panels)

    async def wait_synced(self, timeout: float = 5.0) -> None:
        """Wait until the room's panels and measurements have arrived on this connection."""
        if self._synced is None:
            self._synced = asyncio.Event()
        await asyncio.wait_for(self._synced.wait(), timeout)

    async def request(self, make: Any, timeout: float = 10.0) -> ImageAck:
        """Send ``make(req)``; wait for its ``img_ack`` or raise :class:`ImageViewError`."""
        req = self._pending.next_req()
        return await self._pending.wait(req, lambda: self._s.send_message(make(req)), timeout)

    async def wait_version(self, panel_id: int, version: int, timeout: float = 5.0) -> ImagePanel:
        """Wait until the panel's state is at least ``version`` (changes reach the room with
        the tick after their acknowledgement)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            panel = self._panels.get(panel_id)
            if panel is not None and panel.version >= version:
                return panel
            if loop.time() > deadline:
                raise TimeoutError(f"panel {panel_id} did not reach version {version}")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), max(0.0, deadline - loop.time()))

    def _on_welcome(self, _: Message) -> None:
        self._panels.clear()
        self.measurements.clear()
        self.pointers.clear()
        if self._synced is not None:
            self._synced.clear()
        self._pending.renewed()

    def _on_ack(self, m: Message) -> None:
        assert isinstance(m, ImageAck)
        self._pending.acknowledged(m.req, m)

    def _on_refused(self, m: Message) -> None:
        assert isinstance(m, ImageRefused)
        self._pending.refused(m.req, ImageViewError(m.code, m.message))

    def _on_panel(self, m: Message) -> None:
        assert isinstance(m, PanelState)
        old = self._panels.get(m.panel_id)
        if old is not None and old.version > m.version:
            return  # an older state than one we have
        self._panels[m.panel_id] = ImagePanel(
            m.panel_id,
            m.series,
            m.position,
            m.rotation,
            m.width,
            m.plane,
            m.slices,
            m.window,
            m.zoom,
            m.pan,
            m.version,
            m.object_id,
            m.by,
        )
        self._changed.set()
        self._s.emit(PanelChanged(m.panel_id, False, m.by))

    def _on_closed(self, m: Message) -> None:
        assert isinstance(m, PanelClosed)
        self._panels.pop(m.panel_id, None)
        self._s.emit(PanelChanged(m.panel_id, True, m.by))

    def _on_pointers(self, m: Message) -> None:
        assert isinstance(m, Pointers)
        for member, panel, x, y, z in m.pointers:
            if panel == 0:
                self.pointers.pop(member, None)
                self._s.emit(PointerMoved(member, 0, None))
            else:
                self.pointers[member] = (panel, (x, y, z))
                self._s.emit(PointerMoved(member, panel, (x, y, z)))

    def _on_measurement(self, m: Message) -> None:
        assert isinstance(m, MeasurementState)
        self.measurements[m.measurement_id] = ImageMeasurement(
            m.measurement_id,
            m.series,
            m.kind,
            tuple(tuple(p) for p in m.points),  # type: ignore[misc]
            m.value,
            m.author,
            m.author_id,
            m.time,
            m.seq,
            m.label,
            m.mean,
            m.sd,
            m.min,
            m.max,
            m.pixels,
            m.units,
        )
        self._s.emit(MeasurementChanged(m.measurement_id, False, m.seq))

    def _on_measurement_deleted(self, m: Message) -> None:
        assert isinstance(m, MeasurementDeleted)
        self.measurements.pop(m.measurement_id, None)
        self._s.emit(MeasurementChanged(m.measurement_id, True, m.seq))

    def _on_synced(self, m: Message) -> None:
        if self._synced is None:
            self._synced = asyncio.Event()
        self._synced.set()


class ImagesAPI:
    """The image calls of :class:`~client_sdk.session.Session` (mixed into it)."""

    panels: PanelsClient
    url: str
    room: str
    token: str | None
    room_access: str | None
    _ssl: Any
    _image_client: ImageClient | None = None

    @property
    def http_token(self) -> str | None:
        """The bearer token for this room's HTTP APIs (assets, image series): the room access
        credential the server gave with our last move, else our join token."""
        return self.room_access or self.token

    @property
    def images(self) -> ImageClient:
        """The room's image series over HTTP, with this session's token."""
        client = self._image_client
        if client is None:
            client = ImageClient(self.url, self.room, self.http_token, ssl=self._ssl)
            self._image_client = client
        return client

    async def upload_series(
        self,
        source: str | os.PathLike[str] | bytes | Mapping[str, bytes],
        name: str | None = None,
        *,
        deidentify: bool = False,
        multipart: bool = False,
    ) -> SeriesListing:
        """Upload a DICOM series to the room (see :meth:`ImageClient.upload`)."""
        return await self.images.upload(source, name, deidentify=deidentify, multipart=multipart)

    async def series(self, sha256: str) -> dict[str, Any]:
        """The series descriptor (geometry and planes)."""
        return await self.images.descriptor(sha256)

    async def fetch_slice(
        self, sha256: str, plane: str, index: int, window: tuple[float, float] | None = None
    ) -> bytes:
        """One image of a series as PNG, with ``window`` (center, width) or its default."""
        png, _ = await self.images.fetch_slice(sha256, plane, index, window)
        assert png is not None
        return png

    async def open_panel(
        self,
        series: str,
        position: Vec3 = (0.0, 1.5, -1.0),
        rotation: Quat = (0.0, 0.0, 0.0, 1.0),
        width: float = 0.6,
    ) -> int:
        """Place a panel showing ``series``; returns its id once stored."""
        pos, rot = _vec(position, 3, "position"), _vec(rotation, 4, "rotation")
        ack = await self.panels.request(
            lambda r: OpenPanel(r, series, pos, rot, float(width))  # type: ignore[arg-type]
        )
        assert ack.panel_id is not None
        return ack.panel_id

    async def close_panel(self, panel_id: int) -> None:
        await self.panels.request(lambda r: ClosePanel(r, panel_id))

    async def set_image_view(
        self,
        panel_id: int,
        *,
        series: str | None = None,
        plane: str | None = None,
        slices: Sequence[int] | None = None,
        window: Sequence[float] | None = None,
        zoom: float | None = None,
        pan: Sequence[float] | None = None,
    ) -> None:
        """Change a panel's shared viewer state (what is not given stays)."""
        sl = None if slices is None else tuple(int(s) for s in slices)
        win = None if window is None else _vec(window, 2, "window")
        pn = None if pan is None else _vec(pan, 2, "pan")
        await self.panels.request(
            lambda r: SetImageView(r, panel_id, series, plane, sl, win, zoom, pn)  # type: ignore[arg-type]
        )

    async def place_panel(
        self,
        panel_id: int,
        position: Vec3,
        rotation: Quat = (0.0, 0.0, 0.0, 1.0),
        width: float | None = None,
    ) -> None:
        pos, rot = _vec(position, 3, "position"), _vec(rotation, 4, "rotation")
        await self.panels.request(
            lambda r: PlacePanel(r, panel_id, pos, rot, width)  # type: ignore[arg-type]
        )

    async def link_panel(
        self, panel_id: int, object_id: int | None, frame_of_reference: str | None = None
    ) -> None:
        """Link a panel to a model object made in the series' frame of reference (None
        unlinks)."""
        await self.panels.request(lambda r: LinkPanel(r, panel_id, object_id, frame_of_reference))

    async def locate(self, panel_id: int, point: Vec3) -> tuple[int, int, int]:
        """Move the panel's images to ``point`` on its linked model (model frame, metres);
        returns the panel's new image indices once the server has them."""
        pt = _vec(point, 3, "point")
        before = self.panels[panel_id].version if panel_id in self.panels else -1
        await self.panels.request(lambda r: Locate(r, panel_id, pt))  # type: ignore[arg-type]
        panel = await self.panels.wait_version(panel_id, before + 1)
        return panel.slices

    async def point(self, panel_id: int, point: Vec3 | None) -> None:
        """Show your pointer on a panel at ``point`` (patient mm); None hides it."""
        pt = None if point is None else _vec(point, 3, "point")
        await self.panels._s.send_message(
            Point(panel_id if pt is not None else 0, pt)  # type: ignore[arg-type]
        )

    async def measure(
        self, series: str, kind: str, points: Sequence[Vec3], label: str | None = None
    ) -> int:
        """Measure (``distance``, ``angle`` or ``roi``) with points in patient mm; returns
        the measurement id once stored (its values arrive in ``session.panels.measurements``)."""
        pts = tuple(_vec(p, 3, "point") for p in points)
        ack = await self.panels.request(
            lambda r: Measure(r, series, kind, pts, label)  # type: ignore[arg-type]
        )
        assert ack.measurement_id is not None
        return ack.measurement_id

    async def delete_measurement(self, measurement_id: int) -> None:
        await self.panels.request(lambda r: DeleteMeasurement(r, measurement_id))


__all__ = [
    "ImageClient",
    "ImageError",
    "ImageMeasurement",
    "ImagePanel",
    "ImageViewError",
    "ImagesAPI",
    "MeasurementChanged",
    "PanelChanged",
    "PanelsClient",
    "PointerMoved",
    "SeriesListing",
    "zip_files",
]
