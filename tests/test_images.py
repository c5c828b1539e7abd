"""Image series in a case review, against a real server: a CT uploaded, refused while
identifiable, de-identified, scrolled together by twelve clinicians, pointed at, measured and
linked to the 3D model; the HTTP rules (grants, ETag, Range); bad input for every viewer
message; the viewer state across a restart."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
import pytest
from pydicom.data import get_testdata_file

from benchmarks.dicomgen import SPHERE_HU, phantom_of, synthetic_ct
from medverse.client_sdk import (
    ImageError,
    ImageViewError,
    MeasurementChanged,
    PointerMoved,
    Session,
    connect,
)
from medverse.client_sdk.images import ImageClient, zip_files
from medverse.protocol.images import CLIENT_IMAGES, ImageAck, ImageRefused, Pointers
from medverse.protocol.messages import PROTOCOL_VERSION, Error, Hello, Message, encode_message
from medverse.server.audit import DB_FILE
from medverse.server.auth import mint_admin_token, mint_token

from .conftest import ServerProcess, run_server
from .helpers import RawClient, wait_for
from .models import HEART, provide, sha256_of

SECRET = "i" * 48
ROWS, COLS, SLICES = 64, 64, 24
FOR_UID = "1.2.826.0.1.3680043.8.498.2001"  # synthetic_ct's frame of reference
PHANTOM = phantom_of(ROWS, COLS, SLICES)


@pytest.fixture(scope="module")
def srv() -> Iterator[ServerProcess]:
    data = tempfile.mkdtemp(prefix="medverse-img-")
    with run_server(
        auth_secret=SECRET,
        data_dir=data,
        room_linger=0.3,
        resume_grace=0.5,
        identifiable_image_rooms="research-.*",
        pseudonymous_rooms="pseudo-.*",
        max_series_bytes=4_000_000,
    ) as s:
        s.data_dir = Path(data)  # type: ignore[attr-defined]
        yield s


def tok(room: str, who: str, role: str = "participant", grants: list[str] | None = None) -> str:
    return mint_token(SECRET.encode(), room=room, identity=who, name=who, role=role, grants=grants)


@pytest.fixture(scope="module")
def ct_phi() -> dict[str, bytes]:
    return synthetic_ct(ROWS, COLS, SLICES, phi=True)


@asynccontextmanager
async def member(
    url: str, room: str, who: str, role: str = "participant"
) -> AsyncIterator[Session]:
    s = connect(url, room=room, name=who, token=tok(room, who, role), ping_interval=0)
    await s.start()
    try:
        await s.panels.wait_synced()
        yield s
    finally:
        await s.close()


async def next_event(s: Session, kind: type, timeout: float = 5.0, **match: Any) -> Any:
    events = s.events()
    async with asyncio.timeout(timeout):
        while True:
            ev = await anext(events)
            if isinstance(ev, kind) and all(getattr(ev, k) == v for k, v in match.items()):
                return ev


def audit_entries(srv: ServerProcess, room: str) -> list[tuple[str, dict[str, Any]]]:
    db = sqlite3.connect(srv.data_dir / DB_FILE)  # type: ignore[attr-defined]
    try:
        rows = db.execute("SELECT kind, detail FROM entries WHERE room = ?", (room,)).fetchall()
    finally:
        db.close()
    return [(k, json.loads(d) if d else {}) for k, d in rows]


def audit_text(srv: ServerProcess) -> str:
    db = sqlite3.connect(srv.data_dir / DB_FILE)  # type: ignore[attr-defined]
    try:
        return "\n".join(
            str(r) for r in db.execute("SELECT kind, actor, subject, detail FROM entries")
        )
    finally:
        db.close()


#: The case review's team: a host radiologist, a surgeon, an oncologist and nine more.
TEAM = 12


async def test_case_review(srv: ServerProcess, ct_phi: dict[str, bytes]) -> None:
    room = "tumour-board"
    async with AsyncExitStack() as stack:
        host = await stack.enter_async_context(member(srv.url, room, "radiologist", "host"))
        surgeon = await stack.enter_async_context(member(srv.url, room, "surgeon"))
        onc = await stack.enter_async_context(member(srv.url, room, "oncologist"))
        others = [
            await stack.enter_async_context(member(srv.url, room, f"clinician-{i}"))
            for i in range(4, TEAM + 1)
        ]
        everyone = (host, surgeon, onc, *others)
        assert len(everyone) == TEAM and len({s.member_id for s in everyone}) == TEAM
        # 1. The export from the scanner is identifiable: refused, with the attributes.
        with pytest.raises(ImageError) as refused:
            await host.upload_series(ct_phi, "abdomen CT")
        assert refused.value.code == "identifiable_data" and refused.value.status == 422
        for kw in ("PatientName", "PatientID", "PatientBirthDate", "ImageComments"):
            assert kw in refused.value.attributes
        # 2. De-identified on request.
        listing = await host.upload_series(ct_phi, "abdomen CT", deidentify=True)
        assert listing.deidentified and listing.instances == SLICES
        assert listing.frame_of_reference != FOR_UID and listing.frame_of_reference
        kinds = dict(audit_entries(srv, room))
        assert kinds["series_refused_identifiable"]["attributes"] == list(refused.value.attributes)
        assert "PatientName:Z" in kinds["series_deidentified"]["actions"]
        log = audit_text(srv)
        for value in ("Doe", "MRN-0042", "19610412", "Harbour", "jsmith"):
            assert value not in log  # keywords only, never a value
        sha = listing.sha256
        desc = await surgeon.series(sha)
        assert desc["units"] == "HU" and desc["window"] == [40.0, 400.0]
        assert desc["planes"]["axial"]["count"] == SLICES
        assert desc["planes"]["coronal"]["rows"] == SLICES
        # 3. A panel in the room; everyone sees it.
        panel = await host.open_panel(sha, position=(0.0, 1.4, -1.2), width=0.8)
        await wait_for(lambda: all(panel in s.panels for s in everyone))
        assert surgeon.panels[panel].slices == (SLICES // 2, ROWS // 2, COLS // 2)
        # 4. Scrolling together: first all nine others scroll at once (each change is
        # acknowledged and applied in one order), then the host scrolls, the surgeon changes
        # the window, the oncologist zooms; all twelve end with the same state.
        await asyncio.gather(
            *(
                o.set_image_view(panel, slices=(1 + i, ROWS // 2, COLS // 2))
                for i, o in enumerate(others)
            )
        )
        for k in range(3, 13):
            await host.set_image_view(panel, slices=(k, ROWS // 2, COLS // 2))
        await surgeon.set_image_view(panel, window=(60.0, 300.0), plane="coronal")
        await onc.set_image_view(panel, zoom=2.0, pan=(0.1, -0.2))
        final = len(others) + 12  # one version per change
        await wait_for(lambda: all(s.panels[panel].version >= final for s in everyone))
        states = {
            (p.slices, p.window, p.plane, p.zoom, p.pan, p.version)
            for p in (s.panels[panel] for s in everyone)
        }
        assert states == {((12, 32, 32), (60.0, 300.0), "coronal", 2.0, (0.1, -0.2), final)}
        # 5. A pointer everyone sees.
        target = (PHANTOM.sphere_center[0], PHANTOM.sphere_center[1], 30.0)
        await surgeon.point(panel, target)
        ev = await next_event(host, PointerMoved, member_id=surgeon.member_id)
        assert ev.panel_id == panel and ev.point == pytest.approx(target)
        await wait_for(lambda: surgeon.member_id in onc.panels.pointers)
        await surgeon.point(panel, None)
        await wait_for(lambda: surgeon.member_id not in onc.panels.pointers)
        # A pointer on a panel that closes goes with it.
        scratch = await onc.open_panel(sha, position=(1.0, 1.4, -1.2))
        await host.point(scratch, target)
        await wait_for(lambda: host.member_id in surgeon.panels.pointers)
        await onc.close_panel(scratch)
        await wait_for(lambda: host.member_id not in surgeon.panels.pointers)
        await wait_for(lambda: scratch not in surgeon.panels)
        # 6. Measurements, computed by the server from the pixels.
        cx, cy, cz = PHANTOM.sphere_center
        dist = await surgeon.measure(sha, "distance", [(cx, cy, cz), (cx + 6.0, cy + 8.0, cz)])
        angle = await host.measure(
            sha, "angle", [(cx + 5, cy, cz), (cx, cy, cz), (cx, cy + 5, cz)], label="axes"
        )
        s = 2.0
        roi = await host.measure(
            sha,
            "roi",
            [
                (cx - s, cy - s, cz),
                (cx + s, cy - s, cz),
                (cx + s, cy + s, cz),
                (cx - s, cy + s, cz),
            ],
            label="lesion",
        )
        await wait_for(
            lambda: all({dist, angle, roi} <= set(s.panels.measurements) for s in everyone)
        )
        m = onc.panels.measurements
        assert m[dist].value == pytest.approx(10.0) and m[dist].author == "surgeon"
        assert m[angle].value == pytest.approx(90.0)
        assert m[roi].mean == SPHERE_HU and m[roi].sd == 0.0 and m[roi].units == "HU"
        assert m[roi].pixels and m[roi].value == pytest.approx(m[roi].pixels * 0.49)
        with pytest.raises(ImageViewError) as e:
            await onc.delete_measurement(angle)  # someone else's
        assert e.value.code == "forbidden"
        await host.delete_measurement(dist)  # a host may
        ev = await next_event(surgeon, MeasurementChanged, measurement_id=dist, deleted=True)
        assert dist not in surgeon.panels.measurements
        # 7. Linked to the model made from this CT: a point on the model scrolls the images.
        models = await provide(srv.url, room, tok(room, "radiologist", "host"), HEART)
        obj = await host.spawn(models[0], (0.0, 1.0, -1.0), name="liver")
        with pytest.raises(ImageViewError) as e:
            await host.link_panel(panel, obj, "1.2.3.4.5")
        assert e.value.code == "out_of_range"
        # The segmentation tool knows the original frame of reference: the room maps it to
        # the de-identified one.
        await surgeon.link_panel(panel, obj, FOR_UID)
        await wait_for(lambda: host.panels[panel].object_id == obj)
        point_m = tuple(v / 1000.0 for v in (cx, cy, 10 * PHANTOM.slice_spacing))
        slices = await surgeon.locate(panel, point_m)  # type: ignore[arg-type]
        assert slices == (10, 32, 32)
        await wait_for(lambda: all(s.panels[panel].slices == (10, 32, 32) for s in everyone))
        # 8. Everyone renders the same images from the same state.
        p = onc.panels[panel]
        pngs = await asyncio.gather(
            *(s.fetch_slice(sha, "axial", p.slices[0], p.window) for s in everyone)
        )
        assert pngs[0].startswith(b"\x89PNG") and len(set(pngs)) == 1
        coronal = await host.fetch_slice(sha, "coronal", p.slices[1])
        sagittal = await host.fetch_slice(sha, "sagittal", p.slices[2])
        assert coronal != sagittal or coronal.startswith(b"\x89PNG")
        # 9. A late joiner gets everything.
        async with member(srv.url, room, "pathologist") as late:
            assert late.panels[panel].slices == (10, 32, 32)
            assert set(late.panels.measurements) == {angle, roi}


async def test_http_rules(srv: ServerProcess, ct_phi: dict[str, bytes]) -> None:
    room, other = "http-rules", "elsewhere"
    host = ImageClient(srv.url, room, tok(room, "chief", "host"))
    part = ImageClient(srv.url, room, tok(room, "resident"))
    anon = ImageClient(srv.url, room)
    wrong = ImageClient(srv.url, room, tok(other, "chief", "host"))
    foreign = ImageClient(srv.url, other, tok(other, "chief", "host"))
    clean = synthetic_ct(32, 32, 6)
    try:
        for client, code, status in (
            (part, "forbidden", 403),
            (anon, "unauthorized", 401),
            (wrong, "unauthorized", 401),
        ):
            with pytest.raises(ImageError) as e:
                await client.upload(clean)
            assert (e.value.code, e.value.status) == (code, status)
        listing = await host.upload(clean, "clean", multipart=True)  # .dcm files as parts
        assert not listing.deidentified
        again = await host.upload(clean, "clean")  # a zip this time: the same content
        assert again.sha256 == listing.sha256
        sha = listing.sha256
        with pytest.raises(ImageError) as e:
            await foreign.descriptor(sha)
        assert e.value.code == "not_found"
        with pytest.raises(ImageError) as e:
            await anon.descriptor(sha)
        assert e.value.code == "unauthorized"
        # Typed refusals of what is not one valid series.
        ct_small = Path(get_testdata_file("CT_small.dcm", download=False)).read_bytes()  # type: ignore[arg-type]
        mr_small = Path(get_testdata_file("MR_small.dcm", download=False)).read_bytes()  # type: ignore[arg-type]
        rtplan = Path(get_testdata_file("rtplan.dcm", download=False)).read_bytes()  # type: ignore[arg-type]
        # CT_small with its transfer syntax renamed to one nobody decodes (same length).
        assert b"1.2.840.10008.1.2.1\x00" in ct_small[:400]
        odd_syntax = ct_small.replace(b"1.2.840.10008.1.2.1\x00", b"1.2.840.10008.1.2.99", 1)
        for files, code in (
            ({"notes.txt": b"not an image " * 40}, "not_dicom"),
            ({"plan.dcm": rtplan}, "no_pixel_data"),
            ({"ct.dcm": ct_small, "mr.dcm": mr_small}, "mixed_series"),
            ({"ct.dcm": odd_syntax}, "unsupported_transfer_syntax"),
        ):
            with pytest.raises(ImageError) as e:
                await host.upload(files, deidentify=True)
            assert (e.value.code, e.value.status) == (code, 422), files.keys()
        with pytest.raises(ImageError) as e:
            await host.upload(b"\0" * 4_100_000)
        assert (e.value.code, e.value.status) == ("oversized", 413)
        # Identifiable images are taken where the room allows them.
        research = ImageClient(srv.url, "research-7", tok("research-7", "chief", "host"))
        try:
            kept = await research.upload(ct_phi, "as acquired")
            assert not kept.deidentified and kept.frame_of_reference == FOR_UID
        finally:
            await research.close()
        assert "series_uploaded_identifiable" in dict(audit_entries(srv, "research-7"))
        # Images: ETag, If-None-Match, Range, HEAD, bad requests.
        png, etag = await part.fetch_slice(sha, "sagittal", 5, (40, 400))
        assert png is not None and png.startswith(b"\x89PNG") and etag.startswith('"')
        none, same = await part.fetch_slice(sha, "sagittal", 5, (40, 400), etag=etag)
        assert none is None and same == etag
        url = f"{part.base}/rooms/{room}/series/{sha}/sagittal/5.png?window=40,400"
        headers = {"Authorization": f"Bearer {tok(room, 'resident')}"}
        async with aiohttp.ClientSession() as http:
            async with http.get(url, headers={**headers, "Range": "bytes=10-19"}) as r:
                assert r.status == 206 and await r.read() == png[10:20]
                assert r.headers["Content-Range"] == f"bytes 10-19/{len(png)}"
            async with http.get(url, headers={**headers, "Range": "bytes=-5"}) as r:
                assert r.status == 206 and await r.read() == png[-5:]
            async with http.get(url, headers={**headers, "Range": f"bytes={len(png)}-"}) as r:
                assert r.status == 416
            async with http.get(
                url, headers={**headers, "Range": "bytes=0-3", "If-Range": '"other"'}
            ) as r:
                assert r.status == 200 and await r.read() == png
            async with http.head(url, headers=headers) as r:
                assert r.status == 200 and int(r.headers["Content-Length"]) == len(png)
            base = f"{part.base}/rooms/{room}/series/{sha}"
            for path, status, code in (
                ("/oblique/1.png", 400, "out_of_range"),
                ("/axial/6.png", 400, "out_of_range"),
                ("/axial/-1.png", 400, "out_of_range"),
                ("/axial/x.png", 400, "bad_field"),
                ("/axial/1.png?window=40", 400, "bad_field"),
                ("/axial/1.png?window=40,0", 400, "out_of_range"),
            ):
                async with http.get(base + path, headers=headers) as r:
                    body = await r.json()
                    assert (r.status, body["error"]["code"]) == (status, code), path
        # Removal: the uploader or a host.
        with pytest.raises(ImageError) as e:
            await part.remove_series(sha)
        assert e.value.code == "forbidden"
        await host.remove_series(sha)
        assert [s.sha256 for s in await part.list_series()] == []
    finally:
        for c in (host, part, anon, wrong, foreign):
            await c.close()


# --------------------------------------------------------------------------- bad input


async def raw_member(url: str, room: str, who: str, role: str = "participant") -> RawClient:
    raw = await RawClient.open(url)
    hello = Hello(PROTOCOL_VERSION, room, who, 3, None, tok(room, who, role))
    await raw.ws.send_bytes(encode_message(hello))
    return raw


async def shut(raw: RawClient) -> None:
    await raw.close()
    await raw.http.close()


def frame(wire: dict[str, Any]) -> bytes:
    return b"\x01" + msgpack.packb(wire, use_bin_type=True)


async def answer(raw: RawClient, req: int | None, timeout: float = 5.0) -> Message:
    """The answer naming ``req`` (or, for None, the next error)."""
    deadline = time.monotonic() + timeout
    while True:
        m = await raw.next_control(max(0.05, deadline - time.monotonic()))
        if req is None and isinstance(m, Error):
            return m
        if isinstance(m, ImageAck | ImageRefused) and m.req == req:
            return m


async def test_bad_input_for_every_image_message(srv: ServerProcess) -> None:
    room = "bad-images"
    host_tok = tok(room, "lead", "host")
    up = ImageClient(srv.url, room, host_tok)
    try:
        sha = (await up.upload(synthetic_ct(32, 32, 8))).sha256
    finally:
        await up.close()
    raw = await raw_member(srv.url, room, "fuzzer")
    async with member(srv.url, room, "lead", "host") as lead:
        pid = await lead.open_panel(sha)
        mid = await lead.measure(sha, "distance", [(0, 0, 5), (3, 0, 5)])
        pos, rot = [0.0, 1.5, -1.0], [0.0, 0.0, 0.0, 1.0]
        cases: list[tuple[str, dict[str, Any], str]] = [
            # malformed (wrong kinds of values)
            (
                "img_open",
                {"series": 5, "position": pos, "rotation": rot, "width": 1.0},
                "bad_field",
            ),
            ("img_close", {"panel_id": "one"}, "bad_field"),
            ("img_view", {"panel_id": pid, "slices": "all"}, "bad_field"),
            ("img_view", {"panel_id": pid, "window": [40]}, "bad_field"),
            ("img_place", {"panel_id": pid, "position": [0, 1], "rotation": rot}, "bad_field"),
            ("img_link", {"panel_id": pid, "object_id": 1, "extra": 1}, "bad_field"),
            ("img_locate", {"panel_id": pid, "point": "here"}, "bad_field"),
            ("img_measure", {"series": sha, "kind": "distance", "points": 3}, "bad_field"),
            ("img_unmeasure", {"measurement_id": None}, "bad_field"),
            # out of range (decoded)
            (
                "img_open",
                {"series": sha, "position": pos, "rotation": rot, "width": 50.0},
                "out_of_range",
            ),
            ("img_close", {"panel_id": 0}, "out_of_range"),
            ("img_view", {"panel_id": pid, "window": [40.0, 0.0]}, "out_of_range"),
            ("img_view", {"panel_id": pid, "zoom": 100.0}, "out_of_range"),
            ("img_view", {"panel_id": pid, "pan": [0.0, 11.0]}, "out_of_range"),
            ("img_view", {"panel_id": pid, "plane": "oblique"}, "out_of_range"),
            ("img_view", {"panel_id": pid, "slices": [1, 2, 70000]}, "out_of_range"),
            (
                "img_place",
                {"panel_id": pid, "position": [1e9, 0, 0], "rotation": rot},
                "out_of_range",
            ),
            (
                "img_link",
                {"panel_id": pid, "object_id": 1, "frame_of_reference": "x"},
                "out_of_range",
            ),
            ("img_locate", {"panel_id": pid, "point": [float("nan"), 0, 0]}, "out_of_range"),
            (
                "img_measure",
                {"series": sha, "kind": "volume", "points": [[0, 0, 0]]},
                "out_of_range",
            ),
            ("img_unmeasure", {"measurement_id": 0}, "out_of_range"),
            # out of range (against the series and the room)
            ("img_view", {"panel_id": pid, "slices": [8, 0, 0]}, "out_of_range"),
            ("img_view", {"panel_id": 999}, "not_found"),
            ("img_view", {"panel_id": pid, "series": "ab" * 32}, "not_found"),
            (
                "img_open",
                {"series": "cd" * 32, "position": pos, "rotation": rot, "width": 1.0},
                "not_found",
            ),
            ("img_locate", {"panel_id": pid, "point": [0, 0, 0]}, "not_found"),  # not linked
            (
                "img_link",
                {"panel_id": pid, "object_id": 77, "frame_of_reference": FOR_UID},
                "not_found",
            ),
            (
                "img_measure",
                {"series": sha, "kind": "distance", "points": [[0, 0, 5], [0, 0, 900]]},
                "out_of_range",
            ),
            (
                "img_measure",
                {"series": sha, "kind": "roi", "points": [[0, 0, 5]] * 65},
                "out_of_range",
            ),
            (
                "img_measure",
                {"series": sha, "kind": "angle", "points": [[0, 0, 5]] * 2},
                "out_of_range",
            ),
            ("img_unmeasure", {"measurement_id": mid}, "forbidden"),  # the lead's
        ]
        for req, (t, fields, code) in enumerate(cases, start=1):
            await raw.ws.send_bytes(frame({"t": t, "req": req, **fields}))
            got = await answer(raw, req)
            assert isinstance(got, ImageRefused) and got.code == code, (t, fields, got)
        # Oversized: one frame over the control limit (a plain error: nothing was decoded).
        await raw.ws.send_bytes(
            frame(
                {
                    "t": "img_measure",
                    "req": 500,
                    "series": sha,
                    "kind": "roi",
                    "points": [[0, 0, 5]] * 3,
                    "label": "x" * 5000,
                }
            )
        )
        err = await answer(raw, None)
        assert isinstance(err, Error) and err.code == "oversized" and not err.fatal
        # Pointers: no req, so refusals are plain errors.
        for fields, code in (
            ({"panel_id": 999, "point": [0, 0, 0]}, "not_found"),
            ({"panel_id": pid}, "bad_field"),
            ({"panel_id": -1, "point": [0, 0, 0]}, "out_of_range"),
            ({"panel_id": pid, "point": [0, 0, "x"]}, "bad_field"),
        ):
            await raw.ws.send_bytes(frame({"t": "img_pointer", **fields}))
            err = await answer(raw, None)
            assert isinstance(err, Error) and err.code == code, (fields, err)
        # Oversized, for every message type: refused from the frame's size, before decoding.
        for n, t in enumerate(sorted(c.TYPE for c in CLIENT_IMAGES)):
            await asyncio.sleep(0.06)  # under the error-reply rate
            await raw.ws.send_bytes(frame({"t": t, "req": 600 + n, "pad": "x" * 5000}))
            err = await answer(raw, None)
            assert isinstance(err, Error) and err.code == "oversized", (t, err)
        # Flooding every request type a little (each is answered or refused, in order), then
        # the lead carries on.
        floods = {
            "img_place": {"panel_id": pid, "position": pos, "rotation": rot},
            "img_close": {"panel_id": 4242},
            "img_link": {"panel_id": pid},
            "img_locate": {"panel_id": pid, "point": [0, 0, 0]},
            "img_measure": {"series": sha, "kind": "distance", "points": [[0, 0, 5], [0, 1, 5]]},
            "img_unmeasure": {"measurement_id": 4242},
            "img_open": {"series": "cd" * 32, "position": pos, "rotation": rot, "width": 1.0},
        }
        req = 700
        for t, fields in floods.items():
            first = req
            for _ in range(30):
                await raw.ws.send_bytes(frame({"t": t, "req": req, **fields}))
                req += 1
            got = await answer(raw, req - 1, timeout=30)  # the last one: all before it are done
            assert isinstance(got, ImageAck | ImageRefused), (t, got)
            assert req - first == 30
        ours = [m for m in lead.panels.measurements.values() if m.author == "fuzzer"]
        assert 0 < len(ours) <= 30
        await lead.set_image_view(pid, slices=(2, 3, 4))
        # Flooding: scrolling and pointing as fast as the socket takes them. Excess is refused
        # by the connection's buckets (or the room's queue), answered or dropped, never
        # queued without bound; pointers reach the room once per tick at most.
        pointers_seen = 0

        def count(m: Message) -> None:
            nonlocal pointers_seen
            pointers_seen += 1

        lead.add_handler(Pointers, count)
        t0 = time.monotonic()
        for i in range(400):
            await raw.ws.send_bytes(
                frame({"t": "img_view", "req": 1000 + i, "panel_id": pid, "slices": [i % 8, 1, 1]})
            )
            await raw.ws.send_bytes(
                frame({"t": "img_pointer", "panel_id": pid, "point": [0.0, 0.0, float(i % 20)]})
            )
        # The lead is answered while the flood is still being read.
        await asyncio.wait_for(lead.set_image_view(pid, zoom=1.5), 10)
        elapsed = time.monotonic() - t0
        # Once the fuzzer's last request is answered (or it was closed for its violations),
        # nothing of the flood is left: the lead's next change is the room's state.
        await raw.ws.send_bytes(frame({"t": "img_view", "req": 9999, "panel_id": pid}))
        try:
            await answer(raw, 9999, timeout=20)
        except ConnectionError:
            pass
        await lead.set_image_view(pid, slices=(5, 6, 7))
        await wait_for(lambda: lead.panels[pid].slices == (5, 6, 7), timeout=10)
        ticks = (time.monotonic() - t0) * 30 + 5
        assert pointers_seen <= ticks, (pointers_seen, ticks, elapsed)
        # The fuzzer is refused or answered, and stays connected unless it went far beyond
        # the violation limit (then it is closed, and the room carries on as shown).
        await shut(raw)
    # Grants: an observer acts on nothing; a member without annotate cannot measure.
    watcher = await raw_member(srv.url, room, "watcher", "observer")
    try:
        await watcher.ws.send_bytes(frame({"t": "img_view", "req": 1, "panel_id": pid}))
        got = await answer(watcher, 1)
        assert isinstance(got, ImageRefused) and got.code == "forbidden"
        await watcher.ws.send_bytes(
            frame({"t": "img_pointer", "panel_id": pid, "point": [0, 0, 0]})
        )
        err = await answer(watcher, None)
        assert err.code == "forbidden"  # type: ignore[attr-defined]
    finally:
        await shut(watcher)
    viewer = await RawClient.open(srv.url)
    hello = Hello(
        PROTOCOL_VERSION,
        room,
        "viewer",
        3,
        None,
        tok(room, "viewer", grants=["manipulate_objects"]),
    )
    await viewer.ws.send_bytes(encode_message(hello))
    try:
        await viewer.ws.send_bytes(
            frame(
                {
                    "t": "img_measure",
                    "req": 1,
                    "series": sha,
                    "kind": "distance",
                    "points": [[0, 0, 5], [1, 0, 5]],
                }
            )
        )
        got = await answer(viewer, 1)
        assert isinstance(got, ImageRefused) and got.code == "forbidden"
    finally:
        await shut(viewer)
    # ... and one with annotate alone measures but does not scroll.
    scribe = await RawClient.open(srv.url)
    hello = Hello(
        PROTOCOL_VERSION, room, "scribe", 3, None, tok(room, "scribe", grants=["annotate"])
    )
    await scribe.ws.send_bytes(encode_message(hello))
    try:
        measure_frame = {
            "t": "img_measure",
            "req": 1,
            "series": sha,
            "kind": "distance",
            "points": [[0, 0, 5], [2, 0, 5]],
        }
        await scribe.ws.send_bytes(frame(measure_frame))
        got = await answer(scribe, 1)
        assert isinstance(got, ImageAck) and got.measurement_id, got
        await scribe.ws.send_bytes(frame({"t": "img_view", "req": 2, "panel_id": pid}))
        got = await answer(scribe, 2)
        assert isinstance(got, ImageRefused) and got.code == "forbidden"
    finally:
        await shut(scribe)


async def test_viewer_state_survives_a_restart() -> None:
    data = tempfile.mkdtemp(prefix="medverse-img-restart-")
    room = "restart-review"
    files = synthetic_ct(32, 32, 8)
    with run_server(auth_secret=SECRET, data_dir=data, room_linger=0.2) as s:
        async with member(s.url, room, "lead", "host") as lead:
            sha = (await lead.upload_series(files)).sha256
            pid = await lead.open_panel(sha)
            await lead.set_image_view(pid, slices=(6, 10, 11), window=(-500.0, 1500.0))
            mid = await lead.measure(sha, "distance", [(0, 0, 5), (0, 4, 5)], label="gap")
            await lead.panels.wait_version(pid, 1)
            await asyncio.sleep(1.2)  # two flush intervals: the view state is stored
    with run_server(auth_secret=SECRET, data_dir=data) as s:
        async with member(s.url, room, "lead", "host") as lead:
            p = lead.panels[pid]
            assert (p.series, p.slices, p.window) == (sha, (6, 10, 11), (-500.0, 1500.0))
            m = lead.panels.measurements[mid]
            assert m.value == pytest.approx(4.0) and m.label == "gap" and m.author == "lead"
            png = await lead.fetch_slice(sha, "axial", 6)
            assert png.startswith(b"\x89PNG")
            # The ids go on from where they were.
            assert await lead.open_panel(sha) == pid + 1


async def test_a_damaged_series_file_is_refused(srv: ServerProcess) -> None:
    room = "damaged"
    client = ImageClient(srv.url, room, tok(room, "chief", "host"))
    try:
        sha = (await client.upload(synthetic_ct(24, 24, 6, slice_spacing=3.0))).sha256
        png, _ = await client.fetch_slice(sha, "axial", 2)
        assert png is not None
        path = srv.data_dir / "images" / sha[:2] / f"{sha}.series"  # type: ignore[attr-defined]
        with open(path, "r+b") as f:  # bit rot: same size, other bytes
            f.seek(path.stat().st_size - 100)
            f.write(b"\xff" * 8)
        png, _ = await client.fetch_slice(sha, "axial", 2)  # rendered before: still served
        with pytest.raises(ImageError) as e:
            await client.fetch_slice(sha, "axial", 3)
        assert (e.value.code, e.value.status) == ("corrupt", 500)
        with pytest.raises(ImageError) as e:
            await client.descriptor(sha)
        assert e.value.code == "corrupt"
        assert "series_corrupt" in audit_text(srv)
        async with member(srv.url, room, "chief", "host") as chief:
            with pytest.raises(ImageViewError) as refused:
                await chief.measure(sha, "distance", [(0, 0, 3), (1, 0, 3)])
            assert refused.value.code == "corrupt"
        # Uploading it again repairs it.
        again = await client.upload(synthetic_ct(24, 24, 6, slice_spacing=3.0))
        assert again.sha256 == sha
        png, _ = await client.fetch_slice(sha, "axial", 3)
        assert png is not None and png.startswith(b"\x89PNG")
    finally:
        await client.close()


def test_zip_helper_round_trips() -> None:
    import io
    import zipfile

    blob = zip_files({"a.dcm": b"1", "b.dcm": b"22"})
    with zipfile.ZipFile(io.BytesIO(blob)) as zf:
        assert {i.filename: zf.read(i) for i in zf.infolist()} == {"a.dcm": b"1", "b.dcm": b"22"}
    assert sha256_of(blob)


async def get_json(srv: ServerProcess, path: str, token: str) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as http,
        http.get(srv.http + path, headers={"Authorization": f"Bearer {token}"}) as r,
    ):
        return r.status, await r.json(content_type=None)


async def test_pseudonymous_rooms_show_no_real_name_over_http(srv: ServerProcess) -> None:
    room = "pseudo-review"
    owl = mint_token(
        SECRET.encode(),
        room=room,
        identity="dr-r",
        name="Dr Realname",
        role="host",
        pseudonym="Owl",
    )
    # No pseudonym in the token.
    plain = mint_token(
        SECRET.encode(), room=room, identity="dr-s", name="Dr Secretname", role="host"
    )
    series = [synthetic_ct(16, 16, 3), synthetic_ct(16, 16, 5)]
    answers: list[object] = []
    shas: list[str] = []
    for token, files in zip((owl, plain), series, strict=True):
        async with ImageClient(srv.url, room, token) as client:
            listing = await client.upload(files, "ct")
        answers.append(repr(listing))
        shas.append(listing.sha256)
    for path in (f"/rooms/{room}/series", *(f"/rooms/{room}/series/{h}" for h in shas)):
        status, body = await get_json(srv, path, owl)
        assert status == 200, body
        answers.append(body)
    # Every field of every answer: neither real name appears, only what the room shows.
    text = json.dumps(answers)
    assert "Realname" not in text and "Secretname" not in text, text
    listed = {s["sha256"]: s["uploader"] for s in answers[2]["series"]}  # type: ignore[index]
    assert listed == {shas[0]: "Owl", shas[1]: "Participant"}
    # The same person's upload in a room that is not pseudonymous shows the name, as its
    # WebSocket does.
    open_tok = mint_token(
        SECRET.encode(), room="open-review", identity="dr-r", name="Dr Realname", role="host"
    )
    async with ImageClient(srv.url, "open-review", open_tok) as client:
        assert (await client.upload(series[0], "ct")).uploader == "Dr Realname"


async def test_an_ended_session_lists_and_takes_no_series(srv: ServerProcess) -> None:
    room = "ending-review"
    host = tok(room, "chief", "host")
    client = await ImageClient(srv.url, room, host).__aenter__()
    sha = (await client.upload(synthetic_ct(16, 16, 3), "before the end")).sha256
    base = f"/rooms/{room}/series"
    async with client, connect(srv.url, room, "chief", token=host, reconnect=False):
        assert (await get_json(srv, base, host))[0] == 200
        admin = mint_admin_token(SECRET.encode(), identity="ops")
        async with (
            aiohttp.ClientSession() as http,
            http.post(
                f"{srv.http}/admin/rooms/{room}/end", headers={"Authorization": f"Bearer {admin}"}
            ) as r,
        ):
            assert r.status == 200
        # Ended: until the room closes nothing of it is listed, served or taken.
        for path in (base, f"{base}/{sha}", f"{base}/{sha}/axial/0.png"):
            status, body = await get_json(srv, path, host)
            assert (status, body["error"]["code"]) == (403, "session_ended"), path
        with pytest.raises(ImageError) as e:
            await client.upload(synthetic_ct(16, 16, 4), "after the end")
        assert (e.value.code, e.value.status) == ("session_ended", 403)
        with pytest.raises(ImageError) as e:
            await client.remove_series(sha)
        assert (e.value.code, e.value.status) == ("session_ended", 403)

    # The room closes after its linger time; a new session lists the room's series again.
    deadline = time.monotonic() + 10
    while (await get_json(srv, base, host))[0] != 200:
        assert time.monotonic() < deadline, "the room did not close"
        await asyncio.sleep(0.1)
    status, body = await get_json(srv, base, host)
    assert [s["sha256"] for s in body["series"]] == [sha]
