"""The clinic web app's case images and transfer controls in a real browser (Debian's Chromium
via tests/browser.py) against a real server on 127.0.0.1 running examples/clinic.toml: a CT
uploaded by a Python SDK client is opened in one page and followed by another page (image,
plane, window, pointer, measurement) and by the SDK; a host page calls the next patient in
from the waiting room and sends them back.

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

import pytest
import pytest_asyncio
from playwright.async_api import Browser, Page, async_playwright

from benchmarks.dicomgen import synthetic_ct
from medverse.client_sdk import connect
from medverse.protocol.tokens import mint_token
from medverse.server.webapp import WEBAPP_DIR
from tests.conftest import ROOT, ServerProcess, run_server

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
