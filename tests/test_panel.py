"""The operator panel at /panel in a real browser (Debian's Chromium via tests/browser.py)
against a real server on 127.0.0.1, and the /health figures it charts.

Screenshots go to tests/artifacts/ (``panel-*.png``).
"""

from __future__ import annotations

import json
import re
import secrets
import shutil
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from playwright.async_api import Browser, Page, expect

from medverse.client_sdk import AssetClient, connect
from medverse.server.auth import mint_admin_token, mint_token
from medverse.server.webapp import WEBAPP_DIR
from tests.conftest import ROOT, ServerProcess, run_server
from tests.models import triangle_glb

harness = pytest.importorskip("tests.browser")
console_errors, new_page, screenshot = harness.console_errors, harness.new_page, harness.screenshot

WEB = ROOT / "web"
SECRET = secrets.token_hex(32)

pytestmark = pytest.mark.timeout(180)

# What Chromium itself logs for a fetch the server refused or could not answer: the panel's
# own handling of those is what the tests check, so these lines are expected there.
REFUSED_LOAD = re.compile(r"status of 40[13]|ERR_CONNECTION_REFUSED|Failed to fetch")


def admin_token(secret: str = SECRET) -> str:
    return mint_admin_token(secret.encode(), identity="ops", ttl=600)


def join_token(room: str, identity: str, name: str) -> str:
    return mint_token(SECRET.encode(), room=room, identity=identity, name=name)


def _build() -> None:
    """Bundle the web app and the panel as `pip install` does."""
    npm = shutil.which("npm")
    if npm is None:
        pytest.skip("npm is not installed: the panel cannot be built")
    if not (WEB / "node_modules").exists():
        subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=WEB, check=True)
    subprocess.run([npm, "run", "--silent", "build:app"], cwd=WEB, check=True)


@pytest.fixture(scope="module")
def site() -> Iterator[ServerProcess]:
    _build()
    assert (WEBAPP_DIR / "panel.html").exists()
    with run_server(auth_secret=SECRET, room_linger=0.5) as s:
        yield s


async def sign_in(browser: Browser, site: ServerProcess, token: str) -> Page:
    page = await new_page(browser, viewport={"width": 1280, "height": 900})
    await page.goto(f"{site.http}/panel")
    await page.get_by_label("Admin token").fill(token)
    await page.get_by_role("button", name="Open the panel").click()
    return page


def row(page: Page, room: str) -> object:
    return page.locator(f'#rooms tbody tr[data-room="{room}"]')


# ---------------------------------------------------------------------- the server's side


def test_health_reports_what_the_panel_charts(site: ServerProcess) -> None:
    before = json.loads(site.get("/health"))
    assert set(before["traffic"]) == {"sent_bytes", "received_bytes"}
    assert set(before["refusals"]) == {"connections", "auth", "protocol_errors"}
    assert before["assets"]["files"] >= 0 and before["assets"]["bytes"] >= 0
    # A refused admin request counts as a token refusal by its code.
    req = urllib.request.Request(
        site.http + "/admin/rooms", headers={"Authorization": "Bearer nonsense"}
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(req, timeout=10)
    assert refused.value.code == 401
    after = json.loads(site.get("/health"))
    auth = after["refusals"]["auth"]
    assert auth.get("unauthorized", 0) == before["refusals"]["auth"].get("unauthorized", 0) + 1


async def test_health_counts_stored_assets(site: ServerProcess) -> None:
    before = json.loads(site.get("/health"))["assets"]
    model = triangle_glb(extra=secrets.randbelow(10**6))  # bytes no other test stored
    host = mint_token(SECRET.encode(), room="assets-ward", identity="h", role="host")
    async with AssetClient(site.http, "assets-ward", host) as assets:
        await assets.upload(model, "heart.glb")
        await assets.upload(model, "heart.glb")  # stored once, whatever the uploads
    after = json.loads(site.get("/health"))["assets"]
    assert after == {"files": before["files"] + 1, "bytes": before["bytes"] + len(model)}


def test_panel_files_are_served_with_a_strict_policy(site: ServerProcess) -> None:
    with urllib.request.urlopen(site.http + "/panel", timeout=10) as r:
        html = r.read().decode()
        csp = r.headers["Content-Security-Policy"]
    assert "connect-src 'self'" in csp and "script-src 'self'" in csp
    script = re.search(r'src="/panel/(panel-main-[A-Z0-9]{8}\.js)"', html)
    assert script is not None, html
    with urllib.request.urlopen(f"{site.http}/panel/{script[1]}", timeout=10) as r:
        assert r.headers["Content-Type"].startswith("text/javascript")
    for bad in ("/panel/..%2Fpanel.html", "/panel/panel.html", "/panel/app-AAAAAAAA.js"):
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(site.http + bad, timeout=10)
        assert e.value.code == 404


# ---------------------------------------------------------------------- in the browser


@pytest.mark.parametrize(
    ("kind", "status"),
    [("garbage", 401), ("other-secret", 401), ("room-host", 403)],
)
async def test_a_wrong_token_is_refused_clearly(
    browser: Browser, site: ServerProcess, kind: str, status: int
) -> None:
    token = {
        "garbage": "not-a-token",
        "other-secret": admin_token("e" * 64),
        "room-host": mint_token(SECRET.encode(), room="ward-1", identity="h", role="host"),
    }[kind]
    page = await sign_in(browser, site, token)
    alert = page.get_by_role("alert")
    await expect(alert).to_contain_text("This token was refused", timeout=20_000)
    await expect(alert).to_contain_text(f"HTTP {status}")
    assert await page.locator("#dashboard").is_hidden()
    # Refused, the token is forgotten, and it was never in the address.
    assert await page.evaluate("sessionStorage.length") == 0
    assert token not in page.url
    await expect(page.get_by_label("Admin token")).to_be_focused()
    if kind == "garbage":
        await screenshot(page, "panel-refused")
    assert [e for e in console_errors(page) if not REFUSED_LOAD.search(e)] == []


async def test_panel_shows_rooms_and_live_figures(browser: Browser, site: ServerProcess) -> None:
    room = "panel-ward"
    async with (
        connect(site.url, room=room, token=join_token(room, "bot-a", "Bot Ada")) as a,
        connect(site.url, room=room, token=join_token(room, "bot-b", "Bot Ben")),
    ):
        # Signed in with the keyboard alone: skip link, token field, Enter.
        page = await new_page(browser, viewport={"width": 1280, "height": 900})
        await page.goto(f"{site.http}/panel")
        await page.keyboard.press("Tab")
        await page.keyboard.press("Tab")
        await expect(page.get_by_label("Admin token")).to_be_focused()
        await page.keyboard.type(admin_token())
        await page.keyboard.press("Enter")
        await expect(page.locator("#dashboard")).to_be_visible(timeout=20_000)
        ward = row(page, room)
        await expect(ward.locator("td.members")).to_have_text("2", timeout=10_000)
        await expect(ward).to_contain_text("Bot Ada")
        await expect(ward).to_contain_text("Bot Ben")
        # The token is kept in this tab's session storage, never in the address.
        assert admin_token() not in page.url
        assert await page.evaluate("Object.keys(sessionStorage)") == ["medverse.panel.token"]
        # Several samples in: rates and percentiles are figures, not dashes.
        await expect(page.locator("#fig-tickP99")).to_have_text(re.compile(r"ms$"))
        await expect(page.locator("#fig-out")).to_have_text(re.compile(r"B/s$"), timeout=10_000)
        await expect(page.locator("#fig-members")).to_have_text("2")
        await expect(page.locator(".chart svg polyline.s0").first).to_have_attribute(
            "points", re.compile(r"\d+(\.\d+)?,[\d.]+ \d")
        )
        # A few refreshes in, every chart has a line (the screenshot in docs/ is this one).
        await expect(page.locator(".chart svg polyline.s0").first).to_have_attribute(
            "points", re.compile(r"^(\S+ ){5}\S+"), timeout=30_000
        )
        await screenshot(page, "panel")
        # At 200 % zoom (half the CSS width) everything reflows: no sideways scrolling.
        await page.set_viewport_size({"width": 640, "height": 450})
        await expect(ward.locator("td.members")).to_have_text("2")
        assert await page.evaluate("document.documentElement.scrollWidth <= innerWidth")
        await screenshot(page, "panel-zoom-200")
        await page.set_viewport_size({"width": 1280, "height": 900})
        await a.close()
        # One bot left: the next refresh shows one member, with no reload.
        await expect(ward.locator("td.members")).to_have_text("1", timeout=10_000)
        await expect(ward).not_to_contain_text("Bot Ada")
        await expect(page.locator("#fig-members")).to_have_text("1")
    # Both gone and the room closed after its linger: it leaves the list.
    await expect(ward).to_have_count(0, timeout=15_000)
    await expect(page.locator("#fig-members")).to_have_text("0")
    assert console_errors(page) == []


async def test_an_unreachable_server_is_said_so(browser: Browser) -> None:
    with run_server(auth_secret=SECRET) as alone:
        page = await sign_in(browser, alone, admin_token())
        await expect(page.locator("#dashboard")).to_be_visible(timeout=20_000)
    # The server stopped: the panel says so, and keeps the token to try again.
    alert = page.get_by_role("alert")
    await expect(alert).to_contain_text("Cannot reach the server", timeout=20_000)
    await expect(page.get_by_role("button", name="Try again now")).to_be_focused()
    assert await page.evaluate("sessionStorage.length") == 1
    await screenshot(page, "panel-unreachable")
    # Back on the same port, the panel returns to its figures by itself.
    with run_server(auth_secret=SECRET, port=alone.port) as again:
        await expect(page.locator("#dashboard")).to_be_visible(timeout=20_000)
        await expect(page.locator("#fig-status")).to_have_text("ok")
        assert again.port == alone.port
    assert [e for e in console_errors(page) if not REFUSED_LOAD.search(e)] == []


async def test_a_cluster_shows_its_nodes_and_their_rooms(browser: Browser) -> None:
    from tests.services import redis_available, redis_server

    if not redis_available():
        pytest.skip("redis-server is not installed")
    with redis_server() as redis:
        settings = {"redis_url": redis.url, "cluster_lease_ttl": 2.5, "auth_secret": SECRET}
        with run_server(**settings) as a, run_server(**settings) as b:
            room = "panel-far"
            async with connect(b.url, room=room, token=join_token(room, "bot", "Bot Far")):
                page = await sign_in(browser, a, admin_token())
                nodes = page.locator("#nodes tbody tr")
                await expect(nodes).to_have_count(2, timeout=20_000)
                await expect(page.locator("#cluster")).to_contain_text("(this one)")
                await expect(page.locator("#scope")).to_contain_text("of the whole cluster")
                # The room runs on the other node; this one's panel lists it with its node.
                far = row(page, room)
                await expect(far.locator("td.members")).to_have_text("1", timeout=20_000)
                await expect(far.locator("th")).to_contain_text("node ")
                await page.locator("#cluster").scroll_into_view_if_needed()
                await screenshot(page, "panel-cluster")
                assert console_errors(page) == []
