"""The clinic web app's case images and transfer controls in a real browser (Debian's Chromium
via tests/browser.py) against a real server on 127.0.0.1 running examples/clinic.toml: a CT
uploaded by a Python SDK client is opened in one page and followed by another page (image,
plane, window, pointer, measurement) and by the SDK; angles and regions measured by the SDK are
drawn where they lie and ones made in the page reach the SDK; a series uploaded from the page
is refused with the identifying attributes until de-identified, then shown to everyone; a
click on a model linked to the images moves them; a host page calls the next patient in from
the waiting room and sends them back.

Screenshots go to tests/artifacts/ (``webapp-images-*.png``).
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator
from typing import Any

import numpy as np
import pytest
import pytest_asyncio
from playwright.async_api import Browser, FilePayload, Page, async_playwright

from benchmarks.dicomgen import synthetic_ct
from medverse.client_sdk import connect
from medverse.client_sdk.images import zip_files
from medverse.protocol.tokens import mint_token
from medverse.server.webapp import WEBAPP_DIR
from tests.conftest import ROOT, ServerProcess, run_server
from tests.models import glb

harness = pytest.importorskip("tests.browser")
console_errors, new_page, screenshot = harness.console_errors, harness.new_page, harness.screenshot

WEB = ROOT / "web"
CLINIC = ROOT / "examples" / "clinic.toml"
SECRET = secrets.token_hex(32)
ROWS, COLS, SLICES = 64, 64, 24
PIXEL_MM = 0.7  # synthetic_ct's pixel spacing

pytestmark = [pytest.mark.timeout(180), pytest.mark.asyncio(loop_scope="module")]


def _build_app() -> None:
    """Bundle the app as `pip install` does, so the server serves this checkout's app."""
    npm = shutil.which("npm")
    if npm is None:
        pytest.skip("npm is not installed: the web app cannot be built")
    if not (WEB / "node_modules").exists():
        subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=WEB, check=True)
    subprocess.run([npm, "run", "--silent", "build:app"], cwd=WEB, check=True)


@pytest.fixture(scope="module")
def site() -> Iterator[ServerProcess]:
    """The app built and a server with tokens running the example clinic."""
    _build_app()
    assert (WEBAPP_DIR / "index.html").exists()
    with run_server(auth_secret=SECRET, clinic=str(CLINIC), room_linger=0.5, resume_grace=3.0) as s:
        yield s


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def browser() -> AsyncIterator[Browser]:
    """Headless Chromium as tests/browser.py launches it, shared by this module's tests."""
    missing = harness.chromium_missing()
    if missing:
        if os.environ.get("CI"):
            pytest.fail(missing)
        pytest.skip(missing)
    async with async_playwright() as pw:
        b = await harness.launch(pw)
        try:
            yield b
        finally:
            await b.close()


@pytest_asyncio.fixture(loop_scope="module")
async def pages(browser: Browser) -> AsyncIterator[list[Page]]:
    """Pages a test opened, checked for console errors and closed at the end."""
    opened: list[Page] = []
    yield opened
    errors = [e for page in opened for e in console_errors(page) if "GPU stall" not in e]
    for page in opened:
        await page.context.close()
    assert errors == []


def token(room: str, identity: str, name: str, role: str = "participant") -> str:
    return mint_token(SECRET.encode(), room=room, identity=identity, name=name, role=role)


async def open_app(browser: Browser, site: ServerProcess, tok: str, pages: list[Page]) -> Page:
    """A page on /join with the token in the fragment (tall enough to show the images)."""
    page = await new_page(browser, viewport={"width": 1100, "height": 900})
    pages.append(page)
    await page.goto(f"{site.http}/join#token={tok}")
    return page


async def wait_for(page: Page, expr: str, timeout: float = 30.0) -> Any:
    """Wait until ``expr`` (JavaScript) is truthy in the page; its value (generous: the
    machine may be busy with other work)."""
    handle = await page.wait_for_function(f"() => ({expr})", timeout=timeout * 1000, polling=50)
    return await handle.json_value()


async def screen(page: Page, name: str, timeout: float = 30.0) -> None:
    await wait_for(page, f"window.medverse?.screen === {json.dumps(name)}", timeout)


async def said(page: Page, text: str) -> None:
    await wait_for(page, f"window.medverse.announcements.includes({json.dumps(text)})")


async def into_room(page: Page, room: str) -> None:
    """Agree to the room's consent text when asked, until the page is in ``room``."""
    arrived = (
        "window.medverse.screen === 'room' && window.medverse.state === 'joined' && "
        f"window.medverse.client?.room === {json.dumps(room)}"
    )
    for _ in range(3):
        now = await wait_for(
            page, f"(window.medverse?.screen === 'consent' && 'consent') || (({arrived}) && 'in')"
        )
        if now == "in":
            assert (await page.inner_text("#where")).startswith(f"Room {room} ")
            return
        await page.click("#consent-accept")
        await wait_for(page, "window.medverse.screen !== 'consent'")
    raise AssertionError(f"the page did not arrive in {room}")


async def images(page: Page) -> dict[str, Any]:
    state: dict[str, Any] = await page.evaluate("window.medverse.images")
    return state


async def click_image_pixel(page: Page, col: float, row: float) -> None:
    """Click the centre of image pixel (col, row) of the page's image canvas."""
    lay = (await images(page))["layout"]
    box = await page.locator("#image-canvas").bounding_box()
    assert box is not None
    css = box["width"] / lay["size"]
    x = box["x"] + (lay["x0"] + (col + 0.5) * lay["px"]) * css
    y = box["y"] + (lay["y0"] + (row + 0.5) * lay["py"]) * css
    await page.mouse.move(x, y)
    await page.mouse.click(x, y)


async def test_a_series_opened_in_one_page_is_followed_by_another(
    browser: Browser, site: ServerProcess, pages: list[Page]
) -> None:
    room = "review-1"  # not a room of the clinic: the server's own flags, no consent
    async with connect(
        site.url, room=room, token=token(room, "dr-r", "Dr Rad", "host"), ping_interval=0
    ) as bot:
        listing = await bot.upload_series(
            synthetic_ct(ROWS, COLS, SLICES), "abdomen CT", deidentify=True
        )
        a = await open_app(browser, site, token(room, "dr-a", "Dr Ada", "host"), pages)
        b = await open_app(browser, site, token(room, "dr-b", "Dr Ben"), pages)
        await screen(a, "room")
        await screen(b, "room")
        await wait_for(a, "window.medverse.images.series.length === 1")
        assert await b.is_visible("#image-viewer") is False
        assert "No image panel is open" in await b.inner_text("#images-note")

        # Opened by keyboard: the series list, then the Open button.
        await a.select_option("#series-select", listing.sha256)
        await a.focus("#series-open")
        await a.keyboard.press("Enter")
        state = await wait_for(a, "window.medverse.images.shown")
        assert state["plane"] == "axial" and state["series"] == listing.sha256
        start = state["index"]
        assert 0 <= start < SLICES
        panel_id = (await images(a))["panelId"]
        # The other page shows the same image, from the server's PNG.
        await wait_for(b, f"window.medverse.images.shown?.key === {json.dumps(state['key'])}")
        assert await b.is_visible("#image-viewer")
        assert f"image {start + 1} of {SLICES}" in await b.inner_text("#image-caption")
        # Drawn: the body (soft tissue) and the denser sphere in it, two grey levels at least.
        await b.locator("#image-viewer").scroll_into_view_if_needed()
        body, levels = await b.evaluate(
            """() => { const c = document.getElementById('image-canvas');
                const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
                const counts = new Map(); let body = 0;
                for (let i = 0; i < d.length; i += 4) if (d[i] > 40) {
                  body++; counts.set(d[i], (counts.get(d[i]) ?? 0) + 1); }
                const common = [...counts.values()].filter((n) => n > d.length / 4 / 200);
                return [body / (d.length / 4), common.length]; }"""
        )
        await screenshot(b, "webapp-images-opened-b")
        assert body > 0.2 and levels >= 2, (body, levels)
        await screenshot(a, "webapp-images-opened-a")
        # The panel stands in the 3D room too, showing the same image, its height from the
        # series' geometry (64 x 0.7 mm square in the axial plane).
        key = json.dumps(state["key"])
        drawn = await wait_for(b, f"window.medverse.imagePanels[{panel_id}]?.key === {key}")
        assert drawn
        panel3d = (await b.evaluate("window.medverse.imagePanels"))[str(panel_id)]
        assert panel3d["position"] == [0, 1.5, -1.2] and panel3d["width"] == 0.6
        assert abs(panel3d["height"] - 0.6) < 1e-9

        # Scrolling in page A by keyboard and wheel: page B and the SDK client follow.
        await a.focus("#image-canvas")
        for _ in range(3):
            await a.keyboard.press("ArrowUp")
        box = await a.locator("#image-canvas").bounding_box()
        assert box is not None
        await a.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
        await a.mouse.wheel(0, -120)
        want = start + 4
        await wait_for(
            b,
            "window.medverse.images.shown?.plane === 'axial' && "
            f"window.medverse.images.shown?.index === {want}",
        )
        for _ in range(100):
            if bot.panels[panel_id].slices[0] == want:
                break
            await asyncio.sleep(0.05)
        assert bot.panels[panel_id].slices[0] == want
        # Page A's mouse over the image is page B's pointer.
        a_id = await a.evaluate("window.medverse.memberId")
        await wait_for(b, f"window.medverse.images.pointers.some((p) => p.memberId === {a_id})")
        assert "Dr Ada" in await b.inner_text("#image-pointers")

        # The plane (key C) and the window (the presets) are shared too.
        await a.focus("#image-canvas")
        await a.keyboard.press("c")
        await wait_for(b, "window.medverse.images.shown?.plane === 'coronal'")
        await a.select_option("#image-window", "bone")
        await wait_for(b, "JSON.stringify(window.medverse.images.shown?.window) === '[400,1800]'")
        assert bot.panels[panel_id].plane == "coronal"

        # A distance measured in page A by two clicks: 40 pixels along a row of the image.
        await a.click("#measure-start")
        await wait_for(a, "window.medverse.images.tool === 'distance'")
        await click_image_pixel(a, 12, 20)
        await click_image_pixel(a, 52, 20)
        got = await wait_for(b, "window.medverse.images.measurements[0]")
        assert got["kind"] == "distance" and got["author"] == "Dr Ada"
        assert abs(got["value"] - 40 * PIXEL_MM) < 0.5, got
        assert f"{got['value']:.1f} mm" in await b.inner_text("#measure-list")
        for _ in range(100):
            if bot.panels.measurements:
                break
            await asyncio.sleep(0.05)
        assert [m.value for m in bot.panels.measurements.values()] == [got["value"]]
        # Page B's participant may not delete Dr Ada's measurement: no button is offered.
        assert await b.locator("#measure-list button").count() == 0
        # Page A points at the sphere: page B draws Dr Ada's pointer there.
        box = await a.locator("#image-canvas").bounding_box()
        assert box is not None
        await a.mouse.move(box["x"] + box["width"] * 0.52, box["y"] + box["height"] * 0.45)
        await wait_for(b, f"window.medverse.images.pointers.some((p) => p.memberId === {a_id})")
        await asyncio.sleep(0.3)  # the pointer's newest place reaches page B with the next tick
        assert "Pointing at the images: Dr Ada." in await b.inner_text("#image-pointers")
        await b.evaluate("window.medverse.place(0.3, 0, 0)")  # facing the panel in the room
        await asyncio.sleep(0.2)
        await screenshot(a, "webapp-images-measured-a")
        await screenshot(b, "webapp-images-followed-b")

        # The author deletes it from the list.
        await a.click("#measure-list button")
        await wait_for(b, "window.medverse.images.measurements.length === 0")

        # Page B measures with the keyboard alone: M, Enter at the cross (the image's centre),
        # five Shift+Right steps of 2 pixels, Enter: 10 pixels of 0.7 mm.
        await b.focus("#image-canvas")
        await b.keyboard.press("m")
        await wait_for(b, "window.medverse.images.tool === 'distance'")
        await b.keyboard.press("Enter")
        for _ in range(5):
            await b.keyboard.press("Shift+ArrowRight")
        await b.keyboard.press("Enter")
        got = await wait_for(a, "window.medverse.images.measurements[0]")
        assert got["author"] == "Dr Ben" and abs(got["value"] - 10 * PIXEL_MM) < 1e-6, got
        await said(b, "Distance measured: 7.0 mm.")
        # ... and deletes it from the list by keyboard too.
        await b.focus("#measure-list button")
        await b.keyboard.press("Enter")
        await wait_for(a, "window.medverse.images.measurements.length === 0")


async def test_a_host_calls_the_next_patient_in_and_sends_them_back(
    browser: Browser, site: ServerProcess, pages: list[Page]
) -> None:
    patient = await open_app(browser, site, token("waiting", "pat-1", "Pat Doe"), pages)
    await into_room(patient, "waiting")
    # A patient is offered no transfer controls; the waiting room has no image viewers.
    assert await patient.is_hidden("#clinic")
    assert await patient.is_hidden("#images")

    host = await open_app(browser, site, token("consult-1", "dr-c", "Dr Cole", "host"), pages)
    await into_room(host, "consult-1")
    assert await host.is_visible("#clinic-call")
    assert await host.is_disabled("#clinic-back")  # nobody to send back yet
    await host.click("#clinic-call")
    await said(patient, "You are being called in.")
    await into_room(patient, "consult-1")
    await wait_for(host, "document.getElementById('clinic-member').options.length === 1")
    assert "Pat Doe" in await host.inner_text("#people-list")
    assert "Dr Cole" in await patient.inner_text("#people-list")
    await wait_for(patient, "!document.getElementById('images').hidden")
    await said(host, "The next patient is on the way in.")
    await host.locator("#clinic").scroll_into_view_if_needed()
    await screenshot(host, "webapp-images-called-host")
    await screenshot(patient, "webapp-images-called-patient")

    # Nobody else waits: calling again is refused with the server's reason.
    await host.click("#clinic-call")
    alert = "document.getElementById('alert').textContent"
    await wait_for(host, f"{alert}.includes('nobody is waiting')")

    # Sent back with the keyboard: the patient is in the waiting room again.
    await host.focus("#clinic-back")
    await host.keyboard.press("Enter")
    await into_room(patient, "waiting")
    await wait_for(host, "document.getElementById('clinic-member').options.length === 0")
    await asyncio.sleep(0.5)  # img_synced would have come with the welcome by now
    assert await patient.is_hidden("#images")
    await screenshot(patient, "webapp-images-sent-back-patient")

    # Called again and moved on to another consultation room by its name, typed: a room with a
    # waiting room of its own, where the patient waits for that room's clinician.
    await host.click("#clinic-call")
    await into_room(patient, "consult-1")
    await wait_for(host, "document.getElementById('clinic-member').options.length === 1")
    await host.fill("#clinic-room", "consult-2")
    await host.press("#clinic-room", "Enter")
    for _ in range(3):
        now = await wait_for(
            patient,
            "['consent', 'lobby'].includes(window.medverse.screen) && window.medverse.screen",
        )
        if now == "lobby":
            break
        await patient.click("#consent-accept")
        await wait_for(patient, "window.medverse.screen !== 'consent'")
    await screen(patient, "lobby")
    assert (await patient.inner_text("#where")).startswith("Room consult-2 ")
    await said(host, "Pat Doe was moved to room consult-2.")


def quad_glb(z_m: float, half_m: float) -> bytes:
    """A square model in the plane z = ``z_m`` (metres, the series' patient frame), ``half_m``
    either side of the axis, both faces drawn: a model made from the CT."""
    a, z = float(np.float32(half_m)), float(np.float32(z_m))  # min and max as stored
    pos = np.array([[-a, -a, z], [a, -a, z], [a, a, z], [-a, a, z]], np.float32).tobytes()
    idx = np.array([0, 1, 2, 0, 2, 3], np.uint16).tobytes()
    doc = {
        "asset": {"version": "2.0", "generator": "medverse tests"},
        "scene": 0,
        "scenes": [{"nodes": [0]}],
        "nodes": [{"name": "liver", "mesh": 0}],
        "materials": [{"doubleSided": True}],
        "meshes": [{"primitives": [{"attributes": {"POSITION": 0}, "indices": 1, "material": 0}]}],
        "buffers": [{"byteLength": len(pos) + len(idx)}],
        "bufferViews": [
            {"buffer": 0, "byteOffset": 0, "byteLength": len(pos)},
            {"buffer": 0, "byteOffset": len(pos), "byteLength": len(idx)},
        ],
        "accessors": [
            {
                "bufferView": 0,
                "componentType": 5126,
                "count": 4,
                "type": "VEC3",
                "min": [-a, -a, z],
                "max": [a, a, z],
            },
            {"bufferView": 1, "componentType": 5123, "count": 6, "type": "SCALAR"},
        ],
    }
    return glb(doc, pos + idx)


def pixel_point(
    desc: dict[str, Any], plane: str, col: float, row: float, index: float
) -> list[float]:
    """The patient point (mm) of image pixel (col, row) of image ``index`` of ``plane``."""
    p = desc["planes"][plane]
    return [
        p["origin"][k]
        + col * p["col_step"][k]
        + row * p["row_step"][k]
        + index * p["slice_step"][k]
        for k in range(3)
    ]


async def drawn(page: Page) -> dict[str, dict[str, Any]]:
    """The measurements the page draws on its image now, by ``kind:id``."""
    return {f"{m['kind']}:{m['id']}": m for m in (await images(page))["drawn"]}


async def canvas_rgb(page: Page, x: float, y: float) -> list[int]:
    """The colour of the image canvas at canvas pixel (x, y)."""
    rgb: list[int] = await page.evaluate(
        """([x, y]) => [...document.getElementById('image-canvas').getContext('2d')
            .getImageData(Math.round(x), Math.round(y), 1, 1).data.slice(0, 3)]""",
        [x, y],
    )
    return rgb


async def measured(bot: Any, kind: str, before: set[int]) -> Any:
    """The bot's first measurement of ``kind`` not in ``before``, once it has arrived."""
    for _ in range(200):
        for m in bot.panels.measurements.values():
            if m.kind == kind and m.id not in before:
                return m
        await asyncio.sleep(0.05)
    raise AssertionError(f"no new {kind} measurement arrived")


async def click_scene_centre(page: Page) -> None:
    """Click the middle of the page's 3D view (where the centre cross aims)."""
    await page.locator("#scene").scroll_into_view_if_needed()
    box = await page.locator("#scene").bounding_box()
    assert box is not None
    await page.mouse.click(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)


def forget_refused_uploads(page: Page) -> None:
    """Chromium logs every answer of 400 or more as a console error: the refused uploads a
    test makes on purpose are not the page's errors."""
    errs = console_errors(page)
    errs[:] = [e for e in errs if not ("status of 422" in e and "/series" in e)]


async def test_angles_and_regions_are_drawn_and_made_in_the_page(
    browser: Browser, site: ServerProcess, pages: list[Page]
) -> None:
    room = "review-2"
    async with connect(
        site.url, room=room, token=token(room, "dr-r", "Dr Rad", "host"), ping_interval=0
    ) as bot:
        listing = await bot.upload_series(synthetic_ct(ROWS, COLS, SLICES), "CT", deidentify=True)
        sha = listing.sha256
        desc = await bot.series(sha)
        panel_id = await bot.open_panel(sha, (2.0, 1.5, -1.0))
        mid = bot.panels[panel_id].slices[0]
        a = await open_app(browser, site, token(room, "dr-a", "Dr Ada", "host"), pages)
        await screen(a, "room")
        await wait_for(a, f"window.medverse.images.shown?.index === {mid}")
        await a.locator("#image-viewer").scroll_into_view_if_needed()

        # An angle (a right angle, its vertex at the centre) and a region around the sphere,
        # both on the axial image shown, measured by the Python SDK: the page draws both.
        angle_px = [(20.0, 32.0), (32.0, 32.0), (32.0, 20.0)]
        roi_px = [(27.0, 27.0), (37.0, 27.0), (37.0, 37.0), (27.0, 37.0)]
        angle_id = await bot.measure(
            sha, "angle", [pixel_point(desc, "axial", c, r, mid) for c, r in angle_px]
        )
        roi_id = await bot.measure(
            sha, "roi", [pixel_point(desc, "axial", c, r, mid) for c, r in roi_px], label="lesion"
        )
        got = await wait_for(
            a, "window.medverse.images.drawn.length === 2 && window.medverse.images.drawn"
        )
        shapes = {m["kind"]: m for m in got}
        assert shapes["angle"]["id"] == angle_id and shapes["roi"]["id"] == roi_id
        assert shapes["angle"]["label"] == "90.0°"
        roi = bot.panels.measurements[roi_id]
        assert roi.mean is not None and roi.sd is not None
        assert shapes["roi"]["label"] == f"{roi.mean:.1f} ± {roi.sd:.1f} HU, {roi.value:.1f} mm²"
        # Drawn where they lie: the canvas points are the pixels' centres.
        lay = (await images(a))["layout"]

        def at(col: float, row: float) -> tuple[float, float]:
            return lay["x0"] + (col + 0.5) * lay["px"], lay["y0"] + (row + 0.5) * lay["py"]

        for kind, px in (("angle", angle_px), ("roi", roi_px)):
            for (x, y), (col, row) in zip(shapes[kind]["points"], px, strict=True):
                ex, ey = at(col, row)
                assert abs(x - ex) < 0.01 and abs(y - ey) < 0.01, (kind, x, y, ex, ey)
        # ... in their colours: an arm of the angle is blue, an edge of the region pink, where
        # the image itself is grey.
        r, g, b = await canvas_rgb(a, *at(26.0, 32.0))
        assert b > 2 * r and b > 100, (r, g, b)
        r, g, b = await canvas_rgb(a, *at(32.0, 27.0))
        assert r > g + 60 and r > 120, (r, g, b)
        listed = await a.inner_text("#measure-list")
        assert "Angle: 90.0°" in listed
        assert (
            f'Region "lesion": {roi.value:.1f} mm², mean {roi.mean:.1f} ± {roi.sd:.1f} HU' in listed
        )
        assert (
            await a.get_attribute("#image-canvas", "data-drawn") == f"angle:{angle_id} roi:{roi_id}"
        )
        await a.locator("#image-canvas").scroll_into_view_if_needed()
        await screenshot(a, "webapp-images-angle-roi-drawn")

        # Two images away, or in another plane, they are not drawn.
        await a.focus("#image-canvas")
        await a.keyboard.press("ArrowUp")
        await a.keyboard.press("ArrowUp")
        await wait_for(a, f"window.medverse.images.shown?.index === {mid + 2}")
        assert await drawn(a) == {}
        await a.keyboard.press("c")
        await wait_for(a, "window.medverse.images.shown?.plane === 'coronal'")
        assert await drawn(a) == {}
        await a.keyboard.press("a")
        await a.keyboard.press("ArrowDown")
        await a.keyboard.press("ArrowDown")
        await wait_for(
            a,
            f"window.medverse.images.shown?.plane === 'axial' && "
            f"window.medverse.images.shown?.index === {mid} && "
            "window.medverse.images.drawn.length === 2",
        )

        # The page measures an angle with three clicks, the vertex second: the SDK gets the
        # pixels' patient points and 90 degrees.
        before = set(bot.panels.measurements)
        await a.click("#measure-angle")
        await wait_for(a, "window.medverse.images.tool === 'angle'")
        clicks = [(10.0, 50.0), (20.0, 50.0), (20.0, 40.0)]
        for col, row in clicks:
            await click_image_pixel(a, col, row)
        m = await measured(bot, "angle", before)
        assert m.author == "Dr Ada" and abs(m.value - 90.0) < 1.0, m
        for got_p, (col, row) in zip(m.points, clicks, strict=True):
            want = pixel_point(desc, "axial", col, row, mid)
            assert max(abs(u - v) for u, v in zip(got_p, want, strict=True)) < 0.3, (got_p, want)
        await said(a, f"Angle measured: {m.value:.1f}°.")
        await wait_for(a, f"window.medverse.images.drawn.some((d) => d.id === {m.id})")

        # A region with the keyboard alone: R, Enter at the cross (the image's centre), three
        # steps of 2 pixels right, Enter, down, Enter, left, Enter, F. Backspace takes back a
        # point placed by mistake.
        before = set(bot.panels.measurements)
        await a.focus("#image-canvas")
        await a.keyboard.press("r")
        await wait_for(a, "window.medverse.images.tool === 'roi'")
        await a.keyboard.press("Enter")
        for step in ("Shift+ArrowRight", "Shift+ArrowDown", "Shift+ArrowLeft"):
            for _ in range(3):
                await a.keyboard.press(step)
            await a.keyboard.press("Enter")
        await a.keyboard.press("Shift+ArrowUp")
        await a.keyboard.press("Enter")
        assert len((await images(a))["draft"]) == 5
        await a.keyboard.press("Backspace")
        assert len((await images(a))["draft"]) == 4
        await a.keyboard.press("f")
        m = await measured(bot, "roi", before)
        c0 = (COLS - 1) / 2
        corners = [(c0, c0), (c0 + 6, c0), (c0 + 6, c0 + 6), (c0, c0 + 6)]
        for got_p, (col, row) in zip(m.points, corners, strict=True):
            want = pixel_point(desc, "axial", col, row, mid)
            assert max(abs(u - v) for u, v in zip(got_p, want, strict=True)) < 1e-6, (got_p, want)
        # Pixel centres 32-37 in both directions lie inside: 36 pixels of 0.49 mm².
        assert m.pixels == 36 and abs(m.value - 36 * PIXEL_MM**2) < 1e-6, m
        await said(a, f"Region measured: {m.value:.1f} mm², mean {m.mean:.1f} ± {m.sd:.1f} HU.")
        await wait_for(a, f"window.medverse.images.drawn.some((d) => d.id === {m.id})")
        await a.locator("#image-canvas").scroll_into_view_if_needed()
        await screenshot(a, "webapp-images-angle-roi-made")

        # A region by mouse, closed by a click on its first corner: a triangle of three.
        before = set(bot.panels.measurements)
        await a.click("#measure-roi")
        triangle = [(10.0, 10.0), (20.0, 10.0), (20.0, 20.0)]
        for col, row in [*triangle, triangle[0]]:
            await click_image_pixel(a, col, row)
        m = await measured(bot, "roi", before)
        assert len(m.points) == 3 and m.pixels, m
        for got_p, (col, row) in zip(m.points, triangle, strict=True):
            want = pixel_point(desc, "axial", col, row, mid)
            assert max(abs(u - v) for u, v in zip(got_p, want, strict=True)) < 0.3, (got_p, want)

        # A region holding no pixel centre is refused by the server: the page says so and
        # draws nothing new.
        count = len(bot.panels.measurements)
        await a.click("#measure-roi")
        for col, row in ((40.2, 40.2), (40.8, 40.2), (40.2, 40.8)):
            await click_image_pixel(a, col, row)
        await a.click("#measure-finish")
        alert = "document.getElementById('alert').textContent"
        await wait_for(a, f"{alert}.includes('was not stored: out_of_range')")
        assert (await images(a))["tool"] is None and len(bot.panels.measurements) == count

        # Deleted from the list by keyboard, like distances.
        await a.focus(f"#measure-list li[data-measurement-id='{angle_id}'] button")
        await a.keyboard.press("Enter")
        for _ in range(200):
            if angle_id not in bot.panels.measurements:
                break
            await asyncio.sleep(0.05)
        assert angle_id not in bot.panels.measurements
        await wait_for(a, f"!window.medverse.images.drawn.some((d) => d.id === {angle_id})")


async def test_a_series_uploaded_from_the_page_is_refused_until_deidentified(
    browser: Browser, site: ServerProcess, pages: list[Page]
) -> None:
    room = "review-3"
    async with connect(
        site.url, room=room, token=token(room, "dr-r", "Dr Rad", "host"), ping_interval=0
    ) as bot:
        a = await open_app(browser, site, token(room, "dr-a", "Dr Ada", "host"), pages)
        b = await open_app(browser, site, token(room, "dr-b", "Dr Ben"), pages)
        await screen(a, "room")
        await screen(b, "room")
        assert await b.is_hidden("#series-add")  # a participant of this room may not upload
        assert await a.is_visible("#series-upload")

        # Not DICOM: refused by name, nothing to de-identify.
        await a.set_input_files(
            "#series-upload",
            files=[FilePayload(name="notes.txt", mimeType="text/plain", buffer=b"not an image")],
        )
        await wait_for(a, "window.medverse.images.upload?.state === 'refused'")
        assert await a.get_attribute("#series-refusal", "data-code") == "not_dicom"
        assert "A file is not DICOM" in await a.inner_text("#series-refusal")
        assert await a.is_hidden("#series-deidentify")

        # Burned into the pixels: identifiable, and no de-identification is offered.
        burned = zip_files(synthetic_ct(16, 16, 3, burned_in=True))
        await a.set_input_files(
            "#series-upload",
            files=[FilePayload(name="burned.zip", mimeType="application/zip", buffer=burned)],
        )
        await wait_for(
            a,
            "window.medverse.images.upload?.state === 'refused' && "
            "window.medverse.images.upload.code === 'identifiable_data'",
        )
        assert (await images(a))["upload"]["attributes"] == ["BurnedInAnnotation"]
        assert "cannot be de-identified here" in await a.inner_text("#series-refusal")
        assert await a.is_hidden("#series-deidentify")

        # Several .dcm files carrying a patient's name and ids: refused with the attributes'
        # keywords (never their values) and an offer to de-identify.
        files = synthetic_ct(32, 32, 8, phi=True)
        await a.fill("#series-name", "Chest CT")
        await a.set_input_files(
            "#series-upload",
            files=[
                FilePayload(name=n, mimeType="application/dicom", buffer=data)
                for n, data in files.items()
            ],
        )
        await wait_for(
            a,
            "window.medverse.images.upload?.state === 'refused' && "
            "window.medverse.images.upload.attributes.includes('PatientName')",
        )
        up = (await images(a))["upload"]
        assert up["code"] == "identifiable_data"
        assert {"PatientName", "PatientID", "PatientBirthDate"} <= set(up["attributes"]), up
        keywords = await a.inner_text("#series-attributes")
        assert "PatientName" in keywords and "Doe" not in keywords
        assert "does not take identifiable images" in await a.inner_text("#series-refusal")
        assert await a.is_visible("#series-deidentify")
        await a.locator("#series-refusal").scroll_into_view_if_needed()
        await screenshot(a, "webapp-images-upload-refused")
        assert await bot.images.list_series() == []

        # De-identified on the keyboard's Enter: stored, and shown to everyone at once.
        await a.focus("#series-deidentify")
        await a.keyboard.press("Enter")
        up = await wait_for(
            a, "window.medverse.images.upload?.state === 'done' && window.medverse.images.upload"
        )
        # The bytes went out with progress reported (the page's XMLHttpRequest).
        assert up["total"] > 8 * 32 * 32 * 2 and up["sent"] == up["total"], up
        listed = await bot.images.list_series()
        assert [s.sha256 for s in listed] == [up["sha256"]]
        assert listed[0].deidentified and listed[0].name == "Chest CT" and listed[0].instances == 8
        await said(a, "Uploaded Chest CT: 8 images, de-identified.")
        assert await a.is_hidden("#series-refusal")
        await wait_for(b, f"window.medverse.images.shown?.series === {json.dumps(up['sha256'])}")
        await wait_for(
            b, "document.getElementById('image-caption').textContent.startsWith('Chest CT: ')"
        )
        await said(b, "Dr Ada opened Chest CT in the image panel.")

        # A zip of another series: it replaces the first in the open panel, for everyone.
        zipped = zip_files(synthetic_ct(ROWS, COLS, 6, series_uid="1.2.826.0.1.3680043.8.498.1002"))
        await a.fill("#series-name", "")
        await a.set_input_files(
            "#series-upload",
            files=[FilePayload(name="abdomen.zip", mimeType="application/zip", buffer=zipped)],
        )
        up = await wait_for(
            a, "window.medverse.images.upload?.state === 'done' && window.medverse.images.upload"
        )
        assert up["name"] == "abdomen"
        await wait_for(b, f"window.medverse.images.shown?.series === {json.dumps(up['sha256'])}")
        await wait_for(
            b, "document.getElementById('image-caption').textContent.startsWith('abdomen: ')"
        )
        await said(b, "Dr Ada showed abdomen in the image panel.")
        panel = next(iter(bot.panels.values()))
        assert panel.series == up["sha256"]
        await screenshot(b, "webapp-images-upload-shown-b")
        forget_refused_uploads(a)


async def test_a_click_on_the_linked_model_moves_the_images(
    browser: Browser, site: ServerProcess, pages: list[Page]
) -> None:
    room = "review-4"
    async with connect(
        site.url, room=room, token=token(room, "dr-r", "Dr Rad", "host"), ping_interval=0
    ) as bot:
        listing = await bot.upload_series(synthetic_ct(ROWS, COLS, SLICES), "CT", deidentify=True)
        panel_id = await bot.open_panel(listing.sha256, (2.0, 1.5, -1.0))
        start = bot.panels[panel_id].slices
        # A model made from the CT: a square in the plane of axial image 5 (z = 12.5 mm), shown
        # ten times its size with its centre one metre in front of a viewpoint at the origin.
        target = 5
        z_m = target * 2.5 / 1000.0
        info = await bot.upload_asset(quad_glb(z_m, 0.02), name="liver.glb")
        obj = int(
            await bot.spawn(
                info.sha256, position=(0.0, 1.6, -1.0 - 10 * z_m), scale=10.0, name="liver"
            )
        )
        a = await open_app(browser, site, token(room, "dr-a", "Dr Ada", "host"), pages)
        await screen(a, "room")
        # Loaded, and drawn where it stands (its pose comes with the room's ticks).
        await wait_for(
            a,
            f"window.medverse.describe().models['{obj}']?.loaded && "
            f"Math.abs(window.medverse.describe().models['{obj}'].position[2] - {-1.0 - 10 * z_m})"
            " < 0.01",
        )
        await wait_for(a, f"window.medverse.images.shown?.index === {start[0]}")
        assert start[0] != target

        # Not linked yet: a click on the model only selects it.
        await a.evaluate("window.medverse.place(0, 0, 0)")
        await click_scene_centre(a)
        await said(a, "Selected model liver.")
        await asyncio.sleep(0.3)
        assert bot.panels[panel_id].slices == start

        # Linked from the page: the series' frame of reference goes with it.
        await a.locator("#panel-link-controls").scroll_into_view_if_needed()
        assert await a.is_disabled("#panel-link")  # nothing chosen yet
        await a.select_option("#panel-model", str(obj))
        await a.click("#panel-link")
        for _ in range(200):
            if bot.panels[panel_id].object_id == obj:
                break
            await asyncio.sleep(0.05)
        assert bot.panels[panel_id].object_id == obj
        await said(
            a, "The images are linked to liver. Click a point on it to show the images there."
        )
        assert "Linked to liver" in await a.inner_text("#panel-link-note")

        # A click at the model's centre: every member's images move to axial image 5.
        await a.evaluate("window.medverse.place(0, 0, 0)")
        await click_scene_centre(a)
        await wait_for(a, f"window.medverse.images.shown?.index === {target}")
        for _ in range(200):
            if bot.panels[panel_id].slices[0] == target:
                break
            await asyncio.sleep(0.05)
        assert bot.panels[panel_id].slices[0] == target
        await said(a, f"The images show the point on liver: axial image {target + 1} of {SLICES}.")
        await screenshot(a, "webapp-images-located")

        # From the keyboard: the centre cross on the model and Enter, after the SDK scrolled.
        await bot.set_image_view(panel_id, slices=start)
        await wait_for(a, f"window.medverse.images.shown?.index === {start[0]}")
        await a.focus("#scene")
        await a.keyboard.press("Enter")
        await wait_for(a, f"window.medverse.images.shown?.index === {target}")

        # Unlinked: a click selects only.
        await a.select_option("#panel-model", "")
        assert await a.inner_text("#panel-link") == "Unlink"
        await a.click("#panel-link")
        for _ in range(200):
            if bot.panels[panel_id].object_id is None:
                break
            await asyncio.sleep(0.05)
        assert bot.panels[panel_id].object_id is None
        await bot.set_image_view(panel_id, slices=start)
        await wait_for(a, f"window.medverse.images.shown?.index === {start[0]}")
        await click_scene_centre(a)
        await asyncio.sleep(0.5)
        assert bot.panels[panel_id].slices == start
