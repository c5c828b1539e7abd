"""3D model assets: upload over HTTP, validation, content-addressed storage, resumable download.

``POST /rooms/{room}/assets`` takes a binary glTF (``.glb``) as the request body, or a
``multipart/form-data`` upload of a ``.gltf`` with the files it names (packed into one ``.glb``).
The model is validated (:mod:`server.gltf`), stored once per content under its SHA-256 (the same
model uploaded twice, to any room, is kept once) and listed in the room with its name, size, hash,
uploader and time. ``GET /rooms/{room}/assets/{sha256}`` serves it with a strong ETag (the hash)
and byte ranges, so a headset can resume a large download.

Stored files are checked against their hash before they are served (once per file version: the
result is kept with the file's size, times and inode, so a large model is not re-hashed for
every range request) and by a background scrub (:mod:`.integrity`); a file that no longer
matches is refused with ``corrupt`` and reported, never served as if intact. Uploading the same
model again replaces a damaged copy.

Every request carries the member's join token (``Authorization: Bearer ...``) for that room;
uploading needs the ``upload_assets`` grant. An asset is visible only in the rooms it was uploaded
to: asking another room for it is ``not_found``, whether or not its bytes exist.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import mmap
import os
import re
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from aiohttp import BodyPartReader, web

from medverse.protocol.errors import ErrorCode, ProtocolError

from .auth import Identity
from .gltf import InvalidAsset, ModelInfo, pack_gltf, validate_glb
from .httpauth import HttpAuth, UploadSlots, http_error
from .httpfiles import byte_range, immutable_headers, not_modified
from .mediastore import AssetIndex, AssetRow, SQLiteAssetIndex

log = logging.getLogger("medverse.assets")

SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_NAME_RE = re.compile(r"^[^\x00-\x1f\x7f/\\]{1,128}$")
_CHUNK = 256 * 1024


@dataclass(frozen=True, slots=True)
class AssetInfo:
    """One asset as a room lists it."""

    sha256: str
    name: str
    size: int
    #: The uploader as the room shows members: the display name, or in pseudonymous rooms the
    #: pseudonym (the identity is in the audit log).
    uploader: str
    uploaded_at: float  # Unix time
    nodes: tuple[str, ...]  # named glTF nodes: what view state can show or hide
    generator: str | None

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["nodes"] = list(self.nodes)
        return d


class AssetStore:
    """Model files under ``<blob_dir>/assets/`` named by hash; what rooms list in an
    :class:`~.mediastore.AssetIndex` (by default SQLite in ``<data_dir>/assets/``; PostgreSQL
    in a cluster, whose servers then share the blob directory on a common volume).

    The interface (``info``, ``list``, ``add``, ``remove``, ``blob_path``) is all the server
    uses. Every method that reads the index is blocking (a database round trip on
    PostgreSQL): the server calls them from threads, except :meth:`cached_nodes`.
    """

    def __init__(
        self,
        data_dir: str | Path,
        *,
        blob_dir: str | Path | None = None,
        index: AssetIndex | None = None,
    ) -> None:
        self.root = Path(blob_dir or data_dir) / "assets"
        self.root.mkdir(parents=True, exist_ok=True)
        self.tmp = staging_dir(self.root, data_dir, blob_dir)
        for stale in self.tmp.iterdir():  # uploads cut short by a crash (this server's)
            with contextlib.suppress(OSError):
                stale.unlink()
        # sha256 -> (size, mtime, ctime, inode) of the file when it was last hashed, and what
        # was found (None: intact, else why not).
        self._checked: dict[str, tuple[tuple[int, int, int, int], str | None]] = {}
        self._checked_lock = threading.Lock()
        #: The named nodes of each model seen (fixed by its content, so never stale): what a
        #: view-state change is checked against without a database round trip.
        self._nodes: dict[str, tuple[str, ...]] = {}
        self.index: AssetIndex = index if index is not None else SQLiteAssetIndex(data_dir)

    def close(self) -> None:
        self.index.close()

    def blob_path(self, sha256: str) -> Path:
        return self.root / sha256[:2] / f"{sha256}.glb"

    def blob_hashes(self) -> list[str]:
        """Every stored file's hash (what a scrub checks)."""
        return self.index.blob_hashes()

    def check(
        self,
        sha256: str,
        *,
        reread: bool = False,
        pause: Callable[[int], bool] | None = None,
        size: int | None = None,
    ) -> str | None:
        """Whether the stored file still holds what its name promises: None if so, else why
        not (missing, wrong size, content differs from its SHA-256). Blocking: call it from a
        thread. The file is hashed unless it was hashed before with the same size, times and
        inode (``reread`` hashes it anyway: bit rot changes none of them). ``pause(n)`` is
        called after each chunk of ``n`` bytes read (to pace a background pass); it returns
        False to stop, and the check then answers None without remembering anything.
        ``size``: the stored size as a listing just read says (saves reading it from the
        index: a download's check costs no database round trip)."""
        if size is None:
            size = self.index.stored_size(sha256)
        if size is None:
            return None  # not stored (any more): nothing to vouch for
        path = self.blob_path(sha256)
        try:
            st = path.stat()
        except FileNotFoundError:
            # Removed from its last room meanwhile (the row goes before the file), or lost.
            return None if self.index.stored_size(sha256) is None else "the file is missing"
        if st.st_size != size:
            return f"the file has {st.st_size} bytes, not {size}"
        key = (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
        with self._checked_lock:
            known = self._checked.get(sha256)
        if known is not None and known[0] == key and not reread:
            return known[1]
        digest = hashlib.sha256()
        try:
            with open(path, "rb") as f:
                while chunk := f.read(_CHUNK * 4):
                    digest.update(chunk)
                    if pause is not None and not pause(len(chunk)):
                        return None
        except FileNotFoundError:
            return None if self.index.stored_size(sha256) is None else "the file is missing"
        reason = None if digest.hexdigest() == sha256 else "its content differs from its SHA-256"
        with self._checked_lock:
            self._checked[sha256] = (key, reason)
        return reason

    def _hashed(self, sha256: str, path: Path) -> None:
        """Remember that ``path`` was just written with content hashing to ``sha256``."""
        st = path.stat()
        with self._checked_lock:
            self._checked[sha256] = ((st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino), None)

    def _info(self, row: AssetRow, pseudonymous: bool) -> AssetInfo:
        info = _row_info(row, pseudonymous)
        self._nodes[info.sha256] = info.nodes
        return info

    def info(self, room: str, sha256: str, *, pseudonymous: bool = False) -> AssetInfo | None:
        """The asset ``sha256`` as listed in ``room`` (None if it was never uploaded there);
        ``pseudonymous``: the room shows pseudonyms only, so a real name never appears."""
        row = self.index.info(room, sha256)
        return self._info(row, pseudonymous) if row else None

    def list(self, room: str, *, pseudonymous: bool = False) -> list[AssetInfo]:
        """Every asset listed in ``room``, oldest first (``pseudonymous`` as in :meth:`info`)."""
        return [self._info(r, pseudonymous) for r in self.index.list(room)]

    def cached_nodes(self, sha256: str) -> tuple[str, ...] | None:
        """The model's named nodes if this server has seen its listing (never blocks)."""
        return self._nodes.get(sha256)

    def totals(self) -> tuple[int, int]:
        """How many files are stored and their bytes (each stored once, whatever the number
        of rooms that list it)."""
        return self.index.totals()

    def count(self, room: str) -> int:
        return self.index.count(room)

    def add(
        self,
        room: str,
        name: str,
        identity: Identity,
        staged: Path,
        sha256: str,
        model: ModelInfo,
        *,
        pseudonymous: bool = False,
    ) -> tuple[AssetInfo, bool]:
        """Keep a validated, staged file and list it in ``room``; durable on return.

        Returns the listing and whether it is new to the room. The file is moved into place
        (fsynced first) only if no blob with this hash exists yet: stored once. In a
        ``pseudonymous`` room the uploader is kept under the pseudonym the room shows, never
        the real name.
        """
        dest = self.blob_path(sha256)
        size = staged.stat().st_size
        # Stored once; but a stored copy found damaged is replaced by the good one uploaded.
        if not dest.exists() or self.check(sha256) is not None:
            dest.parent.mkdir(exist_ok=True)
            with open(staged, "rb") as f:
                os.fsync(f.fileno())
            os.replace(staged, dest)
            _fsync_dir(dest.parent)
            self._hashed(sha256, dest)
        else:
            staged.unlink()
        now = time.time()
        meta = json.dumps(
            {"nodes": list(model.nodes), "generator": model.generator, "meshes": model.meshes}
        )
        shown = pseudonym_of(identity) if pseudonymous else identity.name
        new = self.index.add(
            room, sha256, size, meta, name, shown, identity.subject, now, pseudonymous
        )
        # New to the room: it is listed as just written (no second round trip); else as the
        # room lists it already (its first name and uploader).
        row = (
            (sha256, name, size, shown, now, meta, int(pseudonymous))
            if new
            else self.index.info(room, sha256)
        )
        assert row is not None
        return self._info(row, pseudonymous), new

    def remove(self, room: str, sha256: str) -> bool:
        """Unlist an asset from a room; its bytes go when no room lists them any more."""
        removed, last = self.index.remove(room, sha256)
        if last:
            with contextlib.suppress(FileNotFoundError):
                self.blob_path(sha256).unlink()
            with self._checked_lock:
                self._checked.pop(sha256, None)
        return removed

    def uploader_subject(self, room: str, sha256: str) -> str | None:
        return self.index.uploader_subject(room, sha256)


def staging_dir(root: Path, data_dir: str | Path, blob_dir: str | Path | None) -> Path:
    """Where this server stages uploads under ``root`` (on the blob directory's file system,
    so a finished upload is moved into place atomically): ``root/incoming`` when the blobs are
    in the data directory, else a folder of this server's own in there (named after its host
    and data directory), so a server clearing what a crash left never takes another server's
    upload in progress on a shared volume."""
    tmp = root / "incoming"
    if blob_dir and Path(blob_dir).resolve() != Path(data_dir).resolve():
        who = f"{socket.gethostname()}\0{Path(data_dir).resolve()}".encode()
        tmp = tmp / hashlib.sha256(who).hexdigest()[:16]
    tmp.mkdir(parents=True, exist_ok=True)
    return tmp


#: How an uploader without a pseudonym appears in a pseudonymous room over HTTP (the room's
#: WebSocket adds the member id, which a stored upload does not have).
ANONYMOUS_UPLOADER = "Participant"


def pseudonym_of(identity: Identity) -> str:
    """The name a pseudonymous room shows for ``identity`` in its asset listings."""
    return identity.pseudonym or ANONYMOUS_UPLOADER


def _row_info(row: AssetRow, pseudonymous: bool) -> AssetInfo:
    model = json.loads(row[5])
    # A name stored as a real name (uploaded while the room was not pseudonymous) is not shown
    # in a room that is now.
    uploader = row[3] if row[6] or not pseudonymous else ANONYMOUS_UPLOADER
    return AssetInfo(
        row[0], row[1], row[2], uploader, row[4], tuple(model["nodes"]), model["generator"]
    )


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- HTTP


class AssetService:
    """The HTTP side of the asset store: routes, limits and audit."""

    def __init__(
        self,
        auth: HttpAuth,
        audit: Callable[..., None],
        max_bytes: int,
        max_per_room: int,
        store: AssetStore | None = None,
        *,
        pseudonymous: Callable[[str], bool] = lambda room: False,
        ended: Callable[[str], bool] = lambda room: False,
        report: Callable[[str, str | None, str], None] = lambda sha256, problem, how: None,
    ) -> None:
        self._auth = auth
        self._audit = audit
        self._store = store
        #: Whether a room shows pseudonyms only, and whether its session was ended by a host
        #: (until the room closes): the same answers the room's WebSocket gives.
        self._pseudonymous = pseudonymous
        self._ended = ended
        #: Told what each check of a stored file found: (sha256, None or the problem, how it
        #: was found), to log, count, audit and show in /health (see .integrity).
        self._report = report
        self._checking: dict[str, asyncio.Future[str | None]] = {}
        self.max_bytes = max_bytes
        self.max_per_room = max_per_room
        self._uploads = UploadSlots()

    @property
    def store(self) -> AssetStore:
        """The open asset store (503 to the request while there is none)."""
        if self._store is None:
            raise web.HTTPServiceUnavailable(text="the asset store is not open")
        return self._store

    def use_store(self, store: AssetStore | None) -> None:
        """Serve from ``store``, once the server has opened it (until then, and with None,
        requests are answered 503)."""
        self._store = store

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/rooms/{room}/assets", self.upload)
        app.router.add_get("/rooms/{room}/assets", self.listing)
        app.router.add_get("/rooms/{room}/assets/{sha256}", self.download)
        app.router.add_get("/rooms/{room}/assets/{sha256}/info", self.metadata)
        app.router.add_delete("/rooms/{room}/assets/{sha256}", self.delete)

    async def _member(self, request: web.Request) -> tuple[str, Identity]:
        return await self._auth.room_member(request, self._ended)

    async def _lookup(self, request: web.Request) -> tuple[str, Identity, AssetInfo]:
        room, identity = await self._member(request)
        sha = request.match_info["sha256"]
        pseudonymous = self._pseudonymous(room)
        info = None
        if SHA256_RE.match(sha):
            # The index may be a database round trip away: never on the event loop.
            info = await asyncio.to_thread(self.store.info, room, sha, pseudonymous=pseudonymous)
        if info is None:
            raise http_error(ProtocolError(ErrorCode.NOT_FOUND, "no such asset in this room"))
        return room, identity, info

    async def listing(self, request: web.Request) -> web.Response:
        room, _ = await self._member(request)
        assets = await asyncio.to_thread(
            self.store.list, room, pseudonymous=self._pseudonymous(room)
        )
        return web.json_response({"assets": [a.to_json() for a in assets]})

    async def metadata(self, request: web.Request) -> web.Response:
        _, _, info = await self._lookup(request)
        return web.json_response(info.to_json())

    async def delete(self, request: web.Request) -> web.Response:
        room, identity, info = await self._lookup(request)
        if not identity.can("moderate") and (
            await asyncio.to_thread(self.store.uploader_subject, room, info.sha256)
            != identity.subject
        ):
            raise http_error(
                ProtocolError(ErrorCode.FORBIDDEN, "only the uploader or a host may remove it")
            )
        await asyncio.to_thread(self.store.remove, room, info.sha256)
        if not self.store.blob_path(info.sha256).exists():
            self._report(info.sha256, None, "removal")  # gone: nothing damaged is kept
        self._audit("asset_removed", room=room, actor=identity.subject, subject=info.sha256)
        return web.json_response({"removed": info.sha256})

    async def _intact(self, sha256: str, size: int) -> None:
        """Refuse (``corrupt``, HTTP 500) to serve a stored file that no longer matches its
        hash. Checked in a thread, once for all requests that arrive meanwhile."""
        fut = self._checking.get(sha256)
        if fut is None:
            fut = asyncio.ensure_future(asyncio.to_thread(self.store.check, sha256, size=size))
            self._checking[sha256] = fut
            fut.add_done_callback(lambda _: self._checking.pop(sha256, None))
        problem = await asyncio.shield(fut)
        self._report(sha256, problem, "download")
        if problem is not None:
            raise http_error(
                ProtocolError(
                    ErrorCode.CORRUPT,
                    "the stored model is damaged and is not served (an operator was told; "
                    "uploading it again repairs it)",
                ),
                500,
            )

    async def download(self, request: web.Request) -> web.StreamResponse:
        _, _, info = await self._lookup(request)
        path = self.store.blob_path(info.sha256)
        etag = f'"{info.sha256}"'
        headers = immutable_headers(etag, "model/gltf-binary")
        if not_modified(request, etag):
            return web.Response(status=304, headers=headers)  # the client's copy is good
        await self._intact(info.sha256, info.size)
        start, end, status = byte_range(request, etag, info.size, headers)
        headers["Content-Length"] = str(end - start + 1)
        resp = web.StreamResponse(status=status, headers=headers)
        await resp.prepare(request)
        if request.method == "HEAD":
            return resp
        loop = asyncio.get_running_loop()
        left = end - start + 1
        try:
            with open(path, "rb") as f:
                f.seek(start)
                while left > 0:
                    chunk = await loop.run_in_executor(None, f.read, min(_CHUNK, left))
                    if not chunk:
                        break
                    left -= len(chunk)
                    await resp.write(chunk)
            await resp.write_eof()
        except ConnectionError:  # reset, or "connection lost" while waiting to write more
            # The client went away (a headset taken off, a network change): it resumes with a
            # Range request. Nothing went wrong here, so no traceback.
            log.debug("download of %s ended by the client with %d bytes unsent", info.sha256, left)
        return resp

    async def upload(self, request: web.Request) -> web.Response:
        room, identity = await self._member(request)
        if not identity.can("upload_assets"):
            raise http_error(
                ProtocolError(ErrorCode.FORBIDDEN, f"role {identity.role} may not upload assets")
            )
        if request.content_length is not None and request.content_length > self.max_bytes:
            raise http_error(
                ProtocolError(ErrorCode.OVERSIZED, f"assets are limited to {self.max_bytes} bytes")
            )
        if await asyncio.to_thread(self.store.count, room) >= self.max_per_room:
            raise http_error(ProtocolError(ErrorCode.ROOM_FULL, "this room has its maximum assets"))
        addr = self._uploads.take(request)
        staged: Path | None = None
        try:
            if request.content_type == "multipart/form-data":
                name, staged, sha, model = await self._receive_gltf(request)
            else:
                name = request.query.get("name", "model.glb")
                staged, sha, model = await self._receive_glb(request)
            if not _NAME_RE.match(name):
                raise http_error(ProtocolError(ErrorCode.OUT_OF_RANGE, "bad asset name"))
            if self._ended(room):  # ended while the body was coming in
                raise http_error(ProtocolError(ErrorCode.SESSION_ENDED, "this session has ended"))
            info, new = await asyncio.to_thread(
                self.store.add,
                room,
                name,
                identity,
                staged,
                sha,
                model,
                pseudonymous=self._pseudonymous(room),
            )
            staged = None
        except InvalidAsset as exc:
            raise http_error(ProtocolError(ErrorCode.INVALID_ASSET, str(exc)), 422) from None
        finally:
            if staged is not None:
                with contextlib.suppress(FileNotFoundError):
                    staged.unlink()
            self._uploads.give(addr)
        self._report(info.sha256, None, "upload")  # the stored copy is the one just checked
        if new:
            self._audit(
                "asset_uploaded",
                room=room,
                actor=identity.subject,
                subject=info.sha256,
                size=info.size,
                name=info.name,
            )
        return web.json_response(info.to_json(), status=201 if new else 200)

    def _too_big(self) -> web.HTTPException:
        return http_error(
            ProtocolError(ErrorCode.OVERSIZED, f"assets are limited to {self.max_bytes} bytes")
        )

    async def _receive_glb(self, request: web.Request) -> tuple[Path, str, ModelInfo]:
        """Stream the body to a staging file (hashing as it comes), then validate it."""
        fd, name = tempfile.mkstemp(dir=self.store.tmp, suffix=".glb")
        staged = Path(name)
        digest = hashlib.sha256()
        size = 0
        try:
            with os.fdopen(fd, "wb") as f:
                async for chunk in request.content.iter_chunked(_CHUNK):
                    size += len(chunk)
                    if size > self.max_bytes:
                        raise self._too_big()
                    digest.update(chunk)
                    f.write(chunk)
            model = await asyncio.to_thread(_validate_file, staged)
        except BaseException:
            staged.unlink(missing_ok=True)
            raise
        return staged, digest.hexdigest(), model

    async def _receive_gltf(self, request: web.Request) -> tuple[str, Path, str, ModelInfo]:
        """A ``.gltf`` part plus its files, packed into one ``.glb`` and validated."""
        reader = await request.multipart()
        gltf: bytes | None = None
        gltf_name = "model.gltf"
        files: dict[str, bytes] = {}
        total = 0
        while True:
            part = await reader.next()
            if part is None:
                break
            if not isinstance(part, BodyPartReader):
                raise InvalidAsset("nested multipart bodies are not accepted")
            data = bytearray()
            while chunk := await part.read_chunk(_CHUNK):
                total += len(chunk)
                if total > self.max_bytes:
                    raise self._too_big()
                data += chunk
            filename = part.filename or part.name or ""
            if part.name == "gltf" or (gltf is None and filename.lower().endswith(".gltf")):
                gltf = bytes(data)
                gltf_name = filename or gltf_name
            else:
                if len(files) >= 256:
                    raise InvalidAsset("at most 256 files with one .gltf")
                files[filename] = bytes(data)
        if gltf is None:
            raise InvalidAsset("the multipart upload has no .gltf part (name it 'gltf')")
        glb = await asyncio.to_thread(pack_gltf, gltf, files)
        if len(glb) > self.max_bytes:
            raise self._too_big()
        model = await asyncio.to_thread(validate_glb, glb)
        fd, path = tempfile.mkstemp(dir=self.store.tmp, suffix=".glb")
        with os.fdopen(fd, "wb") as f:
            f.write(glb)
        name = gltf_name.rsplit(".", 1)[0] + ".glb"
        return name, Path(path), hashlib.sha256(glb).hexdigest(), model


def _validate_file(path: Path) -> ModelInfo:
    size = path.stat().st_size
    if size == 0:
        raise InvalidAsset("empty upload")
    message = ""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        try:
            return validate_glb(mm)
        except InvalidAsset as exc:
            # Keep nothing of the traceback: its frames hold views of the map, which must be
            # released before the map can close.
            message = str(exc)
    raise InvalidAsset(message)
