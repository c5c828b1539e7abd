"""Uploading and downloading a room's 3D models over HTTP (with the member's join token).

Use it through a session (``await session.upload_asset("heart.glb")``) or on its own, e.g. to
fetch a model before joining::

    async with AssetClient("http://127.0.0.1:8750", room="case-42", token=token) as client:
        info = await client.upload("heart.glb")
        await client.download(info.sha256, "cache/heart.glb")  # resumes a partial file
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp


class AssetError(Exception):
    """The server refused an asset request; ``code`` is the protocol error code."""

    def __init__(self, code: str, message: str, status: int) -> None:
        super().__init__(f"{code}: {message} (HTTP {status})")
        self.code = code
        self.message = message
        self.status = status


@dataclass(frozen=True, slots=True)
class AssetInfo:
    """An asset as its room lists it."""

    sha256: str
    name: str
    size: int
    uploader: str
    uploaded_at: float
    nodes: tuple[str, ...]
    generator: str | None

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> AssetInfo:
        return cls(
            d["sha256"],
            d["name"],
            int(d["size"]),
            d["uploader"],
            float(d["uploaded_at"]),
            tuple(d.get("nodes", ())),
            d.get("generator"),
        )


def http_base(url: str) -> str:
    """``ws://host:port/ws`` (or ``wss``, or an http URL) to ``http(s)://host:port``."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise ValueError(f"not a URL: {url!r}")
    scheme = {"ws": "http", "wss": "https"}.get(scheme, scheme)
    return f"{scheme}://{rest.split('/', 1)[0]}"


class AssetClient:
    """HTTP calls for one room's assets; an async context manager (``async with``) that closes
    its HTTP session on exit."""

    def __init__(
        self,
        url: str,
        room: str,
        token: str | None = None,
        *,
        ssl: Any = None,
        http: aiohttp.ClientSession | None = None,
    ) -> None:
        self.base = http_base(url)
        self.room = room
        self.token = token
        self._ssl = ssl if ssl is not None else True
        self._http = http
        self._own_http = http is None

    async def __aenter__(self) -> AssetClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the HTTP session it opened (one given to it stays open)."""
        if self._own_http and self._http is not None:
            await self._http.close()
            self._http = None

    def _session(self) -> aiohttp.ClientSession:
        if self._http is None:
            self._http = aiohttp.ClientSession()
        return self._http

    def _headers(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        h = dict(extra or {})
        if self.token:
            h["Authorization"] = f"Bearer {self.token}"
        return h

    def _url(self, sha256: str | None = None, suffix: str = "") -> str:
        u = f"{self.base}/rooms/{self.room}/assets"
        return u + (f"/{sha256}" if sha256 else "") + suffix

    @staticmethod
    async def _raise_for(resp: aiohttp.ClientResponse) -> None:
        if resp.status < 400:
            return
        try:
            err = (await resp.json(content_type=None))["error"]
            raise AssetError(str(err["code"]), str(err["message"]), resp.status)
        except (ValueError, KeyError, TypeError, aiohttp.ContentTypeError):
            raise AssetError("http_error", await resp.text(), resp.status) from None

    async def upload(
        self,
        source: str | os.PathLike[str] | bytes,
        name: str | None = None,
        files: dict[str, bytes] | None = None,
    ) -> AssetInfo:
        """Upload a ``.glb`` (path or bytes), or a ``.gltf`` with ``files`` (its buffers and
        images by the URI it names them with). Uploading the same model again is harmless."""
        if isinstance(source, bytes):
            data, fname = source, name or "model.glb"
        else:
            path = Path(source)
            data, fname = path.read_bytes(), name or path.name
        is_gltf = files is not None or fname.lower().endswith(".gltf")
        http = self._session()
        if is_gltf:
            form = aiohttp.FormData()
            form.add_field("gltf", data, filename=fname, content_type="model/gltf+json")
            for uri, blob in (files or {}).items():
                form.add_field("file", blob, filename=uri)
            body: Any = form
            headers = self._headers()
            params = {}
        else:
            body = data
            headers = self._headers({"Content-Type": "model/gltf-binary"})
            params = {"name": fname}
        async with http.post(
            self._url(), data=body, headers=headers, params=params, ssl=self._ssl
        ) as resp:
            await self._raise_for(resp)
            return AssetInfo.from_json(await resp.json())

    async def list(self) -> list[AssetInfo]:
        """Every asset of the room, oldest first."""
        async with self._session().get(self._url(), headers=self._headers(), ssl=self._ssl) as r:
            await self._raise_for(r)
            return [AssetInfo.from_json(a) for a in (await r.json())["assets"]]

    async def info(self, sha256: str) -> AssetInfo:
        async with self._session().get(
            self._url(sha256, "/info"), headers=self._headers(), ssl=self._ssl
        ) as r:
            await self._raise_for(r)
            return AssetInfo.from_json(await r.json())

    async def remove(self, sha256: str) -> None:
        """Unlist an asset from the room (its uploader or a host)."""
        async with self._session().delete(
            self._url(sha256), headers=self._headers(), ssl=self._ssl
        ) as r:
            await self._raise_for(r)

    async def download(self, sha256: str, dest: str | os.PathLike[str]) -> Path:
        """Fetch an asset into ``dest``, resuming from a partial ``dest`` if there is one.

        The bytes are checked against the hash before ``dest`` is complete; a partial file that
        does not lead to the right hash is discarded and fetched again whole.
        """
        path = Path(dest)
        path.parent.mkdir(parents=True, exist_ok=True)
        part = path.with_name(path.name + ".part")
        for attempt in range(2):
            have = part.stat().st_size if part.exists() else 0
            headers = self._headers()
            if have:
                headers["Range"] = f"bytes={have}-"
                headers["If-Range"] = f'"{sha256}"'
            async with self._session().get(self._url(sha256), headers=headers, ssl=self._ssl) as r:
                if r.status == 416:  # the partial file is already whole (or wrong)
                    pass
                else:
                    await self._raise_for(r)
                    mode = "ab" if r.status == 206 else "wb"
                    with open(part, mode) as f:
                        async for chunk in r.content.iter_chunked(256 * 1024):
                            f.write(chunk)
            digest = hashlib.sha256()
            with open(part, "rb") as f:
                while chunk := f.read(1 << 20):
                    digest.update(chunk)
            if digest.hexdigest() == sha256:
                os.replace(part, path)
                return path
            part.unlink()
            if attempt:
                break
        raise AssetError("corrupt", f"downloaded bytes do not hash to {sha256}", 200)
