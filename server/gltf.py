"""glTF 2.0 validation and packing: what the asset store accepts, checked before anything is kept.

A model is accepted as a binary ``.glb`` or as a ``.gltf`` JSON with its external buffers and
images; the latter is packed into one ``.glb`` (every resource moved into the binary chunk), so a
headset downloads one file it can resume with a byte range. The checks are structural: the
container (magic, version, lengths, chunk types and padding), the JSON (an object with
``asset.version`` 2.x), and every declared length (buffers, buffer views and accessors must fit
what they point into). Anything else is refused with a message that says what is wrong.
"""

from __future__ import annotations

import base64
import binascii
import json
import mmap
import struct
from dataclasses import dataclass
from typing import Any

GLB_MAGIC = 0x46546C67  # "glTF"
CHUNK_JSON = 0x4E4F534A  # "JSON"
CHUNK_BIN = 0x004E4942  # "BIN\0"
_HEADER = struct.Struct("<III")
_CHUNK = struct.Struct("<II")

_COMPONENT_BYTES = {5120: 1, 5121: 1, 5122: 2, 5123: 2, 5125: 4, 5126: 4}
_TYPE_COUNT = {"SCALAR": 1, "VEC2": 2, "VEC3": 3, "VEC4": 4, "MAT2": 4, "MAT3": 9, "MAT4": 16}
_IMAGE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}
_IMAGE_TYPES |= {".ktx2": "image/ktx2", ".webp": "image/webp"}


class InvalidAsset(ValueError):
    """The upload is not a glTF 2.0 model we accept; the message says why."""


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """What the store remembers of a validated model."""

    generator: str | None
    nodes: tuple[str, ...]  # names of the named nodes (what view state can show or hide)
    meshes: int


def _int(value: Any, what: str, lo: int = 0) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < lo:
        raise InvalidAsset(f"{what} must be an integer >= {lo}")
    return value


def _list(doc: dict[str, Any], key: str) -> list[Any]:
    value = doc.get(key, [])
    if not isinstance(value, list):
        raise InvalidAsset(f"{key} must be an array")
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            raise InvalidAsset(f"{key}[{i}] must be an object")
    return value


def _parse_json(raw: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise InvalidAsset(f"the glTF JSON does not parse: {type(exc).__name__}") from None
    if not isinstance(doc, dict):
        raise InvalidAsset("the glTF JSON must be an object")
    asset = doc.get("asset")
    if not isinstance(asset, dict) or not isinstance(asset.get("version"), str):
        raise InvalidAsset("the glTF JSON has no asset.version")
    if not asset["version"].startswith("2."):
        raise InvalidAsset(f"glTF version {asset['version'][:16]!r}; only 2.x is supported")
    return doc


def _check_lengths(doc: dict[str, Any], buffer_sizes: list[int]) -> ModelInfo:
    """Buffer views must fit their buffers and accessors their views."""
    views = _list(doc, "bufferViews")
    view_sizes: list[int] = []
    for i, view in enumerate(views):
        b = _int(view.get("buffer"), f"bufferViews[{i}].buffer")
        if b >= len(buffer_sizes):
            raise InvalidAsset(f"bufferViews[{i}] names buffer {b}, which does not exist")
        off = _int(view.get("byteOffset", 0), f"bufferViews[{i}].byteOffset")
        length = _int(view.get("byteLength"), f"bufferViews[{i}].byteLength", 1)
        if off + length > buffer_sizes[b]:
            raise InvalidAsset(
                f"bufferViews[{i}] spans bytes {off}..{off + length} of buffer {b}, "
                f"which has {buffer_sizes[b]}"
            )
        if "byteStride" in view:
            stride = _int(view["byteStride"], f"bufferViews[{i}].byteStride", 4)
            if stride > 252 or stride % 4:
                raise InvalidAsset(f"bufferViews[{i}].byteStride must be 4..252, a multiple of 4")
        view_sizes.append(length)
    for i, acc in enumerate(_list(doc, "accessors")):
        count = _int(acc.get("count"), f"accessors[{i}].count", 1)
        comp = _COMPONENT_BYTES.get(acc.get("componentType"))
        n = _TYPE_COUNT.get(acc.get("type"))
        if comp is None or n is None:
            raise InvalidAsset(f"accessors[{i}] has an unknown componentType or type")
        if "bufferView" not in acc:
            continue  # all zeros (or sparse only): nothing to bound
        v = _int(acc["bufferView"], f"accessors[{i}].bufferView")
        if v >= len(views):
            raise InvalidAsset(f"accessors[{i}] names bufferView {v}, which does not exist")
        off = _int(acc.get("byteOffset", 0), f"accessors[{i}].byteOffset")
        element = comp * n
        stride = views[v].get("byteStride", element)
        need = off + stride * (count - 1) + element
        if need > view_sizes[v]:
            raise InvalidAsset(
                f"accessors[{i}] needs {need} bytes of bufferView {v}, which has {view_sizes[v]}"
            )
    for key in ("images",):
        for i, img in enumerate(_list(doc, key)):
            if "bufferView" in img:
                v = _int(img["bufferView"], f"{key}[{i}].bufferView")
                if v >= len(views):
                    raise InvalidAsset(f"{key}[{i}] names bufferView {v}, which does not exist")
    nodes = _list(doc, "nodes")
    names = tuple(n["name"] for n in nodes if isinstance(n.get("name"), str) and n["name"])
    generator = doc["asset"].get("generator")
    return ModelInfo(
        generator if isinstance(generator, str) else None, names, len(_list(doc, "meshes"))
    )


def validate_glb(data: bytes | memoryview | mmap.mmap) -> ModelInfo:
    """Check a binary glTF container and its declared lengths; raise :class:`InvalidAsset`."""
    mv = memoryview(data)
    if len(mv) < _HEADER.size:
        raise InvalidAsset(f"truncated: {len(mv)} bytes is shorter than the 12-byte GLB header")
    magic, version, length = _HEADER.unpack_from(mv)
    if magic != GLB_MAGIC:
        raise InvalidAsset("not a binary glTF: the file does not start with 'glTF'")
    if version != 2:
        raise InvalidAsset(f"GLB container version {version}; only 2 is supported")
    if length != len(mv):
        raise InvalidAsset(f"the GLB header declares {length} bytes but the file has {len(mv)}")
    pos = _HEADER.size
    chunks: list[tuple[int, memoryview]] = []
    while pos < length:
        if pos + _CHUNK.size > length:
            raise InvalidAsset(f"truncated chunk header at byte {pos}")
        clen, ctype = _CHUNK.unpack_from(mv, pos)
        pos += _CHUNK.size
        if clen % 4:
            raise InvalidAsset(f"chunk at byte {pos - 8} has length {clen}, not a multiple of 4")
        if pos + clen > length:
            raise InvalidAsset(
                f"chunk at byte {pos - 8} declares {clen} bytes; only {length - pos} remain"
            )
        chunks.append((ctype, mv[pos : pos + clen]))
        pos += clen
    if not chunks or chunks[0][0] != CHUNK_JSON:
        raise InvalidAsset("the first GLB chunk must be JSON")
    if len(chunks) > 1 and chunks[1][0] != CHUNK_BIN:
        raise InvalidAsset("the second GLB chunk, if any, must be BIN")
    doc = _parse_json(bytes(chunks[0][1]).rstrip(b" \x00"))
    bin_size = len(chunks[1][1]) if len(chunks) > 1 else None
    sizes: list[int] = []
    for i, buf in enumerate(_list(doc, "buffers")):
        declared = _int(buf.get("byteLength"), f"buffers[{i}].byteLength", 1)
        uri = buf.get("uri")
        if uri is None:
            if i != 0 or bin_size is None:
                raise InvalidAsset(f"buffers[{i}] has no uri and there is no BIN chunk for it")
            if declared > bin_size:
                raise InvalidAsset(
                    f"buffers[0] declares {declared} bytes; the BIN chunk has {bin_size}"
                )
        elif isinstance(uri, str) and uri.startswith("data:"):
            if len(_data_uri(uri, f"buffers[{i}]")) < declared:
                raise InvalidAsset(f"buffers[{i}] data URI is shorter than its byteLength")
        else:
            raise InvalidAsset(
                f"buffers[{i}] points to an external file; upload the .gltf with its files"
            )
        sizes.append(declared)
    return _check_lengths(doc, sizes)


def _data_uri(uri: str, what: str) -> bytes:
    head, _, payload = uri.partition(",")
    if not head.endswith(";base64"):
        raise InvalidAsset(f"{what} data URI must be base64")
    try:
        return base64.b64decode(payload, validate=True)
    except binascii.Error:
        raise InvalidAsset(f"{what} data URI is not valid base64") from None


def _pad(data: bytes, fill: bytes) -> bytes:
    return data + fill * (-len(data) % 4)


def pack_gltf(gltf: bytes, files: dict[str, bytes]) -> bytes:
    """A ``.gltf`` JSON plus the files its buffers and images name, as one ``.glb``.

    Every buffer becomes a slice of the single BIN chunk (4-byte aligned) and every image with a
    URI becomes a buffer view; nothing outside ``files`` is ever read or fetched. The result is
    deterministic, so the same upload always packs to the same bytes (and the same hash).
    """
    doc = _parse_json(gltf)
    blob = bytearray()
    buffers = _list(doc, "buffers")
    offsets: list[int] = []
    for i, buf in enumerate(buffers):
        declared = _int(buf.get("byteLength"), f"buffers[{i}].byteLength", 1)
        uri = buf.get("uri")
        if not isinstance(uri, str):
            raise InvalidAsset(f"buffers[{i}] of a .gltf needs a uri")
        data = _data_uri(uri, f"buffers[{i}]") if uri.startswith("data:") else files.get(uri)
        if data is None:
            raise InvalidAsset(f"buffers[{i}] names {uri[:80]!r}, which was not uploaded")
        if len(data) < declared:
            raise InvalidAsset(
                f"buffers[{i}] declares {declared} bytes; {uri[:80]!r} has {len(data)}"
            )
        offsets.append(len(blob))
        blob += _pad(bytes(data[:declared]), b"\x00")
    views = _list(doc, "bufferViews")
    for i, view in enumerate(views):
        b = _int(view.get("buffer"), f"bufferViews[{i}].buffer")
        if b >= len(buffers):
            raise InvalidAsset(f"bufferViews[{i}] names buffer {b}, which does not exist")
        view["buffer"] = 0
        view["byteOffset"] = offsets[b] + _int(view.get("byteOffset", 0), "byteOffset")
    for i, img in enumerate(_list(doc, "images")):
        uri = img.get("uri")
        if not isinstance(uri, str):
            continue
        if uri.startswith("data:"):
            data = _data_uri(uri, f"images[{i}]")
            mime = uri[5:].split(";", 1)[0] or "application/octet-stream"
        else:
            data = files.get(uri)
            if data is None:
                raise InvalidAsset(f"images[{i}] names {uri[:80]!r}, which was not uploaded")
            ext = "." + uri.rsplit(".", 1)[-1].lower() if "." in uri else ""
            mime = img.get("mimeType") or _IMAGE_TYPES.get(ext, "application/octet-stream")
        start = len(blob)
        blob += _pad(bytes(data), b"\x00")
        views.append({"buffer": 0, "byteOffset": start, "byteLength": len(data)})
        del img["uri"]
        img["bufferView"] = len(views) - 1
        img["mimeType"] = mime
    if views:
        doc["bufferViews"] = views
    if blob:
        doc["buffers"] = [{"byteLength": len(blob)}]
    else:
        doc.pop("buffers", None)
    js = _pad(json.dumps(doc, separators=(",", ":"), sort_keys=True).encode(), b" ")
    out = bytearray(_HEADER.pack(GLB_MAGIC, 2, 0))
    out += _CHUNK.pack(len(js), CHUNK_JSON) + js
    if blob:
        out += _CHUNK.pack(len(blob), CHUNK_BIN) + blob
    struct.pack_into("<I", out, 8, len(out))
    return bytes(out)
