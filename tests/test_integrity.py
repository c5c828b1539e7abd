"""Damaged stored data is reported and never served as if intact: model files checked against
their hash (on download and by a background scrub), and stored objects checked at start against
the audit log's record of acknowledged changes."""

from __future__ import annotations

import hashlib
import os
import sqlite3
import tempfile
import time
from pathlib import Path
from typing import IO, Any

import aiohttp
import pytest

from medverse.client_sdk import AssetClient, ObjectError, connect
from medverse.server.auth import mint_token

from .conftest import ServerProcess, run_server
from .models import triangle_glb

SECRET = "i" * 48


def tok(room: str, ident: str = "dr-a", role: str = "host") -> str:
    return mint_token(SECRET.encode(), room=room, identity=ident, name="Dr A", role=role)


def audit_kinds(data: Path) -> list[tuple[str, str | None, str | None]]:
    db = sqlite3.connect(f"file:{data / 'audit.sqlite3'}?mode=ro", uri=True)
    try:
        return db.execute("SELECT kind, room, subject FROM entries ORDER BY seq").fetchall()
    finally:
        db.close()


def metric(srv: ServerProcess, name: str) -> float:
    for line in srv.get("/metrics").splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no metric {name}")


def read_log(log: IO[str]) -> str:
    log.seek(0)
    return log.read()


def flip_byte(path: Path, offset: int, keep_times: bool = False) -> None:
    """Damage one byte in place; ``keep_times``: as bit rot does, without a new mtime."""
    st = path.stat()
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x40]))
    if keep_times:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def wait_until(cond: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "not in time"
        time.sleep(0.05)


async def download(srv: ServerProcess, room: str, sha: str) -> tuple[int, bytes]:
    async with (
        aiohttp.ClientSession() as http,
        http.get(
            f"{srv.http}/rooms/{room}/assets/{sha}",
            headers={"Authorization": f"Bearer {tok(room)}", "Range": "bytes=0-"},
        ) as r,
    ):
        return r.status, await r.read()


async def test_a_damaged_model_file_is_refused_and_reported() -> None:
    data = Path(tempfile.mkdtemp(prefix="medverse-integrity-"))
    room = "review"
    models = [triangle_glb(nodes=("heart",), extra=300_000), triangle_glb(nodes=("lung",))]
    shas = [hashlib.sha256(m).hexdigest() for m in models]
    with (
        tempfile.TemporaryFile("w+") as log,
        run_server(auth_secret=SECRET, data_dir=data, asset_scrub_interval=0.3, log=log) as srv,
    ):
        client = AssetClient(srv.http, room, tok(room))
        try:
            for model in models:
                await client.upload(model)
            assert await download(srv, room, shas[0]) == (206, models[0])
            blobs = [data / "assets" / sha[:2] / f"{sha}.glb" for sha in shas]
            # One flipped byte in a stored file: the next download refuses it.
            flip_byte(blobs[0], 200_000)
            status, body = await download(srv, room, shas[0])
            assert status == 500 and b'"corrupt"' in body, body
            for _ in range(3):  # refused every time, reported once
                assert (await download(srv, room, shas[0]))[0] == 500
            health = srv.get_json("/health")
            assert health["status"] == "degraded"
            assert shas[0] in health["integrity"]["corrupt_assets"]
            # Bit rot (same size and mtime) in a file nobody downloads: the scrub finds it.
            flip_byte(blobs[1], 100, keep_times=True)
            wait_until(lambda: shas[1] in srv.get_json("/health")["integrity"]["corrupt_assets"])
            assert metric(srv, 'medverse_integrity_failures_total{kind="asset"}') == 2
            assert metric(srv, "medverse_corrupt_assets") == 2
            # The scrub may have found it before reading the other file: wait for both.
            wait_until(lambda: metric(srv, "medverse_asset_scrub_files_total") >= 2)
            # Uploading the model again replaces the damaged copy: served again.
            await client.upload(models[0])
            assert await download(srv, room, shas[0]) == (206, models[0])
            assert shas[0] not in srv.get_json("/health")["integrity"]["corrupt_assets"]
        finally:
            await client.close()
        text = read_log(log)
    found = [line for line in text.splitlines() if "is damaged" in line]
    assert len(found) == 2 and all(" ERROR " in line for line in found), text
    assert "Traceback" not in text
    kinds = audit_kinds(data)
    assert ("asset_corrupt", None, shas[0]) in kinds and ("asset_corrupt", None, shas[1]) in kinds
    assert ("asset_intact", None, shas[0]) in kinds


async def make_annotated_room(srv: ServerProcess, room: str) -> list[int]:
    """A room with one object and six annotations, one of them deleted; the five ids left."""
    model = triangle_glb(nodes=("tri",))
    async with connect(srv.url, room, "Dr A", token=tok(room), reconnect=False) as host:
        info = await host.upload_asset(model)
        oid = await host.spawn(info.sha256, position=(0.0, 1.2, -0.6))
        ids = [
            await host.annotate(oid, "pin", [(0.0, 0.01 * i, 0.0)], text=f"note {i}")
            for i in range(6)
        ]
        await host.delete_annotation(ids.pop())
    return ids


async def test_acknowledged_annotations_missing_at_start_hold_the_room_back() -> None:
    data = Path(tempfile.mkdtemp(prefix="medverse-integrity-"))
    with run_server(auth_secret=SECRET, data_dir=data) as srv:
        ids = await make_annotated_room(srv, "ward")
        await make_annotated_room(srv, "clinic")  # left intact
    # Behind the server's back, as a damaged WAL or an older copy of the database would.
    db = sqlite3.connect(data / "objects.sqlite3")
    db.execute("DELETE FROM annotations WHERE room = 'ward' AND id IN (?, ?)", ids[1:3])
    db.commit()
    db.close()
    with (
        tempfile.TemporaryFile("w+") as log,
        run_server(auth_secret=SECRET, data_dir=data, log=log) as srv,
    ):
        health = srv.get_json("/health")
        assert health["status"] == "degraded"
        gap = health["integrity"]["incomplete_rooms"]["ward"]
        assert gap["missing_annotations"] == ids[1:3] and not gap["served"]
        assert list(health["integrity"]["incomplete_rooms"]) == ["ward"]
        assert metric(srv, 'medverse_integrity_failures_total{kind="objects"}') == 1
        assert metric(srv, "medverse_incomplete_rooms") == 1
        async with connect(srv.url, "ward", "Dr A", token=tok("ward"), reconnect=False) as host:
            with pytest.raises(ObjectError) as err:
                await host.annotate(1, "pin", [(0.0, 0.0, 0.0)], text="over a gap")
            assert err.value.code == "corrupt"
            assert not host.objects  # nothing of the incomplete state is shown
        async with connect(srv.url, "clinic", "Dr A", token=tok("clinic"), reconnect=False) as h:
            await h.objects.wait_synced()
            assert len(h.objects) == 1
            await h.annotate(next(iter(h.objects)), "pin", [(0.0, 0.0, 0.0)])
        text = read_log(log)
    (line,) = [x for x in text.splitlines() if "room ward" in x]
    assert "2 acknowledged annotations missing" in line and "refused" in line, text
    assert ("objects_incomplete", "ward", None) in audit_kinds(data)

    # An operator serves it anyway: reported, recorded as accepted, and not reported again.
    with run_server(auth_secret=SECRET, data_dir=data, serve_incomplete_objects=1) as srv:
        gap = srv.get_json("/health")["integrity"]["incomplete_rooms"]["ward"]
        assert gap["served"] is True
        async with connect(srv.url, "ward", "Dr A", token=tok("ward"), reconnect=False) as host:
            await host.objects.wait_synced()
            (oid,) = host.objects
            assert len(host.objects[oid].annotations) == 3
            await host.annotate(oid, "pin", [(0.0, 0.0, 0.0)], text="after the loss")
    assert ("objects_gap_accepted", "ward", None) in audit_kinds(data)
    with run_server(auth_secret=SECRET, data_dir=data) as srv:
        health = srv.get_json("/health")
        assert health["status"] == "ok" and health["integrity"]["incomplete_rooms"] == {}


def test_the_store_hashes_each_file_version_once_and_knows_lost_from_removed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from medverse.server import assets
    from medverse.server.auth import Identity
    from medverse.server.gltf import validate_glb

    store = assets.AssetStore(tmp_path)
    model = triangle_glb(nodes=("cached",), extra=1000)
    sha = hashlib.sha256(model).hexdigest()
    staged = store.tmp / "upload.glb"
    staged.write_bytes(model)
    who = Identity("dr-a", "Dr A", "r", "host", frozenset())
    store.add("r", "m.glb", who, staged, sha, validate_glb(model))
    hashed: list[int] = []
    real = assets.hashlib.sha256
    monkeypatch.setattr(assets.hashlib, "sha256", lambda *a: hashed.append(1) or real(*a))
    for _ in range(5):  # range requests of one version: no re-hash (stored just now, hashed)
        assert store.check(sha) is None
    assert hashed == []
    assert store.check(sha, reread=True) is None and hashed == [1]  # what a scrub does
    flip_byte(store.blob_path(sha), 10)  # a new version (new mtime): hashed again
    assert store.check(sha) == "its content differs from its SHA-256" and len(hashed) == 2
    store.blob_path(sha).unlink()
    assert store.check(sha) == "the file is missing"
    store.remove("r", sha)  # removed from its last room: nothing to vouch for
    assert store.check(sha) is None
    store.close()
