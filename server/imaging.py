"""Medical image series over HTTP: upload (DICOM), the de-identification gate, content-addressed
storage, and slices rendered as PNG.

``POST /rooms/{room}/series`` takes a series as a zip of DICOM files (body
``application/zip``) or as ``multipart/form-data`` with one part per ``.dcm`` file; it is
parsed and validated by :mod:`.dicom`. Rooms whose name does not match the server's
``identifiable_image_rooms`` setting (by default: none) refuse a series whose attributes carry
identifying data (``identifiable_data``, 422, with the attribute keywords), unless the upload
asks for de-identification (``?deidentify=1``, or a form field ``deidentify`` = ``1``): the
attributes are then removed or replaced as the PS3.15 basic profile says before anything is
kept. Either way the audit log records which happened, with attribute keywords only.

What is kept is the series' volume (modality values: Hounsfield units for CT) and geometry in
one file named by its SHA-256 (a series uploaded twice, to any room, is kept once), the same
way as models; the DICOM files themselves are not kept. The room's listing adds the series'
(possibly replaced) UIDs, its name, uploader and time.

``GET /rooms/{room}/series/{sha256}`` is the series descriptor (JSON: geometry, planes, the
default window, units); ``GET /rooms/{room}/series/{sha256}/{plane}/{index}.png`` one image of
the ``axial``, ``coronal`` or ``sagittal`` plane with a window (``?window=C,W``; default: the
series'). Rendered images are cached in memory by what they are made from (the series' hash,
the plane, index and window), which is also their strong ETag; ``If-None-Match`` and one
``Range`` work as for models. Every request carries the member's join token for the room;
uploading needs ``upload_assets``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import logging
import os
import re
import struct
import tempfile
import time
import zipfile
import zlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from aiohttp import BodyPartReader, web

from medverse.protocol.errors import ErrorCode, ProtocolError
from medverse.protocol.images import SeriesListing

from .assets import ANONYMOUS_UPLOADER, SHA256_RE, _fsync_dir, pseudonym_of, staging_dir
from .auth import Identity
from .dicom import (
    Geometry,
    ImageError,
    Series,
    build_series,
    deidentify,
    identifying_attributes,
    read_files,
)
from .httpauth import HttpAuth, UploadSlots, http_error
from .httpfiles import byte_range, immutable_headers, not_modified
from .mediastore import SeriesIndex, SeriesRow, SQLiteSeriesIndex, ViewerState

log = logging.getLogger("medverse.images")

PLANES = ("axial", "coronal", "sagittal")
_MAGIC = b"MVSERIES"
_CHUNK = 256 * 1024
_NAME_RE = re.compile(r"^[^\x00-\x1f\x7f/\\]{1,128}$")
#: Most files in one series upload.
MAX_FILES = 4096
#: Bytes of rendered images kept in memory.
CACHE_BYTES = 128 * 1024 * 1024
#: Renderer version: part of every image's ETag, so a change of rendering is a new image.
RENDER_VERSION = 1


# --------------------------------------------------------------------------- the stored file


def write_volume(path: Path, series: Series) -> str:
    """Write the series' volume file (magic, header length, JSON header, 64-byte aligned raw
    little-endian array) and return its SHA-256."""
    vol = np.ascontiguousarray(series.volume)
    header = {
        "dtype": vol.dtype.str,
        "shape": list(vol.shape),
        "geometry": series.geometry.to_json(),
        "modality": series.modality,
        "window": list(series.window),
        "invert": series.invert,
        "units": series.units,
    }
    raw = json.dumps(header, sort_keys=True).encode()
    pad = (-(len(_MAGIC) + 4 + len(raw))) % 64
    raw += b" " * pad
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        for part in (_MAGIC, struct.pack("<I", len(raw)), raw):
            f.write(part)
            digest.update(part)
        little = vol.dtype.newbyteorder("<")
        for k in range(vol.shape[0]):  # a slice at a time: no copy of the whole volume
            data = vol[k].astype(little, copy=False).tobytes()
            f.write(data)
            digest.update(data)
        f.flush()
        os.fsync(f.fileno())
    return digest.hexdigest()


@dataclass
class Volume:
    """A stored series opened for reading (memory-mapped)."""

    sha256: str
    data: np.ndarray  # (slices, rows, cols)
    geometry: Geometry
    modality: str
    window: tuple[float, float]
    invert: bool
    units: str

    def header(self) -> dict[str, Any]:
        return {
            "sha256": self.sha256,
            "modality": self.modality,
            "units": self.units,
            "dtype": self.data.dtype.name,
            "window": list(self.window),
            "invert": self.invert,
            "geometry": self.geometry.to_json(),
            "planes": self.geometry.planes(),
        }


def open_volume(path: Path, sha256: str) -> Volume:
    with open(path, "rb") as f:
        head = f.read(len(_MAGIC) + 4)
        if head[: len(_MAGIC)] != _MAGIC:
            raise ValueError("not a series file")
        (n,) = struct.unpack("<I", head[len(_MAGIC) :])
        header = json.loads(f.read(n))
    offset = len(_MAGIC) + 4 + n
    shape = tuple(int(v) for v in header["shape"])
    data = np.memmap(path, dtype=np.dtype(header["dtype"]), mode="r", offset=offset, shape=shape)
    return Volume(
        sha256,
        data,
        Geometry.from_json(header["geometry"]),
        header["modality"],
        (float(header["window"][0]), float(header["window"][1])),
        bool(header["invert"]),
        header["units"],
    )


# --------------------------------------------------------------------------- rendering


def plane_image(vol: np.ndarray, plane: str, index: int) -> np.ndarray:
    """One image of ``plane`` (a view of the volume, no copy for axial); coronal and
    sagittal images put the highest slice on the top row (see ``Geometry.planes``)."""
    if plane == "axial":
        return vol[index]
    if plane == "coronal":
        return vol[::-1, index, :]
    return vol[::-1, :, index]


def window_u8(img: np.ndarray, center: float, width: float, invert: bool = False) -> np.ndarray:
    """DICOM's linear VOI LUT (PS3.3 C.11.2.1.2.1) to 8 bits, in one vectorised pass."""
    x = img.astype(np.float32, copy=False)
    if width <= 1:
        out = np.where(x > center - 0.5, 255, 0).astype(np.uint8)
    else:
        scale = np.float32(255.0 / (width - 1))
        lo = np.float32(center - 0.5 - (width - 1) / 2)
        y = (x - lo) * scale
        np.clip(y, 0, 255, out=y)
        out = (y + np.float32(0.5)).astype(np.uint8)
    if invert:
        np.subtract(255, out, out=out)
    return out


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def encode_png(gray: np.ndarray, level: int = 1) -> bytes:
    """An 8-bit grey-scale PNG of a 2-D uint8 array (filter type 0 on every row)."""
    h, w = gray.shape
    raw = np.zeros((h, w + 1), np.uint8)
    raw[:, 1:] = gray
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", ihdr)
        + _chunk(b"IDAT", zlib.compress(raw.tobytes(), level))
        + _chunk(b"IEND", b"")
    )


def render(volume: Volume, plane: str, index: int, center: float, width: float) -> bytes:
    img = plane_image(volume.data, plane, index)
    return encode_png(window_u8(img, center, width, volume.invert))


class RenderCache:
    """Rendered images by ETag, least recently used out first, bounded in bytes."""

    def __init__(self, max_bytes: int = CACHE_BYTES) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._items: OrderedDict[str, bytes] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> bytes | None:
        png = self._items.get(key)
        if png is None:
            self.misses += 1
            return None
        self.hits += 1
        self._items.move_to_end(key)
        return png

    def put(self, key: str, png: bytes) -> None:
        if key in self._items or len(png) > self.max_bytes:
            return
        self._items[key] = png
        self.bytes += len(png)
        while self.bytes > self.max_bytes:
            _, old = self._items.popitem(last=False)
            self.bytes -= len(old)

    def drop(self, sha256: str) -> None:
        for key in [k for k in self._items if k.startswith(sha256)]:
            self.bytes -= len(self._items.pop(key))


def image_key(sha256: str, plane: str, index: int, center: float, width: float) -> str:
    """What an image is made from, as its cache key; its ETag is the key's hash."""
    return f"{sha256}/{plane}/{index}/{center:g}/{width:g}/{RENDER_VERSION}"


# --------------------------------------------------------------------------- the store


class ImageStore:
    """Series files under ``<blob_dir>/images/`` named by hash; listings, viewer panels and
    measurements in a :class:`~.mediastore.SeriesIndex` (by default SQLite,
    ``<data_dir>/images/images.sqlite3``; PostgreSQL in a cluster, whose servers then share
    the blob directory). Methods that read or write the index are blocking (a database round
    trip on PostgreSQL): the server calls them from threads."""

    def __init__(
        self,
        data_dir: str | Path,
        *,
        blob_dir: str | Path | None = None,
        index: SeriesIndex | None = None,
    ) -> None:
        self.root = Path(blob_dir or data_dir) / "images"
        self.root.mkdir(parents=True, exist_ok=True)
        self.tmp = staging_dir(self.root, data_dir, blob_dir)
        for stale in self.tmp.iterdir():
            with contextlib.suppress(OSError):
                stale.unlink()
        #: The key UIDs are remapped with (with the room name), so a room's de-identified
        #: series keep their shared frames of reference across uploads, restarts and the
        #: servers sharing the blob directory.
        self.uid_key = _shared_key(self.root / "uid_key", Path(data_dir) / "images" / "uid_key")
        self.index: SeriesIndex = index if index is not None else SQLiteSeriesIndex(data_dir)
        self._volumes: dict[str, Volume] = {}
        self._checked: dict[str, tuple[tuple[int, int, int, int], str | None]] = {}

    def close(self) -> None:
        self.index.close()
        self._volumes.clear()

    def blob_path(self, sha256: str) -> Path:
        return self.root / sha256[:2] / f"{sha256}.series"

    def uid_key_for(self, room: str) -> bytes:
        return hashlib.sha256(self.uid_key + b"\x00" + room.encode()).digest()

    # ----------------------------------------------------------------- series

    def add(
        self,
        room: str,
        name: str,
        identity: Identity,
        staged: Path,
        sha256: str,
        meta: dict[str, Any],
        *,
        pseudonymous: bool = False,
    ) -> tuple[SeriesListing, bool]:
        """Keep a staged series file (once per content) and list it in ``room``; durable on
        return. Returns the listing and whether it is new to the room. In a ``pseudonymous``
        room the uploader is kept under the pseudonym the room shows, never the real name."""
        dest = self.blob_path(sha256)
        size = staged.stat().st_size
        if not dest.exists() or self.check(sha256) is not None:
            dest.parent.mkdir(exist_ok=True)
            os.replace(staged, dest)
            _fsync_dir(dest.parent)
            st = dest.stat()
            self._checked[sha256] = ((st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino), None)
            self._volumes.pop(sha256, None)
        else:
            staged.unlink()
        now = time.time()
        shown = pseudonym_of(identity) if pseudonymous else identity.name
        text = json.dumps(meta)
        new = self.index.add(
            room, sha256, size, name, shown, identity.subject, now, text, pseudonymous
        )
        # New to the room: listed as just written (no second round trip); else as the room
        # lists it already (its first name and uploader).
        row = (
            (sha256, name, size, shown, now, text, int(pseudonymous))
            if new
            else self.index.listing(room, sha256)
        )
        assert row is not None
        return _listing(row, pseudonymous), new

    def listing(
        self, room: str, sha256: str, *, pseudonymous: bool = False
    ) -> SeriesListing | None:
        """The series ``sha256`` as ``room`` lists it (None: not listed there);
        ``pseudonymous``: the room shows pseudonyms only, so a real name never appears."""
        row = self.index.listing(room, sha256)
        return _listing(row, pseudonymous) if row else None

    def listings(self, room: str, *, pseudonymous: bool = False) -> list[SeriesListing]:
        """Every series ``room`` lists, oldest first (``pseudonymous`` as in :meth:`listing`)."""
        return [_listing(r, pseudonymous) for r in self.index.listings(room)]

    def count(self, room: str) -> int:
        return self.index.count(room)

    def uploader_subject(self, room: str, sha256: str) -> str | None:
        return self.index.uploader_subject(room, sha256)

    def remove(self, room: str, sha256: str) -> bool:
        removed, last = self.index.remove(room, sha256)
        if last:
            self._volumes.pop(sha256, None)
            self._checked.pop(sha256, None)
            with contextlib.suppress(FileNotFoundError):
                self.blob_path(sha256).unlink()
        return removed

    def check(self, sha256: str) -> str | None:
        """None if the stored file still hashes to its name, else why not (hashed once per
        file version, as models are). Blocking."""
        path = self.blob_path(sha256)
        try:
            st = path.stat()
        except FileNotFoundError:
            return "the file is missing"
        key = (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
        known = self._checked.get(sha256)
        if known is not None and known[0] == key:
            return known[1]
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(4 << 20):
                digest.update(chunk)
        reason = None if digest.hexdigest() == sha256 else "its content differs from its SHA-256"
        self._checked[sha256] = (key, reason)
        return reason

    def volume(self, sha256: str) -> Volume:
        """The stored series, memory-mapped (checked against its hash first). Blocking on
        the first call per file."""
        vol = self._volumes.get(sha256)
        if vol is not None:
            return vol
        problem = self.check(sha256)
        if problem is not None:
            raise ProtocolError(ErrorCode.CORRUPT, f"the stored series is damaged: {problem}")
        vol = open_volume(self.blob_path(sha256), sha256)
        self._volumes[sha256] = vol
        return vol

    def forget(self, sha256: str) -> None:
        """Close the series (it is opened and checked again when next asked for)."""
        self._volumes.pop(sha256, None)

    def cached_volume(self, sha256: str) -> Volume | None:
        """The series if it is open already (never blocks)."""
        return self._volumes.get(sha256)

    # ----------------------------------------------------------------- viewer state

    def load_viewer(self, room: str) -> ViewerState:
        """(panels, measurements, next panel id, next measurement id, seq) of ``room``."""
        return self.index.load_viewer(room)

    def put_panels(
        self, room: str, panels: list[dict[str, Any]], next_panel: int, next_m: int, seq: int
    ) -> None:
        self.index.put_panels(room, panels, next_panel, next_m, seq)

    def delete_panel(
        self, room: str, panel_id: int, next_panel: int, next_m: int, seq: int
    ) -> None:
        self.index.delete_panel(room, panel_id, next_panel, next_m, seq)

    def put_measurement(
        self, room: str, m: dict[str, Any], next_panel: int, next_m: int, seq: int
    ) -> None:
        self.index.put_measurement(room, m, next_panel, next_m, seq)

    def delete_measurement(
        self, room: str, mid: int, next_panel: int, next_m: int, seq: int
    ) -> None:
        self.index.delete_measurement(room, mid, next_panel, next_m, seq)


def _shared_key(path: Path, seed: Path) -> bytes:
    """The 32-byte key in ``path``, made on first use: a copy of ``seed`` if that exists (the
    data directory's key, from before the blob directory moved), else random. Made whole in a
    file of its own and linked into place, so servers starting at once on a shared blob
    directory all end up with the one key that won (never a half-written one)."""
    if not path.exists():
        key = seed.read_bytes() if seed != path and seed.is_file() else os.urandom(32)
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=".uid_key-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(key)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(name, 0o600)
            with contextlib.suppress(FileExistsError):
                os.link(name, path)
        finally:
            os.unlink(name)
    return path.read_bytes()


def _listing(row: SeriesRow, pseudonymous: bool) -> SeriesListing:
    meta = json.loads(row[5])
    # A name stored as a real name (uploaded while the room was not pseudonymous) is not shown
    # in a room that is now.
    uploader = row[3] if row[6] or not pseudonymous else ANONYMOUS_UPLOADER
    return SeriesListing(
        row[0],
        row[1],
        int(row[2]),
        uploader,
        float(row[4]),
        meta["series_uid"],
        meta["study_uid"],
        meta["frame_of_reference"],
        int(meta["instances"]),
        bool(meta["deidentified"]),
        tuple(meta["syntaxes"]),
    )


# --------------------------------------------------------------------------- upload parsing


@dataclass
class Prepared:
    """A parsed, validated (and maybe de-identified) upload, staged on disk."""

    staged: Path
    sha256: str
    meta: dict[str, Any]
    identifying: list[str]  # what was found (keywords)
    actions: list[str]  # what de-identification did (keyword:action)


def unzip(data: bytes, max_bytes: int) -> list[tuple[str, bytes]]:
    """The files of a zip (folders and dot-files skipped), refusing archives that would
    unpack to more than ``max_bytes`` or :data:`MAX_FILES` files."""
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile:
        raise ImageError("not_dicom", "the body is not a zip archive") from None
    infos = [
        i
        for i in zf.infolist()
        if not i.is_dir() and not i.filename.rsplit("/", 1)[-1].startswith(".")
    ]
    if len(infos) > MAX_FILES:
        raise ImageError("oversized", f"at most {MAX_FILES} files per series")
    if sum(i.file_size for i in infos) > max_bytes:
        raise ImageError("oversized", f"the series unpacks to more than {max_bytes} bytes")
    out = []
    total = 0
    for info in infos:
        with zf.open(info) as f:
            blob = f.read(max_bytes - total + 1)
        total += len(blob)
        if total > max_bytes:  # a header that lied about its size
            raise ImageError("oversized", f"the series unpacks to more than {max_bytes} bytes")
        out.append((info.filename, blob))
    return out


def prepare(
    files: list[tuple[str, bytes]],
    *,
    allow_identifiable: bool,
    deidentify_requested: bool,
    uid_key: bytes,
    staging_dir: Path,
) -> Prepared:
    """Parse, gate, de-identify if asked, validate and stage a series (blocking: run it in a
    thread). Raises :class:`ImageError`."""
    datasets = read_files(files)
    del files
    found = identifying_attributes(datasets)
    actions: list[str] = []
    if deidentify_requested:
        actions = deidentify(datasets, uid_key)
    elif found and not allow_identifiable:
        raise ImageError(
            "identifiable_data",
            "this room does not take identifiable images: the attributes listed carry "
            "identifying data (upload with deidentify=1 to remove them)",
            found,
        )
    series = build_series(datasets)
    meta = {
        "series_uid": series.series_uid,
        "study_uid": series.study_uid,
        "frame_of_reference": series.frame_of_reference,
        "instances": len(datasets),
        "deidentified": deidentify_requested,
        "syntaxes": list(series.syntaxes),
    }
    del datasets
    fd, name = tempfile.mkstemp(dir=staging_dir, suffix=".series")
    os.close(fd)
    staged = Path(name)
    try:
        sha = write_volume(staged, series)
    except BaseException:
        staged.unlink(missing_ok=True)
        raise
    return Prepared(staged, sha, meta, found, actions)


# --------------------------------------------------------------------------- HTTP


_IMAGE_STATUS = {"oversized": 413}


def _image_error(exc: ImageError) -> web.HTTPException:
    body: dict[str, Any] = {"code": exc.code, "message": exc.message}
    if exc.attributes:
        body["attributes"] = list(exc.attributes)
    err = web.HTTPException(text=json.dumps({"error": body}), content_type="application/json")
    err.set_status(_IMAGE_STATUS.get(exc.code, 422))
    return err


class ImageService:
    """The HTTP side of image series: routes, the gate, limits, rendering and audit."""

    def __init__(
        self,
        auth: HttpAuth,
        audit: Callable[..., None],
        max_bytes: int,
        max_per_room: int,
        *,
        identifiable: Callable[[str], bool] = lambda room: False,
        pseudonymous: Callable[[str], bool] = lambda room: False,
        ended: Callable[[str], bool] = lambda room: False,
    ) -> None:
        self._auth = auth
        self._audit = audit
        self.max_bytes = max_bytes
        self.max_per_room = max_per_room
        self._identifiable = identifiable
        self._pseudonymous = pseudonymous
        self._ended = ended
        self._store: ImageStore | None = None
        self.cache = RenderCache()
        self._uploads = UploadSlots()
        self._opening: dict[str, asyncio.Future[Volume]] = {}

    @property
    def store(self) -> ImageStore:
        """The open image store (503 to the request while there is none)."""
        if self._store is None:
            raise web.HTTPServiceUnavailable(text="the image store is not open")
        return self._store

    def use_store(self, store: ImageStore | None) -> None:
        """Serve from ``store``, once the server has opened it (until then, and with None,
        requests are answered 503)."""
        self._store = store

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/rooms/{room}/series", self.upload)
        app.router.add_get("/rooms/{room}/series", self.listing)
        app.router.add_get("/rooms/{room}/series/{sha256}", self.descriptor)
        app.router.add_delete("/rooms/{room}/series/{sha256}", self.delete)
        app.router.add_get("/rooms/{room}/series/{sha256}/{plane}/{index}.png", self.image)

    async def _member(self, request: web.Request) -> tuple[str, Identity]:
        return await self._auth.room_member(request, self._ended)

    async def _lookup(self, request: web.Request) -> tuple[str, Identity, SeriesListing]:
        room, identity = await self._member(request)
        sha = request.match_info["sha256"]
        listing = None
        if SHA256_RE.match(sha):
            # The index may be a database round trip away: never on the event loop.
            listing = await asyncio.to_thread(
                self.store.listing, room, sha, pseudonymous=self._pseudonymous(room)
            )
        if listing is None:
            raise http_error(ProtocolError(ErrorCode.NOT_FOUND, "no such series in this room"))
        return room, identity, listing

    async def open(self, sha256: str) -> Volume:
        """The stored series, opened (and checked) in a thread once for concurrent asks."""
        vol = self.store.cached_volume(sha256)
        if vol is not None:
            return vol
        fut = self._opening.get(sha256)
        if fut is None:
            fut = asyncio.ensure_future(asyncio.to_thread(self.store.volume, sha256))
            self._opening[sha256] = fut
            fut.add_done_callback(lambda _: self._opening.pop(sha256, None))
        try:
            return await asyncio.shield(fut)
        except ProtocolError as err:
            raise self._corrupt(sha256, err) from None

    def _corrupt(self, sha256: str, err: ProtocolError) -> web.HTTPException:
        """A stored series that no longer matches its hash: never served, reported once per
        finding (log and audit), and opened afresh if it is uploaded again."""
        self.store.forget(sha256)
        self.cache.drop(sha256)
        log.error("stored series %s is damaged: %s", sha256, err.message)
        self._audit("series_corrupt", subject=sha256)
        return http_error(
            ProtocolError(
                ErrorCode.CORRUPT,
                "the stored series is damaged and is not served (uploading it again repairs it)",
            ),
            500,
        )

    async def listing(self, request: web.Request) -> web.Response:
        room, _ = await self._member(request)
        listings = await asyncio.to_thread(
            self.store.listings, room, pseudonymous=self._pseudonymous(room)
        )
        return web.json_response({"series": [s.to_json() for s in listings]})

    async def descriptor(self, request: web.Request) -> web.Response:
        _, _, listing = await self._lookup(request)
        vol = await self.open(listing.sha256)
        return web.json_response({**listing.to_json(), **vol.header()})

    async def delete(self, request: web.Request) -> web.Response:
        room, identity, listing = await self._lookup(request)
        if not identity.can("moderate") and (
            await asyncio.to_thread(self.store.uploader_subject, room, listing.sha256)
            != identity.subject
        ):
            raise http_error(
                ProtocolError(ErrorCode.FORBIDDEN, "only the uploader or a host may remove it")
            )
        await asyncio.to_thread(self.store.remove, room, listing.sha256)
        if not self.store.blob_path(listing.sha256).exists():  # no room lists it any more
            self.cache.drop(listing.sha256)
        self._audit("series_removed", room=room, actor=identity.subject, subject=listing.sha256)
        return web.json_response({"removed": listing.sha256})

    async def image(self, request: web.Request) -> web.StreamResponse:
        _, _, listing = await self._lookup(request)
        plane = request.match_info["plane"]
        if plane not in PLANES:
            raise http_error(
                ProtocolError(ErrorCode.OUT_OF_RANGE, "plane is axial, coronal or sagittal")
            )
        try:
            index = int(request.match_info["index"])
        except ValueError:
            raise http_error(ProtocolError(ErrorCode.BAD_FIELD, "index is an integer")) from None
        vol = await self.open(listing.sha256)
        count = vol.geometry.planes()[plane]["count"] if plane != "axial" else vol.data.shape[0]
        if not 0 <= index < count:
            raise http_error(
                ProtocolError(ErrorCode.OUT_OF_RANGE, f"{plane} images are 0-{count - 1}")
            )
        center, width = vol.window
        win = request.query.get("window")
        if win is not None:
            try:
                c, w = (float(v) for v in win.split(","))
            except ValueError:
                raise http_error(
                    ProtocolError(ErrorCode.BAD_FIELD, "window is center,width")
                ) from None
            if not (abs(c) <= 1e6 and 1 <= w <= 1e6):
                raise http_error(
                    ProtocolError(ErrorCode.OUT_OF_RANGE, "window center within 1e6, width 1-1e6")
                )
            center, width = c, w
        key = image_key(listing.sha256, plane, index, center, width)
        etag = '"' + hashlib.sha256(key.encode()).hexdigest() + '"'
        headers = immutable_headers(etag, "image/png")
        if not_modified(request, etag):
            return web.Response(status=304, headers=headers)
        png = self.cache.get(key)
        if png is None:
            # Rendered from the stored file only while it is what its hash says (a stat per
            # render; hashed again only when the file changed). Small images render on the
            # loop (a thread hop costs more); large ones in a thread, so other rooms' ticks
            # never wait for a 512 x 512 encode.
            args = (vol, plane, index, center, width)
            try:
                if vol.data.shape[1] * vol.data.shape[2] <= 128 * 128:
                    png = self._render_checked(*args)
                else:
                    png = await asyncio.to_thread(self._render_checked, *args)
            except ProtocolError as err:
                raise self._corrupt(listing.sha256, err) from None
            self.cache.put(key, png)
        start, end, status = byte_range(request, etag, len(png), headers)
        # aiohttp leaves the body out of an answer to HEAD (its length stays in the headers).
        return web.Response(status=status, body=png[start : end + 1], headers=headers)

    def _render_checked(
        self, vol: Volume, plane: str, index: int, center: float, width: float
    ) -> bytes:
        problem = self.store.check(vol.sha256)
        if problem is not None:
            raise ProtocolError(ErrorCode.CORRUPT, problem)
        return render(vol, plane, index, center, width)

    async def upload(self, request: web.Request) -> web.Response:
        room, identity = await self._member(request)
        if not identity.can("upload_assets"):
            raise http_error(
                ProtocolError(ErrorCode.FORBIDDEN, f"role {identity.role} may not upload images")
            )
        if request.content_length is not None and request.content_length > self.max_bytes:
            raise self._too_big()
        if await asyncio.to_thread(self.store.count, room) >= self.max_per_room:
            raise http_error(ProtocolError(ErrorCode.ROOM_FULL, "this room has its maximum series"))
        addr = self._uploads.take(request)
        flag = request.query.get("deidentify", "")
        name = request.query.get("name", "series")
        allowed = self._identifiable(room)
        t0 = time.perf_counter()
        prepared: Prepared | None = None
        try:
            if request.content_type == "multipart/form-data":
                files, form = await self._receive_parts(request)
                flag = form.get("deidentify", flag)
                name = form.get("name", name)
            else:
                files = await self._receive_zip(request)
            if not _NAME_RE.match(name):
                raise http_error(ProtocolError(ErrorCode.OUT_OF_RANGE, "bad series name"))
            if flag not in ("", "0", "1", "true", "false"):
                raise http_error(ProtocolError(ErrorCode.BAD_FIELD, "deidentify is 0 or 1"))
            wanted = flag in ("1", "true")
            prepared = await asyncio.to_thread(
                prepare,
                files,
                allow_identifiable=allowed,
                deidentify_requested=wanted,
                uid_key=self.store.uid_key_for(room),
                staging_dir=self.store.tmp,
            )
            del files
            if self._ended(room):
                raise http_error(ProtocolError(ErrorCode.SESSION_ENDED, "this session has ended"))
            listing, new = await asyncio.to_thread(
                self.store.add,
                room,
                name,
                identity,
                prepared.staged,
                prepared.sha256,
                prepared.meta,
                pseudonymous=self._pseudonymous(room),
            )
        except ImageError as exc:
            if exc.code == "identifiable_data":
                self._audit(
                    "series_refused_identifiable",
                    room=room,
                    actor=identity.subject,
                    attributes=list(exc.attributes),
                )
            else:
                self._audit("series_refused", room=room, actor=identity.subject, code=exc.code)
            raise _image_error(exc) from None
        finally:
            if prepared is not None and prepared.staged.exists():
                prepared.staged.unlink(missing_ok=True)
            self._uploads.give(addr)
        log.debug(
            "series %s: %d files in %.3f s",
            listing.sha256,
            listing.instances,
            time.perf_counter() - t0,
        )
        if prepared.actions:
            kind = "series_deidentified"
        elif prepared.identifying:
            kind = "series_uploaded_identifiable"
        else:
            kind = "series_uploaded"
        self._audit(
            kind,
            room=room,
            actor=identity.subject,
            subject=listing.sha256,
            instances=listing.instances,
            # Attribute keywords (and the profile's action) only, never a value.
            attributes=prepared.identifying,
            actions=prepared.actions,
        )
        return web.json_response(listing.to_json(), status=201 if new else 200)

    def _too_big(self) -> web.HTTPException:
        return http_error(
            ProtocolError(ErrorCode.OVERSIZED, f"series are limited to {self.max_bytes} bytes")
        )

    async def _receive_zip(self, request: web.Request) -> list[tuple[str, bytes]]:
        body = bytearray()
        async for chunk in request.content.iter_chunked(_CHUNK):
            body += chunk
            if len(body) > self.max_bytes:
                raise self._too_big()
        if not body:
            raise ImageError("not_dicom", "empty upload")
        data = bytes(body)
        if data[:4] == b"PK\x03\x04":
            return await asyncio.to_thread(unzip, data, self.max_bytes)
        # One DICOM file as the body.
        return [(request.query.get("name", "upload.dcm"), data)]

    async def _receive_parts(
        self, request: web.Request
    ) -> tuple[list[tuple[str, bytes]], dict[str, str]]:
        reader = await request.multipart()
        files: list[tuple[str, bytes]] = []
        form: dict[str, str] = {}
        total = 0
        while True:
            part = await reader.next()
            if part is None:
                break
            if not isinstance(part, BodyPartReader):
                raise ImageError("not_dicom", "nested multipart bodies are not accepted")
            data = bytearray()
            while chunk := await part.read_chunk(_CHUNK):
                total += len(chunk)
                if total > self.max_bytes:
                    raise self._too_big()
                data += chunk
            if part.filename is None and part.name in ("deidentify", "name"):
                form[part.name] = data.decode("utf-8", "replace")[:128]
                continue
            if len(files) >= MAX_FILES:
                raise ImageError("oversized", f"at most {MAX_FILES} files per series")
            fname = part.filename or part.name or f"file{len(files)}"
            if bytes(data[:4]) == b"PK\x03\x04":
                files.extend(await asyncio.to_thread(unzip, bytes(data), self.max_bytes))
            else:
                files.append((fname, bytes(data)))
        if not files:
            raise ImageError("not_dicom", "the upload holds no files")
        return files, form


__all__ = [
    "PLANES",
    "ImageService",
    "ImageStore",
    "RenderCache",
    "SeriesListing",
    "Volume",
    "encode_png",
    "open_volume",
    "plane_image",
    "prepare",
    "render",
    "window_u8",
    "write_volume",
]
