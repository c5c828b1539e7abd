"""Small glTF 2.0 models built in code, for asset and object tests and benchmarks."""

from __future__ import annotations

import json
import struct

import numpy as np


def triangle(nodes: tuple[str, ...] = ("skin", "vessels"), extra: int = 0) -> tuple[dict, bytes]:
    """A glTF document with one triangle mesh used by named nodes, and its binary buffer.

    ``extra`` pads the buffer with that many more bytes (to make large models).
    """
    pos = np.array([[0, 0, 0], [0.1, 0, 0], [0, 0.1, 0]], np.float32).tobytes()
    idx = np.array([0, 1, 2, 0], np.uint16).tobytes()  # 3 indices + 2 bytes of padding
    blob = pos + idx + bytes(extra)
    doc = {
        "asset": {"version": "2.0", "generator": "medverse tests"},
        "scene": 0,
        "scenes": [{"nodes": list(range(len(nodes)))}],
        "nodes": [{"name": n, "mesh": 0} for n in nodes],
        "meshes": [{"primitives": [{"attributes": {"POSITION": 0}, "indices": 1}]}],
        "buffers": [{"byteLength": len(blob)}],
        "bufferViews": [
            {"buffer": 0, "byteOffset": 0, "byteLength": 36},
            {"buffer": 0, "byteOffset": 36, "byteLength": 6},
        ],
        "accessors": [
            {
                "bufferView": 0,
                "componentType": 5126,
                "count": 3,
                "type": "VEC3",
                "min": [0, 0, 0],
                "max": [0.1, 0.1, 0],
            },
            {"bufferView": 1, "componentType": 5123, "count": 3, "type": "SCALAR"},
        ],
    }
    return doc, blob


def glb(doc: dict, blob: bytes, *, version: int = 2, magic: bytes = b"glTF") -> bytes:
    """Pack a document and buffer as a binary glTF exactly as written (no fixing up)."""
    js = json.dumps(doc).encode()
    js += b" " * (-len(js) % 4)
    body = struct.pack("<II", len(js), 0x4E4F534A) + js
    if blob:
        b = blob + bytes(-len(blob) % 4)
        body += struct.pack("<II", len(b), 0x004E4942) + b
    return magic + struct.pack("<II", version, 12 + len(body)) + body


def triangle_glb(nodes: tuple[str, ...] = ("skin", "vessels"), extra: int = 0) -> bytes:
    doc, blob = triangle(nodes, extra)
    return glb(doc, blob)


def triangle_gltf(uri: str = "tri.bin") -> tuple[bytes, dict[str, bytes]]:
    """A ``.gltf`` JSON naming an external buffer, and that buffer by its URI."""
    doc, blob = triangle()
    doc["buffers"][0]["uri"] = uri
    return json.dumps(doc).encode(), {uri: blob}


HEART = triangle_glb(nodes=("skin", "vessels", "heart"))
KIDNEY = triangle_glb(nodes=("cortex", "kidney"))


def sha256_of(model: bytes) -> str:
    import hashlib

    return hashlib.sha256(model).hexdigest()


async def provide(url: str, room: str, token: str | None = None, *models: bytes) -> list[str]:
    """Upload models (default: HEART and KIDNEY) to ``room`` as the holder of ``token`` (a host,
    or nobody on a server without authentication); returns their SHA-256s. Uploading again is
    harmless, so every test may call it for its room."""
    from medverse.client_sdk import AssetClient

    client = AssetClient(url, room, token)
    try:
        return [(await client.upload(m)).sha256 for m in (models or (HEART, KIDNEY))]
    finally:
        await client.close()
