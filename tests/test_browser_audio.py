"""Spatial audio in a real browser: headless Chromium joins with the JavaScript SDK
(``web/sdk/audio.js``) and hears a Python tone bot through the server's mix.

The page (``tests/pages/audio.html``, served with ``web/sdk`` by a small HTTP server of the
test's own on 127.0.0.1) measures what it receives with WebAudio: an AnalyserNode per channel
of the mix, read every 10 ms with the page's own clock. Everything stays on loopback: the
server's ICE addresses are 127.0.0.1, it drops the browser's candidates on other interfaces,
and the connected candidate pair is checked to be loopback on both ends.
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from playwright.async_api import Browser, Page

from medverse.client_sdk import LevelMeter, Pose, connect, tone_track
from medverse.protocol.tokens import mint_token

from .browser import console_errors, new_page, screenshot
from .conftest import ROOT, ServerProcess, free_port, run_server

SECRET = "b" * 48
SILENT = -60.0  # dBFS: "does not hear"
LOUD = -45.0  # dBFS: clearly hears a -20 dBFS tone 1 m away
#: A server mute must silence the page within this many ms of the page learning it applied.
MUTE_BUDGET_MS = 200.0
MUTE_CYCLES = 5
#: A cycle counts when the page's playout buffer held at most this on average (ms): WebRTC's
#: jitter buffer holds 30-90 ms here while the machine keeps up, and grows past 500 ms when it
#: stalls (then the silence comes that much later too).
MAX_PLAYOUT_MS = 150.0


@pytest.fixture(scope="module")
def srv() -> Any:
    with run_server(
        auth_secret=SECRET,
        room_linger=0.2,
        rtc_host_addresses="127.0.0.1",
        data_dir=tempfile.mkdtemp(prefix="medverse-browser-"),
    ) as s:
        yield s


@pytest.fixture
async def site() -> AsyncIterator[str]:
    """The test pages and ``web/sdk`` over HTTP on 127.0.0.1 (a secure context for media)."""
    app = web.Application()
    pages = Path(__file__).resolve().parent / "pages"
    app.router.add_static("/sdk/", ROOT / "web" / "sdk")
    app.router.add_static("/pages/", pages)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


def tok(room: str, who: str, role: str) -> str:
    return mint_token(SECRET.encode(), room=room, identity=who, name=who, role=role)


async def until(
    check: Callable[[], Awaitable[Any]], what: str, timeout: float = 15.0, step: float = 0.05
) -> Any:
    """Poll ``check`` until it returns something truthy (returned) or fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = await check()
        if last:
            return last
        await asyncio.sleep(step)
    raise AssertionError(f"{what}: not within {timeout} s (last: {last!r})")


async def page_levels(page: Page, ms: float = 200.0) -> tuple[float, float]:
    """The page's mean left and right level (dBFS, power mean) over its last ``ms``."""
    left, right = await page.evaluate(
        """(ms) => {
            const end = performance.now();
            const rows = window.levels.filter((r) => r[0] >= end - ms);
            if (!rows.length) return [-120, -120];
            const mean = (i) => 10 * Math.log10(
                rows.reduce((s, r) => s + 10 ** (r[i] / 10), 0) / rows.length);
            return [mean(1), mean(2)];
        }""",
        ms,
    )
    return float(left), float(right)


def side(which: str) -> Callable[[tuple[float, float]], bool]:
    """The tone is heard on ``which`` side, at least 6 dB louder than on the other."""

    def ok(lv: tuple[float, float]) -> bool:
        near, far = lv if which == "left" else lv[::-1]
        return near > LOUD and near - far >= 6.0

    return ok


async def test_page_hears_a_bot_on_its_side_and_a_server_mute_within_200_ms(
    srv: ServerProcess, site: str, browser: Browser
) -> None:
    room = "browser-audio"
    page = await new_page(browser)
    await page.goto(f"{site}/pages/audio.html")
    joined = await page.evaluate(
        "([u, r, t]) => window.join(u, r, t, 'auto')",
        [srv.url, room, tok(room, "host", "host")],
    )
    assert joined["publishing"] is True  # a host may: its fake microphone goes up
    async with connect(
        srv.url, room=room, name="bot", token=tok(room, "bot", "participant")
    ) as bot:
        bot.send_pose(head=Pose((-1.0, 1.6, 0.0), (0.0, 0.0, 0.0, 1.0)))
        tone = tone_track(440.0, -20.0)
        meter = LevelMeter(await bot.audio.start(tone))
        try:
            # 1 m to the page's left (it faces -Z): louder on the left.
            await until(lambda: _check(page, side("left")), "tone heard on the left")
            left = await settled(page, "left")
            bot.send_pose(head=Pose((1.0, 1.6, 0.0), (0.0, 0.0, 0.0, 1.0)))
            await until(lambda: _check(page, side("right")), "tone heard on the right")
            right = await settled(page, "right")
            await until(
                lambda: page.evaluate("(id) => window.audio.isSpeaking(id)", bot.member_id),
                "speaking indicator",
            )
            # The page's microphone (Chromium's fake device: a beep every second) goes up: the
            # bot hears it.
            await until(
                lambda: _true(max(meter.levels(1.0)) > SILENT),
                "the bot hears the page's microphone",
            )
            # The WebRTC path is loopback on both ends.
            pair = await page.evaluate(SELECTED_PAIR)
            assert pair is not None, "no connected candidate pair"
            assert pair["local"] in ("127.0.0.1", "::1"), pair
            assert pair["remote"] == "127.0.0.1", pair
            await screenshot(page, "browser-audio-hearing")
            # The host (the page) mutes the bot, which keeps talking, and lets it unmute, a
            # few times; the page measures when it stops hearing it. What the page hears lags
            # by its own playout (jitter) buffer, which WebRTC grows when the machine stalls
            # the page or the server (to a second on this shared 2-core machine at times): a
            # cycle counts when that buffer held no more than a machine that keeps up holds,
            # and the median of the counted cycles is held to the budget.
            cycles = []
            for _ in range(MUTE_CYCLES):
                cycles.append(await mute_cycle(page, bot.member_id))
                counted = [c for c in cycles if c is not None and c[2] <= MAX_PLAYOUT_MS]
                if len(counted) >= 2:
                    break
                await unmute(page, bot.member_id)
            report = ", ".join(
                "-" if c is None else f"{c[0]:.0f} ms ({c[1]:.0f} ms; {c[2]:.0f} ms)"
                for c in cycles
            )
            print(
                f"\nheard left {left[0]:.1f}/{left[1]:.1f} dBFS, right "
                f"{right[0]:.1f}/{right[1]:.1f} dBFS; silent after the mute applied (after the"
                f" host sent it; the page's playout buffer meanwhile): {report}"
            )
            assert len(counted) >= 2, f"the page's playout buffer stayed too deep: {report}"
            after_applied = statistics.median(a for a, _, _ in counted)
            assert after_applied <= MUTE_BUDGET_MS, report
            await until(
                lambda: page.evaluate("() => window.audio.speaking.length === 0"),
                "speaking indicator cleared",
            )
            await screenshot(page, "browser-audio-muted")
        finally:
            meter.stop()
    # Closing audio leaves the room connection up.
    state = await page.evaluate(
        "() => { window.audio.close(); return [window.audio.pc, window.client.state]; }"
    )
    assert state == [None, "joined"]
    assert console_errors(page) == []


async def mute_cycle(page: Page, member_id: int) -> tuple[float, float, float] | None:
    """Mute ``member_id`` as the page's host and return how long after the mute applied (the
    page's member_state event) and after the page sent it the page stopped hearing the tone,
    with the page's mean playout buffer meanwhile (ms); None when the tone had already dropped
    out before the page sent the mute (nothing to measure). The page may hear the silence
    before it hears of the mute (a negative figure)."""
    await until(lambda: _check(page, side("right"), 300.0), "tone heard before the mute")
    buffer0 = await page.evaluate(PLAYOUT_BUFFER)
    sent = await page.evaluate(
        "(id) => { const t = performance.now(); window.client.moderate('mute', id); return t; }",
        member_id,
    )
    applied = await until(
        lambda: page.evaluate(STATE_AT, [member_id, True, sent]), "member_state muted"
    )
    await asyncio.sleep(1.0)  # the rest of the page's measurements
    got = await page.evaluate(STOPPED, [sent, SILENT])
    assert got["stop"] is not None, "still heard a second after the mute"
    buffer1 = await page.evaluate(PLAYOUT_BUFFER)
    # What the page's own jitter buffer held on average over the cycle.
    playout = 1000.0 * (buffer1[0] - buffer0[0]) / max(1, buffer1[1] - buffer0[1])
    if got["loudBefore"] is None or sent - got["loudBefore"] > 100.0:
        return None
    return got["stop"] - applied, got["stop"] - sent, playout


async def unmute(page: Page, member_id: int) -> None:
    """The page's host lets ``member_id`` speak again."""
    t = await page.evaluate(
        "(id) => { const t = performance.now(); window.client.moderate('allow_unmute', id);"
        " return t; }",
        member_id,
    )
    await until(lambda: page.evaluate(STATE_AT, [member_id, False, t]), "member_state unmuted")


async def settled(page: Page, which: str) -> tuple[float, float]:
    """The levels over 300 ms once the pan has settled (the move is out of the window), still
    on ``which`` side: polled, so that a gap in playout on a busy machine is waited out."""
    await asyncio.sleep(0.4)
    return await until(lambda: _check(page, side(which), 300.0), f"tone settled on the {which}")


async def _true(value: bool) -> bool:
    return value


async def _check(page: Page, ok: Callable[[tuple[float, float]], bool], ms: float = 200.0) -> Any:
    lv = await page_levels(page, ms)
    return lv if ok(lv) else None


#: The local and remote addresses of the page's connected ICE candidate pair, or null.
SELECTED_PAIR = """async () => {
    const stats = await window.audio.pc.getStats();
    let pair = null;
    stats.forEach((s) => {
        if (s.type === "candidate-pair" && s.state === "succeeded" && s.nominated) pair = s;
    });
    if (pair === null) return null;
    return { local: stats.get(pair.localCandidateId).address,
             remote: stats.get(pair.remoteCandidateId).address };
}"""

#: When the page learned that member ``id``'s server mute became ``muted`` (its member_state
#: event) at or after page time ``since``, or null.
STATE_AT = """([id, muted, since]) => {
    const ev = window.events.find((e) => e.type === "member_state" && e.memberId === id
        && e.muted === muted && e.at >= since);
    return ev ? ev.at : null;
}"""

#: Around page time ``sent`` (the mute sent): the last loud measurement before it, and the
#: first silent one after the last loud one (null while still loud).
STOPPED = """([sent, threshold]) => {
    const rows = window.levels.filter((r) => r[0] >= sent - 1000);
    const loud = rows.filter((r) => Math.max(r[1], r[2]) > threshold).map((r) => r[0]);
    const before = loud.filter((t) => t <= sent);
    const lastLoud = loud.length ? loud[loud.length - 1] : null;
    const after = lastLoud === null ? null : rows.find((r) => r[0] > lastLoud);
    return { loudBefore: before.length ? before[before.length - 1] : null,
             stop: after ? after[0] : null };
}"""

#: The page's playout (jitter) buffer so far: [total delay in seconds, samples emitted].
PLAYOUT_BUFFER = """async () => {
    let out = [0, 0];
    (await window.audio.pc.getStats()).forEach((s) => {
        if (s.type === "inbound-rtp" && s.kind === "audio")
            out = [s.jitterBufferDelay ?? 0, s.jitterBufferEmittedCount ?? 0];
    });
    return out;
}"""


async def test_an_observer_page_listens_without_publishing(
    srv: ServerProcess, site: str, browser: Browser
) -> None:
    """An observer may not publish: the SDK's offer with the microphone is refused and it
    offers again to listen only, and hears the room."""
    room = "browser-observer"
    page = await new_page(browser)
    await page.goto(f"{site}/pages/audio.html")
    joined = await page.evaluate(
        "([u, r, t]) => window.join(u, r, t, 'auto')",
        [srv.url, room, tok(room, "student", "observer")],
    )
    assert joined["publishing"] is False
    async with connect(
        srv.url, room=room, name="bot", token=tok(room, "bot", "participant")
    ) as bot:
        bot.send_pose(head=Pose((0.0, 1.6, -1.0), (0.0, 0.0, 0.0, 1.0)))
        meter = LevelMeter(await bot.audio.start(tone_track(440.0, -20.0)))
        try:
            heard = await until(
                lambda: _check(page, lambda lv: max(lv) > LOUD), "the observer hears the bot"
            )
            # Nothing of the page reaches the bot: it published nothing.
            await asyncio.sleep(0.5)
            assert max(meter.levels(1.0)) <= SILENT
        finally:
            meter.stop()
    errors = console_errors(page)
    assert errors == [], errors
    print(f"\nobserver hears {heard[0]:.1f}/{heard[1]:.1f} dBFS")
