"""The clinic web app in a real browser (Debian's Chromium via tests/browser.py) against a real
server on 127.0.0.1: pages and a Python SDK bot see each other move, the waiting room, consent,
host controls, shared models and annotations, and an emulated Quest 3 (iwer) in immersive VR.

Screenshots of every screen go to tests/artifacts/ (``webapp-*.png``).
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import secrets
import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import pytest_asyncio
from playwright.async_api import Browser, Page, async_playwright

from medverse.client_sdk import Pose, connect
from medverse.protocol.tokens import mint_token
from medverse.server.webapp import WEBAPP_DIR
from tests.conftest import ROOT, ServerProcess, run_server
from tests.models import triangle_glb

# The headless Chromium harness (tests/browser.py; its `browser` fixture is in conftest.py).
harness = pytest.importorskip("tests.browser")
console_errors, new_page, screenshot = harness.console_errors, harness.new_page, harness.screenshot

WEB = ROOT / "web"
SECRET = secrets.token_hex(32)
CONSENT_TEXT = "Your session is recorded in the audit log only: no audio or video is stored."

# One event loop and one browser for the whole module: launching Chromium for every test would
# cost more than most tests take. Each test's pages get contexts of their own.
pytestmark = [pytest.mark.timeout(180), pytest.mark.asyncio(loop_scope="module")]

# The codec's bounds: positions in whole millimetres (0.5 mm off at most), rotations within
# 0.15 degrees (protocol/SPEC.md).
POSITION_BOUND = 0.0006
ANGLE_BOUND_DEG = 0.2


def _build_app() -> None:
    """Bundle the app as `pip install` does (npm run build:app), so the server serves this
    checkout's app."""
    npm = shutil.which("npm")
    if npm is None:
        pytest.skip("npm is not installed: the web app cannot be built")
    if not (WEB / "node_modules").exists():
        subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=WEB, check=True)
    subprocess.run([npm, "run", "--silent", "build:app"], cwd=WEB, check=True)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The app built and a server with tokens, consent in rooms ``consent-*``."""
    _build_app()
    assert (WEBAPP_DIR / "index.html").exists()
    consent = tmp_path_factory.mktemp("consent") / "consent.txt"
    consent.write_text(CONSENT_TEXT)
    with run_server(
        auth_secret=SECRET,
        consent_file=str(consent),
        consent_rooms="consent-.*",
        room_linger=0.5,
        resume_grace=3.0,
    ) as s:
        yield s


@pytest.fixture(scope="module")
def emulator() -> str:
    """iwer's emulated headset as one script to inject before the page's own."""
    esbuild = WEB / "node_modules" / ".bin" / "esbuild"
    out = subprocess.run(
        [str(esbuild), "tools/xr-emulator.js", "--bundle", "--format=iife", "--log-level=error"],
        cwd=WEB,
        check=True,
        capture_output=True,
        text=True,
    )
    return out.stdout


def token(room: str, identity: str, name: str, role: str = "participant") -> str:
    return mint_token(SECRET.encode(), room=room, identity=identity, name=name, role=role)


async def open_app(browser: Browser, site: ServerProcess, tok: str, **ctx: Any) -> Page:
    """A page on /join with the token in the fragment."""
    init = ctx.pop("init_script", None)
    # Small enough that several pages' software WebGL does not starve a 2-core machine.
    ctx.setdefault("viewport", {"width": 960, "height": 600})
    page = await new_page(browser, **ctx)
    if init:
        await page.add_init_script(init)
    await page.goto(f"{site.http}/join#token={tok}")
    return page


async def wait_for(page: Page, expr: str, timeout: float = 20.0) -> Any:
    """Wait until ``expr`` (JavaScript) is truthy in the page; its value."""
    # An arrow function, not an expression: Playwright would eval() an expression in the page,
    # which the page's content security policy forbids.
    handle = await page.wait_for_function(f"() => ({expr})", timeout=timeout * 1000, polling=50)
    return await handle.json_value()


async def screen(page: Page, name: str, timeout: float = 20.0) -> None:
    await wait_for(page, f"window.medverse?.screen === {json.dumps(name)}", timeout)


async def said(page: Page, text: str) -> None:
    """Wait until the page has announced ``text`` in its live region."""
    await wait_for(page, f"window.medverse.announcements.includes({json.dumps(text)})")


async def listed(page: Page, text: str) -> None:
    """Wait until the page's list of people shows ``text``."""
    people = "document.getElementById('people-list').innerText"
    await wait_for(page, f"{people}.includes({json.dumps(text)})")


async def describe(page: Page) -> dict[str, Any]:
    return await page.evaluate("window.medverse.describe()")


def off(a: Any, b: Any) -> float:
    """The largest difference of two positions' coordinates, metres."""
    return max(abs(x - y) for x, y in zip(a, b, strict=True))


def angle_deg(q1: list[float], q2: list[float]) -> float:
    dot = abs(sum(a * b for a, b in zip(q1, q2, strict=True)))
    return math.degrees(2 * math.acos(min(1.0, dot)))


async def until(check: Any, timeout: float = 15.0, step: float = 0.1) -> Any:
    """Poll the coroutine function ``check`` until it returns something truthy."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = await check()
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"not reached in {timeout} s: {check.__name__}")
        await asyncio.sleep(step)


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


async def test_the_server_serves_the_app(site: ServerProcess) -> None:
    """/ and /join are the page (never cached, a strict content security policy); the bundle
    is cached for good under its hashed name; other names are 404; the API is untouched."""
    import urllib.error
    import urllib.request

    for path in ("/", "/join"):
        with urllib.request.urlopen(site.http + path) as r:
            assert r.headers["Content-Type"] == "text/html; charset=utf-8"
            assert r.headers["Cache-Control"] == "no-cache"
            assert "default-src 'self'" in r.headers["Content-Security-Policy"]
            page = r.read().decode()
    script = page.split('src="app/')[1].split('"')[0]
    with urllib.request.urlopen(f"{site.http}/app/{script}") as r:
        assert r.headers["Content-Type"] == "text/javascript; charset=utf-8"
        assert "immutable" in r.headers["Cache-Control"]
    for bad in ("/app/..%2Fapp.py", "/app/index.html", "/app/nothing-ABCDEFGH.js"):
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(site.http + bad)
        assert err.value.code == 404
    assert site.get_json("/health")["status"] == "ok"


async def test_pages_and_a_bot_see_each_other_move(
    browser: Browser, site: ServerProcess, pages: list[Page]
) -> None:
    room = "ward-1"
    host = await open_app(browser, site, token(room, "dr-a", "Dr Ada", "host"))
    patient = await open_app(browser, site, token(room, "pat-b", "Bea"))
    pages += [host, patient]
    await screen(host, "room")
    await screen(patient, "room")
    # The token left the address bar at once.
    assert "token" not in host.url
    async with connect(site.url, room=room, token=token(room, "bot", "Bot")) as bot:
        bot_head = Pose((0.4, 1.5, -0.7), (0.0, 0.3826834, 0.0, 0.9238795))
        bot.send_pose(head=bot_head, left=Pose((0.2, 1.1, -0.6)), right=Pose((0.6, 1.1, -0.6)))
        ids = {
            "host": await host.evaluate("window.medverse.memberId"),
            "patient": await patient.evaluate("window.medverse.memberId"),
        }
        # The host walks with the keyboard; the patient's page must draw it where it is.
        await host.focus("#scene")
        await host.keyboard.down("KeyW")
        await asyncio.sleep(0.4)
        await host.keyboard.up("KeyW")
        await host.keyboard.down("ArrowLeft")
        await asyncio.sleep(0.3)
        await host.keyboard.up("ArrowLeft")

        async def host_drawn_on_patient() -> bool:
            own = (await describe(host))["head"]
            other = (await describe(patient))["avatars"].get(str(ids["host"]))
            if not other or not other["head"]:
                return False
            err = off(own["position"], other["head"]["position"])
            return err <= POSITION_BOUND and (
                angle_deg(own["rotation"], other["head"]["rotation"]) <= ANGLE_BOUND_DEG
            )

        await until(host_drawn_on_patient)

        async def bot_drawn_on_pages() -> bool:
            for page in (host, patient):
                a = (await describe(page))["avatars"].get(str(bot.member_id))
                if not a or not a["head"] or a["hands"][0] is None:
                    return False
                err = off(a["head"]["position"], bot_head.position)
                if err > POSITION_BOUND:
                    return False
                if angle_deg(a["head"]["rotation"], list(bot_head.rotation)) > ANGLE_BOUND_DEG:
                    return False
            return True

        await until(bot_drawn_on_pages)

        async def pages_seen_by_bot() -> bool:
            for name in ("host", "patient"):
                own = (await describe(host if name == "host" else patient))["head"]
                seen = bot.avatars.get(ids[name])
                if seen is None or seen.head is None:
                    return False
                err = off(own["position"], seen.head.position)
                if err > POSITION_BOUND:
                    return False
            return True

        await until(pages_seen_by_bot)
        host_seen = (await describe(patient))["avatars"][str(ids["host"])]
        assert host_seen["name"] == "Dr Ada"
        # A view of the others from a little way back, for the screenshot.
        await patient.evaluate("window.medverse.place(0, 2.2, 0)")
        await asyncio.sleep(0.3)
        await screenshot(patient, "webapp-room")
        people = await host.inner_text("#people-list")
        assert "Bea" in people and "Bot" in people
        await screenshot(host, "webapp-room-host")


async def test_the_waiting_room_sees_nothing_until_admitted(
    browser: Browser, site: ServerProcess, pages: list[Page]
) -> None:
    room = "ward-2"
    host = await open_app(browser, site, token(room, "dr-a", "Dr Ada", "host"))
    pages.append(host)
    await screen(host, "room")
    await host.get_by_role("button", name="Use waiting room").click()
    await wait_for(host, "document.getElementById('host-entry').textContent.includes('waiting')")
    patient = await open_app(browser, site, token(room, "pat-c", "Cyd"))
    pages.append(patient)
    await screen(patient, "lobby")
    await said(patient, "You are in the waiting room. The therapist will let you in.")
    await wait_for(patient, "document.getElementById('status').textContent.includes('therapist')")
    await wait_for(host, "window.medverse.lobby.length === 1")
    await asyncio.sleep(1.0)  # a lobby member must receive nothing for a while
    seen = await patient.evaluate(
        "({frames: window.medverse.client.framesReceived,"
        " members: window.medverse.client.members.size, described: window.medverse.describe()})"
    )
    assert seen == {"frames": 0, "members": 0, "described": None}
    await screenshot(patient, "webapp-lobby")
    await screenshot(host, "webapp-host-lobby")
    await host.get_by_role("button", name="Admit Cyd").click()
    await screen(patient, "room")
    host_id = await host.evaluate("window.medverse.memberId")
    await wait_for(patient, f"window.medverse.describe().avatars['{host_id}']")
    await wait_for(host, "window.medverse.lobby.length === 0")
    # Someone the host does not let in is told so.
    other = await open_app(browser, site, token(room, "pat-x", "Xan"))
    pages.append(other)
    await screen(other, "lobby")
    await host.get_by_role("button", name="Deny Xan").click()
    await screen(other, "closed")
    assert await other.evaluate("window.medverse.closed.reason") == "denied"
    assert "did not let you into" in await other.inner_text("#closed-text")

    # Stepping out and back, then a removal.
    await patient.get_by_role("button", name="Step out").click()
    await screen(patient, "paused")
    patient_id = await patient.evaluate("window.medverse.memberId")
    await wait_for(host, "document.getElementById('people-list').innerText.includes('stepped out')")
    await wait_for(host, f"!window.medverse.describe().avatars['{patient_id}']")
    await screenshot(patient, "webapp-paused")
    await patient.get_by_role("button", name="Return to the session").click()
    await screen(patient, "room")
    await wait_for(host, f"window.medverse.describe().avatars['{patient_id}']")
    host.on("dialog", lambda d: asyncio.ensure_future(d.accept()))
    await host.get_by_role("button", name="Remove Cyd").click()
    await screen(patient, "closed")
    assert await patient.evaluate("window.medverse.closed.reason") == "removed"
    assert "removed you" in (await patient.inner_text("#closed-text"))
    await screenshot(patient, "webapp-removed")
    await host.get_by_role("button", name="End the session for everyone").click()
    await screen(host, "closed")
    assert await host.evaluate("window.medverse.closed.reason") == "session_ended"
    await screenshot(host, "webapp-ended")


async def test_consent_declined_closes_and_accepted_joins(
    browser: Browser, site: ServerProcess, pages: list[Page]
) -> None:
    room = "consent-1"
    page = await open_app(browser, site, token(room, "pat-d", "Dee"))
    pages.append(page)
    await screen(page, "consent")
    assert CONSENT_TEXT in await page.inner_text("#consent-text")
    await screenshot(page, "webapp-consent")
    await page.get_by_role("button", name="I do not agree").click()
    await screen(page, "closed")
    assert await page.evaluate("window.medverse.closed.reason") == "consent_required"
    assert await page.evaluate("window.medverse.state") == "closed"
    await screenshot(page, "webapp-consent-declined")
    other = await open_app(browser, site, token(room, "pat-e", "Eve"))
    pages.append(other)
    await screen(other, "consent")
    await other.get_by_role("button", name="I agree and join").click()
    await screen(other, "room")


async def test_a_pasted_link_joins_and_a_bad_one_is_explained(
    browser: Browser, site: ServerProcess, pages: list[Page]
) -> None:
    page = await new_page(browser, viewport={"width": 960, "height": 600})
    pages.append(page)
    await page.goto(f"{site.http}/")
    await screen(page, "signin")
    await page.get_by_label("Join link or token").fill("not a token")
    await page.get_by_role("button", name="Join").click()
    await wait_for(page, "!document.getElementById('signin-error').hidden")
    assert "This is not a join token" in await page.inner_text("#signin-error")
    await screenshot(page, "webapp-signin")
    tok = token("ward-3", "pat-f", "Fay")
    await page.get_by_label("Join link or token").fill(f"{site.http}/join#token={tok}")
    await page.get_by_role("button", name="Join").click()
    await screen(page, "room")
    assert "Fay" in await page.inner_text("#where")


async def spawn_model(bot: Any, position: tuple[float, float, float], scale: float) -> int:
    """Upload the test triangle (nodes skin and vessels) and put it in the room."""
    info = await bot.upload_asset(triangle_glb(), name="triangle.glb")
    return int(await bot.spawn(info.sha256, position=position, scale=scale, name="heart"))


async def test_models_annotations_and_view_are_shared(
    browser: Browser, site: ServerProcess, pages: list[Page]
) -> None:
    room = "review-1"
    async with connect(site.url, room=room, token=token(room, "bot", "Bot", "host")) as bot:
        # A 30 cm triangle one metre in front of a viewpoint at the origin looking along -Z,
        # with the centre cross on it.
        oid = await spawn_model(bot, (-0.1, 1.5, -1.0), 3.0)
        a = await open_app(browser, site, token(room, "dr-a", "Dr Ada"))
        b = await open_app(browser, site, token(room, "dr-b", "Dr Ben"))
        pages += [a, b]
        for page in (a, b):
            await screen(page, "room")
            await wait_for(page, f"window.medverse.describe().models['{oid}']?.loaded")
        await a.evaluate("window.medverse.place(0, 0, 0)")
        await b.evaluate("window.medverse.place(0.6, 0.3, 0.5)")
        models = (await describe(b))["models"][str(oid)]
        assert models["nodes"] == ["skin", "vessels"]

        # A pin from the keyboard at the centre cross, with its label.
        await a.get_by_label("Pin", exact=True).check()
        await a.get_by_label("Pin label").fill("Lesion")
        await a.focus("#scene")
        await a.keyboard.press("Enter")
        await wait_for(b, f"window.medverse.describe().models['{oid}'].annotations === 1")
        pin = next(iter(bot.objects[oid].annotations.values()))
        assert pin.kind == "pin" and pin.text == "Lesion"
        # The pin is where the centre ray meets the model: (0, 1.6, -1) in the room.
        local = [(0.0 - -0.1) / 3, (1.6 - 1.5) / 3, 0.0]
        assert off(pin.points[0], local) < 0.002, pin.points

        # A measurement from two mouse clicks on the model.
        await a.get_by_label("Measure", exact=True).check()
        box = await a.locator("#scene").bounding_box()
        assert box is not None
        cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
        await a.mouse.click(cx, cy)
        await a.mouse.click(cx - 20, cy + 20)
        await wait_for(b, f"window.medverse.describe().models['{oid}'].annotations === 2")
        kinds = sorted(x.kind for x in bot.objects[oid].annotations.values())
        assert kinds == ["measure", "pin"]

        # A stroke from the keyboard: a point at the centre cross, turn a little, another
        # point, then "Finish stroke".
        await a.get_by_label("Stroke", exact=True).check()
        await a.focus("#scene")
        await a.keyboard.press("Enter")
        await a.evaluate("window.medverse.place(0, 0, 0.03)")
        await a.keyboard.press("Enter")
        await a.get_by_role("button", name="Finish stroke").click()
        await wait_for(b, f"window.medverse.describe().models['{oid}'].annotations === 3")
        stroke = [x for x in bot.objects[oid].annotations.values() if x.kind == "stroke"]
        assert len(stroke) == 1 and len(stroke[0].points) == 2

        # Node visibility and the clipping plane reach the other page's drawing.
        await a.get_by_label("Show skin").uncheck()
        hidden = f"window.medverse.describe().models['{oid}'].hiddenNodes"
        await wait_for(b, f"{hidden}.includes('skin')")
        await a.get_by_label("Clipping plane").check()
        await wait_for(b, f"window.medverse.describe().models['{oid}'].clipped")
        await a.get_by_label("Show skin").check()
        await wait_for(b, f"!{hidden}.length")

        # Grab with G, walk with W, let go with G: the other page draws the model there.
        await a.get_by_label("None", exact=True).check()
        await a.focus("#scene")
        await a.keyboard.press("KeyG")
        await wait_for(a, "window.medverse.held")
        await a.keyboard.down("KeyW")  # walk until 30 cm ahead, however slow the frames
        await wait_for(a, "window.medverse.describe().head.position[2] < -0.3")
        await a.keyboard.up("KeyW")
        await a.keyboard.press("KeyG")
        await wait_for(a, "!window.medverse.held")
        moved = (await describe(a))["models"][str(oid)]["position"]
        assert moved[2] < -1.1  # carried ahead of the viewer, who walked along -Z

        async def drawn_where_left() -> bool:
            seen = (await describe(b))["models"][str(oid)]["position"]
            return off(seen, moved) <= POSITION_BOUND

        await until(drawn_where_left)
        await a.get_by_label("Clipping plane").uncheck()
        await wait_for(b, f"!window.medverse.describe().models['{oid}'].clipped")
        await b.evaluate(f"window.medverse.select({oid})")
        await asyncio.sleep(0.3)
        await screenshot(b, "webapp-model")


async def test_an_emulated_headset_grabs_and_moves_a_model(
    browser: Browser, site: ServerProcess, pages: list[Page], emulator: str
) -> None:
    room = "review-2"
    async with connect(site.url, room=room, token=token(room, "bot", "Bot", "host")) as bot:
        oid = await spawn_model(bot, (0.2, 1.2, -0.4), 1.0)
        vr = await open_app(browser, site, token(room, "dr-v", "Dr Vee"), init_script=emulator)
        other = await open_app(browser, site, token(room, "dr-o", "Dr Oh"))
        pages += [vr, other]
        await screen(vr, "room")
        await screen(other, "room")
        await wait_for(vr, f"window.medverse.describe().models['{oid}']?.loaded")
        await vr.evaluate("window.medverse.place(0, 0, 0)")
        await vr.get_by_role("button", name="Enter VR").click()
        await wait_for(vr, "window.medverse.xrPresenting")
        # The headset's head and both controllers reach the other page.
        vr_id = await vr.evaluate("window.medverse.memberId")
        await wait_for(
            other,
            f"window.medverse.describe().avatars['{vr_id}']?.hands.every((h) => h !== null)",
        )

        # The right controller goes to the model, squeezes, carries it 30 cm, lets go. Each
        # step waits until the page's frames have seen the device's change (the grip, which
        # the page sends as the hand, sits 5 cm from the controller's origin on a Quest).
        async def hand_at(x: float, y: float, z: float) -> None:
            await vr.evaluate(f"window.xrDevice.controllers.right.position.set({x}, {y}, {z})")
            await wait_for(
                vr,
                f"(() => {{ const r = window.medverse.xrPoses?.[2]; return r && "
                f"Math.hypot(r.position[0] - {x}, r.position[1] - {y}, r.position[2] - {z})"
                " < 0.07; })()",
            )

        right = "window.xrDevice.controllers.right"
        await hand_at(0.22, 1.21, -0.4)
        await vr.evaluate(f"{right}.updateButtonValue('squeeze', 1)")
        await wait_for(vr, "window.medverse.held?.hand === 'right'")
        await hand_at(0.52, 1.31, -0.4)
        expected = [0.5, 1.3, -0.4]
        drawn = f"window.medverse.describe().models['{oid}'].position"
        await wait_for(
            vr,
            f"Math.hypot(...{drawn}.map((v, k) => v - {expected}[k])) < 0.002",
        )
        await vr.evaluate(f"{right}.updateButtonValue('squeeze', 0)")
        await wait_for(vr, "!window.medverse.held")

        async def moved_for_the_other() -> bool:
            seen = (await describe(other))["models"][str(oid)]["position"]
            return off(seen, expected) <= 0.002

        await until(moved_for_the_other)

        # The page lets go at once; the release reaches the others a round trip later.
        async def released_for_the_bot() -> bool:
            state = bot.objects.get(oid)
            return state is not None and state.holder is None

        await until(released_for_the_bot)
        # The trigger pins an annotation where the controller's ray (along -Z) meets the model.
        await hand_at(0.52, 1.32, 0)
        await vr.evaluate(f"{right}.updateButtonValue('trigger', 1)")
        await wait_for(vr, f"window.medverse.describe().models['{oid}'].annotations === 1")
        await vr.evaluate(f"{right}.updateButtonValue('trigger', 0)")
        await wait_for(other, f"window.medverse.describe().models['{oid}'].annotations === 1")
        pin = next(iter(bot.objects[oid].annotations.values()))
        assert pin.kind == "pin" and off(pin.points[0], [0.02, 0.02, 0.0]) < 0.003, pin.points
        await screenshot(other, "webapp-xr-moved")


async def test_host_controls_mute_roles_entry_and_audio_rules(
    browser: Browser, site: ServerProcess, pages: list[Page]
) -> None:
    room = "ward-5"
    host = await open_app(browser, site, token(room, "dr-a", "Dr Ada", "host"))
    patient = await open_app(browser, site, token(room, "pat-g", "Gus"))
    pages += [host, patient]
    await screen(host, "room")
    await screen(patient, "room")
    # A participant has no host controls.
    assert await patient.locator("#host-room").is_hidden()
    assert await patient.locator("#host-lobby").is_hidden()

    await host.get_by_role("button", name="Mute Gus").click()
    await said(patient, "A host muted your microphone.")
    await listed(host, "muted")
    await host.get_by_role("button", name="Allow Gus to unmute").click()
    await said(patient, "A host allowed you to unmute.")

    await host.get_by_label("Audio zone").select_option("2")
    await listed(host, "zone 2")
    await host.get_by_role("button", name="Broadcast Gus to the whole room").click()
    await listed(host, "broadcasting")
    host_id = await host.evaluate("window.medverse.memberId")
    await patient.get_by_label("Whisper to").select_option(str(host_id))
    await patient.get_by_role("button", name="Set", exact=True).click()
    await wait_for(patient, "document.getElementById('audio-rules').innerText.includes('Whispers')")

    await host.get_by_role("button", name="Lock", exact=True).click()
    await wait_for(host, "document.getElementById('host-entry').textContent === 'locked'")
    await host.get_by_role("button", name="Make Gus a host").click()
    await said(patient, "Your role is now host.")
    await wait_for(patient, "!document.getElementById('host-room').hidden")
    await listed(host, "host · zone 2")
    await screenshot(host, "webapp-host-controls")

    # A dropped connection shows the reconnecting screen and comes back as the same member.
    me = await patient.evaluate("window.medverse.memberId")
    await patient.evaluate("window.medverse.client.socket.close()")
    await wait_for(patient, "window.medverse.announcements.some((a) => a.includes('Reconnect'))")
    await screen(patient, "room")
    assert await patient.evaluate("window.medverse.memberId") == me


async def test_usable_at_200_percent_zoom(
    browser: Browser, site: ServerProcess, pages: list[Page]
) -> None:
    """At 200 % zoom (a 1280 px window, two device pixels per CSS pixel) the room reflows to
    one column: nothing needs horizontal scrolling and every control is reachable with Tab."""
    room = "ward-6"
    page = await open_app(
        browser,
        site,
        token(room, "dr-a", "Dr Ada", "host"),
        viewport={"width": 640, "height": 400},
        device_scale_factor=2,
    )
    pages.append(page)
    await screen(page, "room")
    overflow = await page.evaluate(
        "document.documentElement.scrollWidth - document.documentElement.clientWidth"
    )
    assert overflow <= 0
    # Tab from the 3D view reaches the session controls, each with a visible focus ring.
    await page.focus("#scene")
    seen = set()
    for _ in range(12):
        await page.keyboard.press("Tab")
        info = await page.evaluate(
            "(() => { const e = document.activeElement; const s = getComputedStyle(e);"
            " return [e.textContent.trim() || e.getAttribute('aria-label') || e.id,"
            " s.outlineStyle !== 'none' && s.outlineWidth !== '0px']; })()"
        )
        seen.add(info[0])
        assert info[1], f"{info[0]} has no visible focus"
    assert "Step out" in seen and "Leave" in seen
    await screenshot(page, "webapp-zoom-200")


async def test_audio_connects_with_the_microphone_and_mutes(
    browser: Browser, site: ServerProcess, pages: list[Page]
) -> None:
    room = "ward-7"
    page = await open_app(browser, site, token(room, "pat-h", "Hal"))
    listener = await open_app(
        browser,
        site,
        mint_token(SECRET.encode(), room=room, identity="obs", name="Ivy", grants=["annotate"]),
    )
    pages += [page, listener]
    await screen(page, "room")
    await screen(listener, "room")
    # The microphone (Chromium's fake one) is asked for once and published; the mix comes down.
    await wait_for(page, "window.medverse.audio.connection === 'connected'", timeout=30)
    assert await page.evaluate("window.medverse.audio") == {
        "mic": "on",
        "publishing": True,
        "muted": False,
        "connection": "connected",
        "receiving": True,
    }
    await wait_for(page, "document.getElementById('mic-text').textContent.includes('is on')")
    # Without the publish_audio grant the page only listens, and says why.
    await wait_for(listener, "window.medverse.audio.connection === 'connected'", timeout=30)
    heard = await listener.evaluate("window.medverse.audio")
    assert heard["mic"] == "not_allowed" and not heard["publishing"] and heard["receiving"]
    assert await listener.locator("#mic-toggle").is_hidden()
    await page.get_by_role("button", name="Mute microphone").click()
    await said(page, "Your microphone is muted.")
    assert (await page.evaluate("window.medverse.audio"))["muted"] is True
    await page.get_by_role("button", name="Unmute microphone").click()
    await said(page, "Your microphone is on.")


async def test_a_member_moved_by_a_host_arrives_in_the_other_room(
    browser: Browser, site: ServerProcess, pages: list[Page]
) -> None:
    room = "ward-8"
    page = await open_app(browser, site, token(room, "pat-j", "Jo"))
    pages.append(page)
    await screen(page, "room")
    async with (
        connect(site.url, room=room, token=token(room, "dr-a", "Dr Ada", "host")) as host,
        connect(site.url, room="ward-9", token=token("ward-9", "dr-b", "Dr Ben", "host")) as there,
    ):
        before = await page.evaluate("window.medverse.memberId")
        await host.transfer(before, "ward-9", reason="the physiotherapist sees you now")
        await said(page, "You are now in room ward-9.")
        await screen(page, "room")
        assert "Room ward-9" in await page.inner_text("#where")
        said_all = await page.evaluate("window.medverse.announcements")
        assert any("physiotherapist" in a for a in said_all)
        await wait_for(page, f"window.medverse.describe().avatars['{there.member_id}']")
        assert "Dr Ben" in await page.inner_text("#people-list")


REFUSE_MICROPHONE = """
window.micAsked = 0;
navigator.mediaDevices.getUserMedia = async () => {
  window.micAsked += 1;
  throw new DOMException("Permission denied", "NotAllowedError");
};
"""

# What a page served over plain http from another machine's address is: not a secure context.
NOT_SECURE = "Object.defineProperty(window, 'isSecureContext', { value: false });"


async def test_a_refused_microphone_or_an_insecure_page_is_explained(
    browser: Browser, site: ServerProcess, pages: list[Page], emulator: str
) -> None:
    room = "ward-10"
    refused = await open_app(
        browser, site, token(room, "pat-k", "Kim"), init_script=REFUSE_MICROPHONE
    )
    pages.append(refused)
    await screen(refused, "room")
    await wait_for(refused, "window.medverse.audio.connection === 'connected'", timeout=30)
    await wait_for(refused, "document.getElementById('mic-text').textContent")
    state = await refused.evaluate("window.medverse.audio")
    assert state["mic"] == "refused" and not state["publishing"] and state["receiving"]
    assert "You did not allow the microphone" in await refused.inner_text("#mic-text")
    # Asked once: coming back after a dropped connection does not ask again.
    await refused.evaluate("window.medverse.client.socket.close()")
    await said(refused, "Reconnected. You are back in the session.")
    assert await refused.evaluate("window.micAsked") == 1
    await screenshot(refused, "webapp-mic-refused")

    insecure = await open_app(
        browser, site, token(room, "pat-l", "Lee"), init_script=emulator + NOT_SECURE
    )
    pages.append(insecure)
    await screen(insecure, "room")
    notices = await insecure.inner_text("#notices")
    assert "not a secure context" in notices and "microphone" in notices
    await wait_for(insecure, "document.getElementById('xr-text').textContent.includes('secure')")
    assert await insecure.locator("#vr-enter").is_hidden()
    mic_text = "document.getElementById('mic-text').textContent"
    await wait_for(insecure, f"{mic_text}.includes('not a secure context')", timeout=30)
    assert await insecure.evaluate("window.medverse.audio.mic") == "insecure"
    await screenshot(insecure, "webapp-insecure")
